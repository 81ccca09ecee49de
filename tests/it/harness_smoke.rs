//! Proves the integration-test harness itself, with Nix's own build hook (so it does not
//! depend on nix-lazy-builder): a real local nix-daemon sends the fake aarch64 derivation
//! through the hook to a real sshd "remote" with its own store, and the outputs come back
//! valid, with the right references, deriver and build log, leaving nothing half-written.
//!
//! Covers Nix 2.8 ↔ 2.8 over `ssh://` and `ssh-ng://`, 2.8 ↔ 2.34 in both directions, and 2.8 ↔
//! 2.26 once each way (2.26 and 2.34 from the trixie and sid chroots; those cases panic if the
//! chroot is missing, they never skip).
//!
//! Also checks that the harness's own checks can fail: planted junk in a store is reported as
//! a leftover, a wrong pinned host key makes the build fail, a hung command is killed.
//!
//! Must never: test nix-lazy-builder's behaviour (other tests do), or pass without a real
//! remote build having happened (the remote store must hold the outputs afterwards).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

/// One smoke case: `local` daemon with its own hook, `remote` store, over `scheme`.
fn smoke(case: &str, local: Nix, remote_nix: Nix, scheme: Scheme) {
    let start = Instant::now();
    let remote = timed(&format!("{case}: remote sshd up"), || {
        RemoteStore::start(RemoteOpts::new(remote_nix))
    });
    let mut opts = DaemonOpts::new(local);
    // Nix 2.8's and 2.26's hooks cannot take a port from the URI (they want NIX_SSHOPTS); 2.8's
    // is the default `build-hook` there anyway, so it is named; 2.26's and 2.34's default is
    // `nix __build-remote`, which we leave alone, and 2.34's parses `host:port` itself.
    if local == Nix::Host {
        opts.build_hook = Some(NIX_28_BUILD_REMOTE.to_owned());
    }
    let with_port = local.own_hook_takes_port_in_uri();
    let uri = if with_port {
        remote.uri(scheme)
    } else {
        remote.uri_without_port(scheme)
    };
    let line = remote.machines_line(&MachineLine::new(scheme, with_port));
    // Exercise both ways of configuring machines: inline and through /etc/nix/machines.
    match scheme {
        Scheme::Ssh => opts.builders = Some(line),
        Scheme::SshNg => opts.machines = Some(format!("# smoke\n{line}\n")),
    }
    opts.env
        .push(("NIX_SSHOPTS".to_owned(), remote.nix_sshopts(!with_port)));
    let daemon = timed(&format!("{case}: local daemon up"), || {
        LocalDaemon::start(opts)
    });
    eprintln!(
        "{case}: local {:?}, remote {:?}",
        daemon.nix_version(),
        remote.nix_version()
    );
    assert!(
        remote.nix_version().contains(&remote_nix.version_marker()),
        "remote runs {}",
        remote.nix_version()
    );

    let drv = FakeDrv::new("nlb-smoke").with_log_lines(4);
    let paths = timed(&format!("{case}: x86_64 input built locally"), || {
        drv.build_input(&daemon)
    });
    assert!(daemon.is_valid(&paths.input_out));
    assert!(
        !remote.is_valid(&paths.input_out),
        "the remote must not have the input before the remote build"
    );

    let (paths, out) = timed(&format!("{case}: aarch64 build via the hook"), || {
        drv.build(&daemon, &[])
    });
    out.assert_success();
    out.assert_prints(&[&paths.out, &paths.dev], "nix-build's output paths");
    assert!(
        out.stderr.contains(&format!("on '{uri}'")),
        "the client was not told the build ran on {uri}:\n{out}"
    );

    paths.assert_built(&daemon, true);
    // It really was built over there: the remote holds the outputs and the copied input.
    paths.assert_built(&remote, false);
    assert!(remote.is_valid(&paths.input_out));
    daemon.assert_no_leftovers("local");
    remote.assert_no_leftovers("remote");

    // A failing build: the error and the log lines reach the client and the local log.
    let bad = FakeDrv::new("nlb-smoke-fail").failing(3);
    let (bad_paths, out) = timed(&format!("{case}: failing build via the hook"), || {
        bad.build(&daemon, &[])
    });
    out.assert_failure();
    assert!(
        out.stderr.contains("exit code 3"),
        "the client should see exit code 3:\n{out}"
    );
    assert!(!daemon.is_valid(&bad_paths.out));
    daemon.assert_no_leftovers("local, after the failure");
    eprintln!("[timing] {case}: total {:.2?}", start.elapsed());
}

#[test]
fn nix28_to_nix28_over_ssh() {
    smoke("2.8->2.8 ssh", Nix::Host, Nix::Host, Scheme::Ssh);
}

