//! Floating content-addressed derivations (`__contentAddressed = true` with
//! `experimental-features = ca-derivations`) built remotely through nix-lazy-builder: a real
//! Nix 2.34 daemon (sid chroot) runs our hook, a real remote store builds, over `ssh://` and
//! `ssh-ng://`.
//!
//! `caB` depends on `caA`, so the daemon builds `caA` first and hands the hook `caB` *resolved*
//! (a new `.drv` with `caA`'s realised path as a plain input). Afterwards, in the local store:
//! both derivations' outputs are valid at the paths the remote reported, with their references
//! (`caB`'s `out` refers to itself, to `dev` and to `caA`) and their content address; `nix
//! realisation info` knows every output of both derivations; the files are what the builder
//! wrote; nothing half-written is left on either side.
//!
//! Must never: pass without a real remote build of both derivations (the remote holds the
//! outputs, the local daemon has `max-jobs = 0` and cannot build `aarch64-linux`), or take the
//! realisations as registered without asking the local daemon for them.

use std::time::Instant;

use crate::harness::*;

/// `nix` with the experimental features the CA tests need (the client's config is empty).
const FEATURES: [&str; 2] = [
    "--extra-experimental-features",
    "nix-command ca-derivations",
];

/// `{ caA; caB; }`: floating CA derivations for aarch64-linux; `caB` (outputs `out`, `dev`)
/// copies `caA` and names it, `dev` and (with `self_ref`) itself.
fn ca_expr(tag: &str, self_ref: bool) -> String {
    let ca = |d: DrvExpr| {
        d.attr("__contentAddressed", "true")
            .string("outputHashMode", "recursive")
            .string("outputHashAlgo", "sha256")
    };
    let a = ca(DrvExpr::sh(
        &format!("nlb-caA-{tag}"),
        "aarch64-linux",
        &format!("echo 'nlb-log caA {tag}: building'; echo caA-{tag} > $out"),
    ));
    let b = ca(DrvExpr::sh(
        &format!("nlb-caB-{tag}"),
        "aarch64-linux",
        &format!(
            "echo 'nlb-log caB {tag}: building'; mkdir $out $dev; cat $caA > $out/copy; \
             echo $caA > $out/ref; {} echo $dev > $out/dev; echo $caA > $dev/ref",
            if self_ref {
                "echo $out > $out/self;"
            } else {
                ""
            }
        ),
    ))
    .outputs(&["out", "dev"])
    .inherit("caA");
    rec_set(&[("caA", &a), ("caB", &b)])
}

/// One realisation as `nix realisation info --json` prints it.
#[derive(Debug, serde::Deserialize)]
struct Real {
    id: String,
    #[serde(rename = "outPath")]
    out_path: String,
}

/// `drv`'s `output` (`*`: every one) as an installable of the local daemon's CLI: `drv^out`;
/// Nix 2.8 knows no output syntax here and takes the `.drv` for all of its outputs.
fn installable(daemon: &LocalDaemon, drv: &str, output: &str) -> String {
    if daemon.nix_version().contains("(Nix) 2.8.") {
        drv.to_owned()
    } else {
        format!("{drv}^{output}")
    }
}

/// `nix realisation info --json` of `drv`'s `output`, as the local daemon answers it.
#[track_caller]
fn realisation_info(daemon: &LocalDaemon, drv: &str, output: &str) -> CmdOutput {
    let i = installable(daemon, drv, output);
    daemon.client(
        "nix",
        &[
            FEATURES[0],
            FEATURES[1],
            "realisation",
            "info",
            "--json",
            &i,
        ],
    )
}

/// [`realisation_info`], which must succeed.
#[track_caller]
fn realisations(daemon: &LocalDaemon, drv: &str, output: &str) -> Vec<Real> {
    let out = realisation_info(daemon, drv, output);
    out.assert_success();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`nix realisation info` printed no realisations ({e}):\n{out}"))
}

/// The content address the local store recorded for `path` (`nix path-info --json`), if any.
#[track_caller]
fn content_address(daemon: &LocalDaemon, path: &str) -> Option<String> {
    let out = daemon.client(
        "nix",
        &[FEATURES[0], FEATURES[1], "path-info", "--json", path],
    );
    out.assert_success();
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`nix path-info --json` is not JSON ({e}):\n{out}"));
    // 2.34 prints an object keyed by path; older ones a list of objects with `path`.
    let info = match &v {
        serde_json::Value::Object(m) => m.get(path).cloned(),
        serde_json::Value::Array(a) => a.first().cloned(),
        _ => None,
    }
    .unwrap_or_else(|| panic!("no path info for {path}:\n{out}"));
    match info.get("ca") {
        None | Some(serde_json::Value::Null) => None,
        Some(ca) => Some(ca.to_string()),
    }
}

