//! Snapshots of QEMU builders (`snapshot = true`): what a snapshot is made of, where its files
//! live, and whether the next boot restores it, boots cold and makes it, or boots cold without
//! one. The pure parts ([`Fingerprint`], [`Layout`], [`decide`]) are kept apart from the few
//! file operations (reading the metadata, checking the files, the sparse copy of guest RAM,
//! publishing and removing a snapshot). Taking and restoring one is `restore.rs`.
//!
//! A snapshot is the guest's RAM in a file plus QEMU's device state, migrated with the
//! capability `x-ignore-shared` (so the device state is a few hundred KiB):
//!
//! ```text
//! <state-dir>/builders/<name>/   0700 (made by the supervisor)
//!   snapshot/                    0700  the snapshot restores use
//!     meta.json                  0600  fingerprint, sizes, checksum of `devices`, resolved accelerator
//!     ram                        0600  guest RAM, sparse, exactly `memory` bytes long
//!     devices                    0600  QEMU's device state stream
//!     disk.qcow2                 0600  only with an ephemeral disk: the overlay as it was
//!   snapshot.new/                      while one is being made; removed when found later
//!   snapshot.old/                      for a moment while one replaces another
//! ```
//!
//! Must never: change the files of a published snapshot in place (a restored VM maps `ram`
//! privately, and a change under that mapping changes its memory; a new snapshot is a new
//! directory, renamed into place), publish a snapshot before all of its files are written and
//! synced, or leave snapshot files readable by anyone but their owner: guest RAM holds the
//! guest's SSH host key.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bumped whenever the guest-visible QEMU command line of a snapshotting VM changes (devices,
/// their order, the agent's port): a snapshot of another format is remade, never restored.
pub const FORMAT: u32 = 1;
/// The directory a snapshot lives in, inside the builder's state directory.
pub const DIR: &str = "snapshot";
/// The virtio-serial port name the guest agent (`examples/vm/nlb-agent.c`) listens on.
pub const AGENT_PORT: &str = "org.nix-lazy-builder.agent";

const META: &str = "meta.json";
const RAM: &str = "ram";
const DEVICES: &str = "devices";
const DISK: &str = "disk.qcow2";

/// A file the snapshot depends on, by identity: its path, and the size, modification time and
/// inode of what the path resolves to. Image builders (make-image, Nix) write a new file and
/// rename it into place, so any rebuild shows here without reading the file's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileId {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i128,
    pub dev: u64,
    pub inode: u64,
}

impl FileId {
    /// The identity of `path` (following symlinks).
    pub fn of(path: &Path) -> io::Result<FileId> {
        let m = fs::metadata(path)?;
        Ok(FileId {
            path: path.to_owned(),
            size: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            dev: m.dev(),
            inode: m.ino(),
        })
    }
}

/// Everything a restore must match: when any of it changes, the snapshot is dropped and made
/// again by the next cold boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Fingerprint {
    pub format: u32,
    /// The QEMU binary and the first line of its `--version`.
    pub qemu: FileId,
    pub qemu_version: String,
    /// `-machine` and `-cpu` as the command line has them (defaults resolved).
    pub machine: Option<String>,
    pub cpu: Option<String>,
    /// The accelerator as configured (`auto`, `kvm`, `hvf`, `tcg`); the one the snapshot was
    /// made with is [`Meta::accel`].
    pub accel: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub kernel: Option<FileId>,
    pub initrd: Option<FileId>,
    pub append: Option<String>,
    /// The (read-only, ephemeral) disk image.
    pub disk: Option<FileId>,
    pub drives: Vec<String>,
    pub extra_args: Vec<String>,
    pub environment: BTreeMap<String, String>,
    /// The host's architecture (a KVM/HVF snapshot belongs to the CPU it was made on).
    pub host_arch: String,
}

