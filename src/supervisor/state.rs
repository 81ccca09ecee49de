//! The supervisor's state machine: every lazy builder's life (down → booting → up → draining →
//! stopping → down, plus failed with backoff), the leases each connection holds, the WaitReady
//! waiters, the idle timers, failure memory, boot-time history and the exit decision.
//!
//! It is sans-IO: [`Machine::handle`] takes an [`Event`] and the current time and returns the
//! [`Action`]s the runtime must carry out. It must never read a clock, touch a file, spawn a task
//! or talk to a socket; the runtime (`server.rs`) does all of that.
//!
//! Rules it keeps (each has a unit test below):
//! - A lease is tied to its connection; a connection that goes away releases all of its leases.
//! - A builder holding a lease is never stopped: an idle stop, a `down` request and a
//!   `report-failure` all wait until the last lease is released. Only a supervisor shutdown
//!   (SIGTERM) overrides that.
//! - `report-failure` records the failure (with backoff) once per incident and drains the
//!   builder: holders keep their leases until they release them, no new lease is granted, and the
//!   builder is stopped after the last release. It is booted again by the next `boot` once the
//!   backoff has expired (or at once with `force`).
//! - No lease is granted on a builder that is not up (booting, draining, stopping, down,
//!   failed), nor beyond its `max-jobs`.
//! - The idle timer runs from the last release (or from "up" if nobody leased it; then it is
//!   at least [`FIRST_LEASE_GRACE`], so the hook that asked for the boot finds it up).
//! - Boot failures, unexpected exits and reported failures back off exponentially
//!   ([`crate::backoff`]); a successful boot resets the count.
//! - Events from an instance that is no longer current (an older generation) are ignored.
//! - A new configuration ([`Event::Reconfigure`]) never revokes a lease and never stops a
//!   leased builder: a new builder appears down; a removed one that has no instance disappears
//!   at once, one that runs drains (its leases finish, no new ones, a boot is cancelled) and
//!   disappears once its instance is gone; a kept one takes the new settings at once (max-jobs
//!   and idle-timeout apply to the running instance, which the runtime keeps as it was booted;
//!   the boot settings apply from its next boot) and keeps its boot history; if its boot
//!   settings changed, its failure memory and backoff are cleared. A configuration that could
//!   not be loaded ([`Event::ReconfigureFailed`]) changes nothing but is named in the error
//!   for an unknown builder.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::proto::{BuilderStatus, Failure, Request, Response, State};
use crate::backoff::backoff;
use crate::config::Builder;

/// Identifies one client connection.
pub type ConnId = u64;

/// Identifies one instance (boot attempt) of a builder; events of older instances are stale.
pub type Generation = u64;

/// A builder up at least this long before it failed is rebooted without a backoff.
pub const STABLE_UPTIME: Duration = Duration::from_secs(60);
/// How many boot durations are kept per builder for [`BuilderStatus::expected_boot_ms`].
pub const HISTORY_LEN: usize = 5;
/// The boot-time guess before a builder has ever booted (capped by its boot timeout). Small VMs
/// and command builders boot in seconds; guessing low lets the hook wait briefly for the first
/// boot instead of paying a whole daemon poll, and a slow builder only costs a few short waits
/// before the hook gives up on the guess (`lazy::wait_budget`).
pub const DEFAULT_EXPECTED_BOOT: Duration = Duration::from_secs(8);
/// The longest `wait-ready` a client may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 60);
/// A freshly booted builder that nobody has leased yet is kept at least this long, whatever its
/// idle timeout: the hook that asked for the boot usually postponed and comes back only with
/// the daemon's next poll (`build-poll-interval`, 5 s by default). Without it, a builder whose
/// idle timeout is shorter than that is stopped before its first build and booted again.
pub const FIRST_LEASE_GRACE: Duration = Duration::from_secs(10);

/// What the machine needs to know about one lazy builder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuilderConfig {
    pub name: String,
    pub max_jobs: u32,
    /// `None`: never stopped for idleness.
    pub idle_timeout: Option<Duration>,
    pub boot_timeout: Duration,
    /// Stands for every setting that decides whether a boot works (boot section, URI, keys,
    /// boot timeout): when it changes, the builder's failure memory is cleared.
    pub boot_fingerprint: u64,
}

impl BuilderConfig {
    /// The machine's view of a configured builder; `None` for always-on builders.
    pub fn from_builder(b: &Builder) -> Option<Self> {
        use std::hash::{Hash, Hasher};
        let lazy = b.lazy.as_ref()?;
        // The config types are not `Hash` (floats); their `Debug` text names every field, which
        // is all a same-process comparison needs.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        format!(
            "{:?}|{:?}|{:?}|{:?}|{}|{:?}",
            b.uri,
            b.ssh_key,
            b.host_keys,
            lazy.boot,
            b.allow_well_known_host_key,
            lazy.boot_timeout
        )
        .hash(&mut h);
        Some(BuilderConfig {
            name: b.name.clone(),
            max_jobs: b.max_jobs.max(1),
            idle_timeout: lazy.idle_timeout,
            boot_timeout: lazy.boot_timeout,
            boot_fingerprint: h.finish(),
        })
    }
}

/// Machine-wide settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Auto-started supervisors exit after this long with every builder down and no client
    /// connected; `None` (a supervisor run by a service manager) never exits on its own.
    pub exit_after_idle: Option<Duration>,
}

/// Boot durations per builder, newest last, in milliseconds. Persisted by the runtime as JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootHistory {
    #[serde(default)]
    pub builders: BTreeMap<String, Vec<u64>>,
}

/// Something that happened.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    ClientConnected(ConnId),
    ClientGone(ConnId),
    Request(ConnId, Request),
    /// A boot reached readiness.
    BootSucceeded {
        builder: String,
        generation: Generation,
        port: u16,
        nix_version: String,
        took: Duration,
    },
    /// A boot failed; the instance (if one was started) is already gone.
    BootFailed {
        builder: String,
        generation: Generation,
        cause: String,
    },
    /// The instance ended without being asked to.
    InstanceExited {
        builder: String,
        generation: Generation,
        report: String,
    },
    /// A stop asked for with [`Action::Stop`] is done; the instance is gone.
    StopFinished {
        builder: String,
        generation: Generation,
        report: String,
    },
    /// The timer set with [`Action::SetTimer`] fired (spurious ticks are harmless).
    Tick,
    /// SIGTERM/SIGINT: stop every instance (leases or not) and exit.
    Shutdown,
    /// The configuration was (re)loaded: these are the lazy builders now, in file order.
    Reconfigure(Vec<BuilderConfig>),
    /// Reloading the configuration failed (one line: file, line, why); the old one stays. The
    /// cause is appended to the error for an unknown builder until a reload succeeds.
    ReconfigureFailed(String),
}

