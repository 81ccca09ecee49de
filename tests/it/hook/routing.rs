//! Choosing between builders by required and mandatory features, through a real nix-daemon
//! (Nix 2.8) running nix-lazy-builder with two real remote stores in its machines file:
//! builder A (`ssh://`) supports `kvm`; builder B (`ssh-ng://`, listed first) has the
//! mandatory feature `benchmark`. Each remote's own `system-features` match its line, so a derivation that
//! reached the wrong one would fail there.
//!
//! - requires `kvm` → A; requires `benchmark` → B; requires nothing → A (B only takes
//!   derivations that require `benchmark`);
//! - requires a feature nobody has, or a mix no single builder offers → declined with ONE
//!   warning line that says, per builder, why it was unsuitable, and Nix's own error.
//!
//! Must never: accept a build as routed without checking both stores (the chosen one holds the
//! outputs, the other one nothing).

use std::time::Instant;

use crate::harness::*;

struct Two {
    a: RemoteStore,
    b: RemoteStore,
    daemon: LocalDaemon,
}

impl Two {
    fn start() -> Two {
        let mut oa = RemoteOpts::new(Nix::Host);
        oa.system_features = Some(vec!["kvm".to_owned()]);
        let mut ob = RemoteOpts::new(Nix::Host);
        ob.system_features = Some(vec!["benchmark".to_owned()]);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| RemoteStore::start(oa));
            let b = RemoteStore::start(ob);
            (a.join().expect("start remote A"), b)
        });
        let line_a = a.machines_line(&MachineLine {
            supported_features: &["kvm"],
            ..MachineLine::new(Scheme::Ssh, true)
        });
        let line_b = b.machines_line(&MachineLine {
            mandatory_features: &["benchmark"],
            ..MachineLine::new(Scheme::SshNg, true)
        });
        let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
        // B first: on a tie Nix's order takes the earlier line, so a hook that ignored
        // mandatory features would send featureless derivations to B.
        opts.machines = Some(format!("# B\n{line_b}\n# A\n{line_a}\n"));
        let daemon = LocalDaemon::start(opts);
        Two { a, b, daemon }
    }

    fn uri_a(&self) -> String {
        self.a.uri(Scheme::Ssh)
    }

    fn uri_b(&self) -> String {
        self.b.uri(Scheme::SshNg)
    }

    /// Builds a drv requiring `features` and asserts it ran on `on` (and not on `other`).
    #[track_caller]
    fn routed(&self, name: &str, features: &[&str], to_a: bool) {
        let (on, on_uri, other) = if to_a {
            (&self.a, self.uri_a(), &self.b)
        } else {
            (&self.b, self.uri_b(), &self.a)
        };
        let drv = FakeDrv::new(name).with_features(features);
        let (paths, out) = drv.build(&self.daemon, &[]);
        out.assert_success();
        assert!(
            out.stderr
                .contains(&format!("building '{}' on '{on_uri}'", paths.drv)),
            "{features:?} should have gone to {on_uri}:\n{out}"
        );
        paths.assert_built(&self.daemon, true);
        paths.assert_built(on, false);
        for p in [&paths.out, &paths.dev, &paths.input_out] {
            assert!(!other.is_valid(p), "{p} reached the other builder");
        }
    }
}

#[test]
fn features_route_between_two_builders() {
    let start = Instant::now();
    let t = Two::start();
    t.routed("nlb-route-kvm", &["kvm"], true);
    t.routed("nlb-route-benchmark", &["benchmark"], false);
    t.routed("nlb-route-none", &[], true);
    // B's mandatory feature plus A's feature: B supports only `benchmark`, A lacks it.
    for (name, features, why_a, why_b) in [
        (
            "nlb-route-nosuch",
            &["nlb-nosuch"][..],
            "lacks feature nlb-nosuch",
            "lacks feature nlb-nosuch",
        ),
        (
            "nlb-route-both",
            &["benchmark", "kvm"][..],
            "lacks feature benchmark",
            "lacks feature kvm",
        ),
    ] {
        let drv = FakeDrv::new(name).with_features(features);
        let (paths, out) = drv.build(&t.daemon, &[]);
        out.assert_failure();
        let wanted = format!("aarch64-linux with {{{}}}", features.join(", "));
        let prefix = format!("warning: no builder for {wanted}: ");
        // One decline line.
        assert_eq!(
            out.one_line("warning: no builder"),
            format!("{prefix}'{}' {why_b}; '{}' {why_a}", t.uri_b(), t.uri_a()),
            "{out}"
        );
        assert!(
            out.stderr.contains(&format!(
                "error: a 'aarch64-linux' with features {{{}}} is required to build '{}'",
                features.join(", "),
                paths.drv
            )),
            "{out}"
        );
        for s in [&t.a, &t.b] {
            assert!(!s.is_valid(&paths.out) && !s.is_valid(&paths.input_out));
        }
        assert!(!t.daemon.is_valid(&paths.out));
    }
    assert_eq!(t.daemon.invalid_leftovers(), Vec::<String>::new());
    eprintln!("[timing] routing: {:.2?}", start.elapsed());
}

/// An impure derivation (its output has no store path until it is built, and is never
/// realised) cannot be brought back: the hook declines it up front with ONE line that says so,
/// before it connects to any builder, instead of accepting it, uploading its inputs and
/// failing. Nix then reports that nobody here can build it. (Floating content-addressed
/// derivations are built: `remote::ca`.)
#[test]
fn impure_derivation_is_declined_up_front() {
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    opts.machines = Some(format!(
        "{}\n",
        remote.machines_line(&MachineLine {
            // Nix adds these features to an impure derivation's `try`: without them on the
            // line the builder would be unsuitable for a plain feature mismatch.
            supported_features: &["ca-derivations"],
            ..MachineLine::new(Scheme::Ssh, true)
        })
    ));
    opts.extra_conf
        .push("experimental-features = ca-derivations impure-derivations".to_owned());
    let daemon = LocalDaemon::start(opts);
    let expr = daemon.write_file(
        "impure.nix",
        &DrvExpr::sh("nlb-impure", "aarch64-linux", "echo impure > $out")
            .attr("__impure", "true")
            .nix(),
    );
    const XP: [&str; 2] = [
        "--extra-experimental-features",
        "ca-derivations impure-derivations",
    ];
    let drv = daemon.nix_instantiate(&[XP[0], XP[1], expr.to_str().unwrap()]);
    drv.assert_success();
    let drv = drv.stdout.trim().to_owned();
    let text =
        std::fs::read_to_string(daemon.host_path(&drv)).expect("the .drv in the local store");
    assert!(
        text.contains(r#"("out","","r:sha256","impure")"#),
        "not an impure derivation: {text}"
    );

    let log_before = remote.sshd_log().len();
    let out = daemon.nix_build(&[XP[0], XP[1], &drv]);
    out.assert_failure();
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning: not building"))
        .collect();
    assert_eq!(
        lines,
        [format!(
            "warning: not building '{drv}' remotely: its output 'out' has no store path before \
             it is built (impure), which nix-lazy-builder cannot bring back yet"
        )],
        "{out}"
    );
    assert!(
        out.stderr
            .contains(&format!("is required to build '{drv}'")),
        "{out}"
    );
    // Declined before any connection: the builder never saw us.
    let log = remote.sshd_log();
    let during = &log[log_before..];
    assert!(
        !during.contains("Accepted"),
        "the hook connected:\n{during}"
    );
    assert_eq!(daemon.invalid_leftovers(), Vec::<String>::new());
}
