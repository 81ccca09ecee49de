//! The supervisor SIGKILLed while it relays a build's upload or download on a warm session,
//! over `ssh://` and `ssh-ng://`: that build fails cleanly (Nix's exit status, an error naming
//! the builder and why, nothing invalid or half-written left, no stray process), and the next
//! build succeeds, the one after on a warm session again.
//!
//! Must never: kill at a point outside the phase or on a build that is not on a warm session
//! (both checked), or stop a process other than by its pid.

use std::time::Duration;

use crate::harness::fault::*;
use crate::harness::warm::*;
use crate::harness::*;

/// The supervisor SIGKILLed while it relays `phase` of a build on a warm session.
fn supervisor_killed(phase: Phase, scheme: Scheme) {
    let test = format!(
        "supervisor killed during {phase:?} over {}",
        scheme.prefix()
    );
    let mut rng = FaultRng::new(&test);
    let (remote, daemon, uri) = warmed(scheme, "warm-sk");
    let sup = supervisor(&daemon).expect("a supervisor");
    let name = format!(
        "warm-sk-{}-{}",
        format!("{phase:?}").to_lowercase(),
        scheme.prefix()
    );
    let paths = phase_drv(&name, phase).prepare(&daemon);
    let mut build = Background::nix_build(&daemon, &paths.build_args());
    let store = remote.host_nix_dir().join("store");
    let point = wait_for_point(&mut rng, phase, &mut build, &paths, &store, &daemon);
    // The build runs on a warm session: the supervisor relays it.
    let w = warm(&daemon, &uri).expect("a warm connection");
    assert_eq!(
        (w.in_use, w.hand_outs),
        (1, 1),
        "the build is not on a warm session: {w:?}"
    );
    assert!(still_in_phase(phase, &build, &paths, &store, &daemon));
    signal(sup, libc::SIGKILL);
    eprintln!("[fault] {test}: killed supervisor {sup} at {point}");
    let out = build.finish(Duration::from_secs(120));
    out.assert_failure();
    // Nix 2.8's client through a daemon exits 1 for a failed build (as for a dead builder).
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("error:") && l.contains(&uri)),
        "no error naming {uri}:\n{out}"
    );
    assert!(
        out.stderr
            .contains("supervisor that relayed this warm session went away"),
        "the error does not say why:\n{out}"
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
    paths.assert_absent(&daemon, &test);
    assert_store_clean(&daemon, &test);
    assert_no_strays(&daemon, supervisor(&daemon), Duration::from_secs(10));

    // Not wedged: the next build succeeds (direct, a new supervisor), and the one after is warm.
    assert_next_builds_warm_again(&test, &daemon, &remote, &uri, &name);
}

#[test]
fn supervisor_sigkilled_mid_upload_over_ssh() {
    supervisor_killed(Phase::Upload, Scheme::Ssh);
}

#[test]
fn supervisor_sigkilled_mid_upload_over_ssh_ng() {
    supervisor_killed(Phase::Upload, Scheme::SshNg);
}

#[test]
fn supervisor_sigkilled_mid_download_over_ssh() {
    supervisor_killed(Phase::Download, Scheme::Ssh);
}

#[test]
fn supervisor_sigkilled_mid_download_over_ssh_ng() {
    supervisor_killed(Phase::Download, Scheme::SshNg);
}
