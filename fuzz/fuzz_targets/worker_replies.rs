//! Every reply decoder of the worker protocol (`nix-daemon --stdio`, and the local daemon
//! socket) the hook uses: the handshake, the stderr loop, whole responses with each reply
//! decoder, and framed streams, at the protocol version (and feature) the first byte picks.
#![no_main]

use hook_protocol::ProtocolVersion;
use hook_protocol::StorePath;
use hook_protocol::worker::{self, Negotiated};
use libfuzzer_sys::fuzz_target;
use nix_lazy_builder_fuzz::check;

fuzz_target!(|data: &[u8]| {
    let Some((&v, data)) = data.split_first() else {
        return;
    };
    let mut p = Negotiated::new(ProtocolVersion::new(1, 21 + v % 18));
    if v & 0x80 != 0 {
        p.features
            .insert(worker::FEATURE_REALISATION_WITH_PATH.to_owned());
    }
    let path = StorePath::parse("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a").expect("path");
    check("hello", data, |r| {
        worker::decode_server_hello(r, worker::CLIENT_VERSION)
    });
    check("server info", data, |r| {
        worker::decode_server_info(r, p.version, &p.features)
    });
    check("stderr", data, |r| worker::decode_stderr(r, &p));
    check("response: bool", data, |r| {
        worker::decode_response(r, &p, worker::decode_bool)
    });
    check("response: path set", data, |r| {
        worker::decode_response(r, &p, worker::decode_path_set)
    });
    check("response: path info", data, |r| {
        worker::decode_response(r, &p, |r| {
            worker::decode_query_path_info_reply(r, &p, &path)
        })
    });
    check("response: build result", data, |r| {
        worker::decode_response(r, &p, |r| worker::decode_build_result(r, &p, "/nix/store"))
    });
    check("response: build paths with results", data, |r| {
        worker::decode_response(r, &p, |r| {
            worker::decode_build_paths_with_results_reply(r, &p, "/nix/store")
        })
    });
    check("frame", data, |r| {
        worker::decode_frame(r, 1 << 20).map(|c| c.map(<[u8]>::len))
    });
    check("server request", data, |r| {
        worker::server::decode_request(r, &p)
    });
    let mut d = worker::FrameDecoder::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (n, frame) = d.decode(rest);
        assert!(n <= rest.len());
        if n == 0 {
            assert!(frame.is_none() || d.is_done());
            break;
        }
        rest = &rest[n..];
    }
});
