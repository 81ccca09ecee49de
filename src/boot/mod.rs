//! Boot backends: start a lazy builder's machine (a QEMU VM, a Darling prefix's sshd, or any
//! foreground command), tell when it is ready, notice when it ends, and stop it.
//!
//! Owns: the backend processes (each the leader of its own process group, killed as a group
//! when its [`Instance`] is dropped or the supervisor dies, always reaped; see `child.rs`), their
//! log files in the builder's state directory, the QEMU command line and QMP, and the readiness
//! check ([`wait_ready`]: SSH banner, handshake with the pinned host key, remote Nix version).
//!
//! Must never: decide *when* to boot or stop (the supervisor does), listen on anything but
//! 127.0.0.1, accept an unpinned host key, or leave a process behind.
//!
//! The three backends sit behind one small enum inside [`Instance`]:
//! - `qemu` (`qemu.rs`): builds the QEMU command line itself, or wraps a NixOS VM runner
//!   script; probes KVM/HVF and falls back to TCG; stops with ACPI power-down or `poweroff`
//!   over SSH, then QMP `quit`, then signals.
//! - `darling` (`darling.rs`): `darling shell /usr/sbin/sshd -D -f CONFIG` with `DPREFIX`
//!   selecting the prefix; stopped with `darling shutdown`.
//! - `command` (`command.rs`): any foreground command; stopped by a stop command or a signal.

pub mod agent;
mod check;
mod child;
mod command;
pub mod console;
mod darling;
mod logs;
pub mod qemu;
pub mod qmp;
mod ready;
mod restore;
pub mod snapshot;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{BootSpec, Builder};

pub use check::check_spec;
pub use qemu::AccelUsed;
pub use ready::Ready;

/// Where and for whom an instance runs.
#[derive(Clone, Debug, PartialEq)]
pub struct BootContext {
    /// The builder's name (messages, QEMU's `-name`).
    pub builder: String,
    /// Per-builder state directory (0700, exists): logs, QMP socket, overlay, probe verdicts.
    pub dir: PathBuf,
    /// The builder's systems: a QEMU builder's binary (`qemu-system-<arch>`) and its stop
    /// method follow from them.
    pub systems: Vec<String>,
    /// The port in the builder's URI: the host port a QEMU builder forwards to the guest's
    /// port 22 when its boot section has no `ssh-port`.
    pub uri_port: Option<u16>,
    /// The whole builder: a restore checks readiness itself, with its SSH settings.
    pub config: Builder,
}

impl BootContext {
    /// The context for `builder`, with `dir` as its state directory.
    pub fn new(builder: &Builder, dir: PathBuf) -> Self {
        BootContext {
            builder: builder.name.clone(),
            dir,
            systems: builder.systems.iter().cloned().collect(),
            uri_port: builder.uri.port,
            config: builder.clone(),
        }
    }
}

/// Why a boot (start or readiness) failed. Displays as one line that says what failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The program to run is not there.
    #[error("{what} not found: {detail}")]
    NotFound { what: String, detail: String },
    /// The program could not be started.
    #[error("cannot start {what} ({}): {source}", program.display())]
    Spawn {
        what: String,
        program: PathBuf,
        source: std::io::Error,
    },
    /// Preparing the state directory (logs, sockets, overlay) failed.
    #[error("{what} ({}): {source}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The configuration cannot be run as given.
    #[error("{0}")]
    Config(String),
    /// A helper command (`qemu-img`) failed.
    #[error("{0}")]
    Helper(String),
    /// The backend process ended before the builder was ready.
    #[error("{}", exited_message(report, during))]
    Exited {
        report: ExitReport,
        /// "during boot", "before it was ready".
        during: &'static str,
    },
    /// QMP failed while starting the VM.
    #[error("{0}")]
    Qmp(#[from] qmp::QmpError),
    /// Readiness: no SSH banner before the deadline.
    #[error("{}", no_banner_message(addr, *after, last, *forwarded))]
    NoBanner {
        /// `host:port` that was tried.
        addr: String,
        after: Duration,
        last: String,
        /// `addr` is QEMU's port forward: it takes connections whether or not the guest is up.
        forwarded: bool,
    },
    /// Readiness: the banner came but SSH never worked before the deadline.
    #[error("SSH on {addr} answered but was not usable within boot-timeout (waited {}): {last}", fmt_secs(*after))]
    SshNotReady {
        addr: String,
        after: Duration,
        last: String,
    },
    /// Readiness: SSH works but the remote Nix never answered before the deadline.
    #[error("remote Nix on {addr} did not answer within boot-timeout (waited {}): {last}", fmt_secs(*after))]
    NixNotReady {
        addr: String,
        after: Duration,
        last: String,
    },
    /// An SSH failure retrying cannot fix (wrong host key, unreadable key file, …).
    #[error("{0}")]
    Ssh(Box<crate::ssh::SshError>),
    /// The builder's SSH settings cannot be used (e.g. an unreadable known_hosts file).
    #[error("{0}")]
    SshSetup(String),
}

