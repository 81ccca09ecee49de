//! `cargo bench --bench hook -- PROFILE` / `-- TRACE`: where our hook's time goes, for the P1,
//! P2, P3 and P4 workloads.
//!
//! PROFILE runs our hook under valgrind's callgrind (perf's hardware counters are not available
//! on these VMs): instruction counts per function, for `callgrind_annotate`. TRACE runs both
//! hooks under `strace -f -tt -T`: a wall-clock timeline of each hook and its children, which
//! shows the waits that instruction counts cannot. Output goes under cargo's target tmp dir.
//!
//! Owns only these diagnostic runs: the hook behind a wrapper that execs it under the tool as
//! the daemon's `build-hook` (P1–P3), and one P4 start-up under callgrind in the private
//! namespace. Must never write BENCHMARKS.md figures (the tools slow the hook down; only
//! instruction counts and the shape of timelines mean anything here).

use std::path::{Path, PathBuf};

use crate::harness::{FakeDrv, Nix, RemoteOpts, RemoteStore, Scheme, StoreQueries};
use crate::rows::{Ctx, MANY_GIB, ONE_100MIB, Shape, p2_expr, p3_expr};
use crate::setup::{self, DaemonSpec, Hook, Tool};

/// Where the output of `tool` goes.
pub fn out_dir(tool: Tool) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(tool.name())
}

pub fn run(ctx: &Ctx, tool: Tool) {
    // `NLB_BENCH_PROFILE_SHAPE=many`: the P2/P3 step moves 20,000 files (1 GiB) instead.
    let shape: Shape = match std::env::var("NLB_BENCH_PROFILE_SHAPE").as_deref() {
        Ok("many") => MANY_GIB,
        _ => ONE_100MIB,
    };
    let out = out_dir(tool);
    let _ = std::fs::remove_dir_all(&out);
    let hooks: &[Hook] = match tool {
        Tool::Callgrind => &[Hook::Ours],
        Tool::Strace | Tool::Perf => &[Hook::Ours, Hook::Nix],
    };
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    for &hook in hooks {
        for scheme in [Scheme::Ssh, Scheme::SshNg] {
            let dir = out.join(format!("p1-{}-{}", scheme.prefix(), hook.label()));
            mkdir(&dir);
            let d = setup::daemon(&DaemonSpec {
                profile: Some((tool, &dir)),
                ..DaemonSpec::new(hook, &[&remote], scheme, &ctx.dir)
            });
            for i in 0..2 {
                let drv = FakeDrv::new("nlb-bench-prof")
                    .with_seed(&format!("{}-{}-{i}", scheme.prefix(), hook.label()))
                    .with_log_lines(1);
                drv.build_input(&d);
                let (paths, o) = drv.build(&d, &[]);
                o.assert_success();
                assert!(d.is_valid(&paths.out));
                eprintln!(
                    "[{}] P1 {} {} build {i}: {:.2?}",
                    tool.name(),
                    scheme.prefix(),
                    hook.label(),
                    o.elapsed
                );
            }
        }
        // P2 and P3 with 100 MiB by default (1 GiB under callgrind would take many minutes).
        let dir = out.join(format!("p2-p3-{}", hook.label()));
        mkdir(&dir);
        let d = setup::daemon(&DaemonSpec {
            profile: Some((tool, &dir)),
            ..DaemonSpec::new(hook, &[&remote], Scheme::Ssh, &ctx.dir)
        });
        let tree = ctx.dir.join("prof-tree");
        if !tree.exists() {
            shape.write_tree(&tree);
        }
        let added = d.nix_store(&["--add", &tree.to_string_lossy()]);
        added.assert_success();
        let input = added.stdout.trim().to_owned();
        remote.nix_store(&["--gc"]).assert_success();
        let seed = format!("prof-{}", hook.label());
        let file = d.write_file("prof-p2.nix", &p2_expr(&seed, &input));
        let o = d.nix_build(&[&file.to_string_lossy()]);
        o.assert_success();
        assert!(remote.is_valid(&input));
        eprintln!(
            "[{}] P2 upload of {}, {}: {:.2?}",
            tool.name(),
            shape.label(),
            hook.label(),
            o.elapsed
        );
        let file = d.write_file("prof-p3.nix", &p3_expr(shape, &input));
        let f = file.to_string_lossy().into_owned();
        remote
            .run_nix("nix-build", &["--no-out-link", &f])
            .assert_success();
        // Twice: the second download into a store that just deleted the first copy is the
        // one the P3 rows mostly see.
        for i in 0..2 {
            let o = d.nix_build(&[&f]);
            o.assert_success();
            eprintln!(
                "[{}] P3 download {i} of {}, {}: {:.2?}",
                tool.name(),
                shape.label(),
                hook.label(),
                o.elapsed
            );
            let out = o.stdout.trim().to_owned();
            d.nix_store(&["--delete", &out]).assert_success();
        }
    }
    if tool == Tool::Callgrind {
        // P4 in the private namespace.
        let p4 = out.join("p4");
        mkdir(&p4);
        crate::p4::profile(&p4);
    }
    eprintln!("[{}] output in {}", tool.name(), out.display());
}

fn mkdir(p: &Path) {
    std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
}
