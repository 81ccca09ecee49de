//! Restore or cold boot: the kind each boot is expected to be, per-kind history and counts,
//! the backend's plan correcting the guess, and one restore for many hooks.

use super::*;
use crate::supervisor::proto::{BootKind, SnapshotStatus};

fn snap(name: &str) -> BuilderConfig {
    let mut c = cfg(name, 2, Some(60));
    c.snapshot = true;
    c
}

impl T {
    fn came_up(
        &mut self,
        name: &str,
        took_ms: u64,
        kind: BootKind,
        restorable: bool,
    ) -> Vec<Action> {
        let generation = self.generation(name);
        self.ev(Event::BootSucceeded {
            builder: name.into(),
            generation,
            port: 2222,
            nix_version: "nix-store (Nix) 2.8.0".into(),
            took: Duration::from_millis(took_ms),
            kind,
            restorable,
            note: (kind != BootKind::Restore).then(|| "there is no snapshot yet".to_owned()),
            warm: None,
        })
    }

    fn planned(&mut self, name: &str, kind: BootKind, note: Option<&str>) -> Vec<Action> {
        let generation = self.generation(name);
        self.ev(Event::BootPlanned {
            builder: name.into(),
            generation,
            kind,
            note: note.map(str::to_owned),
        })
    }

    fn snapshot(&self, name: &str) -> SnapshotStatus {
        *self.status(name).snapshot.expect("a snapshot builder")
    }

    /// Stops an up builder (no leases) and waits for the stop.
    fn stop_it(&mut self, name: &str) {
        self.req(
            1,
            Request::Down {
                builder: name.into(),
            },
        );
        assert_eq!(self.status(name).state, State::Stopping);
        self.stopped(name);
        assert_eq!(self.status(name).state, State::Down);
    }
}

fn logged_line(out: &[Action], starts: &str) -> Option<String> {
    out.iter().find_map(|a| match a {
        Action::Log { message, .. } if message.starts_with(starts) => Some(message.clone()),
        _ => None,
    })
}

