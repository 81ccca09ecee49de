//! The SSH client (russh): connect to a builder with a PINNED host key, authenticate with a key
//! file, keep the connection honest with keepalives, and run remote commands as [`Exec`]s whose
//! stdin, stdout, stderr and exit status are separate streams.
//!
//! Owns: the TCP connection and its timeouts, host-key pinning (the machines file's base64
//! column, `known_hosts` files, literal `ssh-ed25519 AAAA…` strings), private-key loading,
//! algorithm preferences, flow-control tuning, and POSIX shell quoting for remote command lines.
//!
//! Must never: accept a host key that is not pinned (there is no accept-all path: an empty pin
//! set is refused before any byte is sent), prompt for anything, or log key material (public
//! fingerprints are fine; private keys, passphrases and key files' contents are not).
//!
//! # Liveness
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
//!
//! # Host keys
//!
//! Pinned keys come from [`HostKeys`]:
//! - [`HostKeys::parse_openssh`]: `type base64 [comment]` lines (the TOML config's `host-key`,
//!   and Nix's machines column 8 once `config` has decoded its base64).
//! - [`HostKeys::from_known_hosts`] / [`HostKeys::from_known_hosts_file`]: an OpenSSH
//!   `known_hosts` file. Supported: comments and blank lines; comma-separated host patterns;
//!   `host` (port 22) and `[host]:port` forms; hashed `|1|salt|hmac` entries; `*` and `?`
//!   wildcards; negated `!pattern`s; `@revoked` lines (a revoked key is never pinned, even if
//!   another line lists it). `@cert-authority` lines are ignored: host certificates are not
//!   accepted. The name looked up is `host` when the port is 22 and `[host]:port` otherwise, as
//!   OpenSSH does; unlike OpenSSH the host's IP address is not looked up separately
//!   (`CheckHostIP`).
//!
//! The server is asked for the pinned key types first, so a server with several host keys
//! presents one we know. A mismatch error names the builder and both SHA256 fingerprints.
//!
//! # Exec streams
//!
//! SSH has one flow-control window per channel, shared by stdout and stderr: a consumer must
//! keep reading *both* [`Exec::stdout`] and [`Exec::stderr`] (or drop the one it does not want),
//! otherwise the one it does read stalls once the other's buffer is full. A reader that stops
//! reading stalls the whole connection (russh stops reading the socket), which is the
//! backpressure that bounds memory: about 4 MiB per exec in this process (russh's per-channel
//! queue plus ours), plus the kernel's socket buffers. Received-window acknowledgements are sent
//! by russh on receipt, so the window (`WINDOW_SIZE`, 8 MiB) only limits what is in flight.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use russh::client::{self, DisconnectReason, Handle};
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Preferred, cipher, mac};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFutureOwned};
use tracing::debug;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// An SSH failure, with the builder it concerns.
#[derive(Debug, thiserror::Error)]
#[error("builder '{builder}' ({user}@{host}:{port}): {kind}")]
pub struct SshError {
    pub builder: String,
    pub user: String,
    pub host: String,
    pub port: u16,
    pub kind: SshErrorKind,
}

/// What went wrong. Displayed after the builder context of [`SshError`].
#[derive(Debug, thiserror::Error)]
pub enum SshErrorKind {
    #[error("cannot resolve host name: {source}")]
    Resolve {
        #[source]
        source: io::Error,
    },
    #[error("connection refused (is the SSH server running and listening on this port?)")]
    ConnectionRefused,
    #[error("cannot connect: {source}")]
    Connect {
        #[source]
        source: io::Error,
    },
    #[error("timed out after {} during {stage}", humantime::format_duration(*after))]
    Timeout { after: Duration, stage: Stage },
    #[error(
        "no pinned host key: refusing to connect without one (set `host-key` in the config, \
             the machines file's 8th column, or a known_hosts entry)"
    )]
    HostKeyMissing,
    #[error("HOST KEY MISMATCH: expected {}, but the server presented {presented} ({presented_type}); \
             refusing to connect (someone may be intercepting the connection, or the host key \
             changed: update the pinned key if the change is legitimate)",
            expected.join(" or "))]
    HostKeyMismatch {
        /// Fingerprints (`SHA256:…`) of the pinned keys.
        expected: Vec<String>,
        /// Fingerprint (`SHA256:…`) of the key the server presented.
        presented: String,
        presented_type: String,
    },
    #[error("the server presented a host certificate; only pinned plain host keys are accepted")]
    HostCertificate,
    #[error("cannot read SSH key file {}: {source}", path.display())]
    KeyFileUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unsupported or invalid SSH key file {}: {reason}", path.display())]
    KeyFileUnsupported { path: PathBuf, reason: String },
    #[error("SSH key file {} is encrypted; use a key without a passphrase (no prompts here)",
            path.display())]
    KeyFileEncrypted { path: PathBuf },
    #[error("no SSH key configured")]
    NoIdentity,
    #[error("authentication failed for user '{user}' with key(s) {}{}", tried.join(", "),
            if remaining.is_empty() { String::new() } else { format!(" (server accepts: {})", remaining.join(", ")) })]
    AuthFailed {
        user: String,
        /// The keys offered: path and fingerprint.
        tried: Vec<String>,
        /// The methods the server said could continue.
        remaining: Vec<String>,
    },
    #[error("SSH negotiation failed: {0}")]
    Negotiation(String),
    #[error("SSH channel failure: {0}")]
    Channel(String),
    #[error("remote command not found (exit 127): {command}")]
    CommandNotFound { command: String },
    #[error("remote command {status}: {command}")]
    CommandFailed { command: String, status: ExitStatus },
    #[error("disconnected: {0}")]
    Disconnected(String),
    #[error("invalid remote command line: {0}")]
    Quote(#[from] ShellQuoteError),
}

