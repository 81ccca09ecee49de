//! The hook's side of the supervisor: lazy builders, what the user sees of their boots, and
//! warm sessions.
//!
//! Owns the hook's connection to the supervisor (started on first need; every lease this hook
//! takes lives as long as that connection), the requests a `try` makes of it (status, lease,
//! boot, wait for ready, report a failure), the "booting builder …" (or "restoring builder …")
//! activity in the user's progress display and the one line that says a watched boot failed;
//! and asking for a warm session ([`Lazy::lease_session`]) on a connection of its own, never
//! waiting on the pool: a supervisor that does not answer at once, or is not there, means
//! "connect directly" (one that is not there is started in the background, and told to warm
//! up, for the next build). It never decides: what to ask, and how long to wait for a boot
//! (never longer than the daemon's `build-poll-interval`, never longer than [`MAX_WAIT`]), is
//! `hook/plan.rs`'s.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use hook_protocol::log::{Message, Verbosity, activity};

use crate::config::Builder;
use crate::logging::{self, Activity};
use crate::store::warm::WarmSession;
use crate::supervisor::client::{Client, ClientError, SessionAnswer, Verdict};
use crate::supervisor::proto::{BootKind, BuilderStatus, SessionSpec, State};

/// How long a warm-session request may take before the hook connects directly (the
/// supervisor answers at once; this only guards one that hangs).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a hook that started a supervisor for warm connections waits, at its end, for that
/// supervisor to have heard what to warm up (it usually has, long before).
pub const WARM_UP_GRACE: Duration = Duration::from_millis(500);

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
    progress: Option<(String, Activity)>,
    /// Builders this hook saw booting: if such a boot fails, the user is told once, why.
    watching: HashSet<String>,
    /// Starting a supervisor and telling it what to warm up, in the background.
    warming: Option<tokio::task::JoinHandle<()>>,
}

impl Lazy {
    /// Connects on first use, to the supervisor of `state_dir` (started with `config` if none
    /// answers).
    pub fn new(state_dir: PathBuf, config: Option<PathBuf>) -> Self {
        Lazy {
            state_dir,
            config,
            client: None,
            progress: None,
            watching: HashSet::new(),
            warming: None,
        }
    }

    /// A warm session to the builder `spec` describes, if the supervisor has one ready. Asked
    /// on a connection of its own (a lease this hook holds is never at stake) and never
    /// waited for: any failure is "no". With no supervisor at all, one is started in the
    /// background and asked to warm up (see [`Lazy::settle`]).
    pub async fn lease_session(&mut self, spec: &SessionSpec) -> Option<WarmSession> {
        let asked = async {
            let mut c = Client::connect(&self.state_dir).await?;
            c.lease_session(spec, SESSION_TIMEOUT).await
        };
        match tokio::time::timeout(SESSION_TIMEOUT, asked).await {
            Ok(Ok(SessionAnswer::Session(s))) => {
                tracing::debug!(builder = %spec.builder, "warm session handed over");
                Some(s)
            }
            Ok(Ok(SessionAnswer::None(reason))) => {
                tracing::debug!(builder = %spec.builder, "no warm session: {reason}");
                None
            }
            Ok(Err(e)) if e.nobody_there() => {
                tracing::debug!(builder = %spec.builder, "no supervisor for warm sessions ({e}); starting one");
                self.warm_up_in_background(spec.clone());
                None
            }
            Ok(Err(e)) => {
                tracing::debug!(builder = %spec.builder, "no warm session: {e}");
                None
            }
            Err(_) => {
                tracing::debug!(builder = %spec.builder, "no warm session: the supervisor did not answer in time");
                None
            }
        }
    }

    fn warm_up_in_background(&mut self, spec: SessionSpec) {
        if self.warming.is_some() {
            return;
        }
        let (state_dir, config) = (self.state_dir.clone(), self.config.clone());
        self.warming = Some(tokio::spawn(async move {
            let r = async {
                let mut c = Client::connect_or_start(&state_dir, config.as_deref()).await?;
                c.warm(&spec).await
            };
            if let Err(e) = r.await {
                tracing::debug!(builder = %spec.builder, "cannot warm up a connection: {e}");
            }
        }));
    }

    /// Gives a supervisor started by [`Lazy::lease_session`] up to [`WARM_UP_GRACE`] to hear
    /// what to warm up, so that the next build finds the connection warm.
    pub async fn settle(&mut self) {
        if let Some(task) = self.warming.take()
            && !task.is_finished()
        {
            let _ = tokio::time::timeout(WARM_UP_GRACE, task).await;
        }
    }

    async fn client(&mut self) -> Result<&mut Client, ClientError> {
        if self.client.is_none() {
            let c = Client::connect_or_start(&self.state_dir, self.config.as_deref()).await?;
            self.client = Some(c);
        }
        Ok(self.client.as_mut().expect("just set"))
    }

