//! The administrator's commands: `status` (a table, or `--json`; with a broken config the error
//! and the running supervisor's state), `up NAME`, `down NAME`, and `doctor` (`doctor.rs`: one
//! report that checks every builder end to end).
//!
//! These are the only parts of the library that print to stdout; they talk to the supervisor
//! through its client, to builders through `ssh` and to the local daemon through `store` (its
//! version and the build hook it really runs: `daemon_hook.rs`), and never change a store but
//! for the daemon probe's one small `.drv`. The status table is a list of columns
//! ([`COLUMNS`]): a new column is one entry there.

mod daemon_hook;
mod doctor;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use doctor::{DoctorArgs, doctor};

use crate::config::{self, Builder, Config, ConfigPath};
use crate::supervisor::client::{Client, ClientError, StatusReport, Verdict};
use crate::supervisor::proto::{BuilderStatus, State};

/// Loads the TOML config the way the hook and the supervisor do; the file's name comes back
/// absolute (a supervisor it starts runs elsewhere, and `status` compares it with the one a
/// running supervisor serves).
pub fn load_config(path: &ConfigPath) -> Result<(Config, Option<PathBuf>), String> {
    let cfg = Config::load(path).map_err(|e| e.to_string())?;
    let named = path
        .named()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_owned()));
    Ok((cfg, named))
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
        State::AlwaysOn => "always-on",
    }
}

/// One column of the `status` table: its header and a builder's cell. The last column is not
/// padded (it may be long); add a column by adding a line to [`COLUMNS`].
struct Column {
    header: &'static str,
    cell: fn(&BuilderStatus) -> String,
}

const COLUMNS: &[Column] = &[
    Column {
        header: "BUILDER",
        cell: |s| s.name.clone(),
    },
    Column {
        header: "STATE",
        cell: |s| match (s.state, s.booting_ms) {
            (State::Booting, Some(b)) => format!("booting ({})", dur(Some(b))),
            (st, _) => state_name(st).to_owned(),
        },
    },
    // A qemu builder with `ssh-port = 0` gets another port at each boot.
    Column {
        header: "PORT",
        cell: |s| s.ssh_port.map_or_else(|| "-".to_owned(), |p| p.to_string()),
    },
    Column {
        header: "UPTIME",
        cell: |s| dur(s.uptime_ms),
    },
    Column {
        header: "IDLE STOP IN",
        cell: |s| dur(s.idle_stop_in_ms),
    },
    Column {
        header: "RUNNING BUILDS",
        cell: |s| lazy_only(s, s.leases),
    },
    Column {
        header: "BOOTS OK",
        cell: |s| lazy_only(s, s.boots_ok),
    },
    Column {
        header: "BOOTS FAILED",
        cell: |s| lazy_only(s, s.boots_failed),
    },
    // Warm connections (lazy and always-on builders alike); "-" where there is none.
    Column {
        header: "WARM",
        cell: |s| s.warm.as_ref().map_or_else(|| "-".to_owned(), warm_cell),
    },
    Column {
        header: "HAND-OUTS",
        cell: |s| {
            s.warm
                .as_ref()
                .map_or_else(|| "-".to_owned(), |w| w.hand_outs.to_string())
        },
    },
    Column {
        header: "LAST FAILURE",
        cell: |s| match (
            &s.last_failure,
            s.warm.as_ref().and_then(|w| w.last_failure.as_ref()),
        ) {
            (None, None) => "-".to_owned(),
            (None, Some(w)) => format!("warm connection: {w}"),
            (Some(f), _) if f.retry_in_ms > 0 => format!(
                "{} (not booted again for another {})",
                f.cause,
                dur(Some(f.retry_in_ms))
            ),
            (Some(f), _) => f.cause.clone(),
        },
    },
];

/// A count that only a lazy builder has (an always-on builder is neither leased nor booted).
fn lazy_only(s: &BuilderStatus, n: u32) -> String {
    if s.state == State::AlwaysOn {
        "-".to_owned()
    } else {
        n.to_string()
    }
}

/// The WARM cell: ready sessions (or "not connected") and those in use.
fn warm_cell(w: &crate::supervisor::proto::WarmStatus) -> String {
    let mut cell = if w.connected {
        format!("{} ready", w.ready)
    } else {
        "not connected".to_owned()
    };
    if w.in_use > 0 {
        let _ = write!(cell, ", {} in use", w.in_use);
    }
    cell
}

