//! Invariants that hold over random event sequences (proptest).

use super::*;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Connect(u8),
    Gone(u8),
    Boot(u8, u8, bool),
    Wait(u8, u8, u16),
    Lease(u8, u8),
    Release(u8, u8),
    Report(u8, u8),
    Down(u8, u8),
    BootOk(u8),
    BootErr(u8),
    Exited(u8),
    StopDone(u8),
    Advance(u16),
    /// Keep a, keep b, a's max-jobs, a's boot fingerprint.
    Reconfig(bool, bool, u8, bool),
    /// A warm session for lazy builder a (true) or an always-on builder.
    LeaseSession(u8, bool),
    /// The runtime answers the oldest connect it was asked for: connected or not.
    Linked(bool),
    /// The runtime answers the oldest session open: ready or not.
    Opened(bool),
    /// A ready (false) or handed-out (true) session ends, the n-th one.
    Ended(bool, u8),
    /// A pool's connection is lost.
    Lost(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0u8..4;
    let b = 0u8..2;
    prop_oneof![
        1 => c.clone().prop_map(Op::Connect),
        1 => c.clone().prop_map(Op::Gone),
        3 => (c.clone(), b.clone(), any::<bool>()).prop_map(|(c, b, f)| Op::Boot(c, b, f)),
        1 => (c.clone(), b.clone(), 0u16..20).prop_map(|(c, b, t)| Op::Wait(c, b, t)),
        3 => (c.clone(), b.clone()).prop_map(|(c, b)| Op::Lease(c, b)),
        2 => (c.clone(), b.clone()).prop_map(|(c, b)| Op::Release(c, b)),
        1 => (c.clone(), b.clone()).prop_map(|(c, b)| Op::Report(c, b)),
        1 => (c, b.clone()).prop_map(|(c, b)| Op::Down(c, b)),
        3 => b.clone().prop_map(Op::BootOk),
        1 => b.clone().prop_map(Op::BootErr),
        1 => b.clone().prop_map(Op::Exited),
        2 => b.prop_map(Op::StopDone),
        3 => (0u16..40).prop_map(Op::Advance),
        1 => (any::<bool>(), any::<bool>(), 1u8..4, any::<bool>())
            .prop_map(|(a, b, m, f)| Op::Reconfig(a, b, m, f)),
        3 => (0u8..4, any::<bool>()).prop_map(|(c, l)| Op::LeaseSession(c, l)),
        2 => any::<bool>().prop_map(Op::Linked),
        3 => any::<bool>().prop_map(Op::Opened),
        2 => (any::<bool>(), 0u8..4).prop_map(|(h, n)| Op::Ended(h, n)),
        1 => (0u8..4).prop_map(Op::Lost),
    ]
}

