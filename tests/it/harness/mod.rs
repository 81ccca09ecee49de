//! The one integration-test harness (of the test crate `tests/it`, and included as source by
//! benches/hook): real nix-daemons and real sshd "remote machines", each in its own private
//! mount namespace with its own throw-away `/nix`, so tests drive the real `nix-lazy-builder`
//! binary (or Nix's own hook) exactly as a user's daemon would.
//!
//! Owns: starting, querying and stopping those processes ([`LocalDaemon`], [`RemoteStore`]), the
//! Nix version selector ([`Nix`]), the test derivations ([`FakeDrv`]) and the one writer of
//! their Nix text ([`DrvExpr`]), command plumbing ([`CmdOutput`], [`run_one_test`]) and `/proc`
//! lookups (`procs.rs`); for lazy builders, a remote machine that a boot command starts
//! ([`LazyRemote`]) and the lazy-builder TOML, `status --json` and supervisor log around it
//! ([`LazyConfig`]). The parts only some areas need are submodules: [`boot`] (sshd fixtures,
//! boot contexts, VM images and the one-VM-at-a-time lock), [`fault`] (seeded fault points,
//! big derivations, the checks after a fault), [`security`] (a running sshd, the binary in a
//! scratch environment, the daemon's side of the hook protocol) and [`warm`] (an always-on
//! builder's warm connection: the supervisor, its status, checked builds).
//!
//! Must never: touch the machine's real `/nix` or `/etc/nix`, listen anywhere but 127.0.0.1, use
//! a fixed port or any state shared between tests (the only shared thing is the build-user lock
//! directory, which exists precisely so parallel stores coordinate), stop a process other than
//! by its pid, or skip silently: a missing prerequisite is a panic that says what is missing,
//! and a check no provisioning can enable here (a usable `/dev/kvm`) goes through [`skipped`],
//! which shows and counts it.
//!
//! Usage from a test file (every handle stops what it started when dropped, also while
//! unwinding from a failed assertion; tests run in parallel, each with its own instances):
//!
//! ```text
//! use crate::harness::*;
//!
//! let remote = RemoteStore::start(RemoteOpts::new(Nix::Host)); // or Nix::Trixie (2.26), Nix::Sid (2.34)
//! let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();          // build-hook = our binary
//! opts.builders = Some(remote.machines_line(&MachineLine::new(Scheme::Ssh, true)));
//! let daemon = LocalDaemon::start(opts);                              // /etc/nix is its own
//! let (paths, out) = FakeDrv::new("t1").build(&daemon, &[]);          // aarch64, via the hook
//! out.assert_success();
//! paths.assert_built(&daemon, true);          // valid, references, deriver, log lines
//! assert!(remote.is_valid(&paths.out));       // really built over there
//! assert!(daemon.invalid_leftovers().is_empty());
//! ```
//!
//! Prerequisites (tests/env/provision.sh): root; nix-bin, openssh-server/-client,
//! busybox-static; groups `nixbld` and `nixrbld`; for [`Nix::Trixie`] and [`Nix::Sid`] the
//! chroots at [`nix::TRIXIE_CHROOT`] and [`nix::SID_CHROOT`] with their `.ready` markers. Missing
//! ones panic with what to run.

pub mod boot;
mod daemon;
mod drv;
mod expr;
pub mod fault;
mod lazy;
mod nix;
mod ns;
mod procs;
mod remote;
pub mod security;
mod store;
pub mod warm;

pub use daemon::{DaemonOpts, HookVia, LocalDaemon};
pub(crate) use daemon::{scratch, set_mode, write};
pub use drv::{FakeDrv, FakeDrvPaths, uname_expr};
pub use expr::{DrvExpr, nix_str, rec_set};
pub use lazy::{
    Background, KillMentioning, LazyConfig, LazyRemote, LazyVm, TimedLine, lazy_binary,
    max_overlap, nix_build_streaming, runs_from_first, slept_at_least, slept_interval, toml_list,
    toml_str, wait_until, with_builder_keys,
};
pub use nix::Nix;
pub use procs::*;
pub use remote::{MachineLine, REMOTE_HOST, REMOTE_USER, RemoteOpts, RemoteStore, Scheme};
pub(crate) use remote::{free_port, keygen, read};
pub use store::StoreQueries;

