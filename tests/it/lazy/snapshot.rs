//! `snapshot = true` end to end, through a real nix-daemon, our hook and the supervisor, with
//! the images of examples/vm/make-image (TCG):
//!
//! - cold, then two restores, each after an idle stop, for the aarch64 and the x86_64 image:
//!   each build ran on the right architecture; the guest's clock, read inside the build, is
//!   within 2 s of the host's when its log line arrived; the two restores of one snapshot read
//!   different bytes from /dev/urandom inside the build (and neither the cold boot's); the
//!   client saw "booting builder" for the cold boot and "restoring builder" for the restores;
//!   `status` counts 3 boots, 2 of them restored, and shows the snapshot's age and size; each
//!   instance's first warm session was opened as part of its readiness (a restored one's on
//!   the readiness check's SSH connection) and handed to its build (the supervisor's log);
//! - eight builds arriving at once for the sleeping builder (max-jobs 2): one restore, all
//!   succeed, never more than 2 at once in the VM;
//! - the hook SIGKILLed while a restore is under way: the restore finishes in the supervisor
//!   and nothing is orphaned (no lease, no process of the hook's, the VM powers off when idle,
//!   no invalid path); the next build succeeds.
//!
//! VM tests take the same cross-process lock as `boot::qemu` (one VM test at a time).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::harness::boot;
use crate::harness::fault::{assert_no_strays, assert_store_clean};
use crate::harness::*;
use nix_lazy_builder::supervisor::proto::{BuilderStatus, State};

struct Setup {
    _lock: boot::VmLock,
    cfg: LazyConfig,
    _no_leftover_vm: KillMentioning,
    daemon: LocalDaemon,
    builder: String,
    arch: &'static str,
}

/// The `arch` image's builder with `snapshot = true` and `idle-timeout = idle`, behind a
/// real nix-daemon.
fn setup(arch: &'static str, idle: &str) -> Setup {
    let lock = boot::one_vm_test_at_a_time_blocking();
    let img = boot::vm_image(arch);
    let builder = format!("vm-{arch}");
    let toml = boot::set_key(img.toml.clone(), "snapshot", "true");
    let cfg = LazyConfig::write(&[with_builder_keys(
        &toml,
        &builder,
        &format!("idle-timeout = \"{idle}\"\nboot-timeout = \"3m\""),
    )]);
    let no_leftover = KillMentioning(cfg.state_dir());
    let daemon = LocalDaemon::start(cfg.daemon_opts(Duration::from_secs(300)));
    Setup {
        _lock: lock,
        cfg,
        _no_leftover_vm: no_leftover,
        daemon,
        builder,
        arch,
    }
}

impl Setup {
    fn status(&self) -> BuilderStatus {
        self.cfg.status_of(&self.daemon, &self.builder)
    }

    fn wait_down(&self) -> BuilderStatus {
        self.cfg.wait_for_state(
            &self.daemon,
            &self.builder,
            State::Down,
            Duration::from_secs(60),
        )
    }

    fn restored(&self) -> u32 {
        self.status().snapshot.map_or(0, |s| s.restored)
    }

    fn start_build(&self, name: &str, script: &str) -> Background {
        let expr = DrvExpr::sh(name, &format!("{}-linux", self.arch), script).nix();
        let file = self.daemon.write_file(&format!("{name}.nix"), &expr);
        // `-j 0`: an x86_64-linux derivation would otherwise be built right here (the client's
        // setting is the one the daemon uses).
        Background::nix_build(
            &self.daemon,
            &["-j".into(), "0".into(), file.to_string_lossy().into_owned()],
        )
    }

    /// The content of a build's output.
    #[track_caller]
    fn output(&self, out: &CmdOutput) -> String {
        out.assert_success();
        let path = out.stdout.trim().to_owned();
        assert!(self.daemon.is_valid(&path), "{path} is not valid\n{out}");
        std::fs::read_to_string(self.daemon.host_path(&path))
            .unwrap_or_else(|e| panic!("{path}: {e}\n{out}"))
    }

    /// A derivation that makes the snapshot (the builder's first, cold boot), then lets the
    /// builder power off.
    fn make_snapshot(&self) {
        let out = self
            .start_build("snapshot-first", "uname -m > $out")
            .finish(Duration::from_secs(300));
        assert_eq!(self.output(&out).trim(), self.arch, "{out}");
        assert!(out.stderr.contains("booting builder '"), "{out}");
        let st = self.wait_down();
        let snap = st.snapshot.as_ref().expect("a snapshot builder");
        assert!(
            snap.restorable,
            "no snapshot was made: {st:?}\n{}",
            self.log()
        );
    }

