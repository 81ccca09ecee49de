//! Framed streams (docs/protocol.md §2): chunks of `u64 length, bytes` with no padding, ended
//! by an empty chunk, which carry uploads from worker 1.23 on.
//!
//! Owns [`encode_frame`], the incremental [`FrameDecoder`] (which never buffers or allocates,
//! so chunks of any size stream through) and [`decode_frame`] for bounded whole chunks. Must
//! never interpret the payload.

use crate::wire::{self, Invalid, Reader, WireWrite};

/// Appends one framed-stream chunk. Empty data writes nothing (a zero-length chunk would end the
/// stream).
pub fn encode_frame(w: &mut Vec<u8>, data: &[u8]) {
    if !data.is_empty() {
        w.put_u64(data.len() as u64);
        w.extend_from_slice(data);
    }
}

/// Ends a framed stream.
pub fn encode_frame_end(w: &mut Vec<u8>) {
    w.put_u64(0);
}

/// What [`FrameDecoder::decode`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Payload bytes (possibly part of a chunk).
    Data(&'a [u8]),
    /// The terminating zero-length chunk.
    End,
}

/// Incremental framed-stream decoder: feed it whatever bytes arrived; it never buffers or
/// allocates, so chunks of any size stream through.
#[derive(Debug, Clone, Default)]
pub struct FrameDecoder {
    remaining: u64,
    done: bool,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the end chunk has been decoded.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Consumes a prefix of `input`. Returns how many bytes were consumed and, if any, the next
    /// payload slice or the end. `(n, None)` means "feed more bytes" (after dropping the `n`
    /// consumed ones). After the end, returns `(0, Some(End))`: the bytes after it belong to the
    /// next message.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> (usize, Option<Frame<'a>>) {
        if self.done {
            return (0, Some(Frame::End));
        }
        let mut used = 0;
        if self.remaining == 0 {
            let Some(header) = input.get(..8) else {
                return (0, None);
            };
            let mut len = [0u8; 8];
            len.copy_from_slice(header);
            used = 8;
            self.remaining = u64::from_le_bytes(len);
            if self.remaining == 0 {
                self.done = true;
                return (used, Some(Frame::End));
            }
        }
        let avail = (input.len() - used) as u64;
        let take = avail.min(self.remaining) as usize;
        if take == 0 {
            return (used, None);
        }
        self.remaining -= take as u64;
        (used + take, Some(Frame::Data(&input[used..used + take])))
    }
}

/// Decodes one whole chunk: `Some(payload)`, or `None` for the end chunk. Chunks longer than
/// `limit` are [`Invalid`] (use [`FrameDecoder`] to stream chunks of any size).
pub fn decode_frame<'a>(r: &mut Reader<'a>, limit: u64) -> wire::Result<Option<&'a [u8]>> {
    let len = r.u64()?;
    if len == 0 {
        return Ok(None);
    }
    if len > limit {
        return Err(Invalid::TooLong {
            what: "framed chunk",
            len,
            limit,
        }
        .into());
    }
    r.raw(len as usize).map(Some)
}
