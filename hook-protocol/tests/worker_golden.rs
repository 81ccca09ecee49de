//! Golden tests: the worker-protocol decoders read, fully and correctly, the reply bytes recorded
//! from real `nix-daemon --stdio` servers (Nix 2.8 from bookworm, 2.34 from sid, the latter with
//! our default client version 1.35 and with a 1.38 client that does the feature exchange) by
//! `tests/capture/capture.py`; see `tests/data/worker/<dir>/manifest.json` for what was sent.
//! Every proper prefix of every reply must decode as Incomplete.

mod golden;

use std::collections::BTreeSet;
use std::ops::Deref;

use golden::{Capture, decode_all, outs, string_set, version};
use hook_protocol::build_result::BuildStatus;
use hook_protocol::path_info::{DerivedPath, OutputsSpec};
use hook_protocol::wire::{self, Reader};
use hook_protocol::worker::{
    self, Negotiated, Response, StderrMessage, Trust, TypedResult, activity,
};
use hook_protocol::{ProtocolVersion, StorePath};

/// A capture and the protocol its handshake negotiated.
struct Session {
    capture: Capture,
    proto: Negotiated,
}

impl Deref for Session {
    type Target = Capture;

    fn deref(&self) -> &Capture {
        &self.capture
    }
}

impl Session {
    /// Decodes a whole response (stderr messages, then the reply) fully, prefixes included.
    fn response<T: std::fmt::Debug>(
        &self,
        name: &str,
        mut reply: impl FnMut(&mut Reader<'_>) -> wire::Result<T>,
    ) -> Response<T> {
        let proto = self.proto.clone();
        decode_all(name, &self.step(name), |r| {
            worker::decode_response(r, &proto, &mut reply)
        })
    }

    fn ok<T: std::fmt::Debug>(
        &self,
        name: &str,
        reply: impl FnMut(&mut Reader<'_>) -> wire::Result<T>,
    ) -> (Vec<StderrMessage>, T) {
        let resp = self.response(name, reply);
        match resp.outcome {
            Ok(v) => (resp.messages, v),
            Err(e) => panic!("{name}: the daemon reported {e:?}"),
        }
    }
}

/// The build log lines carried by `STDERR_RESULT` messages of type 101.
fn log_lines(messages: &[StderrMessage]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| match m {
            StderrMessage::Result(r) => match r.typed() {
                Some(TypedResult::BuildLogLine(l)) => Some(l.to_owned()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Checks the activity bookkeeping of a build's stderr stream: a `build` activity for `drv`
/// started, and every started activity was stopped.
fn check_build_activity(name: &str, messages: &[StderrMessage], drv: &StorePath) {
    let mut open = BTreeSet::new();
    let mut saw_build = false;
    for m in messages {
        match m {
            StderrMessage::StartActivity(a) => {
                assert!(open.insert(a.id), "{name}: activity {} started twice", a.id);
                if a.activity_type == activity::BUILD {
                    assert!(a.text.contains(drv.as_str()), "{name}: {a:?}");
                    saw_build = true;
                }
            }
            StderrMessage::StopActivity { id } => {
                assert!(open.remove(id), "{name}: stop of unknown activity {id}");
            }
            StderrMessage::Result(r) => {
                assert!(
                    open.contains(&r.id),
                    "{name}: result for unknown activity {}",
                    r.id
                );
            }
            _ => {}
        }
    }
    assert!(saw_build, "{name}: no build activity in {messages:?}");
    assert!(open.is_empty(), "{name}: activities left open: {open:?}");
}

fn check_session(capture: Capture) {
    let m = &capture.m;
    let client = version(m["client_version"].as_str().unwrap());
    let client_features = string_set(&m["client_features"]);
    let hs = &m["steps"][0];
    assert_eq!(hs["name"], "handshake");

    // Handshake: greeting, then (after our part) the server info, then stderr up to LAST.
    let (proto, info) = decode_all("handshake", &capture.step("handshake"), |r| {
        let hello = worker::decode_server_hello(r, client)?;
        assert_eq!(
            hello.server,
            version(hs["server_version"].as_str().unwrap())
        );
        let (proto, info) = worker::decode_server_info(r, hello.negotiated, &client_features)?;
        let rest = worker::decode_response(r, &proto, |_| Ok(()))?;
        assert!(rest.outcome.is_ok());
        Ok((proto, info))
    });
    assert_eq!(proto.version, version(m["negotiated"].as_str().unwrap()));
    assert_eq!(proto.features, string_set(&m["features"]));
    assert_eq!(info.nix_version.as_deref(), m["nix_version"].as_str());
    let want_trust = match hs["trust"].as_u64() {
        None | Some(0) => None,
        Some(1) => Some(Trust::Trusted),
        Some(_) => Some(Trust::NotTrusted),
    };
    assert_eq!(info.trust, want_trust);
    if proto.version >= ProtocolVersion::new(1, 35) {
        assert_eq!(
            info.trust,
            Some(Trust::Trusted),
            "root over --stdio is trusted"
        );
    }

    let s = Session { capture, proto };
    let p = s.proto.clone();

    assert!(!s.ok("is-valid-path-missing", worker::decode_bool).1);
    assert!(s.ok("is-valid-path-A", worker::decode_bool).1);
    assert!(
        s.ok("query-valid-before", worker::decode_path_set)
            .1
            .is_empty()
    );
    s.ok("add-to-store-nar-B", |_| Ok(()));
    s.ok("add-multiple-to-store-C-A", |_| Ok(()));
    assert_eq!(
        s.ok("query-valid-after", worker::decode_path_set).1,
        s.paths(&["A", "B", "C"])
    );

    for key in ["A", "B"] {
        let path = s.path(key);
        let name = format!("query-path-info-{key}");
        let info = s
            .ok(&name, |r| {
                worker::decode_query_path_info_reply(r, &p, &path)
            })
            .1
            .unwrap_or_else(|| panic!("{name}: not valid"));
        let sent = &s.m["paths"][key];
        assert_eq!(info.path, path);
        s.assert_path_info(key, &info);
        assert_eq!(
            info.registration_time,
            sent["registration_time"].as_u64().unwrap()
        );
        // AddToStoreNar (B) keeps `ultimate` for a trusted client; AddMultipleToStore (A)
        // always clears it.
        let ultimate = key == "B" && sent["ultimate"].as_bool().unwrap();
        assert_eq!(info.ultimate, ultimate, "{key}");
    }
    let missing = s.path("missing");
    assert_eq!(
        s.ok("query-path-info-missing", |r| {
            worker::decode_query_path_info_reply(r, &p, &missing)
        })
        .1,
        None
    );

    // NarFromPath: LAST, then the NAR unframed, byte-identical to the one we uploaded.
    let nar_size = s.m["paths"]["A"]["nar_size"].as_u64().unwrap() as usize;
    let nar = s
        .ok("nar-from-path-A", |r| r.raw(nar_size).map(<[u8]>::to_vec))
        .1;
    s.assert_nar("A", &nar);

    // BuildDerivation, success: log lines arrive as results of the build activity.
    let (msgs, ok) = s.ok("build-derivation-bdOk", |r| {
        worker::decode_build_result(r, &p, "/nix/store")
    });
    check_build_activity("build-derivation-bdOk", &msgs, &s.drv("bdOk"));
    let lines = log_lines(&msgs);
    assert!(
        lines.contains(&"building capture-bd-ok".to_owned()),
        "{lines:?}"
    );
    assert!(lines.contains(&"to-stderr".to_owned()), "{lines:?}");
    assert_eq!(ok.status, BuildStatus::Built);
    assert_eq!(outs(&ok), s.outputs("bdOk"));
    s.assert_build_times(&ok);
    if p.version >= ProtocolVersion::new(1, 37) {
        // The two CPU-time options are on the wire (as "none" here: no cgroups): reading the
        // same bytes with the 1.35 layout must not account for the whole reply.
        let old = Negotiated::new(ProtocolVersion::new(1, 35));
        let bytes = s.step("build-derivation-bdOk");
        let full = wire::decode_with(&bytes, |r| {
            worker::decode_response(r, &old, |r| {
                worker::decode_build_result(r, &old, "/nix/store")
            })
        });
        assert!(!matches!(full, Ok((_, n)) if n == bytes.len()), "{full:?}");
    }
    if p.version < ProtocolVersion::new(1, 37) {
        assert_eq!((ok.cpu_user, ok.cpu_system), (None, None));
    }

    let (msgs, fail) = s.ok("build-derivation-bdFail", |r| {
        worker::decode_build_result(r, &p, "/nix/store")
    });
    check_build_activity("build-derivation-bdFail", &msgs, &s.drv("bdFail"));
    assert!(log_lines(&msgs).contains(&"about to fail".to_owned()));
    assert_eq!(fail.status, BuildStatus::PermanentFailure);
    assert!(
        fail.error_msg.contains("exit code 3"),
        "{:?}",
        fail.error_msg
    );
    assert!(fail.built_outputs.is_empty());

    // BuildPathsWithResults: one keyed result per requested path, in request order.
    let (msgs, results) = s.ok("build-paths-with-results-bpOk", |r| {
        worker::decode_build_paths_with_results_reply(r, &p, "/nix/store")
    });
    check_build_activity("build-paths-with-results-bpOk", &msgs, &s.drv("bpOk"));
    assert_eq!(results.len(), 2, "{results:?}");
    let (built_key, built) = results
        .iter()
        .find(|(k, _)| matches!(k, DerivedPath::Built { .. }))
        .unwrap();
    assert_eq!(built_key, &DerivedPath::all_outputs(s.drv("bpOk")));
    assert_eq!(built.status, BuildStatus::Built);
    assert_eq!(outs(built), s.outputs("bpOk"));
    let (opaque_key, opaque) = results
        .iter()
        .find(|(k, _)| matches!(k, DerivedPath::Opaque(_)))
        .unwrap();
    assert_eq!(opaque_key, &DerivedPath::Opaque(s.path("A")));
    assert!(opaque.is_success(), "{opaque:?}");
    assert!(opaque.built_outputs.is_empty());

    let (_, results) = s.ok("build-paths-with-results-bpFail", |r| {
        worker::decode_build_paths_with_results_reply(r, &p, "/nix/store")
    });
    assert_eq!(results.len(), 1);
    assert_eq!(
        results[0].0,
        DerivedPath::Built {
            drv_path: s.drv("bpFail"),
            outputs: OutputsSpec::Names(["out".to_owned()].into()),
        }
    );
    assert_eq!(results[0].1.status, BuildStatus::PermanentFailure);
    assert!(results[0].1.error_msg.contains("exit code 4"));

    // An upload with a wrong NAR hash: STDERR_ERROR (≥ 1.26 layout), no reply, and the
    // connection stays usable (the next step, is-valid-path-A, was answered).
    let resp = s.response("add-to-store-nar-bad-hash", |_| Ok(()));
    let err = resp.outcome.unwrap_err();
    assert!(err.message.contains("hash mismatch"), "{err:?}");
    assert_eq!(err.level, Some(0));
    assert_eq!(err.exit_status, None);
}

#[test]
fn real_worker_sessions_decode() {
    for capture in Capture::all("worker") {
        check_session(capture);
    }
}