    fn log(&self) -> String {
        self.cfg.supervisor_log()
    }
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs_f64()
}

/// Builds on the builder of `arch`: cold, then restored, then restored again, each after an
/// idle stop; see the module docs.
fn cold_then_two_restores(arch: &'static str) {
    let s = setup(arch, "2s");
    let mut randoms = Vec::new();
    for run in 0..3u32 {
        let name = format!("snapshot-{arch}-{run}");
        // One `adjtimex` for both fields, so they are of the same instant.
        let script = format!(
            "echo 'nlb-vm {name}: building'; \
             t=$(adjtimex | sed -n -e 's/^ *time\\.tv_sec: *//p' -e 's/^ *time\\.tv_usec: *//p'); \
             echo 'nlb-vm {name}: clock' $t; \
             {{ uname -m; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; }} > $out"
        );
        let wall0 = now_unix();
        let mut bg = s.start_build(&name, &script);
        let clock_line = format!("nlb-vm {name}: clock ");
        let seen_at = bg.wait_line(&clock_line, Duration::from_secs(300));
        let out = bg.finish(Duration::from_secs(300));
        let content = s.output(&out);
        let mut lines = content.lines();
        assert_eq!(lines.next(), Some(arch), "not built on {arch}: {content:?}");
        let random = lines.next().unwrap_or_default().to_owned();
        assert_eq!(
            random.len(),
            32,
            "16 bytes of /dev/urandom in hex: {content:?}"
        );
        randoms.push(random);

        let guest: Vec<f64> = out
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix(&clock_line))
            .unwrap_or_else(|| panic!("no clock line:\n{out}"))
            .split_whitespace()
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|e| panic!("clock {v:?}: {e}\n{out}"))
            })
            .collect();
        assert_eq!(guest.len(), 2, "{out}");
        let guest = guest[0] + guest[1] / 1e6;
        let host = wall0 + seen_at.as_secs_f64();
        let skew = guest - host;
        eprintln!("{arch} run {run}: guest clock in the build {skew:+.3} s from the host's");
        assert!(
            skew.abs() < 2.0,
            "run {run}: the guest's clock is {skew:+.3} s off the host's\n{}",
            s.log()
        );

        let (progress, kind) = if run == 0 {
            ("booting builder '", "cold")
        } else {
            ("restoring builder '", "restored")
        };
        assert!(
            out.stderr.contains(&format!("{progress}{}'", s.builder)),
            "run {run} ({kind}): no {progress:?} line at the client\n{out}"
        );
        let st = s.wait_down();
        assert_eq!(st.boots, run + 1, "{st:?}");
        assert!(st.last_failure.is_none(), "{st:?}");
        let snap = st.snapshot.as_ref().expect("a snapshot builder");
        assert_eq!(
            (snap.restored, snap.booted_cold),
            (run, 1),
            "run {run}: {st:?}\n{}",
            s.log()
        );
        assert!(snap.restorable, "{st:?}");
        let files = snap
            .files
            .as_ref()
            .expect("status shows the snapshot's files");
        assert!(
            files.disk_bytes > 0 && files.next_boot == "restore",
            "{files:?}"
        );
        // The builder's first warm session was opened as part of readiness (after a restore on
        // the readiness check's own SSH connection), and this build (the instance's only one)
        // was handed it.
        let log = s.log();
        let warmed = log
            .lines()
            .filter(|l| l.contains("is up after") && l.contains("first warm session is ready"))
            .count();
        let handed = log
            .lines()
            .filter(|l| l.contains("closed: its lazy builder is no longer up (1 hand-out(s))"))
            .count();
        let reused = log
            .lines()
            .filter(|l| l.contains("is the readiness check's"))
            .count();
        // Every restore's; the cold boot closed its own before the snapshot was made.
        let n = run as usize + 1;
        assert_eq!(
            (warmed, handed, reused),
            (n, n, n - 1),
            "run {run} ({kind}): each instance's first warm session is opened at readiness and \
             handed to its build\n{log}"
        );
    }
    eprintln!("{arch}: /dev/urandom in the builds: {randoms:?}");
    assert_ne!(
        randoms[1], randoms[2],
        "two restores of one snapshot read the same bytes from /dev/urandom"
    );
    assert_ne!(randoms[0], randoms[1]);
    assert_ne!(randoms[0], randoms[2]);
    let table = s.cfg.cli(&s.daemon, &["status"]);
    table.assert_success();
    assert!(
        table.stdout.contains("3 (2 restored)") && table.stdout.contains(" old, "),
        "{table}"
    );
    assert_store_clean(&s.daemon, "after three builds");
}

#[test]
fn aarch64_cold_then_two_restores_after_idle_stops() {
    cold_then_two_restores("aarch64");
}

