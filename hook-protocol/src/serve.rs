//! The client side of Nix's legacy serve protocol (`nix-store --serve --write`, spoken over
//! `ssh://`; PROTOCOL.md §7), plus the matching server-side codecs in [`server`] for stand-in
//! peers and tests.
//!
//! Owns the handshake and version negotiation, every request we send (QueryValidPaths,
//! QueryPathInfos, DumpStorePath, ImportPaths with its export-stream framing, AddToStoreNar,
//! BuildDerivation with [`BuildOptions`], BuildPaths, QueryClosure) and the decoders for their
//! replies, each gated on the *negotiated* version. Sans-IO: encoders append to a `Vec<u8>`,
//! decoders read from a [`Reader`] and report [`DecodeError::Incomplete`] until a whole reply is
//! there. It must never perform I/O, and never carry a NAR itself: NARs (DumpStorePath replies,
//! ImportPaths and AddToStoreNar payloads) travel unframed between these messages and the caller
//! streams them.
//!
//! **Versions.** We announce [`CLIENT_VERSION`] = 2.7: Nix 2.4 through 2.34 speak exactly 2.7,
//! and a 2.8–2.34 server sends the BuildResult's built-outputs map to any client whatever it
//! announced (a misplaced parenthesis), so announcing less than 2.6 would desynchronise us. 2.8
//! (Nix ≥ 2.35) only changes that map's shape; 2.7 is understood by every server. The oldest
//! server we accept is [`MIN_SERVER_VERSION`] = 2.5 (Nix 2.3, the same floor current Nix's own
//! client uses): it is the first with AddToStoreNar, which uploads one path with its full
//! metadata (content address, signatures) as a stream, and from 2.4 on QueryPathInfos carries the
//! NAR hash we must verify downloads against.

use crate::build_result::{BuildResult, BuildResultLayout, BuiltOutputsLayout};
use crate::derivation::BasicDerivation;
use crate::path_info::{
    DerivedPath, PathInfo, put_opt_store_path, read_nar_hash, read_opt_store_path, read_store_path,
    read_store_path_set, read_string_set,
};
use crate::store_path::StorePath;
use crate::version::{self, ProtocolVersion, ServerHello};
use crate::wire::{self, DecodeError, Invalid, Reader, WireWrite};
use std::collections::BTreeSet;

/// Sent by the client first.
pub const MAGIC_1: u64 = 0x390c_9deb;
/// Sent by the server in reply.
pub const MAGIC_2: u64 = 0x5452_eecb;
/// The "NIXE" marker after each NAR in an export stream (PROTOCOL.md §9.3).
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// The version we announce (see the module docs for why).
pub const CLIENT_VERSION: ProtocolVersion = ProtocolVersion::new(2, 7);
/// The oldest server version we talk to (see the module docs for why).
pub const MIN_SERVER_VERSION: ProtocolVersion = ProtocolVersion::new(2, 5);

/// Serve protocol commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum Command {
    QueryValidPaths = 1,
    QueryPathInfos = 2,
    DumpStorePath = 3,
    ImportPaths = 4,
    ExportPaths = 5,
    BuildPaths = 6,
    QueryClosure = 7,
    BuildDerivation = 8,
    AddToStoreNar = 9,
}

impl Command {
    pub fn code(self) -> u64 {
        self as u64
    }

