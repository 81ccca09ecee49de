//! `hook-protocol`: every wire a Nix build hook speaks, as sans-IO codecs.
//!
//! Bytes in, values out: nothing in this crate opens a socket, spawns a process or touches the
//! file system. Decoders work on borrowed slices and distinguish input that is merely
//! incomplete ([`wire::DecodeError::Incomplete`]) from input that can never be valid
//! ([`wire::DecodeError::Invalid`]); thin async adapters in the `nix-lazy-builder` crate put them
//! on pipes and sockets. NARs themselves come from the `nix-archive` crate.

pub mod build_result;
pub mod derivation;
pub mod hook;
pub mod log;
pub mod path_info;
pub mod realisation;
pub mod serve;
pub mod store_path;
pub mod version;
pub mod wire;
pub mod worker;

pub use realisation::{DrvOutput, Realisation};
pub use store_path::{Sha256, StorePath};
pub use version::{ProtocolVersion, ServerHello};
pub use wire::{DecodeError, Invalid, Reader, WireWrite};