#[test]
fn nix28_to_nix28_over_ssh_ng() {
    smoke("2.8->2.8 ssh-ng", Nix::Host, Nix::Host, Scheme::SshNg);
}

#[test]
fn nix28_to_nix234_over_ssh() {
    smoke("2.8->2.34 ssh", Nix::Host, Nix::Sid, Scheme::Ssh);
}

#[test]
fn nix28_to_nix234_over_ssh_ng() {
    smoke("2.8->2.34 ssh-ng", Nix::Host, Nix::Sid, Scheme::SshNg);
}

#[test]
fn nix234_to_nix28_over_ssh() {
    smoke("2.34->2.8 ssh", Nix::Sid, Nix::Host, Scheme::Ssh);
}

#[test]
fn nix234_to_nix28_over_ssh_ng() {
    smoke("2.34->2.8 ssh-ng", Nix::Sid, Nix::Host, Scheme::SshNg);
}

#[test]
fn nix226_to_nix28_over_ssh_ng() {
    smoke("2.26->2.8 ssh-ng", Nix::Trixie, Nix::Host, Scheme::SshNg);
}

#[test]
fn nix28_to_nix226_over_ssh() {
    smoke("2.8->2.26 ssh", Nix::Host, Nix::Trixie, Scheme::Ssh);
}

/// The leftover check must see an unregistered store path and a stray temp file, and must not
/// report valid paths.
#[test]
fn leftover_check_reports_planted_junk() {
    let daemon = LocalDaemon::start(DaemonOpts::new(Nix::Host));
    let paths = FakeDrv::new("nlb-leftover").build_input(&daemon);
    assert_eq!(daemon.invalid_leftovers(), Vec::<String>::new());
    let junk = "/nix/store/00000000000000000000000000000000-nlb-junk";
    std::fs::create_dir(daemon.host_path(junk)).expect("plant a junk store path");
    std::fs::write(daemon.host_path("/nix/store/tmp-nlb-junk"), "x").expect("plant a temp file");
    assert_eq!(
        daemon.invalid_leftovers(),
        vec![junk.to_owned(), "/nix/store/tmp-nlb-junk".to_owned()]
    );
    assert!(daemon.is_valid(&paths.input_out));
    assert!(!daemon.is_valid(junk));
}

/// Column 8 really pins the host key: another host's key makes Nix's hook fail to connect.
#[test]
fn wrong_pinned_host_key_fails() {
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let impostor = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let line = remote
        .machines_line(&MachineLine::new(Scheme::Ssh, false))
        .replace(&remote.host_key_base64(), &impostor.host_key_base64());
    let mut opts = DaemonOpts::new(Nix::Host);
    opts.build_hook = Some(NIX_28_BUILD_REMOTE.to_owned());
    opts.builders = Some(line);
    opts.env
        .push(("NIX_SSHOPTS".to_owned(), remote.nix_sshopts(true)));
    let daemon = LocalDaemon::start(opts);
    let (paths, out) = FakeDrv::new("nlb-wrong-key").build(&daemon, &[]);
    out.assert_failure();
    assert!(
        out.stderr.contains("Host key verification failed"),
        "expected a host key failure:\n{out}"
    );
    assert!(!remote.is_valid(&paths.out));
}

/// The strings tests put in configs match what OpenSSH's own tools say.
#[test]
fn remote_key_strings_match_openssh() {
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let pub_file = remote.dir().join("ssh/host_ed25519_key.pub");
    let mut b64 = Command::new("base64");
    b64.arg("-w0").arg(&pub_file);
    let out = run_command(&mut b64, None, Duration::from_secs(10));
    out.assert_success();
    assert_eq!(out.stdout, remote.host_key_base64());
    assert!(remote.host_key_line().starts_with("ssh-ed25519 "));
    let uri = remote.uri(Scheme::SshNg);
    assert_eq!(uri, format!("ssh-ng://root@127.0.0.1:{}", remote.port()));
    // The known_hosts file and client key work for a plain ssh login (start() did one too).
    let out = remote.ssh(&["echo", "hello"]);
    out.assert_success();
    assert_eq!(out.stdout.trim(), "hello");
    // And the remote's own namespace sees its own store, not the host's.
    let out = remote.run("sh", &["-c", "cat /etc/nix/nix.conf"]);
    out.assert_success();
    assert!(
        out.stdout.contains("extra-platforms = aarch64-linux"),
        "{out}"
    );
}

/// A command that outlives its timeout is killed and fails the test.
#[test]
#[should_panic(expected = "did not finish within")]
fn hung_command_is_killed() {
    let mut c = Command::new("sleep");
    c.arg("30");
    run_command(&mut c, None, Duration::from_millis(300));
}

