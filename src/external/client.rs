//! `nix-lazy-builder external-build BUILD_JSON`: what nix-daemon runs, as the build user, for a
//! derivation of a system listed in its `external-builders` setting.
//!
//! Reads and validates build.json, asks the supervisor over the build socket to run the build
//! (handing it the write end of a pipe for the build log), tells the daemon the build is under
//! way (`\x02` on stderr: until then the daemon counts every line as a set-up message), copies
//! the log to stdout as it comes, and unpacks each returned output into its scratch path through
//! `place` (verified against the hash the builder vouched for, under a hidden name first, so a
//! failure leaves no output behind).
//!
//! Must never: write anywhere but the scratch paths of its own build.json (and their hidden
//! unpack names beside them), start a supervisor (it has no rights to), or print anything on
//! stdout but the build log.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use hook_protocol::{Sha256, StorePath};

use super::job::{ExternalJob, MAX_FILE_BYTES};
use super::proto::{BuildRequest, Frame, Hello, MAX_LINE, build_socket_path};
use crate::config::{Config, ConfigPath};
use crate::place::{ExpectedNar, Placed};

/// Why an external build failed on this side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read '{}': {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("'{}' is larger than {MAX_FILE_BYTES} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("'{}': {source}", path.display())]
    Job {
        path: PathBuf,
        source: super::job::JobError,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "no nix-lazy-builder supervisor is running (nothing answers on '{}': {source}); start \
         it as root with `systemctl start nix-lazy-builder` or `nix-lazy-builder supervise`",
        socket.display()
    )]
    NoSupervisor { socket: PathBuf, source: io::Error },
    #[error("the supervisor refused this build: {0}")]
    Refused(String),
    #[error("talking to the supervisor: {0}")]
    Io(#[from] io::Error),
    #[error("the supervisor sent something unexpected: {0}")]
    Protocol(String),
    #[error(transparent)]
    Place(#[from] crate::place::PlaceError),
    #[error("{message}")]
    Failed { message: String, exit_code: u8 },
}

impl ClientError {
    fn exit_code(&self) -> u8 {
        match self {
            ClientError::Failed { exit_code, .. } => (*exit_code).max(1),
            _ => 1,
        }
    }
}

/// Runs the external build; returns the exit status nix-daemon sees.
pub fn main(config: ConfigPath, build_json: &Path) -> ExitCode {
    match run(&config, build_json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(io::stderr(), "error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(config: &ConfigPath, build_json: &Path) -> Result<(), ClientError> {
    let bytes = read_bounded(build_json)?;
    let job = ExternalJob::parse(&bytes).map_err(|source| ClientError::Job {
        path: build_json.to_owned(),
        source,
    })?;
    let cfg = Config::load(config)?;
    let socket = build_socket_path(&cfg.supervisor.state_dir);
    let stream = UnixStream::connect(&socket).map_err(|source| ClientError::NoSupervisor {
        socket: socket.clone(),
        source,
    })?;
    let (log_read, log_write) = io::pipe()?;
    let hello = send_with_fd(
        &stream,
        &line(&Hello { external_build: 1 })?,
        log_write.as_fd(),
    );
    // Only the root side may hold the write end: the log ends when it is done.
    drop(log_write);
    let request = BuildRequest {
        build_json: String::from_utf8(bytes)
            .map_err(|_| ClientError::Protocol("build.json is not UTF-8".into()))?,
    };
    let request = line(&request)?;
    let sent = hello.and_then(|()| (&stream).write_all(&request));
    let mut frames = BufReader::with_capacity(256 * 1024, &stream);
    if let Err(e) = sent {
        // A supervisor that refuses us writes why and closes at once, perhaps before our
        // hello and request were written (EPIPE): its reason is still there to read.
        return Err(match read_frame(&mut frames) {
            Ok(Frame::Refused(why)) => ClientError::Refused(why),
            _ => e.into(),
        });
    }
    match read_frame(&mut frames)? {
        Frame::Started => {}
        Frame::Refused(why) => return Err(ClientError::Refused(why)),
        Frame::Failed { message, exit_code } => {
            return Err(ClientError::Failed { message, exit_code });
        }
        other => return Err(ClientError::Protocol(format!("{other:?} before the start"))),
    }
    // The daemon reads set-up lines until this marker; from here on it is the build log.
    {
        let mut err = io::stderr().lock();
        err.write_all(b"\x02\n")?;
        err.flush()?;
    }
    let relay = std::thread::spawn(move || relay_log(log_read));
    let result = receive_outputs(&job, &mut frames);
    // The log's last lines come before the verdict.
    let _ = relay.join();
    result
}

/// Reads build.json, refusing anything larger than [`MAX_FILE_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, ClientError> {
    let read_err = |source| ClientError::Read {
        path: path.to_owned(),
        source,
    };
    let f = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ClientError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

fn line<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, ClientError> {
    let mut l = serde_json::to_vec(v).map_err(|e| ClientError::Protocol(e.to_string()))?;
    l.push(b'\n');
    Ok(l)
}

/// Copies the build log to stdout until the root side closes the pipe.
fn relay_log(mut from: io::PipeReader) {
    let mut out = io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn read_frame(r: &mut impl BufRead) -> Result<Frame, ClientError> {
    let mut l = Vec::new();
    r.by_ref().take(MAX_LINE as u64).read_until(b'\n', &mut l)?;
    if l.is_empty() {
        return Err(ClientError::Protocol(
            "the supervisor closed the connection".into(),
        ));
    }
    serde_json::from_slice(&l).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Unpacks every output the root side sends into its scratch path; the outputs stay hidden
/// until all of them are verified, and are removed if anything fails.
fn receive_outputs(job: &ExternalJob, frames: &mut impl BufRead) -> Result<(), ClientError> {
    let mut placed = Placed::new();
    let mut got = std::collections::BTreeSet::new();
    loop {
        match read_frame(frames)? {
            Frame::Output {
                name,
                path,
                nar_hash,
                nar_size,
            } => {
                // Only this build's own scratch paths, each once.
                let scratch = job
                    .outputs
                    .get(&name)
                    .filter(|p| p.as_str() == path)
                    .ok_or_else(|| {
                        ClientError::Protocol(format!("an output '{name}' at '{path}'"))
                    })?;
                if !got.insert(name.clone()) {
                    return Err(ClientError::Protocol(format!("output '{name}' twice")));
                }
                let real = StorePath::parse(&job.real_path(scratch))
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                let nar_hash = Sha256::parse_any(&nar_hash)
                    .map_err(|e| ClientError::Protocol(format!("hash {}", e.0)))?;
                let expected = ExpectedNar {
                    path: real,
                    nar_hash,
                    nar_size,
                    deriver: None,
                    references: Vec::new(),
                };
                placed.unpack_staged(expected, frames.by_ref().take(nar_size))?;
            }
            Frame::Done => {
                if let Some(missing) = job.outputs.keys().find(|n| !got.contains(*n)) {
                    return Err(ClientError::Protocol(format!(
                        "the build ended without output '{missing}'"
                    )));
                }
                placed.hand_over()?;
                return Ok(());
            }
            Frame::Failed { message, exit_code } => {
                return Err(ClientError::Failed { message, exit_code });
            }
            other => return Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }
}

/// Sends `line` with `fd` attached.
fn send_with_fd(
    stream: &UnixStream,
    line: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other(
            "the descriptor does not fit the control buffer",
        ));
    }
    let sent = rustix::net::sendmsg(
        stream,
        &[io::IoSlice::new(line)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(io::Error::from)?;
    let mut s = stream;
    s.write_all(&line[sent..])
}
