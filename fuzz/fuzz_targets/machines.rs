//! Nix's machines grammar (the `builders` setting with `@file` includes) over an in-memory
//! file system, and `NIX_SSHOPTS`. Input: `spec 0xff00 /m1 0xff00 /m2 0xff00 NIX_SSHOPTS`.
#![no_main]

use std::io;
use std::path::Path;

use hook_protocol::hook::Reply;
use libfuzzer_sys::fuzz_target;
use nix_lazy_builder::config::{self, SshOpts};
use nix_lazy_builder_fuzz::split;

fuzz_target!(|data: &[u8]| {
    let parts = split(data, 4);
    let spec = String::from_utf8_lossy(parts[0]);
    let (m1, m2) = (parts[1].to_vec(), parts[2].to_vec());
    let mut read = |p: &Path| -> io::Result<Vec<u8>> {
        match p.to_str() {
            Some("/m1") => Ok(m1.clone()),
            Some("/m2") => Ok(m2.clone()),
            Some("/denied") => Err(io::Error::from(io::ErrorKind::PermissionDenied)),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    };
    match config::parse_machines(&spec, "x86_64-linux", &mut read) {
        Ok((builders, _notes)) => {
            for b in builders {
                assert!(b.speed_factor.is_finite() && b.speed_factor > 0.0);
                // A systems column of "," gives no systems at all, as in Nix: such a machine
                // never matches, but it is not an error.
                assert!(!b.uri.host.is_empty());
                assert!(b.systems.iter().all(|s| !s.is_empty() && !s.contains(',')));
                let reply = Reply::accept(&b.store_uri).to_bytes();
                assert_eq!(reply.iter().filter(|&&c| c == b'\n').count(), 2);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let opts = SshOpts::parse(&String::from_utf8_lossy(parts[3]));
    assert_ne!(opts.port, Some(0));
});
