//! Fault: the remote machine dies. A real nix-daemon (Nix 2.8) runs nix-lazy-builder as its
//! build hook against a real sshd remote store; at a random point (seeded, printed) of the
//! input upload (200 MiB input), the build (8 s) or the output download (200 MiB output), the
//! whole remote is SIGKILLed at once: sshd, its sessions, `nix-store --serve` /
//! `nix-daemon --stdio` and the builds they run. Over `ssh://` and `ssh-ng://`.
//!
//! After each fault: the build fails with an error naming the builder; nothing invalid or
//! partial is left in the local store (the hook itself survived, so its own clean-up must have
//! run: no waiting for a later sweep); no hook or other process is left in the daemon's
//! namespace; and the daemon is not wedged: the next build, on a fresh remote, succeeds.
//!
//! Must never: pass without the fault landing inside its phase (the phase's bytes or its log
//! line are seen before the kill, and the build has not finished).

use std::time::Duration;

use crate::harness::fault::*;
use crate::harness::*;

fn remote_killed(phase: Phase, scheme: Scheme) {
    let test = format!("remote killed during {phase:?} over {}", scheme.prefix());
    let mut rng = FaultRng::new(&test);
    let mut remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    opts.machines = Some(remote.machines_line(&MachineLine::new(scheme, true)));
    let (opts, _ours) = without_warm_connections(opts);
    let daemon = LocalDaemon::start(opts);
    let name = format!(
        "fault-rk-{}-{}",
        format!("{phase:?}").to_lowercase(),
        scheme.prefix()
    );
    let paths = phase_drv(&name, phase).prepare(&daemon);
    let uri = remote.uri(scheme);

    let mut build = Background::nix_build(&daemon, &paths.build_args());
    let store = remote.host_nix_dir().join("store");
    let point = wait_for_point(&mut rng, phase, &mut build, &paths, &store, &daemon);
    assert!(
        still_in_phase(phase, &build, &paths, &store, &daemon),
        "the {phase:?} ended before the fault"
    );
    // What the kill hits: the session's remote Nix program and, in the build phase, the
    // (sandboxed) build it runs.
    let machine = remote.processes();
    let program = if scheme == Scheme::Ssh {
        "--serve"
    } else {
        "--stdio"
    };
    assert!(
        machine
            .iter()
            .any(|&p| cmdline(p).is_some_and(|a| a.iter().any(|w| w == program))),
        "{test}: no remote program ({program}) among the remote's processes {machine:?}"
    );
    if phase == Phase::Build {
        assert_eq!(
            sleeps_among(&machine, SLOW_BUILD_SECS).len(),
            1,
            "{test}: the build is not running over there: {machine:?}"
        );
    }
    let at = build.elapsed();
    remote.kill();
    let survivors: Vec<u32> = machine.iter().copied().filter(|&p| alive(p)).collect();
    assert!(
        survivors.is_empty(),
        "{test}: survived the kill: {survivors:?}"
    );
    eprintln!("[fault] {test}: killed the remote at {point}, {at:.2?} into nix-build");
    let out = build.finish(Duration::from_secs(120));
    out.assert_failure();
    eprintln!(
        "[fault] {test}: nix-build failed {:.2?} after the kill",
        out.elapsed.saturating_sub(at)
    );
    // A clear error that names the builder and the derivation.
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("error:") && l.contains(&uri)),
        "no error naming {uri}:\n{out}"
    );
    assert!(out.stderr.contains(&paths.drv), "{out}");
    assert!(!out.stderr.contains("panicked"), "{out}");
    client_errors(&test, &out);
    paths.assert_absent(&daemon, &test);
    assert_store_clean(&daemon, &test);
    assert_no_strays(&daemon, None, Duration::from_secs(10));

    // Not wedged: the next build goes to a fresh remote and succeeds.
    let fresh = RemoteStore::start(RemoteOpts::new(Nix::Host));
    std::fs::write(
        daemon.machines_file(),
        fresh.machines_line(&MachineLine::new(scheme, true)) + "\n",
    )
    .expect("rewrite the machines file");
    let next = BigDrv::new(&format!("{name}-next")).prepare(&daemon);
    let again = next.nix_build(&daemon);
    again.assert_success();
    next.assert_built(&daemon);
    assert!(fresh.is_valid(&next.out), "not built on the fresh remote");
    assert_store_clean(&daemon, &format!("{test}, next build"));
    assert_no_strays(&daemon, None, Duration::from_secs(10));
    eprintln!("[fault] {test}: survived");
}

#[test]
fn remote_killed_during_upload_over_ssh() {
    remote_killed(Phase::Upload, Scheme::Ssh);
}

#[test]
fn remote_killed_during_upload_over_ssh_ng() {
    remote_killed(Phase::Upload, Scheme::SshNg);
}

#[test]
fn remote_killed_during_build_over_ssh() {
    remote_killed(Phase::Build, Scheme::Ssh);
}

#[test]
fn remote_killed_during_build_over_ssh_ng() {
    remote_killed(Phase::Build, Scheme::SshNg);
}

#[test]
fn remote_killed_during_download_over_ssh() {
    remote_killed(Phase::Download, Scheme::Ssh);
}

#[test]
fn remote_killed_during_download_over_ssh_ng() {
    remote_killed(Phase::Download, Scheme::SshNg);
}
