//! Host keys are refused on every path that connects to a builder, against a real OpenSSH sshd:
//! the hook's connect before `# accept`, the supervisor's readiness check of a lazy builder
//! (through `nix-lazy-builder up`), and `nix-lazy-builder doctor`. On each path:
//! - a WRONG pinned key (another key than the server's) is refused with "HOST KEY MISMATCH"
//!   and the server's log shows that no login happened;
//! - a MISSING key (a machines line without the host-key column and no known_hosts entry) is
//!   refused before anything is sent;
//! - the WELL-KNOWN key of nixpkgs' `darwin.linux-builder` (its private half is public) is
//!   refused with a message that names the key and what to do, unless a TOML builder says
//!   `allow-well-known-host-key = true`, which gets a warning instead;
//! - and, as a control that the tests can tell the difference, the right key gets as far as
//!   running the remote program, with a login in the server's log (the hook and `doctor` run a
//!   stub that fails; the readiness check one that answers like Nix, so the builder comes up).
//!
//! The readiness check's sshd is the one the supervisor boots (`kind = "command"`); its log is
//! the builder's `command.log`, which shows the refused connections and no login.

use std::path::Path;
use std::time::{Duration, Instant};

use nix_lazy_builder::config::{self, Config};
use nix_lazy_builder::ssh::{SshTarget, TargetError};

use crate::harness::security::*;
use crate::harness::{
    CmdOutput, free_port, keygen, read, require_file, require_root, scratch, set_mode, write,
};

/// A machines line for `sshd` with `host_key_column` (or none) and a stub remote program.
fn machines_line(sshd: &Sshd, stub: &Path, host_key_column: Option<&str>) -> String {
    format!(
        "{} aarch64-linux {} 1 1 - - {}",
        sshd.uri("ssh", &format!("?remote-program={}", stub.display())),
        sshd.client_key.display(),
        host_key_column.unwrap_or("")
    )
    .trim_end()
    .to_owned()
}

fn toml_builder(name: &str, sshd: &Sshd, stub: &Path, host_key: &str, extra: &str) -> String {
    format!(
        "[builders.{name}]\nuri = \"{}\"\nsystems = [\"aarch64-linux\"]\nssh-key = \"{}\"\n\
         host-key = \"{host_key}\"\n{extra}\n",
        sshd.uri("ssh", &format!("?remote-program={}", stub.display())),
        sshd.client_key.display(),
    )
}