impl Fingerprint {
    /// What differs from `old`, one short phrase each ("memory 1024 → 1536 MiB"), in the order
    /// of the fields. Empty when they are equal.
    pub fn differences(&self, old: &Fingerprint) -> Vec<String> {
        let mut d = Vec::new();
        // (what, how it reads, unit): each field shown the same way for both sides.
        type Shown = fn(&Fingerprint) -> String;
        let plain: [(&str, Shown, &str); 12] = [
            ("format", |f| f.format.to_string(), ""),
            ("QEMU version", |f| f.qemu_version.clone(), ""),
            ("machine", |f| opt(&f.machine), ""),
            ("cpu", |f| opt(&f.cpu), ""),
            ("accel", |f| f.accel.clone(), ""),
            ("memory", |f| f.memory_mib.to_string(), " MiB"),
            ("cpus", |f| f.cpus.to_string(), ""),
            ("append", |f| opt(&f.append), ""),
            ("drives", |f| format!("{:?}", f.drives), ""),
            ("extra-args", |f| format!("{:?}", f.extra_args), ""),
            ("environment", |f| format!("{:?}", f.environment), ""),
            ("host", |f| f.host_arch.clone(), ""),
        ];
        for (what, show, unit) in plain {
            let (was, new) = (show(old), show(self));
            if new != was {
                d.push(format!("{what} {was} → {new}{unit}"));
            }
        }
        for (what, new, was) in [
            ("QEMU binary", Some(&self.qemu), Some(&old.qemu)),
            ("kernel", self.kernel.as_ref(), old.kernel.as_ref()),
            ("initrd", self.initrd.as_ref(), old.initrd.as_ref()),
            ("disk", self.disk.as_ref(), old.disk.as_ref()),
        ] {
            match (new, was) {
                (Some(n), Some(w)) if n.path != w.path => d.push(format!(
                    "{what} {} → {}",
                    w.path.display(),
                    n.path.display()
                )),
                (Some(n), Some(w)) if n != w => {
                    d.push(format!("{what} {} was rebuilt", n.path.display()))
                }
                (Some(n), None) => d.push(format!("{what} {} added", n.path.display())),
                (None, Some(w)) => d.push(format!("{what} {} removed", w.path.display())),
                _ => {}
            }
        }
        d
    }
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "(none)".into())
}

/// What is known about a published snapshot (its `meta.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Meta {
    pub fingerprint: Fingerprint,
    /// Seconds since the epoch when it was made.
    pub created: u64,
    /// The accelerator it was made with (`tcg`, `kvm`, `hvf`); a restore uses the same.
    pub accel: String,
    /// Length of `ram` (the guest's memory size) and the bytes of it that hold data.
    pub ram_bytes: u64,
    pub ram_data_bytes: u64,
    /// Length and SHA-256 (hex) of `devices`.
    pub devices_bytes: u64,
    pub devices_sha256: String,
    /// Whether `disk.qcow2` is part of it.
    pub disk: bool,
    /// The remote Nix's answer when the snapshot was made.
    pub nix_version: String,
    /// How long the VM was paused to make it.
    pub paused_ms: u64,
}

/// The snapshot paths of one builder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The builder's state directory.
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(state_dir: &Path) -> Layout {
        Layout {
            dir: state_dir.to_owned(),
        }
    }
    /// The published snapshot.
    pub fn current(&self) -> Files {
        Files(self.dir.join(DIR))
    }
    /// One being made.
    pub fn incoming(&self) -> Files {
        Files(self.dir.join(format!("{DIR}.new")))
    }
    fn old(&self) -> PathBuf {
        self.dir.join(format!("{DIR}.old"))
    }
}

/// The files of one snapshot directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Files(pub PathBuf);

impl Files {
    pub fn dir(&self) -> &Path {
        &self.0
    }
    pub fn meta(&self) -> PathBuf {
        self.0.join(META)
    }
    pub fn ram(&self) -> PathBuf {
        self.0.join(RAM)
    }
    pub fn devices(&self) -> PathBuf {
        self.0.join(DEVICES)
    }
    pub fn disk(&self) -> PathBuf {
        self.0.join(DISK)
    }
}

/// What the next boot of a builder does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// `snapshot` is off: a plain cold boot (a snapshot left from earlier is removed).
    Off,
    /// Restore this snapshot.
    Restore(Box<Meta>),
    /// Boot cold, then make a snapshot once the builder is ready; `why` there is none to
    /// restore (an old one is removed first).
    Make { why: String },
}

