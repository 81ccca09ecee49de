//! The builder table: Nix's machines grammar (the `builders` setting with its `@file`
//! includes), `NIX_SSHOPTS` defaults, and the TOML file that describes lazy builders, all merged
//! into one list of [`Builder`]s.
//!
//! This module owns parsing and validation only. It must never connect to a builder, boot
//! anything, take a lock or read the process environment: callers pass the `builders` and
//! `system` settings, the `NIX_SSHOPTS` value and the config path in. The only I/O it does is
//! reading the files those values name (machines files, the TOML file, `host-key-file`s).
//!
//! Nix 2.8 and current Nix differ in how a `builders` value is cut into entries (see
//! [`expand_builders`]); this module follows current Nix. Where Nix has an error text for a bad
//! machines line (`bad machine specification: …`) the error quotes it, prefixed by the file and
//! line.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use toml::Spanned;

/// The TOML file read when neither `--config` nor [`CONFIG_ENV_VAR`] names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nix/lazy-builder.toml";
/// The environment variable that overrides [`DEFAULT_CONFIG_PATH`] (a `--config` wins over it).
pub const CONFIG_ENV_VAR: &str = "NIX_LAZY_BUILDER_CONFIG";
/// Nix's default for the `builders` setting.
pub const DEFAULT_BUILDERS: &str = "@/etc/nix/machines";
/// Default `[supervisor] state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/nix/var/nix/lazy-builder";
/// Default `idle-timeout` of a lazy builder.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Default `boot-timeout` of a lazy builder.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(2 * 60);
/// How deep `@file` includes may nest; a backstop behind the include-loop check.
const MAX_INCLUDE_DEPTH: usize = 32;

// ------------------------------------------------------------------------------------------------
// Errors and notes

/// Everything that can be wrong with the builder configuration. Each variant names the file and
/// line (or the TOML key) a user has to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A machines-table line Nix itself would reject; `message` is Nix's own text.
    #[error("{origin}: {message}")]
    Machines {
        origin: MachinesOrigin,
        message: String,
    },
    /// An `@file` include that exists but cannot be read (a missing file is ignored, like Nix).
    #[error("{origin}: cannot read machines file '{}': {source}", path.display())]
    MachinesRead {
        origin: MachinesOrigin,
        path: PathBuf,
        source: io::Error,
    },
    /// `@a` includes `@b` which includes `@a` again (Nix would recurse until it crashes).
    #[error("{origin}: machines file include loop: {chain}")]
    IncludeLoop {
        origin: MachinesOrigin,
        chain: String,
    },
    /// A TOML config problem: syntax, unknown key, bad value, failed validation.
    #[error("{}:{line}:{column}: {}{message}", path.display(), key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
    Toml {
        path: PathBuf,
        line: usize,
        column: usize,
        key: Option<String>,
        message: String,
    },
    /// The TOML config exists but cannot be read.
    #[error("cannot read config file '{}': {source}", path.display())]
    TomlRead { path: PathBuf, source: io::Error },
    /// A config file named by `--config` or the environment does not exist.
    #[error("config file '{}' (named by {source_name}) does not exist", path.display())]
    TomlMissing { path: PathBuf, source_name: String },
}

/// How loud a [`Note`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NoteLevel {
    Debug,
    Info,
    Warn,
}

/// Something the loader noticed that is not fatal (a skipped machines line, an ignored
/// `NIX_SSHOPTS` option). The caller decides where to show it; [`Note::emit`] logs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub level: NoteLevel,
    pub message: String,
}

impl Note {
    fn new(level: NoteLevel, message: impl Into<String>) -> Self {
        Note {
            level,
            message: message.into(),
        }
    }

    /// Log the note through `tracing` at its level.
    pub fn emit(&self) {
        match self.level {
            NoteLevel::Debug => tracing::debug!("{}", self.message),
            NoteLevel::Info => tracing::info!("{}", self.message),
            NoteLevel::Warn => tracing::warn!("{}", self.message),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Store URIs

/// The two remote-store kinds we can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `ssh://`: `nix-store --serve --write` (serve protocol).
    Ssh,
    /// `ssh-ng://`: `nix-daemon --stdio` (worker protocol).
    SshNg,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Ssh => "ssh",
            Scheme::SshNg => "ssh-ng",
        }
    }

    /// The remote program Nix runs when the URI has no `remote-program` parameter.
    pub fn default_remote_program(self) -> &'static str {
        match self {
            Scheme::Ssh => "nix-store",
            Scheme::SshNg => "nix-daemon",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a store URI cannot be used as a builder.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// A store Nix knows but we cannot build on (`local`, `auto`, `daemon`, a path, `http…`).
    #[error("'{uri}' is not an SSH store ({kind}); only ssh:// and ssh-ng:// builders can be used")]
    NotSsh { uri: String, kind: String },
    /// An ssh URI we cannot make sense of.
    #[error("'{uri}' is not a valid SSH store URI: {reason}")]
    Malformed { uri: String, reason: String },
}

/// A parsed `ssh://` or `ssh-ng://` store URI: `scheme://[user@]host[:port][?k=v&…]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuilderUri {
    pub scheme: Scheme,
    pub user: Option<String>,
    /// Host name or address; IPv6 addresses without their brackets.
    pub host: String,
    /// `None` when neither the URI nor `NIX_SSHOPTS` gave one: ssh's default (22).
    pub port: Option<u16>,
    /// Query parameters (store settings such as `remote-program`, `remote-store`, `ssh-key`),
    /// percent-decoded.
    pub params: BTreeMap<String, String>,
}

impl BuilderUri {
    /// Parse a URI that must carry an explicit `ssh://` or `ssh-ng://` scheme.
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        let malformed = |reason: &str| UriError::Malformed {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err(UriError::NotSsh {
                uri: uri.to_owned(),
                kind: non_ssh_kind(uri),
            });
        };
        let scheme = match scheme {
            "ssh" => Scheme::Ssh,
            "ssh-ng" => Scheme::SshNg,
            other => {
                return Err(UriError::NotSsh {
                    uri: uri.to_owned(),
                    kind: format!("scheme '{other}'"),
                });
            }
        };
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        if authority.contains('/') {
            return Err(malformed("a path after the host is not supported"));
        }
        if authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(malformed("white space in the host part"));
        }
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => {
                if u.is_empty() {
                    return Err(malformed("empty user name before '@'"));
                }
                (Some(u.to_owned()), h)
            }
            None => (None, authority),
        };
        let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
            let Some((host, after)) = bracketed.split_once(']') else {
                return Err(malformed("'[' without a closing ']'"));
            };
            let port = match after {
                "" => None,
                p => match p.strip_prefix(':') {
                    Some(p) => Some(p),
                    None => return Err(malformed("unexpected text after ']'")),
                },
            };
            (host, port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => {
                    if p.contains(':') {
                        return Err(malformed("IPv6 addresses must be written in brackets"));
                    }
                    (h, Some(p))
                }
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(malformed("no host name"));
        }
        let port = match port {
            None => None,
            Some(p) => match parse_port(p) {
                Some(p) => Some(p),
                None => return Err(malformed(&format!("bad port '{p}'"))),
            },
        };
        let mut params = BTreeMap::new();
        for pair in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            // Like Nix, a parameter without '=' is ignored.
            if let Some((k, v)) = pair.split_once('=') {
                params.insert(percent_decode(k), percent_decode(v));
            }
        }
        Ok(BuilderUri {
            scheme,
            user,
            host: host.to_owned(),
            port,
            params,
        })
    }

    /// `remote-program` parameter, or the scheme's default program.
    pub fn remote_program(&self) -> &str {
        self.params
            .get("remote-program")
            .map(String::as_str)
            .unwrap_or(self.scheme.default_remote_program())
    }

    /// `remote-store` parameter (passed as `--store` on the remote side).
    pub fn remote_store(&self) -> Option<&str> {
        self.params.get("remote-store").map(String::as_str)
    }

    /// The port to connect to: the explicit one, else 22.
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(22)
    }
}

impl fmt::Display for BuilderUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme)?;
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        for (i, (k, v)) in self.params.iter().enumerate() {
            write!(f, "{}{}={}", if i == 0 { '?' } else { '&' }, k, v)?;
        }
        Ok(())
    }
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

