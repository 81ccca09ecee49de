//! Remote commands: [`Session::exec`] opens a session channel and runs a command line on it,
//! as an [`Exec`] whose stdin, stdout, stderr and exit status are separate ends.
//!
//! SSH has one flow-control window per channel, shared by stdout and stderr: a consumer must
//! keep reading *both* [`Exec::stdout`] and [`Exec::stderr`] (or drop the one it does not want),
//! otherwise the one it does read stalls once the other's buffer is full. A reader that stops
//! reading stalls the whole connection (russh stops reading the socket), which is the
//! backpressure that bounds memory: about 4 MiB per exec in this process (russh's per-channel
//! queue plus ours), plus the kernel's socket buffers. Received-window acknowledgements are sent
//! by russh on receipt, so the window (`session`'s `WINDOW_SIZE`, 8 MiB) only limits what is in
//! flight.
//!
//! It never mistakes a truncated stream for a complete one: output that ends because the
//! connection died is an error, not an end of file.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use russh::client;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFutureOwned};
use tracing::debug;

use super::session::{Peer, Session, Shared, runtime_error};
use super::{SshError, SshErrorKind};

/// Chunks our per-stream queues hold (each is one SSH packet, ≤ 32 KiB).
const STREAM_QUEUE: usize = 32;

impl Session {
    /// Runs `command` (a shell command line: build it with [`shell_command`](super::shell_command)) on the builder.
    pub async fn exec(&self, command: &str) -> Result<Exec, SshError> {
        let rt = |e| {
            self.peer
                .err(runtime_error(e, &self.shared, &self.timeouts))
        };
        let channel = self.handle.channel_open_session().await.map_err(rt)?;
        let (mut rx, tx) = channel.split();
        tx.exec(true, command.as_bytes()).await.map_err(rt)?;
        let mut early = VecDeque::new();
        loop {
            match rx.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) => {
                    return Err(self.peer.err(SshErrorKind::Channel(format!(
                        "the server refused to run the command: {command}"
                    ))));
                }
                Some(ChannelMsg::Close) => {
                    return Err(self.peer.err(SshErrorKind::Channel(format!(
                        "the server closed the channel before starting the command: {command}"
                    ))));
                }
                Some(other) => early.push_back(other),
                None => {
                    return Err(self
                        .peer
                        .err(SshErrorKind::Disconnected(self.shared.disconnect_reason())));
                }
            }
        }
        debug!(builder = %self.peer.builder, %command, "remote command started");

        let (out_tx, out_rx) = mpsc::channel(STREAM_QUEUE);
        let (err_tx, err_rx) = mpsc::channel(STREAM_QUEUE);
        let (status_tx, status_rx) = oneshot::channel();
        let closed = CancellationToken::new();
        let stdin_alive = CancellationToken::new();
        let writer: Pin<Box<dyn AsyncWrite + Send>> = Box::pin(tx.make_writer());
        tokio::spawn(pump(Pump {
            rx,
            tx,
            early,
            stdout: Some(out_tx),
            stderr: Some(err_tx),
            status: Some(status_tx),
            stdin_alive: stdin_alive.clone(),
            closed: closed.clone(),
            shared: self.shared.clone(),
        }));
        Ok(Exec {
            stdin: ExecStdin {
                inner: writer,
                closed_wait: Box::pin(closed.clone().cancelled_owned()),
                closed,
                _alive: stdin_alive.drop_guard(),
                shared: self.shared.clone(),
            },
            stdout: ExecOutput::new(out_rx),
            stderr: ExecOutput::new(err_rx),
            status: ExecStatus {
                rx: status_rx,
                peer: self.peer.clone(),
                command: command.to_owned(),
            },
        })
    }
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    Code(u32),
    Signal {
        signal: String,
        core_dumped: bool,
        message: String,
    },
    /// The server closed the channel without reporting a status.
    Unknown,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        matches!(self, ExitStatus::Code(0))
    }
    pub fn code(&self) -> Option<u32> {
        match self {
            ExitStatus::Code(c) => Some(*c),
            _ => None,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exited with status {c}"),
            ExitStatus::Signal {
                signal,
                core_dumped,
                message,
            } => {
                write!(f, "was killed by signal {signal}")?;
                if *core_dumped {
                    f.write_str(" (core dumped)")?;
                }
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            ExitStatus::Unknown => f.write_str("ended without an exit status"),
        }
    }
}

