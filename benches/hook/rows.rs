//! The measured rows (P1–P6) on the integration harness: real nix-daemons, a real sshd and real
//! remote stores, the contestants side by side (ours, Nix's hook, Nix's hook with OpenSSH
//! connection sharing, and a baseline build of ours when one is named), runs rotating
//! A/B/C, B/C/A, C/A/B, ….
//!
//! Owns the workloads (derivations, generated closures), the bookkeeping between runs that
//! keeps every run a real remote build (fresh derivations; the remote or the local store
//! emptied of what the next run must transfer), and the checks that each run did what it
//! claims (outputs valid, inputs really copied, slots never exceeded).
//!
//! Must never: time anything but the client command of the run itself, or keep a run whose
//! build failed or whose transfer did not happen.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::{
    CmdOutput, DrvExpr, FakeDrv, LocalDaemon, Nix, RemoteOpts, RemoteStore, Scheme, StoreQueries,
    hook_binary, max_overlap,
};
use crate::report::{Goal, Row};
use crate::rss::Sampler;
use crate::setup::{self, DaemonSpec, Hook};
use crate::stats::Samples;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// What every row needs to know about the run.
pub struct Ctx {
    pub runs: usize,
    /// The bench's temp dir (wrapper scripts, ssh config, pid files, generated trees).
    pub dir: PathBuf,
    /// The temp dir before the bench pointed TMPDIR at its stores: where the VM tests' lock
    /// lives (P7 takes it too).
    pub host_tmp: PathBuf,
}

impl Ctx {
    fn command(&self, group: &str) -> String {
        format!("cargo bench --bench hook -- {group}")
    }
}

/// The contestants, in column order: ours, Nix's hook, Nix's hook with ControlPersist, then
/// the baseline build of ours if `NLB_BENCH_BASELINE` names one (reported in the notes).
pub fn contestants() -> Vec<Hook> {
    let mut v = vec![Hook::Ours, Hook::Nix, Hook::NixPersist];
    if setup::baseline().is_some() {
        v.push(Hook::Baseline);
    }
    v
}

/// Run `i` visits the `n` contestants rotated by `i` (each goes first as often as the others).
fn order(i: usize, n: usize) -> Vec<usize> {
    (0..n).map(|k| (i + k) % n).collect()
}

const OURS: usize = 0;
const NIX: usize = 1;
const PERSIST: usize = 2;
const BASELINE: usize = 3;

/// `s` with one empty sample set per contestant.
fn per_hook(n: usize) -> Vec<Samples> {
    (0..n).map(|_| Samples::new()).collect()
}

/// "baseline X (ours ÷ baseline = y×)" for the notes, when a baseline was measured.
fn baseline_note(samples: &[Samples], unit: &str) -> String {
    match samples.get(BASELINE) {
        Some(b) if b.len() > 0 => format!(
            "; baseline build ({}): {}, ours ÷ baseline {}",
            setup::baseline()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            crate::stats::fmt_samples(b, unit),
            crate::stats::ratio(&samples[OURS], b)
                .map(|r| format!("{}×", crate::stats::fmt_num(r)))
                .unwrap_or_else(|| "—".into())
        ),
        _ => String::new(),
    }
}

fn progress(what: &str) {
    eprintln!("[bench] {what}");
}

// ------------------------------------------------------------------------------------------------
// P1

