//! A "remote machine" for tests: OpenSSH's sshd on 127.0.0.1 and a free port, key-only auth
//! with fresh host and client keys, running in its own private mount namespace with its own
//! `/nix` and `/etc/nix`, so every SSH session's `nix-store --serve` / `nix-daemon --stdio` uses
//! that separate store (Nix 2.8 from the host, 2.26 from the trixie chroot or 2.34 from the sid
//! chroot).
//!
//! Owns: the remote's nix.conf, sshd config and keys, readiness (banner, then a real ssh login
//! with the pinned host key), the strings tests put in machines files and configs (URIs, key
//! paths, base64 host key, NIX_SSHOPTS), and queries against the remote store.
//!
//! Must never: listen on anything but 127.0.0.1, use a fixed port, accept passwords, or share
//! build users with another store unguarded (see `ns::SHARED_USERPOOL`).

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::daemon::{scratch, write};
use super::ns::{Layout, NsProcess};
use super::store::StoreQueries;
use super::{CmdOutput, DEFAULT_COMMAND_TIMEOUT, Nix, group_exists, run_command};

/// How the hook reaches the remote store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `ssh://`: `nix-store --serve --write`.
    Ssh,
    /// `ssh-ng://`: `nix-daemon --stdio`.
    SshNg,
}

impl Scheme {
    pub fn prefix(self) -> &'static str {
        match self {
            Scheme::Ssh => "ssh",
            Scheme::SshNg => "ssh-ng",
        }
    }
}

/// How to configure a [`RemoteStore`]. Start from [`RemoteOpts::new`] and set fields.
#[derive(Clone, Debug)]
pub struct RemoteOpts {
    pub nix: Nix,
    /// `extra-platforms` (default `aarch64-linux`, so it can build the fake aarch64 drvs).
    pub extra_platforms: Vec<String>,
    /// `system-features`; `None` keeps Nix's default.
    pub system_features: Option<Vec<String>>,
    /// `build-users-group`; `None` picks `nixrbld` (tests/env/provision.sh creates it) and
    /// falls back to `nixbld`. Empty string means no build users (set `sandbox = false`).
    pub build_users_group: Option<String>,
    pub sandbox: bool,
    /// Extra nix.conf lines, appended last.
    pub extra_conf: Vec<String>,
    pub command_timeout: Duration,
}