fn non_ssh_kind(uri: &str) -> String {
    match uri.split(['?', '/']).next().unwrap_or("") {
        "" if uri.starts_with('/') => "a local store path".to_owned(),
        "" => "a store with default settings".to_owned(),
        word @ ("auto" | "daemon" | "local") => format!("the '{word}' store"),
        _ if uri.contains('/') => "a local store path".to_owned(),
        word => format!("'{word}'"),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex_val(bytes[i + 1]), hex_val(bytes[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Nix's compatibility rule for the first machines column: a word with no `://`, no `/` and
/// not one of the special store words gets `ssh://` prepended (`user@host` → `ssh://user@host`).
/// The result is the machine's store URI exactly as Nix's hook names it (slot files, `# accept`).
pub fn nix_store_uri(first_column: &str) -> String {
    let s = first_column;
    let keep = s.contains("://")
        || s.contains('/')
        || matches!(s, "auto" | "daemon" | "local")
        || s.starts_with("auto?")
        || s.starts_with("daemon?")
        || s.starts_with("local?")
        || s.starts_with('?');
    if keep {
        s.to_owned()
    } else {
        format!("ssh://{s}")
    }
}

// ------------------------------------------------------------------------------------------------
// Host keys

/// One pinned public key: an OpenSSH public key line `type base64 [comment]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedKey {
    /// Key type, e.g. `ssh-ed25519`.
    pub algorithm: String,
    /// The key blob, base64 as written.
    pub key_base64: String,
    pub comment: Option<String>,
}

impl PinnedKey {
    /// Parse `type base64 [comment]`, checking that the blob is base64 and starts with the
    /// declared type (as every SSH public key blob does).
    pub fn parse_line(line: &str) -> Result<Self, String> {
        let line = line.trim();
        let mut parts = line.splitn(3, [' ', '\t']);
        let algorithm = parts.next().unwrap_or("").trim();
        let key = parts.next().map(str::trim).unwrap_or("");
        let comment = parts.next().map(str::trim).filter(|c| !c.is_empty());
        if algorithm.is_empty() || key.is_empty() {
            return Err(format!(
                "'{line}' is not a public key line ('type base64-key [comment]')"
            ));
        }
        let blob = lenient_base64(key)
            .map_err(|e| format!("the key in '{line}' is not valid base64: {e}"))?;
        let embedded = ssh_string_prefix(&blob).ok_or_else(|| {
            format!("the key in '{line}' is not an SSH public key blob (too short)")
        })?;
        if embedded != algorithm.as_bytes() {
            return Err(format!(
                "the key in '{line}' is a '{}' key, but the line says '{algorithm}'",
                String::from_utf8_lossy(embedded)
            ));
        }
        Ok(PinnedKey {
            algorithm: algorithm.to_owned(),
            key_base64: key.to_owned(),
            comment: comment.map(str::to_owned),
        })
    }

    /// The raw key blob (wire format), as SSH sends it in the key exchange.
    pub fn blob(&self) -> Vec<u8> {
        // Validated at parse time; an empty result cannot happen for parsed keys.
        lenient_base64(&self.key_base64).unwrap_or_default()
    }

    /// `type base64`, the form known_hosts and `authorized_keys` use (without the comment).
    pub fn openssh(&self) -> String {
        format!("{} {}", self.algorithm, self.key_base64)
    }
}

fn ssh_string_prefix(blob: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    blob.get(4..4usize.checked_add(len)?)
}

fn lenient_base64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(s)
}

/// Parse one or more public key lines (blank lines and `#` comments skipped).
pub fn parse_key_lines(text: &str) -> Result<Vec<PinnedKey>, String> {
    let keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(PinnedKey::parse_line)
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err("no public key in it".to_owned());
    }
    Ok(keys)
}

/// A public host key whose private half is published, so a server presenting it proves
/// nothing about who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WellKnownKey {
    /// The OpenSSH public key line (`type base64`).
    pub key: &'static str,
    /// Where its private half is published.
    pub what: &'static str,
}

/// Host keys refused unless a TOML builder says `allow-well-known-host-key = true`.
pub const WELL_KNOWN_HOST_KEYS: &[WellKnownKey] = &[WellKnownKey {
    key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJBWcxb/Blaqt1auOtE+F8QUWrUotiC5qBJ+UuEWdVCb",
    what: "nixpkgs' darwin.linux-builder (its private key is in the nixpkgs source)",
}];

/// The well-known key whose SSH wire blob is `blob`, if any.
pub fn well_known_host_key(blob: &[u8]) -> Option<&'static WellKnownKey> {
    WELL_KNOWN_HOST_KEYS.iter().find(|k| {
        k.key
            .split_whitespace()
            .nth(1)
            .and_then(|b64| lenient_base64(b64).ok())
            .is_some_and(|known| known == blob)
    })
}

/// How a builder's SSH host key is verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKeys {
    /// Accept exactly these keys (any of them).
    Pinned(Vec<PinnedKey>),
    /// Look the host up in this known_hosts file.
    KnownHostsFile(PathBuf),
    /// A machines-table line without a host-key column: as with Nix's hook, the host is checked
    /// against the user's and the system's known_hosts files (`~/.ssh/known_hosts`,
    /// `/etc/ssh/ssh_known_hosts`), as OpenSSH would. TOML builders are never unpinned.
    SshDefault,
}

// ------------------------------------------------------------------------------------------------
// The unified builder

/// Where a machines-table line came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MachinesSource {
    /// The `builders` setting itself.
    Setting,
    /// A file included with `@path`.
    File(PathBuf),
}

/// A line of the machines table: its source and its 1-based line number there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachinesOrigin {
    pub source: MachinesSource,
    pub line: usize,
}

impl fmt::Display for MachinesOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            MachinesSource::Setting => write!(f, "the 'builders' setting, line {}", self.line),
            MachinesSource::File(p) => write!(f, "{}:{}", p.display(), self.line),
        }
    }
}

/// Where a builder was defined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Machines(MachinesOrigin),
    Toml { file: PathBuf, name: String },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Machines(o) => write!(f, "machines line {o}"),
            Origin::Toml { file, name } => write!(f, "builder '{name}' in {}", file.display()),
        }
    }
}

/// One builder of the unified table.
#[derive(Clone, Debug, PartialEq)]
pub struct Builder {
    /// The TOML table name, or the store URI for machines-table builders.
    pub name: String,
    pub uri: BuilderUri,
    /// The store URI as Nix's hook uses it: the slot-file key in `current-load` and the machine
    /// name after `# accept`. For machines lines it is the first column after Nix's `ssh://`
    /// rule; for TOML builders the `uri` as written. Not changed by `NIX_SSHOPTS` defaults.
    pub store_uri: String,
    pub systems: BTreeSet<String>,
    pub ssh_key: Option<PathBuf>,
    /// Concurrent builds; 0 (machines table only) means never free, as in Nix.
    pub max_jobs: u32,
    /// Always finite and > 0 (Nix's 0 → 1 rule applied).
    pub speed_factor: f64,
    pub supported_features: BTreeSet<String>,
    pub mandatory_features: BTreeSet<String>,
    pub host_keys: HostKeys,
    /// `allow-well-known-host-key = true` (TOML only): connect even though a pinned key is one
    /// of [`WELL_KNOWN_HOST_KEYS`], with a warning. Always false for machines-table lines,
    /// whose grammar has no column for it.
    pub allow_well_known_host_key: bool,
    pub origin: Origin,
    /// `Some` for builders that are booted on demand.
    pub lazy: Option<LazySettings>,
}

impl Builder {
    /// The key for slot files and the upload lock (see [`Builder::store_uri`]).
    pub fn slot_key(&self) -> &str {
        &self.store_uri
    }

    pub fn is_lazy(&self) -> bool {
        self.lazy.is_some()
    }
}

/// What makes a builder lazy: how it boots and when it stops.
#[derive(Clone, Debug, PartialEq)]
pub struct LazySettings {
    /// Stop after this long without leases; `None` = never stop (`idle-timeout = "0s"`).
    pub idle_timeout: Option<Duration>,
    /// Give up a boot that has not produced a reachable sshd after this long.
    pub boot_timeout: Duration,
    /// Boot even for derivations the local machine could build itself.
    pub boot_for_local: bool,
    pub boot: BootSpec,
}

