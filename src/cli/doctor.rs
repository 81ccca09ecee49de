//! `doctor`: one report that checks every builder end to end: the table as nix-daemon would
//! read it (nix.conf, `NIX_CONFIG`, `@file`s), keys, pinned host keys, a lazy builder's boot
//! settings on this machine and its supervisor, the boot, SSH, the remote Nix and its systems,
//! and one verdict per builder.
//!
//! It tells what it found, not what it hoped: a host-key mismatch is the host-key row's
//! failure wherever it showed, a running VM does not vouch for the settings of its next boot,
//! a supervisor that serves another config file is no proof of this one, and a VM doctor
//! booted says when it stops (or is stopped with `--stop`). Must never change a store or a
//! config, nor leave a builder running without saying so.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{config_file, daemon_hook, dur, load_config, runtime, same_file, state_name};
use crate::config::{
    self, Builder, Config, ConfigPath, HostKeySpec, NixConfEnv, NoteLevel, SshOpts,
};
use crate::ssh::{self, SshErrorKind};
use crate::supervisor::client::{Client, StatusReport, Verdict};
use crate::supervisor::proto::{BuilderStatus, State};

/// What `doctor` is asked to check.
#[derive(Clone, Copy, Debug)]
pub struct DoctorArgs<'a> {
    pub config: &'a ConfigPath,
    /// `--builders`: a Nix `builders` value to check instead of the daemon's.
    pub builders: Option<&'a str>,
    /// `NIX_SSHOPTS`, as `main` read it.
    pub nix_sshopts: Option<&'a str>,
    /// The environment nix-daemon reads its nix.conf by, as `main` read it.
    pub nix_conf: &'a NixConfEnv,
    /// `--stop`: stop every builder doctor booted once the check is done.
    pub stop: bool,
}

/// How a row of the report came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the doctor's report.
struct Check {
    level: Level,
    what: &'static str,
    detail: String,
}

#[derive(Default)]
struct Rows(Vec<Check>);

impl Rows {
    fn push(&mut self, level: Level, what: &'static str, detail: impl Into<String>) -> usize {
        self.0.push(Check {
            level,
            what,
            detail: detail.into(),
        });
        self.0.len() - 1
    }

    fn failed(&self) -> bool {
        self.0.iter().any(|c| c.level == Level::Fail)
    }
}

/// The text of a host-key mismatch, as `ssh` words it (`SshErrorKind::HostKeyMismatch`); a boot
/// failure reaches doctor through the supervisor as text, and this is how the host-key row
/// claims it (a unit test keeps the two in step).
const HOST_KEY_MISMATCH: &str = "HOST KEY MISMATCH";

/// The `builders` value doctor checks, and where it came from.
struct BuildersValue {
    value: String,
    origin: String,
    /// Nix's default, because nothing sets it.
    default: bool,
}

/// What doctor learnt of the supervisor before checking any builder.
enum SupervisorView {
    /// None runs: the first boot starts one with this config.
    NotRunning,
    /// It runs and serves this config file.
    Ours { pid: u32 },
    /// It runs and serves another file (or none): its builders are not this file's.
    Other { pid: u32, file: Option<PathBuf> },
    /// It cannot be asked.
    Broken(String),
}

