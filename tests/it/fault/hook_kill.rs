//! Fault: the hook is killed. A real nix-daemon (Nix 2.8) runs nix-lazy-builder as its build
//! hook for a lazy `kind = "command"` builder (the harness's real sshd with its own store,
//! started by the supervisor). At a random point (seeded, printed) of the input upload
//! (200 MiB), the build (8 s) or the output download (200 MiB), the hook process of that build
//! (found as the child of the daemon's per-client process that runs our binary) gets
//! - SIGKILL, or
//! - SIGTERM and, 500 ms later if it still runs, SIGKILL: what current Nix does.
//!
//! After each fault: the build fails; the hook's lease is released (`status` shows 0 leases);
//! on SIGTERM the hook is gone within Nix's 500 ms and has cancelled the remote build (no
//! process of the remote session is left soon after: checked in the remote's process tree);
//! nothing invalid or partial is left in the local store (after SIGTERM at once, after SIGKILL
//! once the next hook has swept the killed one's unpack directory); nothing but the supervisor
//! (and the machine it runs) is left in the daemon's namespace; and the next build succeeds.
//!
//! Must never: signal a process that is not this daemon's hook, or pass without the signal
//! landing inside its phase.

use std::time::{Duration, Instant};

use nix_lazy_builder::supervisor::proto::State;

use crate::harness::fault::*;
use crate::harness::*;

const BUILDER: &str = "lazy";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    /// SIGKILL only.
    Kill,
    /// SIGTERM, then SIGKILL after 500 ms if the hook still runs (current Nix).
    TermThenKill,
}

fn describe(pids: &[u32]) -> Vec<String> {
    pids.iter()
        .map(|&p| format!("{p}: {}", cmdline(p).unwrap_or_default().join(" ")))
        .collect()
}

/// The hook of the one build running now: a child of a per-client nix-daemon process.
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
    hook
}

fn hook_killed(phase: Phase, kill: Kill, scheme: Scheme) {
    let test = format!("hook {kill:?} during {phase:?} over {}", scheme.prefix());
    let mut rng = FaultRng::new(&test);
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
        "fault-hk-{}-{}-{}",
        format!("{kill:?}").to_lowercase(),
        format!("{phase:?}").to_lowercase(),
        scheme.prefix()
    );
    let paths = phase_drv(&name, phase).prepare(&daemon);

    let mut build = Background::nix_build(&daemon, &paths.build_args());
    let store = remote.host_nix_dir().join("store");
    // Who is who, once the phase has begun; then the random point, then the signal at once.
    wait_for_phase(phase, &mut build, &paths, &store, &daemon);
    let hook = the_hook(&daemon);
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
    assert_eq!(cfg.status_of(&daemon, BUILDER).leases, 1);
    let point = wait_for_point(&mut rng, phase, &mut build, &paths, &store, &daemon);
    assert!(
        still_in_phase(phase, &build, &paths, &store, &daemon),
        "the {phase:?} ended before the fault"
    );
    let t0 = Instant::now();
    let signal = match kill {
        Kill::Kill => libc::SIGKILL,
        Kill::TermThenKill => libc::SIGTERM,
    };
    // SAFETY: kill(2) on this daemon's hook (checked above: our binary, child of nix-daemon).
    assert_eq!(unsafe { libc::kill(hook as libc::pid_t, signal) }, 0);
    let mut needed_sigkill = false;
    if kill == Kill::TermThenKill {
        while alive(hook) && t0.elapsed() < Duration::from_millis(500) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if alive(hook) {
            needed_sigkill = true;
            // SAFETY: as above; the hook is still alive, so its pid is still its own.
            unsafe { libc::kill(hook as libc::pid_t, libc::SIGKILL) };
        }
    }
    wait_until("the hook to die", Duration::from_secs(5), || !alive(hook));
    let hook_gone = t0.elapsed();
    eprintln!(
        "[fault] {test}: signalled hook {hook} at {point}; it was gone after {hook_gone:.2?}{}",
        if needed_sigkill {
            " (needed the SIGKILL)"
        } else {
            ""
        }
    );
    let out = build.finish(Duration::from_secs(120));
    out.assert_failure();
    assert!(out.stderr.contains(&paths.drv), "{out}");
    assert!(!out.stderr.contains("panicked"), "{out}");
    client_errors(&test, &out);
    paths.assert_absent(&daemon, &test);

    // The lease went with the hook.
    let released = wait_until("the lease to be released", Duration::from_secs(5), || {
        cfg.status_of(&daemon, BUILDER).leases == 0
    });
    let st = cfg.status_of(&daemon, BUILDER);
    assert_eq!((st.state, st.leases), (State::Up, 0), "{st:?}");

    // The remote side of the build. After SIGTERM the hook cancels it: the session and the
    // build it ran are gone soon. After SIGKILL nothing can tell the remote; the session ends
    // on its own once its program notices (a NAR stream breaks at once; a build is noticed
    // when it ends).
    let limit = match (kill, phase) {
        (Kill::TermThenKill, _) | (_, Phase::Upload | Phase::Download) => Duration::from_secs(5),
        (Kill::Kill, Phase::Build) => Duration::from_secs(u64::from(SLOW_BUILD_SECS) + 20),
    };
    // By pid, as seen at the fault: a session's processes may be re-parented once its sshd
    // process goes, so the process tree alone would lose sight of them.
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
            "{test}: the remote session still runs {:?} after the hook died:\n{:#?}",
            t1.elapsed(),
            describe(&left)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "[fault] {test}: lease released {released:.2?} after, remote session gone {:.2?} after the hook died",
        t1.elapsed()
    );
    assert!(alive(sshd), "the machine itself must stay up");
    let sup = cfg.supervisor_pid().expect("the supervisor serves");
    assert_no_strays(&daemon, Some(sup), Duration::from_secs(10));
    if kill == Kill::TermThenKill && !needed_sigkill {
        // It cleaned up after itself before it went.
        assert_store_clean(&daemon, &format!("{test}, right after the SIGTERM"));
    } else {
        let left = daemon.invalid_leftovers();
        eprintln!("[fault] {test}: left for the next hook to sweep: {left:?}");
        assert!(
            left.iter()
                .all(|p| p.starts_with(&format!("/nix/store/.nlb-unpack-{hook}-"))),
            "{test}: leftovers other than the killed hook's unpack directory: {left:?}"
        );
    }

    // Not wedged: the next build succeeds on the same machine, and its hook sweeps what the
    // killed one left.
    let next = BigDrv::new(&format!("{name}-next")).prepare(&daemon);
    let again = next.nix_build(&daemon);
    again.assert_success();
    next.assert_built(&daemon);
    assert_store_clean(&daemon, &format!("{test}, after the next build"));
    wait_until("the next build's lease", Duration::from_secs(5), || {
        cfg.status_of(&daemon, BUILDER).leases == 0
    });
    assert_no_strays(&daemon, Some(sup), Duration::from_secs(10));
    let st = cfg.status_of(&daemon, BUILDER);
    assert_eq!(st.boots, 1, "{st:?}");
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
