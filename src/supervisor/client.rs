//! The supervisor's client, for hooks and the CLI: connect (starting a detached supervisor when
//! none answers), then typed requests over the socket protocol in `proto.rs`.
//!
//! It must never let a started supervisor inherit anything but /dev/null and its log file: a hook's
//! stderr and fd 4 must close when the hook exits, or nix-daemon waits for the build forever.
//! Every error names the socket and what was asked. A connection that failed mid-request is
//! not reused (a late answer would be taken for the next one).

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::paths::{log_path, socket_path};
use super::proto::{BuilderStatus, Request, Response, SessionSpec, State};
use crate::os::ensure_private_dir;
use crate::select::Availability;
use crate::store::warm::WarmSession;

/// How long a plain request may take (the supervisor answers at once; this guards a hung one).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a started supervisor to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(3);
/// How long connecting and reading the hello may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Extra time on top of a wait-ready's own timeout before the client gives up on the answer.
const WAIT_SLACK: Duration = Duration::from_secs(5);

/// Talking to the supervisor failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the supervisor at '{}': {source}", socket.display())]
    Connect { socket: PathBuf, source: io::Error },
    #[error("the supervisor at '{}' did not say hello: {detail}", socket.display())]
    NoHello { socket: PathBuf, detail: String },
    #[error("cannot start a supervisor ({program}) because none answers at '{}': {source}", socket.display())]
    Spawn {
        socket: PathBuf,
        program: String,
        source: io::Error,
    },
    #[error("started a supervisor (pid {pid}), but none answered at '{}' within {}s{}; see {}", socket.display(), waited.as_secs_f32(), exit.as_ref().map(|e| format!(" (it exited: {e})")).unwrap_or_default(), log.display())]
    StartTimeout {
        socket: PathBuf,
        pid: u32,
        waited: Duration,
        exit: Option<String>,
        log: PathBuf,
    },
    #[error("asking the supervisor at '{}' to {asked}: {source}", socket.display())]
    Io {
        socket: PathBuf,
        asked: String,
        source: io::Error,
    },
    #[error("asking the supervisor at '{}' to {asked}: no answer within {}s", socket.display(), after.as_secs_f32())]
    Timeout {
        socket: PathBuf,
        asked: String,
        after: Duration,
    },
    #[error("asking the supervisor at '{}' to {asked}: it closed the connection", socket.display())]
    Closed { socket: PathBuf, asked: String },
    #[error("asking the supervisor at '{}' to {asked}: unexpected answer: {detail}", socket.display())]
    Protocol {
        socket: PathBuf,
        asked: String,
        detail: String,
    },
    #[error("asking the supervisor at '{}' to {asked}: {message}", socket.display())]
    Server {
        socket: PathBuf,
        asked: String,
        message: String,
    },
    #[error("asking the supervisor at '{}' to {asked}: the connection is unusable after an earlier error", socket.display())]
    Broken { socket: PathBuf, asked: String },
}

/// The answer to `boot` and `lease`.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Done (booting, up, or the lease is held).
    Granted(BuilderStatus),
    /// Not now, and why (backoff, booting, full, draining, …).
    Refused {
        reason: String,
        status: Option<BuilderStatus>,
    },
}

/// The answer to a warm-session request.
#[derive(Debug)]
pub enum SessionAnswer {
    /// A warm session, handed over.
    Session(WarmSession),
    /// None is ready (why); connect directly.
    None(String),
}

/// How to start a supervisor: `<program> <args…>` with extra environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
}

impl StartCommand {
    /// `<current executable> supervise --auto [--config PATH]`.
    pub fn supervise(config: Option<&Path>) -> io::Result<Self> {
        let mut args: Vec<OsString> = vec!["supervise".into(), "--auto".into()];
        if let Some(c) = config {
            args.push("--config".into());
            args.push(c.into());
        }
        Ok(StartCommand {
            program: std::env::current_exe()?,
            args,
            env: Vec::new(),
        })
    }
}

/// A connection to the supervisor.
#[derive(Debug)]
pub struct Client {
    socket: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    supervisor_pid: u32,
    broken: bool,
}

impl ClientError {
    /// Whether this is a failed connect that means "nobody serves there" (so starting a
    /// supervisor may help).
    pub fn nobody_there(&self) -> bool {
        nobody_there(self)
    }
}

