//! Fault: the hook SIGKILLed while its build runs on a warm session, which the supervisor
//! relays (an always-on remote behind real sshd, Nix 2.8 on both sides, `ssh://` and
//! `ssh-ng://`). The remote build (one that would sleep 90 s) is seen running on the handed-out
//! session, and as a control still runs while the hook is frozen. After the kill:
//! - the remote build and the processes of its session are gone within 1 s of the hook's death
//!   (the supervisor's relay sees the hook's end close and closes the SSH channel), while the
//!   warm connection itself may stay;
//! - the build fails and nothing invalid or partial is left in the local store;
//! - nothing but the supervisor is left in the daemon's namespace;
//! - the next build succeeds on the same remote, and the one after on a warm session again.
//!
//! Must never: signal a process that is not this daemon's hook, or pass on a build that is not
//! on a warm session (checked).

use std::time::{Duration, Instant};

use crate::harness::fault::*;
use crate::harness::warm::*;
use crate::harness::*;

fn hook_killed_on_a_warm_session(scheme: Scheme) {
    let test = format!("hook killed on a warm session over {}", scheme.prefix());
    let (remote, daemon, uri) = warmed(scheme, "warm-hk");
    let name = format!("warm-hk-{}", scheme.prefix());
    let paths = BigDrv::new(&name).sleep(LONG_BUILD_SECS).prepare(&daemon);
    let mut build = Background::nix_build(&daemon, &paths.build_args());
    let store = remote.host_nix_dir().join("store");
    wait_for_phase(Phase::Build, &mut build, &paths, &store, &daemon);
    let hook = the_hook(&daemon);
    let w = warm(&daemon, &uri).expect("a warm connection");
    assert_eq!(
        (w.in_use, w.hand_outs),
        (1, 1),
        "{test}: the build is not on a warm session: {w:?}"
    );
    let side = RemoteSide::seen_build_only(&test, remote.pid());
    side.assert_kept_while_frozen(&test, hook);
    let t0 = Instant::now();
    signal(hook, libc::SIGKILL);
    wait_until("the hook to die", Duration::from_secs(5), || !alive(hook));
    eprintln!(
        "[fault] {test}: killed hook {hook}; gone after {:.2?}",
        t0.elapsed()
    );
    // Within the bound of the kill itself (the hook is gone milliseconds after it).
    side.assert_gone_within(&test, t0);
    assert_hook_build_failed(&test, build, &paths, &daemon);
    // The supervisor has the session back: none in use.
    wait_until("the warm session to end", Duration::from_secs(5), || {
        warm(&daemon, &uri).is_some_and(|w| w.in_use == 0)
    });
    assert_store_clean(&daemon, &test);
    assert_no_strays(&daemon, supervisor(&daemon), Duration::from_secs(10));

    // Not wedged: the next build succeeds, and the one after is on a warm session again.
    assert_next_builds_warm_again(&test, &daemon, &remote, &uri, &name);
}

#[test]
fn hook_sigkilled_on_a_warm_session_over_ssh_and_ssh_ng() {
    // One test for both schemes (each failure names its scheme): a few seconds each.
    for scheme in [Scheme::Ssh, Scheme::SshNg] {
        hook_killed_on_a_warm_session(scheme);
    }
}
