//! The outcome of a remote build: [`BuildStatus`] and [`BuildResult`], in every layout the serve
//! (cmd 8 reply, docs/protocol.md §7.2) and worker (op 36 / op 46 replies, §8.3) protocols use.
//!
//! Owns the BuildResult codec for a given [`BuildResultLayout`] (are times there, are CPU times
//! there, how the built outputs are laid out) and the normalisation of the built-outputs map,
//! which the wire carries in two shapes (realisation JSON keyed by `sha256:<hex>!<output>` with a
//! *basename* `outPath`, or `output → (full path, signatures)`), into one `output name → full
//! store path` map. Which layout a connection uses is the protocol's business: this module must
//! never import `serve` or `worker`. Pure functions over bytes; must never perform I/O or trust
//! a peer's value to be well-formed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::path_info::{read_store_path, read_string_set};
use crate::store_path::StorePath;
#[cfg(any(test, feature = "server"))]
use crate::wire::WireWrite;
use crate::wire::{self, DecodeError, Invalid, Reader};

/// Which of a BuildResult's optional parts are on the wire, and in which shape. Each protocol
/// derives it from its negotiated version (docs/protocol.md §7.2 for serve, §8.3 for worker),
/// so this module needs to know neither protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildResultLayout {
    /// `timesBuilt`, `isNonDeterministic`, `startTime`, `stopTime` (serve ≥ 2.3, worker ≥ 1.29).
    pub times: bool,
    /// `cpuUser`, `cpuSystem` as optional microseconds (worker ≥ 1.37).
    pub cpu_times: bool,
    pub outputs: BuiltOutputsLayout,
}

/// How a BuildResult carries its built outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltOutputsLayout {
    /// Not at all (serve < 2.6, worker < 1.28).
    Absent,
    /// `map<"sha256:<hex>!<output>", realisation JSON>` with a basename `outPath` (serve 2.6–2.7,
    /// worker ≥ 1.28 without the `realisation-with-path-not-hash` feature).
    RealisationJson,
    /// `map<output name, (full path, signatures)>` (serve ≥ 2.8, worker with that feature).
    PathAndSignatures,
}

/// How a build ended (Nix's `BuildResult::Status`; the same codes in every protocol).
///
/// Codes 0–14 are the ones every Nix release defines. A code we do not know is kept as
/// [`BuildStatus::Unknown`] rather than rejected, and counts as a failure: a newer peer that adds
/// a failure kind then still gets its error message shown instead of a protocol error that hides
/// it. (Nix itself rejects unknown codes.) A code above `u32::MAX` cannot come from any Nix and
/// is [`Invalid`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildStatus {
    Built,
    Substituted,
    AlreadyValid,
    PermanentFailure,
    InputRejected,
    OutputRejected,
    TransientFailure,
    CachedFailure,
    TimedOut,
    MiscFailure,
    DependencyFailed,
    LogLimitExceeded,
    NotDeterministic,
    ResolvesToAlreadyValid,
    NoSubstituters,
    /// A code this crate does not know; treated as a failure.
    Unknown(u32),
}

impl BuildStatus {
    const KNOWN: [BuildStatus; 15] = [
        BuildStatus::Built,
        BuildStatus::Substituted,
        BuildStatus::AlreadyValid,
        BuildStatus::PermanentFailure,
        BuildStatus::InputRejected,
        BuildStatus::OutputRejected,
        BuildStatus::TransientFailure,
        BuildStatus::CachedFailure,
        BuildStatus::TimedOut,
        BuildStatus::MiscFailure,
        BuildStatus::DependencyFailed,
        BuildStatus::LogLimitExceeded,
        BuildStatus::NotDeterministic,
        BuildStatus::ResolvesToAlreadyValid,
        BuildStatus::NoSubstituters,
    ];

    /// Maps a wire code; `None` only for codes above `u32::MAX`.
    pub fn from_code(code: u64) -> Option<Self> {
        let code = u32::try_from(code).ok()?;
        Some(
            Self::KNOWN
                .get(code as usize)
                .copied()
                .unwrap_or(BuildStatus::Unknown(code)),
        )
    }

