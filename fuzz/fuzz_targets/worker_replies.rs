//! Every reply decoder of the worker protocol (`nix-daemon --stdio`, and the local daemon
//! socket) the hook uses: the handshake, the stderr loop, whole responses with each reply
//! decoder, and framed streams, at the protocol version (and feature) the first byte picks.
//! What decodes as a build result, a realisation reply or a realisation request must also
//! survive a round trip through the matching encoder.
#![no_main]

use hook_protocol::worker::server::OpRequest;
use hook_protocol::worker::{self, Negotiated};
use hook_protocol::{DrvOutput, ProtocolVersion, StorePath, wire};
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
    // The id of the QueryRealisation captured from Nix 2.34 (hook-protocol/tests/data/ca).
    let asked = DrvOutput::parse(
        "sha256:d984db152490bae8bc0c765dc6d858b9ff958e6ab25de84d371f8c2894599ce1!out",
    )
    .expect("id");
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
        worker::server::decode_request(r, &p, "/nix/store")
    });
    check("response: query realisation", data, |r| {
        worker::decode_response(r, &p, |r| {
            worker::decode_query_realisation_reply(r, &p, &asked, "/nix/store")
        })
    });
    round_trips(data, &p, &asked);
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

/// Decoded values encode back to bytes that decode to the same values.
fn round_trips(data: &[u8], p: &Negotiated, asked: &DrvOutput) {
    if let Ok((res, _)) =
        wire::decode_with(data, |r| worker::decode_build_result(r, p, "/nix/store"))
    {
        let mut w = Vec::new();
        worker::server::encode_build_result(&mut w, p, &res);
        let (again, n) = wire::decode_with(&w, |r| worker::decode_build_result(r, p, "/nix/store"))
            .expect("an encoded build result decodes");
        assert_eq!((again, n), (res, w.len()));
    }
    if let Ok((found, _)) = wire::decode_with(data, |r| {
        worker::decode_query_realisation_reply(r, p, asked, "/nix/store")
    }) {
        let mut w = Vec::new();
        worker::server::encode_query_realisation_reply(&mut w, p, found.as_ref());
        let (again, n) = wire::decode_with(&w, |r| {
            worker::decode_query_realisation_reply(r, p, asked, "/nix/store")
        })
        .expect("an encoded realisation reply decodes");
        assert_eq!((again, n), (found, w.len()));
    }
    if let Ok((OpRequest::RegisterDrvOutput(real), _)) =
        wire::decode_with(data, |r| worker::server::decode_request(r, p, "/nix/store"))
    {
        let mut w = Vec::new();
        worker::encode_register_drv_output(&mut w, p, &real).expect("the version decoded it");
        let (again, n) =
            wire::decode_with(&w, |r| worker::server::decode_request(r, p, "/nix/store"))
                .expect("an encoded request decodes");
        assert_eq!((again, n), (OpRequest::RegisterDrvOutput(real), w.len()));
    }
}
