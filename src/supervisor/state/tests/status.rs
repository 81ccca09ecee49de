//! What status shows: expected boot times, one-line causes.

use super::*;

#[test]
fn expected_boot_time_is_a_median_of_recent_boots() {
    let mut short = cfg("short", 1, None);
    short.boot_timeout = 5 * S;
    let mut t = T::new(vec![cfg("vm", 1, None), short], None);
    assert_eq!(t.status("vm").expected_boot_ms, Some(8_000));
    assert_eq!(t.status("short").expected_boot_ms, Some(5_000));
    for took in [9, 1, 5, 100, 7, 6] {
        t.down(1, "vm");
        if t.status("vm").state == State::Stopping {
            t.stopped("vm");
        }
        t.boot(1, "vm");
        let out = t.succeed("vm", took);
        assert!(out.contains(&Action::SaveHistory));
    }
    // The last five: 1, 5, 100, 7, 6 → median 6.
    assert_eq!(t.status("vm").expected_boot_ms, Some(6_000));
    let h = t.m.history();
    assert_eq!(h.builders["vm"], [1000, 5000, 100_000, 7000, 6000]);
    assert!(!h.builders.contains_key("short"));
    // A new machine starts from the saved history; unknown builders are dropped.
    let mut saved = h.clone();
    saved.builders.insert("gone".into(), vec![1]);
    saved.builders.insert("short".into(), vec![4000, 2000]);
    let t2 = T::with_history(
        vec![cfg("vm", 1, None), cfg("short", 1, None)],
        None,
        &saved,
    );
    assert_eq!(t2.status("vm").expected_boot_ms, Some(6_000));
    assert_eq!(t2.status("short").expected_boot_ms, Some(3_000));
    assert!(!t2.m.history().builders.contains_key("gone"));
    let json = serde_json::to_string(&t2.m.history()).unwrap();
    assert_eq!(
        serde_json::from_str::<BootHistory>(&json).unwrap(),
        t2.m.history()
    );
}

#[test]
fn one_line_causes() {
    assert_eq!(one_line("a\n\n  b  \n"), "a; b");
    let long = "é".repeat(400);
    let l = one_line(&long);
    assert!(l.ends_with('…') && l.len() <= 504);
}

#[test]
fn boots_that_worked_and_boots_that_failed_are_counted_apart() {
    let mut t = T::new(vec![cfg("vm", 1, None)], None);
    t.boot(1, "vm");
    t.fail("vm", "boom");
    let st = t.status("vm");
    assert_eq!((st.boots, st.boots_ok, st.boots_failed), (1, 0, 1));
    t.boot_with(1, "vm", true);
    t.exited("vm", "qemu exited with status 1");
    let st = t.status("vm");
    assert_eq!(
        (st.boots, st.boots_ok, st.boots_failed),
        (2, 0, 2),
        "exited while booting"
    );
    t.boot_with(1, "vm", true);
    let st = t.status("vm");
    assert_eq!(
        (st.boots, st.boots_ok, st.boots_failed),
        (3, 0, 2),
        "one under way"
    );
    t.succeed("vm", 2);
    let st = t.status("vm");
    assert_eq!((st.boots, st.boots_ok, st.boots_failed), (3, 1, 2));
    // A failure of the running builder (a hook could not use it) is no failed boot.
    t.req(
        1,
        Request::ReportFailure {
            builder: "vm".into(),
            cause: "ssh: refused".into(),
        },
    );
    assert_eq!(t.status("vm").boots_failed, 2);
}
