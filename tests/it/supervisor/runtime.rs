//! The supervisor's runtime over its real socket, with a stand-in boot backend (`Fake`, below):
//! it runs a `kind = "command"` builder's command in its own process group and calls it ready
//! once the command has created `$INSTANCE_DIR/ready`. The real backends are tested with the
//! boot module; these tests are about the supervisor: permissions, the lock, the protocol,
//! leases tied to connections (and processes), idle stops, failures, signals, and the detached
//! auto-start.
//!
//! Some tests start this test binary again as a separate process: `child_supervisor` (a
//! supervisor with the stand-in backend) and `child_client` (a client that takes a lease and
//! waits to be killed). Both are `#[ignore]`d helpers, run only with `--ignored --exact`.

use std::ffi::OsString;
use std::io::{BufRead, BufReader as StdBufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix_lazy_builder::config::{BootSpec, Builder, Config};
use nix_lazy_builder::supervisor::backend::{Backend, BoxFuture, InstanceContext, RunningBuilder};
use nix_lazy_builder::supervisor::proto::{Response, State};
use nix_lazy_builder::supervisor::server::{self, Bound, ServeOptions};
use nix_lazy_builder::supervisor::{Client, ClientError, StartCommand, SuperviseArgs, Verdict};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::harness::{alive, one_test_args};

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICT/aPpF9RiADUeMHD4QX1NbY3svFgk5WNFMSEq6P3wi";

// ------------------------------------------------------------------------------------------------
// The stand-in backend

struct Fake;

struct FakeInstance {
    child: tokio::process::Child,
    pid: u32,
    dir: PathBuf,
}

impl Backend for Fake {
    fn start<'a>(
        &'a self,
        builder: &'a Builder,
        ctx: &'a InstanceContext,
    ) -> BoxFuture<'a, Result<Box<dyn RunningBuilder>, String>> {
        Box::pin(async move {
            let Some(BootSpec::Command(c)) = builder.lazy.as_ref().map(|l| &l.boot) else {
                return Err("the stand-in backend only runs kind = \"command\"".to_owned());
            };
            let _ = std::fs::remove_file(ctx.dir.join("ready"));
            let child = tokio::process::Command::new(&c.command[0])
                .args(&c.command[1..])
                .env("INSTANCE_DIR", &ctx.dir)
                .stdin(Stdio::null())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot run {}: {e}", c.command[0]))?;
            let pid = child.id().ok_or("no pid")?;
            Ok(Box::new(FakeInstance {
                child,
                pid,
                dir: ctx.dir.clone(),
            }) as Box<dyn RunningBuilder>)
        })
    }
}

impl RunningBuilder for FakeInstance {
    fn ssh_port(&self) -> Option<u16> {
        None
    }

    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn wait_ready<'a>(
        &'a mut self,
        _builder: &'a Builder,
        _port: u16,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            loop {
                if self.dir.join("ready").exists() {
                    return Ok("nix-store (Fake) 1.0".to_owned());
                }
                if let Ok(Some(status)) = self.child.try_wait() {
                    return Err(format!("the command {status} during boot"));
                }
                if Instant::now() >= deadline {
                    return Err("not ready before the deadline".to_owned());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            match self.child.wait().await {
                Ok(s) => format!("command {s}"),
                Err(e) => format!("wait failed: {e}"),
            }
        })
    }

    fn stop(mut self: Box<Self>, _graceful: bool) -> BoxFuture<'static, String> {
        Box::pin(async move {
            // SAFETY: signalling our own child's process group, which still exists (the
            // leader is not reaped before `wait` below).
            unsafe { libc::kill(-(self.pid as i32), libc::SIGTERM) };
            match tokio::time::timeout(Duration::from_secs(3), self.child.wait()).await {
                Ok(Ok(s)) => format!("stopped: {s}"),
                _ => {
                    // SAFETY: as above.
                    unsafe { libc::kill(-(self.pid as i32), libc::SIGKILL) };
                    let s = self.child.wait().await;
                    format!("killed: {s:?}")
                }
            }
        })
    }
}

// ------------------------------------------------------------------------------------------------
// Helpers

/// A config with command builders, written to `dir/lb.toml`: `(name, command, idle-timeout)`.
fn write_config(dir: &Path, builders: &[(&str, &str, &str)]) -> (PathBuf, Config) {
    let state = dir.join("state");
    let mut text = format!("[supervisor]\nstate-dir = \"{}\"\n", state.display());
    for (i, (name, script, idle)) in builders.iter().enumerate() {
        text.push_str(&format!(
            "[builders.{name}]\nuri = \"ssh://root@127.0.0.1:{}\"\nsystems = [\"aarch64-linux\"]\n\
             max-jobs = 2\nhost-key = \"{HOST_KEY}\"\nidle-timeout = \"{idle}\"\nboot-timeout = \"10s\"\n\
             [builders.{name}.boot]\nkind = \"command\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\n",
            31000 + i
        ));
    }
    let path = dir.join("lb.toml");
    std::fs::write(&path, &text).unwrap();
    let config = Config::parse(&text, &path).unwrap();
    (path, config)
}

