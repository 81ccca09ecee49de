//! The worker handshake (docs/protocol.md §8.1): greetings, version and feature negotiation,
//! the daemon's Nix version and trust answer, and [`Negotiated`], the protocol every later
//! message is gated on.
//!
//! Owns the version numbers we announce and accept and the rules that derive layouts from the
//! negotiated version ([`Negotiated::build_result_layout`], [`Unsupported`]). Must never perform
//! I/O or gate on the client's or the server's number alone: every gate uses the negotiated one.
//!
//! The steps:
//! 1. client: [`encode_hello`] (magic + version; no need to wait for the daemon);
//! 2. daemon: [`decode_server_hello`] → negotiated version;
//! 3. client: [`encode_after_hello`] ([≥1.38] features, [≥1.14] affinity 0, [≥1.11]
//!    reserveSpace 0);
//! 4. daemon: [`decode_server_info`] ([≥1.38] features, [≥1.33] Nix version, [≥1.35] trust);
//! 5. daemon: stderr messages up to `STDERR_LAST` (`decode_stderr` / `decode_response`).

use std::collections::BTreeSet;

use crate::build_result::{BuildResultLayout, BuiltOutputsLayout};
use crate::path_info::read_string_set;
use crate::version::{self, ProtocolVersion, ServerHello};
use crate::wire::{self, Invalid, Reader, WireWrite};

/// Sent by the client first.
pub const MAGIC_1: u64 = 0x6e69_7863;
/// Sent by the daemon in reply.
pub const MAGIC_2: u64 = 0x6478_696f;

/// The feature under which BuildResults carry `output → (path, signatures)` instead of
/// realisation JSON (Nix ≥ 2.35).
pub const FEATURE_REALISATION_WITH_PATH: &str = "realisation-with-path-not-hash";

/// The version we announce (see the module docs for why).
pub const CLIENT_VERSION: ProtocolVersion = ProtocolVersion::new(1, 35);
/// The oldest daemon we talk to (see the module docs for why).
pub const MIN_SERVER_VERSION: ProtocolVersion = ProtocolVersion::new(1, 21);
/// From this version on, the handshake exchanges feature sets.
pub const FEATURES_SINCE: ProtocolVersion = ProtocolVersion::new(1, 38);

/// The protocol both sides agreed on: `min(client, server)` and the intersection of features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub version: ProtocolVersion,
    pub features: BTreeSet<String>,
}

impl Negotiated {
    /// A version with no features.
    pub fn new(version: ProtocolVersion) -> Self {
        Negotiated {
            version,
            features: BTreeSet::new(),
        }
    }

    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.contains(feature)
    }

    /// True if the negotiated version is at least `major.minor`.
    pub fn at_least(&self, major: u8, minor: u8) -> bool {
        self.version >= ProtocolVersion::new(major, minor)
    }

    /// How a BuildResult is laid out on this connection: times from 1.29, CPU times from 1.37,
    /// the built outputs as `(path, signatures)` with [`FEATURE_REALISATION_WITH_PATH`], else as
    /// realisation JSON from 1.28.
    pub fn build_result_layout(&self) -> BuildResultLayout {
        BuildResultLayout {
            times: self.at_least(1, 29),
            cpu_times: self.at_least(1, 37),
            outputs: if self.has_feature(FEATURE_REALISATION_WITH_PATH) {
                BuiltOutputsLayout::PathAndSignatures
            } else if self.at_least(1, 28) {
                BuiltOutputsLayout::RealisationJson
            } else {
                BuiltOutputsLayout::Absent
            },
        }
    }
}

/// An operation the negotiated version cannot express.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} needs worker protocol {needs} or newer, but the connection speaks {have}")]
pub struct Unsupported {
    pub what: &'static str,
    pub needs: ProtocolVersion,
    pub have: ProtocolVersion,
}

pub(super) fn require(
    proto: &Negotiated,
    what: &'static str,
    needs: ProtocolVersion,
) -> Result<(), Unsupported> {
    if proto.version >= needs {
        Ok(())
    } else {
        Err(Unsupported {
            what,
            needs,
            have: proto.version,
        })
    }
}

/// Step 1: `MAGIC_1, version`.
pub fn encode_hello(w: &mut Vec<u8>, client: ProtocolVersion) {
    version::encode_greeting(w, MAGIC_1, client);
}

/// Step 2: decodes `MAGIC_2, version` and negotiates. A wrong magic, a major version other than
/// 1 or a daemon older than [`MIN_SERVER_VERSION`] is [`Invalid`].
pub fn decode_server_hello(
    r: &mut Reader<'_>,
    client: ProtocolVersion,
) -> wire::Result<ServerHello> {
    let server = version::decode_server_greeting(
        r,
        MAGIC_2,
        "the nix-daemon greeting",
        "worker protocol version",
    )?;
    version::negotiate(
        server,
        client,
        MIN_SERVER_VERSION,
        "the remote nix-daemon speaks worker protocol",
    )
}

/// Step 3: the client's part after the greeting, for the negotiated `version`: our features
/// (≥ 1.38 only), then the obsolete CPU-affinity (≥ 1.14) and reserve-space (≥ 1.11) fields.
pub fn encode_after_hello(
    w: &mut Vec<u8>,
    version: ProtocolVersion,
    client_features: &BTreeSet<String>,
) {
    if version >= FEATURES_SINCE {
        w.put_strings(client_features);
    }
    if version >= ProtocolVersion::new(1, 14) {
        w.put_u64(0);
    }
    if version >= ProtocolVersion::new(1, 11) {
        w.put_u64(0);
    }
}

/// Whether the daemon trusts us (≥ 1.35).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    Trusted,
    NotTrusted,
}

/// What the daemon told us about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// The daemon's features as it listed them (≥ 1.38).
    pub server_features: BTreeSet<String>,
    /// e.g. "2.8.0" (≥ 1.33).
    pub nix_version: Option<String>,
    /// `None` below 1.35 or when the daemon does not know.
    pub trust: Option<Trust>,
}

/// Step 4: decodes the daemon's part after our step 3 and returns the negotiated protocol (the
/// features both sides listed) with what the daemon said. Stderr messages up to `STDERR_LAST`
/// follow.
pub fn decode_server_info(
    r: &mut Reader<'_>,
    version: ProtocolVersion,
    client_features: &BTreeSet<String>,
) -> wire::Result<(Negotiated, ServerInfo)> {
    let server_features = if version >= FEATURES_SINCE {
        read_string_set(r, "daemon features")?
    } else {
        BTreeSet::new()
    };
    let nix_version = if version >= ProtocolVersion::new(1, 33) {
        Some(r.text()?)
    } else {
        None
    };
    let trust = if version >= ProtocolVersion::new(1, 35) {
        match r.u64()? {
            0 => None,
            1 => Some(Trust::Trusted),
            2 => Some(Trust::NotTrusted),
            v => {
                return Err(Invalid::OutOfRange {
                    what: "trust flag",
                    value: v,
                }
                .into());
            }
        }
    } else {
        None
    };
    let negotiated = Negotiated {
        version,
        features: server_features
            .intersection(client_features)
            .cloned()
            .collect(),
    };
    Ok((
        negotiated,
        ServerInfo {
            server_features,
            nix_version,
            trust,
        },
    ))
}
