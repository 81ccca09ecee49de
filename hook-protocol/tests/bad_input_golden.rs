//! Golden bad-input cases for the wire decoders, each with the exact error it must give:
//! - truncated input: every prefix of the hook's real stdin (captured from Nix 2.8 and 2.34) is
//!   merely incomplete;
//! - oversized lengths: a string length or element count of `u64::MAX`, or one just above the
//!   limit, is `TooLong` at once: measured to return in well under a millisecond and to make no
//!   allocation larger than 64 KiB (this binary's allocator records the largest one);
//! - non-UTF-8 bytes: which fields keep them losslessly, which decode them lossily, and which
//!   reject them (the table in `RELIABILITY.md` is this file's summary);
//! - store paths with a bad hash part: wrong length, letters outside Nix's base-32 alphabet
//!   (`e o u t`), upper case, non-ASCII.

mod bad_input;

use std::time::{Duration, Instant};

use bad_input::{Counting, largest_allocation, read_files};
use hook_protocol::ProtocolVersion;
use hook_protocol::derivation::{BasicDerivation, Derivation, ParseErrorKind};
use hook_protocol::hook::{AcceptedBuild, HookRequest, Settings};
use hook_protocol::log::Message;
use hook_protocol::store_path::StorePathError;
use hook_protocol::wire::{self, DecodeError, Invalid, MAX_COUNT, MAX_STRING, Reader, WireWrite};
use hook_protocol::worker::{self, Negotiated, StderrMessage};
use hook_protocol::{DrvOutput, Realisation, StorePath, serve};

#[global_allocator]
static ALLOC: Counting = Counting;

/// Largest single allocation a hostile length may cause.
const ALLOC_BOUND: usize = 64 << 10;
/// How long rejecting a hostile length may take (generous: it is microseconds).
const TIME_BOUND: Duration = Duration::from_millis(50);

const HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";

fn path(name: &str) -> String {
    format!("/nix/store/{HASH}-{name}")
}

fn proto(major: u8, minor: u8) -> Negotiated {
    Negotiated::new(ProtocolVersion::new(major, minor))
}

fn hook_stream(r: &mut Reader<'_>) -> wire::Result<()> {
    Settings::decode(r)?;
    if let HookRequest::Try(_) = HookRequest::decode(r)? {
        AcceptedBuild::decode(r)?;
    }
    Ok(())
}

#[test]
fn every_prefix_of_the_real_hook_stdin_is_incomplete() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hook");
    let captures = read_files(&dir, &["accept.stdin", "accept-deps.stdin"]);
    assert!(captures.len() >= 4, "captures: {captures:?}");
    for (name, bytes) in captures {
        let (_, used) = wire::decode_with(&bytes, hook_stream)
            .unwrap_or_else(|e| panic!("{name}: the whole capture does not decode: {e}"));
        assert!(used > 8 && used <= bytes.len(), "{name}: used {used}");
        for cut in 0..used {
            match wire::decode_with(&bytes[..cut], hook_stream) {
                Err(e) if e.is_incomplete() => {}
                other => panic!("{name}: prefix of {cut} bytes: {other:?}"),
            }
        }
    }
}

/// Runs `f` and checks that it is `TooLong` for `len` with `limit`, fast, without a large
/// allocation.
#[track_caller]
fn assert_too_long<T: std::fmt::Debug>(
    case: &str,
    f: impl FnOnce() -> wire::Result<T>,
    len: u64,
    limit: u64,
) {
    let t0 = Instant::now();
    let (r, largest) = largest_allocation(f);
    let took = t0.elapsed();
    match r {
        Err(DecodeError::Invalid(Invalid::TooLong {
            len: l, limit: m, ..
        })) if l == len && m == limit => {}
        other => panic!("{case}: expected TooLong {{ len: {len}, limit: {limit} }}, got {other:?}"),
    }
    assert!(took < TIME_BOUND, "{case}: took {took:?}");
    assert!(
        largest < ALLOC_BOUND,
        "{case}: allocated {largest} bytes at once"
    );
}

