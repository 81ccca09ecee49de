//! The supervisor's state machine: every lazy builder's life (down → booting → up → draining →
//! stopping → down, plus failed with backoff), the leases each connection holds, the WaitReady
//! waiters, the idle timers, failure memory, boot-time history, when to read the configuration
//! again, the shutdown (and its kill) and the exit decision.
//!
//! It is sans-IO: [`Machine::handle`] takes an [`Event`] and the current time and returns the
//! [`Action`]s the runtime must carry out, its log lines included ([`Action::Log`]). It must
//! never read a clock, touch a file, spawn a task, talk to a socket or write a log; the runtime
//! (`server.rs`) does all of that.
//!
//! This file holds the machine's types and its dispatch; the rules live one per file:
//! `requests.rs` (what clients ask, leases), `lifecycle.rs` (boots, failures, stops, shutdown),
//! `reconfigure.rs` (when to reread the configuration, and applying it), `status.rs` (what
//! `status` shows), `timers.rs` (idle stops, deadlines, the exit, the shutdown's kill) and
//! `boots.rs` (restore or cold boot: the kind each boot is expected to be, per-kind history).
//!
//! Rules it keeps (each has a unit test in `tests/`, one file per rule):
//! - A lease is tied to its connection; a connection that goes away releases all of its leases.
//! - A builder holding a lease is never stopped: an idle stop, a `down` request and a
//!   `report-failure` all wait until the last lease is released. Only a supervisor shutdown
//!   (SIGTERM) overrides that; a second signal, or [`SHUTDOWN_BOUND`] without every instance
//!   gone, kills them ([`Action::KillAll`]).
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
//! - The configuration is read again ([`Action::ReloadConfig`]) on SIGHUP, when the file
//!   changed and has settled ([`SETTLE`]), and before answering a boot, wait-ready or lease
//!   for a builder it does not know (when the file changed at all, or at most every
//!   [`UNKNOWN_RELOAD_EVERY`]); never without a file ([`Settings::reloads`]). A request whose
//!   answer would report a failure while a changed file is still settling waits until it has
//!   settled and was read (at most [`SETTLE`]): a config fixed just before a build is the one
//!   that build sees.
//! - A builder whose boot-timeout is below the boot time it has been measured to take is
//!   warned about when a configuration is applied ([`Machine::config_warnings`]).
//! - A boot's expected time comes from earlier boots of its own kind: a restore's from
//!   restores, a cold boot's from cold boots. The next boot of a `snapshot = true` builder is
//!   expected to restore when its last boot left a snapshot; the backend's plan, reported as
//!   the boot starts ([`Event::BootPlanned`]), corrects the guess.

mod boots;
mod lifecycle;
mod reconfigure;
mod requests;
mod status;
#[cfg(test)]
mod tests;
mod timers;
mod warm;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::proto::{BootKind, Request, Response, SessionSpec, State};
use crate::config::Builder;
use crate::supervisor::proto::Handshake;

pub use boots::DEFAULT_EXPECTED_RESTORE;
use lifecycle::Gone;
pub use lifecycle::{HISTORY_LEN, STABLE_UPTIME};
pub use reconfigure::{ConfigFileSeen, ReloadWhy, SETTLE, UNKNOWN_RELOAD_EVERY};
pub use requests::MAX_WAIT;
pub use status::DEFAULT_EXPECTED_BOOT;
pub use timers::{FIRST_LEASE_GRACE, SHUTDOWN_BOUND};
pub use warm::{
    DEATHS_BEFORE_PAUSE, PoolId, READY_MAX, SESSIONS_PER_CONNECTION, SessionId, WARM_UP_BOUND,
};

/// Identifies one client connection.
pub type ConnId = u64;

/// Identifies one instance (boot attempt) of a builder; events of older instances are stale.
pub type Generation = u64;

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
    /// `snapshot = true`: boots restore a snapshot, or make one.
    pub snapshot: bool,
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
            snapshot: matches!(&lazy.boot, crate::config::BootSpec::Qemu(q) if q.snapshot && q.runner.is_none()),
        })
    }
}

