//! The `qemu` boot backend with real VMs: the aarch64 and x86_64 builder images made by
//! examples/vm/make-image (Debian kernel + initramfs with dropbear and Nix), under TCG here.
//! Boot → readiness (banner, pinned host key, `nix-store --version`) → commands over SSH →
//! stop, with the step that stopped it; the KVM probe and its fallback to TCG (KVM guests hang
//! or abort on these machines); port 0 with two VMs at once; a stand-in NixOS runner script; an
//! ephemeral disk; and the one-line errors of a VM that cannot start.
//!
//! VM tests take a lock (across test processes) so that only one of them runs at a time (two
//! cores).

use std::time::{Duration, Instant};

use nix_lazy_builder::boot::qemu::AccelChoice;
use nix_lazy_builder::boot::{self, BootError, Instance, StopHow, StopStep};
use nix_lazy_builder::config::{Accel, BootSpec, Builder};

use crate::harness::boot::*;
use crate::harness::*;

const READY_WITHIN: Duration = Duration::from_secs(180);

fn spec(b: &Builder) -> &BootSpec {
    &b.lazy.as_ref().expect("lazy builder").boot
}

fn console(ctx: &boot::BootContext) -> String {
    std::fs::read_to_string(ctx.dir.join("console.log")).unwrap_or_default()
}

fn qemu_log(ctx: &boot::BootContext) -> String {
    std::fs::read_to_string(ctx.dir.join("qemu.log")).unwrap_or_default()
}

/// Starts `b` and waits until it is ready; returns the instance, its port and the time from
/// the start call to readiness.
async fn boot_ready(b: &Builder, ctx: &boot::BootContext) -> (Instance, u16, Duration, String) {
    let t0 = Instant::now();
    let mut inst = boot::start(spec(b), ctx)
        .await
        .unwrap_or_else(|e| panic!("start: {e}\n--- qemu.log ---\n{}", qemu_log(ctx)));
    let port = inst
        .ssh_port()
        .expect("a qemu builder has a forwarded port");
    assert_ne!(port, 0, "port 0 must be resolved to the real port");
    let ready = boot::wait_ready(b, port, &mut inst, Instant::now() + READY_WITHIN)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "not ready: {e}\n--- console.log ---\n{}\n--- qemu.log ---\n{}",
                console(ctx),
                qemu_log(ctx)
            )
        });
    (inst, port, t0.elapsed(), ready.nix_version)
}

/// Whether this machine gives us /dev/kvm, seen by the test itself: the backend's own probe
/// (`boot::qemu::kvm_usable`) is part of what these tests check.
fn kvm_here() -> bool {
    let dev = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    dev.is_ok()
}

/// This project's CI machines: /dev/kvm is nested PVM, and KVM guests hang or abort.
/// The `arch` image's builder as configured, booted and ready in a state directory of its own
/// (under the one-VM-test lock, which `_held` keeps with the directory).
struct ReadyVm {
    _held: (VmLock, tempfile::TempDir),
    b: Builder,
    ctx: boot::BootContext,
    inst: Instance,
    port: u16,
    took: Duration,
    version: String,
}

impl ReadyVm {
    async fn boot(arch: &str) -> ReadyVm {
        let (one_vm, img) = vm_test(arch).await;
        let b = img.builder();
        let (state, ctx) = context(&b);
        let (inst, port, took, version) = boot_ready(&b, &ctx).await;
        ReadyVm {
            _held: (one_vm, state),
            b,
            ctx,
            inst,
            port,
            took,
            version,
        }
    }
}

fn kvm_known_broken_here() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