/// Ready at once, then runs until stopped; writes its pid to `$INSTANCE_DIR/pid`.
const UP: &str = "echo $$ > \"$INSTANCE_DIR/pid\"; touch \"$INSTANCE_DIR/ready\"; exec sleep 1000";

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
    let task = tokio::spawn(s.serve(Arc::new(Fake), rx));
    Running {
        state_dir: opts.state_dir,
        signals,
        task,
    }
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

async fn state_of(
    c: &mut Client,
    name: &str,
) -> nix_lazy_builder::supervisor::proto::BuilderStatus {
    c.status()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
}

fn instance_pid(state_dir: &Path, name: &str) -> u32 {
    std::fs::read_to_string(state_dir.join("builders").join(name).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

// ------------------------------------------------------------------------------------------------
// In-process supervisor

#[tokio::test]
async fn state_dir_and_socket_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, config) = write_config(tmp.path(), &[("vm", UP, "0s")]);
    // A pre-existing state dir with loose permissions is tightened.
    std::fs::create_dir(&config.supervisor.state_dir).unwrap();
    std::fs::set_permissions(
        &config.supervisor.state_dir,
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    // A stale socket file is replaced.
    std::fs::write(config.supervisor.state_dir.join("supervisor.sock"), b"").unwrap();
    let r = serve(&config, false, Duration::from_secs(60)).await;
    assert_eq!(mode(&r.state_dir), 0o700);
    assert_eq!(mode(&r.state_dir.join("builders")), 0o700);
    assert_eq!(mode(&r.state_dir.join("builders/vm")), 0o700);
    assert_eq!(mode(&r.state_dir.join("supervisor.sock")), 0o600);
    assert_eq!(mode(&r.state_dir.join("supervisor.lock")), 0o600);
    let mut c = Client::connect(&r.state_dir).await.unwrap();
    assert_eq!(c.supervisor_pid(), std::process::id());
    let st = c.status().await.unwrap();
    assert_eq!(st.len(), 1);
    assert_eq!((st[0].name.as_str(), st[0].state), ("vm", State::Down));
    r.signals.send(()).unwrap();
    r.task.await.unwrap().unwrap();
    assert!(
        !r.state_dir.join("supervisor.sock").exists(),
        "socket removed at exit"
    );
}

#[tokio::test]
async fn a_second_supervisor_finds_the_first_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, config) = write_config(tmp.path(), &[("vm", UP, "0s")]);
    let r = serve(&config, true, Duration::from_secs(60)).await;
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
    r.signals.send(()).unwrap();
    r.task.await.unwrap().unwrap();
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
    let task = tokio::spawn(s.serve(Arc::new(Fake), rx));
    let mut c = Client::connect(&r.state_dir).await.unwrap();
    assert_eq!(c.status().await.unwrap().len(), 1);
    signals.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn malformed_requests_get_an_error_and_the_connection_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, config) = write_config(tmp.path(), &[("vm", UP, "0s")]);
    let r = serve(&config, false, Duration::from_secs(60)).await;
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
    let mut c = Client::connect(&r.state_dir).await.unwrap();
    c.status().await.unwrap();
    // The typed client turns an error reply into an error naming the socket and the request.
    let e = c.lease("nope").await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("supervisor.sock") && text.contains("lease 'nope'"),
        "{text}"
    );
    r.signals.send(()).unwrap();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn boot_lease_idle_stop_with_a_real_process() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, config) = write_config(tmp.path(), &[("vm", UP, "700ms")]);
    let r = serve(&config, false, Duration::from_secs(60)).await;
    let mut c = Client::connect(&r.state_dir).await.unwrap();
    let Verdict::Granted(st) = c.boot("vm", false).await.unwrap() else {
        panic!()
    };
    assert!(matches!(st.state, State::Booting | State::Up));
    let st = c.wait_ready("vm", Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.state, State::Up);
    assert_eq!(st.nix_version.as_deref(), Some("nix-store (Fake) 1.0"));
    assert_eq!(
        st.ssh_port,
        Some(31000),
        "the URI's port when the instance chose none"
    );
    let pid = instance_pid(&r.state_dir, "vm");
    assert!(alive(pid));
    assert!(matches!(c.lease("vm").await.unwrap(), Verdict::Granted(_)));
    // Held past the idle timeout: never stopped.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = state_of(&mut c, "vm").await;
    assert_eq!((st.state, st.leases), (State::Up, 1));
    assert!(alive(pid));
    c.release("vm").await.unwrap();
    let released = Instant::now();
    let mut other = Client::connect(&r.state_dir).await.unwrap();
    wait_for("the idle stop", Duration::from_secs(5), || !alive(pid)).await;
    let idle = released.elapsed();
    assert!(idle >= Duration::from_millis(650), "stopped after {idle:?}");
    let st = state_of(&mut other, "vm").await;
    assert_eq!(st.state, State::Down);
    assert_eq!(st.boots, 1);
    // The boot time was recorded and persisted.
    let history = std::fs::read_to_string(r.state_dir.join("boot-times.json")).unwrap();
    assert!(history.contains("\"vm\""), "{history}");
    r.signals.send(()).unwrap();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn failures_are_reported_in_one_line_and_back_off() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, config) = write_config(
        tmp.path(),
        &[
            ("broken", "echo starting >&2; exit 3", "0s"),
            ("vm", UP, "0s"),
        ],
    );
    let r = serve(&config, false, Duration::from_secs(60)).await;
    let mut c = Client::connect(&r.state_dir).await.unwrap();
    c.boot("broken", false).await.unwrap();
    let st = c
        .wait_ready("broken", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(st.state, State::Failed);
    let f = st.last_failure.unwrap();
    assert!(f.cause.contains("exit status: 3"), "{}", f.cause);
    assert!(!f.cause.contains('\n'));
    assert_eq!(f.consecutive, 1);
    assert!(f.retry_in_ms > 9000 && f.retry_in_ms <= 10_000);
    // Backing off: refused with the reason; another client sees the same.
    let mut c2 = Client::connect(&r.state_dir).await.unwrap();
    match c2.boot("broken", false).await.unwrap() {
        Verdict::Refused { reason, .. } => {
            assert!(
                reason.contains("exit status: 3")
                    && reason.contains("it is not booted again for another ")
                    && reason.ends_with("(`nix-lazy-builder up broken` boots it now)"),
                "{reason}"
            )
        }
        v => panic!("{v:?}"),
    }
    // The other builder is unaffected.
    c2.boot("vm", false).await.unwrap();
    assert_eq!(
        c2.wait_ready("vm", Duration::from_secs(10))
            .await
            .unwrap()
            .state,
        State::Up
    );
    // An instance that dies on its own is noticed at once.
    let pid = instance_pid(&r.state_dir, "vm");
    // SAFETY: killing the stand-in instance's process.
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
    assert_eq!(
        c2.wait_ready("vm", Duration::from_secs(10))
            .await
            .unwrap()
            .state,
        State::Up
    );
    r.signals.send(()).unwrap();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_boot_that_never_gets_ready_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, _) = write_config(tmp.path(), &[("slow", "exec sleep 1000", "0s")]);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("boot-timeout = \"10s\"", "boot-timeout = \"600ms\"");
    let config = Config::parse(&text, &path).unwrap();
    let r = serve(&config, false, Duration::from_secs(60)).await;
    let mut c = Client::connect(&r.state_dir).await.unwrap();
    c.boot("slow", false).await.unwrap();
    let st = c.wait_ready("slow", Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.state, State::Failed);
    let cause = st.last_failure.unwrap().cause;
    assert!(cause.contains("deadline"), "{cause}");
    r.signals.send(()).unwrap();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_stops_instances_even_when_leased() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, config) = write_config(tmp.path(), &[("a", UP, "0s"), ("b", UP, "0s")]);
    let r = serve(&config, false, Duration::from_secs(60)).await;
    let mut c = Client::connect(&r.state_dir).await.unwrap();
    for b in ["a", "b"] {
        c.boot(b, false).await.unwrap();
        c.wait_ready(b, Duration::from_secs(10)).await.unwrap();
    }
    assert!(matches!(c.lease("a").await.unwrap(), Verdict::Granted(_)));
    let pids = [
        instance_pid(&r.state_dir, "a"),
        instance_pid(&r.state_dir, "b"),
    ];
    r.signals.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), r.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    for pid in pids {
        assert!(!alive(pid), "instance {pid} survived the supervisor");
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
    let (_, config) = write_config(tmp.path(), &[("vm", UP, "300ms")]);
    let r = serve(&config, true, Duration::from_millis(400)).await;
    let mut c = Client::connect(&r.state_dir).await.unwrap();
    c.boot("vm", false).await.unwrap();
    c.wait_ready("vm", Duration::from_secs(10)).await.unwrap();
    // One build (a builder never leased since its boot gets a longer first grace).
    assert!(matches!(c.lease("vm").await.unwrap(), Verdict::Granted(_)));
    c.release("vm").await.unwrap();
    let pid = instance_pid(&r.state_dir, "vm");
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
    let (path, config) = write_config(tmp.path(), &[("vm", UP, "0s")]);
    let r = serve(&config, false, Duration::from_secs(60)).await;
    let mut c = Client::connect(&r.state_dir).await.unwrap();
    // Too fresh for the "file changed" check (an editor may still be writing it), but a
    // request that names the new builder rereads it at once.
    write_config(tmp.path(), &[("vm", UP, "0s"), ("new", UP, "0s")]);
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
    assert_eq!(
        c.wait_ready("new", Duration::from_secs(10))
            .await
            .unwrap()
            .state,
        State::Up
    );
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
    r.signals.send(()).unwrap();
    r.task.await.unwrap().unwrap();
}

