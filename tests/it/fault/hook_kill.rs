//! Fault: the hook is killed. A real nix-daemon (Nix 2.8) runs nix-lazy-builder as its build
//! hook for a lazy `kind = "command"` builder (the harness's real sshd with its own store,
//! started by the supervisor). At a random point (seeded, printed) of the input upload
//! (200 MiB), the build (one that would sleep 90 s, faulted within its first 6 s) or the output
//! download (200 MiB), the hook process of that build (found as the child of the daemon's
//! per-client process that runs our binary) gets
//! - SIGKILL, or
//! - SIGTERM, as current Nix sends it; Nix SIGKILLs 500 ms later, and a hook still alive then
//!   fails the test.
//!
//! After each fault: the remote session and the build it ran are gone within 1 s of the hook's
//! death (measured: milliseconds; checked by pid in the remote's process list, the remote build
//! seen running before the fault, and, as a control, still running while the hook is frozen);
//! the build fails; the hook's lease is released (`status` shows 0 leases); nothing invalid or
//! partial is left in the local store (after SIGTERM at the moment the hook is gone, after
//! SIGKILL once the next hook has swept the killed one's unpack directory); nothing but the
//! supervisor (and the machine it runs) is left in the daemon's namespace; and the next build
//! succeeds.
//!
//! Must never: signal a process that is not this daemon's hook, or pass without the signal
//! landing inside its phase.

use std::time::{Duration, Instant};

use nix_lazy_builder::supervisor::proto::State;

use crate::harness::fault::*;
use crate::harness::*;

const BUILDER: &str = "lazy";

/// Current Nix SIGKILLs a hook this long after its SIGTERM.
const NIX_SIGKILL_AFTER: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    /// SIGKILL only.
    Kill,
    /// SIGTERM, then SIGKILL after 500 ms if the hook still runs (current Nix).
    TermThenKill,
}

fn hook_killed(phase: Phase, kill: Kill, scheme: Scheme) {
    let test = format!("hook {kill:?} during {phase:?} over {}", scheme.prefix());
    let mut rng = FaultRng::new(&test);
    let (remote, cfg, daemon) = lazy_command_rig(BUILDER, scheme);
    let name = format!(
        "fault-hk-{}-{}-{}",
        format!("{kill:?}").to_lowercase(),
        format!("{phase:?}").to_lowercase(),
        scheme.prefix()
    );
    let paths = match phase {
        Phase::Build => BigDrv::new(&name).sleep(LONG_BUILD_SECS),
        _ => phase_drv(&name, phase),
    }
    .prepare(&daemon);

    let mut build = Background::nix_build(&daemon, &paths.build_args());
    let store = remote.host_nix_dir().join("store");
    // Who is who, once the phase has begun; then the random point, then the signal at once.
    wait_for_phase(phase, &mut build, &paths, &store, &daemon);
    let hook = the_hook(&daemon);
    let mut side = RemoteSide::seen(&test, &remote, phase);
    assert_eq!(cfg.status_of(&daemon, BUILDER).leases, 1);
    let point = wait_for_point(&mut rng, phase, &mut build, &paths, &store, &daemon);
    assert!(
        still_in_phase(phase, &build, &paths, &store, &daemon),
        "the {phase:?} ended before the fault"
    );
    if phase == Phase::Build {
        // The remote build itself, seen running before the fault, and kept while the hook
        // lives (the control for the check after the fault).
        side.see_build(&test);
        side.assert_kept_while_frozen(&test, hook);
    }
    let t0 = Instant::now();
    let signal = match kill {
        Kill::Kill => libc::SIGKILL,
        Kill::TermThenKill => libc::SIGTERM,
    };
    // SAFETY: kill(2) on this daemon's hook (checked above: our binary, child of nix-daemon).
    assert_eq!(unsafe { libc::kill(hook as libc::pid_t, signal) }, 0);
    if kill == Kill::TermThenKill {
        while alive(hook) && t0.elapsed() < NIX_SIGKILL_AFTER {
            std::thread::sleep(Duration::from_millis(5));
        }
        if alive(hook) {
            // SAFETY: as above; the hook is still alive, so its pid is still its own.
            unsafe { libc::kill(hook as libc::pid_t, libc::SIGKILL) };
            panic!(
                "{test}: hook {hook} still ran {NIX_SIGKILL_AFTER:?} after SIGTERM (Nix SIGKILLs it \
                 then); it must have cleaned up and gone by then"
            );
        }
    }
    wait_until("the hook to die", Duration::from_secs(5), || !alive(hook));
    let hook_gone = t0.elapsed();
    if kill == Kill::TermThenKill {
        // It cleaned up after itself before it went: nothing waits for a later sweep.
        assert_store_clean(&daemon, &format!("{test}, right after the SIGTERM exit"));
    }
    eprintln!(
        "[fault] {test}: signalled hook {hook} at {point}; it was gone after {hook_gone:.2?}"
    );
    let hook_died = Instant::now();

    // The remote side of the build, gone within CANCEL_BOUND of the hook's death. What cancels
    // it is the hook's connection going away: after SIGTERM the hook drops it as it exits,
    // after SIGKILL the kernel closes it; sshd then closes the remote program's stdin, which
    // the remote Nix watches: a NAR stream breaks at once, a build is stopped.
    side.assert_gone_within(&test, hook_died);

    assert_hook_build_failed(&test, build, &paths, &daemon);

    // The lease went with the hook.
    let released = wait_until("the lease to be released", Duration::from_secs(5), || {
        cfg.status_of(&daemon, BUILDER).leases == 0
    });
    let st = cfg.status_of(&daemon, BUILDER);
    assert_eq!((st.state, st.leases), (State::Up, 0), "{st:?}");
    eprintln!("[fault] {test}: lease released {released:.2?} after the remote session was gone");
    assert!(alive(side.sshd), "the machine itself must stay up");
    let sup = cfg.supervisor_pid().expect("the supervisor serves");
    assert_no_strays(&daemon, Some(sup), Duration::from_secs(10));
    if kill == Kill::TermThenKill {
        assert_store_clean(&daemon, &format!("{test}, after the SIGTERM"));
    } else {
        assert_only_unpack_leftovers(&daemon, hook, &test);
    }

    // Not wedged: the next build succeeds on the same machine, and its hook sweeps what the
    // killed one left.
    assert_next_build_fine(&daemon, &cfg, BUILDER, &name);
    wait_until("the next build's lease", Duration::from_secs(5), || {
        cfg.status_of(&daemon, BUILDER).leases == 0
    });
    assert_no_strays(&daemon, Some(sup), Duration::from_secs(10));
    eprintln!("[fault] {test}: survived");
}

