//! A new configuration applied to the running machine.

use super::*;

#[test]
fn reconfigure_adds_a_new_builder_down_in_config_order() {
    let mut t = T::new(vec![cfg("a", 1, None)], None);
    t.bring_up("a");
    let out = t.reconfigure(vec![cfg("b", 2, None), cfg("a", 1, None)]);
    assert!(!has_start(&out, "b") && !has_stop(&out, "a"), "{out:?}");
    assert_eq!(names(&t), ["b", "a"]);
    let b = t.status("b");
    assert_eq!((b.state, b.boots, b.leases), (State::Down, 0, 0));
    assert_eq!(t.status("a").state, State::Up, "untouched");
    assert!(t.m.knows("b"));
    assert!(has_start(&t.boot(1, "b"), "b"));
    t.succeed("b", 1);
    assert!(matches!(t.lease(1, "b"), Response::Leased { .. }));
}

#[test]
fn reconfigure_removes_a_down_or_failed_builder_at_once() {
    let mut t = T::new(
        vec![
            cfg("a", 1, None),
            cfg("down", 1, None),
            cfg("failed", 1, None),
        ],
        None,
    );
    t.boot(1, "failed");
    t.fail("failed", "boom");
    let out = t.reconfigure(vec![cfg("a", 1, None)]);
    assert!(!out.iter().any(|a| matches!(a, Action::Stop { .. })));
    assert_eq!(names(&t), ["a"]);
    assert!(!t.m.knows("down") && !t.m.knows("failed"));
    match t.ask(
        1,
        Request::Lease {
            builder: "down".into(),
        },
    ) {
        Response::Error { message } => assert!(
            message.contains("no lazy builder named 'down'") && message.contains("knows: a"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn reconfigure_drains_a_removed_leased_builder_then_it_disappears() {
    let mut t = T::new(vec![cfg("a", 2, Some(10)), cfg("b", 1, None)], None);
    t.bring_up("a");
    assert!(matches!(t.lease(1, "a"), Response::Leased { .. }));
    let out = t.reconfigure(vec![cfg("b", 1, None)]);
    assert!(!has_stop(&out, "a"), "a leased builder is never stopped");
    let st = t.status("a");
    assert_eq!((st.state, st.leases), (State::Draining, 1));
    assert!(!t.m.knows("a"), "removed, though still draining");
    assert!(refused(&t.lease(2, "a")).contains("removed from the config"));
    assert!(
        refused(&t.ask(
            2,
            Request::Boot {
                builder: "a".into(),
                force: true
            }
        ))
        .contains("removed from the config")
    );
    // Its idle timeout no longer matters; its lease does.
    assert!(!has_stop(&t.advance(1000 * S), "a"));
    assert_eq!(t.status("a").leases, 1);
    let out = t.release(1, "a");
    assert_eq!(T::reply(&out, 1), Response::Ok);
    assert!(
        has_stop(&out, "a"),
        "stopped after the last release: {out:?}"
    );
    assert_eq!(t.status("a").state, State::Stopping);
    t.stopped("a");
    assert_eq!(names(&t), ["b"], "gone once its instance is gone");
    // A late release of the connection is harmless.
    t.ev(Event::ClientGone(1));
    assert_eq!(names(&t), ["b"]);
}

#[test]
fn reconfigure_stops_a_removed_unleased_or_booting_builder() {
    let mut t = T::new(vec![cfg("up", 1, None), cfg("booting", 1, None)], None);
    t.bring_up("up");
    t.boot(1, "booting");
    t.req(
        2,
        Request::WaitReady {
            builder: "booting".into(),
            timeout_ms: 60_000,
        },
    );
    let out = t.reconfigure(vec![]);
    assert!(has_stop(&out, "up") && has_stop(&out, "booting"), "{out:?}");
    assert_eq!(t.status("up").state, State::Stopping);
    // The cancelled boot ends; its waiter hears it, and it disappears.
    let out = t.fail("booting", "cancelled");
    assert!(matches!(T::reply(&out, 2), Response::Builder { status } if status.name == "booting"));
    assert_eq!(names(&t), ["up"]);
    t.stopped("up");
    assert!(names(&t).is_empty());
}

#[test]
fn a_removed_builder_stopping_does_not_boot_again() {
    let mut t = T::new(vec![cfg("vm", 1, Some(5))], None);
    t.bring_up("vm");
    t.advance(FIRST_LEASE_GRACE);
    assert_eq!(t.status("vm").state, State::Stopping);
    t.boot(1, "vm"); // reboot after the stop…
    t.reconfigure(vec![]); // …cancelled by the removal
    let out = t.stopped("vm");
    assert!(!has_start(&out, "vm"), "{out:?}");
    assert!(names(&t).is_empty());
}

#[test]
fn a_removed_builder_configured_again_while_draining_keeps_serving() {
    let mut t = T::new(vec![cfg("vm", 2, None)], None);
    t.bring_up("vm");
    assert!(matches!(t.lease(1, "vm"), Response::Leased { .. }));
    t.reconfigure(vec![]);
    assert_eq!(t.status("vm").state, State::Draining);
    t.reconfigure(vec![cfg("vm", 2, None)]);
    let st = t.status("vm");
    assert_eq!((st.state, st.leases), (State::Up, 1));
    assert!(matches!(t.lease(2, "vm"), Response::Leased { .. }));
    assert!(!has_stop(&t.release(1, "vm"), "vm"));
}

#[test]
fn reconfigure_changes_a_running_builder_without_touching_its_instance() {
    let mut t = T::new(vec![cfg("vm", 3, Some(600))], None);
    t.bring_up("vm");
    let generation = t.generation("vm");
    for c in [1, 2, 3] {
        assert!(matches!(t.lease(c, "vm"), Response::Leased { .. }));
    }
    // Fewer jobs and a shorter idle timeout, other boot settings.
    let out = t.reconfigure(vec![rebooted(cfg("vm", 1, Some(20)))]);
    assert!(!has_stop(&out, "vm") && !has_start(&out, "vm"), "{out:?}");
    let st = t.status("vm");
    assert_eq!(
        (st.state, st.leases, st.boots),
        (State::Up, 3, 1),
        "no lease revoked"
    );
    assert_eq!(t.generation("vm"), generation, "the same instance");
    // The lower max-jobs refuses new leases until the running builds are under it.
    assert!(refused(&t.lease(4, "vm")).contains("full (3/1"));
    t.release(1, "vm");
    t.release(2, "vm");
    assert!(refused(&t.lease(4, "vm")).contains("full (1/1"));
    // The new idle timeout applies from the last release.
    t.release(3, "vm");
    assert_eq!(t.status("vm").idle_stop_in_ms, Some(20_000));
    assert!(!has_stop(&t.advance(19 * S), "vm"));
    assert!(has_stop(&t.advance(S), "vm"));
}

#[test]
fn a_shorter_idle_timeout_already_over_stops_an_idle_builder_at_once() {
    let mut t = T::new(vec![cfg("vm", 1, Some(600))], None);
    t.bring_up("vm");
    assert!(matches!(t.lease(1, "vm"), Response::Leased { .. }));
    t.release(1, "vm");
    t.now += 60 * S;
    let out = t.reconfigure(vec![cfg("vm", 1, Some(30))]);
    assert!(has_stop(&out, "vm"), "{out:?}");
    // Idle timeout switched off: never stopped.
    let mut t = T::new(vec![cfg("vm", 1, Some(30))], None);
    t.bring_up("vm");
    t.reconfigure(vec![cfg("vm", 1, None)]);
    assert!(!has_stop(&t.advance(100_000 * S), "vm"));
}

#[test]
fn a_changed_failed_builder_gets_a_fresh_try_only_if_its_boot_changed() {
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    t.boot(1, "vm");
    t.fail("vm", "qemu: no such file");
    assert!(
        refused(&t.ask(
            1,
            Request::Boot {
                builder: "vm".into(),
                force: false
            }
        ))
        .contains("not booted again")
    );
    // Only max-jobs changed: still backing off, settings taken.
    t.reconfigure(vec![cfg("vm", 4, None)]);
    let st = t.status("vm");
    assert_eq!(st.state, State::Failed);
    assert_eq!(st.last_failure.unwrap().consecutive, 1);
    assert!(
        refused(&t.ask(
            1,
            Request::Boot {
                builder: "vm".into(),
                force: false
            }
        ))
        .contains("not booted again")
    );
    // The boot settings changed: the failure is forgotten, it boots at once.
    t.reconfigure(vec![rebooted(cfg("vm", 4, None))]);
    let st = t.status("vm");
    assert_eq!((st.state, st.last_failure), (State::Down, None));
    assert!(has_start(&t.boot(1, "vm"), "vm"));
    t.succeed("vm", 1);
    for c in 1..=4 {
        assert!(
            matches!(t.lease(c, "vm"), Response::Leased { .. }),
            "max-jobs 4 applies"
        );
    }
}

#[test]
fn a_changed_boot_while_stopping_after_a_failure_ends_down_without_backoff() {
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    t.bring_up("vm");
    t.req(
        1,
        Request::ReportFailure {
            builder: "vm".into(),
            cause: "ssh: refused".into(),
        },
    );
    assert_eq!(t.status("vm").state, State::Stopping);
    t.reconfigure(vec![rebooted(cfg("vm", 1, None))]);
    t.stopped("vm");
    let st = t.status("vm");
    assert_eq!((st.state, st.last_failure), (State::Down, None));
    assert!(has_start(&t.boot(1, "vm"), "vm"));
}

#[test]
fn reconfigure_keeps_boot_history_and_counts() {
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    t.bring_up("vm"); // 5 s
    let out = t.reconfigure(vec![rebooted(cfg("vm", 2, None)), cfg("new", 1, None)]);
    assert!(!out.contains(&Action::SaveHistory));
    let st = t.status("vm");
    assert_eq!((st.boots, st.expected_boot_ms), (1, Some(5_000)));
    assert_eq!(t.m.history().builders["vm"], [5_000]);
    // A removed builder's history is no longer saved.
    t.req(
        1,
        Request::Down {
            builder: "vm".into(),
        },
    );
    t.stopped("vm");
    t.reconfigure(vec![cfg("new", 1, None)]);
    assert!(t.m.history().builders.is_empty());
}

#[test]
fn a_builder_removed_and_added_again_never_reuses_a_generation() {
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    t.bring_up("vm");
    let old = t.generation("vm");
    t.reconfigure(vec![]);
    t.stopped("vm");
    t.reconfigure(vec![cfg("vm", 1, None)]);
    t.boot(1, "vm");
    assert_ne!(t.generation("vm"), old);
    // A late event of the old instance is stale.
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
    assert_eq!(t.status("vm").state, State::Booting);
}

#[test]
fn a_failed_reload_changes_nothing_and_is_named_for_unknown_builders() {
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    t.bring_up("vm");
    let before = t.m.status(t.now);
    let out = t.ev(Event::ReconfigureFailed(
        "/etc/nix/lazy-builder.toml:3: unknown key 'bogus'\n".into(),
    ));
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::Stop { .. } | Action::StartBoot { .. }))
    );
    assert_eq!(t.m.status(t.now), before);
    match t.ask(
        1,
        Request::Lease {
            builder: "new".into(),
        },
    ) {
        Response::Error { message } => {
            assert!(
                message.starts_with("no lazy builder named 'new'"),
                "{message}"
            );
            assert!(
                message.contains("lazy-builder.toml:3: unknown key 'bogus'"),
                "{message}"
            );
            assert!(!message.contains('\n'), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // A successful reload forgets the error.
    t.reconfigure(vec![cfg("vm", 1, None)]);
    match t.ask(
        1,
        Request::Lease {
            builder: "new".into(),
        },
    ) {
        Response::Error { message } => assert!(!message.contains("bogus"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_auto_started_supervisor_exits_after_its_last_builder_was_removed() {
    let mut t = T::new(vec![cfg("vm", 1, None)], Some(60));
    t.bring_up("vm");
    assert!(!has_exit(&t.advance(3600 * S)), "an instance runs");
    t.reconfigure(vec![]);
    t.stopped("vm");
    assert!(!has_exit(&t.advance(59 * S)));
    assert!(has_exit(&t.advance(S)));
}

// ---- when the configuration is read again

fn reloads(out: &[Action]) -> Vec<ReloadWhy> {
    out.iter()
        .filter_map(|a| match a {
            Action::ReloadConfig { why } => Some(*why),
            _ => None,
        })
        .collect()
}

fn seen(changed: bool, age_ms: Option<u64>) -> Event {
    Event::ConfigFile(ConfigFileSeen {
        changed,
        age: age_ms.map(Duration::from_millis),
    })
}

fn logged(out: &[Action], level: LogLevel) -> Vec<&str> {
    out.iter()
        .filter_map(|a| match a {
            Action::Log { level: l, message } if *l == level => Some(message.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn sighup_rereads_the_config_and_a_machine_without_a_file_never_does() {
    let mut t = T::reloading(vec![cfg("vm", 1, None)]);
    assert_eq!(reloads(&t.ev(Event::ReloadSignal)), [ReloadWhy::Signal]);
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    assert!(reloads(&t.ev(Event::ReloadSignal)).is_empty());
    assert!(reloads(&t.ev(seen(true, None))).is_empty());
    t.now += 10 * S;
    let r = t.ask(
        1,
        Request::Lease {
            builder: "new".into(),
        },
    );
    assert!(matches!(r, Response::Error { .. }), "{r:?}");
}

#[test]
fn a_changed_file_is_reread_once_it_has_settled() {
    let mut t = T::reloading(vec![cfg("vm", 1, None)]);
    assert!(reloads(&t.ev(seen(false, None))).is_empty(), "unchanged");
    // Modified just now: an editor may still be writing it.
    assert!(reloads(&t.ev(seen(true, Some(50)))).is_empty());
    assert!(reloads(&t.ev(seen(true, Some(199)))).is_empty());
    assert_eq!(reloads(&t.ev(seen(true, Some(200)))), [ReloadWhy::Changed]);
    // Vanished, or modified "in the future" (a clock step): settled.
    assert_eq!(reloads(&t.ev(seen(true, None))), [ReloadWhy::Changed]);
}

#[test]
fn a_request_for_an_unknown_builder_waits_for_a_reread() {
    let mut t = T::reloading(vec![cfg("vm", 1, None)]);
    // The file was read just now and has not changed: answered at once.
    let out = t.req(
        1,
        Request::Lease {
            builder: "new".into(),
        },
    );
    assert!(reloads(&out).is_empty());
    assert!(matches!(T::reply(&out, 1), Response::Error { .. }));
    // Changed but not settled: a request for a builder it does not know rereads it anyway,
    // and is answered after the new config applied.
    t.ev(seen(true, Some(10)));
    let out = t.boot(1, "new");
    assert_eq!(reloads(&out), [ReloadWhy::UnknownBuilder]);
    assert!(
        !out.iter().any(|a| matches!(a, Action::Reply { .. })),
        "{out:?}"
    );
    let out = t.reconfigure(vec![cfg("vm", 1, None), cfg("new", 1, None)]);
    assert!(has_start(&out, "new"), "{out:?}");
    assert!(
        matches!(T::reply(&out, 1), Response::Builder { status } if status.name == "new"),
        "{out:?}"
    );
    // Unchanged and read less than a second ago: no reread.
    let lease_other = |t: &mut T| {
        t.req(
            2,
            Request::Lease {
                builder: "other".into(),
            },
        )
    };
    t.now += UNKNOWN_RELOAD_EVERY - Duration::from_millis(1);
    t.ev(seen(false, None));
    let out = lease_other(&mut t);
    assert!(reloads(&out).is_empty());
    assert!(matches!(T::reply(&out, 2), Response::Error { .. }));
    // A second later it is reread; the failure is the error's tail and one error line.
    t.now += Duration::from_millis(1);
    t.ev(seen(false, None));
    assert_eq!(reloads(&lease_other(&mut t)), [ReloadWhy::UnknownBuilder]);
    let out = t.ev(Event::ReconfigureFailed(
        "lb.toml:2: unknown key 'bogus'\n".into(),
    ));
    assert_eq!(
        logged(&out, LogLevel::Error),
        [
            "config reload (a request named a builder it did not know) failed, still running the previous config: lb.toml:2: unknown key 'bogus'"
        ]
    );
    match T::reply(&out, 2) {
        Response::Error { message } => assert!(
            message.contains("no lazy builder named 'other'") && message.contains("bogus"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    // The same failure again is a debug line; on SIGHUP it is an error line every time.
    t.now += UNKNOWN_RELOAD_EVERY;
    assert_eq!(reloads(&lease_other(&mut t)), [ReloadWhy::UnknownBuilder]);
    let out = t.ev(Event::ReconfigureFailed(
        "lb.toml:2: unknown key 'bogus'".into(),
    ));
    assert!(logged(&out, LogLevel::Error).is_empty(), "{out:?}");
    assert_eq!(logged(&out, LogLevel::Debug).len(), 1, "{out:?}");
    t.ev(Event::ReloadSignal);
    let out = t.ev(Event::ReconfigureFailed(
        "lb.toml:2: unknown key 'bogus'".into(),
    ));
    assert_eq!(logged(&out, LogLevel::Error).len(), 1, "{out:?}");
    // Only boot, wait-ready and lease need a configured builder.
    t.now += UNKNOWN_RELOAD_EVERY;
    let out = t.req(
        2,
        Request::Release {
            builder: "other".into(),
        },
    );
    assert!(reloads(&out).is_empty());
    // A runtime that never answers the reload: the request goes on at the next event.
    assert_eq!(reloads(&t.boot(3, "other")), [ReloadWhy::UnknownBuilder]);
    let out = t.ev(Event::Tick);
    assert!(
        matches!(T::reply(&out, 3), Response::Error { .. }),
        "{out:?}"
    );
}

#[test]
fn a_request_about_a_failure_older_than_a_settling_file_waits_for_it() {
    let mut t = T::reloading(vec![cfg("vm", 1, None)]);
    t.boot(1, "vm");
    t.fail("vm", "QEMU kernel not found: /old/vmlinuz does not exist");
    // The user fixes the kernel path 50 ms after the failure and builds 30 ms later: the file
    // changed after the failure and has not settled.
    t.now += Duration::from_millis(80);
    t.ev(seen(true, Some(30)));
    let out = t.req(2, Request::Status);
    assert!(
        !out.iter().any(|a| matches!(a, Action::Reply { .. })),
        "no answer with the old cause yet: {out:?}"
    );
    assert!(
        reloads(&out).is_empty(),
        "not read while it may be half-written"
    );
    // Woken when the file has settled (200 ms after its modification): read, then answered.
    let due = timer(&out).expect("a wake-up for the settled file");
    assert_eq!(due, t.now + Duration::from_millis(170));
    t.now = due;
    let out = t.ev(Event::Tick);
    assert_eq!(reloads(&out), [ReloadWhy::Changed]);
    assert!(!out.iter().any(|a| matches!(a, Action::Reply { .. })));
    // The new file has other boot settings: the failure is forgotten, and the waiting status
    // says so; the boot that follows is not refused.
    let out = t.reconfigure(vec![rebooted(cfg("vm", 1, None))]);
    match T::reply(&out, 2) {
        Response::Status { builders, .. } => {
            assert_eq!(builders[0].state, State::Down, "{builders:?}");
            assert!(builders[0].last_failure.is_none());
        }
        other => panic!("{other:?}"),
    }
    assert!(has_start(&t.boot(2, "vm"), "vm"));
}

#[test]
fn only_a_request_that_would_report_a_failure_waits() {
    let mut t = T::reloading(vec![cfg("vm", 1, None), cfg("ok", 1, None)]);
    t.boot(1, "vm");
    t.fail("vm", "boom");
    t.now += Duration::from_millis(100);
    // Modified 50 ms before the failure, and not read yet: the failure may be the old
    // content's all the same, so the status waits for it.
    t.ev(seen(true, Some(150)));
    let out = t.req(2, Request::Status);
    assert!(
        !out.iter().any(|a| matches!(a, Action::Reply { .. })),
        "{out:?}"
    );
    assert_eq!(timer(&out), Some(t.now + Duration::from_millis(50)));
    t.now += Duration::from_millis(50);
    assert_eq!(reloads(&t.ev(Event::Tick)), [ReloadWhy::Changed]);
    let out = t.reconfigure(vec![cfg("vm", 1, None), cfg("ok", 1, None)]);
    assert!(
        matches!(T::reply(&out, 2), Response::Status { .. }),
        "{out:?}"
    );
    // Settled: answered at once, from what was read.
    t.now += S;
    t.ev(seen(false, None));
    assert!(matches!(t.ask(2, Request::Status), Response::Status { .. }));
    // A boot of a builder without a failure does not wait for a settling file either.
    t.ev(seen(true, Some(10)));
    assert!(has_start(&t.boot(2, "ok"), "ok"));
    // A lease on the failed one does, and a client that leaves stops waiting.
    t.ev(seen(true, Some(10)));
    let out = t.req(
        3,
        Request::Lease {
            builder: "vm".into(),
        },
    );
    assert!(
        !out.iter().any(|a| matches!(a, Action::Reply { .. })),
        "{out:?}"
    );
    t.ev(Event::ClientGone(3));
    t.now += S;
    let out = t.ev(Event::Tick);
    assert!(reloads(&out).is_empty(), "nobody waits any more: {out:?}");
    assert!(
        !t.m.clients.contains_key(&3),
        "a gone client is not brought back"
    );
    // A machine without a file never waits.
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    t.boot(1, "vm");
    t.fail("vm", "boom");
    t.ev(seen(true, Some(10)));
    assert!(matches!(t.ask(2, Request::Status), Response::Status { .. }));
}

#[test]
fn a_broken_reload_answers_the_waiting_request_with_what_it_had() {
    let mut t = T::reloading(vec![cfg("vm", 1, None)]);
    t.boot(1, "vm");
    t.fail("vm", "boom");
    t.now += Duration::from_millis(50);
    t.ev(seen(true, Some(10)));
    let out = t.req(2, Request::Status);
    t.now = timer(&out).unwrap();
    assert_eq!(reloads(&t.ev(Event::Tick)), [ReloadWhy::Changed]);
    let out = t.ev(Event::ReconfigureFailed(
        "lb.toml:3:1: unknown key `x`".into(),
    ));
    match T::reply(&out, 2) {
        Response::Status {
            builders,
            config_file,
            config_error,
        } => {
            assert_eq!(builders[0].state, State::Failed);
            assert_eq!(
                config_file.as_deref(),
                Some(std::path::Path::new("/etc/nix/lazy-builder.toml"))
            );
            assert_eq!(
                config_error.as_deref(),
                Some("lb.toml:3:1: unknown key `x`")
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_boot_timeout_below_the_measured_boot_time_is_warned_about_when_applied() {
    let mut t = T::reloading(vec![cfg("vm", 1, None)]);
    assert!(t.m.config_warnings().is_empty(), "nothing measured yet");
    t.bring_up("vm");
    t.req(
        1,
        Request::Down {
            builder: "vm".into(),
        },
    );
    t.stopped("vm");
    let mut short = cfg("vm", 1, None);
    short.boot_timeout = 3 * S;
    let out = t.reconfigure(vec![short]);
    assert_eq!(
        logged(&out, LogLevel::Warn),
        [
            "builder 'vm': boot-timeout (3s) is below the 5s its recent boots took (the median \
             of the last 1): its boots will time out; raise boot-timeout"
        ]
    );
    assert_eq!(t.m.config_warnings().len(), 1);
    assert!(logged(&t.reconfigure(vec![cfg("vm", 1, None)]), LogLevel::Warn).is_empty());
}

#[test]
fn status_says_when_the_running_instance_has_older_boot_settings() {
    let mut t = T::reloading(vec![cfg("vm", 1, None)]);
    t.bring_up("vm");
    assert!(!t.status("vm").boot_settings_outdated);
    t.reconfigure(vec![cfg("vm", 2, None)]);
    assert!(
        !t.status("vm").boot_settings_outdated,
        "max-jobs is not a boot setting"
    );
    t.reconfigure(vec![rebooted(cfg("vm", 2, None))]);
    assert!(t.status("vm").boot_settings_outdated);
    t.req(
        1,
        Request::Down {
            builder: "vm".into(),
        },
    );
    t.stopped("vm");
    assert!(!t.status("vm").boot_settings_outdated, "no instance");
    t.boot(1, "vm");
    t.succeed("vm", 1);
    assert!(
        !t.status("vm").boot_settings_outdated,
        "booted with the new ones"
    );
}
