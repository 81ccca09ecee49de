//! The stderr loop (docs/protocol.md §8.2): the log lines, activities, results, data requests
//! and errors a daemon sends before every reply, and [`decode_response`] for a whole response.
//!
//! Owns the message tags, both error layouts (before and from 1.26) and the typed view of
//! activity results. Must never answer a `STDERR_READ` itself or decide what a log line means
//! to the user: the caller does both.

use crate::wire::{self, DecodeError, Invalid, Reader, WireWrite};

use super::handshake::Negotiated;

pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
pub const STDERR_READ: u64 = 0x6461_7461;
pub const STDERR_WRITE: u64 = 0x6461_7416;
pub const STDERR_LAST: u64 = 0x616c_7473;
pub const STDERR_ERROR: u64 = 0x6378_7470;
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// A typed field of an activity or result: the same two kinds (and the same type) as the
/// fields of the `@nix` log lines.
pub use crate::log::Field;
/// Activity and result types: the same numbers as the `@nix` log lines use.
pub use crate::log::activity;
pub use crate::log::result as result_type;

/// `STDERR_START_ACTIVITY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartActivity {
    pub id: u64,
    /// Verbosity 0 (error) … 7 (vomit).
    pub level: u64,
    /// See [`activity`].
    pub activity_type: u64,
    pub text: String,
    pub fields: Vec<Field>,
    pub parent: u64,
}

/// `STDERR_RESULT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityResult {
    pub id: u64,
    /// See [`result_type`].
    pub result_type: u64,
    pub fields: Vec<Field>,
}

