//! `kind = "qemu"`: a builder VM. Builds the QEMU command line itself (or wraps a NixOS VM
//! runner script), picks and probes the accelerator, reads the forwarded SSH port back through
//! QMP, and stops the VM in bounded steps.
//!
//! Owns: the command line ([`plan`], a pure function), the throw-away qcow2 overlay of an
//! `ephemeral` disk, the KVM/HVF probe and its remembered verdicts, the QMP socket, and the
//! files `console.log` (serial console), `qemu.log` (QEMU's own output), `qmp.sock`,
//! `overlay.qcow2` and `accel-probe` in the builder's state directory.
//!
//! Must never: forward a port on anything but 127.0.0.1, let the guest reach the network
//! (`restrict=on`), or write to a configured disk image when `ephemeral` is set.
//!
//! # Accelerator
//!
//! `accel = "auto"` (or unset) uses KVM on Linux / HVF on macOS when the guest's architecture
//! is the host's (and, for KVM, `/dev/kvm` opens read-write), and TCG otherwise. KVM can be
//! present and still broken (nested virtualisation: the guest hangs before its first line, or
//! QEMU aborts on an MSR): so the first boot with KVM/HVF is a *probe*. The VM must show life
//! within [`PROBE_TIMEOUT`], either a byte on its serial console or an SSH banner on the
//! forwarded port. If instead it exits or stays silent, it is killed and booted again with
//! TCG. The verdict is remembered for the rest of this process's life (per state directory
//! and QEMU binary) and written to `accel-probe` for humans; [`Instance::accel`] says what
//! was used and why.
//!
//! # Runner scripts
//!
//! `runner = "/path/run-NAME-vm"` starts an existing NixOS VM script (`system.build.vm`,
//! nixpkgs' `darwin.linux-builder` run-builder). Those scripts append `$QEMU_OPTS` (word-split)
//! to QEMU's arguments and `$QEMU_NET_OPTS` to their `-netdev user,…` option, so the QMP socket
//! goes into `QEMU_OPTS` and the port forward into `QEMU_NET_OPTS`. Their serial console is on
//! stdout (`-nographic`), which goes to `console.log`. Without `ssh-port` no forward is added:
//! the script forwards the URI's port itself. The script runs in the state directory, where the
//! NixOS runner keeps its disk image (`./NAME.qcow2`).
//!
//! [`Instance::accel`]: super::Instance::accel

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::child::{Child, SpawnSpec};
use super::qmp::{self, Qmp};
use super::snapshot;
use super::{
    BootContext, BootError, Instance, Kind, StopHow, StopStep, Stopping, base_env, find_program,
    fmt_elapsed, logs, open_log,
};
use crate::config::{Accel, QemuBoot};

/// How long a KVM/HVF guest has to show life before it is judged hung.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long QEMU has to open its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The same for a runner script. A NixOS runner with `useNixStoreImage` (darwin.linux-builder's
/// guest) first writes the guest's whole closure into an erofs image (tar | mkfs.erofs: 12 s
/// warm, 30 s cold for 2.1 GB here), so this is no liveness limit: the builder's
/// `boot-timeout`, which bounds the whole start, is. A runner that exits is seen at once.
const RUNNER_QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Limit of one QMP command.
const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// The netdev id of our user-mode network.
const NETDEV: &str = "nlb0";
/// Longest unix socket path (sun_path is 108 bytes on Linux, 104 on macOS, with the NUL).
const MAX_SOCKET_PATH: usize = 103;

/// The accelerator a VM runs with, and how it was chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelUsed {
    /// `Kvm`, `Hvf` or `Tcg`; `None` when a runner script chose and QEMU cannot tell us
    /// (HVF on macOS).
    pub accel: Option<Accel>,
    pub choice: AccelChoice,
}

/// Why [`AccelUsed::accel`] is what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccelChoice {
    /// The config named it (`kvm`, `hvf`, `tcg`).
    Configured,
    /// `auto`: the only candidate (foreign architecture, or no usable `/dev/kvm`).
    Auto,
    /// `auto`: KVM/HVF was probed in this boot and the guest showed life.
    ProbeOk { evidence: String },
    /// `auto`: KVM/HVF was probed in this boot and failed; fell back to TCG.
    FellBack { tried: Accel, why: String },
    /// `auto`: KVM/HVF failed an earlier probe in this process; TCG without probing again.
    KnownBroken { tried: Accel, why: String },
    /// `auto`: KVM/HVF passed an earlier probe in this process.
    KnownGood { evidence: String },
    /// A runner script chose; read back from QEMU (`query-kvm`).
    Runner,
    /// Restored from a snapshot: the accelerator the snapshot was made with.
    Snapshot,
}

fn accel_name(a: Accel) -> &'static str {
    match a {
        Accel::Auto => "auto",
        Accel::Kvm => "kvm",
        Accel::Hvf => "hvf",
        Accel::Tcg => "tcg",
    }
}

impl fmt::Display for AccelUsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.accel.map(accel_name).unwrap_or("unknown"))?;
        match &self.choice {
            AccelChoice::Configured => f.write_str(" (configured)"),
            AccelChoice::Auto => f.write_str(" (auto)"),
            AccelChoice::ProbeOk { evidence } => write!(f, " (auto, probe ok: {evidence})"),
            AccelChoice::FellBack { tried, why } => {
                write!(f, " (auto; the {} probe failed: {why})", accel_name(*tried))
            }
            AccelChoice::KnownBroken { tried, why } => write!(
                f,
                " (auto, {} failed an earlier probe: {why})",
                accel_name(*tried)
            ),
            AccelChoice::KnownGood { evidence } => {
                write!(f, " (auto, earlier probe ok: {evidence})")
            }
            AccelChoice::Runner => f.write_str(" (chosen by the runner script)"),
            AccelChoice::Snapshot => f.write_str(" (the snapshot's)"),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Architectures

/// QEMU's name for the architecture of a Nix system (`aarch64-linux` → `aarch64`,
/// `i686-linux` → `i386`).
pub fn qemu_arch(system: &str) -> Option<&'static str> {
    let cpu = system.split('-').next()?;
    Some(match cpu {
        "x86_64" => "x86_64",
        "i686" | "i586" | "i486" | "i386" => "i386",
        "aarch64" => "aarch64",
        "armv7l" | "armv6l" | "armv5tel" => "arm",
        "riscv64" => "riscv64",
        "riscv32" => "riscv32",
        "powerpc64le" | "powerpc64" => "ppc64",
        "powerpc" => "ppc",
        "s390x" => "s390x",
        "mips64el" => "mips64el",
        "loongarch64" => "loongarch64",
        _ => return None,
    })
}

/// The guest architecture for a builder's systems: the widest one (`x86_64` over `i386`,
/// `aarch64` over `arm`), else the first known.
pub fn guest_arch(systems: &[String]) -> Option<&'static str> {
    let archs: Vec<&'static str> = systems.iter().filter_map(|s| qemu_arch(s)).collect();
    for wide in ["x86_64", "aarch64", "riscv64", "ppc64"] {
        if archs.contains(&wide) {
            return Some(wide);
        }
    }
    archs.first().copied()
}

/// The architecture of a `qemu-system-<arch>` binary, from its file name.
fn arch_of_binary(binary: &str) -> Option<String> {
    let name = Path::new(binary).file_name()?.to_str()?;
    name.strip_prefix("qemu-system-").map(str::to_owned)
}

/// This machine's architecture, QEMU-style.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86" => "i386",
        "powerpc64" => "ppc64",
        other => other,
    }
}

fn has_acpi_button(arch: Option<&str>) -> bool {
    matches!(arch, Some("x86_64" | "i386"))
}

