//! A builder's life: boot (a new generation each time), up, stop, gone; failures remembered
//! with an exponential backoff (`crate::backoff`) unless the builder ran well for a while;
//! events of an older generation ignored; the boot-time history; and the supervisor's shutdown
//! (graceful first, killed on a second signal or after [`SHUTDOWN_BOUND`]).

use std::time::{Duration, Instant};

use super::{
    Action, Generation, LastFailure, LogLevel, Machine, Phase, SHUTDOWN_BOUND, Slot, UpInfo, log,
    ms,
};
use crate::backoff::backoff;
use crate::supervisor::proto::SessionSpec;

/// A builder up at least this long before it failed is rebooted without a backoff.
pub const STABLE_UPTIME: Duration = Duration::from_secs(60);
/// How many boot durations are kept per builder for
/// [`BuilderStatus::expected_boot_ms`](crate::supervisor::proto::BuilderStatus::expected_boot_ms).
pub const HISTORY_LEN: usize = 5;

impl LastFailure {
    pub(super) fn retry_at(&self) -> Instant {
        self.at + backoff(self.consecutive)
    }
}

impl Slot {
    pub(super) fn backing_off(&self, now: Instant) -> Option<&LastFailure> {
        self.failure
            .as_ref()
            .filter(|f| f.consecutive > 0 && f.retry_at() > now)
    }
}

impl Machine {
    /// The slot index if `generation` is the builder's current instance and it has one.
    pub(super) fn current(
        &self,
        builder: &str,
        generation: Generation,
        out: &mut Vec<Action>,
    ) -> Option<usize> {
        let i = self.slot_index(builder)?;
        let s = &self.slots[i];
        if s.generation == generation && s.phase.has_instance() {
            Some(i)
        } else {
            log(
                out,
                LogLevel::Debug,
                format!("ignoring a stale event of builder '{builder}' instance {generation}"),
            );
            None
        }
    }

    /// Ask the runtime to stop builder `i`'s instance. Callers check the lease rule.
    pub(super) fn stop(&mut self, i: usize, failed: bool, out: &mut Vec<Action>) {
        let s = &mut self.slots[i];
        s.phase = Phase::Stopping { failed };
        // A warm-up under way ends with the instance (its pool closes: `warm.rs`).
        s.warming = None;
        out.push(Action::Stop {
            builder: s.cfg.name.clone(),
            generation: s.generation,
        });
    }

    pub(super) fn start_boot(&mut self, i: usize, now: Instant, out: &mut Vec<Action>) {
        self.last_generation += 1;
        let s = &mut self.slots[i];
        s.generation = self.last_generation;
        s.boots += 1;
        s.booted_with = Some(s.cfg.boot_fingerprint);
        s.phase = Phase::Booting { since: now };
        s.up = None;
        s.warming = None;
        s.reboot_after_stop = false;
        let kind = s.kinds.start();
        log(
            out,
            LogLevel::Info,
            format!(
                "{} builder '{}' (boot {}{})",
                super::boots::verb(kind),
                s.cfg.name,
                s.boots,
                super::boots::expected_text(kind, s.expected_boot())
            ),
        );
        out.push(Action::StartBoot {
            builder: s.cfg.name.clone(),
            generation: s.generation,
        });
    }

    pub(super) fn record_failure(
        &mut self,
        i: usize,
        cause: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
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
        log(
            out,
            LogLevel::Warn,
            format!(
                "builder '{}' failed ({consecutive} in a row, next boot in {}s at the earliest): {cause}",
                s.cfg.name,
                backoff(consecutive).as_secs()
            ),
        );
        s.failure = Some(LastFailure {
            cause,
            at: now,
            consecutive,
        });
    }

    /// The instance answered its readiness check. With a warm spec its first warm session is
    /// opened first (`warm.rs`: [`Machine::warm_up`]); it is up once that is ready, failed, or
    /// [`WARM_UP_BOUND`](super::WARM_UP_BOUND) passed.
    pub(super) fn boot_succeeded(
        &mut self,
        i: usize,
        up: super::warm::Answered,
        warm: Option<SessionSpec>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if !matches!(self.slots[i].phase, Phase::Booting { .. }) {
            // A stop raced with the end of the boot; the stop's own event follows.
            return;
        }
        match warm {
            Some(spec) if spec.keep_warm_ms > 0 && !self.shutting_down => {
                self.warm_up(i, spec, up, now, out)
            }
            _ => self.came_up(i, up, None, now, out),
        }
    }

