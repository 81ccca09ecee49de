//! The supervisor's view of a boot backend: start an instance, wait until it is ready, notice
//! when it exits, stop it. The runtime only talks to these two traits, so it can be tested with a
//! stand-in instance; [`BootBackend`] adapts the real backends in `crate::boot`.
//!
//! This module must never decide *when* to boot or stop (that is the machine in `state/`) and
//! never hold builder state; a [`RunningBuilder`] is owned by exactly one task in `server.rs`.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Instant;

use super::proto::{BootKind, TargetSpec};
use crate::config::Builder;

/// A boxed, sendable future (object-safe async trait methods).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where an instance may keep its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceContext {
    pub builder: String,
    /// `<state-dir>/builders/<name>`, created 0700 by the supervisor.
    pub dir: PathBuf,
}

/// Starts instances of lazy builders.
pub trait Backend: Send + Sync + 'static {
    /// Start `builder`'s instance (its processes in their own group, killed when the instance is
    /// dropped). Errors are one line saying what failed.
    fn start<'a>(
        &'a self,
        builder: &'a Builder,
        ctx: &'a InstanceContext,
    ) -> BoxFuture<'a, Result<Box<dyn RunningBuilder>, String>>;

    /// What [`start`](Self::start) will do for `builder` now, as far as can be told without
    /// starting it: the kind of boot, and why it is not a restore (`snapshot = true` only).
    /// `None`: the backend cannot tell (a plain cold boot, as far as the supervisor knows).
    fn plan<'a>(
        &'a self,
        builder: &'a Builder,
        ctx: &'a InstanceContext,
    ) -> BoxFuture<'a, Option<(BootKind, Option<String>)>> {
        let _ = (builder, ctx);
        Box::pin(async { None })
    }

    /// What to add to "boot timed out … while starting" (the start did not return within the
    /// builder's boot-timeout): what the instance's logs said last and which log to read.
    fn start_timed_out(&self, builder: &Builder, ctx: &InstanceContext) -> String {
        let _ = (builder, ctx);
        String::new()
    }
}

/// One running builder instance: the supervisor's view of a `crate::boot::Instance` (or of a
/// stand-in).
pub trait RunningBuilder: Send {
    /// The host port its sshd is reachable on, when the instance chose it at start.
    fn ssh_port(&self) -> Option<u16>;
    /// The main process, for logs.
    fn pid(&self) -> Option<u32>;
    /// Resolve once the builder answers on `port` (SSH banner, pinned host key, remote Nix),
    /// with the remote Nix version, or fail with one line; give up at `deadline`.
    fn wait_ready<'a>(
        &'a mut self,
        builder: &'a Builder,
        port: u16,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<String, String>>;
    /// Once ready: the SSH connection the readiness check made and its target, if it kept one
    /// (`crate::boot::Instance::take_link`).
    fn take_link(&mut self) -> Option<(TargetSpec, crate::ssh::Session)> {
        None
    }
    /// Resolve when the instance ends on its own, with a one-line report. Cancel-safe.
    fn exited(&mut self) -> BoxFuture<'_, String>;
    /// How it came up (known once it was started; a cold boot that makes a snapshot is
    /// [`BootKind::Make`]).
    fn boot_kind(&self) -> BootKind {
        BootKind::Cold
    }
    /// Once ready: whether the builder's next boot has a snapshot to restore (this one was
    /// restored from it, or made it).
    fn restorable(&self) -> bool {
        false
    }
    /// Once ready: why it was not restored, and why it made no snapshot, if it did not
    /// (`snapshot = true` only; one line).
    fn snapshot_note(&self) -> Option<String> {
        None
    }
    /// Stop it (`graceful`: power-down first; otherwise straight to the forced steps), each step
    /// bounded; resolves with a one-line report once every process is gone.
    fn stop(self: Box<Self>, graceful: bool) -> BoxFuture<'static, String>;
}

/// The real boot backends (`crate::boot`: qemu, darling, command).
#[derive(Clone, Debug, Default)]
pub struct BootBackend;

struct BootRunning {
    inner: crate::boot::Instance,
    builder: Builder,
    /// The builder's state directory (its logs).
    dir: PathBuf,
}

