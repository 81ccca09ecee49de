//! Golden tests on content-addressed derivations built by real Nix 2.34
//! (`tests/capture/capture_ca.sh`; what was captured: `tests/data/ca/README.md`).
//!
//! - Nix's own hook's conversations with a remote over `ssh://` and `ssh-ng://`, both directions:
//!   every request Nix's client sent is decoded by our server-side decoders and re-encoded by our
//!   client encoders to the same bytes (so our BuildDerivation of a floating CA derivation, our
//!   QueryValidPaths with the `builders-use-substitutes` flag and our RegisterDrvOutput are what
//!   Nix sends), and every reply is decoded by our client decoders, fully, each proper prefix
//!   Incomplete, and re-encoded by our server encoders to the same bytes.
//! - The resolved derivation the daemon handed the hook prints to the ATerm whose store path is
//!   the one Nix gave it, and its realisation ids (`Derivation::floating_output_ids`) are the
//!   ones the remote reported.
//! - A 2.34 daemon's replies to RegisterDrvOutput and QueryRealisation at worker 1.35 and 1.30.
//!
//! Must never run Nix or read the machine's own `/nix`.

mod golden;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use golden::{Capture, data_dir, decode_all, read};
use hook_protocol::build_result::{BuildResult, BuildStatus};
use hook_protocol::derivation::{BasicDerivation, Derivation, OutputKind};
use hook_protocol::serve::{self, server::CommandRequest};
use hook_protocol::store_path::nix32_encode;
use hook_protocol::wire::{self, Reader};
use hook_protocol::worker::{self, Negotiated, StderrMessage, server::OpRequest};
use hook_protocol::{DrvOutput, ProtocolVersion, Realisation, Sha256, StorePath};
use serde_json::Value;

const STORE: &str = "/nix/store";

fn dir() -> PathBuf {
    data_dir("ca/nix-2.34.8")
}

fn manifest() -> Value {
    serde_json::from_slice(&read(&dir().join("manifest.json"))).expect("manifest.json")
}

/// The store path Nix gives a `.drv` (a text file with references): `makeTextPath`.
fn text_path(name: &str, contents: &[u8], references: &BTreeSet<String>) -> String {
    let mut fp = String::from("text:");
    for r in references {
        fp.push_str(r);
        fp.push(':');
    }
    fp.push_str(&format!(
        "sha256:{}:{STORE}:{name}",
        Sha256::digest(contents).to_base16()
    ));
    let digest = Sha256::digest(fp.as_bytes()).0;
    let mut compressed = [0u8; 20];
    for (i, b) in digest.iter().enumerate() {
        compressed[i % 20] ^= b;
    }
    format!("{STORE}/{}-{name}", nix32_encode(&compressed))
}

/// The local daemon's realisations (manifest), by id.
fn local_realisations() -> BTreeMap<String, Realisation> {
    manifest()["local_realisations"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| {
            let r = Realisation::from_json(&v.to_string(), STORE).expect("a realisation");
            (r.id.to_string(), r)
        })
        .collect()
}

/// One direction of a captured conversation, decoded message by message: each message must
/// decode, and every proper prefix of it be Incomplete.
struct Stream {
    name: String,
    bytes: Vec<u8>,
    pos: usize,
}

impl Stream {
    fn open(file: &str) -> Self {
        Stream {
            name: file.to_owned(),
            bytes: read(&dir().join(file)),
            pos: 0,
        }
    }

    fn decode<T: std::fmt::Debug>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut Reader<'_>) -> wire::Result<T>,
    ) -> T {
        let rest = &self.bytes[self.pos..];
        let (v, used) = wire::decode_with(rest, &mut f)
            .unwrap_or_else(|e| panic!("{} at {}: {what}: {e}", self.name, self.pos));
        for cut in 0..used {
            match f(&mut Reader::new(&rest[..cut])) {
                Err(e) if e.is_incomplete() => {}
                other => panic!("{}: {what}: prefix {cut}/{used}: {other:?}", self.name),
            }
        }
        self.pos += used;
        v
    }

    fn skip(&mut self, n: usize) {
        assert!(
            self.pos + n <= self.bytes.len(),
            "{}: short by {n}",
            self.name
        );
        self.pos += n;
    }

    /// The bytes decoded since `start`.
    fn since(&self, start: usize) -> &[u8] {
        &self.bytes[start..self.pos]
    }

    fn is_empty(&self) -> bool {
        self.pos == self.bytes.len()
    }
}

