//! Fault: a remote that answers wrongly. The machines URI of a real sshd remote store says
//! `?remote-program=<wrapper>`, and the wrapper runs `tests/it/fault/proxy.py`: a FAULT
//! INJECTOR around the REAL `nix-store --serve --write` (`ssh://`) or `nix-daemon --stdio`
//! (`ssh-ng://`), which relays every byte both ways and corrupts one reply:
//! - a truncated NAR: the output's NAR ends in the middle (the connection ends there);
//! - a NAR whose hash mismatches the path info: one byte of a file changed, same length;
//! - a protocol violation: garbage where the reply to the build request should be.
//!
//! Each must be a clear error that names the builder (and, for the NARs, the path), with
//! NOTHING registered or left on disk locally, no stray process, and the next build (through
//! the plain remote program) must succeed.
//!
//! Must never: pass without the proxy having injected its fault (it logs each injection to a
//! file the test reads).

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::fault::*;
use crate::harness::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Corruption {
    Truncate,
    Corrupt,
    Garbage,
}

impl Corruption {
    fn mode(self) -> &'static str {
        match self {
            Corruption::Truncate => "truncate",
            Corruption::Corrupt => "corrupt",
            Corruption::Garbage => "garbage",
        }
    }
}

/// Writes the wrapper the machines URI names: runs the proxy around the real program.
fn wrapper(
    remote: &RemoteStore,
    c: Corruption,
    scheme: Scheme,
    trigger: &str,
) -> (PathBuf, PathBuf) {
    require_file("/usr/bin/python3", "python3");
    let proxy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/fault/proxy.py");
    let real = match scheme {
        Scheme::Ssh => "/usr/bin/nix-store",
        Scheme::SshNg => "/usr/bin/nix-daemon",
    };
    let log = remote.dir().join(format!("proxy-{}.log", c.mode()));
    let path = remote.dir().join(format!("fault-proxy-{}", c.mode()));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n# Fault injector around the real {real} (tests/it/fault/proxy.rs).\n\
             exec /usr/bin/python3 {} {} {} {} {real} \"$@\"\n",
            proxy.display(),
            c.mode(),
            trigger,
            log.display()
        ),
    )
    .expect("write the wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (path, log)
}

fn corrupted_reply(c: Corruption, scheme: Scheme) {
    let test = format!("{} over {}", c.mode(), scheme.prefix());
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let name = format!("fault-proxy-{}-{}", c.mode(), scheme.prefix());
    // The build request is the only message that carries the derivation's file name.
    let trigger = format!("-{name}.drv");
    let (program, log) = wrapper(&remote, c, scheme, &trigger);
    let plain = remote.machines_line(&MachineLine::new(scheme, true));
    let (uri, rest) = plain.split_once(' ').expect("a machines line");
    let proxied_uri = format!("{uri}?remote-program={}", program.display());
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    opts.machines = Some(format!("{proxied_uri} {rest}\n"));
    let (opts, _ours) = without_warm_connections(opts);
    let daemon = LocalDaemon::start(opts);
    let paths = BigDrv::new(&name).with_marker().prepare(&daemon);

    let out = paths.nix_build(&daemon);
    out.assert_failure();
    let injected = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        injected.starts_with(c.mode()),
        "{test}: the proxy injected nothing (log: {injected:?}):\n{out}"
    );
    let errors = client_errors(&test, &out);
    let ours = errors
        .iter()
        .find(|l| l.contains(&proxied_uri))
        .unwrap_or_else(|| panic!("{test}: no error naming the builder:\n{out}"));
    let copying = format!("copying {} from ", paths.out);
    let want = match c {
        Corruption::Truncate => vec![
            copying.as_str(),
            "closed the connection while we were reading a NAR",
        ],
        Corruption::Corrupt => vec!["copying outputs from ", "hash mismatch for ", &paths.out],
        Corruption::Garbage => vec!["building on "],
    };
    for w in want {
        assert!(ours.contains(w), "{test}: {w:?} missing from {ours:?}");
    }
    assert!(!out.stderr.contains("panicked"), "{out}");
    // Nothing registered, nothing on disk.
    paths.assert_absent(&daemon, &test);
    assert_store_clean(&daemon, &test);
    assert_no_strays(&daemon, None, Duration::from_secs(10));

    // The next build, through the real program, succeeds.
    std::fs::write(daemon.machines_file(), plain.clone() + "\n").expect("rewrite machines");
    let next = BigDrv::new(&format!("{name}-next"))
        .with_marker()
        .prepare(&daemon);
    let again = next.nix_build(&daemon);
    again.assert_success();
    next.assert_built(&daemon);
    assert_eq!(
        daemon.read_store_file(&next.out, "marker").trim(),
        format!("{MARKER} and some more text")
    );
    assert_store_clean(&daemon, &format!("{test}, next build"));
    eprintln!("[fault] {test}: survived");
}

#[test]
fn truncated_nar_over_ssh() {
    corrupted_reply(Corruption::Truncate, Scheme::Ssh);
}

#[test]
fn truncated_nar_over_ssh_ng() {
    corrupted_reply(Corruption::Truncate, Scheme::SshNg);
}

#[test]
fn nar_with_a_mismatching_hash_over_ssh() {
    corrupted_reply(Corruption::Corrupt, Scheme::Ssh);
}

#[test]
fn nar_with_a_mismatching_hash_over_ssh_ng() {
    corrupted_reply(Corruption::Corrupt, Scheme::SshNg);
}

#[test]
fn garbage_instead_of_the_build_result_over_ssh() {
    corrupted_reply(Corruption::Garbage, Scheme::Ssh);
}

#[test]
fn garbage_instead_of_the_build_result_over_ssh_ng() {
    corrupted_reply(Corruption::Garbage, Scheme::SshNg);
}