fn signal_name(sig: &russh::Sig) -> String {
    match sig {
        russh::Sig::ABRT => "ABRT".into(),
        russh::Sig::ALRM => "ALRM".into(),
        russh::Sig::FPE => "FPE".into(),
        russh::Sig::HUP => "HUP".into(),
        russh::Sig::ILL => "ILL".into(),
        russh::Sig::INT => "INT".into(),
        russh::Sig::KILL => "KILL".into(),
        russh::Sig::PIPE => "PIPE".into(),
        russh::Sig::QUIT => "QUIT".into(),
        russh::Sig::SEGV => "SEGV".into(),
        russh::Sig::TERM => "TERM".into(),
        russh::Sig::USR1 => "USR1".into(),
        russh::Sig::Custom(s) => s.clone(),
    }
}

/// A running remote command. Take the fields apart and drive them concurrently: write stdin,
/// read stdout and stderr (both! see the module docs), then wait for the status.
/// Dropping all four ends closes the channel (the remote command sees its channel go away).
#[derive(Debug)]
pub struct Exec {
    pub stdin: ExecStdin,
    pub stdout: ExecOutput,
    pub stderr: ExecOutput,
    pub status: ExecStatus,
}

enum Chunk {
    Data(Bytes),
    Eof,
    Error(Arc<str>),
}

struct Pump {
    rx: ChannelReadHalf,
    tx: ChannelWriteHalf<client::Msg>,
    early: VecDeque<ChannelMsg>,
    stdout: Option<mpsc::Sender<Chunk>>,
    stderr: Option<mpsc::Sender<Chunk>>,
    status: Option<oneshot::Sender<Result<ExitStatus, String>>>,
    stdin_alive: CancellationToken,
    closed: CancellationToken,
    shared: Arc<Shared>,
}

/// Resolves once nobody holds any end of the exec any more.
async fn consumers_gone(
    stdout: &Option<mpsc::Sender<Chunk>>,
    stderr: &Option<mpsc::Sender<Chunk>>,
    status: &mut Option<oneshot::Sender<Result<ExitStatus, String>>>,
    stdin_alive: &CancellationToken,
) {
    if let Some(s) = stdout {
        s.closed().await;
    }
    if let Some(s) = stderr {
        s.closed().await;
    }
    if let Some(s) = status {
        s.closed().await;
    }
    stdin_alive.cancelled().await;
}

async fn forward(slot: &mut Option<mpsc::Sender<Chunk>>, chunk: Chunk) {
    if let Some(s) = slot
        && s.send(chunk).await.is_err()
    {
        // The reader was dropped: nobody wants this stream any more.
        *slot = None;
    }
}

async fn pump(mut p: Pump) {
    let mut close_sent = false;
    loop {
        let msg = if let Some(m) = p.early.pop_front() {
            Some(m)
        } else if close_sent {
            p.rx.wait().await
        } else {
            tokio::select! {
                m = p.rx.wait() => m,
                () = consumers_gone(&p.stdout, &p.stderr, &mut p.status, &p.stdin_alive) => {
                    debug!("all ends of an exec dropped: closing its channel");
                    let _ = p.tx.close().await;
                    close_sent = true;
                    continue;
                }
            }
        };
        match msg {
            Some(ChannelMsg::Data { data }) => forward(&mut p.stdout, Chunk::Data(data)).await,
            Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                forward(&mut p.stderr, Chunk::Data(data)).await
            }
            Some(ChannelMsg::Eof) => {
                forward(&mut p.stdout, Chunk::Eof).await;
                forward(&mut p.stderr, Chunk::Eof).await;
                p.stdout = None;
                p.stderr = None;
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => {
                if let Some(s) = p.status.take() {
                    let _ = s.send(Ok(ExitStatus::Code(exit_status)));
                }
            }
            Some(ChannelMsg::ExitSignal {
                signal_name: sig,
                core_dumped,
                error_message,
                ..
            }) => {
                if let Some(s) = p.status.take() {
                    let _ = s.send(Ok(ExitStatus::Signal {
                        signal: signal_name(&sig),
                        core_dumped,
                        message: error_message,
                    }));
                }
            }
            Some(ChannelMsg::Close) => {
                forward(&mut p.stdout, Chunk::Eof).await;
                forward(&mut p.stderr, Chunk::Eof).await;
                if let Some(s) = p.status.take() {
                    let _ = s.send(Ok(ExitStatus::Unknown));
                }
                p.closed.cancel();
                return;
            }
            Some(_) => {}
            None => {
                let reason: Arc<str> = p.shared.disconnect_reason().into();
                debug!(%reason, "SSH connection lost while a remote command was running");
                forward(&mut p.stdout, Chunk::Error(reason.clone())).await;
                forward(&mut p.stderr, Chunk::Error(reason.clone())).await;
                if let Some(s) = p.status.take() {
                    let _ = s.send(Err(reason.to_string()));
                }
                p.closed.cancel();
                return;
            }
        }
    }
}

