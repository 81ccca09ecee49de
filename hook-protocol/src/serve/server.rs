//! The server's side of the serve protocol: what `nix-store --serve` reads and writes. For
//! stand-in peers (fault-injection tests), round-trip tests and fuzzing; a real hook never needs
//! it, so it is built only with the cargo feature `server` (and in this crate's own tests).
//!
//! Must never be used by the hook itself, and must stay the exact inverse of the client codecs.

use std::collections::BTreeSet;

use crate::build_result::BuildResult;
use crate::derivation::BasicDerivation;
use crate::path_info::{
    DerivedPath, PathInfo, put_opt_store_path, put_store_paths, read_opt_store_path,
    read_store_path, read_store_path_set,
};
use crate::store_path::StorePath;
use crate::version::{self, ProtocolVersion};
use crate::wire::{self, Invalid, Reader, WireWrite};

use super::*;

/// Decodes the client greeting and returns the client's version.
pub fn decode_hello(r: &mut Reader<'_>) -> wire::Result<ProtocolVersion> {
    r.expect_u64("the serve client greeting", MAGIC_1)?;
    ProtocolVersion::decode(r, "serve protocol version")
}

/// Appends the server greeting.
pub fn encode_hello(w: &mut Vec<u8>, server: ProtocolVersion) {
    version::encode_greeting(w, MAGIC_2, server);
}

/// A serve command with its arguments, as a server decodes it. For
/// [`CommandRequest::ImportPaths`] the export stream follows; for
/// [`CommandRequest::AddToStoreNar`] `nar_size` bytes of NAR follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandRequest {
    QueryValidPaths {
        lock: bool,
        substitute: bool,
        paths: BTreeSet<StorePath>,
    },
    QueryPathInfos(BTreeSet<StorePath>),
    DumpStorePath(StorePath),
    ImportPaths,
    ExportPaths(BTreeSet<StorePath>),
    BuildPaths {
        paths: Vec<DerivedPath>,
        options: BuildOptions,
    },
    QueryClosure {
        include_outputs: bool,
        paths: BTreeSet<StorePath>,
    },
    BuildDerivation {
        drv_path: StorePath,
        drv: BasicDerivation,
        options: BuildOptions,
    },
    AddToStoreNar(PathInfo),
}

/// Decodes one request, gated on the negotiated version.
pub fn decode_request(
    r: &mut Reader<'_>,
    version: ProtocolVersion,
) -> wire::Result<CommandRequest> {
    let cmd = r.code("serve command", Command::from_code)?;
    Ok(match cmd {
        Command::QueryValidPaths => CommandRequest::QueryValidPaths {
            lock: r.bool()?,
            substitute: r.bool()?,
            paths: decode_path_set(r)?,
        },
        Command::QueryPathInfos => CommandRequest::QueryPathInfos(decode_path_set(r)?),
        Command::DumpStorePath => CommandRequest::DumpStorePath(read_store_path(r, "path")?),
        Command::ImportPaths => CommandRequest::ImportPaths,
        Command::ExportPaths => {
            let _obsolete = r.u64()?;
            CommandRequest::ExportPaths(decode_path_set(r)?)
        }
        Command::BuildPaths => CommandRequest::BuildPaths {
            paths: r.list("paths to build", DerivedPath::read)?,
            options: BuildOptions::decode(r, version)?,
        },
        Command::QueryClosure => CommandRequest::QueryClosure {
            include_outputs: r.bool()?,
            paths: decode_path_set(r)?,
        },
        Command::BuildDerivation => CommandRequest::BuildDerivation {
            drv_path: read_store_path(r, "derivation path")?,
            drv: BasicDerivation::decode(r)?,
            options: BuildOptions::decode(r, version)?,
        },
        Command::AddToStoreNar => CommandRequest::AddToStoreNar(PathInfo::decode_for_upload(r)?),
    })
}

/// Export stream: `Some(())` when a NAR follows, `None` at the end marker.
pub fn decode_export_item_start(r: &mut Reader<'_>) -> wire::Result<Option<()>> {
    match r.u64()? {
        0 => Ok(None),
        1 => Ok(Some(())),
        v => Err(Invalid::OutOfRange {
            what: "export stream item marker",
            value: v,
        }
        .into()),
    }
}

/// One export item's trailer after its NAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTrailer {
    pub path: StorePath,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
}

pub fn decode_export_item_end(r: &mut Reader<'_>) -> wire::Result<ExportTrailer> {
    r.expect_u64("export marker NIXE", EXPORT_MAGIC)?;
    let path = read_store_path(r, "exported path")?;
    let references = read_store_path_set(r, "references")?;
    let deriver = read_opt_store_path(r, "deriver")?;
    if r.bool()? {
        let _legacy_signature = r.bytes()?;
    }
    Ok(ExportTrailer {
        path,
        references,
        deriver,
    })
}

/// The reply to QueryValidPaths and QueryClosure.
pub fn encode_path_set<'a>(w: &mut Vec<u8>, paths: impl IntoIterator<Item = &'a StorePath>) {
    put_store_paths(w, paths);
}

/// The QueryPathInfos reply (≥ 2.4 layout with hash, CA and signatures).
pub fn encode_path_infos(w: &mut Vec<u8>, version: ProtocolVersion, infos: &[PathInfo]) {
    for info in infos {
        w.put_str(info.path.as_str());
        put_opt_store_path(w, info.deriver.as_ref());
        put_store_paths(w, &info.references);
        w.put_u64(info.nar_size);
        w.put_u64(info.nar_size);
        if version >= ProtocolVersion::new(2, 4) {
            w.put_str(&info.nar_hash.to_prefixed_nix32());
            w.put_str(info.ca.as_deref().unwrap_or(""));
            w.put_strings(&info.sigs);
        }
    }
    w.put_str("");
}

/// The `u64 1` success marker.
pub fn encode_ok(w: &mut Vec<u8>) {
    w.put_u64(1);
}

/// The BuildDerivation reply.
pub fn encode_build_derivation_reply(w: &mut Vec<u8>, version: ProtocolVersion, res: &BuildResult) {
    res.encode(w, build_result_layout(version));
}

pub fn encode_build_paths_reply(w: &mut Vec<u8>, outcome: &Result<(), BuildPathsFailure>) {
    match outcome {
        Ok(()) => w.put_u64(0),
        Err(f) => {
            w.put_u64(f.status.max(1));
            w.put_str(&f.message);
        }
    }
}