/// Our encoding of a value decoded from `captured` must be `captured`.
#[track_caller]
fn same_bytes(what: &str, captured: &[u8], encode: impl FnOnce(&mut Vec<u8>)) {
    let mut w = Vec::new();
    encode(&mut w);
    assert!(
        w == captured,
        "{what}: our encoding differs from the captured bytes\n ours: {:?}\n Nix's: {:?}",
        String::from_utf8_lossy(&w),
        String::from_utf8_lossy(captured)
    );
}

/// One BuildDerivation as captured.
struct Built {
    drv_path: StorePath,
    drv: BasicDerivation,
    result: BuildResult,
}

/// What a conversation showed.
#[derive(Default)]
struct Seen {
    builds: Vec<Built>,
    /// `substitute` of every QueryValidPaths.
    substitute_flags: Vec<bool>,
    /// What RegisterDrvOutput requests carried.
    registered: Vec<Realisation>,
    /// Paths whose NAR the client fetched.
    fetched: BTreeSet<StorePath>,
}

/// Walks a captured `ssh://` conversation: Nix's hook and `nix-store --serve --write`.
fn walk_serve(session: &str) -> Seen {
    let mut c = Stream::open(&format!("{session}.client.bin"));
    let mut s = Stream::open(&format!("{session}.server.bin"));
    let mut seen = Seen::default();

    let client_version = c.decode("client hello", serve::server::decode_hello);
    assert_eq!(
        client_version,
        serve::CLIENT_VERSION,
        "Nix announces what we announce"
    );
    same_bytes("client hello", c.since(0), |w| {
        serve::encode_hello(w, client_version)
    });
    let v = s
        .decode("server hello", |r| serve::decode_hello(r, client_version))
        .negotiated;
    let mut nar_sizes = BTreeMap::new();
    while !c.is_empty() {
        let start = c.pos;
        let req = c.decode("a request", |r| serve::server::decode_request(r, v));
        let sent = c.since(start).to_vec();
        let reply_start = s.pos;
        match req {
            CommandRequest::QueryValidPaths {
                lock,
                substitute,
                paths,
            } => {
                same_bytes("QueryValidPaths", &sent, |w| {
                    serve::encode_query_valid_paths(w, lock, substitute, &paths)
                });
                seen.substitute_flags.push(substitute);
                s.decode("QueryValidPaths reply", serve::decode_path_set);
            }
            CommandRequest::QueryPathInfos(paths) => {
                same_bytes("QueryPathInfos", &sent, |w| {
                    serve::encode_query_path_infos(w, &paths)
                });
                for i in s.decode("QueryPathInfos reply", |r| serve::decode_path_infos(r, v)) {
                    nar_sizes.insert(i.path.clone(), i.nar_size);
                }
            }
            CommandRequest::DumpStorePath(path) => {
                same_bytes("DumpStorePath", &sent, |w| {
                    serve::encode_dump_store_path(w, &path)
                });
                s.skip(nar_sizes[&path] as usize);
                seen.fetched.insert(path);
            }
            CommandRequest::AddToStoreNar(info) => {
                same_bytes("AddToStoreNar", &sent, |w| {
                    serve::encode_add_to_store_nar(w, &info)
                });
                c.skip(info.nar_size as usize);
                s.decode("AddToStoreNar reply", serve::decode_ok);
            }
            CommandRequest::BuildDerivation {
                drv_path,
                drv,
                options,
            } => {
                same_bytes("BuildDerivation", &sent, |w| {
                    serve::encode_build_derivation(w, v, &drv_path, &drv, &options)
                });
                let result = s.decode("BuildDerivation reply", |r| {
                    serve::decode_build_derivation_reply(r, v, STORE)
                });
                same_bytes("BuildDerivation reply", s.since(reply_start), |w| {
                    serve::server::encode_build_derivation_reply(w, v, &result)
                });
                seen.builds.push(Built {
                    drv_path,
                    drv,
                    result,
                });
            }
            other => panic!("{session}: a request Nix's hook does not send: {other:?}"),
        }
    }
    assert!(s.is_empty(), "{session}: server bytes left over");
    seen
}

