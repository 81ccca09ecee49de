//! `cargo bench --bench hook`: nix-lazy-builder side by side with Nix 2.8's own build hook
//! (`/usr/libexec/nix/build-remote`, over OpenSSH) on the integration harness — real
//! nix-daemons, real sshd, real remote stores — in one run, runs alternating A/B/A/B, each
//! figure the median of several runs with its spread and the ratio ours ÷ Nix's. The results
//! table goes into BENCHMARKS.md (between its `bench:begin`/`bench:end` markers).
//!
//! `cargo bench --bench hook -- P1 P4` runs some row groups only (P1 … P7, P7-restore, P8, P9);
//! `NLB_BENCH_RUNS` sets the runs per figure (default 5); `NLB_BENCH_BASELINE=<another
//! nix-lazy-builder>` adds that build as one more contestant (before/after, in the notes);
//! `-- TRANSPORT` measures a warm session's local leg on its own. Without `--bench` (as under
//! `cargo test --benches`) it runs only its own self-checks, so the test suite never starts the
//! benchmark.
//!
//! Owns the benchmark's orchestration and nothing of the product: it runs the release binary
//! cargo built for it. Must never touch the machine's real /nix or /etc/nix (everything runs
//! in the harness's private mount namespaces), listen beyond 127.0.0.1, or leave a process
//! behind (every handle stops what it started by pid).

// The integration tests' harness, shared as source. The bench uses a part of it; its unused
// items are found where all of it is used, in the test crate (tests/it).
#[path = "../../tests/it/harness/mod.rs"]
#[allow(
    dead_code,
    unused_imports,
    reason = "the bench uses a part of the test harness"
)]
mod harness;
mod p4;
mod p7;
mod p7restore;
mod p8;
mod p9;
mod profile;
mod report;
mod rows;
mod rss;
mod setup;
mod stats;
mod transport;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{Nix, hook_binary, run_command};
use report::{Goal, Row};
use rows::{Ctx, MANY_GIB, ONE_100MIB, ONE_GIB, Transfer, transfer_rows};

/// PATH for the hooks P4 runs directly.
pub const STD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const GROUPS: [&str; 10] = [
    "P1",
    "P2",
    "P3",
    "P4",
    "P5",
    "P6",
    "P7",
    "P7-RESTORE",
    "P8",
    "P9",
];

/// Every row key, in table order.
fn row_order() -> Vec<String> {
    [
        "P1 floor".to_owned(),
        "P1 ssh://".to_owned(),
        "P1 ssh-ng://".to_owned(),
        format!("P2 {}", ONE_GIB.label()),
        format!("P2 {}", MANY_GIB.label()),
        format!("P3 {}", ONE_GIB.label()),
        format!("P3 {}", MANY_GIB.label()),
        "P4".to_owned(),
        P5_UP_GIB.to_owned(),
        P5_DOWN_GIB.to_owned(),
        P5_UP_100.to_owned(),
        P5_DOWN_100.to_owned(),
        "P5 supervisor idle".to_owned(),
        "P5 supervisor, 4 warm builders".to_owned(),
        "P6".to_owned(),
        p7::KEY.to_owned(),
        p7restore::KEY.to_owned(),
        p7restore::KEY_RELAY.to_owned(),
        p7restore::KEY_TOTAL.to_owned(),
        p7restore::KEY_MEMORY.to_owned(),
        p8::KEY_EXTERNAL.to_owned(),
        p8::KEY_HOOK.to_owned(),
        p9::KEY_BUILD.to_owned(),
        p9::KEY_IDLE.to_owned(),
        p9::KEY_FIRST.to_owned(),
    ]
    .to_vec()
}

