//! The `try` planner: what the hook does next while it answers one `try`, as a pure state
//! machine with time as an input.
//!
//! [`Planner::start`] takes the daemon's request and returns a [`Step`]: what to log first
//! ([`Note`]s), which builder's slot the `try` holds after it ([`Step::holding`]), and what to do
//! ([`Next`]). Each `Next` that needs an answer is a value whose only methods take that answer
//! and the time it arrived, and return the next step, so an answer can never go to the wrong
//! question. The runtime (`hook/mod.rs`) performs the steps.
//!
//! One `try` runs in rounds: its matching builders are found once ([`Matches`]); each round
//! merges what is known of each builder into one [`Availability`] (this process's failed
//! connects, the supervisor's word on lazy builders, other hooks' remembered failures of
//! always-on ones), probes the slots of the ones not backing off, and lets `select` choose.
//! A slot held for a booting builder stays held from one round to the next.
//!
//! This module must never do I/O: no clock (every input comes with `now`), no files, sockets,
//! processes or environment, no tokio and no tracing (the log lines are [`Note`]s).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use hook_protocol::StorePath;
use hook_protocol::derivation::{Derivation, OutputKind};
use hook_protocol::hook::TryRequest;
use hook_protocol::log::Verbosity;

use crate::config::Builder;
use crate::select::{
    self, Availability, BuilderState, Decision, DeclineLevel, LazyIndex, LocalCapability, Matches,
    Request,
};
use crate::supervisor::client::{self, Verdict};
use crate::supervisor::proto::{BuilderStatus, State};

/// How long a `try` watches for a slot to free on full builders before it answers `# postpone`.
/// While it waits, the daemon reads nothing else, so this stays well below the daemon's poll
/// interval (`build-poll-interval`, 5 s by default).
pub const SLOT_WAIT: Duration = Duration::from_millis(2500);
/// How often the slots are probed again during [`SLOT_WAIT`].
pub const SLOT_POLL: Duration = Duration::from_millis(50);

/// How long a `try` may wait, for a slot and for a boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The whole wait for a slot on full builders ([`SLOT_WAIT`]).
    pub slot_wait: Duration,
    /// The pause between two probes while waiting for a slot ([`SLOT_POLL`]).
    pub slot_poll: Duration,
    /// The longest wait for a boot (`lazy::wait_limit` of the daemon's poll interval).
    pub boot_wait: Duration,
}

impl Limits {
    /// [`SLOT_WAIT`] and [`SLOT_POLL`], and `boot_wait` for boots.
    pub fn new(boot_wait: Duration) -> Self {
        Limits {
            slot_wait: SLOT_WAIT,
            slot_poll: SLOT_POLL,
            boot_wait,
        }
    }
}

/// A line the runtime logs before it performs a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// An `@nix` message at this level.
    Say { level: Verbosity, text: String },
    /// A debug line (for `-vvvvv`).
    Debug(String),
}

/// What one connection failure makes of a builder: the cause this process backs off with, and
/// the one other hooks remember.
pub fn connection_failed(error: &str) -> String {
    format!("connection failed: {error}")
}

/// Why `drv` cannot be built remotely by us, if it cannot: an output whose path is only known
/// once it is built, unless the derivation is a resolved floating content-addressed one (every
/// output floating, no input derivations: the daemon resolves them before it asks a hook, and
/// the remote's BuildResult then names each output's path and realisation). An impure output,
/// or one deferred on an unbuilt content-addressed input, has no path we could bring back.
pub fn not_remotely_buildable(drv_path: &StorePath, drv: &Derivation) -> Option<String> {
    if drv.floating_output_ids().is_some() {
        return None;
    }
    let outputs = drv.output_paths().ok()?;
    let floating: Vec<&str> = outputs
        .iter()
        .filter(|(_, path)| path.is_none())
        .map(|(name, _)| name.as_str())
        .collect();
    let why = if drv
        .basic
        .outputs
        .values()
        .any(|o| o.kind() == OutputKind::Impure)
    {
        "impure"
    } else if drv.is_floating_ca() {
        "floating content-addressed, with input derivations not yet resolved"
    } else {
        "deferred on a content-addressed input not yet built"
    };
    (!floating.is_empty()).then(|| {
        format!(
            "not building '{drv_path}' remotely: its output{} {} {} no store path before it is \
             built ({why}), which nix-lazy-builder cannot bring back yet",
            if floating.len() == 1 { "" } else { "s" },
            floating
                .iter()
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", "),
            if floating.len() == 1 { "has" } else { "have" },
        )
    })
}

/// How long to wait for a boot now, or `None` to postpone: only when it should be done within
/// `limit` with a tenth of its expected duration to spare (a boot that outlasts the wait costs
/// the wait *and* the next poll interval), or is a little overdue (then it is most likely
/// moments away). A boot that is far overdue is stuck, and waiting on it every time would
/// stall the daemon for nothing.
pub fn wait_budget(s: &BuilderStatus, limit: Duration) -> Option<Duration> {
    if s.state != State::Booting {
        return None;
    }
    let max = limit.as_millis() as u64;
    let elapsed = s.booting_ms.unwrap_or(0);
    let expected = s.expected_boot_ms?;
    let close = expected.saturating_sub(elapsed) + expected / 10 <= max;
    let stuck = elapsed > expected.saturating_mul(2) + max;
    (close && !stuck).then_some(limit)
}

/// What the supervisor said last about the lazy builders.
#[derive(Debug)]
enum Supervisor {
    /// It cannot be asked, and why.
    Unavailable(String),
    /// Every lazy builder it knows, by name.
    Known(HashMap<String, BuilderStatus>),
}

impl Supervisor {
    fn status(&self, name: &str) -> Option<&BuilderStatus> {
        match self {
            Supervisor::Known(all) => all.get(name),
            Supervisor::Unavailable(_) => None,
        }
    }

    fn availability(&self, b: &Builder) -> Availability {
        match self {
            Supervisor::Unavailable(why) => Availability::BackingOff {
                cause: format!("the supervisor is unavailable: {why}"),
                retry_in: Duration::ZERO,
            },
            Supervisor::Known(all) => match all.get(&b.name) {
                Some(s) => client::availability(s),
                None => Availability::BackingOff {
                    cause: "the running supervisor does not know it (it reads another config \
                            file, or could not reload this one: see its log)"
                        .into(),
                    retry_in: Duration::ZERO,
                },
            },
        }
    }
}

/// The hook process's planner: one per process, one `try` at a time.
#[derive(Debug)]
pub struct Planner<'t> {
    table: &'t [Builder],
    local: LocalCapability,
    limits: Limits,
    /// Builders whose connection failed in this process, with why (Nix disables them too).
    failed: Vec<Option<String>>,
    supervisor: Supervisor,
}

