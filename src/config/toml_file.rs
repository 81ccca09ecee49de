//! The lazy-builder TOML file: its schema (`[supervisor]`, `[builders.NAME]`,
//! `[builders.NAME.boot]`), read ([`Config::load`]) and validated ([`Config::parse`]) into a
//! [`Config`], every error with its file, line, column and dotted key.
//!
//! The only files it reads are the one it is pointed at and the `host-key-file`s that file
//! names; it never reads the environment (`main` resolves [`ConfigPath`]) and never checks a
//! path other than by its shape (a `kernel` or `runner` that does not exist is `boot`'s error).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::error::ConfigError;
use super::host_key::{host_key_file, parse_key_lines};
use super::model::{
    Accel, BootSpec, Builder, CommandBoot, Config, ConfigPath, ConfigSource, DarlingBoot,
    HostKeySpec, LazySettings, Origin, QemuBoot, StopSignal, SupervisorSettings,
};
use super::uri::BuilderUri;
use super::words::user_words;
use super::{CONFIG_ENV_VAR, DEFAULT_BOOT_TIMEOUT, DEFAULT_IDLE_TIMEOUT};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFile {
    supervisor: Option<RawSupervisor>,
    #[serde(default)]
    builders: BTreeMap<Spanned<String>, Spanned<RawBuilder>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawSupervisor {
    state_dir: Option<Spanned<String>>,
    keep_warm: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawBuilder {
    uri: Spanned<String>,
    systems: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    features: Vec<Spanned<String>>,
    #[serde(default)]
    mandatory_features: Vec<Spanned<String>>,
    max_jobs: Option<Spanned<i64>>,
    speed_factor: Option<Spanned<f64>>,
    ssh_key: Option<Spanned<String>>,
    host_key: Option<Spanned<String>>,
    host_key_file: Option<Spanned<String>>,
    allow_well_known_host_key: Option<Spanned<bool>>,
    idle_timeout: Option<Spanned<String>>,
    boot_timeout: Option<Spanned<String>>,
    boot_for_local: Option<Spanned<bool>>,
    keep_warm: Option<Spanned<String>>,
    boot: Option<Spanned<RawBoot>>,
}

// One flat struct for every backend (instead of a serde-tagged enum) so that every error keeps
// the exact span of the offending key; keys that do not belong to `kind` are rejected by hand.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawBoot {
    kind: Spanned<String>,
    // command
    command: Option<Spanned<Vec<String>>>,
    stop_command: Option<Spanned<Vec<String>>>,
    stop_signal: Option<Spanned<String>>,
    // darling
    prefix: Option<Spanned<String>>,
    sshd_config: Option<Spanned<String>>,
    // qemu
    binary: Option<Spanned<String>>,
    accel: Option<Spanned<String>>,
    cpus: Option<Spanned<i64>>,
    memory: Option<Spanned<toml::Value>>,
    kernel: Option<Spanned<String>>,
    initrd: Option<Spanned<String>>,
    append: Option<Spanned<String>>,
    disk: Option<Spanned<String>>,
    ephemeral: Option<Spanned<bool>>,
    drives: Option<Spanned<Vec<String>>>,
    ssh_port: Option<Spanned<i64>>,
    runner: Option<Spanned<String>>,
    machine: Option<Spanned<String>>,
    cpu: Option<Spanned<String>>,
    extra_args: Option<Spanned<Vec<String>>>,
    snapshot: Option<Spanned<bool>>,
    // qemu and command
    environment: Option<Spanned<BTreeMap<String, String>>>,
}

impl RawBoot {
    /// (key, span) of every key that was given, `kind` excluded.
    fn present(&self) -> Vec<(&'static str, Range<usize>)> {
        fn s<T>(key: &'static str, v: &Option<Spanned<T>>) -> Option<(&'static str, Range<usize>)> {
            v.as_ref().map(|v| (key, v.span()))
        }
        [
            s("command", &self.command),
            s("stop-command", &self.stop_command),
            s("stop-signal", &self.stop_signal),
            s("prefix", &self.prefix),
            s("sshd-config", &self.sshd_config),
            s("binary", &self.binary),
            s("accel", &self.accel),
            s("cpus", &self.cpus),
            s("memory", &self.memory),
            s("kernel", &self.kernel),
            s("initrd", &self.initrd),
            s("append", &self.append),
            s("disk", &self.disk),
            s("ephemeral", &self.ephemeral),
            s("drives", &self.drives),
            s("ssh-port", &self.ssh_port),
            s("runner", &self.runner),
            s("machine", &self.machine),
            s("cpu", &self.cpu),
            s("extra-args", &self.extra_args),
            s("snapshot", &self.snapshot),
            s("environment", &self.environment),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

const COMMAND_KEYS: &[&str] = &["command", "stop-command", "stop-signal", "environment"];
const DARLING_KEYS: &[&str] = &["prefix", "sshd-config"];
const QEMU_KEYS: &[&str] = &[
    "binary",
    "accel",
    "cpus",
    "memory",
    "kernel",
    "initrd",
    "append",
    "disk",
    "ephemeral",
    "drives",
    "ssh-port",
    "runner",
    "machine",
    "cpu",
    "extra-args",
    "snapshot",
    "environment",
];

/// Whether a QEMU `-drive` value opens its image read-only (`readonly=on`, or a bare
/// `readonly`; the last one given wins, as in QEMU's option parser). `,,` is an escaped comma.
fn drive_is_read_only(drive: &str) -> bool {
    let mut ro = false;
    let unescaped = drive.replace(",,", "\u{0}");
    for opt in unescaped.split(',') {
        let (k, v) = opt.split_once('=').unwrap_or((opt, "on"));
        if k == "readonly" {
            ro = matches!(v, "on" | "yes" | "true" | "y");
        }
    }
    ro
}

/// Error construction with file, line, column and key.
struct TomlCtx<'a> {
    path: &'a Path,
    text: &'a str,
    dir: PathBuf,
}

impl TomlCtx<'_> {
    fn err(
        &self,
        span: Range<usize>,
        key: Option<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = line_col(self.text, span.start);
        ConfigError::Toml {
            path: self.path.to_owned(),
            line,
            column,
            key: key.or_else(|| key_at(self.text, span.start)),
            message: message.into(),
        }
    }

    /// A duration like `"15m"` (humantime's grammar) for `key`.
    fn duration(&self, v: &Spanned<String>, key: Option<String>) -> Result<Duration, ConfigError> {
        humantime::parse_duration(v.get_ref().trim()).map_err(|e| {
            self.err(
                v.span(),
                key,
                format!("'{}' is not a duration like \"15m\": {e}", v.get_ref()),
            )
        })
    }

    /// Resolve a path from the config: relative paths are relative to the config file's
    /// directory (the hook runs with cwd `/`, so cwd-relative paths would surprise).
    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.dir.join(p)
        }
    }
}

fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let before = text.get(..pos.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Best-effort dotted key at a byte offset, from the source text: the nearest table header
/// above plus the `key =` on (or above, for multi-line arrays) the line.
fn key_at(text: &str, pos: usize) -> Option<String> {
    let pos = pos.min(text.len());
    let line_end = text
        .get(pos..)
        .and_then(|t| t.find('\n'))
        .map_or(text.len(), |i| pos + i);
    let upto = text.get(..line_end)?;
    let mut key: Option<String> = None;
    for line in upto.lines().rev() {
        let t = line.trim();
        if let Some(header) = t.strip_prefix('[') {
            let header = header.trim_start_matches('[');
            let header = header.split(']').next().unwrap_or("").trim();
            // An empty header (`[]`, a syntax error) names nothing.
            return match key {
                _ if header.is_empty() => key,
                Some(k) => Some(format!("{header}.{k}")),
                None => Some(header.to_owned()),
            };
        }
        if key.is_none()
            && let Some((k, _)) = t.split_once('=')
        {
            let k = k.trim();
            if !k.is_empty()
                && k.chars().all(|c| {
                    // A quoted key may hold escapes (`"\u0000" = 1`).
                    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '"' | ' ' | '\\')
                })
            {
                key = Some(k.to_owned());
            }
        }
    }
    key
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_word(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c == ',')
}

/// Parse `"1G"`, `"512M"`, `"2GiB"` or a bare number (MiB) into MiB.
fn parse_memory(value: &toml::Value) -> Result<u64, String> {
    let mib = match value {
        toml::Value::Integer(i) => u64::try_from(*i).map_err(|_| "must be positive".to_owned())?,
        toml::Value::String(s) => {
            let s = s.trim();
            let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (num, unit) = s.split_at(digits_end);
            let num: u64 = num
                .parse()
                .map_err(|_| format!("'{s}' is not a size like \"1G\" or \"512M\""))?;
            let unit = unit.trim().to_ascii_uppercase();
            let unit = unit
                .strip_suffix("IB")
                .or_else(|| unit.strip_suffix('B'))
                .unwrap_or(&unit);
            let factor: u64 = match unit {
                "" | "M" => 1,
                "G" => 1024,
                "T" => 1024 * 1024,
                _ => return Err(format!("'{s}' has an unknown unit (use M, G or T)")),
            };
            num.checked_mul(factor)
                .ok_or_else(|| format!("'{s}' is too large"))?
        }
        _ => return Err("must be a size string like \"1G\" or a number of MiB".to_owned()),
    };
    if mib == 0 {
        return Err("must be at least 1 MiB".to_owned());
    }
    Ok(mib)
}

impl Config {
    /// Read the config named by `path`. A missing file is fine at the default path (no lazy
    /// builders) and an error when it was named explicitly.
    pub fn load(path: &ConfigPath) -> Result<Config, ConfigError> {
        match std::fs::read(&path.path) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| ConfigError::TomlRead {
                    path: path.path.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidData, "not valid UTF-8"),
                })?;
                Config::parse(&text, &path.path)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match path.source {
                ConfigSource::Default => Ok(Config::default()),
                ConfigSource::Env => Err(ConfigError::TomlMissing {
                    path: path.path.clone(),
                    source_name: format!("${CONFIG_ENV_VAR}"),
                }),
                ConfigSource::Cli => Err(ConfigError::TomlMissing {
                    path: path.path.clone(),
                    source_name: "--config".to_owned(),
                }),
            },
            Err(source) => Err(ConfigError::TomlRead {
                path: path.path.clone(),
                source,
            }),
        }
    }

    /// The state directory of a config that does not load (to find its supervisor anyway):
    /// the `[supervisor] state-dir` it names if it is TOML that says so, else the default.
    pub fn state_dir_hint(path: &ConfigPath) -> PathBuf {
        std::fs::read_to_string(&path.path)
            .ok()
            .and_then(|text| text.parse::<toml::Table>().ok())
            .and_then(|t| {
                t.get("supervisor")?
                    .get("state-dir")?
                    .as_str()
                    .map(PathBuf::from)
            })
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| SupervisorSettings::default().state_dir)
    }

    /// Parse and validate config text that was read from `path` (used in messages and to
    /// resolve relative paths). Reads `host-key-file`s.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let ctx = TomlCtx {
            path,
            text,
            dir: path.parent().map(Path::to_owned).unwrap_or_default(),
        };
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| ctx.err(e.span().unwrap_or(0..0), None, user_words(e.message())))?;
        let (state_dir, keep_warm) = match raw.supervisor {
            None => (None, None),
            Some(s) => (s.state_dir, s.keep_warm),
        };
        let mut supervisor = SupervisorSettings::default();
        if let Some(dir) = state_dir {
            if !Path::new(dir.get_ref()).is_absolute() {
                return Err(ctx.err(
                    dir.span(),
                    Some("supervisor.state-dir".to_owned()),
                    "must be an absolute path",
                ));
            }
            supervisor.state_dir = PathBuf::from(dir.into_inner());
        }
        if let Some(k) = keep_warm {
            supervisor.keep_warm = ctx.duration(&k, Some("supervisor.keep-warm".to_owned()))?;
        }
        let mut entries: Vec<_> = raw.builders.into_iter().collect();
        // File order, so that table order (the last tie-breaker) is what the user wrote.
        entries.sort_by_key(|(name, b)| (b.span().start, name.span().start));
        let mut builders = Vec::with_capacity(entries.len());
        for (name, raw) in entries {
            builders.push(builder_from_toml(&ctx, name, raw, &supervisor)?);
        }
        Ok(Config {
            path: Some(path.to_owned()),
            supervisor,
            builders,
        })
    }
}

