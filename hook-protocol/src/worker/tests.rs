//! Unit tests of the worker codecs: each client encoder against the daemon-side decoder and
//! back, every version gate, and the Incomplete-vs-Invalid contract on every proper prefix.

use std::collections::BTreeSet;

use super::server::OpRequest;
use super::*;
use crate::build_result::BuildResult;
use crate::build_result::BuildStatus;
use crate::build_result::BuiltOutputsLayout;
use crate::build_result::tests::{arb_build_result, carried};
use crate::derivation::BasicDerivation;
use crate::path_info::OutputsSpec;
use crate::path_info::tests::{arb_path, arb_path_info, path};
use crate::path_info::{DerivedPath, PathInfo};
use crate::realisation::tests::arb_realisation;
use crate::realisation::{DrvOutput, Realisation};
use crate::store_path::Sha256;
use crate::version::ProtocolVersion;
use crate::wire::tests::assert_prefixes_incomplete;
use crate::wire::{self, DecodeError, Invalid, Reader, WireWrite};
use proptest::prelude::*;

fn proto(minor: u8) -> Negotiated {
    Negotiated::new(ProtocolVersion::new(1, minor))
}

#[test]
fn set_options_round_trips() {
    let o = ClientOptions {
        keep_failed: true,
        verbosity: 1,
        max_silent_time: 30,
        verbose_build: true,
        overrides: vec![("timeout".into(), "60".into())],
        ..Default::default()
    };
    for minor in [11u8, 12, 34, 38] {
        let p = proto(minor);
        let mut w = Vec::new();
        encode_set_options(&mut w, &p, &o);
        let (req, used) =
            wire::decode_with(&w, |r| server::decode_request(r, &p, "/nix/store")).unwrap();
        assert_eq!(used, w.len());
        let mut want = o.clone();
        if minor < 12 {
            want.overrides.clear();
        }
        assert_eq!(req, OpRequest::SetOptions(want));
    }
}

/// Runs the whole handshake between our client functions and the server codecs.
fn handshake(
    client: ProtocolVersion,
    client_features: &[&str],
    server: ProtocolVersion,
    server_features: &[&str],
) -> (Negotiated, ServerInfo, Vec<u8>, Vec<u8>) {
    let client_features: BTreeSet<String> = client_features.iter().map(|s| s.to_string()).collect();
    let mut to_server = Vec::new();
    encode_hello(&mut to_server, client);
    let mut to_client = Vec::new();
    let mut sr = Reader::new(&to_server);
    let seen_client = server::decode_client_hello(&mut sr).unwrap();
    assert_eq!(seen_client, client);
    server::encode_server_hello(&mut to_client, server);

    let hello = decode_server_hello(&mut Reader::new(&to_client), client).unwrap();
    assert_eq!(hello.server, server);
    encode_after_hello(&mut to_server, hello.negotiated, &client_features);

    let mut sr = Reader::new(&to_server[16..]);
    let seen_features = server::decode_after_hello(&mut sr, hello.negotiated).unwrap();
    assert!(sr.is_empty());
    assert_eq!(seen_features, client_features);
    let info = ServerInfo {
        server_features: server_features.iter().map(|s| s.to_string()).collect(),
        nix_version: Some("2.99.0".into()),
        trust: Some(Trust::Trusted),
    };
    let start = to_client.len();
    server::encode_server_info(&mut to_client, hello.negotiated, &info);
    let tail = to_client[start..].to_vec();
    let (neg, got) =
        decode_server_info(&mut Reader::new(&tail), hello.negotiated, &client_features).unwrap();
    assert_prefixes_incomplete(&tail, |r| {
        decode_server_info(r, hello.negotiated, &client_features)
    });
    (neg, got, to_server, to_client)
}

#[test]
fn handshake_with_a_2_8_daemon() {
    let (neg, info, to_server, _) =
        handshake(CLIENT_VERSION, &[], ProtocolVersion::new(1, 34), &[]);
    assert_eq!(neg, proto(34));
    assert_eq!(info.nix_version.as_deref(), Some("2.99.0"));
    assert_eq!(info.trust, None, "1.34 has no trust byte");
    // magic, version 1.35, affinity 0, reserveSpace 0
    assert_eq!(to_server.len(), 32);
    assert_eq!(&to_server[8..10], &[35, 1]);
}

