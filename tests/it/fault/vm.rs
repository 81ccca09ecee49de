//! Faults around a real QEMU VM builder: the aarch64 builder image from examples/vm/make-image
//! (Debian kernel + initramfs with dropbear and Nix 2.8, TCG here) as a lazy builder of a real
//! nix-daemon (Nix 2.8) that runs nix-lazy-builder as its build hook.
//!
//! - The supervisor is SIGKILLed at a random point (seeded, printed) while the VM boots: the
//!   QEMU it started must not survive it (the boot watchdog kills the process group; gone
//!   within 1 s), nothing invalid is left, and the next build (a new supervisor, a fresh VM)
//!   succeeds.
//! - QEMU is SIGKILLed at a random point of a build running in the VM: the build fails with a
//!   clear message that names the builder, well within 15 s; the supervisor notices (status:
//!   failed, "exited on its own: qemu was killed by signal 9", a first backoff of at most
//!   10 s left); once the backoff has run out, the next build boots a fresh VM and succeeds.
//! - QEMU is frozen (SIGSTOP) mid-build, a VM that stops answering without closing anything:
//!   the hook's SSH keepalive declares it dead within about 15 s and the build fails; the
//!   hook tells the supervisor, which replaces the VM, so the next build succeeds.
//!
//! VM tests take the same cross-process lock as `boot::qemu` (one VM test at a time).
//!
//! Must never: leave a QEMU running (every process that names the test's state directory is
//! killed when the test ends, pass or fail), or signal a QEMU that is not this test's.

use std::time::{Duration, Instant};

use nix_lazy_builder::supervisor::proto::State;

use crate::harness::fault::*;
use crate::harness::*;

const BUILDER: &str = "vm-aarch64";

/// A QEMU whose supervisor was SIGKILLed must be gone within this (measured: tens of
/// milliseconds; the margin is for a loaded 2-core machine).
const QEMU_GONE_WITHIN: Duration = Duration::from_secs(1);

/// This test's QEMU processes.
fn qemus(cfg: &LazyConfig) -> Vec<u32> {
    processes_mentioning(&cfg.state_dir())
        .into_iter()
        .filter(|(_, argv)| argv.first().is_some_and(|a| a.contains("qemu-system")))
        .map(|(p, _)| p)
        .collect()
}

/// An aarch64 derivation that records `uname -m`, says it started, and sleeps `secs` in the VM.
fn vm_expr(name: &str, secs: u32) -> String {
    DrvExpr::sh(
        name,
        "aarch64-linux",
        &format!(
            "echo 'nlb-vm {name}: build started'; sleep {secs}; uname -m > $out; echo 'nlb-vm {name}: done'"
        ),
    )
    .nix()
}

fn vm_build(daemon: &LocalDaemon, name: &str, secs: u32) -> Background {
    let file = daemon.write_file(&format!("{name}.nix"), &vm_expr(name, secs));
    Background::nix_build(daemon, &[file.to_string_lossy().into_owned()])
}

/// A build in the VM that must succeed and really run there.
#[track_caller]
fn build_ok(daemon: &LocalDaemon, name: &str) -> CmdOutput {
    let out = vm_build(daemon, name, 0).finish(Duration::from_secs(300));
    out.assert_success();
    let path = out.stdout.trim().to_owned();
    assert_eq!(
        std::fs::read_to_string(daemon.host_path(&path))
            .unwrap_or_default()
            .trim(),
        "aarch64",
        "not built in the aarch64 VM"
    );
    out
}

fn vm_setup() -> LazyVm {
    LazyVm::start(
        "aarch64",
        "idle-timeout = \"120s\"\nboot-timeout = \"3m\"",
        Duration::from_secs(300),
    )
}