/// The derivation variants build as described, independently of any hook (built locally as
/// x86_64): slow, with a blob and a required feature; and failing with its log kept.
#[test]
fn fake_drv_variants_build_locally() {
    let daemon = LocalDaemon::start(DaemonOpts::new(Nix::Host));
    let drv = FakeDrv::new("nlb-variant")
        .with_system("x86_64-linux")
        .with_seed("s1")
        .with_log_lines(2)
        .slow(1)
        .with_blob(100_000)
        .with_features(&["big-parallel"]);
    let (paths, out) = drv.build(&daemon, &[]);
    out.assert_success();
    assert!(
        out.elapsed >= Duration::from_secs(1),
        "slow(1) took {:?}",
        out.elapsed
    );
    paths.assert_built(&daemon, true);

    let bad = FakeDrv::new("nlb-variant-fail")
        .with_system("x86_64-linux")
        .failing(3);
    let (bad_paths, out) = bad.build(&daemon, &[]);
    out.assert_failure();
    assert!(out.stderr.contains("exit code 3"), "{out}");
    bad_paths.assert_log(&daemon);
    assert_eq!(daemon.invalid_leftovers(), Vec::<String>::new());

    // A feature the local machine lacks cannot build here (it would need a builder).
    let odd = FakeDrv::new("nlb-variant-feature")
        .with_system("x86_64-linux")
        .with_features(&["nlb-nonexistent-feature"]);
    let (_, out) = odd.build(&daemon, &[]);
    out.assert_failure();
}

/// Parallel tests are safe with overlapping build-users groups: two daemons that both use
/// `nixbld` build at the same time under different uids (the shared userpool lock dir), so
/// neither kills the other's builder.
#[test]
fn parallel_stores_get_distinct_build_uids() {
    let daemons = [
        LocalDaemon::start(DaemonOpts::new(Nix::Host)),
        LocalDaemon::start(DaemonOpts::new(Nix::Host)),
    ];
    let marks = ["3.01", "3.02"];
    std::thread::scope(|s| {
        let builds: Vec<_> = daemons
            .iter()
            .zip(marks)
            .map(|(d, mark)| {
                let expr = DrvExpr::sh(
                    "nlb-uid",
                    "x86_64-linux",
                    &format!("echo > $out; sleep {mark}"),
                )
                .nix();
                let f = d.write_file("uid.nix", &expr);
                s.spawn(move || d.nix_build(&[&f.to_string_lossy()]))
            })
            .collect();
        // Both builders run for 3 s; find their real uids from outside.
        let deadline = Instant::now() + Duration::from_secs(10);
        let uids = loop {
            let mut ps = Command::new("ps");
            ps.args(["-eo", "uid=,args="]);
            let out = run_command(&mut ps, None, Duration::from_secs(10));
            let uid_of = |mark: &str| {
                out.stdout
                    .lines()
                    .find(|l| l.trim_end().ends_with(&format!("sleep {mark}")))
                    .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            };
            if let (Some(a), Some(b)) = (uid_of(marks[0]), uid_of(marks[1])) {
                break (a, b);
            }
            assert!(
                Instant::now() < deadline,
                "never saw both builders running at once: one was probably killed by the other store using the same build uid"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_ne!(uids.0, uids.1, "two stores built under the same uid");
        for b in builds {
            b.join().expect("build thread").assert_success();
        }
    });
}

/// The one expression writer (`harness::expr`) hands a value to the builder byte for byte,
/// whatever it means to Nix or to the shell: quotes, backslashes, `${`, `$${`, `''`, tabs,
/// newlines and a `$` at the very end (built locally, no hook involved).
#[test]
fn the_expression_writer_keeps_every_byte_of_a_value() {
    let daemon = LocalDaemon::start(DaemonOpts::new(Nix::Host));
    let tricky = "a \"quoted\" \\back\\slash\\ ${not-interpolated} $${x} ''two quotes'' \
                  '${y}\nsecond line\t$HOME $out `ls` $";
    let expr = DrvExpr::sh(
        "nlb-quoting",
        "x86_64-linux",
        "printf '%s' \"$tricky\" > $out",
    )
    .string("tricky", tricky)
    .nix();
    let file = daemon.write_file("quoting.nix", &expr);
    let out = daemon.nix_build(&[&file.to_string_lossy()]);
    out.assert_success();
    let built = std::fs::read_to_string(daemon.host_path(out.stdout.trim()))
        .unwrap_or_else(|e| panic!("the output: {e}\n{out}"));
    assert_eq!(built, tricky, "the expression was:\n{expr}");
}
