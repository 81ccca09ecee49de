//! The hook front-end: the conversation with nix-daemon on stdin/stderr, one `try` at a time.
//!
//! Reads the settings preamble, loads the builder table once, answers every `try` with
//! `# accept` (after the SSH connection and the remote handshake succeeded, as Nix does, so a
//! dead builder never gets a build), `# postpone` or `# decline` plus one line that says why,
//! and after an accept runs the build through `transfer`. An always-on builder it cannot
//! connect to is skipped for the rest of the process and, through `memory`, by the hooks
//! after it until its backoff runs out. It owns the process set-up nix-daemon
//! expects (descriptors, signals, exit codes) and never writes anything but whole reply and
//! `@nix` lines to stderr.

use std::collections::BTreeSet;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hook_protocol::StorePath;
use hook_protocol::derivation::Derivation;
use hook_protocol::hook::{AcceptedBuild, Reply, Request, Settings, TryRequest};
use hook_protocol::log::{Field, Message, Verbosity, activity};
use hook_protocol::serve::BuildOptions;
use tokio::io::AsyncRead;

use crate::config::{self, Builder, BuilderTable, Config, ConfigError};
use crate::lazy::{Lazy, Next};
use crate::logging::{self, Activity};
use crate::memory::FailureMemory;
use crate::select::{Availability, Decision, DeclineLevel, LocalCapability};
use crate::slots::{self, LoadDir, SlotLock, UploadLockOutcome};
use crate::ssh;
use crate::store::{BuildLog, LocalStore, Remote, RemoteError};
use crate::transfer::{self, Job};
use crate::wire_io::{WireError, WireReader};

/// What `main` parsed from the command line.
pub struct HookArgs {
    /// The TOML config, as `main` resolved it (`--config`, else the environment, else the
    /// default).
    pub config: config::ConfigPath,
    /// `NIX_SSHOPTS`, as `main` read it from the environment.
    pub nix_sshopts: Option<String>,
    /// The client's verbosity (the daemon's last argument).
    pub verbosity: Option<u8>,
}

/// How long a `try` watches for a slot to free on full builders before it answers `# postpone`.
/// While it waits, the daemon reads nothing else, so this stays well below the daemon's poll
/// interval (`build-poll-interval`, 5 s by default).
const SLOT_WAIT: Duration = Duration::from_millis(2500);
const SLOT_POLL: Duration = Duration::from_millis(50);

/// How long Nix's hook waits for another hook's upload to the same builder.
const UPLOAD_LOCK_TIMEOUT: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, thiserror::Error)]
enum HookError {
    #[error("reading from nix-daemon: {0}")]
    Daemon(#[from] WireError),
    #[error(transparent)]
    Setting(#[from] hook_protocol::hook::SettingError),
    #[error(transparent)]
    Slots(#[from] slots::SlotError),
    #[error("cannot read the derivation '{path}': {source}")]
    ReadDrv {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse the derivation '{path}': {message}")]
    ParseDrv { path: String, message: String },
    #[error(transparent)]
    Transfer(Box<transfer::TransferError>),
    #[error("{0}")]
    Internal(String),
}

impl From<transfer::TransferError> for HookError {
    fn from(e: transfer::TransferError) -> Self {
        HookError::Transfer(Box::new(e))
    }
}

/// Runs the hook; returns its exit status.
pub fn main(args: HookArgs) -> ExitCode {
    // fd 4 first: the runtime and stdin's duplicate must not be handed number 4 when the daemon
    // did not give us one.
    let fd4 = BuildLog::claim_fd4();
    prepare_descriptors();
    let verbosity = Verbosity::saturating_from(args.verbosity.unwrap_or(3) as u64);
    logging::init_hook(verbosity);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            logging::error(&format!("nix-lazy-builder: cannot start: {e}"));
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    logging::error(&format!("nix-lazy-builder: cannot handle SIGTERM: {e}"));
                    return 1;
                }
            };
        tokio::select! {
            r = run(args, fd4) => match r {
                Ok(code) => code,
                Err(e) => {
                    logging::error(&e.to_string());
                    match &e {
                        HookError::Transfer(t) => t.exit_code(),
                        _ => 1,
                    }
                }
            },
            // Current Nix sends SIGTERM and SIGKILLs 500 ms later: drop everything in flight
            // (unregistered outputs are removed, the SSH connection closes, which stops the
            // remote build) and go.
            _ = term.recv() => 1,
        }
    });
    if code == 0 {
        // Done and registered: nothing is left to clean up, and the daemon sees the build end
        // when we are gone, so skip the runtime's orderly shutdown (a few ms of joining threads
        // and dropping tasks). Every write to stdout, stderr and fd 4 was already made.
        std::process::exit(0);
    }
    // A failure or a signal: give what is still in flight (an unpacking thread removing its
    // half-written output, a registration) a moment to finish cleaning up.
    rt.shutdown_timeout(Duration::from_millis(300));
    ExitCode::from(code)
}

