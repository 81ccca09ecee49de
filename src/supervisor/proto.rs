//! The supervisor's socket protocol: what hooks and the CLI ask, and what the supervisor
//! answers. One JSON object per line in each direction, over the unix socket
//! `<state-dir>/supervisor.sock` ([`super::paths::socket_path`]); requests are answered in
//! order. The supervisor speaks first: one [`Response::Hello`] line as soon as it has accepted
//! the connection. A line that is not a valid request is answered with [`Response::Error`] and
//! the connection stays usable.
//!
//! A connection is a client's identity: every lease it takes is released when it closes, so a
//! hook that dies (even by SIGKILL) frees its slot. A warm session ([`Request::LeaseSession`])
//! comes with three file descriptors (SCM_RIGHTS) on the line that answers it
//! ([`Response::Session`]); it does not depend on the connection it came on. This module is
//! types only; it never does I/O.

use serde::{Deserialize, Serialize};

use std::path::PathBuf;

/// An SSH target (`ssh::SshTarget`) as plain data, for another process of ours to connect with exactly the
/// same address, identities and accepted host keys (the supervisor's warm connections). The
/// keys are the ones `ssh::SshTarget::for_builder` chose, as OpenSSH public-key lines.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TargetSpec {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub identities: Vec<PathBuf>,
    pub host_keys: Vec<String>,
}

/// Which protocol a remote program speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// `nix-store --serve` (`ssh://`).
    Serve,
    /// `nix-daemon --stdio` (`ssh-ng://`).
    Worker,
}

/// What a warm session's handshake found, as the hook needs it to go on where the supervisor
/// stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "protocol", rename_all = "kebab-case")]
pub enum Handshake {
    Serve {
        /// The negotiated version, `[major, minor]`.
        version: [u8; 2],
        /// The server's own version.
        server: [u8; 2],
    },
    Worker {
        version: [u8; 2],
        /// The features both sides listed.
        features: Vec<String>,
        /// The features the daemon listed.
        server_features: Vec<String>,
        nix_version: Option<String>,
        /// Whether the daemon trusts us, when it says (worker ≥ 1.35).
        trusted: Option<bool>,
    },
}

/// Sent in [`Response::Hello`]; bumped when a change would confuse an older client.
pub const PROTOCOL_VERSION: u32 = 1;

/// A request from a hook or the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// The state of every lazy builder.
    Status,
    /// Boot `builder` if it is down (no-op if booting or up). Refused while a failure's backoff
    /// runs, unless `force` (the CLI's `up`).
    Boot {
        builder: String,
        #[serde(default)]
        force: bool,
    },
    /// Wait until `builder` is up (or failed, or down), at most `timeout_ms`; answers with
    /// [`Response::Builder`].
    WaitReady { builder: String, timeout_ms: u64 },
    /// Take a lease on a builder that is up: it is never stopped while a lease is held. Answered
    /// with [`Response::Leased`] or [`Response::Refused`].
    Lease { builder: String },
    /// Give a lease back (closing the connection does the same for all of its leases).
    Release { builder: String },
    /// A hook could not use a builder the supervisor said was up (SSH failed): remember the
    /// failure (backoff) and restart it.
    ReportFailure { builder: String, cause: String },
    /// Stop `builder` once its leases are released (the CLI's `down`).
    Down { builder: String },
    /// A warm session to the builder `spec` describes, if one is ready: answered with
    /// [`Response::Session`] (and its descriptors) or [`Response::NoSession`] at once, never
    /// after a wait; the pool warms up in the background either way.
    LeaseSession { spec: SessionSpec },
    /// Warm up the builder `spec` describes without taking a session (a hook that found no
    /// supervisor and started one asks this); answered with [`Response::Ok`].
    Warm { spec: SessionSpec },
}

/// A builder as the supervisor needs it to keep a connection warm, described by the hook that
/// asks: the supervisor does not know machines-table builders (they come in each hook's
/// settings), and uses exactly the target the hook's trust policy gave. Two specs with the
/// same target, command and protocol (and lazy builder) share one pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSpec {
    /// The builder's name in the hook's table (its store URI, for a machines line).
    pub builder: String,
    pub store_uri: String,
    /// One of the supervisor's lazy builders (named `builder`): its pool lives only while
    /// that builder is up, and never keeps it up.
    pub lazy: bool,
    /// Where to connect and which host keys to accept (`ssh::SshTarget::for_builder`'s).
    pub target: TargetSpec,
    /// The remote command line.
    pub command: String,
    pub protocol: Protocol,
    /// Close the connection after this long without a build (`keep-warm`).
    pub keep_warm_ms: u64,
    /// The builder's max-jobs: how many sessions can be in use at once.
    pub max_jobs: u32,
}

