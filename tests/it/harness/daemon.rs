//! The local side: a real nix-daemon (2.8, 2.26 or 2.34) in its own private mount namespace with a
//! throw-away `/nix` and its own `/etc/nix` (a temp dir holding its nix.conf, machines file,
//! and whatever else a test puts there, e.g. `lazy-builder.toml`), plus clients (`nix-build`,
//! `nix-store`, `nix-instantiate`) that talk to it with `NIX_REMOTE=daemon`.
//!
//! Owns: the daemon's nix.conf and environment (`build-hook` in nix.conf or, for the versions that
//! ignore it there, in `NIX_CONFIG`), its start/readiness/stop, the client
//! environment (an empty client nix.conf, so nothing of the host's reaches the daemon), and a
//! work directory for expression and config files that the namespace (and chroot) can see.
//!
//! Must never: use the machine's `/nix` or `/etc/nix`, or leave the daemon or its children
//! (hooks, anything they spawned) running after drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::ns::{Layout, NsProcess};
use super::store::StoreQueries;
use super::{CmdOutput, DEFAULT_COMMAND_TIMEOUT, Nix, run_command};

/// How to configure a [`LocalDaemon`]. Start from [`DaemonOpts::new`] and set fields.
#[derive(Clone, Debug)]
pub struct DaemonOpts {
    pub nix: Nix,
    /// `max-jobs` (local build slots). 0 sends every build to the hook.
    pub max_jobs: u32,
    /// `builders = …` verbatim (a machines line, `;`-separated lines, or `@file`).
    pub builders: Option<String>,
    /// Contents of `/etc/nix/machines` (in the namespace); sets `builders = @/etc/nix/machines`.
    /// Cannot be combined with `builders`. Rewrite it later via [`LocalDaemon::machines_file`].
    /// With neither, the daemon has no builders (its `/etc/nix` is its own, empty one).
    pub machines: Option<String>,
    /// `build-hook = …` (path plus optional arguments). `None` keeps the version's default
    /// (2.8: `/usr/libexec/nix/build-remote`; 2.26, 2.34: `nix __build-remote`).
    pub build_hook: Option<String>,
    /// Where `build_hook` is written. `None` picks what works for the version: `NIX_CONFIG` for
    /// the daemons that ignore `build-hook` in nix.conf (2.25.0–2.33.x), nix.conf otherwise.
    pub build_hook_via: Option<HookVia>,
    /// `build-users-group`; `None` means `nixbld` (the host's, or the chroot's own).
    pub build_users_group: Option<String>,
    /// `sandbox = true` (with `sandbox-fallback = false`, `/bin/sh` = busybox) or `false`.
    pub sandbox: bool,
    /// `system-features = …`; `None` keeps Nix's default.
    pub system_features: Option<Vec<String>>,
    /// Extra nix.conf lines, appended last.
    pub extra_conf: Vec<String>,
    /// Extra environment for the daemon (and so for the hook), e.g. `NIX_SSHOPTS`.
    pub env: Vec<(String, String)>,
    /// Host directories the daemon must see at the same path (matters for the sid chroot;
    /// the hook binary's directory and the daemon's own temp dir are always included).
    pub expose: Vec<PathBuf>,
    /// Limit for one client command.
    pub command_timeout: Duration,
}

