//! The hook binary run directly (no daemon) with broken input on stdin, built with
//! `hook_protocol`'s own encoders: random bytes, a valid preamble followed by a `try` cut at
//! every byte, preambles cut at every byte, absurd length prefixes, and empty stdin.
//!
//! Each broken input must give a clear error the user can see (an `@nix` `msg` at level 0 that
//! says nix-daemon sent something bad or stopped mid-message), a non-zero exit status, and
//! never a panic (no "panicked at", not Rust's panic status 101, no signal). Every line the
//! hook writes must be something the daemon can parse (`# reply` or `@nix` JSON). The daemon
//! going away cleanly — empty stdin, or EOF right after a complete message — is not an error:
//! exit 0 and say nothing, as Nix's hook does when it finds EOF where a request would start
//! (on EOF before the preamble Nix 2.8's hook prints "unexpected end-of-file" and exits 1, to
//! nobody: the daemon only closes an idle hook's stdin to drop it).
//!
//! Must never: touch the machine's `/nix` (the hook gets its own `NIX_STATE_DIR`, config and
//! `HOME`), or connect anywhere (no input here ever gets as far as an accept).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hook_protocol::StorePath;
use hook_protocol::hook::{HookOutput, HookRequest, Reply, Settings, TryRequest};
use hook_protocol::log::{Message, Verbosity};
use hook_protocol::wire::{MAX_STRING, WireWrite};

use crate::harness::*;

const DRV: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nlb-stdin.drv";

/// A scratch environment for direct hook runs.
struct Env {
    dir: tempfile::TempDir,
    /// The binary under test, pinned: a hard link (or copy) in `dir`, so that a concurrent
    /// `cargo build` relinking `target/debug/nix-lazy-builder` cannot make a run fail to start.
    bin: std::path::PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("nlb-hook-stdin-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir: {e}"));
        std::fs::create_dir(dir.path().join("state")).expect("mkdir state");
        std::fs::write(dir.path().join("lazy-builder.toml"), "").expect("write config");
        let bin = dir.path().join("nix-lazy-builder");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match std::fs::hard_link(hook_binary(), &bin)
                .or_else(|_| std::fs::copy(hook_binary(), &bin).map(|_| ()))
            {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("pinning {}: {e}; retrying", hook_binary().display());
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("cannot pin {}: {e}", hook_binary().display()),
            }
        }
        Env { dir, bin }
    }

    fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).to_string_lossy().into_owned()
    }

    /// The hook as Nix 2.34 runs it (`<bin> hook --config … 3`) or as 2.8 does (`<bin> 3`,
    /// config from the environment). `stdin: None` gives it /dev/null.
    fn run(&self, stdin: Option<&[u8]>, nix28_argv: bool) -> CmdOutput {
        let mut c = Command::new(&self.bin);
        if nix28_argv {
            c.arg("3");
        } else {
            c.args(["hook", "--config", &self.path("lazy-builder.toml"), "3"]);
        }
        c.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", self.dir.path())
            .env("NIX_STATE_DIR", self.path("state"))
            .env("NIX_LAZY_BUILDER_CONFIG", self.path("lazy-builder.toml"))
            .current_dir(self.dir.path());
        run_command(&mut c, stdin, Duration::from_secs(30))
    }
}

/// The settings a daemon sends, with one aarch64 builder that is never reached.
fn settings() -> Settings {
    let mut s = Settings::new();
    for (k, v) in [
        (
            "builders",
            "ssh://root@127.0.0.1:1 aarch64-linux - 1 1 - - -",
        ),
        ("system", "x86_64-linux"),
        ("extra-platforms", "i686-linux"),
        ("system-features", "benchmark big-parallel kvm nixos-test"),
        ("max-jobs", "1"),
        ("max-silent-time", "0"),
        ("timeout", "0"),
    ] {
        s.set(k, v);
    }
    s
}

fn preamble() -> Vec<u8> {
    let mut b = Vec::new();
    settings().encode(&mut b);
    b
}

/// A `try` for an x86_64 derivation (no builder matches; the local machine could build it).
fn try_request(features: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    HookRequest::Try(TryRequest {
        am_willing: true,
        needed_system: "x86_64-linux".to_owned(),
        drv_path: StorePath::parse(DRV).expect("test drv path"),
        required_features: features
            .iter()
            .map(|f| (*f).to_owned())
            .collect::<BTreeSet<_>>(),
    })
    .encode(&mut b);
    b
}

