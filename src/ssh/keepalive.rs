//! Liveness: the [`Timeouts`] a connection lives by, and the TCP stream russh runs on
//! (`WatchedStream`), which fails a write that makes no progress and ends every read and write
//! once a connect attempt is abandoned.
//!
//! A builder can run a build that is silent for hours, so nothing here times out on *silence*.
//! What proves the peer alive is the reply to an SSH keepalive (`keepalive@openssh.com`, sent
//! every [`Timeouts::keepalive_interval`] without traffic from the server). After
//! [`Timeouts::keepalive_max`] unanswered keepalives the connection is declared dead: with the
//! defaults (5 s × 2) a peer that stops answering (crashed VM, SIGSTOPped sshd, dead network) is
//! detected about 15 s after the last thing it sent. A write that makes no progress at all for
//! [`Timeouts::write_stall`] (the peer's TCP window stays shut) also kills the connection: that
//! covers the case where russh's event loop is blocked in a socket write and cannot run its
//! keepalive timer. russh's own `inactivity_timeout` is *not* used (it would also have to be
//! longer than any quiet build).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::Stage;
use super::session::Shared;

/// Connection timeouts. See the module docs on liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect + banner + key exchange + authentication, all together.
    pub connect: Duration,
    /// Send a keepalive after this long without hearing from the server.
    pub keepalive_interval: Duration,
    /// Declare the connection dead when this many keepalives in a row got no answer (the
    /// connection is dropped at the next interval).
    pub keepalive_max: usize,
    /// Declare the connection dead when a socket write makes no progress for this long.
    pub write_stall: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(15),
            keepalive_interval: Duration::from_secs(5),
            keepalive_max: 2,
            write_stall: Duration::from_secs(20),
        }
    }
}

impl Timeouts {
    /// How long after the last message from the server a silent peer is declared dead.
    pub fn dead_peer_after(&self) -> Duration {
        self.keepalive_interval * (self.keepalive_max as u32 + 1)
    }
}

/// The TCP stream russh runs on. It fails a write that makes no progress for `stall_limit`
/// (russh cannot run its keepalive timer while it waits for a socket write), and notes the
/// first byte from the server (for timeout messages).
pub(super) struct WatchedStream {
    inner: TcpStream,
    stall_limit: Duration,
    stall: Pin<Box<tokio::time::Sleep>>,
    stall_armed: bool,
    seen_bytes: bool,
    shared: Arc<Shared>,
    /// Cancelled when the connection is abandoned (connect timeout): every pending and later
    /// read or write fails, so russh's background task ends and the socket is closed.
    kill: CancellationToken,
    kill_read: Pin<Box<WaitForCancellationFutureOwned>>,
    kill_write: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl WatchedStream {
    pub(super) fn new(
        inner: TcpStream,
        stall_limit: Duration,
        shared: Arc<Shared>,
        kill: CancellationToken,
    ) -> Self {
        WatchedStream {
            inner,
            stall_limit,
            stall: Box::pin(tokio::time::sleep(stall_limit)),
            stall_armed: false,
            seen_bytes: false,
            shared,
            kill_read: Box::pin(kill.clone().cancelled_owned()),
            kill_write: Box::pin(kill.clone().cancelled_owned()),
            kill,
        }
    }

    fn abandoned() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "connection abandoned (connect timed out)",
        )
    }

    /// A write is pending: fail if the connection was abandoned or the stall limit passed.
    fn poll_write_pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if self.kill_write.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Self::abandoned()));
        }
        if !self.stall_armed {
            self.stall_armed = true;
            let deadline = tokio::time::Instant::now() + self.stall_limit;
            self.stall.as_mut().reset(deadline);
        }
        ready!(self.stall.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "nothing could be sent to the builder for {} (its TCP window stayed closed: \
                 the peer is dead, frozen or unreachable)",
                humantime::format_duration(self.stall_limit)
            ),
        )))
    }

    fn write_done<T>(&mut self, r: io::Result<T>) -> Poll<io::Result<T>> {
        self.stall_armed = false;
        Poll::Ready(r)
    }

    /// One write-side call (`write`, `write_vectored`, `flush`) on the socket, watched: refused
    /// once the session is killed, and its stall timed while the socket takes nothing.
    fn poll_watched_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.kill.is_cancelled() {
            return Poll::Ready(Err(Self::abandoned()));
        }
        match op(Pin::new(&mut self.inner), cx) {
            Poll::Ready(r) => self.write_done(r),
            Poll::Pending => self.poll_write_pending(cx),
        }
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.kill.is_cancelled() {
            return Poll::Ready(Err(Self::abandoned()));
        }
        let before = buf.filled().len();
        let r = match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => {
                ready!(self.kill_read.as_mut().poll(cx));
                return Poll::Ready(Err(Self::abandoned()));
            }
        };
        if !self.seen_bytes && buf.filled().len() > before {
            self.seen_bytes = true;
            self.shared.with(|s| {
                if s.stage == Stage::Banner {
                    s.stage = Stage::KeyExchange;
                }
            });
        }
        Poll::Ready(r)
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_watched_write(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_watched_write(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_watched_write(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stalled_socket_writes_fail_with_timed_out() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (_peer_never_reads, _) = listener.accept().await.unwrap();
        let limit = Duration::from_millis(300);
        let mut w = WatchedStream::new(
            client,
            limit,
            Arc::new(Shared::default()),
            CancellationToken::new(),
        );
        let buf = vec![0u8; 1 << 20];
        let started = std::time::Instant::now();
        let err = loop {
            match tokio::time::timeout(Duration::from_secs(30), w.write(&buf)).await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => break e,
                Err(_) => panic!("the stall was not detected"),
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(started.elapsed() >= limit);
    }

    #[test]
    fn timeouts_default_detects_dead_peer_in_15s() {
        assert_eq!(
            Timeouts::default().dead_peer_after(),
            Duration::from_secs(15)
        );
    }
}