/// Where a connection attempt was when it timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stage {
    #[default]
    TcpConnect,
    Banner,
    KeyExchange,
    Authentication,
    Ready,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::TcpConnect => "TCP connect",
            Stage::Banner => "wait for the SSH server's banner",
            Stage::KeyExchange => "SSH key exchange",
            Stage::Authentication => "SSH authentication",
            Stage::Ready => "session setup",
        })
    }
}

/// A host key specification that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("line {line}: not a public key line (`type base64 [comment]`): {reason}")]
    BadLine { line: usize, reason: String },
    #[error(
        "line {line}: unsupported host key type {algorithm} (supported: ssh-ed25519, \
             ecdsa-sha2-nistp256/384/521, ssh-rsa)"
    )]
    Unsupported { line: usize, algorithm: String },
    #[error("no host key found in the given text")]
    Empty,
    #[error("cannot read known_hosts file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}:{line}: {reason}", path.display())]
    KnownHosts {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Host keys
// ---------------------------------------------------------------------------------------------

/// The SHA256 fingerprint of a public key, as OpenSSH prints it (`SHA256:base64-without-padding`).
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

fn supported_host_key(alg: &Algorithm) -> bool {
    matches!(
        alg,
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } | Algorithm::Rsa { .. }
    )
}

/// The set of host keys a builder is pinned to. Comments are ignored when comparing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostKeys {
    keys: Vec<PublicKey>,
}

impl HostKeys {
    pub fn new(keys: Vec<PublicKey>) -> Self {
        let mut this = HostKeys { keys: Vec::new() };
        for k in keys {
            this.push(k);
        }
        this
    }

    fn push(&mut self, key: PublicKey) {
        if !self.keys.iter().any(|k| k.key_data() == key.key_data()) {
            self.keys.push(key);
        }
    }

    /// Adds every key of `other` (duplicates are dropped).
    pub fn extend(&mut self, other: HostKeys) {
        for k in other.keys {
            self.push(k);
        }
    }

    /// Parses one or more `type base64 [comment]` lines (blank lines and `#` comments are
    /// skipped). At least one key is required.
    pub fn parse_openssh(text: &str) -> Result<Self, HostKeyError> {
        let mut keys = HostKeys::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            keys.push(parse_key_line(line, i + 1)?);
        }
        if keys.is_empty() {
            return Err(HostKeyError::Empty);
        }
        Ok(keys)
    }

    /// The keys that `known_hosts` text lists for `host` and `port` (see the module docs for
    /// what is supported). The result may be empty; [`connect`] refuses an empty set.
    pub fn from_known_hosts(text: &str, host: &str, port: u16) -> Result<Self, HostKeyError> {
        parse_known_hosts(text, host, port).map_err(|(line, reason)| HostKeyError::KnownHosts {
            path: PathBuf::from("<known_hosts>"),
            line,
            reason,
        })
    }

    /// Like [`HostKeys::from_known_hosts`], reading a file.
    pub fn from_known_hosts_file(path: &Path, host: &str, port: u16) -> Result<Self, HostKeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| HostKeyError::Io {
            path: path.to_owned(),
            source,
        })?;
        parse_known_hosts(&text, host, port).map_err(|(line, reason)| HostKeyError::KnownHosts {
            path: path.to_owned(),
            line,
            reason,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// `SHA256:…` fingerprints, in order.
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys.iter().map(fingerprint).collect()
    }

    /// Whether `key` is one of the pinned keys.
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.keys.iter().any(|k| k.key_data() == key.key_data())
    }

    /// Host key algorithms to ask the server for: the pinned key types first (so a server with
    /// several host keys presents a pinned one), then the other supported types (so a server
    /// with none of them still presents *a* key, which makes the mismatch error informative).
    fn preferred_algorithms(&self) -> Vec<Algorithm> {
        let mut out: Vec<Algorithm> = Vec::new();
        let add = |a: Algorithm, out: &mut Vec<Algorithm>| {
            if !out.contains(&a) {
                out.push(a);
            }
        };
        for k in &self.keys {
            match k.algorithm() {
                Algorithm::Rsa { .. } => {
                    add(
                        Algorithm::Rsa {
                            hash: Some(HashAlg::Sha512),
                        },
                        &mut out,
                    );
                    add(
                        Algorithm::Rsa {
                            hash: Some(HashAlg::Sha256),
                        },
                        &mut out,
                    );
                }
                a => add(a, &mut out),
            }
        }
        for a in [
            Algorithm::Ed25519,
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP384,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP521,
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
        ] {
            add(a, &mut out);
        }
        out
    }
}