/// The first boot makes the snapshot; the next one is expected to restore, with a restore's
/// time (a guess of 1 s before the first restore), not the cold boot's 5 s: the hook waits for
/// it instead of postponing. Cold and restore times are kept apart, and counted apart.
#[test]
fn after_a_snapshot_the_next_boot_expects_a_restore() {
    let mut t = T::new(vec![snap("vm"), cfg("plain", 1, None)], None);
    assert_eq!(t.status("plain").snapshot, None);
    let s = t.snapshot("vm");
    assert_eq!((s.boot_kind, s.restorable), (BootKind::Make, false));
    assert_eq!(t.status("vm").expected_boot_ms, Some(8_000));

    let out = t.boot(1, "vm");
    assert!(has_start(&out, "vm"));
    assert_eq!(
        logged_line(&out, "booting builder 'vm'").as_deref(),
        Some("booting builder 'vm' (boot 1, cold, to make a snapshot)")
    );
    let out = t.came_up("vm", 5_000, BootKind::Make, true);
    assert!(out.contains(&Action::SaveHistory));
    assert!(
        logged_line(
            &out,
            "builder 'vm' is up after 5.0s, booted cold and snapshotted"
        )
        .is_some(),
        "{out:?}"
    );
    let s = t.snapshot("vm");
    assert_eq!(s.boot_kind, BootKind::Make, "up: how it came up");
    assert!(s.restorable);
    assert_eq!((s.restored, s.booted_cold), (0, 1));
    assert_eq!(s.note.as_deref(), Some("there is no snapshot yet"));
    // While up, the expected time is the next boot's: a restore.
    assert_eq!(t.status("vm").expected_boot_ms, Some(1_000));
    t.stop_it("vm");
    assert_eq!(t.snapshot("vm").boot_kind, BootKind::Restore);

    let out = t.boot(1, "vm");
    assert_eq!(
        logged_line(&out, "restoring builder 'vm'").as_deref(),
        Some("restoring builder 'vm' (boot 2, about 1.0 s expected)")
    );
    let st = t.status("vm");
    assert_eq!(st.state, State::Booting);
    assert_eq!(st.expected_boot_ms, Some(1_000));
    assert_eq!(st.snapshot.as_ref().unwrap().boot_kind, BootKind::Restore);
    t.came_up("vm", 700, BootKind::Restore, true);
    let s = t.snapshot("vm");
    assert_eq!(
        (s.boot_kind, s.restored, s.booted_cold),
        (BootKind::Restore, 1, 1)
    );
    assert_eq!(s.note, None);
    assert_eq!(t.status("vm").expected_boot_ms, Some(700));
    t.stop_it("vm");
    t.boot(1, "vm");
    t.came_up("vm", 900, BootKind::Restore, true);
    assert_eq!(t.status("vm").expected_boot_ms, Some(800));
    assert_eq!(t.status("vm").boots, 3);

    let h = t.m.history();
    assert_eq!(h.builders["vm"], [5_000]);
    assert_eq!(h.restores["vm"], [700, 900]);
    assert!(h.restorable.contains("vm") && !h.restorable.contains("plain"));
    assert!(!h.restores.contains_key("plain"));
    let json = serde_json::to_string(&h).unwrap();
    assert_eq!(serde_json::from_str::<BootHistory>(&json).unwrap(), h);
    // A history written before restores existed still reads.
    let old: BootHistory = serde_json::from_str(r#"{"builders":{"vm":[4000]}}"#).unwrap();
    assert!(old.restores.is_empty() && old.restorable.is_empty());

    // A new supervisor expects a restore at once, with the restore times it was left.
    let t2 = T::with_history(vec![snap("vm")], None, &h);
    let s = t2.snapshot("vm");
    assert_eq!((s.boot_kind, s.restorable), (BootKind::Restore, true));
    assert_eq!(t2.status("vm").expected_boot_ms, Some(800));
    // …but not for a builder that is no longer `snapshot = true`.
    let t3 = T::with_history(vec![cfg("vm", 1, None)], None, &h);
    assert_eq!(t3.status("vm").snapshot, None);
    assert_eq!(t3.status("vm").expected_boot_ms, Some(5_000));
    assert!(t3.m.history().restorable.is_empty());
}

/// The guess is corrected by the backend's plan as soon as the boot starts; a stale plan
/// changes nothing.
#[test]
fn the_plan_corrects_the_guess() {
    let mut h = BootHistory::default();
    h.builders.insert("vm".into(), vec![6_000]);
    h.restores.insert("vm".into(), vec![600]);
    h.restorable.insert("vm".into());
    let mut t = T::with_history(vec![snap("vm")], None, &h);
    t.boot(1, "vm");
    assert_eq!(t.status("vm").expected_boot_ms, Some(600));
    let old = t.generation("vm");
    let why = "the configuration changed (memory 1024 → 2048 MiB)";
    let out = t.planned("vm", BootKind::Make, Some(why));
    assert_eq!(
        logged_line(&out, "builder 'vm':").as_deref(),
        Some(
            "builder 'vm': a cold boot that makes a snapshot after all: the configuration changed (memory 1024 → 2048 MiB)"
        )
    );
    let st = t.status("vm");
    assert_eq!(st.expected_boot_ms, Some(6_000));
    let s = st.snapshot.unwrap();
    assert_eq!(s.boot_kind, BootKind::Make);
    assert_eq!(s.note.as_deref(), Some(why));
    // The plan that matches the guess logs nothing.
    let out = t.planned("vm", BootKind::Make, Some(why));
    assert!(logged_line(&out, "builder 'vm':").is_none(), "{out:?}");
    // The boot fails; the next one is a new generation, and the old plan is stale.
    t.fail("vm", "boot timed out");
    t.now += 60 * S;
    t.boot(1, "vm");
    assert_ne!(t.generation("vm"), old);
    t.ev(Event::BootPlanned {
        builder: "vm".into(),
        generation: old,
        kind: BootKind::Cold,
        note: None,
    });
    assert_ne!(
        t.snapshot("vm").boot_kind,
        BootKind::Cold,
        "a stale plan was applied"
    );
    // A restore that failed and fell back to a cold boot counts as cold, with its time.
    t.planned("vm", BootKind::Restore, None);
    t.came_up("vm", 7_000, BootKind::Make, true);
    let s = t.snapshot("vm");
    assert_eq!((s.restored, s.booted_cold), (0, 1));
    assert_eq!(t.m.history().builders["vm"], [6_000, 7_000]);
    assert_eq!(t.m.history().restores["vm"], [600]);
}

/// A cold boot that could not make its snapshot leaves the next boot a cold one that tries
/// again, and says why.
#[test]
fn no_snapshot_made_means_the_next_boot_makes_one() {
    let mut t = T::new(vec![snap("vm")], None);
    t.boot(1, "vm");
    let generation = t.generation("vm");
    let note = "there is no snapshot yet; cannot make one: the guest agent did not answer";
    let out = t.ev(Event::BootSucceeded {
        builder: "vm".into(),
        generation,
        port: 2222,
        nix_version: "x".into(),
        took: 4 * S,
        kind: BootKind::Make,
        restorable: false,
        note: Some(note.into()),
        warm: None,
    });
    assert!(
        logged_line(&out, "builder 'vm' is up after 4.0s, booted cold without a snapshot (there is no snapshot yet; cannot make one")
            .is_some(),
        "{out:?}"
    );
    let s = t.snapshot("vm");
    assert!(!s.restorable);
    assert_eq!(s.note.as_deref(), Some(note));
    t.stop_it("vm");
    assert_eq!(t.snapshot("vm").boot_kind, BootKind::Make);
    assert_eq!(t.status("vm").expected_boot_ms, Some(4_000));
    assert!(t.m.history().restorable.is_empty());
}

/// Turning `snapshot` off or on by a reload starts the builder's kinds over.
#[test]
fn a_reload_that_flips_snapshot_starts_over() {
    let mut t = T::new(vec![snap("vm")], None);
    t.boot(1, "vm");
    t.came_up("vm", 5_000, BootKind::Make, true);
    t.stop_it("vm");
    t.reconfigure(vec![rebooted(cfg("vm", 2, Some(60)))]);
    assert_eq!(t.status("vm").snapshot, None);
    assert_eq!(t.status("vm").expected_boot_ms, Some(5_000));
    t.reconfigure(vec![rebooted(rebooted(snap("vm")))]);
    assert_eq!(t.snapshot("vm").boot_kind, BootKind::Make);
}

/// Eight hooks ask at once for a sleeping builder: one restore starts, every hook waits for
/// it, and once it is up at most max-jobs (2) leases are granted at a time.
#[test]
fn eight_hooks_one_restore() {
    let mut h = BootHistory::default();
    h.restorable.insert("vm".into());
    let mut t = T::with_history(vec![snap("vm")], None, &h);
    let mut starts = 0;
    for conn in 1..=8 {
        t.ev(Event::ClientConnected(conn));
        let out = t.boot(conn, "vm");
        starts += out
            .iter()
            .filter(|a| matches!(a, Action::StartBoot { .. }))
            .count();
        match T::reply(&out, conn) {
            Response::Builder { status } => assert_eq!(status.state, State::Booting),
            other => panic!("{other:?}"),
        }
        t.req(
            conn,
            Request::WaitReady {
                builder: "vm".into(),
                timeout_ms: 5_000,
            },
        );
    }
    assert_eq!(starts, 1, "one restore for eight hooks");
    t.planned("vm", BootKind::Restore, None);
    let out = t.came_up("vm", 700, BootKind::Restore, true);
    let woken = out
        .iter()
        .filter(|a| matches!(a, Action::Reply { response: Response::Builder { status }, .. } if status.state == State::Up))
        .count();
    assert_eq!(woken, 8, "{out:?}");
    let granted: Vec<ConnId> = (1..=8)
        .filter(|&c| matches!(t.lease(c, "vm"), Response::Leased { .. }))
        .collect();
    assert_eq!(granted, [1, 2]);
    assert_eq!(t.status("vm").boots, 1);
    assert_eq!(t.snapshot("vm").restored, 1);
}