impl DaemonOpts {
    pub fn new(nix: Nix) -> Self {
        DaemonOpts {
            nix,
            max_jobs: 1,
            builders: None,
            machines: None,
            build_hook: None,
            build_hook_via: None,
            build_users_group: None,
            sandbox: true,
            system_features: None,
            extra_conf: Vec::new(),
            env: Vec::new(),
            expose: Vec::new(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }

    /// Sets `build-hook` to the nix-lazy-builder binary under test (Nix 2.8 takes a bare path;
    /// newer Nix gets `<bin> hook`), where this version honours it ([`DaemonOpts::build_hook_via`]).
    pub fn with_our_hook(mut self) -> Self {
        let bin = super::hook_binary().to_string_lossy().into_owned();
        self.build_hook = Some(if self.nix.build_hook_is_one_path() {
            bin
        } else {
            format!("{bin} hook")
        });
        self
    }

    /// Where `build_hook` ends up: what the test asked for, else what works for the version.
    pub fn hook_via(&self) -> HookVia {
        self.build_hook_via
            .unwrap_or(if self.nix.ignores_build_hook_in_nix_conf() {
                HookVia::NixConfigEnv
            } else {
                HookVia::NixConf
            })
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// Where a daemon's `build-hook` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookVia {
    /// `build-hook = …` in its nix.conf (what Nix 2.25.0–2.33.x silently replace).
    NixConf,
    /// `NIX_CONFIG="build-hook = …"` in its environment (honoured by every version since 2.4).
    NixConfigEnv,
}

impl Default for DaemonOpts {
    fn default() -> Self {
        DaemonOpts::new(Nix::Host)
    }
}

/// A running nix-daemon with its own store. Dropping it stops everything in its namespace and
/// deletes its temp dir.
pub struct LocalDaemon {
    opts: DaemonOpts,
    // Field order matters: the process must stop before the temp dir is removed.
    proc: NsProcess,
    base: tempfile::TempDir,
}

impl LocalDaemon {
    /// Starts the daemon and waits for its socket. Panics with the daemon's log on failure.
    #[track_caller]
    pub fn start(opts: DaemonOpts) -> Self {
        opts.nix.require();
        assert!(
            !(opts.builders.is_some() && opts.machines.is_some()),
            "DaemonOpts: set `builders` or `machines`, not both"
        );
        let group = opts
            .build_users_group
            .clone()
            .unwrap_or_else(|| "nixbld".to_owned());
        if !group.is_empty() {
            super::require_group(opts.nix.root(), &group);
        }
        let base = scratch(
            "nlb-daemon-",
            &["nix", "etc-nix", "client-conf", "home", "work"],
        );
        let b = base.path().to_path_buf();
        let mut conf = vec![
            format!("build-users-group = {group}"),
            "substituters =".to_owned(),
            format!("max-jobs = {}", opts.max_jobs),
        ];
        if opts.sandbox {
            conf.push("sandbox = true".to_owned());
            conf.push("sandbox-fallback = false".to_owned());
            conf.push("sandbox-paths = /bin/sh=/bin/busybox".to_owned());
        } else {
            conf.push("sandbox = false".to_owned());
        }
        if let Some(f) = &opts.system_features {
            conf.push(format!("system-features = {}", f.join(" ")));
        }
        if let Some(machines) = &opts.machines {
            write(&b.join("etc-nix/machines"), machines);
            conf.push("builders = @/etc/nix/machines".to_owned());
        }
        if let Some(builders) = &opts.builders {
            conf.push(format!("builders = {builders}"));
        }
        let mut nix_config = Vec::new();
        if let Some(hook) = &opts.build_hook {
            match opts.hook_via() {
                HookVia::NixConf => conf.push(format!("build-hook = {hook}")),
                HookVia::NixConfigEnv => nix_config.push(format!("build-hook = {hook}")),
            }
        }
        conf.extend(opts.extra_conf.iter().cloned());
        write(&b.join("etc-nix/nix.conf"), &(conf.join("\n") + "\n"));
        write(&b.join("client-conf/nix.conf"), "");

        let mut expose = opts.expose.clone();
        expose.push(b.clone());
        if let Some(dir) = super::hook_binary().parent() {
            expose.push(dir.to_path_buf());
        }
        let layout = Layout {
            nix: opts.nix,
            nix_dir: b.join("nix"),
            etc_nix: Some(b.join("etc-nix")),
            expose,
        };
        let mut env = vec![
            (
                "HOME".to_owned(),
                b.join("home").to_string_lossy().into_owned(),
            ),
            ("NIX_CONF_DIR".to_owned(), "/etc/nix".to_owned()),
            (
                "NIX_USER_CONF_FILES".to_owned(),
                b.join("client-conf/nix.conf")
                    .to_string_lossy()
                    .into_owned(),
            ),
        ];
        for (k, v) in &opts.env {
            if k == "NIX_CONFIG" {
                nix_config.insert(0, v.clone());
            } else {
                env.push((k.clone(), v.clone()));
            }
        }
        if !nix_config.is_empty() {
            env.push(("NIX_CONFIG".to_owned(), nix_config.join("\n")));
        }
        let label = format!("nix-daemon {}", opts.nix.label());
        let argv = vec!["nix-daemon".to_owned()];
        let mut proc = NsProcess::spawn(&label, &layout, &argv, &env, &b.join("daemon.log"));

        let socket = b.join("nix/var/nix/daemon-socket/socket");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Some(status) = proc.exit_status() {
                panic!(
                    "{label} exited ({status}) before creating its socket:\n{}",
                    proc.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!("{label}: no socket after 30 s:\n{}", proc.log_text());
            }
            thread::sleep(Duration::from_millis(10));
        }
        proc.confirm_namespace();
        LocalDaemon { opts, proc, base }
    }

    /// The daemon's pid (the namespace to `nsenter`).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The daemon's temp dir (visible at the same path inside the namespace and chroot).
    pub fn dir(&self) -> &Path {
        self.base.path()
    }

    /// The daemon's stdout+stderr so far (hook lines that are not `@nix` JSON land here).
    pub fn daemon_log(&self) -> String {
        self.proc.log_text()
    }

    /// The host directory that is `/etc/nix` inside the daemon's namespace (write
    /// `lazy-builder.toml` or other config there before the hook runs).
    pub fn etc_nix_dir(&self) -> PathBuf {
        self.dir().join("etc-nix")
    }

    /// Host path of `/etc/nix/machines` (what `DaemonOpts::machines` wrote; rewrite it to
    /// change builders between builds).
    pub fn machines_file(&self) -> PathBuf {
        self.etc_nix_dir().join("machines")
    }

    /// Host path of the daemon's nix.conf (`/etc/nix/nix.conf` inside).
    pub fn conf_file(&self) -> PathBuf {
        self.etc_nix_dir().join("nix.conf")
    }

    /// The `build-hook` this daemon was given (nix.conf or `NIX_CONFIG`), if any.
    pub fn configured_hook(&self) -> Option<(&str, HookVia)> {
        let hook = self.opts.build_hook.as_deref()?;
        Some((hook, self.opts.hook_via()))
    }

    /// Writes `contents` to `<work dir>/<name>` and returns the path (visible to the daemon,
    /// its hooks and its clients).
    #[track_caller]
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir().join("work").join(name);
        if let Some(parent) = p.parent() {
            mkdir(parent);
        }
        write(&p, contents);
        p
    }

    /// A client command: `program` in the namespace, `NIX_REMOTE=daemon`, empty client config.
    pub fn client_command(&self, program: &str) -> Command {
        let mut c = self.proc.command(program);
        let b = self.dir();
        c.env("NIX_REMOTE", "daemon")
            .env("NIX_CONF_DIR", b.join("client-conf"))
            .env("NIX_USER_CONF_FILES", b.join("client-conf/nix.conf"))
            .env("HOME", b.join("home"));
        c
    }

    /// Runs a client program with `args`.
    #[track_caller]
    pub fn client(&self, program: &str, args: &[&str]) -> CmdOutput {
        let mut c = self.client_command(program);
        c.args(args);
        run_command(&mut c, None, self.opts.command_timeout)
    }

    /// `nix-build --no-out-link args…`; stdout lists the output paths.
    #[track_caller]
    pub fn nix_build(&self, args: &[&str]) -> CmdOutput {
        let mut a = vec!["--no-out-link"];
        a.extend_from_slice(args);
        self.client("nix-build", &a)
    }

    /// `nix-instantiate args…`.
    #[track_caller]
    pub fn nix_instantiate(&self, args: &[&str]) -> CmdOutput {
        self.client("nix-instantiate", args)
    }

    /// Live processes of this daemon's namespace (and their descendants) other than the
    /// daemon itself, with their argv: per-client daemon processes, hooks, what hooks started
    /// (an auto-started supervisor, its boot commands), local builds.
    pub fn processes(&self) -> Vec<(u32, Vec<String>)> {
        let main = self.pid();
        self.proc
            .processes()
            .into_iter()
            .filter(|&p| p != main)
            .filter_map(|p| Some((p, super::cmdline(p)?)))
            .collect()
    }

    /// The hook processes of this daemon: processes of its namespace running the hook binary
    /// (`lazy_binary()`), not as `supervise` or a CLI command.
    pub fn hook_pids(&self) -> Vec<u32> {
        let exe = super::lazy_binary();
        self.processes()
            .into_iter()
            .filter(|(p, _)| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == exe))
            .filter(|(_, argv)| super::procs::is_hook_argv(argv))
            .map(|(p, _)| p)
            .collect()
    }

    /// `nix-store --version` through this daemon's namespace.
    #[track_caller]
    pub fn nix_version(&self) -> String {
        let out = self.client("nix-store", &["--version"]);
        out.assert_success();
        out.stdout.trim().to_owned()
    }
}

impl StoreQueries for LocalDaemon {
    fn store_command(&self, program: &str) -> Command {
        self.client_command(program)
    }
    fn host_nix_dir(&self) -> PathBuf {
        self.dir().join("nix")
    }
    fn command_timeout(&self) -> Duration {
        self.opts.command_timeout
    }
}

pub(crate) fn mkdir(p: &Path) {
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
}

/// A fresh temp dir named `<prefix>…` that the daemon's build users, sshd and `nobody` can
/// traverse (0755), with `subdirs` created in it. Removed when dropped.
#[track_caller]
pub fn scratch(prefix: &str, subdirs: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
    set_mode(dir.path(), 0o755);
    for d in subdirs {
        mkdir(&dir.path().join(d));
    }
    dir
}

pub(crate) fn write(p: &Path, contents: &str) {
    fs::write(p, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
}

pub(crate) fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", p.display()));
}
