//! The harness's part for the `security::*` tests: a real OpenSSH sshd on 127.0.0.1 (fresh host and
//! client keys, key-only authentication, its own mount namespace so its privilege-separation
//! directory never touches the machine's `/run`), a scratch environment that runs the real
//! binary as nix-daemon runs the hook (or as an administrator runs the CLI, as root or as
//! `nobody`), and the daemon's side of the hook protocol.
//!
//! Must never: listen anywhere but 127.0.0.1, use the machine's `/nix` or `/etc/nix` (nothing
//! here runs a real Nix command on this machine: remote programs are stub scripts), stop a
//! process it did not start, or stop one other than by its pid.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hook_protocol::StorePath;
use hook_protocol::hook::{HookRequest, Settings, TryRequest};

use super::{
    CmdOutput, free_port, hook_binary, keygen, read, require_file, require_root, run_command,
    scratch, set_mode, write,
};

/// The derivation every `try` asks about (never read: no test gets as far as an accept).
pub const DRV: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nlb-security.drv";

/// The public half of nixpkgs' `darwin.linux-builder` host key (its private half is in the
/// nixpkgs source).
pub const WELL_KNOWN_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJBWcxb/Blaqt1auOtE+F8QUWrUotiC5qBJ+UuEWdVCb";

pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A real OpenSSH sshd on 127.0.0.1, stopped (by pid) when dropped.
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// `ssh-ed25519 AAAA… comment` of its host key.
    pub host_key_line: String,
    /// A client key it accepts for root.
    pub client_key: PathBuf,
    child: Child,
}

/// `sh -c` script that runs sshd in the foreground, logging to stderr, with the config file
/// `$1`, in a private `/run` (sshd wants `/run/sshd`; the host's is left alone).
pub const RUN_SSHD: &str = "mount -t tmpfs -o mode=0755 nlb-sec-run /run && mkdir -p /run/sshd && \
                            exec /usr/sbin/sshd -D -e -f \"$1\"";

/// The argv that runs [`RUN_SSHD`] with `config` in a private mount namespace; `label` is the
/// script's `$0`.
pub fn run_sshd_argv(label: &str, config: &Path) -> Vec<String> {
    let unshare = ["/usr/bin/unshare", "-m", "--propagation", "private"];
    let sh = ["/bin/sh", "-c", RUN_SSHD, label];
    let config = config.display().to_string();
    unshare
        .into_iter()
        .chain(sh)
        .map(str::to_owned)
        .chain([config])
        .collect()
}

/// Writes `d/file`, an sshd config on `port` with the keys in `d` (`host_key`,
/// `authorized_keys` for root), logging at VERBOSE (logins, and connections that went away
/// before one) to its stderr; returns its path.
pub fn sshd_config(d: &Path, file: &str, port: u16) -> PathBuf {
    let p = d.join(file);
    write(
        &p,
        &format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\nPidFile none\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nLogLevel VERBOSE\nMaxStartups 100\n",
            d = d.display()
        ),
    );
    p
}