/// Everything the hook wrote, decoded as the daemon decodes it; panics on anything the daemon
/// could not parse or that is not a whole line.
#[track_caller]
fn outputs(out: &CmdOutput) -> Vec<HookOutput> {
    let mut buf = out.stderr.as_bytes();
    let mut v = Vec::new();
    while !buf.is_empty() {
        let (o, used) = HookOutput::decode(buf).unwrap_or_else(|e| {
            panic!("the daemon could not parse the hook's output ({e}):\n{out}")
        });
        if let HookOutput::Text(t) = &o {
            panic!(
                "plain text line {:?}: the user would never see it:\n{out}",
                String::from_utf8_lossy(t)
            );
        }
        v.push(o);
        buf = &buf[used..];
    }
    assert!(
        out.stdout.is_empty(),
        "stdout is the daemon's pipe too:\n{out}"
    );
    v
}

#[track_caller]
fn assert_no_panic(out: &CmdOutput) {
    assert!(
        !out.stderr.contains("panicked at"),
        "the hook panicked:\n{out}"
    );
    assert!(
        !out.stderr.contains("RUST_BACKTRACE"),
        "the hook panicked:\n{out}"
    );
    let code = out
        .code()
        .unwrap_or_else(|| panic!("the hook died from a signal:\n{out}"));
    assert_ne!(
        code, 101,
        "101 is Rust's panic status (and Nix's timeout):\n{out}"
    );
}

/// Asserts a clean failure: non-zero exit, no reply, one level-0 `error:` message that
/// contains every one of `wants`.
#[track_caller]
fn assert_error(out: &CmdOutput, wants: &[&str]) {
    assert_no_panic(out);
    assert_ne!(out.code(), Some(0), "broken input must be an error:\n{out}");
    let errors: Vec<String> = outputs(out)
        .into_iter()
        .map(|o| match o {
            HookOutput::Log(Message::Msg {
                level: Verbosity::Error,
                msg,
            }) => msg,
            other => panic!("unexpected output {other:?}:\n{out}"),
        })
        .collect();
    assert_eq!(errors.len(), 1, "want one error message:\n{out}");
    assert!(errors[0].starts_with("error: "), "{out}");
    for w in wants {
        assert!(errors[0].contains(w), "the error lacks {w:?}:\n{out}");
    }
}

/// Asserts a quiet exit 0 with exactly `replies`.
#[track_caller]
fn assert_quiet_exit(out: &CmdOutput, replies: &[Reply]) {
    assert_no_panic(out);
    assert_eq!(out.code(), Some(0), "{out}");
    let got: Vec<Reply> = outputs(out)
        .into_iter()
        .filter_map(|o| match o {
            HookOutput::Reply(r) => Some(r),
            // Chatty-level notes are fine (the hook runs at verbosity 3, so there are none).
            HookOutput::Log(Message::Msg { level, .. }) if level > Verbosity::Info => None,
            other => panic!("unexpected output {other:?}:\n{out}"),
        })
        .collect();
    assert_eq!(got, replies, "{out}");
}

/// A xorshift generator: deterministic "random" bytes without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn empty_stdin_is_a_clean_exit() {
    let env = Env::new();
    for nix28 in [false, true] {
        assert_quiet_exit(&env.run(Some(b""), nix28), &[]);
        assert_quiet_exit(&env.run(None, nix28), &[]);
    }
}

#[test]
fn eof_between_messages_is_a_clean_exit() {
    let env = Env::new();
    // Positive control: a whole `try` gets a decline (nothing matches x86_64, and the local
    // machine can build it), then EOF where the next request would start.
    let mut input = preamble();
    input.extend(try_request(&[]));
    assert_quiet_exit(&env.run(Some(&input), false), &[Reply::Decline]);
    assert_quiet_exit(&env.run(Some(&preamble()), true), &[]);
    // Any word other than `try` also means "stop" (Nix's hook exits 0 on it).
    let mut input = preamble();
    input.put_str("exit");
    assert_quiet_exit(&env.run(Some(&input), false), &[]);
}