/// The decision for a builder whose snapshot setting is `enabled`, whose configuration now
/// has `current` as its fingerprint, given what `meta.json` said (`Ok(None)`: there is no
/// snapshot) and what checking the files found.
pub fn decide(
    enabled: bool,
    current: &Fingerprint,
    stored: Result<Option<Meta>, String>,
    files: impl FnOnce(&Meta) -> Result<(), String>,
) -> Decision {
    if !enabled {
        return Decision::Off;
    }
    let meta = match stored {
        Err(why) => {
            return Decision::Make {
                why: format!("the snapshot is unusable: {why}"),
            };
        }
        Ok(None) => {
            return Decision::Make {
                why: "there is no snapshot yet".into(),
            };
        }
        Ok(Some(m)) => m,
    };
    let diff = current.differences(&meta.fingerprint);
    if !diff.is_empty() {
        return Decision::Make {
            why: format!("the configuration changed ({})", diff.join("; ")),
        };
    }
    if meta.fingerprint != *current {
        // A change `differences` does not spell out (it should): still not the same VM.
        return Decision::Make {
            why: "the configuration changed".into(),
        };
    }
    match files(&meta) {
        Ok(()) => Decision::Restore(Box::new(meta)),
        Err(why) => Decision::Make {
            why: format!("the snapshot is damaged: {why}"),
        },
    }
}

// ------------------------------------------------------------------------------------------------
// Files

/// Reads `meta.json` of the published snapshot: `Ok(None)` when there is none.
pub fn read_meta(files: &Files) -> Result<Option<Meta>, String> {
    let path = files.meta();
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !files.dir().exists() => {
            return Ok(None);
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Checks that the files `meta` describes are there, private, and of the recorded sizes, and
/// that `devices` has the recorded checksum (it is small). A truncated `ram` shows as a wrong
/// size; its contents are too big to hash on every restore, so a damaged guest RAM shows as a
/// restore that fails or never gets ready (and falls back to a cold boot).
pub fn check_files(files: &Files, meta: &Meta) -> Result<(), String> {
    private_dir(files.dir())?;
    private_file_of_size(&files.ram(), meta.ram_bytes)?;
    private_file_of_size(&files.devices(), meta.devices_bytes)?;
    let sum = sha256_file(&files.devices())
        .map_err(|e| format!("cannot read {}: {e}", files.devices().display()))?;
    if sum != meta.devices_sha256 {
        return Err(format!(
            "{} does not have the checksum it was made with",
            files.devices().display()
        ));
    }
    if meta.disk {
        private_file(&files.disk())?;
    }
    Ok(())
}

/// A directory we own that nobody else may enter, and not a symlink.
fn private_dir(p: &Path) -> Result<(), String> {
    let m = fs::symlink_metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    if !m.is_dir() {
        return Err(format!("{} is not a directory", p.display()));
    }
    owned_private(p, &m)
}

/// A regular file we own that nobody else may read, and not a symlink.
fn private_file(p: &Path) -> Result<fs::Metadata, String> {
    let m = fs::symlink_metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    if !m.is_file() {
        return Err(format!("{} is not a regular file", p.display()));
    }
    owned_private(p, &m)?;
    Ok(m)
}

/// A [`private_file`] of exactly `bytes` bytes.
fn private_file_of_size(p: &Path, bytes: u64) -> Result<(), String> {
    let len = private_file(p)?.len();
    if len != bytes {
        return Err(format!("{} is {len} bytes long, not {bytes}", p.display()));
    }
    Ok(())
}

fn owned_private(p: &Path, m: &fs::Metadata) -> Result<(), String> {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(format!(
            "{} is owned by uid {}, not us",
            p.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is accessible to others (mode {:o})",
            p.display(),
            m.mode() & 0o777
        ));
    }
    Ok(())
}

/// SHA-256 of a file, hex.
pub fn sha256_file(p: &Path) -> io::Result<String> {
    let mut f = File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Creates an empty `snapshot.new/` (0700), removing what a failed attempt left there.
pub fn prepare_incoming(layout: &Layout) -> io::Result<Files> {
    let files = layout.incoming();
    remove_tree(files.dir())?;
    fs::DirBuilder::new().mode(0o700).create(files.dir())?;
    Ok(files)
}

/// Creates a new private (0600) file for writing.
pub fn create_private(p: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
}

/// Writes `meta.json` into `files`, synced.
pub fn write_meta(files: &Files, meta: &Meta) -> io::Result<()> {
    let mut f = create_private(&files.meta())?;
    let text = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
    f.write_all(&text)?;
    f.sync_all()
}

/// Makes `snapshot.new/` the published snapshot: every file in it is synced first, then the
/// old snapshot (if any) is moved aside, the new one renamed into place, and the old removed.
pub fn publish(layout: &Layout) -> io::Result<()> {
    let new = layout.incoming();
    for entry in fs::read_dir(new.dir())? {
        File::open(entry?.path())?.sync_all()?;
    }
    File::open(new.dir())?.sync_all()?;
    let cur = layout.current();
    let old = layout.old();
    remove_tree(&old)?;
    match fs::rename(cur.dir(), &old) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fs::rename(new.dir(), cur.dir())?;
    File::open(&layout.dir)?.sync_all()?;
    remove_tree(&old)
}

/// Removes the published snapshot and any half-made one. The published directory is renamed
/// away first, so nothing ever sees half of it.
pub fn remove(layout: &Layout) -> io::Result<()> {
    remove_tree(layout.incoming().dir())?;
    let old = layout.old();
    remove_tree(&old)?;
    match fs::rename(layout.current().dir(), &old) {
        Ok(()) => remove_tree(&old),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn remove_tree(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
    }
}

/// Copies `len` bytes of `src` into the new file `dst` (0600), leaving holes where `src` has
/// them (guest RAM is mostly holes: only what the guest touched is data). Returns the bytes
/// of data copied.
pub fn copy_sparse(src: &File, dst: &Path, len: u64) -> io::Result<u64> {
    let mut out = create_private(dst)?;
    out.set_len(len)?;
    let mut copied = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let data = match rustix::fs::seek(src, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            // No data after `pos`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= len {
            break;
        }
        let hole = rustix::fs::seek(src, rustix::fs::SeekFrom::Hole(data))
            .map_err(io::Error::from)?
            .min(len);
        let mut at = data;
        while at < hole {
            let n = usize::try_from((hole - at).min(buf.len() as u64)).unwrap_or(buf.len());
            let got = rustix::io::pread(src, &mut buf[..n], at).map_err(io::Error::from)?;
            if got == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was copied",
                ));
            }
            out.seek(io::SeekFrom::Start(at))?;
            out.write_all(&buf[..got])?;
            at += got as u64;
            copied += got as u64;
        }
        pos = hole;
    }
    Ok(copied)
}