impl Sshd {
    pub fn start() -> Sshd {
        require_root();
        require_file("/usr/sbin/sshd", "openssh-server");
        require_file("/usr/bin/ssh-keygen", "openssh-client");
        let dir = scratch("nlb-sec-sshd-", &[]);
        let d = dir.path();
        keygen(&d.join("host_key"), "nlb-security-host");
        keygen(&d.join("client_key"), "nlb-security-client");
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).expect("copy key");
        let port = free_port();
        let config = sshd_config(d, "sshd_config", port);
        let log = std::fs::File::create(d.join("sshd.log")).expect("sshd log");
        let argv = run_sshd_argv("nlb-sec-sshd", &config);
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        let host_key_line = read(&d.join("host_key.pub")).trim().to_owned();
        let s = Sshd {
            client_key: d.join("client_key"),
            host_key_line,
            port,
            dir,
            child,
        };
        s.wait_for_banner();
        s
    }

    fn wait_for_banner(&self) {
        use std::io::Read;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                let mut b = [0u8; 8];
                if c.read_exact(&mut b).is_ok() && &b[..4] == b"SSH-" {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not come up on port {}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("sshd.log")).unwrap_or_default()
    }

    /// Whether any client got past authentication.
    pub fn accepted_a_login(&self) -> bool {
        self.log().contains("Accepted publickey")
    }

    /// The machines column (base64 of the host key line).
    pub fn host_key_b64(&self) -> String {
        b64(&self.host_key_line)
    }

    /// `ssh://root@127.0.0.1:PORT` plus `query` (e.g. `?remote-program=…`).
    pub fn uri(&self, scheme: &str, query: &str) -> String {
        format!("{scheme}://root@127.0.0.1:{}{query}", self.port)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of our own unreaped child (unshare exec'd into sshd).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Another host key, never served by any sshd here: pinning it is "the wrong key".
pub fn impostor_key(dir: &Path) -> String {
    let p = dir.join("impostor_key");
    if !p.exists() {
        keygen(&p, "nlb-impostor");
    }
    read(&p.with_extension("pub")).trim().to_owned()
}

/// A scratch place to run the binary: a pinned copy of it (a concurrent `cargo build` cannot
/// swap it mid-test, and `nobody` can execute it), a state directory for slot files, a `HOME`,
/// and the TOML config.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = scratch("nlb-sec-env-", &["state", "home/.ssh", "lazy-state"]);
        let d = dir.path();
        let bin = d.join("nix-lazy-builder");
        std::fs::copy(hook_binary(), &bin).expect("copy the binary");
        set_mode(&bin, 0o755);
        let env = Env { dir, bin };
        env.write_config("");
        env
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn config(&self) -> PathBuf {
        self.path("lazy-builder.toml")
    }

    /// Writes the TOML config: `body` plus a `[supervisor]` state directory in the scratch
    /// area, without warm connections: these tests look at the hook's own connection and at
    /// the one supervisor they start (with warm connections a hook starts one of its own,
    /// whose pool runs the remote program too).
    pub fn write_config(&self, body: &str) {
        self.write_config_keeping_warm(body, "0s");
    }

    /// [`write_config`](Self::write_config) with `keep-warm = keep_warm`: a hook then starts a
    /// supervisor whose pool opens sessions of its own.
    pub fn write_config_keeping_warm(&self, body: &str, keep_warm: &str) {
        let text = format!(
            "[supervisor]\nstate-dir = \"{}\"\nkeep-warm = \"{keep_warm}\"\n\n{body}",
            self.supervisor_state().display()
        );
        write(&self.config(), &text);
        set_mode(&self.config(), 0o644);
    }

    /// The supervisor's state directory.
    pub fn supervisor_state(&self) -> PathBuf {
        self.path("lazy-state/sup")
    }

    /// Stops the supervisor that serves [`supervisor_state`](Self::supervisor_state), if one
    /// answers (SIGTERM by the pid its hello gives), and waits until it is gone.
    pub fn stop_supervisor(&self) {
        let state = self.supervisor_state();
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let pid = rt.block_on(async {
            nix_lazy_builder::supervisor::Client::connect(&state)
                .await
                .ok()
                .map(|c| c.supervisor_pid())
        });
        if let Some(pid) = pid {
            // SAFETY: kill(2) has no memory preconditions; the pid is the live supervisor's.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            super::wait_until("the supervisor to exit", Duration::from_secs(20), || {
                !Path::new(&format!("/proc/{pid}")).exists()
            });
        }
    }

    fn base(&self, cmd: &mut Command) {
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", self.path("home"))
            .env("USER", "root")
            .env("NIX_STATE_DIR", self.path("state"))
            .env("NIX_LAZY_BUILDER_CONFIG", self.config())
            .current_dir(self.dir.path());
    }

    /// The hook as Nix 2.34 runs it, at `verbosity`, with `stdin` and extra environment.
    pub fn hook(&self, stdin: &[u8], verbosity: u8, env: &[(&str, &str)]) -> CmdOutput {
        let mut c = Command::new(&self.bin);
        c.args(["hook", "--config"])
            .arg(self.config())
            .arg(verbosity.to_string());
        self.base(&mut c);
        for (k, v) in env {
            c.env(k, v);
        }
        run_command(&mut c, Some(stdin), Duration::from_secs(90))
    }

    /// The CLI (`args` after the binary; `--config` is added), as root.
    pub fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
        let mut c = Command::new(&self.bin);
        c.args(args).arg("--config").arg(self.config());
        self.base(&mut c);
        for (k, v) in env {
            c.env(k, v);
        }
        run_command(&mut c, None, Duration::from_secs(120))
    }

    /// The CLI as `nobody` (uid and gid 65534, no supplementary groups).
    pub fn cli_as_nobody(&self, args: &[&str]) -> CmdOutput {
        let mut c = Command::new("/usr/bin/setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&self.bin)
            .args(args)
            .arg("--config")
            .arg(self.config());
        self.base(&mut c);
        c.env("HOME", "/nonexistent").env("USER", "nobody");
        run_command(&mut c, None, Duration::from_secs(60))
    }
}

