//! The SSH client (russh): connect to a builder with a PINNED host key, authenticate with a key
//! file, keep the connection honest with keepalives, and run remote commands as [`Exec`]s whose
//! stdin, stdout, stderr and exit status are separate streams.
//!
//! One file per concern: `session` (connect, the russh handler, what was negotiated), `exec`
//! (channels, the streams of a remote command, exit status), `keepalive` (the timeouts and the
//! watched TCP stream that enforce liveness), `known_hosts` (the set of keys a connection
//! accepts, from key lines or `known_hosts` files), `keys` (identity loading), `target` (where
//! to connect, and the trust policy that turns a builder's host-key spec into pinned keys) and
//! `quote` (POSIX shell quoting for remote command lines). This file holds the errors every
//! part shares and re-exports the room's surface, so every item has the one path `ssh::Item`.
//!
//! Must never: accept a host key that is not pinned (there is no accept-all path: an empty pin
//! set is refused before any byte is sent), prompt for anything, or log key material (public
//! fingerprints are fine; private keys, passphrases and key files' contents are not).

mod exec;
mod keepalive;
mod keys;
mod known_hosts;
mod quote;
mod session;
mod target;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use exec::{Exec, ExecOutput, ExecStatus, ExecStdin, ExitStatus};
pub use keepalive::Timeouts;
pub use keys::{default_identities, load_identity};
pub use known_hosts::{HostKeyError, HostKeySet, fingerprint};
pub use quote::{ShellQuoteError, shell_command, shell_quote};
pub use session::{Negotiated, Session, connect};
pub use target::{SshTarget, TargetError, TargetSpec};

/// An SSH failure, with the builder it concerns.
#[derive(Debug, thiserror::Error)]
#[error("builder '{builder}' ({user}@{host}:{port}): {kind}")]
pub struct SshError {
    pub builder: String,
    pub user: String,
    pub host: String,
    pub port: u16,
    pub kind: SshErrorKind,
}

/// What went wrong. Displayed after the builder context of [`SshError`].
#[derive(Debug, thiserror::Error)]
pub enum SshErrorKind {
    #[error("cannot resolve host name: {source}")]
    Resolve {
        #[source]
        source: io::Error,
    },
    #[error("connection refused (is the SSH server running and listening on this port?)")]
    ConnectionRefused,
    #[error("cannot connect: {source}")]
    Connect {
        #[source]
        source: io::Error,
    },
    #[error("timed out after {} during {stage}", humantime::format_duration(*after))]
    Timeout { after: Duration, stage: Stage },
    #[error(
        "no pinned host key: refusing to connect without one (set `host-key` in the config, \
             the machines file's 8th column, or a known_hosts entry)"
    )]
    HostKeyMissing,
    #[error("HOST KEY MISMATCH: expected {}, but the server presented {presented} ({presented_type}); \
             refusing to connect (someone may be intercepting the connection, or the host key \
             changed: update the pinned key if the change is legitimate)",
            expected.join(" or "))]
    HostKeyMismatch {
        /// Fingerprints (`SHA256:…`) of the pinned keys.
        expected: Vec<String>,
        /// Fingerprint (`SHA256:…`) of the key the server presented.
        presented: String,
        presented_type: String,
    },
    #[error("the server presented a host certificate; only pinned plain host keys are accepted")]
    HostCertificate,
    #[error("cannot read SSH key file {}: {source}", path.display())]
    KeyFileUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unsupported or invalid SSH key file {}: {reason}", path.display())]
    KeyFileUnsupported { path: PathBuf, reason: String },
    #[error("SSH key file {} is encrypted; use a key without a passphrase (no prompts here)",
            path.display())]
    KeyFileEncrypted { path: PathBuf },
    /// OpenSSH ignores a private key others may read (`UNPROTECTED PRIVATE KEY FILE`); so do we.
    #[error("SSH key file {} has permissions {mode:04o}, which are too open: a private key \
             must not be accessible by others, so it is ignored, as OpenSSH does \
             (chmod 600 {})", path.display(), path.display())]
    KeyFileTooOpen { path: PathBuf, mode: u32 },
    #[error("no SSH key configured")]
    NoIdentity,
    #[error("authentication failed for user '{user}' with key(s) {}{}", tried.join(", "),
            if remaining.is_empty() { String::new() } else { format!(" (server accepts: {})", remaining.join(", ")) })]
    AuthFailed {
        user: String,
        /// The keys offered: path and fingerprint.
        tried: Vec<String>,
        /// The methods the server said could continue.
        remaining: Vec<String>,
    },
    #[error("SSH negotiation failed: {0}")]
    Negotiation(String),
    #[error("SSH channel failure: {0}")]
    Channel(String),
    #[error("remote command not found (exit 127): {command}")]
    CommandNotFound { command: String },
    #[error("remote command {status}: {command}")]
    CommandFailed { command: String, status: ExitStatus },
    #[error("disconnected: {0}")]
    Disconnected(String),
    #[error("invalid remote command line: {0}")]
    Quote(#[from] ShellQuoteError),
}

/// Where a connection attempt was when it timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stage {
    #[default]
    TcpConnect,
    Banner,
    KeyExchange,
    Authentication,
    Ready,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::TcpConnect => "TCP connect",
            Stage::Banner => "wait for the SSH server's banner",
            Stage::KeyExchange => "SSH key exchange",
            Stage::Authentication => "SSH authentication",
            Stage::Ready => "session setup",
        })
    }
}
