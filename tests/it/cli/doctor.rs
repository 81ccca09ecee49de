//! `doctor` tells the truth, driving the real binary: the builders it checks are the ones
//! nix-daemon reads (nix.conf and its includes, `NIX_CONFIG`, `@file`s, a missing one warned
//! about); a wrong key file or a wrong host key fails the row it belongs to; a running lazy
//! builder does not vouch for the boot settings of its next boot; a supervisor that serves
//! another config file is no proof of this one; and a builder doctor booted is stopped with
//! `--stop` or said to stop at its idle timeout. The builders are real: an sshd with its own
//! Nix store, always on or booted by a `kind = "command"` lazy builder.
//!
//! Must never: leave a supervisor or a builder running (every handle stops its own).

use std::path::Path;
use std::time::Duration;

use crate::harness::security::{Env, Supervisor, impostor_key};
use crate::harness::*;

/// The report's lines for builder `name`, from its heading to its verdict.
fn section<'a>(report: &'a str, name: &str) -> Vec<&'a str> {
    report
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{name} (")))
        .take_while(|l| !l.is_empty())
        .collect()
}

/// The row of `what` in a section, e.g. `[FAIL] host key   …`.
fn row<'a>(section: &[&'a str], what: &str) -> Vec<&'a str> {
    section
        .iter()
        .copied()
        .filter(|l| l.len() > 9 && l[9..].starts_with(what))
        .collect()
}

/// An always-on builder line for `remote` that says both systems (so `systems` passes).
fn machines_line(remote: &RemoteStore) -> String {
    remote.machines_line(&MachineLine {
        systems: &["x86_64-linux", "aarch64-linux"],
        ..MachineLine::new(Scheme::Ssh, true)
    })
}

/// Doctor with only the given nix.conf environment (none of the machine's own files).
fn doctor(
    env: &Env,
    args: &[&str],
    conf_env: &[(&str, &Path)],
    nix_config: Option<&str>,
) -> CmdOutput {
    let mut vars: Vec<(&str, String)> =
        vec![("XDG_CONFIG_DIRS", env.path("xdg").display().to_string())];
    for (k, v) in conf_env {
        vars.push((k, v.display().to_string()));
    }
    if let Some(c) = nix_config {
        vars.push(("NIX_CONFIG", c.to_owned()));
    }
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut all = vec!["doctor"];
    all.extend(args);
    env.cli(&all, &vars)
}

#[test]
fn builders_are_read_as_nix_daemon_reads_them() {
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let env = Env::new();
    let conf = env.path("nix-conf");
    std::fs::create_dir_all(&conf).unwrap();
    let machines = env.path("machines");
    write(&machines, &format!("{}\n", machines_line(&remote)));
    let gone = env.path("gone-machines");
    let nix_conf = |text: &str| write(&conf.join("nix.conf"), text);
    let d = [("NIX_CONF_DIR", conf.as_path())];

    // Set in a file nix.conf includes, naming a machines file that does not exist.
    nix_conf("sandbox = false\ninclude builders.conf\n!include optional.conf\n");
    write(
        &conf.join("builders.conf"),
        &format!("builders = @{}\n", gone.display()),
    );
    let out = doctor(&env, &[], &d, None);
    assert_eq!(out.code(), Some(0), "{out}");
    for line in [
        format!(
            "builders: @{} (set in {}:1, as nix-daemon reads it)",
            gone.display(),
            conf.join("builders.conf").display()
        ),
        format!(
            "warning: machines file {} does not exist: nix-daemon skips it without a word, so it \
             adds no builders",
            gone.display()
        ),
    ] {
        assert!(
            out.stdout_lines().contains(&line),
            "no line '{line}':\n{out}"
        );
    }
    assert!(out.stdout.contains(": 0 builder(s) (0 lazy)"), "{out}");

    // NIX_CONFIG comes last and wins: the real machines file is checked end to end.
    let value = format!("@{};@{}", machines.display(), gone.display());
    let out = doctor(&env, &[], &d, Some(&format!("builders = {value}")));
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout_lines().contains(&format!(
            "builders: {value} (set in NIX_CONFIG, line 1, as nix-daemon reads it)"
        )),
        "{out}"
    );
    let uri = remote.uri(Scheme::Ssh);
    let s = section(&out.stdout, &uri);
    assert!(
        s.first()
            .is_some_and(|h| h.contains(&format!("machines line {}:1", machines.display()))),
        "{out}"
    );
    assert_eq!(row(&s, "ssh").len(), 1, "{out}");
    assert!(row(&s, "remote nix")[0].contains("[ ok ]"), "{out}");
    assert_eq!(s.last(), Some(&"  verdict: usable"), "{out}");

    // An `include` of a file that is not there is what Nix refuses: a warning.
    nix_conf("include absent.conf\n");
    let out = doctor(&env, &[], &d, None);
    assert!(
        out.stdout_lines().contains(&format!(
            "warning: {}:1: included file {} does not exist (Nix refuses this configuration; \
             `!include` allows a missing file)",
            conf.join("nix.conf").display(),
            conf.join("absent.conf").display()
        )),
        "{out}"
    );
    // Nothing sets it: Nix's default, whose absence is only a note.
    assert!(
        out.stdout.contains(&format!(
            "builders: @{} (Nix's default: not set in {}",
            conf.join("machines").display(),
            conf.join("nix.conf").display()
        )),
        "{out}"
    );
    assert!(
        out.stdout_lines().contains(&format!(
            "note: no machines file {} (the default builders): no always-on builders from it",
            conf.join("machines").display()
        )),
        "{out}"
    );
    // --builders replaces the daemon's value.
    let out = doctor(&env, &["--builders", &machines_line(&remote)], &d, None);
    assert!(out.stdout.contains("(--builders)"), "{out}");
    assert!(
        section(&out.stdout, &uri).last() == Some(&"  verdict: usable"),
        "{out}"
    );
}

