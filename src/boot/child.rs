//! One backend process (qemu, darling's shell client, a `command`): spawned as the leader of its
//! own process group, watched until it ends, reaped exactly once, and never left behind.
//!
//! Owns: spawning (process-wrap: new process group + kill-on-drop), the waiter task that
//! observes the leader's exit and reaps it, group-wide signals, and the watchdog that kills the
//! group if this process (the supervisor) dies.
//!
//! Must never: signal a process group after its leader has been reaped (the pid, and so the
//! group id, may belong to someone else by then), or leave a zombie or a live group member
//! behind once the leader is gone.
//!
//! # How nothing is orphaned
//!
//! - Every backend process leads its own process group, so signals reach its children too.
//! - On Linux the waiter learns of the leader's exit through a pidfd *without reaping it*: the
//!   leader stays a zombie, which keeps its pid (= the group id) reserved while the waiter
//!   SIGKILLs whatever is left in the group. Only then is the leader reaped. Group signals are
//!   sent under the same lock that marks the leader reaped, so a signal can never hit a reused
//!   id. (Elsewhere the leader is reaped first and the sweep is best effort.)
//! - Dropping the handle SIGKILLs the whole group; the waiter task still reaps the leader.
//! - A watchdog (`/bin/sh` reading a pipe whose only writer is this process) SIGKILLs the group
//!   when the pipe reaches EOF, i.e. when this process dies, however it dies (SIGKILL too).
//!   It is disarmed (killed) as soon as the leader has exited. `PR_SET_PDEATHSIG` was not used:
//!   it only covers the direct child, not the group, and fires when the *thread* that spawned
//!   the child exits (a tokio blocking-pool thread retiring would kill a healthy VM).

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use process_wrap::tokio::{ChildWrapper, CommandWrap, KillOnDrop, ProcessGroup};
use tokio::sync::watch;
use tracing::{debug, warn};

/// What to run.
pub(super) struct SpawnSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Added to the inherited environment.
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    pub stdout: File,
    pub stderr: File,
}

/// How the leader ended, as the waiter saw it.
#[derive(Clone, Debug)]
pub(super) struct Exit {
    /// `Err` when waiting itself failed (should not happen).
    pub status: Result<ExitStatus, String>,
    pub at: Instant,
}

#[derive(Default)]
struct Shared {
    /// Set (under the lock) right before the leader is reaped; group signals check it under
    /// the same lock.
    reaped: bool,
}

/// A running (or finished) backend process.
pub(super) struct Child {
    pid: u32,
    shared: Arc<Mutex<Shared>>,
    exit: watch::Receiver<Option<Exit>>,
}

