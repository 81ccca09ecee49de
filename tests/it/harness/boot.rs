//! The harness's part for the boot backends (`boot::*`, and the VM tests of `fault::vm` and
//! `lazy::qemu`): a real OpenSSH sshd set-up (keys, config, a free port), builders made
//! through the real TOML loader, boot contexts, process checks, the QEMU builder images of
//! examples/vm/make-image and the one-VM-test-at-a-time lock.
//!
//! Must never: listen on anything but 127.0.0.1, or signal a process it did not start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix_lazy_builder::boot::{BootContext, Instance};
use nix_lazy_builder::config::{Builder, Config};

use super::{free_port, keygen, read, require_root, run_command, set_mode};

/// Keys and an sshd_config for a real OpenSSH sshd on 127.0.0.1 (key-only, root allowed).
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub host_key_line: String,
    pub client_key: PathBuf,
    pub config: PathBuf,
}

impl Sshd {
    pub fn new() -> Sshd {
        Self::new_in(&std::env::temp_dir())
    }

    /// [`Sshd::new`] with its files under `parent`: for a helper process that is killed (its
    /// own temporary directory would never be removed; the test's `parent` is).
    pub fn new_in(parent: &Path) -> Sshd {
        let dir = tempfile::Builder::new()
            .prefix("nlb-boot-")
            .tempdir_in(parent)
            .expect("temp dir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("nix")).expect("mkdir nix");
        keygen(&d.join("host_key"), "nlb-boot-host");
        keygen(&d.join("client_key"), "nlb-boot-client");
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).expect("copy key");
        let port = free_port();
        let config = d.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\nPidFile none\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nLogLevel VERBOSE\n",
                d = d.display()
            ),
        )
        .expect("write sshd_config");
        let host_key_line = read(&d.join("host_key.pub")).trim().to_owned();
        Sshd {
            port,
            host_key_line,
            client_key: d.join("client_key"),
            config,
            dir,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A script that runs this sshd in the foreground inside a private mount namespace with
    /// its own (empty) `/nix`: the remote Nix store of a separate "machine".
    pub fn namespaced_start_script(&self) -> PathBuf {
        let script = self.path().join("start-remote");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nset -eu\nexec unshare -m --propagation private /bin/sh -c '\n\
                 mount --bind \"$1/nix\" /nix\n\
                 mount -t tmpfs -o mode=0755 nlb-run /run\n\
                 mkdir -p /run/sshd\n\
                 exec /usr/sbin/sshd -D -e -f \"$1/sshd_config\"' nlb-remote {}\n",
                self.path().display()
            ),
        )
        .expect("write start script");
        set_mode(&script, 0o755);
        script
    }
}

/// A builder made by the real TOML loader: `[builders.NAME]` with `uri` and keys, plus the
/// `[builders.NAME.boot]` body `boot`.
pub fn builder(
    name: &str,
    uri: &str,
    systems: &[&str],
    client_key: &Path,
    host_key: &str,
    boot: &str,
) -> Builder {
    let systems = systems
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "[builders.{name}]\nuri = \"{uri}\"\nsystems = [{systems}]\nssh-key = \"{}\"\n\
         host-key = \"{host_key}\"\nboot-timeout = \"2m\"\n\n[builders.{name}.boot]\n{boot}\n",
        client_key.display()
    );
    let config = Config::parse(&text, Path::new("/test/lazy-builder.toml"))
        .unwrap_or_else(|e| panic!("config: {e}\n{text}"));
    config.builders.into_iter().next().expect("one builder")
}