/// P1: wall time of `nix-build` for a trivial aarch64 derivation with one small input, built on
/// a warm remote (sshd and store already running), over `ssh://` and `ssh-ng://`.
pub fn p1(ctx: &Ctx) -> Vec<Row> {
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let hooks = contestants();
    let mut rows = Vec::new();
    for scheme in [Scheme::Ssh, Scheme::SshNg] {
        let daemons: Vec<LocalDaemon> = hooks
            .iter()
            .map(|&hook| setup::daemon(&DaemonSpec::new(hook, &[&remote], scheme, &ctx.dir)))
            .collect();
        let mut samples = per_hook(hooks.len());
        let mut floor = Samples::new();
        let total = ctx.runs + 1;
        for i in 0..total {
            let seed = format!("floor-{}-{i}", scheme.prefix());
            let secs = floor_once(
                &daemons[OURS],
                "nlb-bench-floor",
                &seed,
                &["--builders", ""],
            );
            progress(&format!(
                "P1 {} floor run {i}: {secs:.3} s",
                scheme.prefix()
            ));
            if i > 0 {
                floor.push(secs);
            }
            for h in order(i, hooks.len()) {
                let hook = hooks[h];
                let seed = format!("{}-{}-{i}", scheme.prefix(), hook.label());
                let out = remote_once(&daemons[h], &remote, "nlb-bench-p1", &seed, &[], i == 0);
                let secs = out.elapsed.as_secs_f64();
                if i == 0 {
                    progress(&format!(
                        "P1 {} {} warm-up: {secs:.3} s",
                        scheme.prefix(),
                        hook.label()
                    ));
                } else {
                    progress(&format!(
                        "P1 {} {} run {i}: {secs:.3} s",
                        scheme.prefix(),
                        hook.label()
                    ));
                    samples[h].push(secs);
                }
            }
        }
        let floor_median = floor.median();
        let overhead = |s: &Samples| match (s.median(), floor_median) {
            (Some(m), Some(f)) => format!("{:.0} ms", (m - f) * 1000.0),
            _ => "—".into(),
        };
        let whole = |s: &Samples| {
            crate::stats::ratio(&samples[OURS], s)
                .map(|r| format!("{}×", crate::stats::fmt_num(r)))
                .unwrap_or_else(|| "—".into())
        };
        let note = format!(
            "ratios of overheads (median − this scheme's floor {}); overheads: ours {}, Nix's {}, with ControlPersist {}; whole-build ratios {} and {}{}; fresh derivation and input each run; first run of each hook discarded (warm-up)",
            floor_median
                .map(|f| format!("{f:.3} s"))
                .unwrap_or_else(|| "—".into()),
            overhead(&samples[OURS]),
            overhead(&samples[NIX]),
            overhead(&samples[PERSIST]),
            whole(&samples[NIX]),
            whole(&samples[PERSIST]),
            baseline_note(&samples, "s"),
        );
        if scheme == Scheme::Ssh {
            rows.push(Row::ours_only(
                "P1 floor",
                "the same drv built locally (x86_64-linux, no remote, `--builders ''`): what no hook can remove from P1",
                "s",
                floor.clone(),
                Goal::Info,
                "measured in the same rotation as P1 (each scheme has its own, in its note); client, daemon and sandbox build cost".into(),
                ctx.command("P1"),
            ));
        }
        let mut it = samples.into_iter();
        let (ours, nix, persist) = (it.next(), it.next(), it.next());
        rows.push(Row {
            key: format!("P1 {}://", scheme.prefix()),
            what: "per-build overhead, warm builder: trivial drv + 1 small input (wall time of nix-build)".into(),
            unit: "s",
            ours: ours.unwrap_or_default(),
            nix,
            persist,
            floor: floor_median,
            goal: Goal::OverheadAtMost {
                nix: 0.25,
                persist: 0.5,
            },
            note,
            command: ctx.command("P1"),
        });
    }
    rows
}

/// A floor build: the trivial derivation `name` (fresh by `seed`, one log line) for the local
/// system, so the daemon builds it itself (client, daemon, sandbox: the cost a remote build
/// has without any hook); `args` keep the builders away. The timed part is `nix-build` alone.
pub(crate) fn floor_once(daemon: &LocalDaemon, name: &str, seed: &str, args: &[&str]) -> f64 {
    let drv = FakeDrv::new(name)
        .with_seed(seed)
        .with_log_lines(1)
        .with_system("x86_64-linux");
    drv.build_input(daemon);
    let (paths, out) = drv.build(daemon, args);
    out.assert_success();
    assert!(daemon.is_valid(&paths.out), "{out}");
    out.elapsed.as_secs_f64()
}

/// One remote build of the trivial derivation `name` (fresh by `seed`, one log line) with
/// `args`; the timed part is `nix-build` alone (its output's `elapsed`). `full_check` (the
/// warm-up) checks everything (references, deriver, log), later runs that both outputs arrived;
/// every run that `remote` has them.
pub(crate) fn remote_once(
    daemon: &LocalDaemon,
    remote: &RemoteStore,
    name: &str,
    seed: &str,
    args: &[&str],
    full_check: bool,
) -> CmdOutput {
    let drv = FakeDrv::new(name).with_seed(seed).with_log_lines(1);
    drv.build_input(daemon);
    let (paths, out) = drv.build(daemon, args);
    out.assert_success();
    if full_check {
        paths.assert_built(daemon, true);
    } else {
        let both = [paths.out.clone(), paths.dev.clone()];
        assert_eq!(daemon.invalid_among(&both), Vec::<String>::new(), "{out}");
    }
    assert!(remote.is_valid(&paths.out), "not built remotely:\n{out}");
    out
}

// ------------------------------------------------------------------------------------------------
// P2, P3, P5: transfers