// ------------------------------------------------------------------------------------------------
// The command line

/// What [`plan`] needs besides the config.
#[derive(Clone, Debug)]
pub struct PlanInput<'a> {
    pub builder: &'a str,
    /// QEMU architecture of the guest, when known.
    pub arch: Option<&'a str>,
    /// The accelerator to ask for (ignored for runners).
    pub accel: Accel,
    /// Host port to forward to guest port 22 (0 = QEMU picks); `None` = no forward.
    pub host_port: Option<u16>,
    pub qmp_socket: &'a Path,
    pub console_log: &'a Path,
    /// The disk to attach: path and format (the overlay when ephemeral).
    pub disk: Option<(&'a Path, &'a str)>,
    /// The QEMU binary (not used for runners).
    pub binary: &'a Path,
    /// `snapshot = true`: RAM in a file, the agent's port, and for a restore `-incoming defer`.
    pub snapshot: Option<SnapshotArgs<'a>>,
}

/// The parts of a snapshotting (or restoring) VM's command line.
#[derive(Clone, Debug)]
pub struct SnapshotArgs<'a> {
    /// The file that holds (cold boot: will hold; restore: holds) the guest's RAM.
    pub ram: &'a Path,
    /// `share=on` (a cold boot writes its RAM to the file) or `share=off` (a restore maps the
    /// snapshot privately: nothing the guest does reaches the file).
    pub share: bool,
    /// Wait for the device state (`-incoming defer`).
    pub incoming: bool,
    /// The unix socket of the guest agent's virtio-serial port.
    pub agent_socket: &'a Path,
}

/// Guest memory when `memory` is not set.
pub const DEFAULT_MEMORY_MIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// The id of the snapshotting VM's RAM backend.
const RAM_BACKEND: &str = "nlbram";

/// The default `-machine` for a guest architecture.
pub fn default_machine(arch: Option<&str>) -> Option<&'static str> {
    match arch {
        Some("aarch64") | Some("arm") | Some("riscv64") => Some("virt"),
        Some("x86_64") | Some("i386") => Some("q35"),
        _ => None,
    }
}

/// A command to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Extra environment (runner scripts: `QEMU_OPTS`, `QEMU_NET_OPTS`).
    pub env: Vec<(String, String)>,
}

/// Escapes a value for QEMU's `key=value,…` option syntax (a comma is doubled).
fn opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn hostfwd(port: u16) -> String {
    format!("hostfwd=tcp:127.0.0.1:{port}-:22")
}

fn qmp_args(socket: &Path) -> [String; 4] {
    [
        "-chardev".into(),
        format!(
            "socket,id=nlbqmp,path={},server=on,wait=off",
            opt_escape(&socket.to_string_lossy())
        ),
        "-mon".into(),
        "chardev=nlbqmp,mode=control".into(),
    ]
}