/// Something the runtime must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send this response on the connection (if it is still open).
    Reply { conn: ConnId, response: Response },
    /// Start a boot: start the instance, wait for readiness with the builder's boot timeout,
    /// then report [`Event::BootSucceeded`] or [`Event::BootFailed`] with this generation.
    StartBoot {
        builder: String,
        generation: Generation,
    },
    /// Stop the instance (cancelling its boot if it is still booting), then report
    /// [`Event::StopFinished`] (or a [`Event::BootFailed`] that raced with the stop).
    Stop {
        builder: String,
        generation: Generation,
    },
    /// The single wake-up timer: fire [`Event::Tick`] at this instant (`None`: disarm).
    /// Emitted at the end of every [`Machine::handle`] call.
    SetTimer(Option<Instant>),
    /// The boot history changed: persist [`Machine::history`].
    SaveHistory,
    /// Exit: every instance is gone and nobody needs the supervisor.
    Exit,
}

/// Why a builder drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DrainReason {
    /// `down` was asked.
    Down,
    /// A hook reported a failure: restart after the leases are released.
    Failure,
    /// The builder was removed from the configuration: stop, then disappear.
    Removed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Down,
    Booting {
        since: Instant,
    },
    Up,
    Draining(DrainReason),
    /// `failed`: where the builder goes after the stop.
    Stopping {
        failed: bool,
    },
    Failed,
}

impl Phase {
    fn state(self) -> State {
        match self {
            Phase::Down => State::Down,
            Phase::Booting { .. } => State::Booting,
            Phase::Up => State::Up,
            Phase::Draining(_) => State::Draining,
            Phase::Stopping { .. } => State::Stopping,
            Phase::Failed => State::Failed,
        }
    }

    /// Whether an instance (a process) exists in this phase.
    fn has_instance(self) -> bool {
        !matches!(self, Phase::Down | Phase::Failed)
    }
}

#[derive(Clone, Debug)]
struct UpInfo {
    since: Instant,
    port: u16,
    nix_version: String,
}

#[derive(Clone, Debug)]
struct LastFailure {
    cause: String,
    at: Instant,
    /// Failures in a row; 0 after a successful boot (the cause stays for `status`).
    consecutive: u32,
}

impl LastFailure {
    fn retry_at(&self) -> Instant {
        self.at + backoff(self.consecutive)
    }
}

#[derive(Clone, Debug)]
struct Slot {
    cfg: BuilderConfig,
    phase: Phase,
    generation: Generation,
    up: Option<UpInfo>,
    /// Leases held now (the sum over all connections).
    leases: u32,
    /// When the idle timer started: the last release, or "up".
    idle_since: Instant,
    /// Whether a lease was granted since the builder last came up ([`FIRST_LEASE_GRACE`]).
    leased_since_up: bool,
    boots: u32,
    failure: Option<LastFailure>,
    history: VecDeque<u64>,
    /// Connections waiting in `wait-ready`, with their deadlines.
    waiters: Vec<(ConnId, Instant)>,
    /// Boot again as soon as the running stop finishes.
    reboot_after_stop: bool,
    /// No longer in the configuration: takes no lease or boot, and disappears once its
    /// instance is gone.
    removed: bool,
}

impl Slot {
    fn new(cfg: BuilderConfig, history: VecDeque<u64>, now: Instant) -> Self {
        Slot {
            cfg,
            phase: Phase::Down,
            generation: 0,
            up: None,
            leases: 0,
            idle_since: now,
            leased_since_up: false,
            boots: 0,
            failure: None,
            history,
            waiters: Vec::new(),
            reboot_after_stop: false,
            removed: false,
        }
    }

    fn backing_off(&self, now: Instant) -> Option<&LastFailure> {
        self.failure
            .as_ref()
            .filter(|f| f.consecutive > 0 && f.retry_at() > now)
    }