    /// The connection is unusable: say so, drop it (the next request reconnects), and give the
    /// reason for the plan.
    fn broke(&mut self, e: &ClientError) -> String {
        tracing::warn!("lazy builders unavailable: {e}");
        self.client = None;
        e.to_string()
    }

    /// Every lazy builder's state, or why the supervisor cannot be asked.
    pub async fn refresh(&mut self) -> Result<Vec<BuilderStatus>, String> {
        let r = match self.client().await {
            Ok(c) => c.status().await,
            Err(e) => Err(e),
        };
        match r {
            Ok(list) => {
                let watched: Vec<&BuilderStatus> = list
                    .iter()
                    .filter(|s| self.watching.contains(&s.name))
                    .collect();
                for st in watched {
                    self.note(st);
                }
                Ok(list)
            }
            Err(e) => Err(self.broke(&e)),
        }
    }

    /// Asks for a lease on an up builder. A granted lease ends the boot activity.
    pub async fn lease(&mut self, b: &Builder) -> Result<Verdict, String> {
        let verdict = match self.client().await {
            Ok(c) => c.lease(&b.name).await,
            Err(e) => Err(e),
        };
        if let Ok(Verdict::Granted(_)) = verdict {
            self.stop_progress();
        }
        self.verdict(b, verdict)
    }

    /// Asks for a boot of a down builder.
    pub async fn boot(&mut self, b: &Builder) -> Result<Verdict, String> {
        let verdict = match self.client().await {
            Ok(c) => c.boot(&b.name, false).await,
            Err(e) => Err(e),
        };
        self.verdict(b, verdict)
    }

    fn verdict(
        &mut self,
        b: &Builder,
        verdict: Result<Verdict, ClientError>,
    ) -> Result<Verdict, String> {
        match verdict {
            Ok(v) => {
                if let Verdict::Refused { reason, .. } = &v {
                    tracing::debug!(builder = %b.name, "supervisor refused: {reason}");
                }
                Ok(v)
            }
            Err(e) => Err(self.broke(&e)),
        }
    }

    /// Waits up to `within` for a booting builder to be up or failed; a failed boot is reported
    /// (see [`note`](Self::note)).
    pub async fn wait_ready(
        &mut self,
        b: &Builder,
        within: Duration,
    ) -> Result<BuilderStatus, String> {
        let r = match self.client().await {
            Ok(c) => c.wait_ready(&b.name, within).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(s) => {
                if s.state == State::Failed {
                    self.note(&s);
                }
                Ok(s)
            }
            Err(e) => Err(self.broke(&e)),
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

    /// Shows (or refreshes) "booting builder NAME (N s, about M s expected)", or "restoring
    /// builder NAME (about 0.7 s expected)", in the progress display, for a builder that is
    /// booting (anything else shows nothing).
    pub fn show_progress(&mut self, s: &BuilderStatus) {
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

fn progress_text(s: &BuilderStatus) -> String {
    let secs = |ms: u64| (ms + 500) / 1000;
    let elapsed = s.booting_ms.unwrap_or(0);
    if s.snapshot
        .as_ref()
        .is_some_and(|k| k.boot_kind == BootKind::Restore)
    {
        // Restores take under a second: tenths, and no "0 s" elapsed.
        let tenths = |ms: u64| format!("{:.1} s", ms as f64 / 1000.0);
        let expected = s
            .expected_boot_ms
            .map(|e| format!("about {} expected", tenths(e)));
        let parts: Vec<String> = (elapsed >= 1000)
            .then(|| tenths(elapsed))
            .into_iter()
            .chain(expected)
            .collect();
        return if parts.is_empty() {
            format!("restoring builder '{}'", s.name)
        } else {
            format!("restoring builder '{}' ({})", s.name, parts.join(", "))
        };
    }
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
            booting_ms: Some(elapsed),
            expected_boot_ms: expected,
            boots: 1,
            ..BuilderStatus::new("vm", State::Booting)
        }
    }

    #[test]
    fn the_wait_follows_the_poll_interval() {
        assert_eq!(wait_limit(5), Duration::from_secs(5));
        assert_eq!(wait_limit(2), Duration::from_secs(2));
        // Never 0 (Nix polls at least every second), never above MAX_WAIT.
        assert_eq!(wait_limit(0), Duration::from_secs(1));
        assert_eq!(wait_limit(3600), MAX_WAIT);
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
        let restoring = |elapsed, expected| {
            let mut s = booting(elapsed, expected);
            s.snapshot = Some(Box::new(crate::supervisor::proto::SnapshotStatus {
                boot_kind: BootKind::Restore,
                restorable: true,
                restored: 1,
                booted_cold: 1,
                note: None,
                files: None,
            }));
            s
        };
        assert_eq!(
            progress_text(&restoring(300, Some(700))),
            "restoring builder 'vm' (about 0.7 s expected)"
        );
        assert_eq!(
            progress_text(&restoring(1400, Some(700))),
            "restoring builder 'vm' (1.4 s, about 0.7 s expected)"
        );
        assert_eq!(progress_text(&restoring(0, None)), "restoring builder 'vm'");
    }
}
