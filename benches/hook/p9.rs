//! P9: the strongest peer for a VM builder: Nix's own hook against the same tiny aarch64 QEMU
//! image kept running all the time, beside the image as our lazy builder, in one run.
//!
//! The image is P7's (examples/vm/make-image, run under TCG here). The bench boots one copy
//! itself, bare (`boot::start` + `boot::wait_ready`, the image's own settings, as P7's bare
//! boot), and leaves it up: the **always-on** VM. Nix 2.8's hook reaches its dropbear through
//! a machines line (`ssh://root@<alias>`, the image's client key and pinned host key; the
//! forwarded port comes from an OpenSSH client config, as P6 does, since Nix 2.8 takes no port
//! from the URI), once plain and once with ControlMaster/ControlPersist in `NIX_SSHOPTS`. Ours
//! is a real nix-daemon running our hook with the image's generated lazy-builder.toml
//! (`idle-timeout = "30s"`, `keep-warm` left at its default), booting its own copy on demand.
//! Three parts:
//!
//! 1. **warm build**: with both VMs up, P7's `uname` derivation (fresh each build, its small
//!    x86_64 input built locally first, untimed) built through each hook in turn, the order
//!    rotating; the first round is a warm-up (it boots ours). Whole-`nix-build` wall time; no
//!    floor (the host cannot build aarch64 itself).
//! 2. **idle memory**: once ours has stopped for idleness, what each keeps resident: ours the
//!    supervisor (no QEMU left), the always-on side QEMU (`Rss`, `Pss` in the note), plus the
//!    ControlPersist master ssh for that column.
//! 3. **first build after idle**: ours boots cold, the always-on VM just builds.
//!
//! Must never: give a figure when the image or QEMU is missing (the rows say NOT MEASURED and
//! why), count a build that did not run on aarch64 with its input or that ran on the other VM
//! (ours must not boot during part 1 and must boot for each build of part 3), or leave a VM or
//! an ssh master behind (both are killed by their directories on the way out).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use nix_lazy_builder::boot::{self, BootContext, Instance, StopHow};
use nix_lazy_builder::supervisor::proto::State;

use crate::harness::boot::{VmImage, lock_exclusive, vm_lock_file};
use crate::harness::{
    DaemonOpts, KillMentioning, LazyConfig, LocalDaemon, NIX_28_BUILD_REMOTE, Nix, REMOTE_HOST,
    StoreQueries, processes_mentioning, wait_until, with_builder_keys,
};
use crate::p7::BUILDER;
use crate::report::{Goal, Row};
use crate::rows::{Ctx, supervisor_pid};
use crate::rss::{rss_pss, vm_rss};
use crate::setup::{CONTROL_PERSIST, Hook, write_file};
use crate::stats::{Samples, fmt_num, fmt_samples, ratio};

pub const KEY_BUILD: &str = "P9 warm build";
pub const KEY_IDLE: &str = "P9 idle memory";
pub const KEY_FIRST: &str = "P9 first build after idle";

const COMMAND: &str = "cargo bench --bench hook -- P9";
/// The host alias Nix's hook uses for the always-on VM (its port is in the ssh config).
const ALIAS: &str = "nlb-bench-vm";
/// Ours stops this long after its last build (long enough to stay up through part 1's rounds).
const IDLE: &str = "30s";
/// Cold boots measured in part 3 (each costs an idle wait first).
const MAX_COLD: usize = 3;

const HOOKS: [Hook; 3] = [Hook::Ours, Hook::Nix, Hook::NixPersist];

const WHAT_BUILD: &str = "VM builder already up (tiny QEMU aarch64): trivial drv + 1 small input (wall time of nix-build); Nix's hook against the same image always on";
const WHAT_IDLE: &str = "resident memory while idle after the builds: ours (VM stopped, supervisor left) vs the always-on VM's QEMU";
const WHAT_FIRST: &str = "first build after idle (wall time of nix-build): ours boots cold, the always-on VM just builds";

fn progress(what: &str) {
    eprintln!("[bench] {what}");
}

/// P9's three rows: measured, or each saying why it could not be.
pub fn p9(ctx: &Ctx) -> Vec<Row> {
    match crate::p7::image() {
        Ok(img) => measure(ctx, &img),
        Err(why) => {
            progress(&format!("P9 not measured: {why}"));
            not_measured(&why)
        }
    }
}