/// nix-daemon leaks descriptors into the hook (fd 3 is a mount-namespace handle) and gives it the
/// read end of the log pipe as fd 5: close fd 5, and make sure no child we start inherits
/// anything but stdio, or the daemon would wait for it to close fd 2/4 (PROTOCOL.md §1.4).
fn prepare_descriptors() {
    // SAFETY: closing fd 5, which nothing in this process uses; an error (not open) is fine.
    unsafe { libc::close(5) };
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD only change the close-on-exec flag of a descriptor number.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

fn stdin_reader() -> Box<dyn AsyncRead + Unpin + Send> {
    // SAFETY: fd 0 is ours; a non-pipe stdin falls back to tokio's blocking reader.
    let fd = unsafe { libc::dup(0) };
    if fd >= 0 {
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Ok(p) = tokio::net::unix::pipe::Receiver::from_owned_fd(owned) {
            return Box::new(p);
        }
    }
    Box::new(tokio::io::stdin())
}

/// The local machine's capability, from the settings the daemon sent.
fn local_capability(settings: &Settings) -> Result<LocalCapability, HookError> {
    let max_jobs = match settings.max_jobs()? {
        hook_protocol::hook::MaxJobs::Auto => 1,
        hook_protocol::hook::MaxJobs::Count(n) => n,
    };
    Ok(LocalCapability {
        system: settings.system().unwrap_or_default().to_owned(),
        extra_platforms: settings
            .extra_platforms()
            .into_iter()
            .map(str::to_owned)
            .collect(),
        system_features: settings
            .system_features()
            .into_iter()
            .map(str::to_owned)
            .collect(),
        max_jobs,
    })
}

/// The builder table, the TOML config it came with, and the config path to hand a supervisor
/// (only when one was named: a supervisor finds the default itself).
struct Loaded {
    table: BuilderTable,
    config: Config,
    named_config: Option<PathBuf>,
}

fn load_table(
    settings: &Settings,
    path: &config::ConfigPath,
    nix_sshopts: Option<&str>,
) -> Result<Loaded, ConfigError> {
    let cfg = Config::load(path)?;
    let table = config::load_table(
        settings.builders(),
        settings.system().unwrap_or("x86_64-linux"),
        nix_sshopts,
        &cfg,
    )?;
    for n in &table.notes {
        n.emit();
    }
    Ok(Loaded {
        table,
        config: cfg,
        named_config: path.named().map(Path::to_owned),
    })
}

async fn run(args: HookArgs, fd4: Option<OwnedFd>) -> Result<u8, HookError> {
    let mut stdin = WireReader::new(stdin_reader(), "nix-daemon");
    let settings = match stdin
        .decode("the settings preamble", Settings::decode)
        .await
    {
        Ok(s) => s,
        // The daemon dropped us before saying anything: nothing to do. (EOF in the middle of
        // the preamble is an error: the daemon died mid-write or something else is talking.)
        Err(WireError::UnexpectedEof { .. }) if stdin.buffered().is_empty() => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let Loaded {
        table,
        config: cfg,
        named_config,
    } = match load_table(&settings, &args.config, args.nix_sshopts.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            // A broken configuration must not wedge local builds: say why, loudly, and step
            // aside for the rest of this client session.
            logging::error(&format!(
                "nix-lazy-builder: {e}; remote builds are disabled"
            ));
            logging::reply(&Reply::DeclinePermanently);
            return Ok(0);
        }
    };
    if table.builders.is_empty() {
        // As Nix's hook: no machines at all, so never ask us again in this session.
        logging::reply(&Reply::DeclinePermanently);
        return Ok(0);
    }
    let local = local_capability(&settings)?;
    let load_dir = LoadDir::open(&nix_state_dir())?;
    let log = BuildLog::new(fd4);
    let mut lazy = table.builders.iter().any(Builder::is_lazy).then(|| {
        Lazy::new(
            cfg.supervisor.state_dir.clone(),
            named_config,
            crate::lazy::wait_limit(settings.build_poll_interval().unwrap_or(5)),
        )
    });
    // Builders whose connection failed in this process, with why (Nix disables them too).
    let mut failed: Vec<Option<String>> = vec![None; table.builders.len()];
    // Always-on builders that failed in an earlier hook process, until their backoff runs out
    // (lazy builders have the supervisor's memory). Opened (its directory made) on the first
    // `try` an always-on builder matches, not before the first reply.
    let memory_cell = std::cell::OnceCell::new();
    let memory = || memory_cell.get_or_init(|| FailureMemory::open(&cfg.supervisor.state_dir));

    loop {
        let req = match stdin.decode("a request", Request::decode).await {
            Ok(Request::Try(t)) => t,
            // As Nix's hook: any other word, or EOF where a request would start, means the
            // daemon is done with us. EOF inside a request is an error.
            Ok(Request::Other(_)) => return Ok(0),
            Err(WireError::UnexpectedEof { .. }) if stdin.buffered().is_empty() => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let request = crate::select::Request {
            system: &req.needed_system,
            required_features: &req.required_features,
            am_willing: req.am_willing,
        };
        let matching = crate::select::matching(&table.builders, &request);
        // The derivation is read before a builder is chosen (so before a VM boots for it): one
        // whose output paths are not known yet is declined with the reason, instead of failing
        // after `# accept` with its inputs already uploaded.
        let mut drv = if matching.is_empty() {
            None
        } else {
            Some(read_drv(&req.drv_path).await)
        };
        if let Some(Ok(d)) = &drv
            && let Some(reason) = not_remotely_buildable(&req.drv_path, d)
        {
            logging::send(&Message::msg(Verbosity::Warn, format!("warning: {reason}")));
            logging::reply(&Reply::Decline);
            continue;
        }
        let lazy_matches = matching.iter().any(|&i| table.builders[i].is_lazy());
        if let Some(l) = lazy.as_mut().filter(|_| lazy_matches) {
            l.refresh().await;
        }
        // Read once per `try`: other hooks' failures of the matching always-on builders.
        let now = std::time::SystemTime::now();
        let remembered: Vec<Option<Availability>> = (0..table.builders.len())
            .map(|i| {
                let b = &table.builders[i];
                (!b.is_lazy() && matching.contains(&i))
                    .then(|| memory().availability(b, now))
                    .flatten()
            })
            .collect();
        let mut slot_wait: Option<Instant> = None;
        let reply = loop {
            let availability = |i: usize| {
                let b = &table.builders[i];
                match (&failed[i], &lazy, &remembered[i]) {
                    (Some(cause), _, _) => Availability::BackingOff {
                        cause: cause.clone(),
                        retry_in: Duration::ZERO,
                    },
                    (None, Some(l), _) if b.is_lazy() => l.availability(b),
                    (None, _, Some(backing_off)) => backing_off.clone(),
                    _ => Availability::Up,
                }
            };
            let (decision, slot) = slots::choose_with_slots(
                &load_dir,
                &table.builders,
                &request,
                &local,
                &availability,
            )?;
            let (index, boot) = match decision {
                Decision::Accept { builder } => (builder, false),
                Decision::Boot { builder } => (builder, true),
                Decision::Postpone { reason } => {
                    tracing::debug!("postponing: {reason}");
                    // A matching builder that is about to finish booting is worth a short wait.
                    let booting = matching.iter().copied().find(|&i| {
                        table.builders[i].is_lazy()
                            && failed[i].is_none()
                            && matches!(availability(i), Availability::Booting)
                    });
                    if let (Some(i), Some(l)) = (booting, lazy.as_mut()) {
                        if let Next::ChooseAgain = l.wait_for(&table.builders[i]).await {
                            l.refresh().await;
                            continue;
                        }
                        break Reply::Postpone;
                    }
                    // Every matching builder is full. A slot frees the moment a running build's
                    // hook exits, usually long before the daemon's next poll (5 s): watch the
                    // slots for a moment instead of paying a whole poll interval.
                    let deadline = *slot_wait.get_or_insert_with(|| Instant::now() + SLOT_WAIT);
                    if Instant::now() < deadline {
                        tokio::time::sleep(SLOT_POLL).await;
                        continue;
                    }
                    break Reply::Postpone;
                }
                Decision::Decline { reason, level } => {
                    let level = match level {
                        DeclineLevel::Warn => Verbosity::Warn,
                        DeclineLevel::Chatty => Verbosity::Chatty,
                    };
                    let text = if level == Verbosity::Warn {
                        format!("warning: {reason}")
                    } else {
                        reason
                    };
                    logging::send(&Message::msg(level, text));
                    break Reply::Decline;
                }
            };
            let b = &table.builders[index];
            let mut target = b.clone();
            if let Some(l) = lazy.as_mut().filter(|_| b.is_lazy()) {
                match l.engage(b, boot).await {
                    Next::Use { port } => {
                        if port.is_some() {
                            target.uri.port = port;
                        }
                    }
                    Next::ChooseAgain => {
                        l.refresh().await;
                        continue;
                    }
                    Next::Postpone => break Reply::Postpone,
                }
            } else if boot {
                // Only lazy builders boot; select never asks to boot an always-on one.
                break Reply::Postpone;
            }
            match connect(&target, &log).await {
                Ok(remote) => {
                    if let Some(l) = lazy.as_mut() {
                        l.stop_progress();
                    }
                    if !b.is_lazy() {
                        memory().clear(b);
                    }
                    let drv = match drv.take() {
                        Some(d) => d,
                        None => read_drv(&req.drv_path).await,
                    };
                    let outcome = accepted(
                        &mut stdin, &settings, &req, drv, b, remote, log, slot, &load_dir,
                    )
                    .await;
                    if let (Err(HookError::Transfer(e)), Some(l)) = (&outcome, lazy.as_mut())
                        && b.is_lazy()
                        && e.builder_broke()
                    {
                        // The machine died or froze under the build (the supervisor may not
                        // see that: a frozen VM's process is still there). Tell it, so it
                        // replaces the machine instead of leasing it to the next build.
                        l.report_failure(b, &e.to_string()).await;
                    }
                    return outcome;
                }
                Err(e) => {
                    logging::error(&format!("cannot build on '{}': {e}", b.store_uri));
                    if let Some(l) = lazy.as_mut().filter(|_| b.is_lazy()) {
                        l.report_failure(b, &e.to_string()).await;
                        l.refresh().await;
                    }
                    let cause = format!("connection failed: {e}");
                    if !b.is_lazy()
                        && let Some(r) =
                            memory().record_failure(b, &cause, std::time::SystemTime::now())
                    {
                        tracing::debug!(
                            builder = %b.name,
                            consecutive = r.consecutive,
                            "failure remembered for other hooks"
                        );
                    }
                    failed[index] = Some(cause);
                    continue;
                }
            }
        };
        logging::reply(&reply);
    }
}

/// Reads and parses the derivation a `try` is about.
async fn read_drv(drv_path: &StorePath) -> Result<Derivation, HookError> {
    let bytes = tokio::fs::read(drv_path.as_str())
        .await
        .map_err(|source| HookError::ReadDrv {
            path: drv_path.to_string(),
            source,
        })?;
    Derivation::parse(&bytes).map_err(|e| HookError::ParseDrv {
        path: drv_path.to_string(),
        message: e.to_string(),
    })
}

/// Why `drv` cannot be built remotely by us, if it cannot: an output whose path is only known
/// once it is built (floating content-addressed, impure, or deferred on such an input) cannot be
/// placed with `--register-validity`, which needs the path up front.
fn not_remotely_buildable(drv_path: &StorePath, drv: &Derivation) -> Option<String> {
    let outputs = drv.output_paths().ok()?;
    let floating: Vec<&str> = outputs
        .iter()
        .filter(|(_, path)| path.is_none())
        .map(|(name, _)| name.as_str())
        .collect();
    (!floating.is_empty()).then(|| {
        format!(
            "not building '{drv_path}' remotely: its output{} {} {} no store path before it is \
             built (floating content-addressed or impure), which nix-lazy-builder cannot bring back yet",
            if floating.len() == 1 { "" } else { "s" },
            floating
                .iter()
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", "),
            if floating.len() == 1 { "has" } else { "have" },
        )
    })
}

fn nix_state_dir() -> PathBuf {
    std::env::var_os("NIX_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(slots::NIX_STATE_DIR))
}

/// SSH + the remote program's handshake, inside Nix's "connecting to" activity.
async fn connect(b: &Builder, log: &BuildLog) -> Result<Remote, RemoteError> {
    let _act = Activity::start(
        Verbosity::Talkative,
        activity::UNKNOWN,
        format!("connecting to '{}'", b.store_uri),
        vec![],
    );
    let target = ssh::SshTarget::for_builder(b)?;
    let session = ssh::connect(&target).await?;
    let remote = Remote::open(session, b, log).await?;
    tracing::debug!(builder = %b.name, protocol = %remote.describe(), "connected");
    Ok(remote)
}

#[allow(clippy::too_many_arguments)]
async fn accepted(
    stdin: &mut WireReader<Box<dyn AsyncRead + Unpin + Send>>,
    settings: &Settings,
    req: &TryRequest,
    drv: Result<Derivation, HookError>,
    builder: &Builder,
    mut remote: Remote,
    mut log: BuildLog,
    slot: Option<SlotLock>,
    load_dir: &LoadDir,
) -> Result<u8, HookError> {
    logging::reply(&Reply::accept(&builder.store_uri));
    // Start the registering `nix-store` now: its start-up overlaps the build.
    let nix_store = which::which("nix-store").unwrap_or_else(|_| PathBuf::from("nix-store"));
    let registrar = crate::place::Registrar::start(&nix_store);
    let accepted = stdin
        .decode("the inputs and wanted outputs", AcceptedBuild::decode)
        .await?;
    let drv_path = req.drv_path.clone();
    let drv = drv?;
    let job = Job {
        drv_path,
        drv,
        inputs: accepted.input_paths,
        wanted: accepted
            .missing_outputs
            .into_iter()
            .collect::<BTreeSet<_>>(),
        substitute_on_remote: settings.builders_use_substitutes()?,
        options: BuildOptions {
            max_silent_time: settings.max_silent_time()?,
            build_timeout: settings.timeout()?,
            max_log_size: settings.max_build_log_size()?,
            nr_repeats: 0,
            enforce_determinism: false,
            keep_failed: settings.keep_failed()?,
        },
        state_dir: nix_state_dir(),
    };
    let mut local = LocalStore::connect()
        .await
        .map_err(transfer::TransferError::Local)?;

    // Nix's hook serialises uploads to one builder with this lock; we do the same so concurrent
    // builds never upload the same closure twice, and so Nix's hooks see us.
    let lock_dir = load_dir.clone();
    let key = builder.slot_key().to_owned();
    let upload_lock =
        tokio::task::spawn_blocking(move || lock_dir.upload_lock(&key, UPLOAD_LOCK_TIMEOUT))
            .await
            .map_err(|e| HookError::Internal(format!("upload lock thread: {e}")))??;
    if let UploadLockOutcome::TimedOut = upload_lock {
        tracing::warn!(
            "somebody is hogging the upload lock for '{}', continuing...",
            builder.store_uri
        );
    }
    let build_act = Activity::start(
        Verbosity::Talkative,
        activity::UNKNOWN,
        format!("building '{}' on '{}'", job.drv_path, builder.store_uri),
        vec![Field::from(job.drv_path.to_string())],
    );
    let timings = transfer::run(
        &job,
        &mut remote,
        &mut local,
        &mut log,
        upload_lock,
        registrar,
    )
    .await?;
    drop(build_act);
    tracing::debug!(?timings, "remote build finished");
    drop(slot);
    Ok(0)
}