#[track_caller]
fn assert_refused_by_hook(out: &CmdOutput, why: &str) {
    let r = replies(out);
    assert!(
        !r.iter().any(|w| w == "accept"),
        "the hook accepted:\n{out}"
    );
    assert_eq!(r, ["decline"], "{out}");
    let msgs = messages(out).join("\n");
    assert!(
        msgs.contains(why),
        "no '{why}' in the hook's messages:\n{out}"
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
}

#[test]
fn the_well_known_key_is_refused_by_ssh_target_unless_allowed() {
    // The one place every connecting path gets its pinned keys from.
    let text = |extra: &str| {
        format!(
            "[builders.vm]\nuri = \"ssh://root@127.0.0.1:2\"\nsystems = [\"aarch64-linux\"]\n\
             host-key = \"{WELL_KNOWN_KEY} root@darwin-builder\"\n{extra}"
        )
    };
    let file = Path::new("/etc/nix/lazy-builder.toml");
    let c = Config::parse(&text(""), file).unwrap();
    match SshTarget::for_builder(&c.builders[0]) {
        Err(e @ TargetError::WellKnownHostKey { .. }) => {
            let m = e.to_string();
            assert!(m.contains(WELL_KNOWN_KEY), "{m}");
            assert!(m.contains("darwin.linux-builder"), "{m}");
            assert!(
                m.contains("allow-well-known-host-key = true")
                    && m.contains("/etc/nix/lazy-builder.toml"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    let c = Config::parse(&text("allow-well-known-host-key = true\n"), file).unwrap();
    let t = SshTarget::for_builder(&c.builders[0]).expect("allowed");
    assert_eq!(t.host_keys.len(), 1);

    // A machines line cannot allow it.
    let line = format!(
        "ssh://root@127.0.0.1:2 aarch64-linux - 1 1 - - {}",
        b64(WELL_KNOWN_KEY)
    );
    let t = config::load_table(&line, "x86_64-linux", None, &Config::default()).unwrap();
    match SshTarget::for_builder(&t.builders[0]) {
        Err(e @ TargetError::WellKnownHostKey { .. }) => {
            assert!(
                e.to_string().contains("the machines table cannot allow"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }

    // Nor does it get in through a known_hosts file.
    let dir = scratch("nlb-sec-kh-", &[]);
    let kh = dir.path().join("known_hosts");
    write(&kh, &format!("[127.0.0.1]:2 {WELL_KNOWN_KEY}\n"));
    let c = Config::parse(
        &format!(
            "[builders.vm]\nuri = \"ssh://root@127.0.0.1:2\"\nsystems = [\"aarch64-linux\"]\n\
             host-key-file = \"{}\"\n",
            kh.display()
        ),
        file,
    )
    .unwrap();
    assert!(matches!(
        SshTarget::for_builder(&c.builders[0]),
        Err(TargetError::WellKnownHostKey { .. })
    ));
}

#[test]
fn hook_refuses_wrong_missing_and_well_known_keys() {
    let sshd = Sshd::start();
    let env = Env::new();
    let stub = stub_program(env.dir.path(), "hook");

    // Wrong key: another key in the machines column.
    let wrong = b64(&impostor_key(env.dir.path()));
    let out = env.hook(
        &daemon_stdin(&machines_line(&sshd, &stub, Some(&wrong))),
        3,
        &[],
    );
    assert_refused_by_hook(&out, "HOST KEY MISMATCH");

    // Missing key: no column, and nothing in known_hosts (the env's HOME has none).
    let out = env.hook(&daemon_stdin(&machines_line(&sshd, &stub, None)), 3, &[]);
    assert_refused_by_hook(&out, "no pinned host key");

    // The well-known key in the machines column.
    let wk = b64(WELL_KNOWN_KEY);
    let out = env.hook(
        &daemon_stdin(&machines_line(&sshd, &stub, Some(&wk))),
        3,
        &[],
    );
    assert_refused_by_hook(
        &out,
        "is the well-known key of nixpkgs' darwin.linux-builder",
    );
    assert_refused_by_hook(&out, "the machines table cannot allow");

    // The well-known key in the TOML config, not allowed, then allowed: allowing it only
    // lifts the refusal (with a warning): the server's real key still does not match.
    env.write_config(&toml_builder("wk", &sshd, &stub, WELL_KNOWN_KEY, ""));
    let out = env.hook(&daemon_stdin(""), 3, &[]);
    assert_refused_by_hook(&out, "allow-well-known-host-key = true");
    env.write_config(&toml_builder(
        "wk",
        &sshd,
        &stub,
        WELL_KNOWN_KEY,
        "allow-well-known-host-key = true",
    ));
    let out = env.hook(&daemon_stdin(""), 3, &[]);
    assert_refused_by_hook(&out, "HOST KEY MISMATCH");
    assert!(
        messages(&out)
            .iter()
            .any(|m| m.starts_with("warning: ") && m.contains("well-known host key")),
        "no warning about the allowed well-known key:\n{out}"
    );
    assert!(
        !sshd.accepted_a_login(),
        "a refused connection logged in:\n{}",
        sshd.log()
    );
    assert!(!env.path("argv-hook").exists(), "the remote program ran");

    // Control: the right key logs in and runs the (failing) remote program.
    env.write_config("");
    let right = sshd.host_key_b64();
    let out = env.hook(
        &daemon_stdin(&machines_line(&sshd, &stub, Some(&right))),
        3,
        &[],
    );
    assert_eq!(replies(&out), ["decline"], "{out}");
    assert!(sshd.accepted_a_login(), "{}", sshd.log());
    assert!(
        env.path("argv-hook").exists(),
        "the stub did not run:\n{out}"
    );
    assert!(!messages(&out).join("\n").contains("HOST KEY"), "{out}");
}

#[test]
fn doctor_refuses_wrong_missing_and_well_known_keys() {
    let sshd = Sshd::start();
    let env = Env::new();
    let stub = stub_program(env.dir.path(), "doctor");
    let doctor = |builders: &str| env.cli(&["doctor", "--builders", builders], &[]);

    let wrong = b64(&impostor_key(env.dir.path()));
    let out = doctor(&machines_line(&sshd, &stub, Some(&wrong)));
    assert_eq!(out.code(), Some(1), "{out}");
    // The mismatch is the host-key row's failure, not a passed host key and a failed ssh.
    assert!(
        out.stdout.contains("[FAIL] host key   HOST KEY MISMATCH"),
        "{out}"
    );
    assert!(
        !out.stdout.contains("[ ok ] host key") && !out.stdout.contains("] ssh "),
        "{out}"
    );

    let out = doctor(&machines_line(&sshd, &stub, None));
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout.contains("[FAIL] host key")
            && out
                .stdout
                .contains("no pinned host key and no known_hosts entry"),
        "{out}"
    );

    let out = doctor(&machines_line(&sshd, &stub, Some(&b64(WELL_KNOWN_KEY))));
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout.contains("[FAIL] host key") && out.stdout.contains(WELL_KNOWN_KEY),
        "{out}"
    );
    assert!(!sshd.accepted_a_login(), "{}", sshd.log());

    // Control: the right key passes the ssh check; the stub then fails the remote-Nix check.
    let out = doctor(&machines_line(&sshd, &stub, Some(&sshd.host_key_b64())));
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stdout.contains("[ ok ] ssh"), "{out}");
    assert!(out.stdout.contains("[FAIL] remote nix"), "{out}");
    assert!(sshd.accepted_a_login(), "{}", sshd.log());
}

/// A lazy builder whose boot command runs a fresh sshd in the foreground with `sshd_config`,
/// its remote program `program`.
fn lazy_builder(
    name: &str,
    sshd_config: &Path,
    port: u16,
    program: &Path,
    client_key: &Path,
    host_key: &str,
    extra: &str,
) -> String {
    let argv = run_sshd_argv("nlb-sec-lazy", sshd_config);
    let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "[builders.{name}]\nuri = \"ssh://root@127.0.0.1:{port}?remote-program={}\"\n\
         systems = [\"aarch64-linux\"]\nssh-key = \"{}\"\nhost-key = \"{host_key}\"\n\
         boot-timeout = \"60s\"\n{extra}\n[builders.{name}.boot]\nkind = \"command\"\ncommand = [{}]\n",
        program.display(),
        client_key.display(),
        argv.join(", ")
    )
}

#[test]
fn the_readiness_check_refuses_wrong_and_well_known_keys() {
    require_sshd_files();
    let env = Env::new();
    // The sshd a lazy builder boots: its config and keys, not started (the supervisor starts
    // it through the `command` backend). The control builder gets a config of its own on
    // another port, so its boot never waits for a refused one's port to be free.
    let dir = scratch("nlb-sec-lazy-", &[]);
    let d = dir.path();
    keygen(&d.join("host_key"), "nlb-sec-lazy-host");
    keygen(&d.join("client_key"), "nlb-sec-lazy-client");
    std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
    let port = free_port();
    let config = sshd_config(d, "sshd_config", port);
    let right_port = free_port();
    let right_config = sshd_config(d, "sshd_config_right", right_port);
    // A remote program that answers like Nix, so the right key gets all the way to "up".
    let nix = d.join("fake-nix-store");
    write(
        &nix,
        "#!/bin/sh\necho 'nix-store (Nix) 2.8.0-nlb-sec-stand-in'\n",
    );
    set_mode(&nix, 0o755);
    let client_key = d.join("client_key");
    let wrong = impostor_key(d);
    let right = read(&d.join("host_key.pub")).trim().to_owned();
    env.write_config(&format!(
        "{}\n{}\n{}",
        lazy_builder("wrong", &config, port, &nix, &client_key, &wrong, ""),
        lazy_builder(
            "wellknown",
            &config,
            port,
            &nix,
            &client_key,
            WELL_KNOWN_KEY,
            ""
        ),
        lazy_builder(
            "right",
            &right_config,
            right_port,
            &nix,
            &client_key,
            &right,
            ""
        )
    ));
    let sup = Supervisor::start(&env, &[]);
    // Each builder's sshd writes its log (`-e`) to the builder's command.log.
    let sshd_log = |name: &str| {
        std::fs::read_to_string(env.path(&format!("lazy-state/sup/builders/{name}/command.log")))
            .unwrap_or_default()
    };

    let t0 = Instant::now();
    let out = env.cli(&["up", "wrong"], &[]);
    assert_eq!(out.code(), Some(1), "{out}\n{}", sup.output());
    assert!(
        out.stderr.contains("HOST KEY MISMATCH"),
        "{out}\n{}",
        sup.output()
    );
    // Refused at once, not retried until the 60 s boot timeout.
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
    // The server saw the connection, and no login came of it.
    let log = sshd_log("wrong");
    assert!(
        log.contains(&format!("Server listening on 127.0.0.1 port {port}")),
        "the wrong-key builder's sshd did not run:\n{log}"
    );
    assert!(
        log.contains("Connection from 127.0.0.1"),
        "no connection in:\n{log}"
    );
    assert!(
        !log.contains("Accepted publickey"),
        "a login with the wrong key:\n{log}"
    );

    let out = env.cli(&["up", "wellknown"], &[]);
    assert_eq!(out.code(), Some(1), "{out}\n{}", sup.output());
    assert!(
        out.stderr.contains("well-known") && out.stderr.contains("allow-well-known-host-key"),
        "{out}\n{}",
        sup.output()
    );
    let log = sshd_log("wellknown");
    assert!(
        !log.contains("Accepted publickey"),
        "a login with the well-known key:\n{log}"
    );
    // The status remembers why.
    let out = env.cli(&["status"], &[]);
    assert!(out.stdout.contains("HOST KEY MISMATCH"), "{out}");

    // Control: the right key logs in, the remote program answers, the builder is up.
    let out = env.cli(&["up", "right"], &[]);
    assert_eq!(out.code(), Some(0), "{out}\n{}", sup.output());
    assert!(
        out.stdout.contains("'right' is up") && out.stdout.contains("2.8.0-nlb-sec-stand-in"),
        "{out}"
    );
    let log = sshd_log("right");
    assert!(
        log.contains("Accepted publickey for root from 127.0.0.1"),
        "the right key did not log in:\n{log}"
    );
    drop(sup);
}

fn require_sshd_files() {
    require_root();
    require_file("/usr/sbin/sshd", "openssh-server");
}
