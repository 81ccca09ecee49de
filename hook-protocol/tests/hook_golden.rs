//! Golden tests for the daemon→hook stream against bytes real nix-daemons (Nix 2.8 and 2.34)
//! wrote to a build hook's stdin: `tests/data/hook/nix-<version>/<session>.stdin`, captured by
//! `tests/env/capture-hook/capture.sh` (how, and what each file holds: `tests/data/hook/README.md`).
//! The daemon-less `hook_capture_2.8.*` capture is `hook_conversation.rs`'s.
//!
//! Owns only these checks: every capture decodes completely (preamble, `try`, and after an accept
//! the input paths and missing outputs) into the values the README states, encodes back to the
//! same bytes, every proper prefix is merely incomplete, and the argv the daemon gave the hook
//! (`<session>.facts`) yields the client's verbosity. Must never run Nix or read the machine's
//! own `/nix`.

mod golden;

use std::collections::BTreeSet;

use hook_protocol::hook::{AcceptedBuild, HookRequest, MaxJobs, Settings, verbosity_from_args};
use hook_protocol::log::Verbosity;
use hook_protocol::wire::{self, Reader};
use hook_protocol::{DecodeError, StorePath, WireWrite};

/// What one capture must decode to.
struct Expect {
    version: &'static str,
    session: &'static str,
    settings: usize,
    /// Settings whose captured values the test pins (the daemon sends every setting).
    values: Vec<(&'static str, &'static str)>,
    am_willing: bool,
    drv: &'static str,
    features: &'static [&'static str],
    /// `(input paths, missing outputs)` for sessions the hook accepted.
    accepted: Option<(&'static [&'static str], &'static [&'static str])>,
    argv: &'static [&'static str],
    verbosity: Verbosity,
}

const HOOK: &str = "/tmp/nlb-hook-capture/hook/capture-hook";
const BUILDERS: &str = "@/tmp/nlb-hook-capture/conf/machines";
const SIMPLE_DRV: &str = "/nix/store/rcmkd70ragi9mawmxm9lhf9qycd1c0sf-capture-simple.drv";
const TWO_OUTPUTS_DRV: &str = "/nix/store/r9npl40h709a1riajwhr7yjf46ra0viy-capture-two-outputs.drv";
const DEP_DRV: &str = "/nix/store/qjixjhdy5vk6wn6626mb28hwkbgh7s5n-capture-dep.drv";
const WITH_DEPS_DRV: &str = "/nix/store/4kn2r57pa1zkc4wc8ncp4pz4sdxavjaj-capture-with-deps.drv";
const TWO_OUTPUTS_INPUTS: &[&str] =
    &["/nix/store/xlf8kps2ckslzi304bpcfmw3s4ckz3xc-capture-input.txt"];
/// Sorted by full path, as Nix's `std::set` sends them (not by name).
const WITH_DEPS_INPUTS: &[&str] = &[
    "/nix/store/hrcdxd740f7x5ax2a1ayhfz0pp80gwa4-capture-fod",
    "/nix/store/p1wh5jzdx91va4amqhpdy1ymj9nnbzxj-capture-dep-src.txt",
    "/nix/store/wy44ncwzapwknfxpjh660apaly8pyc5i-capture-extra.txt",
    "/nix/store/yl4zgd29jx8757bibz8nm7lrb7qmms8l-capture-dep",
];

const COMMON: &[(&str, &str)] = &[
    ("builders", BUILDERS),
    ("system", "x86_64-linux"),
    ("store", "auto"),
    ("substituters", ""),
    ("sandbox", "true"),
    ("builders-use-substitutes", "false"),
    ("max-silent-time", "0"),
    ("timeout", "0"),
    ("build-poll-interval", "5"),
    ("experimental-features", ""),
];

