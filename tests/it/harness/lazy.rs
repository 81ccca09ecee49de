//! Pieces for end-to-end tests of lazy builders: a remote machine that is prepared but not
//! started ([`LazyRemote`]: the supervisor starts it through a `kind = "command"` or
//! `kind = "darling"` builder), a lazy QEMU builder behind a daemon ([`LazyVm`]), the
//! lazy-builder TOML around it, the CLI's `status --json`
//! inside the daemon's namespace, a command runner that timestamps every stderr line, and
//! process lookups (supervisor, hooks, RSS).
//!
//! Owns: the lazy remote's keys, sshd config, nix.conf and start script; finding and stopping
//! every process it left behind (by the mount namespaces with its own `/nix` mounted, and every
//! descendant of a process in one: its sandboxed builds).
//!
//! Must never: listen anywhere but 127.0.0.1, signal a process that is neither in one of its
//! private mount namespaces nor a descendant of one, or leave a process behind after drop.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix_lazy_builder::supervisor::proto::BuilderStatus;

use super::daemon::{scratch, write};
use super::ns::{SHARED_USERPOOL, STD_PATH, sigkill_until_gone};
use super::procs::{alive, all_pids, mnt_ns_of, processes_mentioning, with_descendants};
use super::store::StoreQueries;
use super::{
    CmdOutput, DEFAULT_COMMAND_TIMEOUT, LocalDaemon, REMOTE_HOST, REMOTE_USER, RemoteOpts, Scheme,
    hook_binary, run_command, sh_quote,
};

/// A remote store like [`super::RemoteStore`] (own `/nix`, own `/etc/nix`, OpenSSH's sshd on
/// 127.0.0.1 with fresh keys), everything prepared but sshd not started: a lazy builder's
/// boot command starts it ([`LazyRemote::start_argv`]) or a Darling stand-in runs it
/// ([`LazyRemote::prefix`]). Dropping it kills whatever of it still runs.
pub struct LazyRemote {
    opts: RemoteOpts,
    port: u16,
    host_key_line: String,
    base: tempfile::TempDir,
}

impl LazyRemote {
    /// Keys, sshd config (a free port chosen now), nix.conf; nothing runs yet.
    #[track_caller]
    pub fn prepare(opts: RemoteOpts) -> Self {
        assert_eq!(
            opts.nix,
            super::Nix::Host,
            "LazyRemote runs the host's Nix only"
        );
        opts.nix.require();
        super::require_file("/usr/sbin/sshd", "openssh-server");
        let group = match &opts.build_users_group {
            Some(g) => g.clone(),
            None => "nixrbld".to_owned(),
        };
        if !group.is_empty() {
            super::require_group(Path::new("/"), &group);
        }
        std::fs::create_dir_all(SHARED_USERPOOL)
            .unwrap_or_else(|e| panic!("cannot create {SHARED_USERPOOL}: {e}"));
        let base = scratch(
            "nlb-lazy-remote-",
            &["nix/var/nix/userpool", "etc-nix", "ssh", "home"],
        );
        let b = base.path().to_path_buf();
        let ssh = b.join("ssh");
        let host_key_line = super::remote::prepare_remote_dir(&b, &opts, &group, "nlb-lazy-remote");

        let port = super::remote::free_port();
        let home = b.join("home");
        // NIX_CONF_DIR: under the Darling stand-in `/etc/nix` is not this machine's.
        write(
            &ssh.join("sshd_config"),
            &format!(
                "ListenAddress {REMOTE_HOST}\nPort {port}\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\n\
                 MaxStartups 100\nMaxSessions 100\n\
                 SetEnv HOME={home} XDG_CACHE_HOME={home}/.cache NIX_CONF_DIR={etc}\n",
                hk = ssh.join("host_ed25519_key").display(),
                ak = ssh.join("authorized_keys").display(),
                home = home.display(),
                etc = b.join("etc-nix").display(),
            ),
        );
        let remote = LazyRemote {
            opts,
            port,
            host_key_line,
            base,
        };
        remote.init_store();
        remote
    }

