//! Golden tests: the serve-protocol decoders read, fully and correctly, the reply bytes recorded
//! from real `nix-store --serve --write` servers (Nix 2.8 from bookworm, 2.34 from sid) by
//! `tests/capture/capture.py`; see `tests/data/serve/<nix-version>/manifest.json` for what was
//! sent. Every proper prefix of every reply must decode as Incomplete.

mod golden;

use golden::{Capture, decode_all, outs, version};
use hook_protocol::build_result::BuildStatus;
use hook_protocol::serve;

fn check_session(s: &Capture) {
    let client = version(s.m["client_version"].as_str().unwrap());
    assert_eq!(client, serve::CLIENT_VERSION);

    let hello = decode_all("hello", &s.step("hello"), |r| {
        serve::decode_hello(r, client)
    });
    assert_eq!(
        hello.server,
        version(s.m["steps"][0]["server_version"].as_str().unwrap())
    );
    let v = hello.negotiated;
    assert_eq!(v, version(s.m["negotiated"].as_str().unwrap()));

    let before = decode_all("query-valid-before", &s.step("query-valid-before"), |r| {
        serve::decode_path_set(r)
    });
    assert!(before.is_empty());
    for step in ["add-to-store-nar-B", "add-to-store-nar-A", "import-paths-C"] {
        decode_all(step, &s.step(step), serve::decode_ok);
    }
    let after = decode_all("query-valid-after", &s.step("query-valid-after"), |r| {
        serve::decode_path_set(r)
    });
    assert_eq!(after, s.paths(&["A", "B", "C"]));

    let infos = decode_all("query-path-infos", &s.step("query-path-infos"), |r| {
        serve::decode_path_infos(r, v)
    });
    assert_eq!(infos.len(), 3, "the missing path is omitted");
    for key in ["A", "B", "C"] {
        let info = infos
            .iter()
            .find(|i| i.path == s.path(key))
            .unwrap_or_else(|| panic!("no info for {key}"));
        // ImportPaths carries no signatures; AddToStoreNar keeps them.
        s.assert_path_info(key, info);
    }

    // DumpStorePath: the reply is the NAR itself, byte-identical to the one we uploaded.
    s.assert_nar("A", &s.step("dump-store-path-A"));

    let closure = decode_all("query-closure-A", &s.step("query-closure-A"), |r| {
        serve::decode_path_set(r)
    });
    assert_eq!(closure, s.paths(&["A", "B"]));

    let ok = decode_all(
        "build-derivation-bdOk",
        &s.step("build-derivation-bdOk"),
        |r| serve::decode_build_derivation_reply(r, v, "/nix/store"),
    );
    assert_eq!(ok.status, BuildStatus::Built);
    assert!(ok.is_success() && ok.error_msg.is_empty());
    s.assert_build_times(&ok);
    assert_eq!(outs(&ok), s.outputs("bdOk"));

    let fail = decode_all(
        "build-derivation-bdFail",
        &s.step("build-derivation-bdFail"),
        |r| serve::decode_build_derivation_reply(r, v, "/nix/store"),
    );
    assert_eq!(fail.status, BuildStatus::PermanentFailure);
    assert!(!fail.is_success());
    assert!(
        fail.error_msg.contains("exit code 3"),
        "{:?}",
        fail.error_msg
    );
    assert!(fail.error_msg.contains(s.drv("bdFail").as_str()));
    assert!(fail.built_outputs.is_empty());

    let bp = decode_all("build-paths-bpOk", &s.step("build-paths-bpOk"), |r| {
        serve::decode_build_paths_reply(r)
    });
    assert_eq!(bp, Ok(()));
    let bp = decode_all("build-paths-bpFail", &s.step("build-paths-bpFail"), |r| {
        serve::decode_build_paths_reply(r)
    });
    let failure = bp.unwrap_err();
    assert_eq!(
        failure.status, 100,
        "Nix reports a failed build as exit status 100"
    );
    assert!(failure.message.contains("exit code 4"), "{failure:?}");
}

#[test]
fn real_serve_sessions_decode() {
    for capture in Capture::all("serve") {
        check_session(&capture);
    }
}
