//! The supervisor's runtime: the state directory, the lock, the socket, one task per client
//! connection, one task per builder instance, the wake-up timer, signals, config-file reads,
//! and the boot-history file. Every decision is taken by [`Machine`]; this module turns each
//! input into the machine's events (a signal into [`Event::Shutdown`] or
//! [`Event::ReloadSignal`], a connect or a request into one `stat` of the config file,
//! [`Event::ConfigFile`], then the event itself), hands them over with one reading of the
//! clock, and carries the actions out: replies, boots, stops, the timer, the history, log lines,
//! config reloads (whose answer it feeds back at once), the exit and the kill.
//!
//! It must never decide anything about builders itself (no state outside the machine except the
//! handles it needs to carry actions out, and the config file's identity at its last read),
//! never block the event loop on a slow client or a slow backend (each gets its own task), and
//! never leave an instance behind: instances are owned by their tasks, and a forced shutdown
//! aborts those tasks, which drops (and so kills) them.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, error, info, warn};

use super::backend::{Backend, InstanceContext};
use super::paths::{
    BUILDERS_DIR, HISTORY_NAME, LOCK_NAME, SOCKET_FRESH_NAME, builder_dir, socket_path,
};
use super::proto::{self, Request, Response};
use super::state::{
    Action, BootHistory, BuilderConfig, ConfigFileSeen, ConnId, Event, Generation, LogLevel,
    Machine, ReloadWhy, Settings,
};
use super::warm::{WarmReport, WarmRuntime};
use crate::config::{Builder, Config, ConfigPath, ConfigSource};
use crate::os::ensure_private_dir;

/// Overrides [`DEFAULT_EXIT_AFTER_IDLE`] (milliseconds), e.g. for tests.
pub const LINGER_ENV: &str = "NIX_LAZY_BUILDER_SUPERVISOR_LINGER_MS";
/// How long an auto-started supervisor stays with every builder down and no client.
pub const DEFAULT_EXIT_AFTER_IDLE: Duration = Duration::from_secs(60);
/// The longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Extra time given to a backend's readiness check beyond the boot deadline it was handed.
const READY_GRACE: Duration = Duration::from_secs(5);
/// How long a supervisor that finds the lock taken keeps trying before it gives up (an exiting
/// supervisor releases it soon; a serving one answers on the socket).
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// How long to wait for a reply already on its way when a client closed its side.
const HALF_CLOSE_GRACE: Duration = Duration::from_millis(100);

/// Why the supervisor cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot create the state directory '{}': {source}", path.display())]
    StateDir { path: PathBuf, source: io::Error },
    #[error("cannot take the supervisor lock '{}': {source}", path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("cannot listen on '{}': {source}", path.display())]
    Listen { path: PathBuf, source: io::Error },
    #[error("another supervisor holds '{}' and does not answer on '{}'", lock.display(), socket.display())]
    LockHeld { lock: PathBuf, socket: PathBuf },
    #[error("cannot start the async runtime: {0}")]
    Runtime(io::Error),
}

/// How to run.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub state_dir: PathBuf,
    /// Started by a hook: exit after [`ServeOptions::exit_after_idle`] with nothing to do, and
    /// give up quickly when another supervisor holds the lock.
    pub auto: bool,
    pub exit_after_idle: Duration,
    /// The config file to reload (SIGHUP, or when it changed); `None`: never reload.
    pub config_path: Option<ConfigPath>,
}

impl ServeOptions {
    /// Options for `config`, with the idle exit from [`LINGER_ENV`] or the default.
    pub fn new(config: &Config, auto: bool) -> Self {
        let exit_after_idle = std::env::var(LINGER_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_EXIT_AFTER_IDLE);
        ServeOptions {
            state_dir: config.supervisor.state_dir.clone(),
            auto,
            exit_after_idle,
            // The file it was read from, which must stay readable (a vanished file keeps the
            // running config); `supervise` passes how the path was chosen instead.
            config_path: config.path.clone().map(|path| ConfigPath {
                path,
                source: ConfigSource::Cli,
            }),
        }
    }
}

