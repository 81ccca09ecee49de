//! The async adapter that puts `hook-protocol`'s sans-IO decoders on pipes and sockets.
//!
//! [`WireReader`] owns a growable buffer in front of any `AsyncRead`: it runs a decoder over
//! the buffered bytes, reads more when the decoder says the input is incomplete, and turns
//! end-of-file in the middle of a message into a clear error. Raw, unframed payloads (NARs) are
//! passed through by [`WireReader::copy_raw`] / [`WireReader::read_raw_chunk`] in bounded chunks,
//! so a payload of any size never sits in memory whole. This module never interprets what it
//! carries.

use hook_protocol::wire::{DecodeError, Invalid, Reader};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Smallest read we ask the peer for; large enough for good throughput on pipes and channels.
const READ_CHUNK: usize = 64 * 1024;

/// Why reading a message failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{peer} closed the connection while we were reading {what}")]
    UnexpectedEof { peer: String, what: &'static str },
    #[error("{peer} sent something invalid while we were reading {what}: {source}")]
    Invalid {
        peer: String,
        what: &'static str,
        #[source]
        source: Invalid,
    },
    #[error("I/O error talking to {peer}: {source}")]
    Io {
        peer: String,
        #[source]
        source: std::io::Error,
    },
}

/// A buffered reader that decodes Nix wire messages from an async byte stream.
pub struct WireReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    peer: String,
}

impl<R: AsyncRead + Unpin> WireReader<R> {
    /// `peer` names the other side in error messages (e.g. `ssh-ng://root@host`).
    pub fn new(inner: R, peer: impl Into<String>) -> Self {
        WireReader {
            inner,
            buf: Vec::with_capacity(READ_CHUNK),
            start: 0,
            peer: peer.into(),
        }
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Bytes read from the peer but not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The stream back, with the bytes read from it but not consumed yet.
    pub fn into_parts(mut self) -> (R, Vec<u8>) {
        let rest = self.buf.split_off(self.start);
        (self.inner, rest)
    }

    fn io_err(&self, source: std::io::Error) -> WireError {
        WireError::Io {
            peer: self.peer.clone(),
            source,
        }
    }

    /// Reads at least `min` more bytes into the buffer (or fails with EOF).
    async fn fill(&mut self, min: usize, what: &'static str) -> Result<(), WireError> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > READ_CHUNK && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let target = self.buf.len() + min.max(1);
        // Read into spare capacity (no zero-filling, so a long message arriving in many small
        // reads costs linear time), reserving as the bytes come rather than what a length
        // prefix announced: a peer's claim alone never costs memory.
        self.buf
            .reserve((target - self.buf.len()).clamp(READ_CHUNK, 16 * READ_CHUNK));
        while self.buf.len() < target {
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(READ_CHUNK);
            }
            let n = match self.inner.read_buf(&mut self.buf).await {
                Ok(n) => n,
                Err(e) => return Err(self.io_err(e)),
            };
            if n == 0 {
                return Err(WireError::UnexpectedEof {
                    peer: self.peer.clone(),
                    what,
                });
            }
        }
        Ok(())
    }

