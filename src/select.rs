//! Choosing a builder for one `try`: Nix's matching rules and ordering, the local-build checks,
//! and the decision (accept / boot / postpone / decline) with a one-line reason.
//!
//! Pure functions over the builder table and per-builder state: [`Matches`] once per `try`,
//! [`choose`] once per round. Only a lazy builder can be booted ([`LazyIndex`]). This module
//! must never do I/O, read a clock, take a lock or log: `slots.rs` measures the loads, the
//! planner (`hook/plan.rs`) merges the availability, and the hook prints the decision.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use crate::config::Builder;

/// What the daemon asks for in a `try`.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// `neededSystem`, e.g. `aarch64-linux` or `builtin`.
    pub system: &'a str,
    /// `requiredFeatures` (the derivation's `requiredSystemFeatures`).
    pub required_features: &'a BTreeSet<String>,
    /// `amWilling`: the daemon has a free local build slot right now.
    pub am_willing: bool,
}

/// What the local machine can build, from the hook's settings preamble.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalCapability {
    /// The `system` setting.
    pub system: String,
    /// The `extra-platforms` setting.
    pub extra_platforms: BTreeSet<String>,
    /// The `system-features` setting.
    pub system_features: BTreeSet<String>,
    /// The `max-jobs` setting.
    pub max_jobs: u64,
}

impl LocalCapability {
    /// Nix's `couldBuildLocally` (2.14 and later): `max-jobs > 0`, the system is `system` or in
    /// `extra-platforms`, and every required feature is in `system-features`. Ignores whether a
    /// local slot is free right now.
    pub fn could_build(&self, system: &str, required: &BTreeSet<String>) -> bool {
        self.max_jobs > 0
            && (system == self.system || self.extra_platforms.contains(system))
            && required.is_subset(&self.system_features)
    }

    /// Nix's `canBuildLocally`: [`could_build`](Self::could_build) and `amWilling`.
    pub fn can_build(&self, req: &Request<'_>) -> bool {
        req.am_willing && self.could_build(req.system, req.required_features)
    }
}

/// Why a builder does not match a request (the first rule that fails).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// Its systems do not include the requested one (and it is not `builtin`).
    System,
    /// It lacks these required features (in neither supported nor mandatory features).
    Features(Vec<String>),
    /// It has these mandatory features the derivation does not require.
    Mandatory(Vec<String>),
}

/// Nix's matching rule: the builder lists the system (or the system is `builtin`), supports
/// every required feature (supported ∪ mandatory), and each of its mandatory features is
/// required.
pub fn check_match(
    builder: &Builder,
    system: &str,
    required: &BTreeSet<String>,
) -> Result<(), Mismatch> {
    if system != "builtin" && !builder.systems.contains(system) {
        return Err(Mismatch::System);
    }
    let lacking: Vec<String> = required
        .iter()
        .filter(|f| {
            !builder.supported_features.contains(*f) && !builder.mandatory_features.contains(*f)
        })
        .cloned()
        .collect();
    if !lacking.is_empty() {
        return Err(Mismatch::Features(lacking));
    }
    let unmet: Vec<String> = builder
        .mandatory_features
        .iter()
        .filter(|f| !required.contains(*f))
        .cloned()
        .collect();
    if !unmet.is_empty() {
        return Err(Mismatch::Mandatory(unmet));
    }
    Ok(())
}

/// [`check_match`] for every builder of a table, in table order: computed once per `try`, then
/// read by every round's [`choose`] (the matching builders are the ones whose slots are probed;
/// the others give the decline reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matches(Vec<Result<(), Mismatch>>);

impl Matches {
    pub fn new(table: &[Builder], req: &Request<'_>) -> Self {
        Matches(
            table
                .iter()
                .map(|b| check_match(b, req.system, req.required_features))
                .collect(),
        )
    }

    /// Indices of the builders that match, in table order.
    pub fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_ok())
            .map(|(i, _)| i)
    }

    pub fn contains(&self, i: usize) -> bool {
        matches!(self.0.get(i), Some(Ok(())))
    }

    /// No builder matches.
    pub fn none(&self) -> bool {
        self.indices().next().is_none()
    }
}

/// Indices of the builders that match, in table order: the ones whose slots must be probed.
pub fn matching(table: &[Builder], req: &Request<'_>) -> Vec<usize> {
    Matches::new(table, req).indices().collect()
}

