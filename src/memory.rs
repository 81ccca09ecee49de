//! Failure memory for always-on builders, shared by every hook process on the host.
//!
//! A hook that cannot connect to an always-on builder (refused, unreachable, a server that
//! accepts TCP and then never speaks and so costs a whole connect timeout, a wrong host key)
//! writes one small JSON record for it under `<state-dir>/failures/`; the next hook process
//! reads it when it chooses, and skips the builder until its backoff has run out, with the
//! cause in its one-line reason. The backoff grows with consecutive failures
//! ([`crate::backoff`], as for lazy builders: 10 s × 2^(n−1), capped at
//! 10 min); a successful connection removes the record. A record only counts for the builder
//! definition it was written for: change the builder's URI, key or host key and it is fresh.
//! (Lazy builders have the supervisor's memory instead.)
//!
//! Owns: the record format, its file names, atomic writes (temporary file + rename, in a
//! directory only its owner can write), and the backoff arithmetic over wall-clock time.
//!
//! Must never: make a build fail because the memory cannot be read or written (it is advice:
//! every error is logged at debug level and treated as "no record"), follow a symlink or trust
//! a file it did not write, or keep a builder out for longer than its backoff even when the
//! clock jumps.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::backoff::backoff;
use crate::config::Builder;
use crate::os::ensure_private_dir;
use crate::select::Availability;

/// The directory under the state directory that holds the records.
pub const DIR_NAME: &str = "failures";

/// A record larger than this is not one of ours.
const MAX_RECORD: u64 = 64 * 1024;

/// What one builder's failures were.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// The builder's store URI (for people reading the file).
    pub builder: String,
    /// [`fingerprint`] of the builder definition the record is about.
    pub fingerprint: String,
    /// Why the last attempt failed (one line).
    pub cause: String,
    /// Failures in a row.
    pub consecutive: u32,
    /// When the last failure happened, in milliseconds since the Unix epoch.
    pub failed_at_ms: u64,
}

impl Record {
    /// How long the builder is still skipped at `now`: never longer than its backoff, whatever
    /// the clock did since.
    pub fn retry_in(&self, now: SystemTime) -> Duration {
        let full = backoff(self.consecutive);
        let now = millis(now);
        let passed = Duration::from_millis(now.saturating_sub(self.failed_at_ms));
        if now < self.failed_at_ms {
            // The clock went back: count from now, bounded by the backoff.
            return full;
        }
        full.saturating_sub(passed)
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0)
}

