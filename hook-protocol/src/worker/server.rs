//! The daemon's side of the worker protocol: what a `nix-daemon` reads and writes. For stand-in
//! peers (fault-injection tests), round-trip tests and fuzzing; a real hook never needs it, so
//! it is built only with the cargo feature `server` (and in this crate's own tests).
//!
//! Must never be used by the hook itself, and must stay the exact inverse of the client codecs.

use std::collections::BTreeSet;

use crate::build_result::BuildResult;
use crate::derivation::BasicDerivation;
use crate::path_info::{DerivedPath, PathInfo, put_store_paths, read_store_path, read_string_set};
use crate::realisation::{DrvOutput, Realisation};
use crate::store_path::StorePath;
use crate::version::{self, ProtocolVersion};
use crate::wire::{self, Invalid, Reader, WireWrite};

use super::*;

/// Decodes the client's greeting (`MAGIC_1, version`) and returns the client's version.
pub fn decode_client_hello(r: &mut Reader<'_>) -> wire::Result<ProtocolVersion> {
    r.expect_u64("the nix-daemon client greeting", MAGIC_1)?;
    ProtocolVersion::decode(r, "worker protocol version")
}

pub fn encode_server_hello(w: &mut Vec<u8>, server: ProtocolVersion) {
    version::encode_greeting(w, MAGIC_2, server);
}

/// Decodes the client's step 3 and returns its features.
pub fn decode_after_hello(
    r: &mut Reader<'_>,
    version: ProtocolVersion,
) -> wire::Result<BTreeSet<String>> {
    let features = if version >= FEATURES_SINCE {
        read_string_set(r, "client features")?
    } else {
        BTreeSet::new()
    };
    if version >= ProtocolVersion::new(1, 14) && r.bool()? {
        let _affinity = r.u64()?;
    }
    if version >= ProtocolVersion::new(1, 11) {
        let _reserve_space = r.u64()?;
    }
    Ok(features)
}

/// The daemon's step 4 (not including the stderr loop after it).
pub fn encode_server_info(w: &mut Vec<u8>, version: ProtocolVersion, info: &ServerInfo) {
    if version >= FEATURES_SINCE {
        w.put_strings(&info.server_features);
    }
    if version >= ProtocolVersion::new(1, 33) {
        w.put_str(info.nix_version.as_deref().unwrap_or(""));
    }
    if version >= ProtocolVersion::new(1, 35) {
        w.put_u64(match info.trust {
            None => 0,
            Some(Trust::Trusted) => 1,
            Some(Trust::NotTrusted) => 2,
        });
    }
}

fn put_fields(w: &mut Vec<u8>, fields: &[Field]) {
    w.put_u64(fields.len() as u64);
    for f in fields {
        match f {
            Field::Int(v) => {
                w.put_u64(0);
                w.put_u64(*v);
            }
            Field::Str(s) => {
                w.put_u64(1);
                w.put_str(s);
            }
        }
    }
}

/// Appends one stderr-loop message in the layout of the negotiated version.
pub fn encode_stderr(w: &mut Vec<u8>, proto: &Negotiated, msg: &StderrMessage) {
    match msg {
        StderrMessage::Next(s) => {
            w.put_u64(STDERR_NEXT);
            w.put_str(s);
        }
        StderrMessage::StartActivity(a) => {
            w.put_u64(STDERR_START_ACTIVITY);
            w.put_u64(a.id);
            w.put_u64(a.level);
            w.put_u64(a.activity_type);
            w.put_str(&a.text);
            put_fields(w, &a.fields);
            w.put_u64(a.parent);
        }
        StderrMessage::StopActivity { id } => {
            w.put_u64(STDERR_STOP_ACTIVITY);
            w.put_u64(*id);
        }
        StderrMessage::Result(res) => {
            w.put_u64(STDERR_RESULT);
            w.put_u64(res.id);
            w.put_u64(res.result_type);
            put_fields(w, &res.fields);
        }
        StderrMessage::Read { max } => {
            w.put_u64(STDERR_READ);
            w.put_u64(*max);
        }
        StderrMessage::Write(data) => {
            w.put_u64(STDERR_WRITE);
            w.put_bytes(data);
        }
        StderrMessage::Last => w.put_u64(STDERR_LAST),
        StderrMessage::Error(e) => {
            w.put_u64(STDERR_ERROR);
            if proto.at_least(1, 26) {
                w.put_str("Error");
                w.put_u64(e.level.unwrap_or(0));
                w.put_str("Error");
                w.put_str(&e.message);
                w.put_u64(0);
                w.put_u64(e.traces.len() as u64);
                for t in &e.traces {
                    w.put_u64(0);
                    w.put_str(t);
                }
            } else {
                w.put_str(&e.message);
                w.put_u64(e.exit_status.unwrap_or(1));
            }
        }
    }
}

