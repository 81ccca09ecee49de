//! Bad input for every wire decoder the hook uses (and the server-side ones the stand-in peers
//! use): random bytes, and valid encodings (real captures from Nix 2.8 and 2.34 plus messages
//! built with this crate's encoders) with bits flipped, bytes inserted and deleted, runs
//! repeated, and length words replaced by values on the edges of the limits.
//!
//! Whatever the input, a decoder must not panic, and its answer must be one the async adapter
//! (`WireReader`, which re-runs a decoder from the message's first byte as bytes arrive) can
//! rely on:
//! - `Ok(n)`: `0 < n <= len`; every proper prefix of those `n` bytes is `Incomplete` (a decoder
//!   never answers early, or wrongly, for a message that is still arriving); and bytes that
//!   follow the message do not change the answer.
//! - `Invalid`: final; more bytes never turn it into success or "incomplete". Its message is
//!   not empty.
//! - `Incomplete { needed }`: `needed >= 1` is honest, a lower bound: fewer than `needed` more
//!   bytes (whatever they are) still give `Incomplete`.

mod bad_input;

use std::collections::BTreeSet;
use std::path::Path;

use bad_input::{mutated, read_files};
use hook_protocol::ProtocolVersion;
use hook_protocol::build_result::{BuildResult, BuildStatus, BuiltOutput};
use hook_protocol::derivation::{BasicDerivation, Derivation};
use hook_protocol::hook::{AcceptedBuild, HookOutput, HookRequest, Reply, Settings};
use hook_protocol::path_info::{DerivedPath, PathInfo};
use hook_protocol::serve;
use hook_protocol::wire::{self, DecodeError, Reader, WireWrite};
use hook_protocol::worker::{self, Negotiated};
use hook_protocol::{DrvOutput, Realisation, Sha256, StorePath};
use proptest::prelude::*;

type DecodeFn = Box<dyn Fn(&[u8]) -> wire::Result<usize> + Send + Sync>;

/// One decoder under test: a name for failure messages and a function returning the bytes
/// consumed.
struct Decoder {
    name: String,
    f: DecodeFn,
}