/// Builds the QEMU command line (or the runner invocation) for `spec`.
pub fn plan(spec: &QemuBoot, input: &PlanInput<'_>) -> Result<QemuCommand, BootError> {
    if let Some(runner) = &spec.runner {
        let socket = input.qmp_socket.to_string_lossy();
        if socket.contains(char::is_whitespace) {
            return Err(BootError::Config(format!(
                "builder '{}': the state directory {} contains white space, which a runner script's QEMU_OPTS cannot carry",
                input.builder,
                input.qmp_socket.display()
            )));
        }
        let mut opts: Vec<String> = qmp_args(input.qmp_socket).into();
        opts.extend(spec.extra_args.iter().cloned());
        let mut env: Vec<(String, String)> = spec
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.push(("QEMU_OPTS".to_owned(), opts.join(" ")));
        if let Some(port) = input.host_port {
            env.push(("QEMU_NET_OPTS".to_owned(), hostfwd(port)));
        }
        return Ok(QemuCommand {
            program: runner.clone(),
            args: Vec::new(),
            env,
        });
    }

    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| (*s).to_owned()));
    push(&[
        "-name",
        &format!("nix-lazy-builder:{}", input.builder),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    let machine = spec.machine.as_deref().or(default_machine(input.arch));
    match (machine, &input.snapshot) {
        (Some(m), None) => push(&["-machine", m]),
        (Some(m), Some(_)) => push(&["-machine", &format!("{m},memory-backend={RAM_BACKEND}")]),
        (None, Some(_)) => push(&["-machine", &format!("memory-backend={RAM_BACKEND}")]),
        (None, None) => {}
    }
    push(&["-accel", accel_name(input.accel)]);
    let cpu = spec.cpu.as_deref().or(match (input.arch, input.accel) {
        (Some("aarch64"), _) => Some("max"),
        (Some("x86_64" | "i386"), Accel::Kvm | Accel::Hvf) => Some("host"),
        (Some("x86_64" | "i386"), _) => Some("max"),
        _ => None,
    });
    if let Some(c) = cpu {
        push(&["-cpu", c]);
    }
    let memory_mib = spec.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
    push(&[
        "-smp",
        &spec.cpus.unwrap_or(1).to_string(),
        "-m",
        &memory_mib.to_string(),
    ]);
    if let Some(s) = &input.snapshot {
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id={RAM_BACKEND},size={memory_mib}M,mem-path={},share={}",
                opt_escape(&s.ram.to_string_lossy()),
                if s.share { "on" } else { "off" }
            ),
        ]);
    }
    if let Some(k) = &spec.kernel {
        push(&["-kernel", &k.to_string_lossy()]);
        if let Some(i) = &spec.initrd {
            push(&["-initrd", &i.to_string_lossy()]);
        }
        if let Some(ap) = &spec.append {
            push(&["-append", ap]);
        }
    }
    if let Some((disk, format)) = input.disk {
        push(&[
            "-drive",
            &format!(
                "file={},if=virtio,format={}",
                opt_escape(&disk.to_string_lossy()),
                opt_escape(format)
            ),
        ]);
    }
    for d in &spec.drives {
        push(&["-drive", d]);
    }
    let mut netdev = format!("user,id={NETDEV},restrict=on");
    if let Some(port) = input.host_port {
        netdev.push(',');
        netdev.push_str(&hostfwd(port));
    }
    push(&[
        "-netdev",
        &netdev,
        "-device",
        &format!("virtio-net-pci,netdev={NETDEV}"),
        "-device",
        "virtio-rng-pci",
        "-chardev",
        &format!(
            "file,id=nlbcon,path={}",
            opt_escape(&input.console_log.to_string_lossy())
        ),
        "-serial",
        "chardev:nlbcon",
    ]);
    if let Some(s) = &input.snapshot {
        a.extend([
            "-device".to_owned(),
            "virtio-serial-pci,id=nlbvser".to_owned(),
            "-chardev".to_owned(),
            format!(
                "socket,id=nlbagent,path={},server=on,wait=off",
                opt_escape(&s.agent_socket.to_string_lossy())
            ),
            "-device".to_owned(),
            format!(
                "virtserialport,bus=nlbvser.0,chardev=nlbagent,name={}",
                snapshot::AGENT_PORT
            ),
        ]);
    }
    a.extend(qmp_args(input.qmp_socket));
    a.extend(spec.extra_args.iter().cloned());
    if input.snapshot.as_ref().is_some_and(|s| s.incoming) {
        a.extend(["-incoming".to_owned(), "defer".to_owned()]);
    }
    Ok(QemuCommand {
        program: input.binary.to_owned(),
        args: a,
        env: spec
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

// ------------------------------------------------------------------------------------------------
// Probe verdicts

#[derive(Clone, Debug)]
enum Verdict {
    Works(String),
    Broken(String),
}

/// Verdicts of this process's probes, per (state directory, QEMU binary, accelerator).
static VERDICTS: Mutex<BTreeMap<(PathBuf, PathBuf, &'static str), Verdict>> =
    Mutex::new(BTreeMap::new());

fn verdict(dir: &Path, binary: &Path, accel: Accel) -> Option<Verdict> {
    let map = VERDICTS.lock().unwrap_or_else(|p| p.into_inner());
    map.get(&(dir.to_owned(), binary.to_owned(), accel_name(accel)))
        .cloned()
}

fn remember(dir: &Path, binary: &Path, accel: Accel, v: Verdict) {
    let line = match &v {
        Verdict::Works(e) => format!("{}: works ({e})\n", accel_name(accel)),
        Verdict::Broken(w) => format!("{}: broken ({w}); using tcg\n", accel_name(accel)),
    };
    let marker = dir.join("accel-probe");
    if let Err(e) = std::fs::write(&marker, line) {
        warn!(path = %marker.display(), error = %e, "cannot write the accelerator probe marker");
    }
    VERDICTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert((dir.to_owned(), binary.to_owned(), accel_name(accel)), v);
}

/// Whether `/dev/kvm` can be opened for use.
fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The accelerator to try first and whether it must be probed.
fn choose_accel(
    requested: Option<Accel>,
    arch: Option<&str>,
    kvm_ok: impl FnOnce() -> bool,
) -> (Accel, bool) {
    match requested.unwrap_or(Accel::Auto) {
        Accel::Auto => {
            let native = arch == Some(host_arch());
            if native && cfg!(target_os = "linux") && kvm_ok() {
                (Accel::Kvm, true)
            } else if native && cfg!(target_os = "macos") {
                (Accel::Hvf, true)
            } else {
                (Accel::Tcg, false)
            }
        }
        other => (other, false),
    }
}

// ------------------------------------------------------------------------------------------------
// Starting

pub(super) struct Vm {
    builder: String,
    arch: Option<String>,
    accel: AccelUsed,
    qmp_socket: PathBuf,
    overlay: Option<PathBuf>,
    /// Restored from a snapshot, or booted cold.
    pub(super) how: super::BootKind,
    /// Why a `snapshot = true` builder was not restored (no snapshot yet, the config
    /// changed, the restore failed, …).
    pub(super) snapshot_note: Option<String>,
    /// A cold boot of a `snapshot = true` builder: the snapshot to make once it is ready.
    pub(super) pending: Option<Box<super::restore::Pending>>,
    /// Once it was ready: whether that snapshot was made, or why not.
    pub(super) made: Option<Result<(), String>>,
}

/// One launched QEMU process with QMP up.
struct Launched {
    child: Child,
    started: Instant,
    port: Option<u16>,
}

/// What every boot of a builder shares: checked paths, the guest's architecture, the binary.
struct Prepared {
    qmp_socket: PathBuf,
    agent_socket: PathBuf,
    console_log: PathBuf,
    arch: Option<String>,
    runner: bool,
    binary: PathBuf,
    host_port: Option<u16>,
}

fn prepare(spec: &QemuBoot, ctx: &BootContext) -> Result<Prepared, BootError> {
    let dir = &ctx.dir;
    let qmp_socket = dir.join("qmp.sock");
    let agent_socket = dir.join("agent.sock");
    for s in [&qmp_socket, &agent_socket] {
        if s.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(BootError::Config(format!(
                "builder '{}': the socket path {} is too long for a unix socket; use a shorter state-dir",
                ctx.builder,
                s.display()
            )));
        }
    }
    let console_log = dir.join("console.log");
    let arch: Option<String> = guest_arch(&ctx.systems)
        .map(str::to_owned)
        .or_else(|| spec.binary.as_deref().and_then(arch_of_binary));
    let runner = spec.runner.is_some();

    let binary = if let Some(r) = &spec.runner {
        if !r.is_file() {
            return Err(BootError::NotFound {
                what: "QEMU runner script".into(),
                detail: format!("{} does not exist", r.display()),
            });
        }
        r.clone()
    } else {
        let name = match (&spec.binary, &arch) {
            (Some(b), _) => b.clone(),
            (None, Some(a)) => format!("qemu-system-{a}"),
            (None, None) => {
                return Err(BootError::Config(format!(
                    "builder '{}': cannot tell which qemu-system-* to run for systems {:?}; set binary",
                    ctx.builder, ctx.systems
                )));
            }
        };
        find_program(&name, "QEMU")?
    };
    for (what, p) in [
        ("kernel", &spec.kernel),
        ("initrd", &spec.initrd),
        ("disk", &spec.disk),
    ] {
        if let Some(p) = p
            && !p.is_file()
        {
            return Err(BootError::NotFound {
                what: format!("QEMU {what}"),
                detail: format!("{} does not exist", p.display()),
            });
        }
    }
    let host_port = if runner {
        spec.ssh_port
    } else {
        Some(spec.ssh_port.or(ctx.uri_port).unwrap_or(0))
    };
    Ok(Prepared {
        qmp_socket,
        agent_socket,
        console_log,
        arch,
        runner,
        binary,
        host_port,
    })
}

pub(super) async fn start(spec: &QemuBoot, ctx: &BootContext) -> Result<Instance, BootError> {
    let p = prepare(spec, ctx)?;
    let layout = snapshot::Layout::new(&ctx.dir);
    if !spec.snapshot || p.runner {
        // A snapshot left from when the setting was on: its RAM holds the host key.
        if layout.current().dir().exists() || layout.incoming().dir().exists() {
            match snapshot::remove(&layout) {
                Ok(()) => {
                    info!(builder = %ctx.builder, "snapshot = false: removed the old snapshot")
                }
                Err(e) => {
                    warn!(builder = %ctx.builder, error = %e, "cannot remove the old snapshot")
                }
            }
        }
        return cold(spec, ctx, &p, None).await;
    }
    let fingerprint = super::restore::fingerprint(spec, &p.binary, p.arch.as_deref()).await?;
    let files = layout.current();
    let decision = snapshot::decide(true, &fingerprint, snapshot::read_meta(&files), |m| {
        snapshot::check_files(&files, m)
    });
    let note = match decision {
        snapshot::Decision::Restore(meta) => {
            let t0 = Instant::now();
            let restored = tokio::time::timeout(
                super::restore::RESTORE_LIMIT,
                restore_vm(spec, ctx, &p, &meta, &layout),
            )
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "not ready within {}",
                    fmt_elapsed(super::restore::RESTORE_LIMIT)
                ))
            });
            match restored {
                Ok(inst) => return Ok(inst),
                Err(why) => {
                    warn!(builder = %ctx.builder, after = %fmt_elapsed(t0.elapsed()), "restoring the snapshot failed, booting cold: {why}");
                    format!("the restore failed: {why}")
                }
            }
        }
        snapshot::Decision::Make { why } => why,
        snapshot::Decision::Off => String::from("snapshot = false"),
    };
    if let Err(e) = snapshot::remove(&layout) {
        warn!(builder = %ctx.builder, error = %e, "cannot remove the old snapshot");
    }
    info!(builder = %ctx.builder, "booting cold and making a snapshot: {note}");
    cold(
        spec,
        ctx,
        &p,
        Some(ColdSnapshot {
            fingerprint,
            layout,
            note,
        }),
    )
    .await
}

