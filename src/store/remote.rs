//! A builder's store, reached over SSH, behind one [`Remote`]: `nix-store --serve --write` for
//! `ssh://` (`serve`) or `nix-daemon --stdio` for `ssh-ng://` (`daemon`), on an SSH session of
//! its own ([`Remote::open`]) or a warm session the supervisor handed over ([`Remote::warm`]).
//!
//! Owns opening the remote program on an SSH session (the command line is built from quoted
//! words only), pumping the remote stderr (to the build log for `ssh://`, as Nix does, and
//! into a short tail that explains an unexpected EOF), and a warm session's fallback: when the
//! first request on it fails before the session delivered a single byte (it died while pooled,
//! the supervisor went away), that request goes to a direct connection instead, made by the
//! caller's [`Reconnect`]; the build never sees the difference. It never decides what to copy
//! or build: `transfer` does.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hook_protocol::StorePath;
use hook_protocol::build_result::BuildResult;
use hook_protocol::derivation::BasicDerivation;
use hook_protocol::path_info::PathInfo;
use hook_protocol::serve::BuildOptions;
use hook_protocol::worker::Trust;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::nar::{NarSink, NarSource};
use super::serve::ServeClient;
use super::warm::{self, Stdin, Stdout, WarmSession, WarmStreams};
use super::worker::WorkerClient;
use super::{BuildLog, RemoteError};
use crate::config::{Builder, Scheme};
use crate::ssh::{self, Exec};
use crate::wire_io::WireError;

/// How much of the remote's stderr we keep to explain a failure.
const STDERR_TAIL: usize = 4096;

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
    Serve(ServeClient<Stdout, Stdin>),
    Daemon(WorkerClient<Stdout, Stdin>),
}

/// Makes the direct connection that replaces a warm session which failed before its first
/// answer (see the module docs).
pub type Reconnect =
    Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = Result<Remote, RemoteError>> + Send>> + Send>;

/// A warm session that has not answered yet, and what replaces it if it never does.
struct Unproven {
    received: Arc<AtomicU64>,
    reconnect: Reconnect,
}