    /// Makes the machine's store database now, once, as installing Nix does on a real machine
    /// (the sessions a test opens then find it made). On a brand-new store, Nix's `initDB`
    /// holds the big lock only shared while it creates the database and writes its schema
    /// file, so two Nix processes opening that store at once race: one may read the schema
    /// file half-written ("'/nix/var/nix/db/schema' is corrupt").
    #[track_caller]
    fn init_store(&self) {
        let mut c = Command::new("/usr/bin/env");
        c.args(["-i", &format!("PATH={STD_PATH}"), "/usr/bin/unshare", "-m"])
            .args(["--propagation", "private", "/bin/sh", "-c"])
            .arg(self.layout_script(None))
            .args(["nlb-lazy-remote", "nix-store", "--init"]);
        let out = run_command(&mut c, None, Duration::from_secs(60));
        assert!(
            out.success(),
            "initialising the lazy machine's store:\n{out}"
        );
    }

    pub fn dir(&self) -> &Path {
        self.base.path()
    }

    /// The port its sshd will listen on (chosen free at [`LazyRemote::prepare`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ssh://root@127.0.0.1:PORT` (or `ssh-ng://…`).
    pub fn uri(&self, scheme: Scheme) -> String {
        format!(
            "{}://{REMOTE_USER}@{REMOTE_HOST}:{}",
            scheme.prefix(),
            self.port
        )
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir().join("ssh/client_key")
    }

    /// Its sshd config (a path no other process on the machine mentions).
    pub fn sshd_config(&self) -> PathBuf {
        self.dir().join("ssh/sshd_config")
    }

    /// Where the start script writes its pid (= sshd's pid after its `exec`).
    pub fn pidfile(&self) -> PathBuf {
        self.dir().join("sshd.pid")
    }

    /// Its sshd's public host key line (`ssh-ed25519 AAAA… comment`).
    pub fn host_key_line(&self) -> &str {
        &self.host_key_line
    }

    /// The directory a Darling prefix would be: its `nix/` is this machine's store.
    pub fn prefix(&self) -> &Path {
        self.dir()
    }

    /// The mounts of this machine's namespace, then `exec "$@"`.
    fn layout_script(&self, pidfile_and_delay: Option<Duration>) -> String {
        let q = |p: &dyn AsRef<std::ffi::OsStr>| sh_quote(p);
        let b = self.dir();
        let mut s = String::from("set -eu\n");
        if let Some(delay) = pidfile_and_delay {
            s += &format!("echo $$ > {}\n", q(&self.pidfile()));
            if !delay.is_zero() {
                // A slow boot: nothing listens until the sleep is over.
                s += &format!("sleep {:.3}\n", delay.as_secs_f64());
            }
        }
        s += &format!("mount --bind {} /nix\n", q(&b.join("nix")));
        s += &format!(
            "mount --bind {} /nix/var/nix/userpool\n",
            q(&SHARED_USERPOOL)
        );
        s += &format!("mount --bind {} /etc/nix\n", q(&b.join("etc-nix")));
        s += "mount -t tmpfs -o mode=0755 nlb-run /run\nmkdir -p /run/sshd\nexec \"$@\"\n";
        s
    }

