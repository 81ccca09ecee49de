//! Placing build outputs in the local store while nix-daemon holds their locks.
//!
//! The daemon holds `flock`s on every output path while the hook runs, so a new daemon
//! connection or a plain `nix-store --import` would deadlock (docs/protocol.md §4). Instead each
//! output's NAR is decoded by `nix-archive` and unpacked ([`restore_nar`]: descriptor-relative,
//! so nothing outside the output is ever followed or created; file contents in 256 KiB writes)
//! under a hidden name beside its store path while it is hashed,
//! the hash and size are compared with what the remote vouched for, and once *every* output is
//! verified they are all moved to their store paths and registered in one
//! `nix-store --register-validity --hash-given` call, which canonicalises them and commits them
//! in one database transaction.
//!
//! Invariant: a path becomes valid only through [`Placed::register`] (the one
//! [`Registrar`]'s child), and only after its bytes were verified. Anything unpacked but not registered is removed ([`Placed`]'s drop).

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use hook_protocol::{Sha256, StorePath};
use rustix::fs::{Mode, OFlags};
use sha2::Digest;
use tokio::sync::mpsc;

/// What the remote said an output's NAR is.
#[derive(Debug, Clone)]
pub struct ExpectedNar {
    pub path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub deriver: Option<StorePath>,
    pub references: Vec<StorePath>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("cannot remove the stale {path}: {source}")]
    RemoveStale {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("unpacking {path}: {source}")]
    Unpack {
        path: String,
        #[source]
        source: nix_archive::nar::Error,
    },
    #[error(
        "hash mismatch for {path}: the builder said {expected_hash:?} ({expected_size} bytes), \
         the NAR we received is {got_hash:?} ({got_size} bytes)"
    )]
    HashMismatch {
        path: String,
        expected_hash: Sha256,
        expected_size: u64,
        got_hash: Sha256,
        got_size: u64,
    },
    #[error("the NAR stream for {path} ended early: {got} of {expected} bytes arrived")]
    Truncated {
        path: String,
        got: u64,
        expected: u64,
    },
    #[error("could not run '{program}': {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("'nix-store --register-validity' failed ({status}): {stderr}")]
    Register { status: String, stderr: String },
    #[error("the unpacking thread stopped unexpectedly")]
    Thread,
}

/// A `Read` over chunks sent from the async side; end of input when the sender is dropped.
pub struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl ChunkReader {
    pub fn new(rx: mpsc::Receiver<Vec<u8>>) -> Self {
        ChunkReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(c) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Hashes and counts everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// How much of a file's contents is gathered before one `write`.
const WRITE_SLICE: usize = 256 * 1024;

/// Restores the NAR on `reader` at `dest` (which must not exist yet).
///
/// Where Nix's case hack is off (everywhere but macOS) this is our own restore over
/// nix-archive's streaming decoder, which writes each file's contents in slices of up to
/// [`WRITE_SLICE`]: nix-archive 0.6's `restore_reader` copies contents with `io::copy` through
/// an 8 KiB stack buffer, 131,072 `write` calls per GiB (BENCHMARKS.md, P3). Like it, every
/// entry is created relative to its parent directory's descriptor, never following a symlink,
/// and never over an existing name (the decoder rejects unsorted or duplicate names). With the
/// case hack on, the library's restore is used as it is.
fn restore_nar<R: Read>(reader: &mut R, dest: &Path) -> Result<(), nix_archive::nar::Error> {
    use nix_archive::nar::{CaseHack, Event};
    let case_hack = CaseHack::native();
    if case_hack == CaseHack::Enabled {
        return nix_archive::nar::restore_reader(reader, dest, case_hack);
    }
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot unpack to {}", dest.display()),
        )
        .into());
    };
    let parent = rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)?;
    let mut unpacker = Unpacker {
        root: (parent, name.to_owned()),
        dirs: Vec::new(),
        buf: vec![0; WRITE_SLICE],
    };
    nix_archive::nar::decode_events_reader(reader, |event| {
        match event {
            Event::DirectoryStart { name } => {
                let (at, name) = unpacker.place(name);
                rustix::fs::mkdirat(at, name, Mode::from_raw_mode(0o777))
                    .map_err(io::Error::from)?;
                let dir = rustix::fs::openat(
                    at,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                    Mode::empty(),
                )
                .map_err(io::Error::from)?;
                unpacker.dirs.push(dir);
            }
            Event::DirectoryEnd { .. } => {
                unpacker.dirs.pop();
            }
            Event::Regular {
                name,
                executable,
                mut contents,
            } => {
                let (at, name) = unpacker.place(name);
                let fd = rustix::fs::openat(
                    at,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::CLOEXEC
                        | OFlags::NOFOLLOW,
                    Mode::from_raw_mode(0o666),
                )
                .map_err(io::Error::from)?;
                let mut file = std::fs::File::from(fd);
                loop {
                    let filled = fill(&mut contents, &mut unpacker.buf)?;
                    if filled == 0 {
                        break;
                    }
                    file.write_all(&unpacker.buf[..filled])?;
                }
                let mode = if executable { 0o755 } else { 0o644 };
                rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).map_err(io::Error::from)?;
            }
            Event::Symlink { name, target } => {
                let (at, name) = unpacker.place(name);
                rustix::fs::symlinkat(OsStr::from_bytes(target), at, name)
                    .map_err(io::Error::from)?;
            }
        }
        Ok(())
    })
}