/// The remote command's stdin. `shutdown()` (tokio's `AsyncWriteExt::shutdown`, or
/// [`ExecStdin::eof`]) sends EOF. Writes wait for the server's window (bounded memory) and fail
/// with `BrokenPipe` once the channel or connection is gone.
pub struct ExecStdin {
    inner: Pin<Box<dyn AsyncWrite + Send>>,
    closed: CancellationToken,
    closed_wait: Pin<Box<WaitForCancellationFutureOwned>>,
    _alive: DropGuard,
    shared: Arc<Shared>,
}

impl fmt::Debug for ExecStdin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecStdin").finish_non_exhaustive()
    }
}

impl ExecStdin {
    /// Sends EOF: the remote command reads end-of-file after what was written.
    pub async fn eof(&mut self) -> io::Result<()> {
        tokio::io::AsyncWriteExt::shutdown(self).await
    }

    fn gone(&self) -> io::Error {
        let reason = self
            .shared
            .with(|s| s.disconnect.clone())
            .unwrap_or_else(|| {
                "the remote command's channel is closed (it exited or closed its input)".to_owned()
            });
        io::Error::new(io::ErrorKind::BrokenPipe, reason)
    }

    fn poll_io<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut (dyn AsyncWrite + Send)>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.closed.is_cancelled() {
            return Poll::Ready(Err(self.gone()));
        }
        match op(self.inner.as_mut(), cx) {
            Poll::Ready(Ok(v)) => Poll::Ready(Ok(v)),
            Poll::Ready(Err(_)) => Poll::Ready(Err(self.gone())),
            Poll::Pending => {
                ready!(self.closed_wait.as_mut().poll(cx));
                Poll::Ready(Err(self.gone()))
            }
        }
    }
}

impl AsyncWrite for ExecStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.poll_io(cx, |w, cx| w.poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_io(cx, |w, cx| w.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // EOF on a channel that is already closed loses nothing: not an error.
        if self.closed.is_cancelled() {
            return Poll::Ready(Ok(()));
        }
        self.poll_io(cx, |w, cx| w.poll_shutdown(cx))
    }
}

enum OutputState {
    Open,
    Eof,
    Failed(Arc<str>),
}

/// The remote command's stdout or stderr. Ends with EOF when the command's output is complete;
/// fails with `ConnectionAborted` (naming the cause) when the connection dies first, so a
/// truncated stream is never mistaken for a complete one.
pub struct ExecOutput {
    rx: mpsc::Receiver<Chunk>,
    buf: Bytes,
    state: OutputState,
}

impl fmt::Debug for ExecOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecOutput").finish_non_exhaustive()
    }
}

impl ExecOutput {
    fn new(rx: mpsc::Receiver<Chunk>) -> Self {
        ExecOutput {
            rx,
            buf: Bytes::new(),
            state: OutputState::Open,
        }
    }