use std::ffi::OsStr;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Default limit for one client command (a `nix-build`, a query). A hook that hangs must fail
/// the test, not stall CI forever.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// The `nix-lazy-builder` binary cargo built for these tests.
pub fn hook_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nix-lazy-builder"))
}

/// Nix 2.8's own hook from the Debian package (used by the harness smoke test).
pub const NIX_28_BUILD_REMOTE: &str = "/usr/libexec/nix/build-remote";

/// What one finished command produced. `Display` shows everything, for assertion messages.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub argv: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code, or `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics, showing the whole output, unless the command exited 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "command failed:\n{self}");
        self
    }

    /// Panics, showing the whole output, if the command exited 0.
    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        assert!(!self.success(), "command unexpectedly succeeded:\n{self}");
        self
    }

    /// The one line of stderr that starts with `prefix` (panics, showing the whole output,
    /// unless there is exactly one).
    #[track_caller]
    pub fn one_line(&self, prefix: &str) -> &str {
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "want one line starting with {prefix:?}:\n{self}"
        );
        lines[0]
    }

    /// The hook's one `error: build of '<drv>' on '<uri>' failed: …` line, Nix's wording for
    /// a remote build that failed.
    #[track_caller]
    pub fn hook_failure(&self, drv: &str, uri: &str) -> &str {
        self.one_line(&format!("error: build of '{drv}' on '{uri}' failed: "))
    }

    /// Panics, showing the whole output and saying `what`, unless stdout's lines are `want` in
    /// some order (the output paths a `nix-build` printed).
    #[track_caller]
    pub fn assert_prints(&self, want: &[&str], what: &str) {
        let mut printed = self.stdout_lines();
        printed.sort();
        let mut want: Vec<String> = want.iter().map(|w| (*w).to_owned()).collect();
        want.sort();
        assert_eq!(printed, want, "{what}:\n{self}");
    }

    /// The first stdout line (trimmed) that starts with `prefix`; panics, showing the whole
    /// output, if there is none.
    #[track_caller]
    pub fn stdout_line(&self, prefix: &str) -> String {
        self.stdout_lines()
            .into_iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no stdout line starting with {prefix:?}:\n{self}"))
    }

    /// Non-empty stdout lines, trimmed.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ {}", self.argv.join(" "))?;
        writeln!(f, "status: {} after {:.2?}", self.status, self.elapsed)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

