//! Cross-process slot accounting in Nix's own `<stateDir>/current-load` directory, with Nix's
//! file names and `flock` semantics, so that our hooks and concurrent Nix hooks on the same host
//! see each other's load.
//!
//! Layout (as Nix's hook): `main-lock` is held (blocking) while a hook chooses; each builder has
//! slot files `<escapeUri(uri)>-<n>` for `n < maxJobs`, probed with non-blocking locks; a hook
//! keeps the lock of the slot it took until it exits; `<escapeUri(uri)>.upload-lock` serialises
//! input uploads to one builder. Every lock is released by closing its file (dropping the guard)
//! or by the holder's death. This module must never decide which builder to use (that is
//! `select.rs`) and never talks to a builder.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, Timespec, Timestamps, UTIME_NOW};

use crate::config::Builder;
use crate::select::{self, Availability, BuilderState, Decision, LocalCapability, Request};

/// Nix's default `stateDir` for the local store; `current-load` lives under it.
pub const NIX_STATE_DIR: &str = "/nix/var/nix";

/// A failure on the lock files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("cannot create the load directory '{}': {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot open lock file '{}': {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot lock '{}': {source}", path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("cannot touch slot file '{}': {source}", path.display())]
    Touch { path: PathBuf, source: io::Error },
}

/// Nix's `escapeUri`: every `/` becomes `_` (`ssh://root@h` → `ssh:__root@h`).
pub fn escape_uri(uri: &str) -> String {
    uri.replace('/', "_")
}

/// Longest lock file name we make (file systems allow 255 bytes).
const MAX_NAME: usize = 200;

/// `escapeUri(uri)`, or, when that would make a file name too long (URIs with long query
/// parameters), a stable digest of the URI. Nix's own hook cannot lock such URIs at all, so
/// there is no name of its to share.
fn lock_stem(uri: &str) -> String {
    let escaped = escape_uri(uri);
    if escaped.len() <= MAX_NAME {
        return escaped;
    }
    let digest = hook_protocol::Sha256::digest(uri.as_bytes()).to_nix32();
    format!("nlb-{}", &digest[..32])
}

/// The file name of slot `slot` of the builder with store URI `uri`.
pub fn slot_file_name(uri: &str, slot: u32) -> String {
    format!("{}-{slot}", lock_stem(uri))
}

/// The file name of the upload lock of the builder with store URI `uri`.
pub fn upload_lock_file_name(uri: &str) -> String {
    format!("{}.upload-lock", lock_stem(uri))
}

/// An open, locked lock file. Dropping it closes the file, which releases the lock.
#[derive(Debug)]
pub struct Held {
    file: File,
    path: PathBuf,
}

