//! Fault: the hook is stopped mid-build the way Nix 2.35 and later stop it (0255d696c6): SIGTERM
//! to the hook's whole process group (the daemon starts each hook in a session of its own), then,
//! if the hook has not exited within `build-hook-kill-timeout` (500 ms by default, checked every
//! 25 ms; configurable on Nix master after 2.35.2), SIGKILL to the group. A real nix-daemon (2.8,
//! whose hooks also lead their own process group) runs nix-lazy-builder for a lazy
//! `kind = "command"` builder (the harness's real sshd, started by the supervisor); this test,
//! not the daemon, sends the signals, exactly as a newer daemon would.
//!
//! Two moments for the SIGKILL: at the default 500 ms (the hook must be gone by then, having
//! cancelled the remote build and cleaned up, so the SIGKILL finds nothing to kill), and at a
//! seeded point within 15 ms of the SIGTERM: sooner than a daemon can send it (its first look is
//! after 25 ms), so that both signals land while the hook is still cancelling (it needs about
//! 25 ms; the test says when the hook was faster). After each: the build fails; nothing invalid or partial is left in
//! the local store (at once when the hook finished its clean-up, else once the next hook has
//! swept the killed one's unpack directory); the remote build is gone (within seconds when the
//! hook had time to cancel it, else when it ends); the group signals reached neither the
//! supervisor nor the machine it booted (they run in sessions of their own); the lease is
//! released and the next build succeeds.
//!
//! Must never: signal a process group other than this daemon's hook's, or pass without the
//! signals landing during the build.

use std::time::{Duration, Instant};

use nix_lazy_builder::supervisor::proto::State;

use crate::harness::fault::*;
use crate::harness::*;

const BUILDER: &str = "lazy";
/// `build-hook-kill-timeout`'s default.
const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_millis(500);

/// The hook of the one build running now: our binary, a child of a per-client nix-daemon
/// process, leading its own process group.
#[track_caller]
fn the_hook(daemon: &LocalDaemon) -> u32 {
    let hooks = daemon.hook_pids();
    assert_eq!(hooks.len(), 1, "want one hook, got {hooks:?}");
    let hook = hooks[0];
    let parent = parent_of(hook).expect("the hook's parent");
    let argv = cmdline(parent).unwrap_or_default();
    assert!(
        argv.first().is_some_and(|a| a.contains("nix-daemon")),
        "the hook's parent {parent} is not a nix-daemon process: {argv:?}"
    );
    // SAFETY: getpgid(2) has no memory effects.
    let pgid = unsafe { libc::getpgid(hook as libc::pid_t) };
    assert_eq!(
        pgid, hook as libc::pid_t,
        "the daemon did not start hook {hook} as a process-group leader"
    );
    hook
}

/// What the daemon's kill did.
struct Stopped {
    /// The SIGKILL went out (the hook outlived the timeout).
    killed: bool,
    /// From the SIGTERM to the hook's exit.
    gone_after: Duration,
}