fn expectations() -> Vec<Expect> {
    let mut all = Vec::new();
    for (version, settings, features, users) in [
        (
            "2.8",
            91,
            "benchmark big-parallel kvm nixos-test",
            "nixrbldd",
        ),
        (
            "2.34",
            122,
            "benchmark big-parallel kvm nixos-test uid-range",
            "nixrbld",
        ),
    ] {
        let values = |max_jobs: &'static str, features: &'static str, hook: &'static str| {
            let mut v = COMMON.to_vec();
            v.extend([
                ("max-jobs", max_jobs),
                ("system-features", features),
                ("build-hook", hook),
                ("build-users-group", users),
            ]);
            v
        };
        all.push(Expect {
            version,
            session: "decline",
            settings,
            values: values("0", features, HOOK),
            am_willing: false,
            drv: SIMPLE_DRV,
            features: &[],
            accepted: None,
            argv: &["capture-hook", "3"],
            verbosity: Verbosity::Info,
        });
        all.push(Expect {
            version,
            session: "accept",
            settings,
            values: values("0", features, HOOK),
            am_willing: false,
            drv: TWO_OUTPUTS_DRV,
            features: &[],
            accepted: Some((TWO_OUTPUTS_INPUTS, &["dev", "out"])),
            argv: &["capture-hook", "3"],
            verbosity: Verbosity::Info,
        });
        all.push(Expect {
            version,
            session: "decline-j1",
            settings,
            values: values("1", "capture-feature kvm", HOOK),
            am_willing: true,
            drv: DEP_DRV,
            features: &[],
            accepted: None,
            argv: &["capture-hook", "4"],
            verbosity: Verbosity::Talkative,
        });
        all.push(Expect {
            version,
            session: "accept-deps",
            settings,
            values: values("0", features, HOOK),
            am_willing: false,
            drv: WITH_DEPS_DRV,
            features: &["big-parallel", "capture-feature"],
            accepted: Some((WITH_DEPS_INPUTS, &["lib", "out"])),
            argv: &["capture-hook", "3"],
            verbosity: Verbosity::Info,
        });
    }
    all.push(Expect {
        version: "2.34",
        session: "decline-hook-arg",
        settings: 122,
        values: {
            let mut v = COMMON.to_vec();
            v.extend([
                ("max-jobs", "0"),
                (
                    "build-hook",
                    "/tmp/nlb-hook-capture/hook/capture-hook capture-arg",
                ),
            ]);
            v
        },
        am_willing: false,
        drv: SIMPLE_DRV,
        features: &[],
        accepted: None,
        argv: &["capture-hook", "capture-arg", "3"],
        verbosity: Verbosity::Info,
    });
    all
}

fn read(e: &Expect, ext: &str) -> Vec<u8> {
    golden::read(
        &golden::data_dir(&format!("hook/nix-{}", e.version)).join(format!("{}.{ext}", e.session)),
    )
}

/// A whole captured session, as a hook sees it.
#[derive(Debug, PartialEq)]
struct Session {
    settings: Settings,
    request: HookRequest,
    accepted: Option<AcceptedBuild>,
}

/// Decodes preamble, one request and (if `accepted`) what follows the accept; the stream must
/// end there.
fn decode_session(buf: &[u8], accepted: bool) -> wire::Result<(Session, usize)> {
    let mut r = Reader::new(buf);
    let settings = Settings::decode(&mut r)?;
    let request = HookRequest::decode(&mut r)?;
    let accepted = if accepted {
        Some(AcceptedBuild::decode(&mut r)?)
    } else {
        None
    };
    Ok((
        Session {
            settings,
            request,
            accepted,
        },
        r.position(),
    ))
}

fn encode_session(s: &Session) -> Vec<u8> {
    let mut out = Vec::new();
    s.settings.encode(&mut out);
    s.request.encode(&mut out);
    if let Some(a) = &s.accepted {
        a.encode(&mut out);
    }
    out
}

/// The argv lines of a `.facts` file's `## argv` section.
fn captured_argv(facts: &str) -> Vec<&str> {
    facts
        .lines()
        .skip_while(|l| !l.starts_with("## argv"))
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .collect()
}

fn paths(list: &[&str]) -> BTreeSet<StorePath> {
    list.iter()
        .map(|p| StorePath::parse(p).unwrap_or_else(|e| panic!("{p}: {e}")))
        .collect()
}

