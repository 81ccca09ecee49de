//! Peak resident memory of hook processes while they run, read from `/proc/<pid>/status`
//! (`VmHWM`, the kernel's own high-water mark of the process's RSS), and the CPU time they
//! used (`utime + stime` from `/proc/<pid>/stat`); and what a process keeps resident at one
//! moment, for the rows that read memory while nothing runs (`VmRSS`, and `Rss`/`Pss` from
//! `/proc/<pid>/smaps_rollup`).
//!
//! Owns a sampling thread that watches every pid the hook wrapper recorded (see `setup`) and
//! keeps the last `VmHWM` it read for each. `VmHWM` never decreases, so the last reading is the
//! peak up to that moment; the thread polls every few milliseconds, so at most the last poll
//! interval of a hook's life is unseen. Only processes whose `comm` is the expected hook name
//! count (a recycled pid is ignored). It measures the hook process alone, not its children
//! (Nix's hook runs `ssh` as a child; ours does SSH in-process).
//!
//! Must never: signal or otherwise touch the processes it watches.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(5);

/// What was seen of one hook process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Seen {
    /// Peak `VmHWM`, KiB.
    pub hwm_kib: u64,
    /// User + system CPU time at the last reading, seconds.
    pub cpu_secs: f64,
}

/// A running sampler; [`Sampler::finish`] stops it.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<BTreeMap<u32, Seen>>,
}

impl Sampler {
    /// Truncates `pid_file` and watches the pids appended to it whose `comm` is `comm`.
    pub fn start(pid_file: PathBuf, comm: String) -> Sampler {
        std::fs::write(&pid_file, "")
            .unwrap_or_else(|e| panic!("cannot truncate {}: {e}", pid_file.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut peaks: BTreeMap<u32, Seen> = BTreeMap::new();
            loop {
                let last_round = flag.load(Ordering::Acquire);
                let pids = std::fs::read_to_string(&pid_file).unwrap_or_default();
                for pid in pids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                    if let Some(kib) = hwm_kib(pid, &comm) {
                        let e = peaks.entry(pid).or_default();
                        e.hwm_kib = e.hwm_kib.max(kib);
                        if let Some(cpu) = cpu_secs(pid) {
                            e.cpu_secs = e.cpu_secs.max(cpu);
                        }
                    }
                }
                if last_round {
                    return peaks;
                }
                thread::sleep(POLL);
            }
        });
        Sampler { stop, thread }
    }

    /// Stops sampling; what was seen of every hook process.
    pub fn finish(self) -> BTreeMap<u32, Seen> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}

/// `VmHWM` of `pid` in KiB, if it is alive and runs as `comm`.
fn hwm_kib(pid: u32, comm: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let name = status.lines().find_map(|l| l.strip_prefix("Name:"))?.trim();
    if name != comm {
        return None;
    }
    parse_kib(&status, "VmHWM:")
}

/// User + system CPU seconds of `pid` so far (fields 14 and 15 of `/proc/<pid>/stat`).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    parse_cpu_ticks(&stat).map(|t| t as f64 / hz.max(1) as f64)
}

/// `utime + stime` (clock ticks) from a `/proc/<pid>/stat` line; the command name in
/// parentheses may itself contain spaces and parentheses, so fields count from the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11); // fields 3.. → skip to field 14
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The value of a `Key:   123 kB` line of a `/proc/<pid>/status` text.
pub fn parse_kib(status: &str, key: &str) -> Option<u64> {
    let v = status.lines().find_map(|l| l.strip_prefix(key))?;
    let mut words = v.split_whitespace();
    let n = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(n)
}

/// `VmRSS` of `pid` now, MiB; `None` when it is gone.
pub fn vm_rss(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_kib(&status, "VmRSS:").map(|k| k as f64 / 1024.0)
}

/// `Rss` and `Pss` of `pid` now (`/proc/<pid>/smaps_rollup`), MiB: what it has resident, and
/// its share of that when pages shared with other processes are split among them.
pub fn rss_pss(pid: u32) -> (f64, f64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_else(|e| panic!("smaps_rollup of {pid}: {e}"));
    let mib = |key: &str| {
        parse_kib(&text, key).unwrap_or_else(|| panic!("no {key} in smaps_rollup:\n{text}")) as f64
            / 1024.0
    };
    (mib("Rss:"), mib("Pss:"))
}

