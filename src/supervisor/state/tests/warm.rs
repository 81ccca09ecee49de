//! Warm connections: hand-outs never wait, pools refill, failures back off, keep-warm closes
//! them, a lazy builder's pool lives only while it is up and never keeps it up, shutdown lets
//! sessions in use finish.

use super::*;
use crate::supervisor::proto::SessionSpec;
use crate::supervisor::proto::TargetSpec;
use crate::supervisor::proto::{Handshake, Protocol};

fn spec(builder: &str, lazy: bool, keep_warm: u64, max_jobs: u32) -> SessionSpec {
    SessionSpec {
        builder: builder.into(),
        store_uri: format!("ssh://{builder}"),
        lazy,
        target: TargetSpec {
            host: "127.0.0.1".into(),
            port: 2222,
            user: "root".into(),
            identities: vec!["/k".into()],
            host_keys: vec!["ssh-ed25519 AAAA".into()],
        },
        command: "nix-store --serve --write".into(),
        protocol: Protocol::Serve,
        keep_warm_ms: keep_warm * 1000,
        max_jobs,
    }
}

fn hs() -> Handshake {
    Handshake::Serve {
        version: [2, 7],
        server: [2, 7],
    }
}

fn connects(out: &[Action]) -> Vec<PoolId> {
    out.iter()
        .filter_map(|a| match a {
            Action::WarmConnect { pool, .. } => Some(*pool),
            _ => None,
        })
        .collect()
}

fn opens(out: &[Action]) -> Vec<(PoolId, SessionId)> {
    out.iter()
        .filter_map(|a| match a {
            Action::WarmOpen { pool, session, .. } => Some((*pool, *session)),
            _ => None,
        })
        .collect()
}

fn hand_out(out: &[Action]) -> Option<(ConnId, SessionId)> {
    out.iter().find_map(|a| match a {
        Action::HandOut { conn, session, .. } => Some((*conn, *session)),
        _ => None,
    })
}

fn closes(out: &[Action]) -> Vec<PoolId> {
    out.iter()
        .filter_map(|a| match a {
            Action::WarmClose { pool } => Some(*pool),
            _ => None,
        })
        .collect()
}

fn no_session(actions: &[Action], conn: ConnId) -> String {
    match T::reply(actions, conn) {
        Response::NoSession { reason } => reason,
        other => panic!("expected no session, got {other:?}"),
    }
}

impl T {
    fn lease_session(&mut self, conn: ConnId, s: &SessionSpec) -> Vec<Action> {
        self.req(conn, Request::LeaseSession { spec: s.clone() })
    }

    /// A pool for `s` with its sessions ready; the pool and the sessions.
    fn warm_pool(&mut self, s: &SessionSpec) -> (PoolId, Vec<SessionId>) {
        let out = self.lease_session(1, s);
        assert!(no_session(&out, 1).contains("warming up"), "{out:?}");
        let pool = connects(&out)[0];
        let out = self.ev(Event::WarmConnected { pool });
        let sessions: Vec<SessionId> = opens(&out).into_iter().map(|(_, s)| s).collect();
        for &session in &sessions {
            self.ev(Event::WarmReady {
                pool,
                session,
                handshake: hs(),
            });
        }
        (pool, sessions)
    }

    fn warm_of(&self, name: &str) -> Option<crate::supervisor::proto::WarmStatus> {
        self.m
            .status(self.now)
            .into_iter()
            .find(|s| s.name == name)
            .and_then(|s| s.warm)
    }
}

