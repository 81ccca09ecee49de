//! The client side of Nix's legacy serve protocol (`nix-store --serve --write`, spoken over
//! `ssh://`; docs/protocol.md §7), plus the matching server-side codecs in `server` (cargo
//! feature `server`) for stand-in peers and tests.
//!
//! Owns the handshake and version negotiation, every request we send (QueryValidPaths,
//! QueryPathInfos, DumpStorePath, ImportPaths with its export-stream framing, AddToStoreNar,
//! BuildDerivation with [`BuildOptions`], BuildPaths, QueryClosure) and the decoders for their
//! replies, each gated on the *negotiated* version. Sans-IO: encoders append to a `Vec<u8>`,
//! decoders read from a [`Reader`](crate::wire::Reader) and report
//! [`DecodeError::Incomplete`](crate::wire::DecodeError::Incomplete) until a whole reply is
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
//!
//! One file per concern: `handshake` (greetings and the version floor), `paths` (queries,
//! downloads and uploads of store paths, with the export-stream framing), `build` (the build
//! commands, their options and results), `server` (the server's side).

mod build;
mod handshake;
mod paths;
#[cfg(any(test, feature = "server"))]
pub mod server;
#[cfg(test)]
mod tests;

pub use build::*;
pub use handshake::*;
pub use paths::*;

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