    /// The argv of a foreground command that starts this machine's sshd (after `delay`), for
    /// a `kind = "command"` builder. It enters the test's own mount namespace first (the
    /// supervisor runs in the daemon's, where `/run` is private), then makes a private one
    /// with this machine's `/nix` and `/etc/nix`. Every step `exec`s, so the command's pid is
    /// sshd's, and the pid lands in [`LazyRemote::pidfile`].
    pub fn start_argv(&self, delay: Duration) -> Vec<String> {
        let mut v: Vec<String> = [
            "/usr/bin/env",
            "-i",
            &format!("PATH={STD_PATH}"),
            "/usr/bin/nsenter",
            "-m",
            "-t",
            &std::process::id().to_string(),
            "--",
            "/usr/bin/unshare",
            "-m",
            "--propagation",
            "private",
            "/bin/sh",
            "-c",
            &self.layout_script(Some(delay)),
            "nlb-lazy-remote",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        v.extend(self.sshd_argv());
        v
    }

    /// `/usr/sbin/sshd -D -e -f CONFIG`.
    pub fn sshd_argv(&self) -> Vec<String> {
        vec![
            "/usr/sbin/sshd".to_owned(),
            "-D".to_owned(),
            "-e".to_owned(),
            "-f".to_owned(),
            self.sshd_config().to_string_lossy().into_owned(),
        ]
    }

    /// A `[builders.NAME]` table for this machine: `settings` are extra builder keys (lines),
    /// `boot` the body of its `[builders.NAME.boot]` table.
    pub fn builder_toml(
        &self,
        name: &str,
        scheme: Scheme,
        systems: &[&str],
        settings: &str,
        boot: &str,
    ) -> String {
        format!(
            "[builders.{name}]\nuri = {}\nsystems = {}\nssh-key = {}\nhost-key = {}\n{settings}\n\
             [builders.{name}.boot]\n{boot}\n",
            toml_str(&self.uri(scheme)),
            toml_list(systems),
            toml_str(&self.client_key().to_string_lossy()),
            toml_str(&self.host_key_line),
        )
    }

    /// A `[builders.NAME]` table for this machine as an aarch64-linux builder booted at once
    /// by its command ([`LazyRemote::command_boot`]), with `settings` as extra builder keys.
    pub fn command_builder(&self, name: &str, scheme: Scheme, settings: &str) -> String {
        self.builder_toml(
            name,
            scheme,
            &["aarch64-linux"],
            settings,
            &self.command_boot(Duration::ZERO),
        )
    }

    /// [`LazyRemote::command_builder`] over `ssh://` whose boot waits `delay` before sshd
    /// starts.
    pub fn delayed_command_builder(&self, name: &str, delay: Duration, settings: &str) -> String {
        self.builder_toml(
            name,
            Scheme::Ssh,
            &["aarch64-linux"],
            settings,
            &self.command_boot(delay),
        )
    }

    /// A `kind = "command"` boot body running [`LazyRemote::start_argv`].
    pub fn command_boot(&self, delay: Duration) -> String {
        let argv = self.start_argv(delay);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        format!("kind = \"command\"\ncommand = {}\n", toml_list(&argv))
    }

    /// Whether something accepts TCP on its port.
    pub fn listening(&self) -> bool {
        TcpStream::connect_timeout(
            &std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
            Duration::from_millis(500),
        )
        .is_ok()
    }

    /// The mount namespaces that are this machine's: those with its `nix/` directory mounted
    /// on `/nix` (sshd's, its sessions', the Darling stand-in's container, store queries).
    fn namespaces(&self) -> BTreeSet<String> {
        // The mount's root as mountinfo shows it is relative to its filesystem, so match the
        // unique temp dir name rather than the whole host path.
        let name = self
            .dir()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let marker = format!("/{name}/nix");
        let ours = mnt_ns_of("self");
        let mut seen = BTreeSet::new();
        let mut found = BTreeSet::new();
        for pid in all_pids() {
            let Some(ns) = mnt_ns_of(&pid.to_string()) else {
                continue;
            };
            if Some(&ns) == ours.as_ref() || !seen.insert(ns.clone()) {
                continue;
            }
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
            if info.is_empty() {
                // Gone (or exiting: its mount table reads empty) meanwhile: look at this
                // namespace again through another process.
                seen.remove(&ns);
                continue;
            }
            let mounted = info.lines().any(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.len() > 4 && f[3].ends_with(&marker) && f[4] == "/nix"
            });
            if mounted {
                found.insert(ns);
            }
        }
        found
    }

    /// The live processes in one of this machine's mount namespaces (its sshd, the
    /// per-connection sshd processes, the remote Nix programs), without their descendants: a
    /// sandboxed build has a mount namespace of its own and is not among them. Tests use
    /// [`LazyRemote::processes`]; this is the narrower view, to show what it adds.
    pub fn processes_in_its_namespaces(&self) -> Vec<u32> {
        let namespaces = self.namespaces();
        if namespaces.is_empty() {
            return Vec::new();
        }
        all_pids()
            .into_iter()
            .filter(|p| mnt_ns_of(&p.to_string()).is_some_and(|ns| namespaces.contains(&ns)))
            .filter(|&p| alive(p))
            .collect()
    }

