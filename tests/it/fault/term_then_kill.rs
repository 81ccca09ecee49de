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
//! 25 ms; the test says when the hook was faster). After each: the build fails; nothing invalid
//! or partial is left in the local store (at once when the hook finished its clean-up, else
//! once the next hook has swept the killed one's unpack directory); the remote build (one that
//! would sleep 90 s, seen running before the signals and, as a control, still running while
//! the hook is frozen) is gone within 1 s of the hook's death either way (its connection going
//! away is what cancels it); the group signals reached neither the supervisor nor the machine
//! it booted (they run in sessions of their own); the lease is released and the next build
//! succeeds.
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

/// The hook of the one build running now ([`the_hook`]), leading its own process group.
#[track_caller]
fn the_group_leading_hook(daemon: &LocalDaemon) -> u32 {
    let hook = the_hook(daemon);
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
    // `the_group_leading_hook`: the group's leader is the hook, alive, child of this test's daemon).
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
    let (remote, cfg, daemon) = lazy_command_rig(BUILDER, scheme);
    let name = format!(
        "fault-ttk-{}-{}",
        format!("{when:?}").to_lowercase(),
        scheme.prefix().replace('-', "")
    );
    let paths = BigDrv::new(&name).sleep(LONG_BUILD_SECS).prepare(&daemon);

    let mut build = Background::nix_build(&daemon, &paths.build_args());
    let store = remote.host_nix_dir().join("store");
    wait_for_phase(Phase::Build, &mut build, &paths, &store, &daemon);
    let hook = the_group_leading_hook(&daemon);
    let mut side = RemoteSide::seen(&test, &remote, Phase::Build);
    let sshd = side.sshd;
    let sup = cfg.supervisor_pid().expect("the supervisor serves");
    assert_eq!(cfg.status_of(&daemon, BUILDER).leases, 1);
    let point = wait_for_point(&mut rng, Phase::Build, &mut build, &paths, &store, &daemon);
    assert!(
        still_in_phase(Phase::Build, &build, &paths, &store, &daemon),
        "the build ended before the signals"
    );
    // The remote build, seen running, and kept while the hook lives (the control for the
    // check after the signals).
    side.see_build(&test);
    side.assert_kept_while_frozen(&test, hook);
    let stopped = stop_like_nix_2_35(hook, kill_at);
    let hook_died = Instant::now();
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
    assert_hook_build_failed(&test, build, &paths, &daemon);

    // The group signals stayed in the hook's group.
    assert!(
        alive(sup),
        "{test}: the supervisor {sup} died with the hook's group"
    );
    assert!(
        alive(sshd),
        "{test}: the lazy machine died with the hook's group"
    );

    // The remote build: cancelled by the hook when it had the time, else by the kernel
    // closing the killed hook's connection; either way at once.
    side.assert_gone_within(&test, hook_died);
    wait_until("the lease to be released", Duration::from_secs(5), || {
        cfg.status_of(&daemon, BUILDER).leases == 0
    });
    let st = cfg.status_of(&daemon, BUILDER);
    assert_eq!((st.state, st.leases), (State::Up, 0), "{st:?}");
    assert_no_strays(&daemon, Some(sup), Duration::from_secs(10));
    if stopped.killed {
        assert_only_unpack_leftovers(&daemon, hook, &test);
    } else {
        assert_store_clean(&daemon, &format!("{test}, right after the hook exited"));
    }

    // Not wedged: the next build succeeds on the same machine, booted once.
    assert_next_build_fine(&daemon, &cfg, BUILDER, &name);
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
