//! Process lookups in `/proc` for every part of the harness and the tests: whether a pid is
//! alive, its parent, argv, RSS and mount namespace, its descendants, the processes of a
//! namespace or naming a directory, and waits for a pid to go or to be written.
//!
//! Must never: signal anything (callers decide what to stop, by pid), or count a zombie as
//! alive.

use std::path::Path;
use std::time::{Duration, Instant};

/// Every pid in `/proc` now.
pub fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// Whether `pid` is a live process (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// `pid`'s parent, from `/proc/PID/stat` (`pid (comm) state ppid …`).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid`'s parent chain reaches `ancestor`.
pub fn descends_from(pid: u32, ancestor: Option<u32>) -> bool {
    let Some(a) = ancestor else {
        return false;
    };
    let mut p = pid;
    for _ in 0..64 {
        match parent_of(p) {
            Some(pp) if pp == a => return true,
            Some(pp) if pp > 1 => p = pp,
            _ => return false,
        }
    }
    false
}

/// Every live process whose parent chain leads to `root` (`root` itself not included).
pub fn descendants(root: u32) -> Vec<u32> {
    with_descendants(&[root])
        .into_iter()
        .filter(|&p| p != root && alive(p))
        .collect()
}

/// `roots` and every process whose parent chain leads to one of them.
pub fn with_descendants(roots: &[u32]) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|p| Some((p, parent_of(p)?)))
        .collect();
    let mut all: Vec<u32> = roots.to_vec();
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        for &(p, pp) in &parents {
            if pp == parent && !all.contains(&p) {
                all.push(p);
            }
        }
        i += 1;
    }
    all
}

/// `mnt:[…]` of `pid` (a number, or `self`).
pub fn mnt_ns_of(pid: &str) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Pids whose mount namespace is `ns` (zombies have no namespace link and are skipped).
pub fn pids_in_namespace(ns: &str) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|p| mnt_ns_of(&p.to_string()).as_deref() == Some(ns))
        .collect()
}

/// A process's argv.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// `VmRSS` of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Live processes whose command line names `dir` (a test's own state directory), with their
/// argv.
pub fn processes_mentioning(dir: &Path) -> Vec<(u32, Vec<String>)> {
    let needle = dir.to_string_lossy().into_owned();
    all_pids()
        .into_iter()
        .filter(|&p| alive(p))
        .filter_map(|p| Some((p, cmdline(p)?)))
        .filter(|(_, argv)| argv.iter().any(|a| a.contains(&needle)))
        .collect()
}

/// Whether our binary's `argv` is a hook's: not `supervise`, not a CLI command.
pub fn is_hook_argv(argv: &[String]) -> bool {
    !argv
        .iter()
        .any(|a| ["supervise", "status", "up", "down", "doctor"].contains(&a.as_str()))
}

/// Waits until `pid` is gone; false on timeout.
pub fn wait_gone(pid: u32, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !alive(pid)
}

/// Reads a pid a process wrote to `path`, waiting for it to appear.
#[track_caller]
pub fn read_pid(path: &Path, limit: Duration) -> u32 {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Ok(p) = s.trim().parse()
        {
            return p;
        }
        assert!(t0.elapsed() < limit, "no pid in {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}