impl RemoteOpts {
    pub fn new(nix: Nix) -> Self {
        RemoteOpts {
            nix,
            extra_platforms: vec!["aarch64-linux".to_owned()],
            system_features: None,
            build_users_group: None,
            sandbox: true,
            extra_conf: Vec::new(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }

    /// A Nix 2.34 (sid) remote whose `nix-daemon` may be told not to trust its client (the
    /// `daemon-trust-override` feature): see [`RemoteStore::untrusting_ssh_ng_uri`].
    pub fn trust_override() -> Self {
        let mut opts = RemoteOpts::new(Nix::Sid);
        opts.extra_conf
            .push("extra-experimental-features = daemon-trust-override".to_owned());
        opts
    }
}

impl Default for RemoteOpts {
    fn default() -> Self {
        RemoteOpts::new(Nix::Host)
    }
}

/// The remote's ssh user.
pub const REMOTE_USER: &str = "root";
/// The only address anything listens on.
pub const REMOTE_HOST: &str = "127.0.0.1";

/// A running sshd "machine" with its own Nix store. Dropping it stops sshd and every session
/// (they share its namespace) and deletes its temp dir.
pub struct RemoteStore {
    opts: RemoteOpts,
    port: u16,
    host_key_line: String,
    nix_version: String,
    /// sshd's log from before the last [`RemoteStore::restart`].
    earlier_logs: String,
    restarts: u32,
    // Field order matters: the process must stop before the temp dir is removed.
    proc: NsProcess,
    base: tempfile::TempDir,
}

impl RemoteStore {
    /// Starts sshd and waits until a real ssh login with the pinned host key works. Panics
    /// with sshd's log on failure.
    #[track_caller]
    pub fn start(opts: RemoteOpts) -> Self {
        opts.nix.require();
        super::require_file("/usr/bin/ssh", "openssh-client");
        super::require_file("/usr/bin/ssh-keygen", "openssh-client");
        let sshd = opts.nix.host_path("/usr/sbin/sshd");
        assert!(
            sshd.exists(),
            "no sshd at {}: install openssh-server ({} Nix)",
            sshd.display(),
            opts.nix.label()
        );
        let group = match &opts.build_users_group {
            Some(g) => g.clone(),
            None if group_exists(opts.nix.root(), "nixrbld") => "nixrbld".to_owned(),
            None => {
                eprintln!(
                    "note: no `nixrbld` group in {}/etc/group (tests/env/provision.sh creates it); the remote uses `nixbld`, kept apart from other stores by the shared userpool locks",
                    opts.nix.root().display()
                );
                "nixbld".to_owned()
            }
        };
        if !group.is_empty() {
            super::require_group(opts.nix.root(), &group);
        }

        let base = scratch("nlb-remote-", &["nix", "etc-nix", "ssh", "home"]);
        let b = base.path().to_path_buf();
        let ssh = b.join("ssh");
        let host_key_line = prepare_remote_dir(&b, &opts, &group, "nlb-test-remote");

        let layout = Layout {
            nix: opts.nix,
            nix_dir: b.join("nix"),
            etc_nix: Some(b.join("etc-nix")),
            expose: vec![b.clone()],
        };
        let label = format!("sshd {}", opts.nix.label());
        let mut last_log = String::new();
        for attempt in 1..=5 {
            let port = free_port();
            let config = ssh.join("sshd_config");
            write(&config, &sshd_config(&ssh, &b.join("home"), port));
            let argv = vec![
                "/usr/sbin/sshd".to_owned(),
                "-D".to_owned(),
                "-e".to_owned(),
                "-f".to_owned(),
                config.to_string_lossy().into_owned(),
            ];
            let log = b.join(format!("sshd-{attempt}.log"));
            let mut proc = NsProcess::spawn(&label, &layout, &argv, &[], &log);
            match wait_for_banner(&mut proc, port) {
                Ok(()) => {}
                Err(why) => {
                    last_log = format!("{why}\n{}", proc.log_text());
                    if last_log.contains("Address already in use")
                        || last_log.contains("Cannot bind")
                    {
                        continue; // lost the race for the port; try another
                    }
                    panic!("{label} did not come up on port {port}: {last_log}");
                }
            }
            proc.confirm_namespace();
            let known_hosts = ssh.join("known_hosts");
            write(
                &known_hosts,
                &format!("[{REMOTE_HOST}]:{port} {host_key_line}\n"),
            );
            let mut login = ssh_command(&ssh.join("client_key"), port, &known_hosts);
            // `--init` makes the store's database once, as installing Nix does on a real
            // machine: two Nix processes opening a brand-new store at once race on it
            // (`LazyRemote::init_store`).
            login.args(["nix-store", "--init", "&&", "nix-store", "--version"]);
            let out = run_command(&mut login, None, opts.command_timeout);
            if !out.success() {
                last_log = format!("{out}\n--- sshd log ---\n{}", proc.log_text());
                if !proc.alive() {
                    continue; // someone else's server answered on the port; ours is gone
                }
                panic!(
                    "{label} answers on port {port} but ssh with the pinned key fails:\n{last_log}"
                );
            }
            return RemoteStore {
                opts,
                port,
                host_key_line,
                nix_version: out.stdout.trim().to_owned(),
                earlier_logs: String::new(),
                restarts: 0,
                proc,
                base,
            };
        }
        panic!("{label}: no free port after 5 attempts; last attempt:\n{last_log}");
    }

    /// `nix-store --version` as seen over ssh, e.g. `nix-store (Nix) 2.8.0`.
    pub fn nix_version(&self) -> &str {
        &self.nix_version
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// sshd's pid (the namespace to `nsenter`).
    #[allow(dead_code, reason = "benches/hook measures the remote's CPU from it")]
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The remote's temp dir.
    pub fn dir(&self) -> &Path {
        self.base.path()
    }

    /// `ssh://root@127.0.0.1:PORT` (or `ssh-ng://…`).
    pub fn uri(&self, scheme: Scheme) -> String {
        format!(
            "{}://{}@{}:{}",
            scheme.prefix(),
            REMOTE_USER,
            REMOTE_HOST,
            self.port
        )
    }

    /// `ssh-ng://root@127.0.0.1:PORT?remote-program=WRAPPER`: a daemon that does not trust
    /// the SSH user, `nix-daemon --stdio --force-untrusted` through a wrapper this writes into
    /// the remote's dir (the host's temp dir, visible at the same path in the chroot). Needs a
    /// remote started with [`RemoteOpts::trust_override`].
    pub fn untrusting_ssh_ng_uri(&self) -> String {
        let wrapper = self.dir().join("nix-daemon-untrusted");
        write(
            &wrapper,
            "#!/bin/sh\nexec nix-daemon \"$@\" --force-untrusted\n",
        );
        super::set_mode(&wrapper, 0o755);
        format!(
            "{}?remote-program={}",
            self.uri(Scheme::SshNg),
            wrapper.display()
        )
    }

    /// `ssh://root@127.0.0.1` without the port: for Nix 2.8's own hook, which cannot take a
    /// port from the URI (give it [`RemoteStore::nix_sshopts`] in the daemon's environment).
    pub fn uri_without_port(&self, scheme: Scheme) -> String {
        format!("{}://{}@{}", scheme.prefix(), REMOTE_USER, REMOTE_HOST)
    }

    /// The client's private key (authorised for root on the remote).
    pub fn client_key(&self) -> PathBuf {
        self.dir().join("ssh/client_key")
    }

    /// The host's public key line, `ssh-ed25519 AAAA… comment`.
    pub fn host_key_line(&self) -> &str {
        &self.host_key_line
    }

    /// Exactly what `base64 -w0 ssh_host_ed25519_key.pub` prints (the line plus its newline),
    /// as users fill in column 8 of a machines line.
    pub fn host_key_base64(&self) -> String {
        let file = format!("{}\n", self.host_key_line);
        base64::engine::general_purpose::STANDARD.encode(file.as_bytes())
    }

    /// A known_hosts file with `[127.0.0.1]:PORT <host key>`.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir().join("ssh/known_hosts")
    }

    /// `NIX_SSHOPTS` for Nix's own hook: `-p PORT` when `with_port` (Nix 2.8 and 2.26 cannot
    /// take the port from the URI; 2.34 can), batch mode and a connect timeout. The pinned host
    /// key (machines column 8) still decides: Nix writes it as `127.0.0.1 <key>` into its own
    /// known-hosts file, and OpenSSH matches that entry for any port on a literal IP (checked:
    /// a wrong column-8 key fails with "Host key verification failed").
    pub fn nix_sshopts(&self, with_port: bool) -> String {
        let opts = "-oBatchMode=yes -oConnectTimeout=20";
        if with_port {
            format!("-p {} {opts}", self.port)
        } else {
            opts.to_owned()
        }
    }

    /// One machines-file line: `URI SYSTEMS KEY MAXJOBS SPEED FEATURES MANDATORY HOSTKEY`.
    /// `with_port` puts the port in the URI (our hook, Nix ≥ 2.31); without it, pair the line
    /// with [`RemoteStore::nix_sshopts`].
    pub fn machines_line(&self, m: &MachineLine<'_>) -> String {
        let uri = if m.with_port {
            self.uri(m.scheme)
        } else {
            self.uri_without_port(m.scheme)
        };
        let list = |v: &[&str]| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.join(",")
            }
        };
        format!(
            "{uri} {} {} {} {} {} {} {}",
            list(m.systems),
            self.client_key().display(),
            m.max_jobs,
            m.speed_factor,
            list(m.supported_features),
            list(m.mandatory_features),
            self.host_key_base64()
        )
    }