impl<'t> Planner<'t> {
    pub fn new(table: &'t [Builder], local: LocalCapability, limits: Limits) -> Self {
        Planner {
            table,
            local,
            limits,
            failed: vec![None; table.len()],
            supervisor: Supervisor::Known(HashMap::new()),
        }
    }

    /// Begins answering `req`.
    pub fn start<'p>(&'p mut self, req: &TryRequest, now: Instant) -> Step<'p, 't> {
        let matches = Matches::new(
            self.table,
            &Request {
                system: &req.needed_system,
                required_features: &req.required_features,
                am_willing: req.am_willing,
            },
        );
        let plan = Plan {
            t: Try {
                drv_path: req.drv_path.clone(),
                system: req.needed_system.clone(),
                features: req.required_features.clone(),
                am_willing: req.am_willing,
                matches,
                remembered: vec![None; self.table.len()],
                slot_deadline: None,
                held: None,
            },
            planner: self,
        };
        if plan.t.matches.none() {
            // Nothing to read the derivation for: the round declines with every reason.
            return plan.round(now);
        }
        // The derivation is read before a builder is chosen (so before a VM boots for it): one
        // whose output paths are not known yet is declined with the reason, instead of failing
        // after `# accept` with its inputs already uploaded.
        Step::new(Next::ReadDrv(ReadDrv { plan }))
    }

    /// The one place a builder's availability is decided: this process's failed connect first
    /// (Nix disables such a machine for the rest of the hook process), then the supervisor's
    /// word on a lazy builder, then other hooks' remembered failure of an always-on one.
    fn availability(&self, remembered: &[Option<Availability>], i: usize) -> Availability {
        let b = &self.table[i];
        if let Some(cause) = &self.failed[i] {
            return Availability::BackingOff {
                cause: cause.clone(),
                retry_in: Duration::ZERO,
            };
        }
        if b.is_lazy() {
            return self.supervisor.availability(b);
        }
        remembered[i].clone().unwrap_or_default()
    }
}

/// One `try` in progress.
#[derive(Debug)]
struct Try {
    drv_path: StorePath,
    system: String,
    features: BTreeSet<String>,
    am_willing: bool,
    matches: Matches,
    /// Other hooks' failures of the matching always-on builders, read once per `try`.
    remembered: Vec<Option<Availability>>,
    /// When the wait for a slot on full builders ends (set by the first round that finds them
    /// full).
    slot_deadline: Option<Instant>,
    /// The builder whose slot this `try` holds: the one chosen, or one booting for it.
    held: Option<usize>,
}

impl Try {
    fn request(&self) -> Request<'_> {
        Request {
            system: &self.system,
            required_features: &self.features,
            am_willing: self.am_willing,
        }
    }
}

/// A `try` and the planner it runs in; moves from step to step.
struct Plan<'p, 't> {
    planner: &'p mut Planner<'t>,
    t: Try,
}

impl std::fmt::Debug for Plan<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("held", &self.t.held)
            .field("slot_deadline", &self.t.slot_deadline)
            .finish_non_exhaustive()
    }
}

/// What to log, and what to do next.
#[derive(Debug)]
pub struct Step<'p, 't> {
    /// Lines to log, in order, before doing `next`.
    pub notes: Vec<Note>,
    pub next: Next<'p, 't>,
}

impl<'p, 't> Step<'p, 't> {
    fn new(next: Next<'p, 't>) -> Self {
        Step {
            notes: Vec::new(),
            next,
        }
    }

    /// The builder whose slot the `try` holds now. The runtime keeps exactly this slot: the
    /// one it just probed for it, or the one it already held (a booting builder's
    /// reservation); any other is given back.
    pub fn holding(&self) -> Option<usize> {
        self.next.held()
    }
}

/// What the runtime does next.
#[derive(Debug)]
pub enum Next<'p, 't> {
    /// Read and parse the derivation; answer with it (`None` if it could not be read: that
    /// error is the runtime's to report if the build is accepted).
    ReadDrv(ReadDrv<'p, 't>),
    /// Ask the supervisor for every lazy builder's state.
    Refresh(Refresh<'p, 't>),
    /// Read the failure memory of these always-on builders.
    Recall(Recall<'p, 't>),
    /// Take `main-lock`, probe these builders' slots and keep it until the answer is given.
    Probe(Probe<'p, 't>),
    /// Ask the supervisor for a lease on an up lazy builder.
    Lease(Lease<'p, 't>),
    /// Ask the supervisor to boot a down lazy builder.
    Boot(Boot<'p, 't>),
    /// Show the boot in the progress display, and wait for it to be ready.
    WaitReady(WaitReady<'p, 't>),
    /// Do nothing until then.
    Sleep(Sleep<'p, 't>),
    /// Connect to a builder (SSH and the remote handshake). If that works the `try` is
    /// accepted: reply `# accept` and run the build on it with the held slot. Only a failure
    /// is answered.
    Connect(Connect<'p, 't>),
    /// Show this boot in the progress display (if it is booting), then reply `# postpone`.
    Postpone { showing: Option<BuilderStatus> },
    /// Reply `# decline`.
    Decline,
}

impl Next<'_, '_> {
    fn held(&self) -> Option<usize> {
        let t = match self {
            Next::ReadDrv(s) => &s.plan.t,
            Next::Refresh(s) => &s.plan.t,
            Next::Recall(s) => &s.plan.t,
            Next::Probe(s) => &s.plan.t,
            Next::Lease(s) => &s.plan.t,
            Next::Boot(s) => &s.plan.t,
            Next::WaitReady(s) => &s.plan.t,
            Next::Sleep(s) => &s.plan.t,
            Next::Connect(s) => &s.plan.t,
            Next::Postpone { .. } | Next::Decline => return None,
        };
        t.held
    }
}

/// [`Next::ReadDrv`].
#[derive(Debug)]
pub struct ReadDrv<'p, 't> {
    plan: Plan<'p, 't>,
}

impl<'p, 't> ReadDrv<'p, 't> {
    pub fn drv_path(&self) -> &StorePath {
        &self.plan.t.drv_path
    }

    /// The derivation, or `None` if it could not be read or parsed.
    pub fn read(self, drv: Option<&Derivation>, now: Instant) -> Step<'p, 't> {
        if let Some(d) = drv
            && let Some(reason) = not_remotely_buildable(&self.plan.t.drv_path, d)
        {
            return self
                .plan
                .decline(Verbosity::Warn, format!("warning: {reason}"));
        }
        self.plan.gather(now)
    }
}

/// What follows a refresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterRefresh {
    /// The `try`'s first: read the failure memory, then the first round.
    Recall,
    /// Another round (a builder became ready, failed or could not be reached).
    Round,
}