/// The state of one [`restore_nar`]: where the root goes, the open directories, the buffer.
struct Unpacker {
    root: (OwnedFd, std::ffi::OsString),
    dirs: Vec<OwnedFd>,
    buf: Vec<u8>,
}

impl Unpacker {
    /// The directory and name an entry is created at: the root's for the top node, else the
    /// innermost open directory's.
    fn place<'a>(&'a self, name: Option<&'a [u8]>) -> (BorrowedFd<'a>, &'a OsStr) {
        match (name, self.dirs.last()) {
            (Some(name), Some(dir)) => (dir.as_fd(), OsStr::from_bytes(name)),
            // The decoder names only entries inside a directory.
            _ => (self.root.0.as_fd(), self.root.1.as_os_str()),
        }
    }
}

/// Reads from `r` until `buf` is full or `r` is exhausted; returns how much was read.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Removes `path` whatever it is (file, symlink, directory tree); absent is fine.
pub fn remove_path(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => {
            make_writable(path)?;
            std::fs::remove_dir_all(path)
        }
        Ok(_) => std::fs::remove_file(path),
    }
}

/// Store directories are 0555; when not running as root we need write permission to empty them.
fn make_writable(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Ok(());
    }
    let mut perm = meta.permissions();
    if perm.mode() & 0o700 != 0o700 {
        perm.set_mode(perm.mode() | 0o700);
        std::fs::set_permissions(dir, perm)?;
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            make_writable(&entry.path())?;
        }
    }
    Ok(())
}

/// Prefix of the hidden directories outputs are unpacked into before they are moved into place.
const TEMP_PREFIX: &str = ".nlb-unpack-";

/// Where `path` is unpacked before it is verified: `<store>/.nlb-unpack-<pid>-<hash part>`.
fn temp_path(path: &StorePath) -> PathBuf {
    temp_path_of(std::process::id(), path)
}

/// Where process `pid` unpacks `path` before it is verified.
fn temp_path_of(pid: u32, path: &StorePath) -> PathBuf {
    Path::new(path.store_dir()).join(format!("{TEMP_PREFIX}{pid}-{}", path.hash_part()))
}

/// Notes in the journal of process `pid` (not this one) the unpack directories it will make
/// for `paths`: for a process that cannot write the journal itself (the external-build
/// client, run as a build user), so that [`sweep_stale`] removes them once `pid` is gone.
pub fn note_unpack_dirs(state_dir: &Path, pid: u32, paths: &[StorePath]) -> io::Result<()> {
    let dirs: Vec<PathBuf> = paths.iter().map(|p| temp_path_of(pid, p)).collect();
    append_journal(&journal_of(state_dir, pid), &dirs)
}

/// Process `pid`'s journal file under Nix's state directory `state_dir`.
fn journal_of(state_dir: &Path, pid: u32) -> PathBuf {
    state_dir.join(JOURNAL_DIR).join(pid.to_string())
}

/// Adds `dirs` to `journal`, one line each, making its directory if need be.
fn append_journal(journal: &Path, dirs: &[PathBuf]) -> io::Result<()> {
    if let Some(parent) = journal.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(journal)?;
    for d in dirs {
        writeln!(f, "{}", d.display())?;
    }
    Ok(())
}