/// The stderr loop up to `STDERR_LAST`; a daemon error fails the test.
fn stderr_until_last(s: &mut Stream, proto: &Negotiated, what: &str) {
    loop {
        match s.decode(what, |r| worker::decode_stderr(r, proto)) {
            StderrMessage::Last => return,
            StderrMessage::Error(e) => panic!("{}: {what}: the daemon failed: {e}", s.name),
            StderrMessage::Read { .. } => panic!("{}: {what}: READ in a capture", s.name),
            _ => {}
        }
    }
}

/// Walks a captured `ssh-ng://` conversation: a Nix client and `nix-daemon --stdio`.
fn walk_worker(session: &str) -> Seen {
    let mut c = Stream::open(&format!("{session}.client.bin"));
    let mut s = Stream::open(&format!("{session}.server.bin"));
    let mut seen = Seen::default();

    let client_version = c.decode("client hello", worker::server::decode_client_hello);
    let hello = s.decode("server hello", |r| {
        worker::decode_server_hello(r, client_version)
    });
    let features = c.decode("client features", |r| {
        worker::server::decode_after_hello(r, hello.negotiated)
    });
    same_bytes("client handshake", c.since(0), |w| {
        worker::encode_hello(w, client_version);
        worker::encode_after_hello(w, hello.negotiated, &features);
    });
    let (proto, info) = s.decode("server info", |r| {
        worker::decode_server_info(r, hello.negotiated, &features)
    });
    assert_eq!(info.nix_version.as_deref(), Some("2.34.8"));
    assert_eq!(worker::check_realisations(&proto, &info), Ok(()));
    stderr_until_last(&mut s, &proto, "handshake");

    let mut nar_sizes = BTreeMap::new();
    while !c.is_empty() {
        let start = c.pos;
        let req = c.decode("a request", |r| {
            worker::server::decode_request(r, &proto, STORE)
        });
        let sent = c.since(start).to_vec();
        match req {
            OpRequest::QueryValidPaths { paths, substitute } => {
                same_bytes("QueryValidPaths", &sent, |w| {
                    worker::encode_query_valid_paths(w, &proto, &paths, substitute)
                });
                seen.substitute_flags.push(substitute);
                stderr_until_last(&mut s, &proto, "QueryValidPaths");
                s.decode("QueryValidPaths reply", worker::decode_path_set);
            }
            OpRequest::AddMultipleToStore {
                repair,
                dont_check_sigs,
            } => {
                same_bytes("AddMultipleToStore", &sent, |w| {
                    worker::encode_add_multiple_to_store(w, &proto, repair, dont_check_sigs)
                        .expect("≥ 1.32")
                });
                let mut frames = worker::FrameDecoder::new();
                while !frames.is_done() {
                    let (n, _) = frames.decode(&c.bytes[c.pos..]);
                    assert!(n > 0, "{session}: the framed stream ends early");
                    c.skip(n);
                }
                stderr_until_last(&mut s, &proto, "AddMultipleToStore");
            }
            OpRequest::BuildDerivation {
                drv_path,
                drv,
                mode,
            } => {
                same_bytes("BuildDerivation", &sent, |w| {
                    worker::encode_build_derivation(w, &drv_path, &drv, mode)
                });
                stderr_until_last(&mut s, &proto, "BuildDerivation");
                let reply_start = s.pos;
                let result = s.decode("BuildDerivation reply", |r| {
                    worker::decode_build_result(r, &proto, STORE)
                });
                same_bytes("BuildDerivation reply", s.since(reply_start), |w| {
                    worker::server::encode_build_result(w, &proto, &result)
                });
                seen.builds.push(Built {
                    drv_path,
                    drv,
                    result,
                });
            }
            OpRequest::QueryPathInfo(path) => {
                same_bytes("QueryPathInfo", &sent, |w| {
                    worker::encode_query_path_info(w, &path)
                });
                stderr_until_last(&mut s, &proto, "QueryPathInfo");
                let info = s
                    .decode("QueryPathInfo reply", |r| {
                        worker::decode_query_path_info_reply(r, &proto, &path)
                    })
                    .expect("a valid path");
                nar_sizes.insert(path, info.nar_size);
            }
            OpRequest::NarFromPath(path) => {
                same_bytes("NarFromPath", &sent, |w| {
                    worker::encode_nar_from_path(w, &path)
                });
                stderr_until_last(&mut s, &proto, "NarFromPath");
                s.skip(nar_sizes[&path] as usize);
                seen.fetched.insert(path);
            }
            OpRequest::RegisterDrvOutput(realisation) => {
                same_bytes("RegisterDrvOutput", &sent, |w| {
                    worker::encode_register_drv_output(w, &proto, &realisation).expect("≥ 1.27")
                });
                stderr_until_last(&mut s, &proto, "RegisterDrvOutput");
                seen.registered.push(realisation);
            }
            other => panic!("{session}: a request this test does not expect: {other:?}"),
        }
    }
    assert!(s.is_empty(), "{session}: server bytes left over");
    seen
}

