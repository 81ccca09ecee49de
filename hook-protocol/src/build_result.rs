//! The outcome of a remote build: [`BuildStatus`] and [`BuildResult`], in every layout the serve
//! (cmd 8 reply, docs/protocol.md §7.2) and worker (op 36 / op 46 replies, §8.3) protocols use.
//!
//! Owns the BuildResult codec for a given [`BuildResultLayout`] (are times there, are CPU times
//! there, how the built outputs are laid out) and the normalisation of the built-outputs map,
//! which the wire carries in two shapes (realisation JSON keyed by `sha256:<hex>!<output>` with a
//! *basename* `outPath`, or `output → (full path, signatures)`), into one `output name →`
//! [`BuiltOutput`] map that keeps the realisation's id when the wire has it (content-addressed
//! derivations need it to register the realisation locally, docs/protocol.md §7.2), and the
//! realisations to register for a resolved content-addressed derivation
//! ([`BuildResult::realisations_of`]). Which layout a connection uses is the protocol's
//! business: this module must never import `serve` or `worker`. Pure functions over bytes; must
//! never perform I/O or trust a peer's value to be well-formed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::derivation::Derivation;
use crate::path_info::{read_store_path, read_string_set};
use crate::realisation::{DrvOutput, Realisation, check_output_name};
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

/// One output the remote built (or found): its full store path, the realisation's signatures,
/// and, when the layout carries realisation JSON, the realisation's id and dependencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltOutput {
    pub path: StorePath,
    pub signatures: BTreeSet<String>,
    /// The derivation output this realises (`sha256:<hex>!<output>`, the hash being the built
    /// derivation's hash modulo). `None` when the layout does not carry it
    /// ([`BuiltOutputsLayout::PathAndSignatures`]) or carries Nix's placeholder
    /// ([`DrvOutput::is_dummy`], which Nix ≥ 2.35 servers send over serve 2.7): the caller then
    /// has to know the id itself (`Derivation::floating_output_ids`).
    pub id: Option<DrvOutput>,
    /// The realisation's dependencies (`Realisation::dependent_realisations`); empty when the
    /// layout carries none.
    pub dependent_realisations: BTreeMap<DrvOutput, StorePath>,
}

impl BuiltOutput {
    /// An output with just a path (and no id).
    pub fn new(path: StorePath) -> Self {
        BuiltOutput {
            path,
            signatures: BTreeSet::new(),
            id: None,
            dependent_realisations: BTreeMap::new(),
        }
    }

    /// The realisation the remote reported, to register locally (worker op 42), when it gave
    /// its id.
    pub fn realisation(&self) -> Option<Realisation> {
        Some(Realisation {
            id: self.id.clone()?,
            out_path: self.path.clone(),
            signatures: self.signatures.clone(),
            dependent_realisations: self.dependent_realisations.clone(),
        })
    }
}

impl From<Realisation> for BuiltOutput {
    fn from(r: Realisation) -> Self {
        BuiltOutput {
            path: r.out_path,
            signatures: r.signatures,
            id: (!r.id.is_dummy()).then_some(r.id),
            dependent_realisations: r.dependent_realisations,
        }
    }
}