// ------------------------------------------------------------------------------------------------
// For status and doctor

/// A published snapshot as `status` and `doctor` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// When it was made.
    pub created: SystemTime,
    /// Disk space its files take (allocated blocks, so guest RAM's holes do not count).
    pub disk_bytes: u64,
    pub meta: Meta,
}

impl Info {
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.created).unwrap_or_default()
    }
}

/// The published snapshot in `state_dir`, if there is a readable one (whether it still
/// matches the configuration is [`decide`]'s question).
pub fn info(state_dir: &Path) -> Option<Info> {
    let files = Layout::new(state_dir).current();
    let meta = read_meta(&files).ok()??;
    let disk_bytes = fs::read_dir(files.dir())
        .ok()?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum();
    Some(Info {
        created: UNIX_EPOCH + Duration::from_secs(meta.created),
        disk_bytes,
        meta,
    })
}

/// Whether a directory is private (0700 or stricter); for the one-line doctor check.
pub fn dir_is_private(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o077 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fid(path: &str, size: u64) -> FileId {
        FileId {
            path: path.into(),
            size,
            mtime_ns: 1,
            dev: 1,
            inode: 7,
        }
    }

    fn fp() -> Fingerprint {
        Fingerprint {
            format: FORMAT,
            qemu: fid("/usr/bin/qemu-system-aarch64", 10),
            qemu_version: "QEMU emulator version 10.0.2".into(),
            machine: Some("virt".into()),
            cpu: Some("max".into()),
            accel: "auto".into(),
            memory_mib: 1024,
            cpus: 2,
            kernel: Some(fid("/img/vmlinuz", 100)),
            initrd: Some(fid("/img/initrd.cpio", 200)),
            append: Some("console=ttyAMA0".into()),
            disk: None,
            drives: vec![],
            extra_args: vec![],
            environment: BTreeMap::new(),
            host_arch: "x86_64".into(),
        }
    }

    fn meta(f: Fingerprint) -> Meta {
        Meta {
            fingerprint: f,
            created: 1_700_000_000,
            accel: "tcg".into(),
            ram_bytes: 1 << 30,
            ram_data_bytes: 200 << 20,
            devices_bytes: 700_000,
            devices_sha256: "00".into(),
            disk: false,
            nix_version: "nix-store (Nix) 2.8.0".into(),
            paused_ms: 40,
        }
    }

    #[test]
    fn decisions() {
        let cur = fp();
        let ok = |_: &Meta| Ok(());
        assert_eq!(decide(false, &cur, Ok(Some(meta(fp()))), ok), Decision::Off);
        assert_eq!(
            decide(true, &cur, Ok(None), ok),
            Decision::Make {
                why: "there is no snapshot yet".into()
            }
        );
        assert!(matches!(
            decide(true, &cur, Ok(Some(meta(fp()))), ok),
            Decision::Restore(m) if m.accel == "tcg"
        ));
        match decide(true, &cur, Err("meta.json: EOF".into()), ok) {
            Decision::Make { why } => assert_eq!(why, "the snapshot is unusable: meta.json: EOF"),
            other => panic!("{other:?}"),
        }
        let damaged = |_: &Meta| Err("ram is 5 bytes long, not 1073741824".to_owned());
        match decide(true, &cur, Ok(Some(meta(fp()))), damaged) {
            Decision::Make { why } => assert!(why.starts_with("the snapshot is damaged: ram is 5")),
            other => panic!("{other:?}"),
        }
        // A changed fingerprint wins over the file check (which is not even run).
        let mut old = fp();
        old.memory_mib = 512;
        let never = |_: &Meta| -> Result<(), String> { panic!("files checked") };
        match decide(true, &cur, Ok(Some(meta(old))), never) {
            Decision::Make { why } => {
                assert_eq!(why, "the configuration changed (memory 512 → 1024 MiB)")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_field_counts() {
        let base = fp();
        let mut changes: Vec<(Fingerprint, &str)> = Vec::new();
        let mut c = |f: &dyn Fn(&mut Fingerprint), what: &'static str| {
            let mut x = fp();
            f(&mut x);
            changes.push((x, what));
        };
        c(&|x| x.format += 1, "format 1 → 2");
        c(
            &|x| x.qemu.mtime_ns += 1,
            "QEMU binary /usr/bin/qemu-system-aarch64 was rebuilt",
        );
        c(
            &|x| x.qemu_version = "QEMU emulator version 7.2.0".into(),
            "QEMU version",
        );
        c(
            &|x| x.machine = Some("virt-9.2".into()),
            "machine virt → virt-9.2",
        );
        c(
            &|x| x.cpu = Some("cortex-a57".into()),
            "cpu max → cortex-a57",
        );
        c(&|x| x.accel = "tcg".into(), "accel auto → tcg");
        c(&|x| x.memory_mib = 1536, "memory 1024 → 1536 MiB");
        c(&|x| x.cpus = 4, "cpus 2 → 4");
        c(
            &|x| x.kernel.as_mut().unwrap().inode = 8,
            "kernel /img/vmlinuz was rebuilt",
        );
        c(
            &|x| x.kernel = Some(fid("/img2/vmlinuz", 100)),
            "kernel /img/vmlinuz → /img2/vmlinuz",
        );
        c(
            &|x| x.initrd.as_mut().unwrap().size = 201,
            "initrd /img/initrd.cpio was rebuilt",
        );
        c(&|x| x.initrd = None, "initrd /img/initrd.cpio removed");
        c(
            &|x| x.append = Some("quiet".into()),
            "append console=ttyAMA0 → quiet",
        );
        c(&|x| x.disk = Some(fid("/d.img", 1)), "disk /d.img added");
        c(&|x| x.drives = vec!["file=/x,readonly=on".into()], "drives");
        c(&|x| x.extra_args = vec!["-smp".into()], "extra-args");
        c(
            &|x| {
                x.environment.insert("A".into(), "b".into());
            },
            "environment",
        );
        c(&|x| x.host_arch = "aarch64".into(), "host x86_64 → aarch64");
        for (changed, what) in changes {
            assert_ne!(changed, base, "{what}");
            let d = changed.differences(&base);
            assert_eq!(d.len(), 1, "{what}: {d:?}");
            assert!(d[0].starts_with(what), "{what}: {d:?}");
            assert!(
                matches!(
                    decide(true, &changed, Ok(Some(meta(base.clone()))), |_| Ok(())),
                    Decision::Make { .. }
                ),
                "{what}"
            );
        }
        assert!(base.differences(&fp()).is_empty());
    }

    #[test]
    fn layout_and_meta_roundtrip() {
        let l = Layout::new(Path::new("/state/builders/vm"));
        for (got, want) in [
            (l.current().ram(), "/state/builders/vm/snapshot/ram"),
            (l.current().devices(), "/state/builders/vm/snapshot/devices"),
            (l.current().meta(), "/state/builders/vm/snapshot/meta.json"),
            (l.current().disk(), "/state/builders/vm/snapshot/disk.qcow2"),
            (
                l.incoming().dir().to_path_buf(),
                "/state/builders/vm/snapshot.new",
            ),
        ] {
            assert_eq!(got, Path::new(want));
        }
        let m = meta(fp());
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("\"memory-mib\":1024"), "{text}");
        assert_eq!(serde_json::from_str::<Meta>(&text).unwrap(), m);
    }

    /// Publishing, checking, damage, and removal, on real files (0600 in a 0700 directory).
    #[test]
    fn files_publish_check_remove() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let l = Layout::new(tmp.path());
        assert_eq!(read_meta(&l.current()), Ok(None));
        assert!(info(tmp.path()).is_none());

        let make = |ram_len: u64, payload: &[u8]| {
            let new = prepare_incoming(&l).unwrap();
            assert_eq!(fs::metadata(new.dir()).unwrap().mode() & 0o777, 0o700);
            // A sparse source: 1 MiB hole, 8 KiB data, hole to the end.
            let src_path = tmp.path().join("live");
            let _ = fs::remove_file(&src_path);
            let mut src = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&src_path)
                .unwrap();
            src.set_len(ram_len).unwrap();
            src.seek(io::SeekFrom::Start(1 << 20)).unwrap();
            src.write_all(&[7u8; 8192]).unwrap();
            let copied = copy_sparse(&src, &new.ram(), ram_len).unwrap();
            fs::write(new.devices(), payload).unwrap();
            fs::set_permissions(new.devices(), fs::Permissions::from_mode(0o600)).unwrap();
            let mut m = meta(fp());
            m.ram_bytes = ram_len;
            m.ram_data_bytes = copied;
            m.devices_bytes = payload.len() as u64;
            m.devices_sha256 = sha256_file(&new.devices()).unwrap();
            write_meta(&new, &m).unwrap();
            publish(&l).unwrap();
            (m, copied)
        };
        let (m, copied) = make(4 << 20, b"device state");
        assert!((8192..4 << 20).contains(&copied), "{copied}");
        let cur = l.current();
        assert!(!l.incoming().dir().exists());
        assert_eq!(read_meta(&cur).unwrap().as_ref(), Some(&m));
        assert_eq!(check_files(&cur, &m), Ok(()));
        let ram = fs::read(cur.ram()).unwrap();
        assert_eq!(ram.len(), 4 << 20);
        assert!(ram[..1 << 20].iter().all(|&b| b == 0));
        assert!(ram[1 << 20..(1 << 20) + 8192].iter().all(|&b| b == 7));
        assert_eq!(fs::metadata(cur.ram()).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(cur.meta()).unwrap().mode() & 0o777, 0o600);
        let i = info(tmp.path()).unwrap();
        assert!(
            i.disk_bytes < 4 << 20,
            "holes are not counted: {}",
            i.disk_bytes
        );
        assert_eq!(i.meta, m);

        // Damage: truncated RAM, changed device state, a file others can read.
        let f = OpenOptions::new().write(true).open(cur.ram()).unwrap();
        f.set_len(4096).unwrap();
        assert!(
            check_files(&cur, &m)
                .unwrap_err()
                .contains("4096 bytes long")
        );
        f.set_len(4 << 20).unwrap();
        assert_eq!(check_files(&cur, &m), Ok(()));
        fs::write(cur.devices(), b"device stat!").unwrap();
        assert!(check_files(&cur, &m).unwrap_err().contains("checksum"));
        fs::write(cur.devices(), b"device state").unwrap();
        fs::set_permissions(cur.ram(), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            check_files(&cur, &m)
                .unwrap_err()
                .contains("accessible to others")
        );
        fs::set_permissions(cur.ram(), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(cur.meta(), b"{\"fingerprint\":").unwrap();
        assert!(read_meta(&cur).is_err());

        // A second snapshot replaces the first as a whole.
        let (m2, _) = make(8 << 20, b"other state");
        assert_eq!(read_meta(&cur).unwrap(), Some(m2.clone()));
        assert_eq!(check_files(&cur, &m2), Ok(()));
        remove(&l).unwrap();
        assert!(!cur.dir().exists());
        assert_eq!(read_meta(&cur), Ok(None));
        remove(&l).unwrap();
    }
}