/// A local daemon (`max-jobs = 0`, `ca-derivations`) whose one builder is a remote store with
/// `ca-derivations`, reached over `scheme`.
fn setup(local_nix: Nix, remote_nix: Nix, scheme: Scheme) -> (RemoteStore, LocalDaemon) {
    let mut ro = RemoteOpts::new(remote_nix);
    ro.extra_conf
        .push("extra-experimental-features = ca-derivations".to_owned());
    let remote = RemoteStore::start(ro);
    let mut opts = DaemonOpts::new(local_nix).with_our_hook();
    opts.max_jobs = 0;
    opts.builders = Some(remote.machines_line(&MachineLine {
        // The daemon adds this feature to every floating CA derivation's `try`.
        supported_features: &["ca-derivations"],
        ..MachineLine::new(scheme, true)
    }));
    opts.extra_conf
        .push("experimental-features = nix-command ca-derivations".to_owned());
    (remote, LocalDaemon::start(opts))
}

/// Writes [`ca_expr`] and instantiates it: the `.drv` paths of caA and caB.
fn instantiate(daemon: &LocalDaemon, case: &str, self_ref: bool) -> (String, String) {
    let file = daemon.write_file(&format!("{case}.nix"), &ca_expr(case, self_ref));
    let f = file.to_string_lossy().into_owned();
    let drv_of = |attr: &str| {
        let out = daemon.nix_instantiate(&[FEATURES[0], FEATURES[1], &f, "-A", attr]);
        out.assert_success();
        out.stdout.trim().to_owned()
    };
    (drv_of("caA"), drv_of("caB"))
}

/// Builds every output of caB (and so caA first), as Nix 2.8 and 2.34 both can.
fn realise(daemon: &LocalDaemon, drv: &str) -> CmdOutput {
    daemon.client("nix-store", &[FEATURES[0], FEATURES[1], "--realise", drv])
}