fn builder_from_toml(
    ctx: &TomlCtx<'_>,
    name: Spanned<String>,
    raw: Spanned<RawBuilder>,
    supervisor: &SupervisorSettings,
) -> Result<Builder, ConfigError> {
    let name_span = name.span();
    let name = name.into_inner();
    let table_span = raw.span();
    let raw = raw.into_inner();
    let key = |k: &str| Some(format!("builders.{name}.{k}"));
    if !valid_name(&name) {
        return Err(ctx.err(
            name_span,
            Some(format!("builders.{name}")),
            "builder names may only contain letters, digits, '_' and '-'",
        ));
    }

    let uri_text = raw.uri.get_ref().trim().to_owned();
    let uri = BuilderUri::parse(&uri_text)
        .map_err(|e| ctx.err(raw.uri.span(), key("uri"), e.to_string()))?;

    let systems_span = raw.systems.span();
    let mut systems = BTreeSet::new();
    for s in raw.systems.into_inner() {
        if !valid_word(s.get_ref()) {
            return Err(ctx.err(
                s.span(),
                key("systems"),
                format!("'{}' is not a system name", s.get_ref()),
            ));
        }
        systems.insert(s.into_inner());
    }
    if systems.is_empty() {
        return Err(ctx.err(
            systems_span,
            key("systems"),
            "must list at least one system",
        ));
    }
    let features = |list: Vec<Spanned<String>>, k: &str| -> Result<BTreeSet<String>, ConfigError> {
        list.into_iter()
            .map(|f| {
                if valid_word(f.get_ref()) {
                    Ok(f.into_inner())
                } else {
                    Err(ctx.err(
                        f.span(),
                        key(k),
                        format!("'{}' is not a feature name", f.get_ref()),
                    ))
                }
            })
            .collect()
    };
    let supported_features = features(raw.features, "features")?;
    let mandatory_features = features(raw.mandatory_features, "mandatory-features")?;

    let max_jobs = match raw.max_jobs {
        None => 1,
        Some(m) => match u32::try_from(*m.get_ref()) {
            Ok(v) if v >= 1 => v,
            _ => return Err(ctx.err(m.span(), key("max-jobs"), "must be a whole number >= 1")),
        },
    };
    let speed_factor = match raw.speed_factor {
        None => 1.0,
        Some(s) => {
            let v = *s.get_ref();
            if !v.is_finite() || v < 0.0 {
                return Err(ctx.err(s.span(), key("speed-factor"), "must be a number >= 0"));
            }
            if v == 0.0 { 1.0 } else { v }
        }
    };
    let ssh_key = raw.ssh_key.map(|k| ctx.path(k.get_ref()));

    let host_keys = match (raw.host_key, raw.host_key_file) {
        (Some(_), Some(f)) => {
            return Err(ctx.err(
                f.span(),
                key("host-key-file"),
                "give either host-key or host-key-file, not both",
            ));
        }
        (None, None) => {
            return Err(ctx.err(
                table_span,
                Some(format!("builders.{name}")),
                "a host key is required: set host-key (a public key line) or host-key-file (a known_hosts or .pub file)",
            ));
        }
        (Some(k), None) => HostKeySpec::Pinned(
            parse_key_lines(k.get_ref()).map_err(|e| ctx.err(k.span(), key("host-key"), e))?,
        ),
        (None, Some(f)) => {
            let file = ctx.path(f.get_ref());
            host_key_file(&file).map_err(|e| {
                ctx.err(
                    f.span(),
                    key("host-key-file"),
                    format!("'{}': {e}", file.display()),
                )
            })?
        }
    };

    let duration = |v: &Spanned<String>, k: &str| ctx.duration(v, key(k));
    let keep_warm = match &raw.keep_warm {
        None => supervisor.keep_warm,
        Some(v) => duration(v, "keep-warm")?,
    };
    let lazy = match raw.boot {
        None => {
            for (k, span) in [
                ("idle-timeout", raw.idle_timeout.as_ref().map(Spanned::span)),
                ("boot-timeout", raw.boot_timeout.as_ref().map(Spanned::span)),
                (
                    "boot-for-local",
                    raw.boot_for_local.as_ref().map(Spanned::span),
                ),
            ] {
                if let Some(span) = span {
                    return Err(ctx.err(
                        span,
                        key(k),
                        "only applies to lazy builders; add a [builders.NAME.boot] section or remove it",
                    ));
                }
            }
            None
        }
        Some(boot) => {
            let idle_timeout = match &raw.idle_timeout {
                None => Some(DEFAULT_IDLE_TIMEOUT),
                Some(v) => Some(duration(v, "idle-timeout")?).filter(|d| !d.is_zero()),
            };
            let boot_timeout = match &raw.boot_timeout {
                None => DEFAULT_BOOT_TIMEOUT,
                Some(v) => {
                    let d = duration(v, "boot-timeout")?;
                    if d.is_zero() {
                        return Err(ctx.err(
                            v.span(),
                            key("boot-timeout"),
                            "must be longer than 0s",
                        ));
                    }
                    d
                }
            };
            Some(LazySettings {
                idle_timeout,
                boot_timeout,
                boot_for_local: raw.boot_for_local.map(Spanned::into_inner).unwrap_or(false),
                boot: boot_from_toml(ctx, &name, boot)?,
            })
        }
    };

    Ok(Builder {
        name: name.clone(),
        uri,
        store_uri: uri_text,
        systems,
        ssh_key,
        max_jobs,
        speed_factor,
        supported_features,
        mandatory_features,
        host_keys,
        allow_well_known_host_key: raw
            .allow_well_known_host_key
            .map(Spanned::into_inner)
            .unwrap_or(false),
        origin: Origin::Toml {
            file: ctx.path.to_owned(),
            name,
        },
        lazy,
        keep_warm,
    })
}

