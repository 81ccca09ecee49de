//! Failing builds, fixed-output builds and an untrusting `ssh-ng://` daemon behave on a warm
//! session as on a connection of the hook's own: the same messages and exit statuses, the build
//! log, the `.drv` closure path for the untrusting daemon (each checks a session was handed
//! out).
//!
//! Must never: pass on a direct connection (hand-outs are counted), or stop a process other than
//! by its pid.

use crate::harness::warm::*;
use crate::harness::*;

#[test]
fn a_failing_build_on_a_warm_session_fails_as_today() {
    for scheme in [Scheme::Ssh, Scheme::SshNg] {
        let (_remote, daemon, uri) = warmed(scheme, "warm-fail");
        let drv = FakeDrv::new(&format!("warm-fail-{}", scheme.prefix())).failing(3);
        drv.build_input(&daemon);
        let (paths, out) = drv.build(&daemon, &[]);
        out.assert_failure();
        assert_eq!(out.code(), Some(1), "{out}");
        assert_eq!(hand_outs(&daemon, &uri), 1, "not on a warm session");
        let ours: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| {
                l.starts_with(&format!(
                    "error: build of '{}' on '{uri}' failed: ",
                    paths.drv
                ))
            })
            .collect();
        assert_eq!(ours.len(), 1, "{out}");
        assert!(
            ours[0].contains(&format!(
                "builder for '{}' failed with exit code 3",
                paths.drv
            )),
            "{out}"
        );
        assert!(
            out.stderr.contains(&format!(
                "error: builder for '{}' failed with exit code 100",
                paths.drv
            )),
            "{out}"
        );
        for l in drv
            .expected_log_lines()
            .iter()
            .chain(drv.failure_line().iter())
        {
            assert!(
                out.stderr.lines().any(|x| x == l),
                "no log line {l:?}:\n{out}"
            );
        }
        assert!(!daemon.is_valid(&paths.out));
        assert!(daemon.invalid_leftovers().is_empty());
    }
}

/// A fixed-output derivation for aarch64 (the remote must build it) with known contents.
fn fixed_output(daemon: &LocalDaemon, name: &str) -> (String, String) {
    use sha2::Digest;
    let text = format!("{name}: fixed\n");
    let hash: String = sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let expr = daemon.write_file(
        &format!("{name}.nix"),
        &format!(
            r#"derivation {{
  name = "{name}";
  system = "aarch64-linux";
  builder = "/bin/sh";
  args = [ "-c" "printf '%s\n' '{name}: fixed' > $out" ];
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = "{hash}";
}}
"#
        ),
    );
    (expr.to_string_lossy().into_owned(), text)
}

#[test]
fn a_fixed_output_build_on_a_warm_session_as_today() {
    for scheme in [Scheme::Ssh, Scheme::SshNg] {
        let (remote, daemon, uri) = warmed(scheme, "warm-fod");
        let (expr, text) = fixed_output(&daemon, &format!("warm-fod-{}", scheme.prefix()));
        let out = daemon.nix_build(&[&expr]);
        out.assert_success();
        assert_eq!(hand_outs(&daemon, &uri), 1, "not on a warm session");
        let path = out.stdout.trim().to_owned();
        assert!(daemon.is_valid(&path) && remote.is_valid(&path), "{out}");
        let on_disk = std::fs::read_to_string(
            daemon
                .host_nix_dir()
                .join("store")
                .join(path.trim_start_matches("/nix/store/")),
        )
        .expect("the output");
        assert_eq!(on_disk, text);
    }
}

#[test]
fn an_untrusting_ssh_ng_daemon_on_a_warm_session_as_today() {
    // A Nix 2.34 remote as `nix-daemon --stdio --force-untrusted`: the handshake the
    // supervisor did must carry its "not trusted" to the hook, which then copies the .drv
    // closure and builds with BuildPathsWithResults (an input-addressed build would be
    // refused otherwise).
    let mut ro = RemoteOpts::new(Nix::Sid);
    ro.extra_conf
        .push("extra-experimental-features = daemon-trust-override".to_owned());
    let remote = RemoteStore::start(ro);
    let wrapper = remote.dir().join("nix-daemon-untrusted");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nexec nix-daemon \"$@\" --force-untrusted\n",
    )
    .expect("write the wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod the wrapper");
    let plain = remote.uri(Scheme::SshNg);
    let uri = format!("{plain}?remote-program={}", wrapper.display());
    let line = remote
        .machines_line(&MachineLine::new(Scheme::SshNg, true))
        .replacen(&plain, &uri, 1);
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    opts.machines = Some(line + "\n");
    let daemon = LocalDaemon::start(opts);
    warm_up(&daemon, &remote, &uri, "warm-untrusted");
    let drv = FakeDrv::new("warm-untrusted").with_log_lines(2);
    let paths = drv.build_input(&daemon);
    let (paths2, out) = drv.build(&daemon, &["-vv"]);
    out.assert_success();
    assert_eq!(paths.out, paths2.out);
    assert!(out.stderr.contains("warm session handed over"), "{out}");
    assert!(
        out.stderr.contains("does not trust us") && out.stderr.contains("BuildPathsWithResults"),
        "the hook did not take the untrusted path:\n{out}"
    );
    paths2.assert_built(&daemon, true);
    assert!(remote.is_valid(&paths.drv), "the .drv was not copied");
    assert!(
        remote.build_log(&paths.input_drv).is_some(),
        "the input was uploaded, not built there"
    );
}