#[tokio::test]
async fn aarch64_vm_boots_answers_and_powers_off_over_ssh() {
    let vm = ReadyVm::boot("aarch64").await;
    let accel = vm.inst.accel().expect("qemu reports its accelerator");
    eprintln!(
        "aarch64: ready in {:?} on port {} with {accel}: {}",
        vm.took, vm.port, vm.version
    );
    if std::env::consts::ARCH != "aarch64" {
        assert_eq!(accel.accel, Some(Accel::Tcg), "{accel}");
        assert_eq!(accel.choice, AccelChoice::Auto, "{accel}");
    }
    assert!(vm.version.starts_with("nix-store (Nix) "), "{}", vm.version);
    assert_eq!(run_over_ssh(&vm.b, vm.port, "uname -m").await, "aarch64");
    assert!(
        console(&vm.ctx).contains("rc: vm-aarch64 up"),
        "serial console not in console.log:\n{}",
        console(&vm.ctx)
    );
    assert!(vm.ctx.dir.join("qmp.sock").exists());

    let pid = vm.inst.pid().unwrap();
    let report = vm.inst.stop(StopHow::graceful(Some(&vm.b))).await;
    eprintln!("aarch64: {report}");
    // No ACPI power button with Debian's arm64 cloud kernel: poweroff over SSH.
    assert_eq!(report.step, StopStep::SshPoweroff, "{report}");
    assert!(report.failed_steps.is_empty(), "{report}");
    assert!(report.took < Duration::from_secs(15), "{report}");
    assert!(!alive(pid), "qemu {pid} still there");
    assert!(!port_open(vm.port), "port {} still forwarded", vm.port);
    assert!(
        !vm.ctx.dir.join("qmp.sock").exists(),
        "QMP socket left behind"
    );
}

#[tokio::test]
async fn x86_64_auto_accel_probes_kvm_falls_back_and_powers_off_by_acpi() {
    let vm = ReadyVm::boot("x86_64").await;
    let accel = vm.inst.accel().unwrap();
    eprintln!(
        "x86_64: ready in {:?} on port {} with {accel}: {}",
        vm.took, vm.port, vm.version
    );
    if kvm_here() {
        // A probe happened, and its outcome decided the accelerator.
        match &accel.choice {
            AccelChoice::FellBack { tried, why } => {
                assert_eq!(*tried, Accel::Kvm);
                assert_eq!(accel.accel, Some(Accel::Tcg));
                assert!(!why.is_empty());
                let marker = std::fs::read_to_string(vm.ctx.dir.join("accel-probe")).unwrap();
                assert!(marker.starts_with("kvm: broken ("), "{marker}");
                // The failed KVM attempt's output was kept for a post-mortem.
                assert!(vm.ctx.dir.join("qemu.log.1").exists());
            }
            AccelChoice::ProbeOk { .. } => assert_eq!(accel.accel, Some(Accel::Kvm)),
            other => panic!("expected a KVM probe, got {other:?}"),
        }
        if kvm_known_broken_here() {
            assert!(
                matches!(accel.choice, AccelChoice::FellBack { .. }),
                "KVM is broken on this machine, yet: {accel}"
            );
        }
    } else {
        assert_eq!(
            (accel.accel, &accel.choice),
            (Some(Accel::Tcg), &AccelChoice::Auto)
        );
    }
    assert_eq!(run_over_ssh(&vm.b, vm.port, "uname -m").await, "x86_64");

    let pid = vm.inst.pid().unwrap();
    let report = vm.inst.stop(StopHow::graceful(Some(&vm.b))).await;
    eprintln!("x86_64: {report}");
    assert_eq!(report.step, StopStep::AcpiPowerdown, "{report}");
    assert!(report.exit.as_ref().unwrap().success(), "{report}");
    assert!(!alive(pid));
    assert!(!port_open(vm.port));
}

