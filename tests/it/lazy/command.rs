//! Lazy builders end to end with `kind = "command"`: a real nix-daemon runs our binary as its
//! build hook with nothing but a lazy-builder TOML (NIX_LAZY_BUILDER_CONFIG) and the
//! `build-hook` line; the hook auto-starts the supervisor, which starts the remote machine (the
//! harness's real sshd with its own Nix store, [`LazyRemote`]) only when a build needs it, and
//! stops it after `idle-timeout`.
//!
//! Covers: boot on demand with a slow boot (the first build must not fail because the builder
//! was not ready: nix-rosetta-builder#15, virby#9), the progress line, one boot, the idle stop;
//! a build longer than the idle timeout; 8 concurrent builds against max-jobs 2; boot failures
//! and boot timeouts (one-line reason, backoff in `status`, fallback to another builder); the
//! supervisor SIGKILLed mid-build (no orphan, nothing invalid, the next build starts a new one).
//!
//! Must never: pass without a real remote build on the lazily started machine, or leave one of
//! its processes running (every handle kills what it started when dropped).

use std::time::{Duration, Instant};

use nix_lazy_builder::supervisor::proto::State;

use crate::harness::*;

/// How long the auto-started supervisor stays once everything is down: long enough for the
/// test to read `status` (boots, state) after the idle stop.
const LINGER: Duration = Duration::from_secs(60);

/// The first stderr line (and when it came) that contains `needle`.
fn first_line<'a>(lines: &'a [TimedLine], needle: &str) -> Option<&'a TimedLine> {
    lines.iter().find(|l| l.text.contains(needle))
}

/// A machine, a config whose one builder `name` is a command builder that boots it after
/// `delay` with `settings`, and a daemon running our hook on that config.
fn one_command_builder(
    name: &str,
    delay: Duration,
    settings: &str,
) -> (LazyRemote, LazyConfig, LocalDaemon) {
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let cfg = LazyConfig::write(&[remote.delayed_command_builder(name, delay, settings)]);
    let daemon = LocalDaemon::start(cfg.daemon_opts(LINGER));
    (remote, cfg, daemon)
}

/// A slow fake derivation `name` (6 s, one log line) instantiated in `daemon`, and its file.
fn slow_drv(daemon: &LocalDaemon, name: &str) -> (FakeDrvPaths, String) {
    let paths = FakeDrv::new(name)
        .with_log_lines(1)
        .slow(6)
        .instantiate(daemon);
    let file = paths.file.to_string_lossy().into_owned();
    (paths, file)
}

/// Waits (at most 60 s) until the build `h` runs on the lazy machine (`builder` holds a lease);
/// panics if `h` ended before.
#[track_caller]
fn wait_until_it_runs<T>(
    cfg: &LazyConfig,
    daemon: &LocalDaemon,
    builder: &str,
    h: &std::thread::ScopedJoinHandle<'_, T>,
) {
    wait_until(
        "the build to run on the lazy machine",
        Duration::from_secs(60),
        || h.is_finished() || cfg.status_of(daemon, builder).leases == 1,
    );
    assert!(!h.is_finished(), "nix-build ended before its build ran");
}

