//! What `status` shows of a builder (state, port, times, leases, the last failure in wall-clock
//! time), the expected boot time (the median of recent boots), and answering `wait-ready`
//! waiters with it.

use std::time::{Duration, Instant, UNIX_EPOCH};

use super::{Action, ConnId, Machine, Phase, Slot, ms};
use crate::supervisor::proto::{BuilderStatus, Failure, Response};

/// The boot-time guess before a builder has ever booted (capped by its boot timeout). Small VMs
/// and command builders boot in seconds; guessing low lets the hook wait briefly for the first
/// boot instead of paying a whole daemon poll, and a slow builder only costs a few short waits
/// before the hook gives up on the guess (`lazy::wait_budget`).
pub const DEFAULT_EXPECTED_BOOT: Duration = Duration::from_secs(8);

/// Answers each of `waiters` (`wait-ready` connections) with `status`.
pub(super) fn answer_waiters(
    waiters: Vec<(ConnId, Instant)>,
    status: &BuilderStatus,
    out: &mut Vec<Action>,
) {
    for (conn, _) in waiters {
        out.push(Action::Reply {
            conn,
            response: Response::Builder {
                status: status.clone(),
            },
        });
    }
}

impl Slot {
    pub(super) fn expected_boot(&self) -> Duration {
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
}

impl Machine {
    /// What is worth a warning in the configuration the machine runs: a boot-timeout below
    /// the boot time the builder has been measured to take (the median of its recent boots),
    /// so that its boots will time out.
    pub fn config_warnings(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| !s.removed && !s.history.is_empty())
            .filter(|s| s.expected_boot() > s.cfg.boot_timeout)
            .map(|s| {
                format!(
                    "builder '{}': boot-timeout ({}) is below the {} its recent boots took (the \
                     median of the last {}): its boots will time out; raise boot-timeout",
                    s.cfg.name,
                    humantime::format_duration(s.cfg.boot_timeout),
                    humantime::format_duration(Duration::from_secs(
                        s.expected_boot().as_millis().div_ceil(1000) as u64
                    )),
                    s.history.len()
                )
            })
            .collect()
    }

    /// The status of every lazy builder, in configuration order, then of every always-on
    /// builder with a warm connection.
    pub fn status(&self, now: Instant) -> Vec<BuilderStatus> {
        let mut all: Vec<BuilderStatus> = (0..self.slots.len())
            .map(|i| self.slot_status(i, now))
            .collect();
        all.extend(self.always_on_status(now));
        all
    }

    pub(super) fn slot_status(&self, i: usize, now: Instant) -> BuilderStatus {
        self.status_of_slot(&self.slots[i], now)
    }

    pub(super) fn status_of_slot(&self, s: &Slot, now: Instant) -> BuilderStatus {
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
            boots_ok: s.boots_ok,
            boots_failed: s.boots_failed,
            boot_settings_outdated: s.phase.has_instance()
                && s.booted_with.is_some_and(|f| f != s.cfg.boot_fingerprint),
            last_failure,
            nix_version: up.map(|u| u.nix_version.clone()),
            warm: self.warm_status(&s.cfg.name, true, now),
        }
    }

    /// Answer every waiter of builder `i` with its status now.
    pub(super) fn wake_waiters(&mut self, i: usize, now: Instant, out: &mut Vec<Action>) {
        if self.slots[i].waiters.is_empty() {
            return;
        }
        let status = self.slot_status(i, now);
        answer_waiters(std::mem::take(&mut self.slots[i].waiters), &status, out);
    }
}