#[test]
fn hook_sigkilled_during_upload_over_ssh() {
    hook_killed(Phase::Upload, Kill::Kill, Scheme::Ssh);
}

#[test]
fn hook_sigkilled_during_upload_over_ssh_ng() {
    hook_killed(Phase::Upload, Kill::Kill, Scheme::SshNg);
}

#[test]
fn hook_sigkilled_during_build_over_ssh() {
    hook_killed(Phase::Build, Kill::Kill, Scheme::Ssh);
}

#[test]
fn hook_sigkilled_during_build_over_ssh_ng() {
    hook_killed(Phase::Build, Kill::Kill, Scheme::SshNg);
}

#[test]
fn hook_sigkilled_during_download_over_ssh() {
    hook_killed(Phase::Download, Kill::Kill, Scheme::Ssh);
}

#[test]
fn hook_sigkilled_during_download_over_ssh_ng() {
    hook_killed(Phase::Download, Kill::Kill, Scheme::SshNg);
}

#[test]
fn hook_sigtermed_during_upload_over_ssh() {
    hook_killed(Phase::Upload, Kill::TermThenKill, Scheme::Ssh);
}

#[test]
fn hook_sigtermed_during_upload_over_ssh_ng() {
    hook_killed(Phase::Upload, Kill::TermThenKill, Scheme::SshNg);
}

#[test]
fn hook_sigtermed_during_build_over_ssh() {
    hook_killed(Phase::Build, Kill::TermThenKill, Scheme::Ssh);
}

#[test]
fn hook_sigtermed_during_build_over_ssh_ng() {
    hook_killed(Phase::Build, Kill::TermThenKill, Scheme::SshNg);
}

#[test]
fn hook_sigtermed_during_download_over_ssh() {
    hook_killed(Phase::Download, Kill::TermThenKill, Scheme::Ssh);
}

#[test]
fn hook_sigtermed_during_download_over_ssh_ng() {
    hook_killed(Phase::Download, Kill::TermThenKill, Scheme::SshNg);
}
