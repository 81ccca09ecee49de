//! P7: the cold-start overhead of a lazy QEMU builder, measured as tests/it/lazy/qemu.rs's
//! `measure_cold_start_overhead` does, so the two agree.
//!
//! The builder is the aarch64 VM image of examples/vm/make-image (Debian kernel + initramfs with
//! dropbear and Nix 2.8), configured with the image's own generated lazy-builder.toml (only the
//! state directory and the timeouts adapted: `idle-timeout = "1s"`). A real nix-daemon with our
//! release hook builds a fresh `aarch64-linux` derivation per run; the auto-started supervisor
//! boots the VM for it. Per run:
//!
//! 1. the VM is down (`status` says `down`); `nix-build` starts: **first** = from the start of
//!    `nix-build` to the build's first log line reaching the client (stderr), **total** = the
//!    whole `nix-build`;
//! 2. once the VM has powered itself off (idle), the same VM is booted bare, without supervisor,
//!    hook or daemon: **bare** = `boot::start` (QEMU spawned, QMP up, forwarded port known) +
//!    `boot::wait_ready` (SSH banner, handshake with the pinned host key, `nix-store
//!    --version`), the readiness the supervisor itself waits for before a build starts;
//! 3. P7 = first − bare: what the lazy path (hook, supervisor, `try` protocol, the remote build's
//!    own start) adds to a boot that cannot be avoided.
//!
//! Run 0 starts with an empty boot history (the supervisor guesses the boot time) and is
//! reported but not counted, as in the test.
//!
//! Must never: report a figure when the image or QEMU is missing (the row says what is missing
//! instead), run while another VM test runs (it takes the tests' VM lock), or leave a VM
//! behind (every process that names its state directories is killed on the way out).

use std::path::Path;
use std::time::{Duration, Instant};

use nix_lazy_builder::boot::{self, BootContext, StopHow};
use nix_lazy_builder::config::{Builder, Config};
use nix_lazy_builder::supervisor::proto::State;

use crate::harness::boot::{VmImage, lock_exclusive, try_vm_image, vm_lock_file};
use crate::harness::{
    CmdOutput, KillMentioning, LazyConfig, LocalDaemon, StoreQueries, nix_build_streaming,
    uname_expr, wait_until, with_builder_keys,
};
use crate::report::{Goal, Row};
use crate::rows::Ctx;
use crate::stats::{Samples, fmt_num, fmt_samples};

const ARCH: &str = "aarch64";
/// The builder the image's generated lazy-builder.toml snippet declares.
pub(crate) const BUILDER: &str = "vm-aarch64";
const QEMU: &str = "qemu-system-aarch64";

pub const KEY: &str = "P7";
const WHAT: &str = "cold start on the tiny QEMU builder: first build − bare boot-to-SSH";

fn progress(what: &str) {
    eprintln!("[bench] {what}");
}

/// The P7 row: measured, or saying clearly why it could not be.
pub fn p7(ctx: &Ctx) -> Row {
    match image() {
        Ok(img) => measure(ctx, &img),
        Err(why) => {
            progress(&format!("P7 not measured: {why}"));
            row(Samples::new(), format!("NOT MEASURED: {why}"))
        }
    }
}

fn row(ours: Samples, note: String) -> Row {
    Row::ours_only(
        KEY,
        WHAT,
        "s",
        ours,
        Goal::AbsAtMost(1.0),
        note,
        format!("cargo bench --bench hook -- {KEY}"),
    )
}

// ------------------------------------------------------------------------------------------------
// Prerequisites

/// QEMU on PATH, then the image made (or refreshed from make-image's cache, about a second)
/// by the tests' harness, where the VM tests find it, under the same lock.
pub(crate) fn image() -> Result<VmImage, String> {
    which::which(QEMU).map_err(|_| {
        format!("{QEMU} is not on PATH (Debian package qemu-system-arm; tests/env/provision.sh installs it)")
    })?;
    let t0 = Instant::now();
    let img = try_vm_image(ARCH)?;
    progress(&format!("P7: make-image {ARCH}: {:.1?}", t0.elapsed()));
    Ok(img)
}

// ------------------------------------------------------------------------------------------------
// The measurement

