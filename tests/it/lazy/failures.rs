//! Failures that lead to the fix, driving the real binary: a guest whose kernel panics (real
//! QEMU, the aarch64 image of examples/vm/make-image told to run an init that exits, then to
//! boot without its initrd) is told by its panic and its console log, not by the console's
//! last line; a hung guest (real QEMU with its CPUs stopped) by "the guest did not answer",
//! `boot-timeout` and the console; a runner still building its store image (a stand-in script:
//! a real NixOS runner needs a Nix store this machine does not have) by what it printed last; a
//! build nothing retries says so and when to start it again; a config fixed right before a
//! request is the one the request sees; and a boot-timeout below the measured boot time is a
//! warning when the config is applied.
//!
//! VM tests take the one-VM-at-a-time lock. Must never leave a VM or a supervisor behind.

use std::time::{Duration, Instant};

use nix_lazy_builder::supervisor::proto::State;

use crate::harness::boot::{self, set_key};
use crate::harness::security::{Env, Supervisor};
use crate::harness::*;

const VM: &str = "vm-aarch64";

/// The aarch64 image's builder, with `settings` added and `boot_edit` applied to its text.
fn vm_config(
    img: &boot::VmImage,
    settings: &str,
    boot_edit: impl FnOnce(String) -> String,
) -> LazyConfig {
    LazyConfig::write(&[boot_edit(with_builder_keys(&img.toml, VM, settings))])
}

fn console(cfg: &LazyConfig) -> String {
    cfg.state_dir()
        .join("builders")
        .join(VM)
        .join("console.log")
        .display()
        .to_string()
}

/// The image's kernel command line with `extra` appended.
fn append(img: &boot::VmImage, extra: &str) -> String {
    let line = img
        .toml
        .lines()
        .find_map(|l| l.strip_prefix("append = "))
        .expect("the image's append line");
    let cmdline: String = serde_json::from_str(line).expect("a TOML basic string");
    toml_str(&format!("{cmdline} {extra}"))
}

#[test]
fn a_guest_that_panics_is_told_by_its_panic_and_the_console_log() {
    let _one_vm = boot::one_vm_test_at_a_time_blocking();
    let img = boot::vm_image("aarch64");
    // The guest's init exits at once: the kernel panics ("Attempted to kill init!"), and with
    // panic=-1 and -no-reboot QEMU exits.
    let cfg = vm_config(&img, "boot-timeout = \"2m\"\nidle-timeout = \"30s\"", |t| {
        set_key(
            set_key(t, "append", &append(&img, "rdinit=/bin/sh -- -c exit")),
            "accel",
            "\"tcg\"",
        )
    });
    let _no_leftover_vm = KillMentioning(cfg.state_dir());
    let mut opts = cfg.daemon_opts(Duration::from_secs(60));
    opts.max_jobs = 0;
    let daemon = LocalDaemon::start(opts);
    let paths = FakeDrv::new("lazy-panic").build_input(&daemon);
    let file = paths.file.to_string_lossy().into_owned();

    let out = daemon.nix_build(&[&file, "-A", "main.out"]);
    out.assert_failure();
    let console = console(&cfg);
    let said = out.one_line(&format!("warning: lazy builder '{VM}' did not boot: "));
    assert!(
        said.contains("qemu exited with status 0 before it was ready (after ")
            && said.ends_with(&format!(
                "): the guest's kernel panicked: Attempted to kill init! exitcode=0x00000000 \
                 (the guest's init exited); console: {console}"
            )),
        "{out}"
    );
    // The console's last line says nothing of the cause.
    let log = cfg.builder_log(VM, "console.log");
    let last = log
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    eprintln!("the console's last line: {last}");
    assert!(
        !last.contains("Attempted to kill init! exitcode=0x00000000 ("),
        "{last}"
    );
    // Nothing retries this build, and it says so.
    assert!(
        out.stderr.lines().any(|l| l.starts_with(&format!(
            "warning: no builder for aarch64-linux: '{VM}' failed recently ("
        )) && l.contains("and is not tried again for another ")
            && l.ends_with(&format!(
                "s or later, or boot '{VM}' at once with `nix-lazy-builder up {VM}`"
            ))
            && l.contains(". Nothing retries this build: it fails now; start it again in ")),
        "{out}"
    );
    assert!(!out.stderr.contains("retrying"), "{out}");

    // Without its initrd the kernel finds no root file system. (A changed boot setting
    // forgets the failure, so `up` boots it at once.)
    let no_initrd = std::fs::read_to_string(cfg.path())
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("initrd ="))
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    write(&cfg.path(), &no_initrd);
    std::thread::sleep(Duration::from_millis(300));
    let up = cfg.cli(&daemon, &["up", VM]);
    assert_eq!(up.code(), Some(1), "{up}");
    assert!(
        up.stderr.contains(&format!(
            "the guest's kernel panicked: VFS: Unable to mount root fs on unknown-block(0,0) \
             (it found no root file system: check initrd, disk and root= in append); console: \
             {console}"
        )),
        "{up}"
    );
    // Two failed boots, none that worked, counted apart.
    let st = cfg.status_of(&daemon, VM);
    assert_eq!(
        (st.boots, st.boots_ok, st.boots_failed),
        (2, 0, 2),
        "{st:?}"
    );
    let table = cfg.cli(&daemon, &["status"]);
    let lines = table.stdout_lines();
    assert!(
        lines[0].starts_with("BUILDER ")
            && lines[0].contains(" RUNNING BUILDS  BOOTS OK  BOOTS FAILED  WARM ")
            && lines[0].contains(" HAND-OUTS  SNAPSHOT  LAST FAILURE"),
        "{table}"
    );
    let row: Vec<&str> = lines
        .iter()
        .find(|l| l.starts_with(VM))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_else(|| panic!("{table}"));
    // BUILDER STATE PORT UPTIME IDLE RUNNING OK FAILED …
    assert_eq!(
        &row[..8],
        [VM, "failed", "-", "-", "-", "0", "0", "2"],
        "{table}"
    );
}