#[test]
fn random_bytes_are_rejected() {
    let env = Env::new();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let start = Instant::now();
    for i in 0..40 {
        let len = [1, 7, 8, 9, 63, 500, 4096][i % 7] + (rng.next() % 16) as usize;
        let mut input = rng.bytes(len);
        // Half of them look like a daemon at first: a real preamble, then garbage where the
        // request should be (a first u64 that cannot be a sane string length).
        if i % 2 == 1 {
            let mut head = preamble();
            input[..len.min(8)].fill(0xff);
            head.extend(input);
            input = head;
        }
        let out = env.run(Some(&input), i % 3 == 0);
        assert_error(&out, &["nix-daemon"]);
    }
    eprintln!("[timing] 40 random inputs: {:.2?}", start.elapsed());
}

/// Runs the hook on `sent` followed by each cut of `message` (its first 1 … len-1 bytes), every
/// other run with Nix 2.8's argv, and checks each fails with an error that says `wants`.
fn every_cut_is_an_error(env: &Env, sent: &[u8], message: &[u8], what: &str, wants: &[&str]) {
    let start = Instant::now();
    for cut in 1..message.len() {
        let mut input = sent.to_vec();
        input.extend_from_slice(&message[..cut]);
        let out = env.run(Some(&input), cut % 2 == 0);
        assert_error(&out, wants);
    }
    eprintln!(
        "[timing] {} truncated {what}: {:.2?}",
        message.len() - 1,
        start.elapsed()
    );
}

#[test]
fn truncated_try_is_an_error() {
    let req = try_request(&["kvm", "nixos-test"]);
    let wants = ["nix-daemon", "closed the connection", "request"];
    every_cut_is_an_error(&Env::new(), &preamble(), &req, "tries", &wants);
}

#[test]
fn truncated_preamble_is_an_error() {
    let wants = ["nix-daemon", "closed the connection", "preamble"];
    every_cut_is_an_error(&Env::new(), &[], &preamble(), "preambles", &wants);
}

#[test]
fn huge_lengths_are_rejected() {
    let env = Env::new();
    // A setting name claiming 2^60 bytes, and one just under the limit that never arrives.
    for (len, wants) in [
        (
            1u64 << 60,
            &["nix-daemon", "preamble", "exceeds the limit"][..],
        ),
        (
            MAX_STRING + 1,
            &["nix-daemon", "preamble", "exceeds the limit"][..],
        ),
        (
            u64::MAX,
            &["nix-daemon", "preamble", "exceeds the limit"][..],
        ),
        (
            MAX_STRING - 8,
            &["nix-daemon", "preamble", "closed the connection"][..],
        ),
    ] {
        let mut input = Vec::new();
        input.put_u64(1);
        input.put_u64(len);
        input.extend_from_slice(b"builders");
        let out = env.run(Some(&input), false);
        assert_error(&out, wants);
    }
    // A settings marker that is neither 0 nor 1.
    let mut input = Vec::new();
    input.put_u64(u64::MAX);
    assert_error(&env.run(Some(&input), false), &["nix-daemon", "preamble"]);

    // After a valid preamble: a `try` whose word, system, drv path or feature list is huge.
    let head = preamble();
    let mut word = head.clone();
    word.put_u64(1 << 62);
    let mut system = head.clone();
    system.put_str("try");
    system.put_u64(1);
    system.put_u64(u64::MAX - 7);
    let mut features = head.clone();
    features.put_str("try");
    features.put_u64(1);
    features.put_str("x86_64-linux");
    features.put_str(DRV);
    features.put_u64(1 << 40);
    for input in [word, system, features] {
        let out = env.run(Some(&input), false);
        assert_error(&out, &["nix-daemon", "request", "exceeds the limit"]);
    }
}

#[test]
fn bad_paths_in_a_try_are_rejected() {
    let env = Env::new();
    let mut input = preamble();
    input.put_str("try");
    input.put_u64(1);
    input.put_str("x86_64-linux");
    input.put_str("/etc/passwd");
    input.put_strings(Vec::<String>::new());
    let out = env.run(Some(&input), false);
    assert_error(&out, &["nix-daemon", "request"]);
    assert!(Path::new(&env.path("state")).is_dir());
}