/// What [`start`] would do now for a `snapshot = true` builder.
pub(super) async fn next_boot(
    spec: &QemuBoot,
    ctx: &BootContext,
) -> Result<super::NextBoot, BootError> {
    let p = prepare(spec, ctx)?;
    let fingerprint = super::restore::fingerprint(spec, &p.binary, p.arch.as_deref()).await?;
    let files = snapshot::Layout::new(&ctx.dir).current();
    Ok(
        match snapshot::decide(true, &fingerprint, snapshot::read_meta(&files), |m| {
            snapshot::check_files(&files, m)
        }) {
            snapshot::Decision::Restore(meta) => super::NextBoot::Restore(meta),
            snapshot::Decision::Make { why } => super::NextBoot::MakeSnapshot { why },
            snapshot::Decision::Off => super::NextBoot::Cold,
        },
    )
}

/// A cold boot that is to be snapshotted once ready.
struct ColdSnapshot {
    fingerprint: snapshot::Fingerprint,
    layout: snapshot::Layout,
    /// Why it is not a restore.
    note: String,
}

async fn cold(
    spec: &QemuBoot,
    ctx: &BootContext,
    p: &Prepared,
    snap: Option<ColdSnapshot>,
) -> Result<Instance, BootError> {
    let dir = &ctx.dir;
    let binary = &p.binary;
    let arch = &p.arch;
    let runner = p.runner;
    // The disk, or its throw-away overlay.
    let base_format = match &spec.disk {
        Some(d) => Some(image_format(binary, d).await?),
        None => None,
    };
    let mut overlay = None;
    let disk: Option<(PathBuf, String)> = match (&spec.disk, &base_format) {
        (Some(d), Some(format)) if spec.ephemeral => {
            let o = dir.join("overlay.qcow2");
            create_overlay(binary, d, format, &o).await?;
            overlay = Some(o.clone());
            Some((o, "qcow2".to_owned()))
        }
        (Some(d), Some(format)) => Some((d.clone(), format.clone())),
        _ => None,
    };

    // Until the VM is handed over, an early return removes the overlay again.
    let mut overlay_guard = RemoveOnDrop(overlay.clone());

    let host_port = p.host_port;
    let (mut accel, probe) = if runner {
        (Accel::Tcg, false)
    } else {
        choose_accel(spec.accel, arch.as_deref(), kvm_usable)
    };
    let mut choice = match spec.accel {
        Some(a) if a != Accel::Auto => AccelChoice::Configured,
        _ => AccelChoice::Auto,
    };
    let mut probe = probe;
    if probe {
        match verdict(dir, binary, accel) {
            Some(Verdict::Broken(why)) => {
                choice = AccelChoice::KnownBroken { tried: accel, why };
                accel = Accel::Tcg;
                probe = false;
            }
            Some(Verdict::Works(evidence)) => {
                choice = AccelChoice::KnownGood { evidence };
                probe = false;
            }
            None => {}
        }
    }
    let memory_mib = spec.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);

    let (launched, live) = loop {
        // A snapshotting VM keeps its RAM in a file (a fresh one per launch).
        let live = match &snap {
            Some(_) => Some(
                super::restore::LiveRam::create(dir, &ctx.builder, memory_mib).map_err(
                    |source| BootError::Io {
                        what: "cannot create the file for the guest's RAM".into(),
                        path: dir.clone(),
                        source,
                    },
                )?,
            ),
            None => None,
        };
        let cmd = plan(
            spec,
            &PlanInput {
                builder: &ctx.builder,
                arch: arch.as_deref(),
                accel,
                host_port,
                qmp_socket: &p.qmp_socket,
                console_log: &p.console_log,
                disk: disk.as_ref().map(|(p, f)| (p.as_path(), f.as_str())),
                binary,
                snapshot: live.as_ref().map(|l| SnapshotArgs {
                    ram: l.path(),
                    share: true,
                    incoming: false,
                    agent_socket: &p.agent_socket,
                }),
            },
        )?;
        let launched = launch(&cmd, ctx, runner, &p.qmp_socket, host_port).await;
        // QEMU has the RAM file open and mapped once QMP answers: its name can go.
        if let (Ok(_), Some(l)) = (&launched, &live) {
            l.unlink();
        }
        if !probe {
            break (launched?, live);
        }
        let outcome = match launched {
            Ok(mut l) => match probe_life(&mut l, &p.console_log, PROBE_TIMEOUT).await {
                Ok(evidence) => Ok((l, evidence)),
                Err(why) => Err((Some(l), why)),
            },
            // QEMU died before QMP was up (e.g. an MSR assertion under nested KVM).
            Err(e @ (BootError::Exited { .. } | BootError::Qmp(_))) => Err((None, e.to_string())),
            Err(e) => return Err(e),
        };
        match outcome {
            Ok((l, evidence)) => {
                info!(builder = %ctx.builder, accel = accel_name(accel), %evidence, "accelerator probe passed");
                remember(dir, binary, accel, Verdict::Works(evidence.clone()));
                choice = AccelChoice::ProbeOk { evidence };
                break (l, live);
            }
            Err((l, why)) => {
                warn!(builder = %ctx.builder, accel = accel_name(accel), %why, "accelerator probe failed; booting again with tcg");
                if let Some(mut l) = l {
                    let _ = l.child.signal_group(libc::SIGKILL);
                    let _ = l.child.wait_for(Duration::from_secs(10)).await;
                }
                remember(dir, binary, accel, Verdict::Broken(why.clone()));
                // The failed guest may have written to the overlay: start from a fresh one.
                if let (Some(o), Some(d), Some(f)) = (&overlay, &spec.disk, &base_format) {
                    create_overlay(binary, d, f, o).await?;
                }
                choice = AccelChoice::FellBack { tried: accel, why };
                accel = Accel::Tcg;
                probe = false;
            }
        }
    };

    overlay_guard.0 = None;
    let accel_used = if runner {
        AccelUsed {
            accel: runner_accel(&p.qmp_socket).await,
            choice: AccelChoice::Runner,
        }
    } else {
        AccelUsed {
            accel: Some(accel),
            choice,
        }
    };
    info!(
        builder = %ctx.builder,
        pid = launched.child.pid(),
        port = ?launched.port,
        accel = %accel_used,
        "qemu started"
    );
    let (snapshot_note, pending) = match (snap, live) {
        (Some(s), Some(live)) => (
            Some(s.note),
            Some(Box::new(super::restore::Pending {
                live,
                fingerprint: s.fingerprint,
                layout: s.layout,
                accel: accel_name(accel).to_owned(),
                overlay: overlay.clone(),
                memory_bytes: memory_mib * MIB,
                qmp_socket: p.qmp_socket.clone(),
                agent_socket: p.agent_socket.clone(),
                migrate_socket: dir.join("migrate.sock"),
            })),
        ),
        _ => (None, None),
    };
    Ok(Instance {
        kind: Kind::Qemu(Vm {
            builder: ctx.builder.clone(),
            arch: arch.clone(),
            accel: accel_used,
            qmp_socket: p.qmp_socket.clone(),
            overlay,
            how: super::BootKind::Cold,
            snapshot_note,
            pending,
            made: None,
        }),
        child: launched.child,
        what: "qemu".into(),
        started: launched.started,
        ssh_port: launched.port,
        logs: vec![ctx.dir.join("qemu.log"), p.console_log.clone()],
        ready: None,
        link: None,
    })
}

