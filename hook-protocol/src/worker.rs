//! The client side of Nix's worker protocol (`nix-daemon --stdio` over `ssh-ng://`, and the
//! local daemon socket; PROTOCOL.md §8), plus the matching daemon-side codecs in [`server`] for
//! stand-in peers and tests.
//!
//! Owns the handshake and version/feature negotiation, the stderr message loop
//! ([`StderrMessage`]), the requests we send (IsValidPath, QueryValidPaths, QueryPathInfo,
//! NarFromPath, AddToStoreNar, AddMultipleToStore, BuildDerivation, BuildPathsWithResults) with
//! their reply decoders, and a sans-IO framed-stream codec ([`encode_frame`], [`FrameDecoder`]).
//! Every version-dependent function takes the [`Negotiated`] protocol. Sans-IO: encoders append
//! to a `Vec<u8>`, decoders read from a [`Reader`] and report [`DecodeError::Incomplete`] until
//! a whole message is there. It must never perform I/O or hold a NAR: NARs travel framed (uploads)
//! or unframed after `STDERR_LAST` (NarFromPath) and the caller streams them.
//!
//! **Versions.** We announce [`CLIENT_VERSION`] = 1.35 with no features. Nix 2.8–2.14 speak
//! 1.34; 1.35 (Nix 2.15) adds exactly one thing, the daemon's "do you trust me" answer in the
//! handshake, which tells us up front that an untrusted remote will refuse BuildDerivation of an
//! input-addressed derivation. 1.36 adds nothing we use, 1.37 only CPU times, and 1.38 a feature
//! exchange whose only build-related feature (`realisation-with-path-not-hash`) matters for
//! content-addressed derivations. Old daemons gate on the client's number, so announcing 1.35 to
//! a 1.34 daemon is safe; every gate here uses `min(client, server)`. The codecs nonetheless
//! implement the ≥ 1.37/1.38 layouts, so a caller may announce more. The oldest daemon we accept
//! is [`MIN_SERVER_VERSION`] = 1.21 (Nix 2.3): everything we send has a defined form there, with
//! two differences the caller must honour: below 1.23 AddToStoreNar's NAR is pulled by
//! `STDERR_READ` requests ([`nar_upload`]) and below 1.26 errors have the old layout (handled
//! here).

use crate::build_result::{BuildResult, BuildResultLayout, BuiltOutputsLayout};
use crate::derivation::BasicDerivation;
use crate::path_info::{
    DerivedPath, PathInfo, read_store_path, read_store_path_set, read_string_set,
};
use crate::store_path::StorePath;
use crate::version::{self, ProtocolVersion, ServerHello};
use crate::wire::{self, DecodeError, Invalid, Reader, WireWrite};
use std::collections::BTreeSet;

/// Sent by the client first.
pub const MAGIC_1: u64 = 0x6e69_7863;
/// Sent by the daemon in reply.
pub const MAGIC_2: u64 = 0x6478_696f;

pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
pub const STDERR_READ: u64 = 0x6461_7461;
pub const STDERR_WRITE: u64 = 0x6461_7416;
pub const STDERR_LAST: u64 = 0x616c_7473;
pub const STDERR_ERROR: u64 = 0x6378_7470;
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// The feature under which BuildResults carry `output → (path, signatures)` instead of
/// realisation JSON (Nix ≥ 2.35).
pub const FEATURE_REALISATION_WITH_PATH: &str = "realisation-with-path-not-hash";

/// The version we announce (see the module docs for why).
pub const CLIENT_VERSION: ProtocolVersion = ProtocolVersion::new(1, 35);
/// The oldest daemon we talk to (see the module docs for why).
pub const MIN_SERVER_VERSION: ProtocolVersion = ProtocolVersion::new(1, 21);
/// From this version on, the handshake exchanges feature sets.
pub const FEATURES_SINCE: ProtocolVersion = ProtocolVersion::new(1, 38);

/// The protocol both sides agreed on: `min(client, server)` and the intersection of features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub version: ProtocolVersion,
    pub features: BTreeSet<String>,
}

impl Negotiated {
    /// A version with no features.
    pub fn new(version: ProtocolVersion) -> Self {
        Negotiated {
            version,
            features: BTreeSet::new(),
        }
    }

    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.contains(feature)
    }

    /// True if the negotiated version is at least `major.minor`.
    pub fn at_least(&self, major: u8, minor: u8) -> bool {
        self.version >= ProtocolVersion::new(major, minor)
    }

    /// How a BuildResult is laid out on this connection: times from 1.29, CPU times from 1.37,
    /// the built outputs as `(path, signatures)` with [`FEATURE_REALISATION_WITH_PATH`], else as
    /// realisation JSON from 1.28.
    pub fn build_result_layout(&self) -> BuildResultLayout {
        BuildResultLayout {
            times: self.at_least(1, 29),
            cpu_times: self.at_least(1, 37),
            outputs: if self.has_feature(FEATURE_REALISATION_WITH_PATH) {
                BuiltOutputsLayout::PathAndSignatures
            } else if self.at_least(1, 28) {
                BuiltOutputsLayout::RealisationJson
            } else {
                BuiltOutputsLayout::Absent
            },
        }
    }
}

/// An operation the negotiated version cannot express.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} needs worker protocol {needs} or newer, but the connection speaks {have}")]
pub struct Unsupported {
    pub what: &'static str,
    pub needs: ProtocolVersion,
    pub have: ProtocolVersion,
}

fn require(
    proto: &Negotiated,
    what: &'static str,
    needs: ProtocolVersion,
) -> Result<(), Unsupported> {
    if proto.version >= needs {
        Ok(())
    } else {
        Err(Unsupported {
            what,
            needs,
            have: proto.version,
        })
    }
}

/// Worker operations we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum Op {
    IsValidPath = 1,
    SetOptions = 19,
    QueryPathInfo = 26,
    QueryValidPaths = 31,
    BuildDerivation = 36,
    NarFromPath = 38,
    AddToStoreNar = 39,
    AddMultipleToStore = 44,
    BuildPathsWithResults = 46,
}

impl Op {
    pub fn code(self) -> u64 {
        self as u64
    }

