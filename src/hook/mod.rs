//! The hook front-end: the conversation with nix-daemon on stdin/stderr, one `try` at a time.
//!
//! Reads the settings preamble, loads the builder table once, and answers every `try` by
//! performing the steps of the planner (`plan.rs`, which decides everything): it reads the
//! derivation, asks the supervisor through `lazy`, reads the failure memory, probes and holds
//! slots through `slots` (`main-lock` is never waited for on the async runtime), sleeps, and
//! connects (`accept.rs`, which after `# accept` runs the build through `transfer`). It tells
//! the supervisor or `memory` what a connection failure or success showed, owns the process
//! set-up nix-daemon expects (descriptors, signals, exit codes), reads the clock once per
//! answer it gives the planner, and never writes anything but whole reply and `@nix` lines to
//! stderr.

mod accept;
pub(crate) use accept::connect;
pub mod plan;

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use hook_protocol::StorePath;
use hook_protocol::derivation::Derivation;
use hook_protocol::hook::{HookRequest, Reply, Settings};
use hook_protocol::log::{Message, Verbosity};
use tokio::io::AsyncRead;

use crate::config::{self, Builder, BuilderTable, Config, ConfigError};
use crate::lazy::{self, Lazy};
use crate::logging;
use crate::memory::FailureMemory;
use crate::select::LocalCapability;
use crate::slots::{self, LoadDir, MainLock, SlotLock};
use crate::store::{BuildLog, RemoteError};
use crate::transfer;
use crate::wire_io::{WireError, WireReader};
use plan::{Load, Next, Note, Planner};

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

