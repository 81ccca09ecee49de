//! The external door to a lazy QEMU builder: the aarch64 image of examples/vm/make-image (TCG)
//! as a `kind = "qemu"` builder with a short idle timeout, behind the sid chroot's Nix 2.34
//! daemon whose `external-builders` runs our binary, and a supervisor started by hand in the
//! daemon's namespace.
//!
//! The sid chroot has no QEMU: the builder's `binary` is a two-line script that runs the host's
//! `qemu-system-aarch64` in the test's own mount namespace (`nsenter -m`, exec'd, so the pid the
//! supervisor holds is QEMU's), with every argument the qemu backend gives it. Everything else
//! (the backend's command line, port, readiness, stop) is the supervisor's own.
//!
//! Checks: the builder is down before the build and booted by it (the boot shows on the build
//! log); the aarch64 derivation ran in the VM (`uname -m`) with its x86_64 input copied there;
//! the output is valid locally with the input as its reference and the build's own log lines in
//! `nix-store -l`; the builder stops once idle, one boot in all, and no QEMU is left.
//!
//! VM tests take the same cross-process lock as `boot::qemu` (one VM test at a time).

use std::time::Duration;

use nix_lazy_builder::supervisor::proto::State;

use super::door::{build_socket, supervisor, with_external_builders};
use crate::harness::boot;
use crate::harness::*;

#[test]
fn an_aarch64_derivation_is_built_on_a_lazy_qemu_builder_through_external_builders() {
    let _lock = boot::one_vm_test_at_a_time_blocking();
    let img = boot::vm_image("aarch64");
    let name = "vm-aarch64";
    let bin_dir = scratch("nlb-ext-qemu-", &[]);
    set_mode(bin_dir.path(), 0o755);
    let wrapper = bin_dir.path().join("qemu-outside-the-chroot");
    write(
        &wrapper,
        &format!(
            "#!/bin/sh\nexec /usr/bin/nsenter -m -t {} -- /usr/bin/qemu-system-aarch64 \"$@\"\n",
            std::process::id()
        ),
    );
    set_mode(&wrapper, 0o755);
    let toml = boot::set_key(
        img.toml.clone(),
        "binary",
        &toml_str(&wrapper.to_string_lossy()),
    );
    let toml = with_builder_keys(&toml, name, "idle-timeout = \"5s\"\nboot-timeout = \"5m\"");
    let cfg = LazyConfig::write(&[toml]);
    let _no_leftover_vm = KillMentioning(cfg.state_dir());
    set_mode(cfg.dir.path(), 0o755);
    let mut opts = with_external_builders(cfg.daemon_opts(Duration::from_secs(300)));
    // Nix's own hook, with no machines: it declines, and the external builder is used.
    opts.build_hook = None;
    opts.expose.push(cfg.dir.path().to_path_buf());
    opts.expose.push(img.dir.clone());
    opts.expose.push(bin_dir.path().to_path_buf());
    opts.command_timeout = Duration::from_secs(600);
    let daemon = LocalDaemon::start(opts);
    let _supervisor = supervisor(&daemon, Some(&cfg.path()), &build_socket(&cfg));
    let st = cfg.status_of(&daemon, name);
    assert_eq!((st.state, st.boots), (State::Down, 0), "{st:?}");

    let file = daemon.write_file("ext-vm.nix", &uname_expr("ext-vm"));
    let f = file.to_string_lossy().into_owned();
    let t0 = std::time::Instant::now();
    let out = daemon.nix_build(&[&f, "-A", "main"]);
    let took = t0.elapsed();
    assert!(
        out.success(),
        "{out}\n--- supervisor ---\n{}",
        cfg.supervisor_log()
    );
    let p = out.stdout.trim().to_owned();
    assert!(daemon.is_valid(&p), "{p} is not valid\n{out}");
    let input = daemon.nix_build(&[&f, "-A", "input"]);
    input.assert_success();
    let input = input.stdout.trim().to_owned();
    let content =
        std::fs::read_to_string(daemon.host_path(&p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(
        content,
        format!("aarch64\npayload-of-ext-vm\n{input}\n"),
        "not built in the aarch64 VM with its input"
    );
    assert_eq!(daemon.references(&p), vec![input.clone()]);
    let drv = daemon.deriver(&p).expect("a deriver");
    let log = daemon.client("nix-store", &["-l", &drv]);
    assert!(log.stdout.contains("nlb-vm ext-vm: building"), "{log}");
    assert!(
        log.stdout.contains(&format!("booting builder '{name}'")),
        "{log}"
    );

    let up = cfg.status_of(&daemon, name);
    eprintln!(
        "build through external-builders with a cold TCG boot: {took:.2?}; then {:?}, uptime {:?} ms",
        up.state, up.uptime_ms
    );
    let st = cfg.wait_for_state(&daemon, name, State::Down, Duration::from_secs(60));
    assert_eq!(st.boots, 1, "{st:?}");
    assert!(st.last_failure.is_none(), "{st:?}");
    wait_until("QEMU gone", Duration::from_secs(30), || {
        processes_mentioning(&cfg.state_dir()).is_empty()
    });
    assert!(daemon.invalid_leftovers().is_empty());
}