/// The result of [`bind`].
pub enum Bound {
    /// We hold the lock and listen.
    Serving(Box<Server>),
    /// Another supervisor answers on the socket.
    AnotherIsServing,
}

/// A supervisor that holds the lock and listens; [`Server::serve`] runs it.
pub struct Server {
    socket_path: PathBuf,
    state_dir: PathBuf,
    // Held for the whole life of the server (flock is released when it is closed).
    _lock: File,
    listener: UnixListener,
    builders: Vec<Arc<Builder>>,
    machine: Machine,
    watch: Option<ConfigWatch>,
}

/// What one `stat` says about a file: any change means it was rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    /// To the nanosecond; also tells whether the file has settled.
    mtime: SystemTime,
    dev: u64,
    ino: u64,
    size: u64,
    ctime_ns: i128,
}

/// The file's identity, or `None` when it cannot be stat'ed (missing).
fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileId {
        mtime: m.modified().unwrap_or(UNIX_EPOCH),
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

/// The config file, and its identity when it was last read.
struct ConfigWatch {
    path: ConfigPath,
    /// Its identity just before the last read (successful or not).
    seen: Option<FileId>,
}

impl ConfigWatch {
    fn new(path: ConfigPath) -> Self {
        // Taken after the supervisor read the file: an edit in between is caught by the
        // unknown-builder trigger or the next edit.
        ConfigWatch {
            seen: file_id(&path.path),
            path,
        }
    }

    /// One `stat`: what the machine needs to decide whether to read the file again.
    fn look(&self) -> ConfigFileSeen {
        let now = file_id(&self.path.path);
        let changed = now != self.seen;
        // The wall clock dates the modification time; only a changed file needs it.
        let age = now
            .filter(|_| changed)
            .and_then(|id| SystemTime::now().duration_since(id.mtime).ok());
        ConfigFileSeen { changed, age }
    }
}

/// Connect and read the hello: is a supervisor serving on `socket`?
async fn answers(socket: &Path) -> bool {
    let probe = async {
        let stream = UnixStream::connect(socket).await.ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await.ok()?;
        match serde_json::from_str::<Response>(&line) {
            Ok(Response::Hello { .. }) => Some(()),
            _ => None,
        }
    };
    tokio::time::timeout(Duration::from_secs(1), probe)
        .await
        .ok()
        .flatten()
        .is_some()
}

fn try_lock(file: &File) -> io::Result<bool> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Prepare the state directory, take the lock and listen.
///
/// When another supervisor holds the lock, an auto-started one returns
/// [`Bound::AnotherIsServing`] as soon as that one answers on the socket, and gives up with
/// [`SuperviseError::LockHeld`] after [`LOCK_WAIT`] if it never does. A service-managed one
/// (not `auto`) waits for the lock however long it takes: it takes over from an auto-started
/// supervisor once that one exits.
pub async fn bind(config: &Config, opts: &ServeOptions) -> Result<Bound, SuperviseError> {
    let state_dir = opts.state_dir.clone();
    let dir_err = |path: &Path| {
        let path = path.to_owned();
        move |source| SuperviseError::StateDir { path, source }
    };
    ensure_private_dir(&state_dir).map_err(dir_err(&state_dir))?;
    let lazy = lazy_builders(config);
    let builders_dir = state_dir.join(BUILDERS_DIR);
    ensure_private_dir(&builders_dir).map_err(dir_err(&builders_dir))?;
    for b in &lazy {
        let dir = builders_dir.join(&b.name);
        ensure_private_dir(&dir).map_err(dir_err(&dir))?;
    }

    let lock_path = state_dir.join(LOCK_NAME);
    let socket = socket_path(&state_dir);
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|source| SuperviseError::Lock {
            path: lock_path.clone(),
            source,
        })?;
    let lock_err = |source| SuperviseError::Lock {
        path: lock_path.clone(),
        source,
    };
    let started = Instant::now();
    let mut said = false;
    while !try_lock(&lock).map_err(lock_err)? {
        if opts.auto && answers(&socket).await {
            debug!("another supervisor is serving on '{}'", socket.display());
            return Ok(Bound::AnotherIsServing);
        }
        if opts.auto && started.elapsed() >= LOCK_WAIT {
            return Err(SuperviseError::LockHeld {
                lock: lock_path,
                socket,
            });
        }
        if !said {
            info!(
                "another supervisor holds '{}'; waiting for it",
                lock_path.display()
            );
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // We hold the lock: a socket file left behind is stale.
    match std::fs::remove_file(&socket) {
        Ok(()) => debug!("removed a stale socket '{}'", socket.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SuperviseError::Listen {
                path: socket,
                source,
            });
        }
    }
    let listen_err = |source| SuperviseError::Listen {
        path: socket.clone(),
        source,
    };
    // Bound under another name and renamed once it is 0600, so that nobody ever finds the
    // socket with the umask's mode (rename replaces the name atomically).
    let fresh = state_dir.join(SOCKET_FRESH_NAME);
    match std::fs::remove_file(&fresh) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    let listener = UnixListener::bind(&fresh).map_err(listen_err)?;
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&fresh, &socket))
        .map_err(listen_err)?;

    let history = load_history(&state_dir.join(HISTORY_NAME));
    let settings = Settings {
        exit_after_idle: opts.auto.then_some(opts.exit_after_idle),
        reloads: opts.config_path.is_some(),
        config_file: opts.config_path.as_ref().map(|c| c.path.clone()),
    };
    let machine = Machine::new(
        builder_configs(&lazy),
        settings,
        &history,
        Instant::now(),
        SystemTime::now(),
    );
    for w in machine.config_warnings() {
        warn!("{w}");
    }
    info!(
        "supervisor {} serving {} lazy builder(s) on '{}'{}",
        std::process::id(),
        lazy.len(),
        socket.display(),
        if opts.auto {
            format!(
                " (auto-started: exits after {} with nothing to do)",
                humantime::format_duration(opts.exit_after_idle)
            )
        } else {
            String::new()
        }
    );
    Ok(Bound::Serving(Box::new(Server {
        socket_path: socket,
        state_dir,
        _lock: lock,
        listener,
        builders: lazy,
        machine,
        watch: opts.config_path.clone().map(ConfigWatch::new),
    })))
}

