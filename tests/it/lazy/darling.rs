//! A `kind = "darling"` lazy builder end to end, through a STAND-IN `darling`
//! (tests/fixtures/darling): Darling itself cannot run on these machines (it needs its setuid
//! launcher, darlingserver and a macOS userland). The stand-in honours the part of Darling's
//! command line the boot backend uses (`DPREFIX=P darling shell CMD…`, `DPREFIX=P darling
//! shutdown`) and runs CMD in a private mount namespace with the prefix's own `nix/` over
//! `/nix`. CMD is the harness's real OpenSSH sshd, and the prefix's store is a real Nix store
//! that accepts `x86_64-darwin` through `extra-platforms`: everything but Darling is real.
//!
//! A real nix-daemon with our hook and only the lazy-builder TOML builds an `x86_64-darwin`
//! derivation: the supervisor "boots" the prefix, the build runs there over `ssh-ng://`, the
//! outputs come back, and the prefix is shut down after `idle-timeout`.

use std::path::Path;
use std::time::Duration;

use nix_lazy_builder::supervisor::proto::State;

use crate::harness::*;

/// An x86_64-darwin derivation with one x86_64-linux input built locally. The remote store has
/// no build users and no sandbox, so the builder is busybox itself (its `sh` finds its applets
/// without a PATH).
fn darwin_expr(name: &str) -> String {
    let input = DrvExpr::local_input(name, &format!("echo input-of-{name} > $out"));
    let main = DrvExpr::sh(
        name,
        "x86_64-darwin",
        &format!(
            "echo 'nlb-darling {name}: building'; cat $input > $out; echo $input >> $out; echo built-for-x86_64-darwin >> $out"
        ),
    )
    .busybox()
    .inherit("input");
    rec_set(&[("input", &input), ("main", &main)])
}

#[test]
fn darling_stand_in_builder_boots_builds_and_shuts_down() {
    eprintln!(
        "NOTE: `darling` here is the STAND-IN tests/fixtures/darling; Darling cannot run on this machine"
    );
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut ropts = RemoteOpts::new(Nix::Host);
    ropts.extra_platforms = vec!["x86_64-darwin".to_owned()];
    ropts.build_users_group = Some(String::new());
    ropts.sandbox = false;
    let prefix = LazyRemote::prepare(ropts);
    let boot = format!(
        "kind = \"darling\"\nprefix = {}\nsshd-config = {}\n",
        toml_str(&prefix.prefix().to_string_lossy()),
        toml_str(&prefix.sshd_config().to_string_lossy())
    );
    let cfg = LazyConfig::write(&[prefix.builder_toml(
        "darwin",
        Scheme::SshNg,
        &["x86_64-darwin"],
        "max-jobs = 1\nidle-timeout = \"3s\"\nboot-timeout = \"60s\"",
        &boot,
    )]);
    // The stand-in comes first on the PATH the daemon gives its hooks (and so the supervisor).
    let opts = cfg.daemon_opts(Duration::from_secs(60)).env(
        "PATH",
        &format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            fixtures.display()
        ),
    );
    let daemon = LocalDaemon::start(opts);
    assert!(!prefix.listening());

    let file = daemon.write_file("darwin.nix", &darwin_expr("lazy-darwin"));
    let file = file.to_string_lossy().into_owned();
    let out = daemon.nix_build(&[&file, "-A", "main"]);
    out.assert_success();
    let path = out.stdout.trim().to_owned();
    assert!(path.ends_with("-lazy-darwin"), "{out}");
    let input = daemon.nix_build(&[&file, "-A", "input"]);
    input.assert_success();
    let input = input.stdout.trim().to_owned();
    assert_eq!(
        std::fs::read_to_string(daemon.host_path(&path)).expect("the output"),
        format!("input-of-lazy-darwin\n{input}\nbuilt-for-x86_64-darwin\n")
    );
    assert_eq!(daemon.references(&path), vec![input.clone()]);
    assert!(out.stderr.contains("booting builder 'darwin'"), "{out}");
    assert!(
        out.stderr.contains("nlb-darling lazy-darwin: building"),
        "{out}"
    );
    assert!(
        out.stderr
            .contains(&format!("on '{}'", prefix.uri(Scheme::SshNg))),
        "{out}"
    );
    // Built in the prefix's store (which got the input copied in).
    assert!(prefix.is_valid(&path));
    assert!(prefix.is_valid(&input));
    assert!(daemon.invalid_leftovers().is_empty());

    // Started through the stand-in's `shell`: its container runs the prefix's sshd exactly as
    // `darling shell /usr/sbin/sshd -D -f CONFIG` asks.
    // (sshd rewrites its process title, which keeps the original command line.)
    let want = format!("/usr/sbin/sshd -D -f {}", prefix.sshd_config().display());
    let titles: Vec<String> = prefix
        .processes()
        .into_iter()
        .filter_map(cmdline)
        .map(|a| a.join(" "))
        .collect();
    assert!(titles.iter().any(|t| t.contains(&want)), "{titles:?}");
    assert!(prefix.prefix().join(".stand-in-container.pid").exists());
    let st = cfg.status_of(&daemon, "darwin");
    assert_eq!((st.state, st.boots), (State::Up, 1), "{st:?}");
    assert!(
        st.nix_version
            .as_deref()
            .is_some_and(|v| v.starts_with("nix-daemon (Nix) ")),
        "{st:?}"
    );

    // Shut down with `darling shutdown` once idle.
    wait_until("the idle shutdown", Duration::from_secs(30), || {
        !prefix.listening() && prefix.processes().is_empty()
    });
    let st = cfg.wait_for_state(&daemon, "darwin", State::Down, Duration::from_secs(10));
    assert_eq!(st.boots, 1, "{st:?}");
    assert!(st.last_failure.is_none(), "{st:?}");
    let log = cfg.supervisor_log();
    assert!(log.contains("stopped by darling shutdown"), "{log}");
}
