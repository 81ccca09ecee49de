//! Warm connections save logins and never keep a builder up: twenty builds in a row on one
//! always-on builder make at most two SSH logins (sshd's own log), over `ssh://` and
//! `ssh-ng://`; a lazy builder with warm sessions still stops at its idle timeout, its pool with
//! it, and nothing of the machine is left.
//!
//! Must never: pass without the warm path taken (hand-outs counted by the supervisor, logins by
//! sshd), or stop a process other than by its pid.

use std::time::{Duration, Instant};

use nix_lazy_builder::supervisor::proto::State;

use crate::harness::warm::*;
use crate::harness::*;

fn twenty_builds(scheme: Scheme) {
    let (remote, daemon) = always_on(Nix::Host, scheme);
    let uri = remote.uri(scheme);
    let before = remote.logins();
    let t0 = Instant::now();
    for i in 0..20 {
        build_ok(
            &daemon,
            &remote,
            &format!("warm-20-{}-{i}", scheme.prefix()),
        );
    }
    let logins = remote.logins() - before;
    let handed = hand_outs(&daemon, &uri);
    eprintln!(
        "20 builds over {}: {:.2?}, {logins} SSH login(s), {handed} warm session(s) handed out",
        scheme.prefix(),
        t0.elapsed()
    );
    assert!(
        logins <= 2,
        "{logins} logins for 20 builds:\n{}\n--- supervisor ---\n{}",
        remote.sshd_log(),
        supervisor_log(&daemon)
    );
    assert!(
        handed >= 18,
        "only {handed} hand-outs: {:?}",
        status(&daemon)
    );
}

#[test]
fn twenty_builds_make_at_most_two_logins_over_ssh() {
    twenty_builds(Scheme::Ssh);
}

#[test]
fn twenty_builds_make_at_most_two_logins_over_ssh_ng() {
    twenty_builds(Scheme::SshNg);
}

#[test]
fn a_lazy_builder_with_warm_sessions_stops_at_its_idle_timeout() {
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let idle = Duration::from_secs(4);
    let cfg = LazyConfig::write(&[remote.builder_toml(
        "lazy",
        Scheme::Ssh,
        &["aarch64-linux"],
        "max-jobs = 1\nidle-timeout = \"4s\"\nboot-timeout = \"60s\"",
        &remote.command_boot(Duration::ZERO),
    )]);
    let daemon = LocalDaemon::start(
        cfg.daemon_opts(Duration::from_secs(60))
            .env("NIX_LAZY_BUILDER_LOG", "nix_lazy_builder=debug,russh=debug"),
    );
    // The idle timer runs from the last build's release, which comes before its nix-build ends.
    let mut done = Instant::now();
    for i in 0..3 {
        let drv = FakeDrv::new(&format!("warm-lazy-{i}"));
        drv.build_input(&daemon);
        let (paths, out) = drv.build(&daemon, &["-vv"]);
        done = Instant::now();
        out.assert_success();
        paths.assert_built(&daemon, true);
        if i > 0 {
            assert!(out.stderr.contains("warm session handed over"), "{out}");
        }
        wait_until("the session ready", Duration::from_secs(20), || {
            cfg.status_of(&daemon, "lazy")
                .warm
                .is_some_and(|w| w.ready > 0)
        });
    }
    let st = cfg.status_of(&daemon, "lazy");
    assert_eq!(st.state, State::Up);
    let w = st.warm.expect("a warm connection");
    assert!(w.hand_outs >= 2 && w.ready > 0, "{w:?}");
    let sshd = remote.started_pid().expect("the machine's sshd");
    // Not a lease: stopped at its idle timeout, with sessions still pooled.
    let stopped = cfg.wait_for_state(&daemon, "lazy", State::Down, idle * 4);
    let after = done.elapsed();
    eprintln!("lazy builder with a warm pool stopped {after:.2?} after its last build");
    assert!(
        after >= idle - Duration::from_millis(500),
        "stopped early: {after:?}"
    );
    assert!(stopped.warm.is_none(), "its pool outlived it: {stopped:?}");
    let t0 = Instant::now();
    while alive(sshd) || !remote.processes().is_empty() {
        let left: Vec<String> = remote
            .processes()
            .iter()
            .map(|&p| format!("{p}: {:?}", cmdline(p)))
            .collect();
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the machine is not gone 10 s after its stop: {left:#?}\n{}",
            cfg.supervisor_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
