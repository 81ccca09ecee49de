//! Descriptors over the supervisor's socket: one protocol line sent with file descriptors
//! attached (SCM_RIGHTS, on the line's first byte), and that line received with them. A warm
//! session reaches a hook this way ([`super::proto::Response::Session`]).
//!
//! Only the carrying: what the descriptors are is the caller's business. Received descriptors
//! are close-on-exec (`MSG_CMSG_CLOEXEC`), so no child of the hook inherits them.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;

/// The most descriptors one line carries.
pub const MAX_FDS: usize = 4;

/// Sends `line` (a whole protocol line) on `wr`'s socket with `fds` attached to its first
/// byte, then the rest of the line, if the first send took only part of it.
pub async fn send_line_with_fds(
    wr: &mut OwnedWriteHalf,
    line: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let stream: &UnixStream = wr.as_ref();
    if line.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors need a non-empty line, and at most MAX_FDS of them",
        ));
    }
    let sent = stream
        .async_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(io::Error::other(
                    "the descriptors do not fit the control buffer",
                ));
            }
            rustix::net::sendmsg(
                stream,
                &[IoSlice::new(line)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(io::Error::from)
        })
        .await?;
    if sent < line.len() {
        wr.write_all(&line[sent..]).await?;
    }
    Ok(())
}

/// Receives one line (at most `max` bytes, the newline included) from `stream` and every
/// descriptor that came with it. Nothing after the newline may be read yet: the caller reads
/// from the stream directly, with nothing buffered (a line follows only a request).
pub async fn recv_line_with_fds(
    stream: &UnixStream,
    max: usize,
) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut byte = [0u8; 512];
        let room = (max - line.len()).min(byte.len());
        if room == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an answer longer than {max} bytes"),
            ));
        }
        let got = stream
            .async_io(Interest::READABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                // Peek first, so that no byte past the newline is taken from the stream.
                let peeked = rustix::net::recv(stream.as_fd(), &mut byte[..room], RecvFlags::PEEK)
                    .map_err(io::Error::from)?
                    .0;
                let want = match byte[..peeked].iter().position(|&b| b == b'\n') {
                    Some(at) => at + 1,
                    None => peeked,
                };
                let want = want.max(1);
                let mut iov = [IoSliceMut::new(&mut byte[..want])];
                let msg =
                    rustix::net::recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
                        .map_err(io::Error::from)?;
                let mut got = Vec::new();
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(rights) = m {
                        got.extend(rights);
                    }
                }
                Ok((msg.bytes, got))
            })
            .await?;
        let (n, mut received) = got;
        fds.append(&mut received);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed before the answer's end",
            ));
        }
        line.extend_from_slice(&byte[..n]);
        if line.last() == Some(&b'\n') {
            return Ok((line, fds));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_line_and_its_descriptors_arrive_together() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, b) = UnixStream::pair().unwrap();
            let (mut x, y) = std::os::unix::net::UnixStream::pair().unwrap();
            let line = b"{\"reply\":\"session\"}\n";
            let (rd, mut wr) = a.into_split();
            send_line_with_fds(&mut wr, line, &[y.as_fd()])
                .await
                .unwrap();
            drop(y);
            drop(rd);
            // The next line is not taken with this one.
            let (got, fds) = {
                let (got, fds) = recv_line_with_fds(&b, 1024).await.unwrap();
                wr.write_all(b"next\n").await.unwrap();
                (got, fds)
            };
            assert_eq!(got, line);
            assert_eq!(fds.len(), 1);
            // The descriptor is the socket's other end, and close-on-exec.
            let flags = rustix::io::fcntl_getfd(&fds[0]).unwrap();
            assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
            let mut y = std::os::unix::net::UnixStream::from(fds.into_iter().next().unwrap());
            x.write_all(b"hi").unwrap();
            let mut two = [0u8; 2];
            y.read_exact(&mut two).unwrap();
            assert_eq!(&two, b"hi");
            let (next, none) = recv_line_with_fds(&b, 1024).await.unwrap();
            assert_eq!((next.as_slice(), none.len()), (&b"next\n"[..], 0));
        });
    }
}
