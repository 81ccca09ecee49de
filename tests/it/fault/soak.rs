//! The soak (LONG-RUNNING, not in CI): 100 builds over two lazy `kind = "command"` builders
//! with `idle-timeout = "2s"` and `max-jobs = 1` (so both are needed), from three clients that
//! pause a random 0–5 s (seeded, printed) between builds, so the builders boot and stop over
//! and over while builds come and go. Every build must succeed, and none may land on a
//! stopping builder: each build's run (its start and end, recorded by the builder itself from
//! the machine's uptime clock) must lie inside one "up" interval of the builder it ran on,
//! from the supervisor's "is up" line to its next "stopping it" line (the supervisor's log,
//! on the same clock).
//!
//! Run it with
//!     cargo test --release --test it -- --ignored --nocapture fault::soak
//! (`NLB_SOAK_BUILDS` changes the number of builds, `NLB_FAULT_SEED` replays a run). It prints
//! the builds, the success rate, the boots and stops per builder and the wall time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::fault::*;
use crate::harness::*;

const CLIENTS: usize = 3;

/// Seconds since the Unix epoch of a supervisor log line (`2026-11-28T16:49:41.274986Z …`).
fn log_epoch(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.trim_end_matches('Z').split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let t: Vec<f64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if d.len() != 3 || t.len() != 3 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m, day) = (d[0] - i64::from(d[1] <= 2), d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + t[0] * 3600.0 + t[1] * 60.0 + t[2])
}

fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/uptime")
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One tiny aarch64 derivation that records when it ran (machine uptime, seconds).
fn soak_expr(i: usize, sleep_ms: u64) -> String {
    let secs = sleep_ms as f64 / 1000.0;
    DrvExpr::sh(
        &format!("soak-{i}"),
        "aarch64-linux",
        &format!(
            "read s _ < /proc/uptime; sleep {secs}; read e _ < /proc/uptime; echo \"$s $e\" > $out"
        ),
    )
    .nix()
}

/// Up intervals of `builder` (epoch seconds): from "is up" to the next "stopping it" (or to
/// the end of the log when it is still up).
fn up_intervals(log: &str, builder: &str) -> Vec<(f64, f64)> {
    let up = format!("builder '{builder}' is up after");
    let stopping = format!("builder '{builder}' has been idle for");
    let other_stop = format!("builder '{builder}': last lease released, stopping it");
    let gone = format!("builder '{builder}' stopped:");
    let mut out = Vec::new();
    let mut open: Option<f64> = None;
    for l in log.lines() {
        let Some(t) = log_epoch(l) else { continue };
        if l.contains(&up) {
            open = Some(t);
        } else if (l.contains(&stopping) || l.contains(&other_stop) || l.contains(&gone))
            && let Some(s) = open.take()
        {
            out.push((s, t));
        }
    }
    if let Some(s) = open {
        out.push((s, f64::INFINITY));
    }
    out
}

struct Done {
    index: usize,
    out: CmdOutput,
    /// (start, end) of the build's run, epoch seconds.
    ran: Option<(f64, f64)>,
    builder: Option<String>,
}