// ------------------------------------------------------------------------------------------------
// Separate processes

/// This test binary, run as one of the helpers below.
fn helper(name: &str, env: &[(&str, &OsString)]) -> StartCommand {
    StartCommand {
        program: std::env::current_exe().unwrap(),
        args: one_test_args(module_path!(), name)
            .into_iter()
            .map(OsString::from)
            .collect(),
        env: env
            .iter()
            .map(|(k, v)| (OsString::from(k), (*v).clone()))
            .collect(),
    }
}

const CHILD_CONFIG: &str = "NLB_TEST_CHILD_CONFIG";
const CHILD_STATE: &str = "NLB_TEST_CHILD_STATE";

/// Helper process: a supervisor (auto-started) with the stand-in backend.
#[test]
#[ignore = "helper process for the tests below"]
fn child_supervisor() {
    let Some(config) = std::env::var_os(CHILD_CONFIG) else {
        return;
    };
    let code = nix_lazy_builder::supervisor::main_with(
        SuperviseArgs {
            config: nix_lazy_builder::config::resolve_config_path(Some(config.as_ref()), None),
            auto: true,
        },
        Arc::new(Fake),
    );
    std::process::exit(code.into());
}

/// Helper process: lease builder "vm", say so on stdout, wait to be killed.
#[test]
#[ignore = "helper process for the tests below"]
fn child_client() {
    let Some(state) = std::env::var_os(CHILD_STATE) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = Client::connect(Path::new(&state)).await.unwrap();
        assert!(matches!(c.lease("vm").await.unwrap(), Verdict::Granted(_)));
        println!("LEASED");
        std::io::stdout().flush().unwrap();
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
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

#[tokio::test]
async fn auto_start_detaches_and_inherits_no_descriptors() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, config) = write_config(tmp.path(), &[("vm", UP, "0s")]);
    let state = config.supervisor.state_dir.clone();
    // Like the descriptors nix-daemon hands a hook: open, not close-on-exec.
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let pipe_target = std::fs::read_link(format!("/proc/self/fd/{}", fds[1])).unwrap();
    let linger = OsString::from("60000");
    let cmd = helper(
        "child_supervisor",
        &[
            (CHILD_CONFIG, &path.clone().into_os_string()),
            ("NIX_LAZY_BUILDER_SUPERVISOR_LINGER_MS", &linger),
        ],
    );
    let mut c = Client::connect_or_start_with(&state, &cmd).await.unwrap();
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
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&log), 0o600);
    c.status().await.unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("serving 1 lazy builder(s)"), "{text}");
    // SAFETY: closing the pipe this test made.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