/// `cmd.spawn()`, tried again while the program is "busy" (ETXTBSY): a binary a test just
/// copied (`security::Env`) is briefly open for writing in any child another test thread forks
/// at that moment, until that child's exec closes it.
pub fn spawn_retrying(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// Runs `cmd` to completion with no stdin (or `stdin` bytes), capturing stdout and stderr.
/// Kills it (by pid) and panics with what it printed so far if it outlives `timeout`.
#[track_caller]
pub fn run_command(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> CmdOutput {
    let argv = argv_of(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child =
        spawn_retrying(cmd).unwrap_or_else(|e| panic!("cannot start `{}`: {e}", argv.join(" ")));
    let feeder = match (stdin, child.stdin.take()) {
        (Some(bytes), Some(mut pipe)) => {
            let bytes = bytes.to_vec();
            Some(thread::spawn(move || {
                // A command that exits without reading everything is not our problem here;
                // its status tells the story.
                let _ = pipe.write_all(&bytes);
            }))
        }
        _ => None,
    };
    let out_reader = drain(child.stdout.take());
    let err_reader = drain(child.stderr.take());
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > timeout => {
                // SAFETY: plain kill(2) on the pid of our own unreaped child.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
                let _ = child.wait();
                let stdout = join_reader(out_reader);
                let stderr = join_reader(err_reader);
                panic!(
                    "`{}` did not finish within {timeout:?}; killed it.\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                    argv.join(" ")
                );
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for `{}`: {e}", argv.join(" ")),
        }
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    CmdOutput {
        argv,
        status,
        stdout: join_reader(out_reader),
        stderr: join_reader(err_reader),
        elapsed: start.elapsed(),
    }
}

/// `cmd`'s program and arguments, for messages.
pub(crate) fn argv_of(cmd: &Command) -> Vec<String> {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

type Reader = Option<thread::JoinHandle<Vec<u8>>>;

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> Reader {
    pipe.map(|mut p| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            buf
        })
    })
}

fn join_reader(r: Reader) -> String {
    r.and_then(|h| h.join().ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Panics unless the tests run as root (namespaces, bind mounts and nix-daemon need it).
#[track_caller]
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the integration tests must run as root (private mount namespaces, nix-daemon, sshd); euid is {euid}"
    );
}

/// Panics unless `path` exists, naming the Debian package that provides it.
#[track_caller]
pub fn require_file(path: impl AsRef<Path>, package: &str) {
    let path = path.as_ref();
    assert!(
        path.exists(),
        "missing prerequisite {}: install the Debian package `{package}` (tests/env/provision.sh does)",
        path.display()
    );
}

/// Panics unless `group` exists in the group database under `root` (`/` for the host).
#[track_caller]
pub fn require_group(root: &Path, group: &str) {
    assert!(
        group_exists(root, group),
        "the build-users group `{group}` does not exist in {}/etc/group: run tests/env/provision.sh",
        root.display()
    );
}

/// Whether `group` is in `<root>/etc/group` and has at least one member.
pub fn group_exists(root: &Path, group: &str) -> bool {
    let file = root.join("etc/group");
    let Ok(text) = std::fs::read_to_string(&file) else {
        return false;
    };
    text.lines().any(|l| {
        let mut cols = l.split(':');
        cols.next() == Some(group) && cols.nth(2).is_some_and(|members| !members.is_empty())
    })
}

/// Quotes one word for `sh -c`.
pub(crate) fn sh_quote(word: impl AsRef<OsStr>) -> String {
    let w = word.as_ref().to_string_lossy();
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b))
    {
        w.into_owned()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// The arguments that make this test binary run exactly one of its tests, `name` in the
/// module `module` (the caller's `module_path!()`), in a process of its own: for tests that
/// need a second process of the suite (a helper that is killed) or an environment no test
/// may change in a process that runs others at the same time.
pub fn one_test_args(module: &str, name: &str) -> Vec<String> {
    // `module_path!()` starts with the crate's name; test names do not.
    let path = module.split_once("::").map_or("", |(_, p)| p);
    [
        "--exact",
        &format!("{path}::{name}"),
        "--include-ignored",
        "--nocapture",
        "--test-threads=1",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs the test `name` of `module` (see [`one_test_args`]) in a child process with `env`
/// added, to completion; panics, showing its output, unless it ran exactly that one test and
/// it passed (a misspelt name would otherwise run nothing and pass).
#[track_caller]
pub fn run_one_test(module: &str, name: &str, env: &[(&str, &OsStr)]) -> CmdOutput {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut cmd = Command::new(exe);
    cmd.args(one_test_args(module, name));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_command(&mut cmd, None, DEFAULT_COMMAND_TIMEOUT);
    eprintln!("{out}");
    assert!(
        out.success() && out.stdout.contains("test result: ok. 1 passed;"),
        "{name} in a process of its own did not pass as the only test run:\n{out}"
    );
    out
}

/// The file [`skipped`] appends to when set (`tests/run` sets it and prints what it holds at
/// the end of the run).
pub const SKIP_LOG_ENV: &str = "NLB_SKIP_LOG";

/// Records that `test` did not check `what`, and why (a precondition no provisioning can make
/// hold here, such as a usable `/dev/kvm`). Never silent: the line goes to the process's real
/// stderr, which libtest does not capture (only `print!`/`eprint!` are), so it shows in the
/// output of a passing test; and it is counted: appended to `$NLB_SKIP_LOG` when that is set.
/// A test that skips must still check something on the other path.
pub fn skipped(test: &str, what: &str, why: &str) {
    let line = format!("[skipped] {test}: {what} not checked: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(log) = std::env::var_os(SKIP_LOG_ENV) {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            panic!("cannot count a skip in {}: {e}", Path::new(&log).display());
        }
    }
}

/// How many runs a measurement run by hand makes: the number in the environment variable `var`,
/// or `default`.
pub fn runs_from_env(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Measures a smoke-test phase and prints it (visible with `--nocapture`), returning the value.
pub fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let v = f();
    eprintln!("[timing] {what}: {:.2?}", start.elapsed());
    v
}
