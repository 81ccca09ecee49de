//! Real remote builds through nix-lazy-builder: a real nix-daemon runs our binary as its
//! `build-hook`, which builds the fake-aarch64 derivation on a real sshd-backed remote store
//! and brings the outputs back. Outputs must be valid locally with the right references and
//! deriver, the log must reach `nix-store -l` and the client, and nothing half-written may
//! remain on either side.
//!
//! The version matrix: every pair of Nix 2.8 (host), 2.26 (trixie chroot) and 2.34 (sid chroot)
//! as local daemon and remote store, over `ssh://` and `ssh-ng://` (18 builds, one test per pair
//! running both schemes against one daemon and one remote, each build with a derivation of its
//! own). The 2.26 daemon gets our hook through `NIX_CONFIG`, as it ignores `build-hook` in
//! nix.conf. Also both ways of giving the port: in the URI (`ssh://root@127.0.0.1:PORT`) and,
//! with a port-less URI, through `NIX_SSHOPTS=-p PORT` in the daemon's environment (as users of
//! Nix 2.8's and 2.26's own hook must do).
//!
//! Must never: pass without a real remote build by our hook (the remote must hold the outputs
//! and the copied input afterwards, and must not have had the input before; the client must
//! have seen our hook's own debug line).

use std::time::Instant;

use crate::harness::*;

/// Where the hook learns the builder's ssh port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortVia {
    /// `ssh://root@127.0.0.1:PORT …` in the machines line.
    Uri,
    /// `ssh://root@127.0.0.1 …` plus `NIX_SSHOPTS=-p PORT …` in the daemon's environment.
    NixSshOpts,
}

/// A remote of `remote_nix` and a `local` daemon running our hook, with no builders yet (each
/// build writes its machines line to `/etc/nix/machines`).
fn setup(local: Nix, remote_nix: Nix, port: PortVia) -> (RemoteStore, LocalDaemon) {
    let remote = RemoteStore::start(RemoteOpts::new(remote_nix));
    let mut opts = DaemonOpts::new(local).with_our_hook();
    if port == PortVia::NixSshOpts {
        // Exactly what a Nix 2.8 user sets for Nix's own hook, extra options included.
        opts.env
            .push(("NIX_SSHOPTS".to_owned(), remote.nix_sshopts(true)));
    }
    opts.machines = Some(String::new());
    let daemon = LocalDaemon::start(opts);
    let (hook, via) = daemon
        .configured_hook()
        .expect("the daemon has a build-hook");
    assert!(
        hook.starts_with(&*hook_binary().to_string_lossy()),
        "the daemon does not run our hook: {hook}"
    );
    assert_eq!(
        via == HookVia::NixConfigEnv,
        local.ignores_build_hook_in_nix_conf(),
        "{}: build-hook set through {via:?}",
        local.label()
    );
    let local_version = daemon.nix_version();
    assert!(
        local_version.contains(&local.version_marker()),
        "{local_version}"
    );
    assert!(
        remote.nix_version().contains(&remote_nix.version_marker()),
        "{}",
        remote.nix_version()
    );
    (remote, daemon)
}