/// Machine-wide settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Auto-started supervisors exit after this long with every builder down and no client
    /// connected; `None` (a supervisor run by a service manager) never exits on its own.
    pub exit_after_idle: Option<Duration>,
    /// There is a configuration file to read again ([`Action::ReloadConfig`]) on SIGHUP, when
    /// it changed, or when a request names a builder the machine does not know; `false`: never.
    pub reloads: bool,
    /// That file, as `status` names it (the CLI checks that it serves the file it reads).
    pub config_file: Option<std::path::PathBuf>,
}

/// Boot durations per builder, newest last, in milliseconds. Persisted by the runtime as JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootHistory {
    /// Cold boots (those that made a snapshot included).
    #[serde(default)]
    pub builders: BTreeMap<String, Vec<u64>>,
    /// Restores from a snapshot.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub restores: BTreeMap<String, Vec<u64>>,
    /// The builders whose last boot left a snapshot to restore: their next boot is expected
    /// to be a restore.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub restorable: std::collections::BTreeSet<String>,
}

/// Something that happened.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    ClientConnected(ConnId),
    ClientGone(ConnId),
    Request(ConnId, Request),
    /// The backend said what the boot it starts will be (before starting it).
    BootPlanned {
        builder: String,
        generation: Generation,
        kind: BootKind,
        /// Why it is not a restore (`snapshot = true` only).
        note: Option<String>,
    },
    /// A boot reached readiness.
    BootSucceeded {
        builder: String,
        generation: Generation,
        port: u16,
        nix_version: String,
        took: Duration,
        /// How it came up: restored, or booted cold (and made a snapshot, or not).
        kind: BootKind,
        /// A snapshot is there for the next boot to restore (it was restored from one, or made
        /// one).
        restorable: bool,
        /// Why it was not restored, or why it made no snapshot (`snapshot = true` only).
        note: Option<String>,
        /// How to keep it warm (`keep-warm` on): its first warm session is opened as part of
        /// readiness, before waiting hooks hear that it is up (`warm.rs`).
        warm: Option<SessionSpec>,
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
    /// SIGTERM or SIGINT. The first stops every instance (leases or not) and exits once they
    /// are gone, killing what is left after [`SHUTDOWN_BOUND`]; a second one kills them now
    /// ([`Action::KillAll`]).
    Shutdown,
    /// SIGHUP: read the configuration again.
    ReloadSignal,
    /// What one `stat` of the configuration file says, taken as a client connected or sent a
    /// request and fed just before that event.
    ConfigFile(ConfigFileSeen),
    /// The configuration was (re)loaded: these are the lazy builders now, in file order. The
    /// answer to [`Action::ReloadConfig`], or the runtime's own first read.
    Reconfigure(Vec<BuilderConfig>),
    /// Reloading the configuration failed (file, line, why); the old one stays. The cause is
    /// appended to the error for an unknown builder until a reload succeeds.
    ReconfigureFailed(String),
    /// A pool's SSH connection is up ([`Action::WarmConnect`] worked).
    WarmConnected {
        pool: PoolId,
    },
    /// Connecting a pool failed.
    WarmConnectFailed {
        pool: PoolId,
        cause: String,
    },
    /// A session opened with [`Action::WarmOpen`] is ready to hand out.
    WarmReady {
        pool: PoolId,
        session: SessionId,
        handshake: Handshake,
    },
    /// Opening a session failed (the command, its handshake, or the channel).
    WarmOpenFailed {
        pool: PoolId,
        session: SessionId,
        cause: String,
    },
    /// A session ended: one handed out finished (the hook closed it, or the remote program
    /// ended), or a pooled one died (`cause`).
    WarmEnded {
        pool: PoolId,
        session: SessionId,
        cause: Option<String>,
    },
    /// A pool's SSH connection is gone; its sessions with it.
    WarmLost {
        pool: PoolId,
        cause: String,
    },
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
    /// Kill every instance now (no graceful stop: dropping it kills its processes) and exit.
    /// The last action; the machine takes no more events.
    KillAll,
    /// Read the configuration file again, then feed [`Event::Reconfigure`] or
    /// [`Event::ReconfigureFailed`] before any other event (with the same `now`): a request
    /// that named an unknown builder waits in the machine for that answer.
    ReloadConfig { why: ReloadWhy },
    /// Write this line to the supervisor's log.
    Log { level: LogLevel, message: String },
    /// Make pool `pool`'s SSH connection to `spec`'s target, then report
    /// [`Event::WarmConnected`] or [`Event::WarmConnectFailed`].
    WarmConnect { pool: PoolId, spec: SessionSpec },
    /// Start `spec`'s remote program on the pool's connection and do its handshake, then
    /// report [`Event::WarmReady`] or [`Event::WarmOpenFailed`]; watch it while it is pooled
    /// ([`Event::WarmEnded`] with a cause when it dies).
    WarmOpen {
        pool: PoolId,
        session: SessionId,
        spec: SessionSpec,
    },
    /// Answer `conn` with [`Response::Session`] and this session's three sockets, and relay
    /// it until either end closes; then report [`Event::WarmEnded`]. A session that died
    /// meanwhile is handed out anyway (closed): the hook falls back to a direct connection.
    HandOut {
        conn: ConnId,
        pool: PoolId,
        session: SessionId,
        handshake: Handshake,
    },
    /// Drop the pool's ready sessions (and any still opening); close its connection once the
    /// sessions in use have ended.
    WarmClose { pool: PoolId },
}