fn boot_from_toml(
    ctx: &TomlCtx<'_>,
    name: &str,
    boot: Spanned<RawBoot>,
) -> Result<BootSpec, ConfigError> {
    let boot_span = boot.span();
    let b = boot.into_inner();
    let key = |k: &str| Some(format!("builders.{name}.boot.{k}"));
    let kind = b.kind.get_ref().as_str();
    let allowed: &[&str] = match kind {
        "qemu" => QEMU_KEYS,
        "darling" => DARLING_KEYS,
        "command" => COMMAND_KEYS,
        other => {
            return Err(ctx.err(
                b.kind.span(),
                key("kind"),
                format!(
                    "unknown boot kind '{other}', expected \"qemu\", \"darling\" or \"command\""
                ),
            ));
        }
    };
    for (k, span) in b.present() {
        if !allowed.contains(&k) {
            return Err(ctx.err(
                span,
                key(k),
                format!("does not apply to boot kind \"{kind}\""),
            ));
        }
    }
    let argv = |v: Spanned<Vec<String>>, k: &str| -> Result<Vec<String>, ConfigError> {
        if v.get_ref().first().is_none_or(|p| p.is_empty()) {
            return Err(ctx.err(
                v.span(),
                key(k),
                "must be a non-empty list: [\"program\", \"arg\", …]",
            ));
        }
        Ok(v.into_inner())
    };
    Ok(match kind {
        "command" => {
            let Some(command) = b.command else {
                return Err(ctx.err(
                    boot_span,
                    key("command"),
                    "boot kind \"command\" needs command = [\"program\", …]",
                ));
            };
            let stop_signal = match b.stop_signal {
                None => StopSignal::Term,
                Some(s) => parse_stop_signal(s.get_ref()).ok_or_else(|| {
                    ctx.err(
                        s.span(),
                        key("stop-signal"),
                        format!(
                            "unknown signal '{}' (use TERM, INT, HUP, QUIT, KILL, USR1 or USR2)",
                            s.get_ref()
                        ),
                    )
                })?,
            };
            BootSpec::Command(CommandBoot {
                command: argv(command, "command")?,
                stop_command: b
                    .stop_command
                    .map(|c| argv(c, "stop-command"))
                    .transpose()?,
                stop_signal,
                environment: b.environment.map(Spanned::into_inner).unwrap_or_default(),
            })
        }
        "darling" => {
            let Some(prefix) = b.prefix else {
                return Err(ctx.err(
                    boot_span,
                    key("prefix"),
                    "boot kind \"darling\" needs prefix = \"/path/to/prefix\"",
                ));
            };
            BootSpec::Darling(DarlingBoot {
                prefix: ctx.path(prefix.get_ref()),
                sshd_config: b
                    .sshd_config
                    .map(|s| PathBuf::from(s.into_inner()))
                    .unwrap_or_else(|| PathBuf::from("/etc/ssh/sshd_config")),
            })
        }
        _ => {
            let accel = match b.accel {
                None => None,
                Some(a) => Some(match a.get_ref().as_str() {
                    "auto" => Accel::Auto,
                    "kvm" => Accel::Kvm,
                    "hvf" => Accel::Hvf,
                    "tcg" => Accel::Tcg,
                    other => {
                        return Err(ctx.err(
                            a.span(),
                            key("accel"),
                            format!("unknown accelerator '{other}', expected \"auto\", \"kvm\", \"hvf\" or \"tcg\""),
                        ));
                    }
                }),
            };
            let cpus = match b.cpus {
                None => None,
                Some(c) => match u32::try_from(*c.get_ref()) {
                    Ok(v) if v >= 1 => Some(v),
                    _ => return Err(ctx.err(c.span(), key("cpus"), "must be a whole number >= 1")),
                },
            };
            let memory_mib = match &b.memory {
                None => None,
                Some(m) => Some(
                    parse_memory(m.get_ref()).map_err(|e| ctx.err(m.span(), key("memory"), e))?,
                ),
            };
            let ssh_port = match b.ssh_port {
                None => None,
                Some(p) => match u16::try_from(*p.get_ref()) {
                    Ok(v) => Some(v),
                    Err(_) => {
                        return Err(ctx.err(
                            p.span(),
                            key("ssh-port"),
                            "must be a port number (0 = pick a free one)",
                        ));
                    }
                },
            };
            let has_image = b.kernel.is_some()
                || b.disk.is_some()
                || b.drives.as_ref().is_some_and(|d| !d.get_ref().is_empty());
            if let Some(runner) = &b.runner {
                for (k, span) in [
                    ("kernel", b.kernel.as_ref().map(Spanned::span)),
                    ("initrd", b.initrd.as_ref().map(Spanned::span)),
                    ("append", b.append.as_ref().map(Spanned::span)),
                    ("disk", b.disk.as_ref().map(Spanned::span)),
                    ("drives", b.drives.as_ref().map(Spanned::span)),
                ] {
                    if let Some(span) = span {
                        return Err(ctx.err(
                            span,
                            key(k),
                            "cannot be combined with runner (the runner script defines the VM)",
                        ));
                    }
                }
                let _ = runner;
            } else if !has_image {
                return Err(ctx.err(
                    boot_span,
                    Some(format!("builders.{name}.boot")),
                    "boot kind \"qemu\" needs runner, kernel, disk or drives",
                ));
            }
            for (k, v) in [("initrd", &b.initrd), ("append", &b.append)] {
                if let Some(v) = v
                    && b.kernel.is_none()
                {
                    return Err(ctx.err(v.span(), key(k), "needs kernel"));
                }
            }
            let ephemeral = b.ephemeral.as_ref().is_some_and(|e| *e.get_ref());
            if let Some(snap) = b.snapshot.as_ref().filter(|s| *s.get_ref()) {
                if b.runner.is_some() {
                    return Err(ctx.err(
                        snap.span(),
                        key("snapshot"),
                        "cannot be used with runner: the runner script's VM keeps its own writable disk image, which a restore cannot roll back",
                    ));
                }
                if let Some(d) = b.disk.as_ref().filter(|_| !ephemeral) {
                    return Err(ctx.err(
                        d.span(),
                        key("disk"),
                        "snapshot = true needs ephemeral = true: a restore cannot be consistent with a writable disk that outlives the snapshot",
                    ));
                }
                if let Some(d) = &b.drives
                    && let Some(w) = d.get_ref().iter().find(|v| !drive_is_read_only(v))
                {
                    return Err(ctx.err(
                        d.span(),
                        key("drives"),
                        format!("snapshot = true needs every extra drive read-only (readonly=on): '{w}' could be written, and a restore cannot roll it back"),
                    ));
                }
            }
            BootSpec::Qemu(Box::new(QemuBoot {
                binary: b.binary.map(Spanned::into_inner),
                accel,
                cpus,
                memory_mib,
                kernel: b.kernel.map(|k| ctx.path(k.get_ref())),
                initrd: b.initrd.map(|k| ctx.path(k.get_ref())),
                append: b.append.map(Spanned::into_inner),
                disk: b.disk.map(|k| ctx.path(k.get_ref())),
                ephemeral,
                drives: b.drives.map(Spanned::into_inner).unwrap_or_default(),
                ssh_port,
                runner: b.runner.map(|k| ctx.path(k.get_ref())),
                machine: b.machine.map(Spanned::into_inner),
                cpu: b.cpu.map(Spanned::into_inner),
                extra_args: b.extra_args.map(Spanned::into_inner).unwrap_or_default(),
                environment: b.environment.map(Spanned::into_inner).unwrap_or_default(),
                snapshot: b.snapshot.map(Spanned::into_inner).unwrap_or(false),
            }))
        }
    })
}

