//! Warm connections: per builder a pool holding one SSH connection and a few remote sessions
//! whose handshake is done, for every builder a hook asks about (always-on ones included),
//! keyed by what the connection is (target, host keys, command, protocol; a lazy builder's
//! name too).
//!
//! The rules:
//! - A hook asks for a session ([`Request::LeaseSession`]) and is answered at once: a ready
//!   session is handed out ([`Action::HandOut`]), else [`Response::NoSession`] and the hook
//!   connects directly; the pool warms up in the background either way. It never waits.
//! - A pool keeps min(max-jobs + 1, [`READY_MAX`]) sessions ready (one more than can be in
//!   use at once, so that back-to-back builds never find it refilling), refilled after each
//!   hand-out, and at most [`SESSIONS_PER_CONNECTION`] on its connection in all (below
//!   OpenSSH's default `MaxSessions`).
//! - A connect or a session start that fails backs off ([`crate::backoff`]); meanwhile hooks
//!   are told no and connect directly. A lost connection is made again on the next request.
//!   Sessions that die while pooled are replaced, but not after [`DEATHS_BEFORE_PAUSE`] in a
//!   row without a hand-out (until the next request).
//! - Warm sessions are not leases: a lazy builder's pool exists only while that builder is up
//!   (in that instance); it is closed when the builder leaves "up", and never delays an idle
//!   stop.
//! - A lazy builder's first warm session is opened as part of its readiness: once its readiness
//!   check answered ([`Machine::warm_up`]), it stays booting while its pool connects and opens
//!   one session, and is up (waiting hooks are answered) once that session is ready, the pool
//!   failed, or [`WARM_UP_BOUND`] passed (or a waiter's deadline came first). The first build
//!   after a boot or a restore is then handed a warm session; a warm-up that fails only means
//!   builds connect directly, as without one. The first session is also the only one that
//!   touches the builder's store until then (more open after the first hand-out).
//! - A pool closes after `keep-warm` without a build (from its last hand-out or the end of its
//!   last session), and never while a session is in use. A supervisor does not exit while a
//!   pool is open, and its shutdown lets sessions in use finish (up to the shutdown bound).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::boots::CameUp;
use super::{Action, ConnId, Generation, LogLevel, Machine, Phase, log, ms};
use crate::backoff::backoff;
use crate::supervisor::proto::TargetSpec;
use crate::supervisor::proto::{BuilderStatus, Response, SessionSpec, State, WarmStatus};
use crate::supervisor::proto::{Handshake, Protocol};

/// Identifies one pool (one warm connection).
pub type PoolId = u64;
/// Identifies one warm session.
pub type SessionId = u64;

/// Most sessions a pool keeps ready.
pub const READY_MAX: u32 = 3;
/// Most sessions one connection carries: ready, being opened and in use together. OpenSSH's
/// sshd allows 10 (`MaxSessions`) by default.
pub const SESSIONS_PER_CONNECTION: u32 = 8;
/// Pooled sessions that die in a row, with no hand-out between, before the pool stops
/// replacing them until the next request.
pub const DEATHS_BEFORE_PAUSE: u32 = 3;

/// The longest a lazy builder's readiness waits for its first warm session before it counts
/// as up anyway (the session goes on opening; builds connect directly meanwhile). Opening one
/// is an SSH handshake and the remote program's start: 0.2–0.6 s on a restored TCG VM.
pub const WARM_UP_BOUND: Duration = Duration::from_secs(3);

/// What a builder's readiness check answered ([`super::Event::BootSucceeded`]).
#[derive(Clone, Debug)]
pub(super) struct Answered {
    pub port: u16,
    pub nix_version: String,
    /// From the start of the boot to the answer.
    pub took: Duration,
    pub came: CameUp,
}

/// A lazy builder that answered its readiness check and is opening its first warm session.
#[derive(Clone, Debug)]
pub(super) struct WarmingUp {
    pool: PoolId,
    since: Instant,
    answered: Answered,
}

impl WarmingUp {
    /// When it is up whether or not a session is ready.
    pub(super) fn due(&self) -> Instant {
        self.since + WARM_UP_BOUND
    }
}

/// What a connection is: two specs that agree on this share a pool.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PoolKey {
    target: TargetSpec,
    command: String,
    protocol: Protocol,
    /// The lazy builder it belongs to.
    lazy: Option<String>,
}

