//! The external door's limits and kills, through the sid chroot's Nix 2.34 daemon and the lazy
//! `command` builder of `external::door` (the harness's real sshd with its own store):
//!
//! - the daemon's `timeout` and `max-silent-time` (given on the `nix-build` command line, so
//!   only the daemon knows them) kill the `external-build` program: the remote build (its
//!   `sleep`) and our root helper are gone within [`CANCEL_BOUND`] of the program's death, the
//!   user sees Nix's "timed out", nothing is registered, and the max-jobs 1 builder takes the
//!   next build (its slot was given back);
//! - the program SIGKILLed while it unpacks an output (as the daemon kills it): no output is
//!   valid or at its path, only its hidden unpack directory is left, and the next external
//!   build removes that.
//!
//! Must never: pass when the remote build outlives its program (the sleep is looked for by
//! pid, and seen running first), or kill anything but the test's own processes, by pid.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::door::{Door, setup_with};
use crate::harness::fault::{
    LONG_BUILD_SECS, assert_all_gone_within_bound, assert_only_unpack_leftovers, describe,
    unpack_dirs,
};
use crate::harness::warm::signal;
use crate::harness::*;

const SETTINGS: &str = "max-jobs = 1\nidle-timeout = \"120s\"\nboot-timeout = \"60s\"";

/// The one process in `d`'s daemon namespace whose argv holds `arg` (`external-build`,
/// `external-serve`), once there is one.
#[track_caller]
fn the_process(d: &Door, arg: &str) -> u32 {
    let mut found = Vec::new();
    wait_until(arg, Duration::from_secs(60), || {
        found = d
            .daemon
            .processes()
            .into_iter()
            .filter(|(_, argv)| argv.iter().any(|a| a == arg))
            .map(|(p, _)| p)
            .collect();
        !found.is_empty()
    });
    assert_eq!(found.len(), 1, "want one {arg}: {:?}", describe(&found));
    found[0]
}

/// `nix-build` of `drv`'s both outputs with `extra` options, in the background.
fn start(d: &Door, drv: &FakeDrv, extra: &[&str]) -> (FakeDrvPaths, Background) {
    let paths = drv.instantiate(&d.daemon);
    let mut args: Vec<String> = vec![
        paths.file.to_string_lossy().into_owned(),
        "-A".into(),
        "main.out".into(),
        "-A".into(),
        "main.dev".into(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    (paths, Background::nix_build(&d.daemon, &args))
}

/// Waits until `pid` is gone; returns when it was seen gone.
#[track_caller]
fn died(pid: u32, limit: Duration) -> Instant {
    let t0 = Instant::now();
    while alive(pid) {
        assert!(t0.elapsed() < limit, "{pid} still runs after {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Instant::now()
}

/// One limit, `extra` on the command line: see the module docs.
fn a_limit_cancels_the_remote_build(tag: &str, extra: &[&str]) {
    let d = setup_with(SETTINGS, Duration::ZERO, |_| {});
    let drv = FakeDrv::new(tag).slow(LONG_BUILD_SECS);
    let (paths, build) = start(&d, &drv, extra);
    let client = the_process(&d, "external-build");
    let helper = the_process(&d, "external-serve");
    // The remote build under way: its sleep, under the machine's sshd.
    let mut sleeps = Vec::new();
    wait_until("the remote build's sleep", Duration::from_secs(60), || {
        sleeps = d
            .remote
            .started_pid()
            .map(|sshd| sleeps_among(&descendants(sshd), LONG_BUILD_SECS))
            .unwrap_or_default();
        !sleeps.is_empty()
    });
    assert!(alive(client), "the program ended before the limit");
    let t = died(client, Duration::from_secs(60));
    assert_all_gone_within_bound(
        &format!("{tag}: the remote build or the helper"),
        "external-build was killed",
        t,
        || sleeps.iter().copied().chain([helper]).collect(),
        || format!("\n--- supervisor ---\n{}", d.cfg.supervisor_log()),
    );
    eprintln!(
        "{tag}: remote build and helper gone {:.2?} after external-build died",
        t.elapsed()
    );
    let out = build.finish(Duration::from_secs(60));
    out.assert_failure();
    assert!(out.stderr.contains("timed out after"), "{out}");
    assert!(!out.stderr.contains("panicked"), "{out}");
    assert!(!d.daemon.is_valid(&paths.out) && !d.daemon.is_valid(&paths.dev));
    assert!(d.daemon.invalid_leftovers().is_empty());
    // The builder's one slot was given back: the next build runs.
    let (next, out) = FakeDrv::new(&format!("{tag}-next")).build(&d.daemon, &[]);
    out.assert_success();
    next.assert_built(&d.daemon, false);
}

#[test]
fn the_daemons_timeout_cancels_the_remote_build() {
    a_limit_cancels_the_remote_build("ext-timeout", &["--timeout", "10"]);
}

#[test]
fn the_daemons_max_silent_time_cancels_the_remote_build() {
    a_limit_cancels_the_remote_build("ext-silent", &["--max-silent-time", "5"]);
}

/// The hidden unpack directories of the killed program (host paths).
fn hidden_of(d: &Door, client: u32) -> Vec<PathBuf> {
    let prefix = format!(".nlb-unpack-{client}-");
    unpack_dirs(&d.daemon)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .collect()
}

#[test]
fn a_program_killed_mid_unpack_leaves_nothing_valid_and_its_garbage_goes_next_time() {
    let d = setup_with(SETTINGS, Duration::ZERO, |_| {});
    let drv = FakeDrv::new("ext-unpack").with_blob(512 << 20);
    let (paths, build) = start(&d, &drv, &[]);
    let client = the_process(&d, "external-build");
    wait_until(
        "the program's unpack directory",
        Duration::from_secs(120),
        || !hidden_of(&d, client).is_empty(),
    );
    // As the daemon kills it (`killUser`, SIGKILL).
    signal(client, libc::SIGKILL);
    died(client, Duration::from_secs(10));
    let out = build.finish(Duration::from_secs(60));
    out.assert_failure();
    assert!(!out.stderr.contains("panicked"), "{out}");
    for p in [&paths.out, &paths.dev] {
        assert!(
            !d.daemon.is_valid(p),
            "{p} is valid after a kill mid-unpack"
        );
        assert!(
            !d.daemon.host_path(p).exists(),
            "{p} exists after a kill mid-unpack"
        );
    }
    // Only the killed program's hidden unpack directory is left.
    assert_only_unpack_leftovers(&d.daemon, client, "external-build killed mid-unpack");
    let left = hidden_of(&d, client);
    eprintln!("left by the killed program: {left:?}");
    assert!(!left.is_empty(), "the kill came after the unpack");
    // The next external build sweeps it (the program's pid is gone).
    let (next, out) = FakeDrv::new("ext-unpack-next").build(&d.daemon, &[]);
    out.assert_success();
    next.assert_built(&d.daemon, false);
    assert!(
        hidden_of(&d, client).is_empty(),
        "the next build left {:?}\n--- supervisor ---\n{}",
        hidden_of(&d, client),
        d.cfg.supervisor_log()
    );
    assert!(d.daemon.invalid_leftovers().is_empty());
}
