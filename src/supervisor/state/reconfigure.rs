//! When the configuration is read again, and a new configuration applied to the running
//! machine.
//!
//! Reloads: on SIGHUP ([`Event::ReloadSignal`]); when the file's identity differs from the one
//! last read and it was modified at least [`SETTLE`] ago ([`Event::ConfigFile`], which the
//! runtime feeds as a client connects or sends a request: an editor that rewrites the file in
//! place may not be done, and an empty or cut-off file would remove builders); and when a
//! request for boot, wait-ready or lease names a builder the machine does not know, if the file
//! changed at all or was last read [`UNKNOWN_RELOAD_EVERY`] ago (that request waits for the
//! answer). A reload that fails is logged as an error once per distinct cause (every time on
//! SIGHUP) and keeps the running configuration. A status, boot, wait-ready or lease whose
//! answer would report a failure while a changed file is still settling waits until it has
//! settled ([`SETTLE`] after its modification) and was read: a config fixed right before a
//! build is the one the build sees.
//!
//! Applying: new builders appear down, a removed one disappears at once without an instance or
//! drains (never losing a lease) and disappears once its instance is gone, a kept one takes its
//! new settings at once and forgets its failures only when its boot settings changed; a
//! boot-timeout below a builder's measured boot time is logged as a warning.
//!
//! [`Event::ReloadSignal`]: super::Event::ReloadSignal
//! [`Event::ConfigFile`]: super::Event::ConfigFile

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::status::answer_waiters;
use super::{
    Action, BuilderConfig, ConnId, DrainReason, LogLevel, Machine, Phase, Slot, log, one_line,
};
use crate::supervisor::proto::Request;

/// A file modified less than this long ago is not reloaded just because it changed. A request
/// for an unknown builder and SIGHUP do not wait.
pub const SETTLE: Duration = Duration::from_millis(200);
/// A request for an unknown builder rereads an unchanged file at most this often.
pub const UNKNOWN_RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Why the configuration is read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadWhy {
    Signal,
    Changed,
    UnknownBuilder,
}

impl ReloadWhy {
    /// For log lines: "config reload (SIGHUP) failed".
    pub fn text(self) -> &'static str {
        match self {
            ReloadWhy::Signal => "SIGHUP",
            ReloadWhy::Changed => "the file changed",
            ReloadWhy::UnknownBuilder => "a request named a builder it did not know",
        }
    }
}

/// What one `stat` of the configuration file says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigFileSeen {
    /// Its identity (device, inode, size, modification and change times) differs from the one
    /// it had when it was last read, or it appeared or vanished since.
    pub changed: bool,
    /// How long ago it was modified; `None` when it is missing or its modification time is in
    /// the future (a clock step), which both count as settled.
    pub age: Option<Duration>,
}

/// The machine's memory of its reloads.
#[derive(Debug)]
pub(super) struct Reloads {
    /// When the file was last read (or a read was asked for).
    read_at: Instant,
    /// The latest [`ConfigFileSeen::changed`].
    changed: bool,
    /// Why the [`Action::ReloadConfig`] still unanswered was asked for.
    pending: Option<ReloadWhy>,
    /// The request that waits for that answer.
    deferred: Option<(ConnId, Request)>,
    /// When the changed file was last modified (the latest [`ConfigFileSeen::age`] before now).
    modified_at: Option<Instant>,
    /// Requests that wait for the changed file to settle and be read, and when it has settled.
    settling: Vec<(ConnId, Request)>,
    settle_at: Option<Instant>,
}

impl Reloads {
    pub(super) fn new(read_at: Instant) -> Self {
        Reloads {
            read_at,
            changed: false,
            pending: None,
            deferred: None,
            modified_at: None,
            settling: Vec::new(),
            settle_at: None,
        }
    }
}

impl Machine {
    /// Ask the runtime to read the file again.
    fn reload(&mut self, why: ReloadWhy, now: Instant, out: &mut Vec<Action>) {
        let r = &mut self.reloads;
        r.pending = Some(why);
        r.read_at = now;
        // What the runtime reads now is the new "last read".
        r.changed = false;
        out.push(Action::ReloadConfig { why });
    }

    /// SIGHUP.
    pub(super) fn reload_signal(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.settings.reloads {
            self.reload(ReloadWhy::Signal, now, out);
        }
    }