#[test]
fn a_ready_session_is_handed_out_and_replaced_and_none_is_ever_waited_for() {
    let mut t = T::new(vec![], None);
    let s = spec("ssh://x86", false, 600, 2);
    // The first request finds nothing and is answered at once; the pool connects.
    let out = t.lease_session(1, &s);
    assert!(no_session(&out, 1).contains("warming up"));
    let pool = connects(&out)[0];
    // While it connects: no second connect, still an answer at once.
    let out = t.lease_session(2, &s);
    assert!(no_session(&out, 2).contains("connecting"), "{out:?}");
    assert!(connects(&out).is_empty());
    // Connected: min(max-jobs + 1, 3) sessions are opened.
    let out = t.ev(Event::WarmConnected { pool });
    let opened = opens(&out);
    assert_eq!(opened.len(), 3, "{out:?}");
    let out = t.lease_session(3, &s);
    assert!(no_session(&out, 3).contains("opening"), "{out:?}");
    for &(_, session) in &opened {
        t.ev(Event::WarmReady {
            pool,
            session,
            handshake: hs(),
        });
    }
    assert_eq!(t.status("ssh://x86").state, State::AlwaysOn);
    assert_eq!(t.warm_of("ssh://x86").unwrap().ready, 3);
    // A hand-out, and the refill.
    let out = t.lease_session(4, &s);
    assert_eq!(hand_out(&out), Some((4, opened[0].1)), "{out:?}");
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::Reply { conn: 4, .. })),
        "the runtime answers a hand-out itself: {out:?}"
    );
    assert_eq!(opens(&out).len(), 1, "refilled: {out:?}");
    let w = t.warm_of("ssh://x86").unwrap();
    assert_eq!((w.ready, w.in_use, w.hand_outs), (2, 1, 1));
    assert_eq!(w.closes_in_ms, None, "never closes while in use");
    t.ev(Event::WarmEnded {
        pool,
        session: opened[0].1,
        cause: None,
    });
    let w = t.warm_of("ssh://x86").unwrap();
    assert_eq!((w.in_use, w.hand_outs), (0, 1));
    assert_eq!(w.closes_in_ms, Some(600_000));
}

#[test]
fn max_jobs_sizes_the_pool_and_a_connection_carries_a_bounded_number() {
    let mut t = T::new(vec![], None);
    let one = spec("a", false, 600, 1);
    let (_, sessions) = t.warm_pool(&one);
    assert_eq!(sessions.len(), 2, "one to use, one for the next build");
    let mut t = T::new(vec![], None);
    let many = spec("b", false, 600, 32);
    let (pool, sessions) = t.warm_pool(&many);
    assert_eq!(sessions.len(), READY_MAX as usize);
    // Hand out and never finish: refills stop at the connection's limit.
    let mut in_flight = 0;
    for conn in 10..40 {
        let out = t.lease_session(conn, &many);
        if hand_out(&out).is_some() {
            in_flight += 1;
        }
        for (_, session) in opens(&out) {
            t.ev(Event::WarmReady {
                pool,
                session,
                handshake: hs(),
            });
        }
    }
    let w = t.warm_of("b").unwrap();
    assert_eq!(w.in_use + w.ready, SESSIONS_PER_CONNECTION, "{w:?}");
    assert_eq!(in_flight, SESSIONS_PER_CONNECTION);
    let out = t.lease_session(50, &many);
    assert!(no_session(&out, 50).contains("carries"), "{out:?}");
}

#[test]
fn a_failed_connect_backs_off_and_builds_go_direct_meanwhile() {
    let mut t = T::new(vec![], None);
    let s = spec("x", false, 600, 1);
    let out = t.lease_session(1, &s);
    let pool = connects(&out)[0];
    let out = t.ev(Event::WarmConnectFailed {
        pool,
        cause: "HOST KEY MISMATCH: expected SHA256:a, but the server presented SHA256:b".into(),
    });
    assert!(out.iter().any(
        |a| matches!(a, Action::Log { level: LogLevel::Warn, message } if message.contains("HOST KEY MISMATCH"))
    ));
    t.advance(5 * S);
    let out = t.lease_session(2, &s);
    assert!(no_session(&out, 2).contains("HOST KEY MISMATCH"), "{out:?}");
    assert!(connects(&out).is_empty(), "not while backing off: {out:?}");
    assert!(
        t.warm_of("x")
            .unwrap()
            .last_failure
            .unwrap()
            .contains("MISMATCH")
    );
    t.advance(6 * S);
    let out = t.lease_session(3, &s);
    assert_eq!(connects(&out), [pool], "tried again after 10 s: {out:?}");
    // A second failure in a row waits longer (20 s).
    t.ev(Event::WarmConnectFailed {
        pool,
        cause: "refused".into(),
    });
    t.advance(15 * S);
    assert!(connects(&t.lease_session(4, &s)).is_empty());
    t.advance(6 * S);
    assert_eq!(connects(&t.lease_session(5, &s)), [pool]);
    // A session that cannot start backs off too.
    let out = t.ev(Event::WarmConnected { pool });
    let (_, session) = opens(&out)[0];
    t.ev(Event::WarmOpenFailed {
        pool,
        session,
        cause: "nix-store: command not found".into(),
    });
    let out = t.lease_session(6, &s);
    assert!(no_session(&out, 6).contains("command not found"));
    assert!(opens(&out).is_empty());
}

