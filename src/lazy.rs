//! The hook's side of lazy builders: what the supervisor says about them, turned into choices.
//!
//! Owns the hook's connection to the supervisor (started on first need; every lease this hook
//! takes lives as long as that connection), the per-`try` status refresh, leases, boot requests,
//! the bounded wait for a boot that is about to finish, and the "booting builder …" activity in
//! the user's progress display. It never blocks a `try` for longer than the daemon's
//! `build-poll-interval`, and never longer than [`MAX_WAIT`]: a boot further away than that is
//! answered with `# postpone`, and the daemon asks again.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use hook_protocol::log::{Message, Verbosity, activity};

use crate::config::Builder;
use crate::logging::{self, Activity};
use crate::select::Availability;
use crate::supervisor::client::{self, Client, ClientError, Verdict};
use crate::supervisor::proto::{BuilderStatus, State};

/// The longest a `try` ever waits for a boot to finish. A `# postpone` costs a whole
/// `build-poll-interval` (5 s by default) before the daemon asks again, so a boot that will be
/// done within that interval is better waited for: the build then starts the moment the
/// builder is ready instead of at the next poll ([`wait_limit`]). While the hook waits, its
/// daemon reads nothing else (other builds' logs queue in their pipes), so the wait is capped
/// here whatever the poll interval says. Measured on a TCG aarch64 VM that boots in 3.4–3.7 s
/// quiet and 4–5 s under load or on a supervisor's first (cold-cache) boot: with a 4 s limit
/// every boot over 4 s was postponed and its build started at the next poll, about 2 s after
/// the builder was ready (P7 1.9–2.1 s in those sessions, 0.4–0.5 s otherwise).
pub const MAX_WAIT: Duration = Duration::from_secs(5);

/// How long a `try` may wait for a boot, given the daemon's `build-poll-interval` in seconds:
/// the poll interval (Nix waits at least 1 s), capped at [`MAX_WAIT`].
pub fn wait_limit(build_poll_interval: u64) -> Duration {
    Duration::from_secs(build_poll_interval.max(1)).min(MAX_WAIT)
}

/// The supervisor as one hook process sees it.
pub struct Lazy {
    state_dir: PathBuf,
    config: Option<PathBuf>,
    client: Option<Client>,
    /// Why the supervisor cannot be reached, if it cannot.
    unavailable: Option<String>,
    statuses: HashMap<String, BuilderStatus>,
    progress: Option<(String, Activity)>,
    /// Builders this hook saw booting: if such a boot fails, the user is told once, why.
    watching: HashSet<String>,
    /// The longest wait for a boot in one `try` ([`wait_limit`]).
    wait_limit: Duration,
}

/// What to do after a lazy builder's verdict.
pub enum Next {
    /// Lease held: connect to this port.
    Use { port: Option<u16> },
    /// The builder became ready while we waited: choose again now.
    ChooseAgain,
    /// Not ready yet: reply `# postpone`.
    Postpone,
}

impl Lazy {
    /// `wait_limit`: see [`wait_limit`].
    pub fn new(state_dir: PathBuf, config: Option<PathBuf>, wait_limit: Duration) -> Self {
        Lazy {
            wait_limit,
            state_dir,
            config,
            client: None,
            unavailable: None,
            statuses: HashMap::new(),
            progress: None,
            watching: HashSet::new(),
        }
    }

    async fn client(&mut self) -> Result<&mut Client, ClientError> {
        if self.client.is_none() {
            let c = Client::connect_or_start(&self.state_dir, self.config.as_deref()).await?;
            self.client = Some(c);
        }
        Ok(self.client.as_mut().expect("just set"))
    }

    fn broke(&mut self, e: &ClientError) {
        tracing::warn!("lazy builders unavailable: {e}");
        self.unavailable = Some(e.to_string());
        self.client = None;
    }

    /// Fetches every lazy builder's state (once per `try`).
    pub async fn refresh(&mut self) {
        let r = match self.client().await {
            Ok(c) => c.status().await,
            Err(e) => Err(e),
        };
        match r {
            Ok(list) => {
                self.unavailable = None;
                self.statuses = list.into_iter().map(|s| (s.name.clone(), s)).collect();
                let seen: Vec<BuilderStatus> = self
                    .watching
                    .iter()
                    .filter_map(|n| self.statuses.get(n).cloned())
                    .collect();
                for st in &seen {
                    self.note(st);
                }
            }
            Err(e) => {
                self.broke(&e);
                self.statuses.clear();
            }
        }
    }