#[test]
fn handshake_with_feature_exchange() {
    let (neg, info, _, _) = handshake(
        ProtocolVersion::new(1, 38),
        &[FEATURE_REALISATION_WITH_PATH, "other"],
        ProtocolVersion::new(1, 38),
        &[
            FEATURE_REALISATION_WITH_PATH,
            "delete-dead-specific-referrers",
        ],
    );
    assert_eq!(neg.version, ProtocolVersion::new(1, 38));
    assert_eq!(
        neg.features,
        [FEATURE_REALISATION_WITH_PATH.to_owned()].into()
    );
    assert_eq!(info.server_features.len(), 2);
    assert_eq!(info.trust, Some(Trust::Trusted));
    // Our default client never reaches the exchange, even with a 1.38 daemon.
    let (neg, _, _, _) = handshake(CLIENT_VERSION, &[], ProtocolVersion::new(1, 38), &["x"]);
    assert_eq!(neg, proto(35));
}

#[test]
fn server_hello_checks() {
    for (v, ok) in [
        (ProtocolVersion::new(1, 21), true),
        (ProtocolVersion::new(1, 20), false),
        (ProtocolVersion::new(2, 0), false),
    ] {
        let mut w = Vec::new();
        server::encode_server_hello(&mut w, v);
        assert_eq!(
            decode_server_hello(&mut Reader::new(&w), CLIENT_VERSION).is_ok(),
            ok
        );
        assert_prefixes_incomplete(&w, |r| decode_server_hello(r, CLIENT_VERSION));
    }
    let mut w = Vec::new();
    w.put_u64(crate::serve::MAGIC_2);
    w.put_u64(0x207);
    assert!(matches!(
        decode_server_hello(&mut Reader::new(&w), CLIENT_VERSION),
        Err(DecodeError::Invalid(Invalid::Unexpected { .. }))
    ));
    let mut w = Vec::new();
    server::encode_server_info(
        &mut w,
        ProtocolVersion::new(1, 35),
        &ServerInfo {
            server_features: BTreeSet::new(),
            nix_version: Some("x".into()),
            trust: None,
        },
    );
    *w.last_mut().unwrap() = 0; // keep trust 0 → None
    let (_, info) = decode_server_info(
        &mut Reader::new(&w),
        ProtocolVersion::new(1, 35),
        &BTreeSet::new(),
    )
    .unwrap();
    assert_eq!(info.trust, None);
    let len = w.len();
    w[len - 8] = 3;
    assert!(
        decode_server_info(
            &mut Reader::new(&w),
            ProtocolVersion::new(1, 35),
            &BTreeSet::new()
        )
        .is_err()
    );
}

fn sample_messages() -> Vec<StderrMessage> {
    vec![
        StderrMessage::Next("warning: something\n".into()),
        StderrMessage::StartActivity(StartActivity {
            id: (1234 << 32) + 1,
            level: 3,
            activity_type: activity::BUILD,
            text: "building '/nix/store/x.drv'".into(),
            fields: vec![
                Field::Str("/nix/store/x.drv".into()),
                Field::Str(String::new()),
                Field::Int(1),
                Field::Int(1),
            ],
            parent: 0,
        }),
        StderrMessage::Result(ActivityResult {
            id: (1234 << 32) + 1,
            result_type: result_type::BUILD_LOG_LINE,
            fields: vec![Field::Str("hello".into())],
        }),
        StderrMessage::StopActivity {
            id: (1234 << 32) + 1,
        },
        StderrMessage::Write(b"data".to_vec()),
        StderrMessage::Read { max: 32768 },
        StderrMessage::Last,
    ]
}

#[test]
fn stderr_messages_round_trip() {
    let p = proto(34);
    let mut w = Vec::new();
    for m in sample_messages() {
        server::encode_stderr(&mut w, &p, &m);
    }
    let mut r = Reader::new(&w);
    for m in sample_messages() {
        assert_eq!(decode_stderr(&mut r, &p).unwrap(), m);
    }
    assert!(r.is_empty());
}