/// A worker operation with its arguments, as a daemon decodes it. After
/// [`OpRequest::AddToStoreNar`] and [`OpRequest::AddMultipleToStore`] the data follows as
/// [`nar_upload`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpRequest {
    IsValidPath(StorePath),
    SetOptions(ClientOptions),
    QueryPathInfo(StorePath),
    QueryValidPaths {
        paths: BTreeSet<StorePath>,
        substitute: bool,
    },
    BuildDerivation {
        drv_path: StorePath,
        drv: BasicDerivation,
        mode: BuildMode,
    },
    NarFromPath(StorePath),
    AddToStoreNar {
        info: PathInfo,
        repair: bool,
        dont_check_sigs: bool,
    },
    AddMultipleToStore {
        repair: bool,
        dont_check_sigs: bool,
    },
    BuildPathsWithResults {
        paths: Vec<DerivedPath>,
        mode: BuildMode,
    },
    /// Below 1.31 the request carries no signatures or dependencies: they come back empty.
    RegisterDrvOutput(Realisation),
    QueryRealisation(DrvOutput),
}

/// What a daemon reads for SetOptions (the inverse of [`encode_set_options`]).
pub fn decode_set_options(r: &mut Reader<'_>, proto: &Negotiated) -> wire::Result<ClientOptions> {
    let keep_failed = r.bool()?;
    let keep_going = r.bool()?;
    let try_fallback = r.bool()?;
    let verbosity = r.u64()?;
    let max_build_jobs = r.u64()?;
    let max_silent_time = r.u64()?;
    let _use_build_hook = r.u64()?;
    let verbose_build = r.u64()? == 0;
    let _log_type = r.u64()?;
    let _print_build_trace = r.u64()?;
    let build_cores = r.u64()?;
    let use_substitutes = r.bool()?;
    let overrides = if proto.at_least(1, 12) {
        r.list("setting overrides", |r| {
            Ok((r.string("name")?, r.string("value")?))
        })?
    } else {
        Vec::new()
    };
    Ok(ClientOptions {
        keep_failed,
        keep_going,
        try_fallback,
        verbosity,
        max_build_jobs,
        max_silent_time,
        verbose_build,
        build_cores,
        use_substitutes,
        overrides,
    })
}

/// Decodes one request (only the operations a hook sends). `store_dir` (normally `/nix/store`)
/// completes the base names a realisation carries.
pub fn decode_request(
    r: &mut Reader<'_>,
    proto: &Negotiated,
    store_dir: &str,
) -> wire::Result<OpRequest> {
    let op = r.code("worker operation", Op::from_code)?;
    Ok(match op {
        Op::IsValidPath => OpRequest::IsValidPath(read_store_path(r, "path")?),
        Op::SetOptions => OpRequest::SetOptions(decode_set_options(r, proto)?),
        Op::QueryPathInfo => OpRequest::QueryPathInfo(read_store_path(r, "path")?),
        Op::QueryValidPaths => OpRequest::QueryValidPaths {
            paths: decode_path_set(r)?,
            substitute: proto.at_least(1, 27) && r.bool()?,
        },
        Op::BuildDerivation => OpRequest::BuildDerivation {
            drv_path: read_store_path(r, "derivation path")?,
            drv: BasicDerivation::decode(r)?,
            mode: BuildMode::decode(r)?,
        },
        Op::NarFromPath => OpRequest::NarFromPath(read_store_path(r, "path")?),
        Op::AddToStoreNar => OpRequest::AddToStoreNar {
            info: PathInfo::decode_for_upload(r)?,
            repair: r.bool()?,
            dont_check_sigs: r.bool()?,
        },
        Op::AddMultipleToStore => OpRequest::AddMultipleToStore {
            repair: r.bool()?,
            dont_check_sigs: r.bool()?,
        },
        Op::BuildPathsWithResults => OpRequest::BuildPathsWithResults {
            paths: r.list("derived paths", DerivedPath::read)?,
            mode: BuildMode::decode(r)?,
        },
        // Below 1.27 these do not exist, and under realisation-with-path-not-hash they have
        // another layout: both are Invalid, as the client refuses to write them.
        Op::RegisterDrvOutput => {
            realisation_layout(proto, "RegisterDrvOutput")?;
            OpRequest::RegisterDrvOutput(decode_register_drv_output(r, proto, store_dir)?)
        }
        Op::QueryRealisation => {
            realisation_layout(proto, "QueryRealisation")?;
            OpRequest::QueryRealisation(read_drv_output(r)?)
        }
    })
}

