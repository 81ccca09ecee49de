//! The `darling` boot backend, through a STAND-IN `darling` script (tests/fixtures/darling):
//! Darling itself cannot run on these machines. The stand-in honours Darling's real command
//! line (`DPREFIX=P darling shell CMD…`, `DPREFIX=P darling shutdown`) and runs the test's real
//! OpenSSH sshd with the prefix's own Nix store, so readiness (pinned host key, remote Nix
//! version) and the stop path are exercised for real; only Darling is simulated.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Instant;

use nix_lazy_builder::boot::{BootError, StopHow, StopStep};

use crate::harness::boot::*;
use crate::harness::*;

/// Set in the process a darling test runs in (see [`stand_in_sshd`]).
const STAND_IN_ENV: &str = "NLB_TEST_DARLING_STAND_IN";

/// The darling backend finds `darling` on PATH, and no test may change the environment of the
/// test process (other tests run in it at the same time): each test here runs again (as root)
/// in a process of its own whose PATH starts with the stand-in. In that process, the sshd
/// fixture whose directory is the prefix (go on with the test); `None` in the test's first
/// run, once the second has passed.
fn stand_in_sshd(test: &str) -> Option<Sshd> {
    require_root();
    if std::env::var_os(STAND_IN_ENV).is_some() {
        return Some(Sshd::new());
    }
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![fixtures];
    dirs.extend(std::env::split_paths(&path));
    let joined = std::env::join_paths(dirs).unwrap();
    run_one_test(
        module_path!(),
        test,
        &[("PATH", &joined), (STAND_IN_ENV, OsStr::new("1"))],
    );
    None
}

/// A darling builder whose prefix is the sshd fixture's directory, running `sshd_config`.
fn darling_builder(sshd: &Sshd, sshd_config: &Path) -> nix_lazy_builder::config::Builder {
    builder(
        "darwin",
        &format!("ssh-ng://root@127.0.0.1:{}", sshd.port),
        &["x86_64-darwin"],
        &sshd.client_key,
        &sshd.host_key_line,
        &format!(
            "kind = \"darling\"\nprefix = {}\nsshd-config = {}\n",
            toml_str(sshd.path().to_str().unwrap()),
            toml_str(sshd_config.to_str().unwrap())
        ),
    )
}

#[tokio::test]
async fn darling_stand_in_boots_answers_and_shuts_down() {
    // The prefix is the sshd fixture's directory: its sshd_config, keys and own `nix/`.
    let Some(sshd) = stand_in_sshd("darling_stand_in_boots_answers_and_shuts_down") else {
        return;
    };
    let b = darling_builder(&sshd, &sshd.config);

    let t0 = Instant::now();
    let mut s = Started::new(&sshd, b).await;
    assert_eq!(s.inst.ssh_port(), None);
    let pid = s.inst.pid().unwrap();
    let ready = s.ready(60).await;
    eprintln!(
        "darling (stand-in) ready in {:?}: {}",
        t0.elapsed(),
        ready.nix_version
    );
    // ssh-ng:// asks `nix-daemon --version`.
    assert!(
        ready.nix_version.starts_with("nix-daemon (Nix) "),
        "{}",
        ready.nix_version
    );
    // The sshd runs in the prefix's container: its /nix is the prefix's.
    std::fs::write(sshd.path().join("nix/in-prefix"), "x").unwrap();
    let listing = ssh(sshd.port, &sshd.client_key, &sshd.host_key_line, "ls /nix");
    assert!(listing.lines().any(|l| l == "in-prefix"), "{listing}");

    let report = s.inst.stop(StopHow::graceful(Some(&s.b))).await;
    eprintln!("{report}");
    assert_eq!(report.step, StopStep::DarlingShutdown, "{report}");
    assert!(report.failed_steps.is_empty(), "{report}");
    // Like Darling's shell client, the stand-in exits 1 when its container is shut down.
    assert_eq!(
        report
            .exit
            .as_ref()
            .unwrap()
            .status
            .as_ref()
            .unwrap()
            .code(),
        Some(1)
    );
    assert!(!alive(pid));
    assert!(
        !port_open(sshd.port),
        "sshd still listening after darling shutdown"
    );
    // The container really is gone: a second shutdown says so.
    let out = std::process::Command::new("darling")
        .arg("shutdown")
        .env("DPREFIX", sshd.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "Darling container is not running"
    );
}

#[tokio::test]
async fn darling_sshd_that_fails_reports_its_last_line() {
    let Some(sshd) = stand_in_sshd("darling_sshd_that_fails_reports_its_last_line") else {
        return;
    };
    // A config path that does not exist in the prefix: sshd exits at once and says why.
    let b = darling_builder(&sshd, Path::new("/nonexistent/sshd_config"));
    let mut s = Started::new(&sshd, b).await;
    let err = s.ready_within(30).await.expect_err("must fail");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, BootError::Exited { .. }), "{err:?}");
    assert!(msg.starts_with("darling exited with status "), "{msg}");
    assert!(msg.contains("/nonexistent/sshd_config"), "{msg}");
}