/// Restores `meta`'s snapshot: QEMU with the snapshot's RAM mapped privately (`share=off`:
/// the guest's writes never reach the file), the device state fed in through `-incoming
/// defer` → `migrate-incoming`, `cont`, the agent's `refresh`, and the readiness check. Any
/// failure is one line; the caller bounds the whole of it and falls back to a cold boot.
async fn restore_vm(
    spec: &QemuBoot,
    ctx: &BootContext,
    p: &Prepared,
    meta: &snapshot::Meta,
    layout: &snapshot::Layout,
) -> Result<Instance, String> {
    let t0 = Instant::now();
    let files = layout.current();
    let accel = match meta.accel.as_str() {
        "kvm" => Accel::Kvm,
        "hvf" => Accel::Hvf,
        "tcg" => Accel::Tcg,
        other => {
            return Err(format!(
                "the snapshot was made with an unknown accelerator '{other}'"
            ));
        }
    };
    let mut overlay = None;
    if meta.disk {
        let o = ctx.dir.join("overlay.qcow2");
        create_overlay(&p.binary, &files.disk(), "qcow2", &o)
            .await
            .map_err(|e| e.to_string())?;
        overlay = Some(o);
    }
    let mut overlay_guard = RemoveOnDrop(overlay.clone());
    let ram = files.ram();
    let cmd = plan(
        spec,
        &PlanInput {
            builder: &ctx.builder,
            arch: p.arch.as_deref(),
            accel,
            host_port: p.host_port,
            qmp_socket: &p.qmp_socket,
            console_log: &p.console_log,
            disk: overlay.as_deref().map(|o| (o, "qcow2")),
            binary: &p.binary,
            snapshot: Some(SnapshotArgs {
                ram: &ram,
                share: false,
                incoming: true,
                agent_socket: &p.agent_socket,
            }),
        },
    )
    .map_err(|e| e.to_string())?;
    let launched = launch(&cmd, ctx, false, &p.qmp_socket, p.host_port)
        .await
        .map_err(|e| e.to_string())?;
    overlay_guard.0 = None;
    let port = launched.port;
    let mut inst = Instance {
        kind: Kind::Qemu(Vm {
            builder: ctx.builder.clone(),
            arch: p.arch.clone(),
            accel: AccelUsed {
                accel: Some(accel),
                choice: AccelChoice::Snapshot,
            },
            qmp_socket: p.qmp_socket.clone(),
            overlay,
            how: super::BootKind::Restored,
            snapshot_note: None,
            pending: None,
            made: None,
        }),
        child: launched.child,
        what: "qemu".into(),
        started: launched.started,
        ssh_port: port,
        logs: vec![ctx.dir.join("qemu.log"), p.console_log.clone()],
        ready: None,
        link: None,
    };
    // From here on, an error drops `inst`, which kills QEMU.
    let deadline = tokio::time::Instant::from_std(t0 + super::restore::RESTORE_LIMIT);
    let loaded = super::restore::incoming(
        &p.qmp_socket,
        &mut inst.child,
        &files.devices(),
        &ctx.dir.join("migrate.sock"),
        deadline,
    )
    .await;
    if let Err(why) = loaded {
        return Err(inst.exit_or(why).await);
    }
    let running = t0.elapsed();
    let refreshed = tokio::select! {
        exit = inst.child.wait() => return Err(format!("{} after the restore", inst.report(exit))),
        r = super::agent::refresh(&p.agent_socket, deadline) => r,
    };
    let refreshed = match refreshed {
        Ok(r) => r,
        Err(e) => return Err(inst.exit_or(e.to_string()).await),
    };
    let refresh_done = t0.elapsed();
    let port = port.ok_or_else(|| "no forwarded SSH port".to_owned())?;
    let ready = super::ready::wait_ready_restored(
        &ctx.config,
        port,
        &mut inst,
        deadline,
        &meta.nix_version,
    )
    .await
    .map_err(|e| e.to_string())?;
    info!(
        builder = %ctx.builder,
        pid = inst.child.pid(),
        port,
        running = %fmt_elapsed(running),
        refreshed = %fmt_elapsed(refresh_done),
        ready = %fmt_elapsed(t0.elapsed()),
        agent = %refreshed,
        "restored from the snapshot"
    );
    inst.ready = Some(ready);
    Ok(inst)
}