#[test]
fn typed_results() {
    let r = |t, fields| ActivityResult {
        id: 1,
        result_type: t,
        fields,
    };
    assert_eq!(
        r(result_type::BUILD_LOG_LINE, vec![Field::Str("x".into())]).typed(),
        Some(TypedResult::BuildLogLine("x"))
    );
    assert_eq!(
        r(
            result_type::PROGRESS,
            vec![Field::Int(1), Field::Int(2), Field::Int(3), Field::Int(4)]
        )
        .typed(),
        Some(TypedResult::Progress {
            done: 1,
            expected: 2,
            running: 3,
            failed: 4
        })
    );
    assert_eq!(
        r(
            result_type::SET_EXPECTED,
            vec![Field::Int(104), Field::Int(1)]
        )
        .typed(),
        Some(TypedResult::SetExpected {
            activity_type: 104,
            expected: 1
        })
    );
    // Wrong shape, unknown type.
    assert_eq!(
        r(result_type::BUILD_LOG_LINE, vec![Field::Int(1)]).typed(),
        None
    );
    assert_eq!(r(999, vec![]).typed(), None);
}

#[test]
fn errors_in_both_layouts() {
    let e = DaemonError {
        message: "error: path '/nix/store/x' is not valid".into(),
        level: Some(0),
        traces: vec!["while doing X".into()],
        exit_status: None,
    };
    let p = proto(34);
    let mut w = Vec::new();
    server::encode_stderr(&mut w, &p, &StderrMessage::Error(e.clone()));
    assert_eq!(
        decode_stderr(&mut Reader::new(&w), &p).unwrap(),
        StderrMessage::Error(e)
    );
    assert_prefixes_incomplete(&w, |r| decode_stderr(r, &p));

    let old = DaemonError {
        message: "error: old".into(),
        level: None,
        traces: vec![],
        exit_status: Some(1),
    };
    let p = proto(21);
    let mut w = Vec::new();
    server::encode_stderr(&mut w, &p, &StderrMessage::Error(old.clone()));
    let mut want = STDERR_ERROR.to_le_bytes().to_vec();
    want.put_str("error: old");
    want.put_u64(1);
    assert_eq!(w, want);
    assert_eq!(
        decode_stderr(&mut Reader::new(&w), &p).unwrap(),
        StderrMessage::Error(old)
    );

    // A position (never sent by Nix) and a non-"Error" type are invalid.
    let mut w = STDERR_ERROR.to_le_bytes().to_vec();
    w.put_str("Error");
    w.put_u64(0);
    w.put_str("Error");
    w.put_str("m");
    w.put_u64(1);
    assert!(matches!(
        decode_stderr(&mut Reader::new(&w), &proto(34)),
        Err(DecodeError::Invalid(_))
    ));
    let mut w = STDERR_ERROR.to_le_bytes().to_vec();
    w.put_str("Oops");
    assert!(matches!(
        decode_stderr(&mut Reader::new(&w), &proto(34)),
        Err(DecodeError::Invalid(_))
    ));
    assert!(matches!(
        decode_stderr(&mut Reader::new(&0x1234u64.to_le_bytes()), &proto(34)),
        Err(DecodeError::Invalid(_))
    ));
}

#[test]
fn response_helper() {
    let p = proto(35);
    let mut w = Vec::new();
    server::encode_stderr(&mut w, &p, &StderrMessage::Next("hi\n".into()));
    server::encode_stderr(&mut w, &p, &StderrMessage::Last);
    w.put_u64(1);
    let (resp, used) = wire::decode_with(&w, |r| decode_response(r, &p, decode_bool)).unwrap();
    assert_eq!(used, w.len());
    assert_eq!(resp.outcome, Ok(true));
    assert_eq!(resp.messages, vec![StderrMessage::Next("hi\n".into())]);
    assert_prefixes_incomplete(&w, |r| decode_response(r, &p, decode_bool));

    let mut w = Vec::new();
    let err = DaemonError {
        message: "boom".into(),
        level: Some(0),
        traces: vec![],
        exit_status: None,
    };
    server::encode_stderr(&mut w, &p, &StderrMessage::Error(err.clone()));
    let resp = decode_response(&mut Reader::new(&w), &p, decode_bool).unwrap();
    assert_eq!(resp.outcome, Err(err));

    let mut w = Vec::new();
    server::encode_stderr(&mut w, &p, &StderrMessage::Read { max: 8 });
    assert!(matches!(
        decode_response(&mut Reader::new(&w), &p, decode_bool),
        Err(DecodeError::Invalid(_))
    ));
}