    pub fn code(self) -> u64 {
        match self {
            BuildStatus::Unknown(c) => c as u64,
            known => Self::KNOWN.iter().position(|&k| k == known).unwrap_or(0) as u64,
        }
    }

    /// Built, Substituted, AlreadyValid and ResolvesToAlreadyValid.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }

    fn decode(r: &mut Reader<'_>) -> wire::Result<Self> {
        let code = r.u64()?;
        BuildStatus::from_code(code).ok_or_else(|| {
            Invalid::OutOfRange {
                what: "build status",
                value: code,
            }
            .into()
        })
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildStatus::Unknown(c) => write!(f, "unknown status {c}"),
            known => write!(f, "{known:?}"),
        }
    }
}

/// One output the remote built (or found): its full store path and the realisation's signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltOutput {
    pub path: StorePath,
    pub signatures: BTreeSet<String>,
}

/// What a remote build reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    /// Empty on success. Nix's messages carry ANSI colour escapes.
    pub error_msg: String,
    /// 0 when the protocol version does not carry it (serve < 2.3, worker < 1.29).
    pub times_built: u64,
    pub is_non_deterministic: bool,
    /// Seconds since the epoch; 0 when not carried.
    pub start_time: u64,
    pub stop_time: u64,
    /// CPU time in microseconds (worker ≥ 1.37 only).
    pub cpu_user: Option<i64>,
    pub cpu_system: Option<i64>,
    /// Output name → path. Empty when the protocol version does not carry it (serve < 2.6,
    /// worker < 1.28) and on failure.
    pub built_outputs: BTreeMap<String, BuiltOutput>,
}

impl BuildResult {
    /// A result with just a status and message; every other field empty.
    pub fn new(status: BuildStatus, error_msg: impl Into<String>) -> Self {
        BuildResult {
            status,
            error_msg: error_msg.into(),
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            cpu_user: None,
            cpu_system: None,
            built_outputs: BTreeMap::new(),
        }
    }

    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    /// `output name → full out path`.
    pub fn out_paths(&self) -> BTreeMap<&str, &StorePath> {
        self.built_outputs
            .iter()
            .map(|(k, v)| (k.as_str(), &v.path))
            .collect()
    }

    /// Decodes a BuildResult laid out as `layout` says (each protocol derives it from its
    /// negotiated version: `serve::build_result_layout`,
    /// `worker::Negotiated::build_result_layout`). `store_dir` (normally `/nix/store`) turns the
    /// basenames of the realisation-JSON layout into full paths.
    pub fn decode(
        r: &mut Reader<'_>,
        layout: BuildResultLayout,
        store_dir: &str,
    ) -> wire::Result<Self> {
        let mut res = Self::decode_head(r, layout.times)?;
        if layout.cpu_times {
            res.cpu_user = decode_opt_micros(r)?;
            res.cpu_system = decode_opt_micros(r)?;
        }
        res.built_outputs = match layout.outputs {
            BuiltOutputsLayout::Absent => BTreeMap::new(),
            BuiltOutputsLayout::RealisationJson => decode_realisation_json_map(r, store_dir)?,
            BuiltOutputsLayout::PathAndSignatures => decode_output_map(r)?,
        };
        Ok(res)
    }

    fn decode_head(r: &mut Reader<'_>, with_times: bool) -> wire::Result<Self> {
        let status = BuildStatus::decode(r)?;
        let error_msg = r.text()?;
        let mut res = BuildResult::new(status, error_msg);
        if with_times {
            res.times_built = r.u64_max("timesBuilt", u32::MAX as u64)?;
            res.is_non_deterministic = r.bool()?;
            res.start_time = r.u64()?;
            res.stop_time = r.u64()?;
        }
        Ok(res)
    }
}

