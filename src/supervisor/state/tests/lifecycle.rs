//! A builder's life: boots, failures and their backoff, exits, stale generations, shutdown.

use super::*;

#[test]
fn boot_failures_back_off_exponentially_force_overrides_and_success_resets() {
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    let mut expected = 10;
    for n in 1..=8u32 {
        assert!(has_start(&t.boot(1, "vm"), "vm"), "boot {n}");
        t.now += S;
        t.fail("vm", "qemu: cannot open /dev/kvm");
        let st = t.status("vm");
        assert_eq!(st.state, State::Failed);
        let f = st.last_failure.unwrap();
        assert_eq!(f.consecutive, n);
        assert_eq!(f.retry_in_ms, expected * 1000, "after {n} failures");
        let r = t.ask(
            1,
            Request::Boot {
                builder: "vm".into(),
                force: false,
            },
        );
        assert!(
            refused(&r).contains(&format!("not booted again for another {expected}s")),
            "{r:?}"
        );
        if n < 8 {
            // Wait the backoff out.
            t.now += Duration::from_secs(expected);
        }
        expected = (expected * 2).min(600);
    }
    // Still backing off: force boots anyway.
    let out = t.req(
        1,
        Request::Boot {
            builder: "vm".into(),
            force: true,
        },
    );
    assert!(has_start(&out, "vm"));
    t.succeed("vm", 7);
    let f = t.status("vm").last_failure.unwrap();
    assert_eq!(
        (f.consecutive, f.retry_in_ms),
        (0, 0),
        "a successful boot resets"
    );
    // The next failure starts at the base again.
    t.req(
        1,
        Request::ReportFailure {
            builder: "vm".into(),
            cause: "x".into(),
        },
    );
    assert_eq!(t.status("vm").last_failure.unwrap().retry_in_ms, 10_000);
}

#[test]
fn boot_while_stopping_boots_again_after_the_stop() {
    let mut t = T::new(vec![cfg("vm", 1, Some(5))], None);
    t.bring_up("vm");
    // Never leased: stopped once the first-lease grace is over.
    assert!(has_stop(&t.advance(FIRST_LEASE_GRACE), "vm"));
    let out = t.boot(1, "vm");
    assert!(!has_start(&out, "vm"), "not while the old instance runs");
    assert!(
        t.req(
            1,
            Request::WaitReady {
                builder: "vm".into(),
                timeout_ms: 60_000
            }
        )
        .iter()
        .all(|a| !matches!(a, Action::Reply { .. }))
    );
    let out = t.stopped("vm");
    assert!(has_start(&out, "vm"), "{out:?}");
    assert_eq!(t.status("vm").state, State::Booting);
    let out = t.succeed("vm", 3);
    assert!(matches!(T::reply(&out, 1), Response::Builder { status } if status.state == State::Up));
}

#[test]
fn a_builder_that_ran_well_and_then_died_reboots_without_backoff() {
    let mut t = T::new(vec![cfg("vm", 2, None)], None);
    t.bring_up("vm");
    assert!(matches!(t.lease(1, "vm"), Response::Leased { .. }));
    t.now += STABLE_UPTIME;
    let generation = t.generation("vm");
    t.ev(Event::InstanceExited {
        builder: "vm".into(),
        generation,
        report: "killed by signal 9".into(),
    });
    let st = t.status("vm");
    assert_eq!(st.state, State::Failed);
    let f = st.last_failure.unwrap();
    assert_eq!((f.consecutive, f.retry_in_ms), (0, 0), "no backoff");
    assert!(f.cause.contains("killed by signal 9"));
    assert!(has_start(&t.boot(2, "vm"), "vm"), "boots again at once");
}

#[test]
fn an_instance_that_dies_is_a_failure_and_its_leases_vanish() {
    let mut t = T::new(vec![cfg("vm", 2, None)], None);
    t.bring_up("vm");
    assert!(matches!(t.lease(1, "vm"), Response::Leased { .. }));
    let generation = t.generation("vm");
    t.ev(Event::InstanceExited {
        builder: "vm".into(),
        generation,
        report: "killed by signal 9".into(),
    });
    let st = t.status("vm");
    assert_eq!((st.state, st.leases), (State::Failed, 0));
    assert!(
        st.last_failure
            .unwrap()
            .cause
            .contains("exited on its own: killed by signal 9")
    );
    // The old holder's release is harmless and does not touch a new instance's leases.
    t.now += 60 * S;
    t.boot(2, "vm");
    t.succeed("vm", 1);
    assert!(matches!(t.lease(2, "vm"), Response::Leased { .. }));
    t.release(1, "vm");
    assert_eq!(t.status("vm").leases, 1);
}

