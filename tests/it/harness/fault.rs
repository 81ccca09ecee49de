//! The harness's part for the fault-injection tests (`fault::*`): a seeded random source
//! whose seed is printed (replay a failure with `NLB_FAULT_SEED=<seed>`), derivations with a
//! large input, a slow build and a large output, waits for "a random point within a phase" of
//! a [`Background`] `nix-build` (by bytes transferred or by time into the build), and the
//! checks every fault ends with: nothing invalid or partial in the local store, no stray
//! process in the daemon's namespace.
//!
//! Must never: pick a fault point it cannot reproduce from the printed seed, declare a phase
//! reached without seeing it (the bytes on disk, the build's own log line), or signal a
//! process outside the test's own daemon, remote or lazy machine.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use super::expr::{DrvExpr, rec_set};
use super::*;

// ------------------------------------------------------------------------------------------------
// Seeded randomness

/// splitmix64: small, good enough to place faults, and reproducible from one printed number.
pub struct FaultRng {
    state: u64,
}

impl FaultRng {
    /// Seeded from `NLB_FAULT_SEED` or the clock; prints the seed and how to replay it.
    pub fn new(test: &str) -> Self {
        let seed = std::env::var("NLB_FAULT_SEED")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                t ^ u64::from(std::process::id()).rotate_left(32)
            });
        eprintln!("[fault] {test}: seed {seed} (replay with NLB_FAULT_SEED={seed})");
        FaultRng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    pub fn fraction(&mut self, lo: f64, hi: f64) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * unit
    }

    /// A duration uniform in `[lo, hi)`.
    pub fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        Duration::from_secs_f64(self.fraction(lo.as_secs_f64(), hi.as_secs_f64()))
    }
}

// ------------------------------------------------------------------------------------------------
// Derivations

/// Text of the marker the proxy tests look for in a NAR. The builder computes it (`$((6*7))`),
/// so the derivation itself, which goes the other way, never contains it.
pub const MARKER: &str = "NLB-FAULT-42-MARKER";

/// An `aarch64-linux` derivation (built remotely) with outputs `out` and `dev`, an x86_64
/// input built locally, and knobs for each phase: the input's size (upload), a sleep (build),
/// the size of `$out/blob` (download).
#[derive(Clone, Debug)]
pub struct BigDrv {
    pub name: String,
    /// Bytes of random data in the input (0: a small text file).
    pub input_bytes: u64,
    /// Seconds the builder sleeps after saying "build started".
    pub sleep_secs: u32,
    /// Bytes of random data in `$out/blob` (0: none).
    pub output_bytes: u64,
    /// Write [`MARKER`] into `$out/marker`.
    pub marker: bool,
}

