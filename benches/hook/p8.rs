//! P8: the per-build overhead of the `external-builders` door against the `build-hook` door,
//! side by side in one run on one Nix 2.34 daemon (the sid chroot's) and one always-on builder
//! (real sshd, real remote store) held warm by one supervisor.
//!
//! The daemon's nix.conf opens both doors: `build-hook` is nix-lazy-builder's hook (the
//! machines table names the builder) and `external-builders` runs `nix-lazy-builder
//! external-build` for aarch64-linux. Nix tries the hook first, so a build goes through the
//! hook unless its client says `--option build-hook ''` (root is a trusted user), in which case
//! the daemon starts no hook and the external builder takes it. Nix 2.34's own hook
//! (`nix __build-remote`) on the same daemon and builder is the reference, chosen the same way
//! (`--option build-hook '/usr/bin/nix __build-remote'`), and so is the external builder behind
//! Nix's hook with no machines (`--builders ''`: the daemon starts that hook, which declines,
//! and then runs the external builder; what a daemon whose `build-hook` is left at Nix's default
//! gets). Each run builds P1's trivial aarch64 derivation
//! (one small x86_64 input, built locally first, untimed), fresh each time, once per door, the
//! order rotating; a local x86_64 build without any hook is the floor. The first run of each
//! is a warm-up and not counted.
//!
//! Owns the P8 workload and its checks. Must never: give a figure without a Nix 2.34 (the rows
//! then say NOT MEASURED and why), count a build that did not happen on the remote, or one that went through another door than the one it is counted for (each build's
//! log is checked for its door's own lines).

use std::time::Instant;

use crate::harness::warm::hand_outs;
use crate::harness::{DaemonOpts, LocalDaemon, MachineLine, Nix, RemoteOpts, RemoteStore, Scheme};
use crate::report::{Goal, Row};
use crate::rows::{Ctx, floor_once, remote_once};
use crate::stats::{Samples, fmt_num, fmt_samples};

pub const KEY_EXTERNAL: &str = "P8 external-builders";
pub const KEY_HOOK: &str = "P8 build-hook";

const WHAT: &str =
    "per-build overhead, warm builder: trivial drv + 1 small input (wall time of nix-build)";
const COMMAND: &str = "cargo bench --bench hook -- P8";

/// Nix 2.34's own build hook in the sid chroot (its default `build-hook`).
const NIX_HOOK: &str = "/usr/bin/nix __build-remote";

/// The doors a P8 build can take, in column order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Door {
    External,
    Hook,
    NixHook,
    /// The external builder with Nix's own hook left in `build-hook` and no machines for it
    /// (`--builders ''`): the daemon starts that hook, which declines, before the external
    /// builder takes the build. What a daemon gets whose `build-hook` is left at Nix's default.
    ExternalAfterNixHook,
}

const DOORS: [Door; 4] = [
    Door::External,
    Door::Hook,
    Door::NixHook,
    Door::ExternalAfterNixHook,
];

impl Door {
    fn label(self) -> &'static str {
        match self {
            Door::External => "external",
            Door::Hook => "hook",
            Door::NixHook => "nix-hook",
            Door::ExternalAfterNixHook => "external-after-nix-hook",
        }
    }

    /// The client options that send a build through this door.
    fn args(self) -> Vec<&'static str> {
        match self {
            Door::External => vec!["--option", "build-hook", ""],
            Door::Hook => vec![],
            Door::NixHook => vec!["--option", "build-hook", NIX_HOOK],
            Door::ExternalAfterNixHook => {
                vec!["--option", "build-hook", NIX_HOOK, "--builders", ""]
            }
        }
    }
}

fn progress(what: &str) {
    eprintln!("[bench] {what}");
}

/// The daemon with both doors open onto `remote`, our hook in `build-hook`.
fn daemon(remote: &RemoteStore) -> LocalDaemon {
    let mut opts = DaemonOpts::new(Nix::Sid).with_our_hook();
    let m = MachineLine::new(Scheme::Ssh, true);
    opts.machines = Some(remote.machines_line(&m) + "\n");
    let bin = crate::harness::hook_binary();
    opts.extra_conf
        .push("experimental-features = external-builders".into());
    opts.extra_conf.push(format!(
        "external-builders = [{{\"systems\": [\"aarch64-linux\"], \"program\": \"{}\", \"args\": [\"external-build\"]}}]",
        bin.display()
    ));
    opts.expose.push(remote.dir().to_path_buf());
    LocalDaemon::start(opts)
}