#[test]
fn stale_generations_are_ignored() {
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    t.boot(1, "vm");
    let old = t.generation("vm");
    t.fail("vm", "first");
    t.now += 60 * S;
    t.boot(1, "vm");
    // A late event of the first instance changes nothing.
    t.ev(Event::BootSucceeded {
        builder: "vm".into(),
        generation: old,
        port: 1,
        nix_version: "x".into(),
        took: S,
        kind: BootKind::Cold,
        restorable: false,
        note: None,
        warm: None,
    });
    t.ev(Event::StopFinished {
        builder: "vm".into(),
        generation: old,
        report: "x".into(),
    });
    assert_eq!(t.status("vm").state, State::Booting);
}

#[test]
fn shutdown_stops_everything_then_exits() {
    let mut t = T::new(
        vec![cfg("a", 1, None), cfg("b", 1, None), cfg("c", 1, None)],
        None,
    );
    t.bring_up("a");
    assert!(matches!(t.lease(1, "a"), Response::Leased { .. }));
    t.boot(1, "b");
    let out = t.ev(Event::Shutdown);
    assert!(has_stop(&out, "a"), "shutdown overrides leases");
    assert!(has_stop(&out, "b"), "and cancels boots");
    assert!(!has_stop(&out, "c"));
    assert!(!has_exit(&out));
    assert!(
        refused(&t.ask(
            2,
            Request::Boot {
                builder: "c".into(),
                force: true
            }
        ))
        .contains("shutting down")
    );
    assert!(!has_exit(&t.stopped("a")));
    // The boot of b fails as it is cancelled: still counts as gone.
    let out = t.fail("b", "cancelled");
    assert!(has_exit(&out));
}

#[test]
fn log_lines_are_actions_next_to_what_they_describe() {
    let mut t = T::new(vec![cfg("vm", 1, Some(30))], None);
    let out = t.boot(1, "vm");
    let logged = |out: &[Action], level: LogLevel, text: &str| {
        out.iter().position(|a| {
            matches!(a, Action::Log { level: l, message } if *l == level && message.contains(text))
        })
    };
    let start = out
        .iter()
        .position(|a| matches!(a, Action::StartBoot { .. }))
        .expect("a boot");
    let line = logged(&out, LogLevel::Info, "booting builder 'vm' (boot 1)").expect("logged");
    assert!(
        line < start,
        "the line comes before the boot it announces: {out:?}"
    );
    let out = t.succeed("vm", 3);
    assert!(logged(&out, LogLevel::Info, "builder 'vm' is up after 3.0s").is_some());
    // A stale instance's event is only worth a debug line.
    let out = t.ev(Event::StopFinished {
        builder: "vm".into(),
        generation: 0,
        report: "x".into(),
    });
    assert!(logged(&out, LogLevel::Debug, "ignoring a stale event").is_some());
    let out = t.advance(30 * S);
    assert!(logged(&out, LogLevel::Info, "has been idle for 30s: stopping it").is_some());
    let out = t.fail("vm", "boom");
    assert!(logged(&out, LogLevel::Warn, "builder 'vm' failed (1 in a row").is_some());
}

#[test]
fn a_second_signal_kills_every_builder_at_once() {
    let mut t = T::new(vec![cfg("a", 1, None), cfg("b", 1, None)], None);
    t.bring_up("a");
    assert!(matches!(t.lease(1, "a"), Response::Leased { .. }));
    t.boot(1, "b");
    let out = t.ev(Event::Shutdown);
    assert!(has_stop(&out, "a") && has_stop(&out, "b"));
    assert!(
        out.iter().any(
            |a| matches!(a, Action::Log { level: LogLevel::Info, message }
            if message == "signal received: stopping every builder, then exiting")
        ),
        "{out:?}"
    );
    assert!(!out.contains(&Action::KillAll));
    t.stopped("a");
    let out = t.ev(Event::Shutdown);
    assert_eq!(
        out,
        [
            Action::Log {
                level: LogLevel::Warn,
                message: "second signal: killing every builder now".into()
            },
            Action::KillAll
        ]
    );
    assert!(t.m.has_exited());
    assert!(t.ev(Event::Tick).is_empty(), "nothing after the kill");
}
