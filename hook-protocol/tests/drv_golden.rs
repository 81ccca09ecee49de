//! Golden tests for the ATerm parser and printer against `.drv` files written by real Nix 2.8
//! (`tests/data/drv/generate.sh` instantiates `drv_golden.nix` in a throw-away store).
//!
//! Owns only these checks: parse → print reproduces each file byte for byte, and the parsed
//! fields are what the expressions say. Must never depend on the machine's own `/nix`.

mod golden;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use hook_protocol::derivation::{BasicDerivation, Derivation, OutputKind, drv_name};
use hook_protocol::wire::decode_with;
use hook_protocol::{Sha256, StorePath};

fn data_dir() -> PathBuf {
    golden::data_dir("drv")
}

/// attr name → the store path Nix gave the `.drv`.
fn drv_paths() -> BTreeMap<String, StorePath> {
    let text = golden::read_text(&data_dir().join("paths.txt"));
    text.lines()
        .map(|l| {
            let (attr, path) = l.split_once(' ').expect("'<attr> <path>' line");
            (attr.to_owned(), StorePath::parse(path).expect("store path"))
        })
        .collect()
}

fn raw(attr: &str) -> Vec<u8> {
    golden::read(&data_dir().join(format!("{attr}.drv")))
}

/// Parses a golden file and checks that printing it gives the same bytes and that its
/// BasicDerivation survives the wire.
fn load(attr: &str) -> Derivation {
    let bytes = raw(attr);
    let d = Derivation::parse(&bytes).unwrap_or_else(|e| panic!("{attr}.drv: {e}"));
    assert_eq!(
        d.to_aterm(),
        bytes,
        "{attr}.drv does not print back byte for byte"
    );
    let mut w = Vec::new();
    d.basic.encode(&mut w);
    let (back, used) = decode_with(&w, BasicDerivation::decode).expect("wire decode");
    assert_eq!(used, w.len());
    assert_eq!(back, d.basic);
    d
}

fn env<'a>(d: &'a Derivation, key: &str) -> &'a [u8] {
    d.basic
        .env
        .get(key.as_bytes())
        .unwrap_or_else(|| panic!("env {key} missing"))
}