    /// Every live process of this machine: whatever runs in one of its mount namespaces and
    /// every descendant of one (the builds they run, sandboxed ones included: Nix's sandbox
    /// gives a build a mount namespace of its own, but it is still a child of the remote Nix).
    pub fn processes(&self) -> Vec<u32> {
        with_descendants(&self.processes_in_its_namespaces())
            .into_iter()
            .filter(|&p| alive(p))
            .collect()
    }

    /// The pid the start script wrote last (sshd's, after its `exec`), if it ran.
    pub fn started_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pidfile())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILLs every process of this machine ([`LazyRemote::processes`]) until none is left.
    pub fn kill_all(&self) {
        // Only processes in a private mount namespace of this machine's, or descendants of one.
        sigkill_until_gone("lazy remote", Duration::from_millis(20), || {
            self.processes()
                .into_iter()
                .map(|p| p as libc::pid_t)
                .collect()
        });
    }
}

impl StoreQueries for LazyRemote {
    /// Runs `program` in a fresh namespace with this machine's `/nix` and `/etc/nix`, whether
    /// or not its sshd runs.
    fn store_command(&self, program: &str) -> Command {
        let mut c = Command::new("/usr/bin/unshare");
        c.args(["-m", "--propagation", "private", "/bin/sh", "-c"])
            .arg(self.layout_script(None))
            .arg("nlb-lazy-query")
            .arg(program)
            .env_clear()
            .env("PATH", STD_PATH)
            .env("HOME", self.dir().join("home"))
            .current_dir("/");
        c
    }
    fn host_nix_dir(&self) -> PathBuf {
        self.dir().join("nix")
    }
    fn command_timeout(&self) -> Duration {
        self.opts.command_timeout
    }
}

