//! NAR streams between the store clients: what produces a path's NAR ([`NarSource`], the local
//! store in practice) and where its bytes go ([`NarSink`]: a plain stream for `ssh://`, a framed
//! one for the worker protocol, the unpacker for a download), moved in bounded chunks so a NAR
//! is never held whole; and the writes every client uses, which name the peer in their errors.
//!
//! It moves bytes and never looks at them: a NAR is checked by `place` when it is unpacked.

use hook_protocol::path_info::PathInfo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::RemoteError;
use crate::wire_io::WireReader;

/// Produces the NAR of a path into a sink (the local store's NarFromPath, in practice).
pub trait NarSource {
    fn copy_nar<W: NarSink>(
        &mut self,
        info: &PathInfo,
        sink: &mut W,
    ) -> impl std::future::Future<Output = Result<(), RemoteError>>;
}

/// Where NAR bytes go: a plain stream, or a framed one.
pub trait NarSink {
    fn write(&mut self, data: &[u8]) -> impl std::future::Future<Output = Result<(), RemoteError>>;

    /// Moves the next chunk (1 to `max` bytes) from `reader` into the sink; returns its length.
    /// A sink that keeps the bytes (hands them to another thread) takes them owned instead,
    /// with [`WireReader::take_raw_chunk`].
    fn write_from<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut WireReader<R>,
        max: usize,
    ) -> impl std::future::Future<Output = Result<usize, RemoteError>> {
        async move {
            let chunk = reader.read_raw_chunk(max, "a NAR").await?;
            self.write(chunk).await?;
            Ok(chunk.len())
        }
    }
}

/// Moves exactly `len` raw bytes from `reader` into `sink`, in bounded chunks.
pub(super) async fn copy_nar<R, W>(
    reader: &mut WireReader<R>,
    mut len: u64,
    sink: &mut W,
) -> Result<(), RemoteError>
where
    R: AsyncRead + Unpin,
    W: NarSink,
{
    while len > 0 {
        let max = len.min(1 << 20) as usize;
        len -= sink.write_from(reader, max).await? as u64;
    }
    Ok(())
}

/// A plain byte stream as a [`NarSink`].
pub struct PlainSink<'a, W> {
    pub inner: &'a mut W,
    pub peer: &'a str,
}

impl<W: AsyncWrite + Unpin> NarSink for PlainSink<'_, W> {
    async fn write(&mut self, data: &[u8]) -> Result<(), RemoteError> {
        write_all_noflush(self.inner, data, self.peer).await
    }
}

pub(super) async fn write_all_noflush<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    peer: &str,
) -> Result<(), RemoteError> {
    w.write_all(buf).await.map_err(|source| RemoteError::Write {
        peer: peer.to_owned(),
        source,
    })
}

pub(super) async fn write_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    peer: &str,
) -> Result<(), RemoteError> {
    write_all_noflush(w, buf, peer).await?;
    w.flush().await.map_err(|source| RemoteError::Write {
        peer: peer.to_owned(),
        source,
    })
}
