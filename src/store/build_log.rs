//! The build log: nix-daemon's fd 4, which the daemon tees into the log file, counts against
//! `max-build-log-size` and shows the user line by line. The store clients write a build's
//! output into it as it arrives; the phase goes to nix's progress bar as an `@nix` line.
//!
//! A daemon that stops reading is about to kill the hook: writes that fail are dropped, never
//! retried or buffered, and nothing here ever blocks the hook on the log.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use hook_protocol::log::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;

/// Where build output goes: nix-daemon's fd 4 (see the module docs).
#[derive(Clone, Default)]
pub struct BuildLog {
    out: Option<Arc<tokio::sync::Mutex<pipe::Sender>>>,
}

impl BuildLog {
    /// Takes fd 4 if the daemon gave us one (it always does; a hand-run hook may not have it).
    /// Call this first thing, before anything else opens a descriptor that could land on 4.
    pub fn claim_fd4() -> Option<OwnedFd> {
        if !crate::os::is_open(4) {
            return None;
        }
        // SAFETY: fd 4 is open (checked above), we are called before anything in this process
        // opened a descriptor, so nothing else owns it.
        Some(unsafe { OwnedFd::from_raw_fd(4) })
    }

    /// The log on a descriptor from [`BuildLog::claim_fd4`]. Must be called inside a tokio
    /// runtime.
    pub fn new(fd: Option<OwnedFd>) -> Self {
        let Some(fd) = fd else {
            return BuildLog::default();
        };
        match pipe::Sender::from_owned_fd(fd) {
            Ok(s) => BuildLog {
                out: Some(Arc::new(tokio::sync::Mutex::new(s))),
            },
            Err(e) => {
                tracing::debug!(error = %e, "fd 4 is not a pipe; build output is discarded");
                BuildLog::default()
            }
        }
    }

    /// Raw bytes, as a builder printed them.
    pub async fn raw(&self, data: &[u8]) {
        if let Some(out) = &self.out {
            // If the daemon stopped reading, it is about to kill us anyway.
            let _ = out.lock().await.write_all(data).await;
        }
    }

    /// One log line (without its newline).
    pub async fn line(&mut self, line: &str) {
        if let Some(out) = &self.out {
            let mut o = out.lock().await;
            let _ = o.write_all(line.as_bytes()).await;
            let _ = o.write_all(b"\n").await;
        }
    }

    /// A message from the remote (`STDERR_NEXT`): part of the log, like a builder's stderr.
    pub async fn message(&mut self, text: &str) {
        if text.ends_with('\n') {
            self.raw(text.as_bytes()).await;
        } else {
            self.line(text).await;
        }
    }

    /// The build's phase, shown in nix's progress bar.
    pub fn phase(&self, phase: &str) {
        crate::logging::send(&Message::SetPhase {
            phase: phase.to_owned(),
        });
    }
}