/// Whether a failed connect means "nobody serves there" (so starting one may help).
fn nobody_there(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { source, .. } => matches!(
            source.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        ),
        // Accepted, then closed before the hello: a supervisor that was exiting.
        ClientError::NoHello { .. } => true,
        _ => false,
    }
}

/// Start `cmd` detached: its own session, stdin from /dev/null, stdout and stderr appended to
/// `log`, no other descriptor inherited, working directory `/`.
pub fn spawn_detached(cmd: &StartCommand, log: &Path) -> io::Result<std::process::Child> {
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)?;
    let log_err = log_file.try_clone()?;
    let cloexec = crate::os::ChildCloexec::new(3);
    let mut command = Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(log_err));
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls (setsid, then close_range or fcntl in `ChildCloexec::apply`); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            cloexec.apply();
            Ok(())
        });
    }
    command.spawn()
}

fn describe(req: &Request) -> String {
    match req {
        Request::Status => "report its status".to_owned(),
        Request::Boot { builder, force } => {
            format!("boot '{builder}'{}", if *force { " (forced)" } else { "" })
        }
        Request::WaitReady {
            builder,
            timeout_ms,
        } => format!("wait up to {timeout_ms} ms for '{builder}'"),
        Request::Lease { builder } => format!("lease '{builder}'"),
        Request::Release { builder } => format!("release '{builder}'"),
        Request::ReportFailure { builder, .. } => format!("record a failure of '{builder}'"),
        Request::Down { builder } => format!("stop '{builder}'"),
        Request::LeaseSession { spec } => format!("hand out a warm session to '{}'", spec.builder),
        Request::Warm { spec } => format!("warm up a connection to '{}'", spec.builder),
    }
}

