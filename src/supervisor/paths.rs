//! The state directory's layout, which the supervisor and its clients must agree on: the socket,
//! the lock, the auto-started supervisor's log, the boot history and the per-builder
//! directories. Names and path joins only; it must never create, open or remove anything.

use std::path::{Path, PathBuf};

/// The socket's file name inside the state directory.
pub const SOCKET_NAME: &str = "supervisor.sock";
/// Where the socket is bound before it is made 0600 and renamed to [`SOCKET_NAME`].
pub const SOCKET_FRESH_NAME: &str = ".supervisor.sock.new";
/// The lock file that makes sure one supervisor runs per state directory.
pub const LOCK_NAME: &str = "supervisor.lock";
/// Where an auto-started supervisor's stdout and stderr go.
pub const LOG_NAME: &str = "supervisor.log";
/// Boot durations, so that a restarted supervisor still knows how long a boot takes.
pub const HISTORY_NAME: &str = "boot-times.json";
/// Per-builder directories live under this directory of the state directory.
pub const BUILDERS_DIR: &str = "builders";

/// The socket path for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// The auto-started supervisor's log file for a state directory.
pub fn log_path(state_dir: &Path) -> PathBuf {
    state_dir.join(LOG_NAME)
}

/// Where builder `name`'s instances keep their files.
pub fn builder_dir(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(BUILDERS_DIR).join(name)
}
