//! The store clients: the local nix-daemon's socket (`local`), and a builder's store over SSH,
//! `nix-store --serve --write` for `ssh://` (`serve`) or `nix-daemon --stdio` for `ssh-ng://`
//! (`daemon`), behind one [`Remote`] (`remote`). The worker-protocol client the local store and
//! `ssh-ng://` share is `worker`; the NAR streams every client reads and writes are `nar`; the
//! build log they write into is `build_log`; `probe` asks the running local daemon its version
//! and the build hook it really runs (for `doctor`); `warm` is both ends of a warm session (the
//! supervisor starting and handshaking a remote program ahead of time, the hook taking it
//! over).
//!
//! [`BuildLog`] (nix-daemon's fd 4) lives here because its only writers are these clients: the
//! `ssh://` stderr pump and the worker protocol's log messages. The hook only claims the
//! descriptor at start-up and hands the log down; keeping it beside its writers keeps every
//! dependency pointing down (hook → store → logging, for the phase line).
//!
//! This room speaks the protocols (`hook-protocol` encodes and decodes them) and carries bytes;
//! it never decides what to copy or build (`transfer` does) and never writes a path to the local
//! store that the daemon has locked (that would deadlock; `place` puts those outputs there). It
//! adds only what `transfer` hands it as unlocked: floating content-addressed outputs, which the
//! daemon locks by derivation and output name (docs/protocol.md §4.6), and `probe`'s own small
//! `.drv`, added by `doctor`, never by a hook.

mod build_log;
mod daemon;
mod local;
mod nar;
mod probe;
mod remote;
mod serve;
pub mod warm;
mod worker;

use crate::ssh::{self, SshError};
use crate::wire_io::{CopyError, WireError};

pub use build_log::BuildLog;
pub use local::{LocalStore, socket_path};
pub use nar::{NarSink, NarSource};
pub use probe::{DaemonFacts, PROBE_SYSTEM, probe_daemon};
pub use remote::{Reconnect, Remote, remote_command};

/// A failure talking to a remote store (or to the local daemon, which speaks the same protocol).
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Ssh(Box<SshError>),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{peer} closed the connection while we were reading {what}{}", tail_suffix(.stderr))]
    Closed {
        peer: String,
        what: &'static str,
        stderr: String,
    },
    #[error("writing to {peer}: {source}")]
    Write {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    /// The remote daemon reported an error (ANSI escapes stripped).
    #[error("{message}")]
    Daemon { peer: String, message: String },
    #[error("{peer}: {message}")]
    Protocol { peer: String, message: String },
    #[error("cannot build the remote command line: {0}")]
    Quote(#[from] ssh::ShellQuoteError),
    /// The builder's configuration gives no SSH target (its host keys).
    #[error(transparent)]
    Target(#[from] ssh::TargetError),
}

fn tail_suffix(stderr: &str) -> String {
    let t = stderr.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!("; it said: {t}")
    }
}

impl From<SshError> for RemoteError {
    fn from(e: SshError) -> Self {
        RemoteError::Ssh(Box::new(e))
    }
}

impl From<CopyError> for RemoteError {
    fn from(e: CopyError) -> Self {
        match e {
            CopyError::Read(w) => RemoteError::Wire(w),
            CopyError::Write(source) => RemoteError::Write {
                peer: "the receiving side".into(),
                source,
            },
        }
    }
}