#[test]
fn command_builder_boots_on_demand_builds_and_stops_when_idle() {
    let boot_delay = Duration::from_secs(2);
    let idle = Duration::from_secs(3);
    let (remote, cfg, daemon) = one_command_builder(
        "cmd",
        boot_delay,
        "max-jobs = 1\nidle-timeout = \"3s\"\nboot-timeout = \"60s\"",
    );

    // Before any build nothing runs: no sshd, nothing on its port, no supervisor.
    assert!(!remote.listening(), "port {} is taken", remote.port());
    assert!(remote.processes().is_empty());
    assert!(cfg.supervisor_pid().is_none());
    let before = cfg.status_of(&daemon, "cmd");
    assert_eq!((before.state, before.boots), (State::Down, 0), "{before:?}");

    let drv = FakeDrv::new("lazy-cmd").with_log_lines(3);
    let paths = drv.instantiate(&daemon);
    let file = paths.file.to_string_lossy().into_owned();
    let (out, lines) = nix_build_streaming(&daemon, &[&file, "-A", "main.out", "-A", "main.dev"]);
    let build_done = Instant::now();
    out.assert_success();
    assert_eq!(
        out.stdout_lines(),
        vec![paths.out.clone(), paths.dev.clone()]
    );
    paths.assert_built(&daemon, true);
    assert!(remote.is_valid(&paths.out), "not built on the lazy machine");
    assert!(daemon.invalid_leftovers().is_empty());

    // The client saw the boot, then the build's own log.
    let booting = first_line(&lines, "booting builder 'cmd'")
        .unwrap_or_else(|| panic!("no boot progress line in the client's stderr:\n{out}"));
    let first_log = first_line(&lines, "nlb-log lazy-cmd: line 1 of 3")
        .unwrap_or_else(|| panic!("no build log line in the client's stderr:\n{out}"));
    assert!(booting.at < first_log.at, "{out}");
    assert!(
        !out.stderr.contains("error"),
        "the first build after a cold start reported an error:\n{out}"
    );
    eprintln!(
        "command builder: '{}' at {:.2?}, first build log line at {:.2?}, nix-build took {:.2?}",
        booting.text, booting.at, first_log.at, out.elapsed
    );

    // Booted exactly once, by the supervisor, and serving now.
    // (The hook's lease goes with its connection, a moment after the build.)
    wait_until(
        "the hook's lease to be released",
        Duration::from_secs(10),
        || cfg.status_of(&daemon, "cmd").leases == 0,
    );
    let up = cfg.status_of(&daemon, "cmd");
    assert_eq!(up.boots, 1, "{up:?}");
    let sshd = remote
        .started_pid()
        .expect("the boot command wrote its pid");
    assert!(
        up.state == State::Up || !alive(sshd),
        "status {up:?} while sshd {sshd} runs"
    );
    assert_eq!(up.leases, 0, "{up:?}");
    assert!(
        remote.processes().contains(&sshd),
        "sshd {sshd} is not among the machine's processes {:?}",
        remote.processes()
    );
    let log = cfg.supervisor_log();
    assert!(log.contains("booting builder 'cmd' (boot 1)"), "{log}");
    assert!(log.contains("builder 'cmd' is up after"), "{log}");

    // Stopped `idle-timeout` after the last build: not before, and not much later. (The hook
    // releases its lease a moment before nix-build returns: allow for that.)
    let slack = Duration::from_millis(500);
    std::thread::sleep((build_done + idle / 2).saturating_duration_since(Instant::now()));
    let (still_up, at) = (alive(sshd), build_done.elapsed());
    if at < idle - slack {
        assert!(
            still_up,
            "sshd stopped {at:?} after the build, before its idle timeout"
        );
    }
    wait_until("the idle stop of sshd", Duration::from_secs(30), || {
        !alive(sshd)
    });
    let stopped_after = build_done.elapsed();
    eprintln!("command builder: stopped {stopped_after:.2?} after the build ended");
    assert!(stopped_after >= idle - slack, "{stopped_after:?}");
    wait_until(
        "no process of the lazy machine",
        Duration::from_secs(10),
        || remote.processes().is_empty(),
    );
    assert!(!remote.listening());
    let down = cfg.wait_for_state(&daemon, "cmd", State::Down, Duration::from_secs(10));
    assert_eq!(down.boots, 1, "{down:?}");
    assert!(down.last_failure.is_none(), "{down:?}");
    let log = cfg.supervisor_log();
    // From the supervisor's own clock: the lease went with the hook, the stop came 3 s later.
    let released = log_time(
        &log,
        "a client went away holding 1 lease(s) on 'cmd': released",
    );
    let stopping = log_time(&log, "builder 'cmd' has been idle for 3s: stopping it");
    let idle_for = stopping - released;
    eprintln!("command builder: the supervisor stopped it {idle_for:.3} s after the last release");
    assert!((2.95..5.0).contains(&idle_for), "{idle_for}\n{log}");
    let first_gap = ready_to_build_gap(&cfg, "cmd", 0, booting, first_log);

    // The first cold start had no boot history (the guess is 30 s), so its hook postponed and
    // the build waited for the daemon's next poll:
    assert!(
        out.stderr.contains("waiting for a machine to build"),
        "{out}"
    );

    // Another cold start: the supervisor now knows how long a boot takes (~2.4 s here), within
    // the hook's bounded wait (`lazy::wait_limit`: the daemon's 5 s poll interval), so the hook
    // waits for it within its `try` and the build starts right after the builder is ready.
    // That needs a boot, and a boot history, that fit in the wait: a machine slowed down by
    // other work may boot slower, so up to three cold starts are made, and the test fails,
    // saying so, if none fits.
    let limit = nix_lazy_builder::lazy::wait_limit(5);
    let fits = |ms: u64| Duration::from_millis(ms + ms / 10) + Duration::from_millis(300) < limit;
    let mut tried = Vec::new();
    for boot in 1..=3 {
        let expected = cfg
            .status_of(&daemon, "cmd")
            .expected_boot_ms
            .expect("a boot history");
        let name = format!("lazy-cmd-{}", boot + 1);
        let drv = FakeDrv::new(&name).with_log_lines(1);
        let paths = drv.instantiate(&daemon);
        let file = paths.file.to_string_lossy().into_owned();
        let (out, lines) =
            nix_build_streaming(&daemon, &[&file, "-A", "main.out", "-A", "main.dev"]);
        out.assert_success();
        paths.assert_built(&daemon, true);
        assert!(remote.is_valid(&paths.out));
        let again = cfg.status_of(&daemon, "cmd");
        assert_eq!(again.boots as usize, boot + 1, "{again:?}");
        let booting = first_line(&lines, "booting builder 'cmd'")
            .unwrap_or_else(|| panic!("no boot progress line for boot {}:\n{out}", boot + 1));
        let first_log = first_line(&lines, &format!("nlb-log {name}: line 1 of 1"))
            .unwrap_or_else(|| panic!("no build log line:\n{out}"));
        let gap = ready_to_build_gap(&cfg, "cmd", boot, booting, first_log);
        let took = boot_ms(&cfg, "cmd", boot);
        eprintln!(
            "command builder: builder ready -> first build log line: {first_gap:.2?} on the first \
             cold start (no boot history: postponed to the daemon's next poll), {gap:.2?} on \
             boot {} (expected {expected} ms, took {took} ms)",
            boot + 1
        );
        if fits(expected) && fits(took) {
            assert!(
                !out.stderr.contains("waiting for a machine to build"),
                "the hook postponed a boot that was {took} ms from done:\n{out}"
            );
            assert!(gap < Duration::from_secs(1), "{gap:?}\n{out}");
            return;
        }
        tried.push((expected, took));
        eprintln!(
            "command builder: boot {} (expected {expected} ms, took {took} ms) does not fit the \
             hook's {limit:?} wait; another cold start",
            boot + 1
        );
        cfg.wait_for_state(&daemon, "cmd", State::Down, Duration::from_secs(30));
    }
    panic!(
        "no cold start fitted the hook's {limit:?} wait, so the wait within a `try` was never \
         checked: (expected, took) ms of the boots: {tried:?}"
    );
}