#[test]
fn pooled_sessions_that_die_are_replaced_but_not_forever() {
    let mut t = T::new(vec![], None);
    let s = spec("x", false, 600, 1);
    let (pool, mut sessions) = t.warm_pool(&s);
    let mut replaced = 0;
    for _ in 0..DEATHS_BEFORE_PAUSE {
        let dead = sessions.pop().unwrap();
        let out = t.ev(Event::WarmEnded {
            pool,
            session: dead,
            cause: Some("the remote program ended".into()),
        });
        for (_, session) in opens(&out) {
            replaced += 1;
            t.ev(Event::WarmReady {
                pool,
                session,
                handshake: hs(),
            });
            sessions.insert(0, session);
        }
    }
    assert_eq!(
        replaced,
        DEATHS_BEFORE_PAUSE - 1,
        "the last death is not replaced"
    );
    assert_eq!(t.warm_of("x").unwrap().ready, 1);
    // The next request tries again.
    let out = t.lease_session(2, &s);
    assert!(hand_out(&out).is_some());
    assert_eq!(opens(&out).len(), 2, "{out:?}");
}

#[test]
fn a_lost_connection_is_made_again_by_the_next_request() {
    let mut t = T::new(vec![], None);
    let s = spec("x", false, 600, 2);
    let (pool, _) = t.warm_pool(&s);
    t.ev(Event::WarmLost {
        pool,
        cause: "the server closed the connection".into(),
    });
    let w = t.warm_of("x").unwrap();
    assert_eq!((w.connected, w.ready), (false, 0));
    let out = t.lease_session(2, &s);
    assert!(no_session(&out, 2).contains("warming up"));
    assert_eq!(connects(&out), [pool]);
}

#[test]
fn keep_warm_closes_an_unused_pool_and_keep_warm_0s_makes_none() {
    let mut t = T::new(vec![], Some(60));
    let s = spec("x", false, 120, 1);
    let (pool, sessions) = t.warm_pool(&s);
    // A pool keeps an auto-started supervisor.
    t.advance(100 * S);
    assert!(t.m.has_pools());
    let out = t.lease_session(2, &s);
    assert!(hand_out(&out).is_some());
    // Never while in use, however long the build.
    let out = t.advance(3600 * S);
    assert!(closes(&out).is_empty());
    t.ev(Event::WarmEnded {
        pool,
        session: sessions[0],
        cause: None,
    });
    let out = t.advance(119 * S);
    assert!(closes(&out).is_empty());
    assert_eq!(timer(&out), Some(t.now + S), "woken for keep-warm");
    let out = t.advance(S);
    assert_eq!(closes(&out), [pool], "{out:?}");
    assert!(!t.m.has_pools());
    assert!(t.warm_of("x").is_none());
    // Now the supervisor may linger and exit (its clients are gone: they were hooks).
    t.ev(Event::ClientGone(1));
    t.ev(Event::ClientGone(2));
    assert!(!has_exit(&t.advance(59 * S)));
    assert!(has_exit(&t.advance(S)));

    let mut t = T::new(vec![], None);
    let out = t.lease_session(1, &spec("y", false, 0, 1));
    assert!(no_session(&out, 1).contains("keep-warm is off"));
    assert!(connects(&out).is_empty());
    assert!(!t.m.has_pools());
}

