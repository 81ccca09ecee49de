//! The build operations (docs/protocol.md §8.3): SetOptions with the per-connection settings,
//! BuildDerivation and BuildPathsWithResults, and the BuildResult replies in the layout the
//! connection negotiated.
//!
//! Must never decide what to build or what a result's status means: the caller does.

use crate::build_result::BuildResult;
use crate::derivation::BasicDerivation;
use crate::path_info::DerivedPath;
use crate::store_path::StorePath;
use crate::version::ProtocolVersion;
use crate::wire::{self, Invalid, Reader, WireWrite};

use super::Op;
use super::handshake::{Negotiated, Unsupported, require};

/// The settings SetOptions (op 19) carries: the per-connection options a client may set. A
/// trusted client's `overrides` may name any setting (`timeout`, `max-build-log-size`, …).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientOptions {
    pub keep_failed: bool,
    pub keep_going: bool,
    pub try_fallback: bool,
    /// Verbosity of the messages the daemon sends us (0 = errors only).
    pub verbosity: u64,
    pub max_build_jobs: u64,
    /// Seconds; 0 = none.
    pub max_silent_time: u64,
    /// Whether build output is also printed as log messages (`STDERR_NEXT`).
    pub verbose_build: bool,
    pub build_cores: u64,
    pub use_substitutes: bool,
    pub overrides: Vec<(String, String)>,
}

/// SetOptions (op 19). No reply data after `STDERR_LAST`.
pub fn encode_set_options(w: &mut Vec<u8>, proto: &Negotiated, o: &ClientOptions) {
    w.put_u64(Op::SetOptions.code());
    w.put_bool(o.keep_failed);
    w.put_bool(o.keep_going);
    w.put_bool(o.try_fallback);
    w.put_u64(o.verbosity);
    w.put_u64(o.max_build_jobs);
    w.put_u64(o.max_silent_time.min(u32::MAX as u64));
    w.put_u64(1); // obsolete useBuildHook
    // The daemon sets verboseBuild iff this is lvlError (0); Nix sends lvlVomit (7) otherwise.
    w.put_u64(if o.verbose_build { 0 } else { 7 });
    w.put_u64(0); // obsolete logType
    w.put_u64(0); // obsolete printBuildTrace
    w.put_u64(o.build_cores);
    w.put_bool(o.use_substitutes);
    if proto.at_least(1, 12) {
        w.put_u64(o.overrides.len() as u64);
        for (k, v) in &o.overrides {
            w.put_str(k);
            w.put_str(v);
        }
    }
}

/// How to build (worker `BuildMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BuildMode {
    #[default]
    Normal,
    Repair,
    Check,
}

impl BuildMode {
    pub fn code(self) -> u64 {
        match self {
            BuildMode::Normal => 0,
            BuildMode::Repair => 1,
            BuildMode::Check => 2,
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> wire::Result<Self> {
        match r.u64()? {
            0 => Ok(BuildMode::Normal),
            1 => Ok(BuildMode::Repair),
            2 => Ok(BuildMode::Check),
            v => Err(Invalid::OutOfRange {
                what: "build mode",
                value: v,
            }
            .into()),
        }
    }
}

/// BuildDerivation (op 36). An untrusted daemon refuses input-addressed derivations. Reply:
/// [`decode_build_result`].
pub fn encode_build_derivation(
    w: &mut Vec<u8>,
    drv_path: &StorePath,
    drv: &BasicDerivation,
    mode: BuildMode,
) {
    w.put_u64(Op::BuildDerivation.code());
    w.put_str(drv_path.as_str());
    drv.encode(w);
    w.put_u64(mode.code());
}

/// A BuildResult for the negotiated protocol; `store_dir` (normally `/nix/store`) completes the
/// basenames of the realisation-JSON layout.
pub fn decode_build_result(
    r: &mut Reader<'_>,
    proto: &Negotiated,
    store_dir: &str,
) -> wire::Result<BuildResult> {
    BuildResult::decode(r, proto.build_result_layout(), store_dir)
}

/// BuildPathsWithResults (op 46, ≥ 1.34). Reply: [`decode_build_paths_with_results_reply`].
pub fn encode_build_paths_with_results(
    w: &mut Vec<u8>,
    proto: &Negotiated,
    paths: &[DerivedPath],
    mode: BuildMode,
) -> Result<(), Unsupported> {
    require(proto, "BuildPathsWithResults", ProtocolVersion::new(1, 34))?;
    w.put_u64(Op::BuildPathsWithResults.code());
    w.put_strings(paths.iter().map(DerivedPath::to_worker_string));
    w.put_u64(mode.code());
    Ok(())
}

/// The BuildPathsWithResults reply: one `(derived path, result)` per requested path.
pub fn decode_build_paths_with_results_reply(
    r: &mut Reader<'_>,
    proto: &Negotiated,
    store_dir: &str,
) -> wire::Result<Vec<(DerivedPath, BuildResult)>> {
    r.list("build results", |r| {
        let path = DerivedPath::read(r)?;
        let res = BuildResult::decode(r, proto.build_result_layout(), store_dir)?;
        Ok((path, res))
    })
}
