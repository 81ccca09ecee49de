//! The second front door: Nix 2.34's `external-builders` (the sid chroot's daemon, experimental
//! feature on, Nix's own hook with no builders so it declines) running `nix-lazy-builder
//! external-build` as the build user, against a supervisor started by hand (the program cannot
//! start one) and a lazy `command` builder (the harness's real sshd with its own store, booted
//! by the supervisor only when the build needs it).
//!
//! Checks: the aarch64 fake derivation with an x86_64 input built there, outputs valid locally
//! with the right references, deriver and log; a failing build reaches the user with its log
//! and registers nothing; a process outside the build-users group is refused on the build
//! socket; hostile build.json files are refused with a clear error and nothing is written.
//!
//! Must never: pass without a real remote build (the lazy machine must hold the outputs), or
//! let our build hook take the build (the daemon's hook is Nix's own, with no machines).

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::*;

/// A lazy `command` builder `cmd` for aarch64-linux behind a Nix 2.34 daemon whose
/// `external-builders` runs our binary, and a supervisor started by hand.
pub(super) struct Door {
    pub(super) remote: LazyRemote,
    pub(super) cfg: LazyConfig,
    pub(super) daemon: LocalDaemon,
    pub(super) _supervisor: Background,
}

/// `opts` (made for Nix 2.8) turned into a Nix 2.34 daemon (the sid chroot's) with
/// `external-builders` running our binary for aarch64-linux, the binary's directory visible.
pub(super) fn with_external_builders(mut opts: DaemonOpts) -> DaemonOpts {
    opts.nix = Nix::Sid;
    let bin = lazy_binary();
    opts.extra_conf
        .push("experimental-features = external-builders".into());
    opts.extra_conf.push(format!(
        "external-builders = [{{\"systems\": [\"aarch64-linux\"], \"program\": \"{}\", \"args\": [\"external-build\"]}}]",
        bin.display()
    ));
    if let Some(d) = bin.parent() {
        opts.expose.push(d.to_path_buf());
    }
    opts
}

/// A supervisor started by hand in `daemon`'s namespace (with `config`, else the default
/// path), once its build socket `socket` (a host path) is there.
pub(super) fn supervisor(
    daemon: &LocalDaemon,
    config: Option<&std::path::Path>,
    socket: &std::path::Path,
) -> Background {
    supervisor_with(daemon, config, socket, None)
}

/// [`supervisor`] with `nix_config` as its `NIX_CONFIG` (Nix's configuration as it reads it).
fn supervisor_with(
    daemon: &LocalDaemon,
    config: Option<&std::path::Path>,
    socket: &std::path::Path,
    nix_config: Option<&str>,
) -> Background {
    let mut sup = daemon.client_command(&lazy_binary().to_string_lossy());
    sup.arg("supervise");
    if let Some(c) = config {
        sup.env(nix_lazy_builder::config::CONFIG_ENV_VAR, c);
    }
    if let Some(n) = nix_config {
        sup.env("NIX_CONFIG", n);
    }
    let supervisor = Background::spawn(&mut sup);
    wait_until("the build socket", Duration::from_secs(20), || {
        socket.exists()
    });
    supervisor
}

/// [`setup`] with `cmd`'s builder keys `settings`, its boot `delay`ed, and the daemon options
/// edited by `edit` before it starts.
pub(super) fn setup_with(
    settings: &str,
    delay: Duration,
    edit: impl FnOnce(&mut DaemonOpts),
) -> Door {
    setup_full(settings, delay, edit, None)
}

/// [`setup_with`] with the supervisor's `NIX_CONFIG`.
fn setup_full(
    settings: &str,
    delay: Duration,
    edit: impl FnOnce(&mut DaemonOpts),
    supervisor_nix_config: Option<&str>,
) -> Door {
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let cfg = LazyConfig::write(&[remote.builder_toml(
        "cmd",
        Scheme::Ssh,
        &["aarch64-linux"],
        settings,
        &remote.command_boot(delay),
    )]);
    // The build user reads the config and reaches the build socket beside the state dir.
    set_mode(cfg.dir.path(), 0o755);
    let mut opts = with_external_builders(cfg.daemon_opts(Duration::from_secs(20)));
    // Nix's own hook, with no machines: it declines, and the external builder is used.
    opts.build_hook = None;
    opts.expose.push(cfg.dir.path().to_path_buf());
    opts.expose.push(remote.dir().to_path_buf());
    edit(&mut opts);
    let daemon = LocalDaemon::start(opts);
    let supervisor = supervisor_with(
        &daemon,
        Some(&cfg.path()),
        &build_socket(&cfg),
        supervisor_nix_config,
    );
    assert!(
        !remote.listening(),
        "the lazy machine runs before any build"
    );
    Door {
        remote,
        cfg,
        daemon,
        _supervisor: supervisor,
    }
}