    pub fn from_code(code: u64) -> Option<Self> {
        use Command::*;
        Some(match code {
            1 => QueryValidPaths,
            2 => QueryPathInfos,
            3 => DumpStorePath,
            4 => ImportPaths,
            5 => ExportPaths,
            6 => BuildPaths,
            7 => QueryClosure,
            8 => BuildDerivation,
            9 => AddToStoreNar,
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// Appends the client greeting: `MAGIC_1, version`. Sent without waiting for the server.
pub fn encode_hello(w: &mut Vec<u8>, client: ProtocolVersion) {
    version::encode_greeting(w, MAGIC_1, client);
}

/// Decodes the server greeting (`MAGIC_2, version`) and negotiates. A wrong magic (e.g. a login
/// shell printing a banner on stdout), a major version other than 2 or a server older than
/// [`MIN_SERVER_VERSION`] is [`Invalid`].
pub fn decode_hello(r: &mut Reader<'_>, client: ProtocolVersion) -> wire::Result<ServerHello> {
    let server = version::decode_server_greeting(
        r,
        MAGIC_2,
        "the 'nix-store --serve' greeting",
        "serve protocol version",
    )?;
    if server.major != 2 || server < MIN_SERVER_VERSION {
        return Err(DecodeError::malformed(format!(
            "the remote 'nix-store --serve' speaks protocol {server}; we need 2.x with x ≥ {} \
             (Nix 2.3 or newer)",
            MIN_SERVER_VERSION.minor
        )));
    }
    Ok(ServerHello {
        server,
        negotiated: server.min(client),
    })
}

// ---------------------------------------------------------------------------------------------
// Requests and replies

fn put_paths<'a>(w: &mut Vec<u8>, paths: impl IntoIterator<Item = &'a StorePath>) {
    let paths: Vec<&StorePath> = paths.into_iter().collect();
    w.put_strings(paths);
}

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
    put_paths(w, paths);
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
    put_paths(w, paths);
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
    put_paths(w, references);
    put_opt_store_path(w, deriver);
    w.put_u64(0);
}

/// Export stream: the end marker (`u64 0`).
pub fn encode_export_end(w: &mut Vec<u8>) {
    w.put_u64(0);
}

/// The `u64 1` with which ImportPaths and AddToStoreNar report success. Anything else is
/// [`Invalid`] (a failing server prints its error on stderr and exits instead).
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

/// The `--max-silent-time`, `--timeout`, … settings sent with every build (PROTOCOL.md §7).
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

/// QueryClosure (cmd 7): the closure of `paths` (plus their outputs if `include_outputs`).
/// Reply: [`decode_path_set`].
pub fn encode_query_closure<'a>(
    w: &mut Vec<u8>,
    include_outputs: bool,
    paths: impl IntoIterator<Item = &'a StorePath>,
) {
    w.put_u64(Command::QueryClosure.code());
    w.put_bool(include_outputs);
    put_paths(w, paths);
}

// ---------------------------------------------------------------------------------------------

/// The server's side of the same messages: what `nix-store --serve` reads and writes. For
/// stand-in peers (fault-injection tests) and round-trip tests; a real hook never needs it.
pub mod server {
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