impl Drop for LazyRemote {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// A TOML string literal.
pub fn toml_str(s: &str) -> String {
    // TOML basic strings accept the same escapes Rust's Debug output uses for these inputs
    // (quotes, backslashes, \n); tests pass paths and shell scripts.
    format!("{s:?}")
}

/// A TOML array of strings.
pub fn toml_list(items: &[&str]) -> String {
    format!(
        "[{}]",
        items
            .iter()
            .map(|s| toml_str(s))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The nix-lazy-builder binary the lazy tests run as hook, supervisor and CLI: the one cargo
/// built for these tests, or `$NLB_LAZY_BINARY` (e.g. a release build, to measure its RSS).
pub fn lazy_binary() -> PathBuf {
    std::env::var_os("NLB_LAZY_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(hook_binary)
}

/// A lazy QEMU builder behind a real nix-daemon running our hook: the `arch` image's builder
/// (`vm-<arch>`) with the test keys, held while the one-VM-test lock is ours, with a guard that
/// kills a VM still running from its state dir. Dropped in this order: the daemon, a leftover
/// VM, the config, the lock.
pub struct LazyVm {
    pub daemon: LocalDaemon,
    _no_leftover_vm: KillMentioning,
    pub cfg: LazyConfig,
    _lock: super::boot::VmLock,
}

impl LazyVm {
    /// Waits for the one-VM-test lock, makes the `arch` image, writes a config whose one
    /// builder is its VM with `settings` added, and starts a daemon on it (the supervisor
    /// lingering `linger`).
    #[track_caller]
    pub fn start(arch: &str, settings: &str, linger: Duration) -> LazyVm {
        let lock = super::boot::one_vm_test_at_a_time_blocking();
        let img = super::boot::vm_image(arch);
        let builder = format!("vm-{arch}");
        let cfg = LazyConfig::write(&[with_builder_keys(&img.toml, &builder, settings)]);
        let no_leftover = KillMentioning(cfg.state_dir());
        let daemon = LocalDaemon::start(cfg.daemon_opts(linger));
        LazyVm {
            daemon,
            _no_leftover_vm: no_leftover,
            cfg,
            _lock: lock,
        }
    }
}

/// A lazy-builder config: `[supervisor] state-dir` plus the given builder tables.
pub struct LazyConfig {
    pub dir: tempfile::TempDir,
}

impl LazyConfig {
    /// Writes `<tmp>/lazy-builder.toml` with `state-dir = <tmp>/state` and `builders`.
    #[track_caller]
    pub fn write(builders: &[String]) -> Self {
        let dir = scratch("nlb-lazy-config-", &[]);
        let mut text = format!(
            "[supervisor]\nstate-dir = {}\n\n",
            toml_str(&dir.path().join("state").to_string_lossy())
        );
        for b in builders {
            text.push_str(b);
            text.push('\n');
        }
        write(&dir.path().join("lazy-builder.toml"), &text);
        // Fail here, with the text, rather than in the hook.
        if let Err(e) =
            nix_lazy_builder::config::Config::parse(&text, &dir.path().join("lazy-builder.toml"))
        {
            panic!("bad test config: {e}\n{text}");
        }
        LazyConfig { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("lazy-builder.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// What the supervisor recorded in its `boot-times.json` for `builder` (ms, oldest first):
    /// its boots (`table` `"builders"`) or its restores from a snapshot (`"restores"`); empty
    /// while there is nothing.
    pub fn recorded_ms(&self, table: &str, builder: &str) -> Vec<u64> {
        let text =
            std::fs::read_to_string(self.state_dir().join("boot-times.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        v[table][builder]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default()
    }

    /// The auto-started supervisor's log.
    pub fn supervisor_log(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("supervisor.log")).unwrap_or_default()
    }

    /// A builder's backend log (`command.log`, `darling.log`, `qemu.log`, `console.log`).
    pub fn builder_log(&self, builder: &str, file: &str) -> String {
        std::fs::read_to_string(self.state_dir().join("builders").join(builder).join(file))
            .unwrap_or_default()
    }

    /// Daemon options with our hook, this config and a supervisor that exits `linger` after
    /// it has nothing left to do.
    pub fn daemon_opts(&self, linger: Duration) -> super::DaemonOpts {
        let mut opts = super::DaemonOpts::new(super::Nix::Host).with_our_hook();
        let bin = lazy_binary();
        if bin != hook_binary() {
            opts.build_hook = Some(bin.to_string_lossy().into_owned());
            if let Some(dir) = bin.parent() {
                opts.expose.push(dir.to_path_buf());
            }
        }
        opts.env(
            nix_lazy_builder::config::CONFIG_ENV_VAR,
            &self.path().to_string_lossy(),
        )
        .env(
            nix_lazy_builder::supervisor::server::LINGER_ENV,
            &linger.as_millis().to_string(),
        )
    }

    /// `nix-lazy-builder status --json` inside the daemon's namespace.
    #[track_caller]
    pub fn status(&self, daemon: &LocalDaemon) -> Vec<BuilderStatus> {
        let out = self.cli(daemon, &["status", "--json"]);
        out.assert_success();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not a list of builders ({e}):\n{out}"))
    }

    /// One builder's status.
    #[track_caller]
    pub fn status_of(&self, daemon: &LocalDaemon, name: &str) -> BuilderStatus {
        self.status(daemon)
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("status has no builder '{name}'"))
    }

    /// Polls `status` until builder `name` is in `state` (the supervisor hears of an
    /// instance's end a moment after its processes are gone); its status then.
    #[track_caller]
    pub fn wait_for_state(
        &self,
        daemon: &LocalDaemon,
        name: &str,
        state: nix_lazy_builder::supervisor::proto::State,
        limit: Duration,
    ) -> BuilderStatus {
        let t0 = Instant::now();
        loop {
            let st = self.status_of(daemon, name);
            if st.state == state {
                return st;
            }
            assert!(
                t0.elapsed() < limit,
                "builder '{name}' not {state:?} within {limit:?}: {st:?}\n{}",
                self.supervisor_log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the CLI (`nix-lazy-builder ARGS…`) in the daemon's namespace with this config.
    #[track_caller]
    pub fn cli(&self, daemon: &LocalDaemon, args: &[&str]) -> CmdOutput {
        let mut c = daemon.client_command(&lazy_binary().to_string_lossy());
        c.args(args)
            .env(nix_lazy_builder::config::CONFIG_ENV_VAR, self.path());
        run_command(&mut c, None, Duration::from_secs(60))
    }

    /// The pid of the supervisor that serves now (from its hello), if one answers.
    pub fn supervisor_pid(&self) -> Option<u32> {
        let state = self.state_dir();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            nix_lazy_builder::supervisor::Client::connect(&state)
                .await
                .ok()
                .map(|c| c.supervisor_pid())
        })
    }
}

/// Polls `f` every 20 ms until it is true; panics with `what` after `limit`.
#[track_caller]
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// `toml` (a builder table with `[builders.<builder>.boot]`) with `extra` key lines added to
/// `[builders.<builder>]`, right before its boot section.
#[track_caller]
pub fn with_builder_keys(toml: &str, builder: &str, extra: &str) -> String {
    let boot = format!("[builders.{builder}.boot]");
    let (head, tail) = toml
        .split_once(&boot)
        .unwrap_or_else(|| panic!("no {boot} in the config:\n{toml}"));
    format!("{head}{extra}\n\n{boot}{tail}")
}

/// The `start end` uptimes (s) a timed build wrote to its output `text`, asserting it slept
/// (at least 1.9 s); `what` names the output in the messages.
#[track_caller]
pub fn slept_interval(text: &str, what: &str) -> (f64, f64) {
    slept_at_least(text, what, 1.9)
}

/// [`slept_interval`] for a build that sleeps at least `secs`.
#[track_caller]
pub fn slept_at_least(text: &str, what: &str, secs: f64) -> (f64, f64) {
    let v: Vec<f64> = text
        .split_whitespace()
        .map(|x| {
            x.parse()
                .unwrap_or_else(|e| panic!("{what}: {text:?}: {e}"))
        })
        .collect();
    assert_eq!(v.len(), 2, "{what}: {text:?}");
    assert!(v[1] - v[0] >= secs, "{what} did not sleep: {text:?}");
    (v[0], v[1])
}

/// `intervals` as "start-end" in seconds from the first start, for a test's log.
pub fn runs_from_first(intervals: &[(f64, f64)]) -> Vec<String> {
    let base = intervals.iter().map(|i| i.0).fold(f64::INFINITY, f64::min);
    intervals
        .iter()
        .map(|(s, e)| format!("{:.2}-{:.2}", s - base, e - base))
        .collect()
}

/// The most intervals `(start, end)` that overlap at any instant; touching ends (one ends
/// exactly when another starts) do not overlap.
pub fn max_overlap(intervals: &[(f64, f64)]) -> usize {
    let mut events: Vec<(f64, i32)> = Vec::new();
    for &(s, e) in intervals {
        events.push((s, 1));
        events.push((e, -1));
    }
    // Ends before starts at the same instant.
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in events {
        now += d;
        max = max.max(now);
    }
    max.max(0) as usize
}

/// Kills, when dropped, every process whose command line mentions the directory (a test's or
/// bench's own state directory: QEMU's QMP socket and serial log live there). The harness stops
/// the daemon's namespace with SIGKILL, which can take the supervisor's watchdog down with the
/// supervisor; a run that fails half-way must not leave its VM running.
pub struct KillMentioning(pub PathBuf);

impl Drop for KillMentioning {
    fn drop(&mut self) {
        let needle = self.0.display();
        for (pid, _) in processes_mentioning(&self.0) {
            eprintln!("killing leftover process {pid} of {needle}");
            // SAFETY: kill(2) on a process that names this run's own temp directory.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// One stderr line of a [`Background`] command and when it arrived (from the start).
#[derive(Clone, Debug)]
pub struct TimedLine {
    pub at: Duration,
    pub text: String,
}

/// A client command running in the background, its stderr lines collected with their times.
/// Dropping it kills the command (by pid) if it still runs.
pub struct Background {
    child: Child,
    argv: Vec<String>,
    start: Instant,
    lines: Arc<Mutex<Vec<TimedLine>>>,
    err: Option<thread::JoinHandle<()>>,
    out: Option<thread::JoinHandle<Vec<u8>>>,
}

impl Background {
    /// `nix-build --no-out-link ARGS…` through `daemon`.
    pub fn nix_build(daemon: &LocalDaemon, args: &[String]) -> Self {
        let mut c = daemon.client_command("nix-build");
        c.arg("--no-out-link").args(args);
        Self::spawn(&mut c)
    }

    /// Starts `cmd` with no stdin, its stdout and stderr captured.
    pub fn spawn(cmd: &mut Command) -> Self {
        let argv = super::argv_of(cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", argv.join(" ")));
        let lines: Arc<Mutex<Vec<TimedLine>>> = Arc::default();
        let err = child.stderr.take().map(|pipe| {
            let lines = lines.clone();
            thread::spawn(move || {
                let mut r = BufReader::new(pipe);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let text = String::from_utf8_lossy(&buf).trim_end().to_owned();
                            let at = start.elapsed();
                            lines
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(TimedLine { at, text });
                        }
                    }
                }
            })
        });
        let out = child.stdout.take().map(|mut pipe| {
            thread::spawn(move || {
                let mut s = Vec::new();
                let _ = pipe.read_to_end(&mut s);
                s
            })
        });
        Background {
            child,
            argv,
            start,
            lines,
            err,
            out,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn is_finished(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn stderr_so_far(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// When a stderr line containing `needle` arrived, if one has.
    pub fn line_at(&self, needle: &str) -> Option<Duration> {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|l| l.text.contains(needle))
            .map(|l| l.at)
    }

    /// Waits for a stderr line containing `needle`; panics (with what was printed) if the
    /// command ends first or `limit` passes.
    #[track_caller]
    pub fn wait_line(&mut self, needle: &str, limit: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            if let Some(at) = self.line_at(needle) {
                return at;
            }
            if self.is_finished() {
                // Its last lines may still be in the pipe.
                thread::sleep(Duration::from_millis(100));
                if let Some(at) = self.line_at(needle) {
                    return at;
                }
                panic!(
                    "`{}` ended before printing {needle:?}:\n{}",
                    self.argv.join(" "),
                    self.stderr_so_far()
                );
            }
            assert!(
                t0.elapsed() < limit,
                "no {needle:?} within {limit:?}:\n{}",
                self.stderr_so_far()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the command to end (killing it and panicking with its stderr once `limit`
    /// has passed since the start) and returns what it printed.
    #[track_caller]
    pub fn finish(mut self, limit: Duration) -> CmdOutput {
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if self.start.elapsed() > limit => {
                    // SAFETY: kill(2) on our own unreaped child.
                    unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
                    let _ = self.child.wait();
                    panic!(
                        "`{}` did not finish within {limit:?}; killed it.\n--- stderr ---\n{}",
                        self.argv.join(" "),
                        self.stderr_so_far()
                    );
                }
                Ok(None) => thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("waiting for `{}`: {e}", self.argv.join(" ")),
            }
        };
        let elapsed = self.start.elapsed();
        if let Some(h) = self.err.take() {
            let _ = h.join();
        }
        let stdout = self
            .out
            .take()
            .and_then(|h| h.join().ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        CmdOutput {
            argv: std::mem::take(&mut self.argv),
            status,
            stdout,
            stderr: self.stderr_so_far(),
            elapsed,
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// [`run_command`] that also records when each stderr line arrived.
#[track_caller]
pub fn run_streaming(cmd: &mut Command, timeout: Duration) -> (CmdOutput, Vec<TimedLine>) {
    let bg = Background::spawn(cmd);
    let lines = bg.lines.clone();
    let out = bg.finish(timeout);
    let timed = lines.lock().unwrap_or_else(|p| p.into_inner()).clone();
    (out, timed)
}

/// `nix-build --no-out-link ARGS…` through `daemon`, with timestamped stderr lines.
#[track_caller]
pub fn nix_build_streaming(daemon: &LocalDaemon, args: &[&str]) -> (CmdOutput, Vec<TimedLine>) {
    let mut c = daemon.client_command("nix-build");
    c.arg("--no-out-link").args(args);
    run_streaming(&mut c, DEFAULT_COMMAND_TIMEOUT)
}
