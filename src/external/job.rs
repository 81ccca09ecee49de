//! `build.json`, the file nix-daemon writes for an `external-builders` program (version 1):
//! parsing, validating every field against hostile input, and the [`BasicDerivation`] a remote
//! builds from it. Pure: no I/O but the caller's bytes in, values out.
//!
//! Must never: accept a path it would write to that is not a store path directly in the
//! declared store directory, panic on any input, or hand on a derivation that needs files
//! Nix wrote into the local build directory (structured attributes, `passAsFile`), which the
//! remote cannot see.

use std::collections::{BTreeMap, BTreeSet};

use hook_protocol::derivation::{BasicDerivation, DerivationOutput};
use hook_protocol::{Sha256, StorePath};
use serde::Deserialize;

/// The only `build.json` version this program reads.
pub const VERSION: u64 = 1;
/// The largest `build.json` read (a derivation's environment can be large, not this large).
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// The longest path, system or builder accepted.
const MAX_PATH_LEN: usize = 4096;
/// The longest output name accepted.
const MAX_OUTPUT_NAME: usize = 200;

/// Variables the daemon adds to every local build's environment; the remote daemon sets its own
/// (its cores, its build directory), so they are not sent when they hold the daemon's value.
const DAEMON_SET: &[&str] = &["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"];

/// Why a `build.json` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("build.json is not valid JSON of the expected shape: {0}")]
    Json(String),
    #[error(
        "build.json is version {0}; this nix-lazy-builder reads version {VERSION} (update \
         nix-lazy-builder, or use an older Nix)"
    )]
    Version(u64),
    #[error("build.json: '{field}' is {len} bytes long, more than {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("build.json: '{field}' must not be empty")]
    Empty { field: &'static str },
    #[error("build.json: '{field}' = '{value}' is not a clean absolute path")]
    BadPath { field: &'static str, value: String },
    #[error("build.json: output name '{0}' is not a valid output name")]
    BadOutputName(String),
    #[error("build.json: {field} '{value}' is not a store path in '{store_dir}': {why}")]
    NotInStore {
        field: &'static str,
        value: String,
        store_dir: String,
        why: String,
    },
    #[error("build.json: tmpDir '{tmp}' is not inside topTmpDir '{top}'")]
    TmpOutsideTop { tmp: String, top: String },
    #[error("build.json: system '{0}' is not a Nix system name")]
    BadSystem(String),
    #[error("build.json: two outputs have the same path '{0}'")]
    DuplicateOutput(String),
    #[error(
        "this derivation uses {0}, which makes Nix write files into the local build directory; \
         the remote builder cannot see them, so it cannot be built through external-builders \
         yet (use the build hook for it)"
    )]
    LocalFiles(&'static str),
    #[error("build.json: fixed-output derivation with {0}, which is not supported here yet")]
    FixedOutput(String),
}

/// `build.json` as Nix writes it (src/libstore/unix/build/external-derivation-builder.cc).
/// Fields this version does not know are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    builder: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    top_tmp_dir: String,
    tmp_dir: String,
    tmp_dir_in_sandbox: String,
    store_dir: String,
    real_store_dir: String,
    system: String,
    #[serde(default)]
    input_paths: Vec<String>,
    outputs: BTreeMap<String, String>,
}

/// Only the version, read first so a newer file says so instead of failing on its shape.
#[derive(Deserialize)]
struct VersionOnly {
    version: u64,
}

/// A validated `build.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalJob {
    pub builder: String,
    pub args: Vec<String>,
    /// The environment as Nix rewrote it, without the variables the remote sets itself.
    pub env: BTreeMap<String, String>,
    pub store_dir: String,
    /// Where the store really is on this machine (the scratch outputs are unpacked there).
    pub real_store_dir: String,
    pub system: String,
    pub input_paths: BTreeSet<StorePath>,
    /// Output name → scratch path, as the daemon wants them.
    pub outputs: BTreeMap<String, StorePath>,
    /// `requiredSystemFeatures`, from the environment.
    pub required_features: BTreeSet<String>,
    /// For a fixed-output derivation: (hash algorithm as a `.drv` writes it, base16 hash).
    pub fixed: Option<(String, String)>,
}

