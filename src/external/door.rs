//! The build socket: the supervisor's door for external builds. Binds
//! `<state-dir>.build.sock` (mode 0660, group: Nix's `build-users-group`, looked up with
//! `getgrnam_r` so NSS and macOS' directory services answer too), checks every peer's
//! credentials (`SO_PEERCRED`: root or the build-users group; everyone else is refused with a
//! line saying so), takes the client's log pipe from its first line and starts one
//! `external-serve` helper per build with the connection as its fd 0 and the pipe as its fd 2.
//!
//! Must never: run a build in the supervisor's own process, let anyone but root or a build user
//! start a helper, or keep a client's descriptor after the helper has it.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use super::proto::{Frame, Hello, build_socket_path};

/// Who may use the build socket: root, or a process whose group is the build-users group.
pub fn allowed(uid: u32, gid: u32, build_gid: Option<u32>) -> bool {
    uid == 0 || build_gid == Some(gid)
}

/// The gid of the group named `group`, as the system's group database has it (`None`: no such
/// group, or a name with a NUL byte).
pub fn group_gid(group: &str) -> Option<u32> {
    let name = std::ffi::CString::new(group).ok()?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: an all-zero `group` is a valid value for the out-parameter.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, and `buf` is as long as we say.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return (rc == 0 && !found.is_null()).then_some(grp.gr_gid);
    }
}

/// The open build socket.
pub struct Door {
    listener: UnixListener,
    path: PathBuf,
    build_gid: Option<u32>,
    /// The build-users group's name, for refusals.
    group: Option<String>,
    /// `--config` for the helpers (the supervisor's own, when it was named).
    config: Option<PathBuf>,
}

impl Door {
    /// Binds the build socket for `state_dir`: under a fresh name, made 0660 and given to the
    /// build-users group `group` (`None`: Nix builds as root, so only root is admitted), then
    /// renamed into place (nobody sees it with the umask's mode).
    pub fn open(
        state_dir: &Path,
        config: Option<PathBuf>,
        group: Option<&str>,
    ) -> io::Result<Door> {
        let path = build_socket_path(state_dir);
        let fresh = path.with_extension("sock.new");
        let _ = std::fs::remove_file(&fresh);
        let listener = UnixListener::bind(&fresh)?;
        let build_gid = group.and_then(group_gid);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o660))?;
        match (build_gid, group) {
            (Some(gid), _) => std::os::unix::fs::chown(&fresh, None, Some(gid))?,
            (None, Some(g)) => tracing::warn!(
                "there is no group '{g}' (Nix's build-users-group): only root can use the build socket"
            ),
            (None, None) => {}
        }
        std::fs::rename(&fresh, &path)?;
        Ok(Door {
            listener,
            path,
            build_gid,
            group: group.map(ToOwned::to_owned),
            config,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections until the task is dropped.
    pub async fn serve(self) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let build_gid = self.build_gid;
                    let group = self.group.clone();
                    let config = self.config.clone();
                    tokio::spawn(async move {
                        if let Err(e) = admit(stream, build_gid, group, config).await {
                            tracing::warn!("external build: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("build socket: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for Door {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Checks the peer, takes its log pipe and hands the connection to a helper.
async fn admit(
    mut stream: UnixStream,
    build_gid: Option<u32>,
    group: Option<String>,
    config: Option<PathBuf>,
) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    if !allowed(cred.uid(), cred.gid(), build_gid) {
        let why = match group {
            Some(g) => format!(
                "uid {} gid {} is neither root nor in the build-users group '{g}'",
                cred.uid(),
                cred.gid()
            ),
            None => format!(
                "uid {} gid {} is not root, and Nix names no build-users group",
                cred.uid(),
                cred.gid()
            ),
        };
        let _ = stream
            .write_all(&Frame::Refused(why.clone()).to_line())
            .await;
        return Err(io::Error::other(format!("refused: {why}")));
    }
    let (line, mut fds) = crate::supervisor::fds::recv_line_with_fds(&stream, 4096).await?;
    let hello: Hello =
        serde_json::from_slice(&line).map_err(|e| io::Error::other(format!("not a hello: {e}")))?;
    if hello.external_build != 1 || fds.len() != 1 {
        let _ = stream
            .write_all(&Frame::Refused("a hello this supervisor does not speak".into()).to_line())
            .await;
        return Err(io::Error::other("a hello without exactly one log pipe"));
    }
    let log = fds.remove(0);
    let conn: OwnedFd = stream.into_std()?.into();
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("external-serve");
    if let Some(c) = &config {
        cmd.arg("--config").arg(c);
    }
    cmd.stdin(Stdio::from(conn))
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    let mut child = cmd.spawn()?;
    // The helper has them now: the log ends when it does.
    drop(cmd);
    tracing::info!(
        pid = child.id(),
        uid = cred.uid(),
        "external build: helper started"
    );
    let status = child.wait().await?;
    tracing::info!("external build: helper ended: {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_and_build_users() {
        assert!(allowed(0, 0, Some(30000)));
        assert!(allowed(30001, 30000, Some(30000)));
        assert!(!allowed(1000, 1000, Some(30000)));
        assert!(!allowed(1000, 1000, None));
    }

    #[test]
    fn the_group_is_looked_up_in_the_group_database() {
        // Every system has a group 0; no system has a group by this name or one with a NUL.
        assert_eq!(group_gid("root").or_else(|| group_gid("wheel")), Some(0));
        assert_eq!(group_gid("nlb-no-such-group-here"), None);
        assert_eq!(group_gid("nix\0bld"), None);
    }
}
