//! Readiness of a booted builder: three checks, retried until a deadline.
//!
//! 1. The SSH banner (`SSH-2.0-…`) is read on host:port (127.0.0.1 and the forwarded port for a
//!    VM; the URI's host for the other backends). An open port proves nothing:
//!    QEMU's user-mode network accepts TCP from the moment QEMU starts and only then tries the
//!    guest, so each attempt connects, waits about a second for the banner, and retries.
//! 2. The SSH handshake succeeds with the builder's PINNED host key (and its client key).
//! 3. The remote Nix answers: `<remote-program> --version` (`nix-store` for `ssh://`,
//!    `nix-daemon` for `ssh-ng://`, or the URI's `remote-program`), whose output is kept.
//!
//! A wrong host key (or a key file we cannot use) fails at once: retrying cannot fix it. If the
//! instance exits meanwhile, readiness fails at once with its exit report. A VM restored from a
//! snapshot of a ready one skips check 3: its Nix answered when the snapshot was made. The SSH
//! connection that passed is kept in the instance (`Instance::take_link`), for the supervisor's
//! first warm session to use instead of a second handshake.
//!
//! Must never: accept an unpinned host key, or look for a VM anywhere but 127.0.0.1.

use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

use super::{BootError, Instance};
use crate::config::Builder;
use crate::ssh::{self, SshErrorKind};

/// How long one banner attempt waits for the connection and then for the banner.
const BANNER_WAIT: Duration = Duration::from_secs(1);
/// Pause between attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Upper bound of one SSH handshake attempt.
const SSH_CONNECT_LIMIT: Duration = Duration::from_secs(20);
/// Upper bound of a handshake attempted without a banner probe first (a restored VM).
const UNPROBED_CONNECT_LIMIT: Duration = Duration::from_secs(3);
/// Upper bound of `--version`.
const VERSION_LIMIT: Duration = Duration::from_secs(30);
/// Most output kept from `--version`.
const MAX_OUTPUT: u64 = 64 * 1024;

/// A builder that answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The first line of `<remote-program> --version`, e.g. `nix-store (Nix) 2.8.0`.
    pub nix_version: String,
    /// From the call to the answer.
    pub waited: Duration,
    /// Banner attempts made (1 = the first one worked).
    pub attempts: u32,
}

/// Where the last attempt got to (for the timeout message).
enum Stage {
    Banner(String),
    Ssh(String),
    Nix(String),
}

/// Waits until the builder answers on `port` (see the module docs), or fails: at once for a
/// wrong host key or the instance's exit, else at `deadline`. The host is 127.0.0.1 for a VM
/// (its forwarded port), else the builder URI's host.
pub async fn wait_ready(
    builder: &Builder,
    port: u16,
    instance: &mut Instance,
    deadline: impl Into<Instant>,
) -> Result<Ready, BootError> {
    wait_ready_from(builder, port, instance, deadline.into(), true, None).await
}

/// [`wait_ready`] for a VM restored from a snapshot of a ready one: its sshd listens already,
/// so the first attempt goes straight to the SSH handshake (one connection fewer for the guest
/// to accept); later attempts probe the banner first, as always. Its remote Nix answered when
/// the snapshot was made (`nix_version`, from the same memory and disk): check 3 is not run
/// again, which would start a Nix program in a guest whose TCG translation cache is cold
/// (0.3–0.5 s) only to print its version; the build's own session starts one.
pub(super) async fn wait_ready_restored(
    builder: &Builder,
    port: u16,
    instance: &mut Instance,
    deadline: Instant,
    nix_version: &str,
) -> Result<Ready, BootError> {
    wait_ready_from(builder, port, instance, deadline, false, Some(nix_version)).await
}