    /// `ssh` from the host (not from any namespace) with the client key and pinned host key,
    /// running `remote_argv` on the remote.
    pub fn ssh_command(&self, remote_argv: &[&str]) -> Command {
        let mut c = ssh_command(&self.client_key(), self.port, &self.known_hosts());
        c.args(remote_argv);
        c
    }

    /// Runs `remote_argv` over ssh.
    #[track_caller]
    pub fn ssh(&self, remote_argv: &[&str]) -> CmdOutput {
        run_command(
            &mut self.ssh_command(remote_argv),
            None,
            self.opts.command_timeout,
        )
    }

    /// Runs a program inside the remote's namespace (and chroot) directly, not over ssh.
    #[track_caller]
    pub fn run(&self, program: &str, args: &[&str]) -> CmdOutput {
        let mut c = self.proc.command(program);
        c.args(args);
        run_command(&mut c, None, self.opts.command_timeout)
    }

    /// sshd's log (`-e`: everything it logs goes there), every run of it since the start.
    pub fn sshd_log(&self) -> String {
        format!("{}{}", self.earlier_logs, self.proc.log_text())
    }

    /// SSH logins so far (sshd's "Accepted publickey" lines), the harness' own check at start
    /// included.
    pub fn logins(&self) -> usize {
        self.sshd_log().matches("Accepted publickey").count()
    }