/// A fresh 0700 state directory and the boot context for `builder` in it.
pub fn context(builder: &Builder) -> (tempfile::TempDir, BootContext) {
    let dir = tempfile::Builder::new()
        .prefix("nlb-state-")
        .tempdir()
        .expect("temp dir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let ctx = BootContext::new(builder, dir.path().to_owned());
    (dir, ctx)
}

/// Starts `builder`'s boot section in `ctx`; panics if it cannot be started.
pub async fn start(builder: &Builder, ctx: &BootContext) -> Instance {
    let lazy = builder.lazy.as_ref().expect("a lazy builder");
    nix_lazy_builder::boot::start(&lazy.boot, ctx)
        .await
        .expect("start")
}

/// A builder's instance, started in a state dir of its own (the `command` and `darling`
/// backends' tests: a builder at an [`Sshd`]'s port).
pub struct Started {
    pub b: Builder,
    pub port: u16,
    pub ctx: BootContext,
    pub inst: Instance,
    _state: tempfile::TempDir,
}

impl Started {
    /// Starts `b`, a builder at `sshd`'s port.
    pub async fn new(sshd: &Sshd, b: Builder) -> Started {
        let (_state, ctx) = context(&b);
        let inst = start(&b, &ctx).await;
        Started {
            b,
            port: sshd.port,
            ctx,
            inst,
            _state,
        }
    }

    /// Waits at most `secs` for the instance's SSH (with the pinned host key) and Nix to answer.
    pub async fn ready_within(
        &mut self,
        secs: u64,
    ) -> Result<nix_lazy_builder::boot::Ready, nix_lazy_builder::boot::BootError> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        nix_lazy_builder::boot::wait_ready(&self.b, self.port, &mut self.inst, deadline).await
    }

    /// [`ready_within`](Self::ready_within) that must succeed: panics with the error and the
    /// backend's log (`command.log`, `darling.log`) otherwise.
    pub async fn ready(&mut self, secs: u64) -> nix_lazy_builder::boot::Ready {
        match self.ready_within(secs).await {
            Ok(ready) => ready,
            Err(e) => panic!(
                "not ready: {e}\n{}",
                self.inst
                    .logs()
                    .first()
                    .map(|log| std::fs::read_to_string(log).unwrap_or_default())
                    .unwrap_or_default()
            ),
        }
    }
}

