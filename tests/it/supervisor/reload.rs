//! The supervisor takes config changes without a restart, end to end: a real nix-daemon runs our
//! hook with a lazy-builder TOML; the supervisor the first build auto-starts is the one that, as
//! the file is rewritten, shows and boots a new builder (used by a real remote build), applies
//! a changed idle-timeout to the running instance, drains a removed builder that holds a lease
//! and lets it disappear once released, and, on SIGHUP with a broken file, keeps the config it
//! runs and says why in one log line.
//!
//! Must never: pass without real builds on the lazy machines, or leave a process behind (the
//! `LazyRemote`s kill what they started when dropped; the supervisor is stopped by its pid).

use std::time::{Duration, Instant};

use nix_lazy_builder::supervisor::proto::State;
use nix_lazy_builder::supervisor::{Client, ClientError, Verdict};

use crate::harness::*;

/// Long enough that the auto-started supervisor never exits on its own during the test.
const LINGER: Duration = Duration::from_secs(120);

fn command_builder(remote: &LazyRemote, name: &str, settings: &str) -> String {
    remote.builder_toml(
        name,
        Scheme::Ssh,
        &["aarch64-linux"],
        settings,
        &remote.command_boot(Duration::ZERO),
    )
}

/// Rewrites the config file in place with `[supervisor]` as [`LazyConfig::write`] wrote it.
fn rewrite(cfg: &LazyConfig, builders: &[String]) {
    let text = std::fs::read_to_string(cfg.path()).unwrap();
    let head: String = text
        .lines()
        .take_while(|l| !l.starts_with("[builders."))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(cfg.path(), head + &builders.join("\n")).unwrap();
}

fn names(cfg: &LazyConfig, daemon: &LocalDaemon) -> Vec<String> {
    cfg.status(daemon).into_iter().map(|s| s.name).collect()
}

fn reload_failures(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("config reload") && l.contains("failed"))
        .collect()
}

/// Stops the supervisor (by the pid from its hello) when the test ends, pass or fail.
struct StopSupervisor(Option<u32>);