    /// Every live process of this machine: sshd, its sessions, the remote Nix programs and
    /// the builds they run (sandboxed builds included: they descend from them).
    pub fn processes(&self) -> Vec<u32> {
        self.proc.processes()
    }

    /// The machine loses power: SIGKILL to sshd, every session and every build, all at once.
    /// Its store stays on disk (queries still work) until the handle is dropped.
    pub fn kill(&mut self) {
        self.proc.kill_now();
    }

    /// Kills the machine ([`RemoteStore::kill`]) and starts its sshd again on the same port
    /// with the same store; with `new_host_key`, under a new host key (the machine was
    /// reinstalled, or someone else answers). [`RemoteStore::sshd_log`] keeps the earlier
    /// runs' lines.
    #[track_caller]
    pub fn restart(&mut self, new_host_key: bool) {
        self.proc.kill_now();
        let b = self.base.path().to_path_buf();
        let ssh = b.join("ssh");
        if new_host_key {
            for f in ["host_ed25519_key", "host_ed25519_key.pub"] {
                let _ = std::fs::remove_file(ssh.join(f));
            }
            keygen(&ssh.join("host_ed25519_key"), "nlb-test-remote-host-2");
            self.host_key_line = read(&ssh.join("host_ed25519_key.pub")).trim().to_owned();
        }
        let layout = Layout {
            nix: self.opts.nix,
            nix_dir: b.join("nix"),
            etc_nix: Some(b.join("etc-nix")),
            expose: vec![b.clone()],
        };
        let argv = vec![
            "/usr/sbin/sshd".to_owned(),
            "-D".to_owned(),
            "-e".to_owned(),
            "-f".to_owned(),
            ssh.join("sshd_config").to_string_lossy().into_owned(),
        ];
        self.restarts += 1;
        let log = b.join(format!("sshd-restart-{}.log", self.restarts));
        let label = format!("sshd {} (restart {})", self.opts.nix.label(), self.restarts);
        let old = std::mem::replace(
            &mut self.proc,
            NsProcess::spawn(&label, &layout, &argv, &[], &log),
        );
        self.earlier_logs.push_str(&old.log_text());
        drop(old);
        if let Err(why) = wait_for_banner(&mut self.proc, self.port) {
            panic!("{label} did not come back on port {}: {why}", self.port);
        }
        self.proc.confirm_namespace();
    }
}

impl StoreQueries for RemoteStore {
    fn store_command(&self, program: &str) -> Command {
        let mut c = self.proc.command(program);
        c.env("HOME", self.dir().join("home"));
        c
    }
    fn host_nix_dir(&self) -> PathBuf {
        self.dir().join("nix")
    }
    fn command_timeout(&self) -> Duration {
        self.opts.command_timeout
    }
}

/// Arguments for [`RemoteStore::machines_line`].
#[derive(Clone, Debug)]
pub struct MachineLine<'a> {
    pub scheme: Scheme,
    pub with_port: bool,
    pub systems: &'a [&'a str],
    pub max_jobs: u32,
    pub speed_factor: u32,
    pub supported_features: &'a [&'a str],
    pub mandatory_features: &'a [&'a str],
}