fn dec<T>(
    name: impl Into<String>,
    f: impl Fn(&mut Reader<'_>) -> wire::Result<T> + Send + Sync + 'static,
) -> Decoder {
    Decoder {
        name: name.into(),
        f: Box::new(move |b| wire::decode_with(b, &f).map(|(_, n)| n)),
    }
}

fn worker_protos() -> Vec<Negotiated> {
    let mut with_feature = Negotiated::new(ProtocolVersion::new(1, 38));
    with_feature
        .features
        .insert(worker::FEATURE_REALISATION_WITH_PATH.to_owned());
    vec![
        Negotiated::new(ProtocolVersion::new(1, 21)),
        Negotiated::new(ProtocolVersion::new(1, 26)),
        Negotiated::new(ProtocolVersion::new(1, 30)),
        Negotiated::new(ProtocolVersion::new(1, 34)),
        Negotiated::new(ProtocolVersion::new(1, 35)),
        Negotiated::new(ProtocolVersion::new(1, 37)),
        Negotiated::new(ProtocolVersion::new(1, 38)),
        with_feature,
    ]
}

fn serve_versions() -> Vec<ProtocolVersion> {
    [(2, 4), (2, 5), (2, 6), (2, 7), (2, 8)]
        .iter()
        .map(|&(a, b)| ProtocolVersion::new(a, b))
        .collect()
}

const STORE: &str = "/nix/store";
const PATH_A: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a";

/// The hook's stdin as the daemon writes it for an accepted build: the settings preamble, a
/// request and, after a `try`, the inputs and wanted outputs.
fn hook_stream(r: &mut Reader<'_>) -> wire::Result<()> {
    Settings::decode(r)?;
    if let HookRequest::Try(_) = HookRequest::decode(r)? {
        AcceptedBuild::decode(r)?;
    }
    Ok(())
}

/// Every decoder, at every protocol version that changes its layout.
fn decoders() -> Vec<Decoder> {
    let mut d = vec![
        dec("hook stream (preamble, try, accepted)", hook_stream),
        dec("hook settings preamble", Settings::decode),
        dec("hook request", HookRequest::decode),
        dec("hook accepted build", AcceptedBuild::decode),
        Decoder {
            name: "hook reply (daemon side)".into(),
            f: Box::new(|b| Reply::decode(b).map(|(_, n)| n)),
        },
        Decoder {
            name: "hook output line (daemon side)".into(),
            f: Box::new(|b| HookOutput::decode(b).map(|(_, n)| n)),
        },
        dec("BasicDerivation (wire)", BasicDerivation::decode),
        dec("path info (upload layout)", PathInfo::decode_for_upload),
        dec("derived path", DerivedPath::read),
        dec("serve hello", |r| {
            serve::decode_hello(r, serve::CLIENT_VERSION)
        }),
        dec("serve path set", serve::decode_path_set),
        dec("serve ok", serve::decode_ok),
        dec("serve build paths reply", serve::decode_build_paths_reply),
        dec("serve server: client hello", serve::server::decode_hello),
        dec(
            "serve server: export item start",
            serve::server::decode_export_item_start,
        ),
        dec(
            "serve server: export item end",
            serve::server::decode_export_item_end,
        ),
        dec("worker hello", |r| {
            worker::decode_server_hello(r, worker::CLIENT_VERSION)
        }),
        dec("worker bool", worker::decode_bool),
        dec("worker path set", worker::decode_path_set),
        dec("worker frame", |r| {
            worker::decode_frame(r, 1 << 20).map(|c| c.map(<[u8]>::len))
        }),
        dec("worker build mode", worker::BuildMode::decode),
        dec(
            "worker server: client hello",
            worker::server::decode_client_hello,
        ),
        dec("derivation output id (string)", |r| {
            DrvOutput::parse(r.str("id")?).map_err(|e| DecodeError::malformed(e.to_string()))
        }),
        dec("realisation JSON (string)", |r| {
            Realisation::from_json(r.str("realisation")?, STORE)
                .map_err(|e| DecodeError::malformed(e.to_string()))
        }),
    ];
    for v in serve_versions() {
        d.push(dec(format!("serve {v} path infos"), move |r| {
            serve::decode_path_infos(r, v)
        }));
        d.push(dec(format!("serve {v} build derivation reply"), move |r| {
            serve::decode_build_derivation_reply(r, v, STORE)
        }));
        d.push(dec(format!("serve {v} build options"), move |r| {
            serve::BuildOptions::decode(r, v)
        }));
        d.push(dec(format!("serve {v} server: request"), move |r| {
            serve::server::decode_request(r, v)
        }));
    }
    for p in worker_protos() {
        let v = p.version;
        let tag = if p.features.is_empty() {
            format!("{v}")
        } else {
            format!("{v}+features")
        };
        let clone = |p: &Negotiated| p.clone();
        let q = clone(&p);
        d.push(dec(format!("worker {tag} server info"), move |r| {
            worker::decode_server_info(r, q.version, &q.features)
        }));
        let q = clone(&p);
        d.push(dec(format!("worker {tag} stderr message"), move |r| {
            worker::decode_stderr(r, &q)
        }));
        let q = clone(&p);
        d.push(dec(format!("worker {tag} response: none"), move |r| {
            worker::decode_response(r, &q, |_| Ok(()))
        }));
        let q = clone(&p);
        d.push(dec(format!("worker {tag} response: bool"), move |r| {
            worker::decode_response(r, &q, worker::decode_bool)
        }));
        let q = clone(&p);
        d.push(dec(format!("worker {tag} response: path set"), move |r| {
            worker::decode_response(r, &q, worker::decode_path_set)
        }));
        let q = clone(&p);
        let path = StorePath::parse(PATH_A).expect("test path");
        d.push(dec(format!("worker {tag} response: path info"), move |r| {
            worker::decode_response(r, &q, |r| {
                worker::decode_query_path_info_reply(r, &q, &path)
            })
        }));
        let q = clone(&p);
        d.push(dec(
            format!("worker {tag} response: build result"),
            move |r| worker::decode_response(r, &q, |r| worker::decode_build_result(r, &q, STORE)),
        ));
        let q = clone(&p);
        d.push(dec(
            format!("worker {tag} response: build paths with results"),
            move |r| {
                worker::decode_response(r, &q, |r| {
                    worker::decode_build_paths_with_results_reply(r, &q, STORE)
                })
            },
        ));
        let q = clone(&p);
        d.push(dec(format!("worker {tag} server: after hello"), move |r| {
            worker::server::decode_after_hello(r, q.version)
        }));
        let q = clone(&p);
        d.push(dec(format!("worker {tag} server: request"), move |r| {
            worker::server::decode_request(r, &q, STORE)
        }));
        let q = clone(&p);
        let asked = asked_realisation();
        d.push(dec(
            format!("worker {tag} response: query realisation"),
            move |r| {
                worker::decode_response(r, &q, |r| {
                    worker::decode_query_realisation_reply(r, &q, &asked, STORE)
                })
            },
        ));
    }
    d
}

/// The id the captured QueryRealisation (tests/data/ca, worker 1.35) asked for; the seeds built
/// here ask for it too.
fn asked_realisation() -> DrvOutput {
    DrvOutput::parse("sha256:d984db152490bae8bc0c765dc6d858b9ff958e6ab25de84d371f8c2894599ce1!out")
        .expect("a valid id")
}

/// Checks the contract in the module docs for one decoder and one input.
fn check(d: &Decoder, input: &[u8]) -> Result<(), TestCaseError> {
    let name = &d.name;
    match (d.f)(input) {
        Ok(0) => {
            // Only a layout with nothing in it (worker 1.21's server info) may consume nothing,
            // and then it must do so for any input.
            prop_assert!(
                matches!((d.f)(&[]), Ok(0)),
                "{name}: consumed nothing of {} bytes, but is not an empty layout",
                input.len()
            );
        }
        Ok(n) => {
            prop_assert!(n <= input.len(), "{name}: consumed {n} of {}", input.len());
            // Every proper prefix is Incomplete: all of them for short messages, a spread
            // (including the ends) for long ones.
            let step = (n / 96).max(1);
            let mut cuts: Vec<usize> = (0..n).step_by(step).collect();
            cuts.extend(n.saturating_sub(9)..n);
            for cut in cuts {
                match (d.f)(&input[..cut]) {
                    Err(e) if e.is_incomplete() => {}
                    other => prop_assert!(
                        false,
                        "{name}: the whole message decodes (consuming {n}), but its prefix of \
                         {cut} bytes gave {other:?}"
                    ),
                }
            }
            let mut longer = input.to_vec();
            longer.extend_from_slice(&[0x5a; 24]);
            let again = (d.f)(&longer);
            prop_assert!(
                matches!(again, Ok(m) if m == n),
                "{name}: trailing bytes changed the answer from Ok({n}) to {again:?}"
            );
        }
        Err(DecodeError::Invalid(e)) => {
            prop_assert!(!e.to_string().is_empty(), "{name}: empty error message");
            for extra in [&[0u8; 8][..], &[0xff; 40][..], b"\n"] {
                let mut longer = input.to_vec();
                longer.extend_from_slice(extra);
                let again = (d.f)(&longer);
                prop_assert!(
                    matches!(again, Err(DecodeError::Invalid(_))),
                    "{name}: said Invalid ({e}), but with {} more bytes said {again:?}",
                    extra.len()
                );
            }
        }
        Err(DecodeError::Incomplete { needed }) => {
            prop_assert!(needed >= 1, "{name}: Incomplete with needed = 0");
            // Fewer than `needed` more bytes cannot be enough, whatever they are.
            let more = needed.min(4096) - 1;
            for fill in [0u8, 1, 0xff] {
                let mut longer = input.to_vec();
                longer.resize(input.len() + more, fill);
                let again = (d.f)(&longer);
                prop_assert!(
                    matches!(again, Err(DecodeError::Incomplete { .. })),
                    "{name}: needed {needed} more bytes, but {more} bytes of {fill:#x} gave \
                     {again:?}"
                );
            }
        }
    }
    Ok(())
}

fn data_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// Valid messages to mutate: every reply and hook stream captured from real Nix, plus messages
/// built with the encoders for layouts the captures do not show.
fn seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = read_files(&data_dir(), &[".bin", ".stdin"])
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    let a = StorePath::parse(PATH_A).expect("test path");
    let b = StorePath::parse("/nix/store/11111111111111111111111111111111-b.drv").expect("path");
    let mut info = PathInfo::new(a.clone(), Sha256::digest(b"nar"), 120);
    info.deriver = Some(b.clone());
    info.references.insert(a.clone());
    info.sigs.insert("cache:sig".into());
    info.ca = Some("fixed:r:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73".into());
    let realisation = Realisation {
        id: asked_realisation(),
        out_path: a.clone(),
        signatures: ["cache-1:AAAA".to_owned()].into(),
        dependent_realisations: [(
            DrvOutput::parse(&format!("sha256:{}!dev", "1".repeat(64))).expect("id"),
            a.clone(),
        )]
        .into(),
    };
    let mut ca_result = BuildResult::new(BuildStatus::Built, "");
    ca_result
        .built_outputs
        .insert("out".into(), BuiltOutput::from(realisation.clone()));
    ca_result
        .built_outputs
        .insert("dev".into(), BuiltOutput::new(b.clone()));

    let mut w = Vec::new();
    info.encode_for_upload(&mut w);
    seeds.push(w);
    for v in serve_versions() {
        let mut w = Vec::new();
        serve::server::encode_path_infos(&mut w, v, std::slice::from_ref(&info));
        seeds.push(w);
    }
    for p in worker_protos() {
        use worker::StderrMessage as M;
        let mut w = Vec::new();
        for m in [
            M::Next("log line\n".into()),
            M::StartActivity(worker::StartActivity {
                id: 7,
                level: 3,
                activity_type: worker::activity::BUILD,
                text: "building".into(),
                fields: vec![worker::Field::Str(b.to_string()), worker::Field::Int(1)],
                parent: 0,
            }),
            M::Result(worker::ActivityResult {
                id: 7,
                result_type: worker::result_type::BUILD_LOG_LINE,
                fields: vec![worker::Field::Str("hello".into())],
            }),
            M::StopActivity { id: 7 },
            M::Write(b"data".to_vec()),
            M::Error(worker::DaemonError {
                message: "error: boom".into(),
                level: p.at_least(1, 26).then_some(0),
                traces: if p.at_least(1, 26) {
                    vec!["while doing it".into()]
                } else {
                    vec![]
                },
                exit_status: (!p.at_least(1, 26)).then_some(1),
            }),
        ] {
            worker::server::encode_stderr(&mut w, &p, &m);
        }
        seeds.push(w);
        let mut w = Vec::new();
        worker::server::encode_stderr(&mut w, &p, &worker::StderrMessage::Last);
        worker::server::encode_query_path_info_reply(&mut w, &p, Some(&info));
        seeds.push(w);
        // A content-addressed build's result, and the realisation operations.
        let mut w = Vec::new();
        worker::server::encode_stderr(&mut w, &p, &worker::StderrMessage::Last);
        worker::server::encode_build_result(&mut w, &p, &ca_result);
        seeds.push(w);
        let mut w = Vec::new();
        worker::server::encode_stderr(&mut w, &p, &worker::StderrMessage::Last);
        worker::server::encode_query_realisation_reply(&mut w, &p, Some(&realisation));
        seeds.push(w);
        let mut w = Vec::new();
        if worker::encode_register_drv_output(&mut w, &p, &realisation).is_ok() {
            worker::encode_query_realisation(&mut w, &p, &realisation.id).expect("same gate");
            seeds.push(w);
        }
    }
    for v in serve_versions() {
        let mut w = Vec::new();
        serve::server::encode_build_derivation_reply(&mut w, v, &ca_result);
        seeds.push(w);
    }
    for s in [realisation.to_json(), realisation.id.to_string()] {
        let mut w = Vec::new();
        w.put_str(&s);
        seeds.push(w);
    }
    for (_, drv) in read_files(&data_dir().join("drv"), &[".drv"]) {
        if let Ok(d) = Derivation::parse(&drv) {
            let mut w = Vec::new();
            d.basic.encode(&mut w);
            seeds.push(w);
        }
        seeds.push(drv);
    }
    let mut w = Vec::new();
    AcceptedBuild {
        input_paths: BTreeSet::from([a]),
        missing_outputs: BTreeSet::from(["out".to_owned()]),
    }
    .encode(&mut w);
    seeds.push(w);
    seeds.push(Reply::accept("ssh://builder").to_bytes());
    seeds.push(b"@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"hi\"}\n".to_vec());
    seeds
}