/// P8's two rows: the external door and the hook door, each beside Nix 2.34's hook; or, without
/// a Nix 2.34, the two rows saying so, with no figure.
pub fn p8(ctx: &Ctx) -> Vec<Row> {
    if !Nix::Sid.available() {
        let why = format!(
            "no Nix 2.34 (external-builders needs 2.32): the sid chroot {} is not ready; tests/env/provision.sh makes it",
            Nix::Sid.root().display()
        );
        progress(&format!("P8 not measured: {why}"));
        return not_measured(&why);
    }
    Nix::Sid.require();
    let remote = RemoteStore::start(RemoteOpts::new(Nix::Host));
    let d = daemon(&remote);
    let mut samples: Vec<Samples> = DOORS.iter().map(|_| Samples::new()).collect();
    let mut floor = Samples::new();
    // The external-build program runs unprivileged and cannot start a supervisor: a first
    // build through the hook starts it (and its warm connection to the builder), untimed.
    let secs = once(&d, &remote, Door::Hook, "p8-prime", true);
    progress(&format!(
        "P8 priming build through the hook (starts the supervisor): {secs:.3} s"
    ));
    let started = Instant::now();
    for i in 0..=ctx.runs {
        // The same kind of derivation for the local system, no hook, no external builder.
        let seed = format!("p8-floor-{i}");
        let floor_secs = floor_once(&d, "nlb-bench-p8-floor", &seed, &Door::External.args());
        if i > 0 {
            floor.push(floor_secs);
        }
        for k in 0..DOORS.len() {
            let h = (i + k) % DOORS.len();
            let door = DOORS[h];
            let secs = once(
                &d,
                &remote,
                door,
                &format!("p8-{}-{i}", door.label()),
                i == 0,
            );
            let what = if i == 0 {
                "warm-up".to_owned()
            } else {
                format!("run {i}")
            };
            progress(&format!("P8 {} {what}: {secs:.3} s", door.label()));
            if i > 0 {
                samples[h].push(secs);
            }
        }
        progress(&format!("P8 floor run {i}: {floor_secs:.3} s"));
    }
    progress(&format!("P8: {:.1?}", started.elapsed()));
    rows(samples, floor)
}

fn rows(samples: Vec<Samples>, floor: Samples) -> Vec<Row> {
    let f = floor.median();
    let mut it = samples.into_iter();
    let (ext, hook, nix, ext_after) = (
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
    );
    let over = |s: &Samples| Some(s.median()? - f?);
    let ms = |v: Option<f64>| {
        v.map(|v| format!("{:.0} ms", v * 1000.0))
            .unwrap_or_else(|| "—".into())
    };
    let overhead_ratio = match (over(&ext), over(&hook)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a.max(0.0) / b),
        _ => None,
    };
    let whole = crate::stats::ratio(&ext, &hook);
    let times = |r: Option<f64>| {
        r.map(|r| format!("{}×", fmt_num(r)))
            .unwrap_or_else(|| "—".into())
    };
    let note = format!(
        "one Nix 2.34 daemon (sid) with both doors open, one always-on ssh:// builder kept warm by one supervisor, doors alternating build by build; external ÷ hook: {} of overheads (median − floor {}), {} whole-build; overheads: external {}, hook {}, Nix 2.34's hook {}; our hook door {}; external with Nix's hook left in `build-hook` (no machines: it starts and declines first) {}, overhead {}; Nix's-hook column: Nix 2.34's `nix __build-remote` on the same daemon; fresh derivation and input each run; first run of each door discarded (warm-up)",
        times(overhead_ratio),
        f.map(|f| format!("{f:.3} s")).unwrap_or_else(|| "—".into()),
        times(whole),
        ms(over(&ext)),
        ms(over(&hook)),
        ms(over(&nix)),
        fmt_samples(&hook, "s"),
        fmt_samples(&ext_after, "s"),
        ms(over(&ext_after)),
    );
    let what = WHAT;
    let command = COMMAND.to_owned();
    vec![
        Row {
            key: KEY_EXTERNAL.into(),
            what: format!("{what}, through `external-builders`"),
            unit: "s",
            ours: ext,
            nix: Some(nix.clone()),
            persist: None,
            floor: f,
            goal: Goal::Checked {
                text: "overhead ≤ our build hook's (same run, daemon, builder)".into(),
                met: overhead_ratio.is_some_and(|r| r <= 1.0),
            },
            note,
            command: command.clone(),
        },
        Row {
            key: KEY_HOOK.into(),
            what: format!("{what}, through `build-hook` (P8's reference)"),
            unit: "s",
            ours: hook,
            nix: Some(nix),
            persist: None,
            floor: f,
            goal: Goal::Info,
            note: "measured in the same rotation as P8 external-builders, on the same daemon and builder; ratios of overheads (median − the same floor)".into(),
            command,
        },
    ]
}

