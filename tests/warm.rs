//! Warm connections against real sshd remote stores and a real nix-daemon (Nix 2.8) running
//! our hook: the supervisor (started by the first hook) keeps each builder's SSH connection
//! with remote sessions ready, and builds take one over.
//!
//! - Twenty builds in a row on one builder make at most two SSH logins (sshd's own log).
//! - No supervisor (absent, or one that cannot start) or a killed one: the build goes direct
//!   and succeeds, and the next one is warm again.
//! - The supervisor SIGKILLed while it relays an upload or a download: that build fails
//!   cleanly (Nix's exit status, an error naming the builder, nothing invalid or half-written
//!   left), and the next build succeeds.
//! - sshd restarted between builds, and a pooled session's remote program killed where the
//!   supervisor cannot see it yet: the next build succeeds (taking over the dead session and
//!   falling back to a direct connection without noticing), and the pool recovers.
//! - The host key changed while a connection was pooled: refused at the next connect, by the
//!   hook and by the supervisor, with today's message; no login.
//! - A lazy builder with warm sessions still stops at its idle timeout, its pool with it.
//! - Failing builds, fixed-output builds and an untrusting `ssh-ng://` daemon behave as on a
//!   connection of the hook's own, through a warm session (checked: it was handed out).
//!
//! Must never: pass without the warm path taken where it says so (hand-outs counted by the
//! supervisor, logins by sshd), or stop a process other than by its pid.

mod common;
mod fault_support;

use std::time::{Duration, Instant};

use common::*;
use fault_support::*;
use nix_lazy_builder::supervisor::proto::{BuilderStatus, State, WarmStatus};

/// A real remote store and a daemon whose only builder is it (always on, from the machines
/// table), with our hook and the default `keep-warm`.
fn always_on(nix: Nix, scheme: Scheme) -> (RemoteStore, LocalDaemon) {
    let remote = RemoteStore::start(RemoteOpts::new(nix));
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    opts.machines = Some(remote.machines_line(&MachineLine::new(scheme, true)) + "\n");
    opts.env.push((
        "NIX_LAZY_BUILDER_LOG".into(),
        "nix_lazy_builder=debug".into(),
    ));
    let daemon = LocalDaemon::start(opts);
    (remote, daemon)
}

/// The supervisor the daemon's hooks started (it runs in the daemon's namespace).
fn supervisor(daemon: &LocalDaemon) -> Option<u32> {
    daemon
        .processes()
        .into_iter()
        .find(|(_, argv)| argv.iter().any(|a| a == "supervise"))
        .map(|(p, _)| p)
}

/// Its log (the default state directory, inside the daemon's `/nix`).
fn supervisor_log(daemon: &LocalDaemon) -> String {
    std::fs::read_to_string(daemon.dir().join("nix/var/nix/lazy-builder/supervisor.log"))
        .unwrap_or_default()
}

/// `status --json` in the daemon's namespace.
#[track_caller]
fn status(daemon: &LocalDaemon) -> Vec<BuilderStatus> {
    let out = daemon.client(&lazy_binary().to_string_lossy(), &["status", "--json"]);
    out.assert_success();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json: {e}\n{out}"))
}

/// The warm connection to `builder`, if the supervisor keeps one.
fn warm(daemon: &LocalDaemon, builder: &str) -> Option<WarmStatus> {
    status(daemon)
        .into_iter()
        .find(|s| s.name == builder)
        .and_then(|s| s.warm)
}

fn hand_outs(daemon: &LocalDaemon, builder: &str) -> u64 {
    warm(daemon, builder).map_or(0, |w| w.hand_outs)
}