/// The `[builders.NAME.boot]` section: which backend starts the builder, with its settings.
/// Parsed and validated here; the backends themselves live in `boot/`.
#[derive(Clone, Debug, PartialEq)]
pub enum BootSpec {
    Qemu(Box<QemuBoot>),
    Darling(DarlingBoot),
    Command(CommandBoot),
}

/// QEMU accelerator choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// kvm on Linux when usable, hvf on macOS, else tcg.
    Auto,
    Kvm,
    Hvf,
    Tcg,
}

/// `kind = "qemu"`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct QemuBoot {
    /// The QEMU binary (a name looked up on PATH, or a path); `None` = pick by guest system.
    pub binary: Option<String>,
    pub accel: Option<Accel>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub disk: Option<PathBuf>,
    /// Boot from a throw-away overlay of `disk`.
    pub ephemeral: bool,
    /// Extra `-drive` values, verbatim.
    pub drives: Vec<String>,
    /// Host port forwarded to the guest's port 22: `Some(0)` = pick a free one, `None` = the
    /// URI's port.
    pub ssh_port: Option<u16>,
    /// A NixOS VM runner script to wrap instead of building the QEMU command line.
    pub runner: Option<PathBuf>,
    pub machine: Option<String>,
    pub cpu: Option<String>,
    pub extra_args: Vec<String>,
    /// Extra environment for QEMU or the runner script (NixOS runners read e.g. `NIX_DISK_IMAGE`,
    /// `TMPDIR` and the sources of their shared directories from it).
    pub environment: BTreeMap<String, String>,
    /// `snapshot = true`: the first boot snapshots the ready VM, later boots restore it
    /// (`boot/snapshot.rs`). Never with a runner, a writable non-ephemeral disk or a writable
    /// extra drive (refused at load).
    pub snapshot: bool,
}

/// `kind = "darling"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DarlingBoot {
    pub prefix: PathBuf,
    /// sshd config path inside the prefix.
    pub sshd_config: PathBuf,
}

/// A stop signal for `kind = "command"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    Term,
    Int,
    Hup,
    Quit,
    Kill,
    Usr1,
    Usr2,
}

impl StopSignal {
    fn parse(s: &str) -> Option<Self> {
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

    /// The signal number for `kill(2)`.
    pub fn as_raw(self) -> i32 {
        match self {
            StopSignal::Term => libc::SIGTERM,
            StopSignal::Int => libc::SIGINT,
            StopSignal::Hup => libc::SIGHUP,
            StopSignal::Quit => libc::SIGQUIT,
            StopSignal::Kill => libc::SIGKILL,
            StopSignal::Usr1 => libc::SIGUSR1,
            StopSignal::Usr2 => libc::SIGUSR2,
        }
    }
}

/// `kind = "command"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandBoot {
    /// The foreground command (program and arguments); never empty.
    pub command: Vec<String>,
    /// Run to stop the builder; `None` = send `stop_signal` to the command.
    pub stop_command: Option<Vec<String>>,
    pub stop_signal: StopSignal,
    /// Extra environment for the command (and the stop command).
    pub environment: BTreeMap<String, String>,
}

// ------------------------------------------------------------------------------------------------
// Machines grammar

/// One machine entry after expansion: its text and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineEntry {
    pub origin: MachinesOrigin,
    pub text: String,
}

/// Expand a `builders` value into machine entries, following `@file` includes.
///
/// Current Nix's order (2.29 and later): split into lines, cut each line at the first `#`, then
/// split on `;`; trim each entry and skip empty ones. Nix 2.8 split on `\n` and `;` first and
/// cut at `#` afterwards, so in 2.8 `a # note ; b` still yields machine `b`; here (as in current
/// Nix) the comment swallows it.
///
/// `@path` reads the file with `read` and expands it by the same rules, recursively. A missing
/// file (`NotFound`) is silently ignored, like Nix; other read errors are fatal. Unlike Nix, an
/// include loop is an error instead of unbounded recursion.
pub fn expand_builders(
    spec: &str,
    read: &mut dyn FnMut(&Path) -> io::Result<Vec<u8>>,
) -> Result<Vec<MachineEntry>, ConfigError> {
    let mut out = Vec::new();
    let mut stack = Vec::new();
    expand_into(spec, &MachinesSource::Setting, read, &mut stack, &mut out)?;
    Ok(out)
}

fn expand_into(
    text: &str,
    source: &MachinesSource,
    read: &mut dyn FnMut(&Path) -> io::Result<Vec<u8>>,
    stack: &mut Vec<PathBuf>,
    out: &mut Vec<MachineEntry>,
) -> Result<(), ConfigError> {
    for (index, line) in text.split('\n').enumerate() {
        let origin = MachinesOrigin {
            source: source.clone(),
            line: index + 1,
        };
        let line = line.split('#').next().unwrap_or("");
        for entry in line.split(';') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let Some(path) = entry.strip_prefix('@') else {
                out.push(MachineEntry {
                    origin: origin.clone(),
                    text: entry.to_owned(),
                });
                continue;
            };
            let path = PathBuf::from(path.trim());
            let identity = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            if stack.contains(&identity) || stack.len() >= MAX_INCLUDE_DEPTH {
                let mut chain: Vec<String> =
                    stack.iter().map(|p| p.display().to_string()).collect();
                chain.push(identity.display().to_string());
                return Err(ConfigError::IncludeLoop {
                    origin,
                    chain: chain.join(" -> "),
                });
            }
            let bytes = match read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::debug!("cannot find machines file '{}'", path.display());
                    continue;
                }
                Err(source) => {
                    return Err(ConfigError::MachinesRead {
                        origin,
                        path,
                        source,
                    });
                }
            };
            let text = String::from_utf8_lossy(&bytes);
            stack.push(identity);
            let result = expand_into(&text, &MachinesSource::File(path), read, stack, out);
            stack.pop();
            result?;
        }
    }
    Ok(())
}

/// The result of parsing one machine entry.
#[derive(Clone, Debug, PartialEq)]
pub enum MachineParse {
    Builder(Box<Builder>),
    /// A valid Nix machine we cannot use (not an SSH store): kept out of the table. This is a
    /// note, not an error, so that one such line does not stop every remote build.
    Skipped(Note),
}