    /// Decodes one message with `f`, reading more input until `f` no longer reports
    /// [`DecodeError::Incomplete`]. `f` is re-run from the message's first byte each time.
    pub async fn decode<T>(
        &mut self,
        what: &'static str,
        mut f: impl for<'a> FnMut(&mut Reader<'a>) -> Result<T, DecodeError>,
    ) -> Result<T, WireError> {
        loop {
            let mut r = Reader::new(&self.buf[self.start..]);
            match f(&mut r) {
                Ok(v) => {
                    self.start += r.position();
                    return Ok(v);
                }
                Err(DecodeError::Incomplete { needed }) => self.fill(needed, what).await?,
                Err(DecodeError::Invalid(source)) => {
                    return Err(WireError::Invalid {
                        peer: self.peer.clone(),
                        what,
                        source,
                    });
                }
            }
        }
    }

    /// Hands out up to `max` raw bytes (at least one), from the buffer first, then the stream.
    /// Used to pass unframed payloads through without holding them whole.
    pub async fn read_raw_chunk(
        &mut self,
        max: usize,
        what: &'static str,
    ) -> Result<&[u8], WireError> {
        if self.start == self.buf.len() {
            self.fill(1, what).await?;
        }
        let n = (self.buf.len() - self.start).min(max);
        let chunk = &self.buf[self.start..self.start + n];
        self.start += n;
        Ok(chunk)
    }

    /// [`WireReader::read_raw_chunk`], owned: when the chunk is the whole buffer, the buffer
    /// itself (a fresh one takes its place), so a consumer on another thread gets the bytes
    /// without a copy.
    pub async fn take_raw_chunk(
        &mut self,
        max: usize,
        what: &'static str,
    ) -> Result<Vec<u8>, WireError> {
        if self.start == self.buf.len() {
            self.fill(1, what).await?;
        }
        if self.start == 0 && self.buf.len() <= max {
            return Ok(std::mem::replace(
                &mut self.buf,
                Vec::with_capacity(READ_CHUNK),
            ));
        }
        Ok(self.read_raw_chunk(max, what).await?.to_vec())
    }

    /// Copies exactly `len` raw bytes to `out`, calling `inspect` on each chunk first.
    pub async fn copy_raw<W: AsyncWrite + Unpin>(
        &mut self,
        mut len: u64,
        out: &mut W,
        what: &'static str,
        mut inspect: impl FnMut(&[u8]),
    ) -> Result<(), CopyError> {
        while len > 0 {
            let max = len.min(1 << 20) as usize;
            let chunk = self.read_raw_chunk(max, what).await?;
            inspect(chunk);
            len -= chunk.len() as u64;
            out.write_all(chunk).await.map_err(CopyError::Write)?;
        }
        Ok(())
    }
}

/// A failure while copying a raw payload from one peer to another.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Read(#[from] WireError),
    #[error("writing: {0}")]
    Write(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use hook_protocol::wire::WireWrite;

    /// A reader that yields its data one byte per read, to exercise every Incomplete path.
    struct Trickle(Vec<u8>, usize);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.1 < self.0.len() && buf.remaining() > 0 {
                let b = self.0[self.1];
                buf.put_slice(&[b]);
                self.1 += 1;
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    #[test]
    fn decodes_across_partial_reads_then_passes_raw_bytes() {
        let mut data = Vec::new();
        data.put_strings(["a", "bcdefghij"]);
        data.put_u64(7);
        data.extend_from_slice(b"RAWPAYLOAD");
        rt().block_on(async {
            let mut r = WireReader::new(Trickle(data, 0), "test");
            let v = r.decode("list", |r| r.strings("items")).await.unwrap();
            assert_eq!(v, ["a", "bcdefghij"]);
            assert_eq!(r.decode("n", |r| r.u64()).await.unwrap(), 7);
            let mut out = Vec::new();
            let mut seen = 0;
            r.copy_raw(10, &mut out, "payload", |c| seen += c.len())
                .await
                .unwrap();
            assert_eq!(out, b"RAWPAYLOAD");
            assert_eq!(seen, 10);
            let e = r.decode("n", |r| r.u64()).await.unwrap_err();
            assert!(
                matches!(e, WireError::UnexpectedEof { what: "n", .. }),
                "{e}"
            );
        });
    }

    /// Owned chunks carry the same bytes as borrowed ones: what a decode left in the buffer
    /// first, then whole reads, never more than asked for.
    #[test]
    fn owned_chunks_carry_the_payload() {
        let mut data = Vec::new();
        data.put_u64(7);
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        data.extend_from_slice(&payload);
        rt().block_on(async {
            let mut r = WireReader::new(&data[..], "test");
            assert_eq!(r.decode("n", |r| r.u64()).await.unwrap(), 7);
            let mut got = Vec::new();
            while got.len() < payload.len() {
                let max = (payload.len() - got.len()).min(100_000);
                let chunk = r.take_raw_chunk(max, "payload").await.unwrap();
                assert!(!chunk.is_empty() && chunk.len() <= max);
                got.extend_from_slice(&chunk);
            }
            assert!(got == payload);
            let e = r.take_raw_chunk(1, "payload").await.unwrap_err();
            assert!(matches!(e, WireError::UnexpectedEof { .. }), "{e}");
        });
    }

    #[test]
    fn invalid_is_reported_with_peer_and_what() {
        let mut data = Vec::new();
        data.put_u64(3);
        data.extend_from_slice(b"abc\x01\0\0\0\0");
        rt().block_on(async {
            let mut r = WireReader::new(&data[..], "ssh://builder");
            let e = r.decode("greeting", |r| r.string("g")).await.unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("ssh://builder") && msg.contains("greeting"),
                "{msg}"
            );
        });
    }
}