impl Client {
    /// Connect to the supervisor of `state_dir` and read its hello.
    pub async fn connect(state_dir: &Path) -> Result<Client, ClientError> {
        let socket = socket_path(state_dir);
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&socket)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(ClientError::Connect { socket, source }),
            Err(_) => {
                return Err(ClientError::Connect {
                    socket,
                    source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
                });
            }
        };
        let (rd, writer) = stream.into_split();
        let mut reader = BufReader::new(rd);
        let mut line = String::new();
        let read = tokio::time::timeout(CONNECT_TIMEOUT, reader.read_line(&mut line)).await;
        let no_hello = |detail: String| ClientError::NoHello {
            socket: socket.clone(),
            detail,
        };
        match read {
            Err(_) => return Err(no_hello("no hello within 2s".to_owned())),
            Ok(Err(e)) => return Err(no_hello(e.to_string())),
            Ok(Ok(0)) => return Err(no_hello("it closed the connection".to_owned())),
            Ok(Ok(_)) => {}
        }
        let supervisor_pid = match serde_json::from_str::<Response>(&line) {
            Ok(Response::Hello { pid, .. }) => pid,
            Ok(other) => return Err(no_hello(format!("it sent {other:?} first"))),
            Err(e) => return Err(no_hello(format!("bad hello: {e}"))),
        };
        Ok(Client {
            socket,
            reader,
            writer,
            supervisor_pid,
            broken: false,
        })
    }

    /// [`Client::connect`], starting `<this executable> supervise --auto [--config P]`
    /// detached when no supervisor answers.
    pub async fn connect_or_start(
        state_dir: &Path,
        config: Option<&Path>,
    ) -> Result<Client, ClientError> {
        let first = match Client::connect(state_dir).await {
            Ok(c) => return Ok(c),
            Err(e) if !nobody_there(&e) => return Err(e),
            Err(e) => e,
        };
        let cmd = StartCommand::supervise(config).map_err(|source| ClientError::Spawn {
            socket: socket_path(state_dir),
            program: "the current executable".to_owned(),
            source,
        })?;
        Client::start_and_connect(state_dir, &cmd, first).await
    }

    /// [`Client::connect_or_start`] with an explicit start command. Two callers racing end up
    /// on the same supervisor: the loser of the supervisors' lock exits quietly.
    pub async fn connect_or_start_with(
        state_dir: &Path,
        cmd: &StartCommand,
    ) -> Result<Client, ClientError> {
        let first = match Client::connect(state_dir).await {
            Ok(c) => return Ok(c),
            Err(e) if !nobody_there(&e) => return Err(e),
            Err(e) => e,
        };
        Client::start_and_connect(state_dir, cmd, first).await
    }

    /// Starts `cmd` detached since `first` said nobody serves, then connects to whichever
    /// supervisor answers.
    async fn start_and_connect(
        state_dir: &Path,
        cmd: &StartCommand,
        first: ClientError,
    ) -> Result<Client, ClientError> {
        tracing::debug!("no supervisor answers ({first}); starting one");
        let socket = socket_path(state_dir);
        let log = log_path(state_dir);
        let spawn_err = |source| ClientError::Spawn {
            socket: socket.clone(),
            program: cmd.program.display().to_string(),
            source,
        };
        ensure_private_dir(state_dir).map_err(spawn_err)?;
        let mut child = spawn_detached(cmd, &log).map_err(spawn_err)?;
        let pid = child.id();
        let started = Instant::now();
        let mut exit: Option<String> = None;
        let mut delay = Duration::from_millis(5);
        loop {
            match Client::connect(state_dir).await {
                Ok(c) => return Ok(c),
                Err(e) if !nobody_there(&e) => return Err(e),
                Err(_) => {}
            }
            if exit.is_none()
                && let Ok(Some(status)) = child.try_wait()
            {
                // Exit 0: another supervisor holds the lock (it is starting or will be gone
                // soon); keep trying to connect. Anything else: it could not start.
                if !status.success() {
                    return Err(ClientError::StartTimeout {
                        socket,
                        pid,
                        waited: started.elapsed(),
                        exit: Some(status.to_string()),
                        log,
                    });
                }
                exit = Some(status.to_string());
            }
            if started.elapsed() >= START_TIMEOUT {
                return Err(ClientError::StartTimeout {
                    socket,
                    pid,
                    waited: started.elapsed(),
                    exit,
                    log,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The supervisor's process id (from its hello).
    pub fn supervisor_pid(&self) -> u32 {
        self.supervisor_pid
    }

    /// `req` as one protocol line.
    fn line(&self, req: &Request, asked: &str) -> Result<Vec<u8>, ClientError> {
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol {
            socket: self.socket.clone(),
            asked: asked.to_owned(),
            detail: e.to_string(),
        })?;
        line.push(b'\n');
        Ok(line)
    }

    /// Send one request and read its answer within `timeout`. `Response::Error` becomes
    /// [`ClientError::Server`].
    pub async fn call(
        &mut self,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let asked = describe(req);
        if self.broken {
            return Err(ClientError::Broken {
                socket: self.socket.clone(),
                asked,
            });
        }
        self.broken = true;
        let io_err = |socket: &Path, asked: &str, source| ClientError::Io {
            socket: socket.to_owned(),
            asked: asked.to_owned(),
            source,
        };
        let line = self.line(req, &asked)?;
        let exchange = async {
            self.writer.write_all(&line).await?;
            let mut answer = String::new();
            let n = self.reader.read_line(&mut answer).await?;
            Ok::<_, io::Error>((n, answer))
        };
        let (n, answer) = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => {
                return Err(ClientError::Timeout {
                    socket: self.socket.clone(),
                    asked,
                    after: timeout,
                });
            }
            Ok(Err(e)) => return Err(io_err(&self.socket, &asked, e)),
            Ok(Ok(x)) => x,
        };
        if n == 0 {
            return Err(ClientError::Closed {
                socket: self.socket.clone(),
                asked,
            });
        }
        let response: Response =
            serde_json::from_str(&answer).map_err(|e| ClientError::Protocol {
                socket: self.socket.clone(),
                asked: asked.clone(),
                detail: format!("{e}: {}", answer.trim()),
            })?;
        self.broken = false;
        match response {
            Response::Error { message } => Err(ClientError::Server {
                socket: self.socket.clone(),
                asked,
                message,
            }),
            r => Ok(r),
        }
    }

    /// A warm session to the builder `spec` describes, if one is ready (answered at once;
    /// `timeout` guards a supervisor that hangs).
    pub async fn lease_session(
        &mut self,
        spec: &SessionSpec,
        timeout: Duration,
    ) -> Result<SessionAnswer, ClientError> {
        let req = Request::LeaseSession { spec: spec.clone() };
        let asked = describe(&req);
        if self.broken || !self.reader.buffer().is_empty() {
            return Err(ClientError::Broken {
                socket: self.socket.clone(),
                asked,
            });
        }
        self.broken = true;
        let line = self.line(&req, &asked)?;
        let exchange = async {
            self.writer.write_all(&line).await?;
            super::fds::recv_line_with_fds(self.reader.get_ref().as_ref(), super::server::MAX_LINE)
                .await
        };
        let (answer, mut fds) = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => {
                return Err(ClientError::Timeout {
                    socket: self.socket.clone(),
                    asked,
                    after: timeout,
                });
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(ClientError::Closed {
                    socket: self.socket.clone(),
                    asked,
                });
            }
            Ok(Err(source)) => {
                return Err(ClientError::Io {
                    socket: self.socket.clone(),
                    asked,
                    source,
                });
            }
            Ok(Ok(x)) => x,
        };
        let response: Response =
            serde_json::from_slice(&answer).map_err(|e| ClientError::Protocol {
                socket: self.socket.clone(),
                asked: asked.clone(),
                detail: format!("{e}: {}", String::from_utf8_lossy(&answer).trim()),
            })?;
        self.broken = false;
        match response {
            Response::Session { handshake } if fds.len() == 3 => {
                let status = fds.pop().expect("three");
                let stderr = fds.pop().expect("three");
                let stdio = fds.pop().expect("three");
                Ok(SessionAnswer::Session(WarmSession {
                    stdio,
                    stderr,
                    status,
                    handshake,
                }))
            }
            Response::Session { .. } => Ok(SessionAnswer::None(format!(
                "the warm session came with {} descriptors instead of 3",
                fds.len()
            ))),
            Response::NoSession { reason } => Ok(SessionAnswer::None(reason)),
            Response::Error { message } => Err(ClientError::Server {
                socket: self.socket.clone(),
                asked,
                message,
            }),
            r => Err(self.unexpected(&req, r)),
        }
    }

    /// Asks the supervisor to warm up a connection to the builder `spec` describes.
    pub async fn warm(&mut self, spec: &SessionSpec) -> Result<(), ClientError> {
        self.expect_ok(Request::Warm { spec: spec.clone() }).await
    }

    fn unexpected(&self, req: &Request, r: Response) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            asked: describe(req),
            detail: format!("{r:?}"),
        }
    }

    /// The state of every lazy builder.
    pub async fn status(&mut self) -> Result<Vec<BuilderStatus>, ClientError> {
        Ok(self.status_report().await?.builders)
    }

    /// The state of every lazy builder, and which configuration the supervisor serves.
    pub async fn status_report(&mut self) -> Result<StatusReport, ClientError> {
        let req = Request::Status;
        match self.call(&req, REQUEST_TIMEOUT).await? {
            Response::Status {
                builders,
                config_file,
                config_error,
            } => Ok(StatusReport {
                builders,
                config_file,
                config_error,
            }),
            r => Err(self.unexpected(&req, r)),
        }
    }

    async fn verdict(&mut self, req: Request) -> Result<Verdict, ClientError> {
        match self.call(&req, REQUEST_TIMEOUT).await? {
            Response::Builder { status } | Response::Leased { status } => {
                Ok(Verdict::Granted(status))
            }
            Response::Refused { reason, status } => Ok(Verdict::Refused { reason, status }),
            r => Err(self.unexpected(&req, r)),
        }
    }

    /// Boot `builder` unless it is booting or up. Refused while it backs off, unless `force`.
    pub async fn boot(&mut self, builder: &str, force: bool) -> Result<Verdict, ClientError> {
        self.verdict(Request::Boot {
            builder: builder.to_owned(),
            force,
        })
        .await
    }

    /// Wait until `builder` is up, failed or down, at most `timeout`; its status then.
    pub async fn wait_ready(
        &mut self,
        builder: &str,
        timeout: Duration,
    ) -> Result<BuilderStatus, ClientError> {
        let req = Request::WaitReady {
            builder: builder.to_owned(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        match self.call(&req, timeout + WAIT_SLACK).await? {
            Response::Builder { status } => Ok(status),
            r => Err(self.unexpected(&req, r)),
        }
    }

    /// Take a lease on an up builder (held until released or this connection closes).
    pub async fn lease(&mut self, builder: &str) -> Result<Verdict, ClientError> {
        self.verdict(Request::Lease {
            builder: builder.to_owned(),
        })
        .await
    }

    /// Give a lease back.
    pub async fn release(&mut self, builder: &str) -> Result<(), ClientError> {
        self.expect_ok(Request::Release {
            builder: builder.to_owned(),
        })
        .await
    }

    /// Report that `builder` could not be used (e.g. SSH failed): it backs off and restarts
    /// once its leases are released.
    pub async fn report_failure(&mut self, builder: &str, cause: &str) -> Result<(), ClientError> {
        self.expect_ok(Request::ReportFailure {
            builder: builder.to_owned(),
            cause: cause.to_owned(),
        })
        .await
    }

    /// Stop `builder` once its leases are released; its status now.
    pub async fn down(&mut self, builder: &str) -> Result<BuilderStatus, ClientError> {
        let req = Request::Down {
            builder: builder.to_owned(),
        };
        match self.call(&req, REQUEST_TIMEOUT).await? {
            Response::Builder { status } => Ok(status),
            r => Err(self.unexpected(&req, r)),
        }
    }

    async fn expect_ok(&mut self, req: Request) -> Result<(), ClientError> {
        match self.call(&req, REQUEST_TIMEOUT).await? {
            Response::Ok => Ok(()),
            r => Err(self.unexpected(&req, r)),
        }
    }
}

/// A supervisor's answer to `status`.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusReport {
    pub builders: Vec<BuilderStatus>,
    /// The configuration file it serves (`None`: it has none to read again).
    pub config_file: Option<PathBuf>,
    /// Why its last reload of that file failed (it runs the configuration it had).
    pub config_error: Option<String>,
}

