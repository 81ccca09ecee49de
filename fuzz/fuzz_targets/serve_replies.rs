//! Every reply decoder of the serve protocol (`nix-store --serve`) the hook uses, at the
//! protocol version the first byte picks, plus the server-side request decoders the stand-in
//! peers use; a decoded build result must survive a round trip through the server's encoder.
#![no_main]

use hook_protocol::serve;
use hook_protocol::{ProtocolVersion, wire};
use libfuzzer_sys::fuzz_target;
use nix_lazy_builder_fuzz::check;

fuzz_target!(|data: &[u8]| {
    let Some((&v, data)) = data.split_first() else {
        return;
    };
    let version = ProtocolVersion::new(2, v % 10);
    check("hello", data, |r| {
        serve::decode_hello(r, serve::CLIENT_VERSION)
    });
    check("path set", data, serve::decode_path_set);
    check("path infos", data, |r| serve::decode_path_infos(r, version));
    check("ok", data, serve::decode_ok);
    check("build result", data, |r| {
        serve::decode_build_derivation_reply(r, version, "/nix/store")
    });
    check("build paths", data, serve::decode_build_paths_reply);
    check("build options", data, |r| {
        serve::BuildOptions::decode(r, version)
    });
    check("server request", data, |r| {
        serve::server::decode_request(r, version)
    });
    check("export end", data, serve::server::decode_export_item_end);
    // A build result (built outputs with their realisations) survives a round trip.
    if let Ok((res, _)) = wire::decode_with(data, |r| {
        serve::decode_build_derivation_reply(r, version, "/nix/store")
    }) {
        let mut w = Vec::new();
        serve::server::encode_build_derivation_reply(&mut w, version, &res);
        let (again, n) = wire::decode_with(&w, |r| {
            serve::decode_build_derivation_reply(r, version, "/nix/store")
        })
        .expect("an encoded build result decodes");
        assert_eq!((again, n), (res, w.len()));
    }
});
