//! A real QEMU VM as a lazy builder, end to end: the aarch64 builder image from
//! examples/vm/make-image (Debian kernel + initramfs with dropbear and Nix 2.8), configured with
//! the image's own generated lazy-builder.toml (only the state directory and the timeouts
//! adapted). A real nix-daemon with our hook builds an `aarch64-linux` derivation whose builder
//! records `uname -m`: the supervisor boots the VM on demand (TCG on these x86_64 machines; the
//! test prints the accelerator the supervisor chose), the build really runs aarch64 code in it,
//! a second build reuses the running VM, and the VM is powered off after `idle-timeout`.
//!
//! Also measures the cold-start overhead (first build-log byte at the client minus the bare
//! boot-to-SSH time of the same VM); `measure_cold_start_overhead` repeats it, by hand.
//!
//! VM tests take the same cross-process lock as `boot::qemu` (one VM test at a time on
//! two cores).

use std::time::{Duration, Instant};

use nix_lazy_builder::supervisor::proto::State;

use crate::harness::boot;
use crate::harness::*;

const BUILDER: &str = "vm-aarch64";

/// Instantiates `uname_expr(name)` and builds its input locally; returns the expression file.
fn prepare(daemon: &LocalDaemon, name: &str) -> (String, String) {
    let file = daemon.write_file(&format!("{name}.nix"), &uname_expr(name));
    let file = file.to_string_lossy().into_owned();
    let input = daemon.nix_build(&[&file, "-A", "input"]);
    input.assert_success();
    (file, input.stdout.trim().to_owned())
}

/// Builds `main` of `file`; checks it ran on aarch64 with its input; returns the client's
/// timed stderr lines and when the build's first log line came.
fn build_on_vm(
    daemon: &LocalDaemon,
    file: &str,
    name: &str,
    input: &str,
) -> (CmdOutput, Vec<TimedLine>, Duration) {
    let (out, lines) = nix_build_streaming(daemon, &[file, "-A", "main"]);
    out.assert_success();
    let path = out.stdout.trim().to_owned();
    let content = std::fs::read_to_string(daemon.host_path(&path)).expect("the output");
    assert_eq!(
        content,
        format!("aarch64\npayload-of-{name}\n{input}\n"),
        "the build did not run on aarch64 with its input"
    );
    assert_eq!(daemon.references(&path), vec![input.to_owned()]);
    let first = lines
        .iter()
        .find(|l| l.text == format!("nlb-vm {name}: building"))
        .unwrap_or_else(|| panic!("no build log line at the client:\n{out}"))
        .at;
    (out, lines, first)
}

/// `key=value` from the supervisor log's "qemu started" line (the last one).
fn qemu_started_field(log: &str, key: &str) -> Option<String> {
    let line = log.lines().rev().find(|l| l.contains("qemu started"))?;
    let rest = &line[line.find(&format!(" {key}="))? + key.len() + 2..];
    // `accel` is the last field and may contain spaces; the others are single words.
    Some(if key == "accel" {
        rest.trim().to_owned()
    } else {
        rest.split_whitespace().next()?.to_owned()
    })
}

#[test]
fn qemu_aarch64_vm_boots_on_demand_builds_and_powers_off_when_idle() {
    let LazyVm { cfg, daemon, .. } = &LazyVm::start(
        "aarch64",
        "idle-timeout = \"4s\"\nboot-timeout = \"3m\"",
        Duration::from_secs(60),
    );
    let (file1, input1) = prepare(daemon, "lazy-qemu-1");

    let (out1, lines1, first1) = build_on_vm(daemon, &file1, "lazy-qemu-1", &input1);
    let booting = lines1
        .iter()
        .find(|l| l.text.starts_with(&format!("booting builder '{BUILDER}'")))
        .unwrap_or_else(|| panic!("no boot progress line:\n{out1}"));
    assert!(booting.at < first1);
    assert!(out1.stderr.contains("on 'ssh://root@127.0.0.1'"), "{out1}");
    let log = cfg.supervisor_log();
    let accel = qemu_started_field(&log, "accel").unwrap_or_else(|| panic!("{log}"));
    let qemu: u32 = qemu_started_field(&log, "pid")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    eprintln!("QEMU aarch64 VM: accelerator used by the supervisor: {accel}");
    if std::env::consts::ARCH != "aarch64" {
        assert!(accel.starts_with("tcg"), "{accel}");
    }
    assert!(alive(qemu), "qemu {qemu} is not running");
    assert!(
        cfg.builder_log(BUILDER, "console.log")
            .contains("rc: vm-aarch64 up"),
        "no serial console in the builder's state dir"
    );
    let st = cfg.status_of(daemon, BUILDER);
    assert_eq!((st.state, st.boots), (State::Up, 1), "{st:?}");
    let port = st.ssh_port.expect("the forwarded port");
    let boot_ms = cfg.recorded_ms("builders", BUILDER)[0];
    eprintln!(
        "QEMU aarch64 VM: boot took {boot_ms} ms; first build log line at the client {first1:.2?} after nix-build started ({:.2?} over the boot; no boot history yet, so the first try postponed)",
        first1.saturating_sub(Duration::from_millis(boot_ms))
    );

    // A second build while it is up reuses it.
    let (file2, input2) = prepare(daemon, "lazy-qemu-2");
    let (out2, _, first2) = build_on_vm(daemon, &file2, "lazy-qemu-2", &input2);
    assert!(!out2.stderr.contains("booting builder"), "{out2}");
    let done = Instant::now();
    eprintln!("QEMU aarch64 VM: a build on the running VM: first log line after {first2:.2?}");
    let st = cfg.status_of(daemon, BUILDER);
    assert_eq!(
        (st.state, st.boots, st.ssh_port),
        (State::Up, 1, Some(port)),
        "{st:?}"
    );
    assert!(alive(qemu));

    // Powered off once idle: the qemu process is gone, the port closed, status down.
    wait_until("the VM's idle power-off", Duration::from_secs(60), || {
        !alive(qemu)
    });
    let off = done.elapsed();
    eprintln!("QEMU aarch64 VM: powered off {off:.2?} after the last build");
    assert!(off >= Duration::from_millis(3500), "{off:?}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still forwarded"
    );
    // (The supervisor hears of the end a moment after the process is gone.)
    let st = cfg.wait_for_state(daemon, BUILDER, State::Down, Duration::from_secs(10));
    assert_eq!(st.boots, 1, "{st:?}");
    assert!(st.last_failure.is_none(), "{st:?}");
    let log = cfg.supervisor_log();
    // No ACPI power button on aarch64 with Debian's cloud kernel: `poweroff` over SSH.
    assert!(log.contains("stopped by poweroff over SSH"), "{log}");
    assert!(daemon.invalid_leftovers().is_empty());
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[s.len() / 2]
}

