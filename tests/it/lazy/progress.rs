//! What a user of `nix build` sees while our hook boots a lazy builder and builds on it: the
//! Nix 2.34 CLI and daemon (sid chroot) with a `kind = "command"` builder (the harness's real
//! sshd with its own store, started by the supervisor only when the build needs it).
//!
//! From `nix build --log-format internal-json -L`, over `ssh://` and `ssh-ng://`, read as
//! JSON, not by eye: the boot activity while the builder boots; the daemon's build activity
//! for the derivation on the builder's URI; the upload and the download each as Nix's own hook
//! shows them (a "copying dependencies to" / "copying outputs from" activity, inside it
//! "copying N paths" with the NAR bytes expected and the paths done, and per path "copying path
//! 'P' to/from 'URI'" with its bytes done against its size, ending at the size); every build log
//! line as a log-line result of the build activity, in order, between the upload and the
//! download; and afterwards the log under `nix log <drv>`.
//!
//! In a terminal (tmux, 100 columns), a boot plus a build: every moment shows at most one
//! progress line, at the bottom, never wider than the terminal; every other line is a build log
//! line prefixed `<name>> ` as Nix prefixes them, once each, in order; nothing else (no `@nix`
//! line, no escape sequence). The moments are kept in `tests/it/data/tmux-boot-build.txt`
//! (rewritten when `NLB_UPDATE_TEST_DATA=1`), whose shape is checked too.
//!
//! Must never: pass without a real boot and a real remote build (the lazy machine must hold the
//! outputs, and must have been down before), or read the terminal by any other means than
//! tmux's own capture of what it displays.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// How long the auto-started supervisor stays once it has nothing to do.
const LINGER: Duration = Duration::from_secs(20);
/// The terminal's size for the tmux test.
const COLUMNS: usize = 100;
const ROWS: usize = 30;

/// A lazy `command` builder `cmd` for aarch64-linux whose boot takes `delay`, behind a Nix
/// 2.34 daemon running our hook (the supervisor starts on demand).
fn setup(scheme: Scheme, delay: Duration) -> (LazyRemote, LazyConfig, LocalDaemon) {
    let remote = LazyRemote::prepare(RemoteOpts::new(Nix::Host));
    let cfg = LazyConfig::write(&[remote.builder_toml(
        "cmd",
        scheme,
        &["aarch64-linux"],
        // The default keep-warm: the build is handed the session the supervisor opened as
        // part of the boot's readiness.
        "max-jobs = 1\nidle-timeout = \"30s\"\nboot-timeout = \"60s\"",
        &remote.command_boot(delay),
    )]);
    let mut opts = cfg.daemon_opts(LINGER);
    opts.nix = Nix::Sid;
    opts.build_hook = Some(format!("{} hook", lazy_binary().display()));
    // The chroot sees the config, the supervisor's state and the builder's key at their paths.
    opts.expose.push(cfg.dir.path().to_path_buf());
    opts.expose.push(remote.dir().to_path_buf());
    let daemon = LocalDaemon::start(opts);
    assert!(
        !remote.listening() && remote.processes().is_empty(),
        "the lazy machine runs before any build"
    );
    (remote, cfg, daemon)
}

/// `nix build` of every output of `drv`, with `extra` arguments, as the 2.34 CLI.
fn nix_build(daemon: &LocalDaemon, drv: &str, extra: &[&str]) -> Command {
    let mut c = daemon.client_command("nix");
    c.args([
        "--extra-experimental-features",
        "nix-command",
        "build",
        "--no-link",
    ])
    .args(extra)
    .arg(format!("{drv}^*"));
    c
}

/// One activity of a `--log-format internal-json` run, with its results, and where in the
/// line sequence it started and stopped.
#[derive(Debug, Default)]
struct Act {
    kind: u64,
    text: String,
    fields: Vec<Value>,
    start: usize,
    stop: Option<usize>,
    /// (line index, result type, fields).
    results: Vec<(usize, u64, Vec<Value>)>,
}

impl Act {
    fn results_of(&self, kind: u64) -> Vec<&Vec<Value>> {
        self.results
            .iter()
            .filter(|(_, k, _)| *k == kind)
            .map(|(_, _, f)| f)
            .collect()
    }
}

