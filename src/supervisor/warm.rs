//! The supervisor's warm connections at runtime: it carries out the machine's warm actions
//! (`state/warm.rs` decides) and reports what happened as the machine's events.
//!
//! - [`Action::WarmConnect`]: one task connects with exactly the target the hook's trust policy
//!   gave (`ssh::SshTarget::from_spec`; an empty key set is refused by `ssh::connect`), and the
//!   connection is kept here. A lazy builder's first one is the connection its readiness check
//!   made ([`Handover`]), when that was made to the same target.
//! - [`Action::WarmOpen`]: one task per session starts the remote program and does its
//!   handshake (`store::warm::start`), then watches it while it is pooled (output, an end, a
//!   broken connection: the session is gone) and keeps its stderr; on a hand-out it becomes
//!   the session's relay.
//! - [`Action::HandOut`]: three socket pairs (the program's stdin/stdout, its stderr, the
//!   status line); one end of each goes to the hook with the answer, the other to the
//!   session's relay. The relay copies each way until either side ends, writes how the session
//!   ended on the status socket ([`SessionEnd`]) before it closes the hook's stream, and ends
//!   the remote program by closing its channel when the hook goes away.
//! - [`Action::WarmClose`]: ready sessions are dropped (their channels close), and the
//!   connection closes with the last session that uses it.
//!
//! Every session task reports exactly one last event (`WarmOpenFailed` or `WarmEnded`). It
//! never decides which session goes to whom or when a pool closes.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use super::proto::{SessionSpec, TargetSpec};
use super::state::{Event, PoolId, SessionId};
use crate::ssh::{self, SshTarget};
use crate::store::warm::{self, SessionEnd, Started, keep_tail};

/// How long starting a remote program and its handshake may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read from the hook at a time, on their way to the remote program.
const UP_CHUNK: usize = 256 * 1024;
/// After the remote program's output ended, how long its stderr may take to follow.
const STDERR_GRACE: Duration = Duration::from_millis(100);
/// How long to wait for the exit status after the program's output ended.
const STATUS_WAIT: Duration = Duration::from_secs(1);

/// What the warm tasks report to the runtime.
pub(super) enum WarmReport {
    /// A connect finished: the connection to keep, or why not.
    Linked {
        pool: PoolId,
        result: Result<ssh::Session, String>,
    },
    /// Something the machine must hear.
    Event(Event),
}

/// A session's ends the relay uses (the hook has the others).
struct Relay {
    stdio: UnixStream,
    stderr: UnixStream,
    status: UnixStream,
}

/// The hook's ends of a session handed out, in [`proto::Response::Session`] order.
///
/// [`proto::Response::Session`]: super::proto::Response::Session
pub(super) type HookEnds = [OwnedFd; 3];

/// A pool's SSH connection, shared by its session tasks; closed when the last one lets go
/// (politely if russh still listens, else at once: [`ssh::Session::aborter`]).
pub(super) struct Link(Option<ssh::Session>);

impl std::ops::Deref for Link {
    type Target = ssh::Session;
    fn deref(&self) -> &ssh::Session {
        self.0
            .as_ref()
            .expect("a link holds its session until dropped")
    }
}

/// How long a closing connection may take to say goodbye before it is cut.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

impl Drop for Link {
    fn drop(&mut self) {
        let Some(session) = self.0.take() else { return };
        let cut = session.aborter();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            cut.cancel();
            return;
        };
        rt.spawn(async move {
            let _ = tokio::time::timeout(CLOSE_GRACE, session.close()).await;
            cut.cancel();
        });
    }
}

/// SSH connections that lazy builders' readiness checks made, by builder, with their targets:
/// the builder's first warm connection, when its target is the same (one handshake fewer
/// before the builder is up). An instance's task offers its own; a later boot's replaces it.
pub(super) type Handover = Arc<std::sync::Mutex<HashMap<String, (TargetSpec, ssh::Session)>>>;

/// Warm connections and sessions, as far as the runtime must hold them.
pub(super) struct WarmRuntime {
    links: HashMap<PoolId, Arc<Link>>,
    handover: Handover,
    /// Sessions not handed out yet (opening or pooled): the way to hand each one out.
    waiting: HashMap<SessionId, (PoolId, oneshot::Sender<Relay>)>,
    tx: mpsc::UnboundedSender<WarmReport>,
}

impl WarmRuntime {
    pub(super) fn new(tx: mpsc::UnboundedSender<WarmReport>) -> Self {
        WarmRuntime {
            links: HashMap::new(),
            handover: Handover::default(),
            waiting: HashMap::new(),
            tx,
        }
    }

    /// Where instance tasks offer their readiness checks' connections.
    pub(super) fn handover(&self) -> Handover {
        self.handover.clone()
    }

