//! No shell injection: every remote command line is built from quoted words, so hostile
//! `remote-store` and `remote-program` values (the store URI's parameters, from the machines
//! table or the TOML config) reach the remote program as exactly the argument they were, and
//! never run anything.
//!
//! Proved three ways: the command line `store::remote_command` builds is evaluated by dash,
//! bash and busybox sh and must give back the exact words; the hook and `doctor` run against a
//! real sshd whose remote program is a stub that records its argv (the stub's own file name is
//! hostile too); and each hostile value, had it been run by a shell, would create a marker file
//! that must never appear. Builder names cannot be hostile (TOML names are `[A-Za-z0-9_-]`;
//! machines-table names are store URIs, never put in a command line), and neither can store
//! paths (validated to Nix's name characters, and carried by the protocol, not the command
//! line); a hostile user name is a login name, never a shell word.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix_lazy_builder::config::{self, Config};
use nix_lazy_builder::store;

use crate::harness::security::*;
use crate::harness::{CmdOutput, require_file, scratch, set_mode, write};

/// Values that create `marker` (a file name, relative to the shell's working directory) if a
/// shell ever interprets them. Kept short: a builder's URI names its slot files.
fn hostile(m: &str) -> Vec<String> {
    vec![
        format!("x';touch {m};'"),
        format!("x\";touch {m};\""),
        format!("$(touch {m})"),
        format!("`touch {m}`"),
        format!("x;touch {m} #"),
        format!("x&&touch {m}"),
        format!("x|touch {m}"),
        format!("x\ntouch {m}"),
        format!("x\\';touch {m};'"),
        format!("'\"'\"';touch {m};'"),
        format!("${{IFS}}touch${{IFS}}{m}"),
        "*".to_owned(),
        "~root".to_owned(),
        String::new(),
    ]
}

/// Percent-encodes what the machines grammar or the URI would otherwise split on.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_graphic() && !b"#;&%?".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn marker_dir() -> tempfile::TempDir {
    scratch("nlb-sec-inj-", &[])
}

fn assert_no_marker(marker: &Path) {
    assert!(
        !marker.exists(),
        "a hostile value was run by a shell: {} exists",
        marker.display()
    );
}

#[test]
fn remote_command_lines_give_back_the_exact_words_in_every_shell() {
    let dir = marker_dir();
    let marker = "nlbpwned";
    // Every shell, always: tests/env/provision.sh installs them (Debian has both anyway).
    let shells = ["/bin/dash", "/bin/bash"];
    for (shell, package) in shells.iter().zip(["dash", "bash"]) {
        require_file(shell, package);
    }
    require_file("/bin/busybox", "busybox-static");
    for value in hostile(marker) {
        for scheme in ["ssh", "ssh-ng"] {
            let line = format!(
                "{scheme}://root@h?remote-store={}&remote-program={} x86_64-linux",
                pct(&value),
                pct(&format!("/opt/nix store/{value}"))
            );
            let t = config::load_table(&line, "x86_64-linux", None, &Config::default()).unwrap();
            let cmd = store::remote_command(&t.builders[0]).unwrap();
            let mut want = vec![format!("/opt/nix store/{value}")];
            if scheme == "ssh" {
                want.extend(["--serve".into(), "--write".into()]);
            } else {
                want.push("--stdio".into());
            }
            want.extend(["--store".into(), value.clone()]);
            let mut runs: Vec<Vec<&str>> = shells.iter().map(|s| vec![*s, "-c"]).collect();
            runs.push(vec!["/bin/busybox", "sh", "-c"]);
            for argv in runs {
                // The remote shell runs the line as a command; `printf` in front of it prints
                // each word it parsed instead.
                let out = Command::new(argv[0])
                    .args(&argv[1..])
                    .arg(format!("printf '[%s]\\n' {cmd}"))
                    .current_dir(dir.path())
                    .output()
                    .unwrap();
                let got = String::from_utf8_lossy(&out.stdout);
                let want_text: String = want.iter().map(|w| format!("[{w}]\n")).collect();
                assert_eq!(got, want_text, "{argv:?} parsed {cmd:?} differently");
                assert_no_marker(&dir.path().join(marker));
            }
        }
    }
    // A NUL cannot be passed at all: a clear error, not a truncated word.
    let line = "ssh://h?remote-store=a%00b x86_64-linux";
    let t = config::load_table(line, "x86_64-linux", None, &Config::default()).unwrap();
    let e = store::remote_command(&t.builders[0]).unwrap_err();
    assert!(e.to_string().contains("NUL"), "{e}");
}