async fn wait_ready_from(
    builder: &Builder,
    port: u16,
    instance: &mut Instance,
    deadline: Instant,
    mut probe_banner: bool,
    known_version: Option<&str>,
) -> Result<Ready, BootError> {
    let t0 = Instant::now();
    let mut target = ssh::SshTarget::for_builder(builder)
        // for_builder's errors already name the builder.
        .map_err(|e| BootError::SshSetup(e.to_string()))?;
    if instance.forwards_to_localhost() {
        target.host = Ipv4Addr::LOCALHOST.to_string();
    }
    target.port = port;
    let host = target.host.clone();
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let program = builder.uri.remote_program().to_owned();
    let command = ssh::shell_command([program.as_str(), "--version"])
        .map_err(|e| BootError::Config(format!("builder '{}': {e}", builder.name)))?;

    let forwarded = instance.forwards_to_localhost();
    let mut stage = Stage::Banner("nothing tried yet".into());
    let mut attempts = 0u32;
    let result = loop {
        attempts += 1;
        let r = tokio::select! {
            biased;
            report = instance.exited() => break Err(BootError::Exited { report, during: "before it was ready" }),
            _ = tokio::time::sleep_until(deadline) => break Err(timeout_error(&addr, t0.elapsed(), &stage, forwarded)),
            r = attempt(&target, &command, known_version, deadline, probe_banner) => r,
        };
        probe_banner = true;
        match r {
            Ok(version) => break Ok(version),
            Err(Attempt::Permanent(e)) => break Err(e),
            Err(Attempt::Retry(s)) => {
                tracing::trace!(builder = %builder.name, %addr, "not ready: {}", stage_text(&s));
                stage = s;
            }
        }
        tokio::select! {
            biased;
            report = instance.exited() => break Err(BootError::Exited { report, during: "before it was ready" }),
            _ = tokio::time::sleep_until(deadline) => break Err(timeout_error(&addr, t0.elapsed(), &stage, forwarded)),
            _ = sleep(RETRY_PAUSE) => {}
        }
    };
    let (nix_version, session) = result?;
    // Kept for the instance's first warm session (`Instance::take_link`), else closed with it.
    instance.link = Some((target.spec(), session));
    let ready = Ready {
        nix_version,
        waited: t0.elapsed(),
        attempts,
    };
    tracing::info!(builder = %builder.name, %addr, version = %ready.nix_version, waited = ?ready.waited, "builder ready");
    Ok(ready)
}

fn stage_text(s: &Stage) -> &str {
    match s {
        Stage::Banner(t) | Stage::Ssh(t) | Stage::Nix(t) => t,
    }
}

fn timeout_error(addr: &str, after: Duration, stage: &Stage, forwarded: bool) -> BootError {
    match stage {
        Stage::Banner(last) => BootError::NoBanner {
            addr: addr.to_owned(),
            after,
            last: last.clone(),
            forwarded,
        },
        Stage::Ssh(last) => BootError::SshNotReady {
            addr: addr.to_owned(),
            after,
            last: last.clone(),
        },
        Stage::Nix(last) => BootError::NixNotReady {
            addr: addr.to_owned(),
            after,
            last: last.clone(),
        },
    }
}

enum Attempt {
    Retry(Stage),
    Permanent(BootError),
}

/// One try of the checks; `known_version`: check 3's answer is known, skip it. The answer,
/// and the SSH connection that gave it.
async fn attempt(
    target: &ssh::SshTarget,
    command: &str,
    known_version: Option<&str>,
    deadline: Instant,
    probe_banner: bool,
) -> Result<(String, ssh::Session), Attempt> {
    let t0 = Instant::now();
    if probe_banner {
        banner(&target.host, target.port, BANNER_WAIT)
            .await
            .map_err(|e| Attempt::Retry(Stage::Banner(e)))?;
    }
    let banner_at = t0.elapsed();

    let mut t = target.clone();
    let left = deadline.saturating_duration_since(Instant::now());
    t.timeouts.connect = SSH_CONNECT_LIMIT.min(left.max(Duration::from_secs(1)));
    if !probe_banner {
        // Not even a banner was seen: do not wait long on this one.
        t.timeouts.connect = t.timeouts.connect.min(UNPROBED_CONNECT_LIMIT);
    }
    let session = match ssh::connect(&t).await {
        Ok(s) => s,
        Err(e) if is_permanent(&e.kind) => {
            return Err(Attempt::Permanent(BootError::Ssh(Box::new(e))));
        }
        Err(e) => return Err(Attempt::Retry(Stage::Ssh(e.to_string()))),
    };
    let connected_at = t0.elapsed();
    if let Some(version) = known_version {
        tracing::debug!(
            banner = ?banner_at,
            ssh = ?connected_at.saturating_sub(banner_at),
            "readiness attempt: banner, SSH handshake (the remote Nix answered before)"
        );
        return Ok((version.to_owned(), session));
    }
    let result = timeout(VERSION_LIMIT, run_version(&session, command)).await;
    tracing::debug!(
        banner = ?banner_at,
        ssh = ?connected_at.saturating_sub(banner_at),
        version = ?t0.elapsed().saturating_sub(connected_at),
        "readiness attempt: banner, SSH handshake, `{command}`"
    );
    let failed = match result {
        Ok(Ok(version)) => return Ok((version, session)),
        Ok(Err(why)) => Stage::Nix(why),
        Err(_) => Stage::Nix(format!(
            "`{command}` did not finish within {}s",
            VERSION_LIMIT.as_secs()
        )),
    };
    session.close().await;
    Err(Attempt::Retry(failed))
}

