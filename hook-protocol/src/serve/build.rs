//! The serve build commands (docs/protocol.md §7, §7.2): BuildDerivation and BuildPaths with
//! their [`BuildOptions`], and the BuildResult layout each version uses.
//!
//! Must never decide what to build or what a result's status means: the caller does.

use crate::build_result::{BuildResult, BuildResultLayout, BuiltOutputsLayout};
use crate::derivation::BasicDerivation;
use crate::path_info::DerivedPath;
use crate::store_path::StorePath;
use crate::version::ProtocolVersion;
use crate::wire::{self, Reader, WireWrite};

use super::Command;

/// The `--max-silent-time`, `--timeout`, … settings sent with every build (docs/protocol.md §7).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BuildOptions {
    /// Seconds; 0 = none. Nix reads it as a 32-bit value: larger values are clamped.
    pub max_silent_time: u64,
    /// Seconds; 0 = none. Clamped to 32 bits like `max_silent_time`.
    pub build_timeout: u64,
    /// Bytes; 0 = none (serve ≥ 2.2).
    pub max_log_size: u64,
    /// Extra rounds (serve ≥ 2.3). Servers from Nix 2.35 on reject anything but 0.
    pub nr_repeats: u64,
    /// Serve ≥ 2.3; current Nix clients send false.
    pub enforce_determinism: bool,
    /// Serve ≥ 2.7.
    pub keep_failed: bool,
}

impl BuildOptions {
    pub fn encode(&self, w: &mut Vec<u8>, version: ProtocolVersion) {
        let u32_clamp = |v: u64| v.min(u32::MAX as u64);
        w.put_u64(u32_clamp(self.max_silent_time));
        w.put_u64(u32_clamp(self.build_timeout));
        if version >= ProtocolVersion::new(2, 2) {
            w.put_u64(self.max_log_size);
        }
        if version >= ProtocolVersion::new(2, 3) {
            w.put_u64(u32_clamp(self.nr_repeats));
            w.put_bool(self.enforce_determinism);
        }
        if version >= ProtocolVersion::new(2, 7) {
            w.put_bool(self.keep_failed);
        }
    }

    /// What a server reads (for stand-in peers and tests).
    #[cfg(any(test, feature = "server"))]
    pub fn decode(r: &mut Reader<'_>, version: ProtocolVersion) -> wire::Result<Self> {
        let max = u32::MAX as u64;
        let mut o = BuildOptions {
            max_silent_time: r.u64_max("maxSilentTime", max)?,
            build_timeout: r.u64_max("buildTimeout", max)?,
            ..Default::default()
        };
        if version >= ProtocolVersion::new(2, 2) {
            o.max_log_size = r.u64()?;
        }
        if version >= ProtocolVersion::new(2, 3) {
            o.nr_repeats = r.u64_max("nrRepeats", max)?;
            o.enforce_determinism = r.bool()?;
        }
        if version >= ProtocolVersion::new(2, 7) {
            o.keep_failed = r.bool()?;
        }
        Ok(o)
    }
}

/// BuildDerivation (cmd 8): build `drv` (the remote needs its inputs, not the `.drv` file).
/// Reply: [`decode_build_derivation_reply`]. The build log arrives on the server's stderr.
pub fn encode_build_derivation(
    w: &mut Vec<u8>,
    version: ProtocolVersion,
    drv_path: &StorePath,
    drv: &BasicDerivation,
    options: &BuildOptions,
) {
    w.put_u64(Command::BuildDerivation.code());
    w.put_str(drv_path.as_str());
    drv.encode(w);
    options.encode(w, version);
}

/// The BuildDerivation reply; `store_dir` (normally `/nix/store`) completes the basenames the
/// 2.6–2.7 layout carries.
pub fn decode_build_derivation_reply(
    r: &mut Reader<'_>,
    version: ProtocolVersion,
    store_dir: &str,
) -> wire::Result<BuildResult> {
    BuildResult::decode(r, build_result_layout(version), store_dir)
}

/// How a BuildResult is laid out at serve `version`: times from 2.3, the built outputs as
/// realisation JSON in 2.6–2.7 and as `(path, signatures)` from 2.8, never CPU times.
///
/// Note: a Nix 2.8–2.34 *server* sends the 2.6+ built-outputs map whatever the client announced
/// (it gates on `clientVersion >= 6` with a misplaced parenthesis), so never negotiate below 2.6
/// with such a server: announcing 2.7 avoids it.
pub fn build_result_layout(version: ProtocolVersion) -> BuildResultLayout {
    BuildResultLayout {
        times: version >= ProtocolVersion::new(2, 3),
        cpu_times: false,
        outputs: if version >= ProtocolVersion::new(2, 8) {
            BuiltOutputsLayout::PathAndSignatures
        } else if version >= ProtocolVersion::new(2, 6) {
            BuiltOutputsLayout::RealisationJson
        } else {
            BuiltOutputsLayout::Absent
        },
    }
}

/// BuildPaths (cmd 6): build (or substitute) these paths on the remote. Reply:
/// [`decode_build_paths_reply`].
pub fn encode_build_paths(
    w: &mut Vec<u8>,
    version: ProtocolVersion,
    paths: &[DerivedPath],
    options: &BuildOptions,
) {
    w.put_u64(Command::BuildPaths.code());
    w.put_strings(paths.iter().map(DerivedPath::to_serve_string));
    options.encode(w, version);
}

/// A failed BuildPaths: Nix sends the error's exit status (e.g. 1, or 100 for a build failure)
/// and its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("remote build failed with status {status}: {message}")]
pub struct BuildPathsFailure {
    pub status: u64,
    pub message: String,
}

/// The BuildPaths reply: `u64 0`, or `u64 status, string message`.
pub fn decode_build_paths_reply(r: &mut Reader<'_>) -> wire::Result<Result<(), BuildPathsFailure>> {
    let status = r.u64()?;
    if status == 0 {
        return Ok(Ok(()));
    }
    let message = r.text()?;
    Ok(Err(BuildPathsFailure { status, message }))
}