/// The cold-start overhead over several runs (`NLB_COLD_RUNS`, default 3, plus a first run
/// without boot history): for each, a cold `nix-build` (VM down) timed to the build's first log
/// line at the client, then a bare `boot::start` + `wait_ready` of the same VM. Run by hand:
/// `cargo test --test it -- --ignored --nocapture lazy::qemu::measure_cold_start_overhead`.
#[test]
#[ignore = "measurement, run by hand"]
fn measure_cold_start_overhead() {
    let runs = runs_from_env("NLB_COLD_RUNS", 3);
    let LazyVm { cfg, daemon, .. } = &LazyVm::start(
        "aarch64",
        "idle-timeout = \"1s\"\nboot-timeout = \"3m\"",
        Duration::from_secs(600),
    );
    // The same builder as the supervisor reads it, for the bare boots.
    let text = std::fs::read_to_string(cfg.path()).expect("the config");
    let builder = nix_lazy_builder::config::Config::parse(&text, &cfg.path())
        .expect("config")
        .builders
        .remove(0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut firsts = Vec::new();
    let mut bares = Vec::new();
    for run in 0..=runs {
        let name = format!("lazy-qemu-cold-{run}");
        let (file, input) = prepare(daemon, &name);
        let (_, _, first) = build_on_vm(daemon, &file, &name, &input);
        let history = cfg.recorded_ms("builders", BUILDER);
        wait_until("the VM to be down", Duration::from_secs(60), || {
            cfg.status_of(daemon, BUILDER).state == State::Down
        });
        // The same VM, booted bare.
        let bare = rt.block_on(async {
            let (_state, ctx) = boot::context(&builder);
            let t0 = Instant::now();
            let mut inst =
                nix_lazy_builder::boot::start(&builder.lazy.as_ref().expect("lazy").boot, &ctx)
                    .await
                    .expect("start");
            let port = inst.ssh_port().expect("port");
            nix_lazy_builder::boot::wait_ready(
                &builder,
                port,
                &mut inst,
                Instant::now() + Duration::from_secs(180),
            )
            .await
            .expect("ready");
            let took = t0.elapsed();
            inst.stop(nix_lazy_builder::boot::StopHow::forced()).await;
            took
        });
        eprintln!(
            "[measure] cold run {run}{}: first build log byte after {first:.2?}; the supervisor's boot took {} ms; bare boot-to-SSH {bare:.2?}; overhead {:.2?}",
            if run == 0 { " (no boot history)" } else { "" },
            history.last().copied().unwrap_or(0),
            first.saturating_sub(bare)
        );
        if run > 0 {
            firsts.push(first);
            bares.push(bare);
        }
    }
    let overheads: Vec<Duration> = firsts
        .iter()
        .zip(&bares)
        .map(|(f, b)| f.saturating_sub(*b))
        .collect();
    eprintln!(
        "[measure] QEMU aarch64 cold start over {runs} runs with boot history: median first build byte {:.2?}, median bare boot-to-SSH {:.2?}, median overhead {:.2?} (all: {:?})",
        median(&firsts),
        median(&bares),
        median(&overheads),
        overheads
    );
}