/// The `.drv` the manifest recorded at `path`, parsed; its bytes print back exactly.
fn manifest_drv(path: &str) -> Option<Derivation> {
    let aterm = manifest()["derivations"][path].as_str()?.to_owned();
    let d = Derivation::parse(aterm.as_bytes()).expect("a .drv Nix wrote");
    assert_eq!(d.to_aterm(), aterm.as_bytes(), "{path} prints back exactly");
    Some(d)
}

/// The checks both schemes share: caA (floating, no inputs) in session `first`, then caB, which
/// depends on caA, handed to the hook resolved, in session `second`.
fn check_ca_builds(scheme: &str, first: Seen, second: Seen) {
    let local = local_realisations();
    assert_eq!(first.builds.len(), 1, "{scheme}: caA");
    assert_eq!(second.builds.len(), 1, "{scheme}: caB");
    assert!(
        first
            .substitute_flags
            .iter()
            .chain(&second.substitute_flags)
            .all(|f| !f),
        "{scheme}: no builders-use-substitutes, no substitute flag"
    );
    let mut realised_a = None;
    for (seen, name) in [(&first, "caA"), (&second, "caB")] {
        let b = &seen.builds[0];
        let what = format!("{scheme} {name}");
        // The BasicDerivation Nix sent: every output floating, written (name, "", "r:sha256", "").
        for (out, o) in &b.drv.outputs {
            assert_eq!(o.kind(), OutputKind::Floating, "{what} {out}");
            assert_eq!(
                (o.path.as_str(), o.hash_algo.as_str(), o.hash.as_str()),
                ("", "r:sha256", "")
            );
        }
        // A derivation without input derivations: it is its own .drv, whose path Nix derived
        // from exactly the ATerm we print.
        let drv = Derivation {
            basic: b.drv.clone(),
            input_drvs: BTreeMap::new(),
        };
        let drv_name = b.drv_path.name();
        let aterm = drv.to_aterm();
        assert_eq!(
            text_path(drv_name, &aterm, &b.drv.input_srcs),
            b.drv_path.as_str(),
            "{what}: the ATerm of the derivation sent is the one in the store"
        );
        // That `.drv`, as our hook reads it, parses back, and gives the BasicDerivation Nix's
        // hook sent (no input derivations: `inputSrcs` stay as they are).
        let parsed = Derivation::parse(&aterm).expect("the .drv parses");
        assert_eq!(parsed, drv, "{what}");
        assert_eq!(parsed.output_paths().unwrap().values().flatten().count(), 0);
        assert_eq!(
            parsed.basic_for_remote(["/nix/store/00000000000000000000000000000000-unrelated"]),
            b.drv,
            "{what}"
        );
        // The remote reports each output's realisation under the id we compute for it.
        let res = &b.result;
        assert_eq!(res.status, BuildStatus::Built, "{what}");
        let ids = drv.floating_output_ids().expect("a resolved CA derivation");
        assert_eq!(
            res.built_outputs.keys().collect::<Vec<_>>(),
            b.drv.outputs.keys().collect::<Vec<_>>(),
            "{what}: every output is reported"
        );
        for (out, built) in &res.built_outputs {
            assert_eq!(built.id.as_ref(), Some(&ids[out]), "{what} {out}");
            let r = built.realisation().expect("with its id");
            assert_eq!(
                (&r.out_path, r.signatures.len()),
                (&built.path, 0),
                "{what} {out}"
            );
            assert!(r.dependent_realisations.is_empty(), "Nix 2.34 records none");
        }
        // What to register locally: the same realisations, by output.
        let to_register = res
            .realisations_of(&drv)
            .expect("the result fits the derivation");
        let reported: BTreeMap<String, Realisation> = res
            .realisations()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(to_register, reported, "{what}");
        // Nix's hook then fetched exactly the built outputs.
        let paths: BTreeSet<StorePath> =
            res.built_outputs.values().map(|o| o.path.clone()).collect();
        assert_eq!(seen.fetched, paths, "{what}");
        if name == "caA" {
            // No inputs: the .drv the daemon has is this one, and the local daemon recorded the
            // remote's realisation under the same id.
            let original =
                manifest_drv(b.drv_path.as_str()).expect("caA's .drv is in the manifest");
            assert_eq!(original.basic, b.drv, "{what}: sent unchanged");
            let id = ids["out"].to_string();
            assert_eq!(local[&id].out_path, res.built_outputs["out"].path, "{what}");
            realised_a = Some(res.built_outputs["out"].path.clone());
        } else {
            // Resolved: caA's realised path replaces the input derivation, in inputSrcs and in
            // the environment, and the .drv is a new one.
            let realised_a = realised_a.clone().expect("caA first");
            assert!(
                manifest_drv(b.drv_path.as_str()).is_none(),
                "{what}: a new .drv"
            );
            assert_eq!(
                b.drv.input_srcs,
                BTreeSet::from([realised_a.to_string()]),
                "{what}"
            );
            assert_eq!(b.drv.env[b"caA".as_slice()], realised_a.as_str().as_bytes());
            let original = manifest()["derivations"]
                .as_object()
                .expect("a map")
                .keys()
                .find(|p| p.ends_with(&format!("capture-caB-{scheme}.drv")))
                .and_then(|p| manifest_drv(p))
                .expect("caB's original .drv");
            assert_eq!(original.input_drvs.len(), 1, "the original depends on caA");
            assert!(original.basic.input_srcs.is_empty());
            assert_eq!(
                original.floating_output_ids(),
                None,
                "needs caA's hash first"
            );
            assert_ne!(
                original.basic.env[b"caA".as_slice()],
                b.drv.env[b"caA".as_slice()]
            );
            let mut unresolved = b.drv.clone();
            unresolved.input_srcs.clear();
            unresolved.env.insert(
                b"caA".to_vec(),
                original.basic.env[b"caA".as_slice()].clone(),
            );
            assert_eq!(unresolved, original.basic, "{what}: only the input changed");
        }
    }
}