impl ExternalJob {
    /// Parses and validates `bytes`, the contents of `build.json`.
    pub fn parse(bytes: &[u8]) -> Result<Self, JobError> {
        let v: VersionOnly =
            serde_json::from_slice(bytes).map_err(|e| JobError::Json(e.to_string()))?;
        if v.version != VERSION {
            return Err(JobError::Version(v.version));
        }
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| JobError::Json(e.to_string()))?;
        Self::validate(raw)
    }

    fn validate(raw: Raw) -> Result<Self, JobError> {
        let store_dir = clean_abs("storeDir", &raw.store_dir)?;
        let real_store_dir = clean_abs("realStoreDir", &raw.real_store_dir)?;
        let top = clean_abs("topTmpDir", &raw.top_tmp_dir)?;
        let tmp = clean_abs("tmpDir", &raw.tmp_dir)?;
        if !tmp
            .strip_prefix(top.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        {
            return Err(JobError::TmpOutsideTop { tmp, top });
        }
        let in_sandbox = clean_abs("tmpDirInSandbox", &raw.tmp_dir_in_sandbox)?;
        non_empty("builder", &raw.builder)?;
        bounded("builder", &raw.builder, MAX_PATH_LEN)?;
        bounded("system", &raw.system, MAX_PATH_LEN)?;
        if raw.system.is_empty()
            || !raw
                .system
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"_-.".contains(&c))
        {
            return Err(JobError::BadSystem(raw.system));
        }
        if raw.outputs.is_empty() {
            return Err(JobError::Empty { field: "outputs" });
        }
        let mut outputs = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for (name, path) in raw.outputs {
            if name.is_empty()
                || name.len() > MAX_OUTPUT_NAME
                || name.starts_with('.')
                || !name.bytes().all(hook_protocol::store_path::is_name_char)
            {
                return Err(JobError::BadOutputName(name));
            }
            let p = in_store("output", &path, &store_dir)?;
            if !seen.insert(p.clone()) {
                return Err(JobError::DuplicateOutput(path));
            }
            outputs.insert(name, p);
        }
        let input_paths = raw
            .input_paths
            .iter()
            .map(|p| in_store("input path", p, &store_dir))
            .collect::<Result<BTreeSet<_>, _>>()?;
        if raw.env.contains_key("NIX_ATTRS_JSON_FILE") || raw.env.contains_key("NIX_ATTRS_SH_FILE")
        {
            return Err(JobError::LocalFiles(
                "structured attributes (__structuredAttrs)",
            ));
        }
        let attr_file = format!("{in_sandbox}/.attr-");
        if raw.env.values().any(|v| v.starts_with(&attr_file)) {
            return Err(JobError::LocalFiles("passAsFile"));
        }
        let fixed = fixed_output(&raw.env)?;
        let required_features = raw
            .env
            .get("requiredSystemFeatures")
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let env = raw
            .env
            .into_iter()
            .filter(|(k, v)| !(DAEMON_SET.contains(&k.as_str()) && *v == in_sandbox))
            .filter(|(k, _)| k != "NIX_BUILD_CORES")
            .collect();
        Ok(ExternalJob {
            builder: raw.builder,
            args: raw.args,
            env,
            store_dir,
            real_store_dir,
            system: raw.system,
            input_paths,
            outputs,
            required_features,
            fixed,
        })
    }

    /// The derivation the remote builds: the rewritten builder, arguments and environment,
    /// the scratch paths as outputs, the input paths as input sources.
    pub fn basic_derivation(&self) -> BasicDerivation {
        let (hash_algo, hash) = self.fixed.clone().unwrap_or_default();
        BasicDerivation {
            outputs: self
                .outputs
                .iter()
                .map(|(name, path)| {
                    (
                        name.clone(),
                        DerivationOutput {
                            path: path.to_string(),
                            hash_algo: hash_algo.clone(),
                            hash: hash.clone(),
                        },
                    )
                })
                .collect(),
            input_srcs: self.input_paths.iter().map(|p| p.to_string()).collect(),
            platform: self.system.clone(),
            builder: self.builder.clone().into_bytes(),
            args: self.args.iter().map(|a| a.clone().into_bytes()).collect(),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone().into_bytes(), v.clone().into_bytes()))
                .collect(),
        }
    }

    /// A name for the derivation on the remote (logs, locks, the deriver it records):
    /// build.json does not say which `.drv` it is, so one is made from the outputs, stable for
    /// the same outputs and named like them.
    pub fn drv_path(&self) -> StorePath {
        let mut seed = Vec::new();
        for (name, path) in &self.outputs {
            seed.extend_from_slice(name.as_bytes());
            seed.push(0);
            seed.extend_from_slice(path.as_str().as_bytes());
            seed.push(0);
        }
        let digest = Sha256::digest(&seed);
        let hash = hook_protocol::store_path::nix32_encode(&digest.0[..20]);
        // Every output has a valid name; `out`'s (or the first one's) names the derivation.
        let first = self
            .outputs
            .get("out")
            .or_else(|| self.outputs.values().next());
        let name = first.map(StorePath::name).unwrap_or("external-build");
        let name: String = name.chars().take(200).collect();
        let s = format!("{}/{hash}-{name}.drv", self.store_dir);
        StorePath::parse(&s).unwrap_or_else(|_| {
            // Unreachable with a validated job (the name is a valid store name); a fixed name
            // keeps this total.
            StorePath::parse(&format!("{}/{hash}-external-build.drv", self.store_dir))
                .expect("a fixed valid name")
        })
    }

    /// Where `output`'s scratch path really is on this machine (under `realStoreDir`).
    pub fn real_path(&self, output: &StorePath) -> String {
        format!("{}/{}", self.real_store_dir, output.base_name())
    }
}