/// A table index that names a lazy builder: the only kind that can be booted, leased or waited
/// for. Made only by [`LazyIndex::of`] (which checks) and by [`choose`] for [`Decision::Boot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LazyIndex(usize);

impl LazyIndex {
    /// Entry `i` of `table`, if it is a lazy builder.
    pub fn of(table: &[Builder], i: usize) -> Option<LazyIndex> {
        table.get(i)?.lazy.as_ref().map(|_| LazyIndex(i))
    }

    /// The index into the table.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Whether a builder can take work now. Always-on builders are always [`Availability::Up`];
/// the other states are the supervisor's, for lazy builders.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Availability {
    /// Reachable now.
    #[default]
    Up,
    /// Down, and may be booted for this request.
    MustBoot,
    /// A boot is under way.
    Booting,
    /// Failed recently; skipped until the backoff expires.
    BackingOff { cause: String, retry_in: Duration },
}

/// Per-builder input to [`choose`]: availability and the load measured in the slot files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuilderState {
    pub availability: Availability,
    /// Slots held by others.
    pub load: u32,
    /// Whether a slot is free (and was taken by the prober).
    pub free_slot: bool,
}

/// At which level a decline reason is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeclineLevel {
    /// The local machine cannot build it: the user must see why.
    Warn,
    /// It will be built locally: only for `-vvvvv`.
    Chatty,
}

/// The answer to one `try`.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Build on this builder (index into the table); its free slot is the one to keep.
    Accept { builder: usize },
    /// Boot this lazy builder (its free slot is the one to reserve for it).
    Boot { builder: LazyIndex },
    /// Something matches but is full or booting, and the local machine cannot take it now.
    Postpone { reason: String },
    /// Nothing can take it: build locally or fail. `reason` is one line.
    Decline { reason: String, level: DeclineLevel },
}

/// Nix's order among builders with a free slot: lower load ÷ speed factor, then higher speed
/// factor, then lower load. Returns true if `a` is strictly better than `b` (so on a full tie
/// the earlier one in the table stays).
///
/// Nix's third rule (lower load) only mattered with 2.8's integer division, where `3 / 2 ==
/// 2 / 2`; with the float ratio current Nix uses, equal ratios and equal speed factors imply
/// equal loads, so it never decides anything and is left out.
fn better(a: (&Builder, u32), b: (&Builder, u32)) -> bool {
    let ra = f64::from(a.1) / a.0.speed_factor;
    let rb = f64::from(b.1) / b.0.speed_factor;
    if ra != rb {
        return ra < rb;
    }
    a.0.speed_factor > b.0.speed_factor
}

fn pick_best(table: &[Builder], states: &[BuilderState], pool: &[usize]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for &i in pool {
        let cand = (&table[i], state(states, i).load);
        match best {
            Some(b) if !better(cand, (&table[b], state(states, b).load)) => {}
            _ => best = Some(i),
        }
    }
    best
}

fn pick_best_lazy(
    table: &[Builder],
    states: &[BuilderState],
    pool: &[LazyIndex],
) -> Option<LazyIndex> {
    let indices: Vec<usize> = pool.iter().map(|l| l.0).collect();
    pick_best(table, states, &indices).map(LazyIndex)
}

fn state(states: &[BuilderState], i: usize) -> BuilderState {
    states.get(i).cloned().unwrap_or_default()
}

