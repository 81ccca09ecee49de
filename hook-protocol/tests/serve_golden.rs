//! Golden tests: the serve-protocol decoders read, fully and correctly, the reply bytes recorded
//! from real `nix-store --serve --write` servers (Nix 2.8 from bookworm, 2.34 from sid) by
//! `tests/capture/capture.py`; see `tests/data/serve/<nix-version>/manifest.json` for what was
//! sent. Every proper prefix of every reply must decode as Incomplete.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use hook_protocol::ProtocolVersion;
use hook_protocol::build_result::BuildStatus;
use hook_protocol::serve;
use hook_protocol::wire::{self, Reader};
use hook_protocol::{Sha256, StorePath};
use serde_json::Value;

fn data_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/serve");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn version(s: &str) -> ProtocolVersion {
    let (a, b) = s.split_once('.').unwrap();
    ProtocolVersion::new(a.parse().unwrap(), b.parse().unwrap())
}

fn sp(v: &Value) -> StorePath {
    StorePath::parse(v.as_str().unwrap()).unwrap()
}

/// Decodes `bytes` fully with `f`, and checks that every proper prefix is Incomplete.
fn decode_all<T: std::fmt::Debug>(
    name: &str,
    bytes: &[u8],
    mut f: impl FnMut(&mut Reader<'_>) -> wire::Result<T>,
) -> T {
    let (value, used) =
        wire::decode_with(bytes, &mut f).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    assert_eq!(used, bytes.len(), "{name}: trailing bytes after the reply");
    for cut in 0..bytes.len() {
        match f(&mut Reader::new(&bytes[..cut])) {
            Err(e) if e.is_incomplete() => {}
            other => panic!("{name}: prefix {cut}/{}: {other:?}", bytes.len()),
        }
    }
    value
}

struct Session {
    dir: PathBuf,
    m: Value,
}

impl Session {
    fn step(&self, name: &str) -> Vec<u8> {
        let step = self.m["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{}: no step {name}", self.dir.display()));
        std::fs::read(self.dir.join(step["file"].as_str().unwrap())).unwrap()
    }

    fn path(&self, key: &str) -> StorePath {
        if key == "missing" {
            return sp(&self.m["missing"]);
        }
        sp(&self.m["paths"][key]["path"])
    }

    fn paths(&self, keys: &[&str]) -> BTreeSet<StorePath> {
        keys.iter().map(|k| self.path(k)).collect()
    }

    fn outputs(&self, drv: &str) -> BTreeMap<String, StorePath> {
        self.m["drvs"][drv]["outputs"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), sp(v)))
            .collect()
    }
}

