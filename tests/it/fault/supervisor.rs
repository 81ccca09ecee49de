//! Fault: the supervisor is SIGKILLed while builds hold leases. A real nix-daemon (Nix 2.8)
//! runs nix-lazy-builder as its build hook for a lazy `kind = "command"` builder with
//! `max-jobs = 2` (the harness's real sshd with its own store, started by the supervisor);
//! two `nix-build`s run 8 s builds on it at once, and at a random point (seeded, printed) of
//! those builds the supervisor the first hook auto-started is SIGKILLed.
//!
//! After the fault: the machine it started dies with it (its boot watchdog kills the process
//! group: sshd is gone at once), the sessions of the two builds end, and no process of the
//! machine is left; each build either completed (its SSH session did not need the supervisor)
//! or failed naming its derivation, and nothing invalid or partial is in the local store;
//! nothing is left in the daemon's namespace; the next build starts a new supervisor, which
//! boots the machine again, and succeeds.
//!
//! Must never: kill a supervisor that is not this test's (its pid comes from its own hello on
//! this test's state directory), or pass without both leases held at the fault.

use std::time::{Duration, Instant};

use nix_lazy_builder::supervisor::proto::State;

use crate::harness::fault::*;
use crate::harness::*;

const BUILDER: &str = "leased";

#[test]
fn supervisor_killed_while_builds_hold_leases() {
    let test = "supervisor killed while two builds hold leases";
    let mut rng = FaultRng::new(test);
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let cfg = LazyConfig::write(&[remote.builder_toml(
        BUILDER,
        Scheme::Ssh,
        &["aarch64-linux"],
        "max-jobs = 2\nidle-timeout = \"120s\"\nboot-timeout = \"60s\"",
        &remote.command_boot(Duration::ZERO),
    )]);
    let daemon = LocalDaemon::start(cfg.daemon_opts(Duration::from_secs(120)));
    let drvs: Vec<BigPaths> = ["a", "b"]
        .iter()
        .map(|s| phase_drv(&format!("fault-sup-{s}"), Phase::Build).prepare(&daemon))
        .collect();

    let mut builds: Vec<Background> = drvs
        .iter()
        .map(|p| Background::nix_build(&daemon, &p.build_args()))
        .collect();
    for (b, p) in builds.iter_mut().zip(&drvs) {
        b.wait_line(&p.spec.started_line(), Duration::from_secs(120));
    }
    let t0 = Instant::now();
    let st = cfg.status_of(&daemon, BUILDER);
    assert_eq!((st.state, st.leases), (State::Up, 2), "{st:?}");
    let sshd = remote.started_pid().expect("the machine's sshd");
    let sup = cfg.supervisor_pid().expect("a supervisor serves");
    // The point: a random time into the builds (they started within a moment of each other).
    let secs = f64::from(SLOW_BUILD_SECS);
    let after = Duration::from_secs_f64(rng.fraction(0.0, 0.6) * secs);
    std::thread::sleep(after.saturating_sub(t0.elapsed()));
    for (b, p) in builds.iter().zip(&drvs) {
        assert!(
            b.line_at(&p.spec.done_line()).is_none(),
            "a build ended before the fault"
        );
    }
    let machine = remote.processes();
    // SAFETY: kill(2) on this test's supervisor (its pid from its hello on our state dir).
    assert_eq!(unsafe { libc::kill(sup as libc::pid_t, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    eprintln!(
        "[fault] {test}: killed supervisor {sup} {after:.2?} into the builds (machine: {} processes)",
        machine.len()
    );
    wait_until("the supervisor to die", Duration::from_secs(5), || {
        !alive(sup)
    });
    let sshd_gone = wait_until(
        "the machine's sshd to die with the supervisor",
        Duration::from_secs(10),
        || !alive(sshd),
    );

    let outs: Vec<CmdOutput> = builds
        .into_iter()
        .map(|b| b.finish(Duration::from_secs(120)))
        .collect();
    let mut completed = 0;
    for (out, p) in outs.iter().zip(&drvs) {
        if out.success() {
            completed += 1;
            p.assert_built(&daemon);
        } else {
            assert!(out.stderr.contains(&p.drv), "{out}");
            assert!(!out.stderr.contains("panicked"), "{out}");
            p.assert_absent(&daemon, test);
        }
    }
    // Every process the machine had at the fault (sessions, builds) ends, and no new one runs.
    let builds_done = killed.elapsed();
    wait_until(
        "no process of the machine left",
        Duration::from_secs(u64::from(SLOW_BUILD_SECS) + 20),
        || machine.iter().all(|&p| !alive(p)) && remote.processes().is_empty(),
    );
    eprintln!(
        "[fault] {test}: sshd gone {sshd_gone:.2?} after the kill; {completed} of 2 builds completed, {builds_done:.2?} after the kill; no process of the machine left {:.2?} after it",
        killed.elapsed()
    );
    assert!(!remote.listening());
    assert_store_clean(&daemon, test);
    assert_no_strays(&daemon, None, Duration::from_secs(10));

    // The next build starts a new supervisor, which boots the machine again.
    let next = BigDrv::new("fault-sup-next").prepare(&daemon);
    let again = next.nix_build(&daemon);
    again.assert_success();
    next.assert_built(&daemon);
    let new = cfg.supervisor_pid().expect("a new supervisor");
    assert_ne!(new, sup);
    let st = cfg.status_of(&daemon, BUILDER);
    assert_eq!((st.state, st.boots), (State::Up, 1), "{st:?}");
    let sshd2 = remote.started_pid().expect("sshd again");
    assert_ne!(sshd2, sshd);
    assert!(alive(sshd2));
    assert_store_clean(&daemon, &format!("{test}, next build"));
    wait_until("the next build's lease", Duration::from_secs(5), || {
        cfg.status_of(&daemon, BUILDER).leases == 0
    });
    assert_no_strays(&daemon, Some(new), Duration::from_secs(10));
    eprintln!("[fault] {test}: survived");
}
