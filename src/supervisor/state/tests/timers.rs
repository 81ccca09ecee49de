//! Idle stops, the first-lease grace, the auto-started supervisor's exit.

use super::*;

#[test]
fn idle_counts_from_up_when_never_leased_and_zero_means_never() {
    let mut t = T::new(vec![cfg("a", 1, Some(30)), cfg("b", 1, None)], None);
    t.bring_up("a");
    t.bring_up("b");
    assert_eq!(t.status("b").idle_stop_in_ms, None);
    assert!(!has_stop(&t.advance(29 * S), "a"));
    let out = t.advance(S);
    assert!(has_stop(&out, "a"));
    assert!(!has_stop(&out, "b"));
    assert!(!has_stop(&t.advance(100_000 * S), "b"));
    assert_eq!(t.status("b").state, State::Up);
}

#[test]
fn a_fresh_boot_waits_for_its_first_lease_longer_than_a_short_idle_timeout() {
    let mut t = T::new(vec![cfg("vm", 1, Some(2))], None);
    t.bring_up("vm");
    assert_eq!(t.status("vm").idle_stop_in_ms, Some(10_000));
    // The requester postponed; the daemon asks again 5 s later: still up.
    assert!(!has_stop(&t.advance(5 * S), "vm"));
    assert!(matches!(t.lease(1, "vm"), Response::Leased { .. }));
    // After a lease the plain idle timeout applies, from the release.
    t.release(1, "vm");
    assert_eq!(t.status("vm").idle_stop_in_ms, Some(2_000));
    assert!(!has_stop(&t.advance(S), "vm"));
    assert!(has_stop(&t.advance(S), "vm"));
    // Never leased at all: stopped after the grace.
    let mut t = T::new(vec![cfg("vm", 1, Some(2))], None);
    t.bring_up("vm");
    assert!(!has_stop(&t.advance(9 * S), "vm"));
    assert!(has_stop(&t.advance(S), "vm"));
    // The next boot gets the grace again.
    t.stopped("vm");
    t.bring_up("vm");
    assert_eq!(t.status("vm").idle_stop_in_ms, Some(10_000));
}

#[test]
fn auto_started_supervisor_exits_when_quiet() {
    let mut t = T::new(vec![cfg("vm", 1, Some(10))], Some(60));
    t.ev(Event::ClientConnected(1));
    assert!(!has_exit(&t.advance(3600 * S)), "a client is connected");
    t.boot(1, "vm");
    t.succeed("vm", 1);
    t.ev(Event::ClientGone(1));
    // Up: the idle stop comes first; no exit while an instance runs.
    let out = t.advance(10 * S);
    assert!(has_stop(&out, "vm"));
    assert!(
        !has_exit(&t.advance(3600 * S)),
        "stopping: the instance still runs"
    );
    let out = t.stopped("vm");
    assert_eq!(timer(&out), Some(t.now + 60 * S));
    assert!(!has_exit(&t.advance(59 * S)));
    // A client that comes and goes resets the quiet period.
    t.ev(Event::ClientConnected(2));
    t.ev(Event::ClientGone(2));
    assert!(!has_exit(&t.advance(59 * S)));
    let out = t.advance(S);
    assert!(has_exit(&out));
    assert!(t.m.has_exited());
    assert!(t.ev(Event::Tick).is_empty(), "nothing after exit");
    // A failed builder has no instance: it does not keep the supervisor alive.
    let mut t = T::new(vec![cfg("vm", 1, Some(10))], Some(60));
    t.boot(1, "vm");
    t.fail("vm", "x");
    t.ev(Event::ClientGone(1));
    assert!(has_exit(&t.advance(60 * S)));
    // No builders at all: exits after the linger.
    let mut t = T::new(vec![], Some(5));
    assert!(has_exit(&t.advance(5 * S)));
}

#[test]
fn service_supervisor_never_exits_on_idle() {
    let mut t = T::new(vec![cfg("vm", 1, Some(10))], None);
    assert!(!has_exit(&t.advance(1_000_000 * S)));
    assert_eq!(timer(&t.advance(S)), None);
}

#[test]
fn a_shutdown_kills_what_did_not_stop_within_its_bound() {
    let mut t = T::new(vec![cfg("a", 1, None), cfg("b", 1, None)], None);
    t.bring_up("a");
    t.bring_up("b");
    let out = t.ev(Event::Shutdown);
    assert_eq!(timer(&out), Some(t.now + SHUTDOWN_BOUND));
    t.stopped("a");
    let out = t.advance(SHUTDOWN_BOUND - S);
    assert!(!out.contains(&Action::KillAll) && !has_exit(&out));
    assert_eq!(timer(&out), Some(t.now + S), "the kill is still due");
    let out = t.advance(S);
    assert_eq!(
        out,
        [
            Action::Log {
                level: LogLevel::Warn,
                message: "builders did not stop within 1m 30s: killing them".into()
            },
            Action::KillAll
        ]
    );
    assert!(t.m.has_exited());
    // Everything stopped in time: a plain exit, and no kill later.
    let mut t = T::new(vec![cfg("a", 1, None)], None);
    t.bring_up("a");
    t.ev(Event::Shutdown);
    assert!(has_exit(&t.stopped("a")));
    assert!(t.advance(SHUTDOWN_BOUND).is_empty());
}
