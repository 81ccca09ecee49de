//! `builders-use-substitutes`: with it set, the remote fetches the inputs it lacks from its own
//! substituters instead of being sent them, as with Nix's own hook (the only difference on the
//! wire: the QueryValidPaths before the upload asks the remote to substitute). Without it, the
//! hook uploads them.
//!
//! The substituter is a real signed `file://` binary cache that only the remote uses: the local
//! daemon builds the inputs and `nix copy`s them there (signed with a fresh key), has no
//! substituters itself, and the remote (its `substituters` and `trusted-public-keys`) reads it.
//! One daemon and one remote per scheme, two builds: one with the setting (the daemon's
//! nix.conf), one with it turned off by the client (`--option builders-use-substitutes false`,
//! which the daemon passes on to the hook).
//!
//! Must never: pass when the input was uploaded although the remote could substitute it (the
//! hook reports 0 paths uploaded, and the remote's copy of the input carries the cache's
//! signature, which an uploaded copy would not), nor when the setting changed nothing (then the
//! hook reports the input uploaded and the remote's copy is unsigned).

use crate::harness::*;

const KEY_NAME: &str = "nlb-test-cache-1";

/// The hook's own account of the build (its `remote build finished` debug line, at `-vv`).
fn timings_line(out: &CmdOutput) -> &str {
    out.stderr
        .lines()
        .find(|l| l.contains("remote build finished"))
        .unwrap_or_else(|| panic!("the hook did not report the build:\n{out}"))
}

/// The remote's signatures on `path` (`nix path-info --sigs`).
fn remote_sigs(remote: &RemoteStore, path: &str) -> String {
    let out = remote.run_nix(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--sigs",
            path,
        ],
    );
    out.assert_success();
    out.stdout
}

fn substitutes(scheme: Scheme, remote_nix: Nix) {
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    opts.machines = Some(String::new());
    opts.extra_conf
        .push("builders-use-substitutes = true".to_owned());
    let daemon = LocalDaemon::start(opts);

    // A signed binary cache with both inputs, written from the local side.
    let cache = scratch("nlb-cache-", &["store"]);
    let keys = cache.path();
    daemon
        .client(
            "nix-store",
            &[
                "--generate-binary-cache-key",
                KEY_NAME,
                &keys.join("secret").to_string_lossy(),
                &keys.join("public").to_string_lossy(),
            ],
        )
        .assert_success();
    let public = read(&keys.join("public")).trim().to_owned();
    let tag = scheme.prefix().replace('-', "");
    let with = FakeDrv::new(&format!("nlb-subst-{tag}")).with_log_lines(2);
    let without = FakeDrv::new(&format!("nlb-nosubst-{tag}")).with_log_lines(2);
    let with_paths = with.build_input(&daemon);
    let without_paths = without.build_input(&daemon);
    let cache_uri = format!("file://{}", keys.join("store").display());
    daemon
        .client(
            "nix",
            &[
                "--extra-experimental-features",
                "nix-command",
                "copy",
                "--to",
                &format!("{cache_uri}?secret-key={}", keys.join("secret").display()),
                &with_paths.input_out,
                &without_paths.input_out,
            ],
        )
        .assert_success();

    let mut ro = RemoteOpts::new(remote_nix);
    ro.extra_conf.push(format!("substituters = {cache_uri}"));
    ro.extra_conf
        .push(format!("trusted-public-keys = {public}"));
    let remote = RemoteStore::start(ro);
    let line = remote.machines_line(&MachineLine::new(scheme, true));
    write(&daemon.machines_file(), &format!("{line}\n"));
    for p in [&with_paths.input_out, &without_paths.input_out] {
        assert!(!remote.is_valid(p), "the remote had {p} already");
    }

    // With the setting: the remote substitutes the input; nothing is uploaded.
    let (paths, out) = with.build(&daemon, &["-vv"]);
    out.assert_success();
    paths.assert_built(&daemon, true);
    paths.assert_built(&remote, false);
    let timings = timings_line(&out);
    assert!(
        timings.contains("uploaded_paths: 0,") && timings.contains("uploaded_bytes: 0,"),
        "the input was uploaded although the remote could substitute it: {timings}"
    );
    let sigs = remote_sigs(&remote, &paths.input_out);
    assert!(
        sigs.contains(&format!("{KEY_NAME}:")),
        "the remote's {} did not come from its cache: {sigs}",
        paths.input_out
    );
    eprintln!("with builders-use-substitutes: {timings}");

    // Without it: the hook uploads the input (unsigned; the cache is never asked).
    let (paths, out) = without.build(
        &daemon,
        &["-vv", "--option", "builders-use-substitutes", "false"],
    );
    out.assert_success();
    paths.assert_built(&daemon, true);
    paths.assert_built(&remote, false);
    let timings = timings_line(&out);
    assert!(
        timings.contains("uploaded_paths: 1,"),
        "without builders-use-substitutes the input was not uploaded: {timings}"
    );
    let sigs = remote_sigs(&remote, &paths.input_out);
    assert!(
        !sigs.contains(&format!("{KEY_NAME}:")),
        "the remote substituted {} although the setting was off: {sigs}",
        paths.input_out
    );
    eprintln!("without builders-use-substitutes: {timings}");
    assert_eq!(daemon.invalid_leftovers(), Vec::<String>::new());
    assert_eq!(remote.invalid_leftovers(), Vec::<String>::new());
}

#[test]
fn the_remote_substitutes_inputs_over_ssh() {
    substitutes(Scheme::Ssh, Nix::Host);
}

#[test]
fn the_remote_substitutes_inputs_over_ssh_ng() {
    substitutes(Scheme::SshNg, Nix::Sid);
}