const P5_UP_GIB: &str = "P5 hook, upload 1 GiB";
const P5_DOWN_GIB: &str = "P5 hook, download 1 GiB";
const P5_UP_100: &str = "P5 hook, upload 100 MiB";
const P5_DOWN_100: &str = "P5 hook, download 100 MiB";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(n) = std::env::var(p4::CHILD_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        p4::child(n);
        return;
    }
    if let Some(dir) = std::env::var_os(p4::PROFILE_ENV) {
        p4::profile_child(Path::new(&dir));
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        stats::self_test();
        report::self_test();
        rss::self_test();
        rows::self_test();
        p7::self_test();
        p7restore::self_test();
        p8::self_test();
        p9::self_test();
        println!(
            "benches/hook: self-checks passed (run the benchmark with `cargo bench --bench hook`)"
        );
        return;
    }
    let mut groups: Vec<String> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.to_uppercase())
        .collect();
    if groups.iter().any(|g| g == "TRANSPORT") {
        let runs = std::env::var("NLB_BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        transport::run(runs);
        return;
    }
    let tool = if groups.iter().any(|g| g == "PROFILE") {
        Some(setup::Tool::Callgrind)
    } else if groups.iter().any(|g| g == "TRACE") {
        Some(setup::Tool::Strace)
    } else if groups.iter().any(|g| g == "PERF") {
        Some(setup::Tool::Perf)
    } else {
        None
    };
    for g in &groups {
        assert!(
            GROUPS.contains(&g.as_str()) || ["PROFILE", "TRACE", "PERF"].contains(&g.as_str()),
            "unknown row group {g}; known: {GROUPS:?}, PROFILE, TRACE, PERF"
        );
    }
    if groups.is_empty() {
        groups = GROUPS.iter().map(|g| (*g).to_owned()).collect();
    }
    let want = |g: &str| groups.iter().any(|x| x == g);
    let runs: usize = std::env::var("NLB_BENCH_RUNS")
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|e| panic!("NLB_BENCH_RUNS={v}: {e}"))
        })
        .unwrap_or(5);
    assert!(runs >= 1, "NLB_BENCH_RUNS must be at least 1");
    if runs < 5 {
        eprintln!("[bench] warning: {runs} runs per figure; the goals ask for the median of ≥ 5");
    }

    harness::require_root();
    Nix::Host.require();
    let host_tmp = std::env::temp_dir();
    let stores = choose_store_dir();
    eprintln!("[bench] stores and temp files under {stores}");
    // SAFETY: still single-threaded here (nothing spawned yet); every temp dir the harness
    // makes from now on (stores, keys, configs) lands under it.
    unsafe { std::env::set_var("TMPDIR", &stores) };
    let bin = hook_binary();
    eprintln!("[bench] nix-lazy-builder: {}", bin.display());
    if !bin.components().any(|c| c.as_os_str() == "release") {
        eprintln!("[bench] warning: not a release build; figures will not be representative");
    }
    let tmp = tempfile::Builder::new()
        .prefix("nlb-bench-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
    let ctx = Ctx {
        runs,
        dir: tmp.path().to_path_buf(),
        host_tmp,
    };
    if let Some(tool) = tool {
        profile::run(&ctx, tool);
        return;
    }
    let load_before = loadavg();
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut timings = Vec::new();
    let mut step = |name: &str, rows: &mut Vec<Row>, f: &mut dyn FnMut() -> Vec<Row>| {
        let t = Instant::now();
        eprintln!("[bench] == {name}");
        rows.extend(f());
        timings.push(format!("{name} {:.0} s", t.elapsed().as_secs_f64()));
        eprintln!("[bench] == {name}: {:.1?}", t.elapsed());
    };

    if want("P1") {
        step("P1", &mut rows, &mut || rows::p1(&ctx));
    }
    if want("P4") {
        step("P4", &mut rows, &mut || vec![p4_row(&ctx)]);
    }
    if want("P2") || want("P3") || want("P5") {
        let t = Transfer::new(&ctx);
        let (up, down) = (want("P2"), want("P3"));
        // Per shape: P2's runs, then P3's (its remote build copies P2's input), then cleanup.
        for (shape, rss) in [(ONE_GIB, true), (MANY_GIB, false)] {
            if !(up || down) {
                break;
            }
            let name = format!("P2/P3 {}", shape.label());
            step(&name, &mut rows, &mut || {
                let (u, d) = t.shape(shape, up, down);
                let mut v = Vec::new();
                if let Some(u) = u {
                    let key = rss.then_some(P5_UP_GIB);
                    v.extend(transfer_rows(&ctx, "P2", "upload", shape, u, key, "P2"));
                }
                if let Some(d) = d {
                    let key = rss.then_some(P5_DOWN_GIB);
                    v.extend(transfer_rows(&ctx, "P3", "download", shape, d, key, "P3"));
                }
                v
            });
        }
        if want("P5") {
            step("P5", &mut rows, &mut || {
                let (u, d) = t.shape(ONE_100MIB, true, true);
                let mut v = Vec::new();
                if let Some(u) = u {
                    v.extend(transfer_rows(
                        &ctx,
                        "",
                        "upload",
                        ONE_100MIB,
                        u,
                        Some(P5_UP_100),
                        "P5",
                    ));
                }
                if let Some(d) = d {
                    v.extend(transfer_rows(
                        &ctx,
                        "",
                        "download",
                        ONE_100MIB,
                        d,
                        Some(P5_DOWN_100),
                        "P5",
                    ));
                }
                v.push(rows::supervisor_idle(&ctx));
                v
            });
        }
    }
    if want("P6") {
        step("P6", &mut rows, &mut || rows::p6(&ctx));
    }
    if want("P7") {
        step("P7", &mut rows, &mut || vec![p7::p7(&ctx)]);
    }
    if want("P7-RESTORE") {
        step("P7-restore", &mut rows, &mut || p7restore::p7_restore(&ctx));
    }
    if want("P8") {
        step("P8", &mut rows, &mut || p8::p8(&ctx));
    }
    if want("P9") {
        step("P9", &mut rows, &mut || p9::p9(&ctx));
    }
    let total = started.elapsed();
    eprintln!("[bench] total {total:.1?} ({})", timings.join(", "));
    let load = format!("{load_before} before, {} after", loadavg());
    let env = format!("load average {load}; stores on {stores}");
    write_results(&rows, &groups, runs, total, &env);
    for r in &rows {
        eprintln!("{}", r.line("now"));
    }
}