/// The shape of a generated closure.
#[derive(Clone, Copy, Debug)]
pub enum Shape {
    /// One regular file of this many bytes.
    OneFile(u64),
    /// `count` files of `each` bytes, 100 to a directory.
    ManyFiles { count: u64, each: u64 },
}

impl Shape {
    pub fn label(self) -> String {
        match self {
            Shape::OneFile(b) if b.is_multiple_of(GIB) => format!("1 file of {} GiB", b / GIB),
            Shape::OneFile(b) => format!("1 file of {} MiB", b / MIB),
            Shape::ManyFiles { count, each } => {
                format!(
                    "{count} files, {:.1} GiB",
                    (count * each) as f64 / GIB as f64
                )
            }
        }
    }

    fn slug(self) -> String {
        match self {
            Shape::OneFile(b) => format!("one-{}m", b / MIB),
            Shape::ManyFiles { count, each } => format!("many-{count}x{each}"),
        }
    }

    /// Writes the tree at `dir` with pseudo-random (incompressible) contents.
    pub fn write_tree(self, dir: &Path) {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut file = |path: &Path, bytes: u64| {
            let mut f = fs::File::create(path)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
            let mut buf = vec![0u8; MIB as usize];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                rng.fill(&mut buf[..n]);
                f.write_all(&buf[..n])
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
                left -= n as u64;
            }
        };
        match self {
            Shape::OneFile(b) => {
                fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
                file(&dir.join("blob"), b);
            }
            Shape::ManyFiles { count, each } => {
                for i in 0..count {
                    let sub = dir.join(format!("d{}", i / 100));
                    if i.is_multiple_of(100) {
                        fs::create_dir_all(&sub)
                            .unwrap_or_else(|e| panic!("{}: {e}", sub.display()));
                    }
                    file(&sub.join(format!("f{i}")), each);
                }
            }
        }
    }
}

/// xorshift64*: fast, deterministic filler; only needs to defeat compression.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The transfer rows' shared set-up: one remote, one daemon per contestant (hook behind the
/// pid wrapper, so every transfer run also yields the hook's peak RSS).
pub struct Transfer<'a> {
    ctx: &'a Ctx,
    remote: RemoteStore,
    hooks: Vec<Hook>,
    daemons: Vec<LocalDaemon>,
    pid_files: Vec<PathBuf>,
}

/// Throughput (MB/s, 10^6 bytes), peak hook RSS (MiB) and hook CPU seconds per contestant.
pub struct TransferResult {
    pub mbps: Vec<Samples>,
    pub rss_mib: Vec<Samples>,
    pub cpu_secs: Vec<Samples>,
    pub nar_size: u64,
}

impl TransferResult {
    fn new(nar_size: u64, n: usize) -> Self {
        TransferResult {
            mbps: per_hook(n),
            rss_mib: per_hook(n),
            cpu_secs: per_hook(n),
            nar_size,
        }
    }

    /// Records run `i` of contestant `h` (`(secs, rss, cpu)` from [`Transfer::sampled`]).
    fn record(
        &mut self,
        row: &str,
        shape: Shape,
        h: (usize, Hook),
        i: usize,
        run: (f64, f64, f64),
    ) {
        let (idx, hook) = h;
        let (secs, rss, cpu) = run;
        let mbps = self.nar_size as f64 / secs / 1e6;
        progress(&format!(
            "{row} {} {} run {}: {secs:.2} s, {mbps:.0} MB/s, hook peak RSS {rss:.1} MiB, hook CPU {cpu:.2} s",
            shape.label(),
            hook.label(),
            i + 1
        ));
        self.mbps[idx].push(mbps);
        self.rss_mib[idx].push(rss);
        self.cpu_secs[idx].push(cpu);
    }
}

impl<'a> Transfer<'a> {
    pub fn new(ctx: &'a Ctx) -> Self {
        let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
        let hooks = contestants();
        let pid_files: Vec<PathBuf> = hooks
            .iter()
            .map(|h| ctx.dir.join(format!("pids-{}", h.label())))
            .collect();
        let daemons = hooks
            .iter()
            .zip(&pid_files)
            .map(|(&hook, pid_file)| {
                setup::daemon(&DaemonSpec {
                    pid_file: Some(pid_file),
                    ..DaemonSpec::new(hook, &[&remote], Scheme::Ssh, &ctx.dir)
                })
            })
            .collect();
        Transfer {
            ctx,
            remote,
            hooks,
            daemons,
            pid_files,
        }
    }

    /// Deletes everything unrooted in every store (between rows: keeps the disk small).
    fn gc_all(&self) {
        self.remote.nix_store(&["--gc"]).assert_success();
        for d in &self.daemons {
            d.nix_store(&["--gc"]).assert_success();
        }
    }

