//! The host side of the guest agent (`examples/vm/nlb-agent.c`), reached through the VM's
//! virtio-serial port (a unix socket in the builder's state directory that QEMU serves):
//! `ping` before a snapshot is made (the image has a working agent), and `refresh` after every
//! restore (fresh host randomness into the guest kernel's CRNG, which is then reseeded, and
//! the host's clock).
//!
//! The line formats are pure functions; [`request`] puts them on the socket. Every step has a
//! time limit.
//!
//! Must never: send anything but the two requests, wait without a limit, or use randomness
//! that is not fresh from the host's kernel for a refresh.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::{Instant, timeout_at};

/// Bytes of host randomness a refresh sends (the agent takes 32 to 256).
pub const SEED_BYTES: usize = 64;
/// Longest reply line read.
const MAX_LINE: u64 = 4096;

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the guest agent's socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("guest agent ({}): {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the guest agent did not answer `{what}` within {}", humantime::format_duration(*after))]
    Timeout { what: String, after: Duration },
    #[error("the guest agent closed the connection before it answered `{what}`")]
    Closed { what: String },
    #[error("the guest agent refused `{what}`: {why}")]
    Refused { what: String, why: String },
    #[error("cannot read fresh randomness from the host: {0}")]
    Random(std::io::Error),
}

/// `ID refresh SEC NSEC HEX` for the host's time `now` and `seed`.
pub fn refresh_line(id: &str, now: SystemTime, seed: &[u8]) -> String {
    let t = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!(
        "{id} refresh {} {} {}\n",
        t.as_secs(),
        t.subsec_nanos(),
        super::snapshot::hex(seed)
    )
}

/// `ID ping`.
pub fn ping_line(id: &str) -> String {
    format!("{id} ping\n")
}

/// The answer to request `id` in one reply line: `None` if the line answers something else
/// (a reply to an earlier connection's request); `Ok(rest)` for `ID ok REST`, `Err(why)` for
/// `ID error WHY` or anything else.
pub fn parse_reply(line: &str, id: &str) -> Option<Result<String, String>> {
    let line = line.trim_end_matches(['\r', '\n']);
    let rest = line.strip_prefix(id)?.strip_prefix(' ')?;
    Some(if let Some(ok) = rest.strip_prefix("ok") {
        Ok(ok.trim_start().to_owned())
    } else if let Some(err) = rest.strip_prefix("error") {
        Err(err.trim_start().to_owned())
    } else {
        Err(format!("unexpected reply: {rest}"))
    })
}