/// Removes what a previous instance left at `path`, if anything; `what` names a failure.
fn remove_old(path: &Path, what: &str) -> Result<(), BootError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BootError::Io {
            what: what.into(),
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Removes a file when dropped, unless disarmed (`.0 = None`).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Starts QEMU (or the runner), connects to QMP, and reads the forwarded port back.
async fn launch(
    cmd: &QemuCommand,
    ctx: &BootContext,
    runner: bool,
    qmp_socket: &Path,
    host_port: Option<u16>,
) -> Result<Launched, BootError> {
    let (qemu_log, err) = open_log(&ctx.dir, "qemu.log")?;
    let console = ctx.dir.join("console.log");
    // A runner's serial console is its stdout; QEMU's own stdout is nearly silent.
    let out = if runner {
        open_log(&ctx.dir, "console.log")?.1
    } else {
        logs::rotate(&console).map_err(|source| BootError::Io {
            what: "cannot rotate the console log".into(),
            path: console.clone(),
            source,
        })?;
        err.try_clone().map_err(|source| BootError::Io {
            what: "cannot duplicate the log file".into(),
            path: qemu_log.clone(),
            source,
        })?
    };
    remove_old(qmp_socket, "cannot remove the old QMP socket")?;
    let mut env = base_env(ctx);
    env.extend(cmd.env.iter().map(|(k, v)| (k.into(), v.into())));
    let started = Instant::now();
    let mut child = Child::spawn(SpawnSpec {
        program: cmd.program.clone(),
        args: cmd.args.iter().map(Into::into).collect(),
        env,
        cwd: ctx.dir.clone(),
        stdout: out,
        stderr: err,
    })
    .map_err(|source| BootError::Spawn {
        what: if runner {
            "the QEMU runner script".into()
        } else {
            "qemu".into()
        },
        program: cmd.program.clone(),
        source,
    })?;
    tracing::debug!(builder = %ctx.builder, program = %cmd.program.display(), args = ?cmd.args, env = ?cmd.env, "qemu command");

    let exited = |exit: super::child::Exit, child: &Child| BootError::Exited {
        report: super::ExitReport {
            what: "qemu".into(),
            pid: child.pid(),
            status: exit.status,
            uptime: exit.at.saturating_duration_since(started),
            last_line: super::console::summary(&[qemu_log.clone(), console.clone()]),
        },
        during: "during boot",
    };
    // QEMU that dies early (bad option, busy port, KVM abort) may also break the QMP
    // handshake: its exit, with its last words, is the better error.
    let connected = tokio::select! {
        exit = child.wait() => return Err(exited(exit, &child)),
        q = Qmp::connect_retry(
            qmp_socket,
            if runner { RUNNER_QMP_CONNECT_TIMEOUT } else { QMP_CONNECT_TIMEOUT },
        ) => q,
    };
    let mut q = match connected {
        Ok(q) => q,
        Err(e) => {
            return Err(match child.wait_for(Duration::from_secs(2)).await {
                Some(exit) => exited(exit, &child),
                None => BootError::Qmp(e),
            });
        }
    };
    let port = match host_port {
        None => None,
        Some(p) if p != 0 => Some(p),
        Some(_) => {
            let text = tokio::select! {
                exit = child.wait() => return Err(exited(exit, &child)),
                t = q.hmp("info usernet", QMP_COMMAND_TIMEOUT) => t,
            };
            let text = match text {
                Ok(t) => t,
                Err(e) => {
                    return Err(match child.wait_for(Duration::from_secs(2)).await {
                        Some(exit) => exited(exit, &child),
                        None => BootError::Qmp(e),
                    });
                }
            };
            Some(pick_forwarded_port(&text, runner).map_err(|why| {
                BootError::Config(format!(
                    "builder '{}': cannot read the forwarded SSH port back from QEMU: {why}",
                    ctx.builder
                ))
            })?)
        }
    };
    Ok(Launched {
        child,
        started,
        port,
    })
}

/// Our forward to guest port 22 in `info usernet` output.
fn pick_forwarded_port(text: &str, runner: bool) -> Result<u16, String> {
    let rows = qmp::parse_usernet(text);
    let ours: Vec<&qmp::HostForward> = rows
        .iter()
        .filter(|f| f.tcp && f.guest_port == 22 && f.host_addr == "127.0.0.1")
        .filter(|f| runner || f.netdev.as_deref() == Some(NETDEV))
        .collect();
    match ours.as_slice() {
        [one] => Ok(one.host_port),
        [] => Err(format!(
            "no TCP forward from 127.0.0.1 to guest port 22 in: {}",
            text.trim()
        )),
        many => Err(format!(
            "{} forwards from 127.0.0.1 to guest port 22 ({}); set ssh-port to a fixed port",
            many.len(),
            many.iter()
                .map(|f| f.host_port.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Waits until the guest shows life: a byte on the serial console or an SSH banner.
async fn probe_life(l: &mut Launched, console: &Path, limit: Duration) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut next_banner = tokio::time::Instant::now();
    loop {
        if let Some(exit) = l.child.try_exit() {
            let last = logs::last_line(&console.with_file_name("qemu.log"))
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            return Err(format!(
                "qemu {} after {}{last}",
                super::child::describe_status(&exit.status),
                fmt_elapsed(exit.at.saturating_duration_since(l.started))
            ));
        }
        if std::fs::metadata(console).is_ok_and(|m| m.len() > 0) {
            return Ok(format!(
                "serial console output after {}",
                fmt_elapsed(l.started.elapsed())
            ));
        }
        let now = tokio::time::Instant::now();
        if let Some(port) = l.port
            && now >= next_banner
        {
            next_banner = now + Duration::from_millis(500);
            if super::ready::banner("127.0.0.1", port, Duration::from_millis(300))
                .await
                .is_ok()
            {
                return Ok(format!(
                    "SSH banner after {}",
                    fmt_elapsed(l.started.elapsed())
                ));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "no serial console output and no SSH banner within {}",
                fmt_elapsed(limit)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a runner's QEMU runs with, as QEMU reports it.
async fn runner_accel(socket: &Path) -> Option<Accel> {
    let mut q = Qmp::connect(socket, QMP_COMMAND_TIMEOUT).await.ok()?;
    let v = q
        .execute("query-kvm", None, QMP_COMMAND_TIMEOUT)
        .await
        .ok()?;
    if v.get("enabled").and_then(serde_json::Value::as_bool) == Some(true) {
        Some(Accel::Kvm)
    } else if cfg!(target_os = "linux") {
        Some(Accel::Tcg)
    } else {
        None
    }
}

/// `qemu-img`: next to the QEMU binary, else on PATH.
fn qemu_img(binary: &Path) -> Result<PathBuf, BootError> {
    if let Some(dir) = binary.parent() {
        let sibling = dir.join("qemu-img");
        if sibling.is_file() {
            return Ok(sibling);
        }
    }
    find_program("qemu-img", "qemu-img")
}

async fn run_qemu_img(binary: &Path, args: &[&std::ffi::OsStr]) -> Result<String, BootError> {
    let img = qemu_img(binary)?;
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&img)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| {
        BootError::Helper(format!(
            "{} {args:?} did not finish within 60s",
            img.display()
        ))
    })?
    .map_err(|source| BootError::Spawn {
        what: "qemu-img".into(),
        program: img.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(BootError::Helper(format!(
            "qemu-img {} {}: {}",
            args.first()
                .map(|a| a.to_string_lossy().into_owned())
                .unwrap_or_default(),
            super::child::describe_status(&Ok(out.status)),
            logs::last_line_of(&out.stderr).unwrap_or_default()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The format of a disk image (`qemu-img info`).
async fn image_format(binary: &Path, disk: &Path) -> Result<String, BootError> {
    let text = run_qemu_img(
        binary,
        &["info".as_ref(), "--output=json".as_ref(), disk.as_os_str()],
    )
    .await?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        BootError::Helper(format!("qemu-img info {}: bad JSON: {e}", disk.display()))
    })?;
    v.get("format")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| {
            BootError::Helper(format!(
                "qemu-img info {}: no format in its answer",
                disk.display()
            ))
        })
}

/// A fresh qcow2 overlay on top of `disk` (which is never written to).
async fn create_overlay(
    binary: &Path,
    disk: &Path,
    format: &str,
    overlay: &Path,
) -> Result<(), BootError> {
    let backing = std::path::absolute(disk).map_err(|source| BootError::Io {
        what: "cannot make the disk path absolute".into(),
        path: disk.to_owned(),
        source,
    })?;
    remove_old(overlay, "cannot remove the old overlay")?;
    run_qemu_img(
        binary,
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            backing.as_os_str(),
            "-F".as_ref(),
            format.as_ref(),
            overlay.as_os_str(),
        ],
    )
    .await?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Stopping

impl Vm {
    pub(super) fn builder(&self) -> &str {
        &self.builder
    }

    pub(super) fn accel(&self) -> AccelUsed {
        self.accel.clone()
    }

    /// ACPI power-down (x86), or `poweroff` over SSH (no ACPI power button), then wait.
    pub(super) async fn graceful(
        &mut self,
        s: &mut Stopping<'_>,
        port: Option<u16>,
    ) -> Option<StopStep> {
        let t0 = Instant::now();
        let how = s.how;
        let use_ssh = !has_acpi_button(self.arch.as_deref()) && how.builder.is_some();
        let step = if use_ssh {
            StopStep::SshPoweroff
        } else {
            StopStep::AcpiPowerdown
        };
        let sent = match (&how.builder, use_ssh) {
            (Some(b), true) => ssh_poweroff(b, port, how).await,
            _ => self
                .qmp_command("system_powerdown", how.graceful_timeout)
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(why) = sent {
            // The VM may have gone down anyway (a poweroff cuts its own SSH connection).
            if s.child.wait_for(Duration::from_millis(200)).await.is_some() {
                return Some(step);
            }
            s.note_failed(&step, why);
            return None;
        }
        let left = how.graceful_timeout.saturating_sub(t0.elapsed());
        let still = format!("still running after {}", fmt_elapsed(how.graceful_timeout));
        s.exits_within(step, left, still).await
    }

    /// QMP `quit`, then wait.
    pub(super) async fn quit(&mut self, s: &mut Stopping<'_>) -> Option<StopStep> {
        let step = StopStep::QmpQuit;
        let timeout = s.how.quit_timeout;
        match self.qmp_command("quit", timeout).await {
            // QEMU may close the socket before its reply arrives.
            Ok(()) | Err(qmp::QmpError::Closed { .. }) => {}
            Err(e) => {
                if s.child.wait_for(Duration::from_millis(100)).await.is_some() {
                    return Some(step);
                }
                s.note_failed(&step, e);
                return None;
            }
        }
        let still = format!("still running after {}", fmt_elapsed(timeout));
        s.exits_within(step, timeout, still).await
    }

    async fn qmp_command(&self, command: &str, limit: Duration) -> Result<(), qmp::QmpError> {
        let limit = limit.min(QMP_COMMAND_TIMEOUT);
        let mut q = Qmp::connect(&self.qmp_socket, limit).await?;
        q.execute(command, None, limit).await.map(|_| ())
    }

    /// Removes the overlay and the sockets once QEMU is gone.
    pub(super) fn cleanup(&mut self) {
        let dir = self
            .qmp_socket
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        for p in self.overlay.take().into_iter().chain([
            self.qmp_socket.clone(),
            dir.join("agent.sock"),
            dir.join("migrate.sock"),
        ]) {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(path = %p.display(), error = %e, "cannot remove"),
            }
        }
    }
}

impl Drop for Vm {
    /// A dropped instance's QEMU is being killed (see `child.rs`): its overlay and socket go.
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Runs `sync; poweroff` on the builder over SSH (pinned host key). The command's own result
/// does not matter: the connection usually dies with the guest.
async fn ssh_poweroff(
    builder: &crate::config::Builder,
    port: Option<u16>,
    how: &StopHow,
) -> Result<(), String> {
    let mut target = crate::ssh::SshTarget::for_builder(builder).map_err(|e| e.to_string())?;
    if let Some(p) = port {
        target.port = p;
    }
    target.timeouts.connect = how.graceful_timeout.min(Duration::from_secs(10));
    let session = crate::ssh::connect(&target)
        .await
        .map_err(|e| e.to_string())?;
    let exec = session
        .exec("sync; poweroff")
        .await
        .map_err(|e| e.to_string())?;
    let crate::ssh::Exec {
        stdin,
        stdout,
        stderr,
        status,
    } = exec;
    drop((stdin, stdout, stderr));
    let _ = tokio::time::timeout(Duration::from_secs(3), status.wait()).await;
    session.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> QemuBoot {
        QemuBoot {
            kernel: Some("/img/vmlinuz".into()),
            initrd: Some("/img/initrd.cpio".into()),
            append: Some("console=ttyAMA0 quiet".into()),
            cpus: Some(2),
            memory_mib: Some(1536),
            ..QemuBoot::default()
        }
    }

    fn input<'a>(arch: Option<&'a str>, accel: Accel, port: Option<u16>) -> PlanInput<'a> {
        PlanInput {
            builder: "vm",
            arch,
            accel,
            host_port: port,
            qmp_socket: Path::new("/state/vm/qmp.sock"),
            console_log: Path::new("/state/vm/console.log"),
            disk: None,
            binary: Path::new("/usr/bin/qemu-system-aarch64"),
            snapshot: None,
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn systems_to_arch() {
        assert_eq!(qemu_arch("aarch64-linux"), Some("aarch64"));
        assert_eq!(qemu_arch("i686-linux"), Some("i386"));
        assert_eq!(qemu_arch("armv7l-linux"), Some("arm"));
        assert_eq!(qemu_arch("powerpc64le-linux"), Some("ppc64"));
        assert_eq!(qemu_arch("wasm32-wasi"), None);
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            guest_arch(&s(&["i686-linux", "x86_64-linux"])),
            Some("x86_64")
        );
        assert_eq!(
            guest_arch(&s(&["armv7l-linux", "aarch64-linux"])),
            Some("aarch64")
        );
        assert_eq!(guest_arch(&s(&["riscv32-linux"])), Some("riscv32"));
        assert_eq!(guest_arch(&s(&["wasm32-wasi"])), None);
        assert_eq!(
            arch_of_binary("/usr/bin/qemu-system-aarch64").as_deref(),
            Some("aarch64")
        );
        assert_eq!(arch_of_binary("qemu-kvm"), None);
    }

    #[test]
    fn aarch64_command_line() {
        let c = plan(&base(), &input(Some("aarch64"), Accel::Tcg, Some(0))).unwrap();
        assert_eq!(c.program, Path::new("/usr/bin/qemu-system-aarch64"));
        assert!(c.env.is_empty());
        let a = &c.args;
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert!(a.iter().any(|x| x == flag), "{flag} missing: {a:?}");
        }
        assert_eq!(after(a, "-display"), ["none"]);
        assert_eq!(after(a, "-machine"), ["virt"]);
        assert_eq!(after(a, "-cpu"), ["max"]);
        assert_eq!(after(a, "-accel"), ["tcg"]);
        assert_eq!(after(a, "-smp"), ["2"]);
        assert_eq!(after(a, "-m"), ["1536"]);
        assert_eq!(after(a, "-kernel"), ["/img/vmlinuz"]);
        assert_eq!(after(a, "-initrd"), ["/img/initrd.cpio"]);
        assert_eq!(after(a, "-append"), ["console=ttyAMA0 quiet"]);
        assert_eq!(
            after(a, "-netdev"),
            ["user,id=nlb0,restrict=on,hostfwd=tcp:127.0.0.1:0-:22"]
        );
        assert_eq!(
            after(a, "-device"),
            ["virtio-net-pci,netdev=nlb0", "virtio-rng-pci"]
        );
        assert_eq!(
            after(a, "-chardev"),
            [
                "file,id=nlbcon,path=/state/vm/console.log",
                "socket,id=nlbqmp,path=/state/vm/qmp.sock,server=on,wait=off"
            ]
        );
        assert_eq!(after(a, "-serial"), ["chardev:nlbcon"]);
        assert_eq!(after(a, "-mon"), ["chardev=nlbqmp,mode=control"]);
        assert!(after(a, "-drive").is_empty());
        assert!(after(a, "-name")[0].ends_with(":vm"));
    }

    #[test]
    fn x86_defaults_overrides_disks_and_escaping() {
        let mut spec = base();
        let c = plan(&spec, &input(Some("x86_64"), Accel::Kvm, Some(2222))).unwrap();
        assert_eq!(after(&c.args, "-machine"), ["q35"]);
        assert_eq!(after(&c.args, "-cpu"), ["host"]);
        assert_eq!(after(&c.args, "-accel"), ["kvm"]);
        assert_eq!(
            after(&c.args, "-netdev"),
            ["user,id=nlb0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"]
        );
        let c = plan(&spec, &input(Some("x86_64"), Accel::Tcg, None)).unwrap();
        assert_eq!(after(&c.args, "-cpu"), ["max"]);
        assert_eq!(after(&c.args, "-netdev"), ["user,id=nlb0,restrict=on"]);

        spec.machine = Some("pc".into());
        spec.cpu = Some("qemu64".into());
        spec.kernel = None;
        spec.initrd = None;
        spec.append = None;
        spec.cpus = None;
        spec.memory_mib = None;
        spec.drives = vec!["file=/data.img,if=virtio,format=raw".into()];
        spec.extra_args = vec!["-snapshot".into()];
        let disk = Path::new("/state/a,b/overlay.qcow2");
        let mut i = input(Some("x86_64"), Accel::Tcg, Some(0));
        i.disk = Some((disk, "qcow2"));
        i.qmp_socket = Path::new("/state/a,b/qmp.sock");
        let c = plan(&spec, &i).unwrap();
        assert_eq!(after(&c.args, "-machine"), ["pc"]);
        assert_eq!(after(&c.args, "-cpu"), ["qemu64"]);
        assert_eq!(after(&c.args, "-smp"), ["1"]);
        assert_eq!(after(&c.args, "-m"), ["1024"]);
        assert!(after(&c.args, "-kernel").is_empty());
        assert_eq!(
            after(&c.args, "-drive"),
            [
                "file=/state/a,,b/overlay.qcow2,if=virtio,format=qcow2",
                "file=/data.img,if=virtio,format=raw"
            ]
        );
        assert_eq!(
            after(&c.args, "-chardev")[1],
            "socket,id=nlbqmp,path=/state/a,,b/qmp.sock,server=on,wait=off"
        );
        assert_eq!(c.args.last().map(String::as_str), Some("-snapshot"));
        // Unknown architecture: no machine or cpu default.
        let c = plan(&base(), &input(None, Accel::Tcg, None)).unwrap();
        assert!(after(&c.args, "-machine").is_empty());
        assert!(after(&c.args, "-cpu").is_empty());
    }

    /// A snapshotting VM and its restore differ in `share` and `-incoming defer` only: the
    /// devices (and so their addresses) must be the same for the device state to load.
    #[test]
    fn snapshot_command_lines() {
        let spec = base();
        let ram_live = Path::new("/dev/shm/nlb-vm.ram");
        let ram_snap = Path::new("/state/vm/snapshot/ram");
        let agent = Path::new("/state/vm/agent.sock");
        let with = |ram, share, incoming| {
            let mut i = input(Some("aarch64"), Accel::Tcg, Some(0));
            i.snapshot = Some(SnapshotArgs {
                ram,
                share,
                incoming,
                agent_socket: agent,
            });
            plan(&spec, &i).unwrap().args
        };
        let cold = with(ram_live, true, false);
        let restore = with(ram_snap, false, true);
        assert_eq!(after(&cold, "-machine"), ["virt,memory-backend=nlbram"]);
        assert_eq!(
            after(&cold, "-object"),
            ["memory-backend-file,id=nlbram,size=1536M,mem-path=/dev/shm/nlb-vm.ram,share=on"]
        );
        assert_eq!(
            after(&restore, "-object"),
            ["memory-backend-file,id=nlbram,size=1536M,mem-path=/state/vm/snapshot/ram,share=off"]
        );
        assert_eq!(after(&cold, "-m"), ["1536"]);
        assert_eq!(
            after(&cold, "-device"),
            [
                "virtio-net-pci,netdev=nlb0",
                "virtio-rng-pci",
                "virtio-serial-pci,id=nlbvser",
                "virtserialport,bus=nlbvser.0,chardev=nlbagent,name=org.nix-lazy-builder.agent"
            ]
        );
        assert!(
            after(&cold, "-chardev")
                .contains(&"socket,id=nlbagent,path=/state/vm/agent.sock,server=on,wait=off")
        );
        assert!(after(&cold, "-incoming").is_empty());
        assert_eq!(restore[restore.len() - 2..], ["-incoming", "defer"]);
        let strip = |a: &[String]| -> Vec<String> {
            a.iter()
                .filter(|x| {
                    !x.starts_with("memory-backend-file") && *x != "-incoming" && *x != "defer"
                })
                .cloned()
                .collect()
        };
        assert_eq!(strip(&cold), strip(&restore));
        // No machine known: the backend still gets named.
        let mut i = input(None, Accel::Tcg, None);
        i.snapshot = Some(SnapshotArgs {
            ram: ram_live,
            share: true,
            incoming: false,
            agent_socket: agent,
        });
        assert_eq!(
            after(&plan(&spec, &i).unwrap().args, "-machine"),
            ["memory-backend=nlbram"]
        );
        // Without snapshot, nothing of it.
        let plain = plan(&spec, &input(Some("aarch64"), Accel::Tcg, Some(0)))
            .unwrap()
            .args;
        assert!(after(&plain, "-object").is_empty());
        assert!(
            !plain
                .iter()
                .any(|a| a.contains("nlbagent") || a.contains("memory-backend"))
        );
    }

    #[test]
    fn runner_environment() {
        let spec = QemuBoot {
            runner: Some("/nix/store/x-run-vm/bin/run-builder-vm".into()),
            extra_args: vec!["-smp".into(), "4".into()],
            ..QemuBoot::default()
        };
        let c = plan(&spec, &input(Some("aarch64"), Accel::Tcg, Some(0))).unwrap();
        assert_eq!(
            c.program,
            Path::new("/nix/store/x-run-vm/bin/run-builder-vm")
        );
        assert!(c.args.is_empty());
        assert_eq!(
            c.env,
            [
                (
                    "QEMU_OPTS".to_owned(),
                    "-chardev socket,id=nlbqmp,path=/state/vm/qmp.sock,server=on,wait=off -mon chardev=nlbqmp,mode=control -smp 4".to_owned()
                ),
                (
                    "QEMU_NET_OPTS".to_owned(),
                    "hostfwd=tcp:127.0.0.1:0-:22".to_owned()
                )
            ]
        );
        let c = plan(&spec, &input(Some("aarch64"), Accel::Tcg, None)).unwrap();
        assert_eq!(c.env.len(), 1, "no forward without ssh-port");
        let mut i = input(Some("aarch64"), Accel::Tcg, None);
        i.qmp_socket = Path::new("/state dir/qmp.sock");
        assert!(
            plan(&spec, &i)
                .unwrap_err()
                .to_string()
                .contains("white space")
        );
    }

    #[test]
    fn accelerator_choice() {
        let host = host_arch();
        assert_eq!(
            choose_accel(Some(Accel::Tcg), Some(host), || true),
            (Accel::Tcg, false)
        );
        assert_eq!(
            choose_accel(Some(Accel::Kvm), Some("riscv64"), || false),
            (Accel::Kvm, false)
        );
        let foreign = if host == "aarch64" {
            "x86_64"
        } else {
            "aarch64"
        };
        assert_eq!(
            choose_accel(None, Some(foreign), || true),
            (Accel::Tcg, false)
        );
        assert_eq!(
            choose_accel(Some(Accel::Auto), None, || true),
            (Accel::Tcg, false)
        );
        if cfg!(target_os = "linux") {
            assert_eq!(choose_accel(None, Some(host), || true), (Accel::Kvm, true));
            assert_eq!(
                choose_accel(Some(Accel::Auto), Some(host), || false),
                (Accel::Tcg, false)
            );
        }
        let used = AccelUsed {
            accel: Some(Accel::Tcg),
            choice: AccelChoice::FellBack {
                tried: Accel::Kvm,
                why: "qemu exited with status 134".into(),
            },
        };
        assert_eq!(
            used.to_string(),
            "tcg (auto; the kvm probe failed: qemu exited with status 134)"
        );
    }

    #[test]
    fn verdicts_are_remembered_per_dir() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let bin = Path::new("/usr/bin/qemu-system-x86_64");
        assert!(verdict(d1.path(), bin, Accel::Kvm).is_none());
        remember(d1.path(), bin, Accel::Kvm, Verdict::Broken("hung".into()));
        assert!(
            matches!(verdict(d1.path(), bin, Accel::Kvm), Some(Verdict::Broken(w)) if w == "hung")
        );
        assert!(verdict(d2.path(), bin, Accel::Kvm).is_none());
        assert!(verdict(d1.path(), bin, Accel::Hvf).is_none());
        let marker = std::fs::read_to_string(d1.path().join("accel-probe")).unwrap();
        assert_eq!(marker, "kvm: broken (hung); using tcg\n");
    }

    #[test]
    fn forwarded_port_is_ours() {
        let text = "Hub -1 (nlb0):\r\n  TCP[HOST_FORWARD]   9       127.0.0.1 33463       10.0.2.15    22     0     0\r\n";
        assert_eq!(pick_forwarded_port(text, false), Ok(33463));
        // Someone else's netdev does not count (unless a runner owns the netdev).
        let other = text.replace("nlb0", "user.0");
        assert!(pick_forwarded_port(&other, false).is_err());
        assert_eq!(pick_forwarded_port(&other, true), Ok(33463));
        // A runner that also forwards 22 on 127.0.0.1 itself: ambiguous.
        let two = format!(
            "{other}  TCP[HOST_FORWARD]  10       127.0.0.1 31022       10.0.2.15    22     0     0\r\n"
        );
        let e = pick_forwarded_port(&two, true).unwrap_err();
        assert!(e.contains("33463, 31022") && e.contains("ssh-port"), "{e}");
        // A forward on all addresses is not ours.
        let any = "Hub 0 (user.0):\r\n  TCP[HOST_FORWARD]  10               * 31022       10.0.2.15    22     0     0\r\n";
        assert!(pick_forwarded_port(any, true).is_err());
    }
}
