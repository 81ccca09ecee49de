//! Which build hook a real nix-daemon really runs, as `nix-lazy-builder doctor` finds out by
//! asking it (the version from the worker handshake, the hook from the daemon's own
//! `starting build hook '…'` message during a probe build nothing can do).
//!
//! The case that matters: Nix 2.26 (trixie chroot) replaces a `build-hook` set in nix.conf with
//! its own default (2.25.0–2.33.x, NixOS/nix#15083), so a daemon configured as the README said
//! runs Nix's hook; doctor must fail that row in one line with the `NIX_CONFIG` fix, and pass
//! once the hook comes through `NIX_CONFIG`. Nix 2.8 (host) and 2.34 (sid chroot) honour
//! nix.conf; a 2.34 daemon left with its default hook fails without the 2.25–2.33 advice.
//!
//! Must never: pass on what nix.conf says (the daemon's answer decides), or leave the probe
//! anything but its one valid `.drv`: no output, no leftovers, no hook process.

use std::time::{Duration, Instant};

use crate::harness::*;

/// The probe's `.drv` (`store::probe` computes it; its unit test checks it against real Nix).
const PROBE_DRV: &str = "/nix/store/ghywsxp2lmv2v193vhjr1n81ndmb4xph-nix-lazy-builder-probe.drv";
const PROBE_OUT: &str = "/nix/store/xnd8js9y2b9x6p7k2c1l13fbgjaqrn9d-nix-lazy-builder-probe";

/// A daemon of `nix` whose `build-hook` is ours through `via`, or left at its default (`None`);
/// doctor run inside its namespace, twice (the second run finds the probe's `.drv` there).
fn doctor(nix: Nix, via: Option<HookVia>) -> (LocalDaemon, CmdOutput) {
    let mut opts = DaemonOpts::new(nix);
    if let Some(via) = via {
        opts = opts.with_our_hook();
        opts.build_hook_via = Some(via);
    }
    opts.machines = Some(String::new());
    let daemon = LocalDaemon::start(opts);
    assert!(
        daemon.nix_version().contains(&nix.version_marker()),
        "{}",
        daemon.nix_version()
    );
    let bin = hook_binary().to_string_lossy().into_owned();
    let mut outs = Vec::new();
    for _ in 0..2 {
        let start = Instant::now();
        let mut cmd = daemon.client_command(&bin);
        cmd.arg("doctor");
        let out = run_command(&mut cmd, None, Duration::from_secs(120));
        eprintln!(
            "[timing] doctor on {}: {:.2?}",
            nix.label(),
            start.elapsed()
        );
        eprintln!("{out}");
        outs.push(out);
    }
    let second = outs.pop().expect("two runs");
    let first = outs.pop().expect("two runs");
    assert_eq!(
        (first.code(), build_hook_row(&first)),
        (second.code(), build_hook_row(&second)),
        "the second doctor run answered differently:\n{first}\n{second}"
    );

    // The probe leaves its .drv and nothing else.
    assert!(daemon.is_valid(PROBE_DRV), "the probe's .drv is not valid");
    assert!(
        !daemon.exists_on_disk(PROBE_OUT),
        "the probe derivation was built"
    );
    assert_eq!(daemon.invalid_leftovers(), Vec::<String>::new());
    wait_until("the probe's hook to exit", Duration::from_secs(10), || {
        daemon.hook_pids().is_empty()
    });
    (daemon, second)
}

/// The one `build-hook` row of doctor's report.
fn build_hook_row(out: &CmdOutput) -> String {
    let rows: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("] build-hook "))
        .collect();
    assert_eq!(rows.len(), 1, "not one build-hook row:\n{out}");
    rows[0].to_owned()
}

/// Doctor's build-hook row says ok: the daemon starts our binary, followed by `then` (the
/// word Nix passes after the path: " hook" from 2.26 on, none in 2.8).
#[track_caller]
fn assert_runs_ours(out: &CmdOutput, then: &str, case: &str) {
    let row = build_hook_row(out);
    assert!(
        row.contains("[ ok ] build-hook")
            && row.contains(&format!("starts '{}{then}'", hook_binary().display())),
        "{case}: {row}"
    );
}

#[test]
fn nix226_with_build_hook_only_in_nix_conf_runs_nix_s_hook_and_doctor_says_so() {
    let (daemon, out) = doctor(Nix::Trixie, Some(HookVia::NixConf));
    let conf = std::fs::read_to_string(daemon.conf_file()).expect("read nix.conf");
    assert!(
        conf.contains(&format!("build-hook = {} hook", hook_binary().display())),
        "{conf}"
    );
    assert_eq!(out.code(), Some(1), "doctor must fail:\n{out}");
    assert!(
        out.stdout.contains("daemon: Nix 2.26."),
        "no daemon version:\n{out}"
    );
    let row = build_hook_row(&out);
    for want in [
        "[FAIL] build-hook",
        "nix-daemon 2.26.",
        "starts '/usr/bin/nix __build-remote', not nix-lazy-builder",
        "2.25.0 to 2.33.x",
        "NixOS/nix#15083",
        &format!(
            "NIX_CONFIG=\"build-hook = {} hook\"",
            hook_binary().display()
        ),
        "drop-in",
    ] {
        assert!(row.contains(want), "{want:?} is not in the row: {row}");
    }
}

/// Each daemon runs ours where it takes the hook from: Nix 2.26 through `NIX_CONFIG`, 2.34 and
/// 2.8 from nix.conf (2.8 takes one path: no `hook` word after it).
#[test]
fn daemons_given_our_hook_where_they_read_it_run_ours() {
    for (nix, via, then) in [
        (Nix::Trixie, HookVia::NixConfigEnv, " hook"),
        (Nix::Sid, HookVia::NixConf, " hook"),
        (Nix::Host, HookVia::NixConf, ""),
    ] {
        let case = format!("{} with build-hook in {via:?}", nix.label());
        let (_daemon, out) = doctor(nix, Some(via));
        assert!(out.success(), "{case}: doctor failed:\n{out}");
        let version = format!("daemon: Nix {}.", nix.short());
        assert!(
            out.stdout.contains(&version),
            "{case}: no {version:?}:\n{out}"
        );
        assert_runs_ours(&out, then, &case);
    }
}

#[test]
fn nix234_left_with_its_own_hook_fails_without_the_2_25_advice() {
    let (_daemon, out) = doctor(Nix::Sid, None);
    assert_eq!(out.code(), Some(1), "doctor must fail:\n{out}");
    let row = build_hook_row(&out);
    assert!(
        row.contains("[FAIL] build-hook") && row.contains("__build-remote', not nix-lazy-builder"),
        "{row}"
    );
    assert!(
        row.contains(&format!(
            "set build-hook = {} hook in nix.conf",
            hook_binary().display()
        )),
        "{row}"
    );
    assert!(!row.contains("15083"), "{row}");
}
