//! The administrator's commands: `status` (a table, or `--json`), `up NAME`, `down NAME`, and
//! `doctor` (one report that checks every builder end to end).
//!
//! These are the only parts of the library that print to stdout; they talk to the supervisor
//! through its client and to builders through `ssh`, and never change a store.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{self, Builder, Config, ConfigPath, HostKeySpec};
use crate::ssh;
use crate::supervisor::client::{Client, ClientError, Verdict};
use crate::supervisor::proto::{BootKind, BuilderStatus, SnapshotFiles, SnapshotStatus, State};

/// Loads the TOML config the way the hook and the supervisor do.
pub fn load_config(path: &ConfigPath) -> Result<(Config, Option<PathBuf>), String> {
    let cfg = Config::load(path).map_err(|e| e.to_string())?;
    Ok((cfg, path.named().map(Path::to_owned)))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn dur(ms: Option<u64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) => {
            let s = ms / 1000;
            if s >= 3600 {
                format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
            } else if s >= 60 {
                format!("{}m{:02}s", s / 60, s % 60)
            } else {
                format!("{s}s")
            }
        }
    }
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Down => "down",
        State::Booting => "booting",
        State::Up => "up",
        State::Draining => "draining",
        State::Stopping => "stopping",
        State::Failed => "failed",
    }
}