    /// A `stat` of the file: read it again if it changed and has settled.
    pub(super) fn config_file(
        &mut self,
        seen: ConfigFileSeen,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if !self.settings.reloads {
            return;
        }
        self.reloads.changed = seen.changed;
        self.reloads.modified_at = if seen.changed {
            seen.age.and_then(|age| now.checked_sub(age))
        } else {
            None
        };
        let settled = seen.age.is_none_or(|age| age >= SETTLE);
        if seen.changed && settled {
            self.reload(ReloadWhy::Changed, now, out);
        }
    }

    /// `req`, unless it names a builder this configuration does not know and the file is worth
    /// reading again first: then it waits for the reload's answer, and `None`.
    pub(super) fn reload_for_request(
        &mut self,
        conn: ConnId,
        req: Request,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Option<(ConnId, Request)> {
        // Only the requests that need a configured builder (a release or a report about one
        // removed from the config is answered from what the machine still knows).
        let unknown = match &req {
            Request::Boot { builder, .. }
            | Request::WaitReady { builder, .. }
            | Request::Lease { builder } => !self.knows(builder),
            _ => false,
        };
        let r = &self.reloads;
        let due = r.changed || now.saturating_duration_since(r.read_at) >= UNKNOWN_RELOAD_EVERY;
        if !(self.settings.reloads && unknown && due) {
            if let Some(at) = self.settles_at_after_a_failure(&req, now) {
                self.reloads.settling.push((conn, req));
                self.reloads.settle_at = Some(self.reloads.settle_at.map_or(at, |t| t.max(at)));
                return None;
            }
            return Some((conn, req));
        }
        self.reloads.deferred = Some((conn, req));
        self.reload(ReloadWhy::UnknownBuilder, now, out);
        None
    }

    /// When the changed file settles, if it has not yet and `req`'s answer would report a
    /// failure: a status about any builder, a boot, wait-ready or lease about one, that is
    /// failed or backing off. Every such failure is older than the file's content, which was
    /// never read; and whether it is older than the file's modification time cannot be told
    /// to the millisecond (file times come from the kernel's coarse clock), so none is asked.
    fn settles_at_after_a_failure(&self, req: &Request, now: Instant) -> Option<Instant> {
        let r = &self.reloads;
        let modified = r.modified_at.filter(|_| r.changed && r.pending.is_none())?;
        let settles = modified + SETTLE;
        if settles <= now {
            return None;
        }
        let stale = |s: &Slot| {
            s.failure.is_some() && (s.phase == Phase::Failed || s.backing_off(now).is_some())
        };
        let reports_stale = match req {
            Request::Status => self.slots.iter().any(stale),
            Request::Boot { builder, .. }
            | Request::WaitReady { builder, .. }
            | Request::Lease { builder } => self
                .slot_index(builder)
                .is_some_and(|i| stale(&self.slots[i])),
            _ => false,
        };
        reports_stale.then_some(settles)
    }

    /// When the requests waiting for the file to settle are due.
    pub(super) fn settle_deadline(&self) -> Option<Instant> {
        self.reloads
            .settle_at
            .filter(|_| !self.reloads.settling.is_empty())
    }

    /// The file waited for has settled: read it (the waiting requests go on with the answer).
    pub(super) fn settle_timer(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.settle_deadline().is_some_and(|t| t <= now) && self.reloads.pending.is_none() {
            self.reloads.settle_at = None;
            self.reload(ReloadWhy::Changed, now, out);
        }
    }

    /// A connection that went away no longer waits for anything.
    pub(super) fn forget_settling(&mut self, conn: ConnId) {
        self.reloads.settling.retain(|(c, _)| *c != conn);
    }

    /// The request that waited for a reload, if any, goes on.
    pub(super) fn resume_deferred(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.reloads.pending = None;
        if let Some((conn, req)) = self.reloads.deferred.take() {
            self.request(conn, req, now, out);
        }
    }

    /// The file was read: apply it.
    pub(super) fn reloaded(
        &mut self,
        builders: Vec<BuilderConfig>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        self.reconfigure(builders, now, out);
        for w in self.config_warnings() {
            log(out, LogLevel::Warn, w);
        }
        self.resume_deferred(now, out);
        self.resume_settling(now, out);
    }

    /// The file was read (or could not be): the requests that waited for it go on.
    fn resume_settling(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.reloads.settle_at = None;
        for (conn, req) in std::mem::take(&mut self.reloads.settling) {
            self.request(conn, req, now, out);
        }
    }

    /// The file could not be read or parsed: keep the running configuration.
    pub(super) fn reload_failed(&mut self, cause: &str, now: Instant, out: &mut Vec<Action>) {
        let cause = one_line(cause);
        let why = self.reloads.pending;
        let shown = why.map_or_else(String::new, |w| format!(" ({})", w.text()));
        // The same failure again (every request of a client that keeps asking) is logged once.
        if why == Some(ReloadWhy::Signal) || self.config_error.as_ref() != Some(&cause) {
            log(
                out,
                LogLevel::Error,
                format!("config reload{shown} failed, still running the previous config: {cause}"),
            );
        } else {
            log(
                out,
                LogLevel::Debug,
                format!("config reload{shown} failed again: {cause}"),
            );
        }
        self.config_error = Some(cause);
        self.resume_deferred(now, out);
        self.resume_settling(now, out);
    }

    /// Apply a new configuration; see the module comment for the rules.
    pub(super) fn reconfigure(
        &mut self,
        builders: Vec<BuilderConfig>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        self.config_error = None;
        let mut old: Vec<Slot> = std::mem::take(&mut self.slots);
        let mut slots = Vec::with_capacity(builders.len());
        for cfg in builders {
            if slots.iter().any(|s: &Slot| s.cfg.name == cfg.name) {
                continue; // The config parser refuses duplicates; never two slots per name.
            }
            let Some(pos) = old.iter().position(|s| s.cfg.name == cfg.name) else {
                log(
                    out,
                    LogLevel::Info,
                    format!("config: new lazy builder '{}'", cfg.name),
                );
                slots.push(Slot::new(cfg, VecDeque::new(), now));
                continue;
            };
            let mut s = old.remove(pos);
            if s.removed {
                // Back before its instance was gone: it keeps serving as it was.
                log(
                    out,
                    LogLevel::Info,
                    format!("config: builder '{}' is configured again", cfg.name),
                );
                s.removed = false;
                if s.phase == Phase::Draining(DrainReason::Removed) {
                    s.undrain(now);
                }
            }
            if s.cfg != cfg {
                let boot_changed = s.cfg.boot_fingerprint != cfg.boot_fingerprint;
                log(
                    out,
                    LogLevel::Info,
                    format!(
                        "config: builder '{}' changed{}",
                        cfg.name,
                        match (s.phase.has_instance(), boot_changed) {
                            (true, true) =>
                                "; the running instance is kept, the new boot settings apply from its next boot",
                            (false, true) =>
                                "; its boot settings changed, so its failure memory is cleared",
                            _ => "",
                        }
                    ),
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
                    log(
                        out,
                        LogLevel::Info,
                        format!("config: builder '{}' removed", s.cfg.name),
                    );
                    // Nobody waits on a builder without an instance, but answer any anyway.
                    let status = self.status_of_slot(&s, now);
                    answer_waiters(std::mem::take(&mut s.waiters), &status, out);
                    continue;
                }
                Phase::Booting { .. } | Phase::Up if s.leases == 0 => {
                    log(
                        out,
                        LogLevel::Info,
                        format!("config: builder '{}' removed: stopping it", s.cfg.name),
                    );
                    s.removed = true;
                    s.phase = Phase::Stopping { failed: false };
                    out.push(Action::Stop {
                        builder: s.cfg.name.clone(),
                        generation: s.generation,
                    });
                }
                Phase::Up | Phase::Draining(_) => {
                    log(
                        out,
                        LogLevel::Info,
                        format!(
                            "config: builder '{}' removed: draining {} lease(s), then stopping it",
                            s.cfg.name, s.leases
                        ),
                    );
                    s.removed = true;
                    s.phase = Phase::Draining(DrainReason::Removed);
                }
                Phase::Booting { .. } | Phase::Stopping { .. } => {
                    log(
                        out,
                        LogLevel::Info,
                        format!("config: builder '{}' removed: stopping it", s.cfg.name),
                    );
                    s.removed = true;
                }
            }
            slots.push(s);
        }
        self.slots = slots;
    }
}