/// A KVM guest that hangs silently (default CPU model here) is caught by the probe's timeout;
/// the verdict is remembered, so the next boot goes straight to TCG.
#[tokio::test]
async fn silent_kvm_guest_is_caught_by_the_probe_and_remembered() {
    require_root();
    if !kvm_here() {
        // No provisioning can give a machine /dev/kvm. The other path, no KVM at all (TCG at
        // once, no probe), is what `x86_64_auto_accel_probes_kvm_falls_back_and_powers_off_by_acpi`
        // checks there.
        skipped(
            "boot::qemu::silent_kvm_guest_is_caught_by_the_probe_and_remembered",
            "the KVM probe's timeout and its remembered verdict",
            "no /dev/kvm that opens read-write on this machine",
        );
        return;
    }
    let (_one_vm, img) = vm_test("x86_64").await;
    let b = img.builder_with(|t| set_key(t, "cpu", "\"qemu64\""));
    let (_state, ctx) = context(&b);
    let t0 = Instant::now();
    let (inst, port, took, _) = boot_ready(&b, &ctx).await;
    let accel = inst.accel().unwrap();
    eprintln!("x86_64 (qemu64): ready in {took:?} with {accel}");
    if kvm_known_broken_here() {
        match &accel.choice {
            AccelChoice::FellBack {
                tried: Accel::Kvm,
                why,
            } => {
                assert!(
                    why.contains("no serial console output and no SSH banner within"),
                    "{why}"
                )
            }
            other => panic!("expected the probe to time out, got {other:?}"),
        }
        assert!(t0.elapsed() >= boot::qemu::PROBE_TIMEOUT);
    }
    assert_eq!(run_over_ssh(&b, port, "uname -m").await, "x86_64");
    inst.stop(StopHow::forced()).await;

    // Same state directory, same process: no second probe.
    let inst = boot::start(spec(&b), &ctx).await.expect("start again");
    let again = inst.accel().unwrap();
    eprintln!("second start: {again}");
    match (&accel.choice, &again.choice) {
        (
            AccelChoice::FellBack { .. },
            AccelChoice::KnownBroken {
                tried: Accel::Kvm, ..
            },
        ) => {
            assert_eq!(again.accel, Some(Accel::Tcg))
        }
        (AccelChoice::ProbeOk { .. }, AccelChoice::KnownGood { .. }) => {
            assert_eq!(again.accel, Some(Accel::Kvm))
        }
        other => panic!("verdict not remembered: {other:?}"),
    }
    let report = inst.stop(StopHow::forced()).await;
    assert_eq!(report.step, StopStep::QmpQuit, "{report}");
}

#[tokio::test]
async fn port_zero_gives_two_vms_different_ports() {
    let (_one_vm, img) = vm_test("x86_64").await;
    let b = img.builder_with(|t| set_key(t, "accel", "\"tcg\""));
    let (_s1, ctx1) = context(&b);
    let (_s2, ctx2) = context(&b);
    let (r1, r2) = tokio::join!(boot_ready(&b, &ctx1), boot_ready(&b, &ctx2));
    let (i1, p1, t1, _) = r1;
    let (i2, p2, t2, _) = r2;
    eprintln!("two x86_64 VMs at once: ports {p1} and {p2}, ready in {t1:?} and {t2:?}");
    assert_ne!(p1, p2);
    assert_eq!(i1.accel().unwrap().choice, AccelChoice::Configured);
    // Each port reaches its own VM: the VMs' hostnames are the same, their boot ids are not.
    let id1 = run_over_ssh(&b, p1, "cat /proc/sys/kernel/random/boot_id").await;
    let id2 = run_over_ssh(&b, p2, "cat /proc/sys/kernel/random/boot_id").await;
    assert_ne!(id1, id2);
    let (s1, s2) = tokio::join!(i1.stop(StopHow::forced()), i2.stop(StopHow::forced()));
    assert_eq!(
        (&s1.step, &s2.step),
        (&StopStep::QmpQuit, &StopStep::QmpQuit)
    );
}