fn parse_key_line(line: &str, line_no: usize) -> Result<PublicKey, HostKeyError> {
    let mut words = line.split_whitespace();
    let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
        return Err(HostKeyError::BadLine {
            line: line_no,
            reason: "expected at least two fields".into(),
        });
    };
    let key =
        PublicKey::from_openssh(&format!("{kind} {blob}")).map_err(|e| HostKeyError::BadLine {
            line: line_no,
            reason: e.to_string(),
        })?;
    if !supported_host_key(&key.algorithm()) {
        return Err(HostKeyError::Unsupported {
            line: line_no,
            algorithm: key.algorithm().as_str().to_owned(),
        });
    }
    Ok(key)
}

/// The name a `known_hosts` file records for `host:port`.
fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// OpenSSH-style wildcard match: `*` any run of characters, `?` exactly one.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c.eq_ignore_ascii_case(&text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

fn hashed_match(entry: &str, name: &str) -> Result<bool, String> {
    use hmac::{KeyInit, Mac};
    // |1|salt|hash
    let mut parts = entry.split('|');
    let (Some(""), Some("1"), Some(salt), Some(hash), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(format!("malformed hashed host entry {entry:?}"));
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let salt = b64
        .decode(salt)
        .map_err(|e| format!("hashed host entry: bad salt: {e}"))?;
    let hash = b64
        .decode(hash)
        .map_err(|e| format!("hashed host entry: bad hash: {e}"))?;
    let mut mac = <hmac::Hmac<sha1::Sha1> as KeyInit>::new_from_slice(&salt)
        .map_err(|e| format!("hashed host entry: {e}"))?;
    mac.update(name.as_bytes());
    Ok(mac.verify_slice(&hash).is_ok())
}

/// Whether a comma-separated host pattern list matches `name`.
fn host_patterns_match(patterns: &str, name: &str) -> Result<bool, String> {
    let mut positive = false;
    for pat in patterns.split(',') {
        if pat.is_empty() {
            continue;
        }
        if pat.starts_with('|') {
            if hashed_match(pat, name)? {
                positive = true;
            }
            continue;
        }
        let (negated, pat) = match pat.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, pat),
        };
        if wildcard_match(pat.as_bytes(), name.as_bytes()) {
            if negated {
                return Ok(false);
            }
            positive = true;
        }
    }
    Ok(positive)
}

fn parse_known_hosts(text: &str, host: &str, port: u16) -> Result<HostKeys, (usize, String)> {
    let name = known_hosts_name(host, port);
    let mut found = HostKeys::default();
    let mut revoked = HostKeys::default();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace().peekable();
        let marker = match fields.peek() {
            Some(m) if m.starts_with('@') => fields.next(),
            _ => None,
        };
        let (Some(patterns), Some(kind), Some(blob)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err((line_no, "expected `hosts keytype base64 [comment]`".into()));
        };
        match marker {
            None => {
                if host_patterns_match(patterns, &name).map_err(|e| (line_no, e))? {
                    let key = parse_key_line(&format!("{kind} {blob}"), line_no)
                        .map_err(|e| (line_no, e.to_string()))?;
                    found.push(key);
                }
            }
            Some("@revoked") => {
                // A revoked key is revoked for every host, whatever the pattern says.
                if let Ok(key) = PublicKey::from_openssh(&format!("{kind} {blob}")) {
                    revoked.push(key);
                }
            }
            Some("@cert-authority") => {}
            Some(other) => return Err((line_no, format!("unknown marker {other}"))),
        }
    }
    found.keys.retain(|k| !revoked.contains(k));
    Ok(found)
}

// ---------------------------------------------------------------------------------------------
// Target, timeouts, tuning
// ---------------------------------------------------------------------------------------------

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

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct SshTarget {
    /// The builder's name, for messages.
    pub builder: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Private key files (OpenSSH format; unencrypted), tried in order.
    pub identities: Vec<PathBuf>,
    pub host_keys: HostKeys,
    pub timeouts: Timeouts,
}

impl SshTarget {
    /// The calling user's default identities that exist (`~/.ssh/id_ed25519`, `id_ecdsa`,
    /// `id_rsa`), as OpenSSH would try them when no key is configured.
    pub fn default_identities() -> Vec<PathBuf> {
        let Some(home) = std::env::var_os("HOME") else {
            return Vec::new();
        };
        ["id_ed25519", "id_ecdsa", "id_rsa"]
            .iter()
            .map(|n| Path::new(&home).join(".ssh").join(n))
            .filter(|p| p.is_file())
            .collect()
    }
}

/// Channel window we advertise: how much the server may send before we acknowledge. Large
/// enough to keep a fast link busy; bounded, so memory is too.
const WINDOW_SIZE: u32 = 8 << 20;
/// Largest data packet we accept (payload); 32 KiB is what every server sends at most anyway.
const MAX_PACKET_SIZE: u32 = 32 << 10;
/// Packets russh buffers per channel before it stops reading the socket.
const CHANNEL_BUFFER: usize = 64;
/// Chunks our per-stream queues hold (each is one SSH packet, ≤ 32 KiB).
const STREAM_QUEUE: usize = 32;

