//! One long-running process (nix-daemon or sshd) in its own private mount namespace, with a
//! temp dir bound over `/nix` (and optionally over `/etc/nix`), a private `/run`, and for the
//! chrooted Nix versions (2.26, 2.34) a chroot; plus running further commands inside that
//! namespace via `nsenter`.
//!
//! Owns: the mount layout script, the namespace's identity, and stopping every process in that
//! namespace by pid when dropped.
//!
//! Must never: signal a process outside the namespace it created (the namespace id is checked
//! against our own before any sweep), mount anything in the host's namespace, or leave a
//! process behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::Nix;
use super::procs::{mnt_ns_of, pids_in_namespace, with_descendants};

/// PATH for everything run in a namespace (daemon, sshd, clients).
pub(crate) const STD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Build-user lock files (`<state>/userpool/<uid>`) shared by every store the harness starts,
/// in every namespace and chroot, for every Nix version: Nix locks a build uid there before it
/// kills all of that uid's processes and builds. Sharing the directory keeps two stores from
/// ever using the same uid at once, even when their build-users groups overlap.
pub(crate) const SHARED_USERPOOL: &str = "/run/nix-lazy-builder-tests/userpool";

/// What the namespace looks like from inside.
pub(crate) struct Layout {
    pub nix: Nix,
    /// Host directory mounted over `/nix`.
    pub nix_dir: PathBuf,
    /// Host directory mounted over `/etc/nix`, if any.
    pub etc_nix: Option<PathBuf>,
    /// Host directories that must be visible at the same path (only matters in a chroot; the
    /// host's temp dir always is).
    pub expose: Vec<PathBuf>,
}

impl Layout {
    /// A `sh` script that builds the layout and then `exec`s its positional arguments.
    fn script(&self) -> String {
        use super::sh_quote as q;
        let mut s = String::from("set -eu\n");
        let root = match self.nix.chroot() {
            None => String::new(),
            Some(ch) => {
                let r = q(ch);
                // Bind the chroot onto itself: Nix's sandbox refuses to work in a plain chroot.
                s += &format!("mount --bind {r} {r}\n");
                s += &format!("mount --rbind /dev {r}/dev\n");
                s += &format!("mount --rbind /sys {r}/sys\n");
                s += &format!("mount -t proc nlb-proc {r}/proc\n");
                // The host's temp dir at the same path: every test's temp dirs (expression
                // files, keys, configs, other stores' files) are visible in the chroot.
                let tmp = std::env::temp_dir();
                if tmp != Path::new("/tmp") {
                    s += &format!("mount -t tmpfs -o mode=1777 nlb-tmp {r}/tmp\n");
                }
                let inside = q(format!("{}{}", ch.display(), tmp.display()));
                s += &format!("mkdir -p {inside}\nmount --rbind {} {inside}\n", q(&tmp));
                ch.to_string_lossy().into_owned()
            }
        };
        let at = |p: &str| q(format!("{root}{p}"));
        s += &format!("mkdir -p {}\n", at("/nix"));
        s += &format!("mount --bind {} {}\n", q(&self.nix_dir), at("/nix"));
        s += &format!(
            "mount --bind {} {}\n",
            q(SHARED_USERPOOL),
            at("/nix/var/nix/userpool")
        );
        if let Some(etc) = &self.etc_nix {
            s += &format!("mkdir -p {}\n", at("/etc/nix"));
            s += &format!("mount --bind {} {}\n", q(etc), at("/etc/nix"));
        }
        // A private /run (after the binds above: the shared userpool lives in the host's /run).
        s += &format!("mount -t tmpfs -o mode=0755 nlb-run {}\n", at("/run"));
        s += &format!("mkdir -p {}\n", at("/run/sshd"));
        if !root.is_empty() {
            let mut expose = self.expose.clone();
            expose.sort();
            expose.dedup();
            let tmp = std::env::temp_dir();
            for d in expose.into_iter().filter(|d| !d.starts_with(&tmp)) {
                let inside = at(&d.to_string_lossy());
                s += &format!("mkdir -p {inside}\nmount --bind {} {inside}\n", q(&d));
            }
            s += &format!("exec chroot {} \"$@\"\n", q(&root));
        } else {
            s += "exec \"$@\"\n";
        }
        s
    }
}

/// A process started as `unshare -m` + layout + exec, and everything else later found in its
/// mount namespace.
pub(crate) struct NsProcess {
    label: String,
    child: Child,
    chroot: Option<PathBuf>,
    /// `mnt:[…]` of the namespace, once confirmed to differ from ours, and an open fd on it:
    /// the fd keeps the namespace (and so its inode number) alive until the sweep is done,
    /// otherwise a new namespace could reuse the number and the sweep would hit strangers.
    ns_id: Option<(String, fs::File)>,
    log: PathBuf,
}

