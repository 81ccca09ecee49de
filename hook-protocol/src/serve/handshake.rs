//! The serve handshake (docs/protocol.md §7): both greetings and the version we announce and
//! the oldest we accept (the module docs of `serve` say why).
//!
//! Must never gate on the server's number alone: later messages use the negotiated one.

use crate::version::{self, ProtocolVersion, ServerHello};
use crate::wire::{self, Reader};

/// Sent by the client first.
pub const MAGIC_1: u64 = 0x390c_9deb;
/// Sent by the server in reply.
pub const MAGIC_2: u64 = 0x5452_eecb;
/// The version we announce (see the module docs for why).
pub const CLIENT_VERSION: ProtocolVersion = ProtocolVersion::new(2, 7);
/// The oldest server version we talk to (see the module docs for why).
pub const MIN_SERVER_VERSION: ProtocolVersion = ProtocolVersion::new(2, 5);

/// Appends the client greeting: `MAGIC_1, version`. Sent without waiting for the server.
pub fn encode_hello(w: &mut Vec<u8>, client: ProtocolVersion) {
    version::encode_greeting(w, MAGIC_1, client);
}

/// Decodes the server greeting (`MAGIC_2, version`) and negotiates. A wrong magic (e.g. a login
/// shell printing a banner on stdout), a major version other than 2 or a server older than
/// [`MIN_SERVER_VERSION`] is [`Invalid`](crate::wire::Invalid).
pub fn decode_hello(r: &mut Reader<'_>, client: ProtocolVersion) -> wire::Result<ServerHello> {
    let server = version::decode_server_greeting(
        r,
        MAGIC_2,
        "the 'nix-store --serve' greeting",
        "serve protocol version",
    )?;
    version::negotiate(
        server,
        client,
        MIN_SERVER_VERSION,
        "the remote 'nix-store --serve' speaks protocol",
    )
}
