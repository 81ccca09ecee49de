//! Fixtures the config parsers' unit tests share: two real public keys, a fake file system for
//! `@file` includes, and short ways to parse a machines line or a TOML text; and, for the unit
//! tests of the rooms that choose among builders, a plain `ssh://` builder and the lazy
//! settings of a `command` boot.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use std::time::Duration;

use super::{
    BootSpec, Builder, BuilderUri, CommandBoot, Config, ConfigError, HostKeySpec, LazySettings,
    Note, Origin, StopSignal, parse_machines,
};

pub(super) const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFwgxv0w8zjLFNJ6M4EHyBd7/gHpLNuw1C+/JusH19ZC root@builder";
pub(super) const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBPd64WEzs5agVbeO7CGBhhdsbeQBvXO7mM/iNNYeXFNu7CJzWgX1d/wKP88c+SNyxV8bEAc0qgDQ/SHIe7hwXe4=";

pub(super) fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

pub(super) fn fake_fs(files: &[(&str, &str)]) -> impl FnMut(&Path) -> io::Result<Vec<u8>> {
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

pub(super) fn machines(
    spec: &str,
    files: &[(&str, &str)],
) -> Result<(Vec<Builder>, Vec<Note>), ConfigError> {
    parse_machines(spec, "x86_64-linux", &mut fake_fs(files))
}

pub(super) fn one(line: &str) -> Builder {
    let (b, notes) = machines(line, &[]).unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(b.len(), 1);
    b.into_iter().next().unwrap()
}

pub(crate) fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

pub(super) fn err_text(r: Result<(Vec<Builder>, Vec<Note>), ConfigError>) -> String {
    r.expect_err("expected an error").to_string()
}

pub(super) fn toml_ok(text: &str) -> Config {
    Config::parse(text, Path::new("/etc/nix/lazy-builder.toml")).unwrap_or_else(|e| panic!("{e}"))
}

pub(super) fn toml_err(text: &str) -> (usize, Option<String>, String) {
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

pub(super) const MINI: &str = "[builders.b]\nuri = \"ssh://h\"\nsystems = [\"x86_64-linux\"]\n";

pub(super) fn mini(extra: &str) -> String {
    format!("{MINI}host-key = \"{ED25519}\"\n{extra}")
}

/// An always-on `ssh://NAME` builder for `systems`, as a `[builders.NAME]` table in /t with
/// only `uri`, `systems` and `max-jobs` gives it.
pub(crate) fn ssh_builder(name: &str, systems: &[&str], max_jobs: u32) -> Builder {
    let uri = format!("ssh://{name}");
    Builder {
        name: name.to_owned(),
        uri: BuilderUri::parse(&uri).unwrap(),
        store_uri: uri,
        systems: set(systems),
        ssh_key: None,
        max_jobs,
        speed_factor: 1.0,
        supported_features: BTreeSet::new(),
        mandatory_features: BTreeSet::new(),
        host_keys: HostKeySpec::SshDefault,
        allow_well_known_host_key: false,
        keep_warm: Duration::ZERO,
        origin: Origin::Toml {
            file: PathBuf::from("/t"),
            name: name.to_owned(),
        },
        lazy: None,
    }
}

/// A lazy builder's settings for `command = ["/x"]`: no idle stop, a 60 s boot timeout.
pub(crate) fn command_lazy(boot_for_local: bool) -> LazySettings {
    LazySettings {
        idle_timeout: None,
        boot_timeout: Duration::from_secs(60),
        boot_for_local,
        boot: BootSpec::Command(CommandBoot {
            command: vec!["/x".into()],
            stop_command: None,
            stop_signal: StopSignal::Term,
            environment: Default::default(),
        }),
    }
}