/// One build of a fresh derivation named after `case` on `remote` over `scheme`, and every check
/// of it; returns how long the build took (`nix-build` of the aarch64 derivation, the input
/// already built).
fn build_on(
    case: &str,
    daemon: &LocalDaemon,
    remote: &RemoteStore,
    scheme: Scheme,
    port: PortVia,
) -> std::time::Duration {
    let with_port = port == PortVia::Uri;
    let line = remote.machines_line(&MachineLine::new(scheme, with_port));
    let uri = if with_port {
        remote.uri(scheme)
    } else {
        remote.uri_without_port(scheme)
    };
    assert!(
        line.starts_with(&format!("{uri} ")),
        "machines line {line:?} does not start with {uri:?}"
    );
    write(&daemon.machines_file(), &format!("{line}\n"));

    let drv = FakeDrv::new(&format!("nlb-{case}")).with_log_lines(3);
    let paths = drv.build_input(daemon);
    assert!(daemon.is_valid(&paths.input_out));
    assert!(
        !remote.is_valid(&paths.input_out),
        "remote had the input already"
    );
    assert!(
        !remote.is_valid(&paths.out),
        "remote had the output already"
    );

    let start = Instant::now();
    // -vv: the client's verbosity reaches the hook, which then sends its debug lines.
    let (paths, out) = drv.build(daemon, &["-vv"]);
    let took = start.elapsed();
    out.assert_success();
    out.assert_prints(&[&paths.out, &paths.dev], "nix-build's output paths");
    assert!(
        out.stderr.contains(&format!("'{}' on '{uri}'", paths.drv)),
        "the client was not told the build ran on {uri}:\n{out}"
    );
    assert!(
        out.stderr.contains("remote build finished"),
        "our hook did not report the build (is the daemon running another hook?):\n{out}"
    );
    for l in drv.expected_log_lines() {
        assert!(
            out.stderr.lines().any(|x| x.trim_end().ends_with(&l)),
            "the client did not see the log line {l:?}:\n{out}"
        );
    }
    assert!(!out.stderr.contains("error:"), "{out}");

    paths.assert_built(daemon, true);
    // It really was built over there, with the input we sent.
    paths.assert_built(remote, false);
    assert!(
        remote.is_valid(&paths.input_out),
        "the input was not copied"
    );
    daemon.assert_no_leftovers("local");
    remote.assert_no_leftovers("remote");
    took
}

/// Both schemes between a `local` daemon and a `remote_nix` remote, one set-up for both.
fn pair(local: Nix, remote_nix: Nix) {
    let start = Instant::now();
    let (remote, daemon) = setup(local, remote_nix, PortVia::Uri);
    let setup_time = start.elapsed();
    let mut times = Vec::new();
    for scheme in [Scheme::Ssh, Scheme::SshNg] {
        let case = format!(
            "{}-{}-{}",
            local.short().replace('.', ""),
            remote_nix.short().replace('.', ""),
            scheme.prefix().replace('-', "")
        );
        let took = build_on(&case, &daemon, &remote, scheme, PortVia::Uri);
        times.push(format!("{}: {took:.2?}", scheme.prefix()));
    }
    eprintln!(
        "[timing] pair {} -> {}: set-up {setup_time:.2?}, {}, total {:.2?}",
        local.short(),
        remote_nix.short(),
        times.join(", "),
        start.elapsed()
    );
}

#[test]
fn nix28_to_nix28() {
    pair(Nix::Host, Nix::Host);
}

#[test]
fn nix28_to_nix226() {
    pair(Nix::Host, Nix::Trixie);
}

#[test]
fn nix28_to_nix234() {
    pair(Nix::Host, Nix::Sid);
}

#[test]
fn nix226_to_nix28() {
    pair(Nix::Trixie, Nix::Host);
}

#[test]
fn nix226_to_nix226() {
    pair(Nix::Trixie, Nix::Trixie);
}

#[test]
fn nix226_to_nix234() {
    pair(Nix::Trixie, Nix::Sid);
}

#[test]
fn nix234_to_nix28() {
    pair(Nix::Sid, Nix::Host);
}

#[test]
fn nix234_to_nix226() {
    pair(Nix::Sid, Nix::Trixie);
}

#[test]
fn nix234_to_nix234() {
    pair(Nix::Sid, Nix::Sid);
}

/// The port from `NIX_SSHOPTS`, the URI without one.
fn port_from_nix_sshopts(scheme: Scheme) {
    let start = Instant::now();
    let (remote, daemon) = setup(Nix::Host, Nix::Host, PortVia::NixSshOpts);
    let case = format!("sshopts-{}", scheme.prefix().replace('-', ""));
    build_on(&case, &daemon, &remote, scheme, PortVia::NixSshOpts);
    eprintln!("[timing] {case}: {:.2?}", start.elapsed());
}

#[test]
fn port_from_nix_sshopts_over_ssh() {
    port_from_nix_sshopts(Scheme::Ssh);
}

#[test]
fn port_from_nix_sshopts_over_ssh_ng() {
    port_from_nix_sshopts(Scheme::SshNg);
}