impl BootError {
    /// Whether the builder ran out of its boot-timeout while the readiness check waited.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            BootError::NoBanner { .. }
                | BootError::SshNotReady { .. }
                | BootError::NixNotReady { .. }
        )
    }
}

/// What "no banner" means. Behind QEMU's port forward an accepted connection says nothing about
/// the guest (slirp accepts at once and only then tries the guest), so the message is about the
/// guest; elsewhere it is about the address.
fn no_banner_message(addr: &str, after: Duration, last: &str, forwarded: bool) -> String {
    if !forwarded {
        return format!(
            "no SSH banner on {addr} within boot-timeout (waited {}; last try: {last})",
            fmt_secs(after)
        );
    }
    // Slirp's own answers while the guest is silent: they describe the forward, not the guest.
    let slirp = last.starts_with("connected, but no")
        || last.starts_with("connection closed before a banner");
    format!(
        "the guest did not answer on SSH within boot-timeout (waited {}): QEMU's port forward \
         {addr} took the connections, but nothing in the guest answered behind it{}",
        fmt_secs(after),
        if slirp {
            String::new()
        } else {
            format!(" (last try: {last})")
        }
    )
}

fn exited_message(r: &ExitReport, during: &str) -> String {
    let mut s = format!(
        "{} {} {during} (after {})",
        r.what,
        child::describe_status(&r.status),
        fmt_elapsed(r.uptime)
    );
    if let Some(l) = &r.last_line {
        s.push_str(": ");
        s.push_str(l);
    }
    s
}

/// Whole seconds, rounded to the nearest (a deadline of "3s" is reached after 2.99 s of
/// waiting that started a moment after the boot: say 3s, not 2s).
fn fmt_secs(d: Duration) -> String {
    let secs = (d.as_millis() + 500) / 1000;
    humantime::format_duration(Duration::from_secs(
        u64::try_from(secs).unwrap_or(u64::MAX).max(1),
    ))
    .to_string()
}

fn fmt_elapsed(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{:.2}s", d.as_secs_f64())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// How a backend process ended on its own (or was ended).
#[derive(Clone, Debug)]
pub struct ExitReport {
    /// "qemu", "darling", "command `/path/start`".
    pub what: String,
    pub pid: u32,
    /// The exit status, or why waiting failed.
    pub status: Result<std::process::ExitStatus, String>,
    /// From start to exit.
    pub uptime: Duration,
    /// The last line of its log (stderr first, then the console), for the message.
    pub last_line: Option<String>,
}

impl ExitReport {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        matches!(&self.status, Ok(s) if s.success())
    }
}

impl fmt::Display for ExitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} after {}",
            self.what,
            child::describe_status(&self.status),
            fmt_elapsed(self.uptime)
        )?;
        if let Some(l) = &self.last_line {
            write!(f, ": {l}")?;
        }
        Ok(())
    }
}

/// How to stop an instance.
#[derive(Clone, Debug)]
pub struct StopHow {
    /// Try the backend's graceful step first (ACPI power-down / `poweroff` over SSH /
    /// `darling shutdown` / stop command or signal); `false` goes straight to the forced steps.
    pub graceful: bool,
    /// The builder, to run `poweroff` over SSH in a VM without ACPI power button (aarch64 with
    /// Debian's cloud kernel). Without it such a VM goes straight to QMP `quit`.
    pub builder: Option<Builder>,
    /// Limit of the graceful step (until the process has exited).
    pub graceful_timeout: Duration,
    /// Limit of QMP `quit` (qemu only).
    pub quit_timeout: Duration,
    /// Limit after SIGTERM to the group, and again after SIGKILL.
    pub signal_timeout: Duration,
}