#[test]
fn different_host_keys_are_different_pools() {
    let mut t = T::new(vec![], None);
    let a = spec("x", false, 600, 1);
    let mut b = a.clone();
    b.target.host_keys = vec!["ssh-ed25519 BBBB".into()];
    let pa = connects(&t.lease_session(1, &a));
    let pb = connects(&t.lease_session(2, &b));
    assert_eq!((pa.len(), pb.len()), (1, 1));
    assert_ne!(pa, pb);
    // The same spec again is the same pool (a new keep-warm just applies).
    let mut a2 = a.clone();
    a2.keep_warm_ms = 5_000;
    assert!(connects(&t.lease_session(3, &a2)).is_empty());
}

#[test]
fn a_lazy_builder_pool_lives_while_it_is_up_and_never_keeps_it_up() {
    let mut t = T::new(vec![cfg("vm", 1, Some(30))], None);
    let s = spec("vm", true, 600, 1);
    let out = t.lease_session(1, &s);
    assert!(no_session(&out, 1).contains("not up"), "{out:?}");
    assert!(!t.m.has_pools());
    t.bring_up("vm");
    let (pool, sessions) = t.warm_pool(&s);
    assert_eq!(sessions.len(), 2);
    assert_eq!(t.status("vm").warm.unwrap().ready, 2);
    // Used once (a lease and a hand-out), then idle: the idle stop comes as without a pool.
    assert!(matches!(t.lease(5, "vm"), Response::Leased { .. }));
    assert!(hand_out(&t.lease_session(5, &s)).is_some());
    t.release(5, "vm");
    let out = t.advance(29 * S);
    assert!(!has_stop(&out, "vm"));
    let out = t.advance(S);
    assert!(has_stop(&out, "vm"), "the pool is no lease: {out:?}");
    assert_eq!(closes(&out), [pool], "{out:?}");
    // The session still running (the hook has not closed it yet) ends later; nothing is left.
    t.ev(Event::WarmEnded {
        pool,
        session: sessions[0],
        cause: None,
    });
    assert!(!t.m.has_pools());
    // A new instance gets a new pool.
    t.stopped("vm");
    t.bring_up("vm");
    let out = t.lease_session(6, &s);
    let fresh = connects(&out);
    assert_eq!(fresh.len(), 1);
    assert_ne!(fresh[0], pool);
}

#[test]
fn shutdown_closes_the_pools_and_waits_for_sessions_in_use() {
    let mut t = T::new(vec![], None);
    let s = spec("x", false, 600, 2);
    let (pool, sessions) = t.warm_pool(&s);
    assert!(hand_out(&t.lease_session(2, &s)).is_some());
    let out = t.ev(Event::Shutdown);
    assert_eq!(closes(&out), [pool]);
    assert!(!has_exit(&out), "a session is in use");
    let out = t.lease_session(3, &s);
    assert!(no_session(&out, 3).contains("shutting down"));
    let out = t.ev(Event::WarmEnded {
        pool,
        session: sessions[0],
        cause: None,
    });
    assert!(has_exit(&out), "{out:?}");

    // A session that never ends is killed with everything at the bound.
    let mut t = T::new(vec![], None);
    let (_, _) = t.warm_pool(&s);
    assert!(hand_out(&t.lease_session(2, &s)).is_some());
    t.ev(Event::Shutdown);
    let out = t.advance(SHUTDOWN_BOUND);
    assert!(out.contains(&Action::KillAll), "{out:?}");
}

#[test]
fn warm_up_requests_make_a_pool_and_never_take_a_session() {
    let mut t = T::new(vec![], None);
    let s = spec("x", false, 600, 1);
    let out = t.req(1, Request::Warm { spec: s.clone() });
    assert_eq!(T::reply(&out, 1), Response::Ok);
    let pool = connects(&out)[0];
    let out = t.ev(Event::WarmConnected { pool });
    let (_, session) = opens(&out)[0];
    t.ev(Event::WarmReady {
        pool,
        session,
        handshake: hs(),
    });
    let out = t.req(2, Request::Warm { spec: s.clone() });
    assert!(hand_out(&out).is_none());
    assert_eq!(t.warm_of("x").unwrap().ready, 1);
}

