//! `ssh://`: the serve-protocol client for a builder's `nix-store --serve --write`.
//!
//! Owns the handshake and the operations a hook needs, gated on the negotiated version. Uploads
//! are pipelined: every path's AddToStoreNar goes out back to back and the acknowledgements are
//! read at the end, so N paths cost one round trip instead of N. The serve protocol reports
//! errors out of band (the server prints to stderr and exits); the caller's stderr pump keeps
//! that text and adds it to the EOF error. It never decides *what* to copy or build.

use std::collections::BTreeSet;

use hook_protocol::ProtocolVersion;
use hook_protocol::StorePath;
use hook_protocol::build_result::BuildResult;
use hook_protocol::derivation::BasicDerivation;
use hook_protocol::path_info::PathInfo;
use hook_protocol::serve::{self, BuildOptions};
use tokio::io::{AsyncRead, AsyncWrite};

use super::RemoteError;
use super::nar::{NarSink, NarSource, PlainSink, copy_nar, write_all, write_all_noflush};
use crate::wire_io::WireReader;

/// A connected serve-protocol client.
pub struct ServeClient<R, W> {
    reader: WireReader<R>,
    writer: W,
    version: ProtocolVersion,
    server: ProtocolVersion,
    peer: String,
    store_dir: String,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> ServeClient<R, W> {
    pub async fn handshake(reader: R, mut writer: W, peer: &str) -> Result<Self, RemoteError> {
        let mut reader = WireReader::new(reader, peer);
        let mut buf = Vec::new();
        serve::encode_hello(&mut buf, serve::CLIENT_VERSION);
        write_all(&mut writer, &buf, peer).await?;
        let hello = reader
            .decode("the 'nix-store --serve' greeting", |r| {
                serve::decode_hello(r, serve::CLIENT_VERSION)
            })
            .await?;
        Ok(ServeClient::with(
            reader,
            writer,
            hello.negotiated,
            hello.server,
        ))
    }

    /// A client for a remote program whose handshake was already done (by the supervisor, for
    /// a warm session): `negotiated` and `server` are what that handshake found.
    pub fn resume(
        reader: R,
        writer: W,
        peer: &str,
        negotiated: ProtocolVersion,
        server: ProtocolVersion,
    ) -> Self {
        ServeClient::with(WireReader::new(reader, peer), writer, negotiated, server)
    }

    /// The client once the handshake is done, for the reader's peer.
    fn with(
        reader: WireReader<R>,
        writer: W,
        negotiated: ProtocolVersion,
        server: ProtocolVersion,
    ) -> Self {
        ServeClient {
            peer: reader.peer().to_owned(),
            reader,
            writer,
            version: negotiated,
            server,
            store_dir: "/nix/store".to_owned(),
        }
    }

    /// The streams back after the handshake, with what was read but not consumed, and the
    /// negotiated and the server's version (for [`ServeClient::resume`]).
    pub fn into_parts(self) -> (R, W, Vec<u8>, ProtocolVersion, ProtocolVersion) {
        let (reader, rest) = self.reader.into_parts();
        (reader, self.writer, rest, self.version, self.server)
    }

    pub fn server_version(&self) -> ProtocolVersion {
        self.server
    }

    pub async fn query_valid_paths(
        &mut self,
        paths: &[StorePath],
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, RemoteError> {
        let mut buf = Vec::new();
        serve::encode_query_valid_paths(&mut buf, false, substitute, paths);
        write_all(&mut self.writer, &buf, &self.peer).await?;
        Ok(self
            .reader
            .decode("the valid paths", serve::decode_path_set)
            .await?)
    }

    /// Path infos of the valid ones among `paths` (one round trip).
    pub async fn query_path_infos(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<PathInfo>, RemoteError> {
        let mut buf = Vec::new();
        serve::encode_query_path_infos(&mut buf, paths);
        write_all(&mut self.writer, &buf, &self.peer).await?;
        let v = self.version;
        Ok(self
            .reader
            .decode("the path infos", |r| serve::decode_path_infos(r, v))
            .await?)
    }

    /// Uploads paths (dependencies first), pipelined; see the module docs.
    pub async fn add_paths<S: NarSource>(
        &mut self,
        infos: &[PathInfo],
        source: &mut S,
    ) -> Result<(), RemoteError> {
        let mut buf = Vec::new();
        for info in infos {
            buf.clear();
            serve::encode_add_to_store_nar(&mut buf, info);
            write_all_noflush(&mut self.writer, &buf, &self.peer).await?;
            let mut sink = PlainSink {
                inner: &mut self.writer,
                peer: &self.peer,
            };
            source.copy_nar(info, &mut sink).await?;
        }
        write_all(&mut self.writer, &[], &self.peer).await?;
        for _ in infos {
            self.reader
                .decode("the upload acknowledgement", serve::decode_ok)
                .await?;
        }
        Ok(())
    }

    /// BuildDerivation; the log arrives on the server's stderr (the caller pumps it).
    pub async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        options: &BuildOptions,
    ) -> Result<BuildResult, RemoteError> {
        let mut buf = Vec::new();
        serve::encode_build_derivation(&mut buf, self.version, drv_path, drv, options);
        write_all(&mut self.writer, &buf, &self.peer).await?;
        let v = self.version;
        let store_dir = self.store_dir.clone();
        Ok(self
            .reader
            .decode("the build result", |r| {
                serve::decode_build_derivation_reply(r, v, &store_dir)
            })
            .await?)
    }

    /// DumpStorePath: streams the NAR of `info.path` (exactly `info.nar_size` bytes, the size
    /// its path info gave; the reply carries nothing else) into `sink`.
    pub async fn nar<S: NarSink>(
        &mut self,
        info: &PathInfo,
        sink: &mut S,
    ) -> Result<(), RemoteError> {
        let mut buf = Vec::new();
        serve::encode_dump_store_path(&mut buf, &info.path);
        write_all(&mut self.writer, &buf, &self.peer).await?;
        copy_nar(&mut self.reader, info.nar_size, sink).await
    }
}