/// The `status` table.
pub fn status_table(list: &[BuilderStatus]) -> String {
    let mut rows: Vec<Vec<String>> = vec![COLUMNS.iter().map(|c| c.header.to_owned()).collect()];
    rows.extend(
        list.iter()
            .map(|s| COLUMNS.iter().map(|c| (c.cell)(s)).collect()),
    );
    let widths: Vec<usize> = (0..COLUMNS.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == COLUMNS.len() {
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
                 (there is no read-only status for other users): run it as root",
                socket.display()
            ))
        }
        _ => None,
    }
}

/// What a command prints: `error` (if any) on stderr first, with exit status 1, then `stdout`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Printed {
    pub stdout: String,
    pub error: Option<String>,
}

/// The config file this command reads, named or the default one, made absolute: what a
/// supervisor serving it reports (a supervisor started without `--config` serves the default).
pub(crate) fn config_file(path: &ConfigPath) -> PathBuf {
    std::path::absolute(&path.path).unwrap_or_else(|_| path.path.clone())
}

/// Whether two names of a config file are the same file.
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
}

/// The lines above the table: what is wrong with the supervisor's view of this config, and
/// what the configuration says that the measurements contradict.
fn status_warnings(
    report: &StatusReport,
    pid: u32,
    cfg: Option<&Config>,
    ours: &Path,
) -> Vec<String> {
    let mut w = Vec::new();
    match &report.config_file {
        Some(theirs) if !same_file(theirs, ours) => w.push(format!(
            "warning: the supervisor (pid {pid}) serves {}, not {}: the builders below are \
             that file's",
            theirs.display(),
            ours.display()
        )),
        None => w.push(format!(
            "warning: the supervisor (pid {pid}) was started without a config file to read \
             again; it does not follow changes to {}",
            ours.display()
        )),
        _ => {}
    }
    // (A config this command could not load either is the error already shown above.)
    if let Some(e) = report.config_error.as_ref().filter(|_| cfg.is_some()) {
        w.push(format!(
            "warning: the supervisor (pid {pid}) could not reload its config, so it runs the \
             one it had: {e}"
        ));
    }
    for s in &report.builders {
        if s.boot_settings_outdated {
            w.push(format!(
                "note: '{}' runs with boot settings its config no longer has; they apply from \
                 its next boot",
                s.name
            ));
        }
        if let (Some(cfg), Some(expected)) = (cfg, s.expected_boot_ms)
            && let Some(b) = cfg.builders.iter().find(|b| b.name == s.name)
            && let Some(w_) = boot_timeout_warning(b, expected)
        {
            w.push(w_);
        }
    }
    w
}

/// A boot-timeout below the boot time the supervisor measured (`expected_ms`).
pub(crate) fn boot_timeout_warning(b: &Builder, expected_ms: u64) -> Option<String> {
    let timeout = b.lazy.as_ref()?.boot_timeout;
    (u128::from(expected_ms) > timeout.as_millis()).then(|| {
        format!(
            "warning: '{}': boot-timeout ({}) is below the {} its recent boots took: its \
             boots will time out; raise boot-timeout",
            b.name,
            humantime::format_duration(timeout),
            dur(Some(expected_ms.div_ceil(1000) * 1000))
        )
    })
}