/// Decide one round of a `try`. `matches` is [`Matches::new`] of the same table and request;
/// `states` runs parallel to `table`; only the entries of matching builders are read (a missing
/// entry counts as up with no free slot).
///
/// Rules, in order:
/// 1. Matching as in [`check_match`]; a builder backing off is skipped.
/// 2. An up builder with a free slot wins, chosen by Nix's order (see [`better`]).
/// 3. Otherwise a lazy builder that must boot and has a free slot is booted — unless another
///    matching builder is already booting (wait for it), or the local machine could build the
///    derivation and the builder does not say `boot-for-local`.
/// 4. Otherwise, if a matching builder is full or booting: postpone when the local machine
///    cannot build it now, else decline (build locally).
/// 5. Otherwise decline, at warn level when the local machine could never build it.
pub fn choose(
    table: &[Builder],
    matches: &Matches,
    states: &[BuilderState],
    req: &Request<'_>,
    local: &LocalCapability,
) -> Decision {
    let could_local = local.could_build(req.system, req.required_features);
    let can_local = req.am_willing && could_local;

    let mut up_free = Vec::new();
    let mut boot_free = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    let mut busy: Vec<String> = Vec::new();
    let mut booting = false;
    // Failed builders that would match: what becomes of this build is said once, at the end.
    let mut backing_off: Vec<(&Builder, Duration)> = Vec::new();

    for (i, (b, matched)) in table.iter().zip(&matches.0).enumerate() {
        if let Err(m) = matched {
            reasons.push(describe_mismatch(b, req.system, m));
            continue;
        }
        let st = state(states, i);
        match st.availability {
            Availability::BackingOff { cause, retry_in } if retry_in.is_zero() => {
                // Disabled for now with no known retry time (Nix disables a machine it could
                // not connect to for the rest of the hook process).
                backing_off.push((b, Duration::ZERO));
                reasons.push(format!("'{}' failed ({cause})", b.name));
            }
            Availability::BackingOff { cause, retry_in } => {
                backing_off.push((b, retry_in));
                reasons.push(format!(
                    "'{}' failed recently ({cause}) and is not tried again for another {}",
                    b.name,
                    Secs(retry_in)
                ));
            }
            Availability::Booting => {
                booting = true;
                busy.push(format!("'{}' is booting", b.name));
            }
            Availability::Up if st.free_slot => up_free.push(i),
            Availability::Up => busy.push(format!(
                "'{}' is busy ({}/{} jobs)",
                b.name, st.load, b.max_jobs
            )),
            Availability::MustBoot if !st.free_slot => {
                busy.push(format!(
                    "'{}' is busy ({}/{} jobs)",
                    b.name, st.load, b.max_jobs
                ));
            }
            Availability::MustBoot => match &b.lazy {
                Some(l) if could_local && !l.boot_for_local => {
                    reasons.push(format!(
                        "'{}' is down and is not booted for derivations this machine can build (boot-for-local = false)",
                        b.name
                    ));
                }
                Some(_) => boot_free.push(LazyIndex(i)),
                // Only lazy builders boot; an always-on one said to be down is just down.
                None => reasons.push(format!("'{}' is down", b.name)),
            },
        }
    }

    if let Some(i) = pick_best(table, states, &up_free) {
        return Decision::Accept { builder: i };
    }
    if !booting && let Some(i) = pick_best_lazy(table, states, &boot_free) {
        return Decision::Boot { builder: i };
    }
    let wanted = describe_request(req);
    if !busy.is_empty() || !boot_free.is_empty() {
        if !can_local {
            return Decision::Postpone {
                reason: format!("waiting for a builder for {wanted}: {}", busy.join("; ")),
            };
        }
        let mut all = busy;
        all.extend(reasons);
        return Decision::Decline {
            reason: format!(
                "no free builder for {wanted}, building locally: {}",
                all.join("; ")
            ),
            level: DeclineLevel::Chatty,
        };
    }
    let reason = if table.is_empty() {
        format!("no builder for {wanted}: no builders are configured")
    } else {
        format!(
            "no builder for {wanted}: {}{}",
            reasons.join("; "),
            if could_local {
                String::new()
            } else {
                this_build_fails(&backing_off)
            }
        )
    };
    Decision::Decline {
        reason,
        level: if could_local {
            DeclineLevel::Chatty
        } else {
            DeclineLevel::Warn
        },
    }
}

/// What becomes of a build nothing here can take because its builders failed: nothing waits
/// for them (the daemon fails it at once), so the user is told when to start it again and how
/// to bring a lazy builder back now.
fn this_build_fails(failed: &[(&Builder, Duration)]) -> String {
    let Some(soonest) = failed.iter().map(|(_, d)| *d).min() else {
        return String::new();
    };
    let lazy: Vec<&str> = failed
        .iter()
        .filter(|(b, _)| b.is_lazy())
        .map(|(b, _)| b.name.as_str())
        .collect();
    let again = if soonest.is_zero() {
        "start it again".to_owned()
    } else {
        format!("start it again in {} or later", Secs(soonest))
    };
    let up = match lazy.as_slice() {
        [] => String::new(),
        [one] => format!(", or boot '{one}' at once with `nix-lazy-builder up {one}`"),
        many => format!(
            ", or boot one at once with `nix-lazy-builder up NAME` ({})",
            many.join(", ")
        ),
    };
    format!(". Nothing retries this build: it fails now; {again}{up}")
}