impl BigDrv {
    pub fn new(name: &str) -> Self {
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{name}"
        );
        BigDrv {
            name: name.to_owned(),
            input_bytes: 0,
            sleep_secs: 0,
            output_bytes: 0,
            marker: false,
        }
    }

    pub fn input(mut self, bytes: u64) -> Self {
        self.input_bytes = bytes;
        self
    }

    pub fn sleep(mut self, secs: u32) -> Self {
        self.sleep_secs = secs;
        self
    }

    pub fn output(mut self, bytes: u64) -> Self {
        self.output_bytes = bytes;
        self
    }

    pub fn with_marker(mut self) -> Self {
        self.marker = true;
        self
    }

    /// The line the builder prints when it starts (the build phase has begun).
    pub fn started_line(&self) -> String {
        format!("nlb-fault {}: build started", self.name)
    }

    pub fn done_line(&self) -> String {
        format!("nlb-fault {}: done", self.name)
    }

    pub fn expr(&self) -> String {
        let input = if self.input_bytes > 0 {
            format!("head -c {} /dev/urandom > $out", self.input_bytes)
        } else {
            format!("echo input of {} > $out", self.name)
        };
        let mut script = format!("echo '{}'\n", self.started_line());
        if self.sleep_secs > 0 {
            script += &format!("sleep {}\n", self.sleep_secs);
        }
        script += "mkdir $out $dev\necho $input > $out/input-ref\necho $input > $dev/input-ref\n";
        script += "wc -c < $input > $out/input-size\n";
        if self.output_bytes > 0 {
            script += &format!("head -c {} /dev/urandom > $out/blob\n", self.output_bytes);
        }
        if self.marker {
            // Computed here, so the marker is in the output but not in the derivation.
            script += "echo \"NLB-FAULT-$((6*7))-MARKER and some more text\" > $out/marker\n";
        }
        script += &format!("echo '{}'\n", self.done_line());
        let input = DrvExpr::local_input(&self.name, &input);
        let main = DrvExpr::sh(&self.name, "aarch64-linux", &script)
            .outputs(&["out", "dev"])
            .inherit("input");
        rec_set(&[("input", &input), ("main", &main)])
    }

    /// Writes the expression, builds the input locally (`--max-jobs 1`) and instantiates
    /// `main`.
    #[track_caller]
    pub fn prepare(&self, daemon: &LocalDaemon) -> BigPaths {
        let file = daemon.write_file(&format!("{}.nix", self.name), &self.expr());
        let f = file.to_string_lossy().into_owned();
        let input = daemon.nix_build(&[&f, "-A", "input", "--max-jobs", "1"]);
        input.assert_success();
        let drv = daemon.nix_instantiate(&[&f, "-A", "main"]);
        drv.assert_success();
        let drv = drv.stdout.trim().to_owned();
        let mut out = None;
        let mut dev = None;
        for o in daemon.outputs_of(&drv) {
            if o.ends_with("-dev") {
                dev = Some(o);
            } else {
                out = Some(o);
            }
        }
        BigPaths {
            spec: self.clone(),
            file,
            drv,
            input: input.stdout.trim().to_owned(),
            out: out.expect("an out output"),
            dev: dev.expect("a dev output"),
        }
    }
}

/// The store paths of a prepared [`BigDrv`].
#[derive(Clone, Debug)]
pub struct BigPaths {
    pub spec: BigDrv,
    pub file: PathBuf,
    pub drv: String,
    pub input: String,
    pub out: String,
    pub dev: String,
}

impl BigPaths {
    /// `nix-build FILE -A main.out -A main.dev` arguments.
    pub fn build_args(&self) -> Vec<String> {
        vec![
            self.file.to_string_lossy().into_owned(),
            "-A".into(),
            "main.out".into(),
            "-A".into(),
            "main.dev".into(),
        ]
    }