/// `TERM`, `SIGTERM`, `sigterm`, … (the signals a `stop-signal` may name).
fn parse_stop_signal(s: &str) -> Option<StopSignal> {
    let s = s.trim();
    let s = s
        .strip_prefix("SIG")
        .or_else(|| s.strip_prefix("sig"))
        .unwrap_or(s);
    Some(match s.to_ascii_uppercase().as_str() {
        "TERM" => StopSignal::Term,
        "INT" => StopSignal::Int,
        "HUP" => StopSignal::Hup,
        "QUIT" => StopSignal::Quit,
        "KILL" => StopSignal::Kill,
        "USR1" => StopSignal::Usr1,
        "USR2" => StopSignal::Usr2,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{ECDSA, ED25519, MINI, mini, set, toml_err, toml_ok};
    use super::super::{DEFAULT_STATE_DIR, HostKeySpec};
    use super::*;

    fn full_example() -> String {
        format!(
            r#"
[supervisor]
state-dir = "/var/lib/lb"

[builders.zeta]
uri = "ssh://builder@10.0.0.2"
systems = ["x86_64-linux"]
host-key = "{ECDSA}"

[builders.aarch64]
uri = "ssh-ng://root@127.0.0.1:31022"
systems = ["aarch64-linux"]
features = ["big-parallel"]
mandatory-features = []
max-jobs = 2
speed-factor = 1
ssh-key = "keys/id_ed25519"
host-key = "{ED25519}"
idle-timeout = "15m"
boot-timeout = "2m"
boot-for-local = false

[builders.aarch64.boot]
kind = "qemu"
accel = "tcg"
cpus = 2
memory = "1G"
kernel = "/vm/kernel"
initrd = "/vm/initrd"
append = "console=ttyAMA0"
disk = "/vm/disk.qcow2"
ephemeral = true
ssh-port = 0
extra-args = ["-nographic"]
environment = {{ NIX_DISK_IMAGE = "/var/lib/vm.qcow2" }}

[builders.darwin]
uri = "ssh://root@127.0.0.1:32022"
systems = ["x86_64-darwin"]
host-key = "{ED25519}"
idle-timeout = "0s"
[builders.darwin.boot]
kind = "darling"
prefix = "/var/lib/darling-builder"

[builders.cmd]
uri = "ssh://u@h"
systems = ["riscv64-linux"]
host-key = "{ED25519}"
speed-factor = 0.5
boot-for-local = true
[builders.cmd.boot]
kind = "command"
command = ["/bin/start", "--fg"]
stop-command = ["/bin/stop"]
stop-signal = "SIGINT"
"#
        )
    }

    #[test]
    fn full_toml_example() {
        let c = toml_ok(&full_example());
        assert_eq!(c.supervisor.state_dir, Path::new("/var/lib/lb"));
        let names: Vec<&str> = c.builders.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["zeta", "aarch64", "darwin", "cmd"], "file order");
        let zeta = &c.builders[0];
        assert!(zeta.lazy.is_none(), "no [boot] = always-on");
        assert_eq!((zeta.max_jobs, zeta.speed_factor), (1, 1.0));
        let a = &c.builders[1];
        assert_eq!(a.store_uri, "ssh-ng://root@127.0.0.1:31022");
        assert_eq!(a.uri.port, Some(31022));
        assert_eq!(a.systems, set(&["aarch64-linux"]));
        assert_eq!(a.supported_features, set(&["big-parallel"]));
        assert_eq!((a.max_jobs, a.speed_factor), (2, 1.0));
        assert_eq!(
            a.ssh_key.as_deref(),
            Some(Path::new("/etc/nix/keys/id_ed25519")),
            "relative to the config file"
        );
        assert!(matches!(&a.host_keys, HostKeySpec::Pinned(k) if k.len() == 1));
        assert_eq!(
            a.origin.to_string(),
            "builder 'aarch64' in /etc/nix/lazy-builder.toml"
        );
        let lazy = a.lazy.as_ref().unwrap();
        assert_eq!(lazy.idle_timeout, Some(Duration::from_secs(900)));
        assert_eq!(lazy.boot_timeout, Duration::from_secs(120));
        assert!(!lazy.boot_for_local);
        let BootSpec::Qemu(q) = &lazy.boot else {
            panic!()
        };
        assert_eq!(q.accel, Some(Accel::Tcg));
        assert_eq!(
            (q.cpus, q.memory_mib, q.ssh_port, q.ephemeral),
            (Some(2), Some(1024), Some(0), true)
        );
        assert_eq!(q.kernel.as_deref(), Some(Path::new("/vm/kernel")));
        assert_eq!(q.extra_args, ["-nographic"]);
        assert_eq!(
            q.environment.get("NIX_DISK_IMAGE").map(String::as_str),
            Some("/var/lib/vm.qcow2")
        );
        let d = c.builders[2].lazy.as_ref().unwrap();
        assert_eq!(d.idle_timeout, None, "0s = never stop");
        assert_eq!(d.boot_timeout, DEFAULT_BOOT_TIMEOUT);
        assert_eq!(
            d.boot,
            BootSpec::Darling(DarlingBoot {
                prefix: "/var/lib/darling-builder".into(),
                sshd_config: "/etc/ssh/sshd_config".into()
            })
        );
        let cmd = &c.builders[3];
        assert_eq!(cmd.speed_factor, 0.5);
        let l = cmd.lazy.as_ref().unwrap();
        assert!(l.boot_for_local);
        assert_eq!(l.idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
        let BootSpec::Command(cb) = &l.boot else {
            panic!()
        };
        assert_eq!(cb.command, ["/bin/start", "--fg"]);
        assert_eq!(
            cb.stop_command.as_deref(),
            Some(&["/bin/stop".to_owned()][..])
        );
        assert_eq!(cb.stop_signal, StopSignal::Int);
        assert_eq!(cb.stop_signal.as_raw(), libc::SIGINT);
    }

    #[test]
    fn empty_toml_is_no_builders() {
        let c = toml_ok("");
        assert!(c.builders.is_empty());
        assert_eq!(c.supervisor.state_dir, Path::new(DEFAULT_STATE_DIR));
    }

    #[test]
    fn keep_warm_per_builder_with_the_supervisor_default() {
        use super::super::DEFAULT_KEEP_WARM;
        let c = toml_ok(&mini(""));
        assert_eq!(c.supervisor.keep_warm, DEFAULT_KEEP_WARM);
        assert_eq!(c.builders[0].keep_warm, DEFAULT_KEEP_WARM);
        assert!(c.builders[0].warm());
        // The [supervisor] value is every builder's default; a builder's own wins, "0s" = off.
        let text = format!(
            "[supervisor]\nkeep-warm = \"2m\"\n{}[builders.c]\nuri = \"ssh://c\"\n\
             systems = [\"x86_64-linux\"]\nhost-key = \"{ED25519}\"\nkeep-warm = \"0s\"\n",
            mini("")
        );
        let c = toml_ok(&text);
        assert_eq!(c.supervisor.keep_warm, Duration::from_secs(120));
        assert_eq!(c.builders[0].keep_warm, Duration::from_secs(120));
        assert_eq!(c.builders[1].keep_warm, Duration::ZERO);
        assert!(!c.builders[1].warm());
        // Machines-table builders take the [supervisor] value.
        let (m, notes) =
            super::super::test_support::machines("ssh://root@a x86_64-linux", &[]).unwrap();
        let t = super::super::build_table(m, notes, &Default::default(), &c);
        assert_eq!(t.builders[0].keep_warm, Duration::from_secs(120));
        let (_, key, msg) = toml_err(&mini("keep-warm = \"soon\"\n"));
        assert_eq!(key.as_deref(), Some("builders.b.keep-warm"));
        assert!(msg.contains("not a duration"), "{msg}");
        let (_, key, _) = toml_err("[supervisor]\nkeep-warm = \"x\"\n");
        assert_eq!(key.as_deref(), Some("supervisor.keep-warm"));
    }

    #[test]
    fn toml_errors_name_line_and_key() {
        let (line, key, msg) = toml_err(&mini("bogus = 1\n"));
        assert_eq!((line, key.as_deref()), (5, Some("builders.b.bogus")));
        assert!(msg.contains("unknown key `bogus`"), "{msg}");
        let (line, key, msg) = toml_err(&mini("max-jobs = 0\n"));
        assert_eq!((line, key.as_deref()), (5, Some("builders.b.max-jobs")));
        assert!(msg.contains(">= 1"));
        let (line, key, _) = toml_err(&mini("max-jobs = -3\n"));
        assert_eq!((line, key.as_deref()), (5, Some("builders.b.max-jobs")));
        let (line, key, msg) = toml_err(&mini("speed-factor = \"fast\"\n"));
        assert_eq!(
            (line, key.as_deref()),
            (5, Some("builders.b.speed-factor")),
            "{msg}"
        );
        let (line, key, _) = toml_err(&mini("speed-factor = -1\n"));
        assert_eq!((line, key.as_deref()), (5, Some("builders.b.speed-factor")));
        let (line, _, msg) = toml_err("[builders.b]\nuri = \n");
        assert_eq!(line, 2, "{msg}");
        let text = "[supervisor]\nstate-dir = \"relative\"\n";
        assert_eq!(toml_err(text).1.as_deref(), Some("supervisor.state-dir"));
        let full = Config::parse(&mini("bogus = 1\n"), Path::new("/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            full.starts_with("/x.toml:5:1: builders.b.bogus: unknown key `bogus`"),
            "{full}"
        );
    }

    #[test]
    fn toml_validation() {
        let (line, key, msg) = toml_err(MINI);
        assert_eq!((line, key.as_deref()), (1, Some("builders.b")));
        assert!(msg.contains("host key is required"), "{msg}");
        let both = format!("{MINI}host-key = \"{ED25519}\"\nhost-key-file = \"/x\"\n");
        assert!(toml_err(&both).2.contains("not both"));
        let (line, key, msg) = toml_err(&format!("{MINI}host-key = \"ssh-ed25519 ???\"\n"));
        assert_eq!((line, key.as_deref()), (4, Some("builders.b.host-key")));
        assert!(msg.contains("not valid base64"), "{msg}");
        let no_systems =
            format!("[builders.b]\nuri = \"ssh://h\"\nsystems = []\nhost-key = \"{ED25519}\"\n");
        let (line, key, _) = toml_err(&no_systems);
        assert_eq!((line, key.as_deref()), (3, Some("builders.b.systems")));
        let no_systems = format!("[builders.b]\nuri = \"ssh://h\"\nhost-key = \"{ED25519}\"\n");
        assert!(toml_err(&no_systems).2.contains("missing key `systems`"));
        let bad_scheme = mini("").replace("ssh://h", "http://h");
        let (line, key, msg) = toml_err(&bad_scheme);
        assert_eq!((line, key.as_deref()), (2, Some("builders.b.uri")));
        assert!(msg.contains("only ssh:// and ssh-ng://"), "{msg}");
        let bare = mini("").replace("ssh://h", "root@h");
        assert!(toml_err(&bare).2.contains("not an SSH store"));
        let bad_name = mini("").replace("builders.b", "builders.\"a b\"");
        let (line, key, _) = toml_err(&bad_name);
        assert_eq!((line, key.as_deref()), (1, Some("builders.a b")));
        let (_, key, _) = toml_err(&mini("features = [\"a b\"]\n"));
        assert_eq!(key.as_deref(), Some("builders.b.features"));
        let (_, key, msg) = toml_err(&mini("idle-timeout = \"5m\"\n"));
        assert_eq!(key.as_deref(), Some("builders.b.idle-timeout"));
        assert!(msg.contains("only applies to lazy builders"));
    }

    fn boot(extra: &str) -> String {
        mini(&format!(
            "boot-timeout = \"30s\"\n[builders.b.boot]\n{extra}"
        ))
    }

    /// `snapshot = true` is refused where a restore cannot be consistent, naming the key.
    #[test]
    fn snapshot_key() {
        let ok = |extra: &str| {
            let text = boot(extra);
            let c = Config::parse(&text, Path::new("/etc/nix/lazy-builder.toml"))
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            match &c.builders[0].lazy.as_ref().unwrap().boot {
                BootSpec::Qemu(q) => q.snapshot,
                other => panic!("{other:?}"),
            }
        };
        assert!(ok("kind = \"qemu\"\nkernel = \"/k\"\nsnapshot = true\n"));
        assert!(!ok("kind = \"qemu\"\nkernel = \"/k\"\n"));
        assert!(ok(
            "kind = \"qemu\"\ndisk = \"/d\"\nephemeral = true\nsnapshot = true\n"
        ));
        assert!(ok(
            "kind = \"qemu\"\nkernel = \"/k\"\ndrives = [\"file=/x,,y,readonly=on\"]\nsnapshot = true\n"
        ));
        // A writable disk that outlives the snapshot.
        let (line, key, msg) = toml_err(&boot("kind = \"qemu\"\ndisk = \"/d\"\nsnapshot = true\n"));
        assert_eq!((line, key.as_deref()), (8, Some("builders.b.boot.disk")));
        assert!(msg.contains("ephemeral = true"), "{msg}");
        let (_, key, _) = toml_err(&boot(
            "kind = \"qemu\"\ndisk = \"/d\"\nephemeral = false\nsnapshot = true\n",
        ));
        assert_eq!(key.as_deref(), Some("builders.b.boot.disk"));
        // snapshot = false never refuses.
        assert!(!ok("kind = \"qemu\"\ndisk = \"/d\"\nsnapshot = false\n"));
        // Runners.
        let (_, key, msg) = toml_err(&boot(
            "kind = \"qemu\"\nrunner = \"/run-vm\"\nsnapshot = true\n",
        ));
        assert_eq!(key.as_deref(), Some("builders.b.boot.snapshot"));
        assert!(msg.contains("runner"), "{msg}");
        // Writable extra drives (an escaped ",,readonly=on" is part of the file name).
        for d in [
            "file=/x",
            "file=/x,readonly=off",
            "file=/x,,readonly=on",
            "file=/x,readonly,readonly=no",
        ] {
            let (_, key, msg) = toml_err(&boot(&format!(
                "kind = \"qemu\"\nkernel = \"/k\"\ndrives = [\"{d}\"]\nsnapshot = true\n"
            )));
            assert_eq!(key.as_deref(), Some("builders.b.boot.drives"), "{d}");
            assert!(msg.contains("readonly=on"), "{msg}");
        }
        assert!(drive_is_read_only("file=/x,readonly"));
        assert!(drive_is_read_only("readonly=yes,file=/x"));
        // Not a key of the other kinds.
        let (_, key, msg) = toml_err(&boot(
            "kind = \"command\"\ncommand = [\"/x\"]\nsnapshot = true\n",
        ));
        assert_eq!(key.as_deref(), Some("builders.b.boot.snapshot"));
        assert!(msg.contains("does not apply"), "{msg}");
    }

    #[test]
    fn boot_section_validation() {
        let (line, key, msg) = toml_err(&boot("kind = \"vbox\"\n"));
        assert_eq!((line, key.as_deref()), (7, Some("builders.b.boot.kind")));
        assert!(msg.contains("unknown boot kind 'vbox'"));
        let (line, key, msg) =
            toml_err(&boot("kind = \"command\"\ncommand = [\"/x\"]\ncpus = 2\n"));
        assert_eq!((line, key.as_deref()), (9, Some("builders.b.boot.cpus")));
        assert!(msg.contains("does not apply to boot kind \"command\""));
        // Sections refused with a message that says why.
        for (section, says) in [
            ("kind = \"command\"\n", "needs command"),
            ("kind = \"command\"\ncommand = []\n", "non-empty"),
            (
                "kind = \"command\"\ncommand = [\"/x\"]\nstop-signal = \"BOOM\"\n",
                "unknown signal",
            ),
            ("kind = \"darling\"\n", "needs prefix"),
            ("kind = \"qemu\"\n", "needs runner, kernel, disk or drives"),
            (
                "kind = \"qemu\"\ndisk = \"/d\"\ninitrd = \"/i\"\n",
                "needs kernel",
            ),
            (
                "kind = \"qemu\"\ndisk = \"/d\"\naccel = \"xen\"\n",
                "unknown accelerator",
            ),
            ("kind = \"qemu\"\ndisk = \"/d\"\ncpus = 0\n", ">= 1"),
            ("kind = \"qemu\"\ndisk = \"/d\"\nssh-port = 70000\n", "port"),
            (
                "kind = \"qemu\"\ndisk = \"/d\"\nmemory = \"1X\"\n",
                "unknown unit",
            ),
            ("kind = \"qemu\"\ndisk = \"/d\"\nmemory = 0\n", "at least"),
        ] {
            let msg = toml_err(&boot(section)).2;
            assert!(msg.contains(says), "{section:?}: {msg}");
        }
        let (_, key, msg) = toml_err(&boot(
            "kind = \"qemu\"\nrunner = \"/run-vm\"\ndisk = \"/d\"\n",
        ));
        assert_eq!(key.as_deref(), Some("builders.b.boot.disk"));
        assert!(msg.contains("runner"));
        let bad_timeout =
            mini("boot-timeout = \"soon\"\n[builders.b.boot]\nkind = \"qemu\"\ndisk = \"/d\"\n");
        let (line, key, msg) = toml_err(&bad_timeout);
        assert_eq!((line, key.as_deref()), (5, Some("builders.b.boot-timeout")));
        assert!(msg.contains("not a duration"));
        let zero =
            mini("boot-timeout = \"0s\"\n[builders.b.boot]\nkind = \"qemu\"\ndisk = \"/d\"\n");
        assert!(toml_err(&zero).2.contains("longer than 0s"));

        let c = toml_ok(&boot(
            "kind = \"qemu\"\nrunner = \"result/bin/run-vm\"\nmemory = 2048\nbinary = \"qemu-system-aarch64\"\n",
        ));
        let l = c.builders[0].lazy.as_ref().unwrap();
        assert_eq!(l.boot_timeout, Duration::from_secs(30));
        let BootSpec::Qemu(q) = &l.boot else { panic!() };
        assert_eq!(
            q.runner.as_deref(),
            Some(Path::new("/etc/nix/result/bin/run-vm"))
        );
        assert_eq!(
            (q.memory_mib, q.binary.as_deref(), q.accel),
            (Some(2048), Some("qemu-system-aarch64"), None)
        );
    }

    #[test]
    fn memory_sizes() {
        use toml::Value::{Integer, String as S};
        assert_eq!(parse_memory(&S("1G".into())), Ok(1024));
        assert_eq!(parse_memory(&S("1GiB".into())), Ok(1024));
        assert_eq!(parse_memory(&S("512m".into())), Ok(512));
        assert_eq!(parse_memory(&S("300".into())), Ok(300));
        assert_eq!(parse_memory(&S("2T".into())), Ok(2 * 1024 * 1024));
        assert_eq!(parse_memory(&Integer(64)), Ok(64));
        assert!(parse_memory(&Integer(-1)).is_err());
        assert!(parse_memory(&S("G".into())).is_err());
        assert!(parse_memory(&toml::Value::Boolean(true)).is_err());
    }

    #[test]
    fn host_key_files_and_loading() {
        let dir = tempfile::tempdir().unwrap();
        let pubf = dir.path().join("host.pub");
        std::fs::write(&pubf, format!("{ED25519}\n")).unwrap();
        let kh = dir.path().join("known_hosts");
        std::fs::write(
            &kh,
            format!("# comment\n[127.0.0.1]:31022 {ED25519}\n@cert-authority *.example {ECDSA}\n"),
        )
        .unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "this is not a key file\n").unwrap();
        let cfg_path = dir.path().join("lb.toml");
        let with = |file: &str| format!("{MINI}host-key-file = \"{file}\"\n");

        let c = Config::parse(&with("host.pub"), &cfg_path).unwrap();
        assert!(
            matches!(&c.builders[0].host_keys, HostKeySpec::Pinned(k) if k[0].algorithm == "ssh-ed25519")
        );
        let c = Config::parse(&with(kh.to_str().unwrap()), &cfg_path).unwrap();
        assert_eq!(
            c.builders[0].host_keys,
            HostKeySpec::KnownHostsFile(kh.clone())
        );
        for bad in ["junk", "missing"] {
            match Config::parse(&with(bad), &cfg_path) {
                Err(ConfigError::Toml {
                    line: 4,
                    key: Some(k),
                    message,
                    ..
                }) => {
                    assert_eq!(k, "builders.b.host-key-file");
                    assert!(message.contains(bad), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }

        // load(): a missing default file is fine, a missing named one is not.
        let missing = dir.path().join("nope.toml");
        let c = Config::load(&ConfigPath {
            path: missing.clone(),
            source: ConfigSource::Default,
        })
        .unwrap();
        assert_eq!(c, Config::default());
        for source in [ConfigSource::Env, ConfigSource::Cli] {
            let e = Config::load(&ConfigPath {
                path: missing.clone(),
                source,
            })
            .unwrap_err();
            assert!(matches!(e, ConfigError::TomlMissing { .. }), "{e}");
        }
        std::fs::write(&cfg_path, with("host.pub")).unwrap();
        let c = Config::load(&ConfigPath {
            path: cfg_path.clone(),
            source: ConfigSource::Cli,
        })
        .unwrap();
        assert_eq!(c.path.as_deref(), Some(cfg_path.as_path()));
        assert_eq!(c.builders.len(), 1);
        // A directory is not a config file: a read error, not "missing".
        let e = Config::load(&ConfigPath {
            path: dir.path().to_owned(),
            source: ConfigSource::Default,
        })
        .unwrap_err();
        assert!(matches!(e, ConfigError::TomlRead { .. }), "{e}");
    }
}