#[test]
fn floating_ca_builds_over_ssh() {
    check_ca_builds("ssh", walk_serve("ssh"), walk_serve("ssh-1"));
}

#[test]
fn floating_ca_builds_over_ssh_ng() {
    check_ca_builds("ssh-ng", walk_worker("ssh-ng"), walk_worker("ssh-ng-1"));
}

/// With `builders-use-substitutes`, the QueryValidPaths before the upload asks the remote to
/// substitute: serve `1, lock 0, substitute 1, paths`; worker `31, paths, substitute 1`.
#[test]
fn builders_use_substitutes_sets_the_substitute_flag() {
    for seen in [walk_serve("subst-ssh"), walk_worker("subst-ssh-ng")] {
        assert_eq!(seen.substitute_flags, [true]);
        assert_eq!(seen.builds.len(), 1);
        assert!(seen.builds[0].result.is_success());
    }
    // The serve request as bytes, exactly.
    let c = read(&dir().join("subst-ssh.client.bin"));
    let mut r = Reader::new(&c[16..]);
    let words: Vec<u64> = (0..3).map(|_| r.u64().expect("a word")).collect();
    assert_eq!(words, [1, 0, 1], "cmd 1, lock 0, substitute 1");
}

/// `nix copy --to ssh-ng://` of caB's outputs: Nix registers their realisations with
/// RegisterDrvOutput, exactly as our encoder writes them, under the ids the local daemon has.
#[test]
fn register_drv_output_is_what_nix_sends() {
    let seen = walk_worker("copy-to-empty");
    let local = local_realisations();
    assert_eq!(seen.registered.len(), 2);
    for r in &seen.registered {
        assert_eq!(local.get(&r.id.to_string()), Some(r), "{}", r.id);
    }
    assert_eq!(
        seen.registered
            .iter()
            .map(|r| r.id.output_name())
            .collect::<Vec<_>>(),
        ["dev", "out"]
    );
}

