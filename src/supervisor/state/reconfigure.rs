//! A new configuration applied to the running machine: new builders appear down, a removed one
//! disappears at once without an instance or drains (never losing a lease) and disappears once
//! its instance is gone, a kept one takes its new settings at once and forgets its failures
//! only when its boot settings changed.

use std::collections::VecDeque;
use std::time::Instant;

use super::status::answer_waiters;
use super::{Action, BuilderConfig, DrainReason, LogLevel, Machine, Phase, Slot, log};

impl Machine {
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
