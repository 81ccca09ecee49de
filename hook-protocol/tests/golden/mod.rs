//! Shared pieces of the golden tests (`*_golden.rs`, `hook_conversation.rs`): where the captured
//! bytes live (`tests/data/<protocol>/…`), reading them, the manifests `tests/capture/capture.py`
//! wrote next to each serve and worker capture, the "decodes fully, and every proper prefix is
//! Incomplete" check, and the assertions both store protocols make about the same capture facts
//! (a path's info, a build's times and outputs).
//!
//! Must never: depend on anything but `hook-protocol`'s public API, run Nix, or read the
//! machine's own `/nix`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use hook_protocol::build_result::BuildResult;
use hook_protocol::path_info::PathInfo;
use hook_protocol::wire::{self, Reader};
use hook_protocol::{ProtocolVersion, Sha256, StorePath};
use serde_json::Value;

/// `tests/data/<rel>` in this crate.
pub fn data_dir(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

/// The bytes of a captured file; a missing one fails the test with its path.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A captured text file.
pub fn read_text(path: &Path) -> String {
    String::from_utf8(read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `"1.35"` → 1.35.
pub fn version(s: &str) -> ProtocolVersion {
    let (a, b) = s.split_once('.').expect("a version 'major.minor'");
    ProtocolVersion::new(
        a.parse().expect("a major number"),
        b.parse().expect("a minor number"),
    )
}

/// A manifest's store path string.
pub fn sp(v: &Value) -> StorePath {
    StorePath::parse(v.as_str().expect("a string")).expect("a store path")
}

/// A manifest's list of strings, as a set.
pub fn string_set(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_str().expect("a string").to_owned())
        .collect()
}

/// Decodes `bytes` fully with `f`, and checks that every proper prefix is Incomplete.
pub fn decode_all<T: std::fmt::Debug>(
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

/// One recorded session with a real server: `tests/data/<protocol>/<dir>/manifest.json` says
/// what was sent and names the file holding each step's reply.
pub struct Capture {
    pub dir: PathBuf,
    pub m: Value,
}

impl Capture {
    pub fn load(dir: &Path) -> Self {
        let m = serde_json::from_slice(&read(&dir.join("manifest.json")))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Capture {
            dir: dir.to_owned(),
            m,
        }
    }

    /// Every capture of `protocol` (`serve`, `worker`), sorted by directory name; the Nix 2.8
    /// one must be among them.
    pub fn all(protocol: &str) -> Vec<Capture> {
        let root = data_dir(protocol);
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
            .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.join("manifest.json").is_file())
            .collect();
        dirs.sort();
        let names: Vec<String> = dirs
            .iter()
            .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n == "nix-2.8.0"),
            "the Nix 2.8 capture is missing: {names:?}"
        );
        dirs.iter().map(|d| Capture::load(d)).collect()
    }

    /// The reply bytes of step `name`.
    pub fn step(&self, name: &str) -> Vec<u8> {
        let step = self.m["steps"]
            .as_array()
            .expect("a list of steps")
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{}: no step {name}", self.dir.display()));
        read(&self.dir.join(step["file"].as_str().expect("a file name")))
    }

    /// The Nix version that served the capture, e.g. `2.8.0`.
    pub fn nix_version(&self) -> &str {
        self.m["nix_version"].as_str().expect("nix_version")
    }

    /// The path uploaded under `key` (`A`, `B`, `C`), or the one never uploaded (`missing`).
    pub fn path(&self, key: &str) -> StorePath {
        if key == "missing" {
            return sp(&self.m["missing"]);
        }
        sp(&self.m["paths"][key]["path"])
    }

    pub fn paths(&self, keys: &[&str]) -> BTreeSet<StorePath> {
        keys.iter().map(|k| self.path(k)).collect()
    }

    /// The `.drv` path of the derivation `key` (`bdOk`, `bpFail`, …).
    pub fn drv(&self, key: &str) -> StorePath {
        sp(&self.m["drvs"][key]["drv_path"])
    }

    /// The output paths of the derivation `key`, by output name.
    pub fn outputs(&self, key: &str) -> BTreeMap<String, StorePath> {
        self.m["drvs"][key]["outputs"]
            .as_object()
            .expect("an outputs map")
            .iter()
            .map(|(k, v)| (k.clone(), sp(v)))
            .collect()
    }

    /// The server's info about the path uploaded under `key` is what was uploaded: NAR hash and
    /// size, references, deriver, content address and signatures.
    pub fn assert_path_info(&self, key: &str, info: &PathInfo) {
        let sent = &self.m["paths"][key];
        assert_eq!(
            info.nar_hash,
            Sha256::parse_any(sent["nar_sha256"].as_str().unwrap()).unwrap(),
            "{key}"
        );
        assert_eq!(info.nar_size, sent["nar_size"].as_u64().unwrap(), "{key}");
        let refs: BTreeSet<StorePath> = sent["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(sp)
            .collect();
        assert_eq!(info.references, refs, "{key}");
        assert_eq!(
            info.deriver.as_ref().map(StorePath::as_str).unwrap_or(""),
            sent["deriver"].as_str().unwrap(),
            "{key}"
        );
        assert_eq!(
            info.ca.as_deref().unwrap_or(""),
            sent["ca"].as_str().unwrap(),
            "{key}"
        );
        assert_eq!(info.sigs, string_set(&sent["sigs"]), "{key}");
    }

    /// A NAR the server sent back for the path uploaded under `key` is byte for byte the one
    /// uploaded.
    pub fn assert_nar(&self, key: &str, nar: &[u8]) {
        let sent = &self.m["paths"][key];
        assert_eq!(nar.len() as u64, sent["nar_size"].as_u64().unwrap());
        assert_eq!(
            Sha256::digest(nar).to_base16(),
            sent["nar_sha256"].as_str().unwrap()
        );
    }

    /// The times of a successful build, as the capture's Nix reports them.
    pub fn assert_build_times(&self, ok: &BuildResult) {
        match self.nix_version() {
            // Nix 2.8 reports one build with its wall-clock times.
            "2.8.0" => {
                assert_eq!(ok.times_built, 1);
                assert!(
                    ok.start_time > 1_600_000_000 && ok.start_time <= ok.stop_time,
                    "{ok:?}"
                );
            }
            // Nix 2.34 leaves them all zero (observed): never rely on them.
            "2.34.8" => assert_eq!((ok.times_built, ok.start_time, ok.stop_time), (0, 0, 0)),
            _ => assert!(ok.start_time <= ok.stop_time),
        }
    }
}

/// A BuildResult's outputs as `output name → path`.
pub fn outs(res: &BuildResult) -> BTreeMap<String, StorePath> {
    res.built_outputs
        .iter()
        .map(|(k, o)| (k.clone(), o.path.clone()))
        .collect()
}
