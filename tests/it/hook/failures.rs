//! Remote builds that must fail, and fail the way Nix users expect, through a real nix-daemon
//! (Nix 2.8) running nix-lazy-builder as its `build-hook` against a real sshd remote store:
//!
//! - a builder that exits non-zero: Nix's `build of '<drv>' on '<uri>' failed: …` message with
//!   the builder's exit code reaches the client, so do the log lines (live and in
//!   `nix-store -l`), the hook exits 100 (permanent failure, so a daemonless `nix-build` exits
//!   100 as with a local build), and no invalid path is left on either side;
//! - `timeout` and `max-silent-time` given with `--option` reach the remote, which stops the
//!   build (its `sleep` is seen running among the remote's processes, then gone); the hook
//!   exits 101 (a daemonless `nix-build` exits 101);
//! - a builder presenting the wrong host key is refused before anything is sent: the user sees
//!   the builder and both fingerprints; the build fails (max-jobs 0) or is built locally.
//!
//! Through the daemon, Nix 2.8's client always exits 1 for a failed build (the worker protocol
//! carries no exit status), local or remote; the hook's own status shows in the daemon's
//! `failed with exit code N` line, and a daemonless `nix-build` (same store, same nix.conf,
//! `NIX_REMOTE` unset) exits with Nix's 100/101.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

/// A daemon on Nix 2.8 with our hook and one remote (2.8) over `scheme`, port in the URI.
fn setup(scheme: Scheme) -> (RemoteStore, LocalDaemon) {
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    opts.builders = Some(remote.machines_line(&MachineLine::new(scheme, true)));
    let daemon = LocalDaemon::start(opts);
    (remote, daemon)
}

/// `nix-build` in the daemon's namespace without the daemon: root opens the store directly and
/// runs the build hook itself, with the daemon's nix.conf. Its exit status is Nix's own.
fn daemonless_build_command(daemon: &LocalDaemon, paths: &FakeDrvPaths, extra: &[&str]) -> Command {
    let f = paths.file.to_string_lossy().into_owned();
    let mut c = daemon.client_command("nix-build");
    c.env_remove("NIX_REMOTE")
        .env("NIX_CONF_DIR", "/etc/nix")
        .args(["--no-out-link", &f, "-A", "main.out", "-A", "main.dev"])
        .args(extra);
    c
}

fn daemonless_build(daemon: &LocalDaemon, paths: &FakeDrvPaths, extra: &[&str]) -> CmdOutput {
    run_command(
        &mut daemonless_build_command(daemon, paths, extra),
        None,
        DEFAULT_COMMAND_TIMEOUT,
    )
}

/// Asserts none of the drv's outputs is valid or even on disk in `store`.
#[track_caller]
fn assert_no_outputs(store: &impl StoreQueries, paths: &FakeDrvPaths, what: &str) {
    for p in [&paths.out, &paths.dev] {
        assert!(!store.is_valid(p), "{what}: {p} is valid");
        assert!(!store.exists_on_disk(p), "{what}: {p} exists on disk");
    }
    store.assert_no_leftovers(what);
}

fn failing_build(case: &str, scheme: Scheme) {
    let start = Instant::now();
    let (remote, daemon) = setup(scheme);
    let uri = remote.uri(scheme);
    let drv = FakeDrv::new(&format!("nlb-fail-{case}")).failing(3);
    let (paths, out) = drv.build(&daemon, &[]);
    out.assert_failure();
    // Nix 2.8's client through a daemon: always 1 for a failed build (see the module docs).
    assert_eq!(out.code(), Some(1), "{out}");
    let ours = out.hook_failure(&paths.drv, &uri);
    let remote_msg = format!("builder for '{}' failed with exit code 3", paths.drv);
    assert!(
        ours.contains(&remote_msg),
        "the remote's reason is missing:\n{out}"
    );
    // The daemon's own line carries the hook's exit status: 100, a permanent failure.
    out.one_line(&format!(
        "error: builder for '{}' failed with exit code 100",
        paths.drv
    ));
    let mut lines = drv.expected_log_lines();
    lines.extend(drv.failure_line());
    for l in &lines {
        assert!(
            out.stderr.lines().any(|x| x == l),
            "the client did not see the log line {l:?} live:\n{out}"
        );
    }
    paths.assert_log(&daemon);
    assert_no_outputs(&daemon, &paths, "local");
    assert_no_outputs(&remote, &paths, "remote");
    // The input was sent over there (`nix-store --serve` keeps no build log to check).
    assert!(remote.is_valid(&paths.input_out));

    // Without a daemon in between, nix-build exits with Nix's status for a permanent failure.
    let drv = FakeDrv::new(&format!("nlb-fail2-{case}")).failing(4);
    let paths = drv.build_input(&daemon);
    let out = daemonless_build(&daemon, &paths, &[]);
    assert_eq!(out.code(), Some(100), "daemonless nix-build:\n{out}");
    let ours = out.hook_failure(&paths.drv, &uri);
    assert!(ours.contains("failed with exit code 4"), "{out}");
    assert_no_outputs(&daemon, &paths, "local, daemonless");
    eprintln!("[timing] failing build {case}: {:.2?}", start.elapsed());
}