#[test]
fn qemus_own_error_and_a_guest_short_of_memory_are_named() {
    let _one_vm = boot::one_vm_test_at_a_time_blocking();
    let img = boot::vm_image("aarch64");
    // 64 MiB cannot even hold the 77 MB initrd: QEMU itself refuses, in qemu.log.
    let cfg = vm_config(
        &img,
        "boot-timeout = \"10s\"\nidle-timeout = \"30s\"",
        |t| set_key(set_key(t, "memory", "\"64M\""), "accel", "\"tcg\""),
    );
    let _no_leftover_vm = KillMentioning(cfg.state_dir());
    let daemon = LocalDaemon::start(cfg.daemon_opts(Duration::from_secs(60)));
    let up = cfg.cli(&daemon, &["up", VM]);
    assert_eq!(up.code(), Some(1), "{up}");
    let console = console(&cfg);
    assert!(
        up.stderr
            .contains("qemu exited with status 1 during boot (after ")
            && up.stderr.trim_end().ends_with(&format!(
                "): qemu-system-aarch64: could not load initrd '{}'; console: {console}",
                img.dir.join("initrd.cpio").display()
            )),
        "{up}"
    );
    // 160 MiB holds it, but not unpacked: the guest runs on without its SSH server, and its
    // console's cause is named rather than its last line.
    write(
        &cfg.path(),
        &std::fs::read_to_string(cfg.path())
            .unwrap()
            .replace("memory = \"64M\"", "memory = \"160M\""),
    );
    std::thread::sleep(Duration::from_millis(300));
    let up = cfg.cli(&daemon, &["up", VM]);
    assert_eq!(up.code(), Some(1), "{up}");
    assert!(
        up.stderr.contains(&format!(
            "its last output: 'the guest could not unpack its initrd: Initramfs unpacking \
             failed: write error (it did not fit in the guest's memory: raise memory)'; raise \
             boot-timeout (now 10s) if it is only slow; console: {console}"
        )),
        "{up}\n{}",
        cfg.builder_log(VM, "console.log")
    );
}

#[test]
fn a_hung_guest_is_the_guests_silence_with_boot_timeout_and_console() {
    let _one_vm = boot::one_vm_test_at_a_time_blocking();
    let img = boot::vm_image("aarch64");
    // `-S`: QEMU starts with the guest's CPUs stopped; its port forward still takes
    // connections, and nothing behind it ever answers.
    let cfg = vm_config(&img, "boot-timeout = \"6s\"\nidle-timeout = \"30s\"", |t| {
        set_key(set_key(t, "extra-args", "[\"-S\"]"), "accel", "\"tcg\"")
    });
    let _no_leftover_vm = KillMentioning(cfg.state_dir());
    let daemon = LocalDaemon::start(cfg.daemon_opts(Duration::from_secs(60)));
    let up = cfg.cli(&daemon, &["up", VM]);
    assert_eq!(up.code(), Some(1), "{up}");
    let err = up.stderr.trim();
    assert!(
        err.starts_with(&format!(
            "nix-lazy-builder: '{VM}' did not come up: the guest did not answer on SSH within \
             boot-timeout (waited "
        )) && err.contains("): QEMU's port forward 127.0.0.1:")
            && err.ends_with(&format!(
                " took the connections, but nothing in the guest answered behind it; its logs \
                 are empty; raise boot-timeout (now 6s) if it is only slow; console: {}",
                console(&cfg)
            )),
        "{up}"
    );
    assert!(!err.contains("connected, but"), "{up}");
}