/// The two rows, each saying why it has no figure.
fn not_measured(why: &str) -> Vec<Row> {
    [
        (KEY_EXTERNAL, "`external-builders`"),
        (KEY_HOOK, "`build-hook`"),
    ]
    .into_iter()
    .map(|(key, door)| {
        Row::ours_only(
            key,
            &format!("{WHAT}, through {door}"),
            "s",
            Samples::new(),
            Goal::Info,
            format!("NOT MEASURED: {why}"),
            COMMAND.to_owned(),
        )
    })
    .collect()
}

/// One P8 build through `door`; the timed part is `nix-build` alone. The warm-up checks
/// everything (references, deriver, log); every run checks that both outputs arrived, that the
/// remote built them, that the build log shows the door it was counted for, and, for Nix's
/// own hook, that none of our warm sessions was handed out (the daemon took the option).
fn once(daemon: &LocalDaemon, remote: &RemoteStore, door: Door, seed: &str, full: bool) -> f64 {
    let uri = remote.uri(Scheme::Ssh);
    let before = hand_outs(daemon, &uri);
    let out = remote_once(daemon, remote, "nlb-bench-p8", seed, &door.args(), full);
    if matches!(door, Door::NixHook) {
        assert_eq!(
            hand_outs(daemon, &uri),
            before,
            "{seed}: a warm session of ours was handed out while Nix's own hook was to build"
        );
    }
    let external = out.stderr.contains("building on 'ssh://");
    assert_eq!(
        external,
        matches!(door, Door::External | Door::ExternalAfterNixHook),
        "{seed}: the build did not go through the {} door:\n{out}",
        door.label()
    );
    out.elapsed.as_secs_f64()
}

pub fn self_test() {
    let mk = |v: &[f64]| {
        let mut s = Samples::new();
        for x in v {
            s.push(*x);
        }
        s
    };
    let floor = mk(&[0.05, 0.05, 0.05]);
    let r = rows(
        vec![
            mk(&[0.08, 0.08, 0.09]),
            mk(&[0.09, 0.09, 0.1]),
            mk(&[0.2, 0.2, 0.2]),
        ],
        floor.clone(),
    );
    assert_eq!(r.len(), 2);
    assert_eq!(
        r[0].met(),
        Some(true),
        "30 ms ≤ 40 ms: {}",
        r[0].line("now")
    );
    assert!(r[0].note.contains("0.750×"), "{}", r[0].note);
    let r = rows(
        vec![
            mk(&[0.1, 0.1, 0.1]),
            mk(&[0.09, 0.09, 0.09]),
            mk(&[0.2, 0.2, 0.2]),
            mk(&[0.1, 0.1, 0.1]),
        ],
        floor,
    );
    assert_eq!(
        r[0].met(),
        Some(false),
        "50 ms > 40 ms: {}",
        r[0].line("now")
    );
    let r = not_measured("x");
    assert_eq!(r.len(), 2);
    assert!(r[0].line("now").contains("NOT MEASURED: x"));
    assert_eq!(r[0].met(), None);
}
