//! The daemon↔hook conversation end to end against a capture from real Nix 2.8
//! (`tests/data/hook/hook_capture.sh`; its `-v` run also produced the `@nix` captures that
//! `log_golden.rs` checks): the stdin stream decoded as it arrives from a pipe, in pieces of
//! every size; the captured `.drv` tied to the `try` and the inputs that followed the accept; and
//! the hook's stderr as the daemon reads it. (`hook_golden.rs` checks the wider set of 2.8 and
//! 2.34 captures byte for byte.)
//!
//! Must never run Nix or read the machine's own `/nix`.

mod golden;

use std::collections::BTreeSet;

use hook_protocol::derivation::{Derivation, drv_name};
use hook_protocol::hook::{AcceptedBuild, HookOutput, HookRequest, MaxJobs, Reply, Settings};
use hook_protocol::log::{Message, Verbosity};
use hook_protocol::wire::{self, Reader};

fn data(name: &str) -> Vec<u8> {
    golden::read(&golden::data_dir("hook").join(name))
}

/// A hook's stdin as it arrives from a pipe: `chunk` bytes at a time. Each message is decoded
/// from its first byte again whenever more bytes arrive, as a hook's read loop does.
struct Pipe {
    all: Vec<u8>,
    arrived: usize,
    consumed: usize,
    chunk: usize,
    retries: usize,
}

impl Pipe {
    fn new(all: Vec<u8>, chunk: usize) -> Self {
        Pipe {
            all,
            arrived: 0,
            consumed: 0,
            chunk,
            retries: 0,
        }
    }

    fn next<T>(&mut self, decode: impl Fn(&mut Reader<'_>) -> wire::Result<T>) -> T {
        loop {
            let buf = &self.all[self.consumed..self.arrived];
            let mut r = Reader::new(buf);
            match decode(&mut r) {
                Ok(v) => {
                    self.consumed += r.position();
                    return v;
                }
                Err(e) if e.is_incomplete() => {
                    assert!(self.arrived < self.all.len(), "stream ended: {e}");
                    self.arrived = (self.arrived + self.chunk).min(self.all.len());
                    self.retries += 1;
                }
                Err(e) => panic!("invalid at byte {}: {e}", self.consumed),
            }
        }
    }

    fn at_eof(&self) -> bool {
        self.consumed == self.all.len()
    }
}

#[test]
fn decodes_a_real_nix_2_8_stream_arriving_in_pieces() {
    let stdin = data("hook_capture_2.8.stdin");
    for chunk in [1, 3, 8, 64, 4096, stdin.len()] {
        let mut pipe = Pipe::new(stdin.clone(), chunk);
        let settings = pipe.next(Settings::decode);
        let request = pipe.next(HookRequest::decode);
        let accepted = pipe.next(AcceptedBuild::decode);
        assert!(pipe.at_eof(), "chunk {chunk}: bytes left over");
        if chunk == 1 {
            assert!(pipe.retries >= stdin.len(), "really fed byte by byte");
        }

        assert_eq!(settings.pairs().len(), 91, "2.8 sends 91 settings");
        assert_eq!(settings.builders(), "ssh://capture-machine x86_64-linux");
        assert_eq!(settings.system(), Some("x86_64-linux"));
        assert_eq!(settings.max_jobs().unwrap(), MaxJobs::Count(0));
        assert_eq!(settings.store(), "auto");
        assert!(!settings.builders_use_substitutes().unwrap());
        assert_eq!(settings.max_silent_time().unwrap(), 0);
        assert_eq!(settings.timeout().unwrap(), 0);
        assert_eq!(settings.max_build_log_size().unwrap(), 0);
        assert!(!settings.keep_failed().unwrap());
        assert_eq!(settings.build_poll_interval().unwrap(), 5);
        assert!(settings.experimental_features().is_empty());
        assert!(settings.extra_platforms().contains(&"i686-linux"));
        assert!(settings.system_features().contains(&"kvm"));
        // Settings the hook ignores are kept too.
        assert_eq!(settings.get("log-lines"), Some("10"));
        assert_eq!(settings.get("max-free"), Some("18446744073709551615"));

        let HookRequest::Try(t) = request else {
            panic!("expected try, got {request:?}")
        };
        assert!(!t.am_willing, "max-jobs 0 means not willing");
        assert_eq!(t.needed_system, "x86_64-linux");
        assert_eq!(drv_name(&t.drv_path).unwrap(), "captured");
        assert_eq!(t.required_features, BTreeSet::from(["kvm".to_owned()]));

        assert_eq!(accepted.input_paths.len(), 1);
        let input = accepted.input_paths.iter().next().unwrap();
        assert_eq!(input.name(), "input.txt");
        assert_eq!(
            accepted.missing_outputs,
            BTreeSet::from(["dev".to_owned(), "out".to_owned()])
        );
    }
}

#[test]
fn the_captured_drv_matches_the_try_and_the_inputs() {
    let stdin = data("hook_capture_2.8.stdin");
    let mut r = Reader::new(&stdin);
    Settings::decode(&mut r).unwrap();
    let HookRequest::Try(t) = HookRequest::decode(&mut r).unwrap() else {
        panic!("expected try")
    };
    let accepted = AcceptedBuild::decode(&mut r).unwrap();
    assert!(r.is_empty());

    let bytes = data("hook_capture_2.8.drv");
    let drv = Derivation::parse(&bytes).unwrap();
    assert_eq!(drv.to_aterm(), bytes);
    assert_eq!(drv.basic.platform, t.needed_system);
    assert_eq!(
        drv.basic.env.get(b"requiredSystemFeatures".as_slice()),
        Some(&b"kvm".to_vec())
    );
    assert_eq!(
        drv.basic.outputs.keys().cloned().collect::<BTreeSet<_>>(),
        accepted.missing_outputs
    );
    // No input derivations: the remote gets the drv's own inputSrcs, which here equal the
    // closure the daemon sent.
    assert!(drv.input_drvs.is_empty());
    let basic = drv.basic_for_remote(&accepted.input_paths);
    assert_eq!(basic, drv.basic);
    assert_eq!(
        basic.input_srcs,
        accepted
            .input_paths
            .iter()
            .map(|p| p.to_string())
            .collect::<BTreeSet<_>>()
    );
}

#[test]
fn a_whole_conversation_as_the_daemon_reads_it() {
    // What a hook writes on stderr during one conversation, as the daemon decodes it.
    let mut err = Vec::new();
    Reply::Postpone.encode(&mut err);
    Message::msg(
        Verbosity::Info,
        "booting builder aarch64 (6 s)…\nsecond line",
    )
    .encode(&mut err);
    Reply::accept("ssh://builder\n# decline").encode(&mut err);
    err.extend_from_slice(b"stray text after accept\n");

    let mut seen = Vec::new();
    let mut at = 0;
    while at < err.len() {
        let (out, used) = HookOutput::decode(&err[at..]).unwrap();
        seen.push(out);
        at += used;
    }
    assert_eq!(
        seen,
        vec![
            HookOutput::Reply(Reply::Postpone),
            HookOutput::Log(Message::msg(
                Verbosity::Info,
                "booting builder aarch64 (6 s)…\nsecond line"
            )),
            HookOutput::Reply(Reply::Accept {
                machine: "ssh://builder # decline".into()
            }),
            HookOutput::Text(b"stray text after accept".to_vec()),
        ]
    );
}