    fn expected_boot(&self) -> Duration {
        if self.history.is_empty() {
            return DEFAULT_EXPECTED_BOOT.min(self.cfg.boot_timeout);
        }
        let mut v: Vec<u64> = self.history.iter().copied().collect();
        v.sort_unstable();
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2
        };
        Duration::from_millis(median)
    }

    /// Up again after a drain was called off; the idle timer restarts unless a lease is held.
    fn undrain(&mut self, now: Instant) {
        self.phase = Phase::Up;
        if self.leases == 0 {
            self.idle_since = now;
        }
    }

    fn idle_stop_at(&self) -> Option<Instant> {
        match (self.phase, self.leases, self.cfg.idle_timeout) {
            (Phase::Up, 0, Some(t)) if !self.leased_since_up => {
                Some(self.idle_since + t.max(FIRST_LEASE_GRACE))
            }
            (Phase::Up, 0, Some(t)) => Some(self.idle_since + t),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct ClientInfo {
    /// Leases per builder name.
    leases: BTreeMap<String, u32>,
}

/// All builder state; see the module comment for the rules.
#[derive(Debug)]
pub struct Machine {
    slots: Vec<Slot>,
    clients: BTreeMap<ConnId, ClientInfo>,
    settings: Settings,
    /// A wall-clock reading and the monotonic instant it was taken at, to show failure times.
    epoch: (Instant, SystemTime),
    /// When the supervisor last became quiet (a client left, an instance ended, start).
    quiet_since: Instant,
    shutting_down: bool,
    exited: bool,
    /// The last generation handed out (machine-wide, so that a builder removed and added again
    /// never reuses one).
    last_generation: Generation,
    /// Why the last configuration reload failed, until one succeeds.
    config_error: Option<String>,
}

/// Answers each of `waiters` (`wait-ready` connections) with `status`.
fn answer_waiters(waiters: Vec<(ConnId, Instant)>, status: &BuilderStatus, out: &mut Vec<Action>) {
    for (conn, _) in waiters {
        out.push(Action::Reply {
            conn,
            response: Response::Builder {
                status: status.clone(),
            },
        });
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Machine {
    /// `history` seeds the expected boot times (entries of unknown builders are dropped);
    /// `now`/`now_wall` are one reading of both clocks.
    pub fn new(
        builders: Vec<BuilderConfig>,
        settings: Settings,
        history: &BootHistory,
        now: Instant,
        now_wall: SystemTime,
    ) -> Self {
        let slots = builders
            .into_iter()
            .map(|cfg| {
                let mut h: VecDeque<u64> = history
                    .builders
                    .get(&cfg.name)
                    .map(|v| v.iter().copied().collect())
                    .unwrap_or_default();
                while h.len() > HISTORY_LEN {
                    h.pop_front();
                }
                Slot::new(cfg, h, now)
            })
            .collect();
        Machine {
            slots,
            clients: BTreeMap::new(),
            settings,
            epoch: (now, now_wall),
            quiet_since: now,
            shutting_down: false,
            exited: false,
            last_generation: 0,
            config_error: None,
        }
    }

    /// Whether `name` is a builder of the current configuration (a removed one that still
    /// drains is not).
    pub fn knows(&self, name: &str) -> bool {
        self.slots.iter().any(|s| s.cfg.name == name && !s.removed)
    }

    /// The boot durations to persist.
    pub fn history(&self) -> BootHistory {
        BootHistory {
            builders: self
                .slots
                .iter()
                .filter(|s| !s.history.is_empty())
                .map(|s| (s.cfg.name.clone(), s.history.iter().copied().collect()))
                .collect(),
        }
    }

    /// Whether [`Action::Exit`] was emitted.
    pub fn has_exited(&self) -> bool {
        self.exited
    }

    /// The status of every builder, in configuration order.
    pub fn status(&self, now: Instant) -> Vec<BuilderStatus> {
        (0..self.slots.len())
            .map(|i| self.slot_status(i, now))
            .collect()
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// The earliest instant at which something is due (idle stop, waiter deadline, exit).
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        for s in &self.slots {
            if let Some(t) = s.idle_stop_at() {
                consider(t);
            }
            for (_, d) in &s.waiters {
                consider(*d);
            }
        }
        if let Some(t) = self.exit_at() {
            consider(t.max(now));
        }
        next
    }

    fn exit_at(&self) -> Option<Instant> {
        if self.exited || self.shutting_down {
            return None;
        }
        let linger = self.settings.exit_after_idle?;
        if !self.clients.is_empty() || self.slots.iter().any(|s| s.phase.has_instance()) {
            return None;
        }
        Some(self.quiet_since + linger)
    }

    fn slot_index(&self, name: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.cfg.name == name)
    }

    fn slot_status(&self, i: usize, now: Instant) -> BuilderStatus {
        self.status_of_slot(&self.slots[i], now)
    }

    fn status_of_slot(&self, s: &Slot, now: Instant) -> BuilderStatus {
        let (epoch_mono, epoch_wall) = self.epoch;
        let last_failure = s.failure.as_ref().map(|f| {
            let wall = if f.at >= epoch_mono {
                epoch_wall + (f.at - epoch_mono)
            } else {
                epoch_wall - (epoch_mono - f.at)
            };
            Failure {
                cause: f.cause.clone(),
                at_unix: wall
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                retry_in_ms: if f.consecutive > 0 {
                    ms(f.retry_at().saturating_duration_since(now))
                } else {
                    0
                },
                consecutive: f.consecutive,
            }
        });
        let up = s.up.as_ref().filter(|_| {
            matches!(
                s.phase,
                Phase::Up | Phase::Draining(_) | Phase::Stopping { .. }
            )
        });
        BuilderStatus {
            name: s.cfg.name.clone(),
            state: s.phase.state(),
            ssh_port: up.map(|u| u.port),
            booting_ms: match s.phase {
                Phase::Booting { since } => Some(ms(now.saturating_duration_since(since))),
                _ => None,
            },
            expected_boot_ms: Some(ms(s.expected_boot())),
            uptime_ms: up
                .filter(|_| matches!(s.phase, Phase::Up | Phase::Draining(_)))
                .map(|u| ms(now.saturating_duration_since(u.since))),
            idle_stop_in_ms: s
                .idle_stop_at()
                .map(|t| ms(t.saturating_duration_since(now))),
            leases: s.leases,
            boots: s.boots,
            last_failure,
            nix_version: up.map(|u| u.nix_version.clone()),
        }
    }

    /// Feed one event; returns what the runtime must do, ending with [`Action::SetTimer`].
    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.exited {
            return out;
        }
        match event {
            Event::ClientConnected(conn) => {
                self.clients.entry(conn).or_default();
            }
            Event::ClientGone(conn) => self.client_gone(conn, now, &mut out),
            Event::Request(conn, req) => self.request(conn, req, now, &mut out),
            Event::BootSucceeded {
                builder,
                generation,
                port,
                nix_version,
                took,
            } => {
                if let Some(i) = self.current(&builder, generation) {
                    self.boot_succeeded(i, port, nix_version, took, now, &mut out);
                }
            }
            Event::BootFailed {
                builder,
                generation,
                cause,
            } => {
                if let Some(i) = self.current(&builder, generation) {
                    self.instance_gone(i, Gone::BootFailed(cause), now, &mut out);
                }
            }
            Event::InstanceExited {
                builder,
                generation,
                report,
            } => {
                if let Some(i) = self.current(&builder, generation) {
                    self.instance_gone(i, Gone::Exited(report), now, &mut out);
                }
            }
            Event::StopFinished {
                builder,
                generation,
                report,
            } => {
                if let Some(i) = self.current(&builder, generation) {
                    self.instance_gone(i, Gone::Stopped(report), now, &mut out);
                }
            }
            Event::Tick => {}
            Event::Reconfigure(builders) => self.reconfigure(builders, now, &mut out),
            Event::ReconfigureFailed(cause) => {
                self.config_error = Some(one_line(&cause));
            }
            Event::Shutdown => {
                if !self.shutting_down {
                    tracing::info!("shutting down: stopping every builder");
                    self.shutting_down = true;
                    for i in 0..self.slots.len() {
                        self.slots[i].reboot_after_stop = false;
                        match self.slots[i].phase {
                            Phase::Booting { .. } | Phase::Up | Phase::Draining(_) => {
                                self.stop(i, false, &mut out)
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        self.timers(now, &mut out);
        if !self.exited {
            out.push(Action::SetTimer(self.next_deadline(now)));
        }
        out
    }

    /// The slot index if `generation` is the builder's current instance and it has one.
    fn current(&self, builder: &str, generation: Generation) -> Option<usize> {
        let i = self.slot_index(builder)?;
        let s = &self.slots[i];
        if s.generation == generation && s.phase.has_instance() {
            Some(i)
        } else {
            tracing::debug!("ignoring a stale event of builder '{builder}' instance {generation}");
            None
        }
    }

    /// Idle stops, waiter deadlines, exit.
    fn timers(&mut self, now: Instant, out: &mut Vec<Action>) {
        for i in 0..self.slots.len() {
            if self.slots[i].idle_stop_at().is_some_and(|t| t <= now) {
                tracing::info!(
                    "builder '{}' has been idle for {}: stopping it",
                    self.slots[i].cfg.name,
                    humantime::format_duration(self.slots[i].cfg.idle_timeout.unwrap_or_default())
                );
                self.stop(i, false, out);
            }
            let (due, keep): (Vec<_>, Vec<_>) = self.slots[i]
                .waiters
                .drain(..)
                .partition(|(_, d)| *d <= now);
            self.slots[i].waiters = keep;
            if !due.is_empty() {
                answer_waiters(due, &self.slot_status(i, now), out);
            }
        }
        let all_gone = !self.slots.iter().any(|s| s.phase.has_instance());
        if self.shutting_down && all_gone {
            self.exited = true;
            out.push(Action::Exit);
        } else if self.exit_at().is_some_and(|t| t <= now) {
            tracing::info!("every builder is down and no client is connected: exiting");
            self.exited = true;
            out.push(Action::Exit);
        }
    }

    fn client_gone(&mut self, conn: ConnId, now: Instant, out: &mut Vec<Action>) {
        let Some(info) = self.clients.remove(&conn) else {
            return;
        };
        for (name, n) in info.leases {
            if let Some(i) = self.slot_index(&name) {
                tracing::info!("a client went away holding {n} lease(s) on '{name}': released");
                self.release_n(i, n, now, out);
            }
        }
        for s in &mut self.slots {
            s.waiters.retain(|(c, _)| *c != conn);
        }
        if self.clients.is_empty() {
            self.quiet_since = now;
        }
    }

    /// Drop `n` leases of builder `i` (the caller updated the connection's own count).
    fn release_n(&mut self, i: usize, n: u32, now: Instant, out: &mut Vec<Action>) {
        let s = &mut self.slots[i];
        s.leases = s.leases.saturating_sub(n);
        if s.leases > 0 {
            return;
        }
        s.idle_since = now;
        if let Phase::Draining(reason) = s.phase {
            tracing::info!(
                "builder '{}': last lease released, stopping it ({})",
                s.cfg.name,
                match reason {
                    DrainReason::Down => "down was requested",
                    DrainReason::Failure => "restart after a reported failure",
                    DrainReason::Removed => "removed from the config",
                }
            );
            self.stop(i, reason == DrainReason::Failure, out);
        }
    }

    /// Ask the runtime to stop builder `i`'s instance. Callers check the lease rule.
    fn stop(&mut self, i: usize, failed: bool, out: &mut Vec<Action>) {
        let s = &mut self.slots[i];
        s.phase = Phase::Stopping { failed };
        out.push(Action::Stop {
            builder: s.cfg.name.clone(),
            generation: s.generation,
        });
    }

    fn start_boot(&mut self, i: usize, now: Instant, out: &mut Vec<Action>) {
        self.last_generation += 1;
        let s = &mut self.slots[i];
        s.generation = self.last_generation;
        s.boots += 1;
        s.phase = Phase::Booting { since: now };
        s.up = None;
        s.reboot_after_stop = false;
        tracing::info!("booting builder '{}' (boot {})", s.cfg.name, s.boots);
        out.push(Action::StartBoot {
            builder: s.cfg.name.clone(),
            generation: s.generation,
        });
    }

    fn record_failure(&mut self, i: usize, cause: String, now: Instant) {
        let s = &mut self.slots[i];
        // A builder that ran well for a while and then died (a VM killed, OOM) is not a boot
        // loop: remember why, but let the next build boot it again at once.
        let stable =
            s.up.as_ref()
                .is_some_and(|u| now.saturating_duration_since(u.since) >= STABLE_UPTIME);
        let consecutive = if stable {
            0
        } else {
            s.failure.as_ref().map_or(0, |f| f.consecutive) + 1
        };
        tracing::warn!(
            "builder '{}' failed ({consecutive} in a row, next boot in {}s at the earliest): {cause}",
            s.cfg.name,
            backoff(consecutive).as_secs()
        );
        s.failure = Some(LastFailure {
            cause,
            at: now,
            consecutive,
        });
    }

    /// Answer every waiter of builder `i` with its status now.
    fn wake_waiters(&mut self, i: usize, now: Instant, out: &mut Vec<Action>) {
        if self.slots[i].waiters.is_empty() {
            return;
        }
        let status = self.slot_status(i, now);
        answer_waiters(std::mem::take(&mut self.slots[i].waiters), &status, out);
    }

    fn boot_succeeded(
        &mut self,
        i: usize,
        port: u16,
        nix_version: String,
        took: Duration,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let s = &mut self.slots[i];
        if !matches!(s.phase, Phase::Booting { .. }) {
            // A stop raced with the end of the boot; the stop's own event follows.
            return;
        }
        tracing::info!(
            "builder '{}' is up after {:.1}s (port {port}, {nix_version})",
            s.cfg.name,
            took.as_secs_f64()
        );
        s.phase = Phase::Up;
        s.up = Some(UpInfo {
            since: now,
            port,
            nix_version,
        });
        s.idle_since = now;
        s.leased_since_up = false;
        if let Some(f) = &mut s.failure {
            f.consecutive = 0;
        }
        s.history.push_back(ms(took));
        while s.history.len() > HISTORY_LEN {
            s.history.pop_front();
        }
        out.push(Action::SaveHistory);
        self.wake_waiters(i, now, out);
    }

    fn instance_gone(&mut self, i: usize, how: Gone, now: Instant, out: &mut Vec<Action>) {
        let phase = self.slots[i].phase;
        let name = self.slots[i].cfg.name.clone();
        let mut failed = match phase {
            Phase::Stopping { failed } => failed,
            _ => false,
        };
        match how {
            Gone::BootFailed(cause) => {
                self.record_failure(i, cause, now);
                failed = true;
            }
            Gone::Exited(report) if !matches!(phase, Phase::Stopping { .. }) => {
                let what = if matches!(phase, Phase::Booting { .. }) {
                    "exited during boot"
                } else {
                    "exited on its own"
                };
                self.record_failure(i, format!("{what}: {report}"), now);
                failed = true;
            }
            Gone::Exited(report) | Gone::Stopped(report) => {
                tracing::info!("builder '{name}' stopped: {report}");
            }
        }
        // The instance is gone: leases on it mean nothing any more.
        let dropped = self.slots[i].leases;
        if dropped > 0 {
            tracing::warn!("builder '{name}' is gone while {dropped} lease(s) were held");
            for c in self.clients.values_mut() {
                c.leases.remove(&name);
            }
        }
        let s = &mut self.slots[i];
        s.leases = 0;
        s.up = None;
        // A reconfiguration may have cleared the failure memory a stop was going to keep.
        s.phase = if failed && s.failure.is_some() {
            Phase::Failed
        } else {
            Phase::Down
        };
        self.quiet_since = now;
        let reboot = std::mem::take(&mut self.slots[i].reboot_after_stop);
        if self.slots[i].removed {
            self.wake_waiters(i, now, out);
            tracing::info!("builder '{name}' was removed from the config and is gone now");
            self.slots.remove(i);
        } else if reboot && !self.shutting_down && self.slots[i].backing_off(now).is_none() {
            self.start_boot(i, now, out);
        } else {
            self.wake_waiters(i, now, out);
        }
    }

    /// Apply a new configuration; see the module comment for the rules.
    fn reconfigure(&mut self, builders: Vec<BuilderConfig>, now: Instant, out: &mut Vec<Action>) {
        self.config_error = None;
        let mut old: Vec<Slot> = std::mem::take(&mut self.slots);
        let mut slots = Vec::with_capacity(builders.len());
        for cfg in builders {
            if slots.iter().any(|s: &Slot| s.cfg.name == cfg.name) {
                continue; // The config parser refuses duplicates; never two slots per name.
            }
            let Some(pos) = old.iter().position(|s| s.cfg.name == cfg.name) else {
                tracing::info!("config: new lazy builder '{}'", cfg.name);
                slots.push(Slot::new(cfg, VecDeque::new(), now));
                continue;
            };
            let mut s = old.remove(pos);
            if s.removed {
                // Back before its instance was gone: it keeps serving as it was.
                tracing::info!("config: builder '{}' is configured again", cfg.name);
                s.removed = false;
                if s.phase == Phase::Draining(DrainReason::Removed) {
                    s.undrain(now);
                }
            }
            if s.cfg != cfg {
                let boot_changed = s.cfg.boot_fingerprint != cfg.boot_fingerprint;
                tracing::info!(
                    "config: builder '{}' changed{}",
                    cfg.name,
                    match (s.phase.has_instance(), boot_changed) {
                        (true, true) =>
                            "; the running instance is kept, the new boot settings apply from its next boot",
                        (false, true) =>
                            "; its boot settings changed, so its failure memory is cleared",
                        _ => "",
                    }
                );
                if boot_changed {
                    s.failure = None;
                    match s.phase {
                        Phase::Failed => s.phase = Phase::Down,
                        Phase::Stopping { failed: true } => {
                            s.phase = Phase::Stopping { failed: false }
                        }
                        _ => {}
                    }
                }
                // max-jobs and idle-timeout apply at once: a lower max-jobs only refuses new
                // leases, and the idle timer is re-evaluated by the timers below.
                s.cfg = cfg;
            }
            slots.push(s);
        }
        // What is left was removed from the configuration.
        for mut s in old {
            s.reboot_after_stop = false;
            match s.phase {
                Phase::Down | Phase::Failed => {
                    tracing::info!("config: builder '{}' removed", s.cfg.name);
                    // Nobody waits on a builder without an instance, but answer any anyway.
                    let status = self.status_of_slot(&s, now);
                    answer_waiters(std::mem::take(&mut s.waiters), &status, out);
                    continue;
                }
                Phase::Booting { .. } | Phase::Up if s.leases == 0 => {
                    tracing::info!("config: builder '{}' removed: stopping it", s.cfg.name);
                    s.removed = true;
                    s.phase = Phase::Stopping { failed: false };
                    out.push(Action::Stop {
                        builder: s.cfg.name.clone(),
                        generation: s.generation,
                    });
                }
                Phase::Up | Phase::Draining(_) => {
                    tracing::info!(
                        "config: builder '{}' removed: draining {} lease(s), then stopping it",
                        s.cfg.name,
                        s.leases
                    );
                    s.removed = true;
                    s.phase = Phase::Draining(DrainReason::Removed);
                }
                Phase::Booting { .. } | Phase::Stopping { .. } => {
                    tracing::info!("config: builder '{}' removed: stopping it", s.cfg.name);
                    s.removed = true;
                }
            }
            slots.push(s);
        }
        self.slots = slots;
    }

    fn reply(out: &mut Vec<Action>, conn: ConnId, response: Response) {
        out.push(Action::Reply { conn, response });
    }

    fn request(&mut self, conn: ConnId, req: Request, now: Instant, out: &mut Vec<Action>) {
        // A request on a connection we did not see open still counts as one.
        self.clients.entry(conn).or_default();
        let name = match &req {
            Request::Status => {
                let builders = self.status(now);
                return Self::reply(out, conn, Response::Status { builders });
            }
            Request::Boot { builder, .. }
            | Request::WaitReady { builder, .. }
            | Request::Lease { builder }
            | Request::Release { builder }
            | Request::ReportFailure { builder, .. }
            | Request::Down { builder } => builder.clone(),
        };
        let Some(i) = self.slot_index(&name) else {
            let known: Vec<&str> = self
                .slots
                .iter()
                .filter(|s| !s.removed)
                .map(|s| s.cfg.name.as_str())
                .collect();
            let mut message = if known.is_empty() {
                format!("no lazy builder named '{name}': the supervisor's config has none")
            } else {
                format!(
                    "no lazy builder named '{name}' (the supervisor knows: {})",
                    known.join(", ")
                )
            };
            if let Some(e) = &self.config_error {
                message.push_str(&format!(
                    "; reloading the supervisor's config failed, so it runs the one it had: {e}"
                ));
            }
            return Self::reply(out, conn, Response::Error { message });
        };
        match req {
            Request::Status => {}
            Request::Boot { force, .. } => self.req_boot(conn, i, force, now, out),
            Request::WaitReady { timeout_ms, .. } => {
                let s = &mut self.slots[i];
                let pending = matches!(s.phase, Phase::Booting { .. })
                    || (matches!(s.phase, Phase::Stopping { .. }) && s.reboot_after_stop);
                if pending && timeout_ms > 0 {
                    let wait = Duration::from_millis(timeout_ms).min(MAX_WAIT);
                    s.waiters.push((conn, now + wait));
                } else {
                    let status = self.slot_status(i, now);
                    Self::reply(out, conn, Response::Builder { status });
                }
            }
            Request::Lease { .. } => self.req_lease(conn, i, now, out),
            Request::Release { .. } => {
                // Releasing a lease this connection does not hold is a no-op (idempotent).
                let mut released = false;
                if let Some(c) = self.clients.get_mut(&conn)
                    && let Some(n) = c.leases.get_mut(&name)
                {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        c.leases.remove(&name);
                    }
                    released = true;
                }
                if released {
                    self.release_n(i, 1, now, out);
                }
                Self::reply(out, conn, Response::Ok);
            }
            Request::ReportFailure { cause, .. } => {
                let cause = one_line(&cause);
                match self.slots[i].phase {
                    Phase::Up => {
                        self.record_failure(i, cause, now);
                        if self.slots[i].leases == 0 {
                            self.stop(i, true, out);
                        } else {
                            self.slots[i].phase = Phase::Draining(DrainReason::Failure);
                        }
                    }
                    Phase::Draining(DrainReason::Down) => {
                        self.record_failure(i, cause, now);
                        self.slots[i].phase = Phase::Draining(DrainReason::Failure);
                    }
                    // Already handled (a second report of the same incident), or about an
                    // instance that is gone: nothing to restart.
                    _ => tracing::debug!(
                        "builder '{name}': failure report ignored in state {:?}: {cause}",
                        self.slots[i].phase.state()
                    ),
                }
                Self::reply(out, conn, Response::Ok);
            }
            Request::Down { .. } => {
                let s = &mut self.slots[i];
                s.reboot_after_stop = false;
                match s.phase {
                    Phase::Booting { .. } => self.stop(i, false, out),
                    Phase::Up if s.leases == 0 => self.stop(i, false, out),
                    Phase::Up => {
                        tracing::info!(
                            "builder '{name}': down requested, draining {} lease(s)",
                            s.leases
                        );
                        s.phase = Phase::Draining(DrainReason::Down);
                    }
                    _ => {}
                }
                let status = self.slot_status(i, now);
                Self::reply(out, conn, Response::Builder { status });
            }
        }
    }

    fn refuse(&self, i: usize, reason: String, now: Instant) -> Response {
        Response::Refused {
            reason,
            status: Some(self.slot_status(i, now)),
        }
    }

    fn backoff_reason(&self, i: usize, now: Instant) -> Option<String> {
        let s = &self.slots[i];
        let f = s.backing_off(now)?;
        let left = f.retry_at().saturating_duration_since(now);
        Some(format!(
            "builder '{}' failed {} time(s) in a row ({}); retrying in {}s",
            s.cfg.name,
            f.consecutive,
            f.cause,
            left.as_secs() + u64::from(left.subsec_nanos() > 0)
        ))
    }

    fn req_boot(
        &mut self,
        conn: ConnId,
        i: usize,
        force: bool,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if self.shutting_down {
            let r = self.refuse(i, "the supervisor is shutting down".to_owned(), now);
            return Self::reply(out, conn, r);
        }
        if self.slots[i].removed {
            let reason = format!(
                "builder '{}' was removed from the config; it stops once its builds are done",
                self.slots[i].cfg.name
            );
            let r = self.refuse(i, reason, now);
            return Self::reply(out, conn, r);
        }
        let backoff = if force {
            None
        } else {
            self.backoff_reason(i, now)
        };
        let s = &mut self.slots[i];
        match s.phase {
            Phase::Booting { .. } | Phase::Up => {}
            Phase::Draining(DrainReason::Down) => {
                tracing::info!(
                    "builder '{}': boot requested while draining, kept up",
                    s.cfg.name
                );
                s.undrain(now);
            }
            Phase::Draining(DrainReason::Removed) => {} // refused above
            Phase::Draining(DrainReason::Failure) => {
                if force {
                    tracing::info!(
                        "builder '{}': forced up while draining after a failure, kept up",
                        s.cfg.name
                    );
                    s.undrain(now);
                } else {
                    let reason = format!(
                        "builder '{}' is restarting after a failure and waits for {} build(s) to finish",
                        s.cfg.name, s.leases
                    );
                    let r = self.refuse(i, reason, now);
                    return Self::reply(out, conn, r);
                }
            }
            Phase::Stopping { .. } => {
                if let Some(reason) = backoff {
                    let r = self.refuse(i, reason, now);
                    return Self::reply(out, conn, r);
                }
                s.reboot_after_stop = true;
            }
            Phase::Down | Phase::Failed => {
                if let Some(reason) = backoff {
                    let r = self.refuse(i, reason, now);
                    return Self::reply(out, conn, r);
                }
                self.start_boot(i, now, out);
            }
        }
        let status = self.slot_status(i, now);
        Self::reply(out, conn, Response::Builder { status });
    }

    fn req_lease(&mut self, conn: ConnId, i: usize, now: Instant, out: &mut Vec<Action>) {
        let s = &self.slots[i];
        let name = &s.cfg.name;
        let refusal = if self.shutting_down {
            Some("the supervisor is shutting down".to_owned())
        } else {
            match s.phase {
                Phase::Up if s.leases >= s.cfg.max_jobs => Some(format!(
                    "builder '{name}' is full ({}/{} builds)",
                    s.leases, s.cfg.max_jobs
                )),
                Phase::Up => None,
                Phase::Booting { since } => Some(format!(
                    "builder '{name}' is booting ({}s of about {}s)",
                    now.saturating_duration_since(since).as_secs(),
                    s.expected_boot().as_secs()
                )),
                Phase::Draining(DrainReason::Down) => Some(format!(
                    "builder '{name}' is draining for a stop and takes no new builds"
                )),
                Phase::Draining(DrainReason::Failure) => Some(format!(
                    "builder '{name}' is restarting after a failure and takes no new builds"
                )),
                Phase::Draining(DrainReason::Removed) => Some(format!(
                    "builder '{name}' was removed from the config and takes no new builds"
                )),
                Phase::Stopping { .. } => Some(format!("builder '{name}' is stopping")),
                Phase::Down => Some(format!("builder '{name}' is down")),
                Phase::Failed => Some(self.backoff_reason(i, now).unwrap_or_else(|| {
                    format!(
                        "builder '{name}' failed: {}",
                        s.failure
                            .as_ref()
                            .map_or("unknown cause", |f| f.cause.as_str())
                    )
                })),
            }
        };
        if let Some(reason) = refusal {
            let r = self.refuse(i, reason, now);
            return Self::reply(out, conn, r);
        }
        let name = s.cfg.name.clone();
        self.slots[i].leases += 1;
        self.slots[i].leased_since_up = true;
        *self
            .clients
            .entry(conn)
            .or_default()
            .leases
            .entry(name)
            .or_insert(0) += 1;
        let status = self.slot_status(i, now);
        Self::reply(out, conn, Response::Leased { status });
    }
}

enum Gone {
    BootFailed(String),
    Exited(String),
    Stopped(String),
}

/// Collapse a cause to one line (hooks print it on one line).
pub fn one_line(s: &str) -> String {
    let joined: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut line = joined.join("; ");
    if line.len() > 500 {
        let mut cut = 500;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    fn cfg(name: &str, max_jobs: u32, idle: Option<u64>) -> BuilderConfig {
        BuilderConfig {
            name: name.to_owned(),
            max_jobs,
            idle_timeout: idle.map(Duration::from_secs),
            boot_timeout: Duration::from_secs(120),
            boot_fingerprint: 0,
        }
    }

    /// `cfg` with other boot settings.
    fn rebooted(mut c: BuilderConfig) -> BuilderConfig {
        c.boot_fingerprint += 1;
        c
    }

    fn names(t: &T) -> Vec<String> {
        t.m.status(t.now).into_iter().map(|s| s.name).collect()
    }

    struct T {
        m: Machine,
        now: Instant,
    }

    impl T {
        fn new(builders: Vec<BuilderConfig>, linger: Option<u64>) -> T {
            Self::with_history(builders, linger, &BootHistory::default())
        }

        fn with_history(builders: Vec<BuilderConfig>, linger: Option<u64>, h: &BootHistory) -> T {
            let now = Instant::now();
            let settings = Settings {
                exit_after_idle: linger.map(Duration::from_secs),
            };
            T {
                m: Machine::new(builders, settings, h, now, SystemTime::now()),
                now,
            }
        }

        fn ev(&mut self, e: Event) -> Vec<Action> {
            let out = self.m.handle(e, self.now);
            assert!(
                self.m.has_exited() || matches!(out.last(), Some(Action::SetTimer(_))),
                "every handle ends with SetTimer: {out:?}"
            );
            out
        }

        fn req(&mut self, conn: ConnId, r: Request) -> Vec<Action> {
            self.ev(Event::Request(conn, r))
        }

        /// The single reply to `conn` among `actions`.
        fn reply(actions: &[Action], conn: ConnId) -> Response {
            let r: Vec<&Response> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Reply { conn: c, response } if *c == conn => Some(response),
                    _ => None,
                })
                .collect();
            assert_eq!(r.len(), 1, "one reply to {conn}: {actions:?}");
            r[0].clone()
        }

        fn ask(&mut self, conn: ConnId, r: Request) -> Response {
            let out = self.req(conn, r);
            Self::reply(&out, conn)
        }

        fn advance(&mut self, d: Duration) -> Vec<Action> {
            self.now += d;
            self.ev(Event::Tick)
        }

        fn status(&self, name: &str) -> BuilderStatus {
            self.m
                .status(self.now)
                .into_iter()
                .find(|s| s.name == name)
                .unwrap()
        }

        fn generation(&self, name: &str) -> Generation {
            self.m
                .slot_index(name)
                .map_or(0, |i| self.m.slots[i].generation)
        }

        fn reconfigure(&mut self, builders: Vec<BuilderConfig>) -> Vec<Action> {
            self.ev(Event::Reconfigure(builders))
        }

        fn boot(&mut self, conn: ConnId, name: &str) -> Vec<Action> {
            self.req(
                conn,
                Request::Boot {
                    builder: name.into(),
                    force: false,
                },
            )
        }

        fn succeed(&mut self, name: &str, took: u64) -> Vec<Action> {
            let generation = self.generation(name);
            self.ev(Event::BootSucceeded {
                builder: name.into(),
                generation,
                port: 2222,
                nix_version: "nix-store (Nix) 2.8.0".into(),
                took: Duration::from_secs(took),
            })
        }

        fn fail(&mut self, name: &str, cause: &str) -> Vec<Action> {
            let generation = self.generation(name);
            self.ev(Event::BootFailed {
                builder: name.into(),
                generation,
                cause: cause.into(),
            })
        }

        fn stopped(&mut self, name: &str) -> Vec<Action> {
            let generation = self.generation(name);
            self.ev(Event::StopFinished {
                builder: name.into(),
                generation,
                report: "exited with status 0".into(),
            })
        }

        fn bring_up(&mut self, name: &str) {
            self.ev(Event::ClientConnected(99));
            let out = self.boot(99, name);
            assert!(has_start(&out, name), "{out:?}");
            self.succeed(name, 5);
            self.ev(Event::ClientGone(99));
            assert_eq!(self.status(name).state, State::Up);
        }

        fn lease(&mut self, conn: ConnId, name: &str) -> Response {
            self.ask(
                conn,
                Request::Lease {
                    builder: name.into(),
                },
            )
        }

        fn release(&mut self, conn: ConnId, name: &str) -> Vec<Action> {
            self.req(
                conn,
                Request::Release {
                    builder: name.into(),
                },
            )
        }
    }

    fn has_start(out: &[Action], name: &str) -> bool {
        out.iter()
            .any(|a| matches!(a, Action::StartBoot { builder, .. } if builder == name))
    }

    fn has_stop(out: &[Action], name: &str) -> bool {
        out.iter()
            .any(|a| matches!(a, Action::Stop { builder, .. } if builder == name))
    }

    fn has_exit(out: &[Action]) -> bool {
        out.contains(&Action::Exit)
    }

    fn timer(out: &[Action]) -> Option<Instant> {
        match out.last() {
            Some(Action::SetTimer(t)) => *t,
            _ => None,
        }
    }

    fn refused(r: &Response) -> &str {
        match r {
            Response::Refused { reason, .. } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

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
        let out = t.req(
            9,
            Request::Down {
                builder: "vm".into(),
            },
        );
        assert!(!has_stop(&out, "vm"));
        assert!(
            matches!(T::reply(&out, 9), Response::Builder { status } if status.state == State::Draining)
        );
        assert!(refused(&t.lease(2, "vm")).contains("draining"));
        assert!(!has_stop(&t.advance(1000 * S), "vm"));
        // `up` while draining keeps it up.
        t.boot(9, "vm");
        assert_eq!(t.status("vm").state, State::Up);
        t.req(
            9,
            Request::Down {
                builder: "vm".into(),
            },
        );
        let out = t.release(1, "vm");
        assert!(
            has_stop(&out, "vm"),
            "last release stops a draining builder"
        );
        t.stopped("vm");
        assert_eq!(t.status("vm").state, State::Down);
        // Down on an unleased up builder stops at once; on a down one it is a no-op.
        t.bring_up("vm");
        let out = t.req(
            9,
            Request::Down {
                builder: "vm".into(),
            },
        );
        assert!(has_stop(&out, "vm"));
        t.stopped("vm");
        let out = t.req(
            9,
            Request::Down {
                builder: "vm".into(),
            },
        );
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
        assert!(
            refused(&t.ask(
                3,
                Request::Boot {
                    builder: "vm".into(),
                    force: false
                }
            ))
            .contains("restarting")
        );
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
        let r = t.ask(
            1,
            Request::Boot {
                builder: "vm".into(),
                force: false,
            },
        );
        assert!(refused(&r).contains("host key mismatch"), "{r:?}");
        assert!(refused(&r).contains("retrying in 10s"), "{r:?}");
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
                refused(&r).contains(&format!("retrying in {expected}s")),
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
    fn failures_are_shared_by_all_clients() {
        let mut t = T::new(vec![cfg("vm", 1, None)], None);
        t.boot(1, "vm");
        t.fail("vm", "boot timed out after 120s");
        // Another client asking later sees the same backoff and cause.
        let r = t.ask(
            2,
            Request::Boot {
                builder: "vm".into(),
                force: false,
            },
        );
        assert!(refused(&r).contains("boot timed out"), "{r:?}");
        match t.ask(3, Request::Status) {
            Response::Status { builders } => {
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
        assert!(
            matches!(T::reply(&out, 1), Response::Builder { status } if status.state == State::Up)
        );
        // Up (or down, failed): answered at once.
        assert!(matches!(t.ask(1, wait(5000)), Response::Builder { .. }));
        // A failed boot answers its waiters too.
        t.req(
            1,
            Request::Down {
                builder: "vm".into(),
            },
        );
        t.stopped("vm");
        t.boot(1, "vm");
        t.req(3, wait(60_000));
        let out = t.fail("vm", "boom");
        assert!(
            matches!(T::reply(&out, 3), Response::Builder { status } if status.state == State::Failed)
        );
        // A waiter whose client goes away is forgotten.
        t.req(
            1,
            Request::Boot {
                builder: "vm".into(),
                force: true,
            },
        );
        t.req(4, wait(60_000));
        t.ev(Event::ClientGone(4));
        let out = t.succeed("vm", 1);
        assert!(
            !out.iter().any(|a| matches!(a, Action::Reply { .. })),
            "{out:?}"
        );
        // A down during boot cancels it: stop, then down, and the waiter hears it.
        t.req(
            1,
            Request::Down {
                builder: "vm".into(),
            },
        );
        t.stopped("vm");
        t.boot(1, "vm");
        t.req(5, wait(60_000));
        let out = t.req(
            1,
            Request::Down {
                builder: "vm".into(),
            },
        );
        assert!(has_stop(&out, "vm"));
        let out = t.stopped("vm");
        assert!(
            matches!(T::reply(&out, 5), Response::Builder { status } if status.state == State::Down)
        );
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
        assert!(
            matches!(T::reply(&out, 1), Response::Builder { status } if status.state == State::Up)
        );
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
        });
        t.ev(Event::StopFinished {
            builder: "vm".into(),
            generation: old,
            report: "x".into(),
        });
        assert_eq!(t.status("vm").state, State::Booting);
    }

    #[test]
    fn expected_boot_time_is_a_median_of_recent_boots() {
        let mut short = cfg("short", 1, None);
        short.boot_timeout = 5 * S;
        let mut t = T::new(vec![cfg("vm", 1, None), short], None);
        assert_eq!(t.status("vm").expected_boot_ms, Some(8_000));
        assert_eq!(t.status("short").expected_boot_ms, Some(5_000));
        for took in [9, 1, 5, 100, 7, 6] {
            t.req(
                1,
                Request::Down {
                    builder: "vm".into(),
                },
            );
            if t.status("vm").state == State::Stopping {
                t.stopped("vm");
            }
            t.boot(1, "vm");
            let out = t.succeed("vm", took);
            assert!(out.contains(&Action::SaveHistory));
        }
        // The last five: 1, 5, 100, 7, 6 → median 6.
        assert_eq!(t.status("vm").expected_boot_ms, Some(6_000));
        let h = t.m.history();
        assert_eq!(h.builders["vm"], [1000, 5000, 100_000, 7000, 6000]);
        assert!(!h.builders.contains_key("short"));
        // A new machine starts from the saved history; unknown builders are dropped.
        let mut saved = h.clone();
        saved.builders.insert("gone".into(), vec![1]);
        saved.builders.insert("short".into(), vec![4000, 2000]);
        let t2 = T::with_history(
            vec![cfg("vm", 1, None), cfg("short", 1, None)],
            None,
            &saved,
        );
        assert_eq!(t2.status("vm").expected_boot_ms, Some(6_000));
        assert_eq!(t2.status("short").expected_boot_ms, Some(3_000));
        assert!(!t2.m.history().builders.contains_key("gone"));
        let json = serde_json::to_string(&t2.m.history()).unwrap();
        assert_eq!(
            serde_json::from_str::<BootHistory>(&json).unwrap(),
            t2.m.history()
        );
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

    #[test]
    fn one_line_causes() {
        assert_eq!(one_line("a\n\n  b  \n"), "a; b");
        let long = "é".repeat(400);
        let l = one_line(&long);
        assert!(l.ends_with('…') && l.len() <= 504);
    }

    // ---- reconfiguration

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
        assert!(
            matches!(T::reply(&out, 2), Response::Builder { status } if status.name == "booting")
        );
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
            .contains("retrying")
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
            .contains("retrying")
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

    // ---- invariants over random event sequences

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
}