    /// Runs `f` (one timed client command) with the sampler on `hook`'s pid file: wall
    /// seconds, the hook's peak RSS (MiB) and its CPU seconds.
    fn sampled(&self, h: usize, f: impl FnOnce() -> f64) -> (f64, f64, f64) {
        let hook = self.hooks[h];
        let breakdown = crate::rss::CpuBreakdown::enabled()
            .then(|| crate::rss::CpuBreakdown::start(&[self.daemons[h].pid(), self.remote.pid()]));
        let sampler = Sampler::start(self.pid_files[h].clone(), hook.comm());
        let secs = f();
        let seen = sampler.finish();
        if let Some(b) = breakdown {
            progress(&format!(
                "  CPU seconds by process ({}): {}",
                hook.label(),
                b.finish()
            ));
        }
        let kib = seen.values().map(|s| s.hwm_kib).max().unwrap_or(0);
        assert!(
            kib > 0,
            "no {} hook process was seen during the run",
            hook.label()
        );
        let cpu = seen.values().map(|s| s.cpu_secs).sum();
        (secs, kib as f64 / 1024.0, cpu)
    }

    /// Generates `shape` once (pseudo-random contents) and adds it to both local stores and
    /// to the remote: the same store path everywhere. Returns the path and its NAR size.
    fn prepare(&self, shape: Shape) -> (String, u64) {
        let tree = self.ctx.dir.join(format!("nlb-bench-{}", shape.slug()));
        let start = Instant::now();
        shape.write_tree(&tree);
        let tree_arg = tree.to_string_lossy().into_owned();
        let mut input = String::new();
        let args = ["--add", tree_arg.as_str()];
        let added: Vec<_> = self
            .daemons
            .iter()
            .map(|d| d.nix_store(&args))
            .chain([self.remote.nix_store(&args)])
            .collect();
        for out in added {
            out.assert_success();
            let p = out.stdout.trim().to_owned();
            assert!(input.is_empty() || input == p, "{input} vs {p}");
            input = p;
        }
        fs::remove_dir_all(&tree).unwrap_or_else(|e| panic!("{}: {e}", tree.display()));
        let nar_size = nar_size_of(&self.daemons[0], &input);
        progress(&format!(
            "{}: {input} ({nar_size} bytes) in every store after {:.1?}",
            shape.label(),
            start.elapsed()
        ));
        (input, nar_size)
    }

    /// P2 (`up`) and/or P3 (`down`) for one shape, then every store emptied again.
    pub fn shape(
        &self,
        shape: Shape,
        up: bool,
        down: bool,
    ) -> (Option<TransferResult>, Option<TransferResult>) {
        let (input, nar_size) = self.prepare(shape);
        let up = up.then(|| self.upload(shape, &input, nar_size));
        let down = down.then(|| self.download(shape, &input));
        self.gc_all();
        (up, down)
    }

    /// P2: the upload of `input` (of `shape`) as the only input of a remote build; before each
    /// run the remote's store is emptied, so every run uploads it whole.
    fn upload(&self, shape: Shape, input: &str, nar_size: u64) -> TransferResult {
        let ctx = self.ctx;
        let mut res = TransferResult::new(nar_size, self.hooks.len());
        for i in 0..ctx.runs {
            for h in order(i, self.hooks.len()) {
                let hook = self.hooks[h];
                self.remote.nix_store(&["--gc"]).assert_success();
                settle();
                assert!(!self.remote.is_valid(input), "the remote still has {input}");
                let d = &self.daemons[h];
                let seed = format!("{}-{}-{i}", shape.slug(), hook.label());
                let file = d.write_file(&format!("p2-{seed}.nix"), &p2_expr(&seed, input));
                let f = file.to_string_lossy().into_owned();
                let (secs, rss, cpu) = self.sampled(h, || {
                    let out = d.nix_build(&[&f]);
                    out.assert_success();
                    assert_eq!(out.stdout_lines().len(), 1, "{out}");
                    out.elapsed.as_secs_f64()
                });
                assert!(self.remote.is_valid(input), "{input} was not uploaded");
                res.record("P2", shape, (h, hook), i, (secs, rss, cpu));
            }
        }
        res
    }