fn setup(settings: &str) -> Door {
    setup_with(settings, Duration::from_millis(500), |_| {})
}

pub(super) fn build_socket(cfg: &LazyConfig) -> PathBuf {
    nix_lazy_builder::external::build_socket_path(&cfg.state_dir())
}

/// The build socket (a host path) of a supervisor with the default state directory in
/// `daemon`'s namespace.
pub(super) fn default_build_socket(daemon: &LocalDaemon) -> PathBuf {
    nix_lazy_builder::external::build_socket_path(&daemon.dir().join("nix/var/nix/lazy-builder"))
}

#[test]
fn an_aarch64_derivation_is_built_on_a_lazy_builder_through_external_builders() {
    let d = setup("max-jobs = 1\nidle-timeout = \"30s\"\nboot-timeout = \"60s\"");
    let drv = FakeDrv::new("ext1");
    let (paths, out) = drv.build(&d.daemon, &[]);
    out.assert_success();
    paths.assert_built(&d.daemon, true);
    assert!(
        d.remote.is_valid(&paths.out),
        "{} was not built on the lazy machine",
        paths.out
    );
    // The boot showed on the build log.
    let log = d.daemon.client("nix-store", &["-l", &paths.drv]);
    eprintln!("BUILD LOG:\n{}\nNIX-BUILD:\n{}", log.stdout, out.stderr);
    assert!(log.stdout.contains("booting builder 'cmd'"), "{log}");
    assert!(log.stdout.contains("building on 'ssh://"), "{log}");
    assert!(d.daemon.invalid_leftovers().is_empty());
    let _ = &d.cfg;
}

#[test]
fn a_failing_build_reaches_the_user_and_registers_nothing() {
    let d = setup("max-jobs = 1\nidle-timeout = \"30s\"\nboot-timeout = \"60s\"");
    let drv = FakeDrv::new("ext2").failing(3);
    let (paths, out) = drv.build(&d.daemon, &[]);
    assert!(!out.status.success(), "{out}");
    let line = drv
        .failure_line()
        .expect("a failing drv has a failure line");
    assert!(out.stderr.contains(&line), "the remote's log tail: {out}");
    assert!(out.stderr.contains("failed"), "{out}");
    assert!(!d.daemon.is_valid(&paths.out) && !d.daemon.is_valid(&paths.dev));
    assert!(d.daemon.invalid_leftovers().is_empty());
}

/// The gid of `group` in `daemon`'s namespace (its chroot's group database).
fn gid_in(daemon: &LocalDaemon, group: &str) -> u32 {
    let out = daemon.client("getent", &["group", group]);
    out.assert_success();
    out.stdout
        .split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .unwrap_or_else(|| panic!("no gid for '{group}': {out}"))
}

/// The build socket's mode and group, then what `nobody` (uid and gid 65534) is told when it
/// asks for a build with the socket opened up, so that only the peer check stands.
fn socket_group_and_nobodys_answer(d: &Door) -> (u32, CmdOutput) {
    let socket = build_socket(&d.cfg);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o660,
        "{}",
        socket.display()
    );
    set_mode(&socket, 0o666);
    let mut c = d.daemon.client_command("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(lazy_binary())
        .arg("external-build");
    let bj = d
        .daemon
        .write_file("build.json", &build_json("aarch64-linux"));
    set_mode(&bj, 0o644);
    c.arg(&bj)
        .env(nix_lazy_builder::config::CONFIG_ENV_VAR, d.cfg.path());
    (
        meta.gid(),
        run_command(&mut c, None, Duration::from_secs(60)),
    )
}