/// Failures no retry can fix (host key and key-file problems). An authentication failure is retried on purpose: while a guest
/// boots, its sshd can answer before the authorized keys are in place.
fn is_permanent(kind: &SshErrorKind) -> bool {
    matches!(
        kind,
        SshErrorKind::HostKeyMismatch { .. }
            | SshErrorKind::HostCertificate
            | SshErrorKind::HostKeyMissing
            | SshErrorKind::KeyFileUnreadable { .. }
            | SshErrorKind::KeyFileUnsupported { .. }
            | SshErrorKind::KeyFileEncrypted { .. }
            | SshErrorKind::KeyFileTooOpen { .. }
            | SshErrorKind::NoIdentity
    )
}

async fn run_version(session: &ssh::Session, command: &str) -> Result<String, String> {
    let exec = session.exec(command).await.map_err(|e| e.to_string())?;
    let ssh::Exec {
        mut stdin,
        stdout,
        stderr,
        status,
    } = exec;
    let _ = stdin.eof().await;
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut stdout = stdout.take(MAX_OUTPUT);
    let mut stderr = stderr.take(MAX_OUTPUT);
    let (r1, r2) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
    r1.map_err(|e| format!("reading the output of `{command}`: {e}"))?;
    r2.map_err(|e| format!("reading the errors of `{command}`: {e}"))?;
    let status = status.wait().await.map_err(|e| e.to_string())?;
    let said = |bytes: &[u8]| {
        super::logs::last_line_of(bytes)
            .map(|l| format!(": {l}"))
            .unwrap_or_default()
    };
    if !status.success() {
        return Err(format!("`{command}` {status}{}", said(&err)));
    }
    let text = String::from_utf8_lossy(&out);
    match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => Ok(line.to_owned()),
        None => Err(format!("`{command}` printed nothing{}", said(&err))),
    }
}

/// Connects to `host`:`port` and reads the SSH identification line within `wait` (for the
/// connection, and again for the banner). `Err` says what happened instead.
pub(super) async fn banner(host: &str, port: u16, wait: Duration) -> Result<String, String> {
    let mut stream = match timeout(wait, TcpStream::connect((host, port))).await {
        Err(_) => return Err("TCP connect timed out".into()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err("connection refused".into());
        }
        Ok(Err(e)) => return Err(format!("cannot connect: {e}")),
        Ok(Ok(s)) => s,
    };
    let mut buf = Vec::with_capacity(256);
    let read = async {
        let mut chunk = [0u8; 256];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            buf.extend_from_slice(&chunk[..n]);
            if find_banner(&buf).is_some() {
                return Ok(true);
            }
            // RFC 4253 allows other lines before the banner; bound what we read.
            if buf.len() > 8192 {
                return Ok(false);
            }
        }
    };
    let outcome = timeout(wait, read).await;
    // Be polite to sshd: say nothing and close (it logs "did not receive identification").
    let _ = stream.shutdown().await;
    match outcome {
        Err(_) if buf.is_empty() => Err(format!(
            "connected, but no banner within {}",
            humantime::format_duration(wait)
        )),
        Err(_) => Err(format!(
            "connected, but no SSH banner within {} (got {:?})",
            humantime::format_duration(wait),
            String::from_utf8_lossy(&buf[..buf.len().min(80)])
        )),
        Ok(Err(e)) => Err(format!("reading the banner: {e}")),
        Ok(Ok(true)) => Ok(find_banner(&buf).unwrap_or_default()),
        Ok(Ok(false)) if buf.is_empty() => Err("connection closed before a banner".into()),
        Ok(Ok(false)) => Err(format!(
            "connection closed without an SSH banner (got {:?})",
            String::from_utf8_lossy(&buf[..buf.len().min(80)])
        )),
    }
}

