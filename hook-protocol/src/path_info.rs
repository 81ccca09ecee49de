//! Store-path metadata shared by the serve and worker protocols: [`PathInfo`] (Nix's
//! `ValidPathInfo`), [`DerivedPath`] (what to build), and the wire helpers for store paths,
//! optional store paths and store-path sets.
//!
//! Owns the one path-info layout both protocols use to *upload* a path (serve cmd 9, worker
//! ops 39 and 44) and the worker's "unkeyed" layout (worker op 26's reply). The serve protocol's
//! own reply layout (cmd 2) lives in `serve.rs`. Pure functions over bytes: nothing here performs
//! I/O, and a path that is not a valid store path is [`Invalid`], never a panic.

use std::collections::BTreeSet;
use std::fmt;

use crate::store_path::{Sha256, StorePath};
use crate::wire::{self, DecodeError, Invalid, Reader, WireWrite};

/// Reads one printed store path.
pub fn read_store_path(r: &mut Reader<'_>, what: &'static str) -> wire::Result<StorePath> {
    let s = r.str(what)?;
    StorePath::parse(s).map_err(|e| Invalid::Malformed(format!("{what}: {e}")).into())
}

/// Reads a store path that may be absent (the empty string).
pub fn read_opt_store_path(
    r: &mut Reader<'_>,
    what: &'static str,
) -> wire::Result<Option<StorePath>> {
    let s = r.str(what)?;
    if s.is_empty() {
        return Ok(None);
    }
    StorePath::parse(s)
        .map(Some)
        .map_err(|e| Invalid::Malformed(format!("{what}: {e}")).into())
}

/// Reads a set of store paths (a u64 count, then that many paths). Duplicates collapse, as in
/// Nix's `std::set`; order is not checked (Nix does not check it either).
pub fn read_store_path_set(
    r: &mut Reader<'_>,
    what: &'static str,
) -> wire::Result<BTreeSet<StorePath>> {
    Ok(r.list(what, |r| read_store_path(r, what))?
        .into_iter()
        .collect())
}

/// Reads a set of strings (signatures, features).
pub fn read_string_set(r: &mut Reader<'_>, what: &'static str) -> wire::Result<BTreeSet<String>> {
    Ok(r.strings(what)?.into_iter().collect())
}

/// Writes a list or set of store paths (a u64 count, then the printed paths).
pub fn put_store_paths<'a>(w: &mut Vec<u8>, paths: impl IntoIterator<Item = &'a StorePath>) {
    let paths: Vec<&StorePath> = paths.into_iter().collect();
    w.put_strings(paths);
}

/// Writes an optional store path (`""` when absent).
pub fn put_opt_store_path(w: &mut Vec<u8>, p: Option<&StorePath>) {
    w.put_str(p.map(StorePath::as_str).unwrap_or(""));
}

/// Reads a SHA-256 NAR hash in any form Nix's `Hash::parseAny` accepts.
pub fn read_nar_hash(r: &mut Reader<'_>, what: &'static str) -> wire::Result<Sha256> {
    let s = r.str(what)?;
    Sha256::parse_any(s).map_err(|e| Invalid::Malformed(format!("{what}: {e}")).into())
}

/// Nix's `ValidPathInfo`: everything a store knows about one valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub deriver: Option<StorePath>,
    pub nar_hash: Sha256,
    pub references: BTreeSet<StorePath>,
    /// Seconds since the epoch; 0 when the protocol does not carry it (serve cmd 2).
    pub registration_time: u64,
    pub nar_size: u64,
    /// Built locally rather than substituted; false when the protocol does not carry it.
    pub ultimate: bool,
    pub sigs: BTreeSet<String>,
    /// The content address (`fixed:r:sha256:…`, `text:sha256:…`), if any.
    pub ca: Option<String>,
}

/// Nix's name for the same thing.
pub type ValidPathInfo = PathInfo;

impl PathInfo {
    /// A path info with no deriver, references, signatures or content address.
    pub fn new(path: StorePath, nar_hash: Sha256, nar_size: u64) -> Self {
        PathInfo {
            path,
            deriver: None,
            nar_hash,
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        }
    }

    /// Appends the upload layout shared by serve cmd 9, worker op 39 and each entry of worker
    /// op 44: `path, deriver-or-"", narHash (base16, no prefix), references, registrationTime,
    /// narSize, ultimate, sigs, ca-or-""`.
    pub fn encode_for_upload(&self, w: &mut Vec<u8>) {
        w.put_str(self.path.as_str());
        self.encode_unkeyed_worker(w, true);
    }

    /// Decodes [`PathInfo::encode_for_upload`] (what a receiving store reads).
    #[cfg(any(test, feature = "server"))]
    pub fn decode_for_upload(r: &mut Reader<'_>) -> wire::Result<Self> {
        let path = read_store_path(r, "uploaded path")?;
        Self::decode_unkeyed_worker(r, path, true)
    }

