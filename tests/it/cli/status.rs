//! `status` tells what runs and why, driving the real binary against a real supervisor and a
//! real lazy builder (an sshd with its own Nix store, booted by a `kind = "command"` builder):
//! its columns (the port, running builds, boots that worked and boots that failed, apart), a
//! config that no longer loads (the error first, then what the running supervisor still runs,
//! exit status 1), and TOML errors in a user's words.
//!
//! Must never leave a supervisor or a builder running.

use crate::harness::security::{Env, Supervisor};
use crate::harness::*;

#[test]
fn a_broken_config_is_the_error_above_the_running_supervisors_state() {
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let env = Env::new();
    let good = remote.command_builder(
        "cmd",
        Scheme::Ssh,
        "boot-timeout = \"30s\"\nidle-timeout = \"5m\"",
    );
    env.write_config(&good);
    let sup = Supervisor::start(&env, &[]);
    env.cli(&["up", "cmd"], &[]).assert_success();
    let json = env.cli(&["status", "--json"], &[]);
    json.assert_success();
    let port = serde_json::from_str::<Vec<nix_lazy_builder::supervisor::proto::BuilderStatus>>(
        &json.stdout,
    )
    .unwrap()[0]
        .ssh_port
        .expect("an up builder's port");
    assert_eq!(port, remote.port());
    let table = env.cli(&["status"], &[]);
    table.assert_success();
    let lines = table.stdout_lines();
    assert_eq!(
        lines[0]
            .split("  ")
            .filter(|c| !c.is_empty())
            .map(str::trim)
            .collect::<Vec<_>>(),
        [
            "BUILDER",
            "STATE",
            "PORT",
            "UPTIME",
            "IDLE STOP IN",
            "RUNNING BUILDS",
            "BOOTS OK",
            "BOOTS FAILED",
            "WARM",
            "HAND-OUTS",
            "SNAPSHOT",
            "LAST FAILURE"
        ],
        "{table}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        (
            row[0],
            row[1],
            row[2],
            row[5],
            row[6],
            row[7],
            row.last().copied()
        ),
        (
            "cmd",
            "up",
            port.to_string().as_str(),
            "0",
            "1",
            "0",
            Some("-")
        ),
        "{table}"
    );

    // The file breaks: the error, then the builders as the running supervisor still has them.
    let broken = good.replace(
        "boot-timeout = \"30s\"",
        "boot-timeout = \"30s\"\nmax-jobs = \"4\"",
    );
    env.write_config(&broken);
    let line = broken
        .lines()
        .position(|l| l.starts_with("max-jobs"))
        .expect("the bad line")
        + 1
        + 4; // write_config puts [supervisor], state-dir, keep-warm and a blank line first
    let out = env.cli(&["status"], &[]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(
        out.stderr.trim(),
        format!(
            "nix-lazy-builder: {}:{line}:12: builders.cmd.max-jobs: expected a whole number, not \
             the string \"4\"",
            env.config().display()
        ),
        "{out}"
    );
    let lines = out.stdout_lines();
    assert!(
        lines[0].starts_with("the running supervisor (pid ")
            && lines[0].ends_with(") keeps the configuration it loaded before:"),
        "{out}"
    );
    assert!(lines[1].starts_with("BUILDER "), "{out}");
    assert!(
        lines[2].starts_with("cmd ") && lines[2].contains(" up "),
        "{out}"
    );
    // The JSON too, with the error on stderr.
    let out = env.cli(&["status", "--json"], &[]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("expected a whole number"), "{out}");
    assert!(out.stdout.contains("\"name\": \"cmd\""), "{out}");
    // up and down need a config that loads.
    let out = env.cli(&["down", "cmd"], &[]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("expected a whole number"), "{out}");
    drop(sup);
    remote.kill_all();

    // Without a supervisor: the error, and that none runs.
    let out = env.cli(&["status"], &[]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "(no supervisor is running on {})",
            env.path("lazy-state/sup").display()
        )),
        "{out}"
    );
}

#[test]
fn toml_errors_are_in_a_users_words() {
    let env = Env::new();
    for (value, words) in [
        (
            "max-jobs = \"4\"",
            "builders.b.max-jobs: expected a whole number, not the string \"4\"",
        ),
        (
            "max-jobs = 1.5",
            "builders.b.max-jobs: expected a whole number, not the number 1.5",
        ),
        (
            "speed-factor = \"fast\"",
            "builders.b.speed-factor: expected a number, not the string \"fast\"",
        ),
        (
            "boot-for-local = 1",
            "builders.b.boot-for-local: expected true or false, not the number 1",
        ),
        (
            "features = \"kvm\"",
            "builders.b.features: expected a list, [ … ], not the string \"kvm\"",
        ),
        (
            "bogus = 1",
            "builders.b.bogus: unknown key `bogus` (the keys allowed here are uri, systems,",
        ),
    ] {
        env.write_config(&format!(
            "[builders.b]\nuri = \"ssh://h\"\nsystems = [\"aarch64-linux\"]\n{value}\n"
        ));
        let out = env.cli(&["status"], &[]);
        assert_eq!(out.code(), Some(1), "{out}");
        assert!(out.stderr.contains(words), "{value}: {out}");
        for rust in ["i64", "f64", "sequence", "a boolean", "field", "struct "] {
            assert!(!out.stderr.contains(rust), "{value}: {rust} in {out}");
        }
    }
    env.write_config("[builders.b]\nsystems = [\"aarch64-linux\"]\n");
    let out = env.cli(&["status"], &[]);
    assert!(
        out.stderr.contains("builders.b: missing key `uri`"),
        "{out}"
    );
}