impl T {
    /// Boots lazy builder `name` for `conn`, which waits for it; its readiness check answers
    /// with warm spec `s`. The pool opened as part of readiness.
    fn answered_with_warm(&mut self, conn: ConnId, name: &str, s: &SessionSpec) -> PoolId {
        self.ev(Event::ClientConnected(conn));
        assert!(has_start(&self.boot(conn, name), name));
        let out = self.req(
            conn,
            Request::WaitReady {
                builder: name.into(),
                timeout_ms: 5_000,
            },
        );
        assert!(!out.iter().any(|a| matches!(a, Action::Reply { .. })));
        let generation = self.generation(name);
        let out = self.ev(Event::BootSucceeded {
            builder: name.into(),
            generation,
            port: 2222,
            nix_version: "nix-store (Nix) 2.8.0".into(),
            took: Duration::from_millis(700),
            kind: BootKind::Restore,
            restorable: true,
            note: None,
            warm: Some(s.clone()),
        });
        assert!(
            !out.iter()
                .any(|a| matches!(a, Action::Reply { conn: c, .. } if *c == conn)),
            "the waiter hears nothing before the warm-up: {out:?}"
        );
        assert_eq!(self.status(name).state, State::Booting);
        let pools = connects(&out);
        assert_eq!(pools.len(), 1, "{out:?}");
        pools[0]
    }
}

fn waiter_answer(out: &[Action], conn: ConnId) -> State {
    match T::reply(out, conn) {
        Response::Builder { status } => status.state,
        other => panic!("expected a builder status, got {other:?}"),
    }
}

#[test]
fn a_lazy_builder_is_up_once_its_first_warm_session_is_ready_and_hands_it_out() {
    let snapshot = BuilderConfig {
        snapshot: true,
        ..cfg("vm", 2, Some(30))
    };
    let mut t = T::new(vec![snapshot], None);
    let s = spec("vm", true, 600, 2);
    let pool = t.answered_with_warm(1, "vm", &s);
    // A lease while it warms up is refused like one during the boot.
    assert!(refused(&t.lease(7, "vm")).contains("booting"));
    let out = t.ev(Event::WarmConnected { pool });
    let opened = opens(&out);
    assert_eq!(opened.len(), 1, "one session at readiness: {out:?}");
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::Reply { conn: 1, .. }))
    );
    t.now += Duration::from_millis(400);
    let out = t.ev(Event::WarmReady {
        pool,
        session: opened[0].1,
        handshake: hs(),
    });
    assert_eq!(waiter_answer(&out, 1), State::Up);
    assert!(
        opens(&out).is_empty(),
        "nothing more opens before a build asked: {out:?}"
    );
    assert!(
        out.iter().any(|a| matches!(a, Action::Log { message, .. }
        if message.contains("is up after 0.7s")
            && message.contains("first warm session is ready 0.40s after readiness"))),
        "{out:?}"
    );
    // The expected restore time is the readiness check's: a waiting hook decides as before.
    assert_eq!(t.status("vm").expected_boot_ms, Some(700));
    assert_eq!(t.status("vm").warm.map(|w| w.ready), Some(1));
    // The first build is handed that session; the pool then fills up.
    assert!(matches!(t.lease(1, "vm"), Response::Leased { .. }));
    let out = t.lease_session(2, &s);
    assert_eq!(hand_out(&out), Some((2, opened[0].1)), "{out:?}");
    assert_eq!(opens(&out).len(), 3, "{out:?}");
}

#[test]
fn a_warm_up_that_fails_never_fails_the_boot() {
    let mut t = T::new(vec![cfg("vm", 1, Some(30))], None);
    let s = spec("vm", true, 600, 1);
    let pool = t.answered_with_warm(1, "vm", &s);
    let out = t.ev(Event::WarmConnectFailed {
        pool,
        cause: "connection refused".into(),
    });
    assert_eq!(waiter_answer(&out, 1), State::Up);
    let st = t.status("vm");
    assert_eq!((st.boots_ok, &st.last_failure), (1, &None), "{st:?}");
    // The build connects directly.
    assert!(matches!(t.lease(1, "vm"), Response::Leased { .. }));
    assert!(no_session(&t.lease_session(2, &s), 2).contains("failed"));

    // A session that fails to start is the same.
    let mut t = T::new(vec![cfg("vm", 1, Some(30))], None);
    let pool = t.answered_with_warm(1, "vm", &s);
    let out = t.ev(Event::WarmConnected { pool });
    let (_, session) = opens(&out)[0];
    let out = t.ev(Event::WarmOpenFailed {
        pool,
        session,
        cause: "nix-store: not found".into(),
    });
    assert_eq!(waiter_answer(&out, 1), State::Up);
}

