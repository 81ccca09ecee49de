//! The build socket's protocol, between the external-build client and the supervisor's side
//! ([`Frame`]: one JSON line each, a NAR's bytes after a [`Frame::Output`]), and where the
//! socket is. Pure: must never do I/O.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Nix's default `build-users-group`: the build socket's group when Nix's configuration names
/// none.
pub const DEFAULT_BUILD_USERS_GROUP: &str = "nixbld";
/// The longest line read on the build socket (a request carries the whole build.json).
pub const MAX_LINE: usize = crate::external::job::MAX_FILE_BYTES as usize + 4096;

/// The build socket for a state directory: beside it (the state directory itself is private to
/// root), `<state-dir>.build.sock`.
pub fn build_socket_path(state_dir: &Path) -> PathBuf {
    let mut name = state_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "lazy-builder".into());
    name.push(".build.sock");
    state_dir.with_file_name(name)
}

/// The first line a client sends, with its log pipe's write end attached.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    pub external_build: u32,
}

/// The second line: the build.json the daemon wrote, as it is (the root side validates it
/// again itself).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BuildRequest {
    pub build_json: String,
}

/// What the root side tells the client.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Frame {
    /// The supervisor turned the connection away (not a build user, …).
    Refused(String),
    /// The request was accepted and the build is under way: the client tells nix-daemon so
    /// (`\x02`), and everything on the log pipe from now on is the build log.
    Started,
    /// One output's NAR follows, exactly `nar_size` bytes.
    Output {
        name: String,
        path: String,
        /// base16 sha256 of the NAR, as the builder vouched for it.
        nar_hash: String,
        nar_size: u64,
    },
    /// Every output was sent.
    Done,
    /// The build did not produce its outputs.
    Failed { message: String, exit_code: u8 },
}

impl Frame {
    /// The frame as one line.
    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| b"\"Done\"".to_vec());
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_socket_is_beside_the_state_dir() {
        assert_eq!(
            build_socket_path(Path::new("/nix/var/nix/lazy-builder")),
            Path::new("/nix/var/nix/lazy-builder.build.sock")
        );
    }

    #[test]
    fn frames_are_one_line_each_and_read_back() {
        for f in [
            Frame::Started,
            Frame::Output {
                name: "out".into(),
                path: "/nix/store/x".into(),
                nar_hash: "ab".into(),
                nar_size: 3,
            },
            Frame::Failed {
                message: "a\nb".into(),
                exit_code: 100,
            },
        ] {
            let line = f.to_line();
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(serde_json::from_slice::<Frame>(&line).unwrap(), f);
        }
    }
}