/// An [`ActivityResult`] whose type and fields we understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypedResult<'a> {
    FileLinked {
        bytes: u64,
        blocks: u64,
    },
    /// One line of build output (without its newline).
    BuildLogLine(&'a str),
    UntrustedPath(&'a str),
    CorruptedPath(&'a str),
    SetPhase(&'a str),
    Progress {
        done: u64,
        expected: u64,
        running: u64,
        failed: u64,
    },
    SetExpected {
        activity_type: u64,
        expected: u64,
    },
    PostBuildLogLine(&'a str),
    FetchStatus(&'a str),
}

impl ActivityResult {
    /// The typed view, or `None` for an unknown type or fields of the wrong shape.
    pub fn typed(&self) -> Option<TypedResult<'_>> {
        use Field::{Int, Str as S};
        use result_type as t;
        Some(match (self.result_type, self.fields.as_slice()) {
            (t::FILE_LINKED, [Int(bytes), Int(blocks)]) => TypedResult::FileLinked {
                bytes: *bytes,
                blocks: *blocks,
            },
            (t::BUILD_LOG_LINE, [S(s)]) => TypedResult::BuildLogLine(s),
            (t::UNTRUSTED_PATH, [S(s)]) => TypedResult::UntrustedPath(s),
            (t::CORRUPTED_PATH, [S(s)]) => TypedResult::CorruptedPath(s),
            (t::SET_PHASE, [S(s)]) => TypedResult::SetPhase(s),
            (t::PROGRESS, [Int(done), Int(expected), Int(running), Int(failed)]) => {
                TypedResult::Progress {
                    done: *done,
                    expected: *expected,
                    running: *running,
                    failed: *failed,
                }
            }
            (t::SET_EXPECTED, [Int(activity_type), Int(expected)]) => TypedResult::SetExpected {
                activity_type: *activity_type,
                expected: *expected,
            },
            (t::POST_BUILD_LOG_LINE, [S(s)]) => TypedResult::PostBuildLogLine(s),
            (t::FETCH_STATUS, [S(s)]) => TypedResult::FetchStatus(s),
            _ => return None,
        })
    }
}

/// An error the daemon reported (`STDERR_ERROR`); the operation's reply does not follow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DaemonError {
    /// Usually starts with `error: ` and carries ANSI colour escapes.
    pub message: String,
    /// Verbosity level (≥ 1.26).
    pub level: Option<u64>,
    /// Trace lines, outermost last (≥ 1.26).
    pub traces: Vec<String>,
    /// Exit status (< 1.26 only).
    pub exit_status: Option<u64>,
}

/// One message of the stderr loop that precedes every reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StderrMessage {
    /// A log line, usually ending in `\n`.
    Next(String),
    StartActivity(StartActivity),
    StopActivity {
        id: u64,
    },
    Result(ActivityResult),
    /// The daemon wants up to `max` bytes from us: answer with [`encode_read_reply`].
    Read {
        max: u64,
    },
    /// Data for the client's sink (old export operations only).
    Write(Vec<u8>),
    /// End of the stream; the operation's reply (if any) follows.
    Last,
    /// The operation failed; no reply follows.
    Error(DaemonError),
}

fn decode_fields(r: &mut Reader<'_>) -> wire::Result<Vec<Field>> {
    r.list("activity fields", |r| match r.u64()? {
        0 => Ok(Field::Int(r.u64()?)),
        1 => Ok(Field::Str(r.text()?)),
        kind => Err(Invalid::OutOfRange {
            what: "activity field type",
            value: kind,
        }
        .into()),
    })
}

fn decode_error(r: &mut Reader<'_>, proto: &Negotiated) -> wire::Result<DaemonError> {
    if !proto.at_least(1, 26) {
        let message = r.text()?;
        let status = r.u64_max("error exit status", u32::MAX as u64)?;
        return Ok(DaemonError {
            message,
            level: None,
            traces: Vec::new(),
            exit_status: Some(status),
        });
    }
    let kind = r.str("error type")?;
    if kind != "Error" {
        return Err(Invalid::Unexpected {
            expected: "error type \"Error\"".into(),
            got: format!("{kind:?}"),
        }
        .into());
    }
    let level = r.u64()?;
    let _name = r.bytes()?;
    let message = r.text()?;
    let no_position = |r: &mut Reader<'_>| -> wire::Result<()> {
        let have_pos = r.u64()?;
        if have_pos != 0 {
            return Err(DecodeError::malformed(
                "error positions are not part of the protocol (Nix always sends 0)",
            ));
        }
        Ok(())
    };
    no_position(r)?;
    let traces = r.list("error traces", |r| {
        no_position(r)?;
        r.text()
    })?;
    Ok(DaemonError {
        message,
        level: Some(level),
        traces,
        exit_status: None,
    })
}

/// Decodes one stderr-loop message.
pub fn decode_stderr(r: &mut Reader<'_>, proto: &Negotiated) -> wire::Result<StderrMessage> {
    let tag = r.u64()?;
    Ok(match tag {
        STDERR_NEXT => StderrMessage::Next(r.text()?),
        STDERR_START_ACTIVITY => StderrMessage::StartActivity(StartActivity {
            id: r.u64()?,
            level: r.u64()?,
            activity_type: r.u64()?,
            text: r.text()?,
            fields: decode_fields(r)?,
            parent: r.u64()?,
        }),
        STDERR_STOP_ACTIVITY => StderrMessage::StopActivity { id: r.u64()? },
        STDERR_RESULT => StderrMessage::Result(ActivityResult {
            id: r.u64()?,
            result_type: r.u64()?,
            fields: decode_fields(r)?,
        }),
        STDERR_READ => StderrMessage::Read { max: r.u64()? },
        STDERR_WRITE => StderrMessage::Write(r.bytes()?.to_vec()),
        STDERR_LAST => StderrMessage::Last,
        STDERR_ERROR => StderrMessage::Error(decode_error(r, proto)?),
        other => {
            return Err(Invalid::Unexpected {
                expected: "a nix-daemon stderr message".into(),
                got: format!("tag {other:#x}"),
            }
            .into());
        }
    })
}

/// Answers [`StderrMessage::Read`] with at most `max` bytes (fewer only at the end of the data).
pub fn encode_read_reply(w: &mut Vec<u8>, data: &[u8]) {
    w.put_bytes(data);
}

/// A whole response: the stderr messages, then the reply or the daemon's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response<T> {
    /// Everything before `STDERR_LAST` / `STDERR_ERROR` (log lines, activities, results).
    pub messages: Vec<StderrMessage>,
    pub outcome: Result<T, DaemonError>,
}

/// Decodes a whole response: stderr messages up to `STDERR_LAST`, then the reply with `reply`
/// (or up to `STDERR_ERROR`, with no reply). For operations that need no data from us: a
/// `STDERR_READ` here is [`Invalid`], because answering it is the caller's job. Callers that
/// stream logs as they come call [`decode_stderr`] one message at a time instead.
pub fn decode_response<'a, T>(
    r: &mut Reader<'a>,
    proto: &Negotiated,
    reply: impl FnOnce(&mut Reader<'a>) -> wire::Result<T>,
) -> wire::Result<Response<T>> {
    let mut messages = Vec::new();
    loop {
        match decode_stderr(r, proto)? {
            StderrMessage::Last => {
                return Ok(Response {
                    messages,
                    outcome: Ok(reply(r)?),
                });
            }
            StderrMessage::Error(e) => {
                return Ok(Response {
                    messages,
                    outcome: Err(e),
                });
            }
            StderrMessage::Read { max } => {
                return Err(DecodeError::malformed(format!(
                    "the daemon asked for {max} bytes of input in a response that takes none"
                )));
            }
            m => messages.push(m),
        }
    }
}