/// One cold build: (first build log line, whole nix-build), both from nix-build's start.
fn cold_build(daemon: &LocalDaemon, name: &str) -> (Duration, Duration) {
    let (file, input) = uname_with_input(daemon, name);
    let (out, lines) = nix_build_streaming(daemon, &[&file, "-A", "main"]);
    out.assert_success();
    check_output(daemon, &out, name, &input);
    let first = lines
        .iter()
        .find(|l| l.text == format!("nlb-vm {name}: building"))
        .unwrap_or_else(|| panic!("no build log line at the client:\n{out}"))
        .at;
    let booting = lines
        .iter()
        .find(|l| l.text.starts_with(&format!("booting builder '{BUILDER}'")))
        .unwrap_or_else(|| panic!("not a cold start (no boot progress line):\n{out}"));
    assert!(booting.at < first, "{out}");
    if std::env::var_os("NLB_BENCH_P7_LINES").is_some() {
        for l in &lines {
            eprintln!(
                "[bench] P7 {name} {:>8.3} s  {}",
                l.at.as_secs_f64(),
                l.text
            );
        }
    }
    (first, out.elapsed)
}

/// A fresh `uname` derivation `name` written beside the daemon, its small x86_64 input built
/// first (untimed): the file to build `-A main` from, and the input's store path.
pub(crate) fn uname_with_input(daemon: &LocalDaemon, name: &str) -> (String, String) {
    let file = daemon.write_file(&format!("{name}.nix"), &uname_expr(name));
    let file = file.to_string_lossy().into_owned();
    let input = daemon.nix_build(&[&file, "-A", "input"]);
    input.assert_success();
    (file, input.stdout.trim().to_owned())
}

/// The build ran on aarch64 with its input (not somewhere else, not from a cache).
pub(crate) fn check_output(daemon: &LocalDaemon, out: &CmdOutput, name: &str, input: &str) {
    let path = out.stdout.trim().to_owned();
    let host = daemon.host_path(&path);
    let content = std::fs::read_to_string(&host)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}\n{out}", host.display()));
    assert_eq!(
        content,
        format!("aarch64\npayload-of-{name}\n{input}\n"),
        "the build did not run on aarch64 with its input"
    );
}

/// The same VM booted bare: `boot::start` + `boot::wait_ready` (the test's definition), then
/// stopped at once. Returns the time and the accelerator QEMU ran with.
/// The guest's size as `builder`'s QEMU boot gives it ("1024 MiB, 2 vCPUs"), for the notes.
pub fn vm_shape(builder: &Builder) -> String {
    let Some(nix_lazy_builder::config::BootSpec::Qemu(q)) = builder.lazy.as_ref().map(|l| &l.boot)
    else {
        return "not a QEMU builder".to_owned();
    };
    let memory = q
        .memory_mib
        .map_or("QEMU's default memory".to_owned(), |m| format!("{m} MiB"));
    let cpus = q
        .cpus
        .map_or("QEMU's default vCPUs".to_owned(), |c| format!("{c} vCPUs"));
    format!("{memory}, {cpus}")
}

fn bare_boot(rt: &tokio::runtime::Runtime, builder: &Builder, dir: &Path) -> (Duration, String) {
    rt.block_on(async {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
        let ctx = BootContext::new(builder, dir.to_path_buf());
        let spec = &builder.lazy.as_ref().expect("a lazy builder").boot;
        let t0 = Instant::now();
        let mut inst = boot::start(spec, &ctx)
            .await
            .unwrap_or_else(|e| panic!("bare boot: {e}"));
        let port = inst.ssh_port().expect("the forwarded port");
        boot::wait_ready(
            builder,
            port,
            &mut inst,
            Instant::now() + Duration::from_secs(180),
        )
        .await
        .unwrap_or_else(|e| panic!("bare boot: not ready: {e}"));
        let took = t0.elapsed();
        let accel = inst
            .accel()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".to_owned());
        inst.stop(StopHow::forced()).await;
        (took, accel)
    })
}