/// A request id nobody else uses: this process, a counter.
fn next_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "nlb{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Fresh randomness from the host's kernel.
fn host_seed() -> Result<[u8; SEED_BYTES], AgentError> {
    let mut seed = [0u8; SEED_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(AgentError::Random)?;
    Ok(seed)
}

/// Sends one request (`line` built for `id`) and waits for its answer, all before
/// `deadline`. The socket may not exist for a moment after QEMU started: connecting is retried.
pub async fn request(
    socket: &Path,
    what: &str,
    id: &str,
    line: &str,
    deadline: Instant,
) -> Result<String, AgentError> {
    let limit = deadline.saturating_duration_since(Instant::now());
    let timed_out = || AgentError::Timeout {
        what: what.to_owned(),
        after: limit,
    };
    let stream = loop {
        match UnixStream::connect(socket).await {
            Ok(s) => break s,
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(source) => {
                return Err(AgentError::Connect {
                    path: socket.to_owned(),
                    source,
                });
            }
        }
    };
    let io = |source| AgentError::Io {
        path: socket.to_owned(),
        source,
    };
    let (r, mut w) = stream.into_split();
    timeout_at(deadline, w.write_all(line.as_bytes()))
        .await
        .map_err(|_| timed_out())?
        .map_err(io)?;
    let mut reader = BufReader::new(r);
    loop {
        let mut reply = String::new();
        let n = timeout_at(deadline, (&mut reader).take(MAX_LINE).read_line(&mut reply))
            .await
            .map_err(|_| timed_out())?
            .map_err(io)?;
        if n == 0 {
            return Err(AgentError::Closed {
                what: what.to_owned(),
            });
        }
        match parse_reply(&reply, id) {
            None => continue,
            Some(Ok(rest)) => return Ok(rest),
            Some(Err(why)) => {
                return Err(AgentError::Refused {
                    what: what.to_owned(),
                    why,
                });
            }
        }
    }
}

/// `ping`: whether the agent runs and answers.
pub async fn ping(socket: &Path, deadline: Instant) -> Result<(), AgentError> {
    let id = next_id();
    request(socket, "ping", &id, &ping_line(&id), deadline)
        .await
        .map(|_| ())
}

/// `refresh` with 64 fresh bytes from the host and the host's clock; returns the agent's
/// answer (`seeded 64 clock SEC.NSEC`).
pub async fn refresh(socket: &Path, deadline: Instant) -> Result<String, AgentError> {
    let id = next_id();
    let mut seed = host_seed()?;
    let line = refresh_line(&id, SystemTime::now(), &seed);
    seed.fill(0);
    request(socket, "refresh", &id, &line, deadline).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(
            refresh_line("a1", t, &[0, 0xab, 0xff]),
            "a1 refresh 1700000000 5 00abff\n"
        );
        assert_eq!(ping_line("x"), "x ping\n");
        assert_eq!(parse_reply("a1 ok pong\n", "a1"), Some(Ok("pong".into())));
        assert_eq!(
            parse_reply("a1 ok seeded 64 clock 1.000000005\r\n", "a1"),
            Some(Ok("seeded 64 clock 1.000000005".into()))
        );
        assert_eq!(
            parse_reply("a1 error RNDRESEEDCRNG: Operation not permitted", "a1"),
            Some(Err("RNDRESEEDCRNG: Operation not permitted".into()))
        );
        assert_eq!(parse_reply("a12 ok pong", "a1"), None, "another id");
        assert_eq!(parse_reply("b ok pong", "a1"), None);
        assert_eq!(
            parse_reply("a1 what", "a1"),
            Some(Err("unexpected reply: what".into()))
        );
    }

    #[test]
    fn seeds_are_fresh() {
        let a = host_seed().unwrap();
        let b = host_seed().unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; SEED_BYTES]);
    }

    /// A stand-in agent on a real unix socket (the real one is in the guest): a stale reply of
    /// an earlier request is skipped, errors and silence are reported.
    #[tokio::test]
    async fn requests_against_a_stand_in() {
        use tokio::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for reply in ["ok", "error", "silent"] {
                let (s, _) = listener.accept().await.unwrap();
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                let id = line.split(' ').next().unwrap().to_owned();
                seen.push(line.clone());
                match reply {
                    "ok" => {
                        w.write_all(b"old1 ok pong\n").await.unwrap();
                        w.write_all(format!("{id} ok seeded 64 clock 1.2\n").as_bytes())
                            .await
                            .unwrap();
                    }
                    "error" => w
                        .write_all(format!("{id} error the seed is not hex\n").as_bytes())
                        .await
                        .unwrap(),
                    _ => tokio::time::sleep(Duration::from_secs(2)).await,
                }
            }
            seen
        });
        let soon = || Instant::now() + Duration::from_secs(5);
        assert_eq!(refresh(&sock, soon()).await.unwrap(), "seeded 64 clock 1.2");
        let e = refresh(&sock, soon()).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "the guest agent refused `refresh`: the seed is not hex"
        );
        let e = ping(&sock, Instant::now() + Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
        let seen = server.await.unwrap();
        let words: Vec<&str> = seen[0].split_whitespace().collect();
        assert_eq!(words[1], "refresh");
        assert_eq!(words[4].len(), 2 * SEED_BYTES, "{}", seen[0]);
        assert_ne!(seen[0].split(' ').nth(4), seen[1].split(' ').nth(4));
        assert!(seen[2].ends_with(" ping\n"));
        // Nothing there at all.
        let e = ping(
            &dir.path().join("none.sock"),
            Instant::now() + Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("none.sock"), "{e}");
    }
}
