//! Where and how to connect to a builder ([`SshTarget`]), and the trust policy that decides
//! which host keys that connection accepts ([`SshTarget::for_builder`]): the builder's
//! [`HostKeySpec`] turned into a [`HostKeySet`], refusing a key whose private half is public
//! (nixpkgs' linux-builder key) unless the builder's TOML entry allows it.
//!
//! Every path that connects to a builder (the hook, the readiness check, `doctor`) gets its
//! target here, so this is the one place the rule is enforced. The supervisor's warm
//! connections use the target a hook got here, handed over as a [`TargetSpec`] (the resolved
//! keys, never re-derived in the supervisor). It reads the known_hosts files a spec names
//! (and, for a machines line without a key, the user's and the system's); it never connects.

use std::path::{Path, PathBuf};

use crate::config::{Builder, HostKeySpec, Origin, well_known_host_key};
pub use crate::supervisor::proto::TargetSpec;

use super::keepalive::Timeouts;
use super::keys::default_identities;
use super::known_hosts::{HostKeyError, HostKeySet};

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct SshTarget {
    /// The builder's name, for messages.
    pub builder: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Private key files (OpenSSH format; unencrypted), tried in order.
    pub identities: Vec<PathBuf>,
    pub host_keys: HostKeySet,
    pub timeouts: Timeouts,
}

/// Why a builder's configuration gives no target to connect to.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Its host keys cannot be read or parsed.
    #[error("builder '{builder}': {source}")]
    HostKeys {
        builder: String,
        #[source]
        source: HostKeyError,
    },
    /// A pinned key is one whose private half is public (see
    /// [`crate::config::WELL_KNOWN_HOST_KEYS`]) and the builder does not allow it.
    #[error(
        "builder '{builder}': refusing to connect: its pinned host key {key} is the well-known \
         key of {what}, so anyone can impersonate this builder. {fix}"
    )]
    WellKnownHostKey {
        builder: String,
        key: String,
        what: &'static str,
        fix: String,
    },
}

impl SshTarget {
    /// The target for a builder: its address, user and key, and the host keys its spec pins
    /// (checked against the well-known keys), with the default timeouts.
    pub fn for_builder(builder: &Builder) -> Result<SshTarget, TargetError> {
        let host = builder.uri.host.clone();
        let port = builder.uri.port_or_default();
        let user = builder
            .uri
            .user
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "root".to_owned());
        let key_err = |source| TargetError::HostKeys {
            builder: builder.name.clone(),
            source,
        };
        let host_keys = match &builder.host_keys {
            HostKeySpec::Pinned(keys) => {
                let lines: Vec<String> = keys.iter().map(|k| k.openssh()).collect();
                HostKeySet::parse_openssh(&lines.join("\n")).map_err(key_err)?
            }
            HostKeySpec::KnownHostsFile(path) => {
                HostKeySet::from_known_hosts_file(path, &host, port).map_err(key_err)?
            }
            HostKeySpec::SshDefault => {
                let mut keys = HostKeySet::new(Vec::new());
                let mut files = vec![PathBuf::from("/etc/ssh/ssh_known_hosts")];
                if let Some(home) = std::env::var_os("HOME") {
                    files.push(Path::new(&home).join(".ssh/known_hosts"));
                }
                for f in files.iter().filter(|f| f.is_file()) {
                    keys.extend(
                        HostKeySet::from_known_hosts_file(f, &host, port).map_err(key_err)?,
                    );
                }
                keys
            }
        };
        check_well_known_host_keys(builder, &host_keys)?;
        let identities = match &builder.ssh_key {
            Some(k) => vec![k.clone()],
            None => default_identities(),
        };
        Ok(SshTarget {
            builder: builder.name.clone(),
            host,
            port,
            user,
            identities,
            host_keys,
            timeouts: Timeouts::default(),
        })
    }
}

impl SshTarget {
    /// This target as plain data (see [`TargetSpec`]).
    pub fn spec(&self) -> TargetSpec {
        TargetSpec {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            identities: self.identities.clone(),
            host_keys: self
                .host_keys
                .keys()
                .iter()
                .filter_map(|k| k.to_openssh().ok())
                .collect(),
        }
    }

    /// The target a [`TargetSpec`] describes, for builder `builder`, with the default
    /// timeouts. No key is added or dropped: an empty list stays empty, and
    /// [`connect`](super::connect) refuses it.
    pub fn from_spec(builder: &str, spec: &TargetSpec) -> Result<SshTarget, TargetError> {
        let host_keys = if spec.host_keys.is_empty() {
            HostKeySet::default()
        } else {
            HostKeySet::parse_openssh(&spec.host_keys.join("\n")).map_err(|source| {
                TargetError::HostKeys {
                    builder: builder.to_owned(),
                    source,
                }
            })?
        };
        Ok(SshTarget {
            builder: builder.to_owned(),
            host: spec.host.clone(),
            port: spec.port,
            user: spec.user.clone(),
            identities: spec.identities.clone(),
            host_keys,
            timeouts: Timeouts::default(),
        })
    }
}

/// Refuses a pinned key whose private half is public unless the builder allows it (TOML
/// `allow-well-known-host-key = true`), and warns when it does.
fn check_well_known_host_keys(builder: &Builder, keys: &HostKeySet) -> Result<(), TargetError> {
    for key in keys.keys() {
        let Some(known) = key
            .to_bytes()
            .ok()
            .and_then(|blob| well_known_host_key(&blob))
        else {
            continue;
        };
        if builder.allow_well_known_host_key {
            tracing::warn!(
                "builder '{}' is pinned to the well-known host key of {} \
                 (allowed by allow-well-known-host-key): anyone can impersonate it, so it must \
                 only be reachable on a port nobody else can use",
                builder.name,
                known.what
            );
            continue;
        }
        let fix = match &builder.origin {
            Origin::Toml { file, .. } => format!(
                "Give the builder its own host key and pin that, or, if nobody else can reach \
                 its port, set `allow-well-known-host-key = true` for it in {}.",
                file.display()
            ),
            Origin::Machines(_) => "Give the builder its own host key and pin \
                 that; the machines table cannot allow this key: define the builder in the \
                 lazy-builder TOML config with `allow-well-known-host-key = true` instead."
                .to_owned(),
        };
        return Err(TargetError::WellKnownHostKey {
            builder: builder.name.clone(),
            key: known.key.to_owned(),
            what: known.what,
            fix,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFwgxv0w8zjLFNJ6M4EHyBd7/gHpLNuw1C+/JusH19ZC root@builder";

    #[test]
    fn a_spec_gives_back_the_same_target() {
        let target = SshTarget {
            builder: "b".into(),
            host: "127.0.0.1".into(),
            port: 2222,
            user: "nix".into(),
            identities: vec!["/k".into()],
            host_keys: HostKeySet::parse_openssh(ED25519).unwrap(),
            timeouts: Timeouts::default(),
        };
        let spec = target.spec();
        assert_eq!(spec.host_keys.len(), 1);
        let back = SshTarget::from_spec("b", &spec).unwrap();
        assert_eq!(back.host_keys, target.host_keys);
        assert_eq!(
            (back.host, back.port, back.user, back.identities),
            (target.host, target.port, target.user, target.identities)
        );
        // No keys stay no keys: connect refuses that, nothing here adds one.
        let empty = TargetSpec {
            host_keys: vec![],
            ..spec
        };
        assert!(
            SshTarget::from_spec("b", &empty)
                .unwrap()
                .host_keys
                .is_empty()
        );
    }
}