    pub fn from_code(code: u64) -> Option<Self> {
        use Op::*;
        Some(match code {
            1 => IsValidPath,
            19 => SetOptions,
            26 => QueryPathInfo,
            31 => QueryValidPaths,
            36 => BuildDerivation,
            38 => NarFromPath,
            39 => AddToStoreNar,
            44 => AddMultipleToStore,
            46 => BuildPathsWithResults,
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake
//
// 1. client: `encode_hello` (magic + version; no need to wait for the daemon)
// 2. daemon: `decode_server_hello` → negotiated version
// 3. client: `encode_after_hello` ([≥1.38] features, [≥1.14] affinity 0, [≥1.11] reserveSpace 0)
// 4. daemon: `decode_server_info` ([≥1.38] features, [≥1.33] Nix version, [≥1.35] trust)
// 5. daemon: stderr messages up to STDERR_LAST (`decode_stderr` / `decode_response`)

/// Step 1: `MAGIC_1, version`.
pub fn encode_hello(w: &mut Vec<u8>, client: ProtocolVersion) {
    version::encode_greeting(w, MAGIC_1, client);
}

/// Step 2: decodes `MAGIC_2, version` and negotiates. A wrong magic, a major version other than
/// 1 or a daemon older than [`MIN_SERVER_VERSION`] is [`Invalid`].
pub fn decode_server_hello(
    r: &mut Reader<'_>,
    client: ProtocolVersion,
) -> wire::Result<ServerHello> {
    let server = version::decode_server_greeting(
        r,
        MAGIC_2,
        "the nix-daemon greeting",
        "worker protocol version",
    )?;
    if server.major != 1 || server < MIN_SERVER_VERSION {
        return Err(DecodeError::malformed(format!(
            "the remote nix-daemon speaks worker protocol {server}; we need 1.x with x ≥ {} \
             (Nix 2.3 or newer)",
            MIN_SERVER_VERSION.minor
        )));
    }
    Ok(ServerHello {
        server,
        negotiated: server.min(client),
    })
}

/// Step 3: the client's part after the greeting, for the negotiated `version`: our features
/// (≥ 1.38 only), then the obsolete CPU-affinity (≥ 1.14) and reserve-space (≥ 1.11) fields.
pub fn encode_after_hello(
    w: &mut Vec<u8>,
    version: ProtocolVersion,
    client_features: &BTreeSet<String>,
) {
    if version >= FEATURES_SINCE {
        w.put_strings(client_features);
    }
    if version >= ProtocolVersion::new(1, 14) {
        w.put_u64(0);
    }
    if version >= ProtocolVersion::new(1, 11) {
        w.put_u64(0);
    }
}

/// Whether the daemon trusts us (≥ 1.35).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    Trusted,
    NotTrusted,
}

/// What the daemon told us about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// The daemon's features as it listed them (≥ 1.38).
    pub server_features: BTreeSet<String>,
    /// e.g. "2.8.0" (≥ 1.33).
    pub nix_version: Option<String>,
    /// `None` below 1.35 or when the daemon does not know.
    pub trust: Option<Trust>,
}

/// Step 4: decodes the daemon's part after our step 3 and returns the negotiated protocol (the
/// features both sides listed) with what the daemon said. Stderr messages up to `STDERR_LAST`
/// follow.
pub fn decode_server_info(
    r: &mut Reader<'_>,
    version: ProtocolVersion,
    client_features: &BTreeSet<String>,
) -> wire::Result<(Negotiated, ServerInfo)> {
    let server_features = if version >= FEATURES_SINCE {
        read_string_set(r, "daemon features")?
    } else {
        BTreeSet::new()
    };
    let nix_version = if version >= ProtocolVersion::new(1, 33) {
        Some(r.text()?)
    } else {
        None
    };
    let trust = if version >= ProtocolVersion::new(1, 35) {
        match r.u64()? {
            0 => None,
            1 => Some(Trust::Trusted),
            2 => Some(Trust::NotTrusted),
            v => {
                return Err(Invalid::OutOfRange {
                    what: "trust flag",
                    value: v,
                }
                .into());
            }
        }
    } else {
        None
    };
    let negotiated = Negotiated {
        version,
        features: server_features
            .intersection(client_features)
            .cloned()
            .collect(),
    };
    Ok((
        negotiated,
        ServerInfo {
            server_features,
            nix_version,
            trust,
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// The stderr loop

/// A typed field of an activity or result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    String(String),
}

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
        use Field::{Int, String as S};
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
pub struct RemoteError {
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
    Error(RemoteError),
}

fn decode_fields(r: &mut Reader<'_>) -> wire::Result<Vec<Field>> {
    r.list("activity fields", |r| match r.u64()? {
        0 => Ok(Field::Int(r.u64()?)),
        1 => Ok(Field::String(r.text()?)),
        kind => Err(Invalid::OutOfRange {
            what: "activity field type",
            value: kind,
        }
        .into()),
    })
}

fn decode_error(r: &mut Reader<'_>, proto: &Negotiated) -> wire::Result<RemoteError> {
    if !proto.at_least(1, 26) {
        let message = r.text()?;
        let status = r.u64_max("error exit status", u32::MAX as u64)?;
        return Ok(RemoteError {
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
    Ok(RemoteError {
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
    pub outcome: Result<T, RemoteError>,
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

// ---------------------------------------------------------------------------------------------
// Operations

fn put_paths<'a>(w: &mut Vec<u8>, paths: impl IntoIterator<Item = &'a StorePath>) {
    let paths: Vec<&StorePath> = paths.into_iter().collect();
    w.put_strings(paths);
}

/// The settings SetOptions (op 19) carries: the per-connection options a client may set. A
/// trusted client's `overrides` may name any setting (`timeout`, `max-build-log-size`, …).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientOptions {
    pub keep_failed: bool,
    pub keep_going: bool,
    pub try_fallback: bool,
    /// Verbosity of the messages the daemon sends us (0 = errors only).
    pub verbosity: u64,
    pub max_build_jobs: u64,
    /// Seconds; 0 = none.
    pub max_silent_time: u64,
    /// Whether build output is also printed as log messages (`STDERR_NEXT`).
    pub verbose_build: bool,
    pub build_cores: u64,
    pub use_substitutes: bool,
    pub overrides: Vec<(String, String)>,
}

/// SetOptions (op 19). No reply data after `STDERR_LAST`.
pub fn encode_set_options(w: &mut Vec<u8>, proto: &Negotiated, o: &ClientOptions) {
    w.put_u64(Op::SetOptions.code());
    w.put_bool(o.keep_failed);
    w.put_bool(o.keep_going);
    w.put_bool(o.try_fallback);
    w.put_u64(o.verbosity);
    w.put_u64(o.max_build_jobs);
    w.put_u64(o.max_silent_time.min(u32::MAX as u64));
    w.put_u64(1); // obsolete useBuildHook
    // The daemon sets verboseBuild iff this is lvlError (0); Nix sends lvlVomit (7) otherwise.
    w.put_u64(if o.verbose_build { 0 } else { 7 });
    w.put_u64(0); // obsolete logType
    w.put_u64(0); // obsolete printBuildTrace
    w.put_u64(o.build_cores);
    w.put_bool(o.use_substitutes);
    if proto.at_least(1, 12) {
        w.put_u64(o.overrides.len() as u64);
        for (k, v) in &o.overrides {
            w.put_str(k);
            w.put_str(v);
        }
    }
}

/// IsValidPath (op 1). Reply: [`decode_bool`].
pub fn encode_is_valid_path(w: &mut Vec<u8>, path: &StorePath) {
    w.put_u64(Op::IsValidPath.code());
    w.put_str(path.as_str());
}

/// A u64 boolean reply.
pub fn decode_bool(r: &mut Reader<'_>) -> wire::Result<bool> {
    r.bool()
}

/// QueryValidPaths (op 31); `substitute` is sent from 1.27 on. Reply: [`decode_path_set`].
pub fn encode_query_valid_paths<'a>(
    w: &mut Vec<u8>,
    proto: &Negotiated,
    paths: impl IntoIterator<Item = &'a StorePath>,
    substitute: bool,
) {
    w.put_u64(Op::QueryValidPaths.code());
    put_paths(w, paths);
    if proto.at_least(1, 27) {
        w.put_bool(substitute);
    }
}

/// A set of store paths.
pub fn decode_path_set(r: &mut Reader<'_>) -> wire::Result<BTreeSet<StorePath>> {
    read_store_path_set(r, "store paths")
}

/// QueryPathInfo (op 26). Reply: [`decode_query_path_info_reply`].
pub fn encode_query_path_info(w: &mut Vec<u8>, path: &StorePath) {
    w.put_u64(Op::QueryPathInfo.code());
    w.put_str(path.as_str());
}

/// The QueryPathInfo reply for `path`: `None` if the path is not valid (≥ 1.17; below that an
/// invalid path arrives as a [`RemoteError`] saying "… is not valid").
pub fn decode_query_path_info_reply(
    r: &mut Reader<'_>,
    proto: &Negotiated,
    path: &StorePath,
) -> wire::Result<Option<PathInfo>> {
    if proto.at_least(1, 17) && !r.bool()? {
        return Ok(None);
    }
    PathInfo::decode_unkeyed_worker(r, path.clone(), proto.at_least(1, 16)).map(Some)
}

/// NarFromPath (op 38). After `STDERR_LAST` the NAR follows unframed: parse it to find its end.
pub fn encode_nar_from_path(w: &mut Vec<u8>, path: &StorePath) {
    w.put_u64(Op::NarFromPath.code());
    w.put_str(path.as_str());
}

/// How AddToStoreNar's NAR travels for a negotiated version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NarUpload {
    /// ≥ 1.23: as a framed stream ([`encode_frame`] … [`encode_frame_end`]) right after the
    /// request; the daemon's stderr messages end with `STDERR_LAST`.
    Framed,
    /// 1.21–1.22: the daemon pulls it with `STDERR_READ` messages, each answered with
    /// [`encode_read_reply`].
    Pulled,
    /// Below 1.21: raw, right after the request.
    Raw,
}

pub fn nar_upload(proto: &Negotiated) -> NarUpload {
    if proto.at_least(1, 23) {
        NarUpload::Framed
    } else if proto.at_least(1, 21) {
        NarUpload::Pulled
    } else {
        NarUpload::Raw
    }
}

/// AddToStoreNar (op 39): the request header. The NAR follows as [`nar_upload`] says; then the
/// stderr loop ends with `STDERR_LAST` and no reply data. `dont_check_sigs` is ignored by a daemon
/// that does not trust us.
pub fn encode_add_to_store_nar(
    w: &mut Vec<u8>,
    info: &PathInfo,
    repair: bool,
    dont_check_sigs: bool,
) {
    w.put_u64(Op::AddToStoreNar.code());
    info.encode_for_upload(w);
    w.put_bool(repair);
    w.put_bool(dont_check_sigs);
}

/// AddMultipleToStore (op 44, ≥ 1.32): the request header. A framed stream follows whose content
/// is [`encode_add_multiple_count`], then per path (dependencies first)
/// [`encode_add_multiple_entry`] and the path's raw NAR. Ends with `STDERR_LAST`, no reply data.
pub fn encode_add_multiple_to_store(
    w: &mut Vec<u8>,
    proto: &Negotiated,
    repair: bool,
    dont_check_sigs: bool,
) -> Result<(), Unsupported> {
    require(proto, "AddMultipleToStore", ProtocolVersion::new(1, 32))?;
    w.put_u64(Op::AddMultipleToStore.code());
    w.put_bool(repair);
    w.put_bool(dont_check_sigs);
    Ok(())
}

/// AddMultipleToStore content: the number of paths.
pub fn encode_add_multiple_count(w: &mut Vec<u8>, count: u64) {
    w.put_u64(count);
}

/// AddMultipleToStore content: one path's metadata; its NAR follows.
pub fn encode_add_multiple_entry(w: &mut Vec<u8>, info: &PathInfo) {
    info.encode_for_upload(w);
}

/// Appends one framed-stream chunk. Empty data writes nothing (a zero-length chunk would end the
/// stream).
pub fn encode_frame(w: &mut Vec<u8>, data: &[u8]) {
    if !data.is_empty() {
        w.put_u64(data.len() as u64);
        w.extend_from_slice(data);
    }
}

/// Ends a framed stream.
pub fn encode_frame_end(w: &mut Vec<u8>) {
    w.put_u64(0);
}

/// What [`FrameDecoder::decode`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Payload bytes (possibly part of a chunk).
    Data(&'a [u8]),
    /// The terminating zero-length chunk.
    End,
}

/// Incremental framed-stream decoder: feed it whatever bytes arrived; it never buffers or
/// allocates, so chunks of any size stream through.
#[derive(Debug, Clone, Default)]
pub struct FrameDecoder {
    remaining: u64,
    done: bool,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the end chunk has been decoded.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Consumes a prefix of `input`. Returns how many bytes were consumed and, if any, the next
    /// payload slice or the end. `(n, None)` means "feed more bytes" (after dropping the `n`
    /// consumed ones). After the end, returns `(0, Some(End))`: the bytes after it belong to the
    /// next message.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> (usize, Option<Frame<'a>>) {
        if self.done {
            return (0, Some(Frame::End));
        }
        let mut used = 0;
        if self.remaining == 0 {
            let Some(header) = input.get(..8) else {
                return (0, None);
            };
            let mut len = [0u8; 8];
            len.copy_from_slice(header);
            used = 8;
            self.remaining = u64::from_le_bytes(len);
            if self.remaining == 0 {
                self.done = true;
                return (used, Some(Frame::End));
            }
        }
        let avail = (input.len() - used) as u64;
        let take = avail.min(self.remaining) as usize;
        if take == 0 {
            return (used, None);
        }
        self.remaining -= take as u64;
        (used + take, Some(Frame::Data(&input[used..used + take])))
    }
}

/// Decodes one whole chunk: `Some(payload)`, or `None` for the end chunk. Chunks longer than
/// `limit` are [`Invalid`] (use [`FrameDecoder`] to stream chunks of any size).
pub fn decode_frame<'a>(r: &mut Reader<'a>, limit: u64) -> wire::Result<Option<&'a [u8]>> {
    let len = r.u64()?;
    if len == 0 {
        return Ok(None);
    }
    if len > limit {
        return Err(Invalid::TooLong {
            what: "framed chunk",
            len,
            limit,
        }
        .into());
    }
    r.raw(len as usize).map(Some)
}

/// How to build (worker `BuildMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BuildMode {
    #[default]
    Normal,
    Repair,
    Check,
}

impl BuildMode {
    pub fn code(self) -> u64 {
        match self {
            BuildMode::Normal => 0,
            BuildMode::Repair => 1,
            BuildMode::Check => 2,
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> wire::Result<Self> {
        match r.u64()? {
            0 => Ok(BuildMode::Normal),
            1 => Ok(BuildMode::Repair),
            2 => Ok(BuildMode::Check),
            v => Err(Invalid::OutOfRange {
                what: "build mode",
                value: v,
            }
            .into()),
        }
    }
}

/// BuildDerivation (op 36). An untrusted daemon refuses input-addressed derivations. Reply:
/// [`decode_build_result`].
pub fn encode_build_derivation(
    w: &mut Vec<u8>,
    drv_path: &StorePath,
    drv: &BasicDerivation,
    mode: BuildMode,
) {
    w.put_u64(Op::BuildDerivation.code());
    w.put_str(drv_path.as_str());
    drv.encode(w);
    w.put_u64(mode.code());
}

/// A BuildResult for the negotiated protocol; `store_dir` (normally `/nix/store`) completes the
/// basenames of the realisation-JSON layout.
pub fn decode_build_result(
    r: &mut Reader<'_>,
    proto: &Negotiated,
    store_dir: &str,
) -> wire::Result<BuildResult> {
    BuildResult::decode(r, proto.build_result_layout(), store_dir)
}

/// BuildPathsWithResults (op 46, ≥ 1.34). Reply: [`decode_build_paths_with_results_reply`].
pub fn encode_build_paths_with_results(
    w: &mut Vec<u8>,
    proto: &Negotiated,
    paths: &[DerivedPath],
    mode: BuildMode,
) -> Result<(), Unsupported> {
    require(proto, "BuildPathsWithResults", ProtocolVersion::new(1, 34))?;
    w.put_u64(Op::BuildPathsWithResults.code());
    w.put_strings(paths.iter().map(DerivedPath::to_worker_string));
    w.put_u64(mode.code());
    Ok(())
}

/// The BuildPathsWithResults reply: one `(derived path, result)` per requested path.
pub fn decode_build_paths_with_results_reply(
    r: &mut Reader<'_>,
    proto: &Negotiated,
    store_dir: &str,
) -> wire::Result<Vec<(DerivedPath, BuildResult)>> {
    r.list("build results", |r| {
        let path = DerivedPath::read(r)?;
        let res = BuildResult::decode(r, proto.build_result_layout(), store_dir)?;
        Ok((path, res))
    })
}

// ---------------------------------------------------------------------------------------------

/// The daemon's side of the same messages. For stand-in peers (fault-injection tests) and
/// round-trip tests; a real hook never needs it.
pub mod server {
    use super::*;

    /// Decodes the client's greeting (`MAGIC_1, version`) and returns the client's version.
    pub fn decode_client_hello(r: &mut Reader<'_>) -> wire::Result<ProtocolVersion> {
        r.expect_u64("the nix-daemon client greeting", MAGIC_1)?;
        ProtocolVersion::decode(r, "worker protocol version")
    }

    pub fn encode_server_hello(w: &mut Vec<u8>, server: ProtocolVersion) {
        version::encode_greeting(w, MAGIC_2, server);
    }

    /// Decodes the client's step 3 and returns its features.
    pub fn decode_after_hello(
        r: &mut Reader<'_>,
        version: ProtocolVersion,
    ) -> wire::Result<BTreeSet<String>> {
        let features = if version >= FEATURES_SINCE {
            read_string_set(r, "client features")?
        } else {
            BTreeSet::new()
        };
        if version >= ProtocolVersion::new(1, 14) && r.bool()? {
            let _affinity = r.u64()?;
        }
        if version >= ProtocolVersion::new(1, 11) {
            let _reserve_space = r.u64()?;
        }
        Ok(features)
    }

    /// The daemon's step 4 (not including the stderr loop after it).
    pub fn encode_server_info(w: &mut Vec<u8>, version: ProtocolVersion, info: &ServerInfo) {
        if version >= FEATURES_SINCE {
            w.put_strings(&info.server_features);
        }
        if version >= ProtocolVersion::new(1, 33) {
            w.put_str(info.nix_version.as_deref().unwrap_or(""));
        }
        if version >= ProtocolVersion::new(1, 35) {
            w.put_u64(match info.trust {
                None => 0,
                Some(Trust::Trusted) => 1,
                Some(Trust::NotTrusted) => 2,
            });
        }
    }

    fn put_fields(w: &mut Vec<u8>, fields: &[Field]) {
        w.put_u64(fields.len() as u64);
        for f in fields {
            match f {
                Field::Int(v) => {
                    w.put_u64(0);
                    w.put_u64(*v);
                }
                Field::String(s) => {
                    w.put_u64(1);
                    w.put_str(s);
                }
            }
        }
    }

    /// Appends one stderr-loop message in the layout of the negotiated version.
    pub fn encode_stderr(w: &mut Vec<u8>, proto: &Negotiated, msg: &StderrMessage) {
        match msg {
            StderrMessage::Next(s) => {
                w.put_u64(STDERR_NEXT);
                w.put_str(s);
            }
            StderrMessage::StartActivity(a) => {
                w.put_u64(STDERR_START_ACTIVITY);
                w.put_u64(a.id);
                w.put_u64(a.level);
                w.put_u64(a.activity_type);
                w.put_str(&a.text);
                put_fields(w, &a.fields);
                w.put_u64(a.parent);
            }
            StderrMessage::StopActivity { id } => {
                w.put_u64(STDERR_STOP_ACTIVITY);
                w.put_u64(*id);
            }
            StderrMessage::Result(res) => {
                w.put_u64(STDERR_RESULT);
                w.put_u64(res.id);
                w.put_u64(res.result_type);
                put_fields(w, &res.fields);
            }
            StderrMessage::Read { max } => {
                w.put_u64(STDERR_READ);
                w.put_u64(*max);
            }
            StderrMessage::Write(data) => {
                w.put_u64(STDERR_WRITE);
                w.put_bytes(data);
            }
            StderrMessage::Last => w.put_u64(STDERR_LAST),
            StderrMessage::Error(e) => {
                w.put_u64(STDERR_ERROR);
                if proto.at_least(1, 26) {
                    w.put_str("Error");
                    w.put_u64(e.level.unwrap_or(0));
                    w.put_str("Error");
                    w.put_str(&e.message);
                    w.put_u64(0);
                    w.put_u64(e.traces.len() as u64);
                    for t in &e.traces {
                        w.put_u64(0);
                        w.put_str(t);
                    }
                } else {
                    w.put_str(&e.message);
                    w.put_u64(e.exit_status.unwrap_or(1));
                }
            }
        }
    }

    /// A decoded client request. After [`Request::AddToStoreNar`] and
    /// [`Request::AddMultipleToStore`] the data follows as [`nar_upload`] says.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Request {
        IsValidPath(StorePath),
        SetOptions(ClientOptions),
        QueryPathInfo(StorePath),
        QueryValidPaths {
            paths: BTreeSet<StorePath>,
            substitute: bool,
        },
        BuildDerivation {
            drv_path: StorePath,
            drv: BasicDerivation,
            mode: BuildMode,
        },
        NarFromPath(StorePath),
        AddToStoreNar {
            info: PathInfo,
            repair: bool,
            dont_check_sigs: bool,
        },
        AddMultipleToStore {
            repair: bool,
            dont_check_sigs: bool,
        },
        BuildPathsWithResults {
            paths: Vec<DerivedPath>,
            mode: BuildMode,
        },
    }

    /// What a daemon reads for SetOptions (the inverse of [`encode_set_options`]).
    pub fn decode_set_options(
        r: &mut Reader<'_>,
        proto: &Negotiated,
    ) -> wire::Result<ClientOptions> {
        let keep_failed = r.bool()?;
        let keep_going = r.bool()?;
        let try_fallback = r.bool()?;
        let verbosity = r.u64()?;
        let max_build_jobs = r.u64()?;
        let max_silent_time = r.u64()?;
        let _use_build_hook = r.u64()?;
        let verbose_build = r.u64()? == 0;
        let _log_type = r.u64()?;
        let _print_build_trace = r.u64()?;
        let build_cores = r.u64()?;
        let use_substitutes = r.bool()?;
        let overrides = if proto.at_least(1, 12) {
            r.list("setting overrides", |r| {
                Ok((r.string("name")?, r.string("value")?))
            })?
        } else {
            Vec::new()
        };
        Ok(ClientOptions {
            keep_failed,
            keep_going,
            try_fallback,
            verbosity,
            max_build_jobs,
            max_silent_time,
            verbose_build,
            build_cores,
            use_substitutes,
            overrides,
        })
    }

    /// Decodes one request (only the operations a hook sends).
    pub fn decode_request(r: &mut Reader<'_>, proto: &Negotiated) -> wire::Result<Request> {
        let code = r.u64()?;
        let op = Op::from_code(code).ok_or(Invalid::OutOfRange {
            what: "worker operation",
            value: code,
        })?;
        Ok(match op {
            Op::IsValidPath => Request::IsValidPath(read_store_path(r, "path")?),
            Op::SetOptions => Request::SetOptions(decode_set_options(r, proto)?),
            Op::QueryPathInfo => Request::QueryPathInfo(read_store_path(r, "path")?),
            Op::QueryValidPaths => Request::QueryValidPaths {
                paths: decode_path_set(r)?,
                substitute: proto.at_least(1, 27) && r.bool()?,
            },
            Op::BuildDerivation => Request::BuildDerivation {
                drv_path: read_store_path(r, "derivation path")?,
                drv: BasicDerivation::decode(r)?,
                mode: BuildMode::decode(r)?,
            },
            Op::NarFromPath => Request::NarFromPath(read_store_path(r, "path")?),
            Op::AddToStoreNar => Request::AddToStoreNar {
                info: PathInfo::decode_for_upload(r)?,
                repair: r.bool()?,
                dont_check_sigs: r.bool()?,
            },
            Op::AddMultipleToStore => Request::AddMultipleToStore {
                repair: r.bool()?,
                dont_check_sigs: r.bool()?,
            },
            Op::BuildPathsWithResults => Request::BuildPathsWithResults {
                paths: r.list("derived paths", DerivedPath::read)?,
                mode: BuildMode::decode(r)?,
            },
        })
    }

    /// The QueryPathInfo reply (after `STDERR_LAST`). Below 1.17 an invalid path must be sent as
    /// an error instead; `None` then writes nothing.
    pub fn encode_query_path_info_reply(
        w: &mut Vec<u8>,
        proto: &Negotiated,
        info: Option<&PathInfo>,
    ) {
        if proto.at_least(1, 17) {
            w.put_bool(info.is_some());
        }
        if let Some(info) = info {
            info.encode_unkeyed_worker(w, proto.at_least(1, 16));
        }
    }

    pub fn encode_path_set<'a>(w: &mut Vec<u8>, paths: impl IntoIterator<Item = &'a StorePath>) {
        put_paths(w, paths);
    }

    /// A BuildResult (the BuildDerivation reply, and each BuildPathsWithResults entry).
    pub fn encode_build_result(w: &mut Vec<u8>, proto: &Negotiated, res: &BuildResult) {
        res.encode(w, proto.build_result_layout());
    }

    /// The BuildPathsWithResults reply.
    pub fn encode_build_paths_with_results_reply(
        w: &mut Vec<u8>,
        proto: &Negotiated,
        results: &[(DerivedPath, BuildResult)],
    ) {
        w.put_u64(results.len() as u64);
        for (path, res) in results {
            w.put_str(&path.to_worker_string());
            encode_build_result(w, proto, res);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::server::Request;
    use super::*;
    use crate::build_result::BuildStatus;
    use crate::build_result::tests::{arb_build_result, carried};
    use crate::path_info::OutputsSpec;
    use crate::path_info::tests::{arb_path, arb_path_info, path};
    use crate::store_path::Sha256;
    use proptest::prelude::*;

    fn proto(minor: u8) -> Negotiated {
        Negotiated::new(ProtocolVersion::new(1, minor))
    }

    #[test]
    fn set_options_round_trips() {
        let o = ClientOptions {
            keep_failed: true,
            verbosity: 1,
            max_silent_time: 30,
            verbose_build: true,
            overrides: vec![("timeout".into(), "60".into())],
            ..Default::default()
        };
        for minor in [11u8, 12, 34, 38] {
            let p = proto(minor);
            let mut w = Vec::new();
            encode_set_options(&mut w, &p, &o);
            let (req, used) = wire::decode_with(&w, |r| server::decode_request(r, &p)).unwrap();
            assert_eq!(used, w.len());
            let mut want = o.clone();
            if minor < 12 {
                want.overrides.clear();
            }
            assert_eq!(req, Request::SetOptions(want));
        }
    }

    fn assert_prefixes_incomplete<T: std::fmt::Debug>(
        bytes: &[u8],
        mut f: impl FnMut(&mut Reader<'_>) -> wire::Result<T>,
    ) {
        for cut in 0..bytes.len() {
            match f(&mut Reader::new(&bytes[..cut])) {
                Err(e) if e.is_incomplete() => {}
                other => panic!("prefix of {cut}/{} bytes: {other:?}", bytes.len()),
            }
        }
    }

    /// Runs the whole handshake between our client functions and the server codecs.
    fn handshake(
        client: ProtocolVersion,
        client_features: &[&str],
        server: ProtocolVersion,
        server_features: &[&str],
    ) -> (Negotiated, ServerInfo, Vec<u8>, Vec<u8>) {
        let client_features: BTreeSet<String> =
            client_features.iter().map(|s| s.to_string()).collect();
        let mut to_server = Vec::new();
        encode_hello(&mut to_server, client);
        let mut to_client = Vec::new();
        let mut sr = Reader::new(&to_server);
        let seen_client = server::decode_client_hello(&mut sr).unwrap();
        assert_eq!(seen_client, client);
        server::encode_server_hello(&mut to_client, server);

        let hello = decode_server_hello(&mut Reader::new(&to_client), client).unwrap();
        assert_eq!(hello.server, server);
        encode_after_hello(&mut to_server, hello.negotiated, &client_features);

        let mut sr = Reader::new(&to_server[16..]);
        let seen_features = server::decode_after_hello(&mut sr, hello.negotiated).unwrap();
        assert!(sr.is_empty());
        assert_eq!(seen_features, client_features);
        let info = ServerInfo {
            server_features: server_features.iter().map(|s| s.to_string()).collect(),
            nix_version: Some("2.99.0".into()),
            trust: Some(Trust::Trusted),
        };
        let start = to_client.len();
        server::encode_server_info(&mut to_client, hello.negotiated, &info);
        let tail = to_client[start..].to_vec();
        let (neg, got) =
            decode_server_info(&mut Reader::new(&tail), hello.negotiated, &client_features)
                .unwrap();
        assert_prefixes_incomplete(&tail, |r| {
            decode_server_info(r, hello.negotiated, &client_features)
        });
        (neg, got, to_server, to_client)
    }

    #[test]
    fn handshake_with_a_2_8_daemon() {
        let (neg, info, to_server, _) =
            handshake(CLIENT_VERSION, &[], ProtocolVersion::new(1, 34), &[]);
        assert_eq!(neg, proto(34));
        assert_eq!(info.nix_version.as_deref(), Some("2.99.0"));
        assert_eq!(info.trust, None, "1.34 has no trust byte");
        // magic, version 1.35, affinity 0, reserveSpace 0
        assert_eq!(to_server.len(), 32);
        assert_eq!(&to_server[8..10], &[35, 1]);
    }

    #[test]
    fn handshake_with_feature_exchange() {
        let (neg, info, _, _) = handshake(
            ProtocolVersion::new(1, 38),
            &[FEATURE_REALISATION_WITH_PATH, "other"],
            ProtocolVersion::new(1, 38),
            &[
                FEATURE_REALISATION_WITH_PATH,
                "delete-dead-specific-referrers",
            ],
        );
        assert_eq!(neg.version, ProtocolVersion::new(1, 38));
        assert_eq!(
            neg.features,
            [FEATURE_REALISATION_WITH_PATH.to_owned()].into()
        );
        assert_eq!(info.server_features.len(), 2);
        assert_eq!(info.trust, Some(Trust::Trusted));
        // Our default client never reaches the exchange, even with a 1.38 daemon.
        let (neg, _, _, _) = handshake(CLIENT_VERSION, &[], ProtocolVersion::new(1, 38), &["x"]);
        assert_eq!(neg, proto(35));
    }

    #[test]
    fn server_hello_checks() {
        for (v, ok) in [
            (ProtocolVersion::new(1, 21), true),
            (ProtocolVersion::new(1, 20), false),
            (ProtocolVersion::new(2, 0), false),
        ] {
            let mut w = Vec::new();
            server::encode_server_hello(&mut w, v);
            assert_eq!(
                decode_server_hello(&mut Reader::new(&w), CLIENT_VERSION).is_ok(),
                ok
            );
            assert_prefixes_incomplete(&w, |r| decode_server_hello(r, CLIENT_VERSION));
        }
        let mut w = Vec::new();
        w.put_u64(crate::serve::MAGIC_2);
        w.put_u64(0x207);
        assert!(matches!(
            decode_server_hello(&mut Reader::new(&w), CLIENT_VERSION),
            Err(DecodeError::Invalid(Invalid::Unexpected { .. }))
        ));
        let mut w = Vec::new();
        server::encode_server_info(
            &mut w,
            ProtocolVersion::new(1, 35),
            &ServerInfo {
                server_features: BTreeSet::new(),
                nix_version: Some("x".into()),
                trust: None,
            },
        );
        *w.last_mut().unwrap() = 0; // keep trust 0 → None
        let (_, info) = decode_server_info(
            &mut Reader::new(&w),
            ProtocolVersion::new(1, 35),
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(info.trust, None);
        let len = w.len();
        w[len - 8] = 3;
        assert!(
            decode_server_info(
                &mut Reader::new(&w),
                ProtocolVersion::new(1, 35),
                &BTreeSet::new()
            )
            .is_err()
        );
    }

    fn sample_messages() -> Vec<StderrMessage> {
        vec![
            StderrMessage::Next("warning: something\n".into()),
            StderrMessage::StartActivity(StartActivity {
                id: (1234 << 32) + 1,
                level: 3,
                activity_type: activity::BUILD,
                text: "building '/nix/store/x.drv'".into(),
                fields: vec![
                    Field::String("/nix/store/x.drv".into()),
                    Field::String(String::new()),
                    Field::Int(1),
                    Field::Int(1),
                ],
                parent: 0,
            }),
            StderrMessage::Result(ActivityResult {
                id: (1234 << 32) + 1,
                result_type: result_type::BUILD_LOG_LINE,
                fields: vec![Field::String("hello".into())],
            }),
            StderrMessage::StopActivity {
                id: (1234 << 32) + 1,
            },
            StderrMessage::Write(b"data".to_vec()),
            StderrMessage::Read { max: 32768 },
            StderrMessage::Last,
        ]
    }

    #[test]
    fn stderr_messages_round_trip() {
        let p = proto(34);
        let mut w = Vec::new();
        for m in sample_messages() {
            server::encode_stderr(&mut w, &p, &m);
        }
        let mut r = Reader::new(&w);
        for m in sample_messages() {
            assert_eq!(decode_stderr(&mut r, &p).unwrap(), m);
        }
        assert!(r.is_empty());
    }

    #[test]
    fn typed_results() {
        let r = |t, fields| ActivityResult {
            id: 1,
            result_type: t,
            fields,
        };
        assert_eq!(
            r(result_type::BUILD_LOG_LINE, vec![Field::String("x".into())]).typed(),
            Some(TypedResult::BuildLogLine("x"))
        );
        assert_eq!(
            r(
                result_type::PROGRESS,
                vec![Field::Int(1), Field::Int(2), Field::Int(3), Field::Int(4)]
            )
            .typed(),
            Some(TypedResult::Progress {
                done: 1,
                expected: 2,
                running: 3,
                failed: 4
            })
        );
        assert_eq!(
            r(
                result_type::SET_EXPECTED,
                vec![Field::Int(104), Field::Int(1)]
            )
            .typed(),
            Some(TypedResult::SetExpected {
                activity_type: 104,
                expected: 1
            })
        );
        // Wrong shape, unknown type.
        assert_eq!(
            r(result_type::BUILD_LOG_LINE, vec![Field::Int(1)]).typed(),
            None
        );
        assert_eq!(r(999, vec![]).typed(), None);
    }

    #[test]
    fn errors_in_both_layouts() {
        let e = RemoteError {
            message: "error: path '/nix/store/x' is not valid".into(),
            level: Some(0),
            traces: vec!["while doing X".into()],
            exit_status: None,
        };
        let p = proto(34);
        let mut w = Vec::new();
        server::encode_stderr(&mut w, &p, &StderrMessage::Error(e.clone()));
        assert_eq!(
            decode_stderr(&mut Reader::new(&w), &p).unwrap(),
            StderrMessage::Error(e)
        );
        assert_prefixes_incomplete(&w, |r| decode_stderr(r, &p));

        let old = RemoteError {
            message: "error: old".into(),
            level: None,
            traces: vec![],
            exit_status: Some(1),
        };
        let p = proto(21);
        let mut w = Vec::new();
        server::encode_stderr(&mut w, &p, &StderrMessage::Error(old.clone()));
        let mut want = STDERR_ERROR.to_le_bytes().to_vec();
        want.put_str("error: old");
        want.put_u64(1);
        assert_eq!(w, want);
        assert_eq!(
            decode_stderr(&mut Reader::new(&w), &p).unwrap(),
            StderrMessage::Error(old)
        );

        // A position (never sent by Nix) and a non-"Error" type are invalid.
        let mut w = STDERR_ERROR.to_le_bytes().to_vec();
        w.put_str("Error");
        w.put_u64(0);
        w.put_str("Error");
        w.put_str("m");
        w.put_u64(1);
        assert!(matches!(
            decode_stderr(&mut Reader::new(&w), &proto(34)),
            Err(DecodeError::Invalid(_))
        ));
        let mut w = STDERR_ERROR.to_le_bytes().to_vec();
        w.put_str("Oops");
        assert!(matches!(
            decode_stderr(&mut Reader::new(&w), &proto(34)),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            decode_stderr(&mut Reader::new(&0x1234u64.to_le_bytes()), &proto(34)),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn response_helper() {
        let p = proto(35);
        let mut w = Vec::new();
        server::encode_stderr(&mut w, &p, &StderrMessage::Next("hi\n".into()));
        server::encode_stderr(&mut w, &p, &StderrMessage::Last);
        w.put_u64(1);
        let (resp, used) = wire::decode_with(&w, |r| decode_response(r, &p, decode_bool)).unwrap();
        assert_eq!(used, w.len());
        assert_eq!(resp.outcome, Ok(true));
        assert_eq!(resp.messages, vec![StderrMessage::Next("hi\n".into())]);
        assert_prefixes_incomplete(&w, |r| decode_response(r, &p, decode_bool));

        let mut w = Vec::new();
        let err = RemoteError {
            message: "boom".into(),
            level: Some(0),
            traces: vec![],
            exit_status: None,
        };
        server::encode_stderr(&mut w, &p, &StderrMessage::Error(err.clone()));
        let resp = decode_response(&mut Reader::new(&w), &p, decode_bool).unwrap();
        assert_eq!(resp.outcome, Err(err));

        let mut w = Vec::new();
        server::encode_stderr(&mut w, &p, &StderrMessage::Read { max: 8 });
        assert!(matches!(
            decode_response(&mut Reader::new(&w), &p, decode_bool),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn query_path_info_by_version() {
        let mut info = PathInfo::new(path(1, "a"), Sha256::digest(b"a"), 64);
        info.registration_time = 99;
        info.ultimate = true;
        info.sigs.insert("k:1".into());
        for minor in [15u8, 16, 17, 34, 38] {
            let p = proto(minor);
            let mut w = Vec::new();
            server::encode_query_path_info_reply(&mut w, &p, Some(&info));
            let got = decode_query_path_info_reply(&mut Reader::new(&w), &p, &info.path)
                .unwrap()
                .unwrap();
            let mut want = info.clone();
            if minor < 16 {
                want.ultimate = false;
                want.sigs.clear();
            }
            assert_eq!(got, want, "1.{minor}");
            assert_prefixes_incomplete(&w, |r| decode_query_path_info_reply(r, &p, &info.path));
        }
        let mut w = Vec::new();
        server::encode_query_path_info_reply(&mut w, &proto(34), None);
        assert_eq!(w, [0u8; 8]);
        assert_eq!(
            decode_query_path_info_reply(&mut Reader::new(&w), &proto(34), &info.path).unwrap(),
            None
        );
    }

    #[test]
    fn unsupported_ops_are_refused() {
        let mut w = Vec::new();
        let e = encode_build_paths_with_results(&mut w, &proto(33), &[], BuildMode::Normal)
            .unwrap_err();
        assert_eq!(e.needs, ProtocolVersion::new(1, 34));
        assert!(encode_add_multiple_to_store(&mut w, &proto(31), false, false).is_err());
        assert!(w.is_empty());
        assert_eq!(nar_upload(&proto(23)), NarUpload::Framed);
        assert_eq!(nar_upload(&proto(22)), NarUpload::Pulled);
        assert_eq!(nar_upload(&proto(20)), NarUpload::Raw);
    }

    #[test]
    fn requests_round_trip_through_the_server_decoder() {
        let p = proto(35);
        let a = path(1, "a");
        let drv = path(2, "a.drv");
        let info = PathInfo::new(a.clone(), Sha256::digest(b"nar"), 3);
        let basic = BasicDerivation {
            platform: "x86_64-linux".into(),
            builder: b"/bin/sh".to_vec(),
            ..Default::default()
        };
        let paths = vec![
            DerivedPath::all_outputs(drv.clone()),
            DerivedPath::Built {
                drv_path: drv.clone(),
                outputs: OutputsSpec::Names(["out".into()].into()),
            },
            DerivedPath::Opaque(a.clone()),
        ];
        let mut w = Vec::new();
        encode_is_valid_path(&mut w, &a);
        encode_query_path_info(&mut w, &a);
        encode_query_valid_paths(&mut w, &p, [&a], true);
        encode_build_derivation(&mut w, &drv, &basic, BuildMode::Check);
        encode_nar_from_path(&mut w, &a);
        encode_add_to_store_nar(&mut w, &info, false, true);
        encode_add_multiple_to_store(&mut w, &p, true, false).unwrap();
        encode_build_paths_with_results(&mut w, &p, &paths, BuildMode::Normal).unwrap();
        let want = [
            Request::IsValidPath(a.clone()),
            Request::QueryPathInfo(a.clone()),
            Request::QueryValidPaths {
                paths: [a.clone()].into(),
                substitute: true,
            },
            Request::BuildDerivation {
                drv_path: drv.clone(),
                drv: basic,
                mode: BuildMode::Check,
            },
            Request::NarFromPath(a.clone()),
            Request::AddToStoreNar {
                info,
                repair: false,
                dont_check_sigs: true,
            },
            Request::AddMultipleToStore {
                repair: true,
                dont_check_sigs: false,
            },
            Request::BuildPathsWithResults {
                paths,
                mode: BuildMode::Normal,
            },
        ];
        let mut r = Reader::new(&w);
        for want in want {
            assert_eq!(server::decode_request(&mut r, &p).unwrap(), want);
        }
        assert!(r.is_empty());
        // Below 1.27 QueryValidPaths has no substitute flag.
        let mut w = Vec::new();
        encode_query_valid_paths(&mut w, &proto(26), [&a], true);
        assert_eq!(w.len(), 8 + 8 + 8 + a.as_str().len().div_ceil(8) * 8);
    }

    #[test]
    fn keyed_build_results() {
        let p = proto(34);
        let drv = path(7, "x.drv");
        let mut res = BuildResult::new(BuildStatus::Built, "");
        res.built_outputs.insert(
            "out".into(),
            crate::build_result::BuiltOutput {
                path: path(8, "x"),
                signatures: BTreeSet::new(),
            },
        );
        let results = vec![
            (DerivedPath::all_outputs(drv.clone()), res),
            (
                DerivedPath::Opaque(path(9, "y")),
                BuildResult::new(BuildStatus::PermanentFailure, "nope"),
            ),
        ];
        let mut w = Vec::new();
        server::encode_build_paths_with_results_reply(&mut w, &p, &results);
        let (got, used) = wire::decode_with(&w, |r| {
            decode_build_paths_with_results_reply(r, &p, "/nix/store")
        })
        .unwrap();
        assert_eq!(used, w.len());
        assert_eq!(got, results);
        assert_prefixes_incomplete(&w, |r| {
            decode_build_paths_with_results_reply(r, &p, "/nix/store")
        });
    }

    #[test]
    fn frame_decoder_streams_across_splits() {
        let payload: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let mut w = Vec::new();
        for chunk in payload.chunks(1000) {
            encode_frame(&mut w, chunk);
        }
        encode_frame(&mut w, b"");
        encode_frame_end(&mut w);
        w.extend_from_slice(b"next message");
        for step in [1usize, 3, 7, 8, 9, 500, 5000] {
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            let mut buf: Vec<u8> = Vec::new();
            let mut fed = 0;
            loop {
                let (used, frame) = dec.decode(&buf);
                let frame = frame.map(|f| match f {
                    Frame::Data(d) => Some(d.to_vec()),
                    Frame::End => None,
                });
                buf.drain(..used);
                match frame {
                    Some(Some(d)) => got.extend_from_slice(&d),
                    Some(None) => break,
                    None => {
                        let end = (fed + step).min(w.len());
                        assert!(fed < end, "ran out of input at step {step}");
                        buf.extend_from_slice(&w[fed..end]);
                        fed = end;
                    }
                }
            }
            assert!(dec.is_done());
            assert_eq!(got, payload, "step {step}");
            let rest: Vec<u8> = buf.iter().chain(&w[fed..]).copied().collect();
            assert_eq!(rest, b"next message");
        }
        let mut r = Reader::new(&w);
        assert_eq!(decode_frame(&mut r, 1000).unwrap(), Some(&payload[..1000]));
        assert!(matches!(
            decode_frame(&mut Reader::new(&w), 999),
            Err(DecodeError::Invalid(_))
        ));
        assert!(
            decode_frame(&mut Reader::new(&w[..100]), 1000)
                .unwrap_err()
                .is_incomplete()
        );
    }

    #[test]
    fn cpu_times_need_1_37() {
        let mut res = BuildResult::new(BuildStatus::Built, "");
        res.cpu_user = Some(1234);
        res.cpu_system = Some(-1);
        for (minor, with_cpu) in [(36, false), (37, true), (38, true)] {
            let proto = proto(minor);
            let mut w = Vec::new();
            server::encode_build_result(&mut w, &proto, &res);
            let got = decode_build_result(&mut Reader::new(&w), &proto, "/nix/store").unwrap();
            assert_eq!(got.cpu_user.is_some(), with_cpu);
            assert_eq!(got, carried(&res, true, with_cpu, true));
        }
    }

    proptest! {
        /// A BuildResult at every worker version, with and without the feature.
        #[test]
        fn build_result_round_trip(res in arb_build_result(), minor in 20u8..=39, feature in any::<bool>()) {
            let mut proto = proto(minor);
            if feature {
                proto.features.insert(FEATURE_REALISATION_WITH_PATH.to_owned());
            }
            let mut w = Vec::new();
            server::encode_build_result(&mut w, &proto, &res);
            let (got, used) = wire::decode_with(&w, |r| decode_build_result(r, &proto, "/nix/store")).unwrap();
            prop_assert_eq!(used, w.len());
            prop_assert_eq!(got, carried(&res, minor >= 29, minor >= 37, feature || minor >= 28));
            for cut in 0..w.len() {
                let e = decode_build_result(&mut Reader::new(&w[..cut]), &proto, "/nix/store").unwrap_err();
                prop_assert!(e.is_incomplete(), "cut {}: {:?}", cut, e);
            }
        }

        #[test]
        fn stderr_round_trip(
            id in any::<u64>(), level in 0u64..8, t in any::<u64>(), text in ".{0,30}",
            ints in proptest::collection::vec(any::<u64>(), 0..4),
            strs in proptest::collection::vec(".{0,10}", 0..3),
            minor in 21u8..=38,
            traces in proptest::collection::vec(".{0,20}", 0..3),
        ) {
            let p = proto(minor);
            let mut fields: Vec<Field> = ints.into_iter().map(Field::Int).collect();
            fields.extend(strs.into_iter().map(Field::String));
            let new_layout = minor >= 26;
            let msgs = vec![
                StderrMessage::StartActivity(StartActivity { id, level, activity_type: t, text: text.clone(), fields: fields.clone(), parent: id / 2 }),
                StderrMessage::Result(ActivityResult { id, result_type: t, fields }),
                StderrMessage::Next(text.clone()),
                StderrMessage::Error(RemoteError {
                    message: text,
                    level: new_layout.then_some(level),
                    traces: if new_layout { traces } else { vec![] },
                    exit_status: (!new_layout).then_some(level),
                }),
            ];
            for m in msgs {
                let mut w = Vec::new();
                server::encode_stderr(&mut w, &p, &m);
                let (got, used) = wire::decode_with(&w, |r| decode_stderr(r, &p)).unwrap();
                prop_assert_eq!(used, w.len());
                prop_assert_eq!(got, m);
                for cut in 0..w.len() {
                    prop_assert!(decode_stderr(&mut Reader::new(&w[..cut]), &p).unwrap_err().is_incomplete());
                }
            }
        }

        #[test]
        fn path_info_round_trip(info in arb_path_info(), minor in 21u8..=38) {
            let p = proto(minor);
            let mut w = Vec::new();
            server::encode_query_path_info_reply(&mut w, &p, Some(&info));
            let got = decode_query_path_info_reply(&mut Reader::new(&w), &p, &info.path).unwrap();
            prop_assert_eq!(got, Some(info));
        }

        #[test]
        fn keyed_results_round_trip(
            items in proptest::collection::vec((arb_path(), arb_build_result()), 0..3),
            feature in any::<bool>(),
        ) {
            let mut p = proto(38);
            if feature {
                p.features.insert(FEATURE_REALISATION_WITH_PATH.into());
            }
            let results: Vec<(DerivedPath, BuildResult)> = items
                .into_iter()
                .map(|(path, res)| (DerivedPath::Opaque(path), res))
                .collect();
            let mut w = Vec::new();
            server::encode_build_paths_with_results_reply(&mut w, &p, &results);
            let got = decode_build_paths_with_results_reply(&mut Reader::new(&w), &p, "/nix/store").unwrap();
            prop_assert_eq!(got, results);
        }

        #[test]
        fn frames_round_trip(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 0..6), split in 1usize..20) {
            let mut w = Vec::new();
            for c in &chunks {
                encode_frame(&mut w, c);
            }
            encode_frame_end(&mut w);
            let want: Vec<u8> = chunks.concat();
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            let mut pos = 0;
            let mut avail = 0;
            loop {
                let (used, f) = dec.decode(&w[pos..avail]);
                pos += used;
                match f {
                    Some(Frame::Data(d)) => got.extend_from_slice(d),
                    Some(Frame::End) => break,
                    None => {
                        prop_assert!(avail < w.len());
                        avail = (avail + split).min(w.len());
                    }
                }
            }
            prop_assert_eq!(pos, w.len());
            prop_assert_eq!(got, want);
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), minor in 0u8..=40) {
            let p = proto(minor);
            let _ = decode_server_hello(&mut Reader::new(&data), CLIENT_VERSION);
            let _ = decode_server_info(&mut Reader::new(&data), p.version, &BTreeSet::new());
            let _ = decode_stderr(&mut Reader::new(&data), &p);
            let _ = decode_response(&mut Reader::new(&data), &p, |r| decode_build_result(r, &p, "/nix/store"));
            let _ = decode_query_path_info_reply(&mut Reader::new(&data), &p, &path(1, "a"));
            let _ = decode_build_paths_with_results_reply(&mut Reader::new(&data), &p, "/nix/store");
            let _ = server::decode_request(&mut Reader::new(&data), &p);
            let _ = server::decode_after_hello(&mut Reader::new(&data), p.version);
            let mut dec = FrameDecoder::new();
            let mut pos = 0;
            while let (used, Some(Frame::Data(_))) = dec.decode(&data[pos..]) {
                pos += used;
            }
        }
    }
}