/// Whether something accepts TCP on 127.0.0.1:port.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// Runs `cmd` over SSH with OpenSSH's client and the pinned host key.
pub fn ssh(port: u16, client_key: &Path, host_key_line: &str, cmd: &str) -> String {
    let kh = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(kh.path(), format!("[127.0.0.1]:{port} {host_key_line}\n")).expect("write");
    let out = Command::new("ssh")
        .args(["-p", &port.to_string(), "-i"])
        .arg(client_key)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", kh.path().display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=20",
            "root@127.0.0.1",
            cmd,
        ])
        .output()
        .expect("run ssh");
    assert!(
        out.status.success(),
        "ssh {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

// ------------------------------------------------------------------------------------------------
// QEMU builder images (examples/vm/make-image)

/// A builder VM image made by examples/vm/make-image: its directory and generated config.
pub struct VmImage {
    pub dir: PathBuf,
    /// The generated `lazy-builder.toml` snippet.
    pub toml: String,
}

impl VmImage {
    /// The builder the snippet defines, with `edit` applied to the snippet's text first.
    pub fn builder_with(&self, edit: impl FnOnce(String) -> String) -> Builder {
        let text = edit(self.toml.clone());
        let config = Config::parse(&text, &self.dir.join("lazy-builder.toml"))
            .unwrap_or_else(|e| panic!("image config: {e}\n{text}"));
        config.builders.into_iter().next().expect("one builder")
    }

    pub fn builder(&self) -> Builder {
        self.builder_with(|t| t)
    }
}

/// Replaces the value of `key = …` in the snippet's boot section (or adds the line).
pub fn set_key(toml: String, key: &str, value: &str) -> String {
    let mut found = false;
    let mut out: Vec<String> = toml
        .lines()
        .map(|l| {
            if l.split('=').next().map(str::trim) == Some(key) {
                found = true;
                format!("{key} = {value}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    if !found {
        out.push(format!("{key} = {value}"));
    }
    out.join("\n") + "\n"
}

/// Removes `key = …` from the snippet.
pub fn drop_key(toml: String, key: &str) -> String {
    toml.lines()
        .filter(|l| l.split('=').next().map(str::trim) != Some(key))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

static IMAGE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Makes (or refreshes from make-image's cache: about a second) the `arch` image under
/// `$NIX_LAZY_BUILDER_VM_CACHE/test-images/ARCH` (default cache /var/cache/nix-lazy-builder).
/// Panics with make-image's output if that fails.
#[track_caller]
pub fn vm_image(arch: &str) -> VmImage {
    try_vm_image(arch).unwrap_or_else(|e| panic!("{e}"))
}

/// [`vm_image`], or why there is none, in one line (make-image's whole output goes to stderr):
/// for the bench, which reports a row it cannot measure instead of failing.
pub fn try_vm_image(arch: &str) -> Result<VmImage, String> {
    let _g = IMAGE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let cache = std::env::var_os("NIX_LAZY_BUILDER_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/nix-lazy-builder"));
    let dir = cache.join("test-images").join(arch);
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create the image dir {}: {e}", dir.display()))?;
    // Serialise with other processes making the same image.
    let _lock = lock_exclusive(&cache.join(format!("test-images/.lock-{arch}")))?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/vm/make-image");
    let t0 = Instant::now();
    let mut make = Command::new(&script);
    make.arg(arch).arg(&dir);
    let out = run_command(&mut make, None, Duration::from_secs(900));
    if !out.success() {
        eprintln!("{out}");
        let last = out
            .stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(format!(
            "no builder image: `examples/vm/make-image {arch} {}` failed ({}): {last}",
            dir.display(),
            out.status
        ));
    }
    eprintln!("make-image {arch}: {:?}", t0.elapsed());
    for f in ["vmlinuz", "initrd.cpio"] {
        if !dir.join(f).is_file() {
            return Err(format!(
                "no builder image: {} is missing after make-image",
                dir.join(f).display()
            ));
        }
    }
    let snippet = dir.join("lazy-builder.toml");
    let toml = std::fs::read_to_string(&snippet)
        .map_err(|e| format!("no builder image: cannot read {}: {e}", snippet.display()))?;
    Ok(VmImage { dir, toml })
}

/// An exclusive `flock` on `path` (created if need be), held until the file is dropped.
pub fn lock_exclusive(path: &Path) -> Result<std::fs::File, String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open the lock {}: {e}", path.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an open file descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "cannot lock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(file)
}

/// Runs `cmd` on the builder with our own SSH client (pinned host key), returning stdout.
pub async fn run_over_ssh(builder: &Builder, port: u16, cmd: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut target = nix_lazy_builder::ssh::SshTarget::for_builder(builder).expect("ssh target");
    target.port = port;
    let session = nix_lazy_builder::ssh::connect(&target)
        .await
        .unwrap_or_else(|e| panic!("ssh: {e}"));
    let exec = session.exec(cmd).await.expect("exec");
    let nix_lazy_builder::ssh::Exec {
        stdin,
        mut stdout,
        mut stderr,
        status,
    } = exec;
    drop(stdin);
    let mut out = Vec::new();
    let mut err = Vec::new();
    let (a, b) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
    a.expect("stdout");
    b.expect("stderr");
    let st = status.wait().await.expect("status");
    assert!(
        st.success(),
        "{cmd}: {st}: {}",
        String::from_utf8_lossy(&err)
    );
    session.close().await;
    String::from_utf8_lossy(&out).trim().to_owned()
}

/// Held while a test runs VMs: one VM test at a time on the machine, across test processes
/// too (cargo-nextest runs every test in its own process).
pub struct VmLock {
    _file: std::fs::File,
}

pub async fn one_vm_test_at_a_time() -> VmLock {
    tokio::task::spawn_blocking(one_vm_test_at_a_time_blocking)
        .await
        .expect("lock task")
}

/// Creates `path`, a blank 64 MiB raw disk image (the builder images' guest formats a blank disk
/// and mounts it on `/nix`).
pub fn blank_disk(path: &Path) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap_or_else(|e| panic!("blank disk {}: {e}", path.display()));
}

/// The start of a test that boots VMs: root, the one-VM-test lock (held until it is dropped),
/// then the `arch` image.
pub async fn vm_test(arch: &str) -> (VmLock, VmImage) {
    require_root();
    let lock = one_vm_test_at_a_time().await;
    (lock, vm_image(arch))
}

/// [`one_vm_test_at_a_time`] for synchronous tests: blocks until the lock is ours.
#[track_caller]
pub fn one_vm_test_at_a_time_blocking() -> VmLock {
    let file =
        lock_exclusive(&vm_lock_file(&std::env::temp_dir())).unwrap_or_else(|e| panic!("{e}"));
    VmLock { _file: file }
}

/// The lock file of [`one_vm_test_at_a_time`] under the temp dir `tmp` (the bench, which
/// points TMPDIR elsewhere, names the tests' one).
pub fn vm_lock_file(tmp: &Path) -> PathBuf {
    tmp.join("nix-lazy-builder-boot-vm-tests.lock")
}