#[test]
fn query_path_info_by_version() {
    let mut info = PathInfo::new(path(1, "a"), Sha256::digest(b"a"), 64);
    info.registration_time = 99;
    info.ultimate = true;
    info.sigs.insert("k:1".into());
    for minor in [15u8, 16, 17, 34, 38] {
        let p = proto(minor);
        let mut w = Vec::new();
        server::encode_query_path_info_reply(&mut w, &p, Some(&info));
        let got = decode_query_path_info_reply(&mut Reader::new(&w), &p, &info.path)
            .unwrap()
            .unwrap();
        let mut want = info.clone();
        if minor < 16 {
            want.ultimate = false;
            want.sigs.clear();
        }
        assert_eq!(got, want, "1.{minor}");
        assert_prefixes_incomplete(&w, |r| decode_query_path_info_reply(r, &p, &info.path));
    }
    let mut w = Vec::new();
    server::encode_query_path_info_reply(&mut w, &proto(34), None);
    assert_eq!(w, [0u8; 8]);
    assert_eq!(
        decode_query_path_info_reply(&mut Reader::new(&w), &proto(34), &info.path).unwrap(),
        None
    );
}

#[test]
fn unsupported_ops_are_refused() {
    let mut w = Vec::new();
    let e =
        encode_build_paths_with_results(&mut w, &proto(33), &[], BuildMode::Normal).unwrap_err();
    assert_eq!(e.needs, ProtocolVersion::new(1, 34));
    assert!(encode_add_multiple_to_store(&mut w, &proto(31), false, false).is_err());
    assert!(w.is_empty());
    assert_eq!(nar_upload(&proto(23)), NarUpload::Framed);
    assert_eq!(nar_upload(&proto(22)), NarUpload::Pulled);
    assert_eq!(nar_upload(&proto(20)), NarUpload::Raw);
}

#[test]
fn requests_round_trip_through_the_server_decoder() {
    let p = proto(35);
    let a = path(1, "a");
    let drv = path(2, "a.drv");
    let info = PathInfo::new(a.clone(), Sha256::digest(b"nar"), 3);
    let basic = BasicDerivation {
        platform: "x86_64-linux".into(),
        builder: b"/bin/sh".to_vec(),
        ..Default::default()
    };
    let paths = vec![
        DerivedPath::all_outputs(drv.clone()),
        DerivedPath::Built {
            drv_path: drv.clone(),
            outputs: OutputsSpec::Names(["out".into()].into()),
        },
        DerivedPath::Opaque(a.clone()),
    ];
    let mut w = Vec::new();
    encode_is_valid_path(&mut w, &a);
    encode_query_path_info(&mut w, &a);
    encode_query_valid_paths(&mut w, &p, [&a], true);
    encode_build_derivation(&mut w, &drv, &basic, BuildMode::Check);
    encode_nar_from_path(&mut w, &a);
    encode_add_to_store_nar(&mut w, &info, false, true);
    encode_add_multiple_to_store(&mut w, &p, true, false).unwrap();
    encode_build_paths_with_results(&mut w, &p, &paths, BuildMode::Normal).unwrap();
    let want = [
        OpRequest::IsValidPath(a.clone()),
        OpRequest::QueryPathInfo(a.clone()),
        OpRequest::QueryValidPaths {
            paths: [a.clone()].into(),
            substitute: true,
        },
        OpRequest::BuildDerivation {
            drv_path: drv.clone(),
            drv: basic,
            mode: BuildMode::Check,
        },
        OpRequest::NarFromPath(a.clone()),
        OpRequest::AddToStoreNar {
            info,
            repair: false,
            dont_check_sigs: true,
        },
        OpRequest::AddMultipleToStore {
            repair: true,
            dont_check_sigs: false,
        },
        OpRequest::BuildPathsWithResults {
            paths,
            mode: BuildMode::Normal,
        },
    ];
    let mut r = Reader::new(&w);
    for want in want {
        assert_eq!(
            server::decode_request(&mut r, &p, "/nix/store").unwrap(),
            want
        );
    }
    assert!(r.is_empty());
    // Below 1.27 QueryValidPaths has no substitute flag.
    let mut w = Vec::new();
    encode_query_valid_paths(&mut w, &proto(26), [&a], true);
    assert_eq!(w.len(), 8 + 8 + 8 + a.as_str().len().div_ceil(8) * 8);
}