/// A STAND-IN for a NixOS VM runner script (`system.build.vm`'s run-NAME-vm, or
/// `darwin.linux-builder`'s run-builder): it treats `QEMU_NET_OPTS` and `QEMU_OPTS` the way the
/// NixOS scripts do (the first appended to its `-netdev user,…` option, the second word-split
/// onto the end of QEMU's arguments) and, like a runner without graphics, puts the serial
/// console on stdout with `-nographic`. The real scripts need a Nix store path; this one boots
/// the make-image kernel and initramfs instead.
fn stand_in_runner(img: &VmImage, dir: &std::path::Path) -> std::path::PathBuf {
    let append = "console=ttyS0 quiet panic=-1 tsc=reliable no_timer_check i8042.noaux i8042.nokbd i8042.nopnp 8250.nr_uarts=1 cryptomgr.notests";
    let script = dir.join("run-builder-vm");
    std::fs::write(
        &script,
        format!(
            "#!/usr/bin/env bash\n\
             # STAND-IN for a NixOS VM runner (see tests/it/boot/qemu.rs).\n\
             set -e\n\
             exec qemu-system-x86_64 -name stand-in-runner -m 1024 -smp 2 -machine q35 -accel tcg -cpu max \\\n\
             \x20 -device virtio-rng-pci \\\n\
             \x20 -net nic,netdev=user.0,model=virtio \\\n\
             \x20 -netdev user,id=user.0,restrict=on,\"$QEMU_NET_OPTS\" \\\n\
             \x20 -kernel {k} -initrd {i} -append '{append}' \\\n\
             \x20 -nographic \\\n\
             \x20 $QEMU_OPTS \"$@\"\n",
            k = img.dir.join("vmlinuz").display(),
            i = img.dir.join("initrd.cpio").display(),
        ),
    )
    .unwrap();
    set_mode(&script, 0o755);
    script
}

#[tokio::test]
async fn runner_script_gets_qmp_and_the_port_forward_through_its_variables() {
    let (_one_vm, img) = vm_test("x86_64").await;
    let tmp = tempfile::tempdir().unwrap();
    let runner = stand_in_runner(&img, tmp.path());
    let b = img.builder_with(|t| {
        let t = [
            "kernel", "initrd", "append", "machine", "cpu", "accel", "binary",
        ]
        .iter()
        .fold(t, |t, k| drop_key(t, k));
        set_key(t, "runner", &toml_str(runner.to_str().unwrap()))
    });
    let (_state, ctx) = context(&b);
    let (inst, port, took, version) = boot_ready(&b, &ctx).await;
    let accel = inst.accel().unwrap();
    eprintln!("runner: ready in {took:?} on port {port} with {accel}: {version}");
    assert_eq!(accel.choice, AccelChoice::Runner);
    assert_eq!(accel.accel, Some(Accel::Tcg), "read back with query-kvm");
    // The serial console came through the runner's stdout.
    assert!(
        console(&ctx).contains("rc: vm-x86_64 up"),
        "{}",
        console(&ctx)
    );
    assert_eq!(run_over_ssh(&b, port, "uname -m").await, "x86_64");
    let report = inst.stop(StopHow::graceful(Some(&b))).await;
    eprintln!("runner: {report}");
    assert_eq!(report.step, StopStep::AcpiPowerdown, "{report}");
    assert!(!port_open(port));
}

#[tokio::test]
async fn ephemeral_disk_gets_a_throw_away_overlay() {
    let (_one_vm, img) = vm_test("x86_64").await;
    let tmp = tempfile::tempdir().unwrap();
    // A blank disk: the guest formats /dev/vda and mounts it on /nix. With `ephemeral` that
    // must happen in the overlay only.
    let disk = tmp.path().join("blank.raw");
    blank_disk(&disk);
    let b = img.builder_with(|t| {
        let t = set_key(t, "accel", "\"tcg\"");
        let t = set_key(t, "disk", &toml_str(disk.to_str().unwrap()));
        set_key(t, "ephemeral", "true")
    });
    let (_state, ctx) = context(&b);
    let (inst, port, _, _) = boot_ready(&b, &ctx).await;
    let mounts = run_over_ssh(
        &b,
        port,
        "grep ' /nix ' /proc/mounts; echo hi > /nix/written; sync",
    )
    .await;
    assert!(mounts.starts_with("/dev/vda /nix ext"), "{mounts}");
    assert!(ctx.dir.join("overlay.qcow2").exists());
    let report = inst.stop(StopHow::forced()).await;
    assert_eq!(report.step, StopStep::QmpQuit, "{report}");
    let bytes = std::fs::read(&disk).unwrap();
    assert!(
        bytes.iter().all(|&b| b == 0),
        "the ephemeral disk's base image was written to"
    );
    assert!(
        !ctx.dir.join("overlay.qcow2").exists(),
        "overlay left behind"
    );
}

