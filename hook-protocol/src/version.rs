//! The version number both store protocols put in their greetings, and the greeting itself.
//!
//! Owns [`ProtocolVersion`] (a major and a minor number, ordered, `major << 8 | minor` in one
//! wire u64), [`ServerHello`] (what a server's greeting told us) and the one greeting layout the
//! serve and worker handshakes share: a magic u64, then the version (docs/protocol.md §7, §8.1).
//! It must never know which protocol gates what on which number: those rules live in `serve` and
//! `worker`. Sans-IO, like the rest of the crate.

use std::fmt;

use crate::wire::{self, DecodeError, Invalid, Reader, WireWrite};

/// A serve (2.x) or worker (1.x) protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion {
    pub major: u8,
    pub minor: u8,
}

impl ProtocolVersion {
    pub const fn new(major: u8, minor: u8) -> Self {
        ProtocolVersion { major, minor }
    }

    pub fn to_wire(self) -> u64 {
        (self.major as u64) << 8 | self.minor as u64
    }

    /// `None` for values no Nix can send (anything above 16 bits).
    pub fn from_wire(v: u64) -> Option<Self> {
        (v <= 0xffff).then(|| ProtocolVersion::new((v >> 8) as u8, v as u8))
    }

    /// Reads one version u64; a value above 16 bits is [`Invalid::OutOfRange`] named `what`.
    pub fn decode(r: &mut Reader<'_>, what: &'static str) -> wire::Result<Self> {
        r.code(what, ProtocolVersion::from_wire)
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What a server's greeting said, and what we agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerHello {
    pub server: ProtocolVersion,
    /// `min(client, server)`: gate every later message on this.
    pub negotiated: ProtocolVersion,
}

/// Appends a greeting: `magic`, then `version`.
pub(crate) fn encode_greeting(w: &mut Vec<u8>, magic: u64, version: ProtocolVersion) {
    w.put_u64(magic);
    w.put_u64(version.to_wire());
}

/// Reads the server's greeting as a client does: a wrong magic is [`Invalid::Unexpected`] and
/// shows what came instead, as bytes too (a login shell's banner on stdout reads as text);
/// `greeting` names the expected one in that error and `what` the version field.
pub(crate) fn decode_server_greeting(
    r: &mut Reader<'_>,
    magic: u64,
    greeting: &str,
    what: &'static str,
) -> wire::Result<ProtocolVersion> {
    let got = r.u64()?;
    if got != magic {
        return Err(Invalid::Unexpected {
            expected: format!("{greeting} {magic:#x}"),
            got: format!(
                "{got:#x} ({:?})",
                String::from_utf8_lossy(&got.to_le_bytes())
            ),
        }
        .into());
    }
    ProtocolVersion::decode(r, what)
}

/// Accepts a server's greeting as a client: its major number must be `min`'s and it must be no
/// older than `min`, else a [`DecodeError::malformed`] that starts with `speaks` (naming the
/// server and its protocol). Later messages are gated on the lower of `server` and `client`.
pub(crate) fn negotiate(
    server: ProtocolVersion,
    client: ProtocolVersion,
    min: ProtocolVersion,
    speaks: &str,
) -> wire::Result<ServerHello> {
    if server.major != min.major || server < min {
        return Err(DecodeError::malformed(format!(
            "{speaks} {server}; we need {}.x with x ≥ {} (Nix 2.3 or newer)",
            min.major, min.minor
        )));
    }
    Ok(ServerHello {
        server,
        negotiated: server.min(client),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_and_order() {
        let v = ProtocolVersion::new(1, 35);
        assert_eq!(v.to_wire(), 0x123);
        assert_eq!(ProtocolVersion::from_wire(0x123), Some(v));
        assert_eq!(ProtocolVersion::from_wire(0x1_0000), None);
        assert!(ProtocolVersion::new(1, 38) > ProtocolVersion::new(1, 35));
        assert!(ProtocolVersion::new(2, 0) > ProtocolVersion::new(1, 255));
        assert_eq!(v.to_string(), "1.35");
        let mut w = Vec::new();
        encode_greeting(&mut w, 7, v);
        assert_eq!(
            decode_server_greeting(&mut Reader::new(&w), 7, "g", "v").unwrap(),
            v
        );
        assert!(
            decode_server_greeting(&mut Reader::new(&w[..12]), 7, "g", "v")
                .unwrap_err()
                .is_incomplete()
        );
        assert!(matches!(
            decode_server_greeting(&mut Reader::new(&w), 8, "g", "v"),
            Err(wire::DecodeError::Invalid(Invalid::Unexpected { .. }))
        ));
        let mut w = Vec::new();
        w.put_u64(1 << 16);
        assert!(matches!(
            ProtocolVersion::decode(&mut Reader::new(&w), "v"),
            Err(wire::DecodeError::Invalid(Invalid::OutOfRange {
                what: "v",
                ..
            }))
        ));
    }
}