fn hardware_aes() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Cipher order: AES-GCM first where the CPU does AES in hardware (by far the fastest with
/// OpenSSH); chacha20-poly1305 otherwise, and for Dropbear, which has no GCM; AES-CTR with an
/// HMAC-SHA2 as the last resort (Dropbear without chacha).
const CIPHERS_HW_AES: &[cipher::Name] = &[
    cipher::AES_128_GCM,
    cipher::AES_256_GCM,
    cipher::CHACHA20_POLY1305,
    cipher::AES_128_CTR,
    cipher::AES_256_CTR,
];
const CIPHERS_SOFT: &[cipher::Name] = &[
    cipher::CHACHA20_POLY1305,
    cipher::AES_128_GCM,
    cipher::AES_256_GCM,
    cipher::AES_128_CTR,
    cipher::AES_256_CTR,
];
/// MACs matter only for the CTR ciphers. Dropbear offers hmac-sha2-256 (and hmac-sha1).
const MACS: &[mac::Name] = &[
    mac::HMAC_SHA256_ETM,
    mac::HMAC_SHA512_ETM,
    mac::HMAC_SHA256,
    mac::HMAC_SHA512,
];

fn client_config(target: &SshTarget) -> client::Config {
    let preferred = Preferred {
        key: target.host_keys.preferred_algorithms().into(),
        cipher: if hardware_aes() {
            CIPHERS_HW_AES.into()
        } else {
            CIPHERS_SOFT.into()
        },
        mac: MACS.into(),
        compression: (&[russh::compression::NONE][..]).into(),
        ..Preferred::DEFAULT
    };
    client::Config {
        preferred,
        window_size: WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET_SIZE,
        channel_buffer_size: CHANNEL_BUFFER,
        inactivity_timeout: None,
        keepalive_interval: Some(target.timeouts.keepalive_interval),
        keepalive_max: target.timeouts.keepalive_max,
        nodelay: true,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state between the russh handler, the stream wrapper and our handles
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Presented {
    Key(PublicKey),
    Certificate,
}

/// The algorithms a session negotiated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Negotiated {
    pub kex: String,
    pub host_key_algorithm: String,
    pub cipher: String,
    /// `<implicit>` for AEAD ciphers (GCM, chacha20-poly1305).
    pub mac: String,
    /// `SHA256:…` of the host key the server proved it holds.
    pub host_key_fingerprint: String,
}

#[derive(Default)]
struct SharedState {
    stage: Stage,
    presented: Option<Presented>,
    negotiated: Option<Negotiated>,
    disconnect: Option<String>,
}

#[derive(Default)]
struct Shared(Mutex<SharedState>);

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut SharedState) -> T) -> T {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
    fn set_stage(&self, stage: Stage) {
        self.with(|s| s.stage = stage);
    }
    fn disconnect_reason(&self) -> String {
        self.with(|s| s.disconnect.clone())
            .unwrap_or_else(|| "the SSH connection was closed".to_owned())
    }
}

/// The builder a session belongs to, for error messages.
#[derive(Debug)]
struct Peer {
    builder: String,
    user: String,
    host: String,
    port: u16,
}

impl Peer {
    fn err(&self, kind: SshErrorKind) -> SshError {
        SshError {
            builder: self.builder.clone(),
            user: self.user.clone(),
            host: self.host.clone(),
            port: self.port,
            kind,
        }
    }
}

struct ClientHandler {
    pinned: HostKeys,
    shared: Arc<Shared>,
    timeouts: Timeouts,
}

