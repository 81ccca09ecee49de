//! Warm sessions: a builder's remote program (`nix-store --serve --write`, `nix-daemon
//! --stdio`) started and handshaken ahead of time by the supervisor, on the SSH connection it
//! keeps, and handed to a hook as three local sockets (the supervisor relays their bytes).
//!
//! Both ends live here because they must agree: the supervisor's [`start`] (open the channel,
//! run the command, do the protocol's handshake while keeping its stderr, give the streams
//! back with the [`Handshake`] it found), the [`SessionEnd`] line the relay writes before it
//! closes a session, and the hook's side of the sockets: [`WarmSession`], the reader that turns
//! an end of stream into what really happened ([`SessionEnd`]), and the byte counter that tells
//! whether the session ever answered (a warm session that fails before its first answer is
//! replaced by a direct connection, see [`Remote`](super::Remote)).
//!
//! It carries bytes and never decides anything: which session a hook gets is the supervisor's
//! machine's, what to do with it is `transfer`'s.

use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use hook_protocol::ProtocolVersion;
use hook_protocol::worker::{Negotiated, ServerInfo, Trust};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::RemoteError;
use super::serve::ServeClient;
use super::worker::WorkerClient;
use crate::config::{Builder, Scheme};
use crate::ssh::{self, ExecOutput, ExecStatus, ExecStdin};
use crate::supervisor::proto::SessionSpec;

pub use crate::supervisor::proto::{Handshake, Protocol};

fn pair(v: ProtocolVersion) -> [u8; 2] {
    [v.major, v.minor]
}

fn version(p: [u8; 2]) -> ProtocolVersion {
    ProtocolVersion::new(p[0], p[1])
}

impl Handshake {
    fn worker(proto: &Negotiated, info: &ServerInfo) -> Self {
        Handshake::Worker {
            version: pair(proto.version),
            features: proto.features.iter().cloned().collect(),
            server_features: info.server_features.iter().cloned().collect(),
            nix_version: info.nix_version.clone(),
            trusted: info.trust.map(|t| t == Trust::Trusted),
        }
    }

    pub fn protocol(&self) -> Protocol {
        match self {
            Handshake::Serve { .. } => Protocol::Serve,
            Handshake::Worker { .. } => Protocol::Worker,
        }
    }
}

/// How the supervisor keeps builder `b` warm, reached at `target` (the one our trust policy
/// gave: `ssh::SshTarget::for_builder`): the remote command and its protocol. The hook asks
/// with this spec, and a lazy builder's supervisor opens that builder's first session with it
/// as part of readiness; the two must agree for that session to be handed out.
pub fn session_spec(b: &Builder, target: &ssh::SshTarget) -> Result<SessionSpec, RemoteError> {
    Ok(SessionSpec {
        builder: b.name.clone(),
        store_uri: b.store_uri.clone(),
        lazy: b.is_lazy(),
        target: target.spec(),
        command: super::remote_command(b)?,
        protocol: match b.uri.scheme {
            Scheme::Ssh => Protocol::Serve,
            Scheme::SshNg => Protocol::Worker,
        },
        keep_warm_ms: u64::try_from(b.keep_warm.as_millis()).unwrap_or(u64::MAX),
        max_jobs: b.max_jobs,
    })
}

/// How much of the remote's stderr a pooled session keeps (and hands to the hook).
pub const STDERR_KEPT: usize = 4096;

/// A remote program started and handshaken on the supervisor's connection.
pub struct Started {
    pub stdin: ExecStdin,
    pub stdout: ExecOutput,
    pub stderr: ExecOutput,
    pub status: ExecStatus,
    pub handshake: Handshake,
    /// Stdout the handshake read past its end (nothing, with the protocols as they are).
    pub stdout_rest: Vec<u8>,
    /// What the program printed on stderr so far (at most [`STDERR_KEPT`] bytes, the last).
    pub stderr_kept: Vec<u8>,
}

/// Keeps the last [`STDERR_KEPT`] bytes of `buf` plus `more`.
pub fn keep_tail(buf: &mut Vec<u8>, more: &[u8]) {
    buf.extend_from_slice(more);
    if buf.len() > STDERR_KEPT {
        let cut = buf.len() - STDERR_KEPT;
        buf.drain(..cut);
    }
}