fn not_measured(why: &str) -> Vec<Row> {
    [
        (KEY_BUILD, WHAT_BUILD, "s"),
        (KEY_IDLE, WHAT_IDLE, "MiB"),
        (KEY_FIRST, WHAT_FIRST, "s"),
    ]
    .into_iter()
    .map(|(key, what, unit)| {
        Row::ours_only(
            key,
            what,
            unit,
            Samples::new(),
            Goal::Info,
            format!("NOT MEASURED: {why}"),
            COMMAND.to_owned(),
        )
    })
    .collect()
}

// ------------------------------------------------------------------------------------------------
// The always-on VM and Nix's hook in front of it

/// The image's client key and pinned host key, from its generated snippet.
fn image_keys(img: &VmImage) -> (String, String) {
    let v: toml::Value =
        toml::from_str(&img.toml).unwrap_or_else(|e| panic!("image snippet: {e}\n{}", img.toml));
    let b = &v["builders"][BUILDER];
    let get = |k: &str| {
        b.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_else(|| panic!("the image's snippet has no `{k}`:\n{}", img.toml))
            .to_owned()
    };
    (get("ssh-key"), get("host-key"))
}

/// Boots the image bare, as P7 does, and returns it once it answers (SSH, `nix-store
/// --version`); the caller stops it.
fn boot_always_on(rt: &tokio::runtime::Runtime, img: &VmImage, dir: &Path) -> Instance {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
    let builder = img.builder();
    rt.block_on(async {
        let bctx = BootContext::new(&builder, dir.to_path_buf());
        let spec = &builder.lazy.as_ref().expect("a lazy builder").boot;
        let mut inst = boot::start(spec, &bctx)
            .await
            .unwrap_or_else(|e| panic!("always-on VM: {e}"));
        let port = inst.ssh_port().expect("the forwarded port");
        boot::wait_ready(
            &builder,
            port,
            &mut inst,
            Instant::now() + Duration::from_secs(180),
        )
        .await
        .unwrap_or_else(|e| panic!("always-on VM: not ready: {e}"));
        inst
    })
}

/// The OpenSSH client config that gives the always-on VM's forwarded port a host alias.
fn ssh_config(port: u16) -> String {
    format!("Host {ALIAS}\n  HostName {REMOTE_HOST}\n  Port {port}\n  HostKeyAlias {ALIAS}\n")
}

/// Nix 2.8's machines line for the always-on VM (the image's key, max-jobs and pinned host key).
fn machines_line(key: &str, host_key: &str, max_jobs: u32) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{host_key}\n"));
    format!("ssh://root@{ALIAS} aarch64-linux {key} {max_jobs} 1 - - {b64}")
}

/// A daemon whose `build-hook` is Nix 2.8's own, its one machine the always-on VM;
/// `control_dir`: OpenSSH connection sharing through sockets there.
fn nix_daemon(img: &VmImage, config: &Path, control_dir: Option<&Path>) -> LocalDaemon {
    let (key, host_key) = image_keys(img);
    let mut opts = DaemonOpts::new(Nix::Host);
    opts.build_hook = Some(NIX_28_BUILD_REMOTE.to_owned());
    opts.machines = Some(machines_line(&key, &host_key, img.builder().max_jobs) + "\n");
    let mut sshopts = format!(
        "-F {} -oBatchMode=yes -oConnectTimeout=20",
        config.display()
    );
    if let Some(dir) = control_dir {
        let path = format!("{}/%C", dir.display());
        assert!(path.len() + 40 < 100, "ControlPath {path} is too long");
        let _ = write!(
            sshopts,
            " -oControlMaster=auto -oControlPath={path} -oControlPersist={CONTROL_PERSIST}"
        );
    }
    opts.env.push(("NIX_SSHOPTS".to_owned(), sshopts));
    opts.expose.push(img.dir.clone());
    LocalDaemon::start(opts)
}

// ------------------------------------------------------------------------------------------------
// One build

/// One build of a fresh `uname` derivation: the whole `nix-build` (its input built first,
/// untimed), checked to have run on aarch64 with its input. Returns the time and the client's
/// stderr.
fn build(daemon: &LocalDaemon, name: &str) -> (f64, String) {
    let (file, input) = crate::p7::uname_with_input(daemon, name);
    let out = daemon.nix_build(&[&file, "-A", "main"]);
    out.assert_success();
    crate::p7::check_output(daemon, &out, name, &input);
    (out.elapsed.as_secs_f64(), out.stderr.clone())
}

// ------------------------------------------------------------------------------------------------
// Memory

/// The QEMU processes that name `dir` (a VM's state directory).
fn qemus_of(dir: &Path) -> Vec<u32> {
    processes_mentioning(dir)
        .into_iter()
        .filter(|(_, argv)| argv.first().is_some_and(|a| a.contains("qemu-system")))
        .map(|(p, _)| p)
        .collect()
}