#[test]
fn keyed_build_results() {
    let p = proto(34);
    let drv = path(7, "x.drv");
    let mut res = BuildResult::new(BuildStatus::Built, "");
    res.built_outputs.insert(
        "out".into(),
        crate::build_result::BuiltOutput::new(path(8, "x")),
    );
    let results = vec![
        (DerivedPath::all_outputs(drv.clone()), res),
        (
            DerivedPath::Opaque(path(9, "y")),
            BuildResult::new(BuildStatus::PermanentFailure, "nope"),
        ),
    ];
    let mut w = Vec::new();
    server::encode_build_paths_with_results_reply(&mut w, &p, &results);
    let (got, used) = wire::decode_with(&w, |r| {
        decode_build_paths_with_results_reply(r, &p, "/nix/store")
    })
    .unwrap();
    assert_eq!(used, w.len());
    assert_eq!(got, results);
    assert_prefixes_incomplete(&w, |r| {
        decode_build_paths_with_results_reply(r, &p, "/nix/store")
    });
}

#[test]
fn frame_decoder_streams_across_splits() {
    let payload: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let mut w = Vec::new();
    for chunk in payload.chunks(1000) {
        encode_frame(&mut w, chunk);
    }
    encode_frame(&mut w, b"");
    encode_frame_end(&mut w);
    w.extend_from_slice(b"next message");
    for step in [1usize, 3, 7, 8, 9, 500, 5000] {
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut fed = 0;
        loop {
            let (used, frame) = dec.decode(&buf);
            let frame = frame.map(|f| match f {
                Frame::Data(d) => Some(d.to_vec()),
                Frame::End => None,
            });
            buf.drain(..used);
            match frame {
                Some(Some(d)) => got.extend_from_slice(&d),
                Some(None) => break,
                None => {
                    let end = (fed + step).min(w.len());
                    assert!(fed < end, "ran out of input at step {step}");
                    buf.extend_from_slice(&w[fed..end]);
                    fed = end;
                }
            }
        }
        assert!(dec.is_done());
        assert_eq!(got, payload, "step {step}");
        let rest: Vec<u8> = buf.iter().chain(&w[fed..]).copied().collect();
        assert_eq!(rest, b"next message");
    }
    let mut r = Reader::new(&w);
    assert_eq!(decode_frame(&mut r, 1000).unwrap(), Some(&payload[..1000]));
    assert!(matches!(
        decode_frame(&mut Reader::new(&w), 999),
        Err(DecodeError::Invalid(_))
    ));
    assert!(
        decode_frame(&mut Reader::new(&w[..100]), 1000)
            .unwrap_err()
            .is_incomplete()
    );
}

#[test]
fn cpu_times_need_1_37() {
    let mut res = BuildResult::new(BuildStatus::Built, "");
    res.cpu_user = Some(1234);
    res.cpu_system = Some(-1);
    for (minor, with_cpu) in [(36, false), (37, true), (38, true)] {
        let proto = proto(minor);
        let mut w = Vec::new();
        server::encode_build_result(&mut w, &proto, &res);
        let got = decode_build_result(&mut Reader::new(&w), &proto, "/nix/store").unwrap();
        assert_eq!(got.cpu_user.is_some(), with_cpu);
        assert_eq!(
            got,
            carried(&res, true, with_cpu, BuiltOutputsLayout::RealisationJson)
        );
    }
}

fn sample_realisation() -> Realisation {
    Realisation {
        id: DrvOutput::parse(&format!("sha256:{}!out", "6a9a".repeat(16))).unwrap(),
        out_path: path(3, "caA"),
        signatures: ["cache-1:AAAA".to_owned()].into(),
        dependent_realisations: Default::default(),
    }
}