/// An open remote store.
pub struct Remote {
    client: Client,
    uri: String,
    tail: Arc<Mutex<Vec<u8>>>,
    /// The SSH connection, when the remote program runs on one of our own (`None` for a
    /// warm session: the supervisor holds that connection).
    _session: Option<ssh::Session>,
    /// Set on a warm session until its first request was answered.
    unproven: Option<Unproven>,
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
        spawn_stderr_pump(stderr, builder, log, &tail);
        let uri = builder.store_uri.clone();
        let (stdout, stdin) = (Stdout::Ssh(stdout), Stdin::Ssh(stdin));
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
            _session: Some(session),
            unproven: None,
        })
    }

    /// The remote store on a warm session the supervisor handed over, its handshake already
    /// done. Until the first request is answered, a failure of the session itself is not the
    /// build's: that request goes to the store `reconnect` connects to instead.
    pub fn warm(
        session: WarmSession,
        builder: &Builder,
        log: &BuildLog,
        reconnect: Reconnect,
    ) -> Result<Remote, RemoteError> {
        let uri = builder.store_uri.clone();
        let bad = |message: String| RemoteError::Protocol {
            peer: uri.clone(),
            message,
        };
        let (
            WarmStreams {
                stdout,
                stdin,
                stderr,
                received,
            },
            handshake,
        ) = session
            .streams()
            .map_err(|e| bad(format!("cannot use the warm session: {e}")))?;
        let client = match builder.uri.scheme {
            Scheme::Ssh => warm::resume_serve(stdout, stdin, &uri, &handshake).map(Client::Serve),
            Scheme::SshNg => {
                warm::resume_worker(stdout, stdin, &uri, &handshake).map(Client::Daemon)
            }
        }
        .ok_or_else(|| {
            bad(format!(
                "the warm session speaks the {:?} protocol, not this builder's",
                handshake.protocol()
            ))
        })?;
        let tail = Arc::new(Mutex::new(Vec::new()));
        spawn_stderr_pump(stderr, builder, log, &tail);
        Ok(Remote {
            client,
            uri,
            tail,
            _session: None,
            unproven: Some(Unproven {
                received,
                reconnect,
            }),
        })
    }

    /// Whether this store is on a warm session of the supervisor's.
    pub fn is_warm(&self) -> bool {
        self._session.is_none()
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// A protocol description for messages, e.g. `serve 2.7` / `worker 1.35 (Nix 2.34.8)`.
    pub fn describe(&self) -> String {
        match &self.client {
            Client::Serve(c) => format!("nix-store --serve protocol {}", c.server_version()),
            Client::Daemon(c) => c.describe(),
        }
    }

    async fn explained<T>(&self, r: Result<T, RemoteError>) -> Result<T, RemoteError> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => Err(explain(e, &self.tail).await),
        }
    }

    /// The first request of every build: on a warm session that fails before it answered
    /// anything, it is asked again on a direct connection (see the module docs).
    pub async fn query_valid_paths(
        &mut self,
        paths: &[StorePath],
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, RemoteError> {
        let r = self.query_valid_paths_here(paths, substitute).await;
        let Some(unproven) = self.unproven.take() else {
            return r;
        };
        match r {
            Err(e) if warm::broke(&e) && unproven.received.load(Ordering::Relaxed) == 0 => {
                tracing::debug!(
                    "the warm session to '{}' failed before its first answer ({e}): \
                     connecting directly",
                    self.uri
                );
                *self = (unproven.reconnect)().await?;
                self.query_valid_paths_here(paths, substitute).await
            }
            r => r,
        }
    }

    async fn query_valid_paths_here(
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
        self.unproven = None;
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
        self.unproven = None;
        let r = match &mut self.client {
            Client::Serve(c) => c.build_derivation(drv_path, drv, options).await,
            Client::Daemon(c) => c.build_with_options(drv_path, drv, options, log).await,
        };
        self.explained(r).await
    }

    /// Whether the builder's nix-daemon trusts us: `None` for `ssh://` and for daemons too old
    /// to say (worker protocol < 1.35).
    pub fn trust(&self) -> Option<Trust> {
        match &self.client {
            Client::Serve(_) => None,
            Client::Daemon(c) => c.trust(),
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
        self.unproven = None;
        let r = match &mut self.client {
            Client::Serve(_) => Err(RemoteError::Protocol {
                peer: self.uri.clone(),
                message: "building a derivation from the remote store needs ssh-ng://".into(),
            }),
            Client::Daemon(c) => c.build_from_store(drv_path, outputs, options, log).await,
        };
        self.explained(r).await
    }

    /// Path infos of the valid ones among `paths`.
    pub async fn query_path_infos(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<PathInfo>, RemoteError> {
        self.unproven = None;
        let r = match &mut self.client {
            Client::Serve(c) => c.query_path_infos(paths).await,
            Client::Daemon(c) => c.valid_path_infos(paths).await,
        };
        self.explained(r).await
    }

    /// Streams the NAR of `info.path` (exactly `info.nar_size` bytes) into `sink`.
    pub async fn nar<W: NarSink>(
        &mut self,
        info: &PathInfo,
        sink: &mut W,
    ) -> Result<(), RemoteError> {
        self.unproven = None;
        let r = match &mut self.client {
            Client::Serve(c) => c.nar(info, sink).await,
            Client::Daemon(c) => c.nar(info, sink).await,
        };
        self.explained(r).await
    }
}

/// Turns "the peer closed the connection" into an error that quotes what it printed last.
async fn explain(e: RemoteError, tail: &Arc<Mutex<Vec<u8>>>) -> RemoteError {
    if !matches!(e, RemoteError::Wire(WireError::UnexpectedEof { .. })) {
        return e;
    }
    // Let the stderr pump catch up with the remote's last words.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let stderr = tail
        .lock()
        .map(|t| String::from_utf8_lossy(&t).into_owned())
        .unwrap_or_default();
    with_stderr(e, &stderr)
}

/// "The peer closed the connection" with what it printed on stderr (any other error as it is).
pub(super) fn with_stderr(e: RemoteError, stderr: &str) -> RemoteError {
    match e {
        RemoteError::Wire(WireError::UnexpectedEof { peer, what }) => RemoteError::Closed {
            peer,
            what,
            stderr: hook_protocol::log::strip_ansi(stderr),
        },
        e => e,
    }
}

/// `ssh://`: the remote's stderr is the build log, as with Nix's hook. `ssh-ng://`: the log
/// arrives in-band; stderr only explains failures.
fn spawn_stderr_pump<R: AsyncRead + Unpin + Send + 'static>(
    stderr: R,
    builder: &Builder,
    log: &BuildLog,
    tail: &Arc<Mutex<Vec<u8>>>,
) {
    let to_log = (builder.uri.scheme == Scheme::Ssh).then(|| log.clone());
    tokio::spawn(pump_stderr(stderr, to_log, tail.clone()));
}

async fn pump_stderr<R: AsyncRead + Unpin>(
    mut stderr: R,
    log: Option<BuildLog>,
    tail: Arc<Mutex<Vec<u8>>>,
) {
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
