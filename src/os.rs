//! The few operating-system chores several rooms share: private directories (0700, made so even
//! when they already existed) and descriptor clean-up (close or mark close-on-exec every
//! descriptor from a number up, tell whether a descriptor is open). One implementation of each,
//! so that the hook, the remote log, the supervisor and its detached start behave alike.
//!
//! It must never decide which descriptors a caller keeps (callers name the first one to clean
//! up), close a descriptor the caller did not vouch for (the closing functions are `unsafe`),
//! or allocate in [`ChildCloexec::apply`], which runs between `fork` and `exec`.

use std::fs::DirBuilder;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Where the kernel lists this process's open descriptors (Linux; `/dev/fd` elsewhere).
const FD_DIRS: [&str; 2] = ["/proc/self/fd", "/dev/fd"];

/// The highest descriptor number walked when none of [`FD_DIRS`] can be read and the
/// descriptor limit is unknown.
const FALLBACK_LIMIT: RawFd = 65536;

/// Create `path` as a directory only its owner can use (0700); parents are created normally.
/// An existing directory is made 0700 too.
pub fn ensure_private_dir(path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    match DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
        Err(e) => return Err(e),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Whether descriptor `fd` is open in this process.
pub fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the flags of a descriptor number; one that is not open fails.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Close descriptor `fd`; one that is not open is left alone.
///
/// # Safety
/// Nothing in this process may own `fd` (an `OwnedFd`, a `File`, a runtime's socket): it is a
/// number inherited from whoever started the process.
pub unsafe fn close(fd: RawFd) {
    // SAFETY: the caller vouches that nothing owns `fd`; closing a closed number fails harmlessly.
    unsafe { libc::close(fd) };
}

/// Close every descriptor from `first` up.
///
/// # Safety
/// Nothing in this process may own any of those descriptors yet: call it first thing in
/// `main`, before anything opens a file, a socket or a runtime.
pub unsafe fn close_from(first: RawFd) {
    if close_range(first, 0) {
        return;
    }
    // Listing the directory opens a descriptor of its own; it is closed with the others and
    // closing it twice fails harmlessly.
    let fds = open_descriptors(first).unwrap_or_else(|| (first..1024).collect());
    for fd in fds {
        // SAFETY: the caller vouches that nothing owns these numbers.
        unsafe { close(fd) };
    }
}

/// Mark every descriptor from `first` up close-on-exec, so that no child started later inherits
/// them (it only changes flags; every descriptor stays usable here).
pub fn cloexec_from(first: RawFd) {
    if close_range(first, CLOSE_RANGE_CLOEXEC) {
        return;
    }
    match open_descriptors(first) {
        Some(fds) => fds.into_iter().for_each(set_cloexec),
        None => (first..descriptor_limit()).for_each(set_cloexec),
    }
}

/// [`cloexec_from`] for a `pre_exec` closure, which may only make async-signal-safe system
/// calls: [`ChildCloexec::new`] reads the descriptor limit before the fork, and
/// [`ChildCloexec::apply`] allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildCloexec {
    first: RawFd,
    limit: RawFd,
}

impl ChildCloexec {
    /// Prepare to mark every descriptor from `first` up (call it before spawning).
    pub fn new(first: RawFd) -> Self {
        ChildCloexec {
            first,
            limit: descriptor_limit(),
        }
    }

    /// Mark them, in the child between fork and exec.
    pub fn apply(self) {
        if close_range(self.first, CLOSE_RANGE_CLOEXEC) {
            return;
        }
        self.walk();
    }

    /// The fallback without `close_range`: every number up to the limit.
    fn walk(self) {
        (self.first..self.limit).for_each(set_cloexec);
    }
}

/// `close_range(2)`'s flag that marks instead of closing (Linux 5.11).
const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;

/// `close_range(first, ~0, flags)`; `false` where the system call is missing (old kernels,
/// other systems), so that the caller walks the descriptors itself.
fn close_range(first: RawFd, flags: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        let Ok(first) = u32::try_from(first) else {
            return false;
        };
        // SAFETY: close_range takes plain numbers. With CLOSE_RANGE_CLOEXEC it only sets flags;
        // without, the caller (`close_from`) vouches that nothing owns the descriptors.
        unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, flags) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (first, flags);
        false
    }
}