/// RegisterDrvOutput and QueryRealisation exist from 1.27, and only keyed by hash: a
/// connection with `realisation-with-path-not-hash`, or a daemon offering it, is refused before
/// anything is written.
#[test]
fn realisation_ops_are_gated() {
    let r = sample_realisation();
    let mut w = Vec::new();
    assert!(matches!(
        encode_register_drv_output(&mut w, &proto(26), &r),
        Err(RealisationsUnsupported::TooOld(Unsupported { needs, .. })) if needs == REALISATIONS_SINCE
    ));
    assert!(matches!(
        encode_query_realisation(&mut w, &proto(26), &r.id),
        Err(RealisationsUnsupported::TooOld(_))
    ));
    let mut keyed = proto(38);
    keyed
        .features
        .insert(FEATURE_REALISATION_WITH_PATH.to_owned());
    assert_eq!(
        encode_register_drv_output(&mut w, &keyed, &r),
        Err(RealisationsUnsupported::KeyedByPath)
    );
    assert_eq!(
        encode_query_realisation(&mut w, &keyed, &r.id),
        Err(RealisationsUnsupported::KeyedByPath)
    );
    assert!(w.is_empty(), "nothing is written when refused");
    // The daemon side refuses them alike.
    let mut req = Vec::new();
    encode_query_realisation(&mut req, &proto(27), &r.id).unwrap();
    for p in [proto(26), keyed.clone()] {
        assert!(matches!(
            server::decode_request(&mut Reader::new(&req), &p, "/nix/store"),
            Err(DecodeError::Invalid(_))
        ));
    }
    let mut info = ServerInfo {
        server_features: BTreeSet::new(),
        nix_version: Some("2.34.8".into()),
        trust: Some(Trust::Trusted),
    };
    assert_eq!(check_realisations(&proto(38), &info), Ok(()));
    info.server_features
        .insert(FEATURE_REALISATION_WITH_PATH.to_owned());
    let e = check_realisations(&proto(38), &info).unwrap_err();
    assert_eq!(e, RealisationsUnsupported::KeyedByPath);
    assert!(e.to_string().contains("Nix 2.35 or newer"), "{e}");
    assert!(
        check_realisations(
            &proto(21),
            &ServerInfo {
                server_features: BTreeSet::new(),
                ..info
            }
        )
        .is_err()
    );
}

/// The two layouts byte for byte: the realisation JSON from 1.31, id and base name before.
#[test]
fn register_drv_output_layouts() {
    let r = sample_realisation();
    let mut w = Vec::new();
    encode_register_drv_output(&mut w, &proto(31), &r).unwrap();
    let mut want = Vec::new();
    want.put_u64(42);
    want.put_str(&r.to_json());
    assert_eq!(w, want);
    let mut w = Vec::new();
    encode_register_drv_output(&mut w, &proto(30), &r).unwrap();
    let mut want = Vec::new();
    want.put_u64(42);
    want.put_str(&r.id.to_string());
    want.put_str(r.out_path.base_name());
    assert_eq!(w, want);
    let mut w = Vec::new();
    encode_query_realisation(&mut w, &proto(27), &r.id).unwrap();
    let mut want = Vec::new();
    want.put_u64(43);
    want.put_str(&r.id.to_string());
    assert_eq!(w, want);
}

#[test]
fn bad_query_realisation_replies_are_invalid() {
    let r = sample_realisation();
    let p = proto(35);
    let decode =
        |w: &[u8]| decode_query_realisation_reply(&mut Reader::new(w), &p, &r.id, "/nix/store");
    let mut w = Vec::new();
    w.put_strings([r.to_json(), r.to_json()]);
    assert!(
        decode(&w)
            .unwrap_err()
            .to_string()
            .contains("more than one")
    );
    let other = Realisation {
        id: DrvOutput::parse(&format!("sha256:{}!dev", "6a9a".repeat(16))).unwrap(),
        ..r.clone()
    };
    let mut w = Vec::new();
    w.put_strings([other.to_json()]);
    assert!(
        decode(&w)
            .unwrap_err()
            .to_string()
            .contains("answered with one of")
    );
    let mut w = Vec::new();
    w.put_strings(["{not json"]);
    assert!(matches!(decode(&w), Err(DecodeError::Invalid(_))));
    // Below 1.31 the set holds full paths.
    let mut w = Vec::new();
    w.put_strings([r.out_path.base_name()]);
    assert!(matches!(
        decode_query_realisation_reply(&mut Reader::new(&w), &proto(30), &r.id, "/nix/store"),
        Err(DecodeError::Invalid(_))
    ));
}