    /// P3: the download of an output of `shape` (a copy of `input`, made by the remote). The
    /// remote builds it once beforehand; each run then asks the hook to build it again (the
    /// remote answers at once, its outputs being valid; the input is already there, so nothing
    /// goes up) and measures the transfer back. The local copy is deleted after each run.
    fn download(&self, shape: Shape, input: &str) -> TransferResult {
        let ctx = self.ctx;
        assert!(self.remote.is_valid(input), "the remote lacks {input}");
        let file =
            self.daemons[0].write_file(&format!("p3-{}.nix", shape.slug()), &p3_expr(shape, input));
        let f = file.to_string_lossy().into_owned();
        let start = Instant::now();
        let built = self.remote.run_nix("nix-build", &["--no-out-link", &f]);
        built.assert_success();
        let out_path = built.stdout.trim().to_owned();
        let nar_size = nar_size_of(&self.remote, &out_path);
        progress(&format!(
            "P3 {}: {out_path} ({nar_size} bytes) built on the remote in {:.1?}",
            shape.label(),
            start.elapsed()
        ));
        let mut res = TransferResult::new(nar_size, self.hooks.len());
        for i in 0..ctx.runs {
            for h in order(i, self.hooks.len()) {
                let hook = self.hooks[h];
                let d = &self.daemons[h];
                assert!(!d.is_valid(&out_path), "{out_path} is still valid locally");
                let (secs, rss, cpu) = self.sampled(h, || {
                    let out = d.nix_build(&[&f]);
                    out.assert_success();
                    assert_eq!(out.stdout_lines(), vec![out_path.clone()], "{out}");
                    out.elapsed.as_secs_f64()
                });
                assert_eq!(
                    nar_size_of(d, &out_path),
                    nar_size,
                    "local copy of {out_path}"
                );
                d.nix_store(&["--delete", &out_path]).assert_success();
                settle();
                res.record("P3", shape, (h, hook), i, (secs, rss, cpu));
            }
        }
        res
    }
}

/// Between transfer runs (untimed): write back what the previous run and the cleanup left
/// dirty, so a run does not pay for its predecessor's writeback.
fn settle() {
    let out = crate::harness::run_command(
        &mut std::process::Command::new("sync"),
        None,
        Duration::from_secs(300),
    );
    out.assert_success();
}

/// P2's derivation: a small output, `input` (a store path) as its only input.
pub fn p2_expr(seed: &str, input: &str) -> String {
    DrvExpr::sh(
        &format!("nlb-bench-p2-{seed}"),
        "aarch64-linux",
        &format!("test -e $input && echo {seed} > $out"),
    )
    .store_path("input", input)
    .nix()
}

/// P3's derivation: an output of `shape`, copied from `input` (which has that shape).
pub fn p3_expr(shape: Shape, input: &str) -> String {
    let copy = match shape {
        Shape::OneFile(_) => "cp $input/blob $out",
        Shape::ManyFiles { .. } => "cp -r $input $out",
    };
    DrvExpr::sh(
        &format!("nlb-bench-p3-{}", shape.slug()),
        "aarch64-linux",
        copy,
    )
    .store_path("input", input)
    .nix()
}

fn nar_size_of(store: &impl StoreQueries, path: &str) -> u64 {
    let out = store.nix_store(&["-q", "--size", path]);
    out.assert_success();
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("nix-store -q --size {path}: {e}:\n{out}"))
}

pub const ONE_GIB: Shape = Shape::OneFile(GIB);
pub const MANY_GIB: Shape = Shape::ManyFiles {
    count: 20_000,
    each: 53_687,
};
pub const ONE_100MIB: Shape = Shape::OneFile(100 * MIB);

/// The rows of one transfer result: throughput (P2/P3) and optionally peak RSS (P5).
pub fn transfer_rows(
    ctx: &Ctx,
    id: &str,
    dir: &str,
    shape: Shape,
    r: TransferResult,
    rss_key: Option<&str>,
    group: &str,
) -> Vec<Row> {
    let cpu = |s: &Samples| {
        s.median()
            .map(|m| format!("{m:.2} s"))
            .unwrap_or_else(|| "—".into())
    };
    let cpu_note = format!(
        "median hook CPU (user+sys, hook process only; ours relays through the supervisor on a warm session, Nix's through ssh, neither counted): ours {}, Nix's {}, with ControlPersist {}",
        cpu(&r.cpu_secs[OURS]),
        cpu(&r.cpu_secs[NIX]),
        cpu(&r.cpu_secs[PERSIST])
    );
    let mut rows = Vec::new();
    if !id.is_empty() {
        let base = baseline_note(&r.mbps, "MB/s");
        let mut it = r.mbps.into_iter();
        let (ours, nix, persist) = (it.next(), it.next(), it.next());
        rows.push(Row {
            key: format!("{id} {}", shape.label()),
            what: format!("closure {dir}, ssh://: NAR size / wall time of nix-build"),
            unit: "MB/s",
            ours: ours.unwrap_or_default(),
            nix,
            persist,
            floor: None,
            goal: Goal::RatioAtLeast(1.2),
            note: format!(
                "NAR {} bytes; MB = 10^6 bytes; ratio of throughputs; {cpu_note}{base}",
                r.nar_size
            ),
            command: ctx.command(group),
        });
    }
    if let Some(key) = rss_key {
        let mut it = r.rss_mib.into_iter();
        let (ours, nix) = (it.next(), it.next());
        rows.push(Row {
            key: key.to_owned(),
            what: format!("hook peak RSS (VmHWM) during the {dir} of {}", shape.label()),
            unit: "MiB",
            ours: ours.unwrap_or_default(),
            nix,
            persist: None,
            floor: None,
            goal: Goal::AbsAtMost(15.0),
            note: "hook process alone, sampled every 5 ms (Nix's hook runs ssh as a separate process, not counted; ours relays through the supervisor on a warm session, not counted either)".into(),
            command: ctx.command(group),
        });
    }
    rows
}

