//! The `command` boot backend against real processes: a real OpenSSH sshd in its own mount
//! namespace with its own `/nix` (a separate "machine" with a real Nix), readiness through the
//! pinned host key, the stop paths (stop signal, stop command, escalation to SIGKILL), a command
//! that fails at once, one that never opens its port, a wrong host key, and process-group
//! cleanup when the instance is dropped or the supervisor itself is SIGKILLed.

use std::path::Path;
use std::time::{Duration, Instant};

use nix_lazy_builder::boot::{self, BootError, StopHow, StopStep};

use crate::harness::boot::*;
use crate::harness::*;

fn command_builder(
    sshd: &Sshd,
    command: &[&str],
    extra: &str,
) -> nix_lazy_builder::config::Builder {
    builder(
        "cmd",
        &format!("ssh://root@127.0.0.1:{}", sshd.port),
        &["x86_64-linux"],
        &sshd.client_key,
        &sshd.host_key_line,
        &format!(
            "kind = \"command\"\ncommand = {}\n{extra}",
            toml_list(command)
        ),
    )
}

/// An sshd fixture with its own `/nix`, and the boot command that starts it in a mount
/// namespace of its own (needs root).
fn namespaced_sshd() -> (Sshd, String) {
    require_root();
    let sshd = Sshd::new();
    let script = sshd.namespaced_start_script();
    (sshd, script.to_str().unwrap().to_owned())
}

/// A command whose shell leaves a grandchild behind it (its pid in `grandchild.pid`).
const WITH_GRANDCHILD: [&str; 3] = [
    "/bin/sh",
    "-c",
    "sleep 300 & echo $! > grandchild.pid; wait",
];

fn quick_stop() -> StopHow {
    StopHow {
        graceful_timeout: Duration::from_secs(2),
        signal_timeout: Duration::from_secs(2),
        ..StopHow::graceful(None)
    }
}

#[tokio::test]
async fn sshd_with_its_own_store_is_ready_and_stops_by_signal() {
    let (sshd, script) = namespaced_sshd();
    let b = command_builder(&sshd, &[&script], "");

    let t0 = Instant::now();
    let mut s = Started::new(&sshd, b).await;
    assert_eq!(
        s.inst.ssh_port(),
        None,
        "a command builder uses the URI's port"
    );
    assert!(s.inst.accel().is_none());
    let pid = s.inst.pid().unwrap();
    let ready = s.ready(60).await;
    eprintln!(
        "command sshd ready in {:?} ({} banner attempts): {}",
        t0.elapsed(),
        ready.attempts,
        ready.nix_version
    );
    assert!(
        ready.nix_version.starts_with("nix-store (Nix) "),
        "{}",
        ready.nix_version
    );
    // It really is another machine's store: its /nix is the fixture's empty directory.
    let marker = sshd.path().join("nix/marker-from-host");
    std::fs::write(&marker, "x").unwrap();
    let listing = ssh(sshd.port, &sshd.client_key, &sshd.host_key_line, "ls /nix");
    assert!(
        listing.lines().any(|l| l == "marker-from-host"),
        "the remote's /nix is not the fixture's: {listing}"
    );
    // sshd's own log went to command.log in the state dir.
    let log = std::fs::read_to_string(s.ctx.dir.join("command.log")).unwrap();
    assert!(log.contains("Server listening on 127.0.0.1"), "{log}");

    let report = s.inst.stop(quick_stop()).await;
    eprintln!("{report}");
    assert_eq!(report.step, StopStep::StopSignal(libc::SIGTERM), "{report}");
    assert!(report.failed_steps.is_empty(), "{report}");
    assert!(
        report.to_string().contains("stopped by SIGTERM"),
        "{report}"
    );
    assert!(!alive(pid));
    assert!(!port_open(sshd.port), "sshd still listening after stop");
}