/// [`Next::Refresh`].
#[derive(Debug)]
pub struct Refresh<'p, 't> {
    plan: Plan<'p, 't>,
    then: AfterRefresh,
}

impl<'p, 't> Refresh<'p, 't> {
    /// Every lazy builder's state, or why the supervisor cannot be asked.
    pub fn refreshed(self, view: Result<Vec<BuilderStatus>, String>, now: Instant) -> Step<'p, 't> {
        self.plan.planner.supervisor = match view {
            Ok(all) => Supervisor::Known(all.into_iter().map(|s| (s.name.clone(), s)).collect()),
            Err(why) => Supervisor::Unavailable(why),
        };
        match self.then {
            AfterRefresh::Recall => self.plan.recall(now),
            AfterRefresh::Round => self.plan.round(now),
        }
    }
}

/// [`Next::Recall`].
#[derive(Debug)]
pub struct Recall<'p, 't> {
    plan: Plan<'p, 't>,
    builders: Vec<usize>,
}

impl<'p, 't> Recall<'p, 't> {
    /// Indices of the always-on builders to look up.
    pub fn builders(&self) -> &[usize] {
        &self.builders
    }

    /// What the failure memory says of each of [`builders`](Self::builders), in order (`None`:
    /// nothing remembered, or its backoff ran out).
    pub fn recalled(mut self, found: Vec<Option<Availability>>, now: Instant) -> Step<'p, 't> {
        for (&i, a) in self.builders.iter().zip(found) {
            self.plan.t.remembered[i] = a;
        }
        self.plan.round(now)
    }
}

/// One builder's probed slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Slots held by others.
    pub load: u32,
    /// A free slot was found (and is held by the runtime until this probe is answered).
    pub free: bool,
}

/// [`Next::Probe`].
#[derive(Debug)]
pub struct Probe<'p, 't> {
    plan: Plan<'p, 't>,
    builders: Vec<usize>,
    /// This round's availability of every builder (read for the matching ones).
    availability: Vec<Availability>,
}

impl<'p, 't> Probe<'p, 't> {
    /// Indices of the builders whose slots to probe.
    pub fn builders(&self) -> &[usize] {
        &self.builders
    }

    /// The builder whose slot this `try` already holds, if any (one of
    /// [`builders`](Self::builders)): probe it with that slot (it is ours, not load, and it is
    /// its free slot).
    pub fn reserved(&self) -> Option<usize> {
        self.plan.t.held
    }

    /// The probe of each of [`builders`](Self::builders), in order. The step returned says
    /// which free slot to keep ([`Step::holding`]); give the others back, then `main-lock`.
    pub fn probed(self, loads: Vec<Load>, now: Instant) -> Step<'p, 't> {
        let Probe {
            plan,
            builders,
            availability,
        } = self;
        let loads: Vec<(usize, Load)> = builders.into_iter().zip(loads).collect();
        plan.decide(availability, &loads, now)
    }
}

/// [`Next::Lease`].
#[derive(Debug)]
pub struct Lease<'p, 't> {
    plan: Plan<'p, 't>,
    builder: LazyIndex,
}

impl<'p, 't> Lease<'p, 't> {
    pub fn builder(&self) -> LazyIndex {
        self.builder
    }

    /// The supervisor's verdict, or why it could not be asked.
    pub fn answered(self, verdict: Result<Verdict, String>, _now: Instant) -> Step<'p, 't> {
        self.plan
            .verdict(self.builder, verdict, |plan, builder, s| {
                Step::new(Next::Connect(Connect {
                    plan,
                    builder: builder.index(),
                    port: s.ssh_port,
                }))
            })
    }
}

/// [`Next::Boot`]: the builder's free slot is held for it meanwhile.
#[derive(Debug)]
pub struct Boot<'p, 't> {
    plan: Plan<'p, 't>,
    builder: LazyIndex,
}

impl<'p, 't> Boot<'p, 't> {
    pub fn builder(&self) -> LazyIndex {
        self.builder
    }

    /// The supervisor's verdict, or why it could not be asked.
    pub fn answered(self, verdict: Result<Verdict, String>, _now: Instant) -> Step<'p, 't> {
        self.plan
            .verdict(self.builder, verdict, |plan, builder, s| {
                plan.wait_if_close(builder, s, Vec::new())
            })
    }
}

/// [`Next::WaitReady`].
#[derive(Debug)]
pub struct WaitReady<'p, 't> {
    plan: Plan<'p, 't>,
    builder: LazyIndex,
    status: BuilderStatus,
    within: Duration,
}

impl<'p, 't> WaitReady<'p, 't> {
    pub fn builder(&self) -> LazyIndex {
        self.builder
    }

    /// The boot as last seen: show it while waiting.
    pub fn status(&self) -> &BuilderStatus {
        &self.status
    }

    /// How long to wait.
    pub fn within(&self) -> Duration {
        self.within
    }

    /// The builder's state at the end of the wait, or why the supervisor could not be asked.
    pub fn answered(self, r: Result<BuilderStatus, String>, _now: Instant) -> Step<'p, 't> {
        match r {
            Ok(s) => {
                let state = s.state;
                if let Supervisor::Known(all) = &mut self.plan.planner.supervisor {
                    all.insert(s.name.clone(), s.clone());
                }
                match state {
                    // Ready: choose again now. Failed: choose again too, so that this `try`
                    // already reports the failure (or uses another builder) instead of
                    // postponing it to the daemon's next poll.
                    State::Up | State::Failed => self.plan.choose_again(Vec::new()),
                    _ => self.plan.postpone(Vec::new(), Some(s)),
                }
            }
            Err(why) => self.plan.unavailable(why),
        }
    }
}

/// [`Next::Sleep`].
#[derive(Debug)]
pub struct Sleep<'p, 't> {
    plan: Plan<'p, 't>,
    until: Instant,
}

impl<'p, 't> Sleep<'p, 't> {
    pub fn until(&self) -> Instant {
        self.until
    }

    pub fn woke(self, now: Instant) -> Step<'p, 't> {
        self.plan.round(now)
    }
}

/// [`Next::Connect`].
#[derive(Debug)]
pub struct Connect<'p, 't> {
    plan: Plan<'p, 't>,
    builder: usize,
    port: Option<u16>,
}

impl<'p, 't> Connect<'p, 't> {
    pub fn builder(&self) -> usize {
        self.builder
    }

    /// The port the supervisor gave, instead of the builder's own.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The connection failed with `error`. The runtime has already said so and told the
    /// supervisor (lazy) or the failure memory (always-on, with [`connection_failed`]).
    pub fn failed(mut self, error: &str, now: Instant) -> Step<'p, 't> {
        let i = self.builder;
        self.plan.planner.failed[i] = Some(connection_failed(error));
        self.plan.t.held = None;
        if self.plan.planner.table[i].is_lazy() {
            self.plan.choose_again(Vec::new())
        } else {
            self.plan.round(now)
        }
    }
}