#[test]
fn every_seed_is_decoded_by_some_decoder() {
    // The mutation test below is only as good as its seeds: each must be a valid message for at
    // least one decoder (so mutations start from deep inside a real message).
    let ds = decoders();
    let mut unused = Vec::new();
    for (i, s) in seeds().iter().enumerate() {
        if !ds.iter().any(|d| (d.f)(s).is_ok()) {
            unused.push(i);
        }
    }
    assert!(unused.is_empty(), "seeds no decoder accepts: {unused:?}");
}

#[test]
fn every_decoder_accepts_some_seed() {
    let seeds = seeds();
    for d in decoders() {
        // Decoders whose messages are tiny fixed layouts are covered by the random bytes test.
        if seeds.iter().all(|s| (d.f)(s).is_err()) {
            let tiny = [
                "serve ok",
                "worker bool",
                "worker frame",
                "worker build mode",
                "hook request",
                "derived path",
            ];
            assert!(
                tiny.iter().any(|t| d.name.contains(t)) || d.name.contains("server:"),
                "no seed is a valid message for '{}'",
                d.name
            );
        }
    }
}

/// The checker itself must catch each kind of broken decoder.
#[test]
fn the_checker_catches_broken_decoders() {
    let broken = |name: &str, f: fn(&[u8]) -> wire::Result<usize>| Decoder {
        name: name.into(),
        f: Box::new(f),
    };
    let cases: [(Decoder, &[u8]); 5] = [
        // Answers before the message is complete (a prefix of 8 of its 16 bytes is "Ok").
        (
            broken("early", |b| {
                if b.len() >= 8 {
                    Ok(b.len().min(16))
                } else {
                    Err(DecodeError::Incomplete {
                        needed: 8 - b.len(),
                    })
                }
            }),
            &[0; 16],
        ),
        // Says Invalid, then succeeds once more bytes arrive.
        (
            broken("unstable invalid", |b| {
                if b.len() < 10 {
                    Err(DecodeError::malformed("short"))
                } else {
                    Ok(10)
                }
            }),
            &[0; 9],
        ),
        // Claims to need more bytes than it does.
        (
            broken("dishonest needed", |b| {
                if b.len() < 9 {
                    Err(DecodeError::Incomplete { needed: 100 })
                } else {
                    Ok(9)
                }
            }),
            &[0; 4],
        ),
        // Consumes more than it was given.
        (broken("overrun", |b| Ok(b.len() + 1)), &[1, 2, 3]),
        // Trailing bytes change the answer.
        (
            broken("greedy", |b| {
                if b.len() >= 4 {
                    Ok(b.len())
                } else {
                    Err(DecodeError::Incomplete {
                        needed: 4 - b.len(),
                    })
                }
            }),
            &[0; 4],
        ),
    ];
    for (d, input) in &cases {
        assert!(check(d, input).is_err(), "the checker missed '{}'", d.name);
    }
    let ok = broken("honest u64", |b| {
        wire::decode_with(b, |r| r.u64()).map(|(_, n)| n)
    });
    assert!(check(&ok, &[0; 8]).is_ok());
    assert!(check(&ok, &[0; 3]).is_ok());
}