/// The activities of a JSON log, by id. Every `@nix` line must be JSON with an `action`; a
/// result or stop for an id never started is a defect.
fn activities(stderr: &str) -> BTreeMap<u64, Act> {
    let mut acts: BTreeMap<u64, Act> = BTreeMap::new();
    for (i, line) in stderr.lines().enumerate() {
        let Some(json) = line.strip_prefix("@nix ") else {
            continue;
        };
        let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {line}"));
        let id = v["id"].as_u64();
        let fields = v["fields"].as_array().cloned().unwrap_or_default();
        match v["action"].as_str() {
            Some("start") => {
                let id = id.unwrap_or_else(|| panic!("a start without an id: {line}"));
                acts.insert(
                    id,
                    Act {
                        kind: v["type"].as_u64().unwrap_or_else(|| panic!("{line}")),
                        text: v["text"].as_str().unwrap_or_default().to_owned(),
                        fields,
                        start: i,
                        ..Act::default()
                    },
                );
            }
            Some("stop") => {
                let a = id.and_then(|id| acts.get_mut(&id));
                a.unwrap_or_else(|| panic!("stop of an unknown activity: {line}"))
                    .stop = Some(i);
            }
            Some("result") => {
                let a = id.and_then(|id| acts.get_mut(&id));
                let kind = v["type"].as_u64().unwrap_or_else(|| panic!("{line}"));
                a.unwrap_or_else(|| panic!("result of an unknown activity: {line}"))
                    .results
                    .push((i, kind, fields));
            }
            Some("msg" | "setPhase") => {}
            other => panic!("unknown action {other:?}: {line}"),
        }
    }
    acts
}

fn ints(fields: &[Value]) -> Vec<u64> {
    fields
        .iter()
        .map(|f| {
            f.as_u64()
                .unwrap_or_else(|| panic!("not a number: {fields:?}"))
        })
        .collect()
}

/// The one activity whose text is `text`, or that starts with it when `prefix`.
#[track_caller]
fn the<'a>(acts: &'a BTreeMap<u64, Act>, text: &str, prefix: bool) -> &'a Act {
    let found: Vec<&Act> = acts
        .values()
        .filter(|a| {
            if prefix {
                a.text.starts_with(text)
            } else {
                a.text == text
            }
        })
        .collect();
    assert_eq!(found.len(), 1, "activities {text:?}: {found:#?}");
    found[0]
}

/// The "copying N paths" activity inside the wrapper `outer` (started and stopped within it),
/// checked as Nix's `copyPaths` shows one: `paths` per-path activities from/to `uri` for
/// exactly `want` (in any order), each with bytes ending at its NAR size, the sum of which was
/// announced up front; the path counts ending at `[N, N, 0, 0]`. Returns the per-path sizes.
#[track_caller]
fn assert_copy(
    acts: &BTreeMap<u64, Act>,
    outer: &Act,
    uri: &str,
    upload: bool,
    want: &[&str],
) -> Vec<u64> {
    let stop = outer.stop.expect("the copy's wrapper activity was stopped");
    let inside = |a: &&Act| a.start > outer.start && a.stop.is_some_and(|s| s < stop);
    let copies: Vec<&Act> = acts
        .values()
        .filter(|a| a.kind == 103)
        .filter(inside)
        .collect();
    assert_eq!(copies.len(), 1, "{:?}: {copies:#?}", outer.text);
    let copy = copies[0];
    assert_eq!(copy.text, format!("copying {} paths", want.len()));
    let expected = copy.results_of(106);
    assert_eq!(expected.len(), 1, "{copy:#?}");
    let expected = ints(expected[0]);
    assert_eq!(
        expected[0], 100,
        "setExpected is for copyPath activities: {copy:#?}"
    );
    let counts = copy.results_of(105);
    let n = want.len() as u64;
    assert_eq!(
        counts.last().map(|f| ints(f)),
        Some(vec![n, n, 0, 0]),
        "{copy:#?}"
    );
    let per_path: Vec<&Act> = acts
        .values()
        .filter(|a| a.kind == 100)
        .filter(inside)
        .collect();
    let mut seen: Vec<String> = Vec::new();
    let mut sizes = Vec::new();
    for p in &per_path {
        let path = p.fields[0].as_str().expect("the path field").to_owned();
        let (from, to) = if upload {
            ("local", uri)
        } else {
            (uri, "local")
        };
        assert_eq!(
            p.fields,
            vec![
                Value::from(path.as_str()),
                Value::from(from),
                Value::from(to)
            ],
            "{p:#?}"
        );
        let dir = if upload { "to" } else { "from" };
        assert_eq!(p.text, format!("copying path '{path}' {dir} '{uri}'"));
        let progress: Vec<Vec<u64>> = p.results_of(105).into_iter().map(|f| ints(f)).collect();
        let last = progress
            .last()
            .unwrap_or_else(|| panic!("no bytes shown: {p:#?}"));
        assert!(
            last[1] > 0 && last[0] == last[1] && last[2..] == [0, 0],
            "{p:#?}"
        );
        assert!(
            progress
                .windows(2)
                .all(|w| w[0][0] <= w[1][0] && w[0][1] == w[1][1]),
            "bytes go backwards or the size changes: {progress:?}"
        );
        sizes.push(last[1]);
        seen.push(path);
    }
    seen.sort();
    let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    assert_eq!(seen, want, "paths copied inside {:?}", outer.text);
    assert_eq!(expected[1], sizes.iter().sum::<u64>(), "{copy:#?}");
    sizes
}

