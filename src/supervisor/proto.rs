//! The supervisor's socket protocol: what hooks and the CLI ask, and what the supervisor
//! answers. One JSON object per line in each direction, over the unix socket
//! `<state-dir>/supervisor.sock` ([`super::paths::socket_path`]); requests are answered in
//! order. The supervisor speaks first: one [`Response::Hello`] line as soon as it has accepted
//! the connection. A line that is not a valid request is answered with [`Response::Error`] and
//! the connection stays usable.
//!
//! A connection is a client's identity: every lease it takes is released when it closes, so a
//! hook that dies (even by SIGKILL) frees its slot. This module is types only; it never does I/O.

use serde::{Deserialize, Serialize};

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