impl Drop for StopSupervisor {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            // SAFETY: kill(2) on the supervisor this test's hook started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            let t0 = Instant::now();
            while alive(pid) && t0.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn config_changes_apply_to_the_running_supervisor() {
    let ra = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let rb = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let a_v1 = command_builder(
        &ra,
        "a",
        "max-jobs = 1\nidle-timeout = \"10m\"\nboot-timeout = \"60s\"",
    );
    let cfg = LazyConfig::write(std::slice::from_ref(&a_v1));
    let daemon = LocalDaemon::start(cfg.daemon_opts(LINGER));

    // 1. A build boots A; the supervisor knows A only.
    let (paths, out) = FakeDrv::new("reload-a").build(&daemon, &[]);
    out.assert_success();
    assert!(ra.is_valid(&paths.out), "not built on A");
    let pid = cfg.supervisor_pid().expect("a supervisor serves");
    let stop = StopSupervisor(Some(pid));
    wait_until("A's lease to be released", Duration::from_secs(10), || {
        cfg.status_of(&daemon, "a").leases == 0
    });
    let a = cfg.status_of(&daemon, "a");
    assert_eq!(a.state, State::Up, "{a:?}");
    assert!(a.idle_stop_in_ms.unwrap() <= 600_000, "{a:?}");
    assert_eq!(names(&cfg, &daemon), ["a"]);
    let a_sshd = ra.started_pid().expect("A's sshd pid");

    // 2. Rewrite: A's idle-timeout 10m → 1h, and B, the only builder for big-parallel. No
    //    signal, no restart: the next requests see the new file.
    let a_v2 = a_v1.replace("idle-timeout = \"10m\"", "idle-timeout = \"1h\"");
    assert_ne!(a_v1, a_v2);
    let b = command_builder(
        &rb,
        "b",
        "max-jobs = 1\nidle-timeout = \"10m\"\nboot-timeout = \"60s\"\n\
         features = [\"big-parallel\"]",
    );
    let t_edit = Instant::now();
    rewrite(&cfg, &[a_v2.clone(), b.clone()]);
    wait_until("the supervisor to show B", Duration::from_secs(10), || {
        names(&cfg, &daemon) == ["a", "b"]
    });
    eprintln!("status showed B {:.2?} after the edit", t_edit.elapsed());
    assert_eq!(cfg.supervisor_pid(), Some(pid), "the same supervisor");
    let a = cfg.status_of(&daemon, "a");
    assert_eq!(
        (a.state, a.boots),
        (State::Up, 1),
        "A keeps its instance: {a:?}"
    );
    assert!(alive(a_sshd));
    let idle = a.idle_stop_in_ms.unwrap();
    assert!(
        idle > 600_000 && idle <= 3_600_000,
        "A's new idle-timeout applies to the running instance: {a:?}"
    );
    let st_b = cfg.status_of(&daemon, "b");
    assert_eq!((st_b.state, st_b.boots), (State::Down, 0), "{st_b:?}");
    let log = cfg.supervisor_log();
    assert!(log.contains("config: new lazy builder 'b'"), "{log}");
    assert!(log.contains("config: builder 'a' changed"), "{log}");

    // 3. A build only B can do boots B and runs there.
    let (paths_b, out) = FakeDrv::new("reload-b")
        .with_features(&["big-parallel"])
        .build(&daemon, &[]);
    out.assert_success();
    assert!(rb.is_valid(&paths_b.out), "not built on B:\n{out}");
    assert!(!ra.is_valid(&paths_b.out));
    let st_b = cfg.status_of(&daemon, "b");
    assert_eq!(st_b.boots, 1, "{st_b:?}");
    assert_eq!(cfg.supervisor_pid(), Some(pid));

    // 4. Remove A while a client holds a lease on it: it drains, serves that lease, takes no
    //    new one, and disappears once the lease is released.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut holder = rt.block_on(Client::connect(&cfg.state_dir())).unwrap();
    assert!(matches!(
        rt.block_on(holder.lease("a")).unwrap(),
        Verdict::Granted(_)
    ));
    rewrite(&cfg, std::slice::from_ref(&b));
    wait_until("A to drain", Duration::from_secs(10), || {
        cfg.status_of(&daemon, "a").state == State::Draining
    });
    let a = cfg.status_of(&daemon, "a");
    assert_eq!(a.leases, 1, "{a:?}");
    assert!(alive(a_sshd), "a leased builder is never stopped");
    let mut other = rt.block_on(Client::connect(&cfg.state_dir())).unwrap();
    match rt.block_on(other.lease("a")).unwrap() {
        Verdict::Refused { reason, .. } => {
            assert!(reason.contains("removed from the config"), "{reason}")
        }
        v => panic!("a removed builder granted a lease: {v:?}"),
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(a_sshd), "still leased");
    rt.block_on(holder.release("a")).unwrap();
    wait_until("A to disappear", Duration::from_secs(20), || {
        names(&cfg, &daemon) == ["b"]
    });
    wait_until("A's machine to stop", Duration::from_secs(20), || {
        !alive(a_sshd) && ra.processes().is_empty()
    });
    assert_eq!(cfg.status_of(&daemon, "b").state, State::Up);

    // 5. A broken file and SIGHUP: the running config stays, one error line says why, and a
    //    request for a builder it does not know is told the parse error.
    let before = reload_failures(&cfg.supervisor_log()).len();
    rewrite(
        &cfg,
        &[b.clone(), "[builders.c]\nbogus-key = 1\n".to_owned()],
    );
    // SAFETY: kill(2) on the supervisor this test's hook started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) }, 0);
    wait_until(
        "the reload error in the log",
        Duration::from_secs(10),
        || reload_failures(&cfg.supervisor_log()).len() > before,
    );
    assert!(alive(pid), "SIGHUP must not end the supervisor");
    std::thread::sleep(Duration::from_millis(300));
    // (The CLI reads the broken file itself: ask the supervisor directly.)
    let st = rt.block_on(other.status()).unwrap();
    let shown: Vec<(&str, State)> = st.iter().map(|s| (s.name.as_str(), s.state)).collect();
    assert_eq!(shown, [("b", State::Up)], "the old config keeps running");
    let e = rt.block_on(other.lease("c")).unwrap_err();
    let text = match &e {
        ClientError::Server { message, .. } => message.clone(),
        other => panic!("{other:?}"),
    };
    assert!(
        text.contains("no lazy builder named 'c'") && text.contains("bogus-key"),
        "{text}"
    );
    let log = cfg.supervisor_log();
    let failures = reload_failures(&log);
    assert_eq!(failures.len(), before + 1, "one error line:\n{log}");
    let line = failures.last().unwrap();
    assert!(
        line.contains("SIGHUP")
            && line.contains("lazy-builder.toml:")
            && line.contains("bogus-key"),
        "{line}"
    );
    assert!(line.contains("ERROR"), "{line}");

    // 6. Fixed again: picked up without a signal.
    rewrite(&cfg, &[b, a_v2]);
    wait_until("A to come back", Duration::from_secs(10), || {
        names(&cfg, &daemon) == ["b", "a"]
    });
    assert_eq!(cfg.status_of(&daemon, "a").state, State::Down);
    assert_eq!(cfg.supervisor_pid(), Some(pid));
    for l in cfg.supervisor_log().lines() {
        if l.contains("config reload") {
            eprintln!("{l}");
        }
    }
    drop(holder);
    drop(other);
    drop(stop);
    assert!(!alive(pid), "the supervisor did not stop on SIGTERM");
}
