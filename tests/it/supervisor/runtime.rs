//! The supervisor's runtime over its real socket with the real boot backend: builders are
//! `kind = "command"` machines ([`LazyRemote`]: a real sshd with its own Nix store, started by
//! the command, called ready only once its pinned host key and remote Nix answered), or
//! commands that fail or never get ready. The backends themselves are tested with the boot
//! module; these tests are about the supervisor: permissions, the lock, the protocol, leases
//! tied to connections (and processes), idle stops, failures, signals (a shutdown stops every
//! instance through the backend's stop, seen in the machine's own log), and the detached
//! auto-start.
//!
//! Some tests start this test binary again as a separate process running only themselves
//! ([`helper`]), as a supervisor (`CHILD_CONFIG` set) or as a client that takes a lease and
//! waits to be killed (`CHILD_STATE` set); [`helper_role`] is the first thing those tests do.
//!
//! Must never: leave a machine, helper supervisor or client running (each is stopped by pid),
//! or listen anywhere but 127.0.0.1.

use std::ffi::OsString;
use std::future::Future;
use std::io::{BufRead, BufReader as StdBufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix_lazy_builder::config::Config;
use nix_lazy_builder::supervisor::backend::BootBackend;
use nix_lazy_builder::supervisor::proto::{BuilderStatus, Response, State};
use nix_lazy_builder::supervisor::server::{self, Bound, ServeOptions};
use nix_lazy_builder::supervisor::{
    Client, ClientError, StartCommand, SuperviseArgs, Verdict, default_backend,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::harness::{LazyRemote, Nix, RemoteOpts, Scheme, alive, free_port, one_test_args};

/// Pinned for the builders that never get as far as a handshake.
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICT/aPpF9RiADUeMHD4QX1NbY3svFgk5WNFMSEq6P3wi";

/// What sshd logs when it gets SIGTERM (the `command` backend's default stop signal); a
/// process group killed outright (the instance dropped) logs nothing.
const SSHD_TERMINATED: &str = "Received signal 15; terminating.";

// ------------------------------------------------------------------------------------------------
// Helpers

/// One builder of a test config.
enum Spec<'a> {
    /// A real machine, booted by its command: ready once its sshd and remote Nix answer.
    Machine(&'a LazyRemote),
    /// `/bin/sh -c SCRIPT` as the boot command, at a free port where nothing will answer.
    Script(&'a str),
}

use Spec::{Machine, Script};

/// A config with command builders, written to `dir/lb.toml`: `(name, spec, idle-timeout)`.
fn write_config(dir: &Path, builders: &[(&str, Spec<'_>, &str)]) -> (PathBuf, Config) {
    let state = dir.join("state");
    let mut text = format!("[supervisor]\nstate-dir = \"{}\"\n", state.display());
    for (name, spec, idle) in builders {
        text.push_str(&match spec {
            Machine(remote) => machine_toml(name, remote, idle),
            Script(script) => format!(
                "[builders.{name}]\nuri = \"ssh://root@127.0.0.1:{}\"\nsystems = [\"aarch64-linux\"]\n\
                 max-jobs = 2\nhost-key = \"{HOST_KEY}\"\nidle-timeout = \"{idle}\"\nboot-timeout = \"10s\"\n\
                 [builders.{name}.boot]\nkind = \"command\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\n",
                free_port()
            ),
        });
    }
    let path = dir.join("lb.toml");
    std::fs::write(&path, &text).unwrap();
    let config = Config::parse(&text, &path).unwrap();
    (path, config)
}

/// The `[builders.NAME]` table of a machine.
fn machine_toml(name: &str, remote: &LazyRemote, idle: &str) -> String {
    remote.command_builder(
        name,
        Scheme::Ssh,
        &format!("max-jobs = 2\nidle-timeout = \"{idle}\"\nboot-timeout = \"60s\""),
    )
}

/// A machine for a builder (prepared, not started: the supervisor starts it).
fn machine() -> LazyRemote {
    LazyRemote::prepare(RemoteOpts::new(Nix::Host))
}

/// Never booted in these tests.
const IDLE: &str = "exec sleep 1000";

struct Running {
    state_dir: PathBuf,
    signals: mpsc::UnboundedSender<()>,
    task: tokio::task::JoinHandle<Result<(), server::SuperviseError>>,
}

async fn serve(config: &Config, auto: bool, linger: Duration) -> Running {
    let opts = ServeOptions {
        exit_after_idle: linger,
        ..ServeOptions::new(config, auto)
    };
    let Bound::Serving(s) = server::bind(config, &opts).await.unwrap() else {
        panic!("another supervisor is serving");
    };
    let (signals, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(s.serve(Arc::new(BootBackend), rx));
    Running {
        state_dir: opts.state_dir,
        signals,
        task,
    }
}

impl Running {
    /// A client on this supervisor's socket.
    async fn client(&self) -> Client {
        Client::connect(&self.state_dir).await.unwrap()
    }

    /// Sends the shutdown signal and waits for the supervisor to exit without an error.
    async fn shut_down(&mut self) {
        self.signals.send(()).unwrap();
        (&mut self.task).await.unwrap().unwrap();
    }
}

/// Waits (at most 60 s) until `name` is up.
async fn up(c: &mut Client, name: &str) -> BuilderStatus {
    let st = c.wait_ready(name, Duration::from_secs(60)).await.unwrap();
    assert_eq!(st.state, State::Up, "{name}: {st:?}");
    st
}

/// Boots `name` through `c` and waits until it is up.
async fn boot_up(c: &mut Client, name: &str) -> BuilderStatus {
    c.boot(name, false).await.unwrap();
    up(c, name).await
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

async fn wait_for<F: FnMut() -> bool>(what: &str, limit: Duration, mut f: F) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn state_of(c: &mut Client, name: &str) -> BuilderStatus {
    c.status()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
}

/// The running machine's main process (its sshd; the command `exec`s into it).
#[track_caller]
fn instance_pid(remote: &LazyRemote) -> u32 {
    remote
        .started_pid()
        .expect("the machine's start script wrote its pid")
}

/// The builder's `command.log`: its command's stdout and stderr (sshd logs there with `-e`).
fn command_log(state_dir: &Path, name: &str) -> String {
    std::fs::read_to_string(state_dir.join("builders").join(name).join("command.log"))
        .unwrap_or_default()
}

// ------------------------------------------------------------------------------------------------
// In-process supervisor

#[tokio::test]
async fn state_dir_and_socket_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, config) = write_config(tmp.path(), &[("vm", Script(IDLE), "0s")]);
    // A pre-existing state dir with loose permissions is tightened.
    std::fs::create_dir(&config.supervisor.state_dir).unwrap();
    std::fs::set_permissions(
        &config.supervisor.state_dir,
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    // A stale socket file is replaced.
    std::fs::write(config.supervisor.state_dir.join("supervisor.sock"), b"").unwrap();
    let mut r = serve(&config, false, Duration::from_secs(60)).await;
    assert_eq!(mode(&r.state_dir), 0o700);
    assert_eq!(mode(&r.state_dir.join("builders")), 0o700);
    assert_eq!(mode(&r.state_dir.join("builders/vm")), 0o700);
    assert_eq!(mode(&r.state_dir.join("supervisor.sock")), 0o600);
    assert_eq!(mode(&r.state_dir.join("supervisor.lock")), 0o600);
    let mut c = r.client().await;
    assert_eq!(c.supervisor_pid(), std::process::id());
    let st = c.status().await.unwrap();
    assert_eq!(st.len(), 1);
    assert_eq!((st[0].name.as_str(), st[0].state), ("vm", State::Down));
    r.shut_down().await;
    assert!(
        !r.state_dir.join("supervisor.sock").exists(),
        "socket removed at exit"
    );
}

#[tokio::test]
async fn a_second_supervisor_finds_the_first_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, config) = write_config(tmp.path(), &[("vm", Script(IDLE), "0s")]);
    let mut r = serve(&config, true, Duration::from_secs(60)).await;
    let opts = |auto| ServeOptions {
        state_dir: r.state_dir.clone(),
        auto,
        exit_after_idle: Duration::from_secs(1),
        config_path: None,
    };
    // An auto-started one leaves at once.
    let t0 = Instant::now();
    assert!(matches!(
        server::bind(&config, &opts(true)).await.unwrap(),
        Bound::AnotherIsServing
    ));
    assert!(t0.elapsed() < Duration::from_secs(2));
    // The first one is unharmed: its socket was not removed by the loser.
    Client::connect(&r.state_dir)
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    // A service-managed one waits for the lock and takes over when the first exits.
    let second_opts = opts(false);
    let second = {
        let config = config.clone();
        tokio::spawn(async move { server::bind(&config, &second_opts).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "it must wait while the first serves");
    r.shut_down().await;
    let Bound::Serving(s) = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    else {
        panic!("the second did not take over");
    };
    assert!(s.socket_path().exists());
    let (signals, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(s.serve(Arc::new(BootBackend), rx));
    let mut c = r.client().await;
    assert_eq!(c.status().await.unwrap().len(), 1);
    signals.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn malformed_requests_get_an_error_and_the_connection_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, config) = write_config(tmp.path(), &[("vm", Script(IDLE), "0s")]);
    let mut r = serve(&config, false, Duration::from_secs(60)).await;
    let stream = UnixStream::connect(r.state_dir.join("supervisor.sock"))
        .await
        .unwrap();
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    rd.read_line(&mut line).await.unwrap();
    assert!(matches!(
        serde_json::from_str::<Response>(&line).unwrap(),
        Response::Hello { version: 1, .. }
    ));
    for bad in [
        &b"this is not json\n"[..],
        b"{\"op\":\"explode\"}\n",
        b"{\"op\":\"lease\"}\n",
        b"\xff\xfe\n",
        b"[1,2,3]\n",
    ] {
        wr.write_all(bad).await.unwrap();
        line.clear();
        rd.read_line(&mut line).await.unwrap();
        match serde_json::from_str::<Response>(&line).unwrap() {
            Response::Error { message } => assert!(message.contains("malformed"), "{message}"),
            other => panic!("{other:?} for {bad:?}"),
        }
    }
    // Blank lines are skipped; a good request still works on the same connection.
    wr.write_all(b"\n{\"op\":\"status\"}\n").await.unwrap();
    line.clear();
    rd.read_line(&mut line).await.unwrap();
    assert!(matches!(
        serde_json::from_str::<Response>(&line).unwrap(),
        Response::Status { .. }
    ));
    // An unknown builder is an error that names it.
    wr.write_all(b"{\"op\":\"boot\",\"builder\":\"nope\"}\n")
        .await
        .unwrap();
    line.clear();
    rd.read_line(&mut line).await.unwrap();
    assert!(line.contains("no lazy builder named 'nope'"), "{line}");
    // An over-long line ends the connection with an error, not the supervisor.
    let huge = vec![b'x'; 100_000];
    wr.write_all(&huge).await.unwrap();
    line.clear();
    rd.read_line(&mut line).await.unwrap();
    assert!(line.contains("longer than"), "{line}");
    let mut c = r.client().await;
    c.status().await.unwrap();
    // The typed client turns an error reply into an error naming the socket and the request.
    let e = c.lease("nope").await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("supervisor.sock") && text.contains("lease 'nope'"),
        "{text}"
    );
    r.shut_down().await;
}

#[tokio::test]
async fn boot_lease_idle_stop_with_a_real_process() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = machine();
    let (_, config) = write_config(tmp.path(), &[("vm", Machine(&vm), "700ms")]);
    let mut r = serve(&config, false, Duration::from_secs(60)).await;
    let mut c = r.client().await;
    let Verdict::Granted(st) = c.boot("vm", false).await.unwrap() else {
        panic!()
    };
    assert!(matches!(st.state, State::Booting | State::Up));
    let st = up(&mut c, "vm").await;
    assert!(
        st.nix_version
            .as_deref()
            .is_some_and(|v| v.starts_with("nix-store (Nix) ")),
        "the machine's own Nix answered: {st:?}"
    );
    assert_eq!(
        st.ssh_port,
        Some(vm.port()),
        "the URI's port when the instance chose none"
    );
    let pid = instance_pid(&vm);
    assert!(alive(pid));
    assert!(matches!(c.lease("vm").await.unwrap(), Verdict::Granted(_)));
    // Held past the idle timeout: never stopped.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = state_of(&mut c, "vm").await;
    assert_eq!((st.state, st.leases), (State::Up, 1));
    assert!(alive(pid));
    c.release("vm").await.unwrap();
    let released = Instant::now();
    let mut other = r.client().await;
    wait_for("the idle stop", Duration::from_secs(5), || !alive(pid)).await;
    let idle = released.elapsed();
    assert!(idle >= Duration::from_millis(650), "stopped after {idle:?}");
    // Stopped by the backend's stop (its stop signal), not killed.
    let log = command_log(&r.state_dir, "vm");
    assert!(log.contains(SSHD_TERMINATED), "{log}");
    let st = state_of(&mut other, "vm").await;
    assert_eq!(st.state, State::Down);
    assert_eq!(st.boots, 1);
    // The boot time was recorded and persisted.
    let history = std::fs::read_to_string(r.state_dir.join("boot-times.json")).unwrap();
    assert!(history.contains("\"vm\""), "{history}");
    r.shut_down().await;
}

#[tokio::test]
async fn failures_are_reported_in_one_line_and_back_off() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = machine();
    let (_, config) = write_config(
        tmp.path(),
        &[
            ("broken", Script("echo starting >&2; exit 3"), "0s"),
            ("vm", Machine(&vm), "0s"),
        ],
    );
    let mut r = serve(&config, false, Duration::from_secs(60)).await;
    let mut c = r.client().await;
    c.boot("broken", false).await.unwrap();
    let st = c
        .wait_ready("broken", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(st.state, State::Failed);
    let f = st.last_failure.unwrap();
    assert!(
        f.cause.contains("exited with status 3")
            && f.cause.contains(": starting; log: ")
            && f.cause.ends_with("/builders/broken/command.log"),
        "{}",
        f.cause
    );
    assert!(!f.cause.contains('\n'));
    assert_eq!(f.consecutive, 1);
    assert!(f.retry_in_ms > 9000 && f.retry_in_ms <= 10_000);
    // Backing off: refused with the reason; another client sees the same.
    let mut c2 = r.client().await;
    match c2.boot("broken", false).await.unwrap() {
        Verdict::Refused { reason, .. } => {
            assert!(
                reason.contains("exited with status 3")
                    && reason.contains("it is not booted again for another ")
                    && reason.ends_with("(`nix-lazy-builder up broken` boots it now)"),
                "{reason}"
            )
        }
        v => panic!("{v:?}"),
    }
    // The other builder is unaffected.
    boot_up(&mut c2, "vm").await;
    // An instance that dies on its own is noticed at once.
    let pid = instance_pid(&vm);
    // SAFETY: killing the instance's main process (this test's machine's sshd).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let t0 = Instant::now();
    loop {
        let st = state_of(&mut c2, "vm").await;
        if st.state == State::Failed {
            assert!(st.last_failure.unwrap().cause.contains("exited on its own"));
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "{st:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // `force` (the CLI's `up`) boots through the backoff.
    assert!(matches!(
        c2.boot("vm", true).await.unwrap(),
        Verdict::Granted(_)
    ));
    up(&mut c2, "vm").await;
    assert_ne!(instance_pid(&vm), pid, "not a fresh instance");
    r.shut_down().await;
}

#[tokio::test]
async fn a_boot_that_never_gets_ready_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, _) = write_config(tmp.path(), &[("slow", Script("exec sleep 1000"), "0s")]);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("boot-timeout = \"10s\"", "boot-timeout = \"600ms\"");
    let config = Config::parse(&text, &path).unwrap();
    let mut r = serve(&config, false, Duration::from_secs(60)).await;
    let mut c = r.client().await;
    c.boot("slow", false).await.unwrap();
    let st = c.wait_ready("slow", Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.state, State::Failed);
    let cause = st.last_failure.unwrap().cause;
    assert!(cause.contains("no SSH banner on 127.0.0.1:"), "{cause}");
    r.shut_down().await;
}

#[tokio::test]
async fn shutdown_stops_instances_even_when_leased() {
    let tmp = tempfile::tempdir().unwrap();
    let (ma, mb) = (machine(), machine());
    let (_, config) = write_config(
        tmp.path(),
        &[("a", Machine(&ma), "0s"), ("b", Machine(&mb), "0s")],
    );
    let mut r = serve(&config, false, Duration::from_secs(60)).await;
    let mut c = r.client().await;
    for b in ["a", "b"] {
        boot_up(&mut c, b).await;
    }
    assert!(matches!(c.lease("a").await.unwrap(), Verdict::Granted(_)));
    let pids = [instance_pid(&ma), instance_pid(&mb)];
    for (b, &pid) in ["a", "b"].iter().zip(&pids) {
        assert!(alive(pid), "{b}");
        assert!(!command_log(&r.state_dir, b).contains(SSHD_TERMINATED));
    }
    tokio::time::timeout(Duration::from_secs(10), r.shut_down())
        .await
        .unwrap();
    for (b, pid) in ["a", "b"].iter().zip(pids) {
        assert!(
            !alive(pid),
            "instance {pid} of '{b}' survived the supervisor"
        );
        // The supervisor stopped it (the backend's stop: SIGTERM to its group) before it
        // exited, leased or not; an instance merely dropped would have been SIGKILLed.
        let log = command_log(&r.state_dir, b);
        assert!(
            log.contains(SSHD_TERMINATED),
            "'{b}' was not stopped by the supervisor, its sshd never got SIGTERM:\n{log}"
        );
    }
    // The client sees the connection end.
    assert!(matches!(
        c.status().await.unwrap_err(),
        ClientError::Closed { .. } | ClientError::Io { .. }
    ));
}

#[tokio::test]
async fn auto_started_supervisor_exits_when_idle_and_a_client_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = machine();
    let (_, config) = write_config(tmp.path(), &[("vm", Machine(&vm), "300ms")]);
    let r = serve(&config, true, Duration::from_millis(400)).await;
    let mut c = r.client().await;
    boot_up(&mut c, "vm").await;
    // One build (a builder never leased since its boot gets a longer first grace).
    assert!(matches!(c.lease("vm").await.unwrap(), Verdict::Granted(_)));
    c.release("vm").await.unwrap();
    let pid = instance_pid(&vm);
    // Connected: it stays, even once the builder is down.
    wait_for("the idle stop", Duration::from_secs(5), || !alive(pid)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!r.task.is_finished());
    drop(c);
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), r.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(350),
        "{:?}",
        t0.elapsed()
    );
    assert!(!r.state_dir.join("supervisor.sock").exists());
}

#[tokio::test]
async fn a_request_for_an_unknown_builder_rereads_a_fresh_config_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let new = machine();
    let (path, config) = write_config(tmp.path(), &[("vm", Script(IDLE), "0s")]);
    let mut r = serve(&config, false, Duration::from_secs(60)).await;
    let mut c = r.client().await;
    // Too fresh for the "file changed" check (an editor may still be writing it), but a
    // request that names the new builder rereads it at once.
    let text = std::fs::read_to_string(&path).unwrap() + &machine_toml("new", &new, "0s");
    std::fs::write(&path, text).unwrap();
    let st = c.status().await.unwrap();
    assert_eq!(
        st.len(),
        1,
        "a file modified just now is left to settle: {st:?}"
    );
    let t0 = Instant::now();
    assert!(matches!(
        c.boot("new", false).await.unwrap(),
        Verdict::Granted(_)
    ));
    eprintln!("reload + boot request answered in {:.2?}", t0.elapsed());
    up(&mut c, "new").await;
    assert!(r.state_dir.join("builders/new").is_dir());
    // A broken file: the unknown builder's error says why, the running config stays.
    std::fs::write(&path, "[builders.x]\nbogus = 1\n").unwrap();
    let e = c.lease("other").await.unwrap_err().to_string();
    assert!(
        e.contains("no lazy builder named 'other'") && e.contains("lb.toml:2"),
        "{e}"
    );
    let names: Vec<String> = c
        .status()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["vm", "new"]);
    assert!(matches!(c.lease("new").await.unwrap(), Verdict::Granted(_)));
    r.shut_down().await;
}

