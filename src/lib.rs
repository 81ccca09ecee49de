//! nix-lazy-builder: a replacement for Nix's build hook that boots builders on demand.
//!
//! The library holds everything; `main.rs` is only the command line. See ARCHITECTURE.md for
//! the code map and the invariants each module keeps.

pub mod wire_io;
pub mod place;
pub mod config;
pub mod ssh;
pub mod logging;
pub mod remote;
pub mod local;
pub mod transfer;
pub mod hook;
pub mod select;
pub mod slots;
pub mod supervisor;
pub mod boot;
pub mod lazy;
pub mod cli;
