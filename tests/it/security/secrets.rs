//! No secrets in logs: neither a private key's contents nor the process environment ever
//! appear in what the hook sends nix-daemon (its `@nix` messages and replies, at the highest
//! verbosity, where every `tracing` event of every crate, russh's included, is forwarded), in
//! `doctor`'s report, or in the supervisor's log (at `trace`).
//!
//! Each run has a planted secret in an unrelated environment variable and uses key files whose
//! base64 bodies are searched for (every 16-character window of them, so a partial leak counts
//! too): a key the server does not accept (authentication fails), a corrupted key file (it
//! cannot be parsed), and the key that works (a full login with signing, then a failing remote
//! program).

use std::path::Path;

use crate::harness::security::*;
use crate::harness::{keygen, read, write};

const SECRET_VAR: &str = "NLB_PLANTED_SECRET";

fn planted() -> String {
    format!("s3cr3t-{}-{:x}", std::process::id(), rand_word())
}

fn rand_word() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

/// The base64 body of a private key file (everything between the armor lines, joined).
fn key_body(path: &Path) -> String {
    read(path)
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat()
}

/// Panics if `haystack` holds the secret or any 16-character window of a key body.
#[track_caller]
fn assert_clean(what: &str, haystack: &str, secret: &str, bodies: &[String]) {
    assert!(
        !haystack.contains(secret),
        "{what}: the planted environment secret leaked:\n{haystack}"
    );
    for body in bodies {
        assert!(body.len() > 100, "not a key body: {body}");
        let chars: Vec<char> = body.chars().collect();
        for w in chars.windows(16) {
            let w: String = w.iter().collect();
            assert!(
                !haystack.contains(&w),
                "{what}: part of a private key ({w}) leaked:\n{haystack}"
            );
        }
    }
}

#[test]
fn keys_and_environment_stay_out_of_every_log() {
    let sshd = Sshd::start();
    let env = Env::new();
    let secret = planted();
    let stub = stub_program(env.dir.path(), "secrets");

    // A key the server does not know.
    let unknown = env.path("unknown_key");
    keygen(&unknown, "nlb-unknown");
    // A key file that cannot be parsed: a real key's body with one line broken.
    let broken = env.path("broken_key");
    keygen(&broken, "nlb-broken");
    let text = read(&broken);
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[2] = lines[2].chars().rev().collect::<String>() + "!!";
    write(&broken, &(lines.join("\n") + "\n"));
    let bodies = vec![
        key_body(&unknown),
        key_body(&broken),
        key_body(&sshd.client_key),
    ];
    let env_vars = [
        (SECRET_VAR, secret.as_str()),
        ("AWS_SECRET_ACCESS_KEY", secret.as_str()),
        ("NIX_LAZY_BUILDER_LOG", "trace"),
        ("RUST_LOG", "trace"),
    ];

    let line = |key: &Path| {
        format!(
            "{} aarch64-linux {} 1 1 - - {}",
            sshd.uri("ssh", &format!("?remote-program={}", stub.display())),
            key.display(),
            sshd.host_key_b64()
        )
    };

    // The hook at verbosity 7 (vomit): every tracing event goes to nix-daemon.
    let mut outputs = Vec::new();
    for (case, key) in [
        ("unknown key", &unknown),
        ("broken key file", &broken),
        ("working key", &sshd.client_key),
    ] {
        let out = env.hook(&daemon_stdin(&line(key)), 7, &env_vars);
        assert_eq!(replies(&out), ["decline"], "{case}: {out}");
        let said = messages(&out).join("\n");
        match case {
            "unknown key" => assert!(said.contains("authentication failed"), "{out}"),
            "broken key file" => assert!(said.contains("broken_key"), "{out}"),
            _ => assert!(env.path("argv-secrets").exists(), "{out}"),
        }
        assert_clean(
            &format!("hook, {case}"),
            &format!("{}{}", out.stdout, out.stderr),
            &secret,
            &bodies,
        );
        outputs.push(out);
    }
    // The vomit-level runs did forward russh's own events (so the check above saw them).
    assert!(
        outputs[2].stderr.lines().count() > 20,
        "suspiciously quiet:\n{}",
        outputs[2]
    );

    // doctor, with each key.
    for key in [&unknown, &broken, &sshd.client_key] {
        let out = env.cli(&["doctor", "--builders", &line(key)], &env_vars);
        assert_eq!(out.code(), Some(1), "{out}");
        assert_clean(
            "doctor",
            &format!("{}{}", out.stdout, out.stderr),
            &secret,
            &bodies,
        );
    }

    // The supervisor, booting a lazy builder whose key the server refuses, logging at trace.
    let lazy = format!(
        "[builders.lazy]\nuri = \"ssh://root@127.0.0.1:{}?remote-program=/bin/false\"\n\
         systems = [\"aarch64-linux\"]\nssh-key = \"{}\"\nhost-key = \"{}\"\n\
         boot-timeout = \"4s\"\n[builders.lazy.boot]\nkind = \"command\"\n\
         command = [\"/bin/sleep\", \"1000\"]\nenvironment = {{ {SECRET_VAR} = \"{secret}\" }}\n",
        sshd.port,
        unknown.display(),
        sshd.host_key_line
    );
    env.write_config(&lazy);
    let sup = Supervisor::start(&env, &env_vars);
    let out = env.cli(&["up", "lazy"], &env_vars);
    assert_eq!(out.code(), Some(1), "{out}\n{}", sup.output());
    assert!(out.stderr.contains("authentication failed"), "{out}");
    let sup_log = sup.output();
    drop(sup);
    let state_logs: String = walk_text(&env.path("lazy-state"));
    assert_clean(
        "supervisor",
        &format!("{}{}{sup_log}{state_logs}", out.stdout, out.stderr),
        &secret,
        &bodies,
    );
    assert!(
        sup_log.lines().count() > 5,
        "the supervisor logged almost nothing:\n{sup_log}"
    );
}

/// The text of every regular file under `dir` (the supervisor's per-builder logs).
fn walk_text(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => {
                    if let Ok(b) = std::fs::read(&p) {
                        out.push_str(&String::from_utf8_lossy(&b));
                    }
                }
                _ => {}
            }
        }
    }
    out
}