// ------------------------------------------------------------------------------------------------
// The measurement

struct Figures {
    /// Part 1, per hook (HOOKS order).
    warm: [Samples; HOOKS.len()],
    /// Part 2: ours (supervisor VmRSS), the always-on QEMU's Rss, and its Pss, the
    /// ControlPersist master's VmRSS.
    sup_rss: Samples,
    qemu_rss: Samples,
    qemu_pss: Samples,
    master_rss: Samples,
    /// Part 3, per hook.
    first: [Samples; HOOKS.len()],
    note: String,
}

fn wait_down(cfg: &LazyConfig, daemon: &LocalDaemon) -> f64 {
    wait_until("our VM's idle stop", Duration::from_secs(120), || {
        cfg.status_of(daemon, BUILDER).state == State::Down
    })
    .as_secs_f64()
}

fn measure(ctx: &Ctx, img: &VmImage) -> Vec<Row> {
    let lock_path = vm_lock_file(&ctx.host_tmp);
    progress(&format!(
        "P9: waiting for the VM test lock {} (one VM test at a time on the machine)",
        lock_path.display()
    ));
    let _one_vm = lock_exclusive(&lock_path).unwrap_or_else(|e| panic!("{e}"));
    let always_dir = ctx.dir.join("p9-always-on");
    let control_dir = ctx.dir.join("p9-cm");
    std::fs::create_dir_all(&control_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", control_dir.display()));
    let _no_leftover_always_on = KillMentioning(always_dir.clone());
    let _no_leftover_master = KillMentioning(control_dir.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let t0 = Instant::now();
    let always = boot_always_on(&rt, img, &always_dir);
    let always_boot = t0.elapsed().as_secs_f64();
    let port = always.ssh_port().expect("the forwarded port");
    let qemu_pid = always.pid().expect("QEMU's pid");
    let accel = always
        .accel()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".to_owned());
    progress(&format!(
        "P9: always-on VM up in {always_boot:.1} s on port {port} (accel {accel})"
    ));
    let config = ctx.dir.join("p9-ssh_config");
    write_file(&config, &ssh_config(port), 0o644);

    let text = with_builder_keys(
        &img.toml,
        BUILDER,
        &format!("idle-timeout = \"{IDLE}\"\nboot-timeout = \"3m\""),
    );
    let cfg = LazyConfig::write(std::slice::from_ref(&text));
    let _no_leftover_vm = KillMentioning(cfg.state_dir());
    let daemons = [
        LocalDaemon::start(cfg.daemon_opts(Duration::from_secs(600))),
        nix_daemon(img, &config, None),
        nix_daemon(img, &config, Some(&control_dir)),
    ];
    let figures = run(ctx, &cfg, &daemons, qemu_pid, &control_dir);
    drop(daemons);
    rt.block_on(always.stop(StopHow::forced()));
    let accel = accel.split_whitespace().next().unwrap_or("unknown");
    let note = format!(
        "aarch64 VM of examples/vm/make-image ({}), accel {accel}; the always-on copy booted by the bench in {} s and left up; {}",
        crate::p7::vm_shape(&img.builder()),
        fmt_num(always_boot),
        figures.note
    );
    rows(Figures { note, ..figures })
}

fn run(
    ctx: &Ctx,
    cfg: &LazyConfig,
    daemons: &[LocalDaemon; 3],
    qemu_pid: u32,
    control_dir: &Path,
) -> Figures {
    let ours = &daemons[0];
    let mut warm = HOOKS.map(|_| Samples::new());
    let mut warmup = Vec::new();
    let mut up_state = None;
    // Part 1: rounds, the order rotating; round 0 (it boots ours) is a warm-up.
    for i in 0..=ctx.runs {
        for k in 0..HOOKS.len() {
            let h = (i + k) % HOOKS.len();
            let hook = HOOKS[h];
            let name = format!("nlb-bench-p9-{}-{i}", hook.label());
            let (secs, stderr) = build(&daemons[h], &name);
            if h == 0 && i > 0 {
                assert!(
                    !stderr.contains("booting builder"),
                    "P9: our VM booted during the warm builds (idle-timeout {IDLE} too short?):\n{stderr}"
                );
            }
            if i == 0 {
                warmup.push(format!("{} {} s", hook.label(), fmt_num(secs)));
                progress(&format!("P9 warm {} warm-up: {secs:.3} s", hook.label()));
            } else {
                warm[h].push(secs);
                progress(&format!("P9 warm {} run {i}: {secs:.3} s", hook.label()));
            }
            if h == 0 && i == 0 {
                let st = cfg.status_of(ours, BUILDER);
                assert_eq!(st.state, State::Up, "P9: our VM is not up: {st:?}");
                up_state = Some(st);
            }
        }
    }
    let before = up_state.expect("round 0 ran");
    let after = cfg.status_of(ours, BUILDER);
    assert_eq!(
        after.boots, before.boots,
        "P9: our VM rebooted during the warm builds: {after:?}"
    );
    let hand_outs = |s: &nix_lazy_builder::supervisor::proto::BuilderStatus| {
        s.warm.as_ref().map_or(0, |w| w.hand_outs)
    };
    let warm_used = hand_outs(&after).saturating_sub(hand_outs(&before));

    // Part 2: ours stops for idleness; what stays resident on each side.
    let waited = wait_down(cfg, ours);
    progress(&format!(
        "P9: our VM stopped for idleness after {waited:.1} s"
    ));
    let leftover = qemus_of(&cfg.state_dir());
    assert!(
        leftover.is_empty(),
        "P9: our QEMU is still running: {leftover:?}"
    );
    let sup = supervisor_pid(ours, "P9");
    let (mut sup_rss, mut qemu_rss, mut qemu_pss, mut master_rss) = (
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
    );
    let masters: Vec<u32> = processes_mentioning(control_dir)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert!(
        !masters.is_empty(),
        "P9: no ssh master for the ControlPersist column under {}",
        control_dir.display()
    );
    for _ in 0..ctx.runs.max(3) {
        std::thread::sleep(Duration::from_secs(1));
        sup_rss.push(vm_rss(sup).unwrap_or_else(|| panic!("P9: the supervisor is gone")));
        let (r, p) = rss_pss(qemu_pid);
        qemu_rss.push(r);
        qemu_pss.push(p);
        let rss: Option<Vec<f64>> = masters.iter().map(|&m| vm_rss(m)).collect();
        let rss = rss.unwrap_or_else(|| panic!("P9: an ssh master of {masters:?} is gone"));
        master_rss.push(rss.iter().sum());
    }
    progress(&format!(
        "P9 idle: supervisor {}, always-on QEMU Rss {} Pss {}, ssh masters {masters:?} {}",
        fmt_samples(&sup_rss, "MiB"),
        fmt_samples(&qemu_rss, "MiB"),
        fmt_samples(&qemu_pss, "MiB"),
        fmt_samples(&master_rss, "MiB"),
    ));

    // Part 3: the first build after idle, ours from a cold boot.
    let mut first = HOOKS.map(|_| Samples::new());
    let cold_runs = ctx.runs.clamp(1, MAX_COLD);
    let mut idle_waits = vec![waited];
    for i in 0..cold_runs {
        if i > 0 {
            idle_waits.push(wait_down(cfg, ours));
        }
        let boots = cfg.status_of(ours, BUILDER).boots;
        for (h, hook) in HOOKS.iter().enumerate() {
            let name = format!("nlb-bench-p9-first-{}-{i}", hook.label());
            let (secs, stderr) = build(&daemons[h], &name);
            if h == 0 {
                assert!(
                    stderr.contains("booting builder"),
                    "P9: not a cold start (no boot progress line):\n{stderr}"
                );
                let st = cfg.status_of(ours, BUILDER);
                assert_eq!(
                    st.boots,
                    boots + 1,
                    "P9: the build did not boot our VM: {st:?}"
                );
            }
            first[h].push(secs);
            progress(&format!(
                "P9 first after idle {} run {i}: {secs:.3} s",
                hook.label()
            ));
        }
    }
    for d in daemons {
        assert!(d.invalid_leftovers().is_empty());
    }
    let waits: Vec<String> = idle_waits.iter().map(|w| format!("{w:.0} s")).collect();
    let note = format!(
        "warm-up round not counted ({}); ours: idle-timeout {IDLE}, keep-warm default, {warm_used} warm sessions handed out over {} warm builds, no boot among them; waits for ours' idle stop, from its last build: {} (before part 2, then before each later round of part 3)",
        warmup.join(", "),
        ctx.runs,
        waits.join(", "),
    );
    Figures {
        warm,
        sup_rss,
        qemu_rss,
        qemu_pss,
        master_rss,
        first,
        note,
    }
}

// ------------------------------------------------------------------------------------------------
// The rows

fn times(r: Option<f64>) -> String {
    r.map(|r| format!("{}×", fmt_num(r)))
        .unwrap_or_else(|| "—".into())
}

fn rows(f: Figures) -> Vec<Row> {
    let [ours, nix, persist] = f.warm;
    let build = Row {
        key: KEY_BUILD.into(),
        what: WHAT_BUILD.into(),
        unit: "s",
        ours,
        nix: Some(nix),
        persist: Some(persist),
        floor: None,
        goal: Goal::Info,
        note: format!(
            "whole-build ratios (no floor: the host cannot build aarch64 itself); the hooks alternating build by build, fresh derivation and input each build; Nix's hook reaches the always-on VM's dropbear by a host alias (ssh config: forwarded port, HostKeyAlias; pinned host key in column 8); {}",
            f.note
        ),
        command: COMMAND.into(),
    };
    let with_master = Samples {
        values: f
            .qemu_rss
            .values
            .iter()
            .zip(f.master_rss.values.iter())
            .map(|(q, m)| q + m)
            .collect(),
    };
    let idle = Row {
        key: KEY_IDLE.into(),
        what: WHAT_IDLE.into(),
        unit: "MiB",
        ours: f.sup_rss.clone(),
        nix: Some(f.qemu_rss.clone()),
        persist: Some(with_master),
        floor: None,
        goal: Goal::Info,
        note: format!(
            "read once a second after our VM's idle stop; ours: the supervisor's VmRSS, no QEMU left (checked); Nix's hook: the always-on QEMU's Rss (Pss {}); with ControlPersist: plus the master ssh's VmRSS ({}, kept {CONTROL_PERSIST} s); both sides also keep their nix-daemon (not counted)",
            fmt_samples(&f.qemu_pss, "MiB"),
            fmt_samples(&f.master_rss, "MiB"),
        ),
        command: COMMAND.into(),
    };
    let [ours, nix, persist] = f.first;
    let first = Row {
        key: KEY_FIRST.into(),
        what: WHAT_FIRST.into(),
        unit: "s",
        note: format!(
            "ours: a cold boot of the image (`snapshot = true` would restore instead: see the P7-restore nix-build row, not re-measured here); each round ours first, then Nix's hook and with ControlPersist on the always-on VM (its master still up after the idle wait, shorter than ControlPersist={CONTROL_PERSIST}); ours ÷ always-on {} and {}",
            times(ratio(&ours, &nix)),
            times(ratio(&ours, &persist)),
        ),
        ours,
        nix: Some(nix),
        persist: Some(persist),
        floor: None,
        goal: Goal::Info,
        command: COMMAND.into(),
    };
    vec![build, idle, first]
}

/// Self-checks run by `cargo test --benches` (see `main`).
pub fn self_test() {
    let s = |v: &[f64]| Samples { values: v.to_vec() };
    let r = rows(Figures {
        warm: [
            s(&[0.5, 0.75, 1.0]),
            s(&[1.0, 1.5, 2.0]),
            s(&[1.0, 1.0, 1.0]),
        ],
        sup_rss: s(&[8.0, 8.0]),
        qemu_rss: s(&[400.0, 400.0]),
        qemu_pss: s(&[390.0, 392.0]),
        master_rss: s(&[10.0, 10.0]),
        first: [s(&[6.0]), s(&[1.5]), s(&[1.0])],
        note: "n".into(),
    });
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].key, KEY_BUILD);
    assert_eq!(r[0].ratio(), Some(0.5));
    assert_eq!(r[0].persist_ratio(), Some(0.75));
    assert!(
        r[0].line("now").contains("| 3+3+3 |"),
        "{}",
        r[0].line("now")
    );
    // The ControlPersist column of the idle row adds the master to QEMU.
    assert_eq!(r[1].persist.as_ref().and_then(Samples::median), Some(410.0));
    assert_eq!(r[1].ratio(), Some(0.02));
    assert_eq!(r[2].ratio(), Some(4.0));
    assert!(r[2].note.contains("4.00× and 6.00×"), "{}", r[2].note);
    let line = machines_line("/k", "ssh-ed25519 AAAA", 2);
    assert_eq!(
        line,
        format!(
            "ssh://root@{ALIAS} aarch64-linux /k 2 1 - - {}",
            base64::engine::general_purpose::STANDARD.encode("ssh-ed25519 AAAA\n")
        )
    );
    assert!(ssh_config(4022).contains("Port 4022\n"));
    let r = not_measured("x");
    assert_eq!(r.len(), 3);
    assert!(r.iter().all(|r| r.line("now").contains("NOT MEASURED: x")));
}