    /// The next piece of output as it arrived (one SSH packet, or what a read left of one):
    /// `None` at the end of the output, an error (`ConnectionAborted`, naming the cause) when
    /// the connection died first. For relays, which forward each piece without copying it.
    pub async fn chunk(&mut self) -> io::Result<Option<Bytes>> {
        if !self.buf.is_empty() {
            return Ok(Some(std::mem::take(&mut self.buf)));
        }
        loop {
            match &self.state {
                OutputState::Eof => return Ok(None),
                OutputState::Failed(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        e.to_string(),
                    ));
                }
                OutputState::Open => {}
            }
            match self.rx.recv().await {
                Some(Chunk::Data(b)) if b.is_empty() => {}
                Some(Chunk::Data(b)) => return Ok(Some(b)),
                Some(Chunk::Eof) => self.state = OutputState::Eof,
                Some(Chunk::Error(e)) => self.state = OutputState::Failed(e),
                None => {
                    self.state =
                        OutputState::Failed("the SSH channel reader stopped unexpectedly".into())
                }
            }
        }
    }
}

impl AsyncRead for ExecOutput {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Fills `out` with as many queued chunks as fit (fewer wake-ups for big reads), and
        // waits only when nothing at all has been copied yet.
        let mut copied = false;
        loop {
            if !self.buf.is_empty() {
                let n = self.buf.len().min(out.remaining());
                let chunk = self.buf.split_to(n);
                out.put_slice(&chunk);
                copied = true;
            }
            if out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match &self.state {
                OutputState::Eof => return Poll::Ready(Ok(())),
                OutputState::Failed(_) if copied => return Poll::Ready(Ok(())),
                OutputState::Failed(e) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        e.to_string(),
                    )));
                }
                OutputState::Open => {}
            }
            let next = if copied {
                match self.rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(mpsc::error::TryRecvError::Empty) => return Poll::Ready(Ok(())),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            } else {
                ready!(self.rx.poll_recv(cx))
            };
            match next {
                Some(Chunk::Data(b)) => self.buf = b,
                Some(Chunk::Eof) => self.state = OutputState::Eof,
                Some(Chunk::Error(e)) => self.state = OutputState::Failed(e),
                None => {
                    self.state =
                        OutputState::Failed("the SSH channel reader stopped unexpectedly".into())
                }
            }
        }
    }
}

/// The remote command's exit status.
#[derive(Debug)]
pub struct ExecStatus {
    rx: oneshot::Receiver<Result<ExitStatus, String>>,
    peer: Arc<Peer>,
    command: String,
}

impl ExecStatus {
    /// Waits for the command to end and returns how it ended.
    pub async fn wait(self) -> Result<ExitStatus, SshError> {
        match self.rx.await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(reason)) => Err(self.peer.err(SshErrorKind::Disconnected(reason))),
            Err(_) => Err(self.peer.err(SshErrorKind::Disconnected(
                "the SSH channel reader stopped unexpectedly".into(),
            ))),
        }
    }

    /// Waits and turns anything but exit status 0 into an error (127: command not found).
    pub async fn success(self) -> Result<(), SshError> {
        let peer = self.peer.clone();
        let command = self.command.clone();
        match self.wait().await? {
            ExitStatus::Code(0) => Ok(()),
            ExitStatus::Code(127) => Err(peer.err(SshErrorKind::CommandNotFound { command })),
            status => Err(peer.err(SshErrorKind::CommandFailed { command, status })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_of(chunks: Vec<Chunk>, close: bool) -> (Vec<u8>, io::Result<usize>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async move {
            use tokio::io::AsyncReadExt;
            let (tx, rx) = mpsc::channel(chunks.len() + 1);
            for c in chunks {
                tx.send(c).await.unwrap();
            }
            if close {
                drop(tx);
            } else {
                std::mem::forget(tx);
            }
            let mut out = ExecOutput::new(rx);
            let mut got = Vec::new();
            let r = out.read_to_end(&mut got).await;
            (got, r)
        })
    }

    #[test]
    fn exec_output_never_mistakes_truncation_for_eof() {
        let d = |s: &'static str| Chunk::Data(Bytes::from_static(s.as_bytes()));
        let (got, r) = output_of(vec![d("ab"), d("cd"), Chunk::Eof], false);
        assert_eq!((got.as_slice(), r.unwrap()), (&b"abcd"[..], 4));

        let (got, r) = output_of(
            vec![d("ab"), Chunk::Error("keepalive timeout".into())],
            false,
        );
        assert_eq!(got, b"ab");
        let e = r.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        assert!(e.to_string().contains("keepalive"));

        // The pump vanished without saying EOF: an error, not a clean end.
        let (got, r) = output_of(vec![d("ab")], true);
        assert_eq!(got, b"ab");
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
    }
}
