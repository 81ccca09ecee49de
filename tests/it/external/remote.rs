//! The external door to an always-on remote: the harness's real sshd with a real remote store
//! (Nix 2.8), named in the daemon's machines table, behind the sid chroot's Nix 2.34 daemon
//! whose `external-builders` runs our binary (`builders` is empty in its nix.conf, so Nix's own
//! hook has no machine and declines; our door reads the machines table itself), and a
//! supervisor started by hand with the default config.
//!
//! Checks: the aarch64 fake derivation with an x86_64 input is built over there, valid locally
//! with the right references, deriver and log (`nix-store -l`); once the supervisor keeps a
//! warm session to the builder, the next build takes one (the builder's hand-outs grow), and is
//! just as right.
//!
//! Must never: pass without a real remote build (the remote store must hold the outputs), or
//! let a hook take the build.

use crate::harness::warm::{hand_outs, supervisor_log, wait_warm};
use crate::harness::*;

use super::door::{default_build_socket, supervisor, with_external_builders};

#[test]
fn an_aarch64_derivation_is_built_on_an_always_on_remote_with_warm_sessions() {
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let mut opts = with_external_builders(DaemonOpts::new(Nix::Host));
    opts.machines = Some(remote.machines_line(&MachineLine::new(Scheme::Ssh, true)) + "\n");
    // Last wins: Nix's own hook gets no machines (ours reads /etc/nix/machines).
    opts.extra_conf.push("builders =".into());
    opts.expose.push(remote.dir().to_path_buf());
    let daemon = LocalDaemon::start(opts);
    let _supervisor = supervisor(&daemon, None, &default_build_socket(&daemon));
    let uri = remote.uri(Scheme::Ssh);

    let mut last_out = String::new();
    for (i, name) in ["ext-remote-1", "ext-remote-2"].into_iter().enumerate() {
        let before = hand_outs(&daemon, &uri);
        let drv = FakeDrv::new(name);
        let (paths, out) = drv.build(&daemon, &[]);
        assert!(
            out.success(),
            "{out}\n--- supervisor ---\n{}",
            supervisor_log(&daemon)
        );
        paths.assert_built(&daemon, true);
        assert!(
            remote.is_valid(&paths.out) && remote.is_valid(&paths.dev),
            "{} was not built on the remote",
            paths.out
        );
        let log = daemon.client("nix-store", &["-l", &paths.drv]);
        assert!(
            log.stdout.contains(&format!("building on '{uri}'")),
            "{log}"
        );
        if i == 0 {
            wait_warm(&daemon, &uri);
        } else {
            let after = hand_outs(&daemon, &uri);
            assert!(
                after > before,
                "the second build took no warm session ({before} → {after} hand-outs)\n{}",
                supervisor_log(&daemon)
            );
            eprintln!("warm hand-outs {before} → {after}");
        }
        last_out = out.stderr;
    }
    assert!(!last_out.contains("panicked"), "{last_out}");
    assert!(daemon.invalid_leftovers().is_empty());
}
