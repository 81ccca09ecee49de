//! Everything that happens because time passed: idle stops (from the last release, or from
//! "up" with a first-lease grace), `wait-ready` deadlines, a warm-up at readiness that took
//! too long (`warm.rs`), a settling config file that requests wait for (`reconfigure.rs`),
//! warm connections closing (keep-warm, or their lazy builder no longer up: `warm.rs`), the
//! auto-started supervisor's exit when quiet (never while a warm connection is open), the kill
//! once a shutdown's graceful stops took too long, and the one wake-up instant that covers
//! them all.

use std::time::{Duration, Instant};

use super::status::answer_waiters;
use super::{Action, LogLevel, Machine, Phase, Slot, log};

/// A freshly booted builder that nobody has leased yet is kept at least this long, whatever its
/// idle timeout: the hook that asked for the boot usually postponed and comes back only with
/// the daemon's next poll (`build-poll-interval`, 5 s by default). Without it, a builder whose
/// idle timeout is shorter than that is stopped before its first build and booted again.
pub const FIRST_LEASE_GRACE: Duration = Duration::from_secs(10);
/// After SIGTERM, how long graceful stops may take before instances are killed.
pub const SHUTDOWN_BOUND: Duration = Duration::from_secs(90);

impl Slot {
    pub(super) fn idle_stop_at(&self) -> Option<Instant> {
        match (self.phase, self.leases, self.cfg.idle_timeout) {
            (Phase::Up, 0, Some(t)) if !self.leased_since_up => {
                Some(self.idle_since + t.max(FIRST_LEASE_GRACE))
            }
            (Phase::Up, 0, Some(t)) => Some(self.idle_since + t),
            _ => None,
        }
    }
}

impl Machine {
    /// The earliest instant at which something is due (idle stop, waiter deadline, exit, the
    /// shutdown's kill).
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
            if let Some(w) = &s.warming {
                consider(w.due());
            }
        }
        if let Some(t) = self.pools.next_deadline() {
            consider(t);
        }
        if let Some(t) = self.exit_at() {
            consider(t.max(now));
        }
        if let Some(t) = self.kill_at {
            consider(t);
        }
        if let Some(t) = self.settle_deadline() {
            consider(t);
        }
        next
    }

    pub(super) fn exit_at(&self) -> Option<Instant> {
        if self.exited || self.shutting_down {
            return None;
        }
        let linger = self.settings.exit_after_idle?;
        if !self.clients.is_empty()
            || self.slots.iter().any(|s| s.phase.has_instance())
            || !self.pools.is_empty()
        {
            return None;
        }
        Some(self.quiet_since + linger)
    }

    /// Idle stops, waiter deadlines, a settling config file, exit, the shutdown's kill.
    pub(super) fn timers(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.settle_timer(now, out);
        // Before the waiters' deadlines: a warm-up never makes a waiter time out.
        self.warm_up_timers(now, out);
        for i in 0..self.slots.len() {
            if self.slots[i].idle_stop_at().is_some_and(|t| t <= now) {
                log(
                    out,
                    LogLevel::Info,
                    format!(
                        "builder '{}' has been idle for {}: stopping it",
                        self.slots[i].cfg.name,
                        humantime::format_duration(
                            self.slots[i].cfg.idle_timeout.unwrap_or_default()
                        )
                    ),
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
        self.warm_timers(now, out);
        let all_gone = !self.slots.iter().any(|s| s.phase.has_instance()) && self.pools.is_empty();
        if self.shutting_down && all_gone {
            self.exited = true;
            out.push(Action::Exit);
        } else if self.kill_at.is_some_and(|t| t <= now) {
            log(
                out,
                LogLevel::Warn,
                format!(
                    "builders did not stop within {}: killing them",
                    humantime::format_duration(SHUTDOWN_BOUND)
                ),
            );
            self.kill_all(out);
        } else if self.exit_at().is_some_and(|t| t <= now) {
            log(
                out,
                LogLevel::Info,
                "every builder is down and no client is connected: exiting",
            );
            self.exited = true;
            out.push(Action::Exit);
        }
    }
}
