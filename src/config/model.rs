//! The configuration as the rest of the program sees it: the TOML file ([`Config`]), the merged
//! table ([`BuilderTable`]) of [`Builder`]s, each with its origin, host-key spec and, for a lazy
//! builder, its boot settings ([`BootSpec`]); and where the TOML file is ([`ConfigPath`]).
//!
//! Plain data and the little logic that belongs to it. It never parses text (the sibling
//! parsers do) and reads nothing: not a file, not the environment.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::Note;
use super::host_key::PinnedKey;
use super::uri::BuilderUri;
use super::{DEFAULT_CONFIG_PATH, DEFAULT_KEEP_WARM, DEFAULT_STATE_DIR};

/// Where a builder's SSH host keys come from, as the configuration says: the keys themselves,
/// or where to look them up. `ssh::SshTarget::for_builder` turns it into the set of keys a
/// connection accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKeySpec {
    /// Accept exactly these keys (any of them).
    Pinned(Vec<PinnedKey>),
    /// Look the host up in this known_hosts file.
    KnownHostsFile(PathBuf),
    /// A machines-table line without a host-key column: as with Nix's hook, the host is checked
    /// against the user's and the system's known_hosts files (`~/.ssh/known_hosts`,
    /// `/etc/ssh/ssh_known_hosts`), as OpenSSH would. TOML builders are never unpinned.
    SshDefault,
}

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
    pub host_keys: HostKeySpec,
    /// `allow-well-known-host-key = true` (TOML only): connect even though a pinned key is one
    /// of [`WELL_KNOWN_HOST_KEYS`](super::WELL_KNOWN_HOST_KEYS), with a warning. Always false for machines-table lines,
    /// whose grammar has no column for it.
    pub allow_well_known_host_key: bool,
    pub origin: Origin,
    /// `Some` for builders that are booted on demand.
    pub lazy: Option<LazySettings>,
    /// How long the supervisor keeps a warm SSH connection (and ready remote sessions) to
    /// this builder after its last use: the builder's `keep-warm`, else `[supervisor]
    /// keep-warm`, else [`DEFAULT_KEEP_WARM`](super::DEFAULT_KEEP_WARM). Zero (`"0s"`): no
    /// warm connection; every build connects on its own.
    pub keep_warm: Duration,
}

impl Builder {
    /// The key for slot files and the upload lock (see [`Builder::store_uri`]).
    pub fn slot_key(&self) -> &str {
        &self.store_uri
    }

    pub fn is_lazy(&self) -> bool {
        self.lazy.is_some()
    }

    /// Whether builds may use the supervisor's warm connection to this builder.
    pub fn warm(&self) -> bool {
        !self.keep_warm.is_zero()
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

/// Who named the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    /// Nobody: the built-in default path. A missing file there just means "no lazy builders".
    Default,
    /// The [`CONFIG_ENV_VAR`](super::CONFIG_ENV_VAR) environment variable.
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

/// The built-in default path, named by nobody.
impl Default for ConfigPath {
    fn default() -> Self {
        resolve_config_path(None, None)
    }
}

impl ConfigPath {
    /// The path, when it was named (`--config` or the environment) rather than the default:
    /// what a hook passes on to the supervisor it starts.
    pub fn named(&self) -> Option<&Path> {
        (self.source != ConfigSource::Default).then_some(self.path.as_path())
    }
}

/// Pick the config file: `--config` (`cli`) wins over [`CONFIG_ENV_VAR`](super::CONFIG_ENV_VAR) (`env`, its value as
/// `main` read it from the environment), which wins over [`DEFAULT_CONFIG_PATH`]. An empty
/// value counts as unset.
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

/// `[supervisor]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SupervisorSettings {
    pub state_dir: PathBuf,
    /// `keep-warm` for builders that do not set their own (the machines table's, and TOML
    /// builders without one).
    pub keep_warm: Duration,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        SupervisorSettings {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            keep_warm: DEFAULT_KEEP_WARM,
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

/// All builders the hook may use, in table order (machines lines first, in Nix's order, then
/// TOML builders in file order), and what the loader noticed on the way.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct BuilderTable {
    pub builders: Vec<Builder>,
    pub notes: Vec<Note>,
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