#[test]
fn a_slow_warm_up_is_bounded_and_never_outlasts_a_waiter() {
    let mut t = T::new(vec![cfg("vm", 1, Some(30))], None);
    let s = spec("vm", true, 600, 1);
    let pool = t.answered_with_warm(1, "vm", &s);
    let out = t.ev(Event::WarmConnected { pool });
    let (_, session) = opens(&out)[0];
    assert_eq!(timer(&out), Some(t.now + WARM_UP_BOUND), "{out:?}");
    let out = t.advance(WARM_UP_BOUND);
    assert_eq!(waiter_answer(&out, 1), State::Up);
    // The session goes on opening and is handed out once ready.
    t.ev(Event::WarmReady {
        pool,
        session,
        handshake: hs(),
    });
    assert_eq!(hand_out(&t.lease_session(2, &s)), Some((2, session)));

    // A waiter whose deadline comes first is answered "up" at it, not "booting".
    let mut t = T::new(vec![cfg("vm", 1, Some(30))], None);
    t.ev(Event::ClientConnected(3));
    let pool = t.answered_with_warm(1, "vm", &s);
    t.ev(Event::WarmConnected { pool });
    t.now += WARM_UP_BOUND / 2;
    let out = t.req(
        3,
        Request::WaitReady {
            builder: "vm".into(),
            timeout_ms: 500,
        },
    );
    assert!(
        !out.iter().any(|a| matches!(a, Action::Reply { .. })),
        "{out:?}"
    );
    let out = t.advance(Duration::from_millis(500));
    assert_eq!(waiter_answer(&out, 3), State::Up);
    assert_eq!(waiter_answer(&out, 1), State::Up);
}

#[test]
fn a_stop_during_the_warm_up_closes_its_pool_and_keep_warm_0s_has_none() {
    let mut t = T::new(vec![cfg("vm", 1, Some(30))], None);
    let s = spec("vm", true, 600, 1);
    let pool = t.answered_with_warm(1, "vm", &s);
    let out = t.req(
        2,
        Request::Down {
            builder: "vm".into(),
        },
    );
    assert!(has_stop(&out, "vm"), "{out:?}");
    assert_eq!(closes(&out), [pool], "{out:?}");
    let out = t.stopped("vm");
    assert_eq!(waiter_answer(&out, 1), State::Down);
    assert!(!t.m.has_pools());

    let mut t = T::new(vec![cfg("vm", 1, Some(30))], None);
    t.ev(Event::ClientConnected(1));
    t.boot(1, "vm");
    let generation = t.generation("vm");
    let out = t.ev(Event::BootSucceeded {
        builder: "vm".into(),
        generation,
        port: 2222,
        nix_version: "nix-store (Nix) 2.8.0".into(),
        took: Duration::from_secs(1),
        kind: BootKind::Cold,
        restorable: false,
        note: None,
        warm: Some(spec("vm", true, 0, 1)),
    });
    assert!(connects(&out).is_empty(), "{out:?}");
    assert_eq!(t.status("vm").state, State::Up);
}

#[test]
fn a_shutdown_during_the_warm_up_stops_the_builder_without_calling_it_up() {
    let mut t = T::new(vec![cfg("vm", 1, Some(30))], None);
    let s = spec("vm", true, 600, 1);
    let pool = t.answered_with_warm(1, "vm", &s);
    let out = t.ev(Event::Shutdown);
    assert_eq!(closes(&out), [pool], "{out:?}");
    assert!(has_stop(&out, "vm"), "{out:?}");
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::Log { message, .. } if message.contains("is up after"))),
        "{out:?}"
    );
    assert_eq!(t.status("vm").state, State::Stopping);
}