#[derive(Debug, thiserror::Error)]
pub(crate) enum HookError {
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
/// anything but stdio, or the daemon would wait for it to close fd 2/4 (docs/protocol.md §1.4).
fn prepare_descriptors() {
    // SAFETY: fd 5 is the log pipe's read end the daemon leaks to us; nothing in this process
    // uses it.
    unsafe { crate::os::close(5) };
    crate::os::cloexec_from(3);
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
    let builders = &table.builders;
    let local = local_capability(&settings)?;
    let load_dir = LoadDir::open(&nix_state_dir())?;
    let log = BuildLog::new(fd4);
    // Connects to the supervisor only when a lazy builder matches a `try`.
    let mut lazy = Lazy::new(cfg.supervisor.state_dir.clone(), named_config);
    let limits = plan::Limits::new(lazy::wait_limit(
        settings.build_poll_interval().unwrap_or(5),
    ));
    let mut planner = Planner::new(builders, local, limits);
    // Always-on builders that failed in an earlier hook process, until their backoff runs out
    // (lazy builders have the supervisor's memory). Opened (its directory made) on the first
    // `try` an always-on builder matches, not before the first reply.
    let memory_cell = std::cell::OnceCell::new();
    let memory = || memory_cell.get_or_init(|| FailureMemory::open(&cfg.supervisor.state_dir));

    loop {
        let req = match stdin.decode("a request", HookRequest::decode).await {
            Ok(HookRequest::Try(t)) => t,
            // As Nix's hook: any other word, or EOF where a request would start, means the
            // daemon is done with us. EOF inside a request is an error.
            Ok(HookRequest::Other(_)) => return Ok(0),
            Err(WireError::UnexpectedEof { .. }) if stdin.buffered().is_empty() => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let mut drv = None;
        let mut held = HeldSlot::default();
        let mut step = planner.start(&req, Instant::now());
        let reply = loop {
            for note in std::mem::take(&mut step.notes) {
                say(note);
            }
            held.keep(step.holding());
            step = match carry_out(
                step.next, builders, &load_dir, &mut lazy, &memory, &mut held,
            )
            .await?
            {
                Ok(next) => next,
                Err(DoorStep::ReadDrv(s)) => {
                    let d = read_drv(s.drv_path()).await;
                    let next = s.read(d.as_ref().ok(), Instant::now());
                    drv = Some(d);
                    next
                }
                Err(DoorStep::Connect(s)) => {
                    let b = &builders[s.builder()];
                    let e = match accept::connect(b, s.port(), &log, &mut lazy).await {
                        Ok(remote) => {
                            lazy.stop_progress();
                            if !b.is_lazy() {
                                memory().clear(b);
                            }
                            let drv = match drv.take() {
                                Some(d) => d,
                                None => read_drv(&req.drv_path).await,
                            };
                            let outcome = accept::accepted(
                                &mut stdin,
                                &settings,
                                &req,
                                drv,
                                b,
                                remote,
                                log,
                                held.take_for(Some(s.builder())).map(|(_, slot)| slot),
                                &load_dir,
                            )
                            .await;
                            if let Err(HookError::Transfer(e)) = &outcome
                                && b.is_lazy()
                                && e.builder_broke()
                            {
                                // The machine died or froze under the build (the supervisor may
                                // not see that: a frozen VM's process is still there). Tell it,
                                // so it replaces the machine instead of leasing it to the next
                                // build.
                                lazy.report_failure(b, &e.to_string()).await;
                            }
                            lazy.settle().await;
                            return outcome;
                        }
                        Err(e) => e,
                    };
                    connect_failed(b, &e, &mut lazy, memory).await;
                    s.failed(&e.to_string(), Instant::now())
                }
                Err(DoorStep::Postpone { showing }) => {
                    if let Some(status) = &showing {
                        lazy.show_progress(status);
                    }
                    break Reply::Postpone;
                }
                Err(DoorStep::Decline) => break Reply::Decline,
            };
        };
        logging::reply(&reply);
    }
}

/// The planner's steps a front door answers itself: reading the derivation, connecting (and
/// on success the build), and the reply. Every other step is [`carry_out`]'s.
pub(crate) enum DoorStep<'p, 't> {
    ReadDrv(plan::ReadDrv<'p, 't>),
    Connect(plan::Connect<'p, 't>),
    Postpone {
        showing: Option<crate::supervisor::proto::BuilderStatus>,
    },
    Decline,
}

/// Carries out `next` the same way for both front doors (the hook and `external-serve`):
/// the supervisor's view, failure memory, slot probes under `main-lock`, leases, boots, the
/// wait for a boot (shown in the progress display) and sleeps; what only a door can answer
/// is handed back.
pub(crate) async fn carry_out<'p, 't, 'm>(
    next: Next<'p, 't>,
    builders: &[Builder],
    load_dir: &LoadDir,
    lazy: &mut Lazy,
    memory: &impl Fn() -> &'m FailureMemory,
    held: &mut HeldSlot,
) -> Result<Result<plan::Step<'p, 't>, DoorStep<'p, 't>>, HookError> {
    Ok(Ok(match next {
        Next::ReadDrv(s) => return Ok(Err(DoorStep::ReadDrv(s))),
        Next::Connect(s) => return Ok(Err(DoorStep::Connect(s))),
        Next::Postpone { showing } => return Ok(Err(DoorStep::Postpone { showing })),
        Next::Decline => return Ok(Err(DoorStep::Decline)),
        Next::Refresh(s) => {
            let view = lazy.refresh().await;
            s.refreshed(view, Instant::now())
        }
        Next::Recall(s) => {
            // The failure memory is shared with other hook processes: wall-clock time.
            let at = SystemTime::now();
            let found = s
                .builders()
                .iter()
                .map(|&i| memory().availability(&builders[i], at))
                .collect();
            s.recalled(found, Instant::now())
        }
        Next::Probe(s) => {
            let main = lock_main(load_dir).await?;
            probe_round(s, load_dir, main, builders, held)?
        }
        Next::Lease(s) => {
            let verdict = lazy.lease(&builders[s.builder().index()]).await;
            s.answered(verdict, Instant::now())
        }
        Next::Boot(s) => {
            let verdict = lazy.boot(&builders[s.builder().index()]).await;
            s.answered(verdict, Instant::now())
        }
        Next::WaitReady(s) => {
            // The boot is shown while the door waits for it too, not only when it postpones.
            lazy.show_progress(s.status());
            let ready = lazy
                .wait_ready(&builders[s.builder().index()], s.within())
                .await;
            s.answered(ready, Instant::now())
        }
        Next::Sleep(s) => {
            tokio::time::sleep_until(s.until().into()).await;
            s.woke(Instant::now())
        }
    }))
}

/// Logs what the planner says.
pub(crate) fn say(note: Note) {
    match note {
        Note::Say { level, text } => logging::send(&Message::msg(level, text)),
        Note::Debug(text) => tracing::debug!("{text}"),
    }
}

/// What a failed connection tells the others: the user (as Nix's `cannot build on`), the
/// supervisor for a lazy builder (it gives back the lease and replaces the machine), the hooks
/// after this one for an always-on builder (the failure memory).
pub(crate) async fn connect_failed<'m>(
    b: &Builder,
    e: &RemoteError,
    lazy: &mut Lazy,
    memory: impl FnOnce() -> &'m FailureMemory,
) {
    logging::error(&format!("cannot build on '{}': {e}", b.store_uri));
    if b.is_lazy() {
        lazy.report_failure(b, &e.to_string()).await;
    } else if let Some(r) = memory().record_failure(
        b,
        &plan::connection_failed(&e.to_string()),
        SystemTime::now(),
    ) {
        tracing::debug!(
            builder = %b.name,
            consecutive = r.consecutive,
            "failure remembered for other hooks"
        );
    }
}