impl Child {
    /// Spawns `spec` as a new process group leader with a watchdog. Must be called inside a
    /// tokio runtime.
    pub fn spawn(spec: SpawnSpec) -> io::Result<Child> {
        let mut cmd = CommandWrap::with_new(&spec.program, |c| {
            c.args(&spec.args)
                .envs(spec.env.iter().map(|(k, v)| (k, v)))
                .current_dir(&spec.cwd)
                .stdin(Stdio::null())
                .stdout(Stdio::from(spec.stdout))
                .stderr(Stdio::from(spec.stderr));
        });
        cmd.wrap(ProcessGroup::leader()).wrap(KillOnDrop);
        let child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("the child was reaped before its pid was read"))?;
        let watchdog = match Watchdog::arm(pid) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(pid, error = %e, "cannot start the watchdog; the process group will not be killed if this process dies");
                None
            }
        };
        let pidfd = open_pidfd(pid);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (tx, rx) = watch::channel(None);
        tokio::spawn(waiter(child, pid, pidfd, watchdog, shared.clone(), tx));
        Ok(Child {
            pid,
            shared,
            exit: rx,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit, if the leader has ended.
    pub fn try_exit(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// Resolves when the leader has ended and been reaped. Cancel-safe.
    pub async fn wait(&mut self) -> Exit {
        loop {
            if let Some(e) = self.exit.borrow_and_update().clone() {
                return e;
            }
            if self.exit.changed().await.is_err() {
                // The waiter is gone without a result: only when the runtime shuts down.
                return self.exit.borrow().clone().unwrap_or(Exit {
                    status: Err("the process waiter stopped".into()),
                    at: Instant::now(),
                });
            }
        }
    }

    /// [`Child::wait`] with a time limit.
    pub async fn wait_for(&mut self, limit: Duration) -> Option<Exit> {
        tokio::time::timeout(limit, self.wait()).await.ok()
    }

    /// Sends `sig` to the whole process group. `Ok(false)`: the leader was already reaped,
    /// nothing was sent.
    pub fn signal_group(&self, sig: i32) -> io::Result<bool> {
        let guard = self
            .shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.reaped {
            return Ok(false);
        }
        killpg(self.pid, sig)?;
        Ok(true)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        match self.signal_group(libc::SIGKILL) {
            Ok(true) => debug!(pid = self.pid, "killed the process group on drop"),
            Ok(false) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => warn!(pid = self.pid, error = %e, "cannot kill the process group"),
        }
    }
}

fn killpg(pgid: u32, sig: i32) -> io::Result<()> {
    let pgid = libc::pid_t::try_from(pgid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: killpg has no memory-safety preconditions.
    if unsafe { libc::killpg(pgid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(target_os = "linux")]
fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Some(fd),
        Err(e) => {
            debug!(error = %e, "pidfd_open failed; falling back to reap-then-sweep");
            None
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn open_pidfd(_pid: u32) -> Option<OwnedFd> {
    None
}

/// Waits until the process behind `pidfd` has exited, without reaping it.
#[cfg(target_os = "linux")]
async fn pidfd_exited(pidfd: OwnedFd) -> io::Result<()> {
    // SAFETY: the AsyncFd owns `pidfd` (an OwnedFd, whose as_raw_fd never changes) and nothing
    // else closes it.
    let afd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)?;
    let _guard = afd.readable().await?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
async fn pidfd_exited(_pidfd: OwnedFd) -> io::Result<()> {
    Err(io::Error::other("no pidfd on this system"))
}

async fn waiter(
    mut child: Box<dyn ChildWrapper>,
    pid: u32,
    pidfd: Option<OwnedFd>,
    watchdog: Option<Watchdog>,
    shared: Arc<Mutex<Shared>>,
    tx: watch::Sender<Option<Exit>>,
) {
    let zombie_held = match pidfd {
        Some(fd) => match pidfd_exited(fd).await {
            Ok(()) => true,
            Err(e) => {
                debug!(pid, error = %e, "pidfd wait failed; reaping directly");
                false
            }
        },
        None => false,
    };
    // The leader is a zombie (zombie_held) or may still run: sweep the rest of the group while
    // its id cannot be reused, then mark it reaped and reap it.
    {
        let mut guard = shared.lock().unwrap_or_else(|p| p.into_inner());
        if zombie_held {
            sweep(pid);
        }
        guard.reaped = true;
    }
    drop(watchdog);
    let status = child.wait().await.map_err(|e| e.to_string());
    if !zombie_held {
        // Best effort: the id could in theory have been reused already.
        sweep(pid);
    }
    debug!(pid, ?status, "backend process ended");
    let _ = tx.send(Some(Exit {
        status,
        at: Instant::now(),
    }));
}

fn sweep(pgid: u32) {
    match killpg(pgid, libc::SIGKILL) {
        Ok(()) => debug!(pgid, "killed what was left of the process group"),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
        Err(e) => debug!(pgid, error = %e, "sweep of the process group failed"),
    }
}

/// `/bin/sh` blocked reading a pipe whose write end only we hold; at EOF (we died) it kills
/// the group. Dropping it kills the watchdog (kill-on-drop) before the pipe closes.
struct Watchdog {
    // Field order: the process is killed before the pipe's write end is closed.
    _proc: tokio::process::Child,
    _write: OwnedFd,
}

/// The watchdog's script: `$1` is the process group id.
const WATCHDOG_SCRIPT: &str = r#"read -r line; kill -9 "-$1" 2>/dev/null"#;

impl Watchdog {
    fn arm(pgid: u32) -> io::Result<Watchdog> {
        let (read, write) = pipe_cloexec()?;
        let proc = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("nix-lazy-builder-watchdog")
            .arg(pgid.to_string())
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/")
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Watchdog {
            _proc: proc,
            _write: write,
        })
    }
}

fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0 as libc::c_int; 2];
    #[cfg(any(target_os = "linux", target_os = "freebsd"))]
    // SAFETY: fds points to two c_ints, as pipe2 requires.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    #[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
    // SAFETY: fds points to two c_ints, as pipe requires.
    let rc = unsafe {
        let rc = libc::pipe(fds.as_mut_ptr());
        if rc == 0 {
            libc::fcntl(fds[0], libc::F_SETFD, libc::FD_CLOEXEC);
            libc::fcntl(fds[1], libc::F_SETFD, libc::FD_CLOEXEC);
        }
        rc
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// "exited with status 1", "was killed by signal 9 (SIGKILL)".
pub(super) fn describe_status(status: &Result<ExitStatus, String>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(sig)) => match signal_name(sig) {
                Some(n) => format!("was killed by signal {sig} ({n})"),
                None => format!("was killed by signal {sig}"),
            },
            (None, None) => format!("ended ({s})"),
        },
        Err(e) => format!("ended, but waiting for it failed: {e}"),
    }
}

pub(super) fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn status_texts() {
        assert_eq!(
            describe_status(&Ok(ExitStatus::from_raw(1 << 8))),
            "exited with status 1"
        );
        assert_eq!(
            describe_status(&Ok(ExitStatus::from_raw(libc::SIGKILL))),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_status(&Ok(ExitStatus::from_raw(64))),
            "was killed by signal 64"
        );
        assert!(describe_status(&Err("x".into())).contains("waiting for it failed: x"));
    }

    fn log_files(dir: &std::path::Path) -> (File, File) {
        let f = File::create(dir.join("log")).unwrap();
        (f.try_clone().unwrap(), f)
    }

    fn alive(pid: u32) -> bool {
        // A zombie counts as gone.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => !s
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    async fn read_pid(path: &std::path::Path) -> u32 {
        for _ in 0..200 {
            if let Ok(s) = std::fs::read_to_string(path)
                && let Ok(p) = s.trim().parse()
            {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no pid in {}", path.display());
    }

    fn sh(dir: &std::path::Path, script: &str) -> SpawnSpec {
        let (out, err) = log_files(dir);
        SpawnSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![],
            cwd: dir.to_owned(),
            stdout: out,
            stderr: err,
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn leader_exit_sweeps_the_group_and_reaps() {
        let dir = tempfile::tempdir().unwrap();
        // The leader leaves a grandchild behind in its group and exits 3.
        let mut c = Child::spawn(sh(dir.path(), "sleep 300 & echo $! > gc.pid; exit 3")).unwrap();
        let gc = read_pid(&dir.path().join("gc.pid")).await;
        let exit = c.wait_for(Duration::from_secs(10)).await.expect("exit");
        assert_eq!(exit.status.unwrap().code(), Some(3));
        for _ in 0..100 {
            if !alive(gc) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(gc), "grandchild {gc} survived its group leader");
        // Reaped: no zombie of ours remains, and signals are refused.
        assert!(!alive(c.pid()));
        assert!(!c.signal_group(libc::SIGTERM).unwrap());
        // wait() again returns the same exit (cancel-safe, repeatable).
        let again = c.wait().await;
        assert_eq!(again.status.unwrap().code(), Some(3));
    }

    #[tokio::test]
    async fn drop_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let c = Child::spawn(sh(dir.path(), "sleep 300 & echo $! > gc.pid; wait")).unwrap();
        let gc = read_pid(&dir.path().join("gc.pid")).await;
        let leader = c.pid();
        assert!(alive(gc) && alive(leader));
        drop(c);
        for _ in 0..200 {
            if !alive(gc) && !alive(leader) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(gc), "grandchild survived the drop");
        assert!(!alive(leader), "leader survived the drop");
    }

    #[tokio::test]
    async fn group_signal_reaches_children() {
        let dir = tempfile::tempdir().unwrap();
        // The shell ignores nothing; TERM to the group ends sleep and shell.
        let mut c = Child::spawn(sh(dir.path(), "sleep 300; exit 0")).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(c.try_exit().is_none());
        assert!(c.signal_group(libc::SIGTERM).unwrap());
        let exit = c.wait_for(Duration::from_secs(10)).await.expect("exit");
        assert_eq!(exit.status.unwrap().signal(), Some(libc::SIGTERM));
    }
}