/// The server's side: what a `nix-store --serve` or a daemon writes.
#[cfg(any(test, feature = "server"))]
impl BuildResult {
    /// Appends the BuildResult laid out as `layout` says (what a server sends; for stand-in
    /// peers and tests). Fields the layout does not carry are left out.
    pub fn encode(&self, w: &mut Vec<u8>, layout: BuildResultLayout) {
        self.encode_head(w, layout.times);
        if layout.cpu_times {
            encode_opt_micros(w, self.cpu_user);
            encode_opt_micros(w, self.cpu_system);
        }
        match layout.outputs {
            BuiltOutputsLayout::Absent => {}
            BuiltOutputsLayout::RealisationJson => self.encode_realisation_json_map(w),
            BuiltOutputsLayout::PathAndSignatures => self.encode_output_map(w),
        }
    }

    fn encode_head(&self, w: &mut Vec<u8>, with_times: bool) {
        w.put_u64(self.status.code());
        w.put_str(&self.error_msg);
        if with_times {
            w.put_u64(self.times_built);
            w.put_bool(self.is_non_deterministic);
            w.put_u64(self.start_time);
            w.put_u64(self.stop_time);
        }
    }

    fn encode_output_map(&self, w: &mut Vec<u8>) {
        w.put_u64(self.built_outputs.len() as u64);
        for (name, out) in &self.built_outputs {
            w.put_str(name);
            w.put_str(out.path.as_str());
            w.put_strings(&out.signatures);
        }
    }

    /// The realisation-JSON layout as Nix 2.8 writes it, with a dummy derivation hash in the id
    /// (current Nix does the same; readers only use the output name and `outPath`).
    fn encode_realisation_json_map(&self, w: &mut Vec<u8>) {
        w.put_u64(self.built_outputs.len() as u64);
        for (name, out) in &self.built_outputs {
            let id = format!("sha256:{}!{name}", "0".repeat(64));
            let json = serde_json::json!({
                "dependentRealisations": {},
                "id": id,
                "outPath": out.path.base_name(),
                "signatures": out.signatures,
            });
            w.put_str(&id);
            w.put_str(&json.to_string());
        }
    }
}

/// `map<outputName, (outPath, sigs)>`: serve ≥ 2.8 and worker with `realisation-with-path-not-hash`.
fn decode_output_map(r: &mut Reader<'_>) -> wire::Result<BTreeMap<String, BuiltOutput>> {
    let entries = r.list("built outputs", |r| {
        let name = r.string("output name")?;
        let path = read_store_path(r, "built output path")?;
        let signatures = read_string_set(r, "realisation signatures")?;
        Ok((name, BuiltOutput { path, signatures }))
    })?;
    Ok(entries.into_iter().collect())
}

/// `map<"sha256:<hex>!<output>", realisation JSON>`: serve 2.6–2.7 and worker ≥ 1.28.
fn decode_realisation_json_map(
    r: &mut Reader<'_>,
    store_dir: &str,
) -> wire::Result<BTreeMap<String, BuiltOutput>> {
    let entries = r.list("built outputs", |r| {
        let id = r.str("realisation id")?;
        let json = r.str("realisation")?;
        parse_realisation(id, json, store_dir).map_err(DecodeError::from)
    })?;
    Ok(entries.into_iter().collect())
}

/// Parses one realisation-JSON entry into `(output name, output)`.
fn parse_realisation(
    id: &str,
    json: &str,
    store_dir: &str,
) -> Result<(String, BuiltOutput), Invalid> {
    let bad = |why: String| Invalid::Malformed(format!("realisation '{id}': {why}"));
    let (_, name) = id
        .split_once('!')
        .ok_or_else(|| bad("the id has no '!<output>'".into()))?;
    if name.is_empty() {
        return Err(bad("the output name is empty".into()));
    }
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(format!("bad JSON: {e}")))?;
    let out_path = value
        .get("outPath")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| bad("no string 'outPath'".into()))?;
    // Nix writes the basename; accept a full path too.
    let full = if out_path.starts_with('/') {
        out_path.to_owned()
    } else {
        format!("{}/{out_path}", store_dir.trim_end_matches('/'))
    };
    let path = StorePath::parse(&full).map_err(|e| bad(e.to_string()))?;
    let signatures = match value.get("signatures") {
        None | Some(serde_json::Value::Null) => BTreeSet::new(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad("a signature is not a string".into()))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("'signatures' is not a list".into())),
    };
    Ok((name.to_owned(), BuiltOutput { path, signatures }))
}

