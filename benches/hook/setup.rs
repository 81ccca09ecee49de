//! The contestants on the integration harness: a local nix-daemon whose `build-hook` is
//! nix-lazy-builder, one whose `build-hook` is Nix 2.8's own `build-remote` (over OpenSSH),
//! the same with OpenSSH connection sharing (`ControlMaster`/`ControlPersist` in
//! `NIX_SSHOPTS`, the tuning a user would pick instead of us), and optionally another build of
//! nix-lazy-builder (`NLB_BENCH_BASELINE`: before/after a change, in one alternation), all
//! pointed at the same real sshd-backed remote stores.
//!
//! Owns the per-hook daemon configuration (machines lines, `NIX_SSHOPTS`, the OpenSSH client
//! config that lets Nix 2.8's hook reach several builders on different ports of 127.0.0.1),
//! and the optional wrapper script that records each hook's pid for the RSS sampler.
//!
//! Must never: give one hook an advantage the other lacks (same remotes, same machines
//! columns, same daemon settings), or touch anything outside the bench's own temp dir.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::harness::{
    DaemonOpts, LocalDaemon, MachineLine, NIX_28_BUILD_REMOTE, Nix, REMOTE_HOST, REMOTE_USER,
    RemoteStore, Scheme, hook_binary,
};

/// Which build hook a daemon runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ours,
    Nix,
    /// Nix's hook with `-oControlMaster=auto -oControlPath=… -oControlPersist=120` in
    /// `NIX_SSHOPTS`: one master connection per builder, kept for two minutes.
    NixPersist,
    /// Another build of nix-lazy-builder ([`BASELINE_ENV`]).
    Baseline,
}

/// The environment variable naming another nix-lazy-builder binary to measure beside ours
/// (e.g. a release build of the commit before a change): [`Hook::Baseline`].
pub const BASELINE_ENV: &str = "NLB_BENCH_BASELINE";

/// [`BASELINE_ENV`]'s binary, if set.
pub fn baseline() -> Option<PathBuf> {
    std::env::var_os(BASELINE_ENV).map(PathBuf::from)
}

/// How long OpenSSH keeps the master connection of [`Hook::NixPersist`].
pub const CONTROL_PERSIST: &str = "120";

impl Hook {
    pub fn label(self) -> &'static str {
        match self {
            Hook::Ours => "ours",
            Hook::Nix => "nix",
            Hook::NixPersist => "nix-cp",
            Hook::Baseline => "baseline",
        }
    }

    /// The binary the daemon runs (the wrapper execs it).
    pub fn binary(self) -> PathBuf {
        match self {
            Hook::Ours => hook_binary(),
            Hook::Nix | Hook::NixPersist => PathBuf::from(NIX_28_BUILD_REMOTE),
            Hook::Baseline => baseline().unwrap_or_else(|| panic!("{BASELINE_ENV} is not set")),
        }
    }

    fn is_ours(self) -> bool {
        matches!(self, Hook::Ours | Hook::Baseline)
    }

    /// The process name (`comm`, at most 15 bytes) the hook runs under.
    pub fn comm(self) -> String {
        let bin = self.binary();
        let name = bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.chars().take(15).collect()
    }
}

/// How a daemon for one hook is set up.
pub struct DaemonSpec<'a> {
    pub hook: Hook,
    pub remotes: &'a [&'a RemoteStore],
    pub scheme: Scheme,
    /// Machines column 4 for every remote.
    pub max_jobs: u32,
    /// Run the hook through a wrapper that appends its pid to this file.
    pub pid_file: Option<&'a Path>,
    /// Where the wrapper script and the ssh client config go (visible to the daemon).
    pub dir: &'a Path,
    /// Run the hook under a profiling tool, writing its output into the dir.
    pub profile: Option<(Tool, &'a Path)>,
}

impl<'a> DaemonSpec<'a> {
    /// One job per remote, no pid file, no profiling: what most rows measure.
    pub fn new(hook: Hook, remotes: &'a [&'a RemoteStore], scheme: Scheme, dir: &'a Path) -> Self {
        DaemonSpec {
            hook,
            remotes,
            scheme,
            max_jobs: 1,
            pid_file: None,
            dir,
            profile: None,
        }
    }
}

/// A tool the profiling runs put in front of the hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// `valgrind --tool=callgrind`: instruction counts per function.
    Callgrind,
    /// `strace -f -tt -T` (process events, connects, writes): a wall-clock timeline of the
    /// hook and its children.
    Strace,
    /// `perf record -e cpu-clock -g`: where the hook's CPU time goes, kernel included
    /// (sampling on the software clock; the hardware counters are not available here).
    Perf,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::Callgrind => "callgrind",
            Tool::Strace => "strace",
            Tool::Perf => "perf",
        }
    }

    /// The shell words that run `bin` under the tool, output into `out` (per pid).
    fn prefix(self, out: &Path) -> String {
        match self {
            Tool::Callgrind => format!(
                "valgrind --tool=callgrind --callgrind-out-file='{0}/callgrind.out.%p' --log-file='{0}/valgrind.%p.log'",
                out.display()
            ),
            // Only process events, connects and writes, filtered in the kernel (seccomp-bpf):
            // the timeline keeps its shape instead of being stretched by every read.
            // `NLB_BENCH_STRACE_SET` widens the set (e.g. `%process,%network,read,write,writev`).
            // `NLB_BENCH_STRACE_SUMMARY=1`: every syscall, counted (`strace -c`) instead.
            Tool::Strace if std::env::var_os("NLB_BENCH_STRACE_SUMMARY").is_some() => {
                format!("strace -f -c -o \"{}/strace-summary.$$\"", out.display())
            }
            Tool::Perf => format!(
                "perf record -q -e cpu-clock -F 999 -g -o \"{}/perf.$$.data\" --",
                out.display()
            ),
            Tool::Strace => format!(
                "strace -f --seccomp-bpf -e trace={} -tt -T -s 64 -o \"{}/strace.$$\"",
                std::env::var("NLB_BENCH_STRACE_SET")
                    .unwrap_or_else(|_| "%process,connect,write".to_owned()),
                out.display()
            ),
        }
    }
}

