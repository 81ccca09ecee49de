//! A minimal QMP (QEMU Machine Protocol) client over the VM's unix socket: the greeting and
//! capabilities handshake, commands with their replies (events are skipped), HMP commands via
//! `human-monitor-command`, and the parsers for what we read back (`info usernet`).
//!
//! The message and `info usernet` parsers are pure functions over text; the client is a thin
//! adapter that puts them on a socket. Every socket operation has a time limit.
//!
//! Must never: block without a timeout, or keep reading an unbounded line.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest QMP line we accept (replies are small; `info usernet` is a few KiB at most).
const MAX_LINE: usize = 1 << 20;

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("QMP socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("QMP socket {}: no answer to {what} after {}", path.display(), humantime::format_duration(*after))]
    Timeout {
        path: PathBuf,
        what: String,
        after: Duration,
    },
    #[error("QMP socket {}: QEMU closed the connection during {what}", path.display())]
    Closed { path: PathBuf, what: String },
    #[error("QMP: unexpected message: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `{"QMP": {...}}`, the first line after connecting.
    Greeting(Value),
    /// `{"return": ...}`
    Return(Value),
    /// `{"error": {"class": ..., "desc": ...}}`
    Error { class: String, desc: String },
    /// `{"event": "NAME", ...}`
    Event(String),
}

/// Parses one QMP line.
pub fn parse_message(line: &str) -> Result<Message, QmpError> {
    let v: Value = serde_json::from_str(line.trim())
        .map_err(|e| QmpError::Protocol(format!("not JSON ({e}): {}", shorten(line))))?;
    let Value::Object(map) = &v else {
        return Err(QmpError::Protocol(format!(
            "not a JSON object: {}",
            shorten(line)
        )));
    };
    if let Some(g) = map.get("QMP") {
        return Ok(Message::Greeting(g.clone()));
    }
    if let Some(r) = map.get("return") {
        return Ok(Message::Return(r.clone()));
    }
    if let Some(e) = map.get("error") {
        let field = |k: &str| {
            e.get(k)
                .and_then(Value::as_str)
                .unwrap_or("(none)")
                .to_owned()
        };
        return Ok(Message::Error {
            class: field("class"),
            desc: field("desc"),
        });
    }
    if let Some(Value::String(name)) = map.get("event") {
        return Ok(Message::Event(name.clone()));
    }
    Err(QmpError::Protocol(format!(
        "unknown message: {}",
        shorten(line)
    )))
}

fn shorten(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > 200 {
        format!("{}…", s.chars().take(200).collect::<String>())
    } else {
        s.to_owned()
    }
}

/// One `HOST_FORWARD` row of `info usernet`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostForward {
    /// The netdev id of the hub the row belongs to (`n0` in `Hub -1 (n0):`).
    pub netdev: Option<String>,
    pub tcp: bool,
    /// Host-side address as QEMU prints it (`*` for any).
    pub host_addr: String,
    pub host_port: u16,
    pub guest_addr: String,
    pub guest_port: u16,
}

/// Parses the `HOST_FORWARD` rows out of HMP `info usernet` output:
///
/// ```text
/// Hub -1 (n0):
///   Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
///   TCP[HOST_FORWARD]   9       127.0.0.1 33463       10.0.2.15    22     0     0
/// ```
pub fn parse_usernet(text: &str) -> Vec<HostForward> {
    let mut netdev = None;
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Hub ") || t.starts_with("VLAN ") {
            netdev = t
                .split_once('(')
                .and_then(|(_, r)| r.split_once(')'))
                .map(|(id, _)| id.to_owned());
            continue;
        }
        let cols: Vec<&str> = t.split_whitespace().collect();
        let Some(proto) = cols.first() else { continue };
        if !proto.ends_with("[HOST_FORWARD]") {
            continue;
        }
        // proto fd src-addr src-port dst-addr dst-port ...
        if cols.len() < 6 {
            continue;
        }
        let (Ok(hp), Ok(gp)) = (cols[3].parse::<u16>(), cols[5].parse::<u16>()) else {
            continue;
        };
        out.push(HostForward {
            netdev: netdev.clone(),
            tcp: proto.starts_with("TCP"),
            host_addr: cols[2].to_owned(),
            host_port: hp,
            guest_addr: cols[4].to_owned(),
            guest_port: gp,
        });
    }
    out
}