    /// Builder `i` is up (`warmed`: how its warm-up at readiness went, if it had one).
    pub(super) fn came_up(
        &mut self,
        i: usize,
        up: super::warm::Answered,
        warmed: Option<String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let super::warm::Answered {
            port,
            nix_version,
            took,
            came,
        } = up;
        let s = &mut self.slots[i];
        log(
            out,
            LogLevel::Info,
            format!(
                "builder '{}' is up after {:.1}s{} (port {port}, {nix_version}){}",
                s.cfg.name,
                took.as_secs_f64(),
                super::boots::came_up_how(&came),
                warmed.map(|w| format!("; {w}")).unwrap_or_default()
            ),
        );
        s.phase = Phase::Up;
        s.boots_ok += 1;
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
        s.kinds.came_up(came, ms(took), &mut s.history);
        out.push(Action::SaveHistory);
        self.wake_waiters(i, now, out);
    }

    pub(super) fn instance_gone(
        &mut self,
        i: usize,
        how: Gone,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let phase = self.slots[i].phase;
        let name = self.slots[i].cfg.name.clone();
        let mut failed = match phase {
            Phase::Stopping { failed } => failed,
            _ => false,
        };
        match how {
            Gone::BootFailed(cause) => {
                self.slots[i].boots_failed += 1;
                self.record_failure(i, cause, now, out);
                failed = true;
            }
            Gone::Exited(report) if !matches!(phase, Phase::Stopping { .. }) => {
                let what = if matches!(phase, Phase::Booting { .. }) {
                    self.slots[i].boots_failed += 1;
                    "exited during boot"
                } else {
                    "exited on its own"
                };
                self.record_failure(i, format!("{what}: {report}"), now, out);
                failed = true;
            }
            Gone::Exited(report) | Gone::Stopped(report) => {
                log(
                    out,
                    LogLevel::Info,
                    format!("builder '{name}' stopped: {report}"),
                );
            }
        }
        // The instance is gone: leases on it mean nothing any more.
        let dropped = self.slots[i].leases;
        if dropped > 0 {
            log(
                out,
                LogLevel::Warn,
                format!("builder '{name}' is gone while {dropped} lease(s) were held"),
            );
            for c in self.clients.values_mut() {
                c.leases.remove(&name);
            }
        }
        let s = &mut self.slots[i];
        s.leases = 0;
        s.up = None;
        s.warming = None;
        s.booted_with = None;
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
            log(
                out,
                LogLevel::Info,
                format!("builder '{name}' was removed from the config and is gone now"),
            );
            self.slots.remove(i);
        } else if reboot && !self.shutting_down && self.slots[i].backing_off(now).is_none() {
            self.start_boot(i, now, out);
        } else {
            self.wake_waiters(i, now, out);
        }
    }

    /// SIGTERM/SIGINT. The first stops every instance, leases or not (the exit follows once all
    /// are gone, or the kill at [`SHUTDOWN_BOUND`]); a second kills them now.
    pub(super) fn shutdown(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.shutting_down {
            log(
                out,
                LogLevel::Warn,
                "second signal: killing every builder now",
            );
            self.kill_all(out);
            return;
        }
        log(
            out,
            LogLevel::Info,
            "signal received: stopping every builder, then exiting",
        );
        log(out, LogLevel::Info, "shutting down: stopping every builder");
        self.shutting_down = true;
        self.kill_at = Some(now + SHUTDOWN_BOUND);
        // Sessions in use go on until they end (within the bound); nothing new is handed out.
        self.close_all_pools(now, out);
        for i in 0..self.slots.len() {
            self.slots[i].reboot_after_stop = false;
            match self.slots[i].phase {
                Phase::Booting { .. } | Phase::Up | Phase::Draining(_) => self.stop(i, false, out),
                _ => {}
            }
        }
    }

    /// Give up on graceful stops: the runtime kills every instance and exits.
    pub(super) fn kill_all(&mut self, out: &mut Vec<Action>) {
        self.exited = true;
        out.push(Action::KillAll);
    }
}

pub(super) enum Gone {
    BootFailed(String),
    Exited(String),
    Stopped(String),
}