#[test]
fn captures_decode_completely_into_what_the_readme_says() {
    for e in expectations() {
        let what = format!("nix-{}/{}", e.version, e.session);
        let bytes = read(&e, "stdin");
        let (s, used) = decode_session(&bytes, e.accepted.is_some())
            .unwrap_or_else(|err| panic!("{what}: {err}"));
        assert_eq!(used, bytes.len(), "{what}: bytes left after the session");

        assert_eq!(s.settings.pairs().len(), e.settings, "{what}: settings");
        let names: BTreeSet<&str> = s.settings.pairs().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), e.settings, "{what}: a setting name repeats");
        for (name, value) in &e.values {
            assert_eq!(s.settings.get(name), Some(*value), "{what}: setting {name}");
        }
        assert_eq!(s.settings.builders(), BUILDERS, "{what}");
        assert_eq!(s.settings.store(), "auto", "{what}");
        assert_eq!(s.settings.system(), Some("x86_64-linux"), "{what}");
        assert_eq!(s.settings.build_poll_interval(), Ok(5), "{what}");
        let max_jobs = s
            .settings
            .max_jobs()
            .unwrap_or_else(|err| panic!("{what}: {err}"));
        assert_eq!(max_jobs, MaxJobs::Count(u64::from(e.am_willing)), "{what}");

        let HookRequest::Try(t) = &s.request else {
            panic!("{what}: expected a try, got {:?}", s.request);
        };
        assert_eq!(t.am_willing, e.am_willing, "{what}: amWilling");
        assert_eq!(t.needed_system, "x86_64-linux", "{what}");
        assert_eq!(t.drv_path.as_str(), e.drv, "{what}");
        let features: BTreeSet<String> = e.features.iter().map(|f| f.to_string()).collect();
        assert_eq!(t.required_features, features, "{what}");

        match (&s.accepted, e.accepted) {
            (None, None) => {}
            (Some(a), Some((inputs, outputs))) => {
                assert_eq!(a.input_paths, paths(inputs), "{what}: inputs");
                let outputs: BTreeSet<String> = outputs.iter().map(|o| o.to_string()).collect();
                assert_eq!(a.missing_outputs, outputs, "{what}: missing outputs");
            }
            (got, want) => panic!("{what}: accepted {got:?}, expected {want:?}"),
        }
    }
}

#[test]
fn captures_encode_back_to_the_same_bytes() {
    for e in expectations() {
        let bytes = read(&e, "stdin");
        let (s, _) = decode_session(&bytes, e.accepted.is_some())
            .unwrap_or_else(|err| panic!("nix-{}/{}: {err}", e.version, e.session));
        assert!(
            encode_session(&s) == bytes,
            "nix-{}/{}: re-encoding differs",
            e.version,
            e.session
        );
    }
}

#[test]
fn every_proper_prefix_of_a_capture_is_incomplete() {
    for e in expectations() {
        let bytes = read(&e, "stdin");
        for cut in 0..bytes.len() {
            match decode_session(&bytes[..cut], e.accepted.is_some()) {
                Err(DecodeError::Incomplete { .. }) => {}
                other => panic!(
                    "nix-{}/{}: prefix of {cut} bytes gave {other:?}",
                    e.version, e.session
                ),
            }
        }
    }
}

#[test]
fn a_declined_stream_is_a_try_then_nothing_more() {
    // After a decline the daemon sends nothing until the next `try`: the capture ends with
    // the request. The request alone (no preamble) must decode the same way from its offset.
    for e in expectations().into_iter().filter(|e| e.accepted.is_none()) {
        let bytes = read(&e, "stdin");
        let mut r = Reader::new(&bytes);
        Settings::decode(&mut r).unwrap_or_else(|err| panic!("{}: {err}", e.session));
        let tail = r.rest();
        let (req, used) = wire::decode_with(tail, HookRequest::decode)
            .unwrap_or_else(|err| panic!("{}: {err}", e.session));
        assert_eq!(used, tail.len(), "nix-{}/{}", e.version, e.session);
        let mut again = Vec::new();
        req.encode(&mut again);
        assert!(again == tail, "nix-{}/{}", e.version, e.session);
        // The request starts with the wire string "try".
        let mut word = Vec::new();
        word.put_str("try");
        assert!(tail.starts_with(&word), "nix-{}/{}", e.version, e.session);
    }
}

#[test]
fn captured_argv_gives_the_clients_verbosity() {
    for e in expectations() {
        let facts = String::from_utf8(read(&e, "facts")).expect("facts are text");
        let argv = captured_argv(&facts);
        assert_eq!(argv, e.argv, "nix-{}/{}: argv", e.version, e.session);
        assert_eq!(
            verbosity_from_args(&argv),
            Some(e.verbosity),
            "nix-{}/{}",
            e.version,
            e.session
        );
    }
}