#[tokio::test]
async fn racing_starters_end_on_one_supervisor() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, config) = write_config(tmp.path(), &[("vm", UP, "0s")]);
    let state = config.supervisor.state_dir.clone();
    let cmd = helper(
        "child_supervisor",
        &[(CHILD_CONFIG, &path.into_os_string())],
    );
    let (a, b, c) = tokio::join!(
        Client::connect_or_start_with(&state, &cmd),
        Client::connect_or_start_with(&state, &cmd),
        Client::connect_or_start_with(&state, &cmd),
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
}

#[tokio::test]
async fn a_killed_client_releases_its_lease() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, config) = write_config(tmp.path(), &[("vm", UP, "0s")]);
    let state = config.supervisor.state_dir.clone();
    let cmd = helper(
        "child_supervisor",
        &[(CHILD_CONFIG, &path.into_os_string())],
    );
    let mut c = Client::connect_or_start_with(&state, &cmd).await.unwrap();
    let _reap = Reap(c.supervisor_pid());
    c.boot("vm", false).await.unwrap();
    assert_eq!(
        c.wait_ready("vm", Duration::from_secs(10))
            .await
            .unwrap()
            .state,
        State::Up
    );
    let client = helper(
        "child_client",
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
        // libtest may have written "test child_client ... " before it on the same line.
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
}

#[tokio::test]
async fn a_supervisor_that_cannot_start_is_reported_with_its_log() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[builders.x]\nbogus = 1\n").unwrap();
    let cmd = helper("child_supervisor", &[(CHILD_CONFIG, &bad.into_os_string())]);
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
}