#[test]
fn key_files_that_openssh_refuses_fail_the_key_row() {
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let env = Env::new();
    let line_with_key = |key: &Path| {
        machines_line(&remote).replace(
            &remote.client_key().display().to_string(),
            &key.display().to_string(),
        )
    };
    let open = env.path("open_key");
    std::fs::copy(remote.client_key(), &open).unwrap();
    set_mode(&open, 0o644);
    let out = doctor(&env, &["--builders", &line_with_key(&open)], &[], None);
    assert_eq!(out.code(), Some(1), "{out}");
    let s = section(&out.stdout, &remote.uri(Scheme::Ssh));
    assert_eq!(
        row(&s, "key"),
        [format!(
            "  [FAIL] key        SSH key file {} has permissions 0644, which are too open: a \
             private key must not be accessible by others, so it is ignored, as OpenSSH does \
             (chmod 600 {})",
            open.display(),
            open.display()
        )
        .as_str()],
        "{out}"
    );
    // The same key, 0600: it loads and logs in.
    set_mode(&open, 0o600);
    let out = doctor(&env, &["--builders", &line_with_key(&open)], &[], None);
    assert!(
        row(&section(&out.stdout, &remote.uri(Scheme::Ssh)), "key")[0].contains("[ ok ]"),
        "{out}"
    );

    let junk = env.path("junk_key");
    std::fs::write(&junk, [0xff_u8, 0xfe, 0, 0x80, b'k', b'e', b'y']).unwrap();
    set_mode(&junk, 0o600);
    let out = doctor(&env, &["--builders", &line_with_key(&junk)], &[], None);
    let s = section(&out.stdout, &remote.uri(Scheme::Ssh));
    let r = row(&s, "key");
    assert!(
        r.len() == 1
            && r[0].starts_with("  [FAIL] key")
            && r[0].ends_with(&format!(
                "{}: not an OpenSSH private key (expected a text file that starts with \
                 `-----BEGIN OPENSSH PRIVATE KEY-----`)",
                junk.display()
            )),
        "{out}"
    );
    assert!(!out.stdout.contains("UTF-8"), "{out}");
}

/// A lazy builder on `remote` booted by its command, with `extra` builder settings.
fn lazy(remote: &LazyRemote, name: &str, extra: &str) -> String {
    remote.builder_toml(
        name,
        Scheme::Ssh,
        &["x86_64-linux", "aarch64-linux"],
        extra,
        &remote.command_boot(Duration::ZERO),
    )
}