#[test]
fn failing_build_over_ssh_and_ssh_ng() {
    failing_build("ssh", Scheme::Ssh);
    failing_build("sshng", Scheme::SshNg);
}

/// Runs `build` (a `nix-build` of a derivation that sleeps `secs` over there, stopped by a
/// timeout) to completion, and checks the remote's builder process really ran and is gone: a
/// `sleep SECS` is seen among `remote`'s processes (its sessions and what they run, sandboxed
/// builds included) while the build runs, and neither it nor any other `sleep SECS` of the
/// remote is left within 10 s of the build's end.
#[track_caller]
fn finish_and_assert_sleep_gone(
    remote: &RemoteStore,
    mut build: Background,
    secs: u32,
) -> CmdOutput {
    let t0 = Instant::now();
    let seen = loop {
        let s = sleeps_among(&remote.processes(), secs);
        if let Some(&p) = s.first() {
            break p;
        }
        assert!(
            !build.is_finished(),
            "the build ended before its `sleep {secs}` was seen on the remote:\n{}",
            build.stderr_so_far()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no `sleep {secs}` on the remote within 120 s:\n{}",
            build.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!(
        "[timing] the remote builder `sleep {secs}` ({seen}) seen {:.2?} into the build",
        build.elapsed()
    );
    let out = build.finish(DEFAULT_COMMAND_TIMEOUT);
    let ended = Instant::now();
    loop {
        let left = sleeps_among(&remote.processes(), secs);
        if left.is_empty() && !alive(seen) {
            eprintln!(
                "[timing] `sleep {secs}` gone {:.2?} after the build ended",
                ended.elapsed()
            );
            return out;
        }
        assert!(
            ended.elapsed() < Duration::from_secs(10),
            "the remote builder `sleep {secs}` still runs ({left:?}) 10 s after the timeout:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `timeout` and then `max-silent-time`, each `--option … 2` on a build that sleeps `secs`.
fn timeouts(case: &str, scheme: Scheme, secs: u32) {
    let start = Instant::now();
    let (remote, daemon) = setup(scheme);
    let uri = remote.uri(scheme);
    for (option, seed, reason) in [
        ("timeout", "t", "timed out after 2 seconds"),
        (
            "max-silent-time",
            "s",
            "timed out after 2 seconds of silence",
        ),
    ] {
        let drv = FakeDrv::new(&format!("nlb-slow-{case}"))
            .with_seed(seed)
            .slow(secs);
        let paths = drv.instantiate(&daemon);
        let mut args: Vec<String> = ["-A", "main.out", "-A", "main.dev", "--option", option, "2"]
            .map(str::to_owned)
            .to_vec();
        args.insert(0, paths.file.to_string_lossy().into_owned());
        let build = Background::nix_build(&daemon, &args);
        let out = finish_and_assert_sleep_gone(&remote, build, secs);
        eprintln!("[timing] {case} {option}: nix-build {:.2?}", out.elapsed);
        out.assert_failure();
        assert!(
            out.elapsed < Duration::from_secs(u64::from(secs) / 2),
            "{option} 2 did not stop a {secs} s build:\n{out}"
        );
        let ours = out.hook_failure(&paths.drv, &uri);
        assert!(ours.ends_with(reason), "{option}: want …{reason:?}:\n{out}");
        out.one_line(&format!(
            "error: builder for '{}' failed with exit code 101",
            paths.drv
        ));
        // The lines before the sleep were logged; the one after it never came.
        let log = daemon
            .build_log(&paths.drv)
            .unwrap_or_else(|| panic!("no log for {}", paths.drv));
        let lines = drv.expected_log_lines();
        assert!(log.contains(&lines[0]), "{log}");
        assert!(!log.contains("slept"), "{log}");
        assert_no_outputs(&daemon, &paths, option);
        assert_no_outputs(&remote, &paths, option);
    }

    let drv = FakeDrv::new(&format!("nlb-slow-{case}"))
        .with_seed("d")
        .slow(secs);
    let paths = drv.build_input(&daemon);
    let build = Background::spawn(&mut daemonless_build_command(
        &daemon,
        &paths,
        &["--option", "timeout", "2"],
    ));
    let out = finish_and_assert_sleep_gone(&remote, build, secs);
    assert_eq!(out.code(), Some(101), "daemonless nix-build:\n{out}");
    assert_no_outputs(&daemon, &paths, "daemonless");
    eprintln!("[timing] timeouts {case}: {:.2?}", start.elapsed());
}

#[test]
fn timeouts_forwarded_over_ssh() {
    timeouts("ssh", Scheme::Ssh, 47);
}

#[test]
fn timeouts_forwarded_over_ssh_ng() {
    timeouts("sshng", Scheme::SshNg, 53);
}

/// `SHA256:…` of a public key file, as `ssh-keygen -l` prints it.
fn fingerprint(pub_file: &std::path::Path) -> String {
    let mut c = Command::new("ssh-keygen");
    c.arg("-lf").arg(pub_file);
    let out = run_command(&mut c, None, Duration::from_secs(10));
    out.assert_success();
    out.stdout
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("ssh-keygen -l printed {out}"))
        .to_owned()
}

/// A machines line for `remote` that pins `impostor`'s host key instead of its own.
fn wrong_key_line(remote: &RemoteStore, impostor: &RemoteStore, m: &MachineLine<'_>) -> String {
    let line = remote.machines_line(m);
    assert!(line.ends_with(&remote.host_key_base64()), "{line}");
    line.replace(&remote.host_key_base64(), &impostor.host_key_base64())
}

fn wrong_host_key(case: &str, scheme: Scheme) {
    let start = Instant::now();
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let impostor = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let presented = fingerprint(&remote.dir().join("ssh/host_ed25519_key.pub"));
    let pinned = fingerprint(&impostor.dir().join("ssh/host_ed25519_key.pub"));
    assert_ne!(presented, pinned);
    let uri = remote.uri(scheme);

    // max-jobs 0: nowhere else to go, the build fails.
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    opts.max_jobs = 0;
    opts.builders = Some(wrong_key_line(
        &remote,
        &impostor,
        &MachineLine::new(scheme, true),
    ));
    let daemon = LocalDaemon::start(opts);
    let drv = FakeDrv::new(&format!("nlb-wrongkey-{case}"));
    let paths = drv.build_input(&daemon);
    let (_, out) = drv.build(&daemon, &[]);
    out.assert_failure();
    let refused = out.one_line(&format!("error: cannot build on '{uri}': "));
    for want in [&presented, &pinned] {
        assert!(
            refused.contains(want.as_str()),
            "no fingerprint {want}:\n{out}"
        );
    }
    assert!(
        refused.contains(&format!("'{uri}'")) && refused.contains("HOST KEY MISMATCH"),
        "{out}"
    );
    // The hook declined with its reason, and the daemon gave up (Nix 2.8's wording).
    let declined = out.one_line("warning: no builder for aarch64-linux: ");
    assert!(declined.contains(&format!("'{uri}'")), "{out}");
    out.one_line(&format!(
        "error: a 'aarch64-linux' with features {{}} is required to build '{}'",
        paths.drv
    ));
    assert!(
        !out.stderr
            .contains(&format!("building '{}' on '", paths.drv)),
        "a remote build started:\n{out}"
    );
    assert_no_outputs(&daemon, &paths, "local");
    assert!(
        !remote.is_valid(&paths.input_out),
        "the input reached the builder"
    );
    assert_no_outputs(&remote, &paths, "remote");
    drop(daemon);

    // A derivation the local machine can build falls back to a local build.
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    opts.builders = Some(wrong_key_line(
        &remote,
        &impostor,
        &MachineLine {
            systems: &["aarch64-linux", "x86_64-linux"],
            ..MachineLine::new(scheme, true)
        },
    ));
    let daemon = LocalDaemon::start(opts);
    let drv = FakeDrv::new(&format!("nlb-wrongkey-local-{case}")).with_system("x86_64-linux");
    let (paths, out) = drv.build(&daemon, &[]);
    out.assert_success();
    let refused = out.one_line(&format!("error: cannot build on '{uri}': "));
    assert!(
        refused.contains(&presented) && refused.contains(&pinned),
        "{out}"
    );
    assert!(
        !out.stderr
            .contains(&format!("building '{}' on '", paths.drv)),
        "not built locally:\n{out}"
    );
    paths.assert_built(&daemon, true);
    assert!(!remote.is_valid(&paths.input_out));
    assert_no_outputs(&remote, &paths, "remote after the local fallback");
    eprintln!("[timing] wrong host key {case}: {:.2?}", start.elapsed());
}

#[test]
fn wrong_host_key_over_ssh_and_ssh_ng() {
    wrong_host_key("ssh", Scheme::Ssh);
    wrong_host_key("sshng", Scheme::SshNg);
}