impl Backend for BootBackend {
    fn start<'a>(
        &'a self,
        builder: &'a Builder,
        ctx: &'a InstanceContext,
    ) -> BoxFuture<'a, Result<Box<dyn RunningBuilder>, String>> {
        Box::pin(async move {
            let lazy = builder
                .lazy
                .as_ref()
                .ok_or_else(|| format!("builder '{}' has no boot section", builder.name))?;
            let boot_ctx = crate::boot::BootContext::new(builder, ctx.dir.clone());
            let inner = crate::boot::start(&lazy.boot, &boot_ctx)
                .await
                .map_err(|e| {
                    crate::boot::console::failure_line(&e, &lazy.boot, &ctx.dir, lazy.boot_timeout)
                })?;
            Ok(Box::new(BootRunning {
                inner,
                builder: builder.clone(),
                dir: ctx.dir.clone(),
            }) as Box<dyn RunningBuilder>)
        })
    }

    fn plan<'a>(
        &'a self,
        builder: &'a Builder,
        ctx: &'a InstanceContext,
    ) -> BoxFuture<'a, Option<(BootKind, Option<String>)>> {
        Box::pin(async move {
            let lazy = builder.lazy.as_ref()?;
            let boot_ctx = crate::boot::BootContext::new(builder, ctx.dir.clone());
            // An error here (QEMU missing, …) is the start's to report.
            match crate::boot::next_boot(&lazy.boot, &boot_ctx).await.ok()? {
                crate::boot::NextBoot::Cold => Some((BootKind::Cold, None)),
                crate::boot::NextBoot::Restore(_) => Some((BootKind::Restore, None)),
                crate::boot::NextBoot::MakeSnapshot { why } => Some((BootKind::Make, Some(why))),
            }
        })
    }

    fn start_timed_out(&self, builder: &Builder, ctx: &InstanceContext) -> String {
        match &builder.lazy {
            Some(l) => crate::boot::console::start_timed_out(&l.boot, &ctx.dir, l.boot_timeout),
            None => String::new(),
        }
    }
}

impl RunningBuilder for BootRunning {
    fn ssh_port(&self) -> Option<u16> {
        self.inner.ssh_port()
    }

    fn pid(&self) -> Option<u32> {
        self.inner.pid()
    }

    fn wait_ready<'a>(
        &'a mut self,
        builder: &'a Builder,
        port: u16,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let r = crate::boot::wait_ready(builder, port, &mut self.inner, deadline).await;
            r.map(|r| r.nix_version).map_err(|e| match &builder.lazy {
                Some(l) => {
                    crate::boot::console::failure_line(&e, &l.boot, &self.dir, l.boot_timeout)
                }
                None => e.to_string(),
            })
        })
    }

    fn take_link(&mut self) -> Option<(TargetSpec, crate::ssh::Session)> {
        self.inner.take_link()
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            let report = self.inner.exited().await.to_string();
            match &self.builder.lazy {
                Some(l) => report + &crate::boot::console::log_note(&l.boot, &self.dir),
                None => report,
            }
        })
    }

    fn boot_kind(&self) -> BootKind {
        match (self.inner.boot_kind(), self.inner.snapshot_note()) {
            (crate::boot::BootKind::Restored, _) => BootKind::Restore,
            (crate::boot::BootKind::Cold, Some(_)) => BootKind::Make,
            (crate::boot::BootKind::Cold, None) => BootKind::Cold,
        }
    }

    fn restorable(&self) -> bool {
        self.inner.boot_kind() == crate::boot::BootKind::Restored
            || matches!(self.inner.snapshot_made(), Some(Ok(())))
    }

    fn snapshot_note(&self) -> Option<String> {
        let note = self.inner.snapshot_note()?;
        Some(match self.inner.snapshot_made() {
            Some(Err(why)) => format!("{note}; cannot make one: {why}"),
            _ => note.to_owned(),
        })
    }

    fn stop(self: Box<Self>, graceful: bool) -> BoxFuture<'static, String> {
        let how = if graceful {
            crate::boot::StopHow::graceful(Some(&self.builder))
        } else {
            crate::boot::StopHow::forced()
        };
        Box::pin(async move { self.inner.stop(how).await.to_string() })
    }
}
