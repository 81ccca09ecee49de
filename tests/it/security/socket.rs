//! The supervisor's control socket is root-only: its state directory is 0700 and the socket
//! itself 0600, both owned by root, so a user who is not root can neither connect nor read
//! anything the supervisor knows. There is deliberately no read-only path: `status`, `up` and
//! `down` run by anyone else say in one line that they need root (instead of a raw EACCES, or a
//! table that wrongly shows every builder "down").
//!
//! Proved with a real supervisor (run as root) and real clients run as `nobody` through
//! `setpriv`: the CLI, and a raw `connect(2)` to the socket from perl, once with the directory
//! as the supervisor made it and once with the directory opened up to show that the socket's
//! own mode refuses too. As a control, the same commands as root work.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use crate::harness::security::*;
use crate::harness::{CmdOutput, require_file, require_root, run_command, set_mode};

/// `nobody` tries to connect to `socket` with a plain `connect(2)`; returns perl's verdict.
fn raw_connect_as_nobody(socket: &std::path::Path) -> CmdOutput {
    let mut c = Command::new("/usr/bin/setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args([
            "/usr/bin/perl",
            "-MIO::Socket::UNIX",
            "-e",
            "my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]); \
             if ($s) { print \"connected\\n\"; exit 0 } print \"refused: $!\\n\"; exit 3",
        ])
        .arg(socket)
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    run_command(&mut c, None, Duration::from_secs(30))
}

#[test]
fn the_control_socket_is_root_only() {
    require_root();
    require_file("/usr/bin/setpriv", "util-linux");
    require_file("/usr/bin/perl", "perl-base");
    let env = Env::new();
    env.write_config(
        "[builders.vm]\nuri = \"ssh://root@127.0.0.1:2\"\nsystems = [\"aarch64-linux\"]\n\
         host-key = \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFwgxv0w8zjLFNJ6M4EHyBd7/gHpLNuw1C+/JusH19ZC\"\n\
         [builders.vm.boot]\nkind = \"command\"\ncommand = [\"/bin/sleep\", \"1000\"]\n",
    );
    // The state directory's parent is open to everyone, as /nix/var/nix is.
    set_mode(&env.path("lazy-state"), 0o755);
    let sup = Supervisor::start(&env, &[]);
    let state = env.path("lazy-state/sup");
    let socket = state.join("supervisor.sock");

    let d = std::fs::metadata(&state).unwrap();
    assert_eq!(
        d.permissions().mode() & 0o777,
        0o700,
        "state directory mode"
    );
    assert_eq!((d.uid(), d.gid()), (0, 0));
    let s = std::fs::symlink_metadata(&socket).unwrap();
    assert!(s.file_type().is_socket());
    assert_eq!(s.permissions().mode() & 0o777, 0o600, "socket mode");
    assert_eq!(s.uid(), 0);

    // Control: root is served.
    let out = env.cli(&["status"], &[]);
    out.assert_success();
    assert!(
        out.stdout.contains("vm") && out.stdout.contains("down"),
        "{out}"
    );

    // `nobody`: every command that needs the socket says so, clearly, and fails.
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["up", "vm"],
        &["down", "vm"],
    ] {
        let out = env.cli_as_nobody(args);
        assert_eq!(out.code(), Some(1), "{out}");
        assert!(
            out.stderr.contains("needs root")
                && out.stderr.contains("root-only")
                && out.stderr.contains(&socket.display().to_string()),
            "{args:?} as nobody:\n{out}"
        );
        // A fresh Debian has no sudo: the way out is said without it.
        assert!(
            out.stderr.trim_end().ends_with("run it as root") && !out.stderr.contains("sudo"),
            "{args:?} as nobody:\n{out}"
        );
        assert!(out.stdout.is_empty(), "{args:?} printed a status:\n{out}");
    }

    // A raw connection as `nobody` is refused by the directory...
    let out = raw_connect_as_nobody(&socket);
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(out.stdout.contains("Permission denied"), "{out}");
    // ...and by the socket's own mode when the directory is opened up.
    set_mode(&state, 0o711);
    let out = raw_connect_as_nobody(&socket);
    set_mode(&state, 0o700);
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(out.stdout.contains("Permission denied"), "{out}");

    // The supervisor is unharmed and nothing it knows leaked into those outputs.
    let out = env.cli(&["status", "--json"], &[]);
    out.assert_success();
    assert!(out.stdout.contains("\"name\": \"vm\""), "{out}");
    drop(sup);
}
