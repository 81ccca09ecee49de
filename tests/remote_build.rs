//! Real remote builds through nix-lazy-builder: a real nix-daemon runs our binary as its
//! `build-hook`, which builds the fake-aarch64 derivation on a real sshd-backed remote store
//! and brings the outputs back. Outputs must be valid locally with the right references and
//! deriver, the log must reach `nix-store -l`, and nothing half-written may remain.

mod common;

use common::*;

fn remote_build(case: &str, local: Nix, remote_nix: Nix, scheme: Scheme) {
    let remote = RemoteStore::start(RemoteOpts::new(remote_nix));
    let mut opts = DaemonOpts::new(local).with_our_hook();
    opts.builders = Some(remote.machines_line(&MachineLine::new(scheme, true)));
    let daemon = LocalDaemon::start(opts);
    eprintln!("{case}: local {}, remote {}", daemon.nix_version(), remote.nix_version());

    let drv = FakeDrv::new(&format!("nlb-{case}")).with_log_lines(3);
    let paths = drv.build_input(&daemon);
    assert!(!remote.is_valid(&paths.input_out));
    let (paths, out) = drv.build(&daemon, &[]);
    eprintln!("{out}");
    out.assert_success();
    paths.assert_built(&daemon, true);
    paths.assert_built(&remote, false);
    assert_eq!(daemon.invalid_leftovers(), Vec::<String>::new(), "local leftovers");
}

#[test]
fn nix28_to_nix28_over_ssh() {
    remote_build("28-28-ssh", Nix::Host, Nix::Host, Scheme::Ssh);
}

#[test]
fn nix28_to_nix28_over_ssh_ng() {
    remote_build("28-28-sshng", Nix::Host, Nix::Host, Scheme::SshNg);
}