/// A Nix 2.34 daemon's replies to RegisterDrvOutput and QueryRealisation, one capture per
/// client version (1.35: realisations as JSON; 1.30: as paths).
#[test]
fn realisation_replies_from_a_real_daemon() {
    for minor in [35u8, 30] {
        let cap = Capture::load(&dir().join(format!("realisations-1.{minor}")));
        let client = ProtocolVersion::new(1, minor);
        let hs = cap.step("handshake");
        let mut r = Reader::new(&hs);
        let hello = worker::decode_server_hello(&mut r, client).expect("hello");
        assert_eq!(hello.negotiated, client);
        let (proto, info) =
            worker::decode_server_info(&mut r, client, &BTreeSet::new()).expect("info");
        assert_eq!(
            worker::decode_response(&mut r, &proto, |_| Ok(()))
                .expect("LAST")
                .outcome,
            Ok(())
        );
        assert!(r.is_empty());
        assert_eq!(worker::check_realisations(&proto, &info), Ok(()));
        let real = |key: &str| {
            let id = DrvOutput::parse(cap.m[key]["id"].as_str().expect("id")).expect("an id");
            let base = cap.m[key]["out_path"].as_str().expect("a path");
            (
                id,
                StorePath::parse(&format!("{STORE}/{base}")).expect("a path"),
            )
        };
        let (have, have_path) = real("have");
        let (lack, lack_path) = real("lack");
        let query = |step: &str, asked: &DrvOutput| {
            let bytes = cap.step(step);
            let res = decode_all(step, &bytes, |r| {
                worker::decode_response(r, &proto, |r| {
                    worker::decode_query_realisation_reply(r, &proto, asked, STORE)
                })
            });
            let found = res.outcome.expect("no daemon error");
            // Our daemon-side encoder writes the same reply.
            let mut w = Vec::new();
            worker::server::encode_stderr(&mut w, &proto, &StderrMessage::Last);
            worker::server::encode_query_realisation_reply(&mut w, &proto, found.as_ref());
            assert_eq!(w, bytes, "{step}: our encoding");
            found
        };
        let got = query("query-realisation-have", &have).expect("found");
        assert_eq!((got.id, got.out_path), (have.clone(), have_path));
        assert_eq!(query("query-realisation-lack", &lack), None);
        let none = |step: &str| {
            decode_all(step, &cap.step(step), |r| {
                worker::decode_response(r, &proto, |_| Ok(()))
            })
            .outcome
        };
        assert_eq!(none("register-drv-output-lack"), Ok(()));
        let got = query("query-realisation-registered", &lack).expect("registered");
        assert_eq!(got.out_path, lack_path);
        // A path the store does not have: a daemon error, and the connection goes on.
        let e = none("register-drv-output-unknown-path").expect_err("refused");
        assert!(
            e.message.contains("NOT NULL constraint failed"),
            "{}",
            e.message
        );
        let valid = decode_all("is-valid-path", &cap.step("is-valid-path"), |r| {
            worker::decode_response(r, &proto, worker::decode_bool)
        });
        assert_eq!(valid.outcome, Ok(true));
        if minor >= 31 {
            // Malformed JSON: the daemon reports the parse error and hangs up.
            let e = none("register-drv-output-bad-json").expect_err("refused");
            assert!(e.message.contains("parse error"), "{}", e.message);
            assert!(cap.step("is-valid-path-after-bad-json").is_empty());
            assert_eq!(cap.m["closed_after"], "is-valid-path-after-bad-json");
        }
    }
}