/// What nix-daemon writes to a hook: the settings preamble with `builders`, then one `try`
/// for an `aarch64-linux` derivation (which this x86_64 machine cannot build itself).
pub fn daemon_stdin(builders: &str) -> Vec<u8> {
    let mut s = Settings::new();
    for (k, v) in [
        ("builders", builders),
        ("system", "x86_64-linux"),
        ("max-jobs", "1"),
        ("max-silent-time", "0"),
        ("timeout", "0"),
    ] {
        s.set(k, v);
    }
    let mut b = Vec::new();
    s.encode(&mut b);
    HookRequest::Try(TryRequest {
        am_willing: true,
        needed_system: "aarch64-linux".to_owned(),
        drv_path: StorePath::parse(DRV).expect("test drv path"),
        required_features: Default::default(),
    })
    .encode(&mut b);
    b
}

/// The hook's reply words (`accept`, `decline`, …) in the order it sent them.
pub fn replies(out: &CmdOutput) -> Vec<String> {
    out.stderr
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .map(str::to_owned)
        .collect()
}

/// The `@nix` messages' texts the hook sent.
pub fn messages(out: &CmdOutput) -> Vec<String> {
    out.stderr
        .lines()
        .filter_map(|l| l.strip_prefix("@nix "))
        .filter_map(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .filter_map(|v| v.get("msg").and_then(|m| m.as_str()).map(str::to_owned))
        .collect()
}

/// A stub `remote-program`: records its argv (one argument per line, each between `[` and
/// `]`) in `<dir>/argv-<name>` and exits 1, so no real Nix ever runs on this machine.
pub fn stub_program(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(format!("stub-{name}"));
    write(
        &p,
        &format!(
            "#!/bin/sh\nfor a in \"$0\" \"$@\"; do printf '[%s]\\n' \"$a\"; done > {}\nexit 1\n",
            dir.join(format!("argv-{name}")).display()
        ),
    );
    set_mode(&p, 0o755);
    p
}

/// Runs `supervise --config …` (not auto-started: this test owns it and stops it by pid).
pub struct Supervisor {
    child: Child,
    log: PathBuf,
}

impl Supervisor {
    pub fn start(env: &Env, extra_env: &[(&str, &str)]) -> Supervisor {
        let log = env.path("supervisor.out");
        let out = std::fs::File::create(&log).expect("supervisor log");
        let mut c = Command::new(&env.bin);
        c.args(["supervise", "--config"]).arg(env.config());
        env.base(&mut c);
        for (k, v) in extra_env {
            c.env(k, v);
        }
        c.stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out);
        let child = super::spawn_retrying(&mut c).expect("start the supervisor");
        let s = Supervisor { child, log };
        let socket = env.path("lazy-state/sup/supervisor.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the supervisor did not create {}:\n{}",
                socket.display(),
                s.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() > deadline => {
                    // SAFETY: as above.
                    unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
                    let _ = self.child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