fn json_build(case: &str, scheme: Scheme) {
    let start = Instant::now();
    let (remote, cfg, daemon) = setup(scheme, Duration::from_secs(2));
    let uri = remote.uri(scheme);
    let drv = FakeDrv::new(case).with_log_lines(3).with_blob(1 << 20);
    let paths = drv.build_input(&daemon);
    let mut cmd = nix_build(
        &daemon,
        &paths.drv,
        &["--log-format", "internal-json", "-L"],
    );
    let out = run_command(&mut cmd, None, DEFAULT_COMMAND_TIMEOUT);
    out.assert_success();
    paths.assert_built(&daemon, true);
    assert!(remote.is_valid(&paths.out), "not built on the lazy machine");
    assert_eq!(cfg.status_of(&daemon, "cmd").boots, 1);
    let acts = activities(&out.stderr);

    // The boot, shown while the builder booted (before the build started).
    let boot = the(&acts, "booting builder 'cmd'", true);
    let build = acts
        .values()
        .find(|a| a.kind == 105 && a.fields.first() == Some(&Value::from(paths.drv.as_str())))
        .unwrap_or_else(|| panic!("no build activity for {}:\n{out}", paths.drv));
    assert_eq!(boot.kind, 0, "{boot:#?}");
    assert!(
        boot.stop.is_some_and(|s| s < build.start),
        "{boot:#?}\n{build:#?}"
    );
    assert_eq!(
        build.text,
        format!("building '{}' on '{uri}'", paths.drv),
        "{build:#?}"
    );
    assert_eq!(build.fields[1], Value::from(uri.as_str()), "{build:#?}");

    // The upload: the input, which the fresh machine lacked.
    let up = the(&acts, &format!("copying dependencies to '{uri}'"), false);
    assert_copy(&acts, up, &uri, true, &[&paths.input_out]);
    // The download: both outputs (the blob makes `out` take several byte counts).
    let down = the(&acts, &format!("copying outputs from '{uri}'"), false);
    let sizes = assert_copy(&acts, down, &uri, false, &[&paths.out, &paths.dev]);
    assert!(sizes.iter().any(|&s| s > 1 << 20), "{sizes:?}");

    // The log lines: results of the build activity (ssh://: the daemon's own; ssh-ng://
    // either that or the remote's forwarded one for the same derivation), in order, after the
    // upload and before the download.
    let lines: Vec<(usize, String)> = acts
        .values()
        .filter(|a| a.kind == 105 && a.fields.first() == build.fields.first())
        .flat_map(|a| a.results.iter())
        .filter(|(_, k, _)| *k == 101)
        .map(|(i, _, f)| (*i, f[0].as_str().unwrap_or_default().to_owned()))
        .collect();
    let mut sorted = lines.clone();
    sorted.sort();
    let texts: Vec<&str> = sorted.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(texts, drv.expected_log_lines(), "build log lines:\n{out}");
    let (first, last) = (sorted[0].0, sorted[sorted.len() - 1].0);
    assert!(
        up.stop.is_some_and(|s| s < first) && last < down.start,
        "{out}"
    );

    // Afterwards, `nix log`.
    let log = daemon.client(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "log",
            &paths.drv,
        ],
    );
    log.assert_success();
    for l in drv.expected_log_lines() {
        assert!(
            log.stdout.lines().any(|x| x == l),
            "`nix log` lacks {l:?}:\n{log}"
        );
    }
    assert_eq!(daemon.invalid_leftovers(), Vec::<String>::new());
    eprintln!("[timing] {case}: {:.2?}", start.elapsed());
}

#[test]
fn nix_build_json_shows_boot_copies_and_log_over_ssh() {
    json_build("nlb-json-ssh", Scheme::Ssh);
}