fn ca_build(case: &str, local_nix: Nix, remote_nix: Nix, scheme: Scheme) {
    let start = Instant::now();
    // Nix 2.8 and 2.34 disagree on the content address of a self-referencing output (see
    // `self_referencing_output_of_a_nix28_remote_is_refused_cleanly`).
    let self_ref = local_nix == remote_nix;
    let (remote, daemon) = setup(local_nix, remote_nix, scheme);
    let (drv_a, drv_b) = instantiate(&daemon, case, self_ref);
    let drv_text = std::fs::read_to_string(daemon.host_path(&drv_b)).expect("read caB's .drv");
    assert!(
        drv_text.contains(r#"("out","","r:sha256","")"#) && drv_text.contains(&drv_a),
        "caB is not a floating CA derivation depending on caA:\n{drv_text}"
    );

    let out = realise(&daemon, &drv_b);
    out.assert_success();
    assert!(!out.stderr.contains("error:"), "{out}");
    for who in ["caA", "caB"] {
        assert!(
            out.stderr
                .contains(&format!("nlb-log {who} {case}: building")),
            "the client did not see {who}'s build log:\n{out}"
        );
    }

    // The local daemon's realisations: every output of both, at the paths the build printed.
    let real_a = realisations(&daemon, &drv_a, "out");
    let real_b = realisations(&daemon, &drv_b, "*");
    assert_eq!(real_a.len(), 1, "{real_a:?}");
    assert_eq!(real_b.len(), 2, "{real_b:?}");
    let path_of = |rs: &[Real], output: &str| -> String {
        let r = rs
            .iter()
            .find(|r| r.id.ends_with(&format!("!{output}")))
            .unwrap_or_else(|| panic!("no realisation of '{output}' in {rs:?}"));
        format!("/nix/store/{}", r.out_path)
    };
    let a = path_of(&real_a, "out");
    let (b_out, b_dev) = (path_of(&real_b, "out"), path_of(&real_b, "dev"));
    out.assert_prints(&[&b_out, &b_dev], "nix-store --realise's output paths");
    assert!(b_dev.ends_with(&format!("nlb-caB-{case}-dev")), "{b_dev}");

    // Valid, with references, content address and the builder's files.
    for p in [&a, &b_out, &b_dev] {
        assert!(daemon.is_valid(p), "{p} is not valid locally");
        assert!(remote.is_valid(p), "{p} was not built on the remote");
        assert!(
            content_address(&daemon, p).is_some(),
            "{p} has no content address locally"
        );
    }
    assert_eq!(daemon.references(&a), Vec::<String>::new());
    let mut want = vec![a.clone(), b_dev.clone()];
    if self_ref {
        want.push(b_out.clone());
    }
    want.sort();
    assert_eq!(daemon.references(&b_out), want, "references of {b_out}");
    assert_eq!(daemon.references(&b_dev), vec![a.clone()]);
    let a_text = std::fs::read_to_string(daemon.host_path(&a)).expect("read caA's output");
    assert_eq!(a_text.trim(), format!("caA-{case}"));
    let file_of = |rel: &str| daemon.read_store_file(&b_out, rel).trim().to_owned();
    assert_eq!(file_of("copy"), format!("caA-{case}"));
    assert_eq!(file_of("ref"), a);
    if self_ref {
        assert_eq!(file_of("self"), b_out);
    }
    assert_eq!(file_of("dev"), b_dev);
    assert_eq!(daemon.read_store_file(&b_dev, "ref").trim(), a);

    assert_eq!(daemon.invalid_leftovers(), Vec::<String>::new(), "local");
    assert_eq!(remote.invalid_leftovers(), Vec::<String>::new(), "remote");
    eprintln!("[timing] {case}: {:.2?}", start.elapsed());
}

#[test]
fn floating_ca_nix234_to_nix234_over_ssh() {
    ca_build("ca-234-ssh", Nix::Sid, Nix::Sid, Scheme::Ssh);
}

#[test]
fn floating_ca_nix234_to_nix234_over_ssh_ng() {
    ca_build("ca-234-sshng", Nix::Sid, Nix::Sid, Scheme::SshNg);
}

/// A Nix 2.8 remote reports its built outputs in the older realisation layout of each protocol.
#[test]
fn floating_ca_nix234_to_nix28_over_ssh() {
    ca_build("ca-234-28-ssh", Nix::Sid, Nix::Host, Scheme::Ssh);
}

/// A Nix 2.8 local daemon resolves and registers as 2.34 does.
#[test]
fn floating_ca_nix28_to_nix234_over_ssh_ng() {
    ca_build("ca-28-234-sshng", Nix::Host, Nix::Sid, Scheme::SshNg);
}

/// Nix 2.8 and 2.34 compute a self-referencing output's content address differently, so a 2.34
/// store refuses such an output built by a 2.8 remote ("ca hash mismatch"), through Nix's own
/// hook as through ours. The build fails with the local daemon's reason, and nothing of it is
/// valid or realised locally.
#[test]
fn self_referencing_output_of_a_nix28_remote_is_refused_cleanly() {
    let case = "ca-234-28-selfref";
    let (remote, daemon) = setup(Nix::Sid, Nix::Host, Scheme::SshNg);
    let (drv_a, drv_b) = instantiate(&daemon, case, true);
    let out = realise(&daemon, &drv_b);
    out.assert_failure();
    let uri = remote.uri(Scheme::SshNg);
    let line = out
        .stderr
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "error: adding the outputs from '{uri}' to the local store: "
            ))
        })
        .unwrap_or_else(|| panic!("no error line naming the refused outputs:\n{out}"));
    assert!(
        line.contains("ca hash mismatch importing path '/nix/store/"),
        "{line}\n{out}"
    );
    // caA (no self-reference) came through; caB has no valid output and no realisation.
    assert_eq!(realisations(&daemon, &drv_a, "out").len(), 1);
    let b = realisation_info(&daemon, &drv_b, "out");
    assert!(
        !b.success() || b.stdout.trim() == "[]",
        "caB was realised:\n{b}"
    );
    // Its `out` is not valid. `dev` (no self-reference, added first, as Nix's hook adds it
    // too) may be: then whole and verified, with its content address.
    let store = daemon.host_nix_dir().join("store");
    let ours = |suffix: &str| -> Vec<String> {
        std::fs::read_dir(&store)
            .expect("list the local store")
            .filter_map(|e| e.ok())
            .map(|e| format!("/nix/store/{}", e.file_name().to_string_lossy()))
            .filter(|p| p.ends_with(suffix))
            .collect()
    };
    for p in ours(&format!("nlb-caB-{case}")) {
        assert!(!daemon.is_valid(&p), "{p} is valid");
    }
    for p in ours(&format!("nlb-caB-{case}-dev")) {
        if daemon.is_valid(&p) {
            assert!(content_address(&daemon, &p).is_some(), "{p}");
        }
    }
    eprintln!(
        "left in the store, invalid: {:?}",
        daemon.invalid_leftovers()
    );
}