    /// [`Action::WarmConnect`](super::state::Action::WarmConnect): a lazy builder's
    /// readiness connection when one is offered for exactly this target, else a new one.
    pub(super) fn connect(&mut self, pool: PoolId, spec: SessionSpec) {
        let offered = spec
            .lazy
            .then(|| self.handover.lock().ok()?.remove(&spec.builder))
            .flatten();
        if let Some((target, session)) = offered {
            if target == spec.target && !session.is_closed() {
                info!(
                    "builder '{}': warm connection {pool} is the readiness check's",
                    spec.builder
                );
                let _ = self.tx.send(WarmReport::Linked {
                    pool,
                    result: Ok(session),
                });
                return;
            }
            tokio::spawn(session.close());
        }
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = match SshTarget::from_spec(&spec.builder, &spec.target) {
                Ok(target) => ssh::connect(&target).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(WarmReport::Linked { pool, result });
        });
    }

    /// A [`WarmReport::Linked`] as the machine's event (the connection is kept).
    pub(super) fn linked(&mut self, pool: PoolId, result: Result<ssh::Session, String>) -> Event {
        match result {
            Ok(session) => {
                debug!(
                    pool,
                    negotiated = ?session.negotiated(),
                    "warm connection up"
                );
                self.links.insert(pool, Arc::new(Link(Some(session))));
                Event::WarmConnected { pool }
            }
            Err(cause) => Event::WarmConnectFailed { pool, cause },
        }
    }

    /// [`Action::WarmOpen`](super::state::Action::WarmOpen).
    pub(super) fn open(&mut self, pool: PoolId, session: SessionId, spec: SessionSpec) {
        let link = match self.links.get(&pool) {
            Some(l) if !l.is_closed() => l.clone(),
            found => {
                let cause = found
                    .and_then(|l| l.disconnect_reason())
                    .unwrap_or_else(|| "the SSH connection was closed".to_owned());
                self.links.remove(&pool);
                let _ = self
                    .tx
                    .send(WarmReport::Event(Event::WarmLost { pool, cause }));
                return;
            }
        };
        let (hand_out, handed) = oneshot::channel();
        self.waiting.insert(session, (pool, hand_out));
        let tx = self.tx.clone();
        tokio::spawn(session_task(link, pool, session, spec, handed, tx));
    }

    /// [`Action::HandOut`](super::state::Action::HandOut): the hook's ends, or why there are
    /// none. A session whose task is gone gets its ends closed at once: the hook then falls
    /// back to a direct connection.
    pub(super) fn hand_out(&mut self, session: SessionId) -> io::Result<HookEnds> {
        let waiting = self.waiting.remove(&session);
        let (hook_stdio, stdio) = std::os::unix::net::UnixStream::pair()?;
        let (hook_stderr, stderr) = std::os::unix::net::UnixStream::pair()?;
        let (hook_status, status) = std::os::unix::net::UnixStream::pair()?;
        let relay = Relay {
            stdio: tokio_stream(stdio)?,
            stderr: tokio_stream(stderr)?,
            status: tokio_stream(status)?,
        };
        match waiting {
            Some((_, tx)) => {
                if tx.send(relay).is_err() {
                    debug!(session, "handing out a warm session that just ended");
                }
            }
            None => debug!(session, "handing out a warm session that is gone"),
        }
        Ok([hook_stdio.into(), hook_stderr.into(), hook_status.into()])
    }

    /// [`Action::WarmClose`](super::state::Action::WarmClose).
    pub(super) fn close(&mut self, pool: PoolId) {
        // Dropping a waiting session's sender ends its task, which drops its channel.
        self.waiting.retain(|_, (p, _)| *p != pool);
        // Sessions in use hold the connection until they end.
        self.links.remove(&pool);
    }
}

fn tokio_stream(s: std::os::unix::net::UnixStream) -> io::Result<UnixStream> {
    s.set_nonblocking(true)?;
    UnixStream::from_std(s)
}

fn event(tx: &mpsc::UnboundedSender<WarmReport>, e: Event) {
    let _ = tx.send(WarmReport::Event(e));
}