/// Takes `main-lock`. Usually free; when another hook holds it, the wait runs on a blocking
/// thread, never on the async runtime.
async fn lock_main(load_dir: &LoadDir) -> Result<MainLock, HookError> {
    if let Some(main) = load_dir.try_lock_main()? {
        return Ok(main);
    }
    let dir = load_dir.clone();
    Ok(tokio::task::spawn_blocking(move || dir.lock_main())
        .await
        .map_err(|e| HookError::Internal(format!("main-lock thread: {e}")))??)
}

/// Performs a [`Next::Probe`] under `main` and gives the planner the loads. Of the free slots
/// found, the one the planner holds next is kept (touched, in `held`); the others are given
/// back before `main-lock`, so no other hook sees them taken once it can look.
fn probe_round<'p, 't>(
    s: plan::Probe<'p, 't>,
    load_dir: &LoadDir,
    main: MainLock,
    table: &[Builder],
    held: &mut HeldSlot,
) -> Result<plan::Step<'p, 't>, slots::SlotError> {
    let reserved = held.take_for(s.reserved());
    let mut probes = probe(load_dir, &main, table, s.builders(), reserved)?;
    let loads = probes
        .iter()
        .map(|p| Load {
            load: p.load,
            free: p.free.is_some(),
        })
        .collect();
    let which = s.builders().to_vec();
    let next = s.probed(loads, Instant::now());
    held.settle(&which, &mut probes, next.holding())?;
    drop(probes);
    drop(main);
    Ok(next)
}

/// Probes the slots of table entries `which` under `main`, the `reserved` one (if any) with
/// the slot this `try` already holds for it.
fn probe(
    load_dir: &LoadDir,
    main: &MainLock,
    table: &[Builder],
    which: &[usize],
    mut reserved: Option<(usize, SlotLock)>,
) -> Result<Vec<slots::Probe>, slots::SlotError> {
    which
        .iter()
        .map(|&i| {
            let b = &table[i];
            match reserved.take_if(|(r, _)| *r == i) {
                Some((_, mine)) => load_dir.probe_holding(main, b.slot_key(), b.max_jobs, mine),
                None => load_dir.probe(main, b.slot_key(), b.max_jobs),
            }
        })
        .collect()
}

/// The slot this `try` holds, and for which table entry: exactly the one the planner says
/// ([`plan::Step::holding`]).
#[derive(Debug, Default)]
pub(crate) struct HeldSlot(Option<(usize, SlotLock)>);

impl HeldSlot {
    /// Gives the slot back unless it is the one of `holding`.
    pub(crate) fn keep(&mut self, holding: Option<usize>) {
        if self.0.as_ref().map(|(i, _)| *i) != holding {
            self.0 = None;
        }
    }