/// `d`'s one input derivation is `drv`, of which it needs `outputs`.
fn assert_one_input(d: &Derivation, drv: &StorePath, outputs: &[&str]) {
    assert_eq!(
        d.input_drvs,
        BTreeMap::from([(drv.to_string(), set(outputs))])
    );
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn every_golden_file_round_trips_and_is_named_by_its_path() {
    let paths = drv_paths();
    assert_eq!(paths.len(), 8, "paths.txt lists every golden file");
    for (attr, path) in &paths {
        let d = load(attr);
        let name = drv_name(path).expect("a .drv path");
        let named = match d.basic.env.get(b"__json".as_slice()) {
            Some(json) => {
                let v: serde_json::Value = serde_json::from_slice(json).expect("__json");
                v["name"]
                    .as_str()
                    .expect("name in __json")
                    .as_bytes()
                    .to_vec()
            }
            None => env(&d, "name").to_vec(),
        };
        assert_eq!(named, name.as_bytes(), "{attr}: name from drvPath");
        // Every known output path is named after the derivation (plus -<output> if not "out").
        for (out, p) in d.output_paths().expect("valid output paths") {
            if let Some(p) = p {
                let want = if out == "out" {
                    name.to_owned()
                } else {
                    format!("{name}-{out}")
                };
                assert_eq!(p.name(), want, "{attr}: output {out}");
                if let Some(v) = d.basic.env.get(out.as_bytes()) {
                    assert_eq!(v, p.as_str().as_bytes(), "{attr}: ${out}");
                }
            }
        }
    }
}

#[test]
fn two_outputs() {
    let d = load("twoOutputs");
    assert_eq!(
        d.basic.outputs.keys().cloned().collect::<BTreeSet<_>>(),
        set(&["dev", "out"])
    );
    for o in d.basic.outputs.values() {
        assert_eq!(o.kind(), OutputKind::InputAddressed);
    }
    assert_eq!(env(&d, "outputs"), b"out dev");
    assert!(d.input_drvs.is_empty());
    assert!(d.basic.input_srcs.is_empty());
    assert_eq!(d.basic.platform, "x86_64-linux");
    assert_eq!(d.basic.builder, b"/bin/sh");
    assert_eq!(
        d.basic.args,
        vec![b"-c".to_vec(), b"echo out > $out; echo dev > $dev".to_vec()]
    );
    // An input-free derivation keeps its (empty) inputSrcs for the remote.
    let b = d.basic_for_remote(["/nix/store/00000000000000000000000000000000-x"]);
    assert_eq!(b, d.basic);
}

#[test]
fn input_derivation_and_source() {
    let paths = drv_paths();
    let dep = load("twoOutputs");
    let d = load("withInputs");
    assert_one_input(&d, &paths["twoOutputs"], &["dev", "out"]);
    assert_eq!(d.basic.input_srcs.len(), 1);
    let src = d.basic.input_srcs.iter().next().expect("one source");
    assert_eq!(StorePath::parse(src).expect("path").name(), "input.txt");
    assert_eq!(d.basic.platform, "aarch64-linux");
    assert_eq!(env(&d, "requiredSystemFeatures"), b"big-parallel kvm");
    // The builder's command names the dependency's output paths.
    let dep_paths = dep.output_paths().expect("paths");
    let cmd = String::from_utf8(d.basic.args[1].clone()).expect("utf-8");
    for p in dep_paths.values() {
        let p = p.as_ref().expect("input-addressed");
        assert!(cmd.contains(p.as_str()), "{cmd} mentions {p}");
    }
    // For the remote, inputSrcs becomes the closure the daemon sent.
    let closure = [
        src.clone(),
        dep_paths["out"].as_ref().expect("out").to_string(),
        dep_paths["dev"].as_ref().expect("dev").to_string(),
    ];
    let b = d.basic_for_remote(&closure);
    assert_eq!(b.input_srcs, closure.iter().cloned().collect());
    assert_eq!(b.env, d.basic.env);
    assert_eq!(b.outputs, d.basic.outputs);
}

#[test]
fn fixed_output_recursive() {
    let d = load("fixedRecursive");
    let out = &d.basic.outputs["out"];
    assert_eq!(out.kind(), OutputKind::Fixed);
    assert_eq!(out.hash_algo, "r:sha256");
    // The .drv stores the hash in base16; the expression gave it in nix32.
    let given = std::str::from_utf8(env(&d, "outputHash")).expect("utf-8");
    assert_eq!(
        Sha256::parse_any(given).expect("hash").to_base16(),
        out.hash
    );
    assert!(d.basic.is_fixed_output());
}

#[test]
fn fixed_output_flat_with_input() {
    let paths = drv_paths();
    let d = load("fixedFlat");
    let out = &d.basic.outputs["out"];
    assert_eq!(out.kind(), OutputKind::Fixed);
    assert_eq!(out.hash_algo, "sha1");
    assert_eq!(out.hash, "da39a3ee5e6b4b0d3255bfef95601890afd80709");
    assert_one_input(&d, &paths["twoOutputs"], &["out"]);
}

#[test]
fn escapes_and_raw_bytes() {
    let d = load("escapes");
    assert_eq!(env(&d, "quoted"), b"she said \"hi\"");
    assert_eq!(
        env(&d, "backslashes"),
        b"C:\\path\\to\\thing \\n is not a newline"
    );
    assert_eq!(
        env(&d, "newlines"),
        b"line one\nline two\n\nline four\r\nwith CRLF"
    );
    assert_eq!(env(&d, "tabs"), b"a\tb\t\tc");
    assert_eq!(
        env(&d, "unicode"),
        "grüße, 日本語, emoji 🦀, nbsp\u{a0}end".as_bytes()
    );
    let raw_file = golden::read(&data_dir().join("drv_raw_bytes.bin"));
    assert!(std::str::from_utf8(&raw_file).is_err(), "really not UTF-8");
    assert_eq!(env(&d, "rawBytes"), raw_file.as_slice());
    assert_eq!(env(&d, "empty"), b"");
    assert_eq!(env(&d, "weird key \"with\" quotes"), b"value");
    assert_eq!(env(&d, "preferLocalBuild"), b"1");
    assert_eq!(env(&d, "allowSubstitutes"), b"");
    assert_eq!(env(&d, "number"), b"42");
    assert_eq!(env(&d, "list"), b"a b c 3");
    assert_eq!(
        d.basic.args,
        vec![
            b"-c".to_vec(),
            b"printf '%s\\n' \"$quoted\" > $out".to_vec(),
            b"tab\there".to_vec(),
            Vec::new(),
        ]
    );
    // The file really holds the escaped forms (and raw bytes unescaped).
    let bytes = raw("escapes");
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains(r#"("newlines","line one\nline two\n\nline four\r\nwith CRLF")"#));
    assert!(text.contains(r#"("tabs","a\tb\t\tc")"#));
    assert!(text.contains(r#""she said \"hi\"""#));
    assert!(bytes.windows(2).any(|w| w == b"\xff\xfe"));
}

#[test]
fn structured_attrs() {
    let d = load("structured");
    let json: serde_json::Value =
        serde_json::from_slice(env(&d, "__json")).expect("__json is JSON");
    assert_eq!(json["nested"]["b"], "x\ny");
    assert_eq!(json["nested"]["a"], serde_json::json!([1, 2, 3]));
    assert_eq!(json["name"], "structured");
    assert!(!d.basic.env.contains_key(b"name".as_slice()));
}

#[test]
fn floating_and_deferred_outputs_have_no_path() {
    let paths = drv_paths();
    let ca = load("floatingCa");
    let out = &ca.basic.outputs["out"];
    assert_eq!(out.kind(), OutputKind::Floating);
    assert_eq!(
        (out.path.as_str(), out.hash_algo.as_str()),
        ("", "r:sha256")
    );
    assert_eq!(ca.output_paths().expect("paths")["out"], None);
    assert!(!ca.basic.is_fixed_output());

    let d = load("deferred");
    assert_eq!(d.basic.outputs["out"].kind(), OutputKind::Deferred);
    assert_eq!(d.output_paths().expect("paths")["out"], None);
    assert_eq!(env(&d, "out"), b"");
    assert_one_input(&d, &paths["floatingCa"], &["out"]);
}

#[test]
fn damaged_golden_files_fail_with_an_offset() {
    let bytes = raw("escapes");
    for cut in [0, 1, 7, 8, bytes.len() / 2, bytes.len() - 1] {
        let e = Derivation::parse(&bytes[..cut]).expect_err("a truncated .drv");
        assert!(e.offset <= cut, "{e}");
        assert!(e.to_string().contains(&format!("at byte {}", e.offset)));
    }
    let mut trailing = bytes.clone();
    trailing.extend_from_slice(b"\n");
    let e = Derivation::parse(&trailing).expect_err("trailing newline");
    assert_eq!(e.offset, bytes.len());
}
