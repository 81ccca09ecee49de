//! Integration tests for `nix_lazy_builder::ssh` against real SSH servers on loopback: OpenSSH's
//! `sshd` and Dropbear, each with a fresh host key, key-only auth, on a free 127.0.0.1 port.
//!
//! Owns: its own small server helpers (below). Must never: touch the machine's real SSH
//! configuration or keys (Dropbear reads `~root/.ssh/authorized_keys`, so it runs in a private
//! mount namespace with a temp dir bind-mounted over `/root/.ssh`, on a private tmpfs `/root` if
//! the machine's root has no `.ssh`), or stop a process it did not
//! start (everything is stopped by pid).
//!
//! Needs root, `/usr/sbin/sshd`, `dropbear`, `dropbearconvert`, `ssh-keygen`, `unshare`.
//! The 1 GiB throughput comparison with OpenSSH's `ssh` is `#[ignore]`d; run it with
//! `cargo test --release --test it -- --ignored --nocapture ssh::throughput`.

use std::io::{BufRead, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix_lazy_builder::ssh::{
    self, ExitStatus, HostKeySet, SshErrorKind, SshTarget, Stage, Timeouts, shell_command,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{descendants, free_port};

// ---------------------------------------------------------------------------------------------
// Helpers: keys and servers
// ---------------------------------------------------------------------------------------------

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn keygen(dir: &Path, name: &str, kind: &str, passphrase: &str) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", passphrase, "-C", name, "-f"])
        .arg(&path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    run(&mut cmd);
    path
}

/// `SHA256:…` as OpenSSH itself prints it, for comparison with our errors.
fn openssh_fingerprint(pubkey: &Path) -> String {
    let out = run(Command::new("ssh-keygen").arg("-l").arg("-f").arg(pubkey));
    out.split_whitespace()
        .nth(1)
        .expect("ssh-keygen -l output")
        .to_owned()
}

fn pub_line(key: &Path) -> String {
    std::fs::read_to_string(key.with_extension("pub")).expect("public key")
}

struct Keys {
    dir: tempfile::TempDir,
    client: PathBuf,
    host: PathBuf,
    other_host: PathBuf,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().expect("tempdir");
        let client = keygen(dir.path(), "client", "ed25519", "");
        let host = keygen(dir.path(), "host", "ed25519", "");
        let other_host = keygen(dir.path(), "other_host", "ed25519", "");
        Keys {
            dir,
            client,
            host,
            other_host,
        }
    }

    fn host_keys(&self) -> HostKeySet {
        HostKeySet::parse_openssh(&pub_line(&self.host)).expect("host key")
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    OpenSsh,
    Dropbear,
}

struct Server {
    kind: Kind,
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

impl Server {
    fn start(kind: Kind, keys: &Keys, authorized: &[&Path]) -> Server {
        for attempt in 0..3 {
            match Server::try_start(kind, keys, authorized) {
                Ok(s) => return s,
                Err(e) if attempt < 2 => eprintln!("{kind:?} did not start ({e}), retrying"),
                Err(e) => panic!("{kind:?} did not start: {e}"),
            }
        }
        unreachable!()
    }

    fn try_start(kind: Kind, keys: &Keys, authorized: &[&Path]) -> Result<Server, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let port = free_port();
        let auth_dir = dir.path().join("dotssh");
        std::fs::create_dir(&auth_dir).map_err(|e| e.to_string())?;
        let mut ak = String::new();
        for k in authorized {
            ak.push_str(&pub_line(k));
        }
        let ak_path = auth_dir.join("authorized_keys");
        std::fs::write(&ak_path, ak).map_err(|e| e.to_string())?;
        run(Command::new("chmod").arg("600").arg(&ak_path));
        run(Command::new("chmod").arg("700").arg(&auth_dir));
        let log =
            std::fs::File::create(dir.path().join("server.log")).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let child = match kind {
            Kind::OpenSsh => {
                std::fs::create_dir_all("/run/sshd").map_err(|e| e.to_string())?;
                let cfg = dir.path().join("sshd_config");
                std::fs::write(
                    &cfg,
                    format!(
                        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile none\n\
                         UsePAM no\nStrictModes no\nPasswordAuthentication no\n\
                         KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                         PermitRootLogin yes\nAuthorizedKeysFile {}\n",
                        keys.host.display(),
                        ak_path.display()
                    ),
                )
                .map_err(|e| e.to_string())?;
                Command::new("/usr/sbin/sshd")
                    .arg("-D")
                    .arg("-e")
                    .arg("-f")
                    .arg(&cfg)
                    .stdin(Stdio::null())
                    .stdout(log)
                    .stderr(log2)
                    .spawn()
                    .map_err(|e| format!("sshd: {e}"))?
            }
            Kind::Dropbear => {
                let db_key = dir.path().join("host.dropbear");
                run(Command::new("dropbearconvert")
                    .args(["openssh", "dropbear"])
                    .arg(&keys.host)
                    .arg(&db_key));
                // unshare execs sh, which execs dropbear: the child's pid is dropbear's. A
                // machine whose root has no ~/.ssh gets a private tmpfs home in the namespace
                // (nothing is created on the real file system).
                let script = format!(
                    "{{ [ -d /root/.ssh ] || {{ mount -t tmpfs -o mode=0700 nlb-root /root && \
                     mkdir -m 0700 /root/.ssh; }}; }} && \
                     mount --bind '{}' /root/.ssh && exec dropbear -F -E -s -p 127.0.0.1:{port} \
                     -r '{}' -P '{}'",
                    auth_dir.display(),
                    db_key.display(),
                    dir.path().join("pid").display()
                );
                Command::new("unshare")
                    .args(["-m", "--propagation", "private", "sh", "-c", &script])
                    .stdin(Stdio::null())
                    .stdout(log)
                    .stderr(log2)
                    .spawn()
                    .map_err(|e| format!("dropbear: {e}"))?
            }
        };
        let mut server = Server {
            kind,
            child,
            port,
            _dir: dir,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("exited with {st}: {}", self.log()));
            }
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                if std::io::BufReader::new(s).read_line(&mut line).is_ok()
                    && line.starts_with("SSH-2.0-")
                {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("no SSH banner within 10 s: {}", self.log()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("server.log")).unwrap_or_default()
    }

    /// SIGSTOPs the listener and every process it forked (the per-connection servers).
    fn freeze(&self) -> Vec<u32> {
        let mut pids = vec![self.child.id()];
        pids.extend(descendants(self.child.id()));
        for &p in &pids {
            signal(p, libc::SIGSTOP);
        }
        pids
    }
}

/// Kills processes frozen by [`Server::freeze`]. Stopped processes cannot exit on their own, so
/// their pids are still theirs; once thawed, a per-connection server would exit and orphan its
/// command (e.g. `sleep 600`) where [`descendants`] can no longer find it.
fn kill_frozen(pids: &[u32]) {
    for &p in pids {
        signal(p, libc::SIGKILL);
        signal(p, libc::SIGCONT);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.child.id();
        let mut pids = descendants(pid);
        pids.push(pid);
        for &p in &pids {
            signal(p, libc::SIGKILL);
            signal(p, libc::SIGCONT);
        }
        let _ = self.child.wait();
    }
}

fn target(server: &Server, keys: &Keys) -> SshTarget {
    SshTarget {
        builder: format!("test-{:?}", server.kind).to_lowercase(),
        host: "127.0.0.1".into(),
        port: server.port,
        user: "root".into(),
        identities: vec![keys.client.clone()],
        host_keys: keys.host_keys(),
        timeouts: Timeouts::default(),
    }
}

/// Starts `kind` with the client key authorized and connects to it with the default target.
async fn connected(kind: Kind, keys: &Keys) -> (Server, ssh::Session) {
    let server = Server::start(kind, keys, &[&keys.client]);
    let session = ssh::connect(&target(&server, keys))
        .await
        .unwrap_or_else(|e| panic!("{kind:?}: connect: {e}"));
    (server, session)
}

/// Runs `check` on a session to each kind of server in turn (one set of keys for both), and
/// closes the session after it.
async fn on_both(keys: &Keys, mut check: impl AsyncFnMut(Kind, &ssh::Session)) {
    for kind in BOTH {
        let (_server, session) = connected(kind, keys).await;
        check(kind, &session).await;
        session.close().await;
    }
}

struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: ExitStatus,
}

/// Runs `command` with `input` on stdin, collecting everything.
async fn run_remote(session: &ssh::Session, command: &str, input: &[u8]) -> Output {
    let exec = session.exec(command).await.expect("exec");
    let ssh::Exec {
        mut stdin,
        mut stdout,
        mut stderr,
        status,
    } = exec;
    let input = input.to_vec();
    let writer = tokio::spawn(async move {
        stdin.write_all(&input).await?;
        stdin.eof().await
    });
    let mut out = Vec::new();
    let mut err = Vec::new();
    let (a, b) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
    a.expect("stdout");
    b.expect("stderr");
    writer.await.expect("join").expect("stdin");
    Output {
        stdout: out,
        stderr: err,
        status: status.wait().await.expect("status"),
    }
}

const BOTH: [Kind; 2] = [Kind::OpenSsh, Kind::Dropbear];

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_round_trip_stderr_and_status() {
    let keys = Keys::new();
    on_both(&keys, async |kind, session| {
        let o = run_remote(session, "echo hello", b"").await;
        assert_eq!(o.stdout, b"hello\n", "{kind:?}");
        assert_eq!(o.status, ExitStatus::Code(0));

        let o = run_remote(session, "cat", b"round trip\x00\xff bytes").await;
        assert_eq!(o.stdout, b"round trip\x00\xff bytes", "{kind:?}");
        assert!(o.stderr.is_empty());

        let o = run_remote(session, "echo out; echo err >&2; exit 3", b"").await;
        assert_eq!(o.stdout, b"out\n", "{kind:?}");
        assert_eq!(o.stderr, b"err\n", "{kind:?}");
        assert_eq!(o.status, ExitStatus::Code(3), "{kind:?}");

        // A quoted hostile argument arrives as one literal word.
        let hostile = "x'; echo INJECTED; '$(id)`id`";
        let cmd = shell_command(["printf", "%s", hostile]).expect("quote");
        let o = run_remote(session, &cmd, b"").await;
        assert_eq!(String::from_utf8_lossy(&o.stdout), hostile, "{kind:?}");

        // Exit 127 is reported as "command not found".
        let exec = session
            .exec("nix-store-does-not-exist --serve")
            .await
            .expect("exec");
        drop(exec.stdin);
        drop(exec.stdout);
        drop(exec.stderr);
        let err = exec.status.success().await.expect_err("must fail");
        assert!(
            matches!(err.kind, SshErrorKind::CommandNotFound { .. }),
            "{kind:?}: {err}"
        );
        assert!(
            err.to_string().contains("test-"),
            "names the builder: {err}"
        );

        // Several commands at once on one connection.
        let (a, b) = tokio::join!(
            run_remote(session, "sleep 0.3; echo a", b""),
            run_remote(session, "echo b", b"")
        );
        assert_eq!((a.stdout, b.stdout), (b"a\n".to_vec(), b"b\n".to_vec()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiates_fast_ciphers_with_both_servers() {
    let keys = Keys::new();
    on_both(&keys, async |kind, session| {
        let n = session.negotiated().clone();
        eprintln!("{kind:?}: {n:?}");
        assert_eq!(
            n.host_key_fingerprint,
            openssh_fingerprint(&keys.host.with_extension("pub"))
        );
        let aead = ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"];
        assert!(aead.contains(&n.cipher.as_str()), "{kind:?}: {n:?}");
        if kind == Kind::Dropbear {
            assert_eq!(n.cipher, "chacha20-poly1305@openssh.com");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fail_instead_of_hanging_when_the_command_stops_reading() {
    let keys = Keys::new();
    on_both(&keys, async |kind, session| {
        let ssh::Exec {
            mut stdin,
            mut stdout,
            stderr,
            status,
        } = session
            .exec("head -c 10 >/dev/null; echo done")
            .await
            .expect("exec");
        drop(stderr);
        let chunk = vec![7u8; 1 << 20];
        let write = async {
            for _ in 0..512 {
                stdin.write_all(&chunk).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let r = tokio::time::timeout(Duration::from_secs(30), write)
            .await
            .expect("a write to a finished command must fail, not hang");
        let e = r.expect_err("512 MiB cannot fit into a finished command");
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{kind:?}: {e}");
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).await.expect("stdout");
        assert_eq!(out, b"done\n");
        assert_eq!(status.wait().await.expect("status"), ExitStatus::Code(0));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Big streams
// ---------------------------------------------------------------------------------------------

fn random_file(dir: &Path, bytes: u64) -> (PathBuf, String) {
    let path = dir.join("random.bin");
    run(Command::new("sh").arg("-c").arg(format!(
        "head -c {bytes} /dev/urandom > '{}'",
        path.display()
    )));
    let sum = run(Command::new("sha256sum").arg(&path));
    (path, sum.split_whitespace().next().expect("sum").to_owned())
}

/// Reads `stdout` to its end in 256 KiB chunks, handing each to `each`; returns the byte count.
async fn pull(stdout: &mut ssh::ExecOutput, mut each: impl FnMut(&[u8])) -> u64 {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = stdout.read(&mut buf).await.expect("pull");
        if n == 0 {
            return total;
        }
        total += n as u64;
        each(&buf[..n]);
    }
}

/// Pushes `file` into `sha256sum` on the builder and pulls it back with `cat`, checking both
/// hashes. The pulled stream is hashed by a local `sha256sum` fed as it arrives (bounded
/// memory: nothing is collected).
async fn push_pull(session: &ssh::Session, file: &Path, expected: &str) -> (f64, f64) {
    let size = std::fs::metadata(file).expect("size").len() as f64;

    let started = Instant::now();
    let ssh::Exec {
        mut stdin,
        mut stdout,
        stderr,
        status,
    } = session.exec("sha256sum").await.expect("exec");
    drop(stderr);
    let mut f = tokio::fs::File::open(file).await.expect("open");
    let copy = async {
        tokio::io::copy(&mut f, &mut stdin).await?;
        stdin.eof().await
    };
    let mut out = Vec::new();
    let (c, r) = tokio::join!(copy, stdout.read_to_end(&mut out));
    c.expect("push");
    r.expect("read sum");
    assert_eq!(status.wait().await.expect("status"), ExitStatus::Code(0));
    let push_secs = started.elapsed().as_secs_f64();
    let remote_sum = String::from_utf8_lossy(&out);
    assert_eq!(
        remote_sum.split_whitespace().next(),
        Some(expected),
        "pushed data hash"
    );

    let started = Instant::now();
    let cmd = shell_command(["cat", &file.display().to_string()]).expect("quote");
    let ssh::Exec {
        stdin,
        mut stdout,
        stderr,
        status,
    } = session.exec(&cmd).await.expect("exec");
    drop(stdin);
    drop(stderr);
    let mut hasher = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut sink = hasher.stdin.take().expect("stdin");
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    let feeder = std::thread::spawn(move || {
        for chunk in rx {
            sink.write_all(&chunk).expect("feed sha256sum");
        }
    });
    let total = pull(&mut stdout, |chunk| {
        tx.send(chunk.to_vec()).expect("to hasher")
    })
    .await;
    drop(tx);
    feeder.join().expect("feeder");
    let mut sum = String::new();
    hasher
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut sum)
        .expect("sum");
    hasher.wait().expect("wait");
    assert_eq!(status.wait().await.expect("status"), ExitStatus::Code(0));
    let pull_secs = started.elapsed().as_secs_f64();
    assert_eq!(total as f64, size, "pulled size");
    assert_eq!(
        sum.split_whitespace().next(),
        Some(expected),
        "pulled data hash"
    );
    (size / push_secs / 1e6, size / pull_secs / 1e6)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_streams_keep_their_integrity() {
    let keys = Keys::new();
    let (file, sum) = random_file(keys.dir.path(), 256 << 20);
    on_both(&keys, async |kind, session| {
        let (push, pull) = push_pull(session, &file, &sum).await;
        eprintln!(
            "{kind:?}: 256 MiB push {push:.0} MB/s, pull {pull:.0} MB/s (this build's profile)"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Host keys and authentication
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_host_key_is_refused_naming_both_fingerprints() {
    let keys = Keys::new();
    let expected = openssh_fingerprint(&keys.other_host.with_extension("pub"));
    let presented = openssh_fingerprint(&keys.host.with_extension("pub"));
    for kind in BOTH {
        let server = Server::start(kind, &keys, &[&keys.client]);
        let mut t = target(&server, &keys);
        t.host_keys = HostKeySet::parse_openssh(&pub_line(&keys.other_host)).expect("key");
        let err = ssh::connect(&t).await.expect_err("must refuse");
        match &err.kind {
            SshErrorKind::HostKeyMismatch {
                expected: e,
                presented: p,
                ..
            } => {
                assert_eq!(e, &vec![expected.clone()]);
                assert_eq!(p, &presented);
            }
            other => panic!("{kind:?}: wrong error {other}"),
        }
        let text = err.to_string();
        assert!(
            text.contains(&expected) && text.contains(&presented),
            "{text}"
        );
        assert!(text.contains(&t.builder), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_host_key_is_refused_before_connecting() {
    let keys = Keys::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let t = SshTarget {
        builder: "nokey".into(),
        host: "127.0.0.1".into(),
        port,
        user: "root".into(),
        identities: vec![keys.client.clone()],
        host_keys: HostKeySet::default(),
        timeouts: Timeouts::default(),
    };
    let err = ssh::connect(&t).await.expect_err("must refuse");
    assert!(matches!(err.kind, SshErrorKind::HostKeyMissing), "{err}");
    assert!(
        listener.accept().is_err(),
        "no TCP connection may be made without a pinned key"
    );
    // A known_hosts file without an entry for this host gives the same refusal.
    let kh = keys.dir.path().join("known_hosts");
    std::fs::write(&kh, format!("[127.0.0.1]:1 {}", pub_line(&keys.host))).expect("write");
    let mut t = t;
    t.host_keys = HostKeySet::from_known_hosts_file(&kh, "127.0.0.1", port).expect("parse");
    let err = ssh::connect(&t).await.expect_err("must refuse");
    assert!(matches!(err.kind, SshErrorKind::HostKeyMissing), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_from_machines_column_and_hashed_known_hosts() {
    let keys = Keys::new();
    let server = Server::start(Kind::OpenSsh, &keys, &[&keys.client]);
    let mut t = target(&server, &keys);

    // The machines file's 8th column: `base64 -w0` of the .pub file, read the way the hook
    // reads it (the machines grammar, then the builder's SSH target).
    let col = run(Command::new("base64")
        .arg("-w0")
        .arg(keys.host.with_extension("pub")));
    let line = format!(
        "ssh://root@127.0.0.1:{} aarch64-linux {} 1 1 - - {}",
        server.port,
        keys.client.display(),
        col.trim()
    );
    let (machines, _) =
        nix_lazy_builder::config::parse_machines(&line, "x86_64-linux", &mut |p| std::fs::read(p))
            .expect("the machines line");
    t.host_keys = SshTarget::for_builder(&machines[0])
        .expect("its SSH target")
        .host_keys;
    ssh::connect(&t)
        .await
        .expect("machines column pin")
        .close()
        .await;

    // A known_hosts file hashed by OpenSSH's own ssh-keygen -H.
    let kh = keys.dir.path().join("known_hosts");
    std::fs::write(
        &kh,
        format!(
            "other.example {}[127.0.0.1]:{} {}",
            pub_line(&keys.other_host),
            server.port,
            pub_line(&keys.host)
        ),
    )
    .expect("write");
    run(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&kh));
    let hashed = std::fs::read_to_string(&kh).expect("read");
    assert!(
        !hashed.contains("127.0.0.1"),
        "ssh-keygen -H hashed the names"
    );
    t.host_keys = HostKeySet::from_known_hosts_file(&kh, "127.0.0.1", server.port).expect("parse");
    assert_eq!(t.host_keys.len(), 1);
    ssh::connect(&t)
        .await
        .expect("hashed known_hosts pin")
        .close()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_key_types_and_bad_keys() {
    let keys = Keys::new();
    let ecdsa = keygen(keys.dir.path(), "ecdsa", "ecdsa", "");
    let rsa = keygen(keys.dir.path(), "rsa", "rsa", "");
    let stranger = keygen(keys.dir.path(), "stranger", "ed25519", "");
    let encrypted = keygen(keys.dir.path(), "encrypted", "ed25519", "sekrit-passphrase");
    for kind in BOTH {
        let server = Server::start(kind, &keys, &[&keys.client, &ecdsa, &rsa]);
        for key in [&ecdsa, &rsa] {
            let mut t = target(&server, &keys);
            t.identities = vec![key.clone()];
            let s = ssh::connect(&t)
                .await
                .unwrap_or_else(|e| panic!("{kind:?} {}: {e}", key.display()));
            assert_eq!(run_remote(&s, "echo ok", b"").await.stdout, b"ok\n");
            s.close().await;
        }

        // A key the server does not know: refused, after trying it; a good key after it wins.
        let mut t = target(&server, &keys);
        t.identities = vec![stranger.clone()];
        let err = ssh::connect(&t).await.expect_err("unknown client key");
        assert!(
            matches!(err.kind, SshErrorKind::AuthFailed { .. }),
            "{kind:?}: {err}"
        );
        assert!(err.to_string().contains("stranger"), "{err}");
        t.identities = vec![stranger.clone(), keys.client.clone()];
        ssh::connect(&t).await.expect("second key").close().await;

        // An encrypted key is a clear error, never a prompt; the passphrase is not echoed.
        t.identities = vec![encrypted.clone()];
        let err = ssh::connect(&t).await.expect_err("encrypted key");
        assert!(
            matches!(err.kind, SshErrorKind::KeyFileEncrypted { .. }),
            "{err}"
        );

        t.identities = vec![keys.dir.path().join("no-such-key")];
        let err = ssh::connect(&t).await.expect_err("missing key");
        assert!(
            matches!(err.kind, SshErrorKind::KeyFileUnreadable { .. }),
            "{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Dead peers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_and_silent_listener_time_out() {
    let keys = Keys::new();
    let port = free_port();
    let mut t = SshTarget {
        builder: "silent".into(),
        host: "127.0.0.1".into(),
        port,
        user: "root".into(),
        identities: vec![keys.client.clone()],
        host_keys: keys.host_keys(),
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            ..Timeouts::default()
        },
    };
    let err = ssh::connect(&t).await.expect_err("nothing listens");
    assert!(matches!(err.kind, SshErrorKind::ConnectionRefused), "{err}");

    // Accepts, then says nothing: the connect timeout fires while waiting for the banner.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    t.port = listener.local_addr().expect("addr").port();
    let holder = std::thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        std::thread::sleep(Duration::from_secs(6));
        drop(s);
    });
    let started = Instant::now();
    let err = ssh::connect(&t).await.expect_err("silent peer");
    let took = started.elapsed();
    assert!(
        matches!(
            err.kind,
            SshErrorKind::Timeout {
                stage: Stage::Banner,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "{took:?}"
    );
    holder.join().expect("holder");

    // Sends a banner, then stalls in the key exchange. After the timeout the half-open
    // connection must be closed by us (no task left behind holding the socket).
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    t.port = listener.local_addr().expect("addr").port();
    let staller = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.write_all(b"SSH-2.0-Staller_1.0\r\n").expect("banner");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Some(Instant::now()),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    });
    let err = ssh::connect(&t).await.expect_err("stalled handshake");
    let timed_out_at = Instant::now();
    assert!(
        matches!(
            err.kind,
            SshErrorKind::Timeout {
                stage: Stage::KeyExchange,
                ..
            }
        ),
        "{err}"
    );
    let closed_at = tokio::task::spawn_blocking(move || staller.join().expect("staller"))
        .await
        .expect("join")
        .expect("the abandoned connection must be closed");
    assert!(
        closed_at.saturating_duration_since(timed_out_at) < Duration::from_secs(3),
        "closed {:?} after the timeout",
        closed_at.saturating_duration_since(timed_out_at)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_commands_survive_because_keepalives_are_answered() {
    let keys = Keys::new();
    for kind in BOTH {
        let server = Server::start(kind, &keys, &[&keys.client]);
        let mut t = target(&server, &keys);
        // Three unanswered keepalives would kill the connection after ~3 s; the command is
        // silent for 6 s, so only answered keepalives keep it alive.
        t.timeouts.keepalive_interval = Duration::from_secs(1);
        t.timeouts.keepalive_max = 2;
        let session = ssh::connect(&t).await.expect("connect");
        let o = run_remote(&session, "sleep 6; echo still here", b"").await;
        assert_eq!(o.stdout, b"still here\n", "{kind:?}");
        assert!(!session.is_closed());
        session.close().await;
    }
}

/// Freezes `server`'s processes and gives `io` up to 60 s (panicking with `undetected` past
/// that), then kills the frozen processes; returns `io`'s result and how long it took.
async fn while_frozen<T>(
    server: &Server,
    io: impl Future<Output = T>,
    undetected: &str,
) -> (T, Duration) {
    let frozen = server.freeze();
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(60), io)
        .await
        .expect(undetected);
    let took = started.elapsed();
    kill_frozen(&frozen);
    (r, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_peer_is_detected_by_keepalive() {
    let keys = Keys::new();
    for kind in BOTH {
        let (server, session) = connected(kind, &keys).await;
        let ssh::Exec {
            stdin,
            mut stdout,
            stderr,
            status,
        } = session.exec("echo started; sleep 600").await.expect("exec");
        let mut first = [0u8; 8];
        stdout.read_exact(&mut first).await.expect("first line");
        assert_eq!(&first, b"started\n");

        let mut rest = Vec::new();
        let (r, took) = while_frozen(
            &server,
            stdout.read_to_end(&mut rest),
            "a frozen peer must be detected",
        )
        .await;
        let e = r.expect_err("the stream must fail, not end cleanly");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted, "{e}");
        assert!(e.to_string().contains("keepalive"), "{e}");
        eprintln!("{kind:?}: frozen peer detected after {took:?}: {e}");
        assert!(
            took >= Duration::from_secs(9) && took < Duration::from_secs(40),
            "{kind:?}: detected after {took:?}"
        );
        let err = status.wait().await.expect_err("no exit status");
        assert!(matches!(err.kind, SshErrorKind::Disconnected(_)), "{err}");
        assert!(session.is_closed() || session.disconnect_reason().is_some());
        drop((stdin, stderr));
    }
}

/// The builder freezes while we upload: the writer is parked waiting for window space that will
/// never come. It must fail (naming the cause), not hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_peer_during_upload_is_detected() {
    let keys = Keys::new();
    for kind in BOTH {
        let (server, session) = connected(kind, &keys).await;
        // Only stdin is kept: the rest of the exec is dropped at once.
        let mut stdin = session.exec("cat > /dev/null").await.expect("exec").stdin;
        let chunk = vec![1u8; 64 << 10];
        for _ in 0..64 {
            stdin.write_all(&chunk).await.expect("upload while alive");
        }
        let upload = async {
            loop {
                stdin.write_all(&chunk).await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        };
        let (r, took) = while_frozen(
            &server,
            upload,
            "a frozen peer must be detected during an upload",
        )
        .await;
        let e = r.expect_err("upload must fail");
        eprintln!("{kind:?}: frozen peer detected during upload after {took:?}: {e}");
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        assert!(
            e.to_string().contains("keepalive") || e.to_string().contains("nothing could be sent"),
            "{e}"
        );
        assert!(
            took < Duration::from_secs(40),
            "{kind:?}: detected after {took:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Throughput against OpenSSH's client (release build; ignored by default)
// ---------------------------------------------------------------------------------------------

/// One transfer: wall-clock rate (MB/s) and the client's CPU time (s).
#[derive(Clone, Copy, Default)]
struct Rate {
    mb_per_s: f64,
    cpu_s: f64,
}

impl Rate {
    fn best(self, other: Rate) -> Rate {
        Rate {
            mb_per_s: self.mb_per_s.max(other.mb_per_s),
            cpu_s: if self.cpu_s == 0.0 {
                other.cpu_s
            } else {
                self.cpu_s.min(other.cpu_s)
            },
        }
    }
}

fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// OpenSSH's `ssh` doing the same transfer; its CPU time comes from `/usr/bin/time`.
fn openssh_client_rate(
    server: &Server,
    keys: &Keys,
    cipher: Option<&str>,
    push: bool,
    bytes: u64,
) -> Rate {
    let kh = keys.dir.path().join(format!("kh-{}", server.port));
    std::fs::write(
        &kh,
        format!("[127.0.0.1]:{} {}", server.port, pub_line(&keys.host)),
    )
    .expect("kh");
    let times = keys.dir.path().join("times");
    let ssh = format!(
        "/usr/bin/time -o '{}' -f '%U %S' ssh -i '{}' -o BatchMode=yes -o UserKnownHostsFile='{}' \
         -p {} {} root@127.0.0.1",
        times.display(),
        keys.client.display(),
        kh.display(),
        server.port,
        cipher.map(|c| format!("-c {c}")).unwrap_or_default(),
    );
    let script = if push {
        format!("head -c {bytes} /dev/zero | {ssh} 'cat > /dev/null'")
    } else {
        format!("{ssh} 'head -c {bytes} /dev/zero' > /dev/null")
    };
    let started = Instant::now();
    run(Command::new("sh").arg("-c").arg(script));
    let secs = started.elapsed().as_secs_f64();
    let cpu_s = std::fs::read_to_string(&times)
        .expect("time output")
        .split_whitespace()
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    Rate {
        mb_per_s: bytes as f64 / secs / 1e6,
        cpu_s,
    }
}

async fn russh_rate(session: &ssh::Session, push: bool, bytes: u64) -> Rate {
    let started = Instant::now();
    let cpu = self_cpu_seconds();
    if push {
        let ssh::Exec {
            mut stdin,
            stdout,
            stderr,
            status,
        } = session.exec("cat > /dev/null").await.expect("exec");
        drop((stdout, stderr));
        let buf = vec![0u8; 256 << 10];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            stdin.write_all(&buf[..n]).await.expect("push");
            left -= n as u64;
        }
        stdin.eof().await.expect("eof");
        assert!(status.wait().await.expect("status").success());
    } else {
        let ssh::Exec {
            stdin,
            mut stdout,
            stderr,
            status,
        } = session
            .exec(&format!("head -c {bytes} /dev/zero"))
            .await
            .expect("exec");
        drop((stdin, stderr));
        assert_eq!(pull(&mut stdout, |_| {}).await, bytes);
        assert!(status.wait().await.expect("status").success());
    }
    Rate {
        mb_per_s: bytes as f64 / started.elapsed().as_secs_f64() / 1e6,
        cpu_s: self_cpu_seconds() - cpu,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
async fn throughput_1gib_vs_openssh_client() {
    const GIB: u64 = 1 << 30;
    let keys = Keys::new();
    for kind in BOTH {
        let (server, session) = connected(kind, &keys).await;
        let cipher = session.negotiated().cipher.clone();
        for push in [true, false] {
            // Interleaved rounds, best of each: this machine is shared and noisy.
            let (mut ours, mut same, mut default) =
                (Rate::default(), Rate::default(), Rate::default());
            for _ in 0..3 {
                ours = ours.best(russh_rate(&session, push, GIB).await);
                same = same.best(openssh_client_rate(
                    &server,
                    &keys,
                    Some(&cipher),
                    push,
                    GIB,
                ));
                default = default.best(openssh_client_rate(&server, &keys, None, push, GIB));
            }
            eprintln!(
                "{kind:?} {:4} 1 GiB (best of 3): ours ({cipher}) {:.0} MB/s, {:.2} CPU-s; \
                 ssh same cipher {:.0} MB/s, {:.2} CPU-s; ssh default cipher {:.0} MB/s, {:.2} CPU-s",
                if push { "push" } else { "pull" },
                ours.mb_per_s,
                ours.cpu_s,
                same.mb_per_s,
                same.cpu_s,
                default.mb_per_s,
                default.cpu_s,
            );
        }
        session.close().await;
    }
}