/// A lazy builder `cmd` on a machine of its own, as an [`Env`]'s config, and a supervisor
/// serving it. Dropped in this order: the supervisor, then the machine (every process of it).
struct Served {
    sup: Supervisor,
    vm: LazyRemote,
    /// The config's text.
    toml: String,
}

/// Writes `cmd` with `settings` as `env`'s config and starts a supervisor on it.
fn serve_cmd(env: &Env, settings: &str) -> Served {
    let vm = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let toml = lazy(&vm, "cmd", settings);
    env.write_config(&toml);
    let sup = Supervisor::start(env, &[]);
    Served { sup, vm, toml }
}

#[test]
fn a_host_key_mismatch_is_the_host_key_rows_failure() {
    // Always on: found when doctor connects.
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let env = Env::new();
    let wrong = crate::harness::security::b64(&impostor_key(env.dir.path()));
    let line = machines_line(&remote).replace(&remote.host_key_base64(), &wrong);
    let out = doctor(&env, &["--builders", &line], &[], None);
    assert_eq!(out.code(), Some(1), "{out}");
    let s = section(&out.stdout, &remote.uri(Scheme::Ssh));
    let hk = row(&s, "host key");
    assert!(
        hk.len() == 1 && hk[0].starts_with("  [FAIL] host key   HOST KEY MISMATCH"),
        "{out}"
    );
    assert!(row(&s, "ssh").is_empty(), "{out}");
    assert_eq!(
        s.last(),
        Some(&"  verdict: NOT usable: host key failed"),
        "{out}"
    );

    // Lazy: found by the supervisor's readiness check during the boot.
    let vm = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let toml = lazy(&vm, "cmd", "boot-timeout = \"60s\"")
        .replace(vm.host_key_line(), &impostor_key(env.dir.path()));
    env.write_config(&toml);
    let sup = Supervisor::start(&env, &[]);
    let out = doctor(&env, &["--builders", ""], &[], None);
    assert_eq!(out.code(), Some(1), "{out}\n{}", sup.output());
    let s = section(&out.stdout, "cmd");
    let hk = row(&s, "host key");
    assert!(
        hk.len() == 1 && hk[0].starts_with("  [FAIL] host key   booted, but HOST KEY MISMATCH"),
        "{out}"
    );
    assert!(!out.stdout.contains("[ ok ] host key"), "{out}");
    assert!(row(&s, "boot  ").is_empty(), "{out}");
    assert_eq!(
        s.last(),
        Some(&"  verdict: NOT usable: host key failed"),
        "{out}"
    );
    drop(sup);
    vm.kill_all();
}

#[test]
fn a_running_builder_does_not_vouch_for_the_settings_of_its_next_boot() {
    let env = Env::new();
    let served = serve_cmd(&env, "boot-timeout = \"60s\"\nidle-timeout = \"5m\"");
    let good = &served.toml;
    env.cli(&["up", "cmd"], &[]).assert_success();
    let out = doctor(&env, &["--builders", ""], &[], None);
    assert_eq!(out.code(), Some(0), "{out}\n{}", served.sup.output());
    let s = section(&out.stdout, "cmd");
    assert!(
        row(&s, "boot setup")[0].starts_with("  [ ok ] boot setup boot command /usr/bin/env"),
        "{out}"
    );
    assert!(
        row(&s, "boot  ")[0].starts_with("  [ ok ] boot       up on port"),
        "{out}"
    );

    // The boot command moves away: the instance still runs, its next boot would fail.
    let moved = good.replacen("\"/usr/bin/env\"", "\"/nonexistent/start-vm\"", 1);
    assert_ne!(&moved, good);
    env.write_config(&moved);
    // Let the edit settle (200 ms) so the supervisor reloads it at doctor's first request.
    std::thread::sleep(Duration::from_millis(300));
    let out = doctor(&env, &["--builders", ""], &[], None);
    assert_eq!(out.code(), Some(1), "{out}\n{}", served.sup.output());
    let s = section(&out.stdout, "cmd");
    assert_eq!(
        row(&s, "boot setup"),
        [
            "  [FAIL] boot setup boot command not found: /nonexistent/start-vm does not exist (the \
          next boot of 'cmd' fails)"
        ],
        "{out}"
    );
    let boot = row(&s, "boot  ");
    assert!(
        boot.len() == 1
            && boot[0].starts_with("  [warn] boot       up on port")
            && boot[0].ends_with(
                "but its instance was booted with older boot settings: this file's apply from \
                 its next boot, and only 'boot setup' above checked them"
            ),
        "{out}"
    );
    // The rest is still checked against the running instance.
    assert!(row(&s, "remote nix")[0].starts_with("  [ ok ]"), "{out}");
    assert_eq!(
        s.last(),
        Some(&"  verdict: NOT usable: boot setup failed"),
        "{out}"
    );
    let st = env.cli(&["status"], &[]);
    assert!(
        st.stdout_lines().contains(&"note: 'cmd' runs with boot settings its config no longer has; they apply from its next boot".to_owned()),
        "{st}"
    );
}

