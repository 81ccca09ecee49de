//! nix-lazy-builder: a replacement for Nix's build hook that boots builders on demand.
//!
//! The library holds everything; `main.rs` is only the command line. See ARCHITECTURE.md for
//! the code map and the invariants each module keeps.

pub mod backoff;
pub mod boot;
pub mod cli;
pub mod config;
pub mod external;
pub mod hook;
pub mod lazy;
pub mod logging;
pub mod memory;
pub mod os;
pub mod place;
pub mod select;
pub mod slots;
pub mod ssh;
pub mod store;
pub mod supervisor;
pub mod transfer;
pub mod wire_io;
