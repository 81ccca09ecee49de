//! The operations on store paths (docs/protocol.md §8.3): IsValidPath, QueryValidPaths,
//! QueryPathInfo, NarFromPath, AddToStoreNar and AddMultipleToStore, with their reply decoders
//! and how an upload's NAR travels at each version ([`nar_upload`]).
//!
//! Must never carry a NAR itself: the caller streams it (framed with `framing`, pulled, or raw)
//! between these messages.

use std::collections::BTreeSet;

use crate::path_info::{PathInfo, put_store_paths, read_store_path_set};
use crate::store_path::StorePath;
use crate::version::ProtocolVersion;
use crate::wire::{self, Reader, WireWrite};

use super::Op;
use super::handshake::{Negotiated, Unsupported, require};

/// IsValidPath (op 1). Reply: [`decode_bool`].
pub fn encode_is_valid_path(w: &mut Vec<u8>, path: &StorePath) {
    w.put_u64(Op::IsValidPath.code());
    w.put_str(path.as_str());
}

/// A u64 boolean reply.
pub fn decode_bool(r: &mut Reader<'_>) -> wire::Result<bool> {
    r.bool()
}

/// QueryValidPaths (op 31); `substitute` is sent from 1.27 on. Reply: [`decode_path_set`].
pub fn encode_query_valid_paths<'a>(
    w: &mut Vec<u8>,
    proto: &Negotiated,
    paths: impl IntoIterator<Item = &'a StorePath>,
    substitute: bool,
) {
    w.put_u64(Op::QueryValidPaths.code());
    put_store_paths(w, paths);
    if proto.at_least(1, 27) {
        w.put_bool(substitute);
    }
}

/// A set of store paths.
pub fn decode_path_set(r: &mut Reader<'_>) -> wire::Result<BTreeSet<StorePath>> {
    read_store_path_set(r, "store paths")
}

/// QueryPathInfo (op 26). Reply: [`decode_query_path_info_reply`].
pub fn encode_query_path_info(w: &mut Vec<u8>, path: &StorePath) {
    w.put_u64(Op::QueryPathInfo.code());
    w.put_str(path.as_str());
}

/// The QueryPathInfo reply for `path`: `None` if the path is not valid (≥ 1.17; below that an
/// invalid path arrives as a [`DaemonError`](super::DaemonError) saying "… is not valid").
pub fn decode_query_path_info_reply(
    r: &mut Reader<'_>,
    proto: &Negotiated,
    path: &StorePath,
) -> wire::Result<Option<PathInfo>> {
    if proto.at_least(1, 17) && !r.bool()? {
        return Ok(None);
    }
    PathInfo::decode_unkeyed_worker(r, path.clone(), proto.at_least(1, 16)).map(Some)
}

/// NarFromPath (op 38). After `STDERR_LAST` the NAR follows unframed: parse it to find its end.
pub fn encode_nar_from_path(w: &mut Vec<u8>, path: &StorePath) {
    w.put_u64(Op::NarFromPath.code());
    w.put_str(path.as_str());
}

/// How AddToStoreNar's NAR travels for a negotiated version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NarUpload {
    /// ≥ 1.23: as a framed stream ([`encode_frame`](super::encode_frame) …
    /// [`encode_frame_end`](super::encode_frame_end)) right after the request; the daemon's stderr
    /// messages end with `STDERR_LAST`.
    Framed,
    /// 1.21–1.22: the daemon pulls it with `STDERR_READ` messages, each answered with
    /// [`encode_read_reply`](super::encode_read_reply).
    Pulled,
    /// Below 1.21: raw, right after the request.
    Raw,
}

pub fn nar_upload(proto: &Negotiated) -> NarUpload {
    if proto.at_least(1, 23) {
        NarUpload::Framed
    } else if proto.at_least(1, 21) {
        NarUpload::Pulled
    } else {
        NarUpload::Raw
    }
}

/// AddToStoreNar (op 39): the request header. The NAR follows as [`nar_upload`] says; then the
/// stderr loop ends with `STDERR_LAST` and no reply data. `dont_check_sigs` is ignored by a daemon
/// that does not trust us.
pub fn encode_add_to_store_nar(
    w: &mut Vec<u8>,
    info: &PathInfo,
    repair: bool,
    dont_check_sigs: bool,
) {
    w.put_u64(Op::AddToStoreNar.code());
    info.encode_for_upload(w);
    w.put_bool(repair);
    w.put_bool(dont_check_sigs);
}

/// AddMultipleToStore (op 44, ≥ 1.32): the request header. A framed stream follows whose content
/// is [`encode_add_multiple_count`], then per path (dependencies first)
/// [`encode_add_multiple_entry`] and the path's raw NAR. Ends with `STDERR_LAST`, no reply data.
pub fn encode_add_multiple_to_store(
    w: &mut Vec<u8>,
    proto: &Negotiated,
    repair: bool,
    dont_check_sigs: bool,
) -> Result<(), Unsupported> {
    require(proto, "AddMultipleToStore", ProtocolVersion::new(1, 32))?;
    w.put_u64(Op::AddMultipleToStore.code());
    w.put_bool(repair);
    w.put_bool(dont_check_sigs);
    Ok(())
}

/// AddMultipleToStore content: the number of paths.
pub fn encode_add_multiple_count(w: &mut Vec<u8>, count: u64) {
    w.put_u64(count);
}

/// AddMultipleToStore content: one path's metadata; its NAR follows.
pub fn encode_add_multiple_entry(w: &mut Vec<u8>, info: &PathInfo) {
    info.encode_for_upload(w);
}