/// Where, under Nix's state directory, each hook process notes the unpack directories it
/// creates: `<state>/nix-lazy-builder/unpacking/<pid>`, one path per line, written before the
/// directory is made and removed once they are all gone or registered.
pub const JOURNAL_DIR: &str = "nix-lazy-builder/unpacking";

/// Removes the unpack directories in `store_dir` left by hooks that were killed (their journal
/// file in `state_dir` names a process that is gone), and their journal files. Returns how many
/// directories were removed. Reads only the journal directory, never the whole store (which on
/// a real machine holds tens of thousands of entries), and removes only hidden unpack
/// directories directly in `store_dir`, whatever a journal says.
pub fn sweep_stale(store_dir: &Path, state_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(state_dir.join(JOURNAL_DIR)) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let mut all_gone = true;
        for line in text.lines() {
            let path = Path::new(line);
            let ours = path.parent() == Some(store_dir)
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(TEMP_PREFIX));
            if !ours || path.symlink_metadata().is_err() {
                continue;
            }
            match remove_path(path) {
                Ok(()) => removed += 1,
                Err(err) => {
                    all_gone = false;
                    tracing::warn!(path = %path.display(), error = %err,
                        "cannot remove a stale unpack directory");
                }
            }
        }
        if all_gone {
            let _ = std::fs::remove_file(e.path());
        }
    }
    removed
}

/// One verified output: still under its hidden name (`staged`), or moved to its store path.
struct Output {
    expected: ExpectedNar,
    staged: Option<PathBuf>,
}

/// Outputs unpacked and verified but not yet registered. Dropping it removes them (staged or
/// moved), so a failure anywhere before registration leaves nothing behind.
///
/// A build's outputs stay under their hidden names until every one of them is verified
/// ([`Placed::unpack_staged`]); only then are they all moved into place and registered
/// ([`Placed::register`]), back to back. So a hook killed while it downloads leaves only hidden
/// directories (swept by the next hook), never a complete-looking but invalid output.
#[derive(Default)]
pub struct Placed {
    outputs: Vec<Output>,
    registered: bool,
    /// This process's journal file ([`JOURNAL_DIR`]); `None`: no journal.
    journal: Option<PathBuf>,
}

impl Placed {
    /// Without a journal: a killed process's unpack directories are then never swept.
    pub fn new() -> Self {
        Self::default()
    }

    /// With this process's journal under Nix's state directory `state_dir`, so that if it is
    /// killed the next hook's [`sweep_stale`] removes what it unpacked.
    pub fn journaled(state_dir: &Path) -> Self {
        Placed {
            outputs: Vec::new(),
            registered: false,
            journal: Some(journal_of(state_dir, std::process::id())),
        }
    }

    /// Notes `tmp` in the journal before it is created. Best effort: a journal that cannot be
    /// written costs only the sweep after a kill, never the build.
    fn note(&self, tmp: &Path) {
        let Some(journal) = &self.journal else {
            return;
        };
        if let Err(e) = append_journal(journal, &[tmp.to_path_buf()]) {
            tracing::warn!(journal = %journal.display(), error = %e,
                "cannot note an unpack directory; it will not be swept if this hook is killed");
        }
    }

    pub fn paths(&self) -> impl Iterator<Item = &StorePath> {
        self.outputs.iter().map(|o| &o.expected.path)
    }

    pub fn is_empty(&self) -> bool {
        self.outputs.is_empty()
    }

    /// Unpacks one NAR (read from `nar`) to `expected.path`, verifying hash and size, and
    /// moves it (and any staged output) into place. Blocking: run it on a blocking thread.
    pub fn unpack(&mut self, expected: ExpectedNar, nar: impl Read) -> Result<(), PlaceError> {
        self.unpack_staged(expected, nar)?;
        self.move_into_place()
    }

