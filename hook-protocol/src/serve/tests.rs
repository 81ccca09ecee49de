//! Unit tests of the serve codecs: each client encoder against the server-side decoder and
//! back, every version gate, and the Incomplete-vs-Invalid contract on every proper prefix.

use super::server::CommandRequest;
use super::*;
use crate::build_result::BuiltOutputsLayout;
use crate::build_result::tests::{arb_build_result, carried};
use crate::derivation::BasicDerivation;
use crate::path_info::OutputsSpec;
use crate::path_info::tests::{arb_path, arb_path_info, path};
use crate::path_info::{DerivedPath, PathInfo};
use crate::store_path::Sha256;
use crate::version::ProtocolVersion;
use crate::wire::tests::assert_prefixes_incomplete;
use crate::wire::{self, DecodeError, Invalid, Reader, WireWrite};
use proptest::prelude::*;

#[test]
fn hello_layout_and_negotiation() {
    let mut w = Vec::new();
    encode_hello(&mut w, CLIENT_VERSION);
    assert_eq!(
        w,
        [
            0xeb, 0x9d, 0x0c, 0x39, 0, 0, 0, 0, 0x07, 0x02, 0, 0, 0, 0, 0, 0
        ]
    );
    assert_eq!(
        server::decode_hello(&mut Reader::new(&w)).unwrap(),
        CLIENT_VERSION
    );

    for (server_v, want) in [((2, 7), (2, 7)), ((2, 8), (2, 7)), ((2, 5), (2, 5))] {
        let mut s = Vec::new();
        server::encode_hello(&mut s, ProtocolVersion::new(server_v.0, server_v.1));
        let hello = decode_hello(&mut Reader::new(&s), CLIENT_VERSION).unwrap();
        assert_eq!(hello.negotiated, ProtocolVersion::new(want.0, want.1));
        assert_prefixes_incomplete(&s, |r| decode_hello(r, CLIENT_VERSION));
    }
    for bad in [
        ProtocolVersion::new(2, 4),
        ProtocolVersion::new(3, 0),
        ProtocolVersion::new(1, 34),
    ] {
        let mut s = Vec::new();
        server::encode_hello(&mut s, bad);
        assert!(matches!(
            decode_hello(&mut Reader::new(&s), CLIENT_VERSION),
            Err(DecodeError::Invalid(_))
        ));
    }
    // A shell banner instead of the greeting.
    let banner = b"Welcome to the machine\n";
    assert!(matches!(
        decode_hello(&mut Reader::new(banner), CLIENT_VERSION),
        Err(DecodeError::Invalid(Invalid::Unexpected { .. }))
    ));
}

#[test]
fn build_options_by_version() {
    let o = BuildOptions {
        max_silent_time: 1,
        build_timeout: 2,
        max_log_size: 3,
        nr_repeats: 4,
        enforce_determinism: true,
        keep_failed: true,
    };
    for (minor, len) in [(1u8, 2), (2, 3), (3, 5), (6, 5), (7, 6), (8, 6)] {
        let v = ProtocolVersion::new(2, minor);
        let mut w = Vec::new();
        o.encode(&mut w, v);
        assert_eq!(w.len(), len * 8, "2.{minor}");
        let got = BuildOptions::decode(&mut Reader::new(&w), v).unwrap();
        assert_eq!(got.max_silent_time, 1);
        assert_eq!(got.keep_failed, minor >= 7);
        assert_eq!(got.nr_repeats, if minor >= 3 { 4 } else { 0 });
    }
    let huge = BuildOptions {
        max_silent_time: u64::MAX,
        ..Default::default()
    };
    let mut w = Vec::new();
    huge.encode(&mut w, CLIENT_VERSION);
    let got = BuildOptions::decode(&mut Reader::new(&w), CLIENT_VERSION).unwrap();
    assert_eq!(got.max_silent_time, u32::MAX as u64);
}