/// Nix's `Pid::kill` for a hook: SIGTERM to the group, then SIGKILL to the group at `kill_at`
/// if the hook has not exited by then (Nix looks every 25 ms; this looks every millisecond).
fn stop_like_nix_2_35(hook: u32, kill_at: Duration) -> Stopped {
    let group = -(hook as libc::pid_t);
    let t0 = Instant::now();
    // SAFETY: kill(2) on the process group the daemon made for this hook (checked by
    // `the_hook`: the group's leader is the hook, alive, child of this test's daemon).
    assert_eq!(unsafe { libc::kill(group, libc::SIGTERM) }, 0);
    let mut killed = false;
    while alive(hook) {
        if t0.elapsed() >= kill_at {
            // SAFETY: as above; the leader still runs, so the group is still the hook's.
            unsafe { libc::kill(group, libc::SIGKILL) };
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    wait_until("the hook to die", Duration::from_secs(5), || !alive(hook));
    Stopped {
        killed,
        gone_after: t0.elapsed(),
    }
}

/// When the SIGKILL is due: the daemon's timeout, or a seeded point within the first 15 ms
/// (while the hook is still cancelling).
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// `build-hook-kill-timeout`'s default.
    Default,
    /// Soon after the SIGTERM.
    Soon,
}

fn term_then_kill(scheme: Scheme, when: KillAt) {
    let test = format!(
        "hook stopped like Nix 2.35 (SIGKILL {when:?}) mid-build over {}",
        scheme.prefix()
    );
    let mut rng = FaultRng::new(&test);
    let kill_at = match when {
        KillAt::Default => DEFAULT_KILL_TIMEOUT,
        KillAt::Soon => rng.duration(Duration::ZERO, Duration::from_millis(15)),
    };
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let cfg = LazyConfig::write(&[remote.builder_toml(
        BUILDER,
        scheme,
        &["aarch64-linux"],
        "max-jobs = 1\nidle-timeout = \"120s\"\nboot-timeout = \"60s\"",
        &remote.command_boot(Duration::ZERO),
    )]);
    let daemon = LocalDaemon::start(cfg.daemon_opts(Duration::from_secs(120)));
    let name = format!(
        "fault-ttk-{}-{}",
        format!("{when:?}").to_lowercase(),
        scheme.prefix().replace('-', "")
    );
    let paths = phase_drv(&name, Phase::Build).prepare(&daemon);

    let mut build = Background::nix_build(&daemon, &paths.build_args());
    let store = remote.host_nix_dir().join("store");
    wait_for_phase(Phase::Build, &mut build, &paths, &store, &daemon);
    let hook = the_hook(&daemon);
    let sshd = remote.started_pid().expect("the lazy machine's sshd");
    let session = descendants(sshd);
    assert!(
        !session.is_empty(),
        "no remote session under sshd {sshd} during the build"
    );
    let sup = cfg.supervisor_pid().expect("the supervisor serves");
    assert_eq!(cfg.status_of(&daemon, BUILDER).leases, 1);
    let point = wait_for_point(&mut rng, Phase::Build, &mut build, &paths, &store, &daemon);
    assert!(
        still_in_phase(Phase::Build, &build, &paths, &store, &daemon),
        "the build ended before the signals"
    );
    let stopped = stop_like_nix_2_35(hook, kill_at);
    eprintln!(
        "[fault] {test}: stopped hook {hook} at {point}; gone after {:.2?}, {} (due at {kill_at:.2?})",
        stopped.gone_after,
        if stopped.killed {
            "SIGKILL sent"
        } else {
            "exited before the SIGKILL"
        }
    );
    // The hook's side of the contract: it cancels and exits within the daemon's default
    // build-hook-kill-timeout, so the SIGKILL finds nothing to kill.
    if matches!(when, KillAt::Default) {
        assert!(
            !stopped.killed,
            "{test}: hook {hook} still ran {kill_at:?} after the SIGTERM; Nix 2.35 SIGKILLs it there"
        );
    }
    let out = build.finish(Duration::from_secs(120));
    out.assert_failure();
    assert!(out.stderr.contains(&paths.drv), "{out}");
    assert!(!out.stderr.contains("panicked"), "{out}");
    client_errors(&test, &out);
    paths.assert_absent(&daemon, &test);

    // The group signals stayed in the hook's group.
    assert!(
        alive(sup),
        "{test}: the supervisor {sup} died with the hook's group"
    );
    assert!(
        alive(sshd),
        "{test}: the lazy machine died with the hook's group"
    );

    // The remote build: cancelled by the hook when it had the time; otherwise it runs out.
    let limit = if stopped.killed {
        Duration::from_secs(u64::from(SLOW_BUILD_SECS) + 20)
    } else {
        Duration::from_secs(5)
    };
    let t1 = Instant::now();
    loop {
        let left: Vec<u32> = session
            .iter()
            .copied()
            .chain(descendants(sshd))
            .filter(|&p| alive(p))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t1.elapsed() < limit,
            "{test}: the remote build still runs {:?} after the hook died: {left:?}",
            t1.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "[fault] {test}: remote build gone {:.2?} after the hook",
        t1.elapsed()
    );
    wait_until("the lease to be released", Duration::from_secs(5), || {
        cfg.status_of(&daemon, BUILDER).leases == 0
    });
    let st = cfg.status_of(&daemon, BUILDER);
    assert_eq!((st.state, st.leases), (State::Up, 0), "{st:?}");
    assert_no_strays(&daemon, Some(sup), Duration::from_secs(10));
    if stopped.killed {
        let left = daemon.invalid_leftovers();
        eprintln!("[fault] {test}: left for the next hook to sweep: {left:?}");
        assert!(
            left.iter()
                .all(|p| p.starts_with(&format!("/nix/store/.nlb-unpack-{hook}-"))),
            "{test}: leftovers other than the killed hook's unpack directory: {left:?}"
        );
    } else {
        assert_store_clean(&daemon, &format!("{test}, right after the hook exited"));
    }

    // Not wedged: the next build succeeds on the same machine, booted once.
    let next = BigDrv::new(&format!("{name}-next")).prepare(&daemon);
    let again = next.nix_build(&daemon);
    again.assert_success();
    next.assert_built(&daemon);
    assert_store_clean(&daemon, &format!("{test}, after the next build"));
    assert_eq!(cfg.status_of(&daemon, BUILDER).boots, 1);
    assert_eq!(
        cfg.supervisor_pid(),
        Some(sup),
        "the supervisor was replaced"
    );
}

#[test]
fn default_timeout_mid_build_over_ssh() {
    term_then_kill(Scheme::Ssh, KillAt::Default);
}

#[test]
fn default_timeout_mid_build_over_ssh_ng() {
    term_then_kill(Scheme::SshNg, KillAt::Default);
}

#[test]
fn sigkill_while_the_hook_cancels_mid_build_over_ssh_ng() {
    term_then_kill(Scheme::SshNg, KillAt::Soon);
}