#[test]
fn nix_build_json_shows_boot_copies_and_log_over_ssh_ng() {
    json_build("nlb-json-sshng", Scheme::SshNg);
}

/// `cmd` as one `sh` line: `env -i` with its environment, then its argv, each word quoted.
fn shell_line(cmd: &Command) -> String {
    let mut words = vec!["env".to_owned(), "-i".to_owned()];
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            words.push(format!("{}={}", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    words.push(cmd.get_program().to_string_lossy().into_owned());
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The line the tmux test's script prints when `nix build` is done.
const EXIT_MARK: &str = "NLB-EXIT";

/// Whether `line` is Nix's progress line (`[0/1 built, …] …`).
fn is_progress(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .is_some_and(|(inside, _)| inside.contains("built"))
}

/// What a user must see in every moment of a terminal running `nix build -L` of the fake
/// derivation `name` printing `log_lines`: at most one progress line, the last one, no line
/// wider than [`COLUMNS`]; every other line one of `log_lines` prefixed `<name>> `, each at
/// most once and in order, or the script's exit line; no `@nix` line, escape or control
/// character. `None` when it holds, else what is wrong.
fn bad_shape(moment: &str, name: &str, log_lines: &[String]) -> Option<String> {
    let lines: Vec<&str> = moment.lines().map(str::trim_end).collect();
    let end = lines
        .iter()
        .rposition(|l| !l.is_empty())
        .map_or(0, |i| i + 1);
    let lines = &lines[..end];
    let mut next_log = 0;
    for (i, l) in lines.iter().enumerate() {
        if l.chars().count() > COLUMNS {
            return Some(format!("line {i} is wider than {COLUMNS} columns: {l:?}"));
        }
        if l.contains("@nix") || l.contains("{\"action\"") {
            return Some(format!("line {i} is a raw log message: {l:?}"));
        }
        if l.chars().any(|c| c.is_control() || c == '\u{fffd}') {
            return Some(format!(
                "line {i} has a control or replacement character: {l:?}"
            ));
        }
        if is_progress(l) {
            if i + 1 != lines.len() {
                return Some(format!("progress line {i} is not the last line: {l:?}"));
            }
            continue;
        }
        if l.is_empty() || l.starts_with(EXIT_MARK) {
            continue;
        }
        let Some(text) = l.strip_prefix(&format!("{name}> ")) else {
            return Some(format!(
                "line {i} is neither progress nor a build log line: {l:?}"
            ));
        };
        match log_lines[next_log..].iter().position(|x| x == text) {
            Some(j) => next_log += j + 1,
            None => {
                return Some(format!(
                    "log line {i} is unknown, repeated or out of order: {l:?}"
                ));
            }
        }
    }
    None
}

/// The file the moments of the tmux test are kept in.
fn kept_capture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/data/tmux-boot-build.txt")
}

/// The separator before each moment in [`kept_capture`].
const MOMENT: &str = "---- moment ";

/// The tmux test's derivation: its name and log lines.
fn tmux_drv() -> FakeDrv {
    FakeDrv::new("nlb-tmux")
        .with_log_lines(3)
        .with_blob(3 << 20)
        .slow(2)
}

#[test]
fn nix_build_in_tmux_shows_one_progress_line() {
    require_file("/usr/bin/tmux", "tmux");
    // A boot longer than the daemon's 5 s poll interval: the first `try` postpones, the next
    // one finds it nearly done and waits for it, showing it.
    let (remote, _cfg, daemon) = setup(Scheme::Ssh, Duration::from_secs(6));
    let drv = tmux_drv();
    let paths = drv.build_input(&daemon);
    let mut cmd = nix_build(&daemon, &paths.drv, &["-L"]);
    cmd.env("TERM", "screen");
    let dir = scratch("nlb-tmux-", &[]);
    let script = dir.path().join("run.sh");
    std::fs::write(
        &script,
        format!(
            "{}\necho {EXIT_MARK} $?\nexec sleep 600\n",
            shell_line(&cmd)
        ),
    )
    .expect("write the tmux script");
    // A server of our own (its own socket), killed at the end through that socket.
    let sock = dir.path().join("tmux.sock");
    let tmux = |args: &[&str]| {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&sock).args(args).env_remove("TMUX");
        run_command(&mut c, None, Duration::from_secs(10))
    };
    struct Server<'a>(&'a dyn Fn(&[&str]) -> CmdOutput);
    impl Drop for Server<'_> {
        fn drop(&mut self) {
            (self.0)(&["kill-server"]);
        }
    }
    let (cols, rows) = (COLUMNS.to_string(), ROWS.to_string());
    let script = script.to_string_lossy().into_owned();
    tmux(&[
        "new-session",
        "-d",
        "-s",
        "nlb",
        "-x",
        &cols,
        "-y",
        &rows,
        "sh",
        &script,
    ])
    .assert_success();
    let _server = Server(&tmux);
    let start = Instant::now();
    let mut moments: Vec<(Duration, String)> = Vec::new();
    loop {
        let cap = tmux(&["capture-pane", "-p", "-J", "-t", "nlb"]);
        cap.assert_success();
        let text = cap.stdout.trim_end().to_owned();
        if moments.last().is_none_or(|(_, m)| *m != text) {
            moments.push((start.elapsed(), text.clone()));
        }
        if text.contains(EXIT_MARK) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "nix build did not finish in tmux; last moment:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    let last = &moments[moments.len() - 1].1;
    assert!(last.contains(&format!("{EXIT_MARK} 0")), "{last}");
    paths.assert_built(&daemon, true);
    assert!(remote.is_valid(&paths.out), "not built on the lazy machine");

    let shown: String = moments
        .iter()
        .enumerate()
        .map(|(i, (at, m))| format!("{MOMENT}{i} at {:.2} s\n{m}\n", at.as_secs_f64()))
        .collect();
    for (_, m) in &moments {
        if let Some(why) = bad_shape(m, &drv.name, &drv.expected_log_lines()) {
            panic!("the terminal showed garbage: {why}\n{shown}");
        }
    }
    let progress: Vec<&str> = moments
        .iter()
        .filter_map(|(_, m)| m.lines().rev().find(|l| is_progress(l)))
        .collect();
    let has = |what: &str| progress.iter().any(|l| l.contains(what));
    assert!(
        has("booting builder 'cmd'"),
        "the boot was never shown:\n{shown}"
    );
    assert!(
        has(" copied ("),
        "no copy with its bytes was shown:\n{shown}"
    );
    for l in drv.expected_log_lines() {
        assert!(
            last.contains(&format!("{}> {l}", drv.name)),
            "{l:?} missing:\n{shown}"
        );
    }
    if std::env::var_os("NLB_UPDATE_TEST_DATA").is_some() {
        std::fs::write(kept_capture(), &shown).expect("write the kept capture");
    }
    eprintln!("{shown}");
}