impl StopHow {
    /// Graceful first; `builder` enables `poweroff` over SSH where ACPI is absent.
    pub fn graceful(builder: Option<&Builder>) -> Self {
        StopHow {
            graceful: true,
            builder: builder.cloned(),
            graceful_timeout: Duration::from_secs(15),
            quit_timeout: Duration::from_secs(5),
            signal_timeout: Duration::from_secs(5),
        }
    }

    /// Straight to QMP `quit` (qemu) and signals.
    pub fn forced() -> Self {
        StopHow {
            graceful: false,
            ..StopHow::graceful(None)
        }
    }
}

/// The step that ended an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopStep {
    /// It had already exited when `stop` was called.
    AlreadyExited,
    /// QMP `system_powerdown` (ACPI power button).
    AcpiPowerdown,
    /// `poweroff` run over SSH.
    SshPoweroff,
    /// `darling shutdown`.
    DarlingShutdown,
    /// The builder's `stop-command`.
    StopCommand,
    /// The builder's `stop-signal`, sent to the process group.
    StopSignal(i32),
    /// QMP `quit`.
    QmpQuit,
    /// SIGTERM to the process group.
    Term,
    /// SIGKILL to the process group.
    Kill,
    /// Still not gone after SIGKILL (stuck in the kernel): left to the background reaper.
    Abandoned,
}

impl fmt::Display for StopStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopStep::AlreadyExited => f.write_str("nothing (it had already exited)"),
            StopStep::AcpiPowerdown => f.write_str("QMP system_powerdown"),
            StopStep::SshPoweroff => f.write_str("poweroff over SSH"),
            StopStep::DarlingShutdown => f.write_str("darling shutdown"),
            StopStep::StopCommand => f.write_str("the stop command"),
            StopStep::StopSignal(s) => match child::signal_name(*s) {
                Some(n) => write!(f, "{n}"),
                None => write!(f, "signal {s}"),
            },
            StopStep::QmpQuit => f.write_str("QMP quit"),
            StopStep::Term => f.write_str("SIGTERM to the process group"),
            StopStep::Kill => f.write_str("SIGKILL to the process group"),
            StopStep::Abandoned => f.write_str("nothing: it survived SIGKILL"),
        }
    }
}

/// What `stop` did.
#[derive(Clone, Debug)]
pub struct StopReport {
    /// The step after which the process was gone.
    pub step: StopStep,
    /// From the `stop` call until the process was reaped.
    pub took: Duration,
    /// How it ended; `None` only for [`StopStep::Abandoned`].
    pub exit: Option<ExitReport>,
    /// Steps that were tried before and did not end it, with why.
    pub failed_steps: Vec<String>,
}

impl fmt::Display for StopReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.exit {
            Some(exit) => write!(
                f,
                "{} stopped by {} in {} ({})",
                exit.what,
                self.step,
                fmt_elapsed(self.took),
                child::describe_status(&exit.status)
            )?,
            None => write!(
                f,
                "not stopped after {}: {}",
                fmt_elapsed(self.took),
                self.step
            )?,
        }
        if !self.failed_steps.is_empty() {
            write!(f, "; before that: {}", self.failed_steps.join("; "))?;
        }
        Ok(())
    }
}

/// How an instance came up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootKind {
    /// Booted from scratch.
    Cold,
    /// Restored from a snapshot (`snapshot = true`).
    Restored,
}

/// The backend-specific part of a running instance.
enum Kind {
    Qemu(qemu::Vm),
    Darling(darling::Container),
    Command(command::Cmd),
}

/// A started builder machine. Dropping it kills its whole process group.
pub struct Instance {
    kind: Kind,
    child: child::Child,
    what: String,
    started: Instant,
    ssh_port: Option<u16>,
    /// Log files, most telling first, for the last line of an [`ExitReport`].
    logs: Vec<PathBuf>,
    /// Readiness already checked while starting (a restore): [`wait_ready`] returns it.
    ready: Option<Ready>,
    /// The SSH connection the readiness check made, while nobody took it
    /// ([`Instance::take_link`]); it closes with the instance.
    link: Option<(crate::supervisor::proto::TargetSpec, crate::ssh::Session)>,
}

/// What the next boot of a builder will do, as far as can be told without booting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NextBoot {
    /// A plain cold boot (no `snapshot = true`, or not a qemu builder).
    Cold,
    /// A restore of this snapshot (unless QEMU rejects it: then a cold boot at once).
    Restore(Box<snapshot::Meta>),
    /// A cold boot that makes a snapshot, and why there is none to restore.
    MakeSnapshot { why: String },
}

