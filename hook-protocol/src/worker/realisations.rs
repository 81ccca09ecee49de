//! The realisation operations (docs/protocol.md §8.3): RegisterDrvOutput (op 42), which records
//! that a content-addressed derivation's output was realised at a path, and QueryRealisation
//! (op 43), which asks for such a record, in the layouts of worker 1.27–1.30 and from 1.31 on.
//!
//! Owns the gates for both: they exist from 1.27, and only for realisations keyed by the
//! derivation's hash (Nix 2.4 … 2.34). A daemon that offers `realisation-with-path-not-hash`
//! (Nix ≥ 2.35) takes realisations only in another layout, keyed by derivation path, and only
//! under that feature: [`check_realisations`] says so before anything is sent, because such a
//! daemon answers our layout with an error and then misreads the rest of the request. Must
//! never decide which realisations to register: the caller does.

use crate::path_info::read_store_path_set;
use crate::realisation::{DrvOutput, Realisation};
use crate::version::ProtocolVersion;
use crate::wire::{self, DecodeError, Invalid, Reader, WireWrite};

use super::Op;
use super::handshake::{
    FEATURE_REALISATION_WITH_PATH, Negotiated, ServerInfo, Unsupported, require,
};

/// From this version on, both operations exist.
pub const REALISATIONS_SINCE: ProtocolVersion = ProtocolVersion::new(1, 27);
/// From this version on, they carry the realisation as JSON (before: id and path).
pub const REALISATION_JSON_SINCE: ProtocolVersion = ProtocolVersion::new(1, 31);

/// Why a connection cannot take realisations as this crate writes them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RealisationsUnsupported {
    #[error(transparent)]
    TooOld(#[from] Unsupported),
    /// The daemon keys realisations by derivation path (Nix ≥ 2.35).
    #[error(
        "the nix-daemon keys realisations by derivation path (it offers the \
         '{FEATURE_REALISATION_WITH_PATH}' protocol feature, Nix 2.35 or newer), which this \
         program does not speak"
    )]
    KeyedByPath,
}

pub(super) fn gate(proto: &Negotiated, what: &'static str) -> Result<(), RealisationsUnsupported> {
    require(proto, what, REALISATIONS_SINCE)?;
    if proto.has_feature(FEATURE_REALISATION_WITH_PATH) {
        return Err(RealisationsUnsupported::KeyedByPath);
    }
    Ok(())
}

/// Whether RegisterDrvOutput and QueryRealisation work on this connection as this crate writes
/// them: worker ≥ 1.27, and a daemon that does not key realisations by derivation path (one
/// that lists [`FEATURE_REALISATION_WITH_PATH`] among its features does).
pub fn check_realisations(
    proto: &Negotiated,
    info: &ServerInfo,
) -> Result<(), RealisationsUnsupported> {
    gate(proto, "RegisterDrvOutput")?;
    if info.server_features.contains(FEATURE_REALISATION_WITH_PATH) {
        return Err(RealisationsUnsupported::KeyedByPath);
    }
    Ok(())
}

/// RegisterDrvOutput (op 42): from 1.31 the realisation as Nix's JSON; before, its id and the
/// base name of its path. The stderr loop ends with `STDERR_LAST` and no reply data; a path
/// that is not valid yet is a daemon error (the database refuses it), after which the
/// connection is still usable.
pub fn encode_register_drv_output(
    w: &mut Vec<u8>,
    proto: &Negotiated,
    realisation: &Realisation,
) -> Result<(), RealisationsUnsupported> {
    gate(proto, "RegisterDrvOutput")?;
    w.put_u64(Op::RegisterDrvOutput.code());
    if proto.version >= REALISATION_JSON_SINCE {
        w.put_str(&realisation.to_json());
    } else {
        w.put_str(&realisation.id.to_string());
        w.put_str(realisation.out_path.base_name());
    }
    Ok(())
}

/// QueryRealisation (op 43): the id. Reply: [`decode_query_realisation_reply`].
pub fn encode_query_realisation(
    w: &mut Vec<u8>,
    proto: &Negotiated,
    id: &DrvOutput,
) -> Result<(), RealisationsUnsupported> {
    gate(proto, "QueryRealisation")?;
    w.put_u64(Op::QueryRealisation.code());
    w.put_str(&id.to_string());
    Ok(())
}

/// The QueryRealisation reply for `asked`: a set with at most one element, from 1.31 of
/// realisation JSON, before of out paths (the realisation then has no signatures). An empty set
/// is `None`. A realisation of another id, or more than one, is [`Invalid`].
pub fn decode_query_realisation_reply(
    r: &mut Reader<'_>,
    proto: &Negotiated,
    asked: &DrvOutput,
    store_dir: &str,
) -> wire::Result<Option<Realisation>> {
    let found = if proto.version >= REALISATION_JSON_SINCE {
        r.list("realisations", |r| {
            let json = r.str("realisation")?;
            Realisation::from_json(json, store_dir)
                .map_err(|e| DecodeError::Invalid(Invalid::Malformed(e.to_string())))
        })?
    } else {
        read_store_path_set(r, "realisation paths")?
            .into_iter()
            .map(|out_path| Realisation {
                id: asked.clone(),
                out_path,
                signatures: Default::default(),
                dependent_realisations: Default::default(),
            })
            .collect()
    };
    let mut it = found.into_iter();
    let first = it.next();
    if it.next().is_some() {
        return Err(DecodeError::malformed(format!(
            "the daemon answered QueryRealisation for '{asked}' with more than one realisation"
        )));
    }
    match first {
        Some(r) if &r.id != asked => Err(DecodeError::malformed(format!(
            "asked for the realisation of '{asked}', the daemon answered with one of '{}'",
            r.id
        ))),
        other => Ok(other),
    }
}