proptest! {
    #[test]
    fn invariants_hold(ops in proptest::collection::vec(op(), 1..80)) {
        let names = ["a", "b"];
        let mut t = T::new(vec![cfg("a", 2, Some(10)), cfg("b", 1, None)], Some(30));
        // Which builders the runtime was asked to boot/stop, by generation.
        let mut running: BTreeMap<&str, Option<Generation>> = BTreeMap::new();
        let mut max_a = 2u32;
        let warm_spec = |lazy: bool| crate::supervisor::proto::SessionSpec {
            builder: if lazy { "a".into() } else { "ssh://x".into() },
            store_uri: "ssh://x".into(),
            lazy,
            target: crate::ssh::TargetSpec {
                host: "h".into(),
                port: 22,
                user: "u".into(),
                identities: vec![],
                host_keys: vec!["k".into()],
            },
            command: "c".into(),
            protocol: crate::store::warm::Protocol::Serve,
            keep_warm_ms: 20_000,
            max_jobs: 2,
        };
        // What the runtime was asked to do and has not answered yet, and what it holds.
        let mut connecting: Vec<PoolId> = Vec::new();
        let mut opening: Vec<(PoolId, SessionId)> = Vec::new();
        let mut pooled: Vec<(PoolId, SessionId)> = Vec::new();
        let mut handed: Vec<(PoolId, SessionId)> = Vec::new();
        let mut pools_seen: Vec<PoolId> = Vec::new();
        for op in ops {
            if t.m.has_exited() {
                break;
            }
            let before: Vec<BuilderStatus> = t.m.status(t.now);
            let this = op.clone();
            let out = match op {
                Op::Connect(c) => t.ev(Event::ClientConnected(c.into())),
                Op::Gone(c) => t.ev(Event::ClientGone(c.into())),
                Op::Boot(c, b, force) => t.req(c.into(), Request::Boot { builder: names[b as usize].into(), force }),
                Op::Wait(c, b, s) => t.req(c.into(), Request::WaitReady { builder: names[b as usize].into(), timeout_ms: u64::from(s) * 1000 }),
                Op::Lease(c, b) => t.req(c.into(), Request::Lease { builder: names[b as usize].into() }),
                Op::Release(c, b) => t.req(c.into(), Request::Release { builder: names[b as usize].into() }),
                Op::Report(c, b) => t.req(c.into(), Request::ReportFailure { builder: names[b as usize].into(), cause: "x".into() }),
                Op::Down(c, b) => t.req(c.into(), Request::Down { builder: names[b as usize].into() }),
                Op::BootOk(b) => t.succeed(names[b as usize], 1),
                Op::BootErr(b) => t.fail(names[b as usize], "e"),
                Op::Exited(b) => {
                    let n = names[b as usize];
                    let generation = t.generation(n);
                    t.ev(Event::InstanceExited { builder: n.into(), generation, report: "x".into() })
                }
                Op::StopDone(b) => t.stopped(names[b as usize]),
                Op::Advance(s) => t.advance(Duration::from_secs(s.into())),
                Op::Reconfig(keep_a, keep_b, m, f) => {
                    let mut builders = Vec::new();
                    if keep_a {
                        max_a = m.into();
                        let mut a = cfg("a", max_a, Some(10));
                        a.boot_fingerprint = u64::from(f);
                        builders.push(a);
                    }
                    if keep_b {
                        builders.push(cfg("b", 1, None));
                    }
                    t.reconfigure(builders)
                }
                Op::LeaseSession(c, lazy) => t.req(c.into(), Request::LeaseSession { spec: warm_spec(lazy) }),
                Op::Linked(ok) => {
                    if connecting.is_empty() {
                        continue;
                    }
                    let pool = connecting.remove(0);
                    if ok {
                        t.ev(Event::WarmConnected { pool })
                    } else {
                        t.ev(Event::WarmConnectFailed { pool, cause: "x".into() })
                    }
                }
                Op::Opened(ok) => {
                    if opening.is_empty() {
                        continue;
                    }
                    let (pool, session) = opening.remove(0);
                    if ok {
                        pooled.push((pool, session));
                        t.ev(Event::WarmReady { pool, session, handshake: crate::store::warm::Handshake::Serve { version: [2, 7], server: [2, 7] } })
                    } else {
                        t.ev(Event::WarmOpenFailed { pool, session, cause: "x".into() })
                    }
                }
                Op::Ended(in_use, n) => {
                    let list = if in_use { &mut handed } else { &mut pooled };
                    if list.is_empty() {
                        continue;
                    }
                    let (pool, session) = list.remove(usize::from(n) % list.len());
                    t.ev(Event::WarmEnded { pool, session, cause: None })
                }
                Op::Lost(n) => {
                    if pools_seen.is_empty() {
                        continue;
                    }
                    let pool = pools_seen[usize::from(n) % pools_seen.len()];
                    pooled.retain(|(p, _)| *p != pool);
                    opening.retain(|(p, _)| *p != pool);
                    t.ev(Event::WarmLost { pool, cause: "x".into() })
                }
            };
            for a in &out {
                match a {
                    Action::WarmConnect { pool, .. } => {
                        connecting.push(*pool);
                        if !pools_seen.contains(pool) {
                            pools_seen.push(*pool);
                        }
                    }
                    Action::WarmOpen { pool, session, .. } => opening.push((*pool, *session)),
                    Action::HandOut { pool, session, .. } => {
                        // Only sessions that were ready, each once.
                        let at = pooled.iter().position(|x| *x == (*pool, *session));
                        prop_assert!(at.is_some(), "handed out a session that was not ready: {:?}", out);
                        pooled.remove(at.unwrap_or(0));
                        handed.push((*pool, *session));
                        // A lazy builder's session only while it is up.
                        if matches!(this, Op::LeaseSession(_, true)) {
                            prop_assert_eq!(t.status("a").state, State::Up);
                        }
                    }
                    Action::WarmClose { pool } => {
                        pooled.retain(|(p, _)| p != pool);
                        opening.retain(|(p, _)| p != pool);
                        connecting.retain(|p| p != pool);
                    }
                    _ => {}
                }
            }
            // A lazy builder's pool holds no ready session unless the builder is up.
            let a_warm = t.m.status(t.now).into_iter().find(|s| s.name == "a");
            if let Some(st) = a_warm
                && let Some(w) = &st.warm
            {
                prop_assert!(w.ready == 0 || st.state == State::Up, "{:?}", st);
                prop_assert!(w.ready + w.in_use <= SESSIONS_PER_CONNECTION);
            }
            for a in &out {
                match a {
                    Action::Stop { builder, generation } => {
                        let st = before.iter().find(|s| &s.name == builder).unwrap();
                        // Never stop a builder that holds a lease (no shutdown here): only
                        // the release of the last one may stop a leased builder.
                        let now = t.m.status(t.now).into_iter().find(|s| &s.name == builder).unwrap();
                        prop_assert_eq!(now.leases, 0, "stopped '{}' with leases: {:?}", builder, out);
                        if !matches!(this, Op::Release(..) | Op::Gone(..)) {
                            prop_assert_eq!(st.leases, 0, "stopped '{}' with leases: {:?}", builder, out);
                        }
                        prop_assert_eq!(running.get(builder.as_str()).copied().flatten(), Some(*generation));
                    }
                    Action::StartBoot { builder, generation } => {
                        let slot = running.entry(names.iter().find(|n| *n == builder).copied().unwrap()).or_default();
                        // At most one instance per builder.
                        let now_state = t.status(builder).state;
                        prop_assert!(now_state == State::Booting);
                        *slot = Some(*generation);
                    }
                    Action::Reply { response: Response::Leased { status }, .. } => {
                        prop_assert_eq!(status.state, State::Up);
                        let max = if status.name == "a" { max_a } else { 1 };
                        prop_assert!(status.leases <= max);
                    }
                    _ => {}
                }
            }
            // Lease counts agree with the connections' own counts.
            for (i, s) in t.m.slots.iter().enumerate() {
                let sum: u32 = t.m.clients.values().map(|c| c.leases.get(&s.cfg.name).copied().unwrap_or(0)).sum();
                prop_assert_eq!(s.leases, sum, "builder {}", i);
                if s.leases > 0 {
                    prop_assert!(matches!(s.phase, Phase::Up | Phase::Draining(_)), "{:?}", s.phase);
                }
                // A removed builder only stays while its instance runs.
                if s.removed {
                    prop_assert!(s.phase.has_instance(), "{:?}", s.phase);
                }
            }
            // Leases on a builder that is gone are gone from the connections too.
            for c in t.m.clients.values() {
                for name in c.leases.keys() {
                    prop_assert!(t.m.slot_index(name).is_some(), "lease on vanished '{}'", name);
                }
            }
        }
    }
}