/// Starts `b` in a state directory of its own, which must fail: the error.
async fn start_error(b: &Builder) -> BootError {
    let (_state, ctx) = context(b);
    boot::start(spec(b), &ctx).await.err().expect("must fail")
}

#[tokio::test]
async fn qemu_that_cannot_start_says_why_in_one_line() {
    require_root();
    let img = vm_image("x86_64");
    // An option QEMU does not know.
    let b = img.builder_with(|t| {
        let t = set_key(t, "accel", "\"tcg\"");
        set_key(t, "extra-args", "[\"-no-such-option\"]")
    });
    let err = start_error(&b).await;
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, BootError::Exited { .. }), "{err:?}");
    assert!(
        msg.starts_with("qemu exited with status 1 during boot"),
        "{msg}"
    );
    assert!(msg.contains("-no-such-option"), "{msg}");
    assert!(!msg.contains('\n'));

    // A fixed port that is already taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = taken.local_addr().unwrap().port();
    let b = img.builder_with(|t| {
        let t = set_key(t, "accel", "\"tcg\"");
        set_key(t, "ssh-port", &p.to_string())
    });
    let msg = start_error(&b).await.to_string();
    eprintln!("{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{p}-:22")), "{msg}");
    assert!(msg.contains("during boot"), "{msg}");

    // A kernel that is not there.
    let b = img.builder_with(|t| set_key(t, "kernel", "\"/nonexistent/vmlinuz\""));
    let msg = start_error(&b).await.to_string();
    assert_eq!(
        msg,
        "QEMU kernel not found: /nonexistent/vmlinuz does not exist"
    );
}

/// Boot-to-ready times, several runs per image. Run by hand:
/// `cargo test --test it -- --ignored --nocapture boot::qemu::measure_boot_to_ready`
/// (`NLB_BOOT_RUNS`, default 5).
#[tokio::test]
#[ignore = "measurement, run by hand"]
async fn measure_boot_to_ready() {
    require_root();
    let _one_vm = one_vm_test_at_a_time().await;
    let runs = runs_from_env("NLB_BOOT_RUNS", 5);
    for arch in ["x86_64", "aarch64"] {
        let img = vm_image(arch);
        // The probe is measured separately (x86_64 test); here TCG straight away.
        let b = img.builder_with(|t| set_key(t, "accel", "\"tcg\""));
        let mut times = Vec::new();
        let mut stops = Vec::new();
        for _ in 0..runs {
            let (_state, ctx) = context(&b);
            let (inst, _, took, _) = boot_ready(&b, &ctx).await;
            times.push(took);
            let r = inst.stop(StopHow::graceful(Some(&b))).await;
            stops.push(format!("{} {:.2}s", r.step, r.took.as_secs_f64()));
        }
        let mut sorted = times.clone();
        sorted.sort();
        eprintln!(
            "{arch}: boot-to-ready over {runs} runs: median {:.2}s, min {:.2}s, max {:.2}s; all: {:?}; stops: {:?}",
            sorted[runs / 2].as_secs_f64(),
            sorted[0].as_secs_f64(),
            sorted[runs - 1].as_secs_f64(),
            times
                .iter()
                .map(|t| format!("{:.2}", t.as_secs_f64()))
                .collect::<Vec<_>>(),
            stops
        );
    }
}
