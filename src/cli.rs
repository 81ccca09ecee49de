//! The administrator's commands: `status` (a table, or `--json`), `up NAME`, `down NAME`, and
//! `doctor` (one report that checks every builder end to end).
//!
//! These are the only parts of the library that print to stdout; they talk to the supervisor
//! through its client, to builders through `ssh` and to the local daemon through `store` (its
//! version and the build hook it really runs: `daemon_hook.rs`), and never change a store but
//! for the daemon probe's one small `.drv`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{self, Builder, Config, ConfigPath, HostKeySpec};
use crate::ssh;
use crate::supervisor::client::{Client, ClientError, Verdict};
use crate::supervisor::proto::{BuilderStatus, State};

mod daemon_hook;

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
        rows.push([
            s.name.clone(),
            state,
            dur(s.uptime_ms),
            dur(s.idle_stop_in_ms),
            s.leases.to_string(),
            s.boots.to_string(),
            failure,
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c == 6 {
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
        match Client::connect(&cfg.supervisor.state_dir).await {
            Ok(mut c) => c.status().await.map_err(|e| e.to_string()),
            Err(e) => match root_only("nix-lazy-builder status", &e) {
                Some(m) => Err(m),
                None => Ok(cfg
                    .builders
                    .iter()
                    .filter(|b| b.is_lazy())
                    .map(|b| down_status(&b.name))
                    .collect()),
            },
        }
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
    // The running daemon's version and the build hook it really starts (daemon_hook.rs).
    let daemon = daemon_hook::check(&rt);
    report.push_str(&daemon.text);
    let mut all_ok = daemon.level != daemon_hook::Level::Fail;
    for b in &table.builders {
        let checks = rt.block_on(doctor_one(b, &cfg, named.as_deref()));
        let ok = checks.iter().all(|c| c.ok);
        all_ok &= ok;
        let _ = writeln!(report, "\n{} ({}, {})", b.name, b.store_uri, b.origin);
        for c in &checks {
            let _ = writeln!(
                report,
                "  [{}] {:<10} {}",
                if c.ok { " ok " } else { "FAIL" },
                c.what,
                c.detail
            );
        }
        let verdict = match checks.iter().find(|c| !c.ok) {
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