/// `doctor`: see the module comment. Returns the report and whether every builder passed.
pub fn doctor(args: DoctorArgs<'_>) -> Result<(String, bool), String> {
    let (cfg, named) = load_config(args.config)?;
    let mut report = String::new();
    let mut all_ok = true;

    // What nix.conf made doctor notice: shown under the `builders` line.
    let mut conf_lines = String::new();
    let builders = match args.builders {
        Some(v) => BuildersValue {
            value: v.to_owned(),
            origin: "--builders".to_owned(),
            default: false,
        },
        None => daemon_builders(args.nix_conf, &mut conf_lines, &mut all_ok),
    };
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut read = |p: &Path| {
        let r = config::read_file(p);
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::NotFound) {
            missing.push(p.to_owned());
        }
        r
    };
    let (machines, notes) = config::parse_machines(&builders.value, &current_system(), &mut read)
        .map_err(|e| e.to_string())?;
    let ssh_opts = args.nix_sshopts.map(SshOpts::parse).unwrap_or_default();
    let table = config::build_table(machines, notes, &ssh_opts, &cfg);

    let _ = writeln!(
        report,
        "config: {}{}: {} builder(s) ({} lazy); supervisor state in {}",
        config_file(args.config).display(),
        if cfg.path.is_none() {
            " (does not exist)"
        } else {
            ""
        },
        table.builders.len(),
        table.builders.iter().filter(|b| b.is_lazy()).count(),
        cfg.supervisor.state_dir.display()
    );
    let _ = writeln!(
        report,
        "builders: {} ({})",
        if builders.value.is_empty() {
            "(empty)"
        } else {
            &builders.value
        },
        builders.origin
    );
    report.push_str(&conf_lines);
    for p in &missing {
        if builders.default {
            let _ = writeln!(
                report,
                "note: no machines file {} (the default builders): no always-on builders from it",
                p.display()
            );
        } else {
            let _ = writeln!(
                report,
                "warning: machines file {} does not exist: nix-daemon skips it without a word, \
                 so it adds no builders",
                p.display(),
            );
        }
    }
    for n in &table.notes {
        if n.level >= NoteLevel::Info {
            let _ = writeln!(report, "note: {}", n.message);
        }
    }

    let rt = runtime()?;
    // The running daemon's version and the build hook it really starts (daemon_hook.rs).
    let daemon = daemon_hook::check(&rt);
    report.push_str(&daemon.text);
    if daemon.level == daemon_hook::Level::Fail {
        all_ok = false;
    }
    let lazy_count = table.builders.iter().filter(|b| b.is_lazy()).count();
    let view = if lazy_count > 0 {
        let ours = config_file(args.config);
        let view = rt.block_on(look_at_supervisor(&cfg, &ours));
        report.push_str(&describe_view(&view, &cfg, &ours));
        view
    } else {
        SupervisorView::NotRunning
    };

    let mut booted = Vec::new();
    for b in &table.builders {
        let (rows, we_booted) = rt.block_on(doctor_one(b, &cfg, named.as_deref(), &view));
        if we_booted {
            booted.push(b);
        }
        all_ok &= !rows.failed();
        let _ = writeln!(report, "\n{} ({}, {})", b.name, b.store_uri, b.origin);
        for c in &rows.0 {
            let tag = match c.level {
                Level::Ok => " ok ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            let _ = writeln!(report, "  [{tag}] {:<10} {}", c.what, c.detail);
        }
        let verdict = match rows.0.iter().find(|c| c.level == Level::Fail) {
            Some(c) => format!("NOT usable: {} failed", c.what),
            None if rows.0.iter().any(|c| c.level == Level::Warn) => {
                "usable, with the warnings above".to_owned()
            }
            None => "usable".to_owned(),
        };
        let _ = writeln!(report, "  verdict: {verdict}");
    }
    if !booted.is_empty() {
        report.push('\n');
        for b in booted {
            report.push_str(&rt.block_on(after_check(b, &cfg, args.stop)));
        }
    }
    Ok((report, all_ok))
}

/// The daemon's `builders`, read as nix-daemon reads it.
fn daemon_builders(env: &NixConfEnv, report: &mut String, all_ok: &mut bool) -> BuildersValue {
    let default = || BuildersValue {
        value: format!("@{}", env.conf_dir().join("machines").display()),
        origin: format!(
            "Nix's default: not set in {} nor NIX_CONFIG",
            env.files()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        default: true,
    };
    match config::daemon_setting(env, "builders", &mut |p: &Path| config::read_file(p)) {
        Ok((value, notes)) => {
            for n in notes {
                let _ = writeln!(report, "warning: {}", n.message);
            }
            match value {
                Some(v) => BuildersValue {
                    value: v.value,
                    origin: format!("set in {}, as nix-daemon reads it", v.origin),
                    default: false,
                },
                None => default(),
            }
        }
        Err(e) => {
            *all_ok = false;
            let _ = writeln!(
                report,
                "error: nix-daemon cannot read its configuration: {e}; checking Nix's default builders"
            );
            default()
        }
    }
}

async fn look_at_supervisor(cfg: &Config, ours: &Path) -> SupervisorView {
    let mut c = match Client::connect(&cfg.supervisor.state_dir).await {
        Ok(c) => c,
        Err(e) => {
            return match super::root_only("nix-lazy-builder doctor", &e) {
                Some(m) => SupervisorView::Broken(m),
                None => SupervisorView::NotRunning,
            };
        }
    };
    let pid = c.supervisor_pid();
    match c.status_report().await {
        Ok(StatusReport { config_file, .. }) => match &config_file {
            Some(theirs) if same_file(theirs, ours) => SupervisorView::Ours { pid },
            _ => SupervisorView::Other {
                pid,
                file: config_file,
            },
        },
        Err(e) => SupervisorView::Broken(e.to_string()),
    }
}

fn describe_view(view: &SupervisorView, cfg: &Config, ours: &Path) -> String {
    let dir = cfg.supervisor.state_dir.display();
    match view {
        SupervisorView::NotRunning => {
            format!("supervisor: none runs on {dir}; doctor starts one with this config\n")
        }
        SupervisorView::Ours { pid } => format!("supervisor: pid {pid}, serving this config\n"),
        SupervisorView::Other { pid, file } => format!(
            "warning: the supervisor on {dir} (pid {pid}) serves {}, not {}: it boots that \
             file's builders, so this file's lazy builders are not checked\n",
            file.as_deref()
                .map_or_else(|| "no config file".to_owned(), |p| p.display().to_string()),
            ours.display()
        ),
        SupervisorView::Broken(e) => format!("warning: the supervisor cannot be asked: {e}\n"),
    }
}

pub(super) fn current_system() -> String {
    let arch = std::env::consts::ARCH;
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        o => o,
    };
    format!("{arch}-{os}")
}