// ------------------------------------------------------------------------------------------------
// P5: supervisor idle RSS

/// Starts `nix-lazy-builder supervise` with one lazy (command) builder that is never booted,
/// and reads its RSS once a second while it idles.
pub fn supervisor_idle(ctx: &Ctx) -> Row {
    let dir = ctx.dir.join("supervisor");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let state = dir.join("state");
    let config = dir.join("lb.toml");
    let host_key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICT/aPpF9RiADUeMHD4QX1NbY3svFgk5WNFMSEq6P3wi";
    setup::write_file(
        &config,
        &format!(
            "[supervisor]\nstate-dir = \"{}\"\n\n[builders.idle]\nuri = \"ssh://root@127.0.0.1:1\"\n\
             systems = [\"aarch64-linux\"]\nmax-jobs = 2\nhost-key = \"{host_key}\"\n\
             idle-timeout = \"10m\"\nboot-timeout = \"10s\"\n\n[builders.idle.boot]\n\
             kind = \"command\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\n",
            state.display()
        ),
        0o644,
    );
    let log = fs::File::create(dir.join("supervisor.out"))
        .unwrap_or_else(|e| panic!("supervisor log: {e}"));
    let log2 = log.try_clone().unwrap_or_else(|e| panic!("dup: {e}"));
    let mut child = std::process::Command::new(hook_binary())
        .arg("supervise")
        .arg("--config")
        .arg(&config)
        .env_remove("NIX_LAZY_BUILDER_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the supervisor: {e}"));
    let pid = child.id();
    let socket = state.join("supervisor.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            let text = fs::read_to_string(dir.join("supervisor.out")).unwrap_or_default();
            panic!("the supervisor exited ({status}) before listening:\n{text}");
        }
        assert!(Instant::now() < deadline, "no supervisor socket after 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    // One status round trip: it really serves.
    let status = crate::harness::run_command(
        std::process::Command::new(hook_binary())
            .args(["status", "--config"])
            .arg(&config),
        None,
        Duration::from_secs(30),
    );
    status.assert_success();
    assert!(status.stdout.contains("idle"), "{status}");
    let rss = supervisor_rss(pid, ctx.runs.max(5));
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if matches!(child.try_wait(), Ok(None)) {
        // SAFETY: as above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let _ = child.wait();
    Row::ours_only(
        "P5 supervisor idle",
        "supervisor RSS (VmRSS) while idle, one lazy builder down, after one status query",
        "MiB",
        rss,
        Goal::AbsAtMost(15.0),
        "read once a second; Nix has no counterpart".into(),
        ctx.command("P5"),
    )
}

// ------------------------------------------------------------------------------------------------
// P6

const P6_BUILDS: usize = 32;
const P6_BUILDERS: usize = 4;
const P6_MAX_JOBS: u32 = 2;
const P6_SLEEP: u32 = 2;

/// P6: 32 concurrent 2-second builds over 4 builders with max-jobs 2 each; and, once that is
/// done, the RSS of our supervisor holding those 4 builders' connections warm.
pub fn p6(ctx: &Ctx) -> Vec<Row> {
    let groups = ["nixrblda", "nixrbldb", "nixrbldc", "nixrbldd"];
    let remotes: Vec<RemoteStore> = groups
        .iter()
        .map(|g| {
            let mut o = RemoteOpts::new(Nix::Host);
            o.build_users_group = Some((*g).to_owned());
            RemoteStore::start(o)
        })
        .collect();
    assert_eq!(remotes.len(), P6_BUILDERS);
    let refs: Vec<&RemoteStore> = remotes.iter().collect();
    let hooks = contestants();
    let daemons: Vec<LocalDaemon> = hooks
        .iter()
        .map(|&hook| {
            setup::daemon(&DaemonSpec {
                max_jobs: P6_MAX_JOBS,
                ..DaemonSpec::new(hook, &refs, Scheme::Ssh, &ctx.dir)
            })
        })
        .collect();
    let mut samples = per_hook(hooks.len());
    let mut peaks: Vec<Vec<usize>> = hooks.iter().map(|_| Vec::new()).collect();
    for i in 0..ctx.runs {
        for h in order(i, hooks.len()) {
            let hook = hooks[h];
            let d = &daemons[h];
            let seed = format!("{}-{i}", hook.label());
            let (secs, per_builder) = p6_once(d, &remotes, &seed);
            progress(&format!(
                "P6 {} run {}: {secs:.2} s, most builds at once per builder: {per_builder:?}",
                hook.label(),
                i + 1
            ));
            samples[h].push(secs);
            peaks[h].extend(per_builder);
        }
    }
    let limit = P6_MAX_JOBS as usize;
    let worst = |v: &Vec<usize>| v.iter().copied().max().unwrap_or(0);
    let ok = peaks.iter().all(|v| worst(v) <= limit);
    let note = format!(
        "all {P6_BUILDS} succeeded every run; most builds running at once on one builder: ours {}, Nix's {}, with ControlPersist {} (from each build's start/end in /proc/uptime); ideal ≈ {} s{}",
        worst(&peaks[OURS]),
        worst(&peaks[NIX]),
        worst(&peaks[PERSIST]),
        P6_BUILDS / (P6_BUILDERS * limit) * P6_SLEEP as usize,
        baseline_note(&samples, "s"),
    );
    let warm = warm_supervisor(ctx, &daemons[OURS], &remotes);
    let mut it = samples.into_iter();
    let (ours, nix, persist) = (it.next(), it.next(), it.next());
    vec![
        Row {
            key: "P6".into(),
            what: format!(
                "{P6_BUILDS} concurrent {P6_SLEEP}-s builds over {P6_BUILDERS} builders, max-jobs {P6_MAX_JOBS} each (wall time of nix-build)"
            ),
            unit: "s",
            ours: ours.unwrap_or_default(),
            nix,
            persist,
            floor: None,
            goal: Goal::Checked {
                text: format!("all succeed; ≤ {limit} at once per builder; time vs Nix"),
                met: ok,
            },
            note,
            command: ctx.command("P6"),
        },
        warm,
    ]
}

/// The pid of the supervisor our hook started under `daemon` (for row `key`'s memory figures).
pub(crate) fn supervisor_pid(daemon: &LocalDaemon, key: &str) -> u32 {
    daemon
        .processes()
        .into_iter()
        .find(|(_, argv)| argv.iter().any(|a| a == "supervise"))
        .map(|(p, _)| p)
        .unwrap_or_else(|| panic!("{key}: our hook started no supervisor"))
}

/// Our supervisor's RSS once P6 is over: it holds the 4 builders' connections warm, each
/// with its sessions ready (max-jobs 2: 3 each). Read once a second.
fn warm_supervisor(ctx: &Ctx, daemon: &LocalDaemon, remotes: &[RemoteStore]) -> Row {
    let pid = supervisor_pid(daemon, "P6");
    let status = daemon.client(
        &crate::harness::lazy_binary().to_string_lossy(),
        &["status", "--json"],
    );
    status.assert_success();
    let list: Vec<nix_lazy_builder::supervisor::proto::BuilderStatus> =
        serde_json::from_str(&status.stdout).unwrap_or_else(|e| panic!("status: {e}\n{status}"));
    let warm: Vec<_> = list.iter().filter_map(|s| s.warm.as_ref()).collect();
    let sessions: u32 = warm.iter().map(|w| w.ready + w.in_use).sum();
    assert_eq!(
        warm.iter().filter(|w| w.connected).count(),
        remotes.len(),
        "P6: not every builder is warm: {list:?}"
    );
    let rss = supervisor_rss(pid, ctx.runs.max(5));
    let goal = 15.0 + remotes.len() as f64;
    Row::ours_only(
        "P5 supervisor, 4 warm builders",
        &format!(
            "supervisor RSS (VmRSS) holding {} builders' SSH connections warm ({sessions} sessions ready), after P6",
            remotes.len()
        ),
        "MiB",
        rss,
        Goal::AbsAtMost(goal),
        format!(
            "goal: 15 MiB idle + 1 MiB per warm connection; read once a second; after {} P6 runs relayed through it; Nix has no counterpart (its ControlPersist masters are one ssh process per builder)",
            ctx.runs
        ),
        ctx.command("P6"),
    )
}

/// The supervisor `pid`'s resident memory (`VmRSS`, MiB), read `n` times a second apart.
fn supervisor_rss(pid: u32, n: usize) -> Samples {
    let mut rss = Samples::new();
    for _ in 0..n {
        std::thread::sleep(Duration::from_secs(1));
        rss.push(crate::rss::vm_rss(pid).unwrap_or_else(|| panic!("the supervisor {pid} is gone")));
    }
    rss
}

/// One P6 run: returns the wall time and, per builder, the most builds that ran at once.
fn p6_once(daemon: &LocalDaemon, remotes: &[RemoteStore], seed: &str) -> (f64, Vec<usize>) {
    let input = DrvExpr::sh(
        &format!("nlb-bench-p6-input-{seed}"),
        "x86_64-linux",
        &format!("echo {seed} > $out"),
    )
    .prefer_local();
    let mk = DrvExpr::named_by(
        &format!("\"nlb-bench-p6-{seed}-${{toString i}}\""),
        "aarch64-linux",
        &format!(
            "read s x < /proc/uptime; sleep {P6_SLEEP}; read e x < /proc/uptime; echo $s $e > $out"
        ),
    )
    .inherit("input");
    let expr = format!(
        "let\n  input = {};\n  mk = i: {};\nin {{ inherit input; all = builtins.genList mk {P6_BUILDS}; }}\n",
        input.nix(),
        mk.nix()
    );
    let file = daemon.write_file(&format!("p6-{seed}.nix"), &expr);
    let f = file.to_string_lossy().into_owned();
    daemon
        .nix_build(&[&f, "-A", "input", "--max-jobs", "1"])
        .assert_success();
    let out = daemon.nix_build(&[&f, "-A", "all"]);
    out.assert_success();
    let outs = out.stdout_lines();
    assert_eq!(outs.len(), P6_BUILDS, "{out}");
    // Which builder built each output, and when its builder script ran.
    let mut per_builder = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (b, r) in remotes.iter().enumerate() {
        let invalid = r.invalid_among(&outs);
        let mut intervals = Vec::new();
        for o in outs.iter().filter(|o| !invalid.contains(o)) {
            *seen.entry(o.clone()).or_insert(0) += 1;
            let host = daemon.host_path(o);
            let text = fs::read_to_string(&host)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", host.display()));
            let mut w = text.split_whitespace().map(|x| x.parse::<f64>());
            match (w.next(), w.next()) {
                (Some(Ok(s)), Some(Ok(e))) => intervals.push((s, e)),
                _ => panic!("{o} on builder {b}: bad timestamps {text:?}"),
            }
        }
        per_builder.push(max_overlap(&intervals));
    }
    for o in &outs {
        assert_eq!(seen.get(o), Some(&1), "{o} is not on exactly one builder");
    }
    (out.elapsed.as_secs_f64(), per_builder)
}

/// Self-checks run by `cargo test --benches` (see `main`).
pub fn self_test() {
    assert_eq!(max_overlap(&[]), 0);
    assert_eq!(max_overlap(&[(0.0, 1.0)]), 1);
    assert_eq!(
        max_overlap(&[(0.0, 1.0), (1.0, 2.0)]),
        1,
        "touching is not overlapping"
    );
    assert_eq!(max_overlap(&[(0.0, 2.0), (1.0, 3.0), (1.5, 1.7)]), 3);
    assert_eq!(max_overlap(&[(0.0, 2.0), (1.0, 3.0), (2.5, 4.0)]), 2);
    let mut a = [0u8; 13];
    let mut b = [0u8; 13];
    XorShift(1).fill(&mut a);
    XorShift(1).fill(&mut b);
    assert_eq!(a, b, "deterministic");
    assert!(a.iter().any(|&x| x != 0));
    assert_eq!(ONE_GIB.label(), "1 file of 1 GiB");
    assert_eq!(ONE_100MIB.label(), "1 file of 100 MiB");
    assert_eq!(MANY_GIB.label(), "20000 files, 1.0 GiB");
    assert_eq!(order(0, 3), [0, 1, 2]);
    assert_eq!(order(1, 3), [1, 2, 0]);
    assert_eq!(order(5, 3), [2, 0, 1]);
    assert_eq!(
        contestants()[..3],
        [Hook::Ours, Hook::Nix, Hook::NixPersist]
    );
}
