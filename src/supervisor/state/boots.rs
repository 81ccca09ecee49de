//! Restore or cold boot (`snapshot = true`): which kind a builder's next boot is expected to
//! be (a restore when its last boot left a snapshot, else a cold boot that makes one; a plain
//! cold boot for every other builder), the kind of the boot under way (the backend's plan,
//! [`Event::BootPlanned`](super::Event::BootPlanned), corrects the guess as the boot starts),
//! a boot-time history per kind (a restore's expected time never comes from cold boots, nor a
//! cold boot's from restores), how many boots came up restored and how many cold, and the
//! last snapshot note.

use std::collections::VecDeque;
use std::time::Duration;

use super::{Action, BootHistory, BuilderConfig, HISTORY_LEN, LogLevel, Machine, Phase, Slot, log};
use crate::supervisor::proto::{BootKind, SnapshotStatus};

/// The restore-time guess before a builder was ever restored (capped by its boot timeout):
/// the tiny images of `examples/vm` restore in 0.5–0.7 s under TCG; a guess a little above
/// that lets the hook wait for the first restore instead of postponing on a cold boot's time.
pub const DEFAULT_EXPECTED_RESTORE: Duration = Duration::from_secs(1);

/// How an instance came up ([`Event::BootSucceeded`](super::Event::BootSucceeded)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CameUp {
    pub kind: BootKind,
    pub restorable: bool,
    pub note: Option<String>,
}

/// One builder's boot kinds.
#[derive(Clone, Debug)]
pub(super) struct Kinds {
    /// `snapshot = true`.
    snapshot: bool,
    /// The boot under way, or the one the current (or last) instance came up by.
    current: Option<BootKind>,
    /// What the next boot is expected to be.
    next: BootKind,
    /// Restore durations, newest last, in milliseconds.
    restores: VecDeque<u64>,
    /// Boots that came up restored, and cold.
    restored: u32,
    booted_cold: u32,
    note: Option<String>,
}

fn first_kind(snapshot: bool) -> BootKind {
    if snapshot {
        BootKind::Make
    } else {
        BootKind::Cold
    }
}

impl Kinds {
    pub(super) fn new(snapshot: bool) -> Self {
        Kinds {
            snapshot,
            current: None,
            next: first_kind(snapshot),
            restores: VecDeque::new(),
            restored: 0,
            booted_cold: 0,
            note: None,
        }
    }

    /// What an earlier supervisor left in the boot history.
    pub(super) fn seed(&mut self, cfg: &BuilderConfig, h: &BootHistory) {
        if let Some(v) = h.restores.get(&cfg.name) {
            self.restores = v.iter().copied().collect();
            trim(&mut self.restores);
        }
        if cfg.snapshot && h.restorable.contains(&cfg.name) {
            self.next = BootKind::Restore;
        }
    }

    pub(super) fn persist(&self, name: &str, h: &mut BootHistory) {
        if !self.restores.is_empty() {
            h.restores
                .insert(name.to_owned(), self.restores.iter().copied().collect());
        }
        if self.snapshot && self.next == BootKind::Restore {
            h.restorable.insert(name.to_owned());
        }
    }

    /// A boot starts: it is expected to be the kind the last one left.
    pub(super) fn start(&mut self) -> BootKind {
        self.current = Some(self.next);
        self.next
    }

    /// The kind the expected boot time is about: the boot under way, else the next one.
    fn relevant(&self, booting: bool) -> BootKind {
        match (booting, self.current) {
            (true, Some(k)) => k,
            _ => self.next,
        }
    }

    /// Records how the instance came up; a cold boot's time goes to `cold` (the slot's
    /// history), a restore's to the restores.
    pub(super) fn came_up(&mut self, came: CameUp, took_ms: u64, cold: &mut VecDeque<u64>) {
        let queue = match came.kind {
            BootKind::Restore => {
                self.restored += 1;
                &mut self.restores
            }
            BootKind::Cold | BootKind::Make => {
                self.booted_cold += 1;
                cold
            }
        };
        queue.push_back(took_ms);
        trim(queue);
        self.current = Some(came.kind);
        self.next = if self.snapshot && came.restorable {
            BootKind::Restore
        } else {
            first_kind(self.snapshot)
        };
        self.note = came.note;
    }