/// Parse one machine entry (Nix's columns: URI, systems, ssh key, maxJobs, speedFactor,
/// supported features, mandatory features, base64 host key; `-` or missing = unset).
pub fn parse_machine_entry(
    entry: &MachineEntry,
    default_system: &str,
) -> Result<MachineParse, ConfigError> {
    let line = entry.text.as_str();
    let origin = &entry.origin;
    let bad = |message: String| ConfigError::Machines {
        origin: origin.clone(),
        message: format!("bad machine specification: {message}"),
    };
    let tokens: Vec<&str> = line
        .split([' ', '\t', '\n', '\r'])
        .filter(|t| !t.is_empty())
        .collect();
    let get = |i: usize| tokens.get(i).copied().filter(|t| *t != "-");

    let Some(first) = get(0) else {
        return Err(bad(format!(
            "store URL was not found at the first column of a row: '{line}'"
        )));
    };
    let store_uri = nix_store_uri(first);
    let systems: BTreeSet<String> = match get(1) {
        Some(s) => split_commas(s),
        None => BTreeSet::from([default_system.to_owned()]),
    };
    let ssh_key_column = get(2).map(PathBuf::from);
    let max_jobs = match get(3) {
        None => 1,
        Some(s) => parse_unsigned(s).ok_or_else(|| {
            bad(format!(
                "failed to convert column #3 in a row: '{line}' to 'unsigned int'"
            ))
        })?,
    };
    let speed_factor = match get(4) {
        None => 1.0,
        Some(s) => {
            let v: f64 = s
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite())
                .ok_or_else(|| {
                    bad(format!(
                        "failed to convert column #4 in a row: '{line}' to 'float'"
                    ))
                })?;
            if v < 0.0 {
                return Err(ConfigError::Machines {
                    origin: origin.clone(),
                    message: format!("speed factor must be >= 0 (in '{line}')"),
                });
            }
            if v == 0.0 { 1.0 } else { v }
        }
    };
    let supported_features = get(5).map(split_commas).unwrap_or_default();
    let mandatory_features = get(6).map(split_commas).unwrap_or_default();
    let host_key_column = match get(7) {
        None => None,
        Some(b64) => Some(decode_host_key_column(b64).map_err(|e| {
            bad(format!(
                "a column #7 in a row: '{line}' is not valid base64 string: {e}"
            ))
        })?),
    };
    let host_key_column = match host_key_column {
        None => None,
        Some(text) => Some(parse_key_lines(&text).map_err(|e| {
            bad(format!(
                "column #7 in a row: '{line}' does not hold an SSH public host key: {e}"
            ))
        })?),
    };

    let uri = match BuilderUri::parse(&store_uri) {
        Ok(uri) => uri,
        Err(e) => {
            // Nix accepts these stores as machines, but we can only build over SSH. Skipping the
            // line (instead of failing the whole table) keeps the other builders usable.
            return Ok(MachineParse::Skipped(Note::new(
                NoteLevel::Warn,
                format!("{origin}: ignoring machine: {e}"),
            )));
        }
    };

    // Machine columns override same-named URI parameters (Nix's map-insert order).
    let ssh_key = ssh_key_column.or_else(|| uri.params.get("ssh-key").map(PathBuf::from));
    let host_keys = match host_key_column {
        Some(keys) => HostKeys::Pinned(keys),
        None => match uri.params.get("base64-ssh-public-host-key") {
            Some(b64) => {
                let text = decode_host_key_column(b64).map_err(|e| {
                    bad(format!(
                        "the base64-ssh-public-host-key parameter in '{line}' is not valid base64: {e}"
                    ))
                })?;
                HostKeys::Pinned(parse_key_lines(&text).map_err(|e| {
                    bad(format!(
                        "the base64-ssh-public-host-key parameter in '{line}' does not hold an SSH public host key: {e}"
                    ))
                })?)
            }
            None => HostKeys::SshDefault,
        },
    };
    if tokens.len() > 8 {
        tracing::debug!("{origin}: ignoring extra columns after the 8th (as Nix does)");
    }
    Ok(MachineParse::Builder(Box::new(Builder {
        name: store_uri.clone(),
        uri,
        store_uri,
        systems,
        ssh_key,
        max_jobs,
        speed_factor,
        supported_features,
        mandatory_features,
        host_keys,
        allow_well_known_host_key: false,
        origin: Origin::Machines(origin.clone()),
        lazy: None,
    })))
}

fn decode_host_key_column(b64: &str) -> Result<String, String> {
    let bytes = lenient_base64(b64).map_err(|e| e.to_string())?;
    String::from_utf8(bytes).map_err(|_| "it does not decode to text".to_owned())
}

fn split_commas(s: &str) -> BTreeSet<String> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_unsigned(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parse a whole `builders` value: expand it, then parse every entry. Returns the usable
/// builders in table order and the notes about lines that were skipped.
pub fn parse_machines(
    spec: &str,
    default_system: &str,
    read: &mut dyn FnMut(&Path) -> io::Result<Vec<u8>>,
) -> Result<(Vec<Builder>, Vec<Note>), ConfigError> {
    let mut builders = Vec::new();
    let mut notes = Vec::new();
    for entry in expand_builders(spec, read)? {
        match parse_machine_entry(&entry, default_system)? {
            MachineParse::Builder(b) => builders.push(*b),
            MachineParse::Skipped(note) => notes.push(note),
        }
    }
    Ok((builders, notes))
}

/// The file reader for [`expand_builders`] / [`parse_machines`] that reads the real files.
pub fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    std::fs::read(path)
}

// ------------------------------------------------------------------------------------------------
// NIX_SSHOPTS

/// What we take from `NIX_SSHOPTS`: the defaults Nix's hook would hand to ssh.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SshOpts {
    /// From `-p PORT`, `-pPORT`, `-o Port=PORT`.
    pub port: Option<u16>,
    /// From `-i KEY`, `-iKEY`, `-o IdentityFile=KEY`.
    pub identity: Option<PathBuf>,
    /// Options we do not honour, as written (reported at debug level).
    pub ignored: Vec<String>,
}

// ssh(1) options that take no argument, and those that take one.
const SSH_FLAGS_NO_ARG: &str = "46AaCfGgKkMNnqsTtVvXxYy";
const SSH_FLAGS_WITH_ARG: &str = "BbcDEeFIiJLlmOoPpQRSWw";

impl SshOpts {
    /// Parse a `NIX_SSHOPTS` value (shell-style word splitting, as current Nix does; plain
    /// whitespace-separated values, as Nix 2.8 splits them, come out the same). Like ssh, the
    /// first `-p` / `-i` wins.
    pub fn parse(value: &str) -> SshOpts {
        let mut opts = SshOpts::default();
        let args = shell_split(value);
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            i += 1;
            let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
                opts.ignored.push(arg.clone());
                continue;
            };
            for (pos, c) in flags.char_indices() {
                if SSH_FLAGS_NO_ARG.contains(c) {
                    continue;
                }
                if !SSH_FLAGS_WITH_ARG.contains(c) {
                    opts.ignored.push(arg.clone());
                    break;
                }
                let rest = &flags[pos + c.len_utf8()..];
                let value = if !rest.is_empty() {
                    rest.to_owned()
                } else if let Some(next) = args.get(i) {
                    i += 1;
                    next.clone()
                } else {
                    opts.ignored.push(format!("{arg} (no value)"));
                    break;
                };
                opts.take_option(c, &value);
                break;
            }
            // Flags without arguments in a cluster other than the value-taking one (e.g. -v,
            // -C) change nothing we model; note them once.
            if flags.chars().all(|c| SSH_FLAGS_NO_ARG.contains(c)) {
                opts.ignored.push(arg.clone());
            }
        }
        opts
    }

    fn take_option(&mut self, flag: char, value: &str) {
        match flag {
            'p' => self.take_port(value, &format!("-p {value}")),
            'i' => self.take_identity(value),
            'o' => {
                let (key, val) = match value.split_once('=') {
                    Some((k, v)) => (k.trim(), v.trim()),
                    None => match value.trim().split_once([' ', '\t']) {
                        Some((k, v)) => (k.trim(), v.trim()),
                        None => (value.trim(), ""),
                    },
                };
                if key.eq_ignore_ascii_case("port") {
                    self.take_port(val, &format!("-o {value}"));
                } else if key.eq_ignore_ascii_case("identityfile") {
                    self.take_identity(val);
                } else {
                    self.ignored.push(format!("-o {value}"));
                }
            }
            other => self.ignored.push(format!("-{other} {value}")),
        }
    }

    fn take_port(&mut self, value: &str, written: &str) {
        match parse_port(value.trim()) {
            Some(p) if self.port.is_none() => self.port = Some(p),
            Some(_) => {}
            None => self.ignored.push(format!("{written} (not a port number)")),
        }
    }

    fn take_identity(&mut self, value: &str) {
        if self.identity.is_none() && !value.is_empty() {
            self.identity = Some(PathBuf::from(value));
        }
    }
}

/// Split like a POSIX shell would (quotes and backslashes; no expansions).
fn shell_split(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.peek() {
                            Some(&n) if matches!(n, '"' | '\\' | '$' | '`') => {
                                cur.push(n);
                                chars.next();
                            }
                            _ => cur.push('\\'),
                        },
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

// ------------------------------------------------------------------------------------------------
// TOML config: location

/// Who named the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    /// Nobody: the built-in default path. A missing file there just means "no lazy builders".
    Default,
    /// The [`CONFIG_ENV_VAR`] environment variable.
    Env,
    /// The `--config` argument.
    Cli,
}

/// The config file to read and who chose it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigPath {
    pub path: PathBuf,
    pub source: ConfigSource,
}

impl ConfigPath {
    /// The file for this process: `cli` (`--config`), else [`CONFIG_ENV_VAR`] from the
    /// environment, else [`DEFAULT_CONFIG_PATH`] ([`resolve_config_path`]).
    pub fn for_process(cli: Option<&Path>) -> ConfigPath {
        resolve_config_path(cli, std::env::var_os(CONFIG_ENV_VAR).as_deref())
    }