/// What identifies a builder's connection: URI, store URI, key, pinned host keys.
pub fn fingerprint(b: &Builder) -> String {
    let text = format!(
        "{:?}\n{}\n{:?}\n{:?}\n{}",
        b.uri, b.store_uri, b.ssh_key, b.host_keys, b.allow_well_known_host_key
    );
    hex(&Sha256::digest(text.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The record's file name for a builder: a digest of its store URI (URIs can be long and hold
/// any character).
pub fn file_name(store_uri: &str) -> String {
    let d = Sha256::digest(store_uri.as_bytes());
    format!("{}.json", &hex(&d)[..32])
}

/// The failure records in one directory. A memory that could not be opened is disabled: it
/// remembers nothing and every method is a no-op.
#[derive(Clone, Debug)]
pub struct FailureMemory {
    dir: Option<PathBuf>,
}

impl FailureMemory {
    /// `<state_dir>/failures`, created (with the state directory) private to this user if
    /// missing. Disabled, with a debug message, if that cannot be done or the directory is
    /// someone else's or writable by others.
    pub fn open(state_dir: &Path) -> Self {
        let dir = state_dir.join(DIR_NAME);
        let r = ensure_private_dir(state_dir)
            .and_then(|()| ensure_private_dir(&dir))
            .and_then(|()| check_ours(&dir));
        match r {
            Ok(()) => FailureMemory { dir: Some(dir) },
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "no failure memory for always-on builders");
                FailureMemory { dir: None }
            }
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn path(&self, b: &Builder) -> Option<PathBuf> {
        Some(self.dir.as_ref()?.join(file_name(b.slot_key())))
    }

    /// The record for `b`, if there is one for its current definition.
    pub fn get(&self, b: &Builder) -> Option<Record> {
        let path = self.path(b)?;
        let r = match read_record(&path) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "ignoring a failure record");
                return None;
            }
        };
        (r.fingerprint == fingerprint(b)).then_some(r)
    }

    /// How `select` should see `b` at `now`: backing off while a remembered failure's backoff
    /// runs, `None` otherwise.
    pub fn availability(&self, b: &Builder, now: SystemTime) -> Option<Availability> {
        let r = self.get(b)?;
        let retry_in = r.retry_in(now);
        (!retry_in.is_zero()).then_some(Availability::BackingOff {
            cause: r.cause,
            retry_in,
        })
    }

    /// Remembers that connecting to `b` failed at `now` because of `cause`; returns the record
    /// (one more in a row than the last, if that was for the same definition).
    pub fn record_failure(&self, b: &Builder, cause: &str, now: SystemTime) -> Option<Record> {
        let path = self.path(b)?;
        let consecutive = self.get(b).map_or(0, |r| r.consecutive).saturating_add(1);
        let record = Record {
            builder: b.store_uri.clone(),
            fingerprint: fingerprint(b),
            cause: one_line(cause),
            consecutive,
            failed_at_ms: millis(now),
        };
        match write_record(&path, &record) {
            Ok(()) => Some(record),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot write a failure record");
                None
            }
        }
    }

    /// Forgets `b`'s failures (it answered).
    pub fn clear(&self, b: &Builder) {
        let Some(path) = self.path(b) else {
            return;
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::debug!(builder = %b.name, "builder answers again: failure record removed")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot remove a failure record")
            }
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The directory is ours and nobody else can write to it.
fn check_ours(dir: &Path) -> io::Result<()> {
    let m = std::fs::symlink_metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !m.is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "{} is not a directory owned by uid {me} and writable only by it",
            dir.display()
        )));
    }
    Ok(())
}

fn read_record(path: &Path) -> io::Result<Record> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() > MAX_RECORD {
        return Err(io::Error::other("not a failure record"));
    }
    let mut text = String::new();
    (&mut f).take(MAX_RECORD).read_to_string(&mut text)?;
    serde_json::from_str(&text).map_err(io::Error::other)
}