/// How much a log line matters (the runtime maps it onto its logger's levels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// Log `message` at `level` (an [`Action::Log`]).
fn log(out: &mut Vec<Action>, level: LogLevel, message: impl Into<String>) {
    out.push(Action::Log {
        level,
        message: message.into(),
    });
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
    /// Boot tries, and of those the ones that reached readiness and the ones that failed.
    boots: u32,
    boots_ok: u32,
    boots_failed: u32,
    /// The boot settings ([`BuilderConfig::boot_fingerprint`]) the instance was started with.
    booted_with: Option<u64>,
    failure: Option<LastFailure>,
    /// Cold boot durations (restores are in `kinds`).
    history: VecDeque<u64>,
    /// Restore or cold boot: the kinds of boots ([`boots`]).
    kinds: boots::Kinds,
    /// Connections waiting in `wait-ready`, with their deadlines.
    waiters: Vec<(ConnId, Instant)>,
    /// Answered its readiness check; still booting while its first warm session opens.
    warming: Option<warm::WarmingUp>,
    /// Boot again as soon as the running stop finishes.
    reboot_after_stop: bool,
    /// No longer in the configuration: takes no lease or boot, and disappears once its
    /// instance is gone.
    removed: bool,
}

impl Slot {
    fn new(cfg: BuilderConfig, history: VecDeque<u64>, now: Instant) -> Self {
        Slot {
            kinds: boots::Kinds::new(cfg.snapshot),
            cfg,
            phase: Phase::Down,
            generation: 0,
            up: None,
            leases: 0,
            idle_since: now,
            leased_since_up: false,
            boots: 0,
            boots_ok: 0,
            boots_failed: 0,
            booted_with: None,
            failure: None,
            history,
            waiters: Vec::new(),
            warming: None,
            reboot_after_stop: false,
            removed: false,
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
    /// Where a shutdown stops waiting for graceful stops ([`SHUTDOWN_BOUND`]).
    kill_at: Option<Instant>,
    exited: bool,
    /// The last generation handed out (machine-wide, so that a builder removed and added again
    /// never reuses one).
    last_generation: Generation,
    /// Why the last configuration reload failed, until one succeeds.
    config_error: Option<String>,
    /// When to read the configuration again.
    reloads: reconfigure::Reloads,
    /// Warm connections.
    pools: warm::Pools,
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
                let mut s = Slot::new(cfg, h, now);
                s.kinds.seed(&s.cfg, history);
                s
            })
            .collect();
        Machine {
            slots,
            clients: BTreeMap::new(),
            settings,
            epoch: (now, now_wall),
            quiet_since: now,
            shutting_down: false,
            kill_at: None,
            exited: false,
            last_generation: 0,
            config_error: None,
            // The runtime read the file just before it made the machine.
            reloads: reconfigure::Reloads::new(now),
            pools: warm::Pools::default(),
        }
    }

    /// Whether `name` is a builder of the current configuration (a removed one that still
    /// drains is not).
    pub fn knows(&self, name: &str) -> bool {
        self.slots.iter().any(|s| s.cfg.name == name && !s.removed)
    }

    /// The boot durations to persist.
    pub fn history(&self) -> BootHistory {
        let mut h = BootHistory {
            builders: self
                .slots
                .iter()
                .filter(|s| !s.history.is_empty())
                .map(|s| (s.cfg.name.clone(), s.history.iter().copied().collect()))
                .collect(),
            ..BootHistory::default()
        };
        for s in &self.slots {
            s.kinds.persist(&s.cfg.name, &mut h);
        }
        h
    }

    /// Whether [`Action::Exit`] or [`Action::KillAll`] was emitted.
    pub fn has_exited(&self) -> bool {
        self.exited
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Whether a warm connection is open (or closing while a session runs).
    pub fn has_pools(&self) -> bool {
        !self.pools.is_empty()
    }

    fn slot_index(&self, name: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.cfg.name == name)
    }

    /// Feed one event; returns what the runtime must do, ending with [`Action::SetTimer`].
    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.exited {
            return out;
        }
        if !matches!(event, Event::Reconfigure(_) | Event::ReconfigureFailed(_)) {
            // A runtime that never answered a ReloadConfig: the waiting request goes on with
            // the configuration the machine has.
            self.resume_deferred(now, &mut out);
        }
        match event {
            Event::ClientConnected(conn) => {
                self.clients.entry(conn).or_default();
            }
            Event::ClientGone(conn) => {
                self.forget_settling(conn);
                self.client_gone(conn, now, &mut out);
            }
            Event::Request(conn, req) => {
                if let Some((conn, req)) = self.reload_for_request(conn, req, now, &mut out) {
                    self.request(conn, req, now, &mut out);
                }
            }
            Event::BootPlanned {
                builder,
                generation,
                kind,
                note,
            } => {
                if let Some(i) = self.current(&builder, generation, &mut out) {
                    self.boot_planned(i, kind, note, &mut out);
                }
            }
            Event::BootSucceeded {
                builder,
                generation,
                port,
                nix_version,
                took,
                kind,
                restorable,
                note,
                warm,
            } => {
                if let Some(i) = self.current(&builder, generation, &mut out) {
                    let came = boots::CameUp {
                        kind,
                        restorable,
                        note,
                    };
                    let up = warm::Answered {
                        port,
                        nix_version,
                        took,
                        came,
                    };
                    self.boot_succeeded(i, up, warm, now, &mut out);
                }
            }
            Event::BootFailed {
                builder,
                generation,
                cause,
            } => {
                if let Some(i) = self.current(&builder, generation, &mut out) {
                    self.instance_gone(i, Gone::BootFailed(cause), now, &mut out);
                }
            }
            Event::InstanceExited {
                builder,
                generation,
                report,
            } => {
                if let Some(i) = self.current(&builder, generation, &mut out) {
                    self.instance_gone(i, Gone::Exited(report), now, &mut out);
                }
            }
            Event::StopFinished {
                builder,
                generation,
                report,
            } => {
                if let Some(i) = self.current(&builder, generation, &mut out) {
                    self.instance_gone(i, Gone::Stopped(report), now, &mut out);
                }
            }
            Event::Tick => {}
            Event::Shutdown => self.shutdown(now, &mut out),
            Event::ReloadSignal => self.reload_signal(now, &mut out),
            Event::ConfigFile(seen) => self.config_file(seen, now, &mut out),
            Event::Reconfigure(builders) => self.reloaded(builders, now, &mut out),
            Event::ReconfigureFailed(cause) => self.reload_failed(&cause, now, &mut out),
            Event::WarmConnected { pool } => self.warm_connected(pool, now, &mut out),
            Event::WarmConnectFailed { pool, cause } => {
                self.warm_connect_failed(pool, cause, now, &mut out)
            }
            Event::WarmReady {
                pool,
                session,
                handshake,
            } => self.warm_ready(pool, session, handshake, now, &mut out),
            Event::WarmOpenFailed {
                pool,
                session,
                cause,
            } => self.warm_open_failed(pool, session, cause, now, &mut out),
            Event::WarmEnded {
                pool,
                session,
                cause,
            } => self.warm_ended(pool, session, cause, now, &mut out),
            Event::WarmLost { pool, cause } => self.warm_lost(pool, cause, now, &mut out),
        }
        if !self.exited {
            self.timers(now, &mut out);
        }
        if !self.exited {
            out.push(Action::SetTimer(self.next_deadline(now)));
        }
        out
    }

    fn reply(out: &mut Vec<Action>, conn: ConnId, response: Response) {
        out.push(Action::Reply { conn, response });
    }
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
