//! The local store, as the hook sees it: path infos and input NARs from the local nix-daemon's
//! socket through the same worker-protocol client that talks to `ssh-ng://` builders.
//!
//! Reads go through the daemon, and so do the outputs of floating content-addressed derivations
//! and their realisations: the daemon locks those outputs by derivation and output name, never
//! by path, so adding them over this connection cannot deadlock (docs/protocol.md §4.4). Every
//! other output the daemon has locked by path, and a write to it here would deadlock, so `place`
//! puts those there instead. When no daemon socket exists (a daemonless, root `nix-build`),
//! `nix-daemon --stdio` serves the same protocol from a child.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;

use hook_protocol::StorePath;
use hook_protocol::path_info::PathInfo;
use hook_protocol::realisation::{DrvOutput, Realisation};
use hook_protocol::worker::RealisationsUnsupported;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::RemoteError;
use super::nar::{NarSink, NarSource};
use super::worker::WorkerClient;

/// Where the daemon listens unless `NIX_DAEMON_SOCKET_PATH` says otherwise.
pub const DEFAULT_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";
const PEER: &str = "the local nix-daemon";

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// A connection to the local store.
pub struct LocalStore {
    client: WorkerClient<BoxRead, BoxWrite>,
    /// `nix-daemon --stdio`, when there was no socket; killed on drop.
    _child: Option<Child>,
}

/// The daemon socket's path.
pub fn socket_path() -> PathBuf {
    std::env::var_os("NIX_DAEMON_SOCKET_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

impl LocalStore {
    /// Connects to the daemon socket, or runs `nix-daemon --stdio` if there is none.
    pub async fn connect() -> Result<LocalStore, RemoteError> {
        let path = socket_path();
        match UnixStream::connect(&path).await {
            Ok(s) => {
                let (r, w) = s.into_split();
                let client =
                    WorkerClient::handshake(Box::new(r) as BoxRead, Box::new(w) as BoxWrite, PEER)
                        .await?;
                Ok(LocalStore {
                    client,
                    _child: None,
                })
            }
            Err(e) => {
                tracing::debug!(socket = %path.display(), error = %e,
                    "no daemon socket; using 'nix-daemon --stdio'");
                let mut child = Command::new("nix-daemon")
                    .arg("--stdio")
                    .env_remove("NIX_REMOTE")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|source| RemoteError::Write {
                        peer: format!("'nix-daemon --stdio' (no socket at {})", path.display()),
                        source,
                    })?;
                let (Some(w), Some(r)) = (child.stdin.take(), child.stdout.take()) else {
                    return Err(RemoteError::Protocol {
                        peer: PEER.into(),
                        message: "nix-daemon --stdio started without pipes".into(),
                    });
                };
                let client =
                    WorkerClient::handshake(Box::new(r) as BoxRead, Box::new(w) as BoxWrite, PEER)
                        .await?;
                Ok(LocalStore {
                    client,
                    _child: Some(child),
                })
            }
        }
    }

    /// Which of `paths` are valid locally (one round trip).
    pub async fn valid_paths(
        &mut self,
        paths: &[StorePath],
    ) -> Result<BTreeSet<StorePath>, RemoteError> {
        self.client.query_valid_paths(paths, false).await
    }

    /// Path infos for `paths`, which must all be valid (pipelined).
    pub async fn path_infos(&mut self, paths: &[StorePath]) -> Result<Vec<PathInfo>, RemoteError> {
        let infos = self.client.query_path_infos(paths).await?;
        infos
            .into_iter()
            .zip(paths)
            .map(|(info, p)| {
                info.ok_or_else(|| RemoteError::Protocol {
                    peer: PEER.into(),
                    message: format!("input path '{p}' is not valid in the local store"),
                })
            })
            .collect()
    }

    /// Whether this daemon can record and answer realisations as we write them.
    pub fn realisations_supported(&self) -> Result<(), RealisationsUnsupported> {
        self.client.realisations_supported()
    }

    /// The realisation the daemon has for `id`, if any.
    pub async fn realisation(
        &mut self,
        id: &DrvOutput,
    ) -> Result<Option<Realisation>, RemoteError> {
        self.client.query_realisation(id).await
    }

    /// Records `realisation` (its path must be valid already).
    pub async fn register_realisation(
        &mut self,
        realisation: &Realisation,
    ) -> Result<(), RemoteError> {
        self.client.register_drv_output(realisation).await
    }

    /// Adds `infos` (dependencies first) with their NARs from `source`, one AddToStoreNar each:
    /// only for paths the daemon has not locked by path (floating content-addressed outputs).
    pub async fn add_unlocked_paths<S: NarSource>(
        &mut self,
        infos: &[PathInfo],
        source: &mut S,
    ) -> Result<(), RemoteError> {
        self.client.add_each_to_store(infos, source).await
    }

    /// Path infos for the closure of `roots` (which must be valid): the roots and everything
    /// they reference, transitively. Walks the reference graph one level at a time, each level
    /// one pipelined batch, so the round trips grow with the graph's depth, not its size.
    pub async fn closure(&mut self, roots: &[StorePath]) -> Result<Vec<PathInfo>, RemoteError> {
        let mut seen: BTreeSet<StorePath> = roots.iter().cloned().collect();
        let mut level: Vec<StorePath> = seen.iter().cloned().collect();
        let mut out = Vec::new();
        while !level.is_empty() {
            let infos = self.path_infos(&level).await?;
            level = infos
                .iter()
                .flat_map(|i| i.references.iter())
                .filter(|r| seen.insert((*r).clone()))
                .cloned()
                .collect();
            out.extend(infos);
        }
        Ok(out)
    }
}

impl NarSource for LocalStore {
    async fn copy_nar<W: NarSink>(
        &mut self,
        info: &PathInfo,
        sink: &mut W,
    ) -> Result<(), RemoteError> {
        self.client.nar(info, sink).await
    }
}