fn write_record(path: &Path, record: &Record) -> io::Result<()> {
    let text = serde_json::to_string(record).map_err(io::Error::other)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> io::Result<()> {
        let mut f: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        // Replaces the old record (never follows a symlink there: rename replaces the name).
        std::fs::rename(&tmp, path)
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Config};

    fn builder(line: &str) -> Builder {
        let t = config::load_table(line, "x86_64-linux", None, &Config::default())
            .unwrap_or_else(|e| panic!("{e}"));
        t.builders.into_iter().next().expect("one builder")
    }

    const LINE: &str = "ssh://root@127.0.0.1:2222 aarch64-linux - 1 1 - - \
        c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSURrOWMzQ3VScTVQa2RlUE5FZ0JsVGx2ZDRXby9NTlBxby9KRFc3N1VTK24K";
    /// The same builder pinned to another host key.
    const OTHER_KEY: &str = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUhUR1M2eWZDZTQyUHloaEpaYkVXWklyK25iMDdTTWEvOEtHRmZYWHhXRjgK";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn backoff_grows_with_consecutive_failures_and_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let m = FailureMemory::open(dir.path());
        let b = builder(LINE);
        assert!(m.get(&b).is_none());
        assert_eq!(m.availability(&b, at(0)), None);

        let r = m
            .record_failure(&b, "connection failed:\n  timed out", at(0))
            .unwrap();
        assert_eq!(r.consecutive, 1);
        assert_eq!(r.cause, "connection failed: timed out");
        match m.availability(&b, at(3)) {
            Some(Availability::BackingOff { cause, retry_in }) => {
                assert_eq!(cause, "connection failed: timed out");
                assert_eq!(retry_in, Duration::from_secs(7));
            }
            other => panic!("{other:?}"),
        }
        // Expired: usable again, but the count is kept for the next failure.
        assert_eq!(m.availability(&b, at(10)), None);
        let r = m.record_failure(&b, "refused", at(11)).unwrap();
        assert_eq!(r.consecutive, 2);
        assert!(matches!(
            m.availability(&b, at(11)),
            Some(Availability::BackingOff { retry_in, .. }) if retry_in == Duration::from_secs(20)
        ));
        for _ in 0..20 {
            m.record_failure(&b, "refused", at(100));
        }
        assert_eq!(
            m.get(&b).unwrap().retry_in(at(100)),
            Duration::from_secs(600),
            "capped"
        );
        // A success forgets it all.
        m.clear(&b);
        assert!(m.get(&b).is_none());
        assert_eq!(m.record_failure(&b, "x", at(0)).unwrap().consecutive, 1);
    }

    #[test]
    fn another_process_sees_the_record_and_a_changed_definition_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let b = builder(LINE);
        FailureMemory::open(dir.path()).record_failure(&b, "hung", SystemTime::now());
        let other = FailureMemory::open(dir.path());
        assert!(matches!(
            other.availability(&b, SystemTime::now()),
            Some(Availability::BackingOff { .. })
        ));
        // Same URI, another host key: a fresh start.
        let changed = builder(&format!(
            "{} {OTHER_KEY}",
            LINE.rsplit_once(' ').expect("columns").0
        ));
        assert_eq!(changed.store_uri, b.store_uri);
        assert_ne!(fingerprint(&changed), fingerprint(&b));
        assert_eq!(other.availability(&changed, SystemTime::now()), None);
        assert_eq!(
            other
                .record_failure(&changed, "x", SystemTime::now())
                .unwrap()
                .consecutive,
            1
        );
    }

    #[test]
    fn a_clock_that_went_back_never_lengthens_the_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let m = FailureMemory::open(dir.path());
        let b = builder(LINE);
        m.record_failure(&b, "x", at(1000));
        assert_eq!(m.get(&b).unwrap().retry_in(at(0)), Duration::from_secs(10));
    }

    #[test]
    fn garbage_symlinks_and_foreign_directories_are_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let m = FailureMemory::open(dir.path());
        let b = builder(LINE);
        let path = m.path(&b).unwrap();
        std::fs::write(&path, b"{not json").unwrap();
        assert!(m.get(&b).is_none());
        // A new failure replaces the garbage.
        assert_eq!(m.record_failure(&b, "x", at(0)).unwrap().consecutive, 1);
        // A symlink planted at the record's name is neither followed nor written through.
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(m.get(&b).is_none());
        m.record_failure(&b, "x", at(0)).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());

        // A failures directory others can write to is not trusted.
        use std::os::unix::fs::PermissionsExt;
        let open = tempfile::tempdir().unwrap();
        std::fs::create_dir(open.path().join(DIR_NAME)).unwrap();
        std::fs::set_permissions(
            open.path().join(DIR_NAME),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        // `open` makes it private again; a directory that cannot be made private is refused.
        let m = FailureMemory::open(open.path());
        assert!(m.dir().is_some());
        let mode = std::fs::metadata(open.path().join(DIR_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let file = open.path().join("plain-file");
        std::fs::write(&file, b"").unwrap();
        let refused = FailureMemory::open(&file);
        assert!(refused.dir().is_none());
        assert!(refused.record_failure(&b, "x", at(0)).is_none());
    }

    #[test]
    fn file_names_are_short_and_safe() {
        let n = file_name(&format!(
            "ssh://h?remote-program=/a/b&x={}",
            "y".repeat(500)
        ));
        assert_eq!(n.len(), 37);
        let (digest, ext) = n.split_at(32);
        assert!(digest.bytes().all(|c| c.is_ascii_hexdigit()), "{n}");
        assert_eq!(ext, ".json");
    }
}