    /// A decoded client request. For [`Request::ImportPaths`] the export stream follows; for
    /// [`Request::AddToStoreNar`] `nar_size` bytes of NAR follow.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Request {
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
    pub fn decode_request(r: &mut Reader<'_>, version: ProtocolVersion) -> wire::Result<Request> {
        let code = r.u64()?;
        let cmd = Command::from_code(code).ok_or(Invalid::OutOfRange {
            what: "serve command",
            value: code,
        })?;
        Ok(match cmd {
            Command::QueryValidPaths => Request::QueryValidPaths {
                lock: r.bool()?,
                substitute: r.bool()?,
                paths: decode_path_set(r)?,
            },
            Command::QueryPathInfos => Request::QueryPathInfos(decode_path_set(r)?),
            Command::DumpStorePath => Request::DumpStorePath(read_store_path(r, "path")?),
            Command::ImportPaths => Request::ImportPaths,
            Command::ExportPaths => {
                let _obsolete = r.u64()?;
                Request::ExportPaths(decode_path_set(r)?)
            }
            Command::BuildPaths => Request::BuildPaths {
                paths: r.list("paths to build", DerivedPath::read)?,
                options: BuildOptions::decode(r, version)?,
            },
            Command::QueryClosure => Request::QueryClosure {
                include_outputs: r.bool()?,
                paths: decode_path_set(r)?,
            },
            Command::BuildDerivation => Request::BuildDerivation {
                drv_path: read_store_path(r, "derivation path")?,
                drv: BasicDerivation::decode(r)?,
                options: BuildOptions::decode(r, version)?,
            },
            Command::AddToStoreNar => Request::AddToStoreNar(PathInfo::decode_for_upload(r)?),
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
        put_paths(w, paths);
    }

    /// The QueryPathInfos reply (≥ 2.4 layout with hash, CA and signatures).
    pub fn encode_path_infos(w: &mut Vec<u8>, version: ProtocolVersion, infos: &[PathInfo]) {
        for info in infos {
            w.put_str(info.path.as_str());
            put_opt_store_path(w, info.deriver.as_ref());
            put_paths(w, &info.references);
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
    pub fn encode_build_derivation_reply(
        w: &mut Vec<u8>,
        version: ProtocolVersion,
        res: &BuildResult,
    ) {
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
}

#[cfg(test)]
mod tests {
    use super::server::Request;
    use super::*;
    use crate::build_result::tests::{arb_build_result, carried};
    use crate::path_info::OutputsSpec;
    use crate::path_info::tests::{arb_path, arb_path_info, path};
    use crate::store_path::Sha256;
    use proptest::prelude::*;

    fn assert_prefixes_incomplete<T: std::fmt::Debug>(
        bytes: &[u8],
        mut f: impl FnMut(&mut Reader<'_>) -> wire::Result<T>,
    ) {
        for cut in 0..bytes.len() {
            match f(&mut Reader::new(&bytes[..cut])) {
                Err(e) if e.is_incomplete() => {}
                other => panic!("prefix of {cut}/{} bytes: {other:?}", bytes.len()),
            }
        }
    }

    #[test]
    fn hello_layout_and_negotiation() {
        let mut w = Vec::new();
        encode_hello(&mut w, CLIENT_VERSION);
        assert_eq!(
            w,
            [
                0xeb, 0x9d, 0x0c, 0x39, 0, 0, 0, 0, 0x07, 0x02, 0, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(
            server::decode_hello(&mut Reader::new(&w)).unwrap(),
            CLIENT_VERSION
        );

        for (server_v, want) in [((2, 7), (2, 7)), ((2, 8), (2, 7)), ((2, 5), (2, 5))] {
            let mut s = Vec::new();
            server::encode_hello(&mut s, ProtocolVersion::new(server_v.0, server_v.1));
            let hello = decode_hello(&mut Reader::new(&s), CLIENT_VERSION).unwrap();
            assert_eq!(hello.negotiated, ProtocolVersion::new(want.0, want.1));
            assert_prefixes_incomplete(&s, |r| decode_hello(r, CLIENT_VERSION));
        }
        for bad in [
            ProtocolVersion::new(2, 4),
            ProtocolVersion::new(3, 0),
            ProtocolVersion::new(1, 34),
        ] {
            let mut s = Vec::new();
            server::encode_hello(&mut s, bad);
            assert!(matches!(
                decode_hello(&mut Reader::new(&s), CLIENT_VERSION),
                Err(DecodeError::Invalid(_))
            ));
        }
        // A shell banner instead of the greeting.
        let banner = b"Welcome to the machine\n";
        assert!(matches!(
            decode_hello(&mut Reader::new(banner), CLIENT_VERSION),
            Err(DecodeError::Invalid(Invalid::Unexpected { .. }))
        ));
    }

    #[test]
    fn build_options_by_version() {
        let o = BuildOptions {
            max_silent_time: 1,
            build_timeout: 2,
            max_log_size: 3,
            nr_repeats: 4,
            enforce_determinism: true,
            keep_failed: true,
        };
        for (minor, len) in [(1u8, 2), (2, 3), (3, 5), (6, 5), (7, 6), (8, 6)] {
            let v = ProtocolVersion::new(2, minor);
            let mut w = Vec::new();
            o.encode(&mut w, v);
            assert_eq!(w.len(), len * 8, "2.{minor}");
            let got = BuildOptions::decode(&mut Reader::new(&w), v).unwrap();
            assert_eq!(got.max_silent_time, 1);
            assert_eq!(got.keep_failed, minor >= 7);
            assert_eq!(got.nr_repeats, if minor >= 3 { 4 } else { 0 });
        }
        let huge = BuildOptions {
            max_silent_time: u64::MAX,
            ..Default::default()
        };
        let mut w = Vec::new();
        huge.encode(&mut w, CLIENT_VERSION);
        let got = BuildOptions::decode(&mut Reader::new(&w), CLIENT_VERSION).unwrap();
        assert_eq!(got.max_silent_time, u32::MAX as u64);
    }

    #[test]
    fn path_infos_reply() {
        let mut a = PathInfo::new(path(1, "a"), Sha256::digest(b"a"), 128);
        a.deriver = Some(path(2, "a.drv"));
        a.references = [path(1, "a"), path(3, "b")].into();
        a.sigs.insert("k-1:abc".into());
        a.ca = Some(format!(
            "fixed:r:sha256:{}",
            Sha256::digest(b"c").to_nix32()
        ));
        let b = PathInfo::new(path(3, "b"), Sha256::digest(b"b"), 96);
        let mut w = Vec::new();
        server::encode_path_infos(&mut w, CLIENT_VERSION, &[a.clone(), b.clone()]);
        let (got, used) = wire::decode_with(&w, |r| decode_path_infos(r, CLIENT_VERSION)).unwrap();
        assert_eq!(used, w.len());
        assert_eq!(got, vec![a, b]);
        assert_prefixes_incomplete(&w, |r| decode_path_infos(r, CLIENT_VERSION));
        // The empty reply is just the terminator.
        let mut w = Vec::new();
        server::encode_path_infos(&mut w, CLIENT_VERSION, &[]);
        assert_eq!(w, [0u8; 8]);
        assert!(decode_path_infos(&mut Reader::new(&w), ProtocolVersion::new(2, 3)).is_err());
    }

    #[test]
    fn export_stream_framing() {
        let p = path(5, "exported");
        let dep = path(6, "dep");
        let mut w = Vec::new();
        encode_import_paths(&mut w);
        encode_export_item_start(&mut w);
        w.extend_from_slice(b"<nar>");
        let nar_end = w.len();
        encode_export_item_end(&mut w, &p, [&dep], None);
        encode_export_end(&mut w);
        assert_eq!(&w[..16], &[4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        let mut r = Reader::new(&w[nar_end..]);
        let t = server::decode_export_item_end(&mut r).unwrap();
        assert_eq!((t.path, t.references, t.deriver), (p, [dep].into(), None));
        assert_eq!(server::decode_export_item_start(&mut r).unwrap(), None);
        assert!(r.is_empty());
        assert!(decode_ok(&mut Reader::new(&1u64.to_le_bytes())).is_ok());
        assert!(matches!(
            decode_ok(&mut Reader::new(&0u64.to_le_bytes())),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn build_paths_reply() {
        let ok = Ok(());
        let fail = Err(BuildPathsFailure {
            status: 100,
            message: "build failed".into(),
        });
        for outcome in [ok, fail] {
            let mut w = Vec::new();
            server::encode_build_paths_reply(&mut w, &outcome);
            let (got, used) = wire::decode_with(&w, decode_build_paths_reply).unwrap();
            assert_eq!(used, w.len());
            assert_eq!(got, outcome);
            assert_prefixes_incomplete(&w, decode_build_paths_reply);
        }
    }

    #[test]
    fn requests_round_trip_through_the_server_decoder() {
        let v = CLIENT_VERSION;
        let a = path(1, "a");
        let drv = path(2, "a.drv");
        let opts = BuildOptions {
            max_silent_time: 60,
            keep_failed: true,
            ..Default::default()
        };
        let mut basic = BasicDerivation {
            platform: "x86_64-linux".into(),
            builder: b"/bin/sh".to_vec(),
            ..Default::default()
        };
        basic.args.push(b"-c".to_vec());
        let paths = vec![
            DerivedPath::Opaque(a.clone()),
            DerivedPath::Built {
                drv_path: drv.clone(),
                outputs: OutputsSpec::Names(["out".into()].into()),
            },
        ];
        let info = PathInfo::new(a.clone(), Sha256::digest(b""), 8);
        let mut w = Vec::new();
        encode_query_valid_paths(&mut w, true, false, [&a]);
        encode_query_path_infos(&mut w, [&a, &drv]);
        encode_dump_store_path(&mut w, &a);
        encode_build_paths(&mut w, v, &paths, &opts);
        encode_query_closure(&mut w, true, [&a]);
        encode_build_derivation(&mut w, v, &drv, &basic, &opts);
        encode_add_to_store_nar(&mut w, &info);
        let mut r = Reader::new(&w);
        let want = [
            Request::QueryValidPaths {
                lock: true,
                substitute: false,
                paths: [a.clone()].into(),
            },
            Request::QueryPathInfos([a.clone(), drv.clone()].into()),
            Request::DumpStorePath(a.clone()),
            Request::BuildPaths {
                paths,
                options: opts.clone(),
            },
            Request::QueryClosure {
                include_outputs: true,
                paths: [a.clone()].into(),
            },
            Request::BuildDerivation {
                drv_path: drv,
                drv: basic,
                options: opts,
            },
            Request::AddToStoreNar(info),
        ];
        for want in want {
            assert_eq!(server::decode_request(&mut r, v).unwrap(), want);
        }
        assert!(r.is_empty());
    }

    proptest! {
        /// The BuildDerivation reply at every serve version: what each version carries.
        #[test]
        fn build_result_round_trip(res in arb_build_result(), minor in 0u8..=9) {
            let v = ProtocolVersion::new(2, minor);
            let mut w = Vec::new();
            server::encode_build_derivation_reply(&mut w, v, &res);
            let (got, used) = wire::decode_with(&w, |r| decode_build_derivation_reply(r, v, "/nix/store")).unwrap();
            prop_assert_eq!(used, w.len());
            prop_assert_eq!(got, carried(&res, minor >= 3, false, minor >= 6));
            for cut in 0..w.len() {
                let e = decode_build_derivation_reply(&mut Reader::new(&w[..cut]), v, "/nix/store").unwrap_err();
                prop_assert!(e.is_incomplete(), "cut {}: {:?}", cut, e);
            }
        }

        #[test]
        fn path_set_round_trip(paths in proptest::collection::btree_set(arb_path(), 0..6)) {
            let mut w = Vec::new();
            server::encode_path_set(&mut w, &paths);
            let (got, used) = wire::decode_with(&w, decode_path_set).unwrap();
            prop_assert_eq!(used, w.len());
            prop_assert_eq!(got, paths);
        }

        #[test]
        fn path_infos_round_trip(mut infos in proptest::collection::vec(arb_path_info(), 0..4)) {
            for i in &mut infos {
                // Not carried by the serve layout.
                i.registration_time = 0;
                i.ultimate = false;
            }
            let mut w = Vec::new();
            server::encode_path_infos(&mut w, CLIENT_VERSION, &infos);
            let got = decode_path_infos(&mut Reader::new(&w), CLIENT_VERSION).unwrap();
            prop_assert_eq!(got, infos);
        }

        #[test]
        fn build_options_round_trip(a in any::<u32>(), b in any::<u32>(), c in any::<u64>(), d in any::<u32>(), e in any::<bool>(), f in any::<bool>()) {
            let o = BuildOptions { max_silent_time: a as u64, build_timeout: b as u64, max_log_size: c, nr_repeats: d as u64, enforce_determinism: e, keep_failed: f };
            let mut w = Vec::new();
            o.encode(&mut w, CLIENT_VERSION);
            prop_assert_eq!(BuildOptions::decode(&mut Reader::new(&w), CLIENT_VERSION).unwrap(), o);
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), minor in 0u8..10) {
            let v = ProtocolVersion::new(2, minor);
            let _ = decode_hello(&mut Reader::new(&data), CLIENT_VERSION);
            let _ = decode_path_set(&mut Reader::new(&data));
            let _ = decode_path_infos(&mut Reader::new(&data), v);
            let _ = decode_build_paths_reply(&mut Reader::new(&data));
            let _ = decode_build_derivation_reply(&mut Reader::new(&data), v, "/nix/store");
            let _ = server::decode_request(&mut Reader::new(&data), v);
            let _ = server::decode_export_item_end(&mut Reader::new(&data));
        }
    }
}
