//! Real remote builds through nix-lazy-builder: a real nix-daemon runs our binary as its
//! `build-hook`, which builds the fake-aarch64 derivation on a real sshd-backed remote store
//! and brings the outputs back. Outputs must be valid locally with the right references and
//! deriver, the log must reach `nix-store -l` and the client, and nothing half-written may
//! remain on either side.
//!
//! Covers every pairing of Nix 2.8 (host) and 2.34 (sid chroot) as local daemon and remote
//! store, over `ssh://` and `ssh-ng://`, and both ways of giving the port: in the URI
//! (`ssh://root@127.0.0.1:PORT`) and, with a port-less URI, through `NIX_SSHOPTS=-p PORT` in
//! the daemon's environment (as Nix 2.8 users must do for Nix's own hook).
//!
//! Must never: pass without a real remote build (the remote must hold the outputs and the
//! copied input afterwards, and must not have had the input before).

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

fn remote_build(case: &str, local: Nix, remote_nix: Nix, scheme: Scheme, port: PortVia) {
    let start = Instant::now();
    let remote = RemoteStore::start(RemoteOpts::new(remote_nix));
    let mut opts = DaemonOpts::new(local).with_our_hook();
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
    if port == PortVia::NixSshOpts {
        // Exactly what a Nix 2.8 user sets for Nix's own hook, extra options included.
        opts.env
            .push(("NIX_SSHOPTS".to_owned(), remote.nix_sshopts(true)));
    }
    opts.builders = Some(line);
    let daemon = LocalDaemon::start(opts);
    let conf = std::fs::read_to_string(daemon.conf_file()).expect("read the daemon's nix.conf");
    let hook = hook_binary().to_string_lossy().into_owned();
    assert!(
        conf.lines()
            .any(|l| l.starts_with("build-hook = ") && l.contains(&hook)),
        "the daemon does not run our hook:\n{conf}"
    );
    let local_version = daemon.nix_version();
    eprintln!(
        "{case}: local {local_version}, remote {}",
        remote.nix_version()
    );
    let want_version = |n: Nix| match n {
        Nix::Host => "(Nix) 2.8.",
        Nix::Sid => "(Nix) 2.34.",
    };
    assert!(
        local_version.contains(want_version(local)),
        "{local_version}"
    );
    assert!(
        remote.nix_version().contains(want_version(remote_nix)),
        "{}",
        remote.nix_version()
    );

    let drv = FakeDrv::new(&format!("nlb-{case}")).with_log_lines(3);
    let paths = drv.build_input(&daemon);
    assert!(daemon.is_valid(&paths.input_out));
    assert!(
        !remote.is_valid(&paths.input_out),
        "remote had the input already"
    );
    assert!(
        !remote.is_valid(&paths.out),
        "remote had the output already"
    );

    let (paths, out) = drv.build(&daemon, &[]);
    out.assert_success();
    let mut printed = out.stdout_lines();
    printed.sort();
    let mut want = vec![paths.out.clone(), paths.dev.clone()];
    want.sort();
    assert_eq!(printed, want, "nix-build's output paths:\n{out}");
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
    assert!(!out.stderr.contains("error:"), "{out}");

    paths.assert_built(&daemon, true);
    // It really was built over there, with the input we sent.
    paths.assert_built(&remote, false);
    assert!(
        remote.is_valid(&paths.input_out),
        "the input was not copied"
    );
    assert_eq!(
        daemon.invalid_leftovers(),
        Vec::<String>::new(),
        "local leftovers"
    );
    assert_eq!(
        remote.invalid_leftovers(),
        Vec::<String>::new(),
        "remote leftovers"
    );
    eprintln!("[timing] {case}: {:.2?}", start.elapsed());
}

#[test]
fn nix28_to_nix28_over_ssh() {
    remote_build("28-28-ssh", Nix::Host, Nix::Host, Scheme::Ssh, PortVia::Uri);
}

#[test]
fn nix28_to_nix28_over_ssh_ng() {
    remote_build(
        "28-28-sshng",
        Nix::Host,
        Nix::Host,
        Scheme::SshNg,
        PortVia::Uri,
    );
}

#[test]
fn nix28_to_nix234_over_ssh() {
    remote_build("28-234-ssh", Nix::Host, Nix::Sid, Scheme::Ssh, PortVia::Uri);
}

#[test]
fn nix28_to_nix234_over_ssh_ng() {
    remote_build(
        "28-234-sshng",
        Nix::Host,
        Nix::Sid,
        Scheme::SshNg,
        PortVia::Uri,
    );
}

#[test]
fn nix234_to_nix28_over_ssh() {
    remote_build("234-28-ssh", Nix::Sid, Nix::Host, Scheme::Ssh, PortVia::Uri);
}

#[test]
fn nix234_to_nix28_over_ssh_ng() {
    remote_build(
        "234-28-sshng",
        Nix::Sid,
        Nix::Host,
        Scheme::SshNg,
        PortVia::Uri,
    );
}

#[test]
fn nix234_to_nix234_over_ssh() {
    remote_build("234-234-ssh", Nix::Sid, Nix::Sid, Scheme::Ssh, PortVia::Uri);
}

#[test]
fn nix234_to_nix234_over_ssh_ng() {
    remote_build(
        "234-234-sshng",
        Nix::Sid,
        Nix::Sid,
        Scheme::SshNg,
        PortVia::Uri,
    );
}

#[test]
fn port_from_nix_sshopts_over_ssh() {
    remote_build(
        "sshopts-ssh",
        Nix::Host,
        Nix::Host,
        Scheme::Ssh,
        PortVia::NixSshOpts,
    );
}

#[test]
fn port_from_nix_sshopts_over_ssh_ng() {
    remote_build(
        "sshopts-sshng",
        Nix::Host,
        Nix::Host,
        Scheme::SshNg,
        PortVia::NixSshOpts,
    );
}