    /// How `select` should see a lazy builder now.
    pub fn availability(&self, b: &Builder) -> Availability {
        if let Some(why) = &self.unavailable {
            return Availability::BackingOff {
                cause: format!("the supervisor is unavailable: {why}"),
                retry_in: Duration::ZERO,
            };
        }
        match self.statuses.get(&b.name) {
            Some(s) => client::availability(s),
            None => Availability::BackingOff {
                cause: "the running supervisor does not know it (it reads another config file, \
                        or could not reload this one: see its log)"
                    .into(),
                retry_in: Duration::ZERO,
            },
        }
    }

    /// A lazy builder the choice fell on: lease it if it is up, boot it if it is down, and wait
    /// for it when it is moments away.
    pub async fn engage(&mut self, b: &Builder, boot: bool) -> Next {
        let name = b.name.clone();
        let verdict = match self.client().await {
            Ok(c) => {
                if boot {
                    c.boot(&name, false).await
                } else {
                    c.lease(&name).await
                }
            }
            Err(e) => Err(e),
        };
        let status = match verdict {
            Ok(Verdict::Granted(s)) if !boot => {
                self.stop_progress();
                return Next::Use { port: s.ssh_port };
            }
            Ok(Verdict::Granted(s)) => s,
            Ok(Verdict::Refused { reason, status }) => {
                tracing::debug!(builder = %name, "supervisor refused: {reason}");
                match status {
                    Some(s) => s,
                    None => return Next::Postpone,
                }
            }
            Err(e) => {
                self.broke(&e);
                return Next::Postpone;
            }
        };
        self.wait_if_close(status).await
    }

    /// A matching builder is booting: wait for it if it is about to be ready.
    pub async fn wait_for(&mut self, b: &Builder) -> Next {
        match self.statuses.get(&b.name).cloned() {
            Some(s) => self.wait_if_close(s).await,
            None => Next::Postpone,
        }
    }

    async fn wait_if_close(&mut self, status: BuilderStatus) -> Next {
        if status.state == State::Up {
            return Next::ChooseAgain;
        }
        // The boot is shown while the hook waits for it too, not only when it postpones.
        self.show_progress(&status);
        let Some(wait) = wait_budget(&status, self.wait_limit) else {
            return Next::Postpone;
        };
        let r = match self.client().await {
            Ok(c) => c.wait_ready(&status.name, wait).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(s) if s.state == State::Up => {
                self.statuses.insert(s.name.clone(), s);
                Next::ChooseAgain
            }
            Ok(s) if s.state == State::Failed => {
                // The boot failed while we waited: choose again now, so that this `try`
                // already reports the failure (or uses another builder) instead of
                // postponing it to the daemon's next poll.
                self.note(&s);
                self.statuses.insert(s.name.clone(), s);
                Next::ChooseAgain
            }
            Ok(s) => {
                self.show_progress(&s);
                self.statuses.insert(s.name.clone(), s);
                Next::Postpone
            }
            Err(e) => {
                self.broke(&e);
                Next::Postpone
            }
        }
    }

