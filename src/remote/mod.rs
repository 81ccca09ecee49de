//! A remote store on a builder, reached over SSH: `nix-store --serve --write` for `ssh://`
//! ([`serve`]) or `nix-daemon --stdio` for `ssh-ng://` ([`daemon`]), behind one [`Remote`].
//!
//! Owns opening the remote program on an SSH session (the command line is built from quoted
//! words only), pumping the remote stderr (to the build log for `ssh://`, as Nix does, and into
//! a short tail that explains an unexpected EOF), and the [`BuildLog`] that carries build output
//! to nix-daemon's fd 4. It never decides what to copy or build: `transfer` does.

pub mod daemon;
pub mod serve;

use std::collections::BTreeSet;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use hook_protocol::StorePath;
use hook_protocol::build_result::BuildResult;
use hook_protocol::derivation::BasicDerivation;
use hook_protocol::log::Message;
use hook_protocol::path_info::{DerivedPath, OutputsSpec, PathInfo};
use hook_protocol::serve::BuildOptions;
use hook_protocol::worker::{ClientOptions, Trust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;

use crate::config::{Builder, Scheme};
use crate::ssh::{self, Exec, ExecOutput, ExecStdin, SshError};
use crate::wire_io::{CopyError, WireError, WireReader};
use daemon::{NarSink, NarSource, WorkerClient};
use serve::ServeClient;

/// How much of the remote's stderr we keep to explain a failure.
const STDERR_TAIL: usize = 4096;

/// A failure talking to a remote store (or to the local daemon, which speaks the same protocol).
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Ssh(Box<SshError>),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{peer} closed the connection while we were reading {what}{}", tail_suffix(.stderr))]
    Closed {
        peer: String,
        what: &'static str,
        stderr: String,
    },
    #[error("writing to {peer}: {source}")]
    Write {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    /// The remote daemon reported an error (ANSI escapes stripped).
    #[error("{message}")]
    Daemon { peer: String, message: String },
    #[error("{peer}: {message}")]
    Protocol { peer: String, message: String },
    #[error("cannot build the remote command line: {0}")]
    Quote(#[from] ssh::ShellQuoteError),
    /// The builder's configuration gives no SSH target (its host keys).
    #[error(transparent)]
    Target(#[from] ssh::TargetError),
}

fn tail_suffix(stderr: &str) -> String {
    let t = stderr.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!("; it said: {t}")
    }
}

impl From<SshError> for RemoteError {
    fn from(e: SshError) -> Self {
        RemoteError::Ssh(Box::new(e))
    }
}

impl From<CopyError> for RemoteError {
    fn from(e: CopyError) -> Self {
        match e {
            CopyError::Read(w) => RemoteError::Wire(w),
            CopyError::Write(source) => RemoteError::Write {
                peer: "the receiving side".into(),
                source,
            },
        }
    }
}

/// Where build output goes: nix-daemon's fd 4, which it tees into the log file, counts against
/// `max-build-log-size` and shows the user line by line.
#[derive(Clone, Default)]
pub struct BuildLog {
    out: Option<Arc<tokio::sync::Mutex<pipe::Sender>>>,
}

impl BuildLog {
    /// Takes fd 4 if the daemon gave us one (it always does; a hand-run hook may not have it).
    /// Call this first thing, before anything else opens a descriptor that could land on 4.
    pub fn claim_fd4() -> Option<OwnedFd> {
        // SAFETY: fcntl only inspects the descriptor number.
        if unsafe { libc::fcntl(4, libc::F_GETFD) } == -1 {
            return None;
        }
        // SAFETY: fd 4 is open (checked above), we are called before anything in this process
        // opened a descriptor, so nothing else owns it.
        Some(unsafe { OwnedFd::from_raw_fd(4) })
    }

    /// The log on a descriptor from [`BuildLog::claim_fd4`]. Must be called inside a tokio
    /// runtime.
    pub fn new(fd: Option<OwnedFd>) -> Self {
        let Some(fd) = fd else {
            return BuildLog::default();
        };
        match pipe::Sender::from_owned_fd(fd) {
            Ok(s) => BuildLog {
                out: Some(Arc::new(tokio::sync::Mutex::new(s))),
            },
            Err(e) => {
                tracing::debug!(error = %e, "fd 4 is not a pipe; build output is discarded");
                BuildLog::default()
            }
        }
    }

    /// Raw bytes, as a builder printed them.
    pub async fn raw(&self, data: &[u8]) {
        if let Some(out) = &self.out {
            // If the daemon stopped reading, it is about to kill us anyway.
            let _ = out.lock().await.write_all(data).await;
        }
    }

    /// One log line (without its newline).
    pub async fn line(&mut self, line: &str) {
        if let Some(out) = &self.out {
            let mut o = out.lock().await;
            let _ = o.write_all(line.as_bytes()).await;
            let _ = o.write_all(b"\n").await;
        }
    }

    /// A message from the remote (`STDERR_NEXT`): part of the log, like a builder's stderr.
    pub async fn message(&mut self, text: &str) {
        if text.ends_with('\n') {
            self.raw(text.as_bytes()).await;
        } else {
            self.line(text).await;
        }
    }

    /// The build's phase, shown in nix's progress bar.
    pub fn phase(&self, phase: &str) {
        crate::logging::send(&Message::SetPhase {
            phase: phase.to_owned(),
        });
    }
}

/// The remote command line for a builder's store URI.
pub fn remote_command(builder: &Builder) -> Result<String, RemoteError> {
    let mut words = vec![builder.uri.remote_program().to_owned()];
    match builder.uri.scheme {
        Scheme::Ssh => words.extend(["--serve".to_owned(), "--write".to_owned()]),
        Scheme::SshNg => words.push("--stdio".to_owned()),
    }
    if let Some(store) = builder.uri.remote_store() {
        words.extend(["--store".to_owned(), store.to_owned()]);
    }
    Ok(ssh::shell_command(words)?)
}

enum Client {
    Serve(ServeClient<ExecOutput, ExecStdin>),
    Daemon(WorkerClient<ExecOutput, ExecStdin>),
}

/// An open remote store.
pub struct Remote {
    client: Client,
    uri: String,
    tail: Arc<Mutex<Vec<u8>>>,
    _session: ssh::Session,
}

impl Remote {
    /// Starts the remote program on `session` and does the protocol handshake.
    pub async fn open(
        session: ssh::Session,
        builder: &Builder,
        log: &BuildLog,
    ) -> Result<Remote, RemoteError> {
        let command = remote_command(builder)?;
        let Exec {
            stdin,
            stdout,
            stderr,
            status: _,
        } = session.exec(&command).await?;
        let tail = Arc::new(Mutex::new(Vec::new()));
        // `ssh://`: the remote's stderr is the build log, as with Nix's hook. `ssh-ng://`: the
        // log arrives in-band; stderr only explains failures.
        let to_log = (builder.uri.scheme == Scheme::Ssh).then(|| log.clone());
        tokio::spawn(pump_stderr(stderr, to_log, tail.clone()));
        let uri = builder.store_uri.clone();
        let handshake = async {
            Ok::<_, RemoteError>(match builder.uri.scheme {
                Scheme::Ssh => Client::Serve(ServeClient::handshake(stdout, stdin, &uri).await?),
                Scheme::SshNg => {
                    Client::Daemon(WorkerClient::handshake(stdout, stdin, &uri).await?)
                }
            })
        };
        let client = match handshake.await {
            Ok(c) => c,
            Err(e) => return Err(explain(e, &tail).await),
        };
        Ok(Remote {
            client,
            uri,
            tail,
            _session: session,
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// A protocol description for messages, e.g. `serve 2.7` / `worker 1.35 (Nix 2.34.8)`.
    pub fn describe(&self) -> String {
        match &self.client {
            Client::Serve(c) => format!("nix-store --serve protocol {}", c.server_version()),
            Client::Daemon(c) => {
                let v = c.negotiated().version;
                match &c.server_info().nix_version {
                    Some(n) => format!("nix-daemon protocol {v} (Nix {n})"),
                    None => format!("nix-daemon protocol {v}"),
                }
            }
        }
    }

    async fn explained<T>(&self, r: Result<T, RemoteError>) -> Result<T, RemoteError> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => Err(explain(e, &self.tail).await),
        }
    }

    pub async fn query_valid_paths(
        &mut self,
        paths: &[StorePath],
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, RemoteError> {
        let r = match &mut self.client {
            Client::Serve(c) => c.query_valid_paths(paths, substitute).await,
            Client::Daemon(c) => c.query_valid_paths(paths, substitute).await,
        };
        self.explained(r).await
    }

    /// Uploads `infos` (dependencies first), their NARs produced by `source`.
    pub async fn add_paths<S: NarSource>(
        &mut self,
        infos: &[PathInfo],
        source: &mut S,
    ) -> Result<(), RemoteError> {
        let r = match &mut self.client {
            Client::Serve(c) => c.add_paths(infos, source).await,
            Client::Daemon(c) => c.add_paths(infos, source).await,
        };
        self.explained(r).await
    }

    /// Builds `drv` with the daemon's limits; output goes to `log` as it arrives.
    pub async fn build(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        options: &BuildOptions,
        log: &mut BuildLog,
    ) -> Result<BuildResult, RemoteError> {
        let r = match &mut self.client {
            Client::Serve(c) => c.build_derivation(drv_path, drv, options).await,
            Client::Daemon(c) => {
                let set = client_options(options);
                match c.set_options(&set).await {
                    Ok(()) => c.build_derivation(drv_path, drv, log).await,
                    Err(e) => Err(e),
                }
            }
        };
        self.explained(r).await
    }

    /// Whether the builder's nix-daemon trusts us: `None` for `ssh://` and for daemons too old
    /// to say (worker protocol < 1.35).
    pub fn trust(&self) -> Option<Trust> {
        match &self.client {
            Client::Serve(_) => None,
            Client::Daemon(c) => c.server_info().trust,
        }
    }

    /// Builds `drv_path`'s `outputs` from the derivation in the remote's own store
    /// (BuildPathsWithResults), with the same options as [`Remote::build`]: the way to build on
    /// a daemon that does not trust us, which builds whatever inputs it lacks itself. Only
    /// `ssh-ng://` has it.
    pub async fn build_from_store(
        &mut self,
        drv_path: &StorePath,
        outputs: BTreeSet<String>,
        options: &BuildOptions,
        log: &mut BuildLog,
    ) -> Result<BuildResult, RemoteError> {
        let r = match &mut self.client {
            Client::Serve(_) => Err(RemoteError::Protocol {
                peer: self.uri.clone(),
                message: "building a derivation from the remote store needs ssh-ng://".into(),
            }),
            Client::Daemon(c) => {
                let wanted = DerivedPath::Built {
                    drv_path: drv_path.clone(),
                    outputs: OutputsSpec::Names(outputs),
                };
                let set = client_options(options);
                match c.set_options(&set).await {
                    Ok(()) => c
                        .build_paths_with_results(std::slice::from_ref(&wanted), drv_path, log)
                        .await
                        .and_then(|results| one_result(results, &wanted, c.peer())),
                    Err(e) => Err(e),
                }
            }
        };
        self.explained(r).await
    }

    /// Path infos of the valid ones among `paths`.
    pub async fn query_path_infos(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<PathInfo>, RemoteError> {
        let r = match &mut self.client {
            Client::Serve(c) => c.query_path_infos(paths).await,
            Client::Daemon(c) => c
                .query_path_infos(paths)
                .await
                .map(|v| v.into_iter().flatten().collect()),
        };
        self.explained(r).await
    }

    /// Streams the NAR of `info.path` (exactly `info.nar_size` bytes) into `sink`.
    pub async fn nar<W: NarSink>(
        &mut self,
        info: &PathInfo,
        sink: &mut W,
    ) -> Result<(), RemoteError> {
        let r = async {
            match &mut self.client {
                Client::Serve(c) => {
                    c.start_dump(&info.path).await?;
                    copy_nar(c.nar_reader(), info.nar_size, sink).await
                }
                Client::Daemon(c) => {
                    c.start_nar_from_path(&info.path).await?;
                    copy_nar(c.nar_reader(), info.nar_size, sink).await
                }
            }
        }
        .await;
        self.explained(r).await
    }
}

/// The build's timeouts and log limit as SetOptions: Nix's own ssh-ng store forwards none of
/// these; we do.
fn client_options(options: &BuildOptions) -> ClientOptions {
    let mut overrides = Vec::new();
    if options.build_timeout > 0 {
        overrides.push(("timeout".into(), options.build_timeout.to_string()));
    }
    if options.max_log_size > 0 {
        overrides.push((
            "max-build-log-size".into(),
            options.max_log_size.to_string(),
        ));
    }
    ClientOptions {
        keep_failed: options.keep_failed,
        verbosity: 0,
        max_build_jobs: 1,
        max_silent_time: options.max_silent_time,
        verbose_build: false,
        build_cores: 0,
        use_substitutes: false,
        overrides,
        ..Default::default()
    }
}

/// The result for `wanted` from a BuildPathsWithResults reply that must hold exactly that one.
fn one_result(
    results: Vec<(DerivedPath, BuildResult)>,
    wanted: &DerivedPath,
    peer: &str,
) -> Result<BuildResult, RemoteError> {
    let n = results.len();
    let mut it = results.into_iter();
    match (it.next(), n) {
        (Some((_, result)), 1) => Ok(result),
        _ => Err(RemoteError::Protocol {
            peer: peer.to_owned(),
            message: format!(
                "asked to build {}, the daemon answered with {n} results",
                wanted.to_worker_string()
            ),
        }),
    }
}

/// Moves exactly `len` raw bytes from `reader` into `sink`, in bounded chunks.
pub async fn copy_nar<R, W>(
    reader: &mut WireReader<R>,
    mut len: u64,
    sink: &mut W,
) -> Result<(), RemoteError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: NarSink,
{
    while len > 0 {
        let max = len.min(1 << 20) as usize;
        len -= sink.write_from(reader, max).await? as u64;
    }
    Ok(())
}

/// Turns "the peer closed the connection" into an error that quotes what it printed last.
async fn explain(e: RemoteError, tail: &Arc<Mutex<Vec<u8>>>) -> RemoteError {
    let RemoteError::Wire(WireError::UnexpectedEof { peer, what }) = e else {
        return e;
    };
    // Let the stderr pump catch up with the remote's last words.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let stderr = tail
        .lock()
        .map(|t| String::from_utf8_lossy(&t).into_owned())
        .unwrap_or_default();
    RemoteError::Closed {
        peer,
        what,
        stderr: hook_protocol::log::strip_ansi(&stderr),
    }
}

async fn pump_stderr(mut stderr: ExecOutput, log: Option<BuildLog>, tail: Arc<Mutex<Vec<u8>>>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Ok(mut t) = tail.lock() {
            t.extend_from_slice(&buf[..n]);
            if t.len() > STDERR_TAIL {
                let cut = t.len() - STDERR_TAIL;
                t.drain(..cut);
            }
        }
        if let Some(log) = &log {
            log.raw(&buf[..n]).await;
        }
    }
}