    /// The configuration changed: a builder whose `snapshot` setting flipped starts over.
    pub(super) fn reconfigured(&mut self, snapshot: bool) {
        if snapshot != self.snapshot {
            self.snapshot = snapshot;
            self.next = first_kind(snapshot);
        }
    }

    /// What `status` shows: the kind of the instance's boot while there is an instance, else
    /// of the next boot.
    pub(super) fn status(&self, phase: Phase) -> Option<Box<SnapshotStatus>> {
        self.snapshot.then(|| {
            Box::new(SnapshotStatus {
                boot_kind: match self.current {
                    Some(k) if phase.has_instance() => k,
                    _ => self.next,
                },
                restorable: self.next == BootKind::Restore,
                restored: self.restored,
                booted_cold: self.booted_cold,
                note: self.note.clone(),
                files: None,
            })
        })
    }
}

fn trim(q: &mut VecDeque<u64>) {
    while q.len() > HISTORY_LEN {
        q.pop_front();
    }
}

fn median(q: &VecDeque<u64>) -> Option<Duration> {
    if q.is_empty() {
        return None;
    }
    let mut v: Vec<u64> = q.iter().copied().collect();
    v.sort_unstable();
    let n = v.len();
    Some(Duration::from_millis(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }))
}

impl Slot {
    /// The expected duration of the boot under way, or of the next one: the median of recent
    /// boots of its kind, else a guess for that kind (capped by the boot timeout).
    pub(super) fn expected_boot(&self) -> Duration {
        let booting = matches!(self.phase, Phase::Booting { .. });
        match self.kinds.relevant(booting) {
            BootKind::Restore => median(&self.kinds.restores)
                .unwrap_or_else(|| DEFAULT_EXPECTED_RESTORE.min(self.cfg.boot_timeout)),
            BootKind::Cold | BootKind::Make => median(&self.history)
                .unwrap_or_else(|| super::DEFAULT_EXPECTED_BOOT.min(self.cfg.boot_timeout)),
        }
    }

    pub(super) fn snapshot_status(&self) -> Option<Box<SnapshotStatus>> {
        self.kinds.status(self.phase)
    }
}

/// "booting" or "restoring", for log lines and progress.
pub(super) fn verb(kind: BootKind) -> &'static str {
    match kind {
        BootKind::Restore => "restoring",
        BootKind::Cold | BootKind::Make => "booting",
    }
}

/// What the boot log line adds for a snapshot builder's boot.
pub(super) fn expected_text(kind: BootKind, expected: Duration) -> String {
    match kind {
        BootKind::Cold => String::new(),
        BootKind::Make => ", cold, to make a snapshot".to_owned(),
        BootKind::Restore => format!(", about {:.1} s expected", expected.as_secs_f64()),
    }
}

/// What the "is up" line adds: how it came up.
pub(super) fn came_up_how(came: &CameUp) -> String {
    match (came.kind, came.restorable) {
        (BootKind::Cold, _) => String::new(),
        (BootKind::Restore, _) => ", restored from its snapshot".to_owned(),
        (BootKind::Make, true) => ", booted cold and snapshotted".to_owned(),
        (BootKind::Make, false) => format!(
            ", booted cold without a snapshot ({})",
            came.note.as_deref().unwrap_or("no reason given")
        ),
    }
}

impl Machine {
    /// The backend's plan for the boot under way: it replaces the guess.
    pub(super) fn boot_planned(
        &mut self,
        i: usize,
        kind: BootKind,
        note: Option<String>,
        out: &mut Vec<Action>,
    ) {
        let s = &mut self.slots[i];
        if !matches!(s.phase, Phase::Booting { .. }) {
            return;
        }
        let guessed = s.kinds.current.replace(kind);
        if kind == BootKind::Make || note.is_some() {
            s.kinds.note = note.clone();
        }
        if guessed != Some(kind) {
            let expected = s.expected_boot();
            log(
                out,
                LogLevel::Info,
                format!(
                    "builder '{}': {} after all{}{}",
                    s.cfg.name,
                    match kind {
                        BootKind::Restore => "a restore",
                        BootKind::Make => "a cold boot that makes a snapshot",
                        BootKind::Cold => "a cold boot",
                    },
                    match kind {
                        BootKind::Restore => expected_text(kind, expected),
                        _ => String::new(),
                    },
                    note.map(|n| format!(": {n}")).unwrap_or_default()
                ),
            );
        }
    }
}