/// Why a build result's outputs are not the realisations of a derivation
/// ([`BuildResult::realisations_of`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RealisationsError {
    #[error(
        "the derivation is not a resolved content-addressed one (every output floating, no \
         input derivations), so its realisation ids cannot be computed"
    )]
    NotResolvedCa,
    #[error("the remote reported no path for output '{output}'")]
    Missing { output: String },
    #[error("the remote reported an output '{output}' the derivation does not have")]
    Unexpected { output: String },
    #[error(
        "the remote reported output '{output}' as the realisation of '{reported}', but the \
         derivation's is '{expected}'"
    )]
    IdMismatch {
        output: String,
        reported: String,
        expected: String,
    },
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

    /// The realisations of the built outputs whose id the wire carried, by output name.
    pub fn realisations(&self) -> BTreeMap<&str, Realisation> {
        self.built_outputs
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.realisation()?)))
            .collect()
    }

    /// The realisations to register locally after building the resolved content-addressed
    /// derivation `drv` (the one the daemon handed the hook; docs/protocol.md §3.4): one per
    /// output of `drv`, each at the path the remote built, under the id computed from `drv`
    /// ([`Derivation::floating_output_ids`]), so also when the remote did not say it (Nix ≥ 2.35
    /// servers). A remote that reports another id, or other outputs, built something else: that
    /// is an error, and nothing should be registered.
    pub fn realisations_of(
        &self,
        drv: &Derivation,
    ) -> Result<BTreeMap<String, Realisation>, RealisationsError> {
        let ids = drv
            .floating_output_ids()
            .ok_or(RealisationsError::NotResolvedCa)?;
        if let Some(extra) = self.built_outputs.keys().find(|k| !ids.contains_key(*k)) {
            return Err(RealisationsError::Unexpected {
                output: extra.clone(),
            });
        }
        ids.into_iter()
            .map(|(name, id)| {
                let built =
                    self.built_outputs
                        .get(&name)
                        .ok_or_else(|| RealisationsError::Missing {
                            output: name.clone(),
                        })?;
                if let Some(reported) = built.id.as_ref().filter(|r| **r != id) {
                    return Err(RealisationsError::IdMismatch {
                        output: name,
                        reported: reported.to_string(),
                        expected: id.to_string(),
                    });
                }
                let realisation = Realisation {
                    id,
                    out_path: built.path.clone(),
                    signatures: built.signatures.clone(),
                    dependent_realisations: built.dependent_realisations.clone(),
                };
                Ok((name, realisation))
            })
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

    /// The realisation-JSON layout as Nix 2.8 … 2.34 write it; an output without an id gets
    /// Nix's placeholder id, as Nix ≥ 2.35 servers write it. Output names that cannot be in an
    /// id (none a decoder accepts) are left out.
    fn encode_realisation_json_map(&self, w: &mut Vec<u8>) {
        let entries: Vec<Realisation> = self
            .built_outputs
            .iter()
            .filter_map(|(name, out)| {
                let id = match &out.id {
                    Some(id) => id.clone(),
                    None => DrvOutput::dummy(name).ok()?,
                };
                Some(Realisation {
                    id,
                    out_path: out.path.clone(),
                    signatures: out.signatures.clone(),
                    dependent_realisations: out.dependent_realisations.clone(),
                })
            })
            .collect();
        w.put_u64(entries.len() as u64);
        for r in &entries {
            w.put_str(&r.id.to_string());
            w.put_str(&r.to_json());
        }
    }
}

/// `map<outputName, (outPath, sigs)>`: serve ≥ 2.8 and worker with `realisation-with-path-not-hash`.
fn decode_output_map(r: &mut Reader<'_>) -> wire::Result<BTreeMap<String, BuiltOutput>> {
    let entries = r.list("built outputs", |r| {
        let name = r.string("output name")?;
        check_output_name(&name).map_err(|e| Invalid::Malformed(format!("built outputs: {e}")))?;
        let path = read_store_path(r, "built output path")?;
        let signatures = read_string_set(r, "realisation signatures")?;
        Ok((
            name,
            BuiltOutput {
                signatures,
                ..BuiltOutput::new(path)
            },
        ))
    })?;
    collect_outputs(entries)
}

/// `map<"sha256:<hex>!<output>", realisation JSON>`: serve 2.6–2.7 and worker ≥ 1.28. The key
/// must be the realisation's own id.
fn decode_realisation_json_map(
    r: &mut Reader<'_>,
    store_dir: &str,
) -> wire::Result<BTreeMap<String, BuiltOutput>> {
    let entries = r.list("built outputs", |r| {
        let key = r.str("realisation id")?;
        let json = r.str("realisation")?;
        let bad = |why: String| Invalid::Malformed(format!("built output '{key}': {why}"));
        let id = DrvOutput::parse(key).map_err(|e| bad(e.to_string()))?;
        let realisation =
            Realisation::from_json(json, store_dir).map_err(|e| bad(e.to_string()))?;
        if realisation.id != id {
            return Err(bad(format!("its realisation's id is '{}'", realisation.id)).into());
        }
        Ok((id.output_name().to_owned(), BuiltOutput::from(realisation)))
    })?;
    collect_outputs(entries)
}