#[test]
fn path_infos_reply() {
    let mut a = PathInfo::new(path(1, "a"), Sha256::digest(b"a"), 128);
    a.deriver = Some(path(2, "a.drv"));
    a.references = [path(1, "a"), path(3, "b")].into();
    a.sigs.insert("k-1:abc".into());
    a.ca = Some(format!(
        "fixed:r:sha256:{}",
        Sha256::digest(b"c").to_nix32()
    ));
    let b = PathInfo::new(path(3, "b"), Sha256::digest(b"b"), 96);
    let mut w = Vec::new();
    server::encode_path_infos(&mut w, CLIENT_VERSION, &[a.clone(), b.clone()]);
    let (got, used) = wire::decode_with(&w, |r| decode_path_infos(r, CLIENT_VERSION)).unwrap();
    assert_eq!(used, w.len());
    assert_eq!(got, vec![a, b]);
    assert_prefixes_incomplete(&w, |r| decode_path_infos(r, CLIENT_VERSION));
    // The empty reply is just the terminator.
    let mut w = Vec::new();
    server::encode_path_infos(&mut w, CLIENT_VERSION, &[]);
    assert_eq!(w, [0u8; 8]);
    assert!(decode_path_infos(&mut Reader::new(&w), ProtocolVersion::new(2, 3)).is_err());
}