#[test]
#[ignore = "long-running soak: cargo test --release --test it -- --ignored --nocapture fault::soak"]
fn soak_100_builds_over_two_lazy_builders_that_churn() {
    let total: usize = std::env::var("NLB_SOAK_BUILDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let rng = Arc::new(Mutex::new(FaultRng::new("soak")));
    let remotes: Vec<LazyRemote> = (0..2)
        .map(|_| LazyRemote::prepare(RemoteOpts::new(Nix::Host)))
        .collect();
    let names = ["soak-a", "soak-b"];
    let tables: Vec<String> = remotes
        .iter()
        .zip(names)
        .map(|(r, n)| {
            r.builder_toml(
                n,
                Scheme::Ssh,
                &["aarch64-linux"],
                "max-jobs = 1\nidle-timeout = \"2s\"\nboot-timeout = \"60s\"",
                &r.command_boot(Duration::from_millis(300)),
            )
        })
        .collect();
    let cfg = LazyConfig::write(&tables);
    let daemon = LocalDaemon::start(cfg.daemon_opts(Duration::from_secs(60)));
    // The builders' uptime clock and the supervisor's wall clock, side by side.
    let offset = epoch_now() - uptime();

    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Done>> = Mutex::new(Vec::new());
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..CLIENTS {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total {
                        return;
                    }
                    let (gap, sleep_ms) = {
                        let mut r = rng.lock().unwrap_or_else(|p| p.into_inner());
                        (
                            r.duration(Duration::ZERO, Duration::from_millis(5000)),
                            (r.fraction(0.0, 1500.0)) as u64,
                        )
                    };
                    std::thread::sleep(gap);
                    let file = daemon.write_file(&format!("soak-{i}.nix"), &soak_expr(i, sleep_ms));
                    let out = daemon.nix_build(&[&file.to_string_lossy()]);
                    let ran = out.success().then(|| {
                        let p = out.stdout.trim();
                        let text = std::fs::read_to_string(daemon.host_path(p)).unwrap_or_default();
                        let v: Vec<f64> = text
                            .split_whitespace()
                            .filter_map(|x| x.parse().ok())
                            .collect();
                        (
                            v.first().copied().unwrap_or(0.0) + offset,
                            v.get(1).copied().unwrap_or(0.0) + offset,
                        )
                    });
                    let builder = remotes
                        .iter()
                        .zip(names)
                        .find(|(r, _)| out.stderr.contains(&format!("on '{}'", r.uri(Scheme::Ssh))))
                        .map(|(_, n)| n.to_owned());
                    eprintln!(
                        "[soak] build {i}: {} on {:?} after a {gap:.2?} pause, {:.2?}",
                        if out.success() { "ok" } else { "FAILED" },
                        builder,
                        out.elapsed
                    );
                    results
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Done {
                            index: i,
                            out,
                            ran,
                            builder,
                        });
                }
            });
        }
    });
    let wall = t0.elapsed();
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let log = cfg.supervisor_log();
    let ok = results.iter().filter(|d| d.out.success()).count();
    let mut per_builder: BTreeMap<String, (usize, u32, usize)> = BTreeMap::new();
    for n in names {
        // From the log: a supervisor that exits while idle takes its counters with it.
        let boots = log
            .lines()
            .filter(|l| l.contains(&format!("booting builder '{n}' (boot")))
            .count() as u32;
        let stops = log
            .lines()
            .filter(|l| l.contains(&format!("builder '{n}' has been idle for")))
            .count();
        let builds = results
            .iter()
            .filter(|d| d.builder.as_deref() == Some(n))
            .count();
        per_builder.insert(n.to_owned(), (builds, boots, stops));
    }
    eprintln!(
        "[soak] {} builds in {wall:.2?} from {CLIENTS} clients: {ok} succeeded ({:.1} %); per builder (builds, boots, idle stops): {per_builder:?}",
        results.len(),
        100.0 * ok as f64 / results.len().max(1) as f64
    );
    for d in results.iter().filter(|d| !d.out.success()) {
        eprintln!("[soak] build {} failed:\n{}", d.index, d.out);
    }
    assert_eq!(ok, total, "not every build succeeded");

    // None landed on a stopping (or stopped) builder.
    let intervals: BTreeMap<&str, Vec<(f64, f64)>> =
        names.iter().map(|n| (*n, up_intervals(&log, n))).collect();
    let mut checked = 0;
    for d in &results {
        let b = d
            .builder
            .as_deref()
            .unwrap_or_else(|| panic!("build {} does not say where it ran:\n{}", d.index, d.out));
        let (start, end) = d
            .ran
            .unwrap_or_else(|| panic!("build {} recorded no times", d.index));
        let inside = intervals[b]
            .iter()
            .any(|&(up, down)| up <= start && end <= down);
        assert!(
            inside,
            "build {} ran {start:.3}–{end:.3} on '{b}', outside every up interval {:?}\n{log}",
            d.index, intervals[b]
        );
        checked += 1;
    }
    eprintln!("[soak] all {checked} builds ran inside an up interval of their builder");
    let boots: u32 = per_builder.values().map(|v| v.1).sum();
    assert!(boots >= 4, "the builders hardly churned: {per_builder:?}");
    assert_store_clean(&daemon, "soak");
}