/// Starts a local daemon for `spec.hook` with one machines line per remote.
pub fn daemon(spec: &DaemonSpec<'_>) -> LocalDaemon {
    let mut opts = DaemonOpts::new(Nix::Host);
    let mut lines = Vec::new();
    if spec.hook.is_ours() {
        opts = opts.with_our_hook();
        if spec.hook == Hook::Baseline {
            let bin = spec.hook.binary();
            if let Some(dir) = bin.parent() {
                opts.expose.push(dir.to_path_buf());
            }
            opts.build_hook = Some(bin.to_string_lossy().into_owned());
        }
        for r in spec.remotes {
            let mut m = MachineLine::new(spec.scheme, true);
            m.max_jobs = spec.max_jobs;
            lines.push(r.machines_line(&m));
        }
    } else {
        opts.build_hook = Some(NIX_28_BUILD_REMOTE.to_owned());
        let sharing = if spec.hook == Hook::NixPersist {
            // A short socket path (sun_path holds 108 bytes), one per daemon.
            let dir = spec.dir.join(format!("cm-{}", spec.remotes.len()));
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
            let path = format!("{}/%C", dir.display());
            assert!(path.len() + 40 < 100, "ControlPath {path} is too long");
            format!(" -oControlMaster=auto -oControlPath={path} -oControlPersist={CONTROL_PERSIST}")
        } else {
            String::new()
        };
        if let [r] = spec.remotes {
            // What a Nix 2.8 user does (and what the harness' smoke test proves).
            let mut m = MachineLine::new(spec.scheme, false);
            m.max_jobs = spec.max_jobs;
            lines.push(r.machines_line(&m));
            opts.env
                .push(("NIX_SSHOPTS".to_owned(), r.nix_sshopts(true) + &sharing));
        } else {
            // Nix 2.8's hook takes no port from the URI and one NIX_SSHOPTS for all
            // machines: give each remote a host alias in an ssh client config. The pinned
            // host key (column 8) still decides: Nix writes it as `<alias> <key>` into its
            // own known-hosts file and HostKeyAlias makes OpenSSH look it up by the alias.
            let config = spec.dir.join(format!(
                "ssh_config-{}-{}",
                spec.hook.label(),
                spec.remotes.len()
            ));
            let mut text = String::new();
            for (i, r) in spec.remotes.iter().enumerate() {
                let alias = format!("nlb-bench-b{i}");
                let _ = writeln!(
                    text,
                    "Host {alias}\n  HostName {REMOTE_HOST}\n  Port {}\n  HostKeyAlias {alias}\n",
                    r.port()
                );
                let mut m = MachineLine::new(spec.scheme, false);
                m.max_jobs = spec.max_jobs;
                let line = r.machines_line(&m);
                let plain = r.uri_without_port(spec.scheme);
                let aliased = format!("{}://{REMOTE_USER}@{alias}", spec.scheme.prefix());
                assert!(line.starts_with(&plain), "{line}");
                lines.push(line.replacen(&plain, &aliased, 1));
            }
            write_file(&config, &text, 0o644);
            opts.env.push((
                "NIX_SSHOPTS".to_owned(),
                format!(
                    "-F {} -oBatchMode=yes -oConnectTimeout=20{sharing}",
                    config.display()
                ),
            ));
        }
    }
    if spec.pid_file.is_some() || spec.profile.is_some() {
        opts.build_hook = Some(
            wrapper(spec.dir, spec.hook, spec.pid_file, spec.profile)
                .to_string_lossy()
                .into_owned(),
        );
    }
    opts.machines = Some(lines.join("\n") + "\n");
    LocalDaemon::start(opts)
}

/// A `build-hook` script that appends its pid to `pid_file` and execs the real hook (same
/// pid, same argv after argv[0]), so a sampler can watch exactly the hook process; or that
/// execs the hook under a profiling tool (its messages to files, never to the daemon's pipe).
fn wrapper(
    dir: &Path,
    hook: Hook,
    pid_file: Option<&Path>,
    profile: Option<(Tool, &Path)>,
) -> PathBuf {
    let path = dir.join(format!("hook-{}.sh", hook.label()));
    let mut text = String::from("#!/bin/sh\n");
    if let Some(p) = pid_file {
        text += &format!("echo $$ >> '{}'\n", p.display());
    }
    let prefix = profile
        .map(|(t, out)| t.prefix(out) + " ")
        .unwrap_or_default();
    text += &format!("exec {prefix}'{}' \"$@\"\n", hook.binary().display());
    write_file(&path, &text, 0o755);
    path
}

pub fn write_file(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
}