/// [`NextBoot`] for `spec` in `ctx` (reads the snapshot's metadata, checks its files, and runs
/// `qemu --version` once per QEMU binary): for `status`, `doctor` and the progress line.
pub async fn next_boot(spec: &BootSpec, ctx: &BootContext) -> Result<NextBoot, BootError> {
    match spec {
        BootSpec::Qemu(q) if q.snapshot && q.runner.is_none() => qemu::next_boot(q, ctx).await,
        _ => Ok(NextBoot::Cold),
    }
}

/// One line of what `doctor` says about a `snapshot = true` builder before booting it:
/// `ok: false` means a snapshot may not be made or restored, and `detail` says why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotCheck {
    pub ok: bool,
    pub detail: String,
}

/// For `doctor`, before a boot: what the next boot of a `snapshot = true` builder does (a
/// restore, or a cold boot that makes a snapshot, and why), where a cold boot keeps the
/// guest's RAM (`/dev/shm` when it has room), and whether the state directory has room for
/// the snapshot's files. `None` for any other builder. Whether the image runs the guest agent
/// only a boot can tell (a snapshot is made only once the agent answered).
pub async fn snapshot_checks(spec: &BootSpec, ctx: &BootContext) -> Option<Vec<SnapshotCheck>> {
    let BootSpec::Qemu(q) = spec else {
        return None;
    };
    if !q.snapshot || q.runner.is_some() {
        return None;
    }
    let mut rows = Vec::new();
    let now = std::time::SystemTime::now();
    rows.push(match next_boot(spec, ctx).await {
        Ok(NextBoot::Restore(meta)) => {
            let info = snapshot::info(&ctx.dir);
            SnapshotCheck {
                ok: true,
                detail: format!(
                    "the next boot restores the snapshot made {} ago ({} on disk; {}, {})",
                    info.as_ref()
                        .map_or_else(|| "?".to_owned(), |i| fmt_age(i.age(now))),
                    info.as_ref()
                        .map_or_else(|| "?".to_owned(), |i| fmt_bytes(i.disk_bytes)),
                    meta.accel,
                    meta.nix_version
                ),
            }
        }
        Ok(NextBoot::MakeSnapshot { why }) => SnapshotCheck {
            ok: true,
            detail: format!("the next boot is cold and makes a snapshot: {why}"),
        },
        Ok(NextBoot::Cold) => SnapshotCheck {
            ok: false,
            detail: "the next boot is cold and makes no snapshot".to_owned(),
        },
        Err(e) => SnapshotCheck {
            ok: false,
            detail: format!("cannot tell what the next boot does: {e}"),
        },
    });
    let memory_mib = q.memory_mib.unwrap_or(qemu::DEFAULT_MEMORY_MIB);
    let memory = memory_mib * 1024 * 1024;
    let (place, free) = restore::live_ram_place(&ctx.dir, memory_mib);
    let free_text = free.map_or_else(|| "unknown".to_owned(), fmt_bytes);
    rows.push(if place == Path::new("/dev/shm") {
        SnapshotCheck {
            ok: true,
            detail: format!(
                "a cold boot keeps the guest's {} of RAM in /dev/shm ({free_text} free)",
                fmt_bytes(memory)
            ),
        }
    } else {
        SnapshotCheck {
            ok: false,
            detail: format!(
                "/dev/shm has too little room for the guest's {} of RAM: a cold boot keeps it in {} ({free_text} free), and the guest's memory writes reach that disk",
                fmt_bytes(memory),
                place.display()
            ),
        }
    });
    let state_free = restore::free_bytes(&ctx.dir);
    rows.push(match state_free {
        Some(f) if f >= memory => SnapshotCheck {
            ok: true,
            detail: format!(
                "{} has {} free; a snapshot takes at most {} (the RAM the guest used)",
                ctx.dir.display(),
                fmt_bytes(f),
                fmt_bytes(memory)
            ),
        },
        other => SnapshotCheck {
            ok: false,
            detail: format!(
                "{} has {} free, and a snapshot may take up to {}: it may not fit",
                ctx.dir.display(),
                other.map_or_else(|| "unknown".to_owned(), fmt_bytes),
                fmt_bytes(memory)
            ),
        },
    });
    Some(rows)
}