/// The SSH identification line in `buf`, once a whole one has arrived.
fn find_banner(buf: &[u8]) -> Option<String> {
    let mut rest = buf;
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b"SSH-2.0-") || line.starts_with(b"SSH-1.99-") {
            return Some(String::from_utf8_lossy(line).into_owned());
        }
        rest = &rest[nl + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn banner_lines() {
        assert_eq!(find_banner(b""), None);
        assert_eq!(
            find_banner(b"SSH-2.0-OpenSSH_9.2"),
            None,
            "not a whole line yet"
        );
        assert_eq!(
            find_banner(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n").as_deref(),
            Some("SSH-2.0-OpenSSH_9.2p1 Debian")
        );
        assert_eq!(
            find_banner(b"hello there\r\nSSH-2.0-dropbear_2022.83\r\n").as_deref(),
            Some("SSH-2.0-dropbear_2022.83")
        );
        assert_eq!(find_banner(b"SSH-1.5-old\r\n"), None);
        assert_eq!(find_banner(b"HTTP/1.1 400 Bad Request\r\n"), None);
    }

    /// What slirp does before the guest is up (accept, then close), a server that stays
    /// silent, a wrong protocol, and a real banner.
    #[tokio::test]
    async fn banner_against_fake_servers() {
        async fn serve(reply: Option<&'static [u8]>) -> u16 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            tokio::spawn(async move {
                loop {
                    let (mut s, _) = l.accept().await.unwrap();
                    match reply {
                        None => drop(s),
                        Some(b"") => {
                            tokio::spawn(async move {
                                sleep(Duration::from_secs(5)).await;
                                drop(s);
                            });
                        }
                        Some(r) => {
                            let _ = s.write_all(r).await;
                            sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
            port
        }
        /// What `banner` makes of a server answering `reply`, within `ms`.
        async fn banner_of(reply: Option<&'static [u8]>, ms: u64) -> Result<String, String> {
            banner("127.0.0.1", serve(reply).await, Duration::from_millis(ms)).await
        }
        assert_eq!(
            banner_of(None, 500).await.unwrap_err(),
            "connection closed before a banner"
        );
        assert!(
            banner_of(Some(b""), 300)
                .await
                .unwrap_err()
                .contains("no banner")
        );
        let http = banner_of(Some(b"HTTP/1.1 400 Bad Request\r\n\r\n"), 300).await;
        assert!(http.unwrap_err().contains("HTTP/1.1"));
        assert_eq!(
            banner_of(Some(b"SSH-2.0-Fake_1.0\r\n"), 500).await.unwrap(),
            "SSH-2.0-Fake_1.0"
        );
        // Nothing listening.
        let free = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert_eq!(
            banner("127.0.0.1", free, Duration::from_millis(300))
                .await
                .unwrap_err(),
            "connection refused"
        );
    }

    #[test]
    fn permanent_ssh_failures() {
        assert!(is_permanent(&SshErrorKind::HostKeyMismatch {
            expected: vec![],
            presented: String::new(),
            presented_type: String::new()
        }));
        assert!(is_permanent(&SshErrorKind::NoIdentity));
        assert!(!is_permanent(&SshErrorKind::ConnectionRefused));
        assert!(!is_permanent(&SshErrorKind::AuthFailed {
            user: "root".into(),
            tried: vec![],
            remaining: vec![]
        }));
    }
}