    /// The path, when it was named (`--config` or the environment) rather than the default:
    /// what a hook passes on to the supervisor it starts.
    pub fn named(&self) -> Option<&Path> {
        (self.source != ConfigSource::Default).then_some(self.path.as_path())
    }
}

/// Pick the config file: `--config` wins over [`CONFIG_ENV_VAR`], which wins over
/// [`DEFAULT_CONFIG_PATH`]. An empty value counts as unset.
pub fn resolve_config_path(cli: Option<&Path>, env: Option<&OsStr>) -> ConfigPath {
    if let Some(p) = cli.filter(|p| !p.as_os_str().is_empty()) {
        return ConfigPath {
            path: p.to_owned(),
            source: ConfigSource::Cli,
        };
    }
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        return ConfigPath {
            path: PathBuf::from(p),
            source: ConfigSource::Env,
        };
    }
    ConfigPath {
        path: PathBuf::from(DEFAULT_CONFIG_PATH),
        source: ConfigSource::Default,
    }
}

// ------------------------------------------------------------------------------------------------
// TOML config: schema

/// `[supervisor]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SupervisorSettings {
    pub state_dir: PathBuf,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        SupervisorSettings {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }
}

/// The TOML config, validated.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Config {
    /// The file it was read from; `None` when the default file did not exist.
    pub path: Option<PathBuf>,
    pub supervisor: SupervisorSettings,
    /// Builders in file order.
    pub builders: Vec<Builder>,
}

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
            return Some(match key {
                Some(k) => format!("{header}.{k}"),
                None => header.to_owned(),
            });
        }
        if key.is_none()
            && let Some((k, _)) = t.split_once('=')
        {
            let k = k.trim();
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '"' | ' '))
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

    /// Parse and validate config text that was read from `path` (used in messages and to
    /// resolve relative paths). Reads `host-key-file`s.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let ctx = TomlCtx {
            path,
            text,
            dir: path.parent().map(Path::to_owned).unwrap_or_default(),
        };
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| ctx.err(e.span().unwrap_or(0..0), None, e.message().to_owned()))?;
        let supervisor = match raw.supervisor.and_then(|s| s.state_dir) {
            None => SupervisorSettings::default(),
            Some(dir) => {
                if !Path::new(dir.get_ref()).is_absolute() {
                    return Err(ctx.err(
                        dir.span(),
                        Some("supervisor.state-dir".to_owned()),
                        "must be an absolute path",
                    ));
                }
                SupervisorSettings {
                    state_dir: PathBuf::from(dir.into_inner()),
                }
            }
        };
        let mut entries: Vec<_> = raw.builders.into_iter().collect();
        // File order, so that table order (the last tie-breaker) is what the user wrote.
        entries.sort_by_key(|(name, b)| (b.span().start, name.span().start));
        let mut builders = Vec::with_capacity(entries.len());
        for (name, raw) in entries {
            builders.push(builder_from_toml(&ctx, name, raw)?);
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
        (Some(k), None) => HostKeys::Pinned(
            parse_key_lines(k.get_ref()).map_err(|e| ctx.err(k.span(), key("host-key"), e))?,
        ),
        (None, Some(f)) => {
            let file = ctx.path(f.get_ref());
            host_keys_from_file(&file).map_err(|e| {
                ctx.err(
                    f.span(),
                    key("host-key-file"),
                    format!("'{}': {e}", file.display()),
                )
            })?
        }
    };

    let duration = |v: &Spanned<String>, k: &str| -> Result<Duration, ConfigError> {
        humantime::parse_duration(v.get_ref().trim()).map_err(|e| {
            ctx.err(
                v.span(),
                key(k),
                format!("'{}' is not a duration like \"15m\": {e}", v.get_ref()),
            )
        })
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
    })
}

