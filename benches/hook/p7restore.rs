//! P7-restore: the same tiny aarch64 QEMU builder as P7, with `snapshot = true`, woken from
//! its snapshot instead of booted, side by side with cold boots of the same image in one run.
//!
//! Three real nix-daemons run our release hook, each with its own config and auto-started
//! supervisor: the image's builder as it is (`ssh://`, every boot cold: P7's); the same with
//! `snapshot = true`; and `snapshot = true` with `ssh-ng://` through `/sbin/nlb-relay` to the
//! guest's running nix-daemon (examples/vm/nlb-relay.c). With `NLB_BENCH_BASELINE`, a fourth
//! runs that build's hook with the second's config (before/after, in the first row's notes). All use `idle-timeout = "1s"`, so the
//! builder is asleep (powered off) before every run. Run 0 of each is a warm-up, not counted
//! (for a snapshot builder it is the cold boot that makes the snapshot). Then every run builds
//! a fresh `aarch64-linux` derivation on each, in rotating order; each output is checked to
//! have been built on aarch64 with its input, and each restore to have been counted as one by
//! the supervisor. Per build:
//!
//! - **first try → first build line**: from the start of the hook process (nix-daemon starts
//!   it for its first `try`; `/proc/PID/stat`'s start time, 10 ms resolution, against
//!   `CLOCK_BOOTTIME` taken as `nix-build` starts) to the build's first log line reaching the
//!   client. The figure of the first two rows;
//! - the first build line from `nix-build`'s start, and from the hook's "restoring builder …"
//!   line (what the user sees);
//! - the whole `nix-build`: the third row is restored ÷ cold (medians).
//!
//! Then memory, with the backend alone (`boot::start` + `boot::wait_ready` in this process, no
//! supervisor): one cold VM; one restore; two restores of the same snapshot at once (the
//! snapshot's files hard-linked into two state directories, so both map the same page
//! cache): QEMU's `Rss` and `Pss` (`/proc/PID/smaps_rollup`) 2 s after each is ready.
//!
//! Must never: report a figure when the image or QEMU is missing (the rows say what is
//! missing), run while another VM test runs (it takes the tests' VM lock), or leave a VM
//! behind (every process that names its state directories is killed on the way out).

use std::path::Path;
use std::time::{Duration, Instant};

use nix_lazy_builder::boot::{self, BootContext, BootKind, Instance, StopHow};
use nix_lazy_builder::config::{Builder, Config};
use nix_lazy_builder::supervisor::proto::State;

use crate::harness::boot::{VmImage, lock_exclusive, vm_lock_file};
use crate::harness::{
    Background, KillMentioning, LazyConfig, LocalDaemon, StoreQueries, is_hook_argv, uname_expr,
    wait_until, with_builder_keys,
};
use crate::p7;
use crate::report::{Goal, Row};
use crate::rows::Ctx;
use crate::rss::rss_pss;
use crate::stats::{Samples, fmt_num, fmt_samples};

const BUILDER: &str = "vm-aarch64";

pub const KEY: &str = "P7-restore";
pub const KEY_RELAY: &str = "P7-restore relay";
pub const KEY_TOTAL: &str = "P7-restore nix-build";
pub const KEY_MEMORY: &str = "P7-restore memory";
const WHAT: &str = "sleeping snapshot builder (tiny QEMU aarch64): first `try` → first build line";
const WHAT_RELAY: &str = "the same through the guest's running nix-daemon (`ssh-ng://`, nlb-relay): first `try` → first build line";
const WHAT_TOTAL: &str =
    "whole `nix-build` on the sleeping builder: restored ÷ cold boot, same image, one run";
const WHAT_MEMORY: &str =
    "QEMU Rss after a restore; Pss with two restores of one snapshot, against a cold boot";
/// The restored nix-build's goal, as a fraction of the cold one's.
const TOTAL_GOAL: f64 = 0.4;

fn progress(what: &str) {
    eprintln!("[bench] {what}");
}

fn command() -> String {
    format!("cargo bench --bench hook -- {KEY}")
}