proptest! {
    #![proptest_config(bad_input::config(512))]

    #[test]
    fn random_bytes(input in prop::collection::vec(any::<u8>(), 0..512)) {
        for d in decoders() {
            check(&d, &input)?;
        }
    }

    /// Random bytes that are mostly small little-endian words: these get past magics, tags and
    /// counts far more often than uniform bytes.
    #[test]
    fn random_words(words in prop::collection::vec(
        prop_oneof![
            4 => 0u64..16,
            2 => prop::sample::select(bad_input::INTERESTING_U64),
            1 => any::<u64>(),
        ],
        0..64,
    )) {
        let input: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        for d in decoders() {
            check(&d, &input)?;
        }
    }

    #[test]
    fn mutated_valid_messages((_, input) in mutated(seeds())) {
        for d in decoders() {
            check(&d, &input)?;
        }
    }

    /// What decodes from mutated messages as a build result, a QueryRealisation reply or a
    /// RegisterDrvOutput request encodes back to bytes that decode to the same value (the fuzz
    /// targets' round trips, in brief). The realisations' JSON may come back in another
    /// spelling, never with another meaning.
    #[test]
    fn decoded_values_round_trip((_, input) in mutated(seeds())) {
        round_trips(&input)?;
    }
}

/// The same round trips on every seed as it is.
#[test]
fn seeds_round_trip() {
    for (i, seed) in seeds().iter().enumerate() {
        if let Err(e) = round_trips(seed) {
            panic!("seed {i}: {e}");
        }
    }
}