/// One warm session from start to end: open it, keep it while pooled, relay it once handed
/// out. Reports `WarmReady` (then `WarmEnded`) or `WarmOpenFailed`.
async fn session_task(
    link: Arc<Link>,
    pool: PoolId,
    session: SessionId,
    spec: SessionSpec,
    mut handed: oneshot::Receiver<Relay>,
    tx: mpsc::UnboundedSender<WarmReport>,
) {
    let opened = tokio::time::timeout(
        OPEN_TIMEOUT,
        warm::start(&link, &spec.command, spec.protocol, &spec.store_uri),
    )
    .await;
    let mut s = match opened {
        Ok(Ok(s)) => s,
        failed => {
            let cause = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!(
                    "the remote program did not finish its handshake within {}",
                    humantime::format_duration(OPEN_TIMEOUT)
                ),
            };
            if link.is_closed() {
                let lost = link.disconnect_reason().unwrap_or_else(|| cause.clone());
                event(&tx, Event::WarmLost { pool, cause: lost });
            }
            event(
                &tx,
                Event::WarmOpenFailed {
                    pool,
                    session,
                    cause,
                },
            );
            return;
        }
    };
    event(
        &tx,
        Event::WarmReady {
            pool,
            session,
            handshake: s.handshake.clone(),
        },
    );
    // Pooled: nothing may come on stdout; stderr is kept for the hook.
    let mut stderr_open = true;
    let relay = loop {
        tokio::select! {
            r = &mut handed => match r {
                Ok(relay) => break Some(relay),
                Err(_) => break None,
            },
            c = s.stdout.chunk() => {
                let cause = match c {
                    Ok(Some(_)) => "the remote program wrote to stdout unasked".to_owned(),
                    Ok(None) => "the remote program ended".to_owned(),
                    Err(e) => e.to_string(),
                };
                if link.is_closed() {
                    let cause = link.disconnect_reason().unwrap_or_else(|| cause.clone());
                    event(&tx, Event::WarmLost { pool, cause });
                }
                event(&tx, Event::WarmEnded { pool, session, cause: Some(cause) });
                return;
            }
            c = s.stderr.chunk(), if stderr_open => match c {
                Ok(Some(b)) => keep_tail(&mut s.stderr_kept, &b),
                _ => stderr_open = false,
            },
        }
    };
    let cause = match relay {
        Some(relay) => {
            relay_session(s, relay).await;
            None
        }
        None => Some("its pool closed".to_owned()),
    };
    drop(link);
    event(
        &tx,
        Event::WarmEnded {
            pool,
            session,
            cause,
        },
    );
}

/// Relays a handed-out session until either side ends (see the module docs).
async fn relay_session(s: Started, relay: Relay) {
    let Started {
        mut stdin,
        mut stdout,
        mut stderr,
        status,
        handshake: _,
        stdout_rest,
        stderr_kept,
    } = s;
    let Relay {
        stdio,
        stderr: mut hook_stderr,
        status: mut hook_status,
    } = relay;
    let (mut hook_rd, mut hook_wr) = stdio.into_split();
    if !stderr_kept.is_empty() && hook_stderr.write_all(&stderr_kept).await.is_err() {
        return;
    }
    if !stdout_rest.is_empty() && hook_wr.write_all(&stdout_rest).await.is_err() {
        return;
    }
    let up = async {
        let mut buf = vec![0u8; UP_CHUNK];
        loop {
            match hook_rd.read(&mut buf).await {
                // The hook is done writing (or gone): the program reads EOF and exits.
                Ok(0) | Err(_) => {
                    let _ = stdin.eof().await;
                    return;
                }
                Ok(n) => {
                    if stdin.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let down = async move {
        let ended = loop {
            match stdout.chunk().await {
                Ok(Some(b)) => {
                    if hook_wr.write_all(&b).await.is_err() {
                        // The hook is gone: dropping everything closes the channel.
                        break None;
                    }
                }
                Ok(None) => break Some(Ok(())),
                Err(e) => break Some(Err(e.to_string())),
            }
        };
        (ended, hook_wr)
    };
    let err = async {
        while let Ok(Some(b)) = stderr.chunk().await {
            if hook_stderr.write_all(&b).await.is_err() {
                break;
            }
        }
    };
    tokio::pin!(up, down, err);
    let (mut up_done, mut err_done) = (false, false);
    let ended = loop {
        tokio::select! {
            () = &mut up, if !up_done => up_done = true,
            () = &mut err, if !err_done => err_done = true,
            e = &mut down => break e,
        }
    };
    let (ended, mut hook_wr) = ended;
    let Some(ended) = ended else { return };
    if !err_done {
        let _ = tokio::time::timeout(STDERR_GRACE, &mut err).await;
    }
    let end = match ended {
        Ok(()) => SessionEnd::Exited {
            status: match tokio::time::timeout(STATUS_WAIT, status.wait()).await {
                Ok(Ok(s)) => s.to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "did not report how it ended".to_owned(),
            },
        },
        Err(reason) => SessionEnd::Disconnected { reason },
    };
    if let Ok(mut line) = serde_json::to_vec(&end) {
        line.push(b'\n');
        let _ = hook_status.write_all(&line).await;
    }
    // Only now does the hook see the end of the stream (and then the line above).
    let _ = hook_wr.shutdown().await;
}