fn not_measured(why: &str) -> Vec<Row> {
    progress(&format!("{KEY} not measured: {why}"));
    [
        (KEY, WHAT, "s", Goal::AbsAtMost(1.5)),
        (KEY_RELAY, WHAT_RELAY, "s", Goal::AbsAtMost(1.5)),
        (KEY_TOTAL, WHAT_TOTAL, "s", Goal::Info),
        (KEY_MEMORY, WHAT_MEMORY, "MiB", Goal::Info),
    ]
    .into_iter()
    .map(|(key, what, unit, goal)| {
        let note = format!("NOT MEASURED: {why}");
        Row::ours_only(key, what, unit, Samples::new(), goal, note, command())
    })
    .collect()
}

/// The P7-restore rows: measured, or saying clearly why they could not be.
pub fn p7_restore(ctx: &Ctx) -> Vec<Row> {
    match p7::image() {
        Ok(img) => measure(ctx, &img),
        Err(why) => not_measured(&why),
    }
}

// ------------------------------------------------------------------------------------------------
// Clocks

fn boottime() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// When process `pid` started, on `CLOCK_BOOTTIME` (field 22 of `/proc/PID/stat`, in clock
/// ticks).
fn started_at(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = start_ticks(&stat)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// Field 22 of a `/proc/PID/stat` line. The command name may hold spaces and parentheses:
/// fields count from the last ')'.
fn start_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

// ------------------------------------------------------------------------------------------------
// One build

/// What one build of a sleeping builder showed.
struct Run {
    /// From the hook's start (the first `try`) to the first build line.
    from_try: Duration,
    /// From `nix-build`'s start.
    first: Duration,
    /// From the hook's "booting/restoring builder" line.
    from_progress: Duration,
    total: Duration,
}

/// The hook processes of `daemon`: ours, or those of the baseline build `exe`.
fn hook_pids(daemon: &LocalDaemon, exe: Option<&Path>) -> Vec<u32> {
    let Some(exe) = exe else {
        return daemon.hook_pids();
    };
    daemon
        .processes()
        .into_iter()
        .filter(|(p, _)| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == exe))
        .filter(|(_, argv)| is_hook_argv(argv))
        .map(|(p, _)| p)
        .collect()
}

fn build(daemon: &LocalDaemon, hook: Option<&Path>, name: &str, progress_line: &str) -> Run {
    let file = daemon.write_file(&format!("{name}.nix"), &uname_expr(name));
    let file = file.to_string_lossy().into_owned();
    let input = daemon.nix_build(&[&file, "-A", "input"]);
    input.assert_success();
    let input = input.stdout.trim().to_owned();
    let t_boot = boottime();
    let mut bg = Background::nix_build(daemon, &[file, "-A".into(), "main".into()]);
    // The hook nix-daemon starts for the first `try`.
    let mut hook_start = None;
    while hook_start.is_none() && !bg.is_finished() {
        hook_start = hook_pids(daemon, hook)
            .into_iter()
            .filter_map(started_at)
            .min();
        if hook_start.is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    while !bg.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The last lines may still be in the pipe.
    std::thread::sleep(Duration::from_millis(100));
    let first = bg.line_at(&format!("nlb-vm {name}: building"));
    let shown = bg.line_at(progress_line);
    let out = bg.finish(Duration::from_secs(300));
    out.assert_success();
    p7::check_output(daemon, &out, name, &input);
    let first = first.unwrap_or_else(|| panic!("no build log line at the client:\n{out}"));
    let shown = shown.unwrap_or_else(|| panic!("no line {progress_line:?} at the client:\n{out}"));
    assert!(shown < first, "{out}");
    let hook_start = hook_start.unwrap_or_else(|| panic!("no hook process was seen:\n{out}"));
    let from_try = first.saturating_sub(hook_start.saturating_sub(t_boot));
    if std::env::var_os("NLB_BENCH_P7_LINES").is_some() {
        eprintln!(
            "[bench] {KEY} {name}: hook started {:.3} s after nix-build",
            hook_start.saturating_sub(t_boot).as_secs_f64()
        );
        for l in out.stderr.lines() {
            eprintln!("[bench] {KEY} {name}  {l}");
        }
    }
    Run {
        from_try,
        first,
        from_progress: first.saturating_sub(shown),
        total: out.elapsed,
    }
}

// ------------------------------------------------------------------------------------------------
// Memory

fn private_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
}

