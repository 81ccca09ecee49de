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
            };
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