/// The checks of one builder; `true` when doctor booted it for them.
async fn doctor_one(
    b: &Builder,
    cfg: &Config,
    named: Option<&Path>,
    view: &SupervisorView,
) -> (Rows, bool) {
    let mut rows = Rows::default();
    let mut booted = false;
    macro_rules! fail {
        ($what:expr, $detail:expr) => {{
            rows.push(Level::Fail, $what, $detail);
            return (rows, booted);
        }};
    }
    match &b.ssh_key {
        Some(k) => match ssh::load_identity(k) {
            Ok(_) => rows.push(Level::Ok, "key", format!("{} loads", k.display())),
            Err(e) => fail!("key", e.to_string()),
        },
        None => rows.push(
            Level::Ok,
            "key",
            "none configured: the default identities of this user are tried",
        ),
    };
    let mut target = match ssh::SshTarget::for_builder(b) {
        Ok(t) => t,
        Err(e) => fail!("host key", e.to_string()),
    };
    if target.host_keys.is_empty() {
        fail!(
            "host key",
            match &b.host_keys {
                HostKeySpec::SshDefault => format!(
                    "no pinned host key and no known_hosts entry for {}",
                    b.uri.host
                ),
                _ => "no usable host key".to_owned(),
            }
        );
    }
    let pinned = target.host_keys.fingerprints().join(", ");
    // Its verdict waits for the builder's answer: a mismatch is this row's failure.
    let host_key = rows.push(Level::Ok, "host key", format!("pinned {pinned}"));
    let mismatch = |rows: &mut Rows, why: String| {
        rows.0[host_key] = Check {
            level: Level::Fail,
            what: "host key",
            detail: why,
        };
    };

    if let Some(lazy) = &b.lazy {
        let setup =
            crate::boot::check_spec(&lazy.boot, &b.systems.iter().cloned().collect::<Vec<_>>());
        let setup_ok = setup.is_ok();
        match setup {
            Ok(found) => {
                let next = next_boot(b, &lazy.boot, cfg).await;
                rows.push(Level::Ok, "boot setup", format!("{found}{next}"))
            }
            Err(why) => rows.push(
                Level::Fail,
                "boot setup",
                format!("{why} (the next boot of '{}' fails)", b.name),
            ),
        };
        match view {
            SupervisorView::Other { pid, file } => fail!(
                "boot",
                format!(
                    "not checked: the supervisor on {} (pid {pid}) serves {}, not this file; stop \
                     it, or give this config its own [supervisor] state-dir",
                    cfg.supervisor.state_dir.display(),
                    file.as_deref()
                        .map_or_else(|| "no config file".to_owned(), |p| p.display().to_string())
                )
            ),
            SupervisorView::Broken(e) => fail!("boot", e.clone()),
            _ => {}
        }
        let mut c = match Client::connect_or_start(&cfg.supervisor.state_dir, named).await {
            Ok(c) => c,
            Err(e) => fail!("boot", e.to_string()),
        };
        let before = match c.status().await {
            Ok(list) => list.into_iter().find(|s| s.name == b.name),
            Err(e) => fail!("boot", e.to_string()),
        };
        let Some(before) = before else {
            fail!(
                "boot",
                format!(
                    "the supervisor does not know '{}' (it could not reload this file: see \
                     `nix-lazy-builder status`)",
                    b.name
                )
            );
        };
        let s = if before.state == State::Up {
            before
        } else if !setup_ok {
            // Booting it would only fail the same way.
            return (rows, booted);
        } else {
            match boot(&mut c, b, lazy.boot_timeout).await {
                Ok(s) => {
                    booted = true;
                    s
                }
                Err(cause) if cause.contains(HOST_KEY_MISMATCH) => {
                    // (From the mismatch on: the section already names the builder.)
                    let at = cause.find(HOST_KEY_MISMATCH).unwrap_or(0);
                    mismatch(&mut rows, format!("booted, but {}", &cause[at..]));
                    return (rows, booted);
                }
                Err(cause) => fail!("boot", cause),
            }
        };
        if let Some(p) = s.ssh_port {
            target.port = p;
        }
        let up = format!(
            "up on port {} ({}; boot usually takes {})",
            target.port,
            if booted {
                "booted by doctor".to_owned()
            } else {
                format!("for {}", short(s.uptime_ms))
            },
            short(s.expected_boot_ms)
        );
        if s.boot_settings_outdated {
            rows.push(
                Level::Warn,
                "boot",
                format!(
                    "{up}, but its instance was booted with older boot settings: this file's \
                     apply from its next boot, and only 'boot setup' above checked them"
                ),
            );
        } else {
            rows.push(Level::Ok, "boot", up);
        }
        if let Some(expected) = s.expected_boot_ms
            && let Some(w) = super::boot_timeout_warning(b, expected)
        {
            rows.push(
                Level::Warn,
                "boot",
                w.trim_start_matches("warning: ").to_owned(),
            );
        }
    }

    let session = match ssh::connect(&target).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind, SshErrorKind::HostKeyMismatch { .. }) => {
            mismatch(&mut rows, e.kind.to_string());
            return (rows, booted);
        }
        Err(e) => fail!("ssh", e.to_string()),
    };
    rows.0[host_key].detail = format!("pinned {pinned}; the builder presented it");
    rows.push(
        Level::Ok,
        "ssh",
        format!(
            "{}@{}:{} ({}, {})",
            target.user,
            target.host,
            target.port,
            session.negotiated().kex,
            session.negotiated().cipher
        ),
    );
    let program = b.uri.remote_program().to_owned();
    let version = match run_remote(&session, &[program.as_str(), "--version"]).await {
        Ok(v) => v,
        Err(e) => {
            session.close().await;
            fail!("remote nix", e)
        }
    };
    rows.push(Level::Ok, "remote nix", version.trim());
    match run_remote(&session, &["uname", "-m"]).await {
        Ok(machine) => {
            let machine = machine.trim().to_owned();
            let plausible = b
                .systems
                .iter()
                .any(|s| s.starts_with(&format!("{machine}-")) || s == "builtin");
            rows.push(
                if plausible { Level::Ok } else { Level::Fail },
                "systems",
                format!(
                    "builder machine is {machine}; configured systems: {}{}",
                    b.systems.iter().cloned().collect::<Vec<_>>().join(", "),
                    if plausible {
                        ""
                    } else {
                        " (none of them is native there; fine only if the builder emulates \
                         them, e.g. with binfmt or extra-platforms)"
                    }
                ),
            );
        }
        Err(e) => {
            rows.push(
                Level::Fail,
                "systems",
                format!("cannot run 'uname -m': {e}"),
            );
        }
    }
    if !b.supported_features.is_empty() || !b.mandatory_features.is_empty() {
        rows.push(
            Level::Ok,
            "features",
            format!(
                "supported: {}; mandatory: {} (taken from the config, not verified remotely)",
                join_or_none(&b.supported_features),
                join_or_none(&b.mandatory_features)
            ),
        );
    }
    session.close().await;
    (rows, booted)
}