impl PoolKey {
    fn of(spec: &SessionSpec) -> Self {
        PoolKey {
            target: spec.target.clone(),
            command: spec.command.clone(),
            protocol: spec.protocol,
            lazy: spec.lazy.then(|| spec.builder.clone()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Down,
    Connecting,
    Up,
}

#[derive(Clone, Debug)]
struct PoolFailure {
    cause: String,
    at: Instant,
    consecutive: u32,
}

impl PoolFailure {
    fn retry_at(&self) -> Instant {
        self.at + backoff(self.consecutive)
    }
}

#[derive(Clone, Debug)]
pub(super) struct Pool {
    key: PoolKey,
    /// The last request's (its keep-warm and max-jobs apply).
    spec: SessionSpec,
    /// The lazy builder's instance the pool was made for.
    generation: Option<Generation>,
    link: Link,
    ready: VecDeque<(SessionId, Handshake)>,
    opening: BTreeSet<SessionId>,
    in_use: BTreeSet<SessionId>,
    hand_outs: u64,
    /// The last hand-out or end of a session in use (or the pool's creation).
    active_at: Instant,
    failure: Option<PoolFailure>,
    /// Pooled sessions that died since the last hand-out.
    deaths: u32,
    /// Takes no requests and opens nothing; removed once its sessions in use ended.
    closing: bool,
    /// Opened as part of its lazy builder's readiness, which waits for it: one session only.
    readiness: bool,
}

impl Pool {
    fn keep_warm(&self) -> Duration {
        Duration::from_millis(self.spec.keep_warm_ms)
    }

    fn backing_off(&self, now: Instant) -> Option<&PoolFailure> {
        self.failure
            .as_ref()
            .filter(|f| f.consecutive > 0 && f.retry_at() > now)
    }

    /// When it closes for inactivity (never while a session is in use).
    fn closes_at(&self) -> Option<Instant> {
        (self.in_use.is_empty() && !self.closing).then(|| self.active_at + self.keep_warm())
    }

    fn want_ready(&self) -> u32 {
        if self.readiness {
            // The builder's first session: alone, it starts fastest (and no other one races
            // it on the builder's store).
            return 1;
        }
        self.spec.max_jobs.max(1).saturating_add(1).min(READY_MAX)
    }

    fn carried(&self) -> u32 {
        (self.ready.len() + self.opening.len() + self.in_use.len()) as u32
    }
}

/// The machine's warm pools.
#[derive(Clone, Debug, Default)]
pub(super) struct Pools {
    pools: BTreeMap<PoolId, Pool>,
    last_pool: PoolId,
    last_session: SessionId,
}

impl Pools {
    pub(super) fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// The instant the next pool closes for inactivity.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.pools.values().filter_map(Pool::closes_at).min()
    }
}

impl Machine {
    /// [`Request::LeaseSession`] (`hand_out`) and [`Request::Warm`] (not).
    ///
    /// [`Request::LeaseSession`]: crate::supervisor::proto::Request::LeaseSession
    /// [`Request::Warm`]: crate::supervisor::proto::Request::Warm
    pub(super) fn warm_request(
        &mut self,
        conn: ConnId,
        spec: SessionSpec,
        hand_out: bool,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let no = |out: &mut Vec<Action>, reason: String| {
            let response = if hand_out {
                Response::NoSession { reason }
            } else {
                Response::Ok
            };
            Self::reply(out, conn, response);
        };
        if self.shutting_down {
            return no(out, "the supervisor is shutting down".to_owned());
        }
        if spec.keep_warm_ms == 0 {
            return no(out, format!("keep-warm is off for '{}'", spec.builder));
        }
        let generation = if spec.lazy {
            match self.slot_index(&spec.builder).map(|i| &self.slots[i]) {
                Some(s) if s.phase == Phase::Up && !s.removed => Some(s.generation),
                _ => {
                    return no(out, format!("lazy builder '{}' is not up", spec.builder));
                }
            }
        } else {
            None
        };
        let id = self.pool_for(&spec, generation, now, out);
        let Some(p) = self.pools.pools.get_mut(&id) else {
            return no(out, "no pool".to_owned());
        };
        p.spec = spec;
        // A request is a reason to try again after sessions kept dying.
        p.deaths = 0;
        if hand_out && let Some((session, handshake)) = p.ready.pop_front() {
            p.in_use.insert(session);
            p.hand_outs += 1;
            p.active_at = now;
            out.push(Action::HandOut {
                conn,
                pool: id,
                session,
                handshake,
            });
            self.fill(id, now, out);
            return;
        }
        let reason = match (p.link, p.backing_off(now)) {
            (_, Some(f)) => format!(
                "the warm connection to '{}' failed ({}); retrying in {}s",
                p.spec.builder,
                f.cause,
                f.retry_at().saturating_duration_since(now).as_secs() + 1
            ),
            (Link::Down, None) => format!("warming up a connection to '{}'", p.spec.builder),
            (Link::Connecting, None) => format!("connecting to '{}'", p.spec.builder),
            (Link::Up, None) if p.carried() >= SESSIONS_PER_CONNECTION => format!(
                "the warm connection to '{}' carries {SESSIONS_PER_CONNECTION} sessions",
                p.spec.builder
            ),
            (Link::Up, None) => format!("opening sessions to '{}'", p.spec.builder),
        };
        self.fill(id, now, out);
        no(out, reason);
    }

    /// The open pool for `spec` made for `generation` (a lazy builder's instance), or a new
    /// one (an earlier instance's is closed).
    fn pool_for(
        &mut self,
        spec: &SessionSpec,
        generation: Option<Generation>,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> PoolId {
        let key = PoolKey::of(spec);
        let found = self
            .pools
            .pools
            .iter()
            .find(|(_, p)| p.key == key && !p.closing)
            .map(|(&id, p)| (id, p.generation));
        if let Some((id, g)) = found {
            if g == generation {
                return id;
            }
            // A pool of an earlier instance of this lazy builder.
            self.close_pool(id, "its builder was booted again", now, out);
        }
        self.pools.last_pool += 1;
        let id = self.pools.last_pool;
        log(
            out,
            LogLevel::Debug,
            format!("warm connection {id} to '{}': new pool", spec.builder),
        );
        self.pools.pools.insert(
            id,
            Pool {
                key,
                spec: spec.clone(),
                generation,
                link: Link::Down,
                ready: VecDeque::new(),
                opening: BTreeSet::new(),
                in_use: BTreeSet::new(),
                hand_outs: 0,
                active_at: now,
                failure: None,
                deaths: 0,
                closing: false,
                readiness: false,
            },
        );
        id
    }

    /// Lazy builder `i` answered its readiness check: open its first warm session with
    /// `spec` before it counts as up (see the module docs).
    pub(super) fn warm_up(
        &mut self,
        i: usize,
        spec: SessionSpec,
        answered: Answered,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let generation = self.slots[i].generation;
        let id = self.pool_for(&spec, Some(generation), now, out);
        if let Some(p) = self.pools.pools.get_mut(&id) {
            p.readiness = true;
            p.spec = spec;
        }
        log(
            out,
            LogLevel::Debug,
            format!(
                "builder '{}' answered after {:.1}s; opening its first warm session",
                self.slots[i].cfg.name,
                answered.took.as_secs_f64()
            ),
        );
        self.slots[i].warming = Some(WarmingUp {
            pool: id,
            since: now,
            answered,
        });
        self.fill(id, now, out);
    }

    /// The warm-up of pool `id`'s lazy builder (if one waits for it) is over, `how`: the
    /// builder is up.
    fn warmed(&mut self, id: PoolId, how: &str, now: Instant, out: &mut Vec<Action>) {
        if let Some(p) = self.pools.pools.get_mut(&id) {
            p.readiness = false;
        }
        let Some(i) = self
            .slots
            .iter()
            .position(|s| s.warming.as_ref().is_some_and(|w| w.pool == id))
        else {
            return;
        };
        let Some(w) = self.slots[i].warming.take() else {
            return;
        };
        let waited = now.saturating_duration_since(w.since);
        let how = format!("{how} {:.2}s after readiness", waited.as_secs_f64());
        // The boot time kept (what hooks expect) is the readiness check's alone: a hook that
        // waits decides as before, and a warm-up never outlasts its wait (`warm_up_timers`).
        self.came_up(i, w.answered, Some(how), now, out);
    }

    /// Warm-ups that took [`WARM_UP_BOUND`], or that a waiter would otherwise time out on:
    /// those builders are up without a warm session.
    pub(super) fn warm_up_timers(&mut self, now: Instant, out: &mut Vec<Action>) {
        let due: Vec<PoolId> = self
            .slots
            .iter()
            .filter_map(|s| {
                let w = s.warming.as_ref()?;
                let waiter_due = s.waiters.iter().any(|(_, d)| *d <= now);
                (w.due() <= now || waiter_due).then_some(w.pool)
            })
            .collect();
        for id in due {
            self.warmed(
                id,
                "no warm session yet (builds connect directly until one is ready)",
                now,
                out,
            );
        }
    }

    /// Connects pool `id`, or opens sessions on it, up to what it should hold.
    fn fill(&mut self, id: PoolId, now: Instant, out: &mut Vec<Action>) {
        let Pools {
            pools,
            last_session,
            ..
        } = &mut self.pools;
        let Some(p) = pools.get_mut(&id) else {
            return;
        };
        if p.closing || p.backing_off(now).is_some() {
            return;
        }
        match p.link {
            Link::Connecting => {}
            Link::Down => {
                p.link = Link::Connecting;
                out.push(Action::WarmConnect {
                    pool: id,
                    spec: p.spec.clone(),
                });
            }
            Link::Up => {
                while (p.ready.len() + p.opening.len()) < p.want_ready() as usize
                    && p.carried() < SESSIONS_PER_CONNECTION
                    && p.deaths < DEATHS_BEFORE_PAUSE
                {
                    *last_session += 1;
                    let session = *last_session;
                    p.opening.insert(session);
                    out.push(Action::WarmOpen {
                        pool: id,
                        session,
                        spec: p.spec.clone(),
                    });
                }
            }
        }
    }

    fn pool_failed(
        &mut self,
        id: PoolId,
        what: &str,
        cause: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.pools.pools.get_mut(&id) else {
            return;
        };
        let consecutive = p.failure.as_ref().map_or(0, |f| f.consecutive) + 1;
        let f = PoolFailure {
            cause: super::one_line(&cause),
            at: now,
            consecutive,
        };
        log(
            out,
            LogLevel::Warn,
            format!(
                "warm connection to '{}': {what} failed ({}); builds connect directly for {}",
                p.spec.builder,
                f.cause,
                humantime::format_duration(backoff(consecutive))
            ),
        );
        p.failure = Some(f);
        if p.readiness {
            self.warmed(
                id,
                "its warm session failed (builds connect directly)",
                now,
                out,
            );
        }
    }

    pub(super) fn warm_connected(&mut self, id: PoolId, now: Instant, out: &mut Vec<Action>) {
        let Some(p) = self.pools.pools.get_mut(&id) else {
            return;
        };
        p.link = Link::Up;
        if let Some(f) = &mut p.failure {
            f.consecutive = 0;
        }
        log(
            out,
            LogLevel::Debug,
            format!("warm connection {id} to '{}': connected", p.spec.builder),
        );
        if p.closing {
            return;
        }
        self.fill(id, now, out);
    }

    pub(super) fn warm_connect_failed(
        &mut self,
        id: PoolId,
        cause: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.pools.pools.get_mut(&id) else {
            return;
        };
        p.link = Link::Down;
        self.pool_failed(id, "connecting", cause, now, out);
    }

    pub(super) fn warm_ready(
        &mut self,
        id: PoolId,
        session: SessionId,
        handshake: Handshake,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.pools.pools.get_mut(&id) else {
            return;
        };
        if !p.opening.remove(&session) {
            return;
        }
        if p.closing {
            // The runtime dropped it with the pool.
            return;
        }
        log(
            out,
            LogLevel::Debug,
            format!(
                "warm connection {id} to '{}': session {session} ready",
                p.spec.builder
            ),
        );
        p.ready.push_back((session, handshake));
        if p.readiness {
            self.warmed(id, "its first warm session is ready", now, out);
        }
    }

    pub(super) fn warm_open_failed(
        &mut self,
        id: PoolId,
        session: SessionId,
        cause: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.pools.pools.get_mut(&id) else {
            return;
        };
        if !p.opening.remove(&session) || p.closing {
            return;
        }
        self.pool_failed(id, "starting the remote program", cause, now, out);
    }

    pub(super) fn warm_ended(
        &mut self,
        id: PoolId,
        session: SessionId,
        cause: Option<String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.pools.pools.get_mut(&id) else {
            return;
        };
        if p.in_use.remove(&session) {
            p.active_at = now;
            if p.closing && p.in_use.is_empty() {
                self.remove_pool(id, now);
            }
            return;
        }
        let Some(at) = p.ready.iter().position(|(s, _)| *s == session) else {
            return;
        };
        p.ready.remove(at);
        p.deaths += 1;
        log(
            out,
            LogLevel::Info,
            format!(
                "warm connection {id} to '{}': a pooled session ended ({})",
                p.spec.builder,
                cause.as_deref().unwrap_or("no reason given")
            ),
        );
        self.fill(id, now, out);
    }

    pub(super) fn warm_lost(
        &mut self,
        id: PoolId,
        cause: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.pools.pools.get_mut(&id) else {
            return;
        };
        if p.link == Link::Down {
            return;
        }
        log(
            out,
            LogLevel::Info,
            format!(
                "warm connection {id} to '{}' lost: {}; the next build connects again",
                p.spec.builder,
                super::one_line(&cause)
            ),
        );
        p.link = Link::Down;
        p.ready.clear();
        p.opening.clear();
        let readiness = p.readiness;
        if p.closing && p.in_use.is_empty() {
            self.remove_pool(id, now);
        }
        if readiness {
            self.warmed(
                id,
                "its warm connection was lost (builds connect directly)",
                now,
                out,
            );
        }
    }

    /// The pool is gone; with the last one the supervisor may become quiet.
    fn remove_pool(&mut self, id: PoolId, now: Instant) {
        self.pools.pools.remove(&id);
        if self.pools.is_empty() {
            self.quiet_since = now;
        }
    }

    /// Closes pool `id`: its ready sessions and, once the sessions in use ended, its
    /// connection.
    fn close_pool(&mut self, id: PoolId, why: &str, now: Instant, out: &mut Vec<Action>) {
        let Some(p) = self.pools.pools.get_mut(&id) else {
            return;
        };
        if p.closing {
            return;
        }
        log(
            out,
            LogLevel::Info,
            format!(
                "warm connection {id} to '{}' closed: {why} ({} hand-out(s))",
                p.spec.builder, p.hand_outs
            ),
        );
        p.closing = true;
        p.ready.clear();
        p.opening.clear();
        out.push(Action::WarmClose { pool: id });
        if p.in_use.is_empty() {
            self.remove_pool(id, now);
        }
        if !self.shutting_down {
            // (A shutdown stops the builder instead.)
            self.warmed(id, "its warm connection closed", now, out);
        }
    }

    /// Closes every pool (shutdown).
    pub(super) fn close_all_pools(&mut self, now: Instant, out: &mut Vec<Action>) {
        let ids: Vec<PoolId> = self.pools.pools.keys().copied().collect();
        for id in ids {
            self.close_pool(id, "the supervisor is shutting down", now, out);
        }
    }

    /// Pools whose keep-warm ran out, and those of lazy builders that are no longer up in the
    /// instance they were made for.
    pub(super) fn warm_timers(&mut self, now: Instant, out: &mut Vec<Action>) {
        let mut close = Vec::new();
        for (&id, p) in &self.pools.pools {
            if p.closing {
                continue;
            }
            if let Some(g) = p.generation {
                let up = self
                    .slot_index(&p.spec.builder)
                    .map(|i| &self.slots[i])
                    .is_some_and(|s| {
                        s.generation == g
                            && (s.phase == Phase::Up
                                || s.warming.as_ref().is_some_and(|w| w.pool == id))
                    });
                if !up {
                    close.push((id, "its lazy builder is no longer up".to_owned()));
                    continue;
                }
            }
            if p.closes_at().is_some_and(|t| t <= now) {
                close.push((
                    id,
                    format!(
                        "no build for {} (keep-warm)",
                        humantime::format_duration(p.keep_warm())
                    ),
                ));
            }
        }
        for (id, why) in close {
            self.close_pool(id, &why, now, out);
        }
    }

    /// Builder `name`'s warm connection, summed over its pools.
    pub(super) fn warm_status(&self, name: &str, lazy: bool, now: Instant) -> Option<WarmStatus> {
        let mut found: Option<WarmStatus> = None;
        for p in self
            .pools
            .pools
            .values()
            .filter(|p| p.spec.builder == name && p.spec.lazy == lazy)
        {
            let w = found.get_or_insert_with(WarmStatus::default);
            w.connected |= p.link == Link::Up;
            w.ready += p.ready.len() as u32;
            w.in_use += p.in_use.len() as u32;
            w.hand_outs += p.hand_outs;
            if let Some(t) = p.closes_at() {
                let left = ms(t.saturating_duration_since(now));
                w.closes_in_ms = Some(w.closes_in_ms.map_or(left, |l| l.max(left)));
            }
            if let Some(f) = &p.failure {
                w.last_failure = Some(f.cause.clone());
            }
        }
        found
    }

    /// A row for each always-on builder with a warm connection, in the order first asked.
    pub(super) fn always_on_status(&self, now: Instant) -> Vec<BuilderStatus> {
        let mut names: Vec<&str> = Vec::new();
        for p in self.pools.pools.values().filter(|p| !p.spec.lazy) {
            if !names.contains(&p.spec.builder.as_str()) {
                names.push(&p.spec.builder);
            }
        }
        names
            .into_iter()
            .map(|name| BuilderStatus {
                warm: self.warm_status(name, false, now),
                ..BuilderStatus::new(name, State::AlwaysOn)
            })
            .collect()
    }
}