proptest! {
    /// A BuildResult at every worker version, with and without the feature.
    #[test]
    fn build_result_round_trip(res in arb_build_result(), minor in 20u8..=39, feature in any::<bool>()) {
        let mut proto = proto(minor);
        if feature {
            proto.features.insert(FEATURE_REALISATION_WITH_PATH.to_owned());
        }
        let mut w = Vec::new();
        server::encode_build_result(&mut w, &proto, &res);
        let (got, used) = wire::decode_with(&w, |r| decode_build_result(r, &proto, "/nix/store")).unwrap();
        prop_assert_eq!(used, w.len());
        let outputs = if feature {
            BuiltOutputsLayout::PathAndSignatures
        } else if minor >= 28 {
            BuiltOutputsLayout::RealisationJson
        } else {
            BuiltOutputsLayout::Absent
        };
        prop_assert_eq!(got, carried(&res, minor >= 29, minor >= 37, outputs));
        for cut in 0..w.len() {
            let e = decode_build_result(&mut Reader::new(&w[..cut]), &proto, "/nix/store").unwrap_err();
            prop_assert!(e.is_incomplete(), "cut {}: {:?}", cut, e);
        }
    }

    #[test]
    fn stderr_round_trip(
        id in any::<u64>(), level in 0u64..8, t in any::<u64>(), text in ".{0,30}",
        ints in proptest::collection::vec(any::<u64>(), 0..4),
        strs in proptest::collection::vec(".{0,10}", 0..3),
        minor in 21u8..=38,
        traces in proptest::collection::vec(".{0,20}", 0..3),
    ) {
        let p = proto(minor);
        let mut fields: Vec<Field> = ints.into_iter().map(Field::Int).collect();
        fields.extend(strs.into_iter().map(Field::Str));
        let new_layout = minor >= 26;
        let msgs = vec![
            StderrMessage::StartActivity(StartActivity { id, level, activity_type: t, text: text.clone(), fields: fields.clone(), parent: id / 2 }),
            StderrMessage::Result(ActivityResult { id, result_type: t, fields }),
            StderrMessage::Next(text.clone()),
            StderrMessage::Error(DaemonError {
                message: text,
                level: new_layout.then_some(level),
                traces: if new_layout { traces } else { vec![] },
                exit_status: (!new_layout).then_some(level),
            }),
        ];
        for m in msgs {
            let mut w = Vec::new();
            server::encode_stderr(&mut w, &p, &m);
            let (got, used) = wire::decode_with(&w, |r| decode_stderr(r, &p)).unwrap();
            prop_assert_eq!(used, w.len());
            prop_assert_eq!(got, m);
            for cut in 0..w.len() {
                prop_assert!(decode_stderr(&mut Reader::new(&w[..cut]), &p).unwrap_err().is_incomplete());
            }
        }
    }

    #[test]
    fn path_info_round_trip(info in arb_path_info(), minor in 21u8..=38) {
        let p = proto(minor);
        let mut w = Vec::new();
        server::encode_query_path_info_reply(&mut w, &p, Some(&info));
        let got = decode_query_path_info_reply(&mut Reader::new(&w), &p, &info.path).unwrap();
        prop_assert_eq!(got, Some(info));
    }

    #[test]
    fn keyed_results_round_trip(
        items in proptest::collection::vec((arb_path(), arb_build_result()), 0..3),
        feature in any::<bool>(),
    ) {
        let mut p = proto(38);
        if feature {
            p.features.insert(FEATURE_REALISATION_WITH_PATH.into());
        }
        let results: Vec<(DerivedPath, BuildResult)> = items
            .into_iter()
            .map(|(path, res)| (DerivedPath::Opaque(path), res))
            .collect();
        let mut w = Vec::new();
        server::encode_build_paths_with_results_reply(&mut w, &p, &results);
        let got = decode_build_paths_with_results_reply(&mut Reader::new(&w), &p, "/nix/store").unwrap();
        let outputs = if feature {
            BuiltOutputsLayout::PathAndSignatures
        } else {
            BuiltOutputsLayout::RealisationJson
        };
        let want: Vec<(DerivedPath, BuildResult)> = results
            .iter()
            .map(|(path, res)| (path.clone(), carried(res, true, true, outputs)))
            .collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn frames_round_trip(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 0..6), split in 1usize..20) {
        let mut w = Vec::new();
        for c in &chunks {
            encode_frame(&mut w, c);
        }
        encode_frame_end(&mut w);
        let want: Vec<u8> = chunks.concat();
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut avail = 0;
        loop {
            let (used, f) = dec.decode(&w[pos..avail]);
            pos += used;
            match f {
                Some(Frame::Data(d)) => got.extend_from_slice(d),
                Some(Frame::End) => break,
                None => {
                    prop_assert!(avail < w.len());
                    avail = (avail + split).min(w.len());
                }
            }
        }
        prop_assert_eq!(pos, w.len());
        prop_assert_eq!(got, want);
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), minor in 0u8..=40) {
        let p = proto(minor);
        let _ = decode_server_hello(&mut Reader::new(&data), CLIENT_VERSION);
        let _ = decode_server_info(&mut Reader::new(&data), p.version, &BTreeSet::new());
        let _ = decode_stderr(&mut Reader::new(&data), &p);
        let _ = decode_response(&mut Reader::new(&data), &p, |r| decode_build_result(r, &p, "/nix/store"));
        let _ = decode_query_path_info_reply(&mut Reader::new(&data), &p, &path(1, "a"));
        let _ = decode_build_paths_with_results_reply(&mut Reader::new(&data), &p, "/nix/store");
        let _ = server::decode_request(&mut Reader::new(&data), &p, "/nix/store");
        let _ = server::decode_after_hello(&mut Reader::new(&data), p.version);
        let mut dec = FrameDecoder::new();
        let mut pos = 0;
        while let (used, Some(Frame::Data(_))) = dec.decode(&data[pos..]) {
            pos += used;
        }
    }
}