fn check_session(dir: &Path) {
    let m: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let s = Session {
        dir: dir.to_owned(),
        m,
    };
    let client = version(s.m["client_version"].as_str().unwrap());
    assert_eq!(client, serve::CLIENT_VERSION);

    let hello = decode_all("hello", &s.step("hello"), |r| {
        serve::decode_hello(r, client)
    });
    assert_eq!(
        hello.server,
        version(s.m["steps"][0]["server_version"].as_str().unwrap())
    );
    let v = hello.negotiated;
    assert_eq!(v, version(s.m["negotiated"].as_str().unwrap()));

    let before = decode_all("query-valid-before", &s.step("query-valid-before"), |r| {
        serve::decode_path_set(r)
    });
    assert!(before.is_empty());
    for step in ["add-to-store-nar-B", "add-to-store-nar-A", "import-paths-C"] {
        decode_all(step, &s.step(step), serve::decode_ok);
    }
    let after = decode_all("query-valid-after", &s.step("query-valid-after"), |r| {
        serve::decode_path_set(r)
    });
    assert_eq!(after, s.paths(&["A", "B", "C"]));

    let infos = decode_all("query-path-infos", &s.step("query-path-infos"), |r| {
        serve::decode_path_infos(r, v)
    });
    assert_eq!(infos.len(), 3, "the missing path is omitted");
    for key in ["A", "B", "C"] {
        let sent = &s.m["paths"][key];
        let info = infos
            .iter()
            .find(|i| i.path == s.path(key))
            .unwrap_or_else(|| panic!("no info for {key}"));
        assert_eq!(
            info.nar_hash,
            Sha256::parse_any(sent["nar_sha256"].as_str().unwrap()).unwrap()
        );
        assert_eq!(info.nar_size, sent["nar_size"].as_u64().unwrap());
        let refs: BTreeSet<StorePath> = sent["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(sp)
            .collect();
        assert_eq!(info.references, refs, "{key}");
        let deriver = sent["deriver"].as_str().unwrap();
        assert_eq!(
            info.deriver.as_ref().map(StorePath::as_str).unwrap_or(""),
            deriver,
            "{key}"
        );
        let ca = sent["ca"].as_str().unwrap();
        assert_eq!(info.ca.as_deref().unwrap_or(""), ca, "{key}");
        // ImportPaths carries no signatures; AddToStoreNar keeps them.
        let sigs: BTreeSet<String> = sent["sigs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(info.sigs, sigs, "{key}");
    }

    // DumpStorePath: the reply is the NAR itself, byte-identical to the one we uploaded.
    let nar = s.step("dump-store-path-A");
    let a = &s.m["paths"]["A"];
    assert_eq!(nar.len() as u64, a["nar_size"].as_u64().unwrap());
    assert_eq!(
        Sha256::digest(&nar).to_base16(),
        a["nar_sha256"].as_str().unwrap()
    );

    let closure = decode_all("query-closure-A", &s.step("query-closure-A"), |r| {
        serve::decode_path_set(r)
    });
    assert_eq!(closure, s.paths(&["A", "B"]));

    let ok = decode_all(
        "build-derivation-bdOk",
        &s.step("build-derivation-bdOk"),
        |r| serve::decode_build_derivation_reply(r, v, "/nix/store"),
    );
    assert_eq!(ok.status, BuildStatus::Built);
    assert!(ok.is_success() && ok.error_msg.is_empty());
    match s.m["nix_version"].as_str().unwrap() {
        // Nix 2.8 reports one build with its wall-clock times.
        "2.8.0" => {
            assert_eq!(ok.times_built, 1);
            assert!(
                ok.start_time > 1_600_000_000 && ok.start_time <= ok.stop_time,
                "{ok:?}"
            );
        }
        // Nix 2.34's `nix-store --serve` leaves them all zero (observed): never rely on them.
        "2.34.8" => assert_eq!((ok.times_built, ok.start_time, ok.stop_time), (0, 0, 0)),
        _ => assert!(ok.start_time <= ok.stop_time),
    }
    let outs: BTreeMap<String, StorePath> = ok
        .built_outputs
        .iter()
        .map(|(k, o)| (k.clone(), o.path.clone()))
        .collect();
    assert_eq!(outs, s.outputs("bdOk"));

    let fail = decode_all(
        "build-derivation-bdFail",
        &s.step("build-derivation-bdFail"),
        |r| serve::decode_build_derivation_reply(r, v, "/nix/store"),
    );
    assert_eq!(fail.status, BuildStatus::PermanentFailure);
    assert!(!fail.is_success());
    assert!(
        fail.error_msg.contains("exit code 3"),
        "{:?}",
        fail.error_msg
    );
    assert!(
        fail.error_msg
            .contains(s.m["drvs"]["bdFail"]["drv_path"].as_str().unwrap())
    );
    assert!(fail.built_outputs.is_empty());

    let bp = decode_all("build-paths-bpOk", &s.step("build-paths-bpOk"), |r| {
        serve::decode_build_paths_reply(r)
    });
    assert_eq!(bp, Ok(()));
    let bp = decode_all("build-paths-bpFail", &s.step("build-paths-bpFail"), |r| {
        serve::decode_build_paths_reply(r)
    });
    let failure = bp.unwrap_err();
    assert_eq!(
        failure.status, 100,
        "Nix reports a failed build as exit status 100"
    );
    assert!(failure.message.contains("exit code 4"), "{failure:?}");
}

#[test]
fn real_serve_sessions_decode() {
    let dirs = data_dirs();
    let names: Vec<String> = dirs
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n == "nix-2.8.0"),
        "the Nix 2.8 capture is missing: {names:?}"
    );
    for dir in &dirs {
        check_session(dir);
    }
}