    /// Appends the worker protocol's unkeyed layout: `deriver-or-"", narHash (base16),
    /// references, registrationTime, narSize`, then — when `with_trust_fields` (worker ≥ 1.16) —
    /// `ultimate, sigs, ca-or-""`.
    pub fn encode_unkeyed_worker(&self, w: &mut Vec<u8>, with_trust_fields: bool) {
        put_opt_store_path(w, self.deriver.as_ref());
        w.put_str(&self.nar_hash.to_base16());
        w.put_strings(&self.references);
        w.put_u64(self.registration_time);
        w.put_u64(self.nar_size);
        if with_trust_fields {
            w.put_bool(self.ultimate);
            w.put_strings(&self.sigs);
            w.put_str(self.ca.as_deref().unwrap_or(""));
        }
    }

    /// Decodes [`PathInfo::encode_unkeyed_worker`] for `path`.
    pub fn decode_unkeyed_worker(
        r: &mut Reader<'_>,
        path: StorePath,
        with_trust_fields: bool,
    ) -> wire::Result<Self> {
        let deriver = read_opt_store_path(r, "deriver")?;
        let nar_hash = read_nar_hash(r, "narHash")?;
        let references = read_store_path_set(r, "references")?;
        let registration_time = r.u64()?;
        let nar_size = r.u64()?;
        let (ultimate, sigs, ca) = if with_trust_fields {
            let ultimate = r.bool()?;
            let sigs = read_string_set(r, "signatures")?;
            let ca = r.string("content address")?;
            (ultimate, sigs, (!ca.is_empty()).then_some(ca))
        } else {
            (false, BTreeSet::new(), None)
        };
        Ok(PathInfo {
            path,
            deriver,
            nar_hash,
            references,
            registration_time,
            nar_size,
            ultimate,
            sigs,
            ca,
        })
    }
}

/// Which outputs of a derivation are wanted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OutputsSpec {
    /// Every output (`drv!*`).
    All,
    /// These outputs; never empty.
    Names(BTreeSet<String>),
}

/// Something to build or fetch: a plain store path, or outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DerivedPath {
    Opaque(StorePath),
    Built {
        drv_path: StorePath,
        outputs: OutputsSpec,
    },
}

/// Why a string is not a derived path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DerivedPathError {
    #[error("'{text}' is not a derived path: {reason}")]
    Bad { text: String, reason: String },
}

impl DerivedPath {
    /// All outputs of `drv_path`.
    pub fn all_outputs(drv_path: StorePath) -> Self {
        DerivedPath::Built {
            drv_path,
            outputs: OutputsSpec::All,
        }
    }

    /// The "legacy" string form the worker protocol uses from 1.30 on (and Nix 2.8 always):
    /// `<path>` for an opaque path, `<drv>!out1,out2` (names sorted) or `<drv>!*`.
    pub fn to_worker_string(&self) -> String {
        match self {
            DerivedPath::Opaque(p) => p.as_str().to_owned(),
            DerivedPath::Built { drv_path, outputs } => {
                let outs = match outputs {
                    OutputsSpec::All => "*".to_owned(),
                    OutputsSpec::Names(n) => {
                        n.iter().map(String::as_str).collect::<Vec<_>>().join(",")
                    }
                };
                format!("{drv_path}!{outs}")
            }
        }
    }

    /// The `StorePathWithOutputs` form serve cmd 6 (BuildPaths) takes: a bare `.drv` path means
    /// every output there, so [`OutputsSpec::All`] is sent as the bare path.
    pub fn to_serve_string(&self) -> String {
        match self {
            DerivedPath::Built {
                drv_path,
                outputs: OutputsSpec::All,
            } => drv_path.as_str().to_owned(),
            other => other.to_worker_string(),
        }
    }

    /// Parses [`DerivedPath::to_worker_string`]'s form.
    pub fn parse(s: &str) -> Result<Self, DerivedPathError> {
        let bad = |reason: &str| DerivedPathError::Bad {
            text: s.to_owned(),
            reason: reason.to_owned(),
        };
        match s.split_once('!') {
            None => StorePath::parse(s)
                .map(DerivedPath::Opaque)
                .map_err(|e| bad(&e.to_string())),
            Some((drv, outs)) => {
                let drv_path = StorePath::parse(drv).map_err(|e| bad(&e.to_string()))?;
                let outputs = if outs == "*" {
                    OutputsSpec::All
                } else {
                    let names: BTreeSet<String> = outs.split(',').map(str::to_owned).collect();
                    if names.iter().any(String::is_empty) {
                        return Err(bad("empty output name"));
                    }
                    OutputsSpec::Names(names)
                };
                Ok(DerivedPath::Built { drv_path, outputs })
            }
        }
    }

    /// Reads a derived path in the worker protocol's string form.
    pub fn read(r: &mut Reader<'_>) -> wire::Result<Self> {
        let s = r.str("derived path")?;
        DerivedPath::parse(s).map_err(|e| DecodeError::malformed(e.to_string()))
    }
}

