//! One SSH connection: [`connect`] (TCP, banner, key exchange with the pinned host keys,
//! public-key authentication, all under one timeout), the russh handler that checks the
//! server's key and notes what was negotiated, and the [`Session`] that remote commands run on
//! (see `exec`).
//!
//! Owns algorithm preferences (the pinned key types first; AES-GCM where the CPU has AES,
//! chacha20-poly1305 otherwise) and flow-control tuning. It never accepts a key that is not in
//! the target's [`HostKeySet`] (an empty set is refused before any byte is sent), never
//! prompts, and names the builder and both fingerprints when a key does not match.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use russh::client::{self, DisconnectReason, Handle};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::{Preferred, cipher, mac};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::keepalive::{Timeouts, WatchedStream};
use super::keys::load_identity;
use super::known_hosts::{HostKeySet, fingerprint};
use super::target::SshTarget;
use super::{SshError, SshErrorKind, Stage};

/// Channel window we advertise: how much the server may send before we acknowledge. Large
/// enough to keep a fast link busy; bounded, so memory is too.
const WINDOW_SIZE: u32 = 8 << 20;
/// Largest data packet we accept (payload); 32 KiB is what every server sends at most anyway.
const MAX_PACKET_SIZE: u32 = 32 << 10;
/// Packets russh buffers per channel before it stops reading the socket.
const CHANNEL_BUFFER: usize = 64;

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

/// What the russh handler, the watched stream and our handles share about one connection.
#[derive(Default)]
pub(super) struct SharedState {
    pub(super) stage: Stage,
    presented: Option<Presented>,
    negotiated: Option<Negotiated>,
    pub(super) disconnect: Option<String>,
}

#[derive(Default)]
pub(super) struct Shared(Mutex<SharedState>);

impl Shared {
    pub(super) fn with<T>(&self, f: impl FnOnce(&mut SharedState) -> T) -> T {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
    pub(super) fn set_stage(&self, stage: Stage) {
        self.with(|s| s.stage = stage);
    }
    pub(super) fn disconnect_reason(&self) -> String {
        self.with(|s| s.disconnect.clone())
            .unwrap_or_else(|| "the SSH connection was closed".to_owned())
    }
}

/// The builder a session belongs to, for error messages.
#[derive(Debug)]
pub(super) struct Peer {
    pub(super) builder: String,
    user: String,
    host: String,
    port: u16,
}

impl Peer {
    pub(super) fn err(&self, kind: SshErrorKind) -> SshError {
        SshError {
            builder: self.builder.clone(),
            user: self.user.clone(),
            host: self.host.clone(),
            port: self.port,
            kind,
        }
    }
}

pub(super) struct ClientHandler {
    pinned: HostKeySet,
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

/// An authenticated SSH connection to a builder.
pub struct Session {
    pub(super) handle: Handle<ClientHandler>,
    pub(super) peer: Arc<Peer>,
    pub(super) shared: Arc<Shared>,
    negotiated: Negotiated,
    pub(super) timeouts: Timeouts,
    /// Ends every read and write of the TCP stream (see [`Session::abort`]).
    kill: CancellationToken,
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
    let stream = WatchedStream::new(
        tcp,
        target.timeouts.write_stall,
        shared.clone(),
        kill.clone(),
    );
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
                    kill,
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

pub(super) fn runtime_error(e: russh::Error, shared: &Shared, timeouts: &Timeouts) -> SshErrorKind {
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

    /// Closes the connection politely.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }

    /// What ends this connection at once, whatever russh's state: every read and write of its
    /// TCP stream fails from then on, so the client task ends and the socket closes. A
    /// connection whose handle and channels are all dropped should close by itself, but russh
    /// stops taking messages (its end among them) while a channel has data waiting for the
    /// peer's window, which a channel the peer closed never gets.
    pub fn aborter(&self) -> CancellationToken {
        self.kill.clone()
    }
}