fn round_trips(input: &[u8]) -> Result<(), TestCaseError> {
    for v in serve_versions() {
        let decode = |r: &mut Reader<'_>| serve::decode_build_derivation_reply(r, v, STORE);
        if let Ok((res, _)) = wire::decode_with(input, decode) {
            let mut w = Vec::new();
            serve::server::encode_build_derivation_reply(&mut w, v, &res);
            prop_assert_eq!(
                wire::decode_with(&w, decode),
                Ok((res, w.len())),
                "serve {}",
                v
            );
        }
    }
    let asked = asked_realisation();
    for p in worker_protos() {
        let decode = |r: &mut Reader<'_>| worker::decode_build_result(r, &p, STORE);
        if let Ok((res, _)) = wire::decode_with(input, decode) {
            let mut w = Vec::new();
            worker::server::encode_build_result(&mut w, &p, &res);
            prop_assert_eq!(
                wire::decode_with(&w, decode),
                Ok((res, w.len())),
                "worker {:?}",
                p
            );
        }
        let decode =
            |r: &mut Reader<'_>| worker::decode_query_realisation_reply(r, &p, &asked, STORE);
        if let Ok((found, _)) = wire::decode_with(input, decode) {
            let mut w = Vec::new();
            worker::server::encode_query_realisation_reply(&mut w, &p, found.as_ref());
            prop_assert_eq!(
                wire::decode_with(&w, decode),
                Ok((found, w.len())),
                "worker {:?}",
                p
            );
        }
        let decode = |r: &mut Reader<'_>| worker::server::decode_request(r, &p, STORE);
        if let Ok((worker::server::OpRequest::RegisterDrvOutput(real), _)) =
            wire::decode_with(input, decode)
        {
            let mut w = Vec::new();
            worker::encode_register_drv_output(&mut w, &p, &real).expect("the version decoded it");
            prop_assert_eq!(
                wire::decode_with(&w, decode),
                Ok((worker::server::OpRequest::RegisterDrvOutput(real), w.len())),
                "worker {:?}",
                p
            );
        }
    }
    Ok(())
}