/// The supervisor's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Response {
    /// The first line on every connection, sent by the supervisor before any request is read,
    /// once it has counted the connection as a client (from then on it will not exit while the
    /// connection is open). A connection that ends before its hello reached a supervisor that was
    /// exiting: connect again (and start one if none answers).
    Hello {
        version: u32,
        pid: u32,
    },
    Status {
        builders: Vec<BuilderStatus>,
        /// The configuration file the supervisor serves (`None`: it has none to read again).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config_file: Option<std::path::PathBuf>,
        /// Why its last reload of that file failed (it runs the configuration it had), until
        /// one succeeds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config_error: Option<String>,
    },
    Builder {
        status: BuilderStatus,
    },
    Leased {
        status: BuilderStatus,
    },
    Refused {
        reason: String,
        status: Option<BuilderStatus>,
    },
    /// A warm session: its remote program's stdin/stdout, stderr and status sockets come with
    /// this line, in that order; `handshake` is what its handshake found.
    Session {
        handshake: Handshake,
    },
    /// No warm session is ready (why); connect directly.
    NoSession {
        reason: String,
    },
    Ok,
    Error {
        message: String,
    },
}

/// Where a builder is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Down,
    Booting,
    Up,
    /// Asked to stop; waits for its leases to be released. Takes no new leases.
    Draining,
    Stopping,
    /// The last boot or use failed; no boot until the backoff expires.
    Failed,
    /// Not a lazy builder: a machines-table or TOML builder that is always on, listed for its
    /// warm connection.
    AlwaysOn,
}

/// One builder as `status` shows it. Durations are milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuilderStatus {
    pub name: String,
    pub state: State,
    /// Where its sshd listens now (a qemu builder's forwarded port is chosen at boot).
    pub ssh_port: Option<u16>,
    /// Time spent in the current boot.
    pub booting_ms: Option<u64>,
    /// How long a boot usually takes (from earlier boots; a guess before the first).
    pub expected_boot_ms: Option<u64>,
    /// Time since it came up.
    pub uptime_ms: Option<u64>,
    /// Time until the idle stop, when up and unleased; `None` if it never stops or is in use.
    pub idle_stop_in_ms: Option<u64>,
    /// Leases held now (builds running on it).
    pub leases: u32,
    /// Boot tries since the supervisor started, the one under way included.
    pub boots: u32,
    /// Of those, the boots that reached readiness.
    #[serde(default)]
    pub boots_ok: u32,
    /// Of those, the boots that failed (could not start, timed out, exited before ready).
    #[serde(default)]
    pub boots_failed: u32,
    /// The running instance was booted with boot settings its configuration no longer has:
    /// they apply from its next boot.
    #[serde(default)]
    pub boot_settings_outdated: bool,
    pub last_failure: Option<Failure>,
    /// The remote Nix version seen by the readiness check.
    pub nix_version: Option<String>,
    /// Its warm connection, if the supervisor keeps one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmStatus>,
}

/// A builder's warm connection.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WarmStatus {
    /// Whether the SSH connection is up.
    pub connected: bool,
    /// Sessions ready to hand out.
    pub ready: u32,
    /// Sessions handed out and still running a build.
    pub in_use: u32,
    /// Sessions handed out since the connection was first made.
    pub hand_outs: u64,
    /// Time left before the connection closes for inactivity (`None` while in use).
    pub closes_in_ms: Option<u64>,
    /// Why the last attempt to connect or open a session failed, if it did.
    pub last_failure: Option<String>,
}

/// A remembered failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// One line: what went wrong.
    pub cause: String,
    /// Seconds since the epoch.
    pub at_unix: u64,
    /// Time left before a boot is tried again (0 once it expired).
    pub retry_in_ms: u64,
    /// Failures in a row (drives the exponential backoff).
    pub consecutive: u32,
}