/// The supervisor's side: runs `command` on `session` and does `protocol`'s handshake, reading
/// the program's stderr meanwhile (a failure quotes it). `peer` names the builder in errors.
pub async fn start(
    session: &ssh::Session,
    command: &str,
    protocol: Protocol,
    peer: &str,
) -> Result<Started, RemoteError> {
    let ssh::Exec {
        stdin,
        stdout,
        mut stderr,
        status,
    } = session.exec(command).await?;
    let mut stderr_kept = Vec::new();
    let handshake = async {
        Ok::<_, RemoteError>(match protocol {
            Protocol::Serve => {
                let c = ServeClient::handshake(stdout, stdin, peer).await?;
                let (stdout, stdin, rest, negotiated, server) = c.into_parts();
                let hs = Handshake::Serve {
                    version: pair(negotiated),
                    server: pair(server),
                };
                (stdout, stdin, rest, hs)
            }
            Protocol::Worker => {
                let c = WorkerClient::handshake(stdout, stdin, peer).await?;
                let (stdout, stdin, rest, proto, info) = c.into_parts();
                (stdout, stdin, rest, Handshake::worker(&proto, &info))
            }
        })
    };
    tokio::pin!(handshake);
    let mut stderr_open = true;
    let result = loop {
        tokio::select! {
            r = &mut handshake => break r,
            c = stderr.chunk(), if stderr_open => match c {
                Ok(Some(b)) => keep_tail(&mut stderr_kept, &b),
                _ => stderr_open = false,
            },
        }
    };
    match result {
        Ok((stdout, stdin, stdout_rest, handshake)) => Ok(Started {
            stdin,
            stdout,
            stderr,
            status,
            handshake,
            stdout_rest,
            stderr_kept,
        }),
        Err(e) => {
            // The program's last words explain an early end; give them a moment to arrive.
            let more = tokio::time::timeout(std::time::Duration::from_millis(50), async {
                while let Ok(Some(b)) = stderr.chunk().await {
                    keep_tail(&mut stderr_kept, &b);
                }
            });
            let _ = more.await;
            Err(super::remote::with_stderr(
                e,
                &String::from_utf8_lossy(&stderr_kept),
            ))
        }
    }
}

/// How a relayed session ended, as the supervisor writes it on the session's status socket
/// (one JSON line) before it closes the others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "end", rename_all = "kebab-case")]
pub enum SessionEnd {
    /// The remote program closed its output; `status` says how it ended ("exited with status
    /// 0", …).
    Exited { status: String },
    /// The SSH connection to the builder broke (`reason` as the SSH client says it: the
    /// keepalive timeout, a reset, the server's disconnect).
    Disconnected { reason: String },
}

/// A warm session as the hook receives it.
#[derive(Debug)]
pub struct WarmSession {
    /// The remote program's stdin and stdout.
    pub stdio: OwnedFd,
    /// Its stderr.
    pub stderr: OwnedFd,
    /// One [`SessionEnd`] line when the session ends; closed without one when the supervisor
    /// went away.
    pub status: OwnedFd,
    pub handshake: Handshake,
}

/// How a warm session ended, read once from its status socket and shared by both directions.
struct End {
    status: Option<std::os::unix::net::UnixStream>,
    ended: Option<Result<(), String>>,
}

impl End {
    fn get(&mut self) -> Result<(), String> {
        if let Some(e) = &self.ended {
            return e.clone();
        }
        let e = match self.status.take().map(|s| read_end(&s)) {
            Some(Some(SessionEnd::Exited { .. })) => Ok(()),
            Some(Some(SessionEnd::Disconnected { reason })) => Err(reason),
            // The relay writes its line before it closes the stream: none means the
            // supervisor is gone.
            _ => Err(
                "the nix-lazy-builder supervisor that relayed this warm session went away \
                      (stopped or killed)"
                    .to_owned(),
            ),
        };
        self.ended = Some(e.clone());
        e
    }
}

type SharedEnd = Arc<std::sync::Mutex<End>>;

