//! The harness' part for warm connections (the `warm` area): a daemon whose only builder is an
//! always-on remote with our hook and the default `keep-warm`, the supervisor its hooks start
//! (pid, log, `status --json`, its warm sessions and hand-outs), and small builds checked end to
//! end.
//!
//! Must never: stop a process other than by its pid, or read anything but the daemon's own
//! namespace and state directory.

use std::time::{Duration, Instant};

use nix_lazy_builder::supervisor::proto::{BuilderStatus, WarmStatus};

use super::{
    CmdOutput, DaemonOpts, FakeDrv, LocalDaemon, MachineLine, Nix, RemoteOpts, RemoteStore, Scheme,
    StoreQueries, lazy_binary,
};

/// A real remote store and a daemon whose only builder is it (always on, from the machines
/// table), with our hook, the default `keep-warm` and the hook's debug log.
pub fn always_on(nix: Nix, scheme: Scheme) -> (RemoteStore, LocalDaemon) {
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
pub fn supervisor(daemon: &LocalDaemon) -> Option<u32> {
    daemon
        .processes()
        .into_iter()
        .find(|(_, argv)| argv.iter().any(|a| a == "supervise"))
        .map(|(p, _)| p)
}

/// Its log (the default state directory, inside the daemon's `/nix`).
pub fn supervisor_log(daemon: &LocalDaemon) -> String {
    std::fs::read_to_string(daemon.dir().join("nix/var/nix/lazy-builder/supervisor.log"))
        .unwrap_or_default()
}

/// `status --json` in the daemon's namespace.
#[track_caller]
pub fn status(daemon: &LocalDaemon) -> Vec<BuilderStatus> {
    let out = daemon.client(&lazy_binary().to_string_lossy(), &["status", "--json"]);
    out.assert_success();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json: {e}\n{out}"))
}

/// The warm connection to `builder`, if the supervisor keeps one.
pub fn warm(daemon: &LocalDaemon, builder: &str) -> Option<WarmStatus> {
    status(daemon)
        .into_iter()
        .find(|s| s.name == builder)
        .and_then(|s| s.warm)
}

/// Sessions handed out to `builder`'s hooks so far (0 without a warm connection).
pub fn hand_outs(daemon: &LocalDaemon, builder: &str) -> u64 {
    warm(daemon, builder).map_or(0, |w| w.hand_outs)
}

/// Waits until the supervisor has a session to `builder` ready.
#[track_caller]
pub fn wait_warm(daemon: &LocalDaemon, builder: &str) {
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
pub fn build_ok(daemon: &LocalDaemon, remote: &RemoteStore, name: &str) -> CmdOutput {
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
pub fn warm_up(daemon: &LocalDaemon, remote: &RemoteStore, uri: &str, name: &str) {
    build_ok(daemon, remote, &format!("{name}-warm-up"));
    wait_warm(daemon, uri);
}

/// [`always_on`] with Nix 2.8 on both sides, warmed up ([`warm_up`] with a build named after
/// `tag` and the scheme): the remote, the daemon and the builder's URI.
pub fn warmed(scheme: Scheme, tag: &str) -> (RemoteStore, LocalDaemon, String) {
    let (remote, daemon) = always_on(Nix::Host, scheme);
    let uri = remote.uri(scheme);
    warm_up(
        &daemon,
        &remote,
        &uri,
        &format!("{tag}-{}", scheme.prefix()),
    );
    (remote, daemon, uri)
}

/// After a fault (`test`): the next build on `remote` succeeds, the one after it is handed a
/// warm session to `uri` again, and the local store is clean; builds are named after `name`.
#[track_caller]
pub fn assert_next_builds_warm_again(
    test: &str,
    daemon: &LocalDaemon,
    remote: &RemoteStore,
    uri: &str,
    name: &str,
) {
    build_ok(daemon, remote, &format!("{name}-next"));
    wait_warm(daemon, uri);
    let out = build_ok(daemon, remote, &format!("{name}-next-warm"));
    assert!(out.stderr.contains("warm session handed over"), "{out}");
    super::fault::assert_store_clean(daemon, &format!("{test}, next builds"));
    eprintln!("[fault] {test}: survived");
}

/// Sends `signal` to `pid` (one the caller found in its own test's process tree).
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid of the caller's own test.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}