impl MachineLine<'_> {
    /// `scheme`, aarch64-linux, 1 job, speed 1, no features.
    pub fn new(scheme: Scheme, with_port: bool) -> Self {
        MachineLine {
            scheme,
            with_port,
            systems: &["aarch64-linux"],
            max_jobs: 1,
            speed_factor: 1,
            supported_features: &[],
            mandatory_features: &[],
        }
    }
}

/// `ssh … root@127.0.0.1 --` with only the given key and known_hosts, strict host key
/// checking and no prompts; append the remote command.
fn ssh_command(key: &Path, port: u16, known_hosts: &Path) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-F", "/dev/null", "-i"])
        .arg(key)
        .args(["-p", &port.to_string()])
        .arg(format!("-oUserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-oGlobalKnownHostsFile=/dev/null",
            "-oStrictHostKeyChecking=yes",
            "-oBatchMode=yes",
            "-oIdentitiesOnly=yes",
            "-oConnectTimeout=20",
            "-oLogLevel=ERROR",
        ])
        .arg(format!("{REMOTE_USER}@{REMOTE_HOST}"))
        .arg("--");
    c
}

fn sshd_config(ssh: &Path, home: &Path, port: u16) -> String {
    format!(
        "ListenAddress {REMOTE_HOST}\n\
         Port {port}\n\
         HostKey {hk}\n\
         AuthorizedKeysFile {ak}\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\n\
         UsePAM no\n\
         StrictModes no\n\
         PidFile none\n\
         MaxStartups 100\n\
         MaxSessions 100\n\
         SetEnv HOME={home} XDG_CACHE_HOME={home}/.cache\n",
        hk = ssh.join("host_ed25519_key").display(),
        ak = ssh.join("authorized_keys").display(),
        home = home.display(),
    )
}

/// A fresh ed25519 key pair without a passphrase at `path` (and `path.pub`).
pub(crate) fn keygen(path: &Path, comment: &str) {
    let mut c = Command::new("ssh-keygen");
    c.args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path);
    run_command(&mut c, None, Duration::from_secs(30)).assert_success();
}

pub(crate) fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// A port that was free a moment ago (sshd may still lose a race for it; the caller retries).
pub(crate) fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"));
    l.local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"))
        .port()
}

/// Waits until `port` sends an `SSH-2.0-` banner while `proc` is alive.
fn wait_for_banner(proc: &mut NsProcess, port: u16) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = proc.exit_status() {
            return Err(format!("sshd exited ({status})"));
        }
        if Instant::now() > deadline {
            return Err("no SSH banner within 30 s".to_owned());
        }
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 8];
            if s.read_exact(&mut buf).is_ok() && &buf == b"SSH-2.0-" {
                // The banner could come from someone else's server on a reused port; the
                // caller's ssh login with the pinned host key settles that.
                if proc.alive() {
                    return Ok(());
                }
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Fills a remote store's directory `b` (which has `ssh/` and `etc-nix/`): a fresh host key and
/// client key (`<label>-host`, `<label>-client`), `authorized_keys`, and the store's nix.conf
/// from `opts`. Returns the host's public key line. Shared by [`RemoteStore`] and the lazy
/// (boot-on-demand) remote in `lazy.rs`.
pub(crate) fn prepare_remote_dir(b: &Path, opts: &RemoteOpts, group: &str, label: &str) -> String {
    let ssh = b.join("ssh");
    keygen(&ssh.join("host_ed25519_key"), &format!("{label}-host"));
    keygen(&ssh.join("client_key"), &format!("{label}-client"));
    let client_pub = read(&ssh.join("client_key.pub"));
    write(&ssh.join("authorized_keys"), &client_pub);
    let mut conf =
        super::daemon::store_settings(group, opts.sandbox, opts.system_features.as_deref());
    conf.push(format!(
        "extra-platforms = {}",
        opts.extra_platforms.join(" ")
    ));
    conf.extend(opts.extra_conf.iter().cloned());
    write(&b.join("etc-nix/nix.conf"), &(conf.join("\n") + "\n"));
    read(&ssh.join("host_ed25519_key.pub")).trim().to_owned()
}