impl fmt::Display for DerivedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_worker_string())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store_path::nix32_encode;
    use proptest::prelude::*;

    /// A valid store path whose hash part is derived from `seed`.
    pub(crate) fn path(seed: u8, name: &str) -> StorePath {
        let hash = &nix32_encode(&[seed; 20]);
        StorePath::parse(&format!("/nix/store/{hash}-{name}")).unwrap()
    }

    pub(crate) fn arb_path() -> impl Strategy<Value = StorePath> {
        (any::<[u8; 20]>(), "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,20}").prop_map(|(h, n)| {
            StorePath::parse(&format!("/nix/store/{}-{n}", nix32_encode(&h))).unwrap()
        })
    }

    pub(crate) fn arb_path_info() -> impl Strategy<Value = PathInfo> {
        (
            arb_path(),
            proptest::option::of(arb_path()),
            any::<[u8; 32]>(),
            proptest::collection::btree_set(arb_path(), 0..4),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            proptest::collection::btree_set("[a-z]{1,8}-1:[A-Za-z0-9+/=]{4,20}", 0..3),
            proptest::option::of("(fixed:r:sha256|text:sha256):[0-9a-z]{52}"),
        )
            .prop_map(
                |(
                    path,
                    deriver,
                    h,
                    references,
                    registration_time,
                    nar_size,
                    ultimate,
                    sigs,
                    ca,
                )| {
                    PathInfo {
                        path,
                        deriver,
                        nar_hash: Sha256(h),
                        references,
                        registration_time,
                        nar_size,
                        ultimate,
                        sigs,
                        ca,
                    }
                },
            )
    }

    #[test]
    fn upload_layout_is_nix_s() {
        let mut info = PathInfo::new(path(1, "a"), Sha256::digest(b"x"), 120);
        info.deriver = Some(path(2, "a.drv"));
        info.references.insert(path(3, "dep"));
        info.registration_time = 7;
        info.ultimate = true;
        let mut w = Vec::new();
        info.encode_for_upload(&mut w);
        let mut r = Reader::new(&w);
        assert_eq!(r.str("p").unwrap(), info.path.as_str());
        assert_eq!(r.str("d").unwrap(), path(2, "a.drv").as_str());
        assert_eq!(r.str("h").unwrap(), Sha256::digest(b"x").to_base16());
        assert_eq!(r.strings("r").unwrap(), vec![path(3, "dep").to_string()]);
        assert_eq!(
            (r.u64().unwrap(), r.u64().unwrap(), r.u64().unwrap()),
            (7, 120, 1)
        );
        assert!(r.strings("s").unwrap().is_empty());
        assert_eq!(r.str("ca").unwrap(), "");
        assert!(r.is_empty());
    }

    #[test]
    fn bad_paths_and_hashes_are_invalid() {
        let mut w = Vec::new();
        w.put_str("/nix/store/not-a-path");
        assert!(matches!(
            read_store_path(&mut Reader::new(&w), "p"),
            Err(DecodeError::Invalid(_))
        ));
        let mut w = Vec::new();
        w.put_str("sha256:nothex");
        assert!(matches!(
            read_nar_hash(&mut Reader::new(&w), "h"),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn derived_path_strings() {
        let drv = path(9, "x.drv");
        let all = DerivedPath::all_outputs(drv.clone());
        assert_eq!(all.to_worker_string(), format!("{drv}!*"));
        assert_eq!(all.to_serve_string(), drv.to_string());
        let some = DerivedPath::Built {
            drv_path: drv.clone(),
            outputs: OutputsSpec::Names(["out".into(), "dev".into()].into()),
        };
        assert_eq!(some.to_worker_string(), format!("{drv}!dev,out"));
        assert_eq!(DerivedPath::parse(&some.to_worker_string()).unwrap(), some);
        assert_eq!(DerivedPath::parse(&all.to_worker_string()).unwrap(), all);
        assert!(DerivedPath::parse(&format!("{drv}!")).is_err());
        assert!(DerivedPath::parse(&format!("{drv}!a,,b")).is_err());
        assert!(DerivedPath::parse("relative!out").is_err());
    }

    proptest! {
        #[test]
        fn upload_round_trip(info in arb_path_info()) {
            let mut w = Vec::new();
            info.encode_for_upload(&mut w);
            let (got, used) = wire::decode_with(&w, PathInfo::decode_for_upload).unwrap();
            prop_assert_eq!(used, w.len());
            prop_assert_eq!(&got, &info);
            for cut in 0..w.len() {
                prop_assert!(PathInfo::decode_for_upload(&mut Reader::new(&w[..cut]))
                    .unwrap_err().is_incomplete());
            }
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = PathInfo::decode_for_upload(&mut Reader::new(&data));
            let _ = DerivedPath::read(&mut Reader::new(&data));
        }

        #[test]
        fn derived_path_round_trip(p in arb_path(), names in proptest::collection::btree_set("[a-z]{1,6}", 1..4)) {
            let d = DerivedPath::Built { drv_path: p.clone(), outputs: OutputsSpec::Names(names) };
            prop_assert_eq!(DerivedPath::parse(&d.to_worker_string()).unwrap(), d);
            let o = DerivedPath::Opaque(p);
            prop_assert_eq!(DerivedPath::parse(&o.to_worker_string()).unwrap(), o);
        }
    }
}