/// "1.5 GiB", "212 MiB", "640 KiB".
pub fn fmt_bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let f = b as f64;
    if f >= K * K * K {
        format!("{:.1} GiB", f / (K * K * K))
    } else if f >= K * K {
        format!("{:.0} MiB", f / (K * K))
    } else {
        format!("{:.0} KiB", f / K)
    }
}

/// "45s", "12m", "3h05m", "2d04h".
pub fn fmt_age(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// Waits until the builder answers on `port` (`ready.rs`: SSH banner, handshake with the
/// pinned host key, the remote Nix's `--version`), or fails: at once for a wrong host key or
/// the instance's exit, else at `deadline`. A restored instance was checked while it started
/// and answers at once. A cold boot of a `snapshot = true` builder is snapshotted here, once it
/// is ready and before anyone builds on it; failing to make the snapshot never fails the
/// boot (it is logged, and the next cold boot tries again).
pub async fn wait_ready(
    builder: &Builder,
    port: u16,
    instance: &mut Instance,
    deadline: impl Into<tokio::time::Instant>,
) -> Result<Ready, BootError> {
    if let Some(r) = instance.ready.take() {
        return Ok(r);
    }
    let deadline = deadline.into();
    let ready = ready::wait_ready(builder, port, instance, deadline).await?;
    if let Kind::Qemu(vm) = &mut instance.kind
        && let Some(pending) = vm.pending.take()
    {
        // No connection of ours may be in the snapshot's guest.
        if let Some((_, link)) = instance.link.take() {
            link.close().await;
        }
        let made =
            restore::make_logged(vm.builder(), pending, &mut instance.child, &ready, deadline)
                .await;
        vm.made = Some(made);
    }
    Ok(ready)
}

/// Starts `spec` for the builder described by `ctx`. Returns once the process runs (and, for
/// qemu, once QMP answered, the forwarded port is known and the accelerator probe is done);
/// readiness is [`wait_ready`]'s job.
pub async fn start(spec: &BootSpec, ctx: &BootContext) -> Result<Instance, BootError> {
    if !ctx.dir.is_dir() {
        return Err(BootError::Io {
            what: format!("state directory of builder '{}'", ctx.builder),
            path: ctx.dir.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        });
    }
    match spec {
        BootSpec::Qemu(q) => qemu::start(q, ctx).await,
        BootSpec::Darling(d) => darling::start(d, ctx).await,
        BootSpec::Command(c) => command::start(c, ctx).await,
    }
}

impl Instance {
    /// The host port the instance's sshd is forwarded to when the instance chose it (qemu);
    /// `None`: use the URI's port.
    pub fn ssh_port(&self) -> Option<u16> {
        self.ssh_port
    }

    /// Once ready: the SSH connection the readiness check made (pinned host key, the
    /// builder's key), with the target it was made to, for a first warm session to use
    /// instead of a new handshake. `None` once taken, or for a VM that was snapshotted since.
    pub fn take_link(
        &mut self,
    ) -> Option<(crate::supervisor::proto::TargetSpec, crate::ssh::Session)> {
        self.link.take()
    }

    /// The main process (the process group's leader).
    pub fn pid(&self) -> Option<u32> {
        Some(self.child.pid())
    }

    /// The accelerator a QEMU instance runs with (`None` for other backends).
    pub fn accel(&self) -> Option<AccelUsed> {
        match &self.kind {
            Kind::Qemu(vm) => Some(vm.accel()),
            _ => None,
        }
    }

    /// Restored from a snapshot or booted cold (every backend but a `snapshot = true` qemu
    /// builder boots cold).
    pub fn boot_kind(&self) -> BootKind {
        match &self.kind {
            Kind::Qemu(vm) => vm.how,
            _ => BootKind::Cold,
        }
    }

    /// For a `snapshot = true` builder that booted cold: why it was not restored ("there is no
    /// snapshot yet", "the configuration changed (memory 1024 → 2048 MiB)", "the restore failed:
    /// …").
    pub fn snapshot_note(&self) -> Option<&str> {
        match &self.kind {
            Kind::Qemu(vm) => vm.snapshot_note.as_deref(),
            _ => None,
        }
    }

    /// For a cold boot of a `snapshot = true` builder, once [`wait_ready`] returned: whether it
    /// made the snapshot, or why not ("the guest agent did not answer …").
    pub fn snapshot_made(&self) -> Option<Result<(), &str>> {
        match &self.kind {
            Kind::Qemu(vm) => vm
                .made
                .as_ref()
                .map(|r| r.as_ref().map(|_| ()).map_err(String::as_str)),
            _ => None,
        }
    }

    /// Whether the builder is reached through a port forwarded on 127.0.0.1 (qemu) rather
    /// than at the URI's host.
    pub fn forwards_to_localhost(&self) -> bool {
        matches!(self.kind, Kind::Qemu(_))
    }

    /// The backend's log files in the state directory (most telling first).
    pub fn logs(&self) -> &[PathBuf] {
        &self.logs
    }

    /// Resolves when the process ends on its own (or was killed). Cancel-safe; may be called
    /// again and gives the same report.
    pub async fn exited(&mut self) -> ExitReport {
        let exit = self.child.wait().await;
        self.report(exit)
    }

    /// `why` a step failed, unless the process ended meanwhile (or does within a moment):
    /// then its exit report, with its last words, says more.
    async fn exit_or(&mut self, why: String) -> String {
        match self.child.wait_for(Duration::from_millis(500)).await {
            Some(exit) => format!("{} ({why})", self.report(exit)),
            None => why,
        }
    }

    fn report(&self, exit: child::Exit) -> ExitReport {
        ExitReport {
            what: self.what.clone(),
            pid: self.child.pid(),
            status: exit.status,
            uptime: exit.at.saturating_duration_since(self.started),
            last_line: console::summary(&self.logs),
        }
    }

    /// Stops the instance: the graceful step (if asked), then (qemu) QMP `quit`, then SIGTERM
    /// and SIGKILL to the process group, each step bounded by its timeout. Resolves once the
    /// process is reaped (or, if even SIGKILL did not end it, after the last timeout).
    pub async fn stop(mut self, how: StopHow) -> StopReport {
        let t0 = Instant::now();
        if let Some(exit) = self.child.try_exit() {
            return self.finish(StopStep::AlreadyExited, t0, Some(exit), Vec::new());
        }
        let port = self.ssh_port;
        let mut s = Stopping {
            child: &mut self.child,
            how: &how,
            failed: Vec::new(),
        };
        let mut ended = None;
        if how.graceful {
            let step = match &mut self.kind {
                Kind::Qemu(vm) => vm.graceful(&mut s, port).await,
                Kind::Darling(c) => c.graceful(&mut s).await,
                Kind::Command(c) => c.graceful(&mut s).await,
            };
            ended = step;
        }
        if ended.is_none()
            && let Kind::Qemu(vm) = &mut self.kind
        {
            ended = vm.quit(&mut s).await;
        }
        let step = match ended {
            Some(step) => step,
            None => s.forced().await,
        };
        let failed = s.failed;
        let exit = self.child.try_exit();
        self.finish(step, t0, exit, failed)
    }

    fn finish(
        mut self,
        step: StopStep,
        t0: Instant,
        exit: Option<child::Exit>,
        failed_steps: Vec<String>,
    ) -> StopReport {
        if exit.is_some()
            && let Kind::Qemu(vm) = &mut self.kind
        {
            vm.cleanup();
        }
        let report = StopReport {
            step,
            took: t0.elapsed(),
            exit: exit.map(|e| self.report(e)),
            failed_steps,
        };
        tracing::info!(builder = %self.builder_name(), "{report}");
        report
    }

    fn builder_name(&self) -> &str {
        match &self.kind {
            Kind::Qemu(vm) => vm.builder(),
            Kind::Darling(c) => c.builder(),
            Kind::Command(c) => c.builder(),
        }
    }
}

/// Opens the log files for a child: rotates the old ones first.
fn open_log(dir: &Path, name: &str) -> Result<(PathBuf, std::fs::File), BootError> {
    let path = dir.join(name);
    let io = |what: &str| {
        let path = path.clone();
        let what = what.to_owned();
        move |source| BootError::Io { what, path, source }
    };
    logs::rotate(&path).map_err(io("cannot rotate the log file"))?;
    let f = logs::create(&path).map_err(io("cannot create the log file"))?;
    Ok((path, f))
}

/// The environment every backend process gets on top of the supervisor's.
fn base_env(ctx: &BootContext) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    vec![
        (
            "NIX_LAZY_BUILDER_BUILDER".into(),
            ctx.builder.clone().into(),
        ),
        (
            "NIX_LAZY_BUILDER_STATE_DIR".into(),
            ctx.dir.clone().into_os_string(),
        ),
    ]
}