/// The `status` table.
pub fn status_table(list: &[BuilderStatus]) -> String {
    let mut rows = vec![[
        "BUILDER".to_owned(),
        "STATE".to_owned(),
        "UPTIME".to_owned(),
        "IDLE STOP IN".to_owned(),
        "BUILDS".to_owned(),
        "BOOTS".to_owned(),
        "SNAPSHOT".to_owned(),
        "LAST FAILURE".to_owned(),
    ]];
    for s in list {
        let state = match (s.state, s.booting_ms) {
            (State::Booting, Some(b)) => format!("booting ({})", dur(Some(b))),
            (st, _) => state_name(st).to_owned(),
        };
        let failure = match &s.last_failure {
            None => "-".to_owned(),
            Some(f) if f.retry_in_ms > 0 => {
                format!("{} (retry in {})", f.cause, dur(Some(f.retry_in_ms)))
            }
            Some(f) => f.cause.clone(),
        };
        let (boots, snapshot) = snapshot_cells(s);
        rows.push([
            s.name.clone(),
            state,
            dur(s.uptime_ms),
            dur(s.idle_stop_in_ms),
            s.leases.to_string(),
            boots,
            snapshot,
            failure,
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c == 7 {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The BOOTS and SNAPSHOT cells: "3 (2 restored)"; the snapshot's age and size, and what the
/// next boot does with it.
fn snapshot_cells(s: &BuilderStatus) -> (String, String) {
    let Some(snap) = &s.snapshot else {
        return (s.boots.to_string(), "-".to_owned());
    };
    let boots = format!("{} ({} restored)", s.boots, snap.restored);
    let cell = match &snap.files {
        None => "none".to_owned(),
        Some(f) => {
            let mut c = format!(
                "{} old, {}",
                dur(Some(f.age_ms)),
                crate::boot::fmt_bytes(f.disk_bytes)
            );
            if f.next_boot != "restore" {
                c.push_str(" (remade next boot)");
            }
            c
        }
    };
    (boots, cell)
}

/// What `status` adds for a `snapshot = true` builder: its snapshot's files as they are on
/// disk, and (with no supervisor to say) what the next boot does.
async fn add_snapshot(b: &Builder, state_dir: &Path, s: &mut BuilderStatus) {
    let Some(lazy) = &b.lazy else { return };
    let config::BootSpec::Qemu(q) = &lazy.boot else {
        return;
    };
    if !q.snapshot || q.runner.is_some() {
        return;
    }
    let dir = crate::supervisor::paths::builder_dir(state_dir, &b.name);
    let ctx = crate::boot::BootContext::new(b, dir.clone());
    let next = crate::boot::next_boot(&lazy.boot, &ctx).await;
    let (kind, why) = match &next {
        Ok(crate::boot::NextBoot::Restore(_)) => (BootKind::Restore, None),
        Ok(crate::boot::NextBoot::MakeSnapshot { why }) => (BootKind::Make, Some(why.clone())),
        Ok(crate::boot::NextBoot::Cold) => (BootKind::Cold, None),
        Err(e) => (BootKind::Make, Some(format!("cannot tell: {e}"))),
    };
    let now = std::time::SystemTime::now();
    let files = crate::boot::snapshot::info(&dir).map(|i| SnapshotFiles {
        created_unix: i.meta.created,
        age_ms: u64::try_from(i.age(now).as_millis()).unwrap_or(u64::MAX),
        disk_bytes: i.disk_bytes,
        next_boot: match &why {
            None => "restore".to_owned(),
            Some(w) => format!("remade: {w}"),
        },
    });
    let snap = s.snapshot.get_or_insert_with(|| {
        Box::new(SnapshotStatus {
            boot_kind: kind,
            restorable: kind == BootKind::Restore,
            restored: 0,
            booted_cold: 0,
            note: why,
            files: None,
        })
    });
    snap.files = files;
}

/// The supervisor's control socket is root-only (0600 in a 0700 state directory) and there is
/// no read-only path for other users: a command that may not open it says so instead of
/// reporting a raw EACCES or, worse, "down" for builders that may well be up.
fn root_only(command: &str, e: &ClientError) -> Option<String> {
    match e {
        ClientError::Connect { socket, source }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            Some(format!(
                "`{command}` needs root: the supervisor's control socket {} is root-only \
                 (there is no read-only status for other users); run it as root, e.g. with sudo",
                socket.display()
            ))
        }
        _ => None,
    }
}

/// `status [--json]`: asks the running supervisor; without one every lazy builder is down.
pub fn status(config: &ConfigPath, json: bool) -> Result<String, String> {
    let (cfg, _) = load_config(config)?;
    let rt = runtime()?;
    let list = rt.block_on(async {
        let mut list: Vec<BuilderStatus> = match Client::connect(&cfg.supervisor.state_dir).await {
            Ok(mut c) => c.status().await.map_err(|e| e.to_string())?,
            Err(e) => match root_only("nix-lazy-builder status", &e) {
                Some(m) => return Err(m),
                None => cfg
                    .builders
                    .iter()
                    .filter(|b| b.is_lazy())
                    .map(|b| down_status(&b.name))
                    .collect(),
            },
        };
        for s in &mut list {
            if let Some(b) = cfg.builders.iter().find(|b| b.name == s.name) {
                add_snapshot(b, &cfg.supervisor.state_dir, s).await;
            }
        }
        Ok::<_, String>(list)
    })?;
    if json {
        serde_json::to_string_pretty(&list)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string())
    } else {
        Ok(status_table(&list))
    }
}

fn down_status(name: &str) -> BuilderStatus {
    BuilderStatus {
        name: name.to_owned(),
        state: State::Down,
        ssh_port: None,
        booting_ms: None,
        expected_boot_ms: None,
        uptime_ms: None,
        idle_stop_in_ms: None,
        leases: 0,
        boots: 0,
        last_failure: None,
        nix_version: None,
        snapshot: None,
    }
}

fn lazy_builder<'a>(cfg: &'a Config, name: &str) -> Result<&'a Builder, String> {
    let lazy: Vec<&str> = cfg
        .builders
        .iter()
        .filter(|b| b.is_lazy())
        .map(|b| b.name.as_str())
        .collect();
    cfg.builders
        .iter()
        .find(|b| b.name == name && b.is_lazy())
        .ok_or_else(|| {
            format!(
                "no lazy builder named '{name}' in the config (lazy builders: {})",
                if lazy.is_empty() {
                    "none".to_owned()
                } else {
                    lazy.join(", ")
                }
            )
        })
}

/// `up NAME`: boots a builder (even while it backs off after a failure) and waits until it is
/// ready or its boot fails.
pub fn up(config: &ConfigPath, name: &str) -> Result<String, String> {
    let (cfg, named) = load_config(config)?;
    let b = lazy_builder(&cfg, name)?;
    let timeout = b
        .lazy
        .as_ref()
        .map(|l| l.boot_timeout)
        .unwrap_or(config::DEFAULT_BOOT_TIMEOUT);
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = Client::connect_or_start(&cfg.supervisor.state_dir, named.as_deref())
            .await
            .map_err(|e| root_only("nix-lazy-builder up", &e).unwrap_or_else(|| e.to_string()))?;
        match c.boot(name, true).await.map_err(|e| e.to_string())? {
            Verdict::Refused { reason, .. } => {
                return Err(format!("'{name}' was not booted: {reason}"));
            }
            Verdict::Granted(_) => {}
        }
        let s = c
            .wait_ready(name, timeout + Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        match s.state {
            State::Up => Ok(format!(
                "'{name}' is up (ssh port {}, {})\n",
                s.ssh_port
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
                s.nix_version.as_deref().unwrap_or("Nix version unknown")
            )),
            _ => Err(format!(
                "'{name}' did not come up: {}",
                s.last_failure
                    .map(|f| f.cause)
                    .unwrap_or_else(|| state_name(s.state).to_owned())
            )),
        }
    })
}

