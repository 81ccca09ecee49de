//! Taking and restoring snapshots of a QEMU builder (`snapshot = true`), on top of QMP and
//! the guest agent:
//!
//! - **Making one** (after a cold boot is ready, before anyone builds on it): the agent must
//!   answer a `ping`; QMP `stop`; capability `x-ignore-shared`, so that the RAM backend (a
//!   `share=on` file) is left out of the stream; `migrate` to a unix socket we listen on, whose
//!   bytes become `devices`; the RAM file's data is copied sparsely into `ram` (and an
//!   ephemeral disk's overlay into `disk.qcow2`) while the VM is still paused; `cont`; then the
//!   files are synced and published (`snapshot.rs`). The running VM goes on with its own RAM
//!   file, which nobody else maps.
//! - **Restoring one**: QEMU starts with the snapshot's `ram` mapped `share=off` and
//!   `-incoming defer`; capability `x-ignore-shared`; `migrate-incoming` on a unix socket to
//!   which we write `devices`; `cont`. The caller then has the agent refresh the guest (RNG,
//!   clock) and checks readiness.
//!
//! Must never: leave a VM paused after a failed snapshot, publish a snapshot that is not
//! complete, or keep the name of a running VM's RAM file (it is unlinked once QEMU has it
//! mapped, so nothing can map it later and nothing is left behind if we die).

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use super::child::Child;
use super::qmp::Qmp;
use super::snapshot::{self, Fingerprint, Layout, Meta};
use super::{BootError, Ready, fmt_elapsed};
use crate::config::{Accel, QemuBoot};

/// How long a restore may take, from starting QEMU to a builder that answered: past it, the
/// restore counts as failed, and the builder boots cold at once.
pub const RESTORE_LIMIT: Duration = Duration::from_secs(15);
/// Most time making a snapshot may take (the VM is paused for part of it).
const MAKE_LIMIT: Duration = Duration::from_secs(60);
/// Less time than this left before the boot's deadline: no snapshot this time.
const MAKE_MIN: Duration = Duration::from_secs(5);
/// Limit of one QMP command.
const QMP_LIMIT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------------------------------
// The fingerprint

/// `--version` answers, per binary identity, for this process's life.
static VERSIONS: Mutex<Vec<(snapshot::FileId, String)>> = Mutex::new(Vec::new());