async fn up(b: &Builder, dir: &Path) -> Instance {
    let ctx = BootContext::new(b, dir.to_path_buf());
    let spec = &b.lazy.as_ref().expect("a lazy builder").boot;
    let mut inst = boot::start(spec, &ctx)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let port = inst.ssh_port().expect("the forwarded port");
    boot::wait_ready(
        b,
        port,
        &mut inst,
        Instant::now() + Duration::from_secs(180),
    )
    .await
    .unwrap_or_else(|e| panic!("{}: not ready: {e}", dir.display()));
    inst
}

/// The snapshot of `from` (a builder state directory), hard-linked into the fresh state
/// directory `to`: the same files, so restores from both share their page cache.
fn link_snapshot(from: &Path, to: &Path) {
    private_dir(to);
    let src = from.join(boot::snapshot::DIR);
    let dst = to.join(boot::snapshot::DIR);
    private_dir(&dst);
    for e in std::fs::read_dir(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
        let e = e.expect("a directory entry");
        std::fs::hard_link(e.path(), dst.join(e.file_name()))
            .unwrap_or_else(|err| panic!("link {}: {err}", e.path().display()));
    }
}

struct Memory {
    cold: (f64, f64),
    one_restore: (f64, f64),
    two_restores: [(f64, f64); 2],
}

fn memory(
    rt: &tokio::runtime::Runtime,
    plain: &Builder,
    snap: &Builder,
    snapshot_of: &Path,
    dir: &Path,
) -> Memory {
    rt.block_on(async {
        // Settle: a ready guest still faults pages in for a moment.
        let settle = || tokio::time::sleep(Duration::from_secs(2));
        let cold_dir = dir.join("cold");
        private_dir(&cold_dir);
        let cold = up(plain, &cold_dir).await;
        assert_eq!(cold.boot_kind(), BootKind::Cold);
        settle().await;
        let cold_mem = rss_pss(cold.pid().expect("a pid"));
        cold.stop(StopHow::forced()).await;

        let (a, b) = (dir.join("restore-a"), dir.join("restore-b"));
        link_snapshot(snapshot_of, &a);
        link_snapshot(snapshot_of, &b);
        let first = up(snap, &a).await;
        assert_eq!(first.boot_kind(), BootKind::Restored, "{}", a.display());
        settle().await;
        let one = rss_pss(first.pid().expect("a pid"));
        let second = up(snap, &b).await;
        assert_eq!(second.boot_kind(), BootKind::Restored, "{}", b.display());
        settle().await;
        let two = [
            rss_pss(first.pid().expect("a pid")),
            rss_pss(second.pid().expect("a pid")),
        ];
        first.stop(StopHow::forced()).await;
        second.stop(StopHow::forced()).await;
        Memory {
            cold: cold_mem,
            one_restore: one,
            two_restores: two,
        }
    })
}

// ------------------------------------------------------------------------------------------------
// The measurement

/// The three builders of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// The image's builder as it is (`ssh://`, every boot cold): P7's.
    Cold,
    /// The same with `snapshot = true`.
    Restore,
    /// `snapshot = true` and `ssh-ng://` through `/sbin/nlb-relay` to the guest's running
    /// nix-daemon.
    Relay,
    /// [`Variant::Restore`] with the baseline build's hook (`NLB_BENCH_BASELINE`): before and
    /// after a change, in one run.
    Baseline,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Cold => "cold",
            Variant::Restore => "restore",
            Variant::Relay => "restore-relay",
            Variant::Baseline => "restore-baseline",
        }
    }
}

const RELAY_URI: &str = "ssh-ng://root@127.0.0.1?remote-program=/sbin/nlb-relay";