#[tokio::test]
async fn stop_command_stops_it() {
    let (sshd, script) = namespaced_sshd();
    let stopped = sshd.path().join("stop-ran");
    let stop = format!(
        "echo \"$NIX_LAZY_BUILDER_BUILDER $NIX_LAZY_BUILDER_PID\" > {}; kill -TERM \"$NIX_LAZY_BUILDER_PID\"",
        stopped.display()
    );
    let b = command_builder(
        &sshd,
        &[&script],
        &format!("stop-command = {}", toml_list(&["/bin/sh", "-c", &stop])),
    );
    let mut s = Started::new(&sshd, b).await;
    let pid = s.inst.pid().unwrap();
    s.ready_within(60).await.expect("ready");
    let report = s.inst.stop(quick_stop()).await;
    eprintln!("{report}");
    assert_eq!(report.step, StopStep::StopCommand, "{report}");
    assert_eq!(
        std::fs::read_to_string(&stopped).unwrap().trim(),
        format!("cmd {pid}"),
        "the stop command got the builder name and the pid"
    );
    assert!(!alive(pid));
    assert!(!port_open(sshd.port));
}

#[tokio::test]
async fn command_that_exits_at_once_names_the_exit_and_its_last_line() {
    let sshd = Sshd::new();
    let b = command_builder(
        &sshd,
        &[
            "/bin/sh",
            "-c",
            "echo starting; echo 'fatal: cannot open /etc/builder.conf' >&2; exit 1",
        ],
        "",
    );
    let mut s = Started::new(&sshd, b).await;
    let t0 = Instant::now();
    let err = s.ready_within(60).await.expect_err("must fail");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    assert!(matches!(err, BootError::Exited { .. }), "{err:?}");
    assert!(
        msg.starts_with("boot command /bin/sh exited with status 1 before it was ready"),
        "{msg}"
    );
    assert!(
        msg.ends_with(": fatal: cannot open /etc/builder.conf"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    // stop() of an already exited instance says so.
    let report = s.inst.stop(StopHow::forced()).await;
    assert_eq!(report.step, StopStep::AlreadyExited);
}

#[tokio::test]
async fn command_that_never_opens_its_port_times_out() {
    let sshd = Sshd::new(); // only for its (unused) port and keys
    let mut s = Started::new(&sshd, command_builder(&sshd, &["sleep", "300"], "")).await;
    let t0 = Instant::now();
    let err = s.ready_within(3).await.expect_err("must time out");
    let took = t0.elapsed();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert_eq!(
        msg,
        format!(
            "no SSH banner on 127.0.0.1:{} within boot-timeout (waited 3s; last try: \
             connection refused)",
            sshd.port
        )
    );
    let pid = s.inst.pid().unwrap();
    let report = s.inst.stop(quick_stop()).await;
    assert_eq!(report.step, StopStep::StopSignal(libc::SIGTERM));
    assert!(!alive(pid));
}

#[tokio::test]
async fn wrong_host_key_fails_at_once() {
    let (sshd, script) = namespaced_sshd();
    // Pin another key than the server's.
    let other = sshd.path().join("other_key");
    keygen(&other, "someone-else");
    let other_line = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let b = builder(
        "cmd",
        &format!("ssh://root@127.0.0.1:{}", sshd.port),
        &["x86_64-linux"],
        &sshd.client_key,
        other_line.trim(),
        &format!("kind = \"command\"\ncommand = {}\n", toml_list(&[&script])),
    );
    let mut s = Started::new(&sshd, b).await;
    let t0 = Instant::now();
    let err = s.ready_within(60).await.expect_err("must fail");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, BootError::Ssh(_)), "{err:?}");
    assert!(msg.contains("HOST KEY MISMATCH"), "{msg}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "a wrong host key must not be retried until the deadline ({:?})",
        t0.elapsed()
    );
    s.inst.stop(quick_stop()).await;
}