#[test]
fn a_runner_still_building_its_store_image_at_boot_timeout_says_so() {
    // Stand-in for a NixOS VM runner with useNixStoreImage: it prints what that runner prints
    // before it starts QEMU, then takes longer than the boot-timeout (a real one needs a Nix
    // store and nixpkgs this machine does not have).
    let env = Env::new();
    let runner = env.path("run-builder-vm");
    write(
        &runner,
        "#!/bin/sh\necho 'Creating Nix store image...'\nexec sleep 600\n",
    );
    set_mode(&runner, 0o755);
    env.write_config(&format!(
        "[builders.nixos]\nuri = \"ssh://root@127.0.0.1:2\"\nsystems = [\"aarch64-linux\"]\n\
         host-key = \"{}\"\nboot-timeout = \"3s\"\n[builders.nixos.boot]\nkind = \"qemu\"\n\
         runner = \"{}\"\n",
        crate::harness::security::impostor_key(env.dir.path()),
        runner.display()
    ));
    let sup = Supervisor::start(&env, &[]);
    let out = env.cli(&["up", "nixos"], &[]);
    assert_eq!(out.code(), Some(1), "{out}\n{}", sup.output());
    assert_eq!(
        out.stderr.trim(),
        format!(
            "nix-lazy-builder: 'nixos' did not come up: boot timed out after 3s while starting; \
             its last output: 'Creating Nix store image...'; raise boot-timeout (now 3s) if it \
             is only slow; console: {}",
            env.path("lazy-state/sup/builders/nixos/console.log")
                .display()
        ),
        "{}",
        sup.output()
    );
    drop(sup);
}

#[test]
fn a_config_fixed_right_before_a_request_is_the_one_it_sees() {
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let env = Env::new();
    let good = remote.delayed_command_builder("cmd", Duration::ZERO, "boot-timeout = \"30s\"");
    let broken = good.replacen("\"/usr/bin/env\"", "\"/nonexistent/start-vm\"", 1);
    env.write_config(&broken);
    let sup = Supervisor::start(&env, &[]);
    let up = env.cli(&["up", "cmd"], &[]);
    assert_eq!(up.code(), Some(1), "{up}");
    assert!(
        up.stderr.contains(
            "boot command /nonexistent/start-vm not found: /nonexistent/start-vm does not exist"
        ),
        "{up}"
    );

    // Fixed, and asked at once (well within the 200 ms an edit is given to settle, which the
    // supervisor waits out rather than answer with the broken file's failure).
    std::thread::sleep(Duration::from_millis(50));
    env.write_config(&good);
    let written = Instant::now();
    let out = env.cli(&["status", "--json"], &[]);
    let answered = written.elapsed();
    out.assert_success();
    eprintln!("status answered {answered:?} after the fix");
    let list: Vec<nix_lazy_builder::supervisor::proto::BuilderStatus> =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    let st = list.into_iter().find(|s| s.name == "cmd").expect("cmd");
    assert_eq!(st.state, State::Down, "{st:?}\n{}", sup.output());
    assert!(st.last_failure.is_none(), "{st:?}");
    env.cli(&["up", "cmd"], &[]).assert_success();
    drop(sup);
    remote.kill_all();
}

#[test]
fn a_boot_timeout_below_the_measured_boot_time_is_warned_about() {
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let env = Env::new();
    let slow = |timeout: &str| {
        remote.delayed_command_builder(
            "cmd",
            Duration::from_secs(2),
            &format!("boot-timeout = \"{timeout}\""),
        )
    };
    env.write_config(&slow("60s"));
    let sup = Supervisor::start(&env, &[]);
    env.cli(&["up", "cmd"], &[]).assert_success();
    env.cli(&["down", "cmd"], &[]).assert_success();
    wait_until("the builder to stop", Duration::from_secs(30), || {
        !remote.listening()
    });
    env.write_config(&slow("1s"));
    std::thread::sleep(Duration::from_millis(300));
    let st = env.cli(&["status"], &[]);
    st.assert_success();
    let warning = st.stdout_line("warning: 'cmd': boot-timeout (1s) is below the ");
    assert!(
        warning.ends_with(" its recent boots took: its boots will time out; raise boot-timeout"),
        "{warning}"
    );
    let logged = sup.output();
    assert!(
        logged.lines().any(|l| l.contains("WARN")
            && l.contains("builder 'cmd': boot-timeout (1s) is below the ")
            && l.contains("its recent boots took (the median of the last 1): its boots will time out; raise boot-timeout")),
        "{logged}"
    );
    drop(sup);
    remote.kill_all();
}