#[test]
fn hostile_builder_names_are_refused_by_the_config() {
    for name in ["\"a;b\"", "\"$(x)\"", "\"a b\"", "\"a'b\"", "\"\""] {
        let text = format!(
            "[builders.{name}]\nuri = \"ssh://h\"\nsystems = [\"x86_64-linux\"]\nhost-key = \"{}\"\n",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFwgxv0w8zjLFNJ6M4EHyBd7/gHpLNuw1C+/JusH19ZC"
        );
        let e = Config::parse(&text, Path::new("/etc/nix/lazy-builder.toml")).unwrap_err();
        assert!(
            e.to_string().contains("builder names may only contain"),
            "{name}: {e}"
        );
    }
}

/// A stub whose own file name is hostile, in `dir`; it records its argv to `<dir>/argv`. A
/// file name cannot hold a `/`, so a shell would `touch` `marker_name` in its working
/// directory (see [`relative_markers`]).
fn hostile_stub(dir: &Path, marker_name: &str) -> PathBuf {
    let p = dir.join(format!(
        "s';touch {m};$(touch {m})`touch {m}`\"",
        m = marker_name
    ));
    write(
        &p,
        &format!(
            "#!/bin/sh\nfor a in \"$0\" \"$@\"; do printf '[%s]\\n' \"$a\"; done >> {}\nexit 1\n",
            dir.join("argv").display()
        ),
    );
    set_mode(&p, 0o755);
    p
}

/// Where a relative `touch` would land: the remote login's home (root's), the hook's working
/// directory, and `/`.
fn relative_markers(env: &Env, name: &str) -> Vec<PathBuf> {
    vec![
        Path::new("/root").join(name),
        env.dir.path().join(name),
        Path::new("/").join(name),
    ]
}

fn recorded(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("argv")).unwrap_or_default()
}

/// Runs the hook with one machines line for `sshd` whose `remote-program` is `stub` and whose
/// `remote-store` is `value`, checks that it declines (the stub fails), and returns what the
/// stub must have recorded for one session (its name, the program's flags for `scheme`, and
/// `--store value`, one word each) with the hook's output.
fn hook_with_hostile_value(
    env: &Env,
    sshd: &Sshd,
    stub: &Path,
    value: &str,
    scheme: &str,
    case: &str,
) -> (String, CmdOutput) {
    let uri = sshd.uri(
        scheme,
        &format!(
            "?remote-program={}&remote-store={}",
            pct(&stub.display().to_string()),
            pct(value)
        ),
    );
    let line = format!(
        "{uri} aarch64-linux {} 1 1 - - {}",
        sshd.client_key.display(),
        sshd.host_key_b64()
    );
    let out = env.hook(&daemon_stdin(&line), 3, &[]);
    assert_eq!(replies(&out), ["decline"], "{case}: {out}");
    let mut want = format!("[{}]\n", stub.display());
    if scheme == "ssh" {
        want += "[--serve]\n[--write]\n";
    } else {
        want += "[--stdio]\n";
    }
    (want + &format!("[--store]\n[{value}]\n"), out)
}