#[tokio::test]
async fn ignored_stop_signal_escalates_to_sigkill() {
    let sshd = Sshd::new();
    // The shell and its sleep ignore SIGTERM (an ignored signal stays ignored across exec).
    let b = command_builder(&sshd, &["/bin/sh", "-c", "trap '' TERM; sleep 300"], "");
    let s = Started::new(&sshd, b).await;
    let pid = s.inst.pid().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let how = StopHow {
        graceful_timeout: Duration::from_millis(500),
        signal_timeout: Duration::from_millis(500),
        ..StopHow::graceful(None)
    };
    let report = s.inst.stop(how).await;
    eprintln!("{report}");
    assert_eq!(report.step, StopStep::Kill, "{report}");
    assert_eq!(report.failed_steps.len(), 2, "{report}");
    assert!(report.failed_steps[0].starts_with("SIGTERM: still running"));
    assert!(report.failed_steps[1].starts_with("SIGTERM to the process group: still running"));
    assert!(
        report
            .to_string()
            .contains("was killed by signal 9 (SIGKILL)")
    );
    assert!(report.took < Duration::from_secs(3), "{:?}", report.took);
    assert!(!alive(pid));
}

#[tokio::test]
async fn dropping_the_instance_kills_the_process_group() {
    let sshd = Sshd::new();
    let s = Started::new(&sshd, command_builder(&sshd, &WITH_GRANDCHILD, "")).await;
    let leader = s.inst.pid().unwrap();
    let gc = read_pid(&s.ctx.dir.join("grandchild.pid"), Duration::from_secs(10));
    assert!(alive(gc) && alive(leader));
    drop(s.inst);
    assert_group_gone(leader, gc, "the drop");
}

/// Asserts that a process group's `leader` and its grandchild `gc` are gone within 5 s of
/// `event`.
#[track_caller]
fn assert_group_gone(leader: u32, gc: u32, event: &str) {
    assert!(
        wait_gone(gc, Duration::from_secs(5)),
        "grandchild {gc} survived {event}"
    );
    assert!(
        wait_gone(leader, Duration::from_secs(5)),
        "leader {leader} survived {event}"
    );
}

/// Env var that turns the helper test below into a fake supervisor.
const HELPER_ENV: &str = "NLB_BOOT_TEST_FAKE_SUPERVISOR_DIR";

/// The supervisor is SIGKILLed (no destructor runs): the watchdog still kills the backend's
/// whole process group.
#[test]
fn supervisor_death_takes_the_process_group_along() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut helper = std::process::Command::new(exe)
        .args(one_test_args(module_path!(), "fake_supervisor_helper"))
        .env(HELPER_ENV, dir.path())
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn helper");
    let leader = read_pid(&dir.path().join("leader.pid"), Duration::from_secs(60));
    let gc = read_pid(&dir.path().join("grandchild.pid"), Duration::from_secs(60));
    assert!(alive(leader) && alive(gc));
    // SIGKILL the fake supervisor: nothing of ours runs in it any more.
    // SAFETY: kill on a pid we spawned.
    unsafe { libc::kill(helper.id() as i32, libc::SIGKILL) };
    let _ = helper.wait();
    assert_group_gone(leader, gc, "the supervisor's death");
}

/// Not a test on its own: run by `supervisor_death_takes_the_process_group_along`.
#[tokio::test]
#[ignore = "helper process for supervisor_death_takes_the_process_group_along"]
async fn fake_supervisor_helper() {
    let Some(dir) = std::env::var_os(HELPER_ENV) else {
        panic!("run by supervisor_death_takes_the_process_group_along only");
    };
    let dir = Path::new(&dir);
    // Under the test's directory: this process is SIGKILLed, so nothing of its own is removed.
    let sshd = Sshd::new_in(dir);
    let b = command_builder(&sshd, &WITH_GRANDCHILD, "");
    let ctx = boot::BootContext::new(&b, dir.to_owned());
    let inst = start(&b, &ctx).await;
    std::fs::write(dir.join("leader.pid"), inst.pid().unwrap().to_string()).unwrap();
    tokio::time::sleep(Duration::from_secs(300)).await;
    drop(inst);
}
