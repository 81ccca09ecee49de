//! `ssh-ng://` builds on a remote nix-daemon that does not trust the SSH user: a real Nix 2.34
//! remote (sid chroot) run as `nix-daemon --stdio --force-untrusted` (through a wrapper given as
//! `?remote-program=`), behind a real Nix 2.8 daemon running our hook.
//!
//! Such a daemon refuses unsigned input-addressed paths and BuildDerivation of input-addressed
//! derivations. The hook must copy only the closure of the `.drv` (derivations and sources, all
//! content-addressed), never the input's output, and have the remote build from its own store
//! with BuildPathsWithResults — the remote then builds the input itself. Outputs come back as
//! usual, and failures read as they do on the trusted path.
//!
//! The same remote, trusted (plain `nix-daemon --stdio` as root), must still take the old path:
//! the input's output is uploaded and no `.drv` reaches the remote.
//!
//! Must never: pass without a real remote build, or pass when the input's output was uploaded
//! to the untrusted remote instead of built there.

use std::time::Instant;

use crate::harness::*;

/// The log line the input's builder prints (see `FakeDrv::expr`).
fn input_log_line(name: &str) -> String {
    format!("nlb-log {name}-input: building")
}

/// A Nix 2.34 remote and a Nix 2.8 daemon whose only builder is that remote over `ssh-ng://`,
/// untrusting (`--force-untrusted`) or with the default trust (root over stdio: trusted).
/// Returns the store URI the hook reports.
fn setup(untrusted: bool) -> (RemoteStore, LocalDaemon, String) {
    let remote = RemoteStore::start(RemoteOpts::trust_override());
    let trusted = remote.uri(Scheme::SshNg);
    let uri = if untrusted {
        remote.untrusting_ssh_ng_uri()
    } else {
        trusted.clone()
    };
    let line = remote
        .machines_line(&MachineLine::new(Scheme::SshNg, true))
        .replacen(&trusted, &uri, 1);
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    opts.builders = Some(line);
    let daemon = LocalDaemon::start(opts);
    (remote, daemon, uri)
}

fn build(case: &str, untrusted: bool) {
    let start = Instant::now();
    let (remote, daemon, uri) = setup(untrusted);
    assert!(
        remote.nix_version().contains("(Nix) 2.34."),
        "{}",
        remote.nix_version()
    );
    let name = format!("nlb-{case}");
    let drv = FakeDrv::new(&name).with_log_lines(3);
    let paths = drv.build_input(&daemon);
    assert!(daemon.is_valid(&paths.input_out));
    for p in [&paths.input_out, &paths.input_drv, &paths.drv, &paths.out] {
        assert!(!remote.is_valid(p), "remote had {p} already");
    }

    let build_start = Instant::now();
    // -vv: the client's verbosity reaches the hook, which then sends its debug lines.
    let (paths, out) = drv.build(&daemon, &["-vv"]);
    let build_time = build_start.elapsed();
    out.assert_success();
    assert!(
        out.stderr.contains(&format!("'{}' on '{uri}'", paths.drv)),
        "the client was not told the build ran on {uri}:\n{out}"
    );
    for l in drv.expected_log_lines() {
        assert!(
            out.stderr.lines().any(|x| x.trim_end().ends_with(&l)),
            "the client did not see the log line {l:?}:\n{out}"
        );
    }
    // Valid locally with the right references, deriver, contents and stored log.
    paths.assert_built(&daemon, true);
    // Built over there.
    paths.assert_built(&remote, false);
    assert!(remote.is_valid(&paths.input_out), "no input on the remote");
    let remote_input_log = remote.build_log(&paths.input_drv);

    if untrusted {
        assert!(
            out.stderr.contains("does not trust us")
                && out.stderr.contains("BuildPathsWithResults"),
            "the hook did not say it took the untrusted path:\n{out}"
        );
        // The .drv closure went over, and the remote built the input itself: it has the
        // input's build log, which an uploaded path would not have.
        assert!(remote.is_valid(&paths.drv), "the .drv was not copied");
        assert!(
            remote.is_valid(&paths.input_drv),
            "the input .drv was not copied"
        );
        let log = remote_input_log.unwrap_or_else(|| {
            panic!(
                "the remote has no build log for {}: the input's output was uploaded, not built there",
                paths.input_drv
            )
        });
        assert!(
            log.contains(&input_log_line(&name)),
            "input log on the remote:\n{log}"
        );
        // The input's build output is not part of this derivation's log.
        let local_log = daemon.build_log(&paths.drv).expect("local build log");
        assert!(
            !local_log.contains(&input_log_line(&name)),
            "the input's build output leaked into {}'s log:\n{local_log}",
            paths.drv
        );
    } else {
        assert!(
            out.stderr
                .contains("copying the missing inputs and building with BuildDerivation (trust: Some(Trusted))"),
            "the hook did not say it took the trusted path:\n{out}"
        );
        // The old path: the input's output was uploaded (no build log there) and no .drv sent.
        assert_eq!(
            remote_input_log, None,
            "the trusted remote built the input instead of receiving it"
        );
        assert!(!remote.is_valid(&paths.drv), "a .drv reached the remote");
        assert!(!remote.is_valid(&paths.input_drv));
    }
    assert_eq!(daemon.invalid_leftovers(), Vec::<String>::new());
    assert_eq!(remote.invalid_leftovers(), Vec::<String>::new());
    eprintln!(
        "[timing] {case}: nix-build {:.2?}, whole test {:.2?}",
        build_time,
        start.elapsed()
    );
}