#[test]
fn supervisor_killed_while_the_vm_boots() {
    let test = "supervisor killed while the VM boots";
    let mut rng = FaultRng::new(test);
    let LazyVm { cfg, daemon, .. } = &vm_setup();

    let mut build = vm_build(daemon, "fault-vm-boot", 0);
    wait_until("QEMU to start", Duration::from_secs(60), || {
        !qemus(cfg).is_empty() || build.is_finished()
    });
    let qemu = *qemus(cfg).first().expect("a QEMU for the build");
    let st = cfg.status_of(daemon, BUILDER);
    assert_eq!(st.state, State::Booting, "{st:?}");
    // A random point of the boot (it takes 4–7 s under TCG here).
    let after = rng.duration(Duration::ZERO, Duration::from_secs(3));
    std::thread::sleep(after);
    let st = cfg.status_of(daemon, BUILDER);
    assert_eq!(
        st.state,
        State::Booting,
        "the boot ended before the fault: {st:?}"
    );
    let sup = cfg.supervisor_pid().expect("a supervisor");
    // SAFETY: kill(2) on this test's supervisor (its pid from its hello on our state dir).
    assert_eq!(unsafe { libc::kill(sup as libc::pid_t, libc::SIGKILL) }, 0);
    let t0 = Instant::now();
    let gone = wait_until(
        "QEMU to die with its supervisor",
        Duration::from_secs(10),
        || !alive(qemu),
    );
    eprintln!(
        "[fault] {test}: killed supervisor {sup} {:.2?} into the boot; QEMU {qemu} gone {gone:.2?} later",
        st.booting_ms.map(Duration::from_millis).unwrap_or(after)
    );
    // The watchdog reads a pipe only the supervisor writes and kills the group at its EOF:
    // at once (measured: tens of milliseconds, this wait's 20 ms polls included).
    assert!(
        gone < QEMU_GONE_WITHIN,
        "{test}: QEMU {qemu} outlived its supervisor by {gone:?}"
    );
    // The hook starts a new supervisor at its next try, which boots a new VM: the build may
    // well succeed. Either way nothing half-done may be valid.
    let out = build.finish(Duration::from_secs(300));
    eprintln!(
        "[fault] {test}: the interrupted build {} after {:.2?}",
        if out.success() { "succeeded" } else { "failed" },
        t0.elapsed()
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
    assert!(!alive(qemu), "the first QEMU came back?");
    assert_store_clean(daemon, test);
    let sup2 = cfg.supervisor_pid();
    assert_ne!(sup2, Some(sup));
    assert_no_strays(daemon, sup2, Duration::from_secs(10));
    for p in qemus(cfg) {
        assert!(
            sup2.is_some_and(|s| descends_from(p, Some(s))),
            "QEMU {p} is not the new supervisor's"
        );
    }

    // The next build succeeds (on the new supervisor's VM).
    build_ok(daemon, "fault-vm-boot-next");
    let st = cfg.status_of(daemon, BUILDER);
    assert_eq!(st.state, State::Up, "{st:?}");
    assert_store_clean(daemon, &format!("{test}, next build"));
    eprintln!("[fault] {test}: survived");
}

/// Waits for a build's start line in the VM, then a random point into its sleep.
fn into_the_build(rng: &mut FaultRng, build: &mut Background, name: &str, secs: u32) -> Duration {
    build.wait_line(
        &format!("nlb-vm {name}: build started"),
        Duration::from_secs(300),
    );
    let after = rng.duration(
        Duration::ZERO,
        Duration::from_secs_f64(f64::from(secs) * 0.6),
    );
    std::thread::sleep(after);
    assert!(
        build.line_at(&format!("nlb-vm {name}: done")).is_none(),
        "the build ended before the fault"
    );
    after
}

/// Sets up the VM ([`vm_setup`]), builds `name` (a 20 s build) on it, sends `sig` to its QEMU
/// at a random point of the build (from `test`'s [`FaultRng`]), and checks the build fails
/// with an error naming the builder. Returns the set-up, the QEMU's pid and how long after the
/// signal the build failed.
fn signal_qemu_mid_build(test: &str, name: &str, sig: libc::c_int) -> (LazyVm, u32, Duration) {
    let mut rng = FaultRng::new(test);
    let vm = vm_setup();
    let LazyVm { cfg, daemon, .. } = &vm;
    let mut build = vm_build(daemon, name, 20);
    let after = into_the_build(&mut rng, &mut build, name, 20);
    let qemu = *qemus(cfg).first().expect("the VM's QEMU");
    let t0 = Instant::now();
    // SAFETY: kill(2) on this test's QEMU (its command line names our state directory).
    assert_eq!(unsafe { libc::kill(qemu as libc::pid_t, sig) }, 0);
    let out = build.finish(Duration::from_secs(120));
    let failed_after = t0.elapsed();
    out.assert_failure();
    let errors = client_errors(test, &out);
    eprintln!(
        "[fault] {test}: signal {sig} to QEMU {after:.2?} into the build; nix-build failed {failed_after:.2?} later"
    );
    assert!(
        errors
            .iter()
            .any(|l| l.contains("building on 'ssh://root@127.0.0.1")),
        "no error naming the builder:\n{out}"
    );
    (vm, qemu, failed_after)
}

#[test]
fn qemu_killed_mid_build() {
    let test = "QEMU killed mid-build";
    let (vm, qemu, failed_after) = signal_qemu_mid_build(test, "fault-vm-kill", libc::SIGKILL);
    let LazyVm { cfg, daemon, .. } = &vm;
    assert!(failed_after < Duration::from_secs(15), "{failed_after:?}");
    assert_store_clean(daemon, test);

    // The supervisor noticed.
    let st = cfg.wait_for_state(daemon, BUILDER, State::Failed, Duration::from_secs(10));
    let f = st.last_failure.clone().expect("the failure is remembered");
    assert!(
        f.cause.contains("exited on its own: ") && f.cause.contains("killed by signal 9"),
        "{f:?}"
    );
    // With a backoff: the first failure in a row waits 10 s, some of which has passed.
    assert_eq!(f.consecutive, 1, "{f:?}");
    assert!(
        f.retry_in_ms > 0 && f.retry_in_ms <= 10_000,
        "no backoff after the failure: {f:?}"
    );
    assert_eq!(st.leases, 0, "{st:?}");
    let sup = cfg.supervisor_pid();
    assert_no_strays(daemon, sup, Duration::from_secs(10));
    assert!(qemus(cfg).is_empty());

    // Once the backoff has run out, the next build boots a fresh VM.
    std::thread::sleep(Duration::from_millis(f.retry_in_ms + 200));
    build_ok(daemon, "fault-vm-kill-next");
    let st = cfg.status_of(daemon, BUILDER);
    assert_eq!((st.state, st.boots), (State::Up, 2), "{st:?}");
    let fresh = qemus(cfg);
    assert_eq!(fresh.len(), 1);
    assert_ne!(fresh[0], qemu);
    assert_store_clean(daemon, &format!("{test}, next build"));
    eprintln!("[fault] {test}: survived");
}

#[test]
fn frozen_vm_is_given_up_by_keepalive_and_replaced() {
    let test = "QEMU frozen (SIGSTOP) mid-build";
    let (vm, qemu, failed_after) = signal_qemu_mid_build(test, "fault-vm-freeze", libc::SIGSTOP);
    let LazyVm { cfg, daemon, .. } = &vm;
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(20)).contains(&failed_after),
        "not given up by the keepalive (about 15 s): {failed_after:?}"
    );
    assert_store_clean(daemon, test);

    // The hook told the supervisor, which replaced the frozen VM: the next build succeeds
    // (once any backoff has run out) on a fresh one, and the frozen QEMU is gone.
    wait_until(
        "the frozen QEMU to be killed",
        Duration::from_secs(30),
        || !alive(qemu),
    );
    let st = cfg.status_of(daemon, BUILDER);
    eprintln!("[fault] {test}: status after the failure: {st:?}");
    if let Some(f) = &st.last_failure {
        std::thread::sleep(Duration::from_millis(f.retry_in_ms + 200));
    }
    build_ok(daemon, "fault-vm-freeze-next");
    let st = cfg.status_of(daemon, BUILDER);
    assert_eq!((st.state, st.boots), (State::Up, 2), "{st:?}");
    assert_store_clean(daemon, &format!("{test}, next build"));
    assert_no_strays(daemon, cfg.supervisor_pid(), Duration::from_secs(10));
    eprintln!("[fault] {test}: survived");
}