// ------------------------------------------------------------------------------------------------
// Separate processes

/// Set in a helper process that is to be a supervisor: the config it serves.
const CHILD_CONFIG: &str = "NLB_TEST_CHILD_CONFIG";
/// Set in a helper process that is to be a client: the state directory of the supervisor whose
/// builder "vm" it leases.
const CHILD_STATE: &str = "NLB_TEST_CHILD_STATE";

/// This test binary again, running nothing but the test `test` (the caller, which starts with
/// [`helper_role`]) with `env` set: a helper process for that test.
fn helper(test: &str, env: &[(&str, &OsString)]) -> StartCommand {
    StartCommand {
        program: std::env::current_exe().unwrap(),
        args: one_test_args(module_path!(), test)
            .into_iter()
            .map(OsString::from)
            .collect(),
        env: env
            .iter()
            .map(|(k, v)| (OsString::from(k), (*v).clone()))
            .collect(),
    }
}

/// A test's config of `builders` in a temp dir of its own, and the command that starts this test
/// binary again as the supervisor serving it ([`helper`] with `CHILD_CONFIG`, and `env`).
struct ChildSupervisor {
    state: PathBuf,
    start: StartCommand,
    _tmp: tempfile::TempDir,
}

fn child_supervisor(
    test: &str,
    builders: &[(&str, Spec<'_>, &str)],
    env: &[(&str, &OsString)],
) -> ChildSupervisor {
    let tmp = tempfile::tempdir().unwrap();
    let (path, config) = write_config(tmp.path(), builders);
    let path = path.into_os_string();
    let mut vars = vec![(CHILD_CONFIG, &path)];
    vars.extend_from_slice(env);
    ChildSupervisor {
        state: config.supervisor.state_dir.clone(),
        start: helper(test, &vars),
        _tmp: tmp,
    }
}

/// In a helper process ([`helper`]), plays its part and exits; in a test's own process (neither
/// variable set) returns at once. With `CHILD_CONFIG`: an auto-started supervisor with the real
/// boot backend. With `CHILD_STATE`: a client that leases builder "vm", says `LEASED` on
/// stdout and waits to be killed.
fn helper_role() {
    if let Some(config) = std::env::var_os(CHILD_CONFIG) {
        let code = nix_lazy_builder::supervisor::main_with(
            SuperviseArgs {
                config: nix_lazy_builder::config::resolve_config_path(Some(config.as_ref()), None),
                auto: true,
                build_users_group: None,
            },
            default_backend(),
        );
        std::process::exit(code.into());
    }
    if let Some(state) = std::env::var_os(CHILD_STATE) {
        block_on(async {
            let mut c = Client::connect(Path::new(&state)).await.unwrap();
            assert!(matches!(c.lease("vm").await.unwrap(), Verdict::Granted(_)));
            println!("LEASED");
            std::io::stdout().flush().unwrap();
            tokio::time::sleep(Duration::from_secs(120)).await;
        });
        std::process::exit(0);
    }
}

/// Runs `f` on a runtime of its own (the tests with helper processes decide their role before
/// any runtime exists: a helper supervisor builds its own).
fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Stops a helper supervisor by pid when dropped, so no test leaves one behind.
struct Reap(u32);

impl Drop for Reap {
    fn drop(&mut self) {
        // SAFETY: signalling the helper supervisor this test started.
        unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while alive(self.0) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A helper client process, killed if the test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stat_fields(pid: u32) -> Vec<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = s.rsplit_once(')').unwrap();
    rest.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn auto_start_detaches_and_inherits_no_descriptors() {
    helper_role();
    block_on(async {
        let linger = OsString::from("60000");
        let ChildSupervisor { state, start, .. } = &child_supervisor(
            "auto_start_detaches_and_inherits_no_descriptors",
            &[("vm", Script(IDLE), "0s")],
            &[("NIX_LAZY_BUILDER_SUPERVISOR_LINGER_MS", &linger)],
        );
        // Like the descriptors nix-daemon hands a hook: open, not close-on-exec.
        let mut fds = [0i32; 2];
        // SAFETY: pipe(2) fills the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let pipe_target = std::fs::read_link(format!("/proc/self/fd/{}", fds[1])).unwrap();
        let mut c = Client::connect_or_start_with(state, start).await.unwrap();
        let pid = c.supervisor_pid();
        let _reap = Reap(pid);
        assert_ne!(pid, std::process::id());
        // Its own session and process group.
        let f = stat_fields(pid);
        // Fields after the command: state ppid pgrp session …
        assert_eq!(f[2], pid.to_string(), "process group");
        assert_eq!(f[3], pid.to_string(), "session");
        // stdin is /dev/null, stdout and stderr the log; nothing of ours beyond that.
        let link = |fd: &str| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(link("0"), Path::new("/dev/null"));
        let log = state.join("supervisor.log");
        assert_eq!(link("1"), log);
        assert_eq!(link("2"), log);
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
            let entry = entry.unwrap();
            let target = std::fs::read_link(entry.path()).unwrap_or_default();
            assert_ne!(
                target,
                pipe_target,
                "fd {:?} of the supervisor is the client's pipe",
                entry.file_name()
            );
        }
        assert_eq!(mode(state), 0o700);
        assert_eq!(mode(&log), 0o600);
        c.status().await.unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("serving 1 lazy builder(s)"), "{text}");
        // SAFETY: closing the pipe this test made.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    })
}

#[test]
fn racing_starters_end_on_one_supervisor() {
    helper_role();
    block_on(async {
        let ChildSupervisor { state, start, .. } = &child_supervisor(
            "racing_starters_end_on_one_supervisor",
            &[("vm", Script(IDLE), "0s")],
            &[],
        );
        let (a, b, c) = tokio::join!(
            Client::connect_or_start_with(state, start),
            Client::connect_or_start_with(state, start),
            Client::connect_or_start_with(state, start),
        );
        let (mut a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        let _reap = Reap(a.supervisor_pid());
        assert_eq!(a.supervisor_pid(), b.supervisor_pid());
        assert_eq!(a.supervisor_pid(), c.supervisor_pid());
        a.status().await.unwrap();
        // The losers exited (quietly, status 0): only one supervisor process for this state dir.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let log = std::fs::read_to_string(state.join("supervisor.log")).unwrap();
        assert_eq!(
            log.matches("serving 1 lazy builder(s)").count(),
            1,
            "exactly one supervisor served: {log}"
        );
    })
}

#[test]
fn a_killed_client_releases_its_lease() {
    helper_role();
    block_on(async {
        let vm = machine();
        let ChildSupervisor { state, start, .. } = &child_supervisor(
            "a_killed_client_releases_its_lease",
            &[("vm", Machine(&vm), "0s")],
            &[],
        );
        let mut c = Client::connect_or_start_with(state, start).await.unwrap();
        let _reap = Reap(c.supervisor_pid());
        boot_up(&mut c, "vm").await;
        let client = helper(
            "a_killed_client_releases_its_lease",
            &[(CHILD_STATE, &state.clone().into_os_string())],
        );
        let mut child = KillOnDrop(
            std::process::Command::new(&client.program)
                .args(&client.args)
                .envs(client.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut out = StdBufReader::new(child.0.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert_ne!(out.read_line(&mut line).unwrap(), 0, "client ended early");
            // libtest may have written "test …::a_killed_client_releases_its_lease ... " before
            // it on the same line.
            if line.trim_end().ends_with("LEASED") {
                break;
            }
        }
        assert_eq!(state_of(&mut c, "vm").await.leases, 1);
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
        let t0 = Instant::now();
        while state_of(&mut c, "vm").await.leases != 0 {
            assert!(t0.elapsed() < Duration::from_secs(2), "lease not released");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut rest = String::new();
        let _ = out.read_to_string(&mut rest);
    })
}

#[test]
fn a_supervisor_that_cannot_start_is_reported_with_its_log() {
    helper_role();
    block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let bad = tmp.path().join("bad.toml");
        std::fs::write(&bad, "[builders.x]\nbogus = 1\n").unwrap();
        let cmd = helper(
            "a_supervisor_that_cannot_start_is_reported_with_its_log",
            &[(CHILD_CONFIG, &bad.into_os_string())],
        );
        let e = Client::connect_or_start_with(&state, &cmd)
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("supervisor.log") && text.contains("exit status: 1"),
            "{text}"
        );
        let log = std::fs::read_to_string(state.join("supervisor.log")).unwrap();
        assert!(log.contains("bad.toml:"), "{log}");
    })
}
