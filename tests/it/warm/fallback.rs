//! A warm session is never worse than a cold one: with no supervisor (none yet, one killed, one
//! that cannot start) the build goes direct and succeeds; after sshd restarted, or with a
//! pooled session's remote program killed where the supervisor cannot see it yet, the next
//! build succeeds (the dead session replaced by a direct connection without the build
//! noticing) and the pool recovers; a host key changed while pooled is refused at the next
//! connect, by the hook and the supervisor, with today's message and no login.
//!
//! Must never: pass without the warm path taken where it says so (hand-outs counted by the
//! supervisor, logins by sshd), or stop a process other than by its pid.

use std::time::Duration;

use crate::harness::warm::*;
use crate::harness::*;

#[test]
fn without_a_supervisor_the_build_goes_direct_and_starts_one() {
    let (remote, daemon) = always_on(Nix::Host, Scheme::Ssh);
    let uri = remote.uri(Scheme::Ssh);
    assert!(supervisor(&daemon).is_none());
    let before = remote.logins();
    let out = build_ok(&daemon, &remote, "warm-absent-1");
    assert!(
        out.stderr.contains("no supervisor for warm sessions"),
        "the first build did not find the supervisor absent:\n{out}"
    );
    assert!(remote.logins() > before, "no direct login");
    // It started one for the next build.
    let first = supervisor(&daemon).expect("the hook started a supervisor");
    wait_warm(&daemon, &uri);
    let out = build_ok(&daemon, &remote, "warm-absent-2");
    assert!(out.stderr.contains("warm session handed over"), "{out}");
    assert_eq!(hand_outs(&daemon, &uri), 1);

    // Killed before a build: that build goes direct (a stale socket) and starts a new one.
    signal(first, libc::SIGKILL);
    wait_until("the supervisor to die", Duration::from_secs(5), || {
        !alive(first)
    });
    let before = remote.logins();
    build_ok(&daemon, &remote, "warm-killed-1");
    assert!(remote.logins() > before, "no direct login after the kill");
    let second = supervisor(&daemon).expect("a new supervisor");
    assert_ne!(second, first);
    wait_warm(&daemon, &uri);
    let out = build_ok(&daemon, &remote, "warm-killed-2");
    assert!(out.stderr.contains("warm session handed over"), "{out}");
    assert_eq!(
        hand_outs(&daemon, &uri),
        1,
        "a new supervisor counts afresh"
    );
}

#[test]
fn a_supervisor_that_cannot_start_leaves_the_build_direct() {
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    opts.machines = Some(remote.machines_line(&MachineLine::new(Scheme::SshNg, true)) + "\n");
    let daemon = LocalDaemon::start(opts);
    // A state directory that is a file: no supervisor can ever serve there.
    let blocker = daemon.write_file("not-a-directory", "");
    let toml = daemon.write_file(
        "lazy-builder.toml",
        &format!(
            "[supervisor]\nstate-dir = {}\n",
            toml_str(&blocker.to_string_lossy())
        ),
    );
    std::fs::copy(&toml, daemon.etc_nix_dir().join("lazy-builder.toml"))
        .expect("install the config");
    for i in 0..3 {
        build_ok(&daemon, &remote, &format!("warm-cannot-start-{i}"));
    }
    assert!(supervisor(&daemon).is_none());
}

#[test]
fn sshd_restarted_between_builds() {
    let (mut remote, daemon) = always_on(Nix::Host, Scheme::Ssh);
    let uri = remote.uri(Scheme::Ssh);
    warm_up(&daemon, &remote, &uri, "warm-restart");
    build_ok(&daemon, &remote, "warm-restart-1");
    let handed = hand_outs(&daemon, &uri);
    assert!(handed >= 1);
    remote.restart(false);
    build_ok(&daemon, &remote, "warm-restart-2");
    // The pool recovers: warm again.
    wait_warm(&daemon, &uri);
    let out = build_ok(&daemon, &remote, "warm-restart-3");
    assert!(out.stderr.contains("warm session handed over"), "{out}");
    assert!(hand_outs(&daemon, &uri) > handed);
}

/// The remote programs of the pooled sessions (children of one sshd session process).
fn pooled_programs(remote: &RemoteStore, program: &str) -> Vec<u32> {
    remote
        .processes()
        .into_iter()
        .filter(|&p| {
            cmdline(p).is_some_and(|a| a.iter().any(|w| w.contains(program)) && a.len() > 1)
        })
        .collect()
}