#[test]
fn x86_64_cold_then_two_restores_after_idle_stops() {
    cold_then_two_restores("x86_64");
}

/// Eight builds at once for the sleeping builder (max-jobs 2): one restore, all succeed, at
/// most two at once in the VM (each build records the VM's uptime at its start and end; the
/// eight run in the one restored VM, whose uptime they share).
#[test]
fn eight_builds_at_once_get_one_restore() {
    // Longer than the daemon's poll interval: the builds that found the builder full come
    // back after a `# postpone`, and the builder must still be up for them.
    let s = setup("aarch64", "20s");
    s.make_snapshot();
    let before = s.status();
    assert_eq!((before.boots, s.restored()), (1, 0), "{before:?}");
    let builds: Vec<Background> = (0..8)
        .map(|i| {
            s.start_build(
                &format!("snapshot-par-{i}"),
                "read a _ < /proc/uptime; sleep 2; read b _ < /proc/uptime; echo \"$a $b\" > $out",
            )
        })
        .collect();
    let mut intervals = Vec::new();
    for b in builds {
        let out = b.finish(Duration::from_secs(300));
        let content = s.output(&out);
        let v: Vec<f64> = content
            .split_whitespace()
            .map(|x| x.parse().unwrap_or_else(|e| panic!("{content:?}: {e}")))
            .collect();
        assert_eq!(v.len(), 2, "{content:?}");
        assert!(v[1] - v[0] >= 1.9, "the build did not sleep: {content:?}");
        intervals.push((v[0], v[1]));
    }
    // The uptimes compare only within one instance: the restore count first.
    let st = s.wait_down();
    let log = s.log();
    assert_eq!(st.boots, 2, "{st:?}\n{log}");
    assert_eq!(s.restored(), 1, "{st:?}\n{log}");
    assert_eq!(
        log.matches("restored from the snapshot").count(),
        1,
        "one restore for eight builds:\n{log}"
    );
    let max = max_overlap(&intervals);
    intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
    eprintln!("eight builds after one restore: at most {max} at once; {intervals:?}");
    assert_eq!(
        max, 2,
        "builds at once on a max-jobs 2 builder: {intervals:?}\n{log}"
    );
    assert_store_clean(&s.daemon, "after eight builds");
}

/// The hook is SIGKILLed while the builder is being restored for it: the supervisor finishes
/// the restore, nothing is left behind (no lease, no process of the hook's, the VM powers off
/// when idle), and the next build succeeds.
#[test]
fn hook_killed_during_a_restore_orphans_nothing() {
    let s = setup("aarch64", "2s");
    s.make_snapshot();
    let mut bg = s.start_build("snapshot-killed", "uname -m > $out");
    bg.wait_line(
        &format!("restoring builder '{}'", s.builder),
        Duration::from_secs(120),
    );
    let hooks = s.daemon.hook_pids();
    assert!(!hooks.is_empty(), "no hook to kill");
    for &h in &hooks {
        // SAFETY: kill(2) on a hook of this test's daemon.
        unsafe { libc::kill(h as libc::pid_t, libc::SIGKILL) };
    }
    let st = s.status();
    assert_eq!(
        st.state,
        State::Booting,
        "the restore was over before the kill: {st:?}"
    );
    let out = bg.finish(Duration::from_secs(300));
    eprintln!(
        "the build whose hook was killed {}",
        if out.success() { "succeeded" } else { "failed" }
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
    // The restore was finished for nobody: the builder comes up, holds no lease, and powers
    // off once idle; every process of the daemon's but the supervisor's is gone.
    let st = s.wait_down();
    assert_eq!(st.leases, 0, "{st:?}");
    assert!(st.last_failure.is_none(), "{st:?}\n{}", s.log());
    assert!(s.restored() >= 1, "{st:?}\n{}", s.log());
    assert_no_strays(&s.daemon, s.cfg.supervisor_pid(), Duration::from_secs(10));
    assert!(
        processes_mentioning(&s.cfg.state_dir())
            .iter()
            .all(|(_, argv)| !argv.iter().any(|a| a.contains("qemu-system"))),
        "a QEMU is left: {:?}",
        processes_mentioning(&s.cfg.state_dir())
    );
    assert_store_clean(&s.daemon, "after the killed hook");

    let restored = s.restored();
    let out = s
        .start_build("snapshot-after-kill", "uname -m > $out")
        .finish(Duration::from_secs(300));
    assert_eq!(s.output(&out).trim(), "aarch64", "{out}");
    assert_eq!(s.restored(), restored + 1, "{}", s.log());
    assert_store_clean(&s.daemon, "after the next build");
}