proptest! {
    /// Both realisation operations at every version that has them: request through the
    /// daemon-side decoder, reply back through ours, every proper prefix Incomplete.
    #[test]
    fn realisation_ops_round_trip(r in arb_realisation(), minor in 27u8..=38, found in any::<bool>()) {
        let p = proto(minor);
        let carried = if minor >= 31 {
            r.clone()
        } else {
            Realisation { signatures: BTreeSet::new(), dependent_realisations: Default::default(), ..r.clone() }
        };
        let mut w = Vec::new();
        encode_register_drv_output(&mut w, &p, &r).unwrap();
        let (req, used) = wire::decode_with(&w, |rd| server::decode_request(rd, &p, "/nix/store")).unwrap();
        prop_assert_eq!(used, w.len());
        prop_assert_eq!(req, OpRequest::RegisterDrvOutput(carried.clone()));
        assert_prefixes_incomplete(&w, |rd| server::decode_request(rd, &p, "/nix/store"));

        let mut w = Vec::new();
        encode_query_realisation(&mut w, &p, &r.id).unwrap();
        let (req, _) = wire::decode_with(&w, |rd| server::decode_request(rd, &p, "/nix/store")).unwrap();
        prop_assert_eq!(req, OpRequest::QueryRealisation(r.id.clone()));

        let mut w = Vec::new();
        server::encode_query_realisation_reply(&mut w, &p, found.then_some(&r));
        let decode = |rd: &mut Reader<'_>| decode_query_realisation_reply(rd, &p, &r.id, "/nix/store");
        let (got, used) = wire::decode_with(&w, decode).unwrap();
        prop_assert_eq!(used, w.len());
        prop_assert_eq!(got, found.then_some(carried));
        assert_prefixes_incomplete(&w, decode);
    }
}