    /// Unpacks one NAR (read from `nar`) under the hidden name of `expected.path`, verifying
    /// hash and size; it stays there until [`Placed::move_into_place`] or
    /// [`Placed::register`]. Blocking: run it on a blocking thread.
    pub fn unpack_staged(
        &mut self,
        expected: ExpectedNar,
        nar: impl Read,
    ) -> Result<(), PlaceError> {
        let shown = expected.path.to_string();
        // Unpack beside the output under a hidden name, and move it into place only once it is
        // whole and verified: a hook killed mid-transfer leaves no partial output behind, only a
        // temporary directory the next hook sweeps away (see `sweep_stale`).
        let tmp = temp_path(&expected.path);
        self.note(&tmp);
        remove_path(&tmp).map_err(|source| PlaceError::RemoveStale {
            path: tmp.display().to_string(),
            source,
        })?;
        let mut reader = HashingReader {
            inner: nar,
            hasher: sha2::Sha256::new(),
            count: 0,
        };
        let result = restore_nar(
            &mut io::BufReader::with_capacity(256 * 1024, &mut reader),
            &tmp,
        );
        let check = match result {
            Err(source) if reader.count < expected.nar_size => {
                tracing::debug!(%source, "unpack stopped early");
                Err(PlaceError::Truncated {
                    path: shown.clone(),
                    got: reader.count,
                    expected: expected.nar_size,
                })
            }
            Err(source) => Err(PlaceError::Unpack {
                path: shown.clone(),
                source,
            }),
            Ok(()) => {
                let got_hash = Sha256(reader.hasher.finalize().into());
                if got_hash != expected.nar_hash || reader.count != expected.nar_size {
                    Err(PlaceError::HashMismatch {
                        path: shown.clone(),
                        expected_hash: expected.nar_hash,
                        expected_size: expected.nar_size,
                        got_hash,
                        got_size: reader.count,
                    })
                } else {
                    Ok(())
                }
            }
        };
        match check {
            Ok(()) => {
                self.outputs.push(Output {
                    expected,
                    staged: Some(tmp),
                });
                Ok(())
            }
            Err(e) => {
                if let Err(rm) = remove_path(&tmp) {
                    tracing::error!(path = %tmp.display(), error = %rm, "cannot remove a rejected output");
                }
                Err(e)
            }
        }
    }

    /// Moves every staged output to its store path (replacing whatever stale thing is there).
    pub fn move_into_place(&mut self) -> Result<(), PlaceError> {
        for o in &mut self.outputs {
            let Some(tmp) = o.staged.as_ref() else {
                continue;
            };
            let dest = Path::new(o.expected.path.as_str());
            // The daemon deleted any stale output before asking us, but be sure: the rename
            // must not land inside an old directory.
            remove_path(dest)
                .and_then(|()| std::fs::rename(tmp, dest))
                .map_err(|source| PlaceError::RemoveStale {
                    path: o.expected.path.to_string(),
                    source,
                })?;
            o.staged = None;
        }
        Ok(())
    }

    /// Moves every verified output into place and keeps it there unregistered: for an
    /// external build, whose outputs nix-daemon scans and registers itself once the program
    /// has exited.
    pub fn hand_over(mut self) -> Result<(), PlaceError> {
        self.move_into_place()?;
        self.registered = true;
        Ok(())
    }

    /// Moves every verified output into place and registers them all in one
    /// `nix-store --register-validity --hash-given`, the one `registrar` started.
    pub fn register(mut self, registrar: Registrar) -> Result<(), PlaceError> {
        if self.outputs.is_empty() {
            self.registered = true;
            return Ok(());
        }
        self.move_into_place()?;
        let expected: Vec<ExpectedNar> = self.outputs.iter().map(|o| o.expected.clone()).collect();
        registrar.register(&expected)?;
        self.registered = true;
        Ok(())
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        let mut all_gone = true;
        if !self.registered {
            for o in &self.outputs {
                let path = match &o.staged {
                    Some(tmp) => tmp.clone(),
                    None => PathBuf::from(o.expected.path.as_str()),
                };
                if let Err(e) = remove_path(&path) {
                    all_gone = false;
                    tracing::error!(path = %path.display(), error = %e, "cannot remove an unregistered output");
                }
            }
        }
        // Failed unpacks removed their own directories; what is left is registered or gone.
        if let Some(journal) = self.journal.as_ref().filter(|_| all_gone) {
            let _ = std::fs::remove_file(journal);
        }
    }
}

/// The records `nix-store --register-validity --hash-given` reads (docs/protocol.md §4.3).
pub fn register_validity_input(outputs: &[ExpectedNar]) -> String {
    let mut s = String::new();
    for o in outputs {
        s.push_str(o.path.as_str());
        s.push('\n');
        s.push_str(&o.nar_hash.to_base16());
        s.push('\n');
        s.push_str(&o.nar_size.to_string());
        s.push('\n');
        if let Some(d) = &o.deriver {
            s.push_str(d.as_str());
        }
        s.push('\n');
        s.push_str(&o.references.len().to_string());
        s.push('\n');
        for r in &o.references {
            s.push_str(r.as_str());
            s.push('\n');
        }
    }
    s
}

