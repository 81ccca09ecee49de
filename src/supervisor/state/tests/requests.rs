//! Requests and leases: boot, wait-ready, lease, release, report-failure, down, unknown builders.

use super::*;

#[test]
fn boot_lease_release_and_idle_stop_from_last_release() {
    let mut t = T::new(vec![cfg("vm", 2, Some(60))], None);
    t.ev(Event::ClientConnected(1));
    let out = t.boot(1, "vm");
    assert!(has_start(&out, "vm"));
    assert_eq!(t.status("vm").state, State::Booting);
    // A second boot while booting starts nothing.
    assert!(!has_start(&t.boot(1, "vm"), "vm"));
    assert!(refused(&t.lease(1, "vm")).contains("booting"));
    t.now += 5 * S;
    t.succeed("vm", 5);
    let st = t.status("vm");
    assert_eq!(
        (st.state, st.ssh_port, st.boots),
        (State::Up, Some(2222), 1)
    );
    assert_eq!(st.idle_stop_in_ms, Some(60_000));
    assert!(matches!(t.lease(1, "vm"), Response::Leased { .. }));
    assert_eq!(t.status("vm").idle_stop_in_ms, None);
    // Leased: far past the idle timeout, nothing stops it.
    let out = t.advance(3600 * S);
    assert!(!has_stop(&out, "vm"));
    assert_eq!(timer(&out), None);
    // Released: the idle timer starts now, not at "up".
    let out = t.release(1, "vm");
    assert_eq!(T::reply(&out, 1), Response::Ok);
    assert_eq!(timer(&out), Some(t.now + 60 * S));
    assert!(!has_stop(&t.advance(59 * S), "vm"));
    let out = t.advance(S);
    assert!(has_stop(&out, "vm"), "{out:?}");
    assert_eq!(t.status("vm").state, State::Stopping);
    assert!(refused(&t.lease(1, "vm")).contains("stopping"));
    t.stopped("vm");
    assert_eq!(t.status("vm").state, State::Down);
    assert!(refused(&t.lease(1, "vm")).contains("down"));
}

#[test]
fn lease_is_tied_to_the_connection() {
    let mut t = T::new(vec![cfg("vm", 4, Some(10))], None);
    t.bring_up("vm");
    for c in [1, 2] {
        t.ev(Event::ClientConnected(c));
    }
    assert!(matches!(t.lease(1, "vm"), Response::Leased { .. }));
    assert!(matches!(t.lease(1, "vm"), Response::Leased { .. }));
    assert!(matches!(t.lease(2, "vm"), Response::Leased { .. }));
    assert_eq!(t.status("vm").leases, 3);
    // Releasing what connection 2 does not hold changes nothing.
    t.release(2, "vm");
    t.release(2, "vm");
    assert_eq!(t.status("vm").leases, 2);
    t.advance(100 * S);
    t.ev(Event::ClientGone(1));
    assert_eq!(t.status("vm").leases, 0);
    // The idle timer starts when the connection went away.
    assert!(!has_stop(&t.advance(9 * S), "vm"));
    assert!(has_stop(&t.advance(S), "vm"));
}

#[test]
fn max_jobs_caps_leases() {
    let mut t = T::new(vec![cfg("vm", 2, None)], None);
    t.bring_up("vm");
    assert!(matches!(t.lease(1, "vm"), Response::Leased { .. }));
    assert!(matches!(t.lease(2, "vm"), Response::Leased { .. }));
    assert!(refused(&t.lease(3, "vm")).contains("full (2/2"));
    t.ev(Event::ClientGone(2));
    assert!(matches!(t.lease(3, "vm"), Response::Leased { .. }));
}

#[test]
fn down_drains_and_never_stops_a_leased_builder() {
    let mut t = T::new(vec![cfg("vm", 2, Some(10))], None);
    t.bring_up("vm");
    assert!(matches!(t.lease(1, "vm"), Response::Leased { .. }));
    let out = t.down(9, "vm");
    assert!(!has_stop(&out, "vm"));
    assert!(
        matches!(T::reply(&out, 9), Response::Builder { status } if status.state == State::Draining)
    );
    assert!(refused(&t.lease(2, "vm")).contains("draining"));
    assert!(!has_stop(&t.advance(1000 * S), "vm"));
    // `up` while draining keeps it up.
    t.boot(9, "vm");
    assert_eq!(t.status("vm").state, State::Up);
    t.down(9, "vm");
    let out = t.release(1, "vm");
    assert!(
        has_stop(&out, "vm"),
        "last release stops a draining builder"
    );
    t.stopped("vm");
    assert_eq!(t.status("vm").state, State::Down);
    // Down on an unleased up builder stops at once; on a down one it is a no-op.
    t.bring_up("vm");
    let out = t.down(9, "vm");
    assert!(has_stop(&out, "vm"));
    t.stopped("vm");
    let out = t.down(9, "vm");
    assert!(!has_stop(&out, "vm"));
}