#[test]
fn hostile_values_reach_the_remote_program_as_plain_arguments() {
    let sshd = Sshd::start();
    let env = Env::new();
    // The marker a hostile program name or value would create.
    let marker_name = format!("nlbpwn{}", std::process::id());
    let stub_dir = tempfile::Builder::new().prefix("nlb").tempdir().unwrap();
    set_mode(stub_dir.path(), 0o755);
    let stub = hostile_stub(stub_dir.path(), &marker_name);
    let check_markers = || {
        for m in relative_markers(&env, &marker_name) {
            assert_no_marker(&m);
        }
    };
    for (i, value) in hostile(&marker_name).into_iter().enumerate() {
        for scheme in ["ssh", "ssh-ng"] {
            let _ = std::fs::remove_file(stub_dir.path().join("argv"));
            let case = format!("case {i} ({scheme})");
            let (want, out) = hook_with_hostile_value(&env, &sshd, &stub, &value, scheme, &case);
            assert_eq!(recorded(stub_dir.path()), want, "{case}: {out}");
            check_markers();
        }
    }
    // doctor runs `<remote-program> --version` on the builder.
    let _ = std::fs::remove_file(stub_dir.path().join("argv"));
    let uri = sshd.uri(
        "ssh",
        &format!("?remote-program={}", pct(&stub.display().to_string())),
    );
    let line = format!(
        "{uri} aarch64-linux {} 1 1 - - {}",
        sshd.client_key.display(),
        sshd.host_key_b64()
    );
    let out = env.cli(&["doctor", "--builders", &line], &[]);
    assert!(out.stdout.contains("[FAIL] remote nix"), "{out}");
    assert_eq!(
        recorded(stub_dir.path()),
        format!("[{}]\n[--version]\n", stub.display())
    );
    check_markers();

    // A hostile login name is a login name: sshd refuses it, no shell ever sees it.
    let user = format!("x$(touch{IFS}{marker_name})", IFS = "${IFS}");
    let line = format!(
        "ssh://{user}@127.0.0.1:{} aarch64-linux {} 1 1 - - {}",
        sshd.port,
        sshd.client_key.display(),
        sshd.host_key_b64()
    );
    let out = env.hook(&daemon_stdin(&line), 3, &[]);
    assert_eq!(replies(&out), ["decline"], "{out}");
    assert!(
        messages(&out).join("\n").contains("authentication failed"),
        "{out}"
    );
    std::thread::sleep(Duration::from_millis(200));
    check_markers();
}

#[test]
fn hostile_values_reach_the_remote_program_as_plain_arguments_through_warm_sessions() {
    // With warm connections the hook starts a supervisor whose pool opens sessions of its own
    // connection, with the command line the hook sends it. Each session must run the stub with
    // exactly the words the hook's own connection does, and nothing else may run. Each case
    // has its own stub and record: a pool whose stub failed tries again later.
    let sshd = Sshd::start();
    let env = Env::new();
    env.write_config_keeping_warm("", "2m");
    // The hook-started supervisor is stopped however the test ends.
    let stop = StopSupervisor(&env);
    let marker_name = format!("nlbpww{}", std::process::id());
    let stubs = tempfile::Builder::new().prefix("nlb").tempdir().unwrap();
    set_mode(stubs.path(), 0o755);
    let mut cases = Vec::new();
    for (i, value) in hostile(&marker_name).into_iter().enumerate() {
        for scheme in ["ssh", "ssh-ng"] {
            let dir = stubs.path().join(format!("{i}{scheme}"));
            std::fs::create_dir(&dir).unwrap();
            set_mode(&dir, 0o755);
            let stub = hostile_stub(&dir, &marker_name);
            let case = format!("case {i} ({scheme})");
            let (want, _) = hook_with_hostile_value(&env, &sshd, &stub, &value, scheme, &case);
            let first = format!("[{}]\n", stub.display());
            // The hook's own session, then the pool's (the positive control: warm sessions
            // really ran the stub).
            crate::harness::wait_until(
                &format!("{case}: a warm session running the stub"),
                Duration::from_secs(20),
                || recorded(&dir).matches(&first).count() >= 2,
            );
            cases.push((case, dir, first, want));
        }
    }
    drop(stop);
    // Every session any pool opened, retries included, ran the exact words.
    for (case, dir, first, want) in cases {
        let got = recorded(&dir);
        assert_eq!(got, want.repeat(got.matches(&first).count()), "{case}");
    }
    for m in relative_markers(&env, &marker_name) {
        assert_no_marker(&m);
    }
}

/// Stops `Env`'s supervisor when dropped.
struct StopSupervisor<'a>(&'a Env);

impl Drop for StopSupervisor<'_> {
    fn drop(&mut self) {
        self.0.stop_supervisor();
    }
}