/// Starts `program` in the state directory with [`base_env`] plus `env`, its stdout and stderr
/// in the fresh log `log_name` (the older one rotated): the child, the log and when it started.
fn spawn_logged(
    ctx: &BootContext,
    what: &str,
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    env: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    log_name: &str,
) -> Result<(child::Child, PathBuf, Instant), BootError> {
    let (log, out) = open_log(&ctx.dir, log_name)?;
    let err = out.try_clone().map_err(|source| BootError::Io {
        what: "cannot duplicate the log file".into(),
        path: log.clone(),
        source,
    })?;
    let mut full_env = base_env(ctx);
    full_env.extend(env);
    let started = Instant::now();
    let child = child::Child::spawn(child::SpawnSpec {
        program: program.clone(),
        args,
        env: full_env,
        cwd: ctx.dir.clone(),
        stdout: out,
        stderr: err,
    })
    .map_err(|source| BootError::Spawn {
        what: what.to_owned(),
        program,
        source,
    })?;
    Ok((child, log, started))
}

/// A stop in progress: the process, how to stop it, and the steps that failed so far (the
/// [`StopReport::failed_steps`] it ends with).
struct Stopping<'a> {
    child: &'a mut child::Child,
    how: &'a StopHow,
    failed: Vec<String>,
}