#[test]
fn report_failure_waits_for_every_holder_then_restarts_after_backoff() {
    let mut t = T::new(vec![cfg("vm", 3, Some(10))], None);
    t.bring_up("vm");
    assert!(matches!(t.lease(1, "vm"), Response::Leased { .. }));
    assert!(matches!(t.lease(2, "vm"), Response::Leased { .. }));
    let out = t.req(
        2,
        Request::ReportFailure {
            builder: "vm".into(),
            cause: "ssh: connection reset\nby peer".into(),
        },
    );
    assert_eq!(T::reply(&out, 2), Response::Ok);
    assert!(!has_stop(&out, "vm"), "holders keep their leases");
    let st = t.status("vm");
    assert_eq!(st.state, State::Draining);
    let f = st.last_failure.unwrap();
    assert_eq!((f.consecutive, f.retry_in_ms), (1, 10_000));
    assert_eq!(f.cause, "ssh: connection reset; by peer");
    // A second report of the same incident does not count twice.
    t.req(
        1,
        Request::ReportFailure {
            builder: "vm".into(),
            cause: "again".into(),
        },
    );
    assert_eq!(t.status("vm").last_failure.unwrap().consecutive, 1);
    assert!(refused(&t.lease(3, "vm")).contains("restarting after a failure"));
    assert!(refused(&t.ask_boot(3, "vm", false)).contains("restarting"));
    assert!(!has_stop(&t.release(2, "vm"), "vm"));
    assert!(!has_stop(&t.advance(100 * S), "vm"));
    let out = t.release(1, "vm");
    assert!(has_stop(&out, "vm"));
    t.stopped("vm");
    assert_eq!(t.status("vm").state, State::Failed);
    // The backoff runs from the report: 100 s have passed, so a boot is allowed now.
    assert!(has_start(&t.boot(3, "vm"), "vm"));
}

#[test]
fn report_failure_on_an_unleased_builder_stops_it_at_once() {
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    t.bring_up("vm");
    let out = t.req(
        1,
        Request::ReportFailure {
            builder: "vm".into(),
            cause: "host key mismatch".into(),
        },
    );
    assert!(has_stop(&out, "vm"));
    t.stopped("vm");
    assert_eq!(t.status("vm").state, State::Failed);
    let r = t.ask_boot(1, "vm", false);
    assert!(refused(&r).contains("host key mismatch"), "{r:?}");
    assert!(
        refused(&r).contains("not booted again for another 10s"),
        "{r:?}"
    );
    // Reports about an instance that is gone are ignored.
    t.req(
        1,
        Request::ReportFailure {
            builder: "vm".into(),
            cause: "late".into(),
        },
    );
    assert_eq!(
        t.status("vm").last_failure.unwrap().cause,
        "host key mismatch"
    );
}

#[test]
fn failures_are_shared_by_all_clients() {
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    t.boot(1, "vm");
    t.fail("vm", "boot timed out after 120s");
    // Another client asking later sees the same backoff and cause.
    let r = t.ask_boot(2, "vm", false);
    assert!(refused(&r).contains("boot timed out"), "{r:?}");
    match t.ask(3, Request::Status) {
        Response::Status { builders, .. } => {
            assert_eq!(builders[0].last_failure.as_ref().unwrap().consecutive, 1)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn waiters_are_answered_on_up_failure_down_or_deadline() {
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    t.boot(1, "vm");
    let wait = |ms| Request::WaitReady {
        builder: "vm".into(),
        timeout_ms: ms,
    };
    assert!(
        t.req(1, wait(10_000))
            .iter()
            .all(|a| !matches!(a, Action::Reply { .. }))
    );
    let out = t.req(2, wait(2_000));
    assert_eq!(timer(&out), Some(t.now + 2 * S));
    // Client 2's deadline passes first.
    let out = t.advance(2 * S);
    assert!(
        matches!(T::reply(&out, 2), Response::Builder { status } if status.state == State::Booting)
    );
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::Reply { conn: 1, .. }))
    );
    // Client 1 is answered when the builder is up.
    let out = t.succeed("vm", 2);
    assert!(matches!(T::reply(&out, 1), Response::Builder { status } if status.state == State::Up));
    // Up (or down, failed): answered at once.
    assert!(matches!(t.ask(1, wait(5000)), Response::Builder { .. }));
    // A failed boot answers its waiters too.
    t.down(1, "vm");
    t.stopped("vm");
    t.boot(1, "vm");
    t.req(3, wait(60_000));
    let out = t.fail("vm", "boom");
    assert!(
        matches!(T::reply(&out, 3), Response::Builder { status } if status.state == State::Failed)
    );
    // A waiter whose client goes away is forgotten.
    t.boot_with(1, "vm", true);
    t.req(4, wait(60_000));
    t.ev(Event::ClientGone(4));
    let out = t.succeed("vm", 1);
    assert!(!has_reply(&out), "{out:?}");
    // A down during boot cancels it: stop, then down, and the waiter hears it.
    t.down(1, "vm");
    t.stopped("vm");
    t.boot(1, "vm");
    t.req(5, wait(60_000));
    let out = t.down(1, "vm");
    assert!(has_stop(&out, "vm"));
    let out = t.stopped("vm");
    assert!(
        matches!(T::reply(&out, 5), Response::Builder { status } if status.state == State::Down)
    );
}

#[test]
fn unknown_builders_are_errors() {
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    for r in [
        Request::Boot {
            builder: "nope".into(),
            force: false,
        },
        Request::Lease {
            builder: "nope".into(),
        },
        Request::WaitReady {
            builder: "nope".into(),
            timeout_ms: 1,
        },
    ] {
        match t.ask(1, r) {
            Response::Error { message } => {
                assert!(
                    message.contains("'nope'") && message.contains("vm"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