/// A `host-key-file`: either `.pub`-style lines (`type key [comment]`), pinned as they are, or
/// a known_hosts file (`hosts type key`), looked up at connect time.
fn host_keys_from_file(file: &Path) -> Result<HostKeys, String> {
    // Bounded: a key file is a few KiB, and a config naming `/dev/zero` (or any huge file) must
    // fail, not make every hook read forever.
    const MAX_KEY_FILE: u64 = 1 << 20;
    let mut text = String::new();
    std::fs::File::open(file)
        .and_then(|f| io::Read::read_to_string(&mut io::Read::take(f, MAX_KEY_FILE + 1), &mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_KEY_FILE {
        return Err(format!(
            "larger than {} KiB: not a public key or known_hosts file",
            MAX_KEY_FILE >> 10
        ));
    }
    if let Ok(keys) = parse_key_lines(&text) {
        return Ok(HostKeys::Pinned(keys));
    }
    let mut entries = 0;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut rest = line;
        if rest.starts_with('@') {
            // `@cert-authority` / `@revoked` marker.
            rest = rest
                .split_once([' ', '\t'])
                .map_or("", |(_, r)| r.trim_start());
        }
        let key = rest
            .split_once([' ', '\t'])
            .map_or("", |(_, r)| r.trim_start());
        PinnedKey::parse_line(key)
            .map_err(|e| format!("neither a public key file nor a known_hosts file: {e}"))?;
        entries += 1;
    }
    if entries == 0 {
        return Err("holds no keys".to_owned());
    }
    Ok(HostKeys::KnownHostsFile(file.to_owned()))
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
                Some(s) => StopSignal::parse(s.get_ref()).ok_or_else(|| {
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

// ------------------------------------------------------------------------------------------------
// The unified table

/// All builders the hook may use, in table order (machines lines first, in Nix's order, then
/// TOML builders in file order), and what the loader noticed on the way.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct BuilderTable {
    pub builders: Vec<Builder>,
    pub notes: Vec<Note>,
}

/// Merge machines-table builders, `NIX_SSHOPTS` defaults and the TOML builders.
///
/// `NIX_SSHOPTS` defaults (port, key) apply to machines-table builders only, as Nix's hook
/// would pass them to ssh; an explicit URI port or key column wins. TOML builders are fully
/// described by the TOML file. A machines line with the same store URI as a TOML builder is
/// dropped: the TOML entry describes the same machine and knows more (for example that it must
/// be booted first).
pub fn build_table(
    machines: Vec<Builder>,
    mut notes: Vec<Note>,
    ssh_opts: &SshOpts,
    config: &Config,
) -> BuilderTable {
    for ignored in &ssh_opts.ignored {
        notes.push(Note::new(
            NoteLevel::Debug,
            format!(
                "NIX_SSHOPTS: ignoring '{ignored}' (only -p/-i/-o Port/-o IdentityFile are used)"
            ),
        ));
    }
    let mut builders = Vec::with_capacity(machines.len() + config.builders.len());
    for mut b in machines {
        if let Some(t) = config.builders.iter().find(|t| t.store_uri == b.store_uri) {
            notes.push(Note::new(
                NoteLevel::Info,
                format!(
                    "{}: '{}' is also {}; using the TOML definition",
                    b.origin, b.store_uri, t.origin
                ),
            ));
            continue;
        }
        if b.uri.port.is_none() {
            b.uri.port = ssh_opts.port;
        }
        if b.ssh_key.is_none() {
            b.ssh_key.clone_from(&ssh_opts.identity);
        }
        builders.push(b);
    }
    builders.extend(config.builders.iter().cloned());
    BuilderTable { builders, notes }
}

/// Load the whole table from the hook's settings: `builders` (Nix's `builders` setting, e.g.
/// [`DEFAULT_BUILDERS`]) and `system` (the default system for machines lines without one),
/// plus the `NIX_SSHOPTS` value and the parsed TOML config.
pub fn load_table(
    builders: &str,
    system: &str,
    nix_sshopts: Option<&str>,
    config: &Config,
) -> Result<BuilderTable, ConfigError> {
    let (machines, notes) = parse_machines(builders, system, &mut |p: &Path| read_file(p))?;
    let ssh_opts = nix_sshopts.map(SshOpts::parse).unwrap_or_default();
    Ok(build_table(machines, notes, &ssh_opts, config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFwgxv0w8zjLFNJ6M4EHyBd7/gHpLNuw1C+/JusH19ZC root@builder";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBPd64WEzs5agVbeO7CGBhhdsbeQBvXO7mM/iNNYeXFNu7CJzWgX1d/wKP88c+SNyxV8bEAc0qgDQ/SHIe7hwXe4=";

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn fake_fs(files: &[(&str, &str)]) -> impl FnMut(&Path) -> io::Result<Vec<u8>> {
        let files: HashMap<PathBuf, Vec<u8>> = files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.as_bytes().to_vec()))
            .collect();
        move |p: &Path| {
            if p == Path::new("/denied") {
                return Err(io::Error::from(io::ErrorKind::PermissionDenied));
            }
            files
                .get(p)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
    }

    fn machines(
        spec: &str,
        files: &[(&str, &str)],
    ) -> Result<(Vec<Builder>, Vec<Note>), ConfigError> {
        parse_machines(spec, "x86_64-linux", &mut fake_fs(files))
    }

    fn one(line: &str) -> Builder {
        let (b, notes) = machines(line, &[]).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(b.len(), 1);
        b.into_iter().next().unwrap()
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn err_text(r: Result<(Vec<Builder>, Vec<Note>), ConfigError>) -> String {
        r.expect_err("expected an error").to_string()
    }

    // ---- URIs

    #[test]
    fn bare_words_get_ssh_prefix_like_nix() {
        assert_eq!(nix_store_uri("root@host"), "ssh://root@host");
        assert_eq!(nix_store_uri("host:22"), "ssh://host:22");
        assert_eq!(nix_store_uri("ssh-ng://h"), "ssh-ng://h");
        for kept in [
            "auto",
            "daemon",
            "local",
            "auto?x=1",
            "daemon?x",
            "local?root=/x",
            "?x=1",
            "/some/dir",
            "https://cache",
        ] {
            assert_eq!(nix_store_uri(kept), kept);
        }
    }

    #[test]
    fn uri_parts() {
        let u = BuilderUri::parse("ssh-ng://root@127.0.0.1:31022").unwrap();
        assert_eq!(u.scheme, Scheme::SshNg);
        assert_eq!(u.user.as_deref(), Some("root"));
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(u.port, Some(31022));
        assert_eq!(u.remote_program(), "nix-daemon");
        let u = BuilderUri::parse("ssh://h").unwrap();
        assert_eq!(
            (u.user.as_deref(), u.port, u.port_or_default()),
            (None, None, 22)
        );
        assert_eq!(u.remote_program(), "nix-store");
        let u = BuilderUri::parse("ssh://[::1]:2222").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", Some(2222)));
        assert_eq!(u.to_string(), "ssh://[::1]:2222");
        let u = BuilderUri::parse(
            "ssh://a@b@h?remote-program=/opt/nix%20store&remote-store=/tmp/x&flag",
        )
        .unwrap();
        assert_eq!(u.user.as_deref(), Some("a@b"));
        assert_eq!(u.remote_program(), "/opt/nix store");
        assert_eq!(u.remote_store(), Some("/tmp/x"));
        assert_eq!(u.params.len(), 2, "a parameter without '=' is ignored");
    }

    #[test]
    fn uri_errors() {
        for (uri, what) in [
            ("ssh://", "no host"),
            ("ssh://u@", "no host"),
            ("ssh://@h", "empty user"),
            ("ssh://h:0", "bad port"),
            ("ssh://h:99999", "bad port"),
            ("ssh://h:x", "bad port"),
            ("ssh://h/path", "path"),
            ("ssh://::1", "brackets"),
            ("ssh://[::1", "closing"),
        ] {
            match BuilderUri::parse(uri) {
                Err(UriError::Malformed { reason, .. }) => {
                    assert!(reason.contains(what), "{uri}: {reason}")
                }
                other => panic!("{uri}: {other:?}"),
            }
        }
        for uri in [
            "local",
            "auto",
            "daemon",
            "/some/store",
            "https://cache.example",
            "file:///x",
            "unix:///s",
        ] {
            assert!(
                matches!(BuilderUri::parse(uri), Err(UriError::NotSsh { .. })),
                "{uri}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn uri_display_round_trips(
            ng in proptest::bool::ANY,
            user in proptest::option::of("[a-z][a-z0-9_]{0,8}"),
            host in "[a-z0-9][a-z0-9.-]{0,20}",
            port in proptest::option::of(1u16..),
            params in proptest::collection::btree_map("[a-z-]{1,12}", "[A-Za-z0-9/._-]{0,12}", 0..3),
        ) {
            let uri = BuilderUri { scheme: if ng { Scheme::SshNg } else { Scheme::Ssh }, user, host, port, params };
            proptest::prop_assert_eq!(BuilderUri::parse(&uri.to_string()).unwrap(), uri);
        }

        #[test]
        fn uri_parse_never_panics(s in "\\PC{0,40}") {
            let _ = BuilderUri::parse(&s);
            let _ = machines(&s, &[]);
            let _ = SshOpts::parse(&s);
        }
    }

    // ---- expansion

    #[test]
    fn separators_comments_and_line_numbers() {
        let e = expand_builders(
            "a ; b\n# all comment\n  c x86_64-linux # trailing ; d\n\n;;e",
            &mut fake_fs(&[]),
        )
        .unwrap();
        let got: Vec<(&str, usize)> = e.iter().map(|e| (e.text.as_str(), e.origin.line)).collect();
        // Current Nix: the `#` cuts the rest of its line, so `d` is gone (Nix 2.8 kept it).
        assert_eq!(got, [("a", 1), ("b", 1), ("c x86_64-linux", 3), ("e", 5)]);
        assert!(e.iter().all(|e| e.origin.source == MachinesSource::Setting));
    }

    #[test]
    fn includes_are_recursive_and_missing_files_ignored() {
        let fs = [
            (
                "/etc/nix/machines",
                "first\n@ /etc/nix/more\n@/nonexistent\nlast",
            ),
            ("/etc/nix/more", "# header\n\nmiddle;other"),
        ];
        let e = expand_builders("@/etc/nix/machines; setting", &mut fake_fs(&fs)).unwrap();
        let got: Vec<String> = e
            .iter()
            .map(|e| format!("{} {}", e.origin, e.text))
            .collect();
        assert_eq!(
            got,
            [
                "/etc/nix/machines:1 first",
                "/etc/nix/more:3 middle",
                "/etc/nix/more:3 other",
                "/etc/nix/machines:4 last",
                "the 'builders' setting, line 1 setting",
            ]
        );
    }

    #[test]
    fn unreadable_include_is_fatal_and_loops_are_caught() {
        let msg = err_text(machines("ok\n@/denied", &[]));
        assert!(msg.contains("line 2") && msg.contains("/denied"), "{msg}");
        let fs = [("/a", "x\n@/b"), ("/b", "@/a")];
        let msg = err_text(machines("@/a", &fs));
        assert!(
            msg.contains("include loop")
                && msg.contains("/a -> /b -> /a")
                && msg.starts_with("/b:1"),
            "{msg}"
        );
        // The same file twice, not nested, is fine.
        let (b, _) = machines("@/b2;@/b2", &[("/b2", "h1")]).unwrap();
        assert_eq!(b.len(), 2);
    }

    // ---- machine lines

    #[test]
    fn all_columns() {
        let key = b64(&format!("{ED25519}\n{ECDSA}\n"));
        let b = one(&format!(
            "ssh-ng://root@h:2222 aarch64-linux,armv7l-linux /k 4 2.5 kvm,big-parallel benchmark {key}"
        ));
        assert_eq!(b.name, "ssh-ng://root@h:2222");
        assert_eq!(b.store_uri, "ssh-ng://root@h:2222");
        assert_eq!(b.uri.port, Some(2222));
        assert_eq!(b.systems, set(&["aarch64-linux", "armv7l-linux"]));
        assert_eq!(b.ssh_key.as_deref(), Some(Path::new("/k")));
        assert_eq!((b.max_jobs, b.speed_factor), (4, 2.5));
        assert_eq!(b.supported_features, set(&["big-parallel", "kvm"]));
        assert_eq!(b.mandatory_features, set(&["benchmark"]));
        let HostKeys::Pinned(keys) = &b.host_keys else {
            panic!("{:?}", b.host_keys)
        };
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].algorithm, "ssh-ed25519");
        assert_eq!(keys[0].comment.as_deref(), Some("root@builder"));
        assert_eq!(keys[1].algorithm, "ecdsa-sha2-nistp256");
        assert_eq!(keys[0].blob().len(), 51);
        assert!(b.lazy.is_none());
        // Unpadded base64 is accepted, like Nix's decoder.
        let unpadded = b64(&format!("{ED25519}\n"))
            .trim_end_matches('=')
            .to_owned();
        assert!(!unpadded.len().is_multiple_of(4), "{unpadded}");
        let b = one(&format!("ssh://h x86_64-linux - 1 1 - - {unpadded}"));
        assert!(matches!(&b.host_keys, HostKeys::Pinned(k) if k.len() == 1));
        assert_eq!(
            b.origin.to_string(),
            "machines line the 'builders' setting, line 1"
        );
    }

    #[test]
    fn placeholders_and_defaults() {
        let b = one("root@h - - - - - - -");
        assert_eq!(b.store_uri, "ssh://root@h");
        assert_eq!(b.systems, set(&["x86_64-linux"]));
        assert_eq!(
            (b.ssh_key.clone(), b.max_jobs, b.speed_factor),
            (None, 1, 1.0)
        );
        assert!(b.supported_features.is_empty() && b.mandatory_features.is_empty());
        assert_eq!(b.host_keys, HostKeys::SshDefault);
        let b = one("h\tx86_64-linux,,i686-linux - 0 0");
        assert_eq!(b.systems, set(&["i686-linux", "x86_64-linux"]));
        assert_eq!(
            (b.max_jobs, b.speed_factor),
            (0, 1.0),
            "maxJobs 0 is kept; speed 0 means 1"
        );
    }

    #[test]
    fn bad_columns_quote_nix() {
        let msg = err_text(machines("a\nh x86_64-linux - two", &[]));
        assert_eq!(
            msg,
            "the 'builders' setting, line 2: bad machine specification: failed to convert column #3 in a row: 'h x86_64-linux - two' to 'unsigned int'"
        );
        assert!(err_text(machines("h - - -1", &[])).contains("column #3"));
        assert!(err_text(machines("h - - +1", &[])).contains("column #3"));
        assert!(
            err_text(machines("h - - 1 fast", &[]))
                .contains("column #4 in a row: 'h - - 1 fast' to 'float'")
        );
        assert!(err_text(machines("h - - 1 inf", &[])).contains("'float'"));
        assert!(err_text(machines("h - - 1 -2", &[])).contains("speed factor must be >= 0"));
        let msg = err_text(machines("- x86_64-linux", &[("/x", "")]));
        assert!(
            msg.contains("store URL was not found at the first column of a row: '- x86_64-linux'"),
            "{msg}"
        );
        let msg = err_text(machines("@/m", &[("/m", "\n\nh - - - - - - !!notbase64")]));
        assert!(
            msg.starts_with("/m:3: bad machine specification: a column #7 in a row:")
                && msg.contains("is not valid base64 string"),
            "{msg}"
        );
        let msg = err_text(machines(
            &format!("h - - - - - - {}", b64("hello world")),
            &[],
        ));
        assert!(
            msg.contains("does not hold an SSH public host key"),
            "{msg}"
        );
        // A key line whose blob says another type.
        let lie = ED25519.replacen("ssh-ed25519", "ssh-rsa", 1);
        assert!(
            err_text(machines(&format!("h - - - - - - {}", b64(&lie)), &[]))
                .contains("is a 'ssh-ed25519' key")
        );
    }

    #[test]
    fn columns_override_uri_parameters() {
        let b = one(&format!(
            "ssh://h?ssh-key=/from-param&base64-ssh-public-host-key={} - /from-column",
            b64(ECDSA)
        ));
        assert_eq!(b.ssh_key.as_deref(), Some(Path::new("/from-column")));
        let HostKeys::Pinned(k) = &b.host_keys else {
            panic!()
        };
        assert_eq!(k[0].algorithm, "ecdsa-sha2-nistp256");
        let b = one(&format!(
            "ssh://h?ssh-key=/from-param - - - - - - {}",
            b64(ED25519)
        ));
        assert_eq!(b.ssh_key.as_deref(), Some(Path::new("/from-param")));
        let HostKeys::Pinned(k) = &b.host_keys else {
            panic!()
        };
        assert_eq!(k[0].algorithm, "ssh-ed25519");
        assert_eq!(
            b.store_uri, "ssh://h?ssh-key=/from-param",
            "the slot key is the URI as written"
        );
    }

    #[test]
    fn non_ssh_stores_are_skipped_with_a_warning() {
        let (b, notes) = machines(
            "local x86_64-linux\n/tmp/store\nauto\nhttps://c\nssh://h:bad\nroot@good",
            &[],
        )
        .unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].store_uri, "ssh://root@good");
        assert_eq!(notes.len(), 5);
        assert!(notes.iter().all(|n| n.level == NoteLevel::Warn));
        assert!(
            notes[0]
                .message
                .starts_with("the 'builders' setting, line 1: ignoring machine: 'local'"),
            "{:?}",
            notes[0]
        );
        assert!(notes[4].message.contains("bad port"));
    }

    // ---- NIX_SSHOPTS

    #[test]
    fn sshopts_port_and_identity() {
        for (v, port, key) in [
            ("-p 2222", Some(2222), None),
            ("-p2222 -i /k", Some(2222), Some("/k")),
            ("-oPort=2200 -i/k2", Some(2200), Some("/k2")),
            ("-o Port=2201", Some(2201), None),
            (
                "-o 'Port 2202' -o IdentityFile=/k3",
                Some(2202),
                Some("/k3"),
            ),
            ("-vp 2203", Some(2203), None),
            ("-p 1 -p 2 -i /a -i /b", Some(1), Some("/a")),
            ("-C -o StrictHostKeyChecking=no -F /cfg", None, None),
            ("-i \"/with space/k\"", None, Some("/with space/k")),
            ("", None, None),
        ] {
            let o = SshOpts::parse(v);
            assert_eq!(o.port, port, "{v}");
            assert_eq!(o.identity.as_deref(), key.map(Path::new), "{v}");
        }
        let o = SshOpts::parse("-C -o StrictHostKeyChecking=no -F /cfg -p nope -l");
        assert_eq!(
            o.ignored,
            [
                "-C",
                "-o StrictHostKeyChecking=no",
                "-F /cfg",
                "-p nope (not a port number)",
                "-l (no value)"
            ]
        );
        assert_eq!(o.port, None);
    }

    #[test]
    fn shell_split_quotes() {
        assert_eq!(
            shell_split(r#" a 'b c' "d \"e\"" f\ g "" "#),
            ["a", "b c", "d \"e\"", "f g", ""]
        );
    }

    // ---- config path

    #[test]
    fn config_path_resolution() {
        let d = resolve_config_path(None, None);
        assert_eq!(
            (d.path.as_path(), d.source),
            (Path::new(DEFAULT_CONFIG_PATH), ConfigSource::Default)
        );
        let e = resolve_config_path(None, Some(OsStr::new("/env.toml")));
        assert_eq!(
            (e.path.as_path(), e.source),
            (Path::new("/env.toml"), ConfigSource::Env)
        );
        let c = resolve_config_path(Some(Path::new("/cli.toml")), Some(OsStr::new("/env.toml")));
        assert_eq!(
            (c.path.as_path(), c.source),
            (Path::new("/cli.toml"), ConfigSource::Cli)
        );
        assert_eq!(
            resolve_config_path(None, Some(OsStr::new(""))).source,
            ConfigSource::Default
        );
    }

    // ---- TOML

    fn toml_ok(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/nix/lazy-builder.toml"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn toml_err(text: &str) -> (usize, Option<String>, String) {
        match Config::parse(text, Path::new("/etc/nix/lazy-builder.toml")) {
            Err(ConfigError::Toml {
                path,
                line,
                key,
                message,
                ..
            }) => {
                assert_eq!(path, Path::new("/etc/nix/lazy-builder.toml"));
                (line, key, message)
            }
            other => panic!("expected a TOML error, got {other:?}"),
        }
    }

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
        assert!(matches!(&a.host_keys, HostKeys::Pinned(k) if k.len() == 1));
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

    const MINI: &str = "[builders.b]\nuri = \"ssh://h\"\nsystems = [\"x86_64-linux\"]\n";

    fn mini(extra: &str) -> String {
        format!("{MINI}host-key = \"{ED25519}\"\n{extra}")
    }

    #[test]
    fn toml_errors_name_line_and_key() {
        let (line, key, msg) = toml_err(&mini("bogus = 1\n"));
        assert_eq!((line, key.as_deref()), (5, Some("builders.b.bogus")));
        assert!(msg.contains("unknown field `bogus`"), "{msg}");
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
            full.starts_with("/x.toml:5:1: builders.b.bogus: unknown field `bogus`"),
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
        assert!(toml_err(&no_systems).2.contains("missing field `systems`"));
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
        assert!(
            toml_err(&boot("kind = \"command\"\n"))
                .2
                .contains("needs command")
        );
        assert!(
            toml_err(&boot("kind = \"command\"\ncommand = []\n"))
                .2
                .contains("non-empty")
        );
        assert!(
            toml_err(&boot(
                "kind = \"command\"\ncommand = [\"/x\"]\nstop-signal = \"BOOM\"\n"
            ))
            .2
            .contains("unknown signal")
        );
        assert!(
            toml_err(&boot("kind = \"darling\"\n"))
                .2
                .contains("needs prefix")
        );
        assert!(
            toml_err(&boot("kind = \"qemu\"\n"))
                .2
                .contains("needs runner, kernel, disk or drives")
        );
        let (_, key, msg) = toml_err(&boot(
            "kind = \"qemu\"\nrunner = \"/run-vm\"\ndisk = \"/d\"\n",
        ));
        assert_eq!(key.as_deref(), Some("builders.b.boot.disk"));
        assert!(msg.contains("runner"));
        assert!(
            toml_err(&boot("kind = \"qemu\"\ndisk = \"/d\"\ninitrd = \"/i\"\n"))
                .2
                .contains("needs kernel")
        );
        assert!(
            toml_err(&boot("kind = \"qemu\"\ndisk = \"/d\"\naccel = \"xen\"\n"))
                .2
                .contains("unknown accelerator")
        );
        assert!(
            toml_err(&boot("kind = \"qemu\"\ndisk = \"/d\"\ncpus = 0\n"))
                .2
                .contains(">= 1")
        );
        assert!(
            toml_err(&boot("kind = \"qemu\"\ndisk = \"/d\"\nssh-port = 70000\n"))
                .2
                .contains("port")
        );
        assert!(
            toml_err(&boot("kind = \"qemu\"\ndisk = \"/d\"\nmemory = \"1X\"\n"))
                .2
                .contains("unknown unit")
        );
        assert!(
            toml_err(&boot("kind = \"qemu\"\ndisk = \"/d\"\nmemory = 0\n"))
                .2
                .contains("at least")
        );
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
            matches!(&c.builders[0].host_keys, HostKeys::Pinned(k) if k[0].algorithm == "ssh-ed25519")
        );
        let c = Config::parse(&with(kh.to_str().unwrap()), &cfg_path).unwrap();
        assert_eq!(
            c.builders[0].host_keys,
            HostKeys::KnownHostsFile(kh.clone())
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

    // ---- the unified table

    #[test]
    fn table_merges_sshopts_and_toml() {
        let config = toml_ok(&format!(
            "[builders.vm]\nuri = \"ssh://root@127.0.0.1:31022\"\nsystems = [\"aarch64-linux\"]\nhost-key = \"{ED25519}\"\n\
             [builders.vm.boot]\nkind = \"command\"\ncommand = [\"/start\"]\n"
        ));
        let (m, notes) = machines(
            "ssh://root@127.0.0.1:31022 aarch64-linux\nroot@a\nroot@b:2022 - /own-key\nlocal",
            &[],
        )
        .unwrap();
        let t = build_table(m, notes, &SshOpts::parse("-p 2222 -i /env-key -v"), &config);
        let names: Vec<&str> = t.builders.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["ssh://root@a", "ssh://root@b:2022", "vm"]);
        assert_eq!(
            t.builders[0].uri.port,
            Some(2222),
            "NIX_SSHOPTS port as default"
        );
        assert_eq!(
            t.builders[0].ssh_key.as_deref(),
            Some(Path::new("/env-key"))
        );
        assert_eq!(
            t.builders[0].store_uri, "ssh://root@a",
            "defaults do not change the slot key"
        );
        assert_eq!(t.builders[1].uri.port, Some(2022), "an explicit port wins");
        assert_eq!(
            t.builders[1].ssh_key.as_deref(),
            Some(Path::new("/own-key")),
            "the key column wins"
        );
        assert_eq!(t.builders[2].uri.port, Some(31022));
        assert!(t.builders[2].is_lazy());
        let levels: Vec<NoteLevel> = t.notes.iter().map(|n| n.level).collect();
        assert_eq!(
            levels,
            [NoteLevel::Warn, NoteLevel::Debug, NoteLevel::Info],
            "{:?}",
            t.notes
        );
        assert!(t.notes[2].message.contains("using the TOML definition"));
    }

    #[test]
    fn load_table_reads_real_files() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("machines");
        std::fs::write(&m, "root@x aarch64-linux - 3\n").unwrap();
        let spec = format!("@{}; @{}/absent", m.display(), dir.path().display());
        let t = load_table(&spec, "x86_64-linux", None, &Config::default()).unwrap();
        assert_eq!(t.builders.len(), 1);
        assert_eq!(t.builders[0].max_jobs, 3);
        assert_eq!(
            t.builders[0].origin,
            Origin::Machines(MachinesOrigin {
                source: MachinesSource::File(m.clone()),
                line: 1
            })
        );
        // A directory where a file is expected is a read error, not a missing file.
        let e = load_table(
            &format!("@{}", dir.path().display()),
            "x86_64-linux",
            None,
            &Config::default(),
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::MachinesRead { .. }), "{e}");
        // A real include loop through a symlink.
        let a = dir.path().join("a");
        std::fs::write(&a, format!("@{}/link\n", dir.path().display())).unwrap();
        std::os::unix::fs::symlink(&a, dir.path().join("link")).unwrap();
        let e = load_table(
            &format!("@{}", a.display()),
            "x86_64-linux",
            None,
            &Config::default(),
        )
        .unwrap_err();
        match e {
            // Found at once, through the symlink, not by the depth limit.
            ConfigError::IncludeLoop { chain, .. } => {
                assert_eq!(chain, format!("{} -> {}", a.display(), a.display()))
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn well_known_host_key_is_recognised_and_allowed_only_by_toml() {
        let wk = WELL_KNOWN_HOST_KEYS[0].key;
        let blob = |line: &str| PinnedKey::parse_line(line).unwrap().blob();
        assert_eq!(
            well_known_host_key(&blob(wk)),
            Some(&WELL_KNOWN_HOST_KEYS[0])
        );
        // A comment does not hide it.
        let commented = format!("{wk} root@darwin-builder");
        assert!(well_known_host_key(&blob(&commented)).is_some());
        assert_eq!(well_known_host_key(&blob(ED25519)), None);

        let parse = |extra: &str| {
            let text = format!("{MINI}host-key = \"{wk}\"\n{extra}");
            Config::parse(&text, Path::new("/etc/nix/lazy-builder.toml")).unwrap()
        };
        assert!(!parse("").builders[0].allow_well_known_host_key);
        assert!(parse("allow-well-known-host-key = true\n").builders[0].allow_well_known_host_key);
        assert!(
            !parse("allow-well-known-host-key = false\n").builders[0].allow_well_known_host_key
        );
        let (line, key, _) = toml_err(&mini("allow-well-known-host-key = \"yes\"\n"));
        assert_eq!(
            (line, key.as_deref()),
            (5, Some("builders.b.allow-well-known-host-key"))
        );
        // The machines grammar has no column for it.
        let line = format!("ssh://h x86_64-linux - 1 1 - - {}", b64(wk));
        let (b, _) = parse_machines(&line, "x86_64-linux", &mut fake_fs(&[])).unwrap();
        assert!(!b[0].allow_well_known_host_key);
    }
}