/// A connected, negotiated QMP session.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects once and does the capabilities handshake, all within `limit`.
    pub async fn connect(path: &Path, limit: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut q = Qmp {
            path: path.to_owned(),
            reader: BufReader::new(r),
            writer: w,
        };
        let what = "the QMP greeting";
        match q.read_message(what, limit).await? {
            Message::Greeting(_) => {}
            other => {
                return Err(QmpError::Protocol(format!(
                    "expected the greeting, got {other:?}"
                )));
            }
        }
        q.execute("qmp_capabilities", None, limit).await?;
        Ok(q)
    }

    /// Connects, retrying while the socket does not exist yet or refuses, until `limit`.
    pub async fn connect_retry(path: &Path, limit: Duration) -> Result<Qmp, QmpError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match Qmp::connect(path, left.max(Duration::from_millis(100))).await {
                Ok(q) => return Ok(q),
                Err(QmpError::Connect { source, .. })
                    if tokio::time::Instant::now() < deadline
                        && matches!(
                            source.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn read_message(&mut self, what: &str, limit: Duration) -> Result<Message, QmpError> {
        let mut line = String::new();
        let read = async {
            loop {
                line.clear();
                let n = (&mut self.reader)
                    .take(MAX_LINE as u64)
                    .read_line(&mut line)
                    .await
                    .map_err(|source| QmpError::Io {
                        path: self.path.clone(),
                        source,
                    })?;
                if n == 0 {
                    return Err(QmpError::Closed {
                        path: self.path.clone(),
                        what: what.to_owned(),
                    });
                }
                if !line.ends_with('\n') {
                    return Err(QmpError::Protocol(format!(
                        "line longer than {MAX_LINE} bytes"
                    )));
                }
                if line.trim().is_empty() {
                    continue;
                }
                return parse_message(&line);
            }
        };
        tokio::time::timeout(limit, read)
            .await
            .map_err(|_| QmpError::Timeout {
                path: self.path.clone(),
                what: what.to_owned(),
                after: limit,
            })?
    }

    /// Runs a QMP command and returns its `return` value; events on the way are skipped.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        limit: Duration,
    ) -> Result<Value, QmpError> {
        let mut msg = serde_json::json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        let path = self.path.clone();
        tokio::time::timeout(limit, self.writer.write_all(&bytes))
            .await
            .map_err(|_| QmpError::Timeout {
                path: path.clone(),
                what: format!("sending {command}"),
                after: limit,
            })?
            .map_err(|source| QmpError::Io { path, source })?;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_message(command, left).await? {
                Message::Return(v) => return Ok(v),
                Message::Error { class, desc } => {
                    return Err(QmpError::Command {
                        command: command.to_owned(),
                        class,
                        desc,
                    });
                }
                Message::Event(name) => {
                    tracing::trace!(event = %name, "QMP event");
                }
                Message::Greeting(_) => {
                    return Err(QmpError::Protocol("a second greeting".into()));
                }
            }
        }
    }

    /// Runs an HMP command (`info usernet`) and returns its text output.
    pub async fn hmp(&mut self, command_line: &str, limit: Duration) -> Result<String, QmpError> {
        let v = self
            .execute(
                "human-monitor-command",
                Some(serde_json::json!({ "command-line": command_line })),
                limit,
            )
            .await?;
        match v {
            Value::String(s) => Ok(s),
            other => Err(QmpError::Protocol(format!(
                "human-monitor-command returned {other}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let g = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
        assert!(matches!(parse_message(g).unwrap(), Message::Greeting(_)));
        assert_eq!(
            parse_message("{\"return\": {}}\r\n").unwrap(),
            Message::Return(serde_json::json!({}))
        );
        assert_eq!(
            parse_message(r#"{"return": {"enabled": false, "present": true}}"#).unwrap(),
            Message::Return(serde_json::json!({"enabled": false, "present": true}))
        );
        assert_eq!(
            parse_message(r#"{"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}}"#).unwrap(),
            Message::Error { class: "CommandNotFound".into(), desc: "The command x has not been found".into() }
        );
        assert_eq!(
            parse_message(
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "POWERDOWN"}"#
            )
            .unwrap(),
            Message::Event("POWERDOWN".into())
        );
        assert!(matches!(
            parse_message("not json"),
            Err(QmpError::Protocol(_))
        ));
        assert!(matches!(parse_message("[1]"), Err(QmpError::Protocol(_))));
        assert!(matches!(
            parse_message(r#"{"what": 1}"#),
            Err(QmpError::Protocol(_))
        ));
    }

    #[test]
    fn usernet() {
        // As printed by QEMU 10.0 (CRLF line ends).
        let text = "Hub -1 (nlb0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n  TCP[HOST_FORWARD]   9       127.0.0.1 33463       10.0.2.15    22     0     0\r\n  TCP[HOST_FORWARD]   8               * 42653       10.0.2.15  2222     0     0\r\n  TCP[ESTABLISHED]   12       10.0.2.15 41000       10.0.2.2     80     0     0\r\n  UDP[HOST_FORWARD]   7       127.0.0.1  5353       10.0.2.15    53     0     0\r\nHub 0 (user.0):\r\n  TCP[HOST_FORWARD]  11               * 31022       10.0.2.15    22     0     0\r\n";
        let f = parse_usernet(text);
        assert_eq!(f.len(), 4, "{f:?}");
        assert_eq!(
            f[0],
            HostForward {
                netdev: Some("nlb0".into()),
                tcp: true,
                host_addr: "127.0.0.1".into(),
                host_port: 33463,
                guest_addr: "10.0.2.15".into(),
                guest_port: 22
            }
        );
        assert_eq!((f[1].host_addr.as_str(), f[1].guest_port), ("*", 2222));
        assert!(!f[2].tcp);
        assert_eq!(f[3].netdev.as_deref(), Some("user.0"));
        assert_eq!(f[3].host_port, 31022);
        assert!(parse_usernet("").is_empty());
        assert!(parse_usernet("  TCP[HOST_FORWARD] 9 127.0.0.1 x 10.0.2.15 22").is_empty());
    }

    /// A fake QMP server on a real unix socket: greeting, capabilities, an event in between,
    /// an error reply.
    #[tokio::test]
    async fn client_against_a_fake_server() {
        use tokio::io::AsyncBufReadExt as _;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .await
                .unwrap();
            let mut line = String::new();
            let mut seen = Vec::new();
            loop {
                line.clear();
                if r.read_line(&mut line).await.unwrap() == 0 {
                    break;
                }
                let v: Value = serde_json::from_str(&line).unwrap();
                let cmd = v["execute"].as_str().unwrap().to_owned();
                let reply = match cmd.as_str() {
                    "qmp_capabilities" => "{\"return\": {}}\r\n".to_owned(),
                    "human-monitor-command" => {
                        assert_eq!(v["arguments"]["command-line"], "info usernet");
                        "{\"event\": \"RTC_CHANGE\", \"data\": {}}\r\n{\"return\": \"Hub -1 (nlb0):\\r\\n  TCP[HOST_FORWARD]   9       127.0.0.1 40000       10.0.2.15    22     0     0\\r\\n\"}\r\n".to_owned()
                    }
                    _ => "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\r\n"
                        .to_owned(),
                };
                seen.push(cmd);
                w.write_all(reply.as_bytes()).await.unwrap();
            }
            seen
        });
        let mut q = Qmp::connect_retry(&sock, Duration::from_secs(5))
            .await
            .unwrap();
        let text = q.hmp("info usernet", Duration::from_secs(5)).await.unwrap();
        assert_eq!(parse_usernet(&text)[0].host_port, 40000);
        match q.execute("quit", None, Duration::from_secs(5)).await {
            Err(QmpError::Command { class, desc, .. }) => {
                assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "nope"))
            }
            other => panic!("{other:?}"),
        }
        drop(q);
        assert_eq!(
            server.await.unwrap(),
            ["qmp_capabilities", "human-monitor-command", "quit"]
        );
        // Nothing listening: a Connect error naming the path, after the retry window.
        let missing = dir.path().join("none.sock");
        let e = Qmp::connect_retry(&missing, Duration::from_millis(200))
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("none.sock"), "{e}");
    }
}