    /// `nix-build` of both outputs through `daemon`, to completion.
    #[track_caller]
    pub fn nix_build(&self, daemon: &LocalDaemon) -> CmdOutput {
        let args = self.build_args();
        daemon.nix_build(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Both outputs valid with their contents, built from the input we sent.
    #[track_caller]
    pub fn assert_built(&self, store: &impl StoreQueries) {
        for p in [&self.out, &self.dev] {
            assert!(store.is_valid(p), "{p} is not valid");
        }
        assert_eq!(
            store.read_store_file(&self.out, "input-ref").trim(),
            self.input
        );
        let size = store.read_store_file(&self.out, "input-size");
        let want = if self.spec.input_bytes > 0 {
            self.spec.input_bytes
        } else {
            format!("input of {}\n", self.spec.name).len() as u64
        };
        assert_eq!(size.trim().parse::<u64>().ok(), Some(want), "input size");
        if self.spec.output_bytes > 0 {
            let len = std::fs::metadata(store.host_path(&self.out).join("blob"))
                .map(|m| m.len())
                .unwrap_or(0);
            assert_eq!(len, self.spec.output_bytes, "size of {}/blob", self.out);
        }
    }

    /// Neither output is valid, nor on disk.
    #[track_caller]
    pub fn assert_absent(&self, store: &impl StoreQueries, what: &str) {
        for p in [&self.out, &self.dev] {
            assert!(!store.is_valid(p), "{what}: {p} is valid");
            assert!(!store.exists_on_disk(p), "{what}: {p} is on disk");
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Phases

/// The three points a fault is injected at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// While the input is copied to the builder.
    Upload,
    /// While the builder builds.
    Build,
    /// While the output is copied back.
    Download,
}

/// Sizes and times for [`phase_drv`]: big enough that each phase lasts seconds.
pub const BIG_INPUT: u64 = 200 * 1024 * 1024;
pub const BIG_OUTPUT: u64 = 200 * 1024 * 1024;
pub const SLOW_BUILD_SECS: u32 = 8;

/// A derivation with one long phase: the one the fault goes into (the others are short, so
/// the test does not pay for all three every time).
pub fn phase_drv(name: &str, phase: Phase) -> BigDrv {
    let d = BigDrv::new(name);
    match phase {
        Phase::Upload => d.input(BIG_INPUT),
        Phase::Build => d.sleep(SLOW_BUILD_SECS),
        Phase::Download => d.output(BIG_OUTPUT),
    }
}

/// Total size of the regular files under `path` (0 if it is not there).
pub fn tree_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    if !meta.is_dir() {
        return 0;
    }
    std::fs::read_dir(path)
        .map(|rd| rd.flatten().map(|e| tree_bytes(&e.path())).sum())
        .unwrap_or(0)
}

/// The local store's unpack directories (`.nlb-unpack-*`), host paths.
pub fn unpack_dirs(daemon: &LocalDaemon) -> Vec<PathBuf> {
    let store = daemon.host_nix_dir().join("store");
    std::fs::read_dir(&store)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(".nlb-unpack-"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// How far the transfer of `phase` has got, in bytes: the input on the builder's disk
/// (`remote_store`: the builder's `/nix/store` on the host), or the output in the local unpack
/// directories.
pub fn transferred(
    phase: Phase,
    paths: &BigPaths,
    remote_store: &Path,
    daemon: &LocalDaemon,
) -> u64 {
    match phase {
        Phase::Upload => {
            let base = paths.input.trim_start_matches("/nix/store/");
            tree_bytes(&remote_store.join(base))
        }
        Phase::Download => unpack_dirs(daemon).iter().map(|d| tree_bytes(d)).sum(),
        Phase::Build => 0,
    }
}

/// Waits until `phase` has begun: its first bytes arrived, or the build said it started.
#[track_caller]
pub fn wait_for_phase(
    phase: Phase,
    build: &mut Background,
    paths: &BigPaths,
    remote_store: &Path,
    daemon: &LocalDaemon,
) {
    let limit = Duration::from_secs(240);
    match phase {
        Phase::Build => {
            build.wait_line(&paths.spec.started_line(), limit);
        }
        Phase::Upload | Phase::Download => {
            let t0 = Instant::now();
            while transferred(phase, paths, remote_store, daemon) == 0 {
                assert!(
                    !build.is_finished(),
                    "the build ended before the {phase:?} began:\n{}",
                    build.stderr_so_far()
                );
                assert!(t0.elapsed() < limit, "no {phase:?} within {limit:?}");
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Whether `phase` is still under way: not all of its bytes have arrived, or the build has not
/// said it is done. Check it right before injecting a fault.
pub fn still_in_phase(
    phase: Phase,
    build: &Background,
    paths: &BigPaths,
    remote_store: &Path,
    daemon: &LocalDaemon,
) -> bool {
    match phase {
        Phase::Build => build.line_at(&paths.spec.done_line()).is_none(),
        Phase::Upload => transferred(phase, paths, remote_store, daemon) < paths.spec.input_bytes,
        Phase::Download => {
            transferred(phase, paths, remote_store, daemon) < paths.spec.output_bytes
        }
    }
}

/// Waits until a random point of `phase` (seeded) and returns a description of the point.
/// Upload and download: a random fraction (5–90 %) of the bytes has arrived. Build: a random
/// time (0–70 % of the sleep, of at most [`SLOW_BUILD_SECS`] of it: a longer sleep is there to
/// outlast what follows the fault, not to spread the point) after the builder's
/// "build started" line reached the client. Panics if the phase passes without being seen.
#[track_caller]
pub fn wait_for_point(
    rng: &mut FaultRng,
    phase: Phase,
    build: &mut Background,
    paths: &BigPaths,
    remote_store: &Path,
    daemon: &LocalDaemon,
) -> String {
    let limit = Duration::from_secs(240);
    match phase {
        Phase::Build => {
            build.wait_line(&paths.spec.started_line(), limit);
            let secs = f64::from(paths.spec.sleep_secs);
            let span = f64::from(paths.spec.sleep_secs.min(SLOW_BUILD_SECS));
            let after = Duration::from_secs_f64(rng.fraction(0.0, 0.7) * span);
            thread::sleep(after);
            assert!(
                build.line_at(&paths.spec.done_line()).is_none(),
                "the build ended before the fault point"
            );
            format!("{after:.2?} into the {secs} s build")
        }
        Phase::Upload | Phase::Download => {
            let total = match phase {
                Phase::Upload => paths.spec.input_bytes,
                _ => paths.spec.output_bytes,
            };
            let f = rng.fraction(0.05, 0.9);
            let want = (total as f64 * f) as u64;
            let t0 = Instant::now();
            loop {
                let got = transferred(phase, paths, remote_store, daemon);
                if got >= want {
                    return format!(
                        "{:.0} % of the {phase:?} ({got} of {total} bytes)",
                        f * 100.0
                    );
                }
                assert!(
                    !build.is_finished(),
                    "the build ended before {want} bytes of the {phase:?} were seen:\n{}",
                    build.stderr_so_far()
                );
                assert!(
                    t0.elapsed() < limit,
                    "{phase:?}: only {got} of {want} bytes after {limit:?}"
                );
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Checks after a fault

/// Waits until nothing but the daemon itself (and, for lazy builders, the supervisor and
/// what it runs: pass its pid) is left in the daemon's namespace; panics naming the strays.
#[track_caller]
pub fn assert_no_strays(daemon: &LocalDaemon, supervisor: Option<u32>, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let strays: Vec<(u32, Vec<String>)> = daemon
            .processes()
            .into_iter()
            .filter(|(p, _)| Some(*p) != supervisor && !descends_from(*p, supervisor))
            .collect();
        if strays.is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "processes left in the daemon's namespace {limit:?} after the fault: {strays:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The `error:` lines the client printed, each also logged under `test`.
pub fn client_errors<'a>(test: &str, out: &'a CmdOutput) -> Vec<&'a str> {
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("error:"))
        .collect();
    for l in &errors {
        eprintln!("[fault] {test}: the client saw: {l}");
    }
    errors
}

/// Nothing invalid or half-written in the local store.
#[track_caller]
pub fn assert_store_clean(daemon: &LocalDaemon, what: &str) {
    daemon.assert_no_leftovers(what);
}

// ------------------------------------------------------------------------------------------------
// The hook killed (fault::hook_kill, fault::term_then_kill)

/// How long the remote build of a hook-fault test's build phase sleeps: far longer than
/// anything the test waits for after the fault, so a remote build seen gone was cancelled, not
/// finished.
pub const LONG_BUILD_SECS: u32 = 90;

/// Within this of a hook's death its remote session and build must be gone (measured: a few
/// milliseconds; the margin is for a loaded 2-core machine).
pub const CANCEL_BOUND: Duration = Duration::from_secs(1);

/// A lazy `kind = "command"` builder `builder` (the harness's real sshd with its own store,
/// booted by the supervisor, `keep-warm = "0s"`: the hook connects itself) behind a real
/// nix-daemon (Nix 2.8) running our hook: the set-up the hook-fault tests share.
pub fn lazy_command_rig(builder: &str, scheme: Scheme) -> (LazyRemote, LazyConfig, LocalDaemon) {
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let cfg = LazyConfig::write(&[remote.command_builder(
        builder,
        scheme,
        // No warm sessions: the hook's own connection is what these tests fault (a warm
        // session belongs to the supervisor, whose pool refills under the same sshd).
        "max-jobs = 1\nidle-timeout = \"120s\"\nboot-timeout = \"60s\"\nkeep-warm = \"0s\"",
    )]);
    let daemon = LocalDaemon::start(cfg.daemon_opts(Duration::from_secs(120)));
    (remote, cfg, daemon)
}

/// `opts` (a machines-table set-up) with a config of ours that turns warm connections off
/// (`[supervisor] keep-warm = "0s"`): the hook connects to the remote itself, which is the
/// connection these tests fault or count; with warm connections the hook would start a
/// supervisor whose pool connects too and stays. Keep the config as long as the daemon.
pub fn without_warm_connections(opts: DaemonOpts) -> (DaemonOpts, tempfile::TempDir) {
    let dir = scratch("nlb-no-warm-", &[]);
    let path = dir.path().join("lazy-builder.toml");
    // The default state directory stays: the tests read the hooks' failure records there.
    write(&path, "[supervisor]\nkeep-warm = \"0s\"\n");
    (
        opts.env(
            nix_lazy_builder::config::CONFIG_ENV_VAR,
            &path.to_string_lossy(),
        ),
        dir,
    )
}

/// Each pid with its command line, for a failure message.
pub fn describe(pids: &[u32]) -> Vec<String> {
    pids.iter()
        .map(|&p| format!("{p}: {}", cmdline(p).unwrap_or_default().join(" ")))
        .collect()
}

/// The hook of the one build running now: a child of a per-client nix-daemon process.
#[track_caller]
pub fn the_hook(daemon: &LocalDaemon) -> u32 {
    let hooks = daemon.hook_pids();
    assert_eq!(hooks.len(), 1, "want one hook, got {hooks:?}");
    let hook = hooks[0];
    let parent = parent_of(hook).expect("the hook's parent");
    let argv = cmdline(parent).unwrap_or_default();
    assert!(
        argv.first().is_some_and(|a| a.contains("nix-daemon")),
        "the hook's parent {parent} is not a nix-daemon process: {argv:?}"
    );
    hook
}

/// The remote side of the hook's build on a lazy `command` machine, seen during its phase:
/// the sshd session's processes and, in the build phase, the remote build itself (a
/// [`LONG_BUILD_SECS`] sleep, [`RemoteSide::see_build`]).
pub struct RemoteSide {
    /// The machine's sshd.
    pub sshd: u32,
    /// The session's processes at the time it was seen.
    pub session: Vec<u32>,
    /// The remote build's sleep (build phase only).
    pub build: Vec<u32>,
    /// Whether everything under `sshd` is this build's (a lazy machine that serves only it),
    /// rather than only `session` and `build` (a remote that also keeps warm sessions).
    pub whole_tree: bool,
}

impl RemoteSide {
    /// Sees the remote session (panics when there is none) once `phase` has begun.
    #[track_caller]
    pub fn seen(test: &str, remote: &LazyRemote, phase: Phase) -> Self {
        let sshd = remote.started_pid().expect("the lazy machine's sshd");
        let session = descendants(sshd);
        eprintln!(
            "[fault] {test}: the remote session: {:#?}",
            describe(&session)
        );
        assert!(
            !session.is_empty(),
            "no remote session under sshd {sshd} during the {phase:?}"
        );
        RemoteSide {
            sshd,
            session,
            build: Vec::new(),
            whole_tree: true,
        }
    }

    /// Sees one running build among others' sessions under `sshd` (a remote whose warm sessions
    /// stay up): its [`LONG_BUILD_SECS`] sleep, and as its session the processes from the
    /// sleep's parent up to the first `sshd` process, not included: that one serves the whole
    /// SSH connection, whose other channels may stay open.
    #[track_caller]
    pub fn seen_build_only(test: &str, sshd: u32) -> Self {
        let mut side = RemoteSide {
            sshd,
            session: Vec::new(),
            build: Vec::new(),
            whole_tree: false,
        };
        side.see_build(test);
        let mut p = parent_of(side.build[0]);
        while let Some(pid) = p.filter(|&p| p != sshd) {
            let is_sshd = cmdline(pid)
                .and_then(|a| a.first().cloned())
                .is_some_and(|a| a.starts_with("sshd"));
            if is_sshd {
                break;
            }
            side.session.push(pid);
            p = parent_of(pid);
        }
        eprintln!(
            "[fault] {test}: the build's remote session: {:#?}",
            describe(&side.session)
        );
        side
    }

    /// Sees the remote build itself running (build phase, at the fault point): its
    /// [`LONG_BUILD_SECS`] sleep among the machine's session processes.
    #[track_caller]
    pub fn see_build(&mut self, test: &str) {
        let b = sleeps_among(&descendants(self.sshd), LONG_BUILD_SECS);
        assert_eq!(
            b.len(),
            1,
            "{test}: want the remote build's `sleep {LONG_BUILD_SECS}` among {:#?}",
            describe(&descendants(self.sshd))
        );
        self.build = b;
    }

    /// Control (build phase): while the hook lives and holds its connection (frozen here for
    /// [`CANCEL_BOUND`]), nothing else ends the remote build, so [`Self::assert_gone_within`]
    /// would see it still running.
    #[track_caller]
    pub fn assert_kept_while_frozen(&self, test: &str, hook: u32) {
        // SAFETY: kill(2) on this daemon's hook (`the_hook`: our binary, child of nix-daemon).
        assert_eq!(unsafe { libc::kill(hook as libc::pid_t, libc::SIGSTOP) }, 0);
        thread::sleep(CANCEL_BOUND);
        let running = sleeps_among(&self.build, LONG_BUILD_SECS);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(hook as libc::pid_t, libc::SIGCONT) }, 0);
        assert_eq!(
            running, self.build,
            "{test}: the remote build ended while its hook was alive (frozen {CANCEL_BOUND:?})"
        );
    }

    /// Waits until every process of the remote side is gone, by pid as seen (a session's
    /// processes may be re-parented once its sshd process goes, so the process tree alone would
    /// lose sight of them) and in the tree now; panics if any is left [`CANCEL_BOUND`] after
    /// `hook_died`. Returns how long it took.
    #[track_caller]
    pub fn assert_gone_within(&self, test: &str, hook_died: Instant) -> Duration {
        let gone = assert_all_gone_within_bound(
            &format!("{test}: the remote session"),
            "the hook died",
            hook_died,
            || {
                let tree = if self.whole_tree {
                    descendants(self.sshd)
                } else {
                    Vec::new()
                };
                self.session
                    .iter()
                    .chain(&self.build)
                    .copied()
                    .chain(tree)
                    .collect()
            },
            String::new,
        );
        eprintln!("[fault] {test}: remote session and build gone {gone:.2?} after the hook died");
        gone
    }
}

/// Waits until none of the processes `pids()` names is alive; panics naming `what` (and
/// `more()`) if any is left [`CANCEL_BOUND`] after `since` (when `event` happened). Returns how
/// long it took.
#[track_caller]
pub fn assert_all_gone_within_bound(
    what: &str,
    event: &str,
    since: Instant,
    mut pids: impl FnMut() -> Vec<u32>,
    more: impl Fn() -> String,
) -> Duration {
    loop {
        let left: Vec<u32> = pids().into_iter().filter(|&p| alive(p)).collect();
        if left.is_empty() {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < CANCEL_BOUND,
            "{what} still runs {:?} after {event}:\n{:#?}{}",
            since.elapsed(),
            describe(&left),
            more()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// The faulted build's `nix-build` fails naming its derivation, without a panic, and leaves
/// none of its outputs.
#[track_caller]
pub fn assert_hook_build_failed(
    test: &str,
    build: Background,
    paths: &BigPaths,
    daemon: &LocalDaemon,
) {
    let out = build.finish(Duration::from_secs(120));
    out.assert_failure();
    assert!(out.stderr.contains(&paths.drv), "{out}");
    assert!(!out.stderr.contains("panicked"), "{out}");
    client_errors(test, &out);
    paths.assert_absent(daemon, test);
}

/// What a SIGKILLed hook may leave: only its own hidden unpack directories (the next hook
/// sweeps them).
#[track_caller]
pub fn assert_only_unpack_leftovers(daemon: &LocalDaemon, hook: u32, test: &str) {
    let left = daemon.invalid_leftovers();
    eprintln!("[fault] {test}: left for the next hook to sweep: {left:?}");
    assert!(
        left.iter()
            .all(|p| p.starts_with(&format!("/nix/store/.nlb-unpack-{hook}-"))),
        "{test}: leftovers other than the killed hook's unpack directory: {left:?}"
    );
}

/// Not wedged: the next build (`name`-next) succeeds on the same machine, booted once, and its
/// hook leaves the store clean (sweeping what a killed one left).
#[track_caller]
pub fn assert_next_build_fine(daemon: &LocalDaemon, cfg: &LazyConfig, builder: &str, name: &str) {
    let next = BigDrv::new(&format!("{name}-next")).prepare(daemon);
    let again = next.nix_build(daemon);
    again.assert_success();
    next.assert_built(daemon);
    assert_store_clean(daemon, &format!("{name}, after the next build"));
    let st = cfg.status_of(daemon, builder);
    assert_eq!(st.boots, 1, "{st:?}");
}