impl<'p, 't> Plan<'p, 't> {
    /// Before the first round: the supervisor's view if a lazy builder matches, then the
    /// failure memory.
    fn gather(self, now: Instant) -> Step<'p, 't> {
        let table = self.planner.table;
        if self.t.matches.indices().any(|i| table[i].is_lazy()) {
            return Step::new(Next::Refresh(Refresh {
                plan: self,
                then: AfterRefresh::Recall,
            }));
        }
        self.recall(now)
    }

    fn recall(self, now: Instant) -> Step<'p, 't> {
        let table = self.planner.table;
        let builders: Vec<usize> = self
            .t
            .matches
            .indices()
            .filter(|&i| !table[i].is_lazy())
            .collect();
        if builders.is_empty() {
            return self.round(now);
        }
        Step::new(Next::Recall(Recall {
            plan: self,
            builders,
        }))
    }

    /// Refresh the supervisor's view, then another round.
    fn choose_again(self, notes: Vec<Note>) -> Step<'p, 't> {
        Step {
            notes,
            next: Next::Refresh(Refresh {
                plan: self,
                then: AfterRefresh::Round,
            }),
        }
    }

    /// One round: availability, then the slots of the matching builders that are not
    /// backing off.
    fn round(mut self, now: Instant) -> Step<'p, 't> {
        let availability: Vec<Availability> = (0..self.planner.table.len())
            .map(|i| {
                if self.t.matches.contains(i) {
                    self.planner.availability(&self.t.remembered, i)
                } else {
                    Availability::default()
                }
            })
            .collect();
        let builders: Vec<usize> = self
            .t
            .matches
            .indices()
            .filter(|&i| !matches!(availability[i], Availability::BackingOff { .. }))
            .collect();
        // A reservation lasts while its builder is still a candidate.
        if self.t.held.is_some_and(|h| !builders.contains(&h)) {
            self.t.held = None;
        }
        if builders.is_empty() {
            return self.decide(availability, &[], now);
        }
        Step::new(Next::Probe(Probe {
            plan: self,
            builders,
            availability,
        }))
    }

    /// `select`'s choice over this round's availability and loads, and what follows from it.
    fn decide(
        mut self,
        availability: Vec<Availability>,
        loads: &[(usize, Load)],
        now: Instant,
    ) -> Step<'p, 't> {
        let table = self.planner.table;
        let mut states = vec![BuilderState::default(); table.len()];
        for i in self.t.matches.indices() {
            states[i].availability = availability[i].clone();
        }
        for &(i, l) in loads {
            states[i].load = l.load;
            states[i].free_slot = l.free;
        }
        let decision = select::choose(
            table,
            &self.t.matches,
            &states,
            &self.t.request(),
            &self.planner.local,
        );
        match decision {
            Decision::Accept { builder } => {
                self.t.held = Some(builder);
                match LazyIndex::of(table, builder) {
                    Some(l) => Step::new(Next::Lease(Lease {
                        plan: self,
                        builder: l,
                    })),
                    None => Step::new(Next::Connect(Connect {
                        plan: self,
                        builder,
                        port: None,
                    })),
                }
            }
            Decision::Boot { builder } => {
                self.t.held = Some(builder.index());
                Step::new(Next::Boot(Boot {
                    plan: self,
                    builder,
                }))
            }
            Decision::Postpone { reason } => {
                self.t.held = None;
                let notes = vec![Note::Debug(format!("postponing: {reason}"))];
                // A matching builder that is about to finish booting is worth a short wait.
                let booting = self.t.matches.indices().find_map(|i| {
                    let l = LazyIndex::of(table, i)?;
                    let s = self.planner.supervisor.status(&table[i].name)?;
                    (availability[i] == Availability::Booting).then(|| (l, s.clone()))
                });
                if let Some((l, s)) = booting {
                    return self.wait_if_close(l, s, notes);
                }
                // Every matching builder is full. A slot frees the moment a running build's
                // hook exits, usually long before the daemon's next poll (5 s): watch the
                // slots for a moment instead of paying a whole poll interval.
                let deadline = *self
                    .t
                    .slot_deadline
                    .get_or_insert(now + self.planner.limits.slot_wait);
                if now < deadline {
                    let until = now + self.planner.limits.slot_poll;
                    return Step {
                        notes,
                        next: Next::Sleep(Sleep { plan: self, until }),
                    };
                }
                self.postpone(notes, None)
            }
            Decision::Decline { reason, level } => match level {
                DeclineLevel::Warn => self.decline(Verbosity::Warn, format!("warning: {reason}")),
                DeclineLevel::Chatty => self.decline(Verbosity::Chatty, reason),
            },
        }
    }

    /// The supervisor's verdict on `builder`: granted goes on as `granted` says; a refusal
    /// that shows the builder's state waits if its boot is close; any other postpones.
    fn verdict(
        self,
        builder: LazyIndex,
        verdict: Result<Verdict, String>,
        granted: impl FnOnce(Self, LazyIndex, BuilderStatus) -> Step<'p, 't>,
    ) -> Step<'p, 't> {
        match verdict {
            Ok(Verdict::Granted(s)) => granted(self, builder, s),
            Ok(Verdict::Refused {
                status: Some(s), ..
            }) => self.wait_if_close(builder, s, Vec::new()),
            Ok(Verdict::Refused { status: None, .. }) => self.postpone(Vec::new(), None),
            Err(why) => self.unavailable(why),
        }
    }

    /// The supervisor could not be asked (`why`): remember it (its builders count as
    /// unavailable until it answers again) and postpone.
    fn unavailable(self, why: String) -> Step<'p, 't> {
        self.planner.supervisor = Supervisor::Unavailable(why);
        self.postpone(Vec::new(), None)
    }

    /// A lazy builder the `try` needs is in state `s`: choose again if it is up, wait if its
    /// boot is about to finish, else postpone.
    fn wait_if_close(self, builder: LazyIndex, s: BuilderStatus, notes: Vec<Note>) -> Step<'p, 't> {
        if s.state == State::Up {
            return self.choose_again(notes);
        }
        match wait_budget(&s, self.planner.limits.boot_wait) {
            Some(within) => Step {
                notes,
                next: Next::WaitReady(WaitReady {
                    plan: self,
                    builder,
                    status: s,
                    within,
                }),
            },
            None => self.postpone(notes, Some(s)),
        }
    }

    fn postpone(self, notes: Vec<Note>, showing: Option<BuilderStatus>) -> Step<'p, 't> {
        Step {
            notes,
            next: Next::Postpone { showing },
        }
    }