/// What a status means for choosing a builder (`select::choose`). Draining and stopping
/// builders take no new builds and count as booting (something matches, wait for it).
pub fn availability(status: &BuilderStatus) -> Availability {
    match status.state {
        State::Up | State::AlwaysOn => Availability::Up,
        State::Booting | State::Draining | State::Stopping => Availability::Booting,
        State::Down => Availability::MustBoot,
        State::Failed => match &status.last_failure {
            Some(f) if f.retry_in_ms > 0 => Availability::BackingOff {
                cause: f.cause.clone(),
                retry_in: Duration::from_millis(f.retry_in_ms),
            },
            _ => Availability::MustBoot,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::proto::Failure;

    fn status(state: State, failure: Option<Failure>) -> BuilderStatus {
        BuilderStatus {
            last_failure: failure,
            ..BuilderStatus::new("vm", state)
        }
    }

    #[test]
    fn availability_follows_state_and_backoff() {
        assert_eq!(availability(&status(State::Up, None)), Availability::Up);
        assert_eq!(
            availability(&status(State::Down, None)),
            Availability::MustBoot
        );
        assert_eq!(
            availability(&status(State::Stopping, None)),
            Availability::Booting
        );
        let f = |retry_in_ms| Failure {
            cause: "boom".into(),
            at_unix: 0,
            retry_in_ms,
            consecutive: 1,
        };
        assert_eq!(
            availability(&status(State::Failed, Some(f(1500)))),
            Availability::BackingOff {
                cause: "boom".into(),
                retry_in: Duration::from_millis(1500)
            }
        );
        assert_eq!(
            availability(&status(State::Failed, Some(f(0)))),
            Availability::MustBoot
        );
    }

    #[test]
    fn requests_are_described_for_errors() {
        assert_eq!(
            describe(&Request::Lease {
                builder: "vm".into()
            }),
            "lease 'vm'"
        );
        let e = ClientError::Closed {
            socket: "/s/supervisor.sock".into(),
            asked: describe(&Request::Boot {
                builder: "vm".into(),
                force: true,
            }),
        };
        assert_eq!(
            e.to_string(),
            "asking the supervisor at '/s/supervisor.sock' to boot 'vm' (forced): it closed the connection"
        );
    }

    #[test]
    fn start_command_runs_supervise_auto() {
        let c = StartCommand::supervise(Some(Path::new("/etc/x.toml"))).unwrap();
        assert_eq!(c.args, ["supervise", "--auto", "--config", "/etc/x.toml"]);
        assert!(StartCommand::supervise(None).unwrap().args.len() == 2);
    }
}