fn bounded(field: &'static str, s: &str, max: usize) -> Result<(), JobError> {
    if s.len() > max {
        return Err(JobError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

fn non_empty(field: &'static str, s: &str) -> Result<(), JobError> {
    if s.is_empty() {
        return Err(JobError::Empty { field });
    }
    Ok(())
}

/// An absolute path without `.`/`..` components, empty components, a trailing slash or NUL.
fn clean_abs(field: &'static str, s: &str) -> Result<String, JobError> {
    bounded(field, s, MAX_PATH_LEN)?;
    let bad = || JobError::BadPath {
        field,
        value: s.to_owned(),
    };
    let rest = s.strip_prefix('/').ok_or_else(bad)?;
    if s.contains('\0') {
        return Err(bad());
    }
    if !rest.is_empty()
        && rest
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad());
    }
    Ok(s.to_owned())
}

/// A store path directly inside `store_dir`.
fn in_store(field: &'static str, s: &str, store_dir: &str) -> Result<StorePath, JobError> {
    bounded(field, s, MAX_PATH_LEN)?;
    let not = |why: String| JobError::NotInStore {
        field,
        value: s.to_owned(),
        store_dir: store_dir.to_owned(),
        why,
    };
    let p = StorePath::parse(s).map_err(|e| not(e.to_string()))?;
    if p.store_dir() != store_dir {
        return Err(not("it is in another directory".into()));
    }
    Ok(p)
}

/// A fixed-output derivation's output hash, from the environment (`outputHash`,
/// `outputHashAlgo`, `outputHashMode`), as a `.drv` writes it; sha256 only.
fn fixed_output(env: &BTreeMap<String, String>) -> Result<Option<(String, String)>, JobError> {
    let Some(hash) = env.get("outputHash") else {
        return Ok(None);
    };
    let algo = env.get("outputHashAlgo").map(String::as_str).unwrap_or("");
    if !(algo.is_empty() || algo == "sha256") {
        return Err(JobError::FixedOutput(format!("hash algorithm '{algo}'")));
    }
    let mode = match env.get("outputHashMode").map(String::as_str) {
        None | Some("flat") => "",
        Some("recursive") | Some("nar") => "r:",
        Some(other) => return Err(JobError::FixedOutput(format!("mode '{other}'"))),
    };
    let h = Sha256::parse_any(hash)
        .map_err(|_| JobError::FixedOutput(format!("a hash Nix gave as '{hash}'")))?;
    Ok(Some((format!("{mode}sha256"), h.to_base16())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello";
    const IN: &str = "/nix/store/abcdfghijklmnpqrsvwxyz0123456789-dep";

    fn json() -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "builder": "/bin/sh",
            "args": ["-c", "echo hi > $out"],
            "env": {"out": OUT, "NIX_BUILD_TOP": "/build", "TMPDIR": "/build",
                    "NIX_BUILD_CORES": "2", "requiredSystemFeatures": "kvm  big",
                    "PATH": "/path-not-set"},
            "topTmpDir": "/nix/var/nix/builds/nix-1-0",
            "tmpDir": "/nix/var/nix/builds/nix-1-0/build",
            "tmpDirInSandbox": "/build",
            "storeDir": "/nix/store",
            "realStoreDir": "/nix/store",
            "system": "aarch64-linux",
            "inputPaths": [IN],
            "outputs": {"out": OUT},
            "aFieldFromTheFuture": true
        })
    }

    fn parse(v: &serde_json::Value) -> Result<ExternalJob, JobError> {
        ExternalJob::parse(v.to_string().as_bytes())
    }

    fn with(f: impl FnOnce(&mut serde_json::Value)) -> Result<ExternalJob, JobError> {
        let mut v = json();
        f(&mut v);
        parse(&v)
    }

    #[test]
    fn every_field_is_read_and_the_derivation_made_from_them() {
        let job = parse(&json()).unwrap();
        assert_eq!(job.system, "aarch64-linux");
        assert_eq!(
            job.required_features,
            BTreeSet::from(["kvm".to_owned(), "big".to_owned()])
        );
        let basic = job.basic_derivation();
        assert_eq!(basic.platform, "aarch64-linux");
        assert_eq!(basic.builder, b"/bin/sh");
        assert_eq!(basic.args, [b"-c".to_vec(), b"echo hi > $out".to_vec()]);
        assert_eq!(basic.outputs["out"].path, OUT);
        assert_eq!(basic.outputs["out"].hash_algo, "");
        assert_eq!(basic.input_srcs, BTreeSet::from([IN.to_owned()]));
        // The daemon's own build directory and core count are the remote's business.
        assert!(!basic.env.contains_key(b"NIX_BUILD_TOP".as_slice()));
        assert!(!basic.env.contains_key(b"TMPDIR".as_slice()));
        assert!(!basic.env.contains_key(b"NIX_BUILD_CORES".as_slice()));
        assert_eq!(basic.env[b"out".as_slice()], OUT.as_bytes());
        assert_eq!(basic.env[b"PATH".as_slice()], b"/path-not-set");
        let drv = job.drv_path();
        assert_eq!(drv.store_dir(), "/nix/store");
        assert_eq!(drv.name(), "hello.drv");
        assert_eq!(drv, parse(&json()).unwrap().drv_path(), "stable");
        assert_eq!(job.real_path(&job.outputs["out"]), OUT);
    }

    #[test]
    fn a_real_store_dir_elsewhere_is_where_outputs_go() {
        let job = with(|v| v["realStoreDir"] = "/srv/root/nix/store".into()).unwrap();
        assert_eq!(
            job.real_path(&job.outputs["out"]),
            "/srv/root/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello"
        );
    }

    #[test]
    fn another_version_says_so_whatever_its_shape() {
        let e = parse(&serde_json::json!({"version": 2, "something": "else"})).unwrap_err();
        assert_eq!(e, JobError::Version(2));
        assert!(e.to_string().contains("version 2"), "{e}");
        assert!(matches!(
            parse(&serde_json::json!({"builder": "x"})),
            Err(JobError::Json(_))
        ));
        assert!(matches!(
            ExternalJob::parse(b"\xff\x00 not json"),
            Err(JobError::Json(_))
        ));
    }

    #[test]
    fn outputs_must_be_store_paths_in_the_store_dir() {
        for bad in [
            "/nix/store/../etc/passwd",
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a/../../x",
            "/etc/0123456789abcdfghijklmnpqrsvwxyz-hello",
            "/nix/store/sub/0123456789abcdfghijklmnpqrsvwxyz-hello",
            "nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello",
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-..",
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-.hidden",
            "/nix/store/short-hello",
            "",
        ] {
            let e = with(|v| v["outputs"]["out"] = bad.into()).unwrap_err();
            assert!(matches!(e, JobError::NotInStore { .. }), "{bad}: {e:?}");
        }
        let e = with(|v| v["inputPaths"] = serde_json::json!(["/tmp/x"])).unwrap_err();
        assert!(matches!(e, JobError::NotInStore { .. }), "{e:?}");
        assert!(matches!(
            with(|v| v["outputs"] = serde_json::json!({})),
            Err(JobError::Empty { .. })
        ));
        for name in ["", "..", "a/b", ".x", "o\0"] {
            let e = with(|v| v["outputs"] = serde_json::json!({ name: OUT })).unwrap_err();
            assert_eq!(e, JobError::BadOutputName(name.into()));
        }
        let e = with(|v| v["outputs"] = serde_json::json!({"out": OUT, "dev": OUT})).unwrap_err();
        assert_eq!(e, JobError::DuplicateOutput(OUT.into()));
    }

    #[test]
    fn directories_must_be_clean_absolute_paths() {
        for (field, bad) in [
            ("storeDir", "/nix/../store"),
            ("storeDir", "nix/store"),
            ("realStoreDir", "/nix/store/"),
            ("realStoreDir", "/nix//store"),
            ("topTmpDir", "relative"),
            ("tmpDirInSandbox", "/./build"),
        ] {
            let e = with(|v| v[field] = bad.into()).unwrap_err();
            assert!(
                matches!(e, JobError::BadPath { .. }),
                "{field}={bad}: {e:?}"
            );
        }
        let e = with(|v| v["tmpDir"] = "/nix/var/nix/builds/nix-1-0x/build".into()).unwrap_err();
        assert!(matches!(e, JobError::TmpOutsideTop { .. }), "{e:?}");
        // A store somewhere else is fine, as long as the outputs are in it.
        let e = with(|v| v["storeDir"] = "/other/store".into()).unwrap_err();
        assert!(matches!(e, JobError::NotInStore { .. }), "{e:?}");
    }

    #[test]
    fn huge_strings_are_refused_by_length() {
        let huge = format!("/{}", "a".repeat(100_000));
        let e = with(|v| v["builder"] = huge.clone().into()).unwrap_err();
        assert!(
            matches!(
                e,
                JobError::TooLong {
                    field: "builder",
                    len: 100_001,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = with(|v| v["storeDir"] = huge.clone().into()).unwrap_err();
        assert!(matches!(e, JobError::TooLong { .. }), "{e:?}");
        let e = with(|v| v["outputs"]["out"] = huge.clone().into()).unwrap_err();
        assert!(matches!(e, JobError::TooLong { .. }), "{e:?}");
        let e = with(|v| v["system"] = "x".repeat(5000).into()).unwrap_err();
        assert!(matches!(e, JobError::TooLong { .. }), "{e:?}");
        let e = with(|v| v["system"] = "aarch64 linux".into()).unwrap_err();
        assert!(matches!(e, JobError::BadSystem(_)), "{e:?}");
        assert!(matches!(
            with(|v| v["builder"] = "".into()),
            Err(JobError::Empty { .. })
        ));
    }

    #[test]
    fn files_in_the_local_build_directory_are_refused() {
        let e = with(|v| v["env"]["NIX_ATTRS_JSON_FILE"] = "/build/.attrs.json".into());
        assert!(matches!(e, Err(JobError::LocalFiles(_))), "{e:?}");
        let e = with(|v| v["env"]["textPath"] = "/build/.attr-0abc".into());
        assert!(
            matches!(e, Err(JobError::LocalFiles("passAsFile"))),
            "{e:?}"
        );
    }

    #[test]
    fn a_fixed_output_carries_its_hash() {
        let sri = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
        let job = with(|v| {
            v["env"]["outputHash"] = sri.into();
            v["env"]["outputHashMode"] = "recursive".into();
        })
        .unwrap();
        let o = &job.basic_derivation().outputs["out"];
        assert_eq!(o.hash_algo, "r:sha256");
        assert_eq!(
            o.hash,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let e = with(|v| {
            v["env"]["outputHash"] = "abc".into();
            v["env"]["outputHashAlgo"] = "sha1".into();
        });
        assert!(matches!(e, Err(JobError::FixedOutput(_))), "{e:?}");
    }
}