#[test]
fn a_supervisor_that_serves_another_config_file_is_said_so() {
    let env = Env::new();
    let served = serve_cmd(&env, "boot-timeout = \"60s\"");
    // Another file with a builder of the same name, on the same state directory.
    let other = env.path("other.toml");
    std::fs::copy(env.config(), &other).unwrap();
    let mut c = std::process::Command::new(&env.bin);
    c.args(["doctor", "--builders", "", "--config"]).arg(&other);
    let out = run_command(&mut c, None, Duration::from_secs(60));
    assert_eq!(out.code(), Some(1), "{out}");
    let state = env.path("lazy-state/sup");
    assert!(
        out.stdout_lines().iter().any(|l| l.starts_with(&format!(
            "warning: the supervisor on {} (pid ",
            state.display()
        )) && l.ends_with(&format!(
            "serves {}, not {}: it boots that file's builders, so this file's lazy builders are \
             not checked",
            env.config().display(),
            other.display()
        ))),
        "{out}"
    );
    let s = section(&out.stdout, "cmd");
    assert!(
        row(&s, "boot  ")[0].starts_with("  [FAIL] boot       not checked: the supervisor"),
        "{out}"
    );
    assert_eq!(
        s.last(),
        Some(&"  verdict: NOT usable: boot failed"),
        "{out}"
    );
    assert!(
        !served.vm.listening(),
        "doctor booted the other file's builder"
    );
    let mut c = std::process::Command::new(&env.bin);
    c.args(["status", "--config"]).arg(&other);
    let st = run_command(&mut c, None, Duration::from_secs(60));
    assert!(
        st.stdout.contains(&format!(
            "serves {}, not {}: the builders below are that file's",
            env.config().display(),
            other.display()
        )),
        "{st}"
    );
}

#[test]
fn doctor_says_when_the_builder_it_booted_stops_or_stops_it() {
    let env = Env::new();
    let served = serve_cmd(&env, "boot-timeout = \"60s\"\nidle-timeout = \"2m\"");
    let out = doctor(&env, &["--builders", ""], &[], None);
    assert_eq!(out.code(), Some(0), "{out}\n{}", served.sup.output());
    // A note on the builder doctor booted.
    let note = out.stdout_line("note: doctor booted 'cmd'");
    assert!(
        note.starts_with("note: doctor booted 'cmd' for this check; it stops by itself once idle for 2m (idle-timeout), in ")
            && note.ends_with(" if no build uses it, or at once with `nix-lazy-builder down cmd` (or run doctor with --stop)"),
        "{note}"
    );
    assert!(served.vm.listening());
    // Already up: doctor did not boot it, and says nothing of stopping it.
    let out = doctor(&env, &["--builders", ""], &[], None);
    assert!(!out.stdout.contains("note: doctor booted"), "{out}");
    env.cli(&["down", "cmd"], &[]).assert_success();
    wait_until("the builder to stop", Duration::from_secs(30), || {
        !served.vm.listening()
    });

    let out = doctor(&env, &["--builders", "", "--stop"], &[], None);
    assert_eq!(out.code(), Some(0), "{out}\n{}", served.sup.output());
    assert!(
        out.stdout.contains(
            "note: doctor booted 'cmd' for this check and stopped it again (--stop; it is "
        ),
        "{out}"
    );
    wait_until(
        "the builder doctor stopped",
        Duration::from_secs(30),
        || !served.vm.listening(),
    );
}