/// The lazy builders of `config`, in file order.
fn lazy_builders(config: &Config) -> Vec<Arc<Builder>> {
    config
        .builders
        .iter()
        .filter(|b| b.is_lazy())
        .map(|b| Arc::new(b.clone()))
        .collect()
}

/// The machine's view of `lazy`.
fn builder_configs(lazy: &[Arc<Builder>]) -> Vec<BuilderConfig> {
    lazy.iter()
        .filter_map(|b| BuilderConfig::from_builder(b))
        .collect()
}

fn load_history(path: &Path) -> BootHistory {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(h) => h,
            Err(e) => {
                debug!("ignoring the boot history '{}': {e}", path.display());
                BootHistory::default()
            }
        },
        Err(e) => {
            debug!("no boot history read from '{}': {e}", path.display());
            BootHistory::default()
        }
    }
}

fn save_history(path: &Path, history: &BootHistory) {
    let tmp = path.with_extension("json.tmp");
    let result = serde_json::to_vec_pretty(history)
        .map_err(io::Error::other)
        .and_then(|bytes| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        });
    if let Err(e) = result {
        warn!("cannot save the boot history '{}': {e}", path.display());
    }
}

/// The target of the machine's log lines: its own module, so that a filter such as
/// `NIX_LAZY_BUILDER_LOG=nix_lazy_builder::supervisor::state=debug` selects them.
const MACHINE_LOG: &str = "nix_lazy_builder::supervisor::state";

/// Write one of the machine's log lines ([`Action::Log`]).
fn log_line(level: LogLevel, message: &str) {
    match level {
        LogLevel::Debug => debug!(target: MACHINE_LOG, "{message}"),
        LogLevel::Info => info!(target: MACHINE_LOG, "{message}"),
        LogLevel::Warn => warn!(target: MACHINE_LOG, "{message}"),
        LogLevel::Error => error!(target: MACHINE_LOG, "{message}"),
    }
}