fn pooled_program_killed(scheme: Scheme, program: &str) {
    let (remote, daemon, uri) = warmed(scheme, "warm-pk");
    let programs = pooled_programs(&remote, program);
    assert!(!programs.is_empty(), "no pooled {program} on the remote");
    let session = parent_of(programs[0]).expect("its sshd session process");
    // Freeze the sshd process that carries the pool's connection, so that the supervisor
    // cannot hear of the programs' death before it hands one out; kill them; build.
    signal(session, libc::SIGSTOP);
    for &p in &programs {
        signal(p, libc::SIGKILL);
    }
    let logins = remote.logins();
    let drv = FakeDrv::new(&format!("warm-pk-{}-dead", scheme.prefix()));
    let paths = drv.build_input(&daemon);
    let args: Vec<String> = [
        paths.file.to_string_lossy().as_ref(),
        "-A",
        "main.out",
        "-A",
        "main.dev",
        "-vv",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut build = Background::nix_build(&daemon, &args);
    build.wait_line("warm session handed over", Duration::from_secs(30));
    // Let the dead session's end reach the supervisor (and the hook) only now.
    std::thread::sleep(Duration::from_millis(300));
    signal(session, libc::SIGCONT);
    let out = build.finish(Duration::from_secs(60));
    assert!(out.success(), "{out}\n{}", supervisor_log(&daemon));
    assert!(
        out.stderr.contains("failed before its first answer"),
        "the hook did not take over the dead session:\n{out}"
    );
    assert!(remote.logins() > logins, "no direct connection replaced it");
    // The pool recovers.
    wait_warm(&daemon, &uri);
    let out = build_ok(
        &daemon,
        &remote,
        &format!("warm-pk-{}-after", scheme.prefix()),
    );
    assert!(out.stderr.contains("warm session handed over"), "{out}");
}

#[test]
fn a_pooled_session_whose_remote_program_died_is_replaced_over_ssh() {
    pooled_program_killed(Scheme::Ssh, "--serve");
}

#[test]
fn a_pooled_session_whose_remote_program_died_is_replaced_over_ssh_ng() {
    pooled_program_killed(Scheme::SshNg, "--stdio");
}

#[test]
fn a_host_key_changed_while_pooled_is_refused_at_the_next_connect() {
    let mut remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    // Nowhere else to build: the refusal is the build's end.
    opts.max_jobs = 0;
    opts.machines = Some(remote.machines_line(&MachineLine::new(Scheme::Ssh, true)) + "\n");
    let daemon = &LocalDaemon::start(opts);
    let uri = remote.uri(Scheme::Ssh);
    warm_up(daemon, &remote, &uri, "warm-hk");
    let pinned = remote.host_key_line().to_owned();
    remote.restart(true);
    assert_ne!(remote.host_key_line(), pinned);
    let logins = remote.logins();
    let build = |i: u32| {
        let drv = FakeDrv::new(&format!("warm-hk-{i}"));
        drv.build_input(daemon);
        let (paths, out) = drv.build(daemon, &[]);
        out.assert_failure();
        assert!(!daemon.is_valid(&paths.out));
        assert!(!remote.is_valid(&paths.out), "built on the impostor");
        out
    };
    let refused_now = |out: &CmdOutput| {
        let refused: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with(&format!("error: cannot build on '{uri}': ")))
            .collect();
        assert_eq!(refused.len(), 1, "{out}");
        assert!(
            refused[0].contains("HOST KEY MISMATCH: expected SHA256:")
                && refused[0].contains("refusing to connect"),
            "not today's message:\n{out}"
        );
    };
    // The next connect is refused, with today's message.
    refused_now(&build(0));
    // As today, the failure is remembered for a while: the next build is declined at once,
    // naming it.
    let out = build(1);
    assert!(
        out.stderr.contains("failed recently") && out.stderr.contains("HOST KEY MISMATCH"),
        "{out}"
    );
    // Once that ran out, the next connect is refused again (no warm session meanwhile).
    std::thread::sleep(Duration::from_secs(11));
    refused_now(&build(2));
    // The supervisor's own connect was refused as well, and said so.
    wait_until("the supervisor's refusal", Duration::from_secs(20), || {
        warm(daemon, &uri)
            .and_then(|w| w.last_failure)
            .is_some_and(|f| f.contains("HOST KEY MISMATCH"))
    });
    assert!(!warm(daemon, &uri).is_some_and(|w| w.connected));
    assert_eq!(
        remote.logins(),
        logins,
        "a login under the changed key:\n{}",
        remote.sshd_log()
    );
}
