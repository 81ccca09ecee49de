//! Fault: a builder that accepts TCP and then never says a word (a plain TCP listener in this
//! test; no SSH banner ever comes), configured as an always-on builder in the machines file of
//! a real nix-daemon (Nix 2.8) running nix-lazy-builder as its hook.
//!
//! - It is given up about 15 s after it accepted the connection (measured: from the
//!   listener's accept to the client seeing the hook's error line), and the build goes to the
//!   working builder.
//! - The failure is remembered for the next `try`, also by the next hook process: a second
//!   `nix-build` right after neither connects to it again nor waits (its build starts on the
//!   working builder within 5 s of the `nix-build`, where the hang cost 15 s); with no other
//!   builder it fails at once with the one-line reason (cause, retry time).
//! - The backoff runs out and grows: once it has passed the builder is tried again, and a
//!   second failure in a row doubles the wait (the retry time each decline names is what is
//!   left of 10 s, then of 20 s, from the failure the record holds, to the second).
//!
//! Must never: pass without the listener having accepted the hook's connection (the hang was
//! really hit), or let a later build connect to the hanging builder during its backoff.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::fault::*;
use crate::harness::*;

/// Accepts TCP connections on 127.0.0.1 and holds them open without sending anything.
struct Hanging {
    port: u16,
    accepted: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Hanging {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        l.set_nonblocking(true).expect("nonblocking");
        let port = l.local_addr().expect("addr").port();
        let accepted: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            thread::spawn(move || {
                let mut held: Vec<TcpStream> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => {
                            accepted
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(Instant::now());
                            held.push(s);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Hanging {
            port,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn accepts(&self) -> Vec<Instant> {
        self.accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A machines line for it, with `remote`'s (valid) key and host key.
    fn machines_line(&self, remote: &RemoteStore, speed: u32) -> String {
        format!(
            "{} aarch64-linux {} 1 {speed} - - {}",
            self.uri(),
            remote.client_key().display(),
            remote.host_key_base64()
        )
    }

    fn uri(&self) -> String {
        format!("ssh://root@127.0.0.1:{}", self.port)
    }
}

impl Drop for Hanging {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The failure records the hooks wrote (the default state directory inside the namespace).
fn records(daemon: &LocalDaemon) -> Vec<serde_json::Value> {
    let dir = daemon
        .host_nix_dir()
        .join("var/nix/lazy-builder")
        .join(nix_lazy_builder::memory::DIR_NAME);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).expect("read a record");
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"))
        })
        .collect()
}

/// The one failure record's `consecutive` and `failed_at_ms`.
#[track_caller]
fn the_record(daemon: &LocalDaemon) -> (u64, u64) {
    let recs = records(daemon);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let field = |k: &str| {
        recs[0][k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {recs:?}"))
    };
    (field("consecutive"), field("failed_at_ms"))
}

/// Milliseconds since the Unix epoch (the clock the failure records use).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `paths`' nix-build through `daemon`, and the window it ran in: (started, ended) in
/// [`wall_ms`].
#[track_caller]
fn nix_build_in_window(paths: &BigPaths, daemon: &LocalDaemon) -> (CmdOutput, (u64, u64)) {
    let started = wall_ms();
    let out = paths.nix_build(daemon);
    (out, (started, wall_ms()))
}

/// `line` says the builder "is not tried again for another Ns" with N what is left of a `backoff_secs` backoff from
/// `failed_at_ms`, as the hook saw it at some moment of `window` ([`nix_build_in_window`]; the
/// hook rounds up to whole seconds).
#[track_caller]
fn assert_retry_in(line: &str, backoff_secs: u64, failed_at_ms: u64, window: (u64, u64)) {
    let (started, ended) = window;
    let secs: u64 = line
        .split_once("is not tried again for another ")
        .and_then(|(_, t)| {
            t.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("no retry time in {line:?}"));
    let left_at = |t: u64| (backoff_secs * 1000).saturating_sub(t.saturating_sub(failed_at_ms));
    let (most, least) = (
        left_at(started).div_ceil(1000),
        left_at(ended).div_ceil(1000),
    );
    assert!(
        (least..=most).contains(&secs),
        "want a retry in {least}–{most} s (a {backoff_secs} s backoff), got {secs} s: {line}"
    );
}

/// When (as an `Instant`) the background command printed a line containing `needle`.
#[track_caller]
fn line_instant(build: &Background, started: Instant, needle: &str) -> Instant {
    started
        + build
            .line_at(needle)
            .unwrap_or_else(|| panic!("no {needle:?}:\n{}", build.stderr_so_far()))
}

#[test]
fn a_builder_that_accepts_tcp_and_hangs_is_given_up_within_15s_and_remembered() {
    let hang = Hanging::start();
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    // The hanging builder is faster on paper, so it is chosen first.
    opts.machines = Some(format!(
        "{}\n{}\n",
        hang.machines_line(&remote, 2),
        remote.machines_line(&MachineLine::new(Scheme::Ssh, true))
    ));
    let (opts, _ours) = without_warm_connections(opts);
    let daemon = LocalDaemon::start(opts);
    let first = BigDrv::new("fault-hang-1").prepare(&daemon);
    let refused = format!("cannot build on '{}'", hang.uri());

    let started = Instant::now();
    let mut build = Background::nix_build(&daemon, &first.build_args());
    build.wait_line(&refused, Duration::from_secs(60));
    let gave_up = line_instant(&build, started, &refused);
    let out = build.finish(Duration::from_secs(120));
    out.assert_success();
    first.assert_built(&daemon);
    assert!(
        remote.is_valid(&first.out),
        "not built on the working builder"
    );
    let accepts = hang.accepts();
    assert_eq!(
        accepts.len(),
        1,
        "the hook connected {} times",
        accepts.len()
    );
    let detected = gave_up.saturating_duration_since(accepts[0]);
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains(&refused))
        .unwrap_or_default()
        .to_owned();
    eprintln!(
        "[fault] hanging builder: given up {detected:.2?} after it accepted the connection; nix-build took {:.2?}; the client saw: {line}",
        out.elapsed
    );
    assert!(
        (Duration::from_secs(13)..Duration::from_secs(18)).contains(&detected),
        "detected after {detected:?}, not about 15 s:\n{out}"
    );
    let recs = records(&daemon);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["builder"], hang.uri().as_str(), "{recs:?}");
    assert_eq!(recs[0]["consecutive"], 1, "{recs:?}");

    // The next hook process skips it: no new connection, no 15 s wait. The build goes to the
    // working builder at once: the daemon says "building … on …" once the hook accepted.
    let second = BigDrv::new("fault-hang-2").prepare(&daemon);
    let mut build = Background::nix_build(&daemon, &second.build_args());
    let on_working = format!("building '{}' on '", second.drv);
    let accepted_after = build.wait_line(&on_working, Duration::from_secs(60));
    let again = build.finish(Duration::from_secs(120));
    again.assert_success();
    second.assert_built(&daemon);
    eprintln!(
        "[fault] hanging builder: the next build started on the working builder {accepted_after:.2?} into its nix-build (the first waited {detected:.2?}); that nix-build took {:.2?}",
        again.elapsed
    );
    assert_eq!(hang.accepts().len(), 1, "connected to it again:\n{again}");
    assert!(!again.stderr.contains(&refused), "{again}");
    assert!(
        accepted_after < Duration::from_secs(5),
        "the next build waited {accepted_after:?} before it went to the working builder (the hang costs 15 s):\n{again}"
    );
    assert_store_clean(&daemon, "hanging builder");
    assert_no_strays(&daemon, None, Duration::from_secs(10));
}

#[test]
fn a_hanging_only_builder_fails_at_once_while_it_backs_off_and_the_backoff_grows() {
    let hang = Hanging::start();
    // Only its key files are used (the config must be valid); it never runs a build.
    let keys = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let mut opts = DaemonOpts::new(Nix::Host).with_our_hook();
    opts.max_jobs = 0;
    opts.machines = Some(hang.machines_line(&keys, 1) + "\n");
    let (opts, _ours) = without_warm_connections(opts);
    let daemon = LocalDaemon::start(opts);
    let paths = BigDrv::new("fault-hang-only").prepare(&daemon);
    let refused = format!("cannot build on '{}'", hang.uri());
    let nix_gave_up = format!(
        "error: a 'aarch64-linux' with features {{}} is required to build '{}'",
        paths.drv
    );

    let first = paths.nix_build(&daemon);
    first.assert_failure();
    assert!(first.stderr.contains(&refused), "{first}");
    assert!(first.stderr.contains(&nix_gave_up), "{first}");
    assert!(first.elapsed > Duration::from_secs(13), "{first}");
    let failed_at = Instant::now();
    assert_eq!(hang.accepts().len(), 1);
    let (consecutive, failed_at_ms) = the_record(&daemon);
    assert_eq!(consecutive, 1);

    // Right after: declined at once, with one line naming the builder, the cause and the wait
    // left of the first backoff (10 s).
    let (second, window) = nix_build_in_window(&paths, &daemon);
    second.assert_failure();
    assert!(second.stderr.contains(&nix_gave_up), "{second}");
    assert!(!second.stderr.contains(&refused), "{second}");
    let reason = format!("'{}' failed recently (connection failed: ", hang.uri());
    let lines: Vec<&str> = second
        .stderr
        .lines()
        .filter(|l| {
            l.contains(&reason)
                && l.contains(") and is not tried again for another ")
                && l.contains("Nothing retries this build: it fails now; start it again in ")
        })
        .collect();
    assert_eq!(lines.len(), 1, "{second}");
    eprintln!(
        "[fault] hanging builder alone: the second nix-build failed after {:.2?}: {}",
        second.elapsed, lines[0]
    );
    assert!(second.elapsed < Duration::from_secs(5), "{second}");
    assert_eq!(hang.accepts().len(), 1, "connected during the backoff");
    assert_retry_in(lines[0], 10, failed_at_ms, window);

    // The first backoff is 10 s. Once it has run out, it is tried again; a second failure in
    // a row doubles the wait.
    thread::sleep(
        (failed_at + Duration::from_millis(10_500)).saturating_duration_since(Instant::now()),
    );
    let third = paths.nix_build(&daemon);
    third.assert_failure();
    assert!(third.stderr.contains(&refused), "{third}");
    assert_eq!(hang.accepts().len(), 2, "not tried again after the backoff");
    let (consecutive, failed_at_ms) = the_record(&daemon);
    assert_eq!(consecutive, 2);
    let (fourth, window) = nix_build_in_window(&paths, &daemon);
    fourth.assert_failure();
    let line = fourth
        .stderr
        .lines()
        .find(|l| l.contains(&reason))
        .unwrap_or_else(|| panic!("{fourth}"));
    eprintln!("[fault] hanging builder alone: after the second failure in a row: {line}");
    // Twice the first: 20 s from the second failure.
    assert_retry_in(line, 20, failed_at_ms, window);
    assert_eq!(hang.accepts().len(), 2);
    assert_store_clean(&daemon, "hanging builder alone");
    assert_no_strays(&daemon, None, Duration::from_secs(10));
}