impl Stopping<'_> {
    /// Notes that `step` failed and why.
    fn note_failed(&mut self, step: &StopStep, why: impl std::fmt::Display) {
        self.failed.push(format!("{step}: {why}"));
    }

    /// Waits up to `wait` for the main process to end after `step`: `Some(step)` if it did,
    /// else `None` with `step` and `still` (how it was left) noted as failed.
    async fn exits_within(
        &mut self,
        step: StopStep,
        wait: Duration,
        still: String,
    ) -> Option<StopStep> {
        if self.child.wait_for(wait).await.is_some() {
            return Some(step);
        }
        self.note_failed(&step, still);
        None
    }

    /// The rest of a graceful step done by a stop helper (`stop-command`, `darling shutdown`)
    /// that started at `t0` and ended with `ran`: waits for the main process, `main` in the
    /// failure ("the command", "the shell"), for what is left of the graceful timeout.
    async fn after_helper(
        &mut self,
        step: StopStep,
        ran: Result<(), String>,
        t0: Instant,
        main: &str,
    ) -> Option<StopStep> {
        if let Err(why) = ran {
            self.note_failed(&step, why);
            // The main process may still be on its way out; give it a moment.
            return self
                .child
                .wait_for(Duration::from_millis(200))
                .await
                .map(|_| step);
        }
        let timeout = self.how.graceful_timeout;
        let left = timeout.saturating_sub(t0.elapsed());
        let still = format!("{main} was still running {} later", fmt_elapsed(timeout));
        self.exits_within(step, left, still).await
    }

    /// SIGTERM to the group, wait; SIGKILL to the group, wait.
    async fn forced(&mut self) -> StopStep {
        for (sig, step) in [
            (libc::SIGTERM, StopStep::Term),
            (libc::SIGKILL, StopStep::Kill),
        ] {
            match self.child.signal_group(sig) {
                Ok(false) => return step,
                Ok(true) => {}
                Err(e) => self.note_failed(&step, e),
            }
            let timeout = self.how.signal_timeout;
            let still = format!("still running after {}", fmt_elapsed(timeout));
            if let Some(step) = self.exits_within(step, timeout, still).await {
                return step;
            }
        }
        StopStep::Abandoned
    }
}

/// Runs a stop helper (`stop-command`, `darling shutdown`) to completion within `limit`, its
/// output appended to `log`: `Ok` on exit status 0, else one line saying how it ended (with the
/// last line it printed). A helper still running at the limit is killed.
async fn run_stop_helper(
    mut cmd: tokio::process::Command,
    what: &str,
    log: &Path,
    limit: std::time::Duration,
) -> Result<(), String> {
    let out = logs::append(log).map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("cannot duplicate a log fd: {e}"))?;
    let mut proc = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(out))
        .stderr(std::process::Stdio::from(err))
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    match tokio::time::timeout(limit, proc.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!(
            "{what} {}{}",
            child::describe_status(&Ok(status)),
            logs::last_line(log)
                .map(|l| format!(": {l}"))
                .unwrap_or_default()
        )),
        Ok(Err(e)) => Err(format!("waiting for {what} failed: {e}")),
        Err(_) => {
            let _ = proc.start_kill();
            let _ = proc.wait().await;
            Err(format!(
                "{what} did not finish within {}",
                fmt_elapsed(limit)
            ))
        }
    }
}