/// Reads the [`SessionEnd`] line already waiting on `status` (without blocking).
fn read_end(status: &std::os::unix::net::UnixStream) -> Option<SessionEnd> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let mut s = status;
    while buf.len() < 64 * 1024 {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        if buf.contains(&b'\n') {
            break;
        }
    }
    let line = buf.split(|&b| b == b'\n').next()?;
    serde_json::from_slice(line).ok()
}

fn end_of(end: &SharedEnd) -> Result<(), String> {
    end.lock().unwrap_or_else(|p| p.into_inner()).get()
}

/// The remote program's stdout, through the supervisor: an end of stream is a clean end only
/// when the status socket says the program exited; a broken connection or a supervisor that
/// went away is an error (`ConnectionAborted`), so a truncated stream is never taken for a
/// complete one. Counts what it delivered.
pub(super) struct WarmOutput {
    inner: OwnedReadHalf,
    end: SharedEnd,
    received: Arc<AtomicU64>,
}

/// The remote program's stdin, through the supervisor: a write to a session that is gone
/// fails with why it is gone.
pub(super) struct WarmInput {
    inner: OwnedWriteHalf,
    end: SharedEnd,
}

impl WarmInput {
    fn explain<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::NotConnected
                ) =>
            {
                let why = end_of(&self.end).err().unwrap_or_else(|| {
                    "the remote program's session is closed (it exited)".to_owned()
                });
                Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, why)))
            }
            r => r,
        }
    }
}