/// How long boot number `boot` (from 0) of `builder` took, from the supervisor's boot history.
fn boot_ms(cfg: &LazyConfig, builder: &str, boot: usize) -> u64 {
    let text = std::fs::read_to_string(cfg.state_dir().join("boot-times.json"))
        .expect("the supervisor's boot history");
    let v: serde_json::Value = serde_json::from_str(&text).expect("boot history JSON");
    v["builders"][builder][boot]
        .as_u64()
        .unwrap_or_else(|| panic!("no boot {boot} of '{builder}' in {text}"))
}

/// The time of day (seconds) of the first supervisor log line that contains `needle`.
#[track_caller]
fn log_time(log: &str, needle: &str) -> f64 {
    let line = log
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no log line with {needle:?}:\n{log}"));
    // `2026-11-28T16:49:41.274986Z  INFO …`
    let time = line
        .split_whitespace()
        .next()
        .and_then(|t| t.split_once('T'))
        .map(|(_, t)| t.trim_end_matches('Z'))
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"));
    let parts: Vec<f64> = time
        .split(':')
        .map(|p| p.parse().unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect();
    assert_eq!(parts.len(), 3, "{line:?}");
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

/// From "builder ready" to the first build log line at the client: the boot's progress line
/// comes right after the boot started, the supervisor's boot history says how long boot
/// number `boot` took.
fn ready_to_build_gap(
    cfg: &LazyConfig,
    builder: &str,
    boot: usize,
    booting: &TimedLine,
    first_log: &TimedLine,
) -> Duration {
    let ms = boot_ms(cfg, builder, boot);
    let ready_at = booting.at + Duration::from_millis(ms);
    eprintln!(
        "boot {} of '{builder}' took {ms} ms; progress line at {:.2?}, first log line at {:.2?}",
        boot + 1,
        booting.at,
        first_log.at
    );
    first_log.at.saturating_sub(ready_at)
}

#[test]
fn build_longer_than_the_idle_timeout_is_never_cut_short() {
    let idle = Duration::from_secs(2);
    let (remote, cfg, daemon) = one_command_builder(
        "slow",
        Duration::ZERO,
        "max-jobs = 1\nidle-timeout = \"2s\"\nboot-timeout = \"60s\"",
    );
    let (paths, file) = slow_drv(&daemon, "lazy-slow");

    let build = std::thread::scope(|s| {
        let h =
            s.spawn(|| nix_build_streaming(&daemon, &[&file, "-A", "main.out", "-A", "main.dev"]));
        // Wait until the build runs on the machine, then watch it for longer than the idle
        // timeout: the builder holds a lease, shows no idle countdown, and sshd stays.
        wait_until_it_runs(&cfg, &daemon, "slow", &h);
        let sshd = remote.started_pid().expect("sshd pid");
        let t0 = Instant::now();
        let mut seen = 0;
        let mut hook_rss = Vec::new();
        while t0.elapsed() < idle * 2 && !h.is_finished() {
            hook_rss.extend(daemon.hook_pids().into_iter().filter_map(rss_kib));
            let st = cfg.status_of(&daemon, "slow");
            if st.leases == 1 {
                seen += 1;
                assert_eq!(st.state, State::Up, "{st:?}");
                assert_eq!(
                    st.idle_stop_in_ms, None,
                    "an idle countdown while a build runs: {st:?}"
                );
            }
            assert!(alive(sshd), "sshd {sshd} stopped during the build");
            std::thread::sleep(Duration::from_millis(250));
        }
        assert!(seen >= 4, "the build was watched only {seen} times");
        assert!(
            !hook_rss.is_empty(),
            "no hook process seen during the build"
        );
        eprintln!(
            "[measure] hook RSS during a remote build: {} KiB ({})",
            hook_rss.iter().max().copied().unwrap_or(0),
            lazy_binary().display()
        );
        (h.join().expect("build thread"), sshd)
    });
    let ((out, _), sshd) = build;
    out.assert_success();
    paths.assert_built(&daemon, true);
    assert!(
        out.elapsed > idle * 3,
        "the build did not outlast the idle timeout: {:?}",
        out.elapsed
    );
    let st = cfg.status_of(&daemon, "slow");
    assert_eq!(st.boots, 1, "{st:?}\n{}\n{out}", cfg.supervisor_log());
    assert!(st.last_failure.is_none(), "{st:?}");
    // Only now, idle, is it stopped.
    wait_until(
        "the idle stop after the build",
        Duration::from_secs(30),
        || !alive(sshd),
    );
    // The supervisor with nothing to do (every builder down, nobody connected).
    let sup = cfg.supervisor_pid().expect("the supervisor lingers");
    std::thread::sleep(Duration::from_millis(300));
    let rss = rss_kib(sup).expect("the supervisor's VmRSS");
    eprintln!(
        "[measure] supervisor idle RSS: {rss} KiB ({})",
        lazy_binary().display()
    );
    let log = cfg.supervisor_log();
    assert_eq!(
        log.matches("has been idle for 2s: stopping it").count(),
        1,
        "{log}"
    );
}

/// `n` aarch64 derivations named `<prefix>-<i>` that each sleep `secs` and record, in `$out`,
/// when they started and ended (seconds of the machine's uptime, shared by every namespace).
fn timestamped_drvs(prefix: &str, n: usize, secs: u32) -> String {
    let names: Vec<String> = (1..=n).map(|i| nix_str(&format!("{prefix}-{i}"))).collect();
    // `$name`: the builder's environment holds every attribute, its name too.
    let mk = DrvExpr::named_by(
        "name",
        "aarch64-linux",
        &format!(
            "read s _ < /proc/uptime; echo \"nlb-par $name: started at $s\"; sleep {secs}; read e _ < /proc/uptime; echo \"$s $e\" > $out"
        ),
    );
    format!(
        "let mk = name: {};\nin map mk [ {} ]\n",
        mk.nix(),
        names.join(" ")
    )
}

/// The most intervals that overlap at one instant (touching ends do not overlap).
#[test]
fn eight_concurrent_builds_one_boot_never_more_than_max_jobs() {
    assert_eq!(max_overlap(&[(0.0, 2.0), (2.0, 4.0), (1.0, 3.0)]), 2);
    assert_eq!(max_overlap(&[(0.0, 5.0), (1.0, 2.0), (1.5, 3.0)]), 3);

    let (remote, cfg, daemon) = one_command_builder(
        "par",
        Duration::from_secs(1),
        "max-jobs = 2\nidle-timeout = \"30s\"\nboot-timeout = \"60s\"",
    );
    // Two clients at once (so two hooks race to boot the builder), four derivations each in
    // one nix-build (so one daemon process runs several hooks).
    let files: Vec<String> = ["a", "b"]
        .iter()
        .map(|c| {
            daemon
                .write_file(
                    &format!("par-{c}.nix"),
                    &timestamped_drvs(&format!("lazy-par-{c}"), 4, 2),
                )
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // Instantiate first, one client at a time: two first connections to a fresh store at the
    // same moment can race in Nix 2.8's database set-up ("Connection reset by peer").
    for f in &files {
        let drvs = daemon.nix_instantiate(&[f.as_str()]);
        drvs.assert_success();
        assert_eq!(drvs.stdout_lines().len(), 4, "{drvs}");
    }
    let t0 = Instant::now();
    let outs: Vec<CmdOutput> = std::thread::scope(|s| {
        let hs: Vec<_> = files
            .iter()
            .map(|f| s.spawn(|| daemon.nix_build(&[f.as_str(), "-j", "16"])))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let took = t0.elapsed();
    let mut intervals = Vec::new();
    for out in &outs {
        assert!(
            out.success(),
            "{out}\n--- daemon ---\n{}",
            daemon.daemon_log()
        );
        let paths = out.stdout_lines();
        assert_eq!(paths.len(), 4, "{out}");
        for p in paths {
            assert!(daemon.is_valid(&p));
            assert!(remote.is_valid(&p), "{p} was not built on the lazy machine");
            let text = std::fs::read_to_string(daemon.host_path(&p))
                .unwrap_or_else(|e| panic!("{p}: {e}"));
            intervals.push(slept_interval(&text, &p));
        }
    }
    let max = max_overlap(&intervals);
    intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
    eprintln!(
        "8 builds on one max-jobs 2 builder took {took:.2?}; at most {max} at once; runs (s from the first start): {:?}",
        runs_from_first(&intervals)
    );
    assert_eq!(
        max, 2,
        "builds at once on a max-jobs 2 builder: {intervals:?}"
    );
    wait_until(
        "every lease to be released",
        Duration::from_secs(10),
        || cfg.status_of(&daemon, "par").leases == 0,
    );
    let st = cfg.status_of(&daemon, "par");
    assert_eq!(st.boots, 1, "{st:?}\n{}", cfg.supervisor_log());
    assert_eq!((st.state, st.leases), (State::Up, 0), "{st:?}");
    assert_eq!(
        cfg.supervisor_log()
            .matches("booting builder 'par'")
            .count(),
        1,
        "{}",
        cfg.supervisor_log()
    );
    assert!(daemon.invalid_leftovers().is_empty());
}

/// A builder whose boot command is `script` (run by /bin/sh), on `remote`'s address and keys.
fn scripted_builder(remote: &LazyRemote, name: &str, script: &str, settings: &str) -> String {
    remote.builder_toml(
        name,
        Scheme::Ssh,
        &["aarch64-linux"],
        settings,
        &format!(
            "kind = \"command\"\ncommand = {}\n",
            toml_list(&["/bin/sh", "-c", script])
        ),
    )
}

const FAILING_BOOT: &str =
    "echo 'starting the machine'; echo 'vm-start: cannot allocate 4096 MiB' >&2; exit 1";

/// Lines of `text` that contain every one of `words`.
fn lines_with<'a>(text: &'a str, words: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .collect()
}

/// A daemon with `max-jobs = 0` for `cfg`, and the fake derivation's input already built.
fn daemon_without_local_builds(cfg: &LazyConfig, name: &str) -> (LocalDaemon, FakeDrvPaths) {
    let mut opts = cfg.daemon_opts(LINGER);
    opts.max_jobs = 0;
    let daemon = LocalDaemon::start(opts);
    let paths = FakeDrv::new(name).build_input(&daemon);
    (daemon, paths)
}

fn build_main(daemon: &LocalDaemon, paths: &FakeDrvPaths) -> CmdOutput {
    let file = paths.file.to_string_lossy().into_owned();
    daemon.nix_build(&[&file, "-A", "main.out", "-A", "main.dev"])
}

/// Nix's own verdict when nothing could build the derivation.
fn assert_nix_could_not_build(out: &CmdOutput, paths: &FakeDrvPaths) {
    assert!(
        out.stderr.contains(&format!(
            "error: a 'aarch64-linux' with features {{}} is required to build '{}'",
            paths.drv
        )),
        "{out}"
    );
}

#[test]
fn boot_command_that_fails_says_why_backs_off_and_the_build_fails() {
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let cfg = LazyConfig::write(&[scripted_builder(
        &remote,
        "broken",
        FAILING_BOOT,
        "boot-timeout = \"20s\"\nidle-timeout = \"30s\"",
    )]);
    let (daemon, paths) = daemon_without_local_builds(&cfg, "lazy-broken");

    let out = build_main(&daemon, &paths);
    out.assert_failure();
    assert_nix_could_not_build(&out, &paths);
    // One line says which builder failed to boot and why (the command's last words).
    let cause = "boot command /bin/sh exited with status 1 before it was ready";
    let said = lines_with(
        &out.stderr,
        &["'broken'", cause, "vm-start: cannot allocate 4096 MiB"],
    );
    assert!(
        !said.is_empty(),
        "no line names the builder and the cause:\n{out}"
    );
    assert_eq!(
        lines_with(
            &out.stderr,
            &["warning: lazy builder 'broken' did not boot: "]
        )
        .len(),
        1,
        "{out}"
    );
    assert!(!daemon.is_valid(&paths.out) && !daemon.is_valid(&paths.dev));
    assert!(daemon.invalid_leftovers().is_empty());

    // Remembered, with backoff, across hooks: the next build fails at once without a boot.
    let st = cfg.status_of(&daemon, "broken");
    assert_eq!((st.state, st.boots), (State::Failed, 1), "{st:?}");
    let f = st.last_failure.clone().expect("the failure is remembered");
    assert!(f.cause.starts_with(cause), "{f:?}");
    // Every boot failure names the log to read next.
    assert!(
        f.cause.ends_with(&format!(
            ": vm-start: cannot allocate 4096 MiB; log: {}",
            cfg.state_dir()
                .join("builders/broken/command.log")
                .display()
        )),
        "{f:?}"
    );
    assert!(!f.cause.contains('\n'));
    assert_eq!(f.consecutive, 1, "{f:?}");
    assert!(f.retry_in_ms > 0 && f.retry_in_ms <= 10_000, "{f:?}");
    let table = cfg.cli(&daemon, &["status"]);
    table.assert_success();
    assert!(
        lines_with(
            &table.stdout,
            &[
                "broken",
                "failed",
                "vm-start: cannot allocate 4096 MiB",
                "(not booted again for another "
            ]
        )
        .len()
            == 1,
        "{table}"
    );

    let again = build_main(&daemon, &paths);
    again.assert_failure();
    assert_nix_could_not_build(&again, &paths);
    let said = lines_with(
        &again.stderr,
        &[
            "warning: no builder for aarch64-linux: 'broken' failed recently (",
            "vm-start: cannot allocate 4096 MiB",
            ") and is not tried again for another ",
            "s. Nothing retries this build: it fails now; start it again in ",
            "s or later, or boot 'broken' at once with `nix-lazy-builder up broken`",
        ],
    );
    assert_eq!(said.len(), 1, "{again}");
    assert!(!again.stderr.contains("booting builder"), "{again}");
    assert_eq!(
        cfg.status_of(&daemon, "broken").boots,
        1,
        "booted again during its backoff"
    );
}

#[test]
fn boot_that_never_gets_ready_times_out_and_is_cleaned_up() {
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    // Runs, but never opens the port.
    let pidfile = remote.dir().join("hung.pid");
    let script = format!("echo $$ > {}; exec sleep 600", pidfile.display());
    let cfg = LazyConfig::write(&[scripted_builder(
        &remote,
        "hung",
        &script,
        "boot-timeout = \"2s\"\nidle-timeout = \"30s\"",
    )]);
    let (daemon, paths) = daemon_without_local_builds(&cfg, "lazy-hung");

    let out = build_main(&daemon, &paths);
    out.assert_failure();
    assert_nix_could_not_build(&out, &paths);
    let cause = format!(
        "no SSH banner on 127.0.0.1:{} within boot-timeout (waited 2s; last try: connection \
         refused); its logs are empty; raise boot-timeout (now 2s) if it is only slow; log: \
         {}",
        remote.port(),
        cfg.state_dir().join("builders/hung/command.log").display()
    );
    assert_eq!(
        lines_with(
            &out.stderr,
            &["warning: lazy builder 'hung' did not boot: ", &cause]
        )
        .len(),
        1,
        "{out}"
    );
    // The boot was expected within the hook's short wait (3 s; the boot timeout is 2 s), so the
    // hook waited for it and saw the failure in the same `try`, instead of postponing to the
    // daemon's next poll (5 s).
    assert!(out.elapsed < Duration::from_secs(5), "{out}");
    let st = cfg.status_of(&daemon, "hung");
    assert_eq!((st.state, st.boots), (State::Failed, 1), "{st:?}");
    assert_eq!((st.boots_ok, st.boots_failed), (0, 1), "{st:?}");
    let f = st.last_failure.expect("remembered");
    assert_eq!(f.cause, cause);
    assert!(f.retry_in_ms > 0, "{f:?}");
    // The command that hung was killed.
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("the boot command ran")
        .trim()
        .parse()
        .expect("a pid");
    wait_until(
        "the hung boot command to be killed",
        Duration::from_secs(10),
        || !alive(pid),
    );
    assert!(daemon.invalid_leftovers().is_empty());
}

#[test]
fn a_builder_that_fails_to_boot_is_skipped_for_a_working_one() {
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let other = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    // The broken one is faster, so it is chosen first.
    let cfg = LazyConfig::write(&[
        scripted_builder(
            &other,
            "broken",
            FAILING_BOOT,
            "speed-factor = 2\nboot-timeout = \"20s\"\nidle-timeout = \"30s\"",
        ),
        remote.delayed_command_builder(
            "good",
            Duration::ZERO,
            "boot-timeout = \"20s\"\nidle-timeout = \"30s\"",
        ),
    ]);
    let (daemon, paths) = daemon_without_local_builds(&cfg, "lazy-fallback");

    let out = build_main(&daemon, &paths);
    out.assert_success();
    paths.assert_built(&daemon, true);
    assert!(
        remote.is_valid(&paths.out),
        "not built on the working builder"
    );
    assert!(!other.is_valid(&paths.out));
    assert_eq!(
        lines_with(
            &out.stderr,
            &[
                "warning: lazy builder 'broken' did not boot: ",
                "vm-start: cannot allocate 4096 MiB"
            ]
        )
        .len(),
        1,
        "{out}"
    );
    assert!(
        out.stderr
            .contains(&format!("on '{}'", remote.uri(Scheme::Ssh))),
        "{out}"
    );
    let st = cfg.status(&daemon);
    let by = |n: &str| st.iter().find(|s| s.name == n).cloned().expect("builder");
    assert_eq!(
        (by("broken").state, by("broken").boots),
        (State::Failed, 1),
        "{st:?}"
    );
    // (Its backoff may have run out during the build; the failure is still shown.)
    let f = by("broken").last_failure.expect("remembered");
    assert_eq!(f.consecutive, 1, "{f:?}");
    assert!(
        f.cause
            .contains("vm-start: cannot allocate 4096 MiB; log: "),
        "{f:?}"
    );
    assert_eq!(
        (by("good").state, by("good").boots),
        (State::Up, 1),
        "{st:?}"
    );
    assert!(by("good").last_failure.is_none());
}

#[test]
fn supervisor_killed_mid_build_leaves_no_orphan_and_a_new_one_takes_over() {
    let (remote, cfg, daemon) = one_command_builder(
        "victim",
        Duration::ZERO,
        "max-jobs = 1\nidle-timeout = \"30s\"\nboot-timeout = \"60s\"",
    );
    let (paths, file) = slow_drv(&daemon, "lazy-victim");

    let (out, killed, sshd) = std::thread::scope(|s| {
        let h = s.spawn(|| daemon.nix_build(&[&file, "-A", "main.out", "-A", "main.dev"]));
        wait_until_it_runs(&cfg, &daemon, "victim", &h);
        let sshd = remote.started_pid().expect("sshd pid");
        assert!(alive(sshd));
        let pid = cfg.supervisor_pid().expect("a supervisor serves");
        // SAFETY: kill(2) on the supervisor the hook started (its pid came from its hello).
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
        (h.join().expect("build thread"), pid, sshd)
    });
    eprintln!(
        "supervisor {killed} killed mid-build; the build {}",
        if out.success() { "completed" } else { "failed" }
    );
    assert!(!alive(killed));
    // The build either completed (its SSH session does not need the supervisor) or failed
    // cleanly; either way nothing half-done is valid locally.
    if out.success() {
        paths.assert_built(&daemon, true);
    } else {
        assert!(
            out.stderr.contains(&paths.drv),
            "a failure that does not name the derivation:\n{out}"
        );
        assert!(!daemon.is_valid(&paths.out) && !daemon.is_valid(&paths.dev));
    }
    assert!(daemon.invalid_leftovers().is_empty());
    // The machine died with its supervisor: the sshd it started is gone at once, the session
    // that served the build ends with the build.
    wait_until(
        "sshd to die with the supervisor",
        Duration::from_secs(10),
        || !alive(sshd),
    );
    wait_until(
        "no process of the lazy machine left",
        Duration::from_secs(20),
        || remote.processes().is_empty(),
    );
    assert!(!remote.listening());

    // The next build starts a new supervisor, which boots the machine again.
    let drv2 = FakeDrv::new("lazy-after-kill").with_log_lines(1);
    let (paths2, out2) = drv2.build(&daemon, &[]);
    out2.assert_success();
    paths2.assert_built(&daemon, true);
    assert!(remote.is_valid(&paths2.out));
    let new = cfg.supervisor_pid().expect("a new supervisor serves");
    assert_ne!(new, killed);
    let st = cfg.status_of(&daemon, "victim");
    assert_eq!((st.state, st.boots), (State::Up, 1), "{st:?}");
    let again = remote.started_pid().expect("sshd pid");
    assert_ne!(again, sshd);
    assert!(alive(again));
    assert!(daemon.invalid_leftovers().is_empty());
}