/// One answer for a client: a line, and for a warm session the descriptors that go with it.
struct Outgoing {
    response: Response,
    fds: Vec<std::os::fd::OwnedFd>,
}

impl From<Response> for Outgoing {
    fn from(response: Response) -> Self {
        Outgoing {
            response,
            fds: Vec::new(),
        }
    }
}

/// One instance task's handle.
struct InstanceHandle {
    generation: Generation,
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<()>,
}

enum Input {
    Event(Event),
    Warm(WarmReport),
    Accepted(UnixStream),
    Signal,
    SignalsClosed,
    AcceptFailed(io::Error),
    Reaped,
    Reload,
    ReloadsClosed,
}

impl Server {
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The config file's [`Event::ConfigFile`], fed before a connect or a request.
    fn look_at_config(&self) -> Option<Event> {
        self.watch.as_ref().map(|w| Event::ConfigFile(w.look()))
    }

    /// Carry out [`Action::ReloadConfig`]: read the file, and say what came of it.
    fn load_config(&mut self, why: ReloadWhy) -> Event {
        let Some(w) = self.watch.as_mut() else {
            // The machine asks only when there is a file (`Settings::reloads`).
            return Event::ReconfigureFailed("no configuration file to read again".to_owned());
        };
        w.seen = file_id(&w.path.path);
        // Timed for the log line only; nothing is decided by it.
        let t0 = Instant::now();
        let config = match Config::load(&w.path) {
            Ok(c) => c,
            Err(e) => return Event::ReconfigureFailed(e.to_string()),
        };
        let path = w.path.path.clone();
        if config.supervisor.state_dir != self.state_dir {
            warn!(
                "config reload: state-dir changed to '{}'; this supervisor keeps '{}' until it is restarted",
                config.supervisor.state_dir.display(),
                self.state_dir.display()
            );
        }
        let lazy = lazy_builders(&config);
        for b in &lazy {
            let dir = builder_dir(&self.state_dir, &b.name);
            if let Err(e) = ensure_private_dir(&dir) {
                // Its boot will say so again; the rest of the config still applies.
                warn!("config reload: cannot create '{}': {e}", dir.display());
            }
        }
        let cfgs = builder_configs(&lazy);
        info!(
            "config reloaded from '{}' ({}) in {:.1} ms: {} lazy builder(s): {}",
            path.display(),
            why.text(),
            t0.elapsed().as_secs_f64() * 1000.0,
            lazy.len(),
            lazy.iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        // Running instances keep the `Arc<Builder>` they were started with; new boots use these.
        self.builders = lazy;
        Event::Reconfigure(cfgs)
    }

    /// Serve until the machine says exit. Each message on `signals` is a SIGTERM/SIGINT
    /// ([`Event::Shutdown`]: the first stops every instance gracefully; a second one, or
    /// [`SHUTDOWN_BOUND`](super::state::SHUTDOWN_BOUND) without every instance gone, kills
    /// them). The config is reloaded when it changed or a request names an unknown builder
    /// (`state/reconfigure.rs` says when), never on a signal.
    pub async fn serve(
        self,
        backend: Arc<dyn Backend>,
        signals: mpsc::UnboundedReceiver<()>,
    ) -> Result<(), SuperviseError> {
        let (_keep, reloads) = mpsc::unbounded_channel();
        self.serve_with_reloads(backend, signals, reloads).await
    }

    /// [`Server::serve`], and each message on `reloads` (SIGHUP) reloads the config.
    ///
    /// Each input (a signal, a connection, a client's line, an instance's report, the timer)
    /// becomes the machine's events, which are handled with one reading of the clock; then
    /// their actions are carried out, a config reload feeding its answer back first.
    pub async fn serve_with_reloads(
        mut self,
        backend: Arc<dyn Backend>,
        mut signals: mpsc::UnboundedReceiver<()>,
        mut reloads: mpsc::UnboundedReceiver<()>,
    ) -> Result<(), SuperviseError> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        let (warm_tx, mut warm_rx) = mpsc::unbounded_channel::<WarmReport>();
        let mut warm = WarmRuntime::new(warm_tx);
        let mut conns: HashMap<ConnId, mpsc::UnboundedSender<Outgoing>> = HashMap::new();
        let mut conn_tasks: JoinSet<()> = JoinSet::new();
        let mut instances: HashMap<String, InstanceHandle> = HashMap::new();
        let mut timer: Option<Instant> = None;
        let mut next_conn: ConnId = 1;
        let mut signals_open = true;
        let mut reloads_open = true;
        let history_path = self.state_dir.join(HISTORY_NAME);

        let forced = 'serve: loop {
            let wake = async {
                match timer {
                    Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                    None => std::future::pending().await,
                }
            };
            let input = tokio::select! {
                biased;
                s = signals.recv(), if signals_open => match s {
                    Some(()) => Input::Signal,
                    None => Input::SignalsClosed,
                },
                r = reloads.recv(), if reloads_open => match r {
                    Some(()) => Input::Reload,
                    None => Input::ReloadsClosed,
                },
                Some(ev) = rx.recv() => Input::Event(ev),
                Some(w) = warm_rx.recv() => Input::Warm(w),
                // Before accepts, so that a stream of new clients cannot starve the timers.
                () = wake => Input::Event(Event::Tick),
                // Finished connection tasks are collected so the set does not grow.
                Some(_) = conn_tasks.join_next(), if !conn_tasks.is_empty() => Input::Reaped,
                r = self.listener.accept() => match r {
                    Ok((stream, _)) => Input::Accepted(stream),
                    Err(e) => Input::AcceptFailed(e),
                },
            };

            // The input as the machine's events, with a look at the config file where a client
            // is involved (before its request, so that the request sees a changed config).
            let mut events: VecDeque<Event> = VecDeque::new();
            let mut accepted = None;
            match input {
                Input::Signal => events.push_back(Event::Shutdown),
                Input::Reload => events.push_back(Event::ReloadSignal),
                Input::SignalsClosed => {
                    signals_open = false;
                    continue;
                }
                Input::ReloadsClosed => {
                    reloads_open = false;
                    continue;
                }
                Input::Reaped => continue,
                Input::Warm(WarmReport::Linked { pool, result }) => {
                    events.push_back(warm.linked(pool, result));
                }
                Input::Warm(WarmReport::Event(e)) => events.push_back(e),
                Input::AcceptFailed(e) => {
                    // EMFILE and friends: do not spin.
                    error!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Input::Accepted(stream) => {
                    let id = next_conn;
                    next_conn += 1;
                    accepted = Some((id, stream));
                    // Counted first: from then on the machine does not exit under the client.
                    events.push_back(Event::ClientConnected(id));
                    events.extend(self.look_at_config());
                }
                Input::Event(event) => {
                    match &event {
                        Event::Request(conn, req) => {
                            debug!("client {conn}: {req:?}");
                            events.extend(self.look_at_config());
                        }
                        // An instance's last event: its task is done with it.
                        Event::BootFailed {
                            builder,
                            generation,
                            ..
                        }
                        | Event::InstanceExited {
                            builder,
                            generation,
                            ..
                        }
                        | Event::StopFinished {
                            builder,
                            generation,
                            ..
                        } if instances
                            .get(builder)
                            .is_some_and(|h| h.generation == *generation) =>
                        {
                            instances.remove(builder);
                        }
                        Event::ClientGone(conn) => {
                            conns.remove(conn);
                        }
                        _ => {}
                    }
                    events.push_back(event);
                }
            }

            // One clock reading for everything this input causes.
            let now = Instant::now();
            while let Some(event) = events.pop_front() {
                for action in self.machine.handle(event, now) {
                    match action {
                        Action::Reply { conn, response } => {
                            if let Some(c) = conns.get(&conn) {
                                let _ = c.send(response.into());
                            }
                        }
                        Action::WarmConnect { pool, spec } => warm.connect(pool, spec),
                        Action::WarmOpen {
                            pool,
                            session,
                            spec,
                        } => warm.open(pool, session, spec),
                        Action::HandOut {
                            conn,
                            pool: _,
                            session,
                            handshake,
                        } => {
                            let out = match warm.hand_out(session) {
                                Ok(fds) => Outgoing {
                                    response: Response::Session { handshake },
                                    fds: fds.into(),
                                },
                                Err(e) => Response::NoSession {
                                    reason: format!("cannot hand out a warm session: {e}"),
                                }
                                .into(),
                            };
                            if let Some(c) = conns.get(&conn) {
                                let _ = c.send(out);
                            }
                        }
                        Action::WarmClose { pool } => warm.close(pool),
                        Action::StartBoot {
                            builder,
                            generation,
                        } => {
                            let Some(b) = self.builders.iter().find(|b| b.name == builder) else {
                                continue;
                            };
                            let (stop_tx, stop_rx) = oneshot::channel();
                            let ctx = InstanceContext {
                                builder: builder.clone(),
                                dir: builder_dir(&self.state_dir, &builder),
                            };
                            let join = tokio::spawn(instance_task(
                                backend.clone(),
                                b.clone(),
                                ctx,
                                generation,
                                stop_rx,
                                tx.clone(),
                                warm.handover(),
                            ));
                            if let Some(old) = instances.insert(
                                builder.clone(),
                                InstanceHandle {
                                    generation,
                                    stop: Some(stop_tx),
                                    join,
                                },
                            ) {
                                // The machine never starts a second instance; if it did, the
                                // old one must not survive unnoticed.
                                error!("builder '{builder}' had a running instance; killing it");
                                old.join.abort();
                            }
                        }
                        Action::Stop {
                            builder,
                            generation,
                        } => {
                            if let Some(h) = instances.get_mut(&builder)
                                && h.generation == generation
                                && let Some(stop) = h.stop.take()
                            {
                                let _ = stop.send(());
                            }
                        }
                        Action::SetTimer(t) => timer = t,
                        Action::SaveHistory => save_history(&history_path, &self.machine.history()),
                        // Its answer goes before anything else this input brought.
                        Action::ReloadConfig { why } => events.push_front(self.load_config(why)),
                        Action::Log { level, message } => log_line(level, &message),
                        Action::KillAll => break 'serve true,
                        Action::Exit => break 'serve false,
                    }
                }
            }
            if let Some((id, stream)) = accepted {
                let (reply_tx, reply_rx) = mpsc::unbounded_channel();
                conns.insert(id, reply_tx);
                conn_tasks.spawn(connection(stream, id, tx.clone(), reply_rx));
            }
        };

        // Make new clients look elsewhere before anything else: unlink while we hold the lock.
        if let Err(e) = std::fs::remove_file(&self.socket_path)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!("cannot remove '{}': {e}", self.socket_path.display());
        }
        drop(self.listener);
        conn_tasks.shutdown().await;
        if forced {
            for (_, h) in instances.drain() {
                h.join.abort();
                // Dropping the instance (as the aborted task unwinds) kills its process group.
                let _ = h.join.await;
            }
        }
        info!("supervisor {} exits", std::process::id());
        Ok(())
    }
}

