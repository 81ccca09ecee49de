//! The supervisor: one long-lived process per host that owns every lazy builder. `state/`
//! decides (a pure state machine), `server.rs` carries the decisions out (socket, lock, tasks,
//! timers, signals), `backend.rs` is its view of the boot backends, `client.rs` is what hooks and
//! the CLI call, `proto.rs` is the socket protocol between them and `paths.rs` the state
//! directory's layout they share.
//!
//! Nothing here prints to stdout; an auto-started supervisor's stderr is its log file.

pub mod backend;
pub mod client;
pub mod fds;
pub mod paths;
pub mod proto;
pub mod server;
pub mod state;
mod warm;

use std::process::ExitCode;
use std::sync::Arc;

use crate::config::{self, Config};

pub use client::{Client, ClientError, StartCommand, Verdict};
pub use server::{Bound, ServeOptions, Server, SuperviseError};

/// `nix-lazy-builder supervise [--config PATH] [--auto]`.
#[derive(Clone, Debug, Default)]
pub struct SuperviseArgs {
    /// The lazy-builder TOML, as `main` resolved it (`--config`, else
    /// `$NIX_LAZY_BUILDER_CONFIG`, else the default).
    pub config: config::ConfigPath,
    /// `--auto`: started by a hook; exits once idle.
    pub auto: bool,
    /// Nix's `build-users-group` as the daemon reads it (`main` looks it up): the group whose
    /// members may use the build socket. `None`: Nix builds as its own user (root) and no group
    /// is admitted.
    pub build_users_group: Option<String>,
}

/// The real boot backends.
pub fn default_backend() -> Arc<dyn backend::Backend> {
    Arc::new(backend::BootBackend)
}

/// Run the supervisor with the real boot backends; returns its exit status. An auto-started
/// supervisor first closes every descriptor it inherited beyond 0–2 (whoever started it).
pub fn main(args: SuperviseArgs) -> ExitCode {
    if args.auto {
        // SAFETY: this runs first thing, before anything in this process opened a descriptor:
        // every number above 2 is one it inherited (a hook's pipes, its log).
        unsafe { crate::os::close_from(3) };
    }
    ExitCode::from(main_with(args, default_backend()))
}

/// [`main`] with a chosen backend, without closing inherited descriptors (the tests run it as a
/// helper process); returns the exit status.
pub fn main_with(args: SuperviseArgs, backend: Arc<dyn backend::Backend>) -> u8 {
    init_logging();
    let path = args.config;
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return 1;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("{}", SuperviseError::Runtime(e));
            return 1;
        }
    };
    let result = rt.block_on(run(
        &config,
        Some(path),
        args.auto,
        args.build_users_group.as_deref(),
        backend,
    ));
    match result {
        Ok(()) => 0,
        Err(SuperviseError::LockHeld { .. }) if args.auto => {
            // Another supervisor owns the state directory; it will serve (or is exiting and a
            // client will start a new one). Not an error for an auto-start.
            tracing::debug!("another supervisor holds the lock; leaving it to that one");
            0
        }
        Err(e) => {
            tracing::error!("{e}");
            1
        }
    }
}

/// Bind and serve with SIGTERM/SIGINT as the shutdown signals and SIGHUP as "reload the
/// config" (`path`, as it was chosen; `None`: the file `config` was read from, if any).
/// `build_users_group` is the group admitted to the build socket besides root.
pub async fn run(
    config: &Config,
    path: Option<config::ConfigPath>,
    auto: bool,
    build_users_group: Option<&str>,
    backend: Arc<dyn backend::Backend>,
) -> Result<(), SuperviseError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut opts = ServeOptions::new(config, auto);
    if path.is_some() {
        opts.config_path = path;
    }
    let server = match server::bind(config, &opts).await? {
        Bound::Serving(s) => s,
        Bound::AnotherIsServing => {
            tracing::debug!("another supervisor is serving; exiting");
            return Ok(());
        }
    };
    // The build socket for external builds (`external::door`): a failure to open it costs
    // only that door.
    let door = match crate::external::door::Door::open(
        &opts.state_dir,
        opts.config_path
            .as_ref()
            .and_then(|p| p.named().map(ToOwned::to_owned)),
        build_users_group,
    ) {
        Ok(d) => Some(tokio::spawn(d.serve())),
        Err(e) => {
            tracing::warn!("cannot open the build socket for external builds: {e}");
            None
        }
    };
    let (sig_tx, sig_rx) = tokio::sync::mpsc::unbounded_channel();
    let (hup_tx, hup_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut term = signal(SignalKind::terminate()).map_err(SuperviseError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(SuperviseError::Runtime)?;
    // SIGHUP reloads the config (`systemctl reload`); it never kills the supervisor, so the
    // terminal of a hand-started one closing costs at most a reload.
    let mut hup = signal(SignalKind::hangup()).map_err(SuperviseError::Runtime)?;
    let forward = tokio::spawn(async move {
        loop {
            let tx = tokio::select! {
                _ = term.recv() => &sig_tx,
                _ = int.recv() => &sig_tx,
                _ = hup.recv() => &hup_tx,
            };
            if tx.send(()).is_err() {
                return;
            }
        }
    });
    let result = server.serve_with_reloads(backend, sig_rx, hup_rx).await;
    forward.abort();
    if let Some(d) = door {
        d.abort();
        let _ = d.await;
    }
    result
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("NIX_LAZY_BUILDER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