/// The first line of `binary --version` (remembered per binary identity).
async fn qemu_version(binary: &Path, id: &snapshot::FileId) -> Result<String, BootError> {
    if let Some((_, v)) = VERSIONS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(i, _)| i == id)
    {
        return Ok(v.clone());
    }
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(binary)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| BootError::Helper(format!("{} --version did not answer", binary.display())))?
    .map_err(|source| BootError::Spawn {
        what: "qemu --version".into(),
        program: binary.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").trim().to_owned();
    if !out.status.success() || line.is_empty() {
        return Err(BootError::Helper(format!(
            "{} --version {}",
            binary.display(),
            super::child::describe_status(&Ok(out.status))
        )));
    }
    let mut v = VERSIONS.lock().unwrap_or_else(|p| p.into_inner());
    v.retain(|(i, _)| i.path != id.path);
    v.push((id.clone(), line.clone()));
    Ok(line)
}

fn file_id(what: &str, p: &Path) -> Result<snapshot::FileId, BootError> {
    snapshot::FileId::of(p).map_err(|source| BootError::Io {
        what: format!("cannot read the {what}'s metadata"),
        path: p.to_owned(),
        source,
    })
}

/// The fingerprint of `spec` run with `binary` for a guest of `arch`.
pub(super) async fn fingerprint(
    spec: &QemuBoot,
    binary: &Path,
    arch: Option<&str>,
) -> Result<Fingerprint, BootError> {
    let qemu = file_id("QEMU binary", binary)?;
    let qemu_version = qemu_version(binary, &qemu).await?;
    let opt_id =
        |what: &str, p: &Option<PathBuf>| p.as_deref().map(|p| file_id(what, p)).transpose();
    Ok(Fingerprint {
        format: snapshot::FORMAT,
        qemu,
        qemu_version,
        machine: spec
            .machine
            .clone()
            .or_else(|| super::qemu::default_machine(arch).map(str::to_owned)),
        cpu: spec.cpu.clone(),
        accel: match spec.accel.unwrap_or(Accel::Auto) {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Hvf => "hvf",
            Accel::Tcg => "tcg",
        }
        .to_owned(),
        memory_mib: spec.memory_mib.unwrap_or(super::qemu::DEFAULT_MEMORY_MIB),
        cpus: spec.cpus.unwrap_or(1),
        kernel: opt_id("kernel", &spec.kernel)?,
        initrd: opt_id("initrd", &spec.initrd)?,
        append: spec.append.clone(),
        disk: opt_id("disk", &spec.disk)?,
        drives: spec.drives.clone(),
        extra_args: spec.extra_args.clone(),
        environment: spec.environment.clone(),
        host_arch: std::env::consts::ARCH.to_owned(),
    })
}

// ------------------------------------------------------------------------------------------------
// The RAM of a VM that is going to be snapshotted

/// The guest RAM file of a cold-booted, snapshotting VM (QEMU maps it `share=on`). It lives in
/// `/dev/shm` when that has room (no writeback of the guest's memory to disk while it
/// runs), else in the state directory. Its name is removed once QEMU has mapped it; we keep a
/// descriptor to copy it from.
pub(super) struct LiveRam {
    path: PathBuf,
    file: File,
}

impl LiveRam {
    pub(super) fn create(
        state_dir: &Path,
        builder: &str,
        memory_mib: u64,
    ) -> std::io::Result<LiveRam> {
        static N: AtomicU64 = AtomicU64::new(0);
        let bytes = memory_mib * 1024 * 1024;
        let shm = Path::new("/dev/shm");
        let prefix = format!("nix-lazy-builder-{builder}-");
        for d in [shm, state_dir] {
            remove_stale(d, &prefix);
        }
        let dir = if has_room(shm, bytes) { shm } else { state_dir };
        let path = dir.join(format!(
            "{prefix}{}-{}.ram",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        if let Err(e) = file.set_len(bytes) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(LiveRam { path, file })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the name (QEMU and we keep the file open).
    pub(super) fn unlink(&self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %self.path.display(), error = %e, "cannot remove the guest RAM file's name");
        }
    }
}

impl Drop for LiveRam {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// Removes `PREFIX<pid>-<n>.ram` files in `dir` whose process is gone: a supervisor killed in
/// the moment between creating a RAM file and QEMU mapping it leaves its name behind.
fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let Some(pid) = rest
            .strip_suffix(".ram")
            .and_then(|r| r.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether the filesystem of `dir` (a directory we may write) has `bytes` free, with a
/// quarter to spare.
fn has_room(dir: &Path, bytes: u64) -> bool {
    match rustix::fs::statvfs(dir) {
        Ok(s) => {
            let free = s.f_bavail.saturating_mul(s.f_frsize);
            free / 4 * 3 >= bytes && rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).is_ok()
        }
        Err(_) => false,
    }
}

/// A cold boot's snapshot, to be made once it is ready.
pub(super) struct Pending {
    pub live: LiveRam,
    pub fingerprint: Fingerprint,
    pub layout: Layout,
    /// The accelerator it runs with (`tcg`, `kvm`, `hvf`).
    pub accel: String,
    pub overlay: Option<PathBuf>,
    pub memory_bytes: u64,
    pub qmp_socket: PathBuf,
    pub agent_socket: PathBuf,
    pub migrate_socket: PathBuf,
}

// ------------------------------------------------------------------------------------------------
// Making a snapshot

/// [`make`] within what is left of the boot's `deadline` (at most [`MAKE_LIMIT`]); the outcome
/// is logged, never returned: a builder without a snapshot still builds.
pub(super) async fn make_logged(
    builder: &str,
    pending: Box<Pending>,
    child: &mut Child,
    ready: &Ready,
    deadline: tokio::time::Instant,
) {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if left < MAKE_MIN {
        warn!(
            builder,
            "no snapshot this time: the boot left too little time to make one"
        );
        return;
    }
    let t0 = Instant::now();
    let limit = left.min(MAKE_LIMIT);
    let layout = pending.layout.clone();
    let outcome = tokio::time::timeout(limit, make(&pending, child, &ready.nix_version))
        .await
        .unwrap_or_else(|_| Err(format!("not done within {}", fmt_elapsed(limit))));
    match outcome {
        Ok(meta) => info!(
            builder,
            paused_ms = meta.paused_ms,
            ram_mib = meta.ram_data_bytes / (1024 * 1024),
            devices_bytes = meta.devices_bytes,
            took = %fmt_elapsed(t0.elapsed()),
            "snapshot made"
        ),
        Err(why) => {
            warn!(builder, "cannot make a snapshot: {why}");
            // Never leave the VM paused.
            let _ = qmp_do(&pending.qmp_socket, "cont", None).await;
            if let Err(e) = snapshot::remove(&layout) {
                warn!(builder, error = %e, "cannot remove the unfinished snapshot");
            }
        }
    }
}

async fn qmp_do(
    socket: &Path,
    command: &str,
    args: Option<serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let mut q = Qmp::connect(socket, QMP_LIMIT)
        .await
        .map_err(|e| e.to_string())?;
    q.execute(command, args, QMP_LIMIT)
        .await
        .map_err(|e| e.to_string())
}

fn ignore_shared() -> serde_json::Value {
    serde_json::json!({ "capabilities": [ { "capability": "x-ignore-shared", "state": true } ] })
}

/// Makes and publishes the snapshot of the ready VM `child`; see the module docs.
async fn make(p: &Pending, child: &mut Child, nix_version: &str) -> Result<Meta, String> {
    let soon = || tokio::time::Instant::now() + Duration::from_secs(3);
    super::agent::ping(&p.agent_socket, soon())
        .await
        .map_err(|e| format!("{e} (does the image run the guest agent? see examples/vm)"))?;
    let files = snapshot::prepare_incoming(&p.layout)
        .map_err(|e| format!("cannot create {}: {e}", p.layout.incoming().dir().display()))?;
    let _ = std::fs::remove_file(&p.migrate_socket);
    let listener = UnixListener::bind(&p.migrate_socket)
        .map_err(|e| format!("cannot listen on {}: {e}", p.migrate_socket.display()))?;

    let mut q = Qmp::connect(&p.qmp_socket, QMP_LIMIT)
        .await
        .map_err(|e| e.to_string())?;
    let paused = Instant::now();
    q.execute("stop", None, QMP_LIMIT)
        .await
        .map_err(|e| e.to_string())?;
    // From here on, every way out resumes the VM (make_logged does on an error).
    q.execute("migrate-set-capabilities", Some(ignore_shared()), QMP_LIMIT)
        .await
        .map_err(|e| e.to_string())?;
    let uri = format!("unix:{}", p.migrate_socket.display());
    q.execute(
        "migrate",
        Some(serde_json::json!({ "uri": uri })),
        QMP_LIMIT,
    )
    .await
    .map_err(|e| e.to_string())?;
    let (stream, _) = tokio::select! {
        exit = child.wait() => return Err(format!("qemu {} while it was being snapshotted", super::child::describe_status(&exit.status))),
        a = listener.accept() => a.map_err(|e| format!("accepting QEMU's migration stream: {e}"))?,
    };
    let (devices_bytes, devices_sha256) = receive(stream, &files.devices()).await?;
    wait_migration(&mut q, child, "completed").await?;
    drop(listener);
    let _ = std::fs::remove_file(&p.migrate_socket);

    // Still paused: the RAM and the disk are as the device state expects them.
    let live = p
        .live
        .file
        .try_clone()
        .map_err(|e| format!("cannot duplicate the RAM file's descriptor: {e}"))?;
    let ram = files.ram();
    let len = p.memory_bytes;
    let overlay = p.overlay.clone();
    let disk = files.disk();
    let ram_data_bytes = tokio::task::spawn_blocking(move || -> Result<u64, String> {
        let n = snapshot::copy_sparse(&live, &ram, len)
            .map_err(|e| format!("copying guest RAM to {}: {e}", ram.display()))?;
        if let Some(o) = overlay {
            let f = File::open(&o).map_err(|e| format!("{}: {e}", o.display()))?;
            let size = f
                .metadata()
                .map_err(|e| format!("{}: {e}", o.display()))?
                .len();
            snapshot::copy_sparse(&f, &disk, size)
                .map_err(|e| format!("copying the disk overlay to {}: {e}", disk.display()))?;
        }
        Ok(n)
    })
    .await
    .map_err(|e| format!("the copy task failed: {e}"))??;
    q.execute("cont", None, QMP_LIMIT)
        .await
        .map_err(|e| e.to_string())?;
    let paused_ms = u64::try_from(paused.elapsed().as_millis()).unwrap_or(u64::MAX);

    let meta = Meta {
        fingerprint: p.fingerprint.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        accel: p.accel.clone(),
        ram_bytes: p.memory_bytes,
        ram_data_bytes,
        devices_bytes,
        devices_sha256,
        disk: p.overlay.is_some(),
        nix_version: nix_version.to_owned(),
        paused_ms,
    };
    let layout = p.layout.clone();
    let m = meta.clone();
    tokio::task::spawn_blocking(move || {
        snapshot::write_meta(&files, &m)?;
        snapshot::publish(&layout)
    })
    .await
    .map_err(|e| format!("the publish task failed: {e}"))?
    .map_err(|e| format!("cannot publish the snapshot: {e}"))?;
    Ok(meta)
}

/// Writes a migration stream into `path` (0600), returning its length and SHA-256.
async fn receive(mut stream: UnixStream, path: &Path) -> Result<(u64, String), String> {
    let mut out = tokio::fs::File::from_std(
        snapshot::create_private(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let got = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading the migration stream: {e}"))?;
        if got == 0 {
            break;
        }
        h.update(&buf[..got]);
        out.write_all(&buf[..got])
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        n += got as u64;
    }
    out.flush()
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((n, snapshot::hex(&h.finalize())))
}

/// Polls `query-migrate` until its status is `want` (`completed`), failing on `failed` or
/// `cancelled`, or when QEMU exits.
async fn wait_migration(q: &mut Qmp, child: &mut Child, want: &str) -> Result<(), String> {
    loop {
        let v = tokio::select! {
            exit = child.wait() => return Err(format!("qemu {} during the migration", super::child::describe_status(&exit.status))),
            v = q.execute("query-migrate", None, QMP_LIMIT) => v.map_err(|e| e.to_string())?,
        };
        let status = v.get("status").and_then(|s| s.as_str()).unwrap_or("");
        if status == want {
            return Ok(());
        }
        if matches!(status, "failed" | "cancelled") {
            let why = v
                .get("error-desc")
                .and_then(|s| s.as_str())
                .unwrap_or("no reason given");
            return Err(format!("the migration {status}: {why}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ------------------------------------------------------------------------------------------------
// Restoring

/// Feeds `devices` into a QEMU that was started with `-incoming defer`, waits until the
/// migration completed, and resumes the guest; all before `deadline`.
pub(super) async fn incoming(
    qmp_socket: &Path,
    child: &mut Child,
    devices: &Path,
    migrate_socket: &Path,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    let work = async {
        let mut q = Qmp::connect(qmp_socket, QMP_LIMIT)
            .await
            .map_err(|e| e.to_string())?;
        q.execute("migrate-set-capabilities", Some(ignore_shared()), QMP_LIMIT)
            .await
            .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(migrate_socket);
        let uri = format!("unix:{}", migrate_socket.display());
        q.execute(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": uri })),
            QMP_LIMIT,
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut stream = UnixStream::connect(migrate_socket)
            .await
            .map_err(|e| format!("cannot connect to QEMU's migration socket: {e}"))?;
        let mut f = tokio::fs::File::open(devices)
            .await
            .map_err(|e| format!("{}: {e}", devices.display()))?;
        let sent = tokio::io::copy(&mut f, &mut stream).await;
        let _ = stream.shutdown().await;
        drop(stream);
        // QEMU may stop reading a stream it rejects: its verdict is the better error.
        let done = wait_migration(&mut q, child, "completed").await;
        sent.map_err(|e| format!("sending the device state: {e}"))?;
        done?;
        q.execute("cont", None, QMP_LIMIT)
            .await
            .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(migrate_socket);
        Ok::<(), String>(())
    };
    match tokio::time::timeout_at(deadline, work).await {
        Ok(r) => r,
        Err(_) => Err("the device state was not loaded in time".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_ram_is_private_sparse_and_stale_names_go() {
        let dir = tempfile::tempdir().unwrap();
        // A name left by a process that is gone, one of a live process, one of another builder.
        let dead = dir.path().join("nix-lazy-builder-vm-2147483646-0.ram");
        let live = dir
            .path()
            .join(format!("nix-lazy-builder-vm-{}-99.ram", std::process::id()));
        let other = dir.path().join("nix-lazy-builder-vm2-2147483646-0.ram");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        remove_stale(dir.path(), "nix-lazy-builder-vm-");
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());

        let ram = LiveRam::create(dir.path(), "vm", 4).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let m = std::fs::metadata(ram.path()).unwrap();
        assert_eq!(m.len(), 4 << 20);
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert!(m.blocks() * 512 < 4 << 20, "sparse");
        let path = ram.path().to_owned();
        ram.unlink();
        assert!(!path.exists());
        drop(ram);
    }
}