fn measure(ctx: &Ctx, img: &VmImage) -> Row {
    let lock_path = vm_lock_file(&ctx.host_tmp);
    progress(&format!(
        "P7: waiting for the VM test lock {} (one VM at a time on the machine)",
        lock_path.display()
    ));
    let t_lock = Instant::now();
    let _one_vm = lock_exclusive(&lock_path).unwrap_or_else(|e| panic!("{e}"));
    if t_lock.elapsed() > Duration::from_secs(1) {
        progress(&format!(
            "P7: waited {:.1?} for the VM lock",
            t_lock.elapsed()
        ));
    }
    let text = with_builder_keys(
        &img.toml,
        BUILDER,
        "idle-timeout = \"1s\"\nboot-timeout = \"3m\"",
    );
    let cfg = LazyConfig::write(std::slice::from_ref(&text));
    let bare_dir = ctx.dir.join("p7-bare-state");
    let _no_leftover_vm = KillMentioning(cfg.state_dir());
    let _no_leftover_bare_vm = KillMentioning(bare_dir.clone());
    let builder = Config::parse(&text, &cfg.path())
        .unwrap_or_else(|e| panic!("config: {e}\n{text}"))
        .builders
        .remove(0);
    let daemon = LocalDaemon::start(cfg.daemon_opts(Duration::from_secs(600)));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut over, mut bares, mut firsts, mut totals) = (
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
    );
    // The supervisor's own record of each run's boot, and the first build line's lead over it.
    let (mut sup_boots, mut over_sup) = (Samples::new(), Samples::new());
    let mut first_run = String::new();
    let mut accel = String::new();
    for run in 0..=ctx.runs {
        let st = cfg.status_of(&daemon, BUILDER);
        assert_eq!(st.state, State::Down, "the VM is not down: {st:?}");
        let boots = st.boots;
        let (first, total) = cold_build(&daemon, &format!("nlb-bench-p7-{run}"));
        let st = cfg.status_of(&daemon, BUILDER);
        assert_eq!(st.boots, boots + 1, "the build did not boot the VM: {st:?}");
        wait_until("the VM's idle power-off", Duration::from_secs(60), || {
            cfg.status_of(&daemon, BUILDER).state == State::Down
        });
        let history = cfg.recorded_ms("builders", BUILDER);
        let (bare, a) = bare_boot(&rt, &builder, &bare_dir);
        accel = a;
        // As the test: `first.saturating_sub(bare)`.
        let o = first.saturating_sub(bare).as_secs_f64();
        let (f, b, t) = (first.as_secs_f64(), bare.as_secs_f64(), total.as_secs_f64());
        if run == 0 {
            progress(&format!(
                "P7 warm-up (no boot history): first build log line {f:.2} s, bare boot-to-SSH {b:.2} s, overhead {o:.2} s, nix-build {t:.2} s; supervisor's boot history {history:?} ms"
            ));
            first_run = format!(
                "{} s (first build line {} s, nix-build {} s)",
                fmt_num(o),
                fmt_num(f),
                fmt_num(t)
            );
        } else {
            progress(&format!(
                "P7 run {run}: first build log line {f:.2} s, bare boot-to-SSH {b:.2} s, overhead {o:.2} s, nix-build {t:.2} s; supervisor's boot history {history:?} ms"
            ));
            over.push(o);
            bares.push(b);
            firsts.push(f);
            totals.push(t);
            if let Some(&ms) = history.last() {
                let sup = ms as f64 / 1000.0;
                sup_boots.push(sup);
                over_sup.push(f - sup);
            }
        }
    }
    let accel = accel.split_whitespace().next().unwrap_or("unknown");
    let note = format!(
        "aarch64 VM of examples/vm/make-image, accel {accel}; bare boot-to-SSH {}; first build log line after nix-build starts {}; cold nix-build wall time {}; the supervisor's own boot in those runs (boot-times.json) {}, first build line minus it {}; run 0 (fresh state, no boot history) not counted: {first_run}; Nix has no counterpart",
        fmt_samples(&bares, "s"),
        fmt_samples(&firsts, "s"),
        fmt_samples(&totals, "s"),
        fmt_samples(&sup_boots, "s"),
        fmt_samples(&over_sup, "s"),
    );
    assert!(daemon.invalid_leftovers().is_empty());
    row(over, note)
}

/// Self-checks run by `cargo test --benches` (see `main`).
pub fn self_test() {
    let toml = "[builders.vm-aarch64]\nuri = \"ssh://root@127.0.0.1\"\n\n[builders.vm-aarch64.boot]\nkind = \"qemu\"\n";
    let t = with_builder_keys(toml, BUILDER, "idle-timeout = \"1s\"");
    assert_eq!(
        t,
        "[builders.vm-aarch64]\nuri = \"ssh://root@127.0.0.1\"\n\nidle-timeout = \"1s\"\n\n[builders.vm-aarch64.boot]\nkind = \"qemu\"\n"
    );
    let r = row(Samples::new(), "NOT MEASURED: x".into());
    let line = r.line("now");
    assert!(
        line.starts_with(&format!(
            "| P7 | {WHAT} | — | — | — | — | — | ≤ 1 s | — | 0 |"
        )),
        "{line}"
    );
}