/// `status [--json]`: asks the running supervisor; without one every lazy builder is down. A
/// config that does not load is the error, and the running supervisor's state (as it loaded its
/// config before) is shown below it.
pub fn status(config: &ConfigPath, json: bool) -> Printed {
    let (cfg, state_dir, error) = match load_config(config) {
        Ok((cfg, _)) => {
            let dir = cfg.supervisor.state_dir.clone();
            (Some(cfg), dir, None)
        }
        Err(e) => (None, Config::state_dir_hint(config), Some(e)),
    };
    let fail = |e: String| Printed {
        stdout: String::new(),
        error: Some(e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    let asked = rt.block_on(async {
        let mut c = Client::connect(&state_dir).await?;
        let report = c.status_report().await?;
        Ok::<_, ClientError>((c.supervisor_pid(), report))
    });
    let (list, header) = match (asked, &cfg) {
        (Ok((pid, report)), _) => {
            let mut header = status_warnings(&report, pid, cfg.as_ref(), &config_file(config));
            if error.is_some() {
                header.insert(
                    0,
                    format!(
                        "the running supervisor (pid {pid}) keeps the configuration it loaded \
                         before:"
                    ),
                );
            }
            (report.builders, header)
        }
        (Err(e), _) if root_only("nix-lazy-builder status", &e).is_some() => {
            let m = root_only("nix-lazy-builder status", &e).unwrap_or_default();
            return fail(match error {
                Some(err) => format!("{err}\n{m}"),
                None => m,
            });
        }
        (Err(_), None) => {
            let e = error.unwrap_or_default();
            return fail(format!(
                "{e}\n(no supervisor is running on {})",
                state_dir.display()
            ));
        }
        (Err(_), Some(cfg)) => (
            cfg.builders
                .iter()
                .filter(|b| b.is_lazy())
                .map(|b| down_status(&b.name))
                .collect(),
            Vec::new(),
        ),
    };
    let stdout = if json {
        match serde_json::to_string_pretty(&list) {
            Ok(s) => s + "\n",
            Err(e) => return fail(e.to_string()),
        }
    } else {
        let mut out = String::new();
        for h in &header {
            out.push_str(h);
            out.push('\n');
        }
        out + &status_table(&list)
    };
    Printed { stdout, error }
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
        boots_ok: 0,
        boots_failed: 0,
        boot_settings_outdated: false,
        last_failure: None,
        nix_version: None,
        warm: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::proto::Failure;

    #[test]
    fn table_shows_every_column() {
        let mut a = down_status("aarch64");
        a.state = State::Up;
        a.ssh_port = Some(40123);
        a.uptime_ms = Some(125_000);
        a.idle_stop_in_ms = Some(600_000);
        a.leases = 2;
        a.boots = 5;
        a.boots_ok = 3;
        a.boots_failed = 1;
        let mut b = down_status("darwin");
        b.state = State::Failed;
        b.boots = 1;
        b.boots_failed = 1;
        b.last_failure = Some(Failure {
            cause: "boot timed out".into(),
            at_unix: 0,
            retry_in_ms: 20_000,
            consecutive: 1,
        });
        a.warm = Some(crate::supervisor::proto::WarmStatus {
            connected: true,
            ready: 2,
            in_use: 1,
            hand_outs: 14,
            closes_in_ms: None,
            last_failure: None,
        });
        let mut c = down_status("ssh://root@x86");
        c.state = State::AlwaysOn;
        c.warm = Some(crate::supervisor::proto::WarmStatus {
            connected: false,
            hand_outs: 3,
            last_failure: Some("HOST KEY MISMATCH".into()),
            ..Default::default()
        });
        let t = status_table(&[a, b, c]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            [
                "BUILDER         STATE      PORT   UPTIME  IDLE STOP IN  RUNNING BUILDS  BOOTS OK  \
                 BOOTS FAILED  WARM               HAND-OUTS  LAST FAILURE",
                "aarch64         up         40123  2m05s   10m00s        2               3         \
                 1             2 ready, 1 in use  14         -",
                "darwin          failed     -      -       -             0               0         \
                 1             -                  -          boot timed out (not booted again for \
                 another 20s)",
                "ssh://root@x86  always-on  -      -       -             -               -         \
                 -             not connected      3          warm connection: HOST KEY MISMATCH",
            ],
            "{t}"
        );
    }

    #[test]
    fn a_supervisor_of_another_file_and_a_short_boot_timeout_are_warned_about() {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMgA1IttnKZ+MappTuhYemF0nJtsVKfRo1KMuz46g540";
        let cfg = Config::parse(
            &format!(
                "[builders.vm]\nuri = \"ssh://root@127.0.0.1:2\"\nsystems = [\"aarch64-linux\"]\n\
                 host-key = \"{key}\"\nboot-timeout = \"20s\"\n[builders.vm.boot]\n\
                 kind = \"command\"\ncommand = [\"/start\"]\n"
            ),
            Path::new("/etc/mine.toml"),
        )
        .unwrap();
        let mut vm = down_status("vm");
        vm.expected_boot_ms = Some(33_400);
        let report = StatusReport {
            builders: vec![vm],
            config_file: Some("/etc/other.toml".into()),
            config_error: Some("/etc/other.toml:3:1: unknown key `x`".into()),
        };
        let w = status_warnings(&report, 42, Some(&cfg), Path::new("/etc/mine.toml"));
        assert_eq!(
            w,
            [
                "warning: the supervisor (pid 42) serves /etc/other.toml, not /etc/mine.toml: \
                 the builders below are that file's",
                "warning: the supervisor (pid 42) could not reload its config, so it runs the one \
                 it had: /etc/other.toml:3:1: unknown key `x`",
                "warning: 'vm': boot-timeout (20s) is below the 34s its recent boots took: its \
                 boots will time out; raise boot-timeout"
            ]
        );
        // The same file under another name is the same file; a config this command could not
        // load is the error shown already.
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("mine.toml");
        std::fs::write(&real, "").unwrap();
        let report = StatusReport {
            config_file: Some(dir.path().join(".").join("mine.toml")),
            builders: vec![],
            ..report
        };
        assert!(status_warnings(&report, 42, None, &real).is_empty());
    }
}