    /// Hands out the slot, if it is `builder`'s.
    pub(crate) fn take_for(&mut self, builder: Option<usize>) -> Option<(usize, SlotLock)> {
        self.0.take_if(|(i, _)| Some(*i) == builder)
    }

    /// After a probe of `which` (parallel to `probes`): holds the free slot of `holding`,
    /// touched as Nix's hook does for the chosen slot.
    fn settle(
        &mut self,
        which: &[usize],
        probes: &mut [slots::Probe],
        holding: Option<usize>,
    ) -> Result<(), slots::SlotError> {
        self.0 = None;
        let Some(i) = holding else { return Ok(()) };
        let Some(slot) = which
            .iter()
            .position(|&w| w == i)
            .and_then(|at| probes[at].free.take())
        else {
            return Ok(());
        };
        slot.touch()?;
        self.0 = Some((i, slot));
        Ok(())
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

pub(crate) fn nix_state_dir() -> PathBuf {
    std::env::var_os("NIX_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(slots::NIX_STATE_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{command_lazy, ssh_builder};
    use crate::slots::tests::{holder, kill};
    use hook_protocol::hook::TryRequest;
    use std::collections::BTreeSet;
    use std::fs::File;

    fn builder(name: &str, max_jobs: u32) -> Builder {
        ssh_builder(name, &["aarch64-linux"], max_jobs)
    }

    /// A new `try` of an aarch64-linux derivation, up to the step after reading it (which
    /// read nothing).
    fn start<'p, 't>(planner: &'p mut Planner<'t>, now: Instant) -> Next<'p, 't> {
        let req = TryRequest {
            am_willing: false,
            needed_system: "aarch64-linux".into(),
            drv_path: StorePath::parse("/nix/store/00000000000000000000000000000000-x.drv")
                .unwrap(),
            required_features: BTreeSet::new(),
        };
        let Next::ReadDrv(s) = planner.start(&req, now).next else {
            panic!("no derivation to read")
        };
        s.read(None, now).next
    }

    /// One round of a new `try`, with real slot files: the step after the probe, and the slot
    /// held for it.
    fn choose<'p, 't>(
        planner: &'p mut Planner<'t>,
        d: &LoadDir,
        table: &[Builder],
    ) -> (plan::Step<'p, 't>, HeldSlot) {
        let now = Instant::now();
        let Next::Recall(r) = start(planner, now) else {
            panic!("no failure memory to read")
        };
        let Next::Probe(p) = r.recalled(vec![None; 2], now).next else {
            panic!("no probe")
        };
        let mut held = HeldSlot::default();
        let step = probe_round(p, d, d.lock_main().unwrap(), table, &mut held).unwrap();
        (step, held)
    }

    #[test]
    fn a_slot_reserved_for_a_boot_is_held_until_the_builder_is_leased() {
        use crate::supervisor::client::Verdict;
        use crate::supervisor::proto::{BuilderStatus, State};
        let state = tempfile::tempdir().unwrap();
        let d = LoadDir::open(state.path()).unwrap();
        let mut vm = builder("vm", 1);
        vm.lazy = Some(command_lazy(false));
        let table = [vm];
        let status = |state, port| BuilderStatus {
            ssh_port: port,
            booting_ms: Some(0),
            expected_boot_ms: Some(1000),
            ..BuilderStatus::new("vm", state)
        };
        let local = LocalCapability {
            system: "x86_64-linux".into(),
            max_jobs: 1,
            ..Default::default()
        };
        let mut planner = Planner::new(&table, local, plan::Limits::new(Duration::from_secs(5)));
        let now = Instant::now();
        let Next::Refresh(r) = start(&mut planner, now) else {
            panic!("no refresh")
        };
        let Next::Probe(p) = r.refreshed(Ok(vec![status(State::Down, None)]), now).next else {
            panic!("no probe")
        };
        let mut held = HeldSlot::default();
        let step = probe_round(p, &d, d.lock_main().unwrap(), &table, &mut held).unwrap();
        let Next::Boot(boot) = step.next else {
            panic!("no boot: {step:?}")
        };
        assert!(held_path(&held).ends_with("ssh:__vm-0"));
        let step = boot.answered(Ok(Verdict::Granted(status(State::Booting, None))), now);
        held.keep(step.holding());
        let Next::WaitReady(wait) = step.next else {
            panic!("no wait: {step:?}")
        };
        // Meanwhile nobody else can take the slot the boot is for.
        assert!(d.try_lock_slot("ssh://vm", 0).unwrap().is_none());
        let step = wait.answered(Ok(status(State::Up, Some(2222))), now);
        held.keep(step.holding());
        let Next::Refresh(r) = step.next else {
            panic!("no refresh: {step:?}")
        };
        let step = r.refreshed(Ok(vec![status(State::Up, Some(2222))]), now);
        held.keep(step.holding());
        let Next::Probe(p) = step.next else {
            panic!("no probe: {step:?}")
        };
        // The reserved slot is ours, not load: the builder is leased with it.
        let step = probe_round(p, &d, d.lock_main().unwrap(), &table, &mut held).unwrap();
        assert!(matches!(step.next, Next::Lease(_)), "{step:?}");
        assert_eq!(step.holding(), Some(0));
        assert!(held_path(&held).ends_with("ssh:__vm-0"));
    }

    fn connected(step: &plan::Step<'_, '_>) -> Option<usize> {
        match &step.next {
            Next::Connect(c) => Some(c.builder()),
            _ => None,
        }
    }

    fn held_path(held: &HeldSlot) -> String {
        let (_, slot) = held.0.as_ref().expect("a slot is held");
        slot.path().to_string_lossy().into_owned()
    }

    #[test]
    fn a_round_probes_chooses_and_keeps_one_touched_slot() {
        let state = tempfile::tempdir().unwrap();
        let d = LoadDir::open(state.path()).unwrap();
        let table = [builder("a", 2), builder("b", 1)];
        let local = LocalCapability {
            system: "x86_64-linux".into(),
            max_jobs: 1,
            ..Default::default()
        };
        let mut planner = Planner::new(&table, local, plan::Limits::new(Duration::from_secs(5)));
        // An old slot file, as a long-gone hook leaves it: the chosen slot gets touched.
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let b0 = File::create(d.path().join("ssh:__b-0")).unwrap();
        b0.set_modified(old).unwrap();
        drop(b0);
        // Another process already runs a build on 'a'.
        let child = holder(state.path(), "ssh://a#0");
        let (step, s1) = choose(&mut planner, &d, &table);
        assert_eq!(connected(&step), Some(1), "'b' has load 0, 'a' load 1");
        assert!(held_path(&s1).ends_with("ssh:__b-0"));
        let touched = std::fs::metadata(held_path(&s1))
            .unwrap()
            .modified()
            .unwrap();
        assert!(
            touched.elapsed().unwrap() < Duration::from_secs(60),
            "{touched:?}"
        );
        drop(step);
        let (step, s2) = choose(&mut planner, &d, &table);
        assert_eq!(connected(&step), Some(0));
        assert!(held_path(&s2).ends_with("ssh:__a-1"));
        drop(step);
        // Everything is taken now: the `try` watches the slots (and would postpone), and no
        // slot is kept.
        let (step, s3) = choose(&mut planner, &d, &table);
        assert!(matches!(step.next, Next::Sleep(_)), "{step:?}");
        assert_eq!(step.holding(), None);
        assert!(s3.0.is_none());
        // main-lock is released after each choice.
        assert!(d.try_lock_main().unwrap().is_some());
        // The other process dies: its slot on 'a' is free again.
        kill(child);
        let Next::Sleep(sleep) = step.next else {
            unreachable!()
        };
        let Next::Probe(p) = sleep.woke(Instant::now()).next else {
            panic!("no second probe")
        };
        let mut s4 = HeldSlot::default();
        let step = probe_round(p, &d, d.lock_main().unwrap(), &table, &mut s4).unwrap();
        assert_eq!(connected(&step), Some(0));
        assert!(held_path(&s4).ends_with("ssh:__a-0"));
        drop((s1, s2));
    }
}