/// `down NAME`: stops a builder once its running builds are done.
pub fn down(config: &ConfigPath, name: &str) -> Result<String, String> {
    let (cfg, _) = load_config(config)?;
    lazy_builder(&cfg, name)?;
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = match Client::connect(&cfg.supervisor.state_dir).await {
            Ok(c) => c,
            Err(e) => {
                return match root_only("nix-lazy-builder down", &e) {
                    Some(m) => Err(m),
                    None => Ok(format!("'{name}' is down (no supervisor is running)\n")),
                };
            }
        };
        let s = c.down(name).await.map_err(|e| e.to_string())?;
        Ok(match s.state {
            State::Draining => format!(
                "'{name}' is draining: it stops when its {} running build(s) finish\n",
                s.leases
            ),
            st => format!("'{name}' is {}\n", state_name(st)),
        })
    })
}

/// One line of the doctor's report.
struct Check {
    ok: bool,
    what: &'static str,
    detail: String,
}

/// `doctor`: checks config, keys, host keys, boot, SSH, the remote Nix and its systems for every
/// builder (the TOML file's and, with `builders`, a machines table), and prints one verdict per
/// builder. Returns the report and whether every builder passed. `nix_sshopts` is
/// `NIX_SSHOPTS`, as `main` read it.
pub fn doctor(
    config: &ConfigPath,
    builders: Option<&str>,
    nix_sshopts: Option<&str>,
) -> Result<(String, bool), String> {
    let (cfg, named) = load_config(config)?;
    let machines = builders.unwrap_or(config::DEFAULT_BUILDERS);
    let table = config::load_table(machines, &current_system(), nix_sshopts, &cfg)
        .map_err(|e| e.to_string())?;
    let mut report = String::new();
    let _ = writeln!(
        report,
        "config: {} builder(s) ({} lazy); supervisor state in {}",
        table.builders.len(),
        table.builders.iter().filter(|b| b.is_lazy()).count(),
        cfg.supervisor.state_dir.display()
    );
    for n in &table.notes {
        let _ = writeln!(report, "note: {}", n.message);
    }
    let rt = runtime()?;
    let mut all_ok = true;
    for b in &table.builders {
        let checks = rt.block_on(doctor_one(b, &cfg, named.as_deref()));
        let ok = checks.iter().all(|c| c.ok || c.what == SNAPSHOT);
        all_ok &= ok;
        let _ = writeln!(report, "\n{} ({}, {})", b.name, b.store_uri, b.origin);
        for c in &checks {
            let _ = writeln!(
                report,
                "  [{}] {:<10} {}",
                match (c.ok, c.what) {
                    (true, _) => " ok ",
                    // A builder without a snapshot still builds (cold).
                    (false, SNAPSHOT) => "warn",
                    (false, _) => "FAIL",
                },
                c.what,
                c.detail
            );
        }
        let verdict = match checks.iter().find(|c| !c.ok && c.what != SNAPSHOT) {
            None if checks.iter().any(|c| !c.ok) => {
                "usable, but it boots cold every time (see snapshot above)".to_owned()
            }
            None => "usable".to_owned(),
            Some(c) => format!("NOT usable: {} failed", c.what),
        };
        let _ = writeln!(report, "  verdict: {verdict}");
    }
    Ok((report, all_ok))
}

fn current_system() -> String {
    let arch = std::env::consts::ARCH;
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        o => o,
    };
    format!("{arch}-{os}")
}