#[test]
fn only_root_and_build_users_may_use_the_build_socket() {
    let d = setup("max-jobs = 1");
    let (gid, out) = socket_group_and_nobodys_answer(&d);
    // Nothing names a build-users group for the supervisor: Nix's default.
    assert_eq!(gid, gid_in(&d.daemon, "nixbld"), "the build socket's group");
    assert!(!out.status.success(), "{out}");
    assert!(
        out.stderr.contains("refused")
            && out.stderr.contains("uid 65534")
            && out.stderr.contains("'nixbld'"),
        "{out}"
    );
    assert!(!d.remote.listening(), "a refused client booted a builder");
}

#[test]
fn the_build_socket_admits_the_group_nix_names_as_build_users_group() {
    // Nix's configuration names `nogroup` (gid 65534): the socket is that group's, and
    // `nobody` gets past the peer check (its build fails later: it cannot write the store).
    let d = setup_full(
        "max-jobs = 1",
        Duration::from_millis(500),
        |_| {},
        Some("build-users-group = nogroup"),
    );
    let (gid, out) = socket_group_and_nobodys_answer(&d);
    assert_eq!(
        gid,
        gid_in(&d.daemon, "nogroup"),
        "the build socket's group"
    );
    assert!(!out.stderr.contains("refused"), "{out}");
    // Past the peer check: the request was served, so the lazy builder booted for it (the
    // build itself fails: `nobody` cannot write the store).
    assert!(
        d.remote.listening(),
        "an admitted client's request did not boot the builder: {out}"
    );
    assert!(!out.status.success(), "{out}");
}

fn build_json(system: &str) -> String {
    serde_json::json!({
        "version": 1, "builder": "/bin/sh", "args": ["-c", "echo x > $out"],
        "env": {"out": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-ext-probe"},
        "topTmpDir": "/tmp/nlb-ext-top", "tmpDir": "/tmp/nlb-ext-top/build",
        "tmpDirInSandbox": "/build", "storeDir": "/nix/store", "realStoreDir": "/nix/store",
        "system": system, "inputPaths": [],
        "outputs": {"out": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-ext-probe"}
    })
    .to_string()
}

#[test]
fn hostile_build_json_is_refused_and_nothing_is_written() {
    let d = setup("max-jobs = 1");
    let victim = d.daemon.dir().join("victim");
    let cases: Vec<(&str, serde_json::Value)> = vec![
        (
            "dotdot",
            serde_json::json!({"out": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a/../../../tmp/x"}),
        ),
        (
            "outside",
            serde_json::json!({"out": victim.to_string_lossy()}),
        ),
        (
            "etc",
            serde_json::json!({"out": "/etc/0123456789abcdfghijklmnpqrsvwxyz-passwd"}),
        ),
    ];
    for (name, outputs) in cases {
        let mut v: serde_json::Value = serde_json::from_str(&build_json("aarch64-linux")).unwrap();
        v["outputs"] = outputs;
        let out = run_client(&d, name, &v.to_string());
        assert!(!out.status.success(), "{name}: {out}");
        assert!(
            out.stderr.contains("is not a store path in '/nix/store'"),
            "{name}: {out}"
        );
        assert!(!out.stderr.contains("panicked"), "{name}: {out}");
    }
    let mut v: serde_json::Value = serde_json::from_str(&build_json("aarch64-linux")).unwrap();
    v["version"] = 2.into();
    let out = run_client(&d, "version", &v.to_string());
    assert!(out.stderr.contains("build.json is version 2"), "{out}");
    v["version"] = 1.into();
    v["builder"] = format!("/{}", "b".repeat(1 << 20)).into();
    let out = run_client(&d, "huge", &v.to_string());
    assert!(
        out.stderr.contains("'builder' is 1048577 bytes long"),
        "{out}"
    );
    let out = run_client(&d, "garbage", "{\"version\": 1, \"outputs\": [");
    assert!(out.stderr.contains("not valid JSON"), "{out}");
    assert!(!victim.exists());
    assert!(
        !d.remote.listening(),
        "a refused build.json booted a builder"
    );
}

fn run_client(d: &Door, name: &str, text: &str) -> CmdOutput {
    let bj = d.daemon.write_file(&format!("{name}.json"), text);
    let mut c = d.daemon.client_command(&lazy_binary().to_string_lossy());
    c.arg("external-build")
        .arg(&bj)
        .env(nix_lazy_builder::config::CONFIG_ENV_VAR, d.cfg.path());
    run_command(&mut c, None, Duration::from_secs(60))
}