/// The entries as a map; an output named twice is [`Invalid`] (one would be lost).
fn collect_outputs(
    entries: Vec<(String, BuiltOutput)>,
) -> wire::Result<BTreeMap<String, BuiltOutput>> {
    let mut map = BTreeMap::new();
    for (name, out) in entries {
        if map.contains_key(&name) {
            return Err(DecodeError::malformed(format!(
                "built outputs: output '{name}' is listed twice"
            )));
        }
        map.insert(name, out);
    }
    Ok(map)
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
    use crate::realisation::tests::arb_drv_output;
    use proptest::prelude::*;

    /// A built output named `name`: with or without an id (for that output name), signatures
    /// and dependencies.
    fn arb_built_output(name: String) -> impl Strategy<Value = (String, BuiltOutput)> {
        (
            arb_path(),
            proptest::collection::btree_set("[a-z]{1,5}-1:[A-Za-z0-9]{4,10}", 0..3),
            proptest::option::of(proptest::array::uniform32(any::<u8>())),
            proptest::collection::btree_map(arb_drv_output(), arb_path(), 0..2),
        )
            .prop_map(move |(path, signatures, hash, deps)| {
                let id = hash.map(|h| DrvOutput::from_sha256(&h, &name).expect("a valid id"));
                let out = BuiltOutput {
                    path,
                    signatures,
                    // Dependencies only travel with an id.
                    dependent_realisations: if id.is_some() { deps } else { BTreeMap::new() },
                    id,
                };
                (name.clone(), out)
            })
    }

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
            proptest::collection::btree_set("[a-z]{1,6}", 0..3)
                .prop_flat_map(|names| names.into_iter().map(arb_built_output).collect::<Vec<_>>()),
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
                built_outputs: outs.into_iter().collect(),
            })
    }

    /// What survives a trip through a protocol version that drops some fields: the times, the
    /// CPU times, and the built outputs as `outputs` carries them (ids and dependencies only in
    /// the realisation-JSON layout).
    pub(crate) fn carried(
        res: &BuildResult,
        times: bool,
        cpu: bool,
        outputs: BuiltOutputsLayout,
    ) -> BuildResult {
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
        match outputs {
            BuiltOutputsLayout::Absent => r.built_outputs.clear(),
            BuiltOutputsLayout::RealisationJson => {}
            BuiltOutputsLayout::PathAndSignatures => {
                for out in r.built_outputs.values_mut() {
                    out.id = None;
                    out.dependent_realisations.clear();
                }
            }
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
    fn bad_built_outputs_are_invalid() {
        let hex = "4ad3".repeat(16);
        let base = path(4, "x").base_name().to_owned();
        let json = |id: &str| {
            format!(
                r#"{{"dependentRealisations":{{}},"id":"{id}","outPath":"{base}","signatures":[]}}"#
            )
        };
        let good = format!("sha256:{hex}!out");
        for (key, json, why) in [
            ("sha256:00".to_owned(), json(&good), "no '!<output>'"),
            (
                format!("sha256:{hex}!"),
                json(&good),
                "the output name is empty",
            ),
            (
                good.clone(),
                r#"{"outPath":5}"#.to_owned(),
                "not a realisation JSON object",
            ),
            (
                good.clone(),
                "not json".to_owned(),
                "not a realisation JSON object",
            ),
            (
                good.clone(),
                format!(r#"{{"id":"{good}","outPath":"not-a-store-path"}}"#),
                "bad hash part",
            ),
            (
                good.clone(),
                r#"{"signatures":[]}"#.to_owned(),
                "missing field",
            ),
            (
                good.clone(),
                json(&format!("sha256:{hex}!dev")),
                "its realisation's id is",
            ),
        ] {
            let mut w = Vec::new();
            w.put_u64(1);
            w.put_str(&key);
            w.put_str(&json);
            let e = decode_realisation_json_map(&mut Reader::new(&w), "/nix/store").unwrap_err();
            assert!(matches!(e, DecodeError::Invalid(_)), "{key} {json}: {e:?}");
            assert!(e.to_string().contains(why), "{key} {json}: {e}");
        }
        // The same output twice, in either layout.
        let mut w = Vec::new();
        w.put_u64(2);
        for _ in 0..2 {
            w.put_str(&good);
            w.put_str(&json(&good));
        }
        let e = decode_realisation_json_map(&mut Reader::new(&w), "/nix/store").unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
        let mut w = Vec::new();
        w.put_u64(2);
        for _ in 0..2 {
            w.put_str("out");
            w.put_str(path(4, "x").as_str());
            w.put_u64(0);
        }
        let e = decode_output_map(&mut Reader::new(&w)).unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
    }

    /// The realisations of a resolved CA derivation: ids computed from it, paths from the
    /// result; a result that does not fit the derivation is refused.
    #[test]
    fn realisations_of_a_resolved_derivation() {
        let aterm = br#"Derive([("dev","","r:sha256",""),("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",[],[("dev","/d"),("out","/o")])"#;
        let drv = Derivation::parse(aterm).unwrap();
        let ids = drv.floating_output_ids().unwrap();
        let mut res = BuildResult::new(BuildStatus::Built, "");
        res.built_outputs
            .insert("out".into(), BuiltOutput::new(path(1, "o")));
        let mut dev = BuiltOutput::new(path(2, "d"));
        dev.id = Some(ids["dev"].clone());
        dev.signatures.insert("k-1:AAAA".into());
        res.built_outputs.insert("dev".into(), dev);
        let got = res.realisations_of(&drv).unwrap();
        assert_eq!(
            got["out"].id, ids["out"],
            "computed when the remote gave none"
        );
        assert_eq!(got["out"].out_path, path(1, "o"));
        assert_eq!(got["dev"].signatures.len(), 1);

        let mut wrong = res.clone();
        wrong.built_outputs.get_mut("out").unwrap().id = Some(ids["dev"].clone());
        assert!(matches!(
            wrong.realisations_of(&drv),
            Err(RealisationsError::IdMismatch { ref output, .. }) if output == "out"
        ));
        let mut missing = res.clone();
        missing.built_outputs.remove("dev");
        assert_eq!(
            missing.realisations_of(&drv),
            Err(RealisationsError::Missing {
                output: "dev".into()
            })
        );
        let mut extra = res.clone();
        extra
            .built_outputs
            .insert("lib".into(), BuiltOutput::new(path(3, "l")));
        assert!(matches!(
            extra.realisations_of(&drv),
            Err(RealisationsError::Unexpected { .. })
        ));
        let mut unresolved = drv.clone();
        unresolved
            .input_drvs
            .insert(path(4, "x.drv").to_string(), ["out".to_owned()].into());
        assert_eq!(
            res.realisations_of(&unresolved),
            Err(RealisationsError::NotResolvedCa)
        );
    }

    /// The id a realisation-JSON layout carries is kept, Nix's placeholder id is not, and the
    /// realisation to register comes back whole.
    #[test]
    fn built_outputs_keep_their_realisation() {
        let out = path(4, "caA");
        let id = DrvOutput::parse(&format!("sha256:{}!out", "4ad3".repeat(16))).unwrap();
        let r = Realisation {
            id: id.clone(),
            out_path: out.clone(),
            signatures: ["k-1:AAAA".to_owned()].into(),
            dependent_realisations: BTreeMap::new(),
        };
        let mut res = BuildResult::new(BuildStatus::Built, "");
        res.built_outputs
            .insert("out".into(), BuiltOutput::from(r.clone()));
        res.built_outputs
            .insert("dev".into(), BuiltOutput::new(path(5, "caA-dev")));
        let mut w = Vec::new();
        res.encode(&mut w, SERVE_2_7);
        let got = BuildResult::decode(&mut Reader::new(&w), SERVE_2_7, "/nix/store").unwrap();
        assert_eq!(got.built_outputs["out"].id.as_ref(), Some(&id));
        assert_eq!(
            got.built_outputs["dev"].id, None,
            "the placeholder id is no id"
        );
        assert_eq!(
            got.realisations().into_iter().collect::<Vec<_>>(),
            [("out", r)]
        );
        assert!(String::from_utf8_lossy(&w).contains(&format!("sha256:{}!dev", "0".repeat(64))));
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
            prop_assert_eq!(got, carried(&res, layout.times, layout.cpu_times, layout.outputs));
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