async fn doctor_one(b: &Builder, cfg: &Config, named: Option<&Path>) -> Vec<Check> {
    let mut checks = Vec::new();
    macro_rules! fail {
        ($what:expr, $detail:expr) => {{
            checks.push(Check {
                ok: false,
                what: $what,
                detail: $detail,
            });
            return checks;
        }};
    }
    match &b.ssh_key {
        Some(k) => match ssh::load_identity(k) {
            Ok(_) => checks.push(Check {
                ok: true,
                what: "key",
                detail: format!("{} loads", k.display()),
            }),
            Err(e) => fail!("key", e.to_string()),
        },
        None => checks.push(Check {
            ok: true,
            what: "key",
            detail: "none configured: the default identities of this user are tried".into(),
        }),
    }
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
    checks.push(Check {
        ok: true,
        what: "host key",
        detail: target.host_keys.fingerprints().join(", "),
    });
    if let Some(lazy) = &b.lazy {
        let dir = crate::supervisor::paths::builder_dir(&cfg.supervisor.state_dir, &b.name);
        let boot_ctx = crate::boot::BootContext::new(b, dir.clone());
        for c in crate::boot::snapshot_checks(&lazy.boot, &boot_ctx)
            .await
            .unwrap_or_default()
        {
            checks.push(Check {
                ok: c.ok,
                what: SNAPSHOT,
                detail: c.detail,
            });
        }
        let booted = async {
            let mut c = Client::connect_or_start(&cfg.supervisor.state_dir, named)
                .await
                .map_err(|e| e.to_string())?;
            if let Verdict::Refused { reason, .. } =
                c.boot(&b.name, true).await.map_err(|e| e.to_string())?
            {
                return Err(reason);
            }
            let s = c
                .wait_ready(&b.name, lazy.boot_timeout + Duration::from_secs(5))
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
        .await;
        match booted {
            Ok(s) => {
                if let Some(p) = s.ssh_port {
                    target.port = p;
                }
                checks.push(Check {
                    ok: true,
                    what: "boot",
                    detail: format!("up (boot usually takes {})", dur(s.expected_boot_ms)),
                });
                if let Some(snap) = &s.snapshot {
                    checks.push(snapshot_after_boot(snap, &dir));
                }
            }
            Err(e) => fail!("boot", e),
        }
    }
    let session = match ssh::connect(&target).await {
        Ok(s) => s,
        Err(e) => fail!("ssh", e.to_string()),
    };
    checks.push(Check {
        ok: true,
        what: "ssh",
        detail: format!(
            "{}@{}:{} ({}, {})",
            target.user,
            target.host,
            target.port,
            session.negotiated().kex,
            session.negotiated().cipher
        ),
    });
    let program = b.uri.remote_program().to_owned();
    let version = match run_remote(&session, &[program.as_str(), "--version"]).await {
        Ok(v) => v,
        Err(e) => fail!("remote nix", e),
    };
    checks.push(Check {
        ok: true,
        what: "remote nix",
        detail: version.trim().to_owned(),
    });
    match run_remote(&session, &["uname", "-m"]).await {
        Ok(machine) => {
            let machine = machine.trim().to_owned();
            let plausible = b
                .systems
                .iter()
                .any(|s| s.starts_with(&format!("{machine}-")) || s == "builtin");
            checks.push(Check {
                ok: plausible,
                what: "systems",
                detail: format!(
                    "builder machine is {machine}; configured systems: {}{}",
                    b.systems.iter().cloned().collect::<Vec<_>>().join(", "),
                    if plausible {
                        String::new()
                    } else {
                        " (none of them is native there; fine only if the builder emulates \
                         them, e.g. with binfmt or extra-platforms)"
                            .to_owned()
                    }
                ),
            });
        }
        Err(e) => checks.push(Check {
            ok: false,
            what: "systems",
            detail: format!("cannot run 'uname -m': {e}"),
        }),
    }
    if !b.supported_features.is_empty() || !b.mandatory_features.is_empty() {
        checks.push(Check {
            ok: true,
            what: "features",
            detail: format!(
                "supported: {}; mandatory: {} (taken from the config, not verified remotely)",
                join_or_none(&b.supported_features),
                join_or_none(&b.mandatory_features)
            ),
        });
    }
    session.close().await;
    checks
}

/// The `doctor` row a `snapshot = true` builder's check name.
const SNAPSHOT: &str = "snapshot";

/// What the boot doctor asked for (or found) says about snapshots: restored, made one, or
/// could not make one and why (the guest agent did not answer, too little time, …).
fn snapshot_after_boot(snap: &SnapshotStatus, dir: &Path) -> Check {
    let on_disk = crate::boot::snapshot::info(dir).map(|i| {
        format!(
            "{} on disk, made {} ago",
            crate::boot::fmt_bytes(i.disk_bytes),
            crate::boot::fmt_age(i.age(std::time::SystemTime::now()))
        )
    });
    let (ok, detail) = match (snap.boot_kind, snap.restorable, &on_disk) {
        (BootKind::Restore, _, _) => (
            true,
            format!(
                "it came up restored from its snapshot ({}): the guest agent reseeded its RNG and set its clock",
                on_disk.as_deref().unwrap_or("its files are gone since")
            ),
        ),
        (BootKind::Make, true, Some(d)) => (
            true,
            format!("it booted cold and made a snapshot ({d}); the next boot restores it"),
        ),
        (kind, _, _) => (
            false,
            format!(
                "it booted {} and made no snapshot: {}",
                if kind == BootKind::Make {
                    "cold"
                } else {
                    "cold (snapshot = true has no effect here)"
                },
                snap.note.as_deref().unwrap_or("no reason was given")
            ),
        ),
    };
    Check {
        ok,
        what: SNAPSHOT,
        detail,
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
    use crate::supervisor::proto::Failure;

    #[test]
    fn table_shows_restores_and_the_snapshot() {
        let mut a = down_status("vm");
        a.boots = 3;
        a.snapshot = Some(Box::new(SnapshotStatus {
            boot_kind: BootKind::Restore,
            restorable: true,
            restored: 2,
            booted_cold: 1,
            note: None,
            files: Some(SnapshotFiles {
                created_unix: 0,
                age_ms: 125_000,
                disk_bytes: 212 << 20,
                next_boot: "restore".into(),
            }),
        }));
        let mut b = a.clone();
        b.name = "vm2".into();
        if let Some(s) = b.snapshot.as_mut()
            && let Some(f) = s.files.as_mut()
        {
            f.next_boot = "remade: the configuration changed (memory 1024 → 2048 MiB)".into();
        }
        let mut c = a.clone();
        c.name = "vm3".into();
        if let Some(s) = c.snapshot.as_mut() {
            s.files = None;
        }
        let t = status_table(&[a, b, c, down_status("plain")]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].contains("  BOOTS  ") && lines[0].contains("  SNAPSHOT  "),
            "{t}"
        );
        assert!(
            lines[1].contains("3 (2 restored)  2m05s old, 212 MiB  "),
            "{t}"
        );
        assert!(
            lines[2].contains("2m05s old, 212 MiB (remade next boot)"),
            "{t}"
        );
        assert!(lines[3].contains("3 (2 restored)  none "), "{t}");
        assert!(
            lines[4].starts_with("plain ") && lines[4].contains(" 0               -  "),
            "{t}"
        );
        // JSON keeps every field, and an older client's reading ignores what it does not know.
        let json = serde_json::to_string(&down_status("plain")).unwrap();
        assert!(!json.contains("snapshot"), "{json}");
    }

    #[test]
    fn table_shows_every_column() {
        let mut a = down_status("aarch64");
        a.state = State::Up;
        a.uptime_ms = Some(125_000);
        a.idle_stop_in_ms = Some(600_000);
        a.leases = 2;
        a.boots = 3;
        let mut b = down_status("darwin");
        b.state = State::Failed;
        b.last_failure = Some(Failure {
            cause: "boot timed out".into(),
            at_unix: 0,
            retry_in_ms: 20_000,
            consecutive: 1,
        });
        let t = status_table(&[a, b]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("BUILDER"), "{t}");
        assert!(
            lines[1].contains("up") && lines[1].contains("2m05s") && lines[1].contains("10m00s")
        );
        assert!(lines[1].contains(" 2 ") && lines[1].contains(" 3 "), "{t}");
        assert!(
            lines[2].contains("failed") && lines[2].ends_with("boot timed out (retry in 20s)"),
            "{t}"
        );
    }
}