fn realisation_layout(proto: &Negotiated, what: &'static str) -> wire::Result<()> {
    super::realisations::gate(proto, what).map_err(|e| Invalid::Malformed(e.to_string()).into())
}

fn read_drv_output(r: &mut Reader<'_>) -> wire::Result<DrvOutput> {
    DrvOutput::parse(r.str("derivation output id")?)
        .map_err(|e| Invalid::Malformed(e.to_string()).into())
}

/// RegisterDrvOutput's argument (the inverse of [`encode_register_drv_output`]).
fn decode_register_drv_output(
    r: &mut Reader<'_>,
    proto: &Negotiated,
    store_dir: &str,
) -> wire::Result<Realisation> {
    let invalid = |e: crate::realisation::RealisationError| Invalid::Malformed(e.to_string());
    if proto.version >= REALISATION_JSON_SINCE {
        return Ok(Realisation::from_json(r.str("realisation")?, store_dir).map_err(invalid)?);
    }
    let id = read_drv_output(r)?;
    let base = r.str("realisation path")?;
    let out_path = crate::realisation::path_from_base_name(store_dir, base)
        .map_err(|e| Invalid::Malformed(format!("realisation path: {e}")))?;
    Ok(Realisation {
        id,
        out_path,
        signatures: BTreeSet::new(),
        dependent_realisations: Default::default(),
    })
}

/// The QueryRealisation reply (after `STDERR_LAST`): a set of zero or one realisation, as JSON
/// from 1.31, as its out path before.
pub fn encode_query_realisation_reply(
    w: &mut Vec<u8>,
    proto: &Negotiated,
    found: Option<&Realisation>,
) {
    w.put_u64(found.is_some() as u64);
    if let Some(r) = found {
        if proto.version >= REALISATION_JSON_SINCE {
            w.put_str(&r.to_json());
        } else {
            w.put_str(r.out_path.as_str());
        }
    }
}

/// The QueryPathInfo reply (after `STDERR_LAST`). Below 1.17 an invalid path must be sent as
/// an error instead; `None` then writes nothing.
pub fn encode_query_path_info_reply(w: &mut Vec<u8>, proto: &Negotiated, info: Option<&PathInfo>) {
    if proto.at_least(1, 17) {
        w.put_bool(info.is_some());
    }
    if let Some(info) = info {
        info.encode_unkeyed_worker(w, proto.at_least(1, 16));
    }
}

pub fn encode_path_set<'a>(w: &mut Vec<u8>, paths: impl IntoIterator<Item = &'a StorePath>) {
    put_store_paths(w, paths);
}

/// A BuildResult (the BuildDerivation reply, and each BuildPathsWithResults entry).
pub fn encode_build_result(w: &mut Vec<u8>, proto: &Negotiated, res: &BuildResult) {
    res.encode(w, proto.build_result_layout());
}

/// The BuildPathsWithResults reply.
pub fn encode_build_paths_with_results_reply(
    w: &mut Vec<u8>,
    proto: &Negotiated,
    results: &[(DerivedPath, BuildResult)],
) {
    w.put_u64(results.len() as u64);
    for (path, res) in results {
        w.put_str(&path.to_worker_string());
        encode_build_result(w, proto, res);
    }
}
