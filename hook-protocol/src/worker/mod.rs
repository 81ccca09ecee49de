//! The client side of Nix's worker protocol (`nix-daemon --stdio` over `ssh-ng://`, and the local
//! daemon socket; docs/protocol.md §8), plus the matching daemon-side codecs in `server` (cargo
//! feature `server`) for stand-in peers and tests.
//!
//! Owns the handshake and version/feature negotiation, the stderr message loop
//! ([`StderrMessage`]), the requests we send (IsValidPath, QueryValidPaths, QueryPathInfo,
//! NarFromPath, AddToStoreNar, AddMultipleToStore, BuildDerivation, BuildPathsWithResults,
//! RegisterDrvOutput, QueryRealisation) with their reply decoders, and a sans-IO framed-stream
//! codec ([`encode_frame`], [`FrameDecoder`]). Every version-dependent function takes the
//! [`Negotiated`] protocol. Sans-IO: encoders append to a `Vec<u8>`, decoders read from a
//! [`Reader`](crate::wire::Reader) and report
//! [`DecodeError::Incomplete`](crate::wire::DecodeError::Incomplete) until a whole message is
//! there. It must never perform I/O or hold a NAR: NARs travel framed (uploads)
//! or unframed after `STDERR_LAST` (NarFromPath) and the caller streams them.
//!
//! **Versions.** We announce [`CLIENT_VERSION`] = 1.35 with no features. Nix 2.8–2.14 speak
//! 1.34; 1.35 (Nix 2.15) adds exactly one thing, the daemon's "do you trust me" answer in the
//! handshake, which tells us up front that an untrusted remote will refuse BuildDerivation of an
//! input-addressed derivation. 1.36 adds nothing we use, 1.37 only CPU times, and 1.38 a feature
//! exchange whose only build-related feature (`realisation-with-path-not-hash`) matters for
//! content-addressed derivations. Old daemons gate on the client's number, so announcing 1.35 to
//! a 1.34 daemon is safe; every gate here uses `min(client, server)`. The codecs nonetheless
//! implement the ≥ 1.37/1.38 layouts, so a caller may announce more. The oldest daemon we accept
//! is [`MIN_SERVER_VERSION`] = 1.21 (Nix 2.3): everything we send has a defined form there, with
//! two differences the caller must honour: below 1.23 AddToStoreNar's NAR is pulled by
//! `STDERR_READ` requests ([`nar_upload`]) and below 1.26 errors have the old layout (handled
//! here).
//!
//! One file per concern: `handshake` (versions, features, trust), `stderr` (the message loop
//! before every reply), `paths` (queries and uploads of store paths), `build` (SetOptions and
//! the two build operations), `realisations` (registering and querying the realisations of
//! content-addressed derivations), `framing` (framed streams), `server` (the daemon's side).

mod build;
mod framing;
mod handshake;
mod paths;
mod realisations;
#[cfg(any(test, feature = "server"))]
pub mod server;
mod stderr;
#[cfg(test)]
mod tests;

pub use build::*;
pub use framing::*;
pub use handshake::*;
pub use paths::*;
pub use realisations::*;
pub use stderr::*;

/// Worker operations we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum Op {
    IsValidPath = 1,
    SetOptions = 19,
    QueryPathInfo = 26,
    QueryValidPaths = 31,
    BuildDerivation = 36,
    NarFromPath = 38,
    AddToStoreNar = 39,
    RegisterDrvOutput = 42,
    QueryRealisation = 43,
    AddMultipleToStore = 44,
    BuildPathsWithResults = 46,
}

impl Op {
    pub fn code(self) -> u64 {
        self as u64
    }

    pub fn from_code(code: u64) -> Option<Self> {
        use Op::*;
        Some(match code {
            1 => IsValidPath,
            19 => SetOptions,
            26 => QueryPathInfo,
            31 => QueryValidPaths,
            36 => BuildDerivation,
            38 => NarFromPath,
            39 => AddToStoreNar,
            42 => RegisterDrvOutput,
            43 => QueryRealisation,
            44 => AddMultipleToStore,
            46 => BuildPathsWithResults,
            _ => return None,
        })
    }
}
