//! The serve commands on store paths (docs/protocol.md §7, §9.3): QueryValidPaths,
//! QueryPathInfos, DumpStorePath, ImportPaths with its export stream, AddToStoreNar and
//! QueryClosure, with their reply decoders.
//!
//! Must never carry a NAR itself: NARs travel unframed between these messages and the caller
//! streams them.

use std::collections::BTreeSet;

use crate::path_info::{
    PathInfo, put_opt_store_path, put_store_paths, read_nar_hash, read_opt_store_path,
    read_store_path_set, read_string_set,
};
use crate::store_path::StorePath;
use crate::version::ProtocolVersion;
use crate::wire::{self, DecodeError, Reader, WireWrite};

use super::Command;

/// The "NIXE" marker after each NAR in an export stream (docs/protocol.md §9.3).
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// QueryValidPaths (cmd 1): `lock` adds temp roots on the remote; `substitute` lets the remote
/// substitute first (`builders-use-substitutes`). Reply: [`decode_path_set`].
pub fn encode_query_valid_paths<'a>(
    w: &mut Vec<u8>,
    lock: bool,
    substitute: bool,
    paths: impl IntoIterator<Item = &'a StorePath>,
) {
    w.put_u64(Command::QueryValidPaths.code());
    w.put_bool(lock);
    w.put_bool(substitute);
    put_store_paths(w, paths);
}

/// A set of store paths: the reply to QueryValidPaths and QueryClosure.
pub fn decode_path_set(r: &mut Reader<'_>) -> wire::Result<BTreeSet<StorePath>> {
    read_store_path_set(r, "store paths")
}

/// QueryPathInfos (cmd 2). Reply: [`decode_path_infos`].
pub fn encode_query_path_infos<'a>(
    w: &mut Vec<u8>,
    paths: impl IntoIterator<Item = &'a StorePath>,
) {
    w.put_u64(Command::QueryPathInfos.code());
    put_store_paths(w, paths);
}

/// The QueryPathInfos reply: one entry per *valid* requested path (invalid ones are omitted),
/// then an empty string. The serve layout carries neither registration time nor `ultimate`
/// (they come back as 0 / false); the NAR hash is `sha256:<nix32>` (any form is accepted).
pub fn decode_path_infos(
    r: &mut Reader<'_>,
    version: ProtocolVersion,
) -> wire::Result<Vec<PathInfo>> {
    if version < ProtocolVersion::new(2, 4) {
        return Err(DecodeError::malformed(format!(
            "serve protocol {version} carries no NAR hashes in QueryPathInfos"
        )));
    }
    let mut out = Vec::new();
    loop {
        let Some(path) = read_opt_store_path(r, "path info path")? else {
            return Ok(out);
        };
        let deriver = read_opt_store_path(r, "deriver")?;
        let references = read_store_path_set(r, "references")?;
        let _download_size = r.u64()?;
        let nar_size = r.u64()?;
        let nar_hash = read_nar_hash(r, "narHash")?;
        let ca = r.string("content address")?;
        let sigs = read_string_set(r, "signatures")?;
        out.push(PathInfo {
            path,
            deriver,
            nar_hash,
            references,
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs,
            ca: (!ca.is_empty()).then_some(ca),
        });
    }
}

/// DumpStorePath (cmd 3). The reply is the path's NAR, unframed: the caller must parse the NAR
/// to find its end.
pub fn encode_dump_store_path(w: &mut Vec<u8>, path: &StorePath) {
    w.put_u64(Command::DumpStorePath.code());
    w.put_str(path.as_str());
}

/// ImportPaths (cmd 4): just the command. Then, per path in dependency order,
/// [`encode_export_item_start`], the NAR, [`encode_export_item_end`]; finally
/// [`encode_export_end`]. Reply: [`decode_ok`].
pub fn encode_import_paths(w: &mut Vec<u8>) {
    w.put_u64(Command::ImportPaths.code());
}

/// Export stream: what precedes each NAR (`u64 1`).
pub fn encode_export_item_start(w: &mut Vec<u8>) {
    w.put_u64(1);
}

/// Export stream: what follows each NAR (`"NIXE"`, path, references, deriver-or-"", no
/// signature). The importer computes the NAR hash itself; CA and signatures are not carried.
pub fn encode_export_item_end<'a>(
    w: &mut Vec<u8>,
    path: &StorePath,
    references: impl IntoIterator<Item = &'a StorePath>,
    deriver: Option<&StorePath>,
) {
    w.put_u64(EXPORT_MAGIC);
    w.put_str(path.as_str());
    put_store_paths(w, references);
    put_opt_store_path(w, deriver);
    w.put_u64(0);
}

/// Export stream: the end marker (`u64 0`).
pub fn encode_export_end(w: &mut Vec<u8>) {
    w.put_u64(0);
}

/// The `u64 1` with which ImportPaths and AddToStoreNar report success. Anything else is
/// [`Invalid`](crate::wire::Invalid) (a failing server prints its error on stderr and exits
/// instead).
pub fn decode_ok(r: &mut Reader<'_>) -> wire::Result<()> {
    r.expect_u64("success marker", 1)
}

/// AddToStoreNar (cmd 9, serve ≥ 2.5): the command and the path's metadata. Exactly
/// `info.nar_size` bytes of NAR must follow (a server rejects `nar_size == 0`). Reply:
/// [`decode_ok`].
pub fn encode_add_to_store_nar(w: &mut Vec<u8>, info: &PathInfo) {
    w.put_u64(Command::AddToStoreNar.code());
    info.encode_for_upload(w);
}

/// QueryClosure (cmd 7): the closure of `paths` (plus their outputs if `include_outputs`).
/// Reply: [`decode_path_set`].
pub fn encode_query_closure<'a>(
    w: &mut Vec<u8>,
    include_outputs: bool,
    paths: impl IntoIterator<Item = &'a StorePath>,
) {
    w.put_u64(Command::QueryClosure.code());
    w.put_bool(include_outputs);
    put_store_paths(w, paths);
}