#[test]
fn export_stream_framing() {
    let p = path(5, "exported");
    let dep = path(6, "dep");
    let mut w = Vec::new();
    encode_import_paths(&mut w);
    encode_export_item_start(&mut w);
    w.extend_from_slice(b"<nar>");
    let nar_end = w.len();
    encode_export_item_end(&mut w, &p, [&dep], None);
    encode_export_end(&mut w);
    assert_eq!(&w[..16], &[4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    let mut r = Reader::new(&w[nar_end..]);
    let t = server::decode_export_item_end(&mut r).unwrap();
    assert_eq!((t.path, t.references, t.deriver), (p, [dep].into(), None));
    assert_eq!(server::decode_export_item_start(&mut r).unwrap(), None);
    assert!(r.is_empty());
    assert!(decode_ok(&mut Reader::new(&1u64.to_le_bytes())).is_ok());
    assert!(matches!(
        decode_ok(&mut Reader::new(&0u64.to_le_bytes())),
        Err(DecodeError::Invalid(_))
    ));
}

#[test]
fn build_paths_reply() {
    let ok = Ok(());
    let fail = Err(BuildPathsFailure {
        status: 100,
        message: "build failed".into(),
    });
    for outcome in [ok, fail] {
        let mut w = Vec::new();
        server::encode_build_paths_reply(&mut w, &outcome);
        let (got, used) = wire::decode_with(&w, decode_build_paths_reply).unwrap();
        assert_eq!(used, w.len());
        assert_eq!(got, outcome);
        assert_prefixes_incomplete(&w, decode_build_paths_reply);
    }
}

#[test]
fn requests_round_trip_through_the_server_decoder() {
    let v = CLIENT_VERSION;
    let a = path(1, "a");
    let drv = path(2, "a.drv");
    let opts = BuildOptions {
        max_silent_time: 60,
        keep_failed: true,
        ..Default::default()
    };
    let mut basic = BasicDerivation {
        platform: "x86_64-linux".into(),
        builder: b"/bin/sh".to_vec(),
        ..Default::default()
    };
    basic.args.push(b"-c".to_vec());
    let paths = vec![
        DerivedPath::Opaque(a.clone()),
        DerivedPath::Built {
            drv_path: drv.clone(),
            outputs: OutputsSpec::Names(["out".into()].into()),
        },
    ];
    let info = PathInfo::new(a.clone(), Sha256::digest(b""), 8);
    let mut w = Vec::new();
    encode_query_valid_paths(&mut w, true, false, [&a]);
    encode_query_path_infos(&mut w, [&a, &drv]);
    encode_dump_store_path(&mut w, &a);
    encode_build_paths(&mut w, v, &paths, &opts);
    encode_query_closure(&mut w, true, [&a]);
    encode_build_derivation(&mut w, v, &drv, &basic, &opts);
    encode_add_to_store_nar(&mut w, &info);
    let mut r = Reader::new(&w);
    let want = [
        CommandRequest::QueryValidPaths {
            lock: true,
            substitute: false,
            paths: [a.clone()].into(),
        },
        CommandRequest::QueryPathInfos([a.clone(), drv.clone()].into()),
        CommandRequest::DumpStorePath(a.clone()),
        CommandRequest::BuildPaths {
            paths,
            options: opts.clone(),
        },
        CommandRequest::QueryClosure {
            include_outputs: true,
            paths: [a.clone()].into(),
        },
        CommandRequest::BuildDerivation {
            drv_path: drv,
            drv: basic,
            options: opts,
        },
        CommandRequest::AddToStoreNar(info),
    ];
    for want in want {
        assert_eq!(server::decode_request(&mut r, v).unwrap(), want);
    }
    assert!(r.is_empty());
}

/// QueryValidPaths is `u64 1, u64 lock, u64 substitute, set paths`: `substitute` is how
/// `builders-use-substitutes` reaches the remote (docs/protocol.md §7).
#[test]
fn query_valid_paths_carries_lock_and_substitute() {
    let a = path(1, "a");
    for (lock, substitute) in [(false, false), (false, true), (true, false), (true, true)] {
        let mut w = Vec::new();
        encode_query_valid_paths(&mut w, lock, substitute, [&a]);
        let mut want = Vec::new();
        want.put_u64(1);
        want.put_u64(lock as u64);
        want.put_u64(substitute as u64);
        want.put_strings([a.as_str()]);
        assert_eq!(w, want, "lock {lock}, substitute {substitute}");
    }
}

proptest! {
    /// The BuildDerivation reply at every serve version: what each version carries.
    #[test]
    fn build_result_round_trip(res in arb_build_result(), minor in 0u8..=9) {
        let v = ProtocolVersion::new(2, minor);
        let mut w = Vec::new();
        server::encode_build_derivation_reply(&mut w, v, &res);
        let (got, used) = wire::decode_with(&w, |r| decode_build_derivation_reply(r, v, "/nix/store")).unwrap();
        prop_assert_eq!(used, w.len());
        let outputs = if minor >= 8 {
            BuiltOutputsLayout::PathAndSignatures
        } else if minor >= 6 {
            BuiltOutputsLayout::RealisationJson
        } else {
            BuiltOutputsLayout::Absent
        };
        prop_assert_eq!(got, carried(&res, minor >= 3, false, outputs));
        for cut in 0..w.len() {
            let e = decode_build_derivation_reply(&mut Reader::new(&w[..cut]), v, "/nix/store").unwrap_err();
            prop_assert!(e.is_incomplete(), "cut {}: {:?}", cut, e);
        }
    }

    #[test]
    fn path_set_round_trip(paths in proptest::collection::btree_set(arb_path(), 0..6)) {
        let mut w = Vec::new();
        server::encode_path_set(&mut w, &paths);
        let (got, used) = wire::decode_with(&w, decode_path_set).unwrap();
        prop_assert_eq!(used, w.len());
        prop_assert_eq!(got, paths);
    }

    #[test]
    fn path_infos_round_trip(mut infos in proptest::collection::vec(arb_path_info(), 0..4)) {
        for i in &mut infos {
            // Not carried by the serve layout.
            i.registration_time = 0;
            i.ultimate = false;
        }
        let mut w = Vec::new();
        server::encode_path_infos(&mut w, CLIENT_VERSION, &infos);
        let got = decode_path_infos(&mut Reader::new(&w), CLIENT_VERSION).unwrap();
        prop_assert_eq!(got, infos);
    }

    #[test]
    fn build_options_round_trip(a in any::<u32>(), b in any::<u32>(), c in any::<u64>(), d in any::<u32>(), e in any::<bool>(), f in any::<bool>()) {
        let o = BuildOptions { max_silent_time: a as u64, build_timeout: b as u64, max_log_size: c, nr_repeats: d as u64, enforce_determinism: e, keep_failed: f };
        let mut w = Vec::new();
        o.encode(&mut w, CLIENT_VERSION);
        prop_assert_eq!(BuildOptions::decode(&mut Reader::new(&w), CLIENT_VERSION).unwrap(), o);
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), minor in 0u8..10) {
        let v = ProtocolVersion::new(2, minor);
        let _ = decode_hello(&mut Reader::new(&data), CLIENT_VERSION);
        let _ = decode_path_set(&mut Reader::new(&data));
        let _ = decode_path_infos(&mut Reader::new(&data), v);
        let _ = decode_build_paths_reply(&mut Reader::new(&data));
        let _ = decode_build_derivation_reply(&mut Reader::new(&data), v, "/nix/store");
        let _ = server::decode_request(&mut Reader::new(&data), v);
        let _ = server::decode_export_item_end(&mut Reader::new(&data));
    }
}