/// The one `nix-store --register-validity --hash-given` that registers a build's outputs.
///
/// [`Registrar::start`] starts it at accept time, so that its start-up (loading Nix and opening
/// the store, about 10 ms) overlaps the remote build instead of following it; the hook hands
/// it to `transfer`, which feeds it once at the end through [`Placed::register`]. Until it is
/// fed the child only waits on its stdin; a registrar dropped unfed (the build failed, nothing
/// to fetch) closes that stdin, and the child reads end-of-file, registers nothing and exits.
pub struct Registrar {
    program: PathBuf,
    /// The child waiting on its stdin; `None` when it could not be started.
    waiting: Option<Child>,
}

impl Registrar {
    /// Starts the child for `nix_store` now. Failing to start it here is not an error: the
    /// registration then starts its own and reports any failure.
    pub fn start(nix_store: &Path) -> Registrar {
        Registrar {
            program: nix_store.to_owned(),
            waiting: spawn_register(nix_store).ok(),
        }
    }

    /// Registers `outputs` in one go, through the waiting child if it is still alive, else a
    /// fresh one. The child opens the local store directly (we are root in the daemon's mount
    /// namespace); its stdout never reaches our fd 1, which is the daemon's reply pipe.
    fn register(mut self, outputs: &[ExpectedNar]) -> Result<(), PlaceError> {
        let mut child = self.child()?;
        let input = register_validity_input(outputs);
        if let Some(mut stdin) = child.stdin.take() {
            // A write error shows up as the child's failure below.
            let _ = stdin.write_all(input.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|source| PlaceError::Spawn {
                program: self.program.display().to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(PlaceError::Register {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }

    /// The waiting child if it is still waiting, else a new one.
    fn child(&mut self) -> Result<Child, PlaceError> {
        if let Some(mut child) = self.waiting.take() {
            if matches!(child.try_wait(), Ok(None)) {
                return Ok(child);
            }
            // It died while waiting (its stderr says why, at debug level).
            let _ = child.kill();
            if let Ok(out) = child.wait_with_output() {
                tracing::debug!(
                    status = %out.status,
                    stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                    "the prepared nix-store is gone; starting another"
                );
            }
        }
        spawn_register(&self.program)
    }
}

fn spawn_register(nix_store: &Path) -> Result<Child, PlaceError> {
    Command::new(nix_store)
        .args(["--register-validity", "--hash-given"])
        .env_remove("NIX_REMOTE")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| PlaceError::Spawn {
            program: nix_store.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(s: &str) -> StorePath {
        StorePath::parse(s).unwrap()
    }

    #[test]
    fn register_input_format() {
        let o = ExpectedNar {
            path: sp("/nix/store/00000000000000000000000000000000-out"),
            nar_hash: Sha256::digest(b""),
            nar_size: 120,
            deriver: Some(sp("/nix/store/11111111111111111111111111111111-x.drv")),
            references: vec![sp("/nix/store/22222222222222222222222222222222-in")],
        };
        let mut o2 = o.clone();
        o2.deriver = None;
        o2.references.clear();
        let s = register_validity_input(&[o, o2]);
        assert_eq!(
            s,
            "/nix/store/00000000000000000000000000000000-out\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n120\n\
             /nix/store/11111111111111111111111111111111-x.drv\n1\n\
             /nix/store/22222222222222222222222222222222-in\n\
             /nix/store/00000000000000000000000000000000-out\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n120\n\n0\n"
        );
    }

    fn nar_of(dir: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        nix_archive::nar::encode_path(&mut v, dir, nix_archive::nar::CaseHack::native()).unwrap();
        v
    }

    fn expected_for(dest: &Path, nar: &[u8]) -> ExpectedNar {
        // Not a real store dir: `StorePath` only needs the `<dir>/<hash>-<name>` shape.
        ExpectedNar {
            path: sp(dest.to_str().unwrap()),
            nar_hash: Sha256::digest(nar),
            nar_size: nar.len() as u64,
            deriver: None,
            references: vec![],
        }
    }

    /// The NAR of [`source_tree`].
    fn source_nar() -> Vec<u8> {
        nar_of(source_tree().path())
    }

    /// An empty store directory, an output path in it, and [`source_nar`].
    fn store_and_nar() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let nar = source_nar();
        let store = tempfile::tempdir().unwrap();
        let dest = store.path().join("00000000000000000000000000000000-out");
        (store, dest, nar)
    }

    fn source_tree() -> tempfile::TempDir {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("sub")).unwrap();
        std::fs::write(src.path().join("sub/file"), b"hello").unwrap();
        std::os::unix::fs::symlink("sub/file", src.path().join("link")).unwrap();
        src
    }

    #[test]
    fn unpacks_verifies_and_cleans_up_when_not_registered() {
        let (_store, dest, nar) = store_and_nar();
        // A stale half-written path is replaced.
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("junk"), b"x").unwrap();
        let mut placed = Placed::new();
        placed.unpack(expected_for(&dest, &nar), &nar[..]).unwrap();
        assert_eq!(std::fs::read(dest.join("sub/file")).unwrap(), b"hello");
        assert!(!dest.join("junk").exists());
        drop(placed);
        assert!(!dest.exists(), "unregistered output must be removed");
    }

    #[test]
    fn hash_mismatch_and_truncation_leave_nothing() {
        let (_store, dest, nar) = store_and_nar();
        let mut bad = expected_for(&dest, &nar);
        bad.nar_hash = Sha256::digest(b"something else");
        let mut placed = Placed::new();
        let e = placed.unpack(bad, &nar[..]).unwrap_err();
        assert!(matches!(e, PlaceError::HashMismatch { .. }), "{e}");
        assert!(!dest.exists());

        let e = placed
            .unpack(expected_for(&dest, &nar), &nar[..nar.len() - 9])
            .unwrap_err();
        assert!(matches!(e, PlaceError::Truncated { .. }), "{e}");
        assert!(!dest.exists());
        assert!(placed.is_empty());
    }

    #[test]
    fn failed_unpacks_leave_no_temporary_directory_and_stale_ones_are_swept() {
        let (store, dest, nar) = store_and_nar();
        let mut bad = expected_for(&dest, &nar);
        bad.nar_hash = Sha256::digest(b"x");
        assert!(Placed::new().unpack(bad, &nar[..]).is_err());
        assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 0);

        // A dead hook's leftovers (found through its journal) go; a live one's (ours) stay;
        // a journal line naming anything but a hidden unpack directory of this store is ignored.
        let state = tempfile::tempdir().unwrap();
        let journals = state.path().join(JOURNAL_DIR);
        std::fs::create_dir_all(&journals).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = store.path().join(format!("{TEMP_PREFIX}{dead}-abc"));
        let live = store
            .path()
            .join(format!("{TEMP_PREFIX}{}-abc", std::process::id()));
        let not_ours = store.path().join("00000000000000000000000000000000-valid");
        std::fs::create_dir_all(stale.join("sub")).unwrap();
        std::fs::create_dir_all(&live).unwrap();
        std::fs::create_dir_all(&not_ours).unwrap();
        let dead_journal = journals.join(dead.to_string());
        std::fs::write(
            &dead_journal,
            format!("{}\n{}\n/etc\n", stale.display(), not_ours.display()),
        )
        .unwrap();
        std::fs::write(
            journals.join(std::process::id().to_string()),
            format!("{}\n", live.display()),
        )
        .unwrap();
        assert_eq!(sweep_stale(store.path(), state.path()), 1);
        assert!(!stale.exists());
        assert!(live.exists());
        assert!(not_ours.exists() && Path::new("/etc").exists());
        assert!(
            !dead_journal.exists(),
            "the dead hook's journal is done with"
        );
    }

    /// A journaled `Placed` notes each unpack directory before making it, and its journal goes
    /// with it once nothing is left to sweep.
    #[test]
    fn the_journal_names_every_unpack_directory_until_they_are_gone() {
        let (store, dest, nar) = store_and_nar();
        let state = tempfile::tempdir().unwrap();
        let journal = state
            .path()
            .join(JOURNAL_DIR)
            .join(std::process::id().to_string());
        let mut placed = Placed::journaled(state.path());
        placed
            .unpack_staged(expected_for(&dest, &nar), &nar[..])
            .unwrap();
        let noted = std::fs::read_to_string(&journal).unwrap();
        let staged: Vec<PathBuf> = std::fs::read_dir(store.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(noted, format!("{}\n", staged[0].display()), "{staged:?}");
        drop(placed);
        assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 0);
        assert!(!journal.exists());
    }

    /// The journal another process writes for an unpacker names the very directories that
    /// unpacker makes, and a sweep removes them once it is gone.
    #[test]
    fn unpack_dirs_noted_for_another_process_are_its_own_and_swept_after_it() {
        let (store, dest, nar) = store_and_nar();
        let state = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let path = sp(dest.to_str().unwrap());
        note_unpack_dirs(state.path(), me, std::slice::from_ref(&path)).unwrap();
        let mut placed = Placed::new();
        placed
            .unpack_staged(expected_for(&dest, &nar), &nar[..])
            .unwrap();
        let staged: Vec<PathBuf> = std::fs::read_dir(store.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let journal = journal_of(state.path(), me);
        assert_eq!(
            std::fs::read_to_string(&journal).unwrap(),
            format!("{}\n", staged[0].display())
        );
        drop(placed);

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        note_unpack_dirs(state.path(), dead, std::slice::from_ref(&path)).unwrap();
        let left = temp_path_of(dead, &path);
        std::fs::create_dir_all(left.join("half")).unwrap();
        assert_eq!(sweep_stale(store.path(), state.path()), 1);
        assert!(!left.exists());
        assert!(!journal_of(state.path(), dead).exists());
    }

    #[test]
    fn staged_outputs_stay_hidden_until_all_are_moved_and_go_if_dropped() {
        let nar = source_nar();
        let store = tempfile::tempdir().unwrap();
        let a = store.path().join("00000000000000000000000000000000-a");
        let b = store.path().join("11111111111111111111111111111111-b");
        let mut placed = Placed::new();
        for p in [&a, &b] {
            placed
                .unpack_staged(expected_for(p, &nar), &nar[..])
                .unwrap();
        }
        // Verified, but neither is at its store path yet: only hidden directories exist.
        assert!(!a.exists() && !b.exists());
        let names: Vec<String> = std::fs::read_dir(store.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(
            names.iter().all(|n| n.starts_with(TEMP_PREFIX)),
            "{names:?}"
        );
        // Dropped before the move: the hidden directories go.
        drop(placed);
        assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 0);

        // Moved: both are in place, and still removed when never registered.
        let mut placed = Placed::new();
        for p in [&a, &b] {
            placed
                .unpack_staged(expected_for(p, &nar), &nar[..])
                .unwrap();
        }
        placed.move_into_place().unwrap();
        assert_eq!(std::fs::read(a.join("sub/file")).unwrap(), b"hello");
        assert_eq!(std::fs::read(b.join("sub/file")).unwrap(), b"hello");
        assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 2);
        drop(placed);
        assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 0);
    }

    /// Our restore gives back exactly the tree the NAR describes: re-encoding it yields the same
    /// bytes, for every node type, files bigger than one write slice, and every kind of root.
    #[test]
    fn restore_round_trips_every_node_kind() {
        use std::os::unix::fs::PermissionsExt;
        let src = tempfile::tempdir().unwrap();
        let root = src.path().join("root");
        std::fs::create_dir_all(root.join("a/b/empty")).unwrap();
        let big: Vec<u8> = (0..WRITE_SLICE * 2 + 12345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(root.join("a/big"), &big).unwrap();
        std::fs::write(root.join("a/b/empty-file"), b"").unwrap();
        std::fs::write(root.join("run"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(root.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("../run", root.join("a/link")).unwrap();
        std::os::unix::fs::symlink("/nowhere", root.join("dangling")).unwrap();
        let single = src.path().join("single");
        std::fs::write(&single, &big).unwrap();
        let link = src.path().join("link");
        std::os::unix::fs::symlink("single", &link).unwrap();

        for from in [&root, &single, &link] {
            let nar = nar_of(from);
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("out");
            // A reader that hands out odd-sized pieces, as the SSH channel does.
            let mut reader = io::BufReader::with_capacity(1000, &nar[..]);
            restore_nar(&mut reader, &dest).unwrap();
            assert!(
                nar_of(&dest) == nar,
                "{} did not round-trip",
                from.display()
            );
        }
        let out = tempfile::tempdir().unwrap();
        restore_nar(&mut &nar_of(&root)[..], &out.path().join("out")).unwrap();
        assert_eq!(std::fs::read(out.path().join("out/a/big")).unwrap(), big);
        let mode = std::fs::metadata(out.path().join("out/run"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "executable bit lost: {mode:o}");
    }

    /// Malformed archives are errors, never panics, and never write outside the destination.
    #[test]
    fn restore_rejects_malformed_archives() {
        let nar = source_nar();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("out");
        let e = restore_nar(&mut &nar[..nar.len() / 2], &dest).unwrap_err();
        assert!(matches!(e, nix_archive::nar::Error::UnexpectedEof), "{e}");
        // Entries that would leave the destination are refused by the decoder.
        for name in ["..", "a/../../escaped"] {
            let mut evil = Vec::new();
            for token in [
                "nix-archive-1",
                "(",
                "type",
                "directory",
                "entry",
                "(",
                "name",
                name,
                "node",
                "(",
                "type",
                "regular",
                "contents",
                "x",
                ")",
                ")",
                ")",
            ] {
                evil.extend_from_slice(&(token.len() as u64).to_le_bytes());
                evil.extend_from_slice(token.as_bytes());
                evil.resize(evil.len().next_multiple_of(8), 0);
            }
            let inner = out.path().join("deep/er");
            std::fs::create_dir_all(&inner).unwrap();
            let e = restore_nar(&mut &evil[..], &inner.join(name.len().to_string())).unwrap_err();
            assert!(
                matches!(e, nix_archive::nar::Error::InvalidName(_)),
                "{name}: {e}"
            );
            assert!(!out.path().join("deep/x").exists() && !out.path().join("escaped").exists());
        }
        // The destination must not exist already.
        assert!(restore_nar(&mut &nar[..], &dest).is_err());
    }

    /// The registration feeds the `nix-store` the registrar started instead of starting
    /// another, and one that died while waiting (or never started) is replaced. (A shell script
    /// stands in for `nix-store` here: it logs its pid and copies what it is fed.)
    #[test]
    fn registration_uses_the_prepared_child() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-nix-store");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho $$ >> {0}/pids\ncat >> {0}/fed\n",
                dir.path().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = ExpectedNar {
            path: sp("/nix/store/00000000000000000000000000000000-out"),
            nar_hash: Sha256::digest(b""),
            nar_size: 8,
            deriver: None,
            references: vec![],
        };
        let pids = || std::fs::read_to_string(dir.path().join("pids")).unwrap_or_default();
        let wait_for_pids = |n: usize| {
            let t0 = std::time::Instant::now();
            while pids().lines().count() < n && t0.elapsed().as_secs() < 10 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };

        let registrar = Registrar::start(&script);
        wait_for_pids(1);
        assert_eq!(
            pids().lines().count(),
            1,
            "the prepared child did not start"
        );
        registrar.register(std::slice::from_ref(&out)).unwrap();
        assert_eq!(pids().lines().count(), 1, "a second child was started");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("fed")).unwrap(),
            register_validity_input(std::slice::from_ref(&out))
        );

        // Nothing waiting (it could not be started): a fresh child does the work.
        let unstarted = Registrar {
            program: script.clone(),
            waiting: None,
        };
        unstarted.register(std::slice::from_ref(&out)).unwrap();
        assert_eq!(pids().lines().count(), 2);
        // The waiting child died: not fed, a fresh child for the same program.
        let mut registrar = Registrar::start(&script);
        wait_for_pids(3);
        let mut waiting = registrar.waiting.take().unwrap();
        waiting.kill().unwrap();
        waiting.wait().unwrap();
        registrar.waiting = Some(waiting);
        registrar.register(std::slice::from_ref(&out)).unwrap();
        assert_eq!(pids().lines().count(), 4);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("fed")).unwrap(),
            register_validity_input(std::slice::from_ref(&out)).repeat(3),
            "the dead child was fed nothing; three registrations, three records"
        );
    }

    #[test]
    fn chunk_reader_reassembles() {
        let (tx, rx) = mpsc::channel(4);
        let t = std::thread::spawn(move || {
            let mut r = ChunkReader::new(rx);
            let mut s = Vec::new();
            r.read_to_end(&mut s).unwrap();
            s
        });
        for c in [b"ab".to_vec(), vec![], b"cde".to_vec()] {
            tx.blocking_send(c).unwrap();
        }
        drop(tx);
        assert_eq!(t.join().unwrap(), b"abcde");
    }
}