#[test]
fn untrusted_remote_builds_from_the_drv_closure() {
    build("untrusted", true);
}

#[test]
fn trusted_remote_keeps_build_derivation() {
    build("trusted", false);
}

/// A failing build on the untrusted path reads exactly like one on the trusted path: Nix's
/// `build of '<drv>' on '<uri>' failed: …` with the remote's reason, and hook exit status 100.
#[test]
fn untrusted_remote_failure_is_reported_like_nix() {
    let (remote, daemon, uri) = setup(true);
    let drv = FakeDrv::new("nlb-untrusted-fail").failing(3);
    drv.build_input(&daemon);
    let (paths, out) = drv.build(&daemon, &[]);
    out.assert_failure();
    // Exactly one failure line from the hook.
    out.hook_failure(&paths.drv, &uri);
    // Nix 2.34's wording of the remote's reason, on the lines after ours.
    assert!(
        out.stderr.contains(&format!(
            "failed: Cannot build '{}'.\nReason: builder failed with exit code 3.",
            paths.drv
        )),
        "the remote's reason is missing:\n{out}"
    );
    assert!(
        out.stderr.contains(&format!(
            "error: builder for '{}' failed with exit code 100",
            paths.drv
        )),
        "the hook did not exit 100:\n{out}"
    );
    // The remote really tried: it has the .drv and built the input itself.
    assert!(remote.is_valid(&paths.drv));
    assert!(remote.build_log(&paths.input_drv).is_some());
    assert!(!remote.is_valid(&paths.out));
    assert_eq!(daemon.invalid_leftovers(), Vec::<String>::new());
    assert_eq!(remote.invalid_leftovers(), Vec::<String>::new());
}

/// A `.drv` whose closure holds an unsigned input-addressed path (an input's output taken in as
/// a plain source with `builtins.storePath`) cannot reach an untrusting remote: the hook fails
/// with the remote's refusal, naming the builder and the fix, instead of a confusing error.
#[test]
fn untrusted_remote_refusing_the_closure_is_explained() {
    let (remote, daemon, uri) = setup(true);
    let paths = FakeDrv::new("nlb-untrusted-src").build_input(&daemon);
    let file = daemon.write_file(
        "nlb-untrusted-src-main.nix",
        &DrvExpr::sh("nlb-untrusted-src-main", "aarch64-linux", "cat $inp > $out")
            .store_path("inp", &paths.input_out)
            .nix(),
    );
    let out = daemon.nix_build(&[&file.to_string_lossy()]);
    out.assert_failure();
    let want = format!(
        "error: '{uri}' does not trust its SSH user and refused the derivation's closure: \
         cannot add path '{}' because it lacks a signature by a trusted key",
        paths.input_out
    );
    assert!(out.stderr.contains(&want), "want {want:?} in:\n{out}");
    assert!(
        out.stderr
            .contains("add that user to `trusted-users` in the builder's nix.conf"),
        "the fix is not named:\n{out}"
    );
    assert!(!remote.is_valid(&paths.input_out));
    assert_eq!(daemon.invalid_leftovers(), Vec::<String>::new());
    assert_eq!(remote.invalid_leftovers(), Vec::<String>::new());
}