fn config(img: &VmImage, v: Variant) -> (LazyConfig, Builder) {
    let mut toml = img.toml.clone();
    if v != Variant::Cold {
        toml = toml.replace("# snapshot = true", "snapshot = true");
        assert!(
            toml.contains("\nsnapshot = true"),
            "the image's snippet has no `# snapshot = true` line to turn on:\n{toml}"
        );
    }
    if v == Variant::Relay {
        let plain = "uri = \"ssh://root@127.0.0.1\"";
        assert!(toml.contains(plain), "{toml}");
        toml = toml.replace(plain, &format!("uri = \"{RELAY_URI}\""));
    }
    let text = with_builder_keys(
        &toml,
        BUILDER,
        "idle-timeout = \"1s\"\nboot-timeout = \"3m\"",
    );
    let cfg = LazyConfig::write(std::slice::from_ref(&text));
    let builder = Config::parse(&text, &cfg.path())
        .unwrap_or_else(|e| panic!("config: {e}\n{text}"))
        .builders
        .remove(0);
    (cfg, builder)
}

/// The timings of the "restored from the snapshot" lines of the supervisor's log
/// (`running=… refreshed=… ready=…`, from QEMU's start), one per restore.
fn restore_lines(cfg: &LazyConfig) -> Vec<String> {
    cfg.supervisor_log()
        .lines()
        .filter(|l| l.contains("restored from the snapshot"))
        .map(|line| {
            ["running", "refreshed", "ready"]
                .iter()
                .filter_map(|k| {
                    let at = line.find(&format!(" {k}="))?;
                    let v = line[at + k.len() + 2..].split_whitespace().next()?;
                    Some(v.to_owned())
                })
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect()
}

/// How long each instance's warm-up at readiness took (its first warm session opened after
/// the readiness check answered: "… N.NNs after readiness" in the supervisor's "is up" lines),
/// or how it ended otherwise.
fn warm_up_lines(cfg: &LazyConfig) -> Vec<String> {
    cfg.supervisor_log()
        .lines()
        .filter(|l| l.contains(" is up after "))
        .map(|l| match l.find("s after readiness") {
            Some(end) => {
                let start = l[..end].rfind(' ').map_or(0, |i| i + 1);
                let how = if l.contains("first warm session is ready") {
                    ""
                } else {
                    " (no session)"
                };
                format!("{}s{how}", &l[start..end])
            }
            None => "none".to_owned(),
        })
        .collect()
}

fn wait_down(cfg: &LazyConfig, daemon: &LocalDaemon) {
    wait_until("the VM's idle power-off", Duration::from_secs(60), || {
        cfg.status_of(daemon, BUILDER).state == State::Down
    });
}

/// One variant's daemon, config and figures.
struct Series {
    v: Variant,
    cfg: LazyConfig,
    builder: Builder,
    daemon: LocalDaemon,
    from_try: Samples,
    first: Samples,
    from_progress: Samples,
    total: Samples,
    warmup: String,
    /// The baseline build's binary, for [`Variant::Baseline`].
    hook: Option<std::path::PathBuf>,
}

impl Series {
    fn run(&mut self, run: usize) {
        let st = self.cfg.status_of(&self.daemon, BUILDER);
        assert_eq!(st.state, State::Down, "the VM is not down: {st:?}");
        let restored_before = st.snapshot.as_ref().map_or(0, |s| s.restored);
        let name = format!("nlb-bench-p7r-{}-{run}", self.v.name());
        // Run 0 of a snapshot builder makes the snapshot: its boot is cold.
        let restoring = self.v != Variant::Cold && run > 0;
        let line = if restoring {
            "restoring builder '"
        } else {
            "booting builder '"
        };
        let r = build(&self.daemon, self.hook.as_deref(), &name, line);
        if restoring {
            let st = self.cfg.status_of(&self.daemon, BUILDER);
            let restored = st.snapshot.as_ref().map_or(0, |s| s.restored);
            assert_eq!(
                restored,
                restored_before + 1,
                "the build did not restore the VM: {st:?}\n{}",
                self.cfg.supervisor_log()
            );
        }
        wait_down(&self.cfg, &self.daemon);
        let what = match (self.v, run) {
            (Variant::Cold, _) => "cold".to_owned(),
            (v, 0) => format!("{}: make (cold + snapshot)", v.name()),
            (v, _) => v.name().to_owned(),
        };
        progress(&format!(
            "{KEY} run {run} {what}: first try → first build line {:.2} s (nix-build start → it {:.2} s, progress line → it {:.2} s), nix-build {:.2} s",
            r.from_try.as_secs_f64(),
            r.first.as_secs_f64(),
            r.from_progress.as_secs_f64(),
            r.total.as_secs_f64()
        ));
        if run == 0 {
            self.warmup = format!(
                "{what}: first try → first build line {} s, nix-build {} s",
                fmt_num(r.from_try.as_secs_f64()),
                fmt_num(r.total.as_secs_f64())
            );
            return;
        }
        self.from_try.push(r.from_try.as_secs_f64());
        self.first.push(r.first.as_secs_f64());
        self.from_progress.push(r.from_progress.as_secs_f64());
        self.total.push(r.total.as_secs_f64());
    }
}

fn measure(ctx: &Ctx, img: &VmImage) -> Vec<Row> {
    let _one_vm = lock_exclusive(&vm_lock_file(&ctx.host_tmp)).unwrap_or_else(|e| panic!("{e}"));
    let mem_dir = ctx.dir.join("p7-restore-memory");
    let baseline = crate::setup::baseline();
    let mut variants = vec![Variant::Cold, Variant::Restore, Variant::Relay];
    if baseline.is_some() {
        variants.push(Variant::Baseline);
    }
    let mut series: Vec<Series> = variants
        .into_iter()
        .map(|v| {
            let (cfg, builder) = config(img, v);
            let mut opts = cfg.daemon_opts(Duration::from_secs(600));
            if let (Variant::Baseline, Some(bin)) = (v, &baseline) {
                opts.build_hook = Some(bin.to_string_lossy().into_owned());
                if let Some(dir) = bin.parent() {
                    opts.expose.push(dir.to_path_buf());
                }
            }
            let daemon = LocalDaemon::start(opts);
            Series {
                v,
                cfg,
                builder,
                daemon,
                from_try: Samples::new(),
                first: Samples::new(),
                from_progress: Samples::new(),
                total: Samples::new(),
                warmup: String::new(),
                hook: baseline.clone().filter(|_| v == Variant::Baseline),
            }
        })
        .collect();
    let _no_leftover: Vec<KillMentioning> = series
        .iter()
        .map(|s| KillMentioning(s.cfg.state_dir()))
        .chain([KillMentioning(mem_dir.clone())])
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for run in 0..=ctx.runs {
        // Each variant goes first, second and third in turn.
        for k in 0..series.len() {
            let i = (k + run) % series.len();
            series[i].run(run);
        }
    }
    for s in &series {
        assert!(s.daemon.invalid_leftovers().is_empty());
    }
    let [cold, restore, relay] = [0, 1, 2].map(|i| &series[i]);
    let baseline_note = match (series.get(3), &baseline) {
        (Some(b), Some(bin)) => {
            let ratio = match (restore.from_try.median(), b.from_try.median()) {
                (Some(o), Some(x)) if x > 0.0 => fmt_num(o / x),
                _ => "—".to_owned(),
            };
            format!(
                "; baseline build ({}), same config, in the same runs: first try → first build line {}, nix-build {}, ours ÷ baseline {ratio}×",
                bin.display(),
                fmt_samples(&b.from_try, "s"),
                fmt_samples(&b.total, "s"),
            )
        }
        _ => String::new(),
    };

    progress(&format!(
        "{KEY}: memory (cold VM; one restore; two restores at once)"
    ));
    let snapshot_of = restore.cfg.state_dir().join("builders").join(BUILDER);
    let m = memory(&rt, &cold.builder, &restore.builder, &snapshot_of, &mem_dir);
    let _ = std::fs::remove_dir_all(&mem_dir);

    let ratio = |s: &Series| match (s.total.median(), cold.total.median()) {
        (Some(r), Some(c)) if c > 0.0 => Some(r / c),
        _ => None,
    };
    let ratio_text = |s: &Series| ratio(s).map_or_else(|| "—".to_owned(), fmt_num);
    let restores = |s: &Series| {
        format!(
            "the supervisor's restores (boot-times.json: to the readiness check's answer) {:?} ms, QEMU start → running/refreshed/ready {}, then the first warm session (each boot, run 0's first) {}",
            s.cfg.recorded_ms("restores", BUILDER),
            restore_lines(&s.cfg).join(", "),
            warm_up_lines(&s.cfg).join(", ")
        )
    };
    let mut mem = Samples::new();
    mem.push(m.one_restore.0);
    let mib = |v: f64| format!("{v:.0} MiB");
    vec![
        Row::ours_only(
            KEY,
            WHAT,
            "s",
            restore.from_try.clone(),
            Goal::AbsAtMost(1.5),
            format!(
                "the image's builder (`ssh://`: `nix-store --serve` per build) with `snapshot = true`; first try = the hook's start (nix-daemon starts it for the first `try`); from nix-build's start {}, from the client's 'restoring builder' line {}; {}; cold boots of the same image in the same runs: first try → first build line {}, from nix-build's start {}; run 0 not counted: {}; {}; accel tcg (aarch64 guest on x86_64){}",
                fmt_samples(&restore.first, "s"),
                fmt_samples(&restore.from_progress, "s"),
                restores(restore),
                fmt_samples(&cold.from_try, "s"),
                fmt_samples(&cold.first, "s"),
                restore.warmup,
                cold.warmup,
                baseline_note,
            ),
            command(),
        ),
        Row::ours_only(
            KEY_RELAY,
            WHAT_RELAY,
            "s",
            relay.from_try.clone(),
            Goal::AbsAtMost(1.5),
            format!(
                "`uri = \"{RELAY_URI}\"`, `snapshot = true`: the guest's nix-daemon (started at boot) is in the snapshot, reached through examples/vm/nlb-relay, so neither the readiness check nor the build starts a Nix program; from nix-build's start {}, from the 'restoring builder' line {}; {}; run 0 not counted: {}",
                fmt_samples(&relay.first, "s"),
                fmt_samples(&relay.from_progress, "s"),
                restores(relay),
                relay.warmup,
            ),
            command(),
        ),
        Row::ours_only(
            KEY_TOTAL,
            WHAT_TOTAL,
            "s",
            restore.total.clone(),
            Goal::Checked {
                text: format!("≤ {TOTAL_GOAL}× the cold one"),
                met: ratio(restore).is_some_and(|r| r <= TOTAL_GOAL),
            },
            format!(
                "restored (`ssh://`) {} vs cold {} in the same runs (rotating order): {}× the cold one; through the relay (`ssh-ng://`) {}: {}×",
                fmt_samples(&restore.total, "s"),
                fmt_samples(&cold.total, "s"),
                ratio_text(restore),
                fmt_samples(&relay.total, "s"),
                ratio_text(relay),
            ),
            command(),
        ),
        Row::ours_only(
            KEY_MEMORY,
            WHAT_MEMORY,
            "MiB",
            mem,
            Goal::Info,
            format!(
                "QEMU with 1 GiB of guest RAM, 2 s after ready: cold boot Rss {} / Pss {}; one restore Rss {} / Pss {}; two restores of one snapshot at once: Rss {} and {}, Pss {} and {}",
                mib(m.cold.0),
                mib(m.cold.1),
                mib(m.one_restore.0),
                mib(m.one_restore.1),
                mib(m.two_restores[0].0),
                mib(m.two_restores[1].0),
                mib(m.two_restores[0].1),
                mib(m.two_restores[1].1),
            ),
            command(),
        ),
    ]
}

/// Self-checks run by `cargo test --benches` (see `main`).
pub fn self_test() {
    let stat = "4242 (nix (lazy) builder) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 12345 19";
    assert_eq!(start_ticks(stat), Some(12345));
    assert_eq!(start_ticks("4242 (x"), None);
    assert!(started_at(std::process::id()).is_some_and(|t| t <= boottime()));
    let r = &not_measured("x")[0];
    assert!(
        r.line("now").starts_with(&format!(
            "| {KEY} | {WHAT} | — | — | — | — | — | ≤ 1.5 s | — | 0 |"
        )),
        "{}",
        r.line("now")
    );
}