/// Read one line of at most [`MAX_LINE`] bytes. `Ok(None)` at a clean end of input.
async fn read_request_line(
    rd: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> io::Result<Option<Result<Vec<u8>, String>>> {
    let mut line = Vec::new();
    let n = (&mut *rd)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_LINE {
        return Ok(Some(Err(format!(
            "request longer than {MAX_LINE} bytes; closing the connection"
        ))));
    }
    Ok(Some(Ok(line)))
}

async fn write_response(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> io::Result<()> {
    write_outgoing(wr, &Outgoing::from(response.clone())).await
}

/// Writes one answer, with its descriptors attached to the line (they are closed here once
/// sent: the client has its own copies).
async fn write_outgoing(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    out: &Outgoing,
) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(&out.response).map_err(io::Error::other)?;
    bytes.push(b'\n');
    if out.fds.is_empty() {
        return wr.write_all(&bytes).await;
    }
    use std::os::fd::AsFd;
    let fds: Vec<_> = out.fds.iter().map(|f| f.as_fd()).collect();
    super::fds::send_line_with_fds(wr, &bytes, &fds).await
}

/// One client connection: hello, then request → reply, in order. Ends with
/// [`Event::ClientGone`], which releases its leases.
async fn connection(
    stream: UnixStream,
    conn: ConnId,
    events: mpsc::UnboundedSender<Event>,
    mut replies: mpsc::UnboundedReceiver<Outgoing>,
) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let hello = Response::Hello {
        version: proto::PROTOCOL_VERSION,
        pid: std::process::id(),
    };
    if write_response(&mut wr, &hello).await.is_ok() {
        serve_connection(&mut rd, &mut wr, conn, &events, &mut replies).await;
    }
    let _ = events.send(Event::ClientGone(conn));
}