fn p4_row(ctx: &Ctx) -> Row {
    // Start-up is cheap: many more runs than the build rows, for a stable median.
    let n = (ctx.runs * 20).max(100);
    let (ours, nix) = p4::run(n);
    Row {
        key: "P4".into(),
        what: "hook start → `# decline`, 100-machine table, preamble from a real Nix 2.8 daemon".into(),
        unit: "ms",
        ours,
        nix: Some(nix),
        persist: None,
        floor: None,
        goal: Goal::AbsAndRatioAtMost {
            abs: 5.0,
            ratio: 0.5,
        },
        note: "hook binary run directly (as nix-daemon does) in a private mount namespace with tmpfs /nix; 5 warm-up runs each discarded".into(),
        command: "cargo bench --bench hook -- P4".into(),
    }
}

fn sh_out(cmd: &str) -> String {
    let out = run_command(
        Command::new("sh").args(["-c", cmd]),
        None,
        Duration::from_secs(30),
    );
    out.stdout.trim().to_owned()
}

/// Where the stores live: `NLB_BENCH_TMPDIR` if set, else `/dev/shm` when it is a tmpfs with
/// room for the transfer rows (about 7 GiB at the peak), else the usual temp dir.
///
/// Why not the disk by default: this machine's root ext4 has no journal, and ext4 without a
/// journal will not reuse an inode deleted in the last 60–300 s; creating a file scans past
/// every such inode (`recently_deleted`, `find_inode_bit` and `find_get_block_common` were over
/// half of both hooks' CPU in `perf record -e cpu-clock` of a 20,000-file download that followed
/// a cleanup). Every run after the first would pay for the previous run's deletions.
fn choose_store_dir() -> String {
    if let Ok(dir) = std::env::var("NLB_BENCH_TMPDIR") {
        return dir;
    }
    let shm = "/dev/shm";
    let is_tmpfs = std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&shm) && f.get(2) == Some(&"tmpfs")
        })
    });
    let avail = sh_out(&format!("df --output=avail -B1 {shm} | tail -1"))
        .parse::<u64>()
        .unwrap_or(0);
    if is_tmpfs && avail >= 8 << 30 {
        shm.to_owned()
    } else {
        std::env::temp_dir().to_string_lossy().into_owned()
    }
}

/// The 1-, 5- and 15-minute load averages (the machine is shared: this says how busy it was).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn write_results(rows: &[Row], groups: &[String], runs: usize, total: Duration, env: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        "# Benchmarks: nix-lazy-builder vs Nix's own build hook\n\n".to_owned()
    });
    let when = sh_out("date -u '+%Y-%m-%d %H:%M UTC'");
    let commit = sh_out(&format!(
        "git -C {} describe --always --dirty 2>/dev/null",
        env!("CARGO_MANIFEST_DIR")
    ));
    let machine = format!(
        "{} cores, {}, kernel {}, {}",
        sh_out("nproc"),
        sh_out("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        sh_out("uname -r"),
        sh_out("nix-store --version"),
    );
    let header = format!(
        "Last run: {when}, commit `{commit}`, row groups {}, {runs} runs per figure, {:.0} s in all.  \nMachine: {machine}; {env}.",
        groups.join(" "),
        total.as_secs_f64()
    );
    let lines: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.key.clone(), r.line(&when)))
        .collect();
    let text = report::merge(&old, &header, &lines, &row_order());
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    eprintln!("[bench] wrote {}", path.display());
}