/// Worker ≥ 1.37 optional duration: u64 tag 0 (none) or 1 followed by i64 microseconds.
fn decode_opt_micros(r: &mut Reader<'_>) -> wire::Result<Option<i64>> {
    match r.u64()? {
        0 => Ok(None),
        1 => Ok(Some(r.u64()? as i64)),
        tag => Err(Invalid::OutOfRange {
            what: "optional duration tag",
            value: tag,
        }
        .into()),
    }
}

#[cfg(any(test, feature = "server"))]
fn encode_opt_micros(w: &mut Vec<u8>, v: Option<i64>) {
    match v {
        None => w.put_u64(0),
        Some(us) => {
            w.put_u64(1);
            w.put_u64(us as u64);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::path_info::tests::{arb_path, path};
    use proptest::prelude::*;

    pub(crate) fn arb_build_result() -> impl Strategy<Value = BuildResult> {
        (
            (0u64..20).prop_map(|c| BuildStatus::from_code(c).unwrap()),
            ".{0,40}",
            any::<u32>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(any::<i64>()),
            proptest::option::of(any::<i64>()),
            proptest::collection::btree_map(
                "[a-z]{1,6}",
                (
                    arb_path(),
                    proptest::collection::btree_set("[a-z]{1,5}-1:[A-Za-z0-9]{4,10}", 0..3),
                ),
                0..3,
            ),
        )
            .prop_map(|(status, msg, tb, nd, st, sp, cu, cs, outs)| BuildResult {
                status,
                error_msg: msg,
                times_built: tb as u64,
                is_non_deterministic: nd,
                start_time: st,
                stop_time: sp,
                cpu_user: cu,
                cpu_system: cs,
                built_outputs: outs
                    .into_iter()
                    .map(|(k, (path, signatures))| (k, BuiltOutput { path, signatures }))
                    .collect(),
            })
    }

    /// What survives a trip through a protocol version that drops some fields.
    pub(crate) fn carried(res: &BuildResult, times: bool, cpu: bool, outputs: bool) -> BuildResult {
        let mut r = res.clone();
        if !times {
            r.times_built = 0;
            r.is_non_deterministic = false;
            r.start_time = 0;
            r.stop_time = 0;
        }
        if !cpu {
            r.cpu_user = None;
            r.cpu_system = None;
        }
        if !outputs {
            r.built_outputs.clear();
        }
        r
    }

    #[test]
    fn status_codes() {
        for c in 0..15 {
            let s = BuildStatus::from_code(c).unwrap();
            assert_eq!(s.code(), c);
            assert!(!matches!(s, BuildStatus::Unknown(_)));
        }
        assert_eq!(BuildStatus::from_code(15), Some(BuildStatus::Unknown(15)));
        assert!(!BuildStatus::Unknown(15).is_success());
        assert_eq!(BuildStatus::Unknown(15).code(), 15);
        assert_eq!(BuildStatus::from_code(1 << 32), None);
        assert!(BuildStatus::ResolvesToAlreadyValid.is_success());
        assert!(BuildStatus::Substituted.is_success());
        assert!(!BuildStatus::PermanentFailure.is_success());
        assert_eq!(
            BuildStatus::from_code(13),
            Some(BuildStatus::ResolvesToAlreadyValid)
        );
    }

    /// The layout of serve 2.7 (what Nix 2.8 … 2.34 servers send).
    const SERVE_2_7: BuildResultLayout = BuildResultLayout {
        times: true,
        cpu_times: false,
        outputs: BuiltOutputsLayout::RealisationJson,
    };

    /// Every layout there is.
    pub(crate) fn all_layouts() -> Vec<BuildResultLayout> {
        let mut all = Vec::new();
        for times in [false, true] {
            for cpu_times in [false, true] {
                for outputs in [
                    BuiltOutputsLayout::Absent,
                    BuiltOutputsLayout::RealisationJson,
                    BuiltOutputsLayout::PathAndSignatures,
                ] {
                    all.push(BuildResultLayout {
                        times,
                        cpu_times,
                        outputs,
                    });
                }
            }
        }
        all
    }

    /// The serve 2.7 reply a Nix 2.8 server sent for a successful build, byte for byte as
    /// docs/protocol.md §7.2 lays it out (status, message, times, then the JSON map).
    #[test]
    fn serve_2_7_json_outputs_become_full_paths() {
        let out = path(4, "servebuild");
        let mut w = Vec::new();
        w.put_u64(0);
        w.put_str("");
        w.put_u64(1);
        w.put_u64(0);
        w.put_u64(1_700_000_000);
        w.put_u64(1_700_000_002);
        w.put_u64(1);
        let id = format!("sha256:{}!out", "4ad3".repeat(16));
        w.put_str(&id);
        w.put_str(&format!(
            r#"{{"dependentRealisations":{{}},"id":"{id}","outPath":"{}","signatures":[]}}"#,
            out.base_name()
        ));
        let (res, used) =
            wire::decode_with(&w, |r| BuildResult::decode(r, SERVE_2_7, "/nix/store")).unwrap();
        assert_eq!(used, w.len());
        assert!(res.is_success());
        assert_eq!(
            (res.start_time, res.stop_time, res.times_built),
            (1_700_000_000, 1_700_000_002, 1)
        );
        assert_eq!(res.out_paths().get("out"), Some(&&out));
        // The same bytes under 2.5 stop after the times: the map is not read.
        let serve_2_5 = BuildResultLayout {
            outputs: BuiltOutputsLayout::Absent,
            ..SERVE_2_7
        };
        let (_, used) =
            wire::decode_with(&w, |r| BuildResult::decode(r, serve_2_5, "/nix/store")).unwrap();
        assert_eq!(used, 8 + 8 + 32);
    }

    #[test]
    fn bad_realisations_are_invalid() {
        for (id, json) in [
            ("sha256:00", r#"{"outPath":"x"}"#),
            ("sha256:00!", r#"{"outPath":"x"}"#),
            ("sha256:00!out", r#"{"outPath":5}"#),
            ("sha256:00!out", "not json"),
            ("sha256:00!out", r#"{"outPath":"not-a-store-path"}"#),
            ("sha256:00!out", r#"{"signatures":[]}"#),
        ] {
            let mut w = Vec::new();
            w.put_u64(1);
            w.put_str(id);
            w.put_str(json);
            let e = decode_realisation_json_map(&mut Reader::new(&w), "/nix/store").unwrap_err();
            assert!(matches!(e, DecodeError::Invalid(_)), "{id} {json}: {e:?}");
        }
    }

    #[test]
    fn a_bad_duration_tag_is_invalid() {
        let mut w = Vec::new();
        w.put_u64(0);
        w.put_str("");
        w.put_u64(0);
        w.put_u64(0);
        w.put_u64(0);
        w.put_u64(0);
        w.put_u64(2); // bad optional tag
        let layout = BuildResultLayout {
            times: true,
            cpu_times: true,
            outputs: BuiltOutputsLayout::RealisationJson,
        };
        assert!(matches!(
            BuildResult::decode(&mut Reader::new(&w), layout, "/nix/store"),
            Err(DecodeError::Invalid(_))
        ));
    }

    proptest! {
        #[test]
        fn every_layout_round_trips(res in arb_build_result(), layout in proptest::sample::select(all_layouts())) {
            let mut w = Vec::new();
            res.encode(&mut w, layout);
            let (got, used) = wire::decode_with(&w, |r| BuildResult::decode(r, layout, "/nix/store")).unwrap();
            prop_assert_eq!(used, w.len());
            let outputs = layout.outputs != BuiltOutputsLayout::Absent;
            prop_assert_eq!(got, carried(&res, layout.times, layout.cpu_times, outputs));
            for cut in 0..w.len() {
                let e = BuildResult::decode(&mut Reader::new(&w[..cut]), layout, "/nix/store").unwrap_err();
                prop_assert!(e.is_incomplete(), "cut {}: {:?}", cut, e);
            }
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            for layout in all_layouts() {
                let _ = BuildResult::decode(&mut Reader::new(&data), layout, "/nix/store");
            }
        }
    }
}