/// Waits until the supervisor has a session to `builder` ready.
#[track_caller]
fn wait_ready(daemon: &LocalDaemon, builder: &str) {
    let t0 = Instant::now();
    loop {
        if warm(daemon, builder).is_some_and(|w| w.connected && w.ready > 0) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no warm session to '{builder}' after 20 s: {:?}\n{}",
            status(daemon),
            supervisor_log(daemon)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One small build, checked: valid locally with its references, built on `remote`.
#[track_caller]
fn build_ok(daemon: &LocalDaemon, remote: &RemoteStore, name: &str) -> CmdOutput {
    let drv = FakeDrv::new(name);
    drv.build_input(daemon);
    let (paths, out) = drv.build(daemon, &["-vv"]);
    assert!(
        out.success(),
        "{out}\n--- supervisor ---\n{}",
        supervisor_log(daemon)
    );
    paths.assert_built(daemon, true);
    assert!(remote.is_valid(&paths.out), "not built on the remote");
    out
}

/// Warms the pool up: a first build (direct, starts the supervisor), then sessions ready.
#[track_caller]
fn warm_up(daemon: &LocalDaemon, remote: &RemoteStore, uri: &str, name: &str) {
    build_ok(daemon, remote, &format!("{name}-warm-up"));
    wait_ready(daemon, uri);
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid the caller just found in its own test's process tree.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

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
    wait_ready(&daemon, &uri);
    let out = build_ok(&daemon, &remote, "warm-absent-2");
    assert!(out.stderr.contains("warm session handed over"), "{out}");
    assert_eq!(hand_outs(&daemon, &uri), 1);

    // Killed before a build: that build goes direct (a stale socket) and starts a new one.
    kill(first, libc::SIGKILL);
    wait_until("the supervisor to die", Duration::from_secs(5), || {
        !alive(first)
    });
    let before = remote.logins();
    build_ok(&daemon, &remote, "warm-killed-1");
    assert!(remote.logins() > before, "no direct login after the kill");
    let second = supervisor(&daemon).expect("a new supervisor");
    assert_ne!(second, first);
    wait_ready(&daemon, &uri);
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

/// The supervisor SIGKILLed while it relays `phase` of a build on a warm session.
fn supervisor_killed(phase: Phase, scheme: Scheme) {
    let test = format!(
        "supervisor killed during {phase:?} over {}",
        scheme.prefix()
    );
    let mut rng = FaultRng::new(&test);
    let (remote, daemon) = always_on(Nix::Host, scheme);
    let uri = remote.uri(scheme);
    warm_up(
        &daemon,
        &remote,
        &uri,
        &format!("warm-sk-{}", scheme.prefix()),
    );
    let sup = supervisor(&daemon).expect("a supervisor");
    let name = format!(
        "warm-sk-{}-{}",
        format!("{phase:?}").to_lowercase(),
        scheme.prefix()
    );
    let paths = phase_drv(&name, phase).prepare(&daemon);
    let mut build = Background::nix_build(&daemon, &paths.build_args());
    let store = remote.host_nix_dir().join("store");
    let point = wait_for_point(&mut rng, phase, &mut build, &paths, &store, &daemon);
    // The build runs on a warm session: the supervisor relays it.
    let w = warm(&daemon, &uri).expect("a warm connection");
    assert_eq!(
        (w.in_use, w.hand_outs),
        (1, 1),
        "the build is not on a warm session: {w:?}"
    );
    assert!(still_in_phase(phase, &build, &paths, &store, &daemon));
    kill(sup, libc::SIGKILL);
    eprintln!("[fault] {test}: killed supervisor {sup} at {point}");
    let out = build.finish(Duration::from_secs(120));
    out.assert_failure();
    // Nix 2.8's client through a daemon exits 1 for a failed build (as for a dead builder).
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("error:") && l.contains(&uri)),
        "no error naming {uri}:\n{out}"
    );
    assert!(
        out.stderr
            .contains("supervisor that relayed this warm session went away"),
        "the error does not say why:\n{out}"
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
    paths.assert_absent(&daemon, &test);
    assert_store_clean(&daemon, &test);
    assert_no_strays(&daemon, supervisor(&daemon), Duration::from_secs(10));

    // Not wedged: the next build succeeds (direct, a new supervisor), and the one after is warm.
    build_ok(&daemon, &remote, &format!("{name}-next"));
    wait_ready(&daemon, &uri);
    let out = build_ok(&daemon, &remote, &format!("{name}-next-warm"));
    assert!(out.stderr.contains("warm session handed over"), "{out}");
    assert_store_clean(&daemon, &format!("{test}, next builds"));
    eprintln!("[fault] {test}: survived");
}

#[test]
fn supervisor_sigkilled_mid_upload_over_ssh() {
    supervisor_killed(Phase::Upload, Scheme::Ssh);
}

#[test]
fn supervisor_sigkilled_mid_upload_over_ssh_ng() {
    supervisor_killed(Phase::Upload, Scheme::SshNg);
}

#[test]
fn supervisor_sigkilled_mid_download_over_ssh() {
    supervisor_killed(Phase::Download, Scheme::Ssh);
}

#[test]
fn supervisor_sigkilled_mid_download_over_ssh_ng() {
    supervisor_killed(Phase::Download, Scheme::SshNg);
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
    wait_ready(&daemon, &uri);
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
    let (remote, daemon) = always_on(Nix::Host, scheme);
    let uri = remote.uri(scheme);
    warm_up(
        &daemon,
        &remote,
        &uri,
        &format!("warm-pk-{}", scheme.prefix()),
    );
    let programs = pooled_programs(&remote, program);
    assert!(!programs.is_empty(), "no pooled {program} on the remote");
    let session = parent_of(programs[0]).expect("its sshd session process");
    // Freeze the sshd process that carries the pool's connection, so that the supervisor
    // cannot hear of the programs' death before it hands one out; kill them; build.
    kill(session, libc::SIGSTOP);
    for &p in &programs {
        kill(p, libc::SIGKILL);
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
    kill(session, libc::SIGCONT);
    let out = build.finish(Duration::from_secs(60));
    assert!(out.success(), "{out}\n{}", supervisor_log(&daemon));
    assert!(
        out.stderr.contains("failed before its first answer"),
        "the hook did not take over the dead session:\n{out}"
    );
    assert!(remote.logins() > logins, "no direct connection replaced it");
    // The pool recovers.
    wait_ready(&daemon, &uri);
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
    for i in 0..3 {
        let drv = FakeDrv::new(&format!("warm-lazy-{i}"));
        drv.build_input(&daemon);
        let (paths, out) = drv.build(&daemon, &["-vv"]);
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
    let done = Instant::now();
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

#[test]
fn a_failing_build_on_a_warm_session_fails_as_today() {
    for scheme in [Scheme::Ssh, Scheme::SshNg] {
        let (remote, daemon) = always_on(Nix::Host, scheme);
        let uri = remote.uri(scheme);
        warm_up(
            &daemon,
            &remote,
            &uri,
            &format!("warm-fail-{}", scheme.prefix()),
        );
        let drv = FakeDrv::new(&format!("warm-fail-{}", scheme.prefix())).failing(3);
        drv.build_input(&daemon);
        let (paths, out) = drv.build(&daemon, &[]);
        out.assert_failure();
        assert_eq!(out.code(), Some(1), "{out}");
        assert_eq!(hand_outs(&daemon, &uri), 1, "not on a warm session");
        let ours: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| {
                l.starts_with(&format!(
                    "error: build of '{}' on '{uri}' failed: ",
                    paths.drv
                ))
            })
            .collect();
        assert_eq!(ours.len(), 1, "{out}");
        assert!(
            ours[0].contains(&format!(
                "builder for '{}' failed with exit code 3",
                paths.drv
            )),
            "{out}"
        );
        assert!(
            out.stderr.contains(&format!(
                "error: builder for '{}' failed with exit code 100",
                paths.drv
            )),
            "{out}"
        );
        for l in drv
            .expected_log_lines()
            .iter()
            .chain(drv.failure_line().iter())
        {
            assert!(
                out.stderr.lines().any(|x| x == l),
                "no log line {l:?}:\n{out}"
            );
        }
        assert!(!daemon.is_valid(&paths.out));
        assert!(daemon.invalid_leftovers().is_empty());
    }
}

/// A fixed-output derivation for aarch64 (the remote must build it) with known contents.
fn fixed_output(daemon: &LocalDaemon, name: &str) -> (String, String) {
    use sha2::Digest;
    let text = format!("{name}: fixed\n");
    let hash: String = sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let expr = daemon.write_file(
        &format!("{name}.nix"),
        &format!(
            r#"derivation {{
  name = "{name}";
  system = "aarch64-linux";
  builder = "/bin/sh";
  args = [ "-c" "printf '%s\n' '{name}: fixed' > $out" ];
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = "{hash}";
}}
"#
        ),
    );
    (expr.to_string_lossy().into_owned(), text)
}

#[test]
fn a_fixed_output_build_on_a_warm_session_as_today() {
    for scheme in [Scheme::Ssh, Scheme::SshNg] {
        let (remote, daemon) = always_on(Nix::Host, scheme);
        let uri = remote.uri(scheme);
        warm_up(
            &daemon,
            &remote,
            &uri,
            &format!("warm-fod-{}", scheme.prefix()),
        );
        let (expr, text) = fixed_output(&daemon, &format!("warm-fod-{}", scheme.prefix()));
        let out = daemon.nix_build(&[&expr]);
        out.assert_success();
        assert_eq!(hand_outs(&daemon, &uri), 1, "not on a warm session");
        let path = out.stdout.trim().to_owned();
        assert!(daemon.is_valid(&path) && remote.is_valid(&path), "{out}");
        let on_disk = std::fs::read_to_string(
            daemon
                .host_nix_dir()
                .join("store")
                .join(path.trim_start_matches("/nix/store/")),
        )
        .expect("the output");
        assert_eq!(on_disk, text);
    }
}

#[test]
fn an_untrusting_ssh_ng_daemon_on_a_warm_session_as_today() {
    // A Nix 2.34 remote as `nix-daemon --stdio --force-untrusted`: the handshake the
    // supervisor did must carry its "not trusted" to the hook, which then copies the .drv
    // closure and builds with BuildPathsWithResults (an input-addressed build would be
    // refused otherwise).
    let mut ro = RemoteOpts::new(Nix::Sid);
    ro.extra_conf
        .push("extra-experimental-features = daemon-trust-override".to_owned());
    let remote = RemoteStore::start(ro);
    let wrapper = remote.dir().join("nix-daemon-untrusted");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nexec nix-daemon \"$@\" --force-untrusted\n",
    )
    .expect("write the wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod the wrapper");
    let plain = remote.uri(Scheme::SshNg);
    let uri = format!("{plain}?remote-program={}", wrapper.display());
    let line = remote
        .machines_line(&MachineLine::new(Scheme::SshNg, true))
        .replacen(&plain, &uri, 1);
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    opts.machines = Some(line + "\n");
    let daemon = LocalDaemon::start(opts);
    warm_up(&daemon, &remote, &uri, "warm-untrusted");
    let drv = FakeDrv::new("warm-untrusted").with_log_lines(2);
    let paths = drv.build_input(&daemon);
    let (paths2, out) = drv.build(&daemon, &["-vv"]);
    out.assert_success();
    assert_eq!(paths.out, paths2.out);
    assert!(out.stderr.contains("warm session handed over"), "{out}");
    assert!(
        out.stderr.contains("does not trust us") && out.stderr.contains("BuildPathsWithResults"),
        "the hook did not take the untrusted path:\n{out}"
    );
    paths2.assert_built(&daemon, true);
    assert!(remote.is_valid(&paths.drv), "the .drv was not copied");
    assert!(
        remote.build_log(&paths.input_drv).is_some(),
        "the input was uploaded, not built there"
    );
}
