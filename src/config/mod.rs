//! The builder table: Nix's machines grammar (the `builders` setting with its `@file`
//! includes), `NIX_SSHOPTS` defaults, and the TOML file that describes lazy builders, all merged
//! into one list of [`Builder`]s.
//!
//! The model (`model`: builders, boot specs, the TOML config and where it is; `error`: errors
//! and notes) is apart from the parsers, one file per grammar:
//! store URIs (`uri`), the machines grammar (`machines`), host-key lines and files
//! (`host_key`), Nix's own nix.conf for the daemon's `builders` (`nix_conf`), `NIX_SSHOPTS` (`sshopts`) and the TOML file (`toml_file`, its decoder's messages reworded
//! by `words`). This file merges
//! their results into the [`BuilderTable`] and re-exports the room's whole public surface, so
//! every item has the one path `config::Item`.
//!
//! This room owns parsing and validation only. It must never connect to a builder, boot
//! anything, take a lock or read the process environment: `main` reads `NIX_SSHOPTS` and
//! [`CONFIG_ENV_VAR`] and callers pass the values in, with the `builders` and `system` settings.
//! The only I/O it does is reading the files those values name (machines files, the TOML file,
//! `host-key-file`s, nix.conf and its includes).

mod error;
mod host_key;
mod machines;
mod model;
mod nix_conf;
mod sshopts;
mod toml_file;
mod uri;
mod words;

#[cfg(test)]
mod test_support;

use std::path::Path;
use std::time::Duration;

pub use error::{ConfigError, Note, NoteLevel};
pub use host_key::{
    PinnedKey, WELL_KNOWN_HOST_KEYS, WellKnownKey, parse_key_lines, well_known_host_key,
};
pub use machines::{
    MachineEntry, MachineParse, expand_builders, parse_machine_entry, parse_machines, read_file,
};
pub use model::{
    Accel, BootSpec, Builder, BuilderTable, CommandBoot, Config, ConfigPath, ConfigSource,
    DarlingBoot, HostKeySpec, LazySettings, MachinesOrigin, MachinesSource, Origin, QemuBoot,
    StopSignal, SupervisorSettings, resolve_config_path,
};
pub use nix_conf::{NixConfEnv, NixConfError, SettingValue, daemon_setting};
pub use sshopts::SshOpts;
pub use uri::{BuilderUri, Scheme, UriError, nix_store_uri};

/// The TOML file read when neither `--config` nor [`CONFIG_ENV_VAR`] names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nix/lazy-builder.toml";
/// The environment variable that overrides [`DEFAULT_CONFIG_PATH`] (a `--config` wins over it).
/// `main` reads it; this room only names it.
pub const CONFIG_ENV_VAR: &str = "NIX_LAZY_BUILDER_CONFIG";
/// The environment variable Nix's hook takes ssh options from; `main` reads it.
pub const SSHOPTS_ENV_VAR: &str = "NIX_SSHOPTS";
/// Nix's default for the `builders` setting.
pub const DEFAULT_BUILDERS: &str = "@/etc/nix/machines";
/// Default `[supervisor] state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/nix/var/nix/lazy-builder";
/// Default `idle-timeout` of a lazy builder.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Default `boot-timeout` of a lazy builder.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(2 * 60);
/// Default `keep-warm`: how long the supervisor keeps a builder's SSH connection after its
/// last build, like an OpenSSH `ControlPersist` of ten minutes.
pub const DEFAULT_KEEP_WARM: Duration = Duration::from_secs(10 * 60);

/// Merge machines-table builders, `NIX_SSHOPTS` defaults and the TOML builders.
///
/// Machines-table builders take `[supervisor] keep-warm` (the machines grammar has no column
/// for it).
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
        b.keep_warm = config.supervisor.keep_warm;
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
    use super::test_support::{ED25519, machines, toml_ok};
    use super::*;

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
}
