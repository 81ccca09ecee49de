//! P4: hook start-up to `# decline` with a 100-machine table, for both hooks, measured by
//! running each hook binary directly as nix-daemon would (settings preamble from a real Nix 2.8
//! capture, then one `try` for a system no machine has) and timing spawn → the `# decline` line.
//!
//! Both hooks run in a private mount namespace with tmpfs over `/nix`, `/etc/nix` and `/run`
//! (the bench re-executes itself under `unshare -m`), so the machine's real store and config
//! are never read or written: Nix's hook opens (and on first use creates) a local store there.
//!
//! Must never: mount anything in the bench's own namespace (only the re-executed child mounts),
//! or count a run whose reply was not exactly `# decline`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hook_protocol::StorePath;
use hook_protocol::hook::{HookRequest, Settings, TryRequest};

use crate::harness::{CmdOutput, run_command};
use crate::setup::Hook;
use crate::stats::Samples;

/// Set in the re-executed child: how many measured runs per hook.
pub const CHILD_ENV: &str = "NLB_BENCH_P4_CHILD";
/// Set in the re-executed child instead: run our hook once under callgrind, profile there.
pub const PROFILE_ENV: &str = "NLB_BENCH_P4_CALLGRIND";
const MACHINES: usize = 100;
const WARMUP: usize = 5;
/// A real host key line (any valid ed25519 key will do: nothing connects).
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICT/aPpF9RiADUeMHD4QX1NbY3svFgk5WNFMSEq6P3wi bench";

/// Runs the child under `unshare -m` and parses its results: (ours, Nix's) in milliseconds.
pub fn run(runs: usize) -> (Samples, Samples) {
    let out = run_child(CHILD_ENV, &runs.to_string());
    parse_child_output(&out)
}

/// Profiles one start-up of our hook under callgrind (in the private namespace) into `dir`.
pub fn profile(dir: &Path) {
    run_child(PROFILE_ENV, &dir.to_string_lossy());
}

fn run_child(key: &str, value: &str) -> CmdOutput {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut c = Command::new("unshare");
    c.args(["-m", "--propagation", "private", "--"])
        .arg(&exe)
        .arg("--bench")
        .env(key, value);
    let out = run_command(&mut c, None, Duration::from_secs(600));
    out.assert_success();
    for l in out.stderr.lines() {
        eprintln!("[bench] P4 child: {l}");
    }
    out
}

fn parse_child_output(out: &CmdOutput) -> (Samples, Samples) {
    let (mut ours, mut nix) = (Samples::new(), Samples::new());
    for line in out.stdout.lines() {
        let mut w = line.split_whitespace();
        let (Some(who), Some(ms)) = (w.next(), w.next()) else {
            continue;
        };
        let Ok(ms) = ms.parse::<f64>() else { continue };
        match who {
            "p4-ours" => ours.push(ms),
            "p4-nix" => nix.push(ms),
            _ => {}
        }
    }
    assert!(
        ours.len() > 0 && ours.len() == nix.len(),
        "P4 child printed no results:\n{out}"
    );
    (ours, nix)
}

fn sh(cmd: &str) {
    let out = run_command(
        Command::new("sh").args(["-ec", cmd]),
        None,
        Duration::from_secs(60),
    );
    out.assert_success();
}

/// The child: set up the private namespace, then alternate the two hooks.
pub fn child(runs: usize) {
    let stdin = prepare();
    let hooks = [Hook::Ours, Hook::Nix];
    for i in 0..WARMUP + runs {
        for (k, hook) in hooks.iter().enumerate() {
            // Alternate which hook goes first, so neither always follows the other.
            let hook = if i.is_multiple_of(2) {
                *hook
            } else {
                hooks[1 - k]
            };
            let (ms, said) = time_to_decline(&mut hook_command(&hook.binary()), &stdin);
            if i == 0 {
                // What each hook said before declining, once, for the record.
                let head: String = said.chars().take(160).collect();
                eprintln!(
                    "{} said {} bytes before `# decline`: {head}…",
                    hook.label(),
                    said.len()
                );
            }
            if i >= WARMUP {
                println!("p4-{} {ms:.4}", hook.label());
            }
        }
    }
}

/// The profiling child: our hook's start-up once plain (warm caches), once under callgrind.
pub fn profile_child(dir: &Path) {
    let stdin = prepare();
    let bin = Hook::Ours.binary();
    time_to_decline(&mut hook_command(&bin), &stdin);
    let mut c = hook_command(Path::new("valgrind"));
    c.arg("--tool=callgrind")
        .arg(format!(
            "--callgrind-out-file={}/callgrind.out.p4",
            dir.display()
        ))
        .arg(format!("--log-file={}/valgrind.p4.log", dir.display()))
        .arg(&bin);
    let (ms, _) = time_to_decline(&mut c, &stdin);
    eprintln!("P4 under callgrind: {ms:.1} ms");
}