    fn decline(self, level: Verbosity, text: String) -> Step<'p, 't> {
        Step {
            notes: vec![Note::Say { level, text }],
            next: Next::Decline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{command_lazy, ssh_builder};
    use crate::supervisor::proto::Failure;

    /// The `Next` of a step, which must match the pattern; evaluates to the expression.
    macro_rules! next {
        ($step:expr, $pat:pat => $out:expr) => {
            match $step.next {
                $pat => $out,
                other => panic!("expected {}, got {other:?}", stringify!($pat)),
            }
        };
    }

    const SYS: &str = "aarch64-linux";

    /// Where a test's time starts. Any instant will do: the planner only adds to and compares
    /// the instants it is given, and never reads the clock itself.
    fn epoch() -> Instant {
        Instant::now()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn always(name: &str, max_jobs: u32) -> Builder {
        ssh_builder(name, &[SYS], max_jobs)
    }

    fn lazy(name: &str) -> Builder {
        let mut b = always(name, 1);
        b.lazy = Some(command_lazy(false));
        b
    }

    fn local() -> LocalCapability {
        LocalCapability {
            system: "x86_64-linux".into(),
            max_jobs: 1,
            ..Default::default()
        }
    }

    /// The daemon's 5 s poll interval.
    fn limits() -> Limits {
        Limits::new(crate::lazy::wait_limit(5))
    }

    const DRV: &str = "/nix/store/00000000000000000000000000000000-x.drv";

    fn want(system: &str, am_willing: bool) -> TryRequest {
        TryRequest {
            am_willing,
            needed_system: system.into(),
            drv_path: StorePath::parse(DRV).unwrap(),
            required_features: BTreeSet::new(),
        }
    }

    fn status(name: &str, state: State) -> BuilderStatus {
        BuilderStatus::new(name, state)
    }

    fn booting(name: &str, elapsed: u64, expected: u64) -> BuilderStatus {
        let mut s = status(name, State::Booting);
        s.booting_ms = Some(elapsed);
        s.expected_boot_ms = Some(expected);
        s
    }

    fn up(name: &str, port: u16) -> BuilderStatus {
        let mut s = status(name, State::Up);
        s.ssh_port = Some(port);
        s
    }

    fn free(load: u32) -> Load {
        Load { load, free: true }
    }

    fn full(load: u32) -> Load {
        Load { load, free: false }
    }

    fn say(level: Verbosity, text: &str) -> Vec<Note> {
        vec![Note::Say {
            level,
            text: text.into(),
        }]
    }

    fn postponing(reason: &str) -> Vec<Note> {
        vec![Note::Debug(format!("postponing: {reason}"))]
    }

    /// Starts a `try` on a table without lazy builders and answers up to the first probe (the
    /// derivation is read, nothing is remembered).
    fn to_probe<'p, 't>(p: &'p mut Planner<'t>, req: &TryRequest, t: Instant) -> Probe<'p, 't> {
        let s = next!(p.start(req, t), Next::ReadDrv(s) => s);
        assert_eq!(s.drv_path().as_str(), DRV);
        let r = next!(s.read(None, t), Next::Recall(r) => r);
        let n = r.builders().len();
        next!(r.recalled(vec![None; n], t), Next::Probe(p) => p)
    }

    /// Starts a `try` for [`SYS`] on a table of lazy builders only, with the supervisor saying
    /// `view`.
    fn lazy_round<'p, 't>(
        p: &'p mut Planner<'t>,
        view: Vec<BuilderStatus>,
        t: Instant,
    ) -> Step<'p, 't> {
        let s = next!(p.start(&want(SYS, false), t), Next::ReadDrv(s) => s);
        let r = next!(s.read(None, t), Next::Refresh(r) => r);
        r.refreshed(Ok(view), t)
    }

    /// `step` probes the table's one builder, which has a free slot.
    fn probed_free<'p, 't>(step: Step<'p, 't>, t: Instant) -> Step<'p, 't> {
        next!(step, Next::Probe(p) => p).probed(vec![free(0)], t)
    }

    #[test]
    fn always_on_builders_are_probed_once_and_the_least_loaded_connected() {
        let table = [always("a", 2), always("b", 1), always("x86", 1)];
        let mut table = table.to_vec();
        table[2].systems = set(&["x86_64-linux"]);
        let mut p = Planner::new(&table, local(), limits());
        let t0 = epoch();
        let s = next!(p.start(&want(SYS, false), t0), Next::ReadDrv(s) => s);
        // An unreadable derivation is no reason to decline: the error is the accept's to
        // report.
        let r = next!(s.read(None, t0), Next::Recall(r) => r);
        assert_eq!(r.builders(), [0, 1], "only the matching always-on builders");
        let probe = next!(r.recalled(vec![None, None], t0), Next::Probe(p) => p);
        assert_eq!(probe.builders(), [0, 1]);
        assert_eq!(probe.reserved(), None);
        let step = probe.probed(vec![free(1), free(0)], t0);
        assert_eq!(step.notes, []);
        assert_eq!(step.holding(), Some(1), "the chosen builder's slot is kept");
        let c = next!(step, Next::Connect(c) => c);
        assert_eq!((c.builder(), c.port()), (1, None));
    }

    #[test]
    fn decline_reasons_and_levels() {
        let table = [always("a", 1)];
        let t0 = epoch();
        let mut p = Planner::new(&table, local(), limits());
        // Nothing matches and the local machine cannot build it: a warning, and neither the
        // derivation nor the slots are looked at.
        let step = p.start(&want("riscv64-linux", true), t0);
        assert_eq!(
            step.notes,
            say(
                Verbosity::Warn,
                "warning: no builder for riscv64-linux: 'a' lacks system riscv64-linux"
            )
        );
        next!(step, Next::Decline => ());
        // The local machine can build it: quietly.
        let step = p.start(&want("x86_64-linux", true), t0);
        assert_eq!(
            step.notes,
            say(
                Verbosity::Chatty,
                "no builder for x86_64-linux: 'a' lacks system x86_64-linux"
            )
        );
        next!(step, Next::Decline => ());
        // Full, and the local machine can take it now: decline (build locally), quietly.
        let mut local_too = table.to_vec();
        local_too[0].systems = set(&[SYS, "x86_64-linux"]);
        let mut q = Planner::new(&local_too, local(), limits());
        let step = to_probe(&mut q, &want("x86_64-linux", true), t0).probed(vec![full(1)], t0);
        assert_eq!(
            step.notes,
            say(
                Verbosity::Chatty,
                "no free builder for x86_64-linux, building locally: 'a' is busy (1/1 jobs)"
            )
        );
        assert_eq!(step.holding(), None);
        next!(step, Next::Decline => ());
        // A resolved floating content-addressed derivation goes on: the remote names its paths.
        let drv = Derivation::parse(
            br#"Derive([("out","","r:sha256","")],[],[],"aarch64-linux","/bin/sh",[],[("out","")])"#,
        )
        .unwrap();
        let s = next!(p.start(&want(SYS, false), t0), Next::ReadDrv(s) => s);
        let step = s.read(Some(&drv), t0);
        assert!(step.notes.is_empty(), "{:?}", step.notes);
        assert!(!matches!(step.next, Next::Decline), "{:?}", step.next);
        // An impure output, a floating one not resolved (an input derivation left), or one
        // deferred on an input: declined with the reason, before anything else.
        for (aterm, why) in [
            (
                &br#"Derive([("out","","sha256","impure")],[],[],"aarch64-linux","/bin/sh",[],[("out","")])"#[..],
                "impure",
            ),
            (
                &br#"Derive([("out","","r:sha256","")],[("/nix/store/00000000000000000000000000000000-a.drv",["out"])],[],"aarch64-linux","/bin/sh",[],[("out","")])"#[..],
                "floating content-addressed, with input derivations not yet resolved",
            ),
            (
                &br#"Derive([("out","","","")],[("/nix/store/00000000000000000000000000000000-a.drv",["out"])],[],"aarch64-linux","/bin/sh",[],[("out","")])"#[..],
                "deferred on a content-addressed input not yet built",
            ),
        ] {
            let drv = Derivation::parse(aterm).unwrap();
            let s = next!(p.start(&want(SYS, false), t0), Next::ReadDrv(s) => s);
            let step = s.read(Some(&drv), t0);
            assert_eq!(
                step.notes,
                say(
                    Verbosity::Warn,
                    &format!(
                        "warning: not building '{DRV}' remotely: its output 'out' has no store \
                         path before it is built ({why}), which nix-lazy-builder cannot bring \
                         back yet"
                    )
                )
            );
            next!(step, Next::Decline => ());
        }
        // Remembered by another hook: skipped without a probe, the cause and the retry in the
        // reason.
        let s = next!(p.start(&want(SYS, false), t0), Next::ReadDrv(s) => s);
        let r = next!(s.read(None, t0), Next::Recall(r) => r);
        let step = r.recalled(
            vec![Some(Availability::BackingOff {
                cause: "connection failed: refused".into(),
                retry_in: ms(29_500),
            })],
            t0,
        );
        assert_eq!(
            step.notes,
            say(
                Verbosity::Warn,
                "warning: no builder for aarch64-linux: 'a' failed recently (connection failed: \
                 refused) and is not tried again for another 30s. Nothing retries this build: it \
                 fails now; start it again in 30s or later"
            )
        );
        next!(step, Next::Decline => ());
    }

    #[test]
    fn full_builders_are_watched_for_slot_wait_then_postponed() {
        let table = [always("a", 1)];
        let mut p = Planner::new(&table, local(), limits());
        let t0 = epoch();
        let busy = "waiting for a builder for aarch64-linux: 'a' is busy (1/1 jobs)";
        let step = to_probe(&mut p, &want(SYS, false), t0).probed(vec![full(1)], t0);
        assert_eq!(step.notes, postponing(busy));
        assert_eq!(step.holding(), None);
        let sleep = next!(step, Next::Sleep(s) => s);
        assert_eq!(sleep.until(), t0 + SLOT_POLL);
        // The probes go on every SLOT_POLL; the deadline stays SLOT_WAIT after the first.
        let mut t = sleep.until();
        let mut probe = next!(sleep.woke(t), Next::Probe(p) => p);
        let late = t0 + SLOT_WAIT - ms(1);
        for now in [t, t0 + ms(1000), late] {
            let sleep = next!(probe.probed(vec![full(1)], now), Next::Sleep(s) => s);
            assert_eq!(sleep.until(), now + SLOT_POLL);
            t = sleep.until();
            probe = next!(sleep.woke(t), Next::Probe(p) => p);
        }
        let step = probe.probed(vec![full(1)], t0 + SLOT_WAIT);
        assert_eq!(step.notes, postponing(busy));
        next!(step, Next::Postpone { showing: None } => ());
        // The next `try` waits again, from its own first round.
        let t1 = t0 + Duration::from_secs(5);
        let step = to_probe(&mut p, &want(SYS, false), t1).probed(vec![full(1)], t1);
        assert_eq!(next!(step, Next::Sleep(s) => s.until()), t1 + SLOT_POLL);
    }

    #[test]
    fn a_slot_that_frees_during_the_wait_is_taken() {
        let table = [always("a", 1)];
        let mut p = Planner::new(&table, local(), limits());
        let t0 = epoch();
        let step = to_probe(&mut p, &want(SYS, false), t0).probed(vec![full(1)], t0);
        let probe =
            next!(next!(step, Next::Sleep(s) => s).woke(t0 + SLOT_POLL), Next::Probe(p) => p);
        let step = probe.probed(vec![free(0)], t0 + SLOT_POLL);
        assert_eq!(step.holding(), Some(0));
        assert_eq!(next!(step, Next::Connect(c) => c.builder()), 0);
    }

    #[test]
    fn a_failed_connect_falls_to_the_next_builder() {
        let table = [always("a", 1), always("b", 1)];
        let mut p = Planner::new(&table, local(), limits());
        let t0 = epoch();
        let step = to_probe(&mut p, &want(SYS, false), t0).probed(vec![free(0), free(0)], t0);
        let c = next!(step, Next::Connect(c) => c);
        assert_eq!(c.builder(), 0, "full tie: table order");
        // 'a' is not probed again: it is disabled for the rest of the process.
        let step = c.failed("connection refused", t0);
        assert_eq!(
            step.holding(),
            None,
            "the failed builder's slot is given back"
        );
        let probe = next!(step, Next::Probe(p) => p);
        assert_eq!(probe.builders(), [1]);
        let c = next!(probe.probed(vec![free(0)], t0), Next::Connect(c) => c);
        assert_eq!(c.builder(), 1);
        let step = c.failed("timed out", t0);
        assert_eq!(
            step.notes,
            say(
                Verbosity::Warn,
                "warning: no builder for aarch64-linux: 'a' failed (connection failed: connection \
                 refused); 'b' failed (connection failed: timed out). Nothing retries this build: \
                 it fails now; start it again"
            )
        );
        next!(step, Next::Decline => ());
        // The next `try` of this process still skips both, without probing.
        let s = next!(p.start(&want(SYS, false), t0), Next::ReadDrv(s) => s);
        let r = next!(s.read(None, t0), Next::Recall(r) => r);
        next!(r.recalled(vec![None, None], t0), Next::Decline => ());
        assert_eq!(connection_failed("refused"), "connection failed: refused");
    }

    #[test]
    fn a_boot_that_finishes_within_the_wait_is_used_with_its_reserved_slot() {
        let table = [lazy("vm")];
        let mut p = Planner::new(&table, local(), limits());
        let t0 = epoch();
        let step = lazy_round(&mut p, vec![status("vm", State::Down)], t0);
        let probe = next!(step, Next::Probe(p) => p);
        assert_eq!(probe.builders(), [0]);
        let step = probe.probed(vec![free(0)], t0);
        assert_eq!(step.holding(), Some(0), "the slot is reserved for the boot");
        let boot = next!(step, Next::Boot(b) => b);
        assert_eq!(boot.builder().index(), 0);
        // Expected in 4.5 s: within the 5 s poll interval, so the `try` waits for it.
        let step = boot.answered(Ok(Verdict::Granted(booting("vm", 0, 4500))), t0);
        assert_eq!(step.holding(), Some(0));
        let wait = next!(step, Next::WaitReady(w) => w);
        assert_eq!(wait.within(), Duration::from_secs(5));
        assert_eq!(
            wait.status(),
            &booting("vm", 0, 4500),
            "what the progress shows"
        );
        let t1 = t0 + ms(4400);
        let step = wait.answered(Ok(up("vm", 2222)), t1);
        assert_eq!(
            step.holding(),
            Some(0),
            "still reserved while choosing again"
        );
        let r = next!(step, Next::Refresh(r) => r);
        let probe = next!(r.refreshed(Ok(vec![up("vm", 2222)]), t1), Next::Probe(p) => p);
        assert_eq!(probe.reserved(), Some(0), "probed with the reserved slot");
        let step = probe.probed(vec![free(0)], t1);
        assert_eq!(step.holding(), Some(0));
        let lease = next!(step, Next::Lease(l) => l);
        let c =
            next!(lease.answered(Ok(Verdict::Granted(up("vm", 2222))), t1), Next::Connect(c) => c);
        assert_eq!((c.builder(), c.port()), (0, Some(2222)));
    }

    #[test]
    fn a_boot_further_away_than_the_poll_interval_is_postponed() {
        let table = [lazy("vm")];
        // The daemon polls every 2 s: a boot expected in 4.5 s is not waited for.
        let mut p = Planner::new(&table, local(), Limits::new(crate::lazy::wait_limit(2)));
        let t0 = epoch();
        let step = lazy_round(&mut p, vec![status("vm", State::Down)], t0);
        let boot = next!(probed_free(step, t0), Next::Boot(b) => b);
        let step = boot.answered(Ok(Verdict::Granted(booting("vm", 0, 4500))), t0);
        assert_eq!(step.holding(), None, "the reservation ends with the `try`");
        let shown = next!(step, Next::Postpone { showing } => showing);
        assert_eq!(shown, Some(booting("vm", 0, 4500)));
        // At the daemon's next poll the boot is 3 s in: close enough.
        let step = lazy_round(&mut p, vec![booting("vm", 3000, 4500)], t0);
        let step = probed_free(step, t0);
        assert_eq!(
            step.notes,
            postponing("waiting for a builder for aarch64-linux: 'vm' is booting")
        );
        let wait = next!(step, Next::WaitReady(w) => w);
        assert_eq!(wait.within(), Duration::from_secs(2));
        // Still booting at the end of the wait: postponed, showing the latest state.
        let shown = next!(wait.answered(Ok(booting("vm", 5000, 4500)), t0), Next::Postpone { showing } => showing);
        assert_eq!(shown, Some(booting("vm", 5000, 4500)));
    }

    #[test]
    fn a_boot_started_by_another_hook_is_waited_for_only_when_close() {
        let table = [lazy("vm")];
        let mut p = Planner::new(&table, local(), limits());
        let t0 = epoch();
        let far = booting("vm", 1000, 7000);
        let step = lazy_round(&mut p, vec![far.clone()], t0);
        let step = probed_free(step, t0);
        assert_eq!(
            step.notes,
            postponing("waiting for a builder for aarch64-linux: 'vm' is booting")
        );
        assert_eq!(
            next!(step, Next::Postpone { showing } => showing),
            Some(far)
        );
        let close = booting("vm", 4000, 7000);
        let step = lazy_round(&mut p, vec![close.clone()], t0);
        let step = probed_free(step, t0);
        assert_eq!(
            step.holding(),
            None,
            "nothing is reserved for another hook's boot"
        );
        let wait = next!(step, Next::WaitReady(w) => w);
        assert_eq!((wait.builder().index(), wait.status()), (0, &close));
    }

    #[test]
    fn a_boot_that_fails_during_the_wait_is_reported_in_the_same_try() {
        let table = [lazy("vm")];
        let mut p = Planner::new(&table, local(), limits());
        let t0 = epoch();
        let step = lazy_round(&mut p, vec![booting("vm", 4000, 5000)], t0);
        let step = probed_free(step, t0);
        let wait = next!(step, Next::WaitReady(w) => w);
        let mut failed = status("vm", State::Failed);
        failed.last_failure = Some(Failure {
            cause: "boot timed out".into(),
            at_unix: 0,
            retry_in_ms: 29_500,
            consecutive: 1,
        });
        let r = next!(wait.answered(Ok(failed.clone()), t0), Next::Refresh(r) => r);
        let step = r.refreshed(Ok(vec![failed]), t0);
        assert_eq!(
            step.notes,
            say(
                Verbosity::Warn,
                "warning: no builder for aarch64-linux: 'vm' failed recently (boot timed out) and \
                 is not tried again for another 30s. Nothing retries this build: it fails now; \
                 start it again in 30s or later, or boot 'vm' at once with `nix-lazy-builder up vm`"
            )
        );
        next!(step, Next::Decline => ());
    }

    #[test]
    fn a_refused_lease_chooses_again() {
        let table = [lazy("vm")];
        let mut p = Planner::new(&table, local(), limits());
        let t0 = epoch();
        let step = lazy_round(&mut p, vec![up("vm", 2222)], t0);
        let lease = next!(probed_free(step, t0), Next::Lease(l) => l);
        // Up again by the time the supervisor answers (it was restarting, say): choose again,
        // keeping the slot.
        let step = lease.answered(
            Ok(Verdict::Refused {
                reason: "not up".into(),
                status: Some(up("vm", 2223)),
            }),
            t0,
        );
        assert_eq!(step.holding(), Some(0));
        let r = next!(step, Next::Refresh(r) => r);
        let probe = next!(r.refreshed(Ok(vec![up("vm", 2223)]), t0), Next::Probe(p) => p);
        assert_eq!(probe.reserved(), Some(0));
        let lease = next!(probe.probed(vec![free(0)], t0), Next::Lease(l) => l);
        // Draining now: not a boot to wait for.
        let draining = status("vm", State::Draining);
        let step = lease.answered(
            Ok(Verdict::Refused {
                reason: "draining".into(),
                status: Some(draining.clone()),
            }),
            t0,
        );
        assert_eq!(step.holding(), None);
        assert_eq!(
            next!(step, Next::Postpone { showing } => showing),
            Some(draining)
        );
        // Refused without a state: postpone.
        let step = lazy_round(&mut p, vec![up("vm", 2222)], t0);
        let lease = next!(probed_free(step, t0), Next::Lease(l) => l);
        let step = lease.answered(
            Ok(Verdict::Refused {
                reason: "full".into(),
                status: None,
            }),
            t0,
        );
        next!(step, Next::Postpone { showing: None } => ());
    }

    #[test]
    fn an_unreachable_supervisor_disables_lazy_builders_until_it_answers() {
        let table = [lazy("vm")];
        let mut p = Planner::new(&table, local(), limits());
        let t0 = epoch();
        let s = next!(p.start(&want(SYS, false), t0), Next::ReadDrv(s) => s);
        let r = next!(s.read(None, t0), Next::Refresh(r) => r);
        let step = r.refreshed(Err("connection refused".into()), t0);
        assert_eq!(
            step.notes,
            say(
                Verbosity::Warn,
                "warning: no builder for aarch64-linux: 'vm' failed (the supervisor is \
                 unavailable: connection refused). Nothing retries this build: it fails now; \
                 start it again, or boot 'vm' at once with `nix-lazy-builder up vm`"
            )
        );
        next!(step, Next::Decline => ());
        // It answers, but does not know the builder.
        let step = lazy_round(&mut p, vec![], t0);
        let Step { notes, next } = step;
        assert!(matches!(next, Next::Decline));
        assert!(
            matches!(&notes[..], [Note::Say { text, .. }] if text.contains("'vm' failed (the running supervisor does not know it")),
            "{notes:?}"
        );
        // A lease it cannot answer: postpone.
        let step = lazy_round(&mut p, vec![up("vm", 2222)], t0);
        let lease = next!(probed_free(step, t0), Next::Lease(l) => l);
        next!(lease.answered(Err("it closed the connection".into()), t0), Next::Postpone { showing: None } => ());
    }

    #[test]
    fn a_failed_lazy_builder_refreshes_and_a_reservation_goes_to_the_winner() {
        // 'a' is full, so 'vm' boots; by the time it is up 'a' has a free slot and wins, and
        // the slot reserved on 'vm' is given back.
        let table = [always("a", 1), lazy("vm")];
        let mut p = Planner::new(&table, local(), limits());
        let t0 = epoch();
        let s = next!(p.start(&want(SYS, false), t0), Next::ReadDrv(s) => s);
        let r = next!(s.read(None, t0), Next::Refresh(r) => r);
        let r = next!(r.refreshed(Ok(vec![status("vm", State::Down)]), t0), Next::Recall(r) => r);
        assert_eq!(r.builders(), [0]);
        let probe = next!(r.recalled(vec![None], t0), Next::Probe(p) => p);
        let boot = next!(probe.probed(vec![full(1), free(0)], t0), Next::Boot(b) => b);
        let wait = next!(boot.answered(Ok(Verdict::Granted(booting("vm", 0, 3000))), t0), Next::WaitReady(w) => w);
        let r = next!(wait.answered(Ok(up("vm", 2222)), t0), Next::Refresh(r) => r);
        let probe = next!(r.refreshed(Ok(vec![up("vm", 2222)]), t0), Next::Probe(p) => p);
        assert_eq!((probe.builders(), probe.reserved()), (&[0, 1][..], Some(1)));
        let step = probe.probed(vec![free(0), free(0)], t0);
        assert_eq!(
            step.holding(),
            Some(0),
            "'a' wins the tie; 'vm''s slot is given back"
        );
        let c = next!(step, Next::Connect(c) => c);
        // 'a' fails: the round goes on without it (no refresh for an always-on builder), and
        // 'vm' is leased.
        let probe = next!(c.failed("refused", t0), Next::Probe(p) => p);
        assert_eq!((probe.builders(), probe.reserved()), (&[1][..], None));
        let lease = next!(probe.probed(vec![free(0)], t0), Next::Lease(l) => l);
        let c =
            next!(lease.answered(Ok(Verdict::Granted(up("vm", 2222))), t0), Next::Connect(c) => c);
        // 'vm' fails too: the supervisor is asked again before the next round.
        let r = next!(c.failed("reset", t0), Next::Refresh(r) => r);
        let step = r.refreshed(Ok(vec![up("vm", 2222)]), t0);
        assert_eq!(
            step.notes,
            say(
                Verbosity::Warn,
                "warning: no builder for aarch64-linux: 'a' failed (connection failed: refused); \
                 'vm' failed (connection failed: reset). Nothing retries this build: it fails \
                 now; start it again, or boot 'vm' at once with `nix-lazy-builder up vm`"
            )
        );
        next!(step, Next::Decline => ());
    }

    #[test]
    fn waits_only_when_the_boot_is_close_or_overdue() {
        let b = |elapsed, expected: Option<u64>| {
            let mut s = status("vm", State::Booting);
            s.booting_ms = Some(elapsed);
            s.expected_boot_ms = expected;
            s
        };
        let l = crate::lazy::wait_limit(5);
        assert_eq!(wait_budget(&b(0, Some(7000)), l), None);
        assert_eq!(wait_budget(&b(5000, Some(7000)), l), Some(l));
        assert_eq!(wait_budget(&b(9000, Some(7000)), l), Some(l));
        assert_eq!(wait_budget(&b(60_000, Some(7000)), l), None);
        assert_eq!(wait_budget(&b(0, Some(2000)), l), Some(l));
        assert_eq!(wait_budget(&b(1000, None), l), None);
        // A boot expected in 4.5 s is waited for at the default poll interval (a postpone would
        // cost 5 s), but not when the daemon polls every 2 s.
        assert_eq!(wait_budget(&b(0, Some(4500)), l), Some(l));
        // Too close to the limit to bet on: 4.7 s + 10 % is over 5 s.
        assert_eq!(wait_budget(&b(0, Some(4700)), l), None);
        assert_eq!(wait_budget(&b(500, Some(4700)), l), Some(l));
        let short = crate::lazy::wait_limit(2);
        assert_eq!(wait_budget(&b(0, Some(4500)), short), None);
        assert_eq!(wait_budget(&b(3000, Some(4500)), short), Some(short));
        let mut up = b(0, Some(1));
        up.state = State::Up;
        assert_eq!(wait_budget(&up, l), None);
    }
}