/// Set close-on-exec on `fd` if it is open and does not have it (async-signal-safe).
fn set_cloexec(fd: RawFd) {
    // SAFETY: F_GETFD/F_SETFD only read and change the close-on-exec flag of a descriptor
    // number; one that is not open fails harmlessly.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

/// The open descriptors from `first` up, as the kernel lists them; `None` if it cannot.
fn open_descriptors(first: RawFd) -> Option<Vec<RawFd>> {
    FD_DIRS.iter().find_map(|dir| {
        let entries = std::fs::read_dir(dir).ok()?;
        Some(
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|&fd| fd >= first)
                .collect(),
        )
    })
}

/// One past the highest descriptor number this process may open (`RLIMIT_NOFILE`, at most
/// 2^20).
fn descriptor_limit() -> RawFd {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if ok && lim.rlim_cur != libc::RLIM_INFINITY {
        RawFd::try_from(lim.rlim_cur.min(1 << 20)).unwrap_or(1 << 20)
    } else {
        FALLBACK_LIMIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A descriptor without close-on-exec at the number `at` (high, so that no other test's
    /// descriptor is touched).
    fn inheritable_at(at: RawFd) -> OwnedFd {
        let f = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: dup2 onto a number nothing in this test process uses; the result is owned
        // by the returned OwnedFd alone. dup2 clears close-on-exec on the new number.
        let fd = unsafe { libc::dup2(f.as_raw_fd(), at) };
        assert_eq!(fd, at);
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn cloexec(fd: RawFd) -> bool {
        // SAFETY: reads the flags of a descriptor this test owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        flags >= 0 && flags & libc::FD_CLOEXEC != 0
    }

    #[test]
    fn private_dirs_are_0700_even_when_they_existed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/state");
        ensure_private_dir(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(ensure_private_dir(&file).is_err(), "a file is no directory");
    }

    #[test]
    fn open_descriptors_are_told_from_closed_ones() {
        let fd = inheritable_at(1001);
        assert!(is_open(1001));
        drop(fd);
        assert!(!is_open(1001));
    }

    #[test]
    fn cloexec_marks_every_descriptor_from_the_first_and_none_below() {
        let below = inheritable_at(1010);
        let at = inheritable_at(1011);
        let above = inheritable_at(1012);
        cloexec_from(1011);
        assert!(!cloexec(below.as_raw_fd()));
        assert!(cloexec(at.as_raw_fd()) && cloexec(above.as_raw_fd()));
        // The child's walk (where close_range is missing) marks the same, up to its limit.
        let a = inheritable_at(1020);
        let b = inheritable_at(1021);
        let c = inheritable_at(1022);
        ChildCloexec {
            first: 1021,
            limit: 1022,
        }
        .walk();
        assert!(!cloexec(a.as_raw_fd()) && cloexec(b.as_raw_fd()) && !cloexec(c.as_raw_fd()));
        ChildCloexec::new(1022).apply();
        assert!(cloexec(c.as_raw_fd()));
    }

    #[test]
    fn the_kernel_lists_the_open_descriptors() {
        let fd = inheritable_at(1030);
        let listed = open_descriptors(1030).expect("a descriptor directory");
        assert!(listed.contains(&fd.as_raw_fd()), "{listed:?}");
        assert!(listed.iter().all(|&n| n >= 1030), "{listed:?}");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn close_from_closes_every_descriptor_from_the_first() {
        // A child process, so that closing "everything from n up" cannot reach this test
        // process's own descriptors: it closes from 1040 and reports what is still open.
        let keep = inheritable_at(1039);
        let gone = inheritable_at(1040);
        let gone_too = inheritable_at(1041);
        // SAFETY: fork in a test; the child only makes system calls (close_range: Linux 5.11,
        // which the test machines have) and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: in the child nothing owns 1040 and up but the copies of the test's
            // OwnedFds, which the child never uses again.
            unsafe { close_from(1040) };
            let code = i32::from(is_open(1039))
                | i32::from(!is_open(1040)) << 1
                | i32::from(!is_open(1041)) << 2;
            // SAFETY: leave the child at once, without running the test harness's atexit.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0b111, "keep, close, close");
        drop((keep, gone, gone_too));
    }
}