/// What the next boot of `b` will do, for a snapshotting qemu builder ("; next boot: …").
async fn next_boot(b: &Builder, spec: &crate::config::BootSpec, cfg: &Config) -> String {
    use crate::boot::NextBoot;
    let dir = crate::supervisor::paths::builder_dir(&cfg.supervisor.state_dir, &b.name);
    match crate::boot::next_boot(spec, &crate::boot::BootContext::new(b, dir)).await {
        Ok(NextBoot::Cold) => String::new(),
        Ok(NextBoot::Restore(_)) => "; next boot: restores its snapshot".to_owned(),
        Ok(NextBoot::MakeSnapshot { why }) => {
            format!("; next boot: cold, and makes a snapshot ({why})")
        }
        Err(e) => format!("; next boot: cannot tell ({e})"),
    }
}

/// [`dur`], with "under a second" for what `dur` would call "0s".
fn short(ms: Option<u64>) -> String {
    match ms {
        Some(ms) if ms < 1000 => "under a second".to_owned(),
        ms => dur(ms),
    }
}

/// Boots `b` (even while it backs off) and waits until it is up or its boot failed.
async fn boot(c: &mut Client, b: &Builder, timeout: Duration) -> Result<BuilderStatus, String> {
    if let Verdict::Refused { reason, .. } =
        c.boot(&b.name, true).await.map_err(|e| e.to_string())?
    {
        return Err(reason);
    }
    let s = c
        .wait_ready(&b.name, timeout + Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    if s.state != State::Up {
        return Err(s
            .last_failure
            .map(|f| f.cause)
            .unwrap_or_else(|| format!("it is {}", state_name(s.state))));
    }
    Ok(s)
}

/// What becomes of a builder doctor booted: stopped now (`--stop`), or when it stops.
async fn after_check(b: &Builder, cfg: &Config, stop: bool) -> String {
    let name = &b.name;
    let mut c = match Client::connect(&cfg.supervisor.state_dir).await {
        Ok(c) => c,
        Err(e) => {
            return format!("note: doctor booted '{name}', and cannot ask about it now: {e}\n");
        }
    };
    if stop {
        return match c.down(name).await {
            Ok(s) => format!(
                "note: doctor booted '{name}' for this check and stopped it again (--stop; it is \
                 {})\n",
                state_name(s.state)
            ),
            Err(e) => format!("note: doctor booted '{name}' and could not stop it: {e}\n"),
        };
    }
    let idle = b.lazy.as_ref().and_then(|l| l.idle_timeout);
    let when = match c.status().await {
        Ok(list) => list
            .into_iter()
            .find(|s| s.name == *name)
            .and_then(|s| s.idle_stop_in_ms),
        Err(_) => None,
    };
    match (idle, when) {
        (None, _) => format!(
            "note: doctor booted '{name}' for this check; it keeps running (idle-timeout is \
             never): stop it with `nix-lazy-builder down {name}` (or run doctor with --stop)\n"
        ),
        (Some(t), at) => format!(
            "note: doctor booted '{name}' for this check; it stops by itself once idle for {} \
             (idle-timeout){}, or at once with `nix-lazy-builder down {name}` (or run doctor \
             with --stop)\n",
            humantime::format_duration(t),
            at.map(|ms| format!(", in {} if no build uses it", dur(Some(ms))))
                .unwrap_or_default()
        ),
    }
}

fn join_or_none(set: &std::collections::BTreeSet<String>) -> String {
    if set.is_empty() {
        "none".into()
    } else {
        set.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

async fn run_remote(session: &ssh::Session, words: &[&str]) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let cmd = ssh::shell_command(words).map_err(|e| e.to_string())?;
    let mut exec = session.exec(&cmd).await.map_err(|e| e.to_string())?;
    drop(exec.stdin);
    let mut out = String::new();
    let mut err = String::new();
    let (a, b) = tokio::join!(
        exec.stdout.read_to_string(&mut out),
        exec.stderr.read_to_string(&mut err)
    );
    a.map_err(|e| e.to_string())?;
    b.map_err(|e| e.to_string())?;
    match exec.status.wait().await.map_err(|e| e.to_string())? {
        s if s.success() => Ok(out),
        s => Err(format!("'{cmd}' {s}: {}", err.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_key_row_recognises_ssh_s_mismatch() {
        let e = SshErrorKind::HostKeyMismatch {
            expected: vec!["SHA256:a".into()],
            presented: "SHA256:b".into(),
            presented_type: "ssh-ed25519".into(),
        };
        assert!(e.to_string().contains(HOST_KEY_MISMATCH), "{e}");
    }
}