/// The kept moments (see [`nix_build_in_tmux_shows_one_progress_line`]) have the shape, show
/// the boot, a copy with its bytes and every log line; and the check itself refuses garbage.
#[test]
fn kept_tmux_capture_has_the_shape() {
    let text = std::fs::read_to_string(kept_capture()).expect("read the kept capture");
    let drv = tmux_drv();
    let want = drv.expected_log_lines();
    let moments: Vec<&str> = text
        .split(MOMENT)
        .filter(|m| !m.is_empty())
        .map(|m| m.split_once('\n').map_or("", |(_, rest)| rest))
        .collect();
    assert!(moments.len() >= 3, "{text}");
    for m in &moments {
        assert_eq!(bad_shape(m, &drv.name, &want), None, "{m}");
    }
    assert!(
        moments.iter().any(|m| m.contains("booting builder 'cmd'")),
        "{text}"
    );
    assert!(moments.iter().any(|m| m.contains(" copied (")), "{text}");
    let last = moments[moments.len() - 1];
    assert!(last.contains(&format!("{EXIT_MARK} 0")), "{last}");

    // Garbage is refused: two progress lines, a raw message, a wide line, a stray line, a
    // repeated log line, an escape.
    let good = format!("{}> {}\n[0/1 built] building", drv.name, want[0]);
    assert_eq!(bad_shape(&good, &drv.name, &want), None);
    for bad in [
        "[0/1 built] booting\n[0/1 built] building".to_owned(),
        "@nix {\"action\":\"msg\"}".to_owned(),
        format!("[0/1 built] {}", "x".repeat(COLUMNS)),
        "booting builder 'cmd' (1 s)...\n[0/1 built] x".to_owned(),
        format!("{0}> {1}\n{0}> {1}", drv.name, want[0]),
        format!("{}> {}\u{1b}[K", drv.name, want[0]),
    ] {
        assert!(
            bad_shape(&bad, &drv.name, &want).is_some(),
            "{bad:?} passed"
        );
    }
}