#[test]
fn the_allocation_counter_sees_large_allocations() {
    let (v, largest) = largest_allocation(|| vec![1u8; 1 << 20]);
    assert_eq!(v.len(), 1 << 20);
    assert!(largest >= 1 << 20, "{largest}");
    let ((), small) = largest_allocation(|| ());
    assert!(small < ALLOC_BOUND);
}

fn words(ws: &[u64]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A string as the wire writes it: its length, then its bytes, padded.
fn string(s: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.put_str(s);
    b
}

/// One hostile-length case: its name, the bytes, and the decoder that must refuse them.
type Case = (&'static str, Vec<u8>, fn(&[u8]) -> wire::Result<String>);

/// Decodes `b` with `f`; the value is shown only when a case wrongly succeeds.
fn shown<'a, T: std::fmt::Debug>(
    b: &'a [u8],
    f: impl FnOnce(&mut Reader<'a>) -> wire::Result<T>,
) -> wire::Result<String> {
    wire::decode_with(b, f).map(|v| format!("{v:?}"))
}

#[test]
fn hostile_string_lengths_are_rejected_at_once() {
    for len in [u64::MAX, u64::MAX - 7, 1 << 63, MAX_STRING + 1] {
        let cases: [Case; 15] = [
            // The preamble: a setting's name, then a setting's value.
            ("setting name", words(&[1, len]), |b| {
                shown(b, Settings::decode)
            }),
            (
                "setting value",
                [words(&[1]), string("max-jobs"), words(&[len])].concat(),
                |b| shown(b, Settings::decode),
            ),
            // The request word, and the derivation path inside a `try`.
            ("request word", words(&[len]), |b| {
                shown(b, HookRequest::decode)
            }),
            (
                "try drv path",
                [
                    string("try"),
                    words(&[1]),
                    string("aarch64-linux"),
                    words(&[len]),
                ]
                .concat(),
                |b| shown(b, HookRequest::decode),
            ),
            // A log line and an error from a remote nix-daemon.
            ("STDERR_NEXT", words(&[worker::STDERR_NEXT, len]), |b| {
                shown(b, |r| worker::decode_stderr(r, &proto(1, 35)))
            }),
            ("STDERR_WRITE", words(&[worker::STDERR_WRITE, len]), |b| {
                shown(b, |r| worker::decode_stderr(r, &proto(1, 35)))
            }),
            (
                "STDERR_ERROR message",
                [
                    words(&[worker::STDERR_ERROR]),
                    string("Error"),
                    words(&[0]),
                    string("name"),
                    words(&[len]),
                ]
                .concat(),
                |b| shown(b, |r| worker::decode_stderr(r, &proto(1, 35))),
            ),
            // A build result's error message, over both protocols.
            ("serve build result", words(&[3, len]), |b| {
                shown(b, |r| {
                    serve::decode_build_derivation_reply(
                        r,
                        ProtocolVersion::new(2, 7),
                        "/nix/store",
                    )
                })
            }),
            ("worker build result", words(&[3, len]), |b| {
                shown(b, |r| {
                    worker::decode_build_result(r, &proto(1, 35), "/nix/store")
                })
            }),
            // The serve greeting is fine, the path set's first path is not.
            ("serve path set", words(&[1, len]), |b| {
                shown(b, serve::decode_path_set)
            }),
            // A BasicDerivation's builder.
            (
                "derivation builder",
                [words(&[0, 0]), string("x86_64-linux"), words(&[len])].concat(),
                |b| shown(b, BasicDerivation::decode),
            ),
            // A built output's id, then its realisation JSON.
            (
                "built output id",
                [words(&[0]), string(""), words(&[1, 0, 0, 0, 1, len])].concat(),
                |b| {
                    shown(b, |r| {
                        worker::decode_build_result(r, &proto(1, 35), "/nix/store")
                    })
                },
            ),
            (
                "built output realisation",
                [
                    words(&[0]),
                    string(""),
                    words(&[1, 0, 0, 0, 1]),
                    string(&format!("sha256:{}!out", "0".repeat(64))),
                    words(&[len]),
                ]
                .concat(),
                |b| {
                    shown(b, |r| {
                        serve::decode_build_derivation_reply(
                            r,
                            ProtocolVersion::new(2, 7),
                            "/nix/store",
                        )
                    })
                },
            ),
            // A QueryRealisation reply's realisation, and RegisterDrvOutput's (daemon side).
            ("query realisation reply", words(&[1, len]), |b| {
                shown(b, |r| query_realisation(r, 35))
            }),
            ("register drv output request", words(&[42, len]), |b| {
                shown(b, |r| {
                    worker::server::decode_request(r, &proto(1, 35), "/nix/store")
                })
            }),
        ];
        for (case, b, decode) in cases {
            assert_too_long(case, || decode(&b), len, MAX_STRING);
        }
    }
}

/// The id the realisation tests ask for.
fn asked() -> DrvOutput {
    DrvOutput::parse(&format!("sha256:{}!out", "4ad3".repeat(16))).expect("a valid id")
}

fn query_realisation(r: &mut Reader<'_>, minor: u8) -> wire::Result<Option<Realisation>> {
    worker::decode_query_realisation_reply(r, &proto(1, minor), &asked(), "/nix/store")
}

#[test]
fn hostile_counts_are_rejected_at_once() {
    for count in [u64::MAX, 1 << 63, MAX_COUNT + 1] {
        // A successful build result with times, then the built-outputs count.
        let built = [words(&[0]), string(""), words(&[1, 0, 0, 0, count])].concat();
        let cases: [Case; 11] = [
            ("accepted build: input paths", words(&[count]), |b| {
                shown(b, AcceptedBuild::decode)
            }),
            ("serve path set", words(&[count]), |b| {
                shown(b, serve::decode_path_set)
            }),
            ("derivation outputs", words(&[count]), |b| {
                shown(b, BasicDerivation::decode)
            }),
            // Activity fields, error traces, built outputs, path info references.
            (
                "activity fields",
                [
                    words(&[worker::STDERR_START_ACTIVITY, 1, 0, 105]),
                    string("building"),
                    words(&[count]),
                ]
                .concat(),
                |b| shown(b, |r| worker::decode_stderr(r, &proto(1, 35))),
            ),
            (
                "error traces",
                [
                    words(&[worker::STDERR_ERROR]),
                    string("Error"),
                    words(&[0]),
                    string("name"),
                    string("message"),
                    words(&[0, count]),
                ]
                .concat(),
                |b| shown(b, |r| worker::decode_stderr(r, &proto(1, 35))),
            ),
            ("serve built outputs", built.clone(), |b| {
                shown(b, |r| {
                    serve::decode_build_derivation_reply(
                        r,
                        ProtocolVersion::new(2, 6),
                        "/nix/store",
                    )
                })
            }),
            ("serve built outputs", built.clone(), |b| {
                shown(b, |r| {
                    serve::decode_build_derivation_reply(
                        r,
                        ProtocolVersion::new(2, 8),
                        "/nix/store",
                    )
                })
            }),
            ("worker 1.35 built outputs", built, |b| {
                shown(b, |r| {
                    worker::decode_build_result(r, &proto(1, 35), "/nix/store")
                })
            }),
            // QueryRealisation replies, in both layouts.
            ("query realisation reply", words(&[count]), |b| {
                shown(b, |r| query_realisation(r, 30))
            }),
            ("query realisation reply", words(&[count]), |b| {
                shown(b, |r| query_realisation(r, 35))
            }),
            (
                "serve path info references",
                [string(&path("a")), string(""), words(&[count])].concat(),
                |b| {
                    shown(b, |r| {
                        serve::decode_path_infos(r, ProtocolVersion::new(2, 7))
                    })
                },
            ),
        ];
        for (case, b, decode) in cases {
            assert_too_long(case, || decode(&b), count, MAX_COUNT);
        }
    }
}

#[test]
fn counts_within_the_limit_do_not_reserve_memory_up_front() {
    // MAX_COUNT elements of at least 8 bytes each would be 128 MiB: with nothing behind the
    // count, decoding is merely incomplete and must not reserve space for them.
    let b = words(&[MAX_COUNT]);
    for (case, f) in [
        (
            "input paths",
            Box::new(|| wire::decode_with(&b, AcceptedBuild::decode).map(drop))
                as Box<dyn Fn() -> wire::Result<()>>,
        ),
        (
            "path set",
            Box::new(|| wire::decode_with(&b, serve::decode_path_set).map(drop)),
        ),
        (
            "derivation outputs",
            Box::new(|| wire::decode_with(&b, BasicDerivation::decode).map(drop)),
        ),
        (
            "realisations",
            Box::new(|| wire::decode_with(&b, |r| query_realisation(r, 35)).map(drop)),
        ),
        (
            "realisation paths",
            Box::new(|| wire::decode_with(&b, |r| query_realisation(r, 30)).map(drop)),
        ),
    ] {
        let (r, largest) = largest_allocation(f);
        assert!(r.unwrap_err().is_incomplete(), "{case}");
        assert!(largest < ALLOC_BOUND, "{case}: allocated {largest} bytes");
    }
    // A length at the limit with no bytes behind it: incomplete, nothing allocated, and the
    // `needed` it reports is what the adapter will wait for.
    let b = words(&[1, MAX_STRING]);
    let (r, largest) = largest_allocation(|| wire::decode_with(&b, Settings::decode));
    assert_eq!(
        r.unwrap_err(),
        DecodeError::Incomplete {
            needed: MAX_STRING as usize
        }
    );
    assert!(largest < ALLOC_BOUND, "allocated {largest} bytes");
}

#[test]
fn framed_chunks_of_any_length_stream_without_allocating() {
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"0123456789");
    assert_too_long(
        "decode_frame",
        || {
            wire::decode_with(&b, |r| {
                worker::decode_frame(r, 1 << 20).map(|c| c.map(<[u8]>::len))
            })
        },
        u64::MAX,
        1 << 20,
    );
    let (out, largest) = largest_allocation(|| {
        let mut d = worker::FrameDecoder::new();
        let (n, frame) = d.decode(&b);
        (n, frame.map(|f| format!("{f:?}")), d.is_done())
    });
    assert_eq!(out.0, b.len());
    assert_eq!(
        out.1.as_deref(),
        Some("Data([48, 49, 50, 51, 52, 53, 54, 55, 56, 57])")
    );
    assert!(!out.2);
    assert!(largest < ALLOC_BOUND, "allocated {largest} bytes");
}

// ---------------------------------------------------------------------------------------------
// Non-UTF-8

const BAD: &[u8] = b"caf\xe9-\xff\xfe";

fn not_utf8(r: wire::Result<impl std::fmt::Debug>, what: &str) {
    match r {
        Err(DecodeError::Invalid(Invalid::NotUtf8 { what: w })) => assert_eq!(w, what),
        other => panic!("{what}: expected NotUtf8, got {other:?}"),
    }
}

#[test]
fn non_utf8_in_the_hook_protocol() {
    // Setting names are rejected; setting values are decoded lossily (only a setting the hook
    // ignores could hold such bytes, and the daemon sends every setting).
    let mut b = words(&[1]);
    b.put_bytes(BAD);
    b.put_str("v");
    b.put_u64(0);
    not_utf8(wire::decode_with(&b, Settings::decode), "setting name");
    let mut b = words(&[1]);
    b.put_str("some-setting");
    b.put_bytes(BAD);
    b.put_u64(0);
    let (s, _) = wire::decode_with(&b, Settings::decode).unwrap();
    assert_eq!(s.get("some-setting"), Some("caf\u{fffd}-\u{fffd}\u{fffd}"));

    // In a `try`: system, derivation path and features must be UTF-8.
    let try_with = |system: &[u8], drv: &[u8], feature: &[u8]| {
        let mut b = Vec::new();
        b.put_str("try");
        b.put_u64(1);
        b.put_bytes(system);
        b.put_bytes(drv);
        b.put_strings([feature]);
        wire::decode_with(&b, HookRequest::decode)
    };
    let drv = path("x.drv");
    not_utf8(try_with(BAD, drv.as_bytes(), b"kvm"), "needed system");
    let mut bad_drv = drv.clone().into_bytes();
    bad_drv.extend_from_slice(b"\xff");
    not_utf8(
        try_with(b"x86_64-linux", &bad_drv, b"kvm"),
        "derivation path",
    );
    not_utf8(
        try_with(b"x86_64-linux", drv.as_bytes(), BAD),
        "required features",
    );
    // Any word but `try` means "stop"; a non-UTF-8 one too (shown lossily).
    let mut b = Vec::new();
    b.put_bytes(BAD);
    assert!(matches!(
        wire::decode_with(&b, HookRequest::decode),
        Ok((HookRequest::Other(w), _)) if w.contains('\u{fffd}')
    ));

    // After `# accept`: input paths and output names.
    let mut b = Vec::new();
    b.put_strings([bad_drv.as_slice()]);
    b.put_strings(Vec::<String>::new());
    not_utf8(wire::decode_with(&b, AcceptedBuild::decode), "input path");
    let mut b = Vec::new();
    b.put_strings(Vec::<String>::new());
    b.put_strings([BAD]);
    not_utf8(
        wire::decode_with(&b, AcceptedBuild::decode),
        "missing outputs",
    );
}

#[test]
fn non_utf8_in_derivations() {
    // What the builder sees (builder, arguments, environment) is kept byte for byte, in the
    // `.drv` and on the wire; names, paths and the platform must be UTF-8.
    let aterm = |outputs: &[u8], platform: &[u8], env_key: &[u8]| {
        let mut t = b"Derive([(\"".to_vec();
        t.extend_from_slice(outputs);
        t.extend_from_slice(format!("\",\"{}\",\"\",\"\")],[],[],\"", path("x")).as_bytes());
        t.extend_from_slice(platform);
        t.extend_from_slice(b"\",\"/bin/sh\xff\",[\"-c\",\"\xfe\"],[(\"");
        t.extend_from_slice(env_key);
        t.extend_from_slice(b"\",\"v\xe9\")])");
        t
    };
    let good = aterm(b"out", b"x86_64-linux", b"k\xff");
    let d = Derivation::parse(&good).unwrap();
    assert_eq!(d.basic.builder, b"/bin/sh\xff");
    assert_eq!(d.basic.args[1], b"\xfe");
    assert_eq!(d.basic.env[&b"k\xff".to_vec()], b"v\xe9");
    assert_eq!(d.to_aterm(), good, "raw bytes must round-trip exactly");
    let mut w = Vec::new();
    d.basic.encode(&mut w);
    let (back, _) = wire::decode_with(&w, BasicDerivation::decode).unwrap();
    assert_eq!(back, d.basic, "and through the wire form");

    for (t, what) in [
        (aterm(BAD, b"x86_64-linux", b"k"), "an output name"),
        (aterm(b"out", BAD, b"k"), "the platform"),
    ] {
        match Derivation::parse(&t) {
            Err(e) => assert_eq!(e.kind, ParseErrorKind::NotUtf8 { what }, "{e}"),
            Ok(d) => panic!("{what}: accepted {d:?}"),
        }
    }
    let mut w = words(&[1]);
    w.put_bytes(BAD);
    not_utf8(
        wire::decode_with(&w, BasicDerivation::decode),
        "output name",
    );
}

#[test]
fn non_utf8_from_remote_stores() {
    // Paths must be UTF-8; text meant for people (log lines, error messages) is lossy.
    let mut b = words(&[1]);
    b.put_bytes(&[path("a").as_bytes(), b"\xff"].concat());
    not_utf8(wire::decode_with(&b, serve::decode_path_set), "store paths");

    let mut b = words(&[worker::STDERR_NEXT]);
    b.put_bytes(BAD);
    let (m, _) = wire::decode_with(&b, |r| worker::decode_stderr(r, &proto(1, 35))).unwrap();
    assert_eq!(
        m,
        StderrMessage::Next("caf\u{fffd}-\u{fffd}\u{fffd}".into())
    );

    let mut b = words(&[3]);
    b.put_bytes(BAD);
    let (res, _) = wire::decode_with(&b, |r| {
        serve::decode_build_derivation_reply(r, ProtocolVersion::new(2, 2), "/nix/store")
    })
    .unwrap();
    assert_eq!(res.error_msg, "caf\u{fffd}-\u{fffd}\u{fffd}");

    // Realisations: ids and JSON must be UTF-8 (JSON is UTF-8 by definition).
    let mut b = words(&[1]);
    b.put_bytes(BAD);
    not_utf8(
        wire::decode_with(&b, |r| query_realisation(r, 35)),
        "realisation",
    );
    let mut b = words(&[0]);
    b.put_str("");
    b.extend_from_slice(&words(&[1, 0, 0, 0, 1]));
    b.put_bytes(BAD);
    b.put_str("{}");
    not_utf8(
        wire::decode_with(&b, |r| {
            worker::decode_build_result(r, &proto(1, 35), "/nix/store")
        }),
        "realisation id",
    );

    // An `@nix` line that is not UTF-8 is not a log message.
    let mut line = b"@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"".to_vec();
    line.extend_from_slice(BAD);
    line.extend_from_slice(b"\"}");
    assert!(Message::decode_line(&line).is_err());
}

// ---------------------------------------------------------------------------------------------
// Store paths with a bad hash part

#[test]
fn bad_hash_parts_are_rejected_everywhere() {
    let bad_hashes = [
        "0123456789abcdfghijklmnpqrsvwxy",       // 31 characters
        "0123456789abcdfghijklmnpqrsvwxyz0",     // 33
        "e123456789abcdfghijklmnpqrsvwxyz",      // 'e' is not in nix32
        "0123456789abcdfghijklmnoqrsvwxyz",      // 'o'
        "0123456789abcdfghijklmnpqrsuwxyz",      // 'u'
        "0123456789abcdfghijklmnpqrstwxyz",      // 't'
        "0123456789ABCDFGHIJKLMNPQRSVWXYZ",      // upper case
        "0123456789abcdfghijklmnpqrsvwxy\u{e9}", // non-ASCII
        "",
    ];
    for h in bad_hashes {
        let p = format!("/nix/store/{h}-name");
        match StorePath::parse(&p) {
            Err(StorePathError::BadHash(s)) => assert_eq!(s, p),
            other => panic!("{p}: {other:?}"),
        }
        // Through every decoder that carries a store path: a clear Invalid naming the path.
        let mut b = Vec::new();
        b.put_str("try");
        b.put_u64(1);
        b.put_str("x86_64-linux");
        b.put_str(&p);
        b.put_strings(Vec::<String>::new());
        let mut paths = Vec::new();
        paths.put_strings([p.as_str()]);
        let mut accepted = paths.clone();
        accepted.put_strings(Vec::<String>::new());
        for (case, r) in [
            ("try", wire::decode_with(&b, HookRequest::decode).map(drop)),
            (
                "accepted",
                wire::decode_with(&accepted, AcceptedBuild::decode).map(drop),
            ),
            (
                "serve path set",
                wire::decode_with(&paths, serve::decode_path_set).map(drop),
            ),
            (
                "worker path set",
                wire::decode_with(&paths, worker::decode_path_set).map(drop),
            ),
        ] {
            match r {
                Err(DecodeError::Invalid(Invalid::Malformed(m))) => {
                    assert!(m.contains("bad hash part") && m.contains(&p), "{case}: {m}")
                }
                other => panic!("{case} with {p}: {other:?}"),
            }
        }
    }
    // A realisation's outPath is a base name: with a bad hash part it is Invalid, naming it,
    // in a build result's built outputs and in a QueryRealisation reply.
    for h in [
        "0123456789abcdfghijklmnpqrsvwxy",
        "e123456789abcdfghijklmnpqrsvwxyz",
    ] {
        let id = asked().to_string();
        let json = format!(r#"{{"id":"{id}","outPath":"{h}-name","signatures":[]}}"#);
        let mut reply = words(&[1]);
        reply.put_str(&json);
        let mut result = words(&[0]);
        result.put_str("");
        result.extend_from_slice(&words(&[1, 0, 0, 0, 1]));
        result.put_str(&id);
        result.put_str(&json);
        for (case, r) in [
            (
                "query realisation",
                wire::decode_with(&reply, |r| query_realisation(r, 35)).map(drop),
            ),
            (
                "built outputs",
                wire::decode_with(&result, |r| {
                    worker::decode_build_result(r, &proto(1, 35), "/nix/store")
                })
                .map(drop),
            ),
        ] {
            match r {
                Err(DecodeError::Invalid(Invalid::Malformed(m))) => assert!(
                    m.contains("bad hash part") && m.contains(&format!("{h}-name")),
                    "{case}: {m}"
                ),
                other => panic!("{case} with {h}: {other:?}"),
            }
        }
    }

    // The hash alone is not enough: a missing '-' or name is a bad path too.
    for p in [
        format!("/nix/store/{HASH}"),
        format!("/nix/store/{HASH}name"),
        format!("/nix/store/{HASH}-"),
    ] {
        assert!(StorePath::parse(&p).is_err(), "{p}");
    }
}

/// The rest of the decoders that carry a full store path, each given one with a bad hash part
/// where a path goes: path infos (serve and worker, the path itself, its deriver, a reference),
/// BasicDerivation's outputs and input sources, and the requests a daemon or `nix-store --serve`
/// decodes (the `server` side: path arguments, uploaded path infos, export trailers, derived
/// paths). Each is Invalid with a message that says "bad hash part" and names the path. (The
/// realisations' base names are checked in `bad_hash_parts_are_rejected_everywhere`.)
#[test]
fn bad_hash_parts_are_rejected_in_path_infos_derivations_and_requests() {
    const NAR_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
    let ok = path("ok");
    for h in [
        "0123456789abcdfghijklmnpqrsvwxy",
        "e123456789abcdfghijklmnpqrsvwxyz",
        "0123456789ABCDFGHIJKLMNPQRSVWXYZ",
    ] {
        let p = format!("/nix/store/{h}-name");
        let serve_info = |path: &str, deriver: &str, reference: &str| {
            let mut b = Vec::new();
            b.put_str(path);
            b.put_str(deriver);
            b.put_strings([reference]);
            b.extend_from_slice(&words(&[0, 0]));
            b.put_str(NAR_HASH);
            b.put_str("");
            b.put_strings(Vec::<String>::new());
            b.put_str("");
            b
        };
        // deriver, narHash, references, registrationTime, narSize, ultimate, sigs, ca
        let unkeyed = |deriver: &str, reference: &str| {
            let mut b = Vec::new();
            b.put_str(deriver);
            b.put_str(NAR_HASH);
            b.put_strings([reference]);
            b.extend_from_slice(&words(&[0, 0, 0]));
            b.put_strings(Vec::<String>::new());
            b.put_str("");
            b
        };
        let qpi =
            |deriver: &str, reference: &str| [words(&[1]), unkeyed(deriver, reference)].concat();
        let basic = |output: &str, input: &str| {
            let mut b = words(&[1]);
            b.put_str("out");
            b.put_str(output);
            b.put_str("");
            b.put_str("");
            b.put_strings([input]);
            b.put_str("aarch64-linux");
            b.put_str("/bin/sh");
            b.put_strings(Vec::<String>::new());
            b.put_u64(0);
            b
        };
        let op = |code: u64, rest: &[u8]| [words(&[code]), rest.to_vec()].concat();
        let one = |s: &str| {
            let mut b = Vec::new();
            b.put_str(s);
            b
        };
        let list = |s: &str| {
            let mut b = Vec::new();
            b.put_strings([s]);
            b
        };
        let upload = |path: &str| [one(path), unkeyed("", &ok)].concat();
        let export_end = {
            let mut b = words(&[serve::EXPORT_MAGIC]);
            b.put_str(&p);
            b.put_strings(Vec::<String>::new());
            b.put_str("");
            b.put_u64(0);
            b
        };
        let cases: Vec<(&str, Vec<u8>, Decoder)> = vec![
            (
                "serve path info: path",
                serve_info(&p, "", &ok),
                serve_path_infos,
            ),
            (
                "serve path info: deriver",
                serve_info(&ok, &p, &ok),
                serve_path_infos,
            ),
            (
                "serve path info: reference",
                serve_info(&ok, "", &p),
                serve_path_infos,
            ),
            (
                "query path info reply: deriver",
                qpi(&p, &ok),
                query_path_info,
            ),
            (
                "query path info reply: reference",
                qpi("", &p),
                query_path_info,
            ),
            (
                "BasicDerivation: output path",
                basic(&p, &ok),
                basic_derivation,
            ),
            (
                "BasicDerivation: input source",
                basic(&ok, &p),
                basic_derivation,
            ),
            ("worker IsValidPath", op(1, &one(&p)), worker_request),
            ("worker QueryPathInfo", op(26, &one(&p)), worker_request),
            ("worker QueryValidPaths", op(31, &list(&p)), worker_request),
            (
                "worker BuildDerivation: derivation path",
                op(36, &one(&p)),
                worker_request,
            ),
            (
                "worker BuildDerivation: output path",
                op(36, &[one(&format!("{ok}.drv")), basic(&p, &ok)].concat()),
                worker_request,
            ),
            ("worker NarFromPath", op(38, &one(&p)), worker_request),
            ("worker AddToStoreNar", op(39, &upload(&p)), worker_request),
            (
                "worker BuildPathsWithResults",
                op(46, &list(&format!("{p}!out"))),
                worker_request,
            ),
            (
                "serve QueryValidPaths",
                op(1, &[words(&[0, 0]), list(&p)].concat()),
                serve_request,
            ),
            ("serve QueryPathInfos", op(2, &list(&p)), serve_request),
            ("serve DumpStorePath", op(3, &one(&p)), serve_request),
            (
                "serve ExportPaths",
                op(5, &[words(&[0]), list(&p)].concat()),
                serve_request,
            ),
            ("serve BuildPaths", op(6, &list(&p)), serve_request),
            (
                "serve QueryClosure",
                op(7, &[words(&[0]), list(&p)].concat()),
                serve_request,
            ),
            (
                "serve BuildDerivation: derivation path",
                op(8, &one(&p)),
                serve_request,
            ),
            (
                "serve BuildDerivation: input source",
                op(8, &[one(&format!("{ok}.drv")), basic(&ok, &p)].concat()),
                serve_request,
            ),
            ("serve AddToStoreNar", op(9, &upload(&p)), serve_request),
            ("serve export trailer", export_end, export_item_end),
        ];
        for (case, bytes, decode) in cases {
            match wire::decode_with(&bytes, decode) {
                Err(DecodeError::Invalid(Invalid::Malformed(m))) => {
                    assert!(m.contains("bad hash part") && m.contains(&p), "{case}: {m}")
                }
                other => panic!("{case} with {p}: {other:?}"),
            }
        }
    }
}

/// A decoder under test, at the version the captures negotiated (serve 2.7, worker 1.35).
type Decoder = fn(&mut Reader<'_>) -> wire::Result<()>;

const SERVE_VERSION: ProtocolVersion = ProtocolVersion::new(2, 7);

fn serve_path_infos(r: &mut Reader<'_>) -> wire::Result<()> {
    serve::decode_path_infos(r, SERVE_VERSION).map(drop)
}

fn query_path_info(r: &mut Reader<'_>) -> wire::Result<()> {
    let asked = StorePath::parse(&path("asked")).expect("a valid path");
    worker::decode_query_path_info_reply(r, &proto(1, 35), &asked).map(drop)
}

fn basic_derivation(r: &mut Reader<'_>) -> wire::Result<()> {
    BasicDerivation::decode(r).map(drop)
}

fn worker_request(r: &mut Reader<'_>) -> wire::Result<()> {
    worker::server::decode_request(r, &proto(1, 35), "/nix/store").map(drop)
}

fn serve_request(r: &mut Reader<'_>) -> wire::Result<()> {
    serve::server::decode_request(r, SERVE_VERSION).map(drop)
}

fn export_item_end(r: &mut Reader<'_>) -> wire::Result<()> {
    serve::server::decode_export_item_end(r).map(drop)
}