fn describe_russh_error(e: &russh::Error, timeouts: &Timeouts) -> String {
    match e {
        russh::Error::KeepaliveTimeout => format!(
            "the builder stopped answering keepalives ({} without a reply; the peer is dead, \
             frozen or unreachable)",
            humantime::format_duration(timeouts.dead_peer_after())
        ),
        russh::Error::InactivityTimeout => "inactivity timeout".to_owned(),
        russh::Error::HUP | russh::Error::Disconnect => {
            "the server closed the connection".to_owned()
        }
        russh::Error::IO(io) if io.kind() == io::ErrorKind::TimedOut => io.to_string(),
        russh::Error::IO(io) => format!("connection error: {io}"),
        other => other.to_string(),
    }
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => {
                let ok = !self.pinned.is_empty() && self.pinned.contains(key);
                debug!(
                    fingerprint = %fingerprint(key),
                    accepted = ok,
                    "server host key"
                );
                self.shared
                    .with(|s| s.presented = Some(Presented::Key(key.clone())));
                Ok(ok)
            }
            russh::keys::PublicKeyOrCertificate::Certificate(_) => {
                self.shared
                    .with(|s| s.presented = Some(Presented::Certificate));
                Ok(false)
            }
        }
    }

    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        names: &russh::Names,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.shared.with(|s| {
            if s.negotiated.is_none() {
                let host_key_fingerprint = match &s.presented {
                    Some(Presented::Key(k)) => fingerprint(k),
                    _ => String::new(),
                };
                s.negotiated = Some(Negotiated {
                    kex: names.kex.as_ref().to_owned(),
                    host_key_algorithm: names.key.as_str().to_owned(),
                    cipher: names.cipher.as_ref().to_owned(),
                    // AEAD ciphers authenticate themselves; the negotiated MAC is unused.
                    mac: if matches!(
                        names.cipher,
                        cipher::AES_128_GCM | cipher::AES_256_GCM | cipher::CHACHA20_POLY1305
                    ) {
                        "<implicit>".to_owned()
                    } else {
                        names.client_mac.as_ref().to_owned()
                    },
                    host_key_fingerprint,
                });
            }
            if s.stage == Stage::KeyExchange {
                s.stage = Stage::Authentication;
            }
        });
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let text = match &reason {
            DisconnectReason::ReceivedDisconnect(info) => format!(
                "the server disconnected ({:?}){}",
                info.reason_code,
                if info.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", info.message)
                }
            ),
            DisconnectReason::Error(e) => describe_russh_error(e, &self.timeouts),
        };
        debug!(reason = %text, "SSH connection ended");
        self.shared.with(|s| {
            if s.disconnect.is_none() {
                s.disconnect = Some(text);
            }
        });
        match reason {
            DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            DisconnectReason::Error(e) => Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The TCP stream, with write-stall detection
// ---------------------------------------------------------------------------------------------

/// The TCP stream russh runs on. It fails a write that makes no progress for `stall_limit`
/// (russh cannot run its keepalive timer while it waits for a socket write), and notes the
/// first byte from the server (for timeout messages).
struct WatchedStream {
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
    fn new(
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
        let this = &mut *self;
        if this.kill.is_cancelled() {
            return Poll::Ready(Err(Self::abandoned()));
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => this.write_done(r),
            Poll::Pending => this.poll_write_pending(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.kill.is_cancelled() {
            return Poll::Ready(Err(Self::abandoned()));
        }
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => this.write_done(r),
            Poll::Pending => this.poll_write_pending(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.kill.is_cancelled() {
            return Poll::Ready(Err(Self::abandoned()));
        }
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(r) => this.write_done(r),
            Poll::Pending => this.poll_write_pending(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// Loads an unencrypted private key (OpenSSH format; PEM/PKCS#8 also work). Never logs or
/// returns the key's contents in an error.
pub fn load_identity(path: &Path) -> Result<PrivateKey, SshErrorKind> {
    let text = std::fs::read_to_string(path).map_err(|source| SshErrorKind::KeyFileUnreadable {
        path: path.to_owned(),
        source,
    })?;
    let unsupported = |reason: String| SshErrorKind::KeyFileUnsupported {
        path: path.to_owned(),
        reason,
    };
    let key = if text.contains("-----BEGIN OPENSSH PRIVATE KEY-----") {
        let key = PrivateKey::from_openssh(text.trim())
            .map_err(|e| unsupported(format!("cannot parse OpenSSH private key: {e}")))?;
        if key.is_encrypted() {
            return Err(SshErrorKind::KeyFileEncrypted {
                path: path.to_owned(),
            });
        }
        key
    } else if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
    {
        return Err(SshErrorKind::KeyFileEncrypted {
            path: path.to_owned(),
        });
    } else if text.contains("PRIVATE KEY-----") {
        russh::keys::decode_secret_key(&text, None).map_err(|e| match e {
            russh::keys::Error::KeyIsEncrypted => SshErrorKind::KeyFileEncrypted {
                path: path.to_owned(),
            },
            other => unsupported(format!("cannot parse private key: {other}")),
        })?
    } else {
        return Err(unsupported(
            "not a private key file (expected `-----BEGIN OPENSSH PRIVATE KEY-----`)".into(),
        ));
    };
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } | Algorithm::Rsa { .. } => Ok(key),
        other => Err(unsupported(format!(
            "key type {} is not supported (use ed25519, ecdsa or rsa)",
            other.as_str()
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Connect
// ---------------------------------------------------------------------------------------------

/// An authenticated SSH connection to a builder.
pub struct Session {
    handle: Handle<ClientHandler>,
    peer: Arc<Peer>,
    shared: Arc<Shared>,
    negotiated: Negotiated,
    timeouts: Timeouts,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("builder", &self.peer.builder)
            .field("negotiated", &self.negotiated)
            .finish()
    }
}

/// Connects, verifies the pinned host key and authenticates. Refuses to start when no host key
/// is pinned.
pub async fn connect(target: &SshTarget) -> Result<Session, SshError> {
    let peer = Arc::new(Peer {
        builder: target.builder.clone(),
        user: target.user.clone(),
        host: target.host.clone(),
        port: target.port,
    });
    if target.host_keys.is_empty() {
        return Err(peer.err(SshErrorKind::HostKeyMissing));
    }
    if target.identities.is_empty() {
        return Err(peer.err(SshErrorKind::NoIdentity));
    }
    let mut keys = Vec::with_capacity(target.identities.len());
    for path in &target.identities {
        let key = load_identity(path).map_err(|k| peer.err(k))?;
        keys.push((path.clone(), Arc::new(key)));
    }

    let shared = Arc::new(Shared::default());
    let kill = CancellationToken::new();
    let attempt = connect_inner(target, &peer, &shared, keys, kill.clone());
    match tokio::time::timeout(target.timeouts.connect, attempt).await {
        Ok(r) => r,
        Err(_) => {
            // russh's task may be waiting on the half-open handshake: make it end.
            kill.cancel();
            Err(peer.err(SshErrorKind::Timeout {
                after: target.timeouts.connect,
                stage: shared.with(|s| s.stage),
            }))
        }
    }
}

async fn connect_inner(
    target: &SshTarget,
    peer: &Arc<Peer>,
    shared: &Arc<Shared>,
    keys: Vec<(PathBuf, Arc<PrivateKey>)>,
    kill: CancellationToken,
) -> Result<Session, SshError> {
    let addrs: Vec<_> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|source| peer.err(SshErrorKind::Resolve { source }))?
        .collect();
    let mut last_err = None;
    let mut tcp = None;
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => {
                debug!(%addr, error = %e, "TCP connect failed");
                last_err = Some(e);
            }
        }
    }
    let tcp = match (tcp, last_err) {
        (Some(s), _) => s,
        (None, Some(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(peer.err(SshErrorKind::ConnectionRefused));
        }
        (None, Some(source)) => return Err(peer.err(SshErrorKind::Connect { source })),
        (None, None) => {
            return Err(peer.err(SshErrorKind::Resolve {
                source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
            }));
        }
    };
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(error = %e, "set_nodelay failed");
    }
    shared.set_stage(Stage::Banner);

    let config = Arc::new(client_config(target));
    let handler = ClientHandler {
        pinned: target.host_keys.clone(),
        shared: shared.clone(),
        timeouts: target.timeouts,
    };
    let stream = WatchedStream::new(tcp, target.timeouts.write_stall, shared.clone(), kill);
    let mut handle = match client::connect_stream(config, stream, handler).await {
        Ok(h) => h,
        Err(e) => return Err(peer.err(handshake_error(e, target, shared))),
    };

    shared.set_stage(Stage::Authentication);
    let mut tried = Vec::new();
    let mut remaining = Vec::new();
    for (path, key) in keys {
        let hash = if key.algorithm().is_rsa() {
            handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| peer.err(runtime_error(e, shared, &target.timeouts)))?
                .flatten()
        } else {
            None
        };
        let fp = fingerprint(key.public_key());
        let result = handle
            .authenticate_publickey(target.user.clone(), PrivateKeyWithHashAlg::new(key, hash))
            .await
            .map_err(|e| peer.err(runtime_error(e, shared, &target.timeouts)))?;
        match result {
            client::AuthResult::Success => {
                debug!(key = %fp, "authenticated");
                shared.set_stage(Stage::Ready);
                let negotiated = shared.with(|s| s.negotiated.clone()).unwrap_or_default();
                debug!(?negotiated, builder = %peer.builder, "SSH session ready");
                return Ok(Session {
                    handle,
                    peer: peer.clone(),
                    shared: shared.clone(),
                    negotiated,
                    timeouts: target.timeouts,
                });
            }
            client::AuthResult::Failure {
                remaining_methods,
                partial_success,
            } => {
                tried.push(format!(
                    "{} ({fp}){}",
                    path.display(),
                    if partial_success {
                        ", accepted but more authentication is required"
                    } else {
                        ""
                    }
                ));
                remaining = remaining_methods.iter().map(String::from).collect();
            }
        }
    }
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    Err(peer.err(SshErrorKind::AuthFailed {
        user: target.user.clone(),
        tried,
        remaining,
    }))
}

fn handshake_error(e: russh::Error, target: &SshTarget, shared: &Shared) -> SshErrorKind {
    match e {
        russh::Error::UnknownKey => match shared.with(|s| s.presented.clone()) {
            Some(Presented::Key(key)) => SshErrorKind::HostKeyMismatch {
                expected: target.host_keys.fingerprints(),
                presented: fingerprint(&key),
                presented_type: key.algorithm().as_str().to_owned(),
            },
            Some(Presented::Certificate) => SshErrorKind::HostCertificate,
            None => SshErrorKind::Negotiation("the server's host key was not accepted".into()),
        },
        russh::Error::NoCommonAlgo { kind, ours, theirs } => SshErrorKind::Negotiation(format!(
            "no common {kind:?} algorithm: we offer {}, the server offers {}",
            ours.join(","),
            theirs.join(",")
        )),
        russh::Error::Version => SshErrorKind::Negotiation(
            "the peer did not send an SSH banner (is this an SSH server?)".into(),
        ),
        other => runtime_error(other, shared, &target.timeouts),
    }
}

fn runtime_error(e: russh::Error, shared: &Shared, timeouts: &Timeouts) -> SshErrorKind {
    match e {
        russh::Error::SendError
        | russh::Error::Disconnect
        | russh::Error::HUP
        | russh::Error::KeepaliveTimeout
        | russh::Error::InactivityTimeout
        | russh::Error::IO(_)
        | russh::Error::Join(_) => {
            let reason = shared
                .with(|s| s.disconnect.clone())
                .unwrap_or_else(|| describe_russh_error(&e, timeouts));
            SshErrorKind::Disconnected(reason)
        }
        russh::Error::ChannelOpenFailure(f) => SshErrorKind::Channel(format!(
            "the server refused to open a session channel ({f:?})"
        )),
        other => SshErrorKind::Negotiation(other.to_string()),
    }
}

impl Session {
    /// The algorithms negotiated with the server.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// Whether the connection has ended (the reason is in the errors its streams return).
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Why the connection ended, if it has.
    pub fn disconnect_reason(&self) -> Option<String> {
        self.shared.with(|s| s.disconnect.clone())
    }

    /// Runs `command` (a shell command line: build it with [`shell_command`]) on the builder.
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

    /// Closes the connection politely.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Exec
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Shell quoting
// ---------------------------------------------------------------------------------------------

/// A word that cannot be passed through a remote shell.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{word:?} contains a NUL byte, which cannot be passed in a remote command line")]
pub struct ShellQuoteError {
    pub word: String,
}

/// Quotes one word for a POSIX shell (`sh`, `bash`, `dash`, `zsh`): words made only of
/// characters that no shell treats specially are left alone, everything else is wrapped in
/// single quotes, with each `'` written as `'\''`. The result always parses back to exactly
/// `word`, as one word, with no expansion of any kind.
pub fn shell_quote(word: &str) -> Result<String, ShellQuoteError> {
    if word.contains('\0') {
        return Err(ShellQuoteError {
            word: word.to_owned(),
        });
    }
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:,+@%".contains(&b));
    if plain {
        return Ok(word.to_owned());
    }
    let mut out = String::with_capacity(word.len() + 2);
    out.push('\'');
    for c in word.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    Ok(out)
}

/// Builds a remote command line from words, each quoted with [`shell_quote`]:
/// `shell_command(["nix-store", "--serve", "--write", "--store", x])`.
pub fn shell_command<I, S>(words: I) -> Result<String, ShellQuoteError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = String::new();
    for w in words {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&shell_quote(w.as_ref())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    const ED2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA6rWI3G1sz07DnfFlrouTcysQlj2P+jpNSOEWD9OJ3X";

    /// (The machines column's base64 is decoded, padded or not, by `config`, and tested there.)
    #[test]
    fn parses_one_or_more_key_lines() {
        let one = HostKeys::parse_openssh(&format!("{ED1} root@host")).unwrap();
        assert_eq!(one.len(), 1);
        let two = HostKeys::parse_openssh(&format!("{ED1} c1\n{ED2} c2\n")).unwrap();
        assert_eq!(two.len(), 2);
        assert!(two.contains(&one.keys()[0]));
        assert!(matches!(
            HostKeys::parse_openssh("hello world"),
            Err(HostKeyError::BadLine { line: 1, .. })
        ));
        assert!(matches!(
            HostKeys::parse_openssh("\n# only a comment\n"),
            Err(HostKeyError::Empty)
        ));
    }

    #[test]
    fn fingerprint_is_openssh_format() {
        let k = HostKeys::parse_openssh(ED1).unwrap();
        let fp = fingerprint(&k.keys()[0]);
        assert!(fp.starts_with("SHA256:"), "{fp}");
        assert_eq!(fp.len(), "SHA256:".len() + 43);
        assert!(!fp.ends_with('='));
    }

    #[test]
    fn preferred_algorithms_put_pinned_types_first() {
        let k = HostKeys::parse_openssh(ED1).unwrap();
        assert_eq!(k.preferred_algorithms()[0], Algorithm::Ed25519);
        assert!(
            !k.preferred_algorithms()
                .contains(&Algorithm::Rsa { hash: None }),
            "SHA-1 RSA signatures are never offered"
        );
    }

    fn hashed(name: &str, salt: &[u8]) -> String {
        use hmac::{KeyInit, Mac};
        let mut mac = <hmac::Hmac<sha1::Sha1> as KeyInit>::new_from_slice(salt).unwrap();
        mac.update(name.as_bytes());
        let e = base64::engine::general_purpose::STANDARD;
        format!(
            "|1|{}|{}",
            e.encode(salt),
            e.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn known_hosts_matching() {
        let k1 = HostKeys::parse_openssh(ED1).unwrap();
        let k2 = HostKeys::parse_openssh(ED2).unwrap();
        let text = format!(
            "# comment\n\
             \n\
             other.example {ED2}\n\
             builder.example,10.0.0.1 {ED1} comment words\n\
             [builder.example]:2222 {ED2}\n"
        );
        assert_eq!(
            HostKeys::from_known_hosts(&text, "builder.example", 22).unwrap(),
            k1
        );
        assert_eq!(
            HostKeys::from_known_hosts(&text, "10.0.0.1", 22).unwrap(),
            k1
        );
        assert_eq!(
            HostKeys::from_known_hosts(&text, "builder.example", 2222).unwrap(),
            k2
        );
        assert!(
            HostKeys::from_known_hosts(&text, "builder.example", 2223)
                .unwrap()
                .is_empty()
        );
        assert!(
            HostKeys::from_known_hosts(&text, "nobody", 22)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn known_hosts_hashed_wildcards_negation_revoked() {
        let k1 = HostKeys::parse_openssh(ED1).unwrap();
        let text = format!(
            "{} {ED1}\n",
            hashed("[127.0.0.1]:2200", b"0123456789abcdefghij")
        );
        assert_eq!(
            HostKeys::from_known_hosts(&text, "127.0.0.1", 2200).unwrap(),
            k1
        );
        assert!(
            HostKeys::from_known_hosts(&text, "127.0.0.1", 22)
                .unwrap()
                .is_empty()
        );
        assert!(
            HostKeys::from_known_hosts(&text, "127.0.0.2", 2200)
                .unwrap()
                .is_empty()
        );

        let text = format!("*.example,!bad.example {ED1}\n");
        assert_eq!(
            HostKeys::from_known_hosts(&text, "good.example", 22).unwrap(),
            k1
        );
        assert!(
            HostKeys::from_known_hosts(&text, "bad.example", 22)
                .unwrap()
                .is_empty()
        );
        let text = format!("b?ilder {ED1}\n");
        assert_eq!(
            HostKeys::from_known_hosts(&text, "builder", 22).unwrap(),
            k1
        );
        assert!(
            HostKeys::from_known_hosts(&text, "bilder", 22)
                .unwrap()
                .is_empty()
        );

        let text =
            format!("builder {ED1}\nbuilder {ED2}\n@revoked * {ED1}\n@cert-authority * {ED2}\n");
        let got = HostKeys::from_known_hosts(&text, "builder", 22).unwrap();
        assert_eq!(got, HostKeys::parse_openssh(ED2).unwrap());

        assert!(matches!(
            HostKeys::from_known_hosts("builder ssh-ed25519\n", "builder", 22),
            Err(HostKeyError::KnownHosts { line: 1, .. })
        ));
        assert!(matches!(
            HostKeys::from_known_hosts(&format!("|1|zz|yy|x {ED1}\n"), "builder", 22),
            Err(HostKeyError::KnownHosts { line: 1, .. })
        ));
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match(b"*", b""));
        assert!(wildcard_match(b"a*c", b"abbbc"));
        assert!(!wildcard_match(b"a*c", b"abbbd"));
        assert!(wildcard_match(b"[h]:*", b"[h]:22"));
        assert!(wildcard_match(b"*.Example", b"x.example"));
        assert!(!wildcard_match(b"?", b""));
    }

    /// Parses a POSIX shell word the way `sh` would (single quotes, backslash outside quotes,
    /// double quotes with their escapes), refusing anything that would expand or split.
    fn sh_unquote(s: &str) -> Option<Vec<String>> {
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut in_word = false;
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\'' => {
                    in_word = true;
                    loop {
                        match chars.next()? {
                            '\'' => break,
                            c => cur.push(c),
                        }
                    }
                }
                '\\' => {
                    in_word = true;
                    cur.push(chars.next()?);
                }
                ' ' => {
                    if in_word {
                        words.push(std::mem::take(&mut cur));
                        in_word = false;
                    }
                }
                '$' | '`' | '"' | ';' | '&' | '|' | '<' | '>' | '(' | ')' | '*' | '?' | '['
                | '#' | '~' | '\n' | '\t' | '=' | '{' | '}' | '!' => return None,
                c => {
                    in_word = true;
                    cur.push(c);
                }
            }
        }
        if in_word {
            words.push(cur);
        }
        Some(words)
    }

    #[test]
    fn shell_quoting_hostile_values() {
        let hostile = [
            "",
            "plain",
            "/nix/store/abc-foo",
            "it's",
            "'",
            "''",
            "a b",
            "$(rm -rf /)",
            "`id`",
            "; reboot",
            "a\nb",
            "x' ; echo pwned; '",
            "\\'",
            "~root",
            "*",
            "FOO=bar",
            "-rf",
            "!event",
            "ünïcødé",
            "{a,b}",
            "#comment",
        ];
        for w in hostile {
            let q = shell_quote(w).unwrap();
            assert_eq!(sh_unquote(&q), Some(vec![w.to_owned()]), "{w:?} -> {q}");
        }
        assert_eq!(shell_quote("nix-store").unwrap(), "nix-store");
        assert_eq!(shell_quote("it's").unwrap(), "'it'\\''s'");
        assert!(shell_quote("a\0b").is_err());
        let cmd =
            shell_command(["nix-store", "--serve", "--write", "--store", "x'; id #"]).unwrap();
        assert_eq!(
            sh_unquote(&cmd).unwrap(),
            ["nix-store", "--serve", "--write", "--store", "x'; id #"]
        );
    }

    proptest::proptest! {
        #[test]
        fn shell_quote_round_trips(words in proptest::collection::vec("[^\\x00]{0,12}", 0..5)) {
            let cmd = shell_command(&words).unwrap();
            proptest::prop_assert_eq!(sh_unquote(&cmd).unwrap(), words);
        }
    }

    #[test]
    fn identity_errors_do_not_leak_contents() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            load_identity(&missing),
            Err(SshErrorKind::KeyFileUnreadable { .. })
        ));
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "SECRET-MATERIAL-not-a-key").unwrap();
        let e = load_identity(&junk).unwrap_err();
        assert!(matches!(e, SshErrorKind::KeyFileUnsupported { .. }));
        assert!(!e.to_string().contains("SECRET"), "{e}");
    }

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

    #[test]
    fn timeouts_default_detects_dead_peer_in_15s() {
        assert_eq!(
            Timeouts::default().dead_peer_after(),
            Duration::from_secs(15)
        );
    }
}