impl Held {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The held `main-lock`: other hooks (ours and Nix's) wait while it is held.
#[derive(Debug)]
pub struct MainLock(Held);

impl MainLock {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// A held slot of one builder; other hooks count it as load. Keep it for the whole build.
#[derive(Debug)]
pub struct SlotLock(Held);

impl SlotLock {
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Set the slot file's times to now, as Nix does for the chosen slot.
    pub fn touch(&self) -> Result<(), SlotError> {
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_NOW,
        };
        rustix::fs::futimens(
            &self.0.file,
            &Timestamps {
                last_access: now,
                last_modification: now,
            },
        )
        .map_err(|e| SlotError::Touch {
            path: self.0.path.clone(),
            source: e.into(),
        })
    }
}

/// The held upload lock of one builder.
#[derive(Debug)]
pub struct UploadLock(Held);

impl UploadLock {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// The result of waiting for an upload lock.
#[derive(Debug)]
pub enum UploadLockOutcome {
    Acquired(UploadLock),
    /// Someone held it for the whole timeout. Nix's hook then says "somebody is hogging the
    /// upload lock for '<uri>', continuing..." and uploads anyway.
    TimedOut,
}

/// What probing one builder's slots found.
#[derive(Debug)]
pub struct Probe {
    /// Slots held by others.
    pub load: u32,
    /// The first free slot, now held by us.
    pub free: Option<SlotLock>,
}

/// The `current-load` directory.
#[derive(Clone, Debug)]
pub struct LoadDir {
    dir: PathBuf,
}

impl LoadDir {
    /// `<nix_state_dir>/current-load`, created with mode 0777 if missing (Nix does the same so
    /// that every user's hook can use it).
    pub fn open(nix_state_dir: &Path) -> Result<LoadDir, SlotError> {
        let dir = nix_state_dir.join("current-load");
        match std::fs::DirBuilder::new().mode(0o777).create(&dir) {
            Ok(()) => {
                // mkdir's mode is filtered by the umask; set it as meant.
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).map_err(
                    |source| SlotError::CreateDir {
                        path: dir.clone(),
                        source,
                    },
                )?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(source) => return Err(SlotError::CreateDir { path: dir, source }),
        }
        Ok(LoadDir { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn open_lock_file(&self, name: &str) -> Result<(File, PathBuf), SlotError> {
        let path = self.dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| SlotError::Open {
                path: path.clone(),
                source,
            })?;
        Ok((file, path))
    }

    /// Lock `name`; `Ok(None)` if `blocking` is false and someone else holds it.
    fn lock(&self, name: &str, blocking: bool) -> Result<Option<Held>, SlotError> {
        let (file, path) = self.open_lock_file(name)?;
        let op = if blocking {
            FlockOperation::LockExclusive
        } else {
            FlockOperation::NonBlockingLockExclusive
        };
        loop {
            match rustix::fs::flock(&file, op) {
                Ok(()) => return Ok(Some(Held { file, path })),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::WOULDBLOCK) if !blocking => return Ok(None),
                Err(e) => {
                    return Err(SlotError::Lock {
                        path,
                        source: e.into(),
                    });
                }
            }
        }
    }

    /// Take `main-lock`, waiting as long as another hook holds it. Blocks the thread: keep the
    /// critical section short and run it off the async executor.
    pub fn lock_main(&self) -> Result<MainLock, SlotError> {
        let held = self.lock("main-lock", true)?;
        held.map(MainLock).ok_or_else(|| SlotError::Lock {
            path: self.dir.join("main-lock"),
            source: io::Error::other("blocking lock returned without the lock"),
        })
    }

    /// Take `main-lock` if nobody holds it.
    pub fn try_lock_main(&self) -> Result<Option<MainLock>, SlotError> {
        Ok(self.lock("main-lock", false)?.map(MainLock))
    }

    /// Try to take one slot of a builder without waiting.
    pub fn try_lock_slot(&self, uri: &str, slot: u32) -> Result<Option<SlotLock>, SlotError> {
        Ok(self.lock(&slot_file_name(uri, slot), false)?.map(SlotLock))
    }

    /// Probe every slot of a builder (Nix's loop): each slot is tried without waiting; the
    /// first free one is kept, the busy ones count as load. Requires `main-lock`, so that
    /// probing and choosing are atomic with respect to other hooks.
    pub fn probe(&self, _main: &MainLock, uri: &str, max_jobs: u32) -> Result<Probe, SlotError> {
        let mut load = 0;
        let mut free = None;
        for slot in 0..max_jobs {
            match self.try_lock_slot(uri, slot)? {
                Some(lock) => {
                    if free.is_none() {
                        free = Some(lock);
                    }
                    // Other free slots are unlocked again when `lock` drops here.
                }
                None => load += 1,
            }
        }
        Ok(Probe { load, free })
    }

    /// Wait for the upload lock of a builder, up to `timeout` (Nix waits 15 minutes).
    pub fn upload_lock(
        &self,
        uri: &str,
        timeout: Duration,
    ) -> Result<UploadLockOutcome, SlotError> {
        let name = upload_lock_file_name(uri);
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(held) = self.lock(&name, false)? {
                return Ok(UploadLockOutcome::Acquired(UploadLock(held)));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(UploadLockOutcome::TimedOut);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

/// One complete choice, as Nix's hook makes it: take `main-lock`, probe the slots of every
/// matching builder, [`select::choose`], keep the chosen builder's slot (touched) and release
/// everything else, including `main-lock`.
///
/// `availability(i)` gives the state of table entry `i` (always [`Availability::Up`] for
/// always-on builders). The returned slot lock is `Some` for [`Decision::Accept`] and
/// [`Decision::Boot`]; hold it until the build is over.
pub fn choose_with_slots(
    load_dir: &LoadDir,
    table: &[Builder],
    req: &Request<'_>,
    local: &LocalCapability,
    availability: &dyn Fn(usize) -> Availability,
) -> Result<(Decision, Option<SlotLock>), SlotError> {
    let main = load_dir.lock_main()?;
    let mut states = vec![BuilderState::default(); table.len()];
    let mut free: Vec<Option<SlotLock>> = Vec::new();
    free.resize_with(table.len(), || None);
    for i in select::matching(table, req) {
        let b = &table[i];
        let availability = availability(i);
        if matches!(availability, Availability::BackingOff { .. }) {
            states[i].availability = availability;
            continue;
        }
        let probe = load_dir.probe(&main, b.slot_key(), b.max_jobs)?;
        states[i] = BuilderState {
            availability,
            load: probe.load,
            free_slot: probe.free.is_some(),
        };
        free[i] = probe.free;
    }
    let decision = select::choose(table, &states, req, local);
    let slot = match decision {
        Decision::Accept { builder } | Decision::Boot { builder } => {
            let slot = free[builder].take();
            if let Some(s) = &slot {
                s.touch()?;
            }
            slot
        }
        _ => None,
    };
    drop(free);
    drop(main);
    Ok((decision, slot))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BuilderUri, HostKeySpec, Origin};
    use std::collections::BTreeSet;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::MetadataExt;
    use std::process::{Child, Command, Stdio};

    const CHILD_ENV: &str = "NIX_LAZY_BUILDER_SLOTS_TEST_CHILD";

    #[test]
    fn long_uris_get_short_stable_lock_names_that_work() {
        let long = format!(
            "ssh-ng://root@h?remote-program=/nix/store/{}",
            "x".repeat(400)
        );
        let a = slot_file_name(&long, 1);
        assert!(a.len() < 255, "{a}");
        assert_eq!(a, slot_file_name(&long, 1), "stable");
        assert_ne!(a, slot_file_name(&format!("{long}y"), 1), "distinct");
        assert!(upload_lock_file_name(&long).len() < 255);
        assert_eq!(
            slot_file_name("ssh://root@h", 0),
            "ssh:__root@h-0",
            "Nix's names otherwise"
        );
        let dir = tempfile::tempdir().unwrap();
        let load = LoadDir::open(dir.path()).unwrap();
        let main = load.lock_main().unwrap();
        let probe = load.probe(&main, &long, 2).unwrap();
        assert!(probe.free.is_some());
    }

    /// Not a test: the body of the helper process the cross-process tests spawn (this test
    /// binary, re-run with `--ignored --exact`). It takes the locks named in its environment
    /// (`main` or `<uri>#<slot>`, comma-separated), says so on stdout, and holds them until its
    /// stdin closes or it is killed.
    #[test]
    #[ignore = "helper process for the cross-process slot tests"]
    fn slot_holder_child() {
        let Ok(spec) = std::env::var(CHILD_ENV) else {
            return;
        };
        let (dir, locks) = spec.split_once('|').unwrap();
        let load = LoadDir::open(Path::new(dir)).unwrap();
        let mut held_main = None;
        let mut held = Vec::new();
        for what in locks.split(',').filter(|s| !s.is_empty()) {
            if what == "main" {
                held_main = Some(load.lock_main().unwrap());
            } else {
                let (uri, slot) = what.rsplit_once('#').unwrap();
                held.push(
                    load.try_lock_slot(uri, slot.parse().unwrap())
                        .unwrap()
                        .expect("slot already taken"),
                );
            }
        }
        println!("HOLDER-READY");
        std::io::stdout().flush().unwrap();
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
        drop((held_main, held));
    }

    /// A child process holding `locks` in the load dir under `state`.
    fn holder(state: &Path, locks: &str) -> Child {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "slots::tests::slot_holder_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{}|{locks}", state.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "holder exited before taking its locks"
            );
            // libtest may print "test … ... " on the same line first.
            if line.trim_end().ends_with("HOLDER-READY") {
                break;
            }
        }
        child
    }

    fn kill(mut child: Child) {
        child.kill().unwrap();
        child.wait().unwrap();
    }

    const URI: &str = "ssh://root@127.0.0.1:2222";

    #[test]
    fn file_names_match_nix() {
        assert_eq!(escape_uri("ssh://root@127.0.0.1"), "ssh:__root@127.0.0.1");
        assert_eq!(
            slot_file_name("ssh://root@127.0.0.1", 0),
            "ssh:__root@127.0.0.1-0"
        );
        assert_eq!(
            slot_file_name("ssh-ng://h?remote-store=/a/b", 3),
            "ssh-ng:__h?remote-store=_a_b-3"
        );
        assert_eq!(upload_lock_file_name("ssh://h"), "ssh:__h.upload-lock");
    }

    #[test]
    fn load_dir_is_created_world_writable() {
        let state = tempfile::tempdir().unwrap();
        let d = LoadDir::open(state.path()).unwrap();
        assert_eq!(d.path(), state.path().join("current-load"));
        assert_eq!(std::fs::metadata(d.path()).unwrap().mode() & 0o777, 0o777);
        LoadDir::open(state.path()).unwrap();
        let file = state.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            LoadDir::open(&file),
            Err(SlotError::CreateDir { .. })
        ));
    }

    #[test]
    fn probe_counts_other_processes_slots() {
        let state = tempfile::tempdir().unwrap();
        let d = LoadDir::open(state.path()).unwrap();
        let child = holder(state.path(), &format!("{URI}#0,{URI}#2"));
        let main = d.lock_main().unwrap();
        let p = d.probe(&main, URI, 4).unwrap();
        assert_eq!(p.load, 2);
        let free = p.free.expect("slot 1 is free");
        assert!(
            free.path()
                .to_string_lossy()
                .ends_with("ssh:__root@127.0.0.1:2222-1")
        );
        // While we hold slot 1, a second probe sees three busy slots and takes slot 3.
        let p2 = d.probe(&main, URI, 4).unwrap();
        assert_eq!(p2.load, 3);
        assert!(
            p2.free
                .as_ref()
                .unwrap()
                .path()
                .to_string_lossy()
                .ends_with("-3")
        );
        let p3 = d.probe(&main, URI, 4).unwrap();
        assert_eq!((p3.load, p3.free.is_none()), (4, true));
        drop(p2);
        // The holder dies without cleaning up: its slots are free again.
        kill(child);
        let p = d.probe(&main, URI, 4).unwrap();
        assert_eq!(p.load, 1, "only our own slot 1 is still held");
        assert!(p.free.unwrap().path().to_string_lossy().ends_with("-0"));
        // A builder with max-jobs 0 has no slots at all.
        let p = d.probe(&main, "ssh://other", 0).unwrap();
        assert_eq!((p.load, p.free.is_none()), (0, true));
        drop(free);
    }

    #[test]
    fn interoperates_with_flock_1() {
        // util-linux flock(1) uses flock(2) like Nix: a slot it holds counts as load.
        let state = tempfile::tempdir().unwrap();
        let d = LoadDir::open(state.path()).unwrap();
        let slot = d.path().join(slot_file_name(URI, 0));
        let mut child = Command::new("flock")
            .arg(&slot)
            .args(["sh", "-c", "echo locked; exec cat >/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("flock(1) from util-linux");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        let main = d.lock_main().unwrap();
        let p = d.probe(&main, URI, 1).unwrap();
        assert_eq!((p.load, p.free.is_none()), (1, true));
        drop(child.stdin.take());
        child.wait().unwrap();
        let p = d.probe(&main, URI, 1).unwrap();
        assert_eq!((p.load, p.free.is_some()), (0, true));
    }

    #[test]
    fn main_lock_waits_for_the_holder() {
        let state = tempfile::tempdir().unwrap();
        let d = LoadDir::open(state.path()).unwrap();
        let mut child = holder(state.path(), "main");
        assert!(d.try_lock_main().unwrap().is_none());
        let d2 = d.clone();
        let waiter = std::thread::spawn(move || {
            let t = Instant::now();
            let lock = d2.lock_main().unwrap();
            (t.elapsed(), lock)
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !waiter.is_finished(),
            "lock_main must block while another process holds it"
        );
        drop(child.stdin.take()); // the holder exits normally
        child.wait().unwrap();
        let (waited, lock) = waiter.join().unwrap();
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
        assert!(
            lock.path()
                .to_string_lossy()
                .ends_with("current-load/main-lock")
        );
        assert!(
            d.try_lock_main().unwrap().is_none(),
            "held by the waiter's guard (another fd)"
        );
        drop(lock);
        assert!(d.try_lock_main().unwrap().is_some());
    }

    #[test]
    fn upload_lock_waits_then_times_out() {
        let state = tempfile::tempdir().unwrap();
        let d = LoadDir::open(state.path()).unwrap();
        let UploadLockOutcome::Acquired(first) = d.upload_lock(URI, Duration::ZERO).unwrap() else {
            panic!("free lock not acquired")
        };
        assert!(
            first
                .path()
                .to_string_lossy()
                .ends_with("ssh:__root@127.0.0.1:2222.upload-lock")
        );
        let t = Instant::now();
        assert!(matches!(
            d.upload_lock(URI, Duration::from_millis(200)).unwrap(),
            UploadLockOutcome::TimedOut
        ));
        assert!(t.elapsed() >= Duration::from_millis(200));
        let d2 = d.clone();
        let waiter = std::thread::spawn(move || d2.upload_lock(URI, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(100));
        drop(first);
        assert!(matches!(
            waiter.join().unwrap().unwrap(),
            UploadLockOutcome::Acquired(_)
        ));
    }

    fn builder(name: &str, max_jobs: u32, speed: f64) -> Builder {
        let uri = format!("ssh://{name}");
        Builder {
            name: name.to_owned(),
            uri: BuilderUri::parse(&uri).unwrap(),
            store_uri: uri,
            systems: BTreeSet::from(["aarch64-linux".to_owned()]),
            ssh_key: None,
            max_jobs,
            speed_factor: speed,
            supported_features: BTreeSet::new(),
            mandatory_features: BTreeSet::new(),
            host_keys: HostKeySpec::SshDefault,
            allow_well_known_host_key: false,
            origin: Origin::Toml {
                file: "/t".into(),
                name: name.to_owned(),
            },
            lazy: None,
        }
    }

    #[test]
    fn choose_with_slots_end_to_end() {
        let state = tempfile::tempdir().unwrap();
        let d = LoadDir::open(state.path()).unwrap();
        let table = [builder("a", 2, 1.0), builder("b", 1, 1.0)];
        let feats = BTreeSet::new();
        let req = Request {
            system: "aarch64-linux",
            required_features: &feats,
            am_willing: false,
        };
        let local = LocalCapability {
            system: "x86_64-linux".into(),
            max_jobs: 1,
            ..Default::default()
        };
        let up = |_: usize| Availability::Up;
        // An old slot file, as a long-gone hook leaves it: the chosen slot gets touched.
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let b0 = File::create(d.path().join("ssh:__b-0")).unwrap();
        b0.set_modified(old).unwrap();
        drop(b0);
        // Another process already runs a build on 'a'.
        let child = holder(state.path(), "ssh://a#0");
        let (d1, s1) = choose_with_slots(&d, &table, &req, &local, &up).unwrap();
        assert_eq!(
            d1,
            Decision::Accept { builder: 1 },
            "'b' has load 0, 'a' load 1"
        );
        let s1 = s1.unwrap();
        assert!(s1.path().to_string_lossy().ends_with("ssh:__b-0"));
        let touched = std::fs::metadata(s1.path()).unwrap().modified().unwrap();
        assert!(
            touched.elapsed().unwrap() < Duration::from_secs(60),
            "{touched:?}"
        );
        let (d2, s2) = choose_with_slots(&d, &table, &req, &local, &up).unwrap();
        assert_eq!(d2, Decision::Accept { builder: 0 });
        assert!(
            s2.as_ref()
                .unwrap()
                .path()
                .to_string_lossy()
                .ends_with("ssh:__a-1")
        );
        // Everything is taken now: postpone, and no slot is kept.
        let (d3, s3) = choose_with_slots(&d, &table, &req, &local, &up).unwrap();
        assert!(matches!(d3, Decision::Postpone { .. }), "{d3:?}");
        assert!(s3.is_none());
        // main-lock is released after each choice.
        assert!(d.try_lock_main().unwrap().is_some());
        // The other process dies: its slot on 'a' is free again.
        kill(child);
        let (d4, s4) = choose_with_slots(&d, &table, &req, &local, &up).unwrap();
        assert_eq!(d4, Decision::Accept { builder: 0 });
        assert!(s4.unwrap().path().to_string_lossy().ends_with("ssh:__a-0"));
        drop((s1, s2));
    }
}
