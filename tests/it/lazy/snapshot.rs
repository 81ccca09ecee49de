//! `snapshot = true` end to end, through a real nix-daemon, our hook and the supervisor
//! (which knows nothing of snapshots yet: the qemu backend restores behind the same
//! start/ready calls): the aarch64 image of examples/vm/make-image builds an `aarch64-linux`
//! derivation after a cold boot (which makes the snapshot), is stopped when idle, and builds
//! the next two after restores. Each output must have run on aarch64 with its input. Prints
//! the time from `nix-build` to the build's first log line at the client, cold and restored.
//!
//! VM tests take the same cross-process lock as `boot::qemu`.

use std::time::Duration;

use crate::harness::boot;
use crate::harness::*;
use nix_lazy_builder::supervisor::proto::State;

const BUILDER: &str = "vm-aarch64";

#[test]
fn qemu_aarch64_builds_cold_then_restored_after_idle_stops() {
    let _one_vm = boot::one_vm_test_at_a_time_blocking();
    let img = boot::vm_image("aarch64");
    let toml = boot::set_key(img.toml.clone(), "snapshot", "true");
    let cfg = LazyConfig::write(&[with_builder_keys(
        &toml,
        BUILDER,
        "idle-timeout = \"2s\"\nboot-timeout = \"3m\"",
    )]);
    let _no_leftover_vm = KillMentioning(cfg.state_dir());
    let daemon = LocalDaemon::start(cfg.daemon_opts(Duration::from_secs(120)));
    let snapshot_dir = cfg
        .state_dir()
        .join("builders")
        .join(BUILDER)
        .join("snapshot");
    let mut firsts = Vec::new();
    for run in 0..3 {
        let name = format!("lazy-snapshot-{run}");
        let file = daemon.write_file(&format!("{name}.nix"), &uname_expr(&name));
        let file = file.to_string_lossy().into_owned();
        let input = daemon.nix_build(&[&file, "-A", "input"]);
        input.assert_success();
        let input = input.stdout.trim().to_owned();
        let (out, lines) = nix_build_streaming(&daemon, &[&file, "-A", "main"]);
        out.assert_success();
        let path = out.stdout.trim().to_owned();
        assert_eq!(
            std::fs::read_to_string(daemon.host_path(&path)).expect("the output"),
            format!("aarch64\npayload-of-{name}\n{input}\n"),
            "the build did not run on aarch64 with its input"
        );
        let first = lines
            .iter()
            .find(|l| l.text == format!("nlb-vm {name}: building"))
            .unwrap_or_else(|| panic!("no build log line at the client:\n{out}"))
            .at;
        let log = cfg.supervisor_log();
        let restored = log.matches("restored from the snapshot").count();
        eprintln!(
            "run {run}: first build log line after {first:.2?} (restores so far: {restored})"
        );
        assert_eq!(restored, run, "{log}");
        assert!(
            snapshot_dir.join("meta.json").exists(),
            "no snapshot after run {run}:\n{log}"
        );
        firsts.push(first);
        let st = cfg.wait_for_state(&daemon, BUILDER, State::Down, Duration::from_secs(60));
        assert_eq!(st.boots as usize, run + 1, "{st:?}");
        assert!(st.last_failure.is_none(), "{st:?}");
    }
    eprintln!(
        "first build log line: cold {:.2?}, restored {:.2?} and {:.2?}",
        firsts[0], firsts[1], firsts[2]
    );
    assert!(daemon.invalid_leftovers().is_empty());
}