async fn serve_connection(
    rd: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    conn: ConnId,
    events: &mpsc::UnboundedSender<Event>,
    replies: &mut mpsc::UnboundedReceiver<Outgoing>,
) {
    loop {
        let line = match read_request_line(rd).await {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(message))) => {
                let _ = write_response(wr, &Response::Error { message }).await;
                return;
            }
            Ok(None) => return,
            Err(e) => {
                debug!("client {conn}: read error: {e}");
                return;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let req = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => req,
            Err(e) => {
                let shown = String::from_utf8_lossy(&line);
                let shown = shown.trim();
                let shown: String = shown.chars().take(200).collect();
                debug!("client {conn}: malformed request {shown:?}: {e}");
                let message = format!("malformed request ({e}): {shown}");
                if write_response(wr, &Response::Error { message })
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        if events.send(Event::Request(conn, req)).is_err() {
            return;
        }
        // Wait for the answer, but notice a client that goes away meanwhile (its leases must be
        // released now, not when a wait-ready deadline passes).
        let response = loop {
            if !rd.buffer().is_empty() {
                // The next request is already here; it is read after this answer.
                break replies.recv().await;
            }
            tokio::select! {
                r = replies.recv() => break r,
                filled = rd.fill_buf() => match filled {
                    Ok([]) | Err(_) => {
                        // Closed (or half-closed): an answer already on its way still goes out.
                        if let Ok(Some(r)) = tokio::time::timeout(HALF_CLOSE_GRACE, replies.recv()).await {
                            let _ = write_outgoing(wr, &r).await;
                        }
                        return;
                    }
                    Ok(_) => continue,
                },
            }
        };
        let Some(response) = response else { return };
        if write_outgoing(wr, &response).await.is_err() {
            return;
        }
    }
}

/// How a hook will ask for `builder`'s warm sessions once it is up at `port` (`None`:
/// keep-warm is off, or the spec cannot be made; then the hook's own connection says why).
fn warm_spec(builder: &Builder, port: u16) -> Option<super::proto::SessionSpec> {
    if !builder.warm() {
        return None;
    }
    let mut b = builder.clone();
    b.uri.port = Some(port);
    let spec = crate::ssh::SshTarget::for_builder(&b)
        .map_err(|e| e.to_string())
        .and_then(|t| crate::store::warm::session_spec(&b, &t).map_err(|e| e.to_string()));
    match spec {
        Ok(spec) => Some(spec),
        Err(e) => {
            debug!(
                "builder '{}': no warm session at readiness: {e}",
                builder.name
            );
            None
        }
    }
}

/// Owns one instance from start to end and reports exactly one of [`Event::BootFailed`],
/// [`Event::InstanceExited`] or [`Event::StopFinished`] last (after a [`Event::BootSucceeded`]
/// if it got that far). A message on (or the loss of) `stop` stops it.
async fn instance_task(
    backend: Arc<dyn Backend>,
    builder: Arc<Builder>,
    ctx: InstanceContext,
    generation: Generation,
    mut stop: oneshot::Receiver<()>,
    events: mpsc::UnboundedSender<Event>,
    handover: super::warm::Handover,
) {
    let name = builder.name.clone();
    let send = |e: Event| {
        let _ = events.send(e);
    };
    let boot_timeout = builder
        .lazy
        .as_ref()
        .map_or(crate::config::DEFAULT_BOOT_TIMEOUT, |l| l.boot_timeout);
    let started = Instant::now();
    let deadline = started + boot_timeout;
    let tokio_deadline = tokio::time::Instant::from_std(deadline);
    let timeout_text = humantime::format_duration(boot_timeout);

    // The plan (restore or cold boot) first, so that the machine expects the right time.
    let plan_and_start = async {
        if let Some((kind, note)) = backend.plan(&builder, &ctx).await {
            send(Event::BootPlanned {
                builder: name.clone(),
                generation,
                kind,
                note,
            });
        }
        backend.start(&builder, &ctx).await
    };
    let start = tokio::select! {
        r = tokio::time::timeout_at(tokio_deadline, plan_and_start) => r,
        _ = &mut stop => {
            // Dropping the start future drops whatever it had started.
            send(Event::StopFinished {
                builder: name,
                generation,
                report: "boot cancelled while starting".to_owned(),
            });
            return;
        }
    };
    let mut instance = match start {
        Ok(Ok(i)) => i,
        Ok(Err(cause)) => {
            send(Event::BootFailed {
                builder: name,
                generation,
                cause,
            });
            return;
        }
        Err(_) => {
            send(Event::BootFailed {
                builder: name,
                generation,
                cause: format!(
                    "boot timed out after {timeout_text} while starting{}",
                    backend.start_timed_out(&builder, &ctx)
                ),
            });
            return;
        }
    };
    let port = instance
        .ssh_port()
        .unwrap_or_else(|| builder.uri.port_or_default());
    info!(
        "builder '{name}': instance started (pid {}), waiting for sshd on port {port}",
        instance
            .pid()
            .map_or_else(|| "?".to_owned(), |p| p.to_string())
    );

    let ready = {
        let wait = tokio::time::timeout_at(
            tokio_deadline + READY_GRACE,
            instance.wait_ready(&builder, port, deadline),
        );
        tokio::select! {
            r = wait => Some(r),
            _ = &mut stop => None,
        }
    };
    let cause = match ready {
        None => {
            let report = instance.stop(false).await;
            send(Event::StopFinished {
                builder: name,
                generation,
                report: format!("boot cancelled: {report}"),
            });
            return;
        }
        Some(Ok(Ok(nix_version))) => {
            let warm = warm_spec(&builder, port);
            // The readiness check's connection, for the first warm session.
            match (&warm, instance.take_link()) {
                (Some(_), Some(link)) => {
                    if let Ok(mut offered) = handover.lock() {
                        offered.insert(name.clone(), link);
                    }
                }
                (None, Some((_, link))) => {
                    tokio::spawn(link.close());
                }
                (_, None) => {}
            }
            send(Event::BootSucceeded {
                builder: name.clone(),
                generation,
                port,
                nix_version,
                took: started.elapsed(),
                kind: instance.boot_kind(),
                restorable: instance.restorable(),
                note: instance.snapshot_note(),
                warm,
            });
            None
        }
        Some(Ok(Err(cause))) => Some(cause),
        Some(Err(_)) => Some(format!(
            "boot timed out after {timeout_text}: the builder did not become ready{}",
            backend.start_timed_out(&builder, &ctx)
        )),
    };
    if let Some(cause) = cause {
        let report = instance.stop(false).await;
        debug!("builder '{name}': failed boot cleaned up: {report}");
        send(Event::BootFailed {
            builder: name,
            generation,
            cause,
        });
        return;
    }

    let exited = tokio::select! {
        report = instance.exited() => Some(report),
        _ = &mut stop => None,
    };
    match exited {
        Some(report) => send(Event::InstanceExited {
            builder: name,
            generation,
            report,
        }),
        None => {
            let report = instance.stop(true).await;
            send(Event::StopFinished {
                builder: name,
                generation,
                report,
            });
        }
    }
}