/// Finds `program` (a path, or a name on PATH).
fn find_program(program: &str, what: &str) -> Result<PathBuf, BootError> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        if p.is_file() {
            return Ok(p);
        }
        return Err(BootError::NotFound {
            what: what.to_owned(),
            detail: format!("{program} does not exist"),
        });
    }
    which::which(program).map_err(|e| BootError::NotFound {
        what: what.to_owned(),
        detail: format!("{program} is not on PATH ({e})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn reports_read_as_one_line() {
        let exit = ExitReport {
            what: "qemu".into(),
            pid: 42,
            status: Ok(std::process::ExitStatus::from_raw(1 << 8)),
            uptime: Duration::from_millis(340),
            last_line: Some("qemu-system-x86_64: -drive file=x: Could not open 'x'".into()),
        };
        assert_eq!(
            exit.to_string(),
            "qemu exited with status 1 after 0.34s: qemu-system-x86_64: -drive file=x: Could not open 'x'"
        );
        let e = BootError::Exited {
            report: exit.clone(),
            during: "during boot",
        };
        assert_eq!(
            e.to_string(),
            "qemu exited with status 1 during boot (after 0.34s): qemu-system-x86_64: -drive file=x: Could not open 'x'"
        );
        let stop = StopReport {
            step: StopStep::QmpQuit,
            took: Duration::from_millis(2500),
            exit: Some(ExitReport {
                status: Ok(std::process::ExitStatus::from_raw(0)),
                last_line: None,
                ..exit
            }),
            failed_steps: vec!["QMP system_powerdown: still running after 15.0s".into()],
        };
        assert_eq!(
            stop.to_string(),
            "qemu stopped by QMP quit in 2.50s (exited with status 0); before that: QMP system_powerdown: still running after 15.0s"
        );
        let e = BootError::NoBanner {
            addr: "127.0.0.1:40123".into(),
            after: Duration::from_secs(120),
            last: "connection closed before a banner".into(),
            forwarded: false,
        };
        assert_eq!(
            e.to_string(),
            "no SSH banner on 127.0.0.1:40123 within boot-timeout (waited 2m; last try: \
             connection closed before a banner)"
        );
        assert!(!e.to_string().contains('\n'));
        assert!(e.is_timeout());
        let e = BootError::NoBanner {
            addr: "127.0.0.1:40123".into(),
            after: Duration::from_millis(2_990),
            last: "connected, but no banner within 1s".into(),
            forwarded: true,
        };
        assert_eq!(
            e.to_string(),
            "the guest did not answer on SSH within boot-timeout (waited 3s): QEMU's port \
             forward 127.0.0.1:40123 took the connections, but nothing in the guest answered \
             behind it"
        );
        assert!(!e.to_string().contains("connected, but"));
    }

    /// The supervisor runs these on a multi-threaded runtime and boxes them as `Send`
    /// (`stop` as `'static`): this only has to compile.
    #[allow(dead_code)]
    fn futures_are_send(spec: &BootSpec, ctx: &BootContext, b: &Builder, i: Instance) {
        fn send<T: Send>(_: T) {}
        fn send_static<T: Send + 'static>(_: T) {}
        send(start(spec, ctx));
        let mut j = i;
        send(wait_ready(b, 1, &mut j, Instant::now()));
        send(j.exited());
        send_static(j.stop(StopHow::forced()));
    }

    #[test]
    fn stop_how_defaults() {
        let g = StopHow::graceful(None);
        assert!(g.graceful && g.builder.is_none());
        let f = StopHow::forced();
        assert!(!f.graceful);
        assert_eq!(f.signal_timeout, g.signal_timeout);
    }

    #[test]
    fn programs_are_found() {
        assert!(find_program("sh", "shell").is_ok());
        assert!(find_program("/bin/sh", "shell").is_ok());
        let e = find_program("/nonexistent/x", "thing").unwrap_err();
        assert_eq!(
            e.to_string(),
            "thing not found: /nonexistent/x does not exist"
        );
        let e = find_program("no-such-program-nlb", "thing").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("thing not found: no-such-program-nlb is not on PATH")
        );
    }
}