impl NsProcess {
    /// Starts `argv` inside a fresh private mount namespace laid out as `layout`, with exactly
    /// the environment `env` (plus PATH), stdout and stderr appended to `log`.
    #[track_caller]
    pub fn spawn(
        label: &str,
        layout: &Layout,
        argv: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> Self {
        fs::create_dir_all(SHARED_USERPOOL)
            .unwrap_or_else(|e| panic!("cannot create {SHARED_USERPOOL}: {e}"));
        let userpool = layout.nix_dir.join("var/nix/userpool");
        fs::create_dir_all(&userpool)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", userpool.display()));
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open log {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot dup log fd: {e}"));
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(layout.script())
            .arg("nlb-ns")
            .args(argv)
            .env_clear()
            .env("PATH", STD_PATH)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{label}: cannot run unshare: {e}"));
        NsProcess {
            label: label.to_owned(),
            child,
            chroot: layout.nix.chroot().map(Path::to_path_buf),
            ns_id: None,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the main process is still running (reaps it if not).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How the main process ended, if it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The log file's text (stdout+stderr of the main process and its children).
    pub fn log_text(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Records the namespace id once the process has left our namespace. Call only after
    /// readiness (the main process exec'd the service), so it cannot be read too early.
    #[track_caller]
    pub fn confirm_namespace(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let ours = mnt_ns_of("self").unwrap_or_else(|| panic!("cannot read /proc/self/ns/mnt"));
        let pid = self.pid();
        let file = fs::File::open(format!("/proc/{pid}/ns/mnt"))
            .unwrap_or_else(|e| panic!("{}: cannot open /proc/{pid}/ns/mnt: {e}", self.label));
        let ino = file
            .metadata()
            .unwrap_or_else(|e| panic!("{}: fstat of the namespace fd: {e}", self.label))
            .ino();
        let theirs = format!("mnt:[{ino}]");
        assert_ne!(
            theirs, ours,
            "{}: pid {pid} is ready but still in the test's own mount namespace",
            self.label
        );
        assert!(
            self.alive(),
            "{}: pid {pid} exited while its namespace was being recorded:\n{}",
            self.label,
            self.log_text()
        );
        self.ns_id = Some((theirs, file));
    }

    /// A command that runs `program` inside the namespace (and chroot), environment cleared
    /// except PATH and HOME=/root; add more with `.env()`.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-m", "-t", &self.pid().to_string(), "--"]);
        if let Some(root) = &self.chroot {
            c.arg("chroot").arg(root);
        }
        c.arg(program)
            .env_clear()
            .env("PATH", STD_PATH)
            .env("HOME", "/root")
            .current_dir("/");
        c
    }

    /// Stops the main process (SIGTERM, then SIGKILL) and then SIGKILLs every process left in
    /// its namespace until none is left; reaps the main process.
    pub fn stop(&mut self) {
        let pid = self.pid() as libc::pid_t;
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = self.child.wait();
        // Dropping the fd at the end of this function lets the namespace go.
        let Some((ns, _ns_fd)) = self.ns_id.take() else {
            return;
        };
        if mnt_ns_of("self").as_deref() == Some(ns.as_str()) {
            return; // never sweep our own namespace
        }
        let whose = format!("{} (namespace {ns})", self.label);
        sigkill_until_gone(&whose, Duration::from_millis(20), || {
            pids_in_namespace(&ns)
                .into_iter()
                .map(|p| p as libc::pid_t)
                .collect()
        });
    }
}

impl NsProcess {
    /// Every live process of this namespace and every descendant of one (a build sandbox has a
    /// mount namespace of its own but is still a child of the store's process), the main
    /// process included. Empty before [`NsProcess::confirm_namespace`].
    pub fn processes(&self) -> Vec<u32> {
        let Some((ns, _)) = &self.ns_id else {
            return Vec::new();
        };
        if mnt_ns_of("self").as_deref() == Some(ns.as_str()) {
            return Vec::new();
        }
        with_descendants(&pids_in_namespace(ns))
            .into_iter()
            .filter(|&p| super::alive(p))
            .collect()
    }

    /// SIGKILLs, at once and without warning, the main process, everything in its namespace
    /// and all their descendants, until none is left (a machine losing power); reaps the main
    /// process. The namespace stays recorded, so dropping the handle later is harmless.
    pub fn kill_now(&mut self) {
        // Every process seen stays a target until it is gone: one whose parent died first is
        // reparented out of the descendants `processes` follows (a sandboxed build's `sleep`).
        let mut seen = std::collections::BTreeSet::new();
        let label = self.label.clone();
        sigkill_until_gone(&label, Duration::from_millis(10), || {
            seen.extend(self.processes());
            seen.retain(|&p| super::alive(p));
            let mut left: Vec<libc::pid_t> = seen.iter().map(|&p| p as libc::pid_t).collect();
            if matches!(self.child.try_wait(), Ok(None)) {
                left.push(self.pid() as libc::pid_t);
            }
            left
        });
        let _ = self.child.wait();
    }
}

/// SIGKILLs the processes `targets` names, round after round (`pause` apart), until it names
/// none; after 10 s says on stderr which ones, of `whose`, survived, and gives up. `targets`
/// names only processes of a namespace the harness created (or descendants of one), or its
/// own unreaped child.
pub(crate) fn sigkill_until_gone(
    whose: &str,
    pause: Duration,
    mut targets: impl FnMut() -> Vec<libc::pid_t>,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = targets();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("{whose}: processes {left:?} survived SIGKILL for 10 s");
            break;
        }
        for p in left {
            // SAFETY: kill(2) on a process `targets` vouches for (see above).
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        thread::sleep(pause);
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