/// Self-checks run by `cargo test --benches` (see `main`).
pub fn self_test() {
    let status =
        "Name:\tnix-lazy-build\nVmPeak:\t  20000 kB\nVmHWM:\t    8123 kB\nVmRSS:\t    7000 kB\n";
    assert_eq!(parse_kib(status, "VmHWM:"), Some(8123));
    assert_eq!(parse_kib(status, "VmRSS:"), Some(7000));
    assert_eq!(parse_kib(status, "VmSwap:"), None);
    assert_eq!(parse_kib("VmHWM:\t12 MB\n", "VmHWM:"), None);
    // Our own process is alive and has a high-water mark.
    let me = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
    let own = hwm_kib(std::process::id(), me.trim());
    assert!(own.is_some_and(|k| k > 0), "own VmHWM: {own:?}");
    assert_eq!(hwm_kib(std::process::id(), "not-this-name"), None);
    let stat = "123 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 30 0 0 20 0";
    assert_eq!(parse_cpu_ticks(stat), Some(280));
    assert_eq!(parse_cpu_ticks("garbage"), None);
    assert!(cpu_secs(std::process::id()).is_some());
    // Our own resident memory, read both ways; a share of it is never more than all of it.
    let (rss, pss) = rss_pss(std::process::id());
    assert!(
        rss > 0.0 && pss > 0.0 && pss <= rss,
        "own Rss {rss}, Pss {pss}"
    );
    assert!(vm_rss(std::process::id()).is_some_and(|m| m > 0.0));
}

/// Opt-in (`NLB_BENCH_CPU_BREAKDOWN=1`) diagnosis for the transfer rows: the CPU seconds every
/// descendant of the given processes (the local nix-daemon, the remote's sshd) used during a
/// run, summed by process name — who pays for a transfer (local daemon, hook, ssh, remote
/// sshd, remote nix-store). Polls `/proc` every 50 ms, so processes shorter than that are
/// missed; it costs some CPU itself, which is why it is off by default.
pub struct CpuBreakdown {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<BTreeMap<String, f64>>,
}

impl CpuBreakdown {
    pub fn enabled() -> bool {
        std::env::var_os("NLB_BENCH_CPU_BREAKDOWN").is_some_and(|v| v == "1")
    }

    /// Watches the process trees under `roots`.
    pub fn start(roots: &[u32]) -> CpuBreakdown {
        let roots = roots.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            // pid → (name, CPU when first seen, latest CPU)
            let mut seen: BTreeMap<u32, (String, f64, f64)> = BTreeMap::new();
            let mut first_round = true;
            loop {
                let last_round = flag.load(Ordering::Acquire);
                let stats = all_stats();
                let parent: BTreeMap<u32, u32> = stats.iter().map(|s| (s.pid, s.ppid)).collect();
                let under_root = |mut p: u32| {
                    for _ in 0..64 {
                        if roots.contains(&p) {
                            return true;
                        }
                        match parent.get(&p) {
                            Some(&pp) if pp > 1 => p = pp,
                            _ => return false,
                        }
                    }
                    false
                };
                for st in stats.iter().filter(|s| under_root(s.pid)) {
                    // Processes alive before the run count from their first reading only.
                    let base = if first_round { st.cpu } else { 0.0 };
                    let e = seen
                        .entry(st.pid)
                        .or_insert((st.name.clone(), base, st.cpu));
                    e.2 = e.2.max(st.cpu);
                }
                first_round = false;
                if last_round {
                    let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
                    for (name, base, last) in seen.into_values() {
                        *by_name.entry(name).or_insert(0.0) += (last - base).max(0.0);
                    }
                    return by_name;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        CpuBreakdown { stop, thread }
    }

    /// Stops; CPU seconds by process name, largest first, as one line.
    pub fn finish(self) -> String {
        self.stop.store(true, Ordering::Release);
        let by_name = self.thread.join().unwrap_or_default();
        let mut v: Vec<(String, f64)> = by_name.into_iter().filter(|(_, s)| *s >= 0.01).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v.iter()
            .map(|(n, s)| format!("{n} {s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

struct Stat {
    pid: u32,
    ppid: u32,
    name: String,
    cpu: f64,
}

/// pid, parent, name and CPU seconds of every process.
fn all_stats() -> Vec<Stat> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let name = stat.get(open + 1..close)?.to_owned();
            let ppid = stat
                .get(close + 1..)?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cpu = parse_cpu_ticks(&stat)? as f64 / hz;
            Some(Stat {
                pid,
                ppid,
                name,
                cpu,
            })
        })
        .collect()
}