/// `aarch64-linux` or `aarch64-linux with {kvm, big-parallel}`.
fn describe_request(req: &Request<'_>) -> String {
    if req.required_features.is_empty() {
        req.system.to_owned()
    } else {
        let feats: Vec<&str> = req.required_features.iter().map(String::as_str).collect();
        format!("{} with {{{}}}", req.system, feats.join(", "))
    }
}

fn describe_mismatch(b: &Builder, system: &str, m: &Mismatch) -> String {
    let plural = |v: &[String]| if v.len() == 1 { "" } else { "s" };
    match m {
        Mismatch::System => format!("'{}' lacks system {system}", b.name),
        Mismatch::Features(f) => {
            format!("'{}' lacks feature{} {}", b.name, plural(f), f.join(", "))
        }
        Mismatch::Mandatory(f) => {
            format!(
                "'{}' requires mandatory feature{} {}",
                b.name,
                plural(f),
                f.join(", ")
            )
        }
    }
}

/// Whole seconds, rounded up: "30s".
struct Secs(Duration);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        write!(f, "{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{command_lazy, set, ssh_builder};

    fn builder(name: &str, systems: &[&str], supported: &[&str], mandatory: &[&str]) -> Builder {
        Builder {
            supported_features: set(supported),
            mandatory_features: set(mandatory),
            ..ssh_builder(name, systems, 2)
        }
    }

    fn lazy(mut b: Builder, boot_for_local: bool) -> Builder {
        b.lazy = Some(command_lazy(boot_for_local));
        b
    }

    fn with_speed(mut b: Builder, s: f64) -> Builder {
        b.speed_factor = s;
        b
    }

    /// The reason and level of a decline; any other decision fails the test.
    fn declined(d: Decision) -> (String, DeclineLevel) {
        match d {
            Decision::Decline { reason, level } => (reason, level),
            d => panic!("{d:?}"),
        }
    }

    fn up(load: u32, free: bool) -> BuilderState {
        BuilderState {
            availability: Availability::Up,
            load,
            free_slot: free,
        }
    }

    fn st(availability: Availability, load: u32, free: bool) -> BuilderState {
        BuilderState {
            availability,
            load,
            free_slot: free,
        }
    }

    fn local(system: &str) -> LocalCapability {
        LocalCapability {
            system: system.to_owned(),
            extra_platforms: set(&["i686-linux"]),
            system_features: set(&["kvm", "big-parallel", "benchmark"]),
            max_jobs: 1,
        }
    }

    fn decide(
        table: &[Builder],
        states: &[BuilderState],
        system: &str,
        feats: &[&str],
        willing: bool,
        l: &LocalCapability,
    ) -> Decision {
        let f = set(feats);
        let req = Request {
            system,
            required_features: &f,
            am_willing: willing,
        };
        choose(table, &Matches::new(table, &req), states, &req, l)
    }

    #[test]
    fn matching_rules() {
        let b = builder("b", &["aarch64-linux"], &["kvm"], &["benchmark"]);
        let m = |sys: &str, f: &[&str]| check_match(&b, sys, &set(f));
        assert_eq!(m("aarch64-linux", &["benchmark"]), Ok(()));
        assert_eq!(m("aarch64-linux", &["benchmark", "kvm"]), Ok(()));
        assert_eq!(
            m("builtin", &["benchmark"]),
            Ok(()),
            "builtin matches any system"
        );
        assert_eq!(m("x86_64-linux", &["benchmark"]), Err(Mismatch::System));
        assert_eq!(
            m(
                "aarch64-linux",
                &["benchmark", "nixos-test", "big-parallel"]
            ),
            Err(Mismatch::Features(vec![
                "big-parallel".into(),
                "nixos-test".into()
            ]))
        );
        assert_eq!(
            m("aarch64-linux", &[]),
            Err(Mismatch::Mandatory(vec!["benchmark".into()]))
        );
        // A mandatory feature counts as supported.
        let c = builder("c", &["x"], &[], &["kvm"]);
        assert_eq!(check_match(&c, "x", &set(&["kvm"])), Ok(()));
        let table = [b.clone(), c, builder("d", &["aarch64-linux"], &[], &[])];
        let f = set(&[]);
        assert_eq!(
            matching(
                &table,
                &Request {
                    system: "aarch64-linux",
                    required_features: &f,
                    am_willing: true
                }
            ),
            [2]
        );
    }

    #[test]
    fn only_lazy_builders_boot() {
        let sys = "aarch64-linux";
        let l = local("x86_64-linux");
        let always = builder("always", &[sys], &[], &[]);
        let vm = lazy(builder("vm", &[sys], &[], &[]), false);
        let table = [always, vm];
        assert_eq!(LazyIndex::of(&table, 0), None);
        assert_eq!(LazyIndex::of(&table, 1).map(LazyIndex::index), Some(1));
        assert_eq!(LazyIndex::of(&table, 2), None);
        // An always-on builder said to be down is never booted: it is down.
        let (reason, _) = declined(decide(
            &table[..1],
            &[st(Availability::MustBoot, 0, true)],
            sys,
            &[],
            true,
            &l,
        ));
        assert_eq!(reason, "no builder for aarch64-linux: 'always' is down");
        let f = set(&[]);
        let req = Request {
            system: sys,
            required_features: &f,
            am_willing: true,
        };
        let m = Matches::new(&table, &req);
        assert_eq!(m.indices().collect::<Vec<_>>(), [0, 1]);
        assert!(m.contains(1) && !m.contains(2) && !m.none());
        assert!(Matches::new(&table[..0], &req).none());
    }

    #[test]
    fn local_capability() {
        let mut l = local("x86_64-linux");
        assert!(l.could_build("x86_64-linux", &set(&["kvm"])));
        assert!(l.could_build("i686-linux", &set(&[])), "extra-platforms");
        assert!(!l.could_build("aarch64-linux", &set(&[])));
        assert!(!l.could_build("x86_64-linux", &set(&["nixos-test"])));
        let f = set(&[]);
        assert!(l.can_build(&Request {
            system: "x86_64-linux",
            required_features: &f,
            am_willing: true
        }));
        assert!(!l.can_build(&Request {
            system: "x86_64-linux",
            required_features: &f,
            am_willing: false
        }));
        l.max_jobs = 0;
        assert!(!l.could_build("x86_64-linux", &set(&[])), "max-jobs 0");
    }

    #[test]
    fn ordering_follows_nix() {
        let l = local("x86_64-linux");
        let sys = "aarch64-linux";
        let t = |speeds: &[f64]| -> Vec<Builder> {
            speeds
                .iter()
                .enumerate()
                .map(|(i, s)| with_speed(builder(&format!("b{i}"), &[sys], &[], &[]), *s))
                .collect()
        };
        // (the builders' speed factors, their (load, free slot), the one chosen)
        for (speeds, loads, chosen) in [
            // Lowest load / speed wins.
            ([1.0, 4.0], [(1, true), (3, true)], 1),
            // Equal ratio: higher speed factor wins.
            ([1.0, 4.0], [(1, true), (4, true)], 1),
            // Fractional ratios: 3 / 2 beats 2 / 1 (2.8's integer division called them equal).
            ([1.0, 2.0], [(2, true), (3, true)], 1),
            // Full tie: table order.
            ([2.0, 2.0], [(1, true), (1, true)], 0),
            // A builder with no free slot is never chosen, whatever its ratio.
            ([2.0, 2.0], [(0, false), (5, true)], 1),
        ] {
            let states = loads.map(|(load, free)| up(load, free));
            assert_eq!(
                decide(&t(&speeds), &states, sys, &[], false, &l),
                Decision::Accept { builder: chosen },
                "speed factors {speeds:?}, (load, free slot) {loads:?}"
            );
        }
        // Non-matching builders are ignored even with a free slot.
        let mut table = t(&[1.0, 1.0]);
        table[0].systems = set(&["x86_64-darwin"]);
        assert_eq!(
            decide(&table, &[up(0, true), up(1, true)], sys, &[], false, &l),
            Decision::Accept { builder: 1 }
        );
    }

    #[test]
    fn full_builders_postpone_or_decline() {
        let table = [builder("a", &["aarch64-linux", "x86_64-linux"], &[], &[])];
        let l = local("x86_64-linux");
        let full = [up(2, false)];
        // Cannot build locally: postpone.
        match decide(&table, &full, "aarch64-linux", &[], true, &l) {
            Decision::Postpone { reason } => assert_eq!(
                reason,
                "waiting for a builder for aarch64-linux: 'a' is busy (2/2 jobs)"
            ),
            d => panic!("{d:?}"),
        }
        // Could build locally but no local slot now (amWilling = 0): postpone too.
        assert!(matches!(
            decide(&table, &full, "x86_64-linux", &[], false, &l),
            Decision::Postpone { .. }
        ));
        // Can build locally now: decline, quietly.
        match decide(&table, &full, "x86_64-linux", &[], true, &l) {
            Decision::Decline {
                level: DeclineLevel::Chatty,
                reason,
            } => assert!(
                reason
                    .starts_with("no free builder for x86_64-linux, building locally: 'a' is busy"),
                "{reason}"
            ),
            d => panic!("{d:?}"),
        }
        // max-jobs 0 in the machines table: never free, so postponed forever (as in Nix).
        let mut zero = table.clone();
        zero[0].max_jobs = 0;
        assert!(matches!(
            decide(&zero, &[up(0, false)], "aarch64-linux", &[], true, &l),
            Decision::Postpone { .. }
        ));
    }

    #[test]
    fn decline_reason_lists_every_builder() {
        let table = [
            builder("a", &["x86_64-linux"], &["kvm"], &[]),
            builder("b", &["aarch64-linux"], &[], &[]),
            builder("c", &["aarch64-linux"], &["kvm"], &["benchmark"]),
        ];
        let states = [up(0, true), up(0, true), up(0, true)];
        let l = local("x86_64-linux");
        let (reason, level) =
            declined(decide(&table, &states, "aarch64-linux", &["kvm"], true, &l));
        assert_eq!(
            reason,
            "no builder for aarch64-linux with {kvm}: 'a' lacks system aarch64-linux; 'b' lacks feature kvm; 'c' requires mandatory feature benchmark"
        );
        assert_eq!(level, DeclineLevel::Warn, "cannot build locally");
        // A feature the local machine lacks: warn, whatever amWilling says.
        let (reason, level) = declined(decide(
            &table,
            &states,
            "x86_64-linux",
            &["nixos-test"],
            false,
            &local("x86_64-linux"),
        ));
        assert_eq!(
            level,
            DeclineLevel::Warn,
            "nixos-test is not a local feature"
        );
        assert!(reason.contains("'a' lacks feature nixos-test"), "{reason}");
        match decide(&table[1..], &states[1..], "x86_64-linux", &[], false, &l) {
            Decision::Decline {
                level: DeclineLevel::Chatty,
                reason,
            } => {
                assert_eq!(
                    reason,
                    "no builder for x86_64-linux: 'b' lacks system x86_64-linux; 'c' lacks system x86_64-linux"
                )
            }
            d => panic!("{d:?}"),
        }
        let (reason, _) = declined(decide(&[], &[], "x86_64-linux", &["a", "b"], true, &l));
        assert_eq!(
            reason,
            "no builder for x86_64-linux with {a, b}: no builders are configured"
        );
    }

    #[test]
    fn lazy_builders() {
        let sys = "aarch64-linux";
        let l = local("x86_64-linux");
        let always = builder("always", &[sys, "x86_64-linux"], &[], &[]);
        let vm = lazy(builder("vm", &[sys, "x86_64-linux"], &[], &[]), false);
        let table = [always.clone(), vm.clone()];
        // An up builder with a free slot beats booting, even when loaded.
        assert_eq!(
            decide(
                &table,
                &[up(1, true), st(Availability::MustBoot, 0, true)],
                sys,
                &[],
                true,
                &l
            ),
            Decision::Accept { builder: 0 }
        );
        // No up builder free: boot.
        assert_eq!(
            decide(
                &table,
                &[up(2, false), st(Availability::MustBoot, 0, true)],
                sys,
                &[],
                true,
                &l
            ),
            Decision::Boot {
                builder: LazyIndex(1)
            }
        );
        // Already booting: wait for it instead of booting more.
        let vm2 = lazy(builder("vm2", &[sys], &[], &[]), false);
        let t3 = [vm.clone(), vm2];
        match decide(
            &t3,
            &[
                st(Availability::Booting, 0, true),
                st(Availability::MustBoot, 0, true),
            ],
            sys,
            &[],
            true,
            &l,
        ) {
            Decision::Postpone { reason } => {
                assert!(reason.contains("'vm' is booting"), "{reason}")
            }
            d => panic!("{d:?}"),
        }
        // Booting and the local machine can build it now: decline.
        assert!(matches!(
            decide(
                &t3,
                &[st(Availability::Booting, 0, true), up(0, false)],
                "x86_64-linux",
                &[],
                true,
                &l
            ),
            Decision::Decline {
                level: DeclineLevel::Chatty,
                ..
            }
        ));
        // Locally buildable: never booted without boot-for-local...
        let (reason, level) = declined(decide(
            std::slice::from_ref(&vm),
            &[st(Availability::MustBoot, 0, true)],
            "x86_64-linux",
            &[],
            false,
            &l,
        ));
        assert_eq!(level, DeclineLevel::Chatty);
        assert!(
            reason.contains("'vm' is down") && reason.contains("boot-for-local"),
            "{reason}"
        );
        // ...and booted with it.
        let eager = lazy(builder("eager", &["x86_64-linux"], &[], &[]), true);
        assert_eq!(
            decide(
                &[eager],
                &[st(Availability::MustBoot, 0, true)],
                "x86_64-linux",
                &[],
                true,
                &l
            ),
            Decision::Boot {
                builder: LazyIndex(0)
            }
        );
        // Backing off: skipped, with the cause in the reason.
        let off = st(
            Availability::BackingOff {
                cause: "boot timed out".into(),
                retry_in: Duration::from_millis(29_500),
            },
            0,
            false,
        );
        match decide(
            std::slice::from_ref(&vm),
            std::slice::from_ref(&off),
            sys,
            &[],
            true,
            &l,
        ) {
            Decision::Decline {
                reason,
                level: DeclineLevel::Warn,
            } => {
                assert_eq!(
                    reason,
                    "no builder for aarch64-linux: 'vm' failed recently (boot timed out) and is not \
                     tried again for another 30s. Nothing retries this build: it fails now; start \
                     it again in 30s or later, or boot 'vm' at once with `nix-lazy-builder up vm`"
                )
            }
            d => panic!("{d:?}"),
        }
        let disabled = st(
            Availability::BackingOff {
                cause: "connection refused".into(),
                retry_in: Duration::ZERO,
            },
            0,
            false,
        );
        let (reason, _) = declined(decide(
            std::slice::from_ref(&vm),
            &[disabled],
            sys,
            &[],
            true,
            &l,
        ));
        assert_eq!(
            reason,
            "no builder for aarch64-linux: 'vm' failed (connection refused). Nothing \
             retries this build: it fails now; start it again, or boot 'vm' at once with \
             `nix-lazy-builder up vm`"
        );
        // Backing off does not hide a healthy alternative.
        assert_eq!(
            decide(&[vm, always], &[off, up(0, true)], sys, &[], true, &l),
            Decision::Accept { builder: 1 }
        );
    }

    #[test]
    fn a_declined_build_is_told_what_becomes_of_it() {
        let sys = "x86_64-linux";
        let vm = lazy(builder("vm", &[sys], &[], &[]), true);
        let vm2 = lazy(builder("vm2", &[sys], &[], &[]), true);
        let always = builder("always", &[sys], &[], &[]);
        let off = |secs: u64| {
            st(
                Availability::BackingOff {
                    cause: "boom".into(),
                    retry_in: Duration::from_secs(secs),
                },
                0,
                false,
            )
        };
        // The local machine builds it: it is built locally, nothing fails.
        let (reason, level) = declined(decide(
            std::slice::from_ref(&vm),
            &[off(20)],
            sys,
            &[],
            true,
            &local(sys),
        ));
        assert_eq!(level, DeclineLevel::Chatty);
        assert!(!reason.contains("fails now"), "{reason}");
        // Nothing here can: the soonest retry, and every lazy builder that `up` could boot.
        let nowhere = local("aarch64-linux");
        let (reason, level) = declined(decide(
            &[always, vm, vm2],
            &[off(40), off(20), off(30)],
            sys,
            &[],
            true,
            &nowhere,
        ));
        assert_eq!(level, DeclineLevel::Warn);
        assert!(
            reason.ends_with(
                ". Nothing retries this build: it fails now; start it again in 20s or \
                 later, or boot one at once with `nix-lazy-builder up NAME` (vm, vm2)"
            ),
            "{reason}"
        );
        // A builder that merely lacks the system says nothing of a retry.
        let (reason, _) = declined(decide(
            &[builder("other", &["riscv64-linux"], &[], &[])],
            &[up(0, true)],
            sys,
            &[],
            true,
            &nowhere,
        ));
        assert!(!reason.contains("retries"), "{reason}");
    }
}
