//! The worker-protocol client: `nix-daemon --stdio` behind `ssh-ng://` (see `daemon`), and the
//! local nix-daemon's socket (see `local`). One client for both, generic over the byte streams.
//!
//! Owns the handshake, the stderr message loop (log lines go to the [`BuildLog`], remote errors
//! become [`RemoteError::Daemon`]) and the operations a hook needs. Requests that can be batched
//! are pipelined in bounded batches, so a thousand path infos cost a handful of round trips and
//! the socket buffers can never deadlock. NARs pass through in bounded chunks and are never held
//! whole. It never decides *what* to copy or build; `transfer` does.

use std::collections::BTreeSet;

use hook_protocol::StorePath;
use hook_protocol::build_result::BuildResult;
use hook_protocol::derivation::BasicDerivation;
use hook_protocol::log::strip_ansi;
use hook_protocol::path_info::{DerivedPath, PathInfo};
use hook_protocol::realisation::{DrvOutput, Realisation};
use hook_protocol::wire::{DecodeError, Reader, WireWrite};
use hook_protocol::worker::{
    self, BuildMode, ClientOptions, Field, NarUpload, Negotiated, ServerInfo, StderrMessage,
    TypedResult,
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::nar::{NarSink, NarSource, copy_nar, write_all, write_all_noflush};
use super::{BuildLog, RemoteError};
use crate::wire_io::WireReader;

/// How many requests we put on the wire before reading their replies.
const PIPELINE_BATCH: usize = 128;
/// Payload bytes per frame when we send a framed stream.
const FRAME_SIZE: usize = 256 * 1024;

/// A connected worker-protocol client.
pub struct WorkerClient<R, W> {
    reader: WireReader<R>,
    writer: W,
    proto: Negotiated,
    info: ServerInfo,
    peer: String,
    store_dir: String,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> WorkerClient<R, W> {
    /// Performs the handshake (docs/protocol.md §8.1). `peer` names the other side in errors.
    pub async fn handshake(reader: R, mut writer: W, peer: &str) -> Result<Self, RemoteError> {
        let mut reader = WireReader::new(reader, peer);
        let client = worker::CLIENT_VERSION;
        let mut buf = Vec::new();
        worker::encode_hello(&mut buf, client);
        write_all(&mut writer, &buf, peer).await?;
        let hello = reader
            .decode("the nix-daemon greeting", |r| {
                worker::decode_server_hello(r, client)
            })
            .await?;
        let features = BTreeSet::new();
        buf.clear();
        worker::encode_after_hello(&mut buf, hello.negotiated, &features);
        write_all(&mut writer, &buf, peer).await?;
        let (proto, info) = reader
            .decode("the nix-daemon handshake", |r| {
                worker::decode_server_info(r, hello.negotiated, &features)
            })
            .await?;
        let mut client = WorkerClient::with(reader, writer, proto, info);
        client.finish_op(None).await?;
        Ok(client)
    }

    /// A client for a daemon whose handshake was already done (by the supervisor, for a warm
    /// session): `proto` and `info` are what that handshake found.
    pub fn resume(reader: R, writer: W, peer: &str, proto: Negotiated, info: ServerInfo) -> Self {
        WorkerClient::with(WireReader::new(reader, peer), writer, proto, info)
    }

    /// The client once the handshake is done, for the reader's peer.
    fn with(reader: WireReader<R>, writer: W, proto: Negotiated, info: ServerInfo) -> Self {
        WorkerClient {
            peer: reader.peer().to_owned(),
            reader,
            writer,
            proto,
            info,
            store_dir: "/nix/store".to_owned(),
        }
    }

    /// The streams back after the handshake, with what was read but not consumed, and what
    /// the handshake found (for [`WorkerClient::resume`]).
    pub fn into_parts(self) -> (R, W, Vec<u8>, Negotiated, ServerInfo) {
        let (reader, rest) = self.reader.into_parts();
        (reader, self.writer, rest, self.proto, self.info)
    }

    pub fn negotiated(&self) -> &Negotiated {
        &self.proto
    }

    pub fn server_info(&self) -> &ServerInfo {
        &self.info
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    async fn send(&mut self, buf: &[u8]) -> Result<(), RemoteError> {
        write_all(&mut self.writer, buf, &self.peer).await
    }

    /// Runs the stderr loop until `STDERR_LAST`; log output goes to `log`.
    async fn finish_op(&mut self, log: Option<&mut BuildLog>) -> Result<(), RemoteError> {
        self.finish_op_for(log, None, None).await
    }

    /// [`WorkerClient::finish_op`], but when `only_drv` is given, the output of builds of other
    /// derivations (the remote building inputs it lacked) goes to the debug log instead of
    /// `log`, so the build log holds only `only_drv`'s own output. With `keep`, every message
    /// (`STDERR_NEXT`) is also kept there, as it arrives.
    async fn finish_op_for(
        &mut self,
        mut log: Option<&mut BuildLog>,
        only_drv: Option<&StorePath>,
        mut keep: Option<&mut Vec<String>>,
    ) -> Result<(), RemoteError> {
        let mut other_builds: BTreeSet<u64> = BTreeSet::new();
        loop {
            let proto = self.proto.clone();
            let msg = self
                .reader
                .decode("a nix-daemon message", |r| worker::decode_stderr(r, &proto))
                .await?;
            match msg {
                StderrMessage::Last => return Ok(()),
                StderrMessage::Error(e) => {
                    let mut message = strip_ansi(e.message.trim_end());
                    for t in e.traces.iter().rev() {
                        message.push_str("\n… ");
                        message.push_str(&strip_ansi(t.trim_end()));
                    }
                    return Err(RemoteError::Daemon {
                        peer: self.peer.clone(),
                        message,
                    });
                }
                StderrMessage::Read { max } => {
                    return Err(RemoteError::Protocol {
                        peer: self.peer.clone(),
                        message: format!("the daemon asked for {max} bytes we never offered"),
                    });
                }
                StderrMessage::Next(text) => {
                    if let Some(keep) = keep.as_deref_mut() {
                        keep.push(text.clone());
                    }
                    if let Some(log) = log.as_deref_mut() {
                        log.message(&text).await;
                    } else {
                        tracing::debug!(peer = %self.peer, "{}", text.trim_end());
                    }
                }
                StderrMessage::Result(res) if other_builds.contains(&res.id) => {
                    if let Some(TypedResult::BuildLogLine(line)) = res.typed() {
                        tracing::debug!(peer = %self.peer, "(building an input) {line}");
                    }
                }
                StderrMessage::Result(res) => {
                    if let Some(log) = log.as_deref_mut() {
                        match res.typed() {
                            Some(TypedResult::BuildLogLine(line)) => log.line(line).await,
                            Some(TypedResult::SetPhase(phase)) => log.phase(phase),
                            _ => {}
                        }
                    }
                }
                StderrMessage::StartActivity(act) => {
                    if let Some(drv) = only_drv
                        && act.activity_type == worker::activity::BUILD
                        && !matches!(act.fields.first(), Some(Field::Str(p)) if p == drv.as_str())
                    {
                        other_builds.insert(act.id);
                    }
                }
                StderrMessage::StopActivity { .. } | StderrMessage::Write(_) => {}
            }
        }
    }

    /// Sends SetOptions: the build's timeouts and log limit, which Nix's own ssh-ng store never
    /// forwards.
    pub async fn set_options(&mut self, options: &ClientOptions) -> Result<(), RemoteError> {
        let mut buf = Vec::new();
        worker::encode_set_options(&mut buf, &self.proto, options);
        self.send(&buf).await?;
        self.finish_op(None).await
    }

    /// QueryValidPaths (one round trip for the whole set).
    pub async fn query_valid_paths(
        &mut self,
        paths: &[StorePath],
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, RemoteError> {
        let mut buf = Vec::new();
        worker::encode_query_valid_paths(&mut buf, &self.proto, paths, substitute);
        self.send(&buf).await?;
        self.finish_op(None).await?;
        Ok(self
            .reader
            .decode("the valid paths", worker::decode_path_set)
            .await?)
    }

    /// QueryPathInfo for every path, pipelined in batches. `None` for invalid paths.
    pub async fn query_path_infos(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<Option<PathInfo>>, RemoteError> {
        let mut out = Vec::with_capacity(paths.len());
        for batch in paths.chunks(PIPELINE_BATCH) {
            let mut buf = Vec::new();
            for p in batch {
                worker::encode_query_path_info(&mut buf, p);
            }
            self.send(&buf).await?;
            for p in batch {
                match self.finish_op(None).await {
                    Ok(()) => {}
                    // Below 1.17 an invalid path is an error; we need ≥ 1.21 anyway.
                    Err(e) => return Err(e),
                }
                let info = self
                    .reply("a path info", |r, proto, _| {
                        worker::decode_query_path_info_reply(r, proto, p)
                    })
                    .await?;
                out.push(info);
            }
        }
        Ok(out)
    }

    /// NarFromPath: streams the NAR of `info.path` (exactly `info.nar_size` bytes, which the
    /// reply carries unframed) into `sink`.
    pub async fn nar<S: NarSink>(
        &mut self,
        info: &PathInfo,
        sink: &mut S,
    ) -> Result<(), RemoteError> {
        let mut buf = Vec::new();
        worker::encode_nar_from_path(&mut buf, &info.path);
        self.send(&buf).await?;
        self.finish_op(None).await?;
        copy_nar(&mut self.reader, info.nar_size, sink).await
    }

    /// Uploads paths (dependencies first). Each NAR is produced by `source`, which must write
    /// exactly `info.nar_size` bytes into the given sink. Uses AddMultipleToStore (one round
    /// trip for all paths) where the daemon has it, AddToStoreNar otherwise.
    pub async fn add_paths<S: NarSource>(
        &mut self,
        infos: &[PathInfo],
        source: &mut S,
    ) -> Result<(), RemoteError> {
        if infos.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        if worker::encode_add_multiple_to_store(&mut buf, &self.proto, false, true).is_ok() {
            self.send(&buf).await?;
            let mut framed = FramedWriter::new(&mut self.writer, &self.peer);
            let mut head = Vec::new();
            worker::encode_add_multiple_count(&mut head, infos.len() as u64);
            framed.write(&head).await?;
            for info in infos {
                head.clear();
                worker::encode_add_multiple_entry(&mut head, info);
                framed.write(&head).await?;
                source.copy_nar(info, &mut framed).await?;
            }
            framed.finish().await?;
            return self.finish_op(None).await;
        }
        self.add_each_to_store(infos, source).await
    }

    /// AddToStoreNar (framed, ≥ 1.23) for each of `infos` in turn, dependencies first: one
    /// request per path, so the daemon streams each NAR into place as it arrives (it verifies
    /// the hash, size and content address before the path becomes valid). `source` writes
    /// exactly `info.nar_size` bytes per path.
    pub async fn add_each_to_store<S: NarSource>(
        &mut self,
        infos: &[PathInfo],
        source: &mut S,
    ) -> Result<(), RemoteError> {
        if worker::nar_upload(&self.proto) != NarUpload::Framed {
            return Err(RemoteError::Protocol {
                peer: self.peer.clone(),
                message: format!(
                    "worker protocol {} is too old to add paths (need 1.23)",
                    self.proto.version
                ),
            });
        }
        let mut buf = Vec::new();
        for info in infos {
            buf.clear();
            worker::encode_add_to_store_nar(&mut buf, info, false, true);
            self.send(&buf).await?;
            let mut framed = FramedWriter::new(&mut self.writer, &self.peer);
            source.copy_nar(info, &mut framed).await?;
            framed.finish().await?;
            self.finish_op(None).await?;
        }
        Ok(())
    }

    /// Whether this daemon takes [`WorkerClient::register_drv_output`] and
    /// [`WorkerClient::query_realisation`] as we write them (docs/protocol.md §8.3).
    pub fn realisations_supported(&self) -> Result<(), worker::RealisationsUnsupported> {
        worker::check_realisations(&self.proto, &self.info)
    }

    /// A request the negotiated protocol cannot carry, as ours to report.
    fn protocol_error(&self, e: impl std::fmt::Display) -> RemoteError {
        RemoteError::Protocol {
            peer: self.peer.clone(),
            message: e.to_string(),
        }
    }

    /// Reads the reply of the operation just finished (`what` names it in errors); `decode`
    /// is given the negotiated protocol and the store directory.
    async fn reply<T>(
        &mut self,
        what: &'static str,
        mut decode: impl FnMut(&mut Reader<'_>, &Negotiated, &str) -> Result<T, DecodeError>,
    ) -> Result<T, RemoteError> {
        let (proto, store_dir) = (&self.proto, &self.store_dir);
        Ok(self
            .reader
            .decode(what, |r| decode(r, proto, store_dir))
            .await?)
    }

    /// QueryRealisation (op 43): the realisation recorded for `id`, if any.
    pub async fn query_realisation(
        &mut self,
        id: &DrvOutput,
    ) -> Result<Option<Realisation>, RemoteError> {
        let mut buf = Vec::new();
        worker::encode_query_realisation(&mut buf, &self.proto, id)
            .map_err(|e| self.protocol_error(e))?;
        self.send(&buf).await?;
        self.finish_op(None).await?;
        self.reply("a realisation", |r, proto, store_dir| {
            worker::decode_query_realisation_reply(r, proto, id, store_dir)
        })
        .await
    }

    /// RegisterDrvOutput (op 42): records `realisation`, whose path must be valid already.
    pub async fn register_drv_output(
        &mut self,
        realisation: &Realisation,
    ) -> Result<(), RemoteError> {
        let mut buf = Vec::new();
        worker::encode_register_drv_output(&mut buf, &self.proto, realisation)
            .map_err(|e| self.protocol_error(e))?;
        self.send(&buf).await?;
        self.finish_op(None).await
    }

    /// BuildDerivation; the log goes to `log` as it arrives.
    pub async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        log: &mut BuildLog,
    ) -> Result<BuildResult, RemoteError> {
        let mut buf = Vec::new();
        worker::encode_build_derivation(&mut buf, drv_path, drv, BuildMode::Normal);
        self.send(&buf).await?;
        self.finish_op(Some(log)).await?;
        self.reply("the build result", worker::decode_build_result)
            .await
    }

    /// BuildPathsWithResults (≥ 1.34): the remote builds `paths` from derivations in its own
    /// store, inputs it lacks included. Only the output of `drv_path`'s own build goes to `log`.
    /// One result per requested path.
    pub async fn build_paths_with_results(
        &mut self,
        paths: &[DerivedPath],
        drv_path: &StorePath,
        log: &mut BuildLog,
    ) -> Result<Vec<(DerivedPath, BuildResult)>, RemoteError> {
        self.build_paths(paths, Some(log), Some(drv_path), None)
            .await
    }

    /// BuildPathsWithResults, its messages going where [`WorkerClient::finish_op_for`] says.
    async fn build_paths(
        &mut self,
        paths: &[DerivedPath],
        log: Option<&mut BuildLog>,
        drv_path: Option<&StorePath>,
        messages: Option<&mut Vec<String>>,
    ) -> Result<Vec<(DerivedPath, BuildResult)>, RemoteError> {
        let mut buf = Vec::new();
        worker::encode_build_paths_with_results(&mut buf, &self.proto, paths, BuildMode::Normal)
            .map_err(|e| self.protocol_error(e))?;
        self.send(&buf).await?;
        self.finish_op_for(log, drv_path, messages).await?;
        self.reply(
            "the build results",
            worker::decode_build_paths_with_results_reply,
        )
        .await
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> WorkerClient<R, W> {
    /// BuildPathsWithResults (≥ 1.34) with no build log: every message the daemon sends while
    /// it works (`STDERR_NEXT`: its own log lines at the verbosity SetOptions asked for) is
    /// pushed onto `messages` as it arrives, so a caller that gives up early still has them.
    /// What `doctor` asks the local daemon with (`probe`).
    pub async fn build_paths_keeping_messages(
        &mut self,
        paths: &[DerivedPath],
        messages: &mut Vec<String>,
    ) -> Result<Vec<(DerivedPath, BuildResult)>, RemoteError> {
        self.build_paths(paths, None, None, Some(messages)).await
    }
}

/// Writes a framed stream (worker ≥ 1.23), coalescing small writes into large frames.
pub struct FramedWriter<'a, W> {
    inner: &'a mut W,
    peer: &'a str,
    buf: Vec<u8>,
}

impl<'a, W: AsyncWrite + Unpin> FramedWriter<'a, W> {
    pub fn new(inner: &'a mut W, peer: &'a str) -> Self {
        FramedWriter {
            inner,
            peer,
            buf: Vec::with_capacity(FRAME_SIZE + 8),
        }
    }

    async fn flush_frame(&mut self) -> Result<(), RemoteError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut head = Vec::with_capacity(8);
        head.put_u64(self.buf.len() as u64);
        write_all_noflush(self.inner, &head, self.peer).await?;
        write_all_noflush(self.inner, &self.buf, self.peer).await?;
        self.buf.clear();
        Ok(())
    }

    /// Ends the stream (zero-length frame) and flushes.
    pub async fn finish(mut self) -> Result<(), RemoteError> {
        self.flush_frame().await?;
        let mut end = Vec::with_capacity(8);
        worker::encode_frame_end(&mut end);
        write_all(self.inner, &end, self.peer).await
    }
}

impl<W: AsyncWrite + Unpin> NarSink for FramedWriter<'_, W> {
    async fn write(&mut self, mut data: &[u8]) -> Result<(), RemoteError> {
        while !data.is_empty() {
            let room = FRAME_SIZE - self.buf.len();
            let n = room.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == FRAME_SIZE {
                self.flush_frame().await?;
            }
        }
        Ok(())
    }
}
