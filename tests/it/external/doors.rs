//! Both front doors on one max-jobs 1 builder, at once: one sid chroot Nix 2.34 daemon with our
//! binary as its `build-hook` AND as its `external-builders` program for aarch64-linux, and the
//! lazy `command` builder of `external::door` (max-jobs 1). A derivation with
//! `preferLocalBuild` is built "locally" first, which for an aarch64-linux one means through
//! the external builder; one without goes to the hook first. Each records on the builder when
//! it started and ended (the machine's `/proc/uptime`, read inside the build).
//!
//! Checks, in both orders (the external build under way when the hook's arrives, then the
//! other way round): both builds succeed and were built on the machine, each through its own
//! door (an `external-build` program or a hook process seen while it runs, and only the
//! external one's log has `external-serve`'s "building on"), each really ran
//! (slept its 4 s), and never were they on the machine at once.
//!
//! Must never: pass with a build that did not run (its interval is read from its output) or
//! with both through the same door.

use std::time::Duration;

use super::door::{build_socket, default_build_socket, supervisor, with_external_builders};
use crate::harness::*;

const SECS: u32 = 4;

/// A timestamped aarch64 derivation `name` (with `preferLocalBuild` when `external`).
fn expr(name: &str, external: bool) -> String {
    let d = DrvExpr::sh(
        name,
        "aarch64-linux",
        &format!(
            "read s _ < /proc/uptime; echo \"nlb-door {name}: started at $s\"; sleep {SECS}; read e _ < /proc/uptime; echo \"$s $e\" > $out"
        ),
    );
    if external { d.prefer_local() } else { d }.nix()
}

fn start(daemon: &LocalDaemon, name: &str, external: bool) -> Background {
    let f = daemon.write_file(&format!("{name}.nix"), &expr(name, external));
    Background::nix_build(daemon, &[f.to_string_lossy().into_owned()])
}

/// The build's interval on the machine, from its output, once it is checked to have come
/// through the `external` door or the hook's (only `external-serve` logs "building on").
#[track_caller]
fn interval(
    daemon: &LocalDaemon,
    remote: &impl StoreQueries,
    out: &CmdOutput,
    external: bool,
) -> (f64, f64) {
    out.assert_success();
    let p = out.stdout.trim();
    assert!(daemon.is_valid(p), "{p} is not valid\n{out}");
    assert!(remote.is_valid(p), "{p} was not built on the machine");
    let drv = daemon
        .deriver(p)
        .unwrap_or_else(|| panic!("{p} has no deriver"));
    let log = daemon.client("nix-store", &["-l", &drv]);
    assert_eq!(
        log.stdout.contains("building on '"),
        external,
        "{p} came through the wrong door: {log}"
    );
    let text = std::fs::read_to_string(daemon.host_path(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    slept_at_least(&text, p, f64::from(SECS) - 0.1)
}

/// The lazy builder's slot is guarded twice: by the slot files both doors probe and hold, and
/// by the supervisor's leases (a lazy builder takes at most max-jobs).
#[test]
fn builds_through_both_doors_at_once_never_share_a_max_jobs_1_lazy_builder() {
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let cfg = LazyConfig::write(&[remote.builder_toml(
        "one",
        Scheme::Ssh,
        &["aarch64-linux"],
        "max-jobs = 1\nidle-timeout = \"60s\"\nboot-timeout = \"60s\"",
        &remote.command_boot(Duration::ZERO),
    )]);
    set_mode(cfg.dir.path(), 0o755);
    let mut opts = with_external_builders(cfg.daemon_opts(Duration::from_secs(60)));
    // Nix 2.34 runs `<bin> hook`.
    opts.build_hook = Some(format!("{} hook", lazy_binary().display()));
    opts.expose.push(cfg.dir.path().to_path_buf());
    opts.expose.push(remote.dir().to_path_buf());
    let daemon = LocalDaemon::start(opts);
    let _supervisor = supervisor(&daemon, Some(&cfg.path()), &build_socket(&cfg));
    both_doors(&daemon, &remote, "lazy");
}

/// An always-on builder (the machines table, max-jobs 1) has no leases: only the slot files
/// both doors share keep its builds one at a time.
#[test]
fn builds_through_both_doors_at_once_never_share_a_max_jobs_1_always_on_builder() {
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let mut opts = with_external_builders(DaemonOpts::new(Nix::Host));
    opts.machines = Some(remote.machines_line(&MachineLine::new(Scheme::Ssh, true)) + "\n");
    opts.build_hook = Some(format!("{} hook", lazy_binary().display()));
    opts.expose.push(remote.dir().to_path_buf());
    let daemon = LocalDaemon::start(opts);
    let _supervisor = supervisor(&daemon, None, &default_build_socket(&daemon));
    both_doors(&daemon, &remote, "on");
}

/// Two rounds on `remote`'s one slot: see the module docs.
fn both_doors(daemon: &LocalDaemon, remote: &impl StoreQueries, tag: &str) {
    let mut intervals = Vec::new();
    for (round, external_first) in [(1, true), (2, false)] {
        let first = format!(
            "door{round}-{}",
            if external_first { "ext" } else { "hook" }
        );
        let second = format!(
            "door{round}-{}",
            if external_first { "hook" } else { "ext" }
        );
        let mut a = start(daemon, &first, external_first);
        a.wait_line(
            &format!("nlb-door {first}: started"),
            Duration::from_secs(60),
        );
        // The first is on the machine through its door.
        let procs = daemon.processes();
        let client = procs
            .iter()
            .any(|(_, argv)| argv.iter().any(|a| a == "external-build"));
        // (`hook_pids` matches the binary's path, which the chroot hides.)
        let hook = procs.iter().any(|(_, argv)| {
            argv.first()
                .is_some_and(|a| a.ends_with("nix-lazy-builder"))
                && argv.get(1).is_some_and(|a| a == "hook")
        });
        assert_eq!(
            (client, hook),
            (external_first, !external_first),
            "{first}: (external-build, hook) running: {procs:?}"
        );
        let b = start(daemon, &second, !external_first);
        let (out_a, out_b) = (
            a.finish(Duration::from_secs(120)),
            b.finish(Duration::from_secs(120)),
        );
        for (o, external) in [(&out_a, external_first), (&out_b, !external_first)] {
            intervals.push(interval(daemon, remote, o, external));
        }
        assert!(
            out_b
                .stderr
                .contains(&format!("nlb-door {second}: started")),
            "{out_b}"
        );
    }
    eprintln!(
        "{tag}: runs (s from the first start): {:?}",
        runs_from_first(&intervals)
    );
    for pair in intervals.chunks(2) {
        assert_eq!(
            max_overlap(pair),
            1,
            "two builds at once on a max-jobs 1 builder: {pair:?}"
        );
    }
}