    /// Tells the supervisor a builder it called up could not be used, and gives back the lease
    /// this hook took on it (so it can be restarted).
    pub async fn report_failure(&mut self, b: &Builder, cause: &str) {
        let r = match self.client().await {
            Ok(c) => match c.release(&b.name).await {
                Ok(()) => c.report_failure(&b.name, cause).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            self.broke(&e);
        }
    }

    /// Follows a builder this hook saw booting: once it is up or failed it is no longer
    /// watched, and a failed boot is reported in one line that names the builder and the
    /// cause (the boot was shown as an activity; without this line the user would only see it
    /// vanish).
    fn note(&mut self, s: &BuilderStatus) {
        if !self.watching.contains(&s.name) || matches!(s.state, State::Booting) {
            return;
        }
        self.watching.remove(&s.name);
        if self
            .progress
            .as_ref()
            .is_some_and(|(text, _)| text.contains(&format!("'{}'", s.name)))
        {
            self.stop_progress();
        }
        if s.state == State::Failed
            && let Some(f) = &s.last_failure
        {
            logging::send(&Message::msg(
                Verbosity::Warn,
                format!(
                    "warning: lazy builder '{}' did not boot: {}",
                    s.name, f.cause
                ),
            ));
        }
    }

    /// Shows (or refreshes) "booting builder NAME (N s, about M s expected)" in the progress display.
    fn show_progress(&mut self, s: &BuilderStatus) {
        if s.state != State::Booting {
            return;
        }
        self.watching.insert(s.name.clone());
        let text = progress_text(s);
        if let Some((old, _)) = &self.progress
            && *old == text
        {
            return;
        }
        // Replace, not stack: the old activity stops when dropped.
        self.progress = None;
        let act = Activity::start(Verbosity::Info, activity::UNKNOWN, text.clone(), vec![]);
        self.progress = Some((text, act));
    }

    /// Ends the boot activity (before `# accept`, which nothing may interrupt).
    pub fn stop_progress(&mut self) {
        self.progress = None;
    }
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

fn progress_text(s: &BuilderStatus) -> String {
    let secs = |ms: u64| (ms + 500) / 1000;
    let elapsed = s.booting_ms.unwrap_or(0);
    match s.expected_boot_ms {
        Some(exp) => format!(
            "booting builder '{}' ({} s, about {} s expected)",
            s.name,
            secs(elapsed),
            secs(exp)
        ),
        None => format!("booting builder '{}' ({} s)", s.name, secs(elapsed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn booting(elapsed: u64, expected: Option<u64>) -> BuilderStatus {
        BuilderStatus {
            name: "vm".into(),
            state: State::Booting,
            ssh_port: None,
            booting_ms: Some(elapsed),
            expected_boot_ms: expected,
            uptime_ms: None,
            idle_stop_in_ms: None,
            leases: 0,
            boots: 1,
            last_failure: None,
            nix_version: None,
        }
    }

    #[test]
    fn waits_only_when_the_boot_is_close_or_overdue() {
        let l = wait_limit(5);
        assert_eq!(l, Duration::from_secs(5));
        assert_eq!(wait_budget(&booting(0, Some(7000)), l), None);
        assert_eq!(wait_budget(&booting(5000, Some(7000)), l), Some(l));
        assert_eq!(wait_budget(&booting(9000, Some(7000)), l), Some(l));
        assert_eq!(wait_budget(&booting(60_000, Some(7000)), l), None);
        assert_eq!(wait_budget(&booting(0, Some(2000)), l), Some(l));
        assert_eq!(wait_budget(&booting(1000, None), l), None);
        // A boot expected in 4.5 s is waited for at the default poll interval (a postpone would
        // cost 5 s), but not when the daemon polls every 2 s.
        assert_eq!(wait_budget(&booting(0, Some(4500)), l), Some(l));
        // Too close to the limit to bet on: 4.7 s + 10 % is over 5 s.
        assert_eq!(wait_budget(&booting(0, Some(4700)), l), None);
        assert_eq!(wait_budget(&booting(500, Some(4700)), l), Some(l));
        let short = wait_limit(2);
        assert_eq!(wait_budget(&booting(0, Some(4500)), short), None);
        assert_eq!(wait_budget(&booting(3000, Some(4500)), short), Some(short));
        // Never 0 (Nix polls at least every second), never above MAX_WAIT.
        assert_eq!(wait_limit(0), Duration::from_secs(1));
        assert_eq!(wait_limit(3600), MAX_WAIT);
        let mut up = booting(0, Some(1));
        up.state = State::Up;
        assert_eq!(wait_budget(&up, l), None);
    }

    #[test]
    fn progress_says_how_long() {
        assert_eq!(
            progress_text(&booting(4400, Some(7000))),
            "booting builder 'vm' (4 s, about 7 s expected)"
        );
        assert_eq!(
            progress_text(&booting(600, None)),
            "booting builder 'vm' (1 s)"
        );
    }
}
