//! What clients ask, and the lease rules: boot (refused while shutting down, for a removed
//! builder, or during a failure's backoff unless forced), wait-ready, lease (only on an up
//! builder, within its max-jobs), release, report-failure (drains, then restarts), down
//! (drains, never stops a leased builder), an unknown builder's error; and a connection that
//! goes away releasing every lease it held.

use std::time::{Duration, Instant};

use super::{Action, ConnId, DrainReason, LogLevel, Machine, Phase, Slot, log, one_line};
use crate::supervisor::proto::{Request, Response};

/// The longest `wait-ready` a client may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 60);

impl Slot {
    /// Up again after a drain was called off; the idle timer restarts unless a lease is held.
    pub(super) fn undrain(&mut self, now: Instant) {
        self.phase = Phase::Up;
        if self.leases == 0 {
            self.idle_since = now;
        }
    }
}

impl Machine {
    pub(super) fn request(
        &mut self,
        conn: ConnId,
        req: Request,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        // A request on a connection we did not see open still counts as one.
        self.clients.entry(conn).or_default();
        let name = match req {
            Request::Status => {
                let builders = self.status(now);
                let response = Response::Status {
                    builders,
                    config_file: self.settings.config_file.clone(),
                    config_error: self.config_error.clone(),
                };
                return Self::reply(out, conn, response);
            }
            Request::LeaseSession { spec } => return self.warm_request(conn, spec, true, now, out),
            Request::Warm { spec } => return self.warm_request(conn, spec, false, now, out),
            ref req => match req {
                Request::Boot { builder, .. }
                | Request::WaitReady { builder, .. }
                | Request::Lease { builder }
                | Request::Release { builder }
                | Request::ReportFailure { builder, .. }
                | Request::Down { builder } => builder.clone(),
                _ => return,
            },
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
            Request::Status | Request::LeaseSession { .. } | Request::Warm { .. } => {}
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
                        self.record_failure(i, cause, now, out);
                        if self.slots[i].leases == 0 {
                            self.stop(i, true, out);
                        } else {
                            self.slots[i].phase = Phase::Draining(DrainReason::Failure);
                        }
                    }
                    Phase::Draining(DrainReason::Down) => {
                        self.record_failure(i, cause, now, out);
                        self.slots[i].phase = Phase::Draining(DrainReason::Failure);
                    }
                    // Already handled (a second report of the same incident), or about an
                    // instance that is gone: nothing to restart.
                    _ => log(
                        out,
                        LogLevel::Debug,
                        format!(
                            "builder '{name}': failure report ignored in state {:?}: {cause}",
                            self.slots[i].phase.state()
                        ),
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
                        log(
                            out,
                            LogLevel::Info,
                            format!(
                                "builder '{name}': down requested, draining {} lease(s)",
                                s.leases
                            ),
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

    pub(super) fn refuse(&self, i: usize, reason: String, now: Instant) -> Response {
        Response::Refused {
            reason,
            status: Some(self.slot_status(i, now)),
        }
    }

    pub(super) fn backoff_reason(&self, i: usize, now: Instant) -> Option<String> {
        let s = &self.slots[i];
        let f = s.backing_off(now)?;
        let left = f.retry_at().saturating_duration_since(now);
        Some(format!(
            "builder '{}' failed{} ({}); it is not booted again for another {}s \
             (`nix-lazy-builder up {}` boots it now)",
            s.cfg.name,
            if f.consecutive == 1 {
                String::new()
            } else {
                format!(" {} times in a row", f.consecutive)
            },
            f.cause,
            left.as_secs() + u64::from(left.subsec_nanos() > 0),
            s.cfg.name
        ))
    }

    pub(super) fn req_boot(
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
                log(
                    out,
                    LogLevel::Info,
                    format!(
                        "builder '{}': boot requested while draining, kept up",
                        s.cfg.name
                    ),
                );
                s.undrain(now);
            }
            Phase::Draining(DrainReason::Removed) => {} // refused above
            Phase::Draining(DrainReason::Failure) => {
                if force {
                    log(
                        out,
                        LogLevel::Info,
                        format!(
                            "builder '{}': forced up while draining after a failure, kept up",
                            s.cfg.name
                        ),
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

    pub(super) fn req_lease(
        &mut self,
        conn: ConnId,
        i: usize,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
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

    pub(super) fn client_gone(&mut self, conn: ConnId, now: Instant, out: &mut Vec<Action>) {
        let Some(info) = self.clients.remove(&conn) else {
            return;
        };
        for (name, n) in info.leases {
            if let Some(i) = self.slot_index(&name) {
                log(
                    out,
                    LogLevel::Info,
                    format!("a client went away holding {n} lease(s) on '{name}': released"),
                );
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
    pub(super) fn release_n(&mut self, i: usize, n: u32, now: Instant, out: &mut Vec<Action>) {
        let s = &mut self.slots[i];
        s.leases = s.leases.saturating_sub(n);
        if s.leases > 0 {
            return;
        }
        s.idle_since = now;
        if let Phase::Draining(reason) = s.phase {
            log(
                out,
                LogLevel::Info,
                format!(
                    "builder '{}': last lease released, stopping it ({})",
                    s.cfg.name,
                    match reason {
                        DrainReason::Down => "down was requested",
                        DrainReason::Failure => "restart after a reported failure",
                        DrainReason::Removed => "removed from the config",
                    }
                ),
            );
            self.stop(i, reason == DrainReason::Failure, out);
        }
    }
}