/// Mounts the private tmpfs layout and writes the machines table; the hook's stdin.
fn prepare() -> Vec<u8> {
    // Only ever in the namespace `run` created: refuse if it is the bench's original one.
    let ns = |p: &str| std::fs::read_link(p).ok();
    assert!(
        ns("/proc/self/ns/mnt") != ns("/proc/1/ns/mnt"),
        "the P4 child must run in a private mount namespace"
    );
    sh("mount -t tmpfs -o mode=0755 nlb-bench-nix /nix
        mount -t tmpfs -o mode=0755 nlb-bench-run /run
        mkdir -p /etc/nix && mount -t tmpfs -o mode=0755 nlb-bench-etc /etc/nix
        mkdir -p /nix/store /nix/var/nix /run/home
        ssh-keygen -q -t ed25519 -N '' -C bench -f /etc/nix/bench_key");
    let key_b64 = base64_line(HOST_KEY);
    let mut machines = String::new();
    for i in 0..MACHINES {
        // Every machine plausible but useless for the request (systems it does not list).
        machines += &format!(
            "ssh://root@10.0.{}.{} x86_64-linux,aarch64-linux /etc/nix/bench_key 4 1 kvm,big-parallel - {key_b64}\n",
            i / 250,
            i % 250 + 1
        );
    }
    std::fs::write("/etc/nix/machines", machines).unwrap_or_else(|e| panic!("machines: {e}"));
    request_bytes()
}

fn base64_line(line: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{line}\n"))
}

/// The preamble a real Nix 2.8 daemon sent (91 settings), `builders` pointed at the table, and
/// one `try` for a system no machine has.
fn request_bytes() -> Vec<u8> {
    let capture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("hook-protocol/tests/data/hook/nix-2.8/decline.stdin");
    let bytes = std::fs::read(&capture).unwrap_or_else(|e| panic!("{}: {e}", capture.display()));
    let (mut settings, _) = hook_protocol::wire::decode_with(&bytes, Settings::decode)
        .unwrap_or_else(|e| panic!("{}: {e:?}", capture.display()));
    settings.set("builders", "@/etc/nix/machines");
    let mut out = Vec::new();
    settings.encode(&mut out);
    let drv = StorePath::parse("/nix/store/00000000000000000000000000000000-nlb-bench-p4.drv")
        .unwrap_or_else(|e| panic!("drv path: {e}"));
    HookRequest::Try(TryRequest {
        am_willing: true,
        needed_system: "riscv64-linux".to_owned(),
        drv_path: drv,
        required_features: Default::default(),
    })
    .encode(&mut out);
    out
}

/// `program` with the environment nix-daemon gives a hook here (the caller adds arguments
/// before [`time_to_decline`] appends the verbosity).
fn hook_command(program: &Path) -> Command {
    let mut c = Command::new(program);
    c.env_clear()
        .env("PATH", crate::STD_PATH)
        .env("HOME", "/run/home")
        .current_dir("/");
    c
}

/// Spawns `cmd 3` as the daemon does (stdout and stderr one pipe), writes `stdin` and closes
/// it, and returns the milliseconds from spawn to the `# decline` line, and what the hook
/// printed before it.
fn time_to_decline(cmd: &mut Command, stdin: &[u8]) -> (f64, String) {
    let (reader, writer) = std::io::pipe().unwrap_or_else(|e| panic!("pipe: {e}"));
    let writer2 = writer.try_clone().unwrap_or_else(|e| panic!("dup: {e}"));
    let hook = PathBuf::from(cmd.get_program());
    cmd.arg("3")
        .stdin(Stdio::piped())
        .stdout(writer)
        .stderr(writer2);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", hook.display()));
    // Our copies of the pipe's write end must go, or EOF never comes.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(stdin)
            .unwrap_or_else(|e| panic!("{}: writing stdin: {e}", hook.display()));
    }
    let mut lines = BufReader::new(reader);
    let mut seen = String::new();
    let elapsed = loop {
        let mut line = String::new();
        let n = lines
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{}: reading: {e}", hook.display()));
        if n == 0 {
            let _ = child.wait();
            panic!("{} ended without `# decline`:\n{seen}", hook.display());
        }
        if line.trim_end() == "# decline" {
            break start.elapsed();
        }
        assert!(
            !line.starts_with("# "),
            "{} replied {line:?}, not `# decline`:\n{seen}",
            hook.display()
        );
        seen.push_str(&line);
    };
    let status = child
        .wait()
        .unwrap_or_else(|e| panic!("{}: wait: {e}", hook.display()));
    assert!(
        status.success(),
        "{} exited {status}:\n{seen}",
        hook.display()
    );
    (elapsed.as_secs_f64() * 1000.0, seen)
}