impl AsyncWrite for WarmInput {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.explain(r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.explain(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncRead for WarmOutput {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if n > 0 {
            self.received.fetch_add(n as u64, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        Poll::Ready(
            end_of(&self.end)
                .map_err(|reason| io::Error::new(io::ErrorKind::ConnectionAborted, reason)),
        )
    }
}

/// The remote program's stdout as the store clients read it: an SSH channel of our own, or a
/// warm session's socket.
pub(super) enum Stdout {
    Ssh(ExecOutput),
    Warm(WarmOutput),
}

impl AsyncRead for Stdout {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stdout::Ssh(o) => Pin::new(o).poll_read(cx, buf),
            Stdout::Warm(o) => Pin::new(o).poll_read(cx, buf),
        }
    }
}

/// The remote program's stdin, likewise.
pub(super) enum Stdin {
    Ssh(ExecStdin),
    Warm(WarmInput),
}

impl AsyncWrite for Stdin {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stdin::Ssh(w) => Pin::new(w).poll_write(cx, buf),
            Stdin::Warm(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stdin::Ssh(w) => Pin::new(w).poll_flush(cx),
            Stdin::Warm(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stdin::Ssh(w) => Pin::new(w).poll_shutdown(cx),
            Stdin::Warm(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// A warm session's sockets as async streams (inside the runtime), with the counter of bytes
/// its stdout delivered.
pub(super) struct WarmStreams {
    pub stdout: Stdout,
    pub stdin: Stdin,
    pub stderr: tokio::net::UnixStream,
    pub received: Arc<AtomicU64>,
}

fn async_stream(fd: OwnedFd) -> io::Result<tokio::net::UnixStream> {
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(s)
}

impl WarmSession {
    pub(super) fn streams(self) -> io::Result<(WarmStreams, Handshake)> {
        let (rd, wr) = async_stream(self.stdio)?.into_split();
        let stderr = async_stream(self.stderr)?;
        let status = std::os::unix::net::UnixStream::from(self.status);
        status.set_nonblocking(true)?;
        let received = Arc::new(AtomicU64::new(0));
        let end = Arc::new(std::sync::Mutex::new(End {
            status: Some(status),
            ended: None,
        }));
        Ok((
            WarmStreams {
                stdout: Stdout::Warm(WarmOutput {
                    inner: rd,
                    end: end.clone(),
                    received: received.clone(),
                }),
                stdin: Stdin::Warm(WarmInput { inner: wr, end }),
                stderr,
                received,
            },
            self.handshake,
        ))
    }
}

/// The clients a [`Handshake`] resumes.
pub(super) fn resume_serve<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    stdout: R,
    stdin: W,
    peer: &str,
    hs: &Handshake,
) -> Option<ServeClient<R, W>> {
    match hs {
        Handshake::Serve { version: v, server } => Some(ServeClient::resume(
            stdout,
            stdin,
            peer,
            version(*v),
            version(*server),
        )),
        Handshake::Worker { .. } => None,
    }
}

pub(super) fn resume_worker<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    stdout: R,
    stdin: W,
    peer: &str,
    hs: &Handshake,
) -> Option<WorkerClient<R, W>> {
    match hs {
        Handshake::Worker {
            version: v,
            features,
            server_features,
            nix_version,
            trusted,
        } => {
            let proto = Negotiated {
                version: version(*v),
                features: features.iter().cloned().collect(),
            };
            let info = ServerInfo {
                server_features: server_features.iter().cloned().collect(),
                nix_version: nix_version.clone(),
                trust: trusted.map(|t| if t { Trust::Trusted } else { Trust::NotTrusted }),
            };
            Some(WorkerClient::resume(stdout, stdin, peer, proto, info))
        }
        Handshake::Serve { .. } => None,
    }
}

/// Whether `e` is the session itself breaking (an end of stream, a reset, a write to a closed
/// socket), as opposed to an answer the remote gave.
pub(super) fn broke(e: &RemoteError) -> bool {
    use crate::wire_io::WireError;
    matches!(
        e,
        RemoteError::Closed { .. }
            | RemoteError::Write { .. }
            | RemoteError::Wire(WireError::UnexpectedEof { .. } | WireError::Io { .. })
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_status_line_round_trips() {
        let lines = [
            SessionEnd::Exited {
                status: "exited with status 0".into(),
            },
            SessionEnd::Disconnected {
                reason: "keepalive".into(),
            },
        ];
        for end in lines {
            let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            let mut line = serde_json::to_vec(&end).unwrap();
            line.push(b'\n');
            a.write_all(&line).unwrap();
            b.set_nonblocking(true).unwrap();
            assert_eq!(read_end(&b), Some(end));
        }
        // Closed without a line: nothing.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(a);
        assert_eq!(read_end(&b), None);
    }

    #[test]
    fn an_end_of_stream_is_clean_only_when_the_program_exited() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::io::AsyncReadExt;
            for (end, clean) in [
                (
                    Some(SessionEnd::Exited {
                        status: "exited with status 1".into(),
                    }),
                    true,
                ),
                (
                    Some(SessionEnd::Disconnected {
                        reason: "the builder stopped answering keepalives".into(),
                    }),
                    false,
                ),
                (None, false),
            ] {
                let (stdio, mut sup_stdio) = std::os::unix::net::UnixStream::pair().unwrap();
                let (stderr, _sup_err) = std::os::unix::net::UnixStream::pair().unwrap();
                let (status, mut sup_status) = std::os::unix::net::UnixStream::pair().unwrap();
                sup_stdio.write_all(b"abc").unwrap();
                if let Some(end) = &end {
                    let mut line = serde_json::to_vec(end).unwrap();
                    line.push(b'\n');
                    sup_status.write_all(&line).unwrap();
                }
                drop((sup_stdio, sup_status));
                let session = WarmSession {
                    stdio: stdio.into(),
                    stderr: stderr.into(),
                    status: status.into(),
                    handshake: Handshake::Serve {
                        version: [2, 7],
                        server: [2, 7],
                    },
                };
                let (mut s, _) = session.streams().unwrap();
                let mut got = Vec::new();
                let r = s.stdout.read_to_end(&mut got).await;
                assert_eq!(got, b"abc");
                assert_eq!(s.received.load(Ordering::Relaxed), 3);
                match (r, clean) {
                    (Ok(3), true) => {}
                    (Err(e), false) => {
                        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
                        let text = e.to_string();
                        match &end {
                            Some(SessionEnd::Disconnected { reason }) => {
                                assert_eq!(&text, reason)
                            }
                            _ => assert!(text.contains("supervisor"), "{text}"),
                        }
                    }
                    (r, _) => panic!("{end:?}: {r:?}"),
                }
            }
        });
    }
}
