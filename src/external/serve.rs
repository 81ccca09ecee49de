//! `nix-lazy-builder external-serve`: the root helper the supervisor starts for one external
//! build (fd 0: the client's build-socket connection; fd 2: the client's log pipe).
//!
//! It validates build.json again (the client is not trusted), says the build is under way,
//! then does what the hook does for a `try` it accepts, with the same planner, slots, leases,
//! boots and connections (`hook::plan`, `slots`, `lazy`, the hook's `connect`): builders are
//! chosen by system and required features from the same TOML and machines table, a lazy one is
//! booted and waited for (there is no postpone here: the build just waits, showing the boot on
//! the log). On the builder it copies the input paths the remote lacks, builds the
//! BasicDerivation made from build.json and streams each output's NAR to the client, which
//! unpacks it.
//!
//! Must never: write into the local store (the outputs are the client's to unpack, and
//! nix-daemon's to register), build anything but the validated job, or print `@nix` lines (its
//! stderr is the build log).

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hook_protocol::StorePath;
use hook_protocol::hook::TryRequest;
use hook_protocol::log::{Verbosity, strip_ansi};
use hook_protocol::serve::BuildOptions;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;

use super::job::ExternalJob;
use super::proto::{BuildRequest, Frame, MAX_LINE};
use crate::config::{self, Builder, Config, ConfigPath};
use crate::hook::plan::{self, Planner};
use crate::hook::{DoorStep, HeldSlot, carry_out, connect, connect_failed, nix_state_dir, say};
use crate::lazy::{self, Lazy};
use crate::logging;
use crate::memory::FailureMemory;
use crate::place;
use crate::select::{LocalCapability, Mismatch, check_match};
use crate::slots::{LoadDir, UploadLockOutcome};
use crate::store::{BuildLog, LocalStore, NarSink, RemoteError};
use crate::transfer::topo_sort;
use crate::wire_io::WireReader;

/// How long between two looks when every matching builder is busy or booting.
const RETRY: Duration = Duration::from_secs(1);
/// How long Nix's hook waits for another hook's upload to the same builder.
const UPLOAD_LOCK_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Why the external build did not produce its outputs: the message for the log, the exit code.
struct Failure {
    message: String,
    exit_code: u8,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            message: e.to_string(),
            exit_code: 1,
        }
    }
}

/// Runs the helper; returns its exit status (the supervisor only logs it).
pub fn main(config: ConfigPath) -> ExitCode {
    crate::os::cloexec_from(3);
    logging::init_plain(Verbosity::Info);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            logging::error(&format!("cannot start: {e}"));
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(run(config));
    rt.shutdown_timeout(Duration::from_millis(300));
    ExitCode::from(code)
}

async fn run(config: ConfigPath) -> u8 {
    // SAFETY: the supervisor gives us the connection as fd 0 and nothing else uses it.
    let fd = unsafe { libc::dup(0) };
    if fd < 0 {
        logging::error("no build-socket connection on fd 0");
        return 1;
    }
    let std_stream = std::os::unix::net::UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let stream = match std_stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(std_stream))
    {
        Ok(s) => s,
        Err(e) => {
            logging::error(&format!("fd 0 is not a socket: {e}"));
            return 1;
        }
    };
    // The client's pid names its hidden unpack directories (see `note_unpack_dirs`).
    let client_pid = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .and_then(|p| u32::try_from(p).ok());
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::new();
    let job = match (&mut rd)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .await
    {
        Ok(_) => serde_json::from_slice::<BuildRequest>(&line)
            .map_err(|e| format!("a request that is not one: {e}"))
            .and_then(|r| ExternalJob::parse(r.build_json.as_bytes()).map_err(|e| e.to_string())),
        Err(e) => Err(format!("reading the request: {e}")),
    };
    let job = match job {
        Ok(j) => j,
        Err(message) => {
            let _ = send(
                &mut wr,
                &Frame::Failed {
                    message,
                    exit_code: 1,
                },
            )
            .await;
            return 1;
        }
    };
    if send(&mut wr, &Frame::Started).await.is_err() {
        return 1;
    }
    // SAFETY: fd 2 is the client's log pipe, given by the supervisor; the duplicate is ours.
    let log_fd = unsafe { libc::dup(2) };
    let log = BuildLog::new((log_fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(log_fd) }));
    // What killed clients of earlier builds left (this one's client is alive).
    place::sweep_stale(Path::new(&job.real_store_dir), &nix_state_dir());
    let outcome = tokio::select! {
        biased;
        r = build(&job, &config, client_pid, log, &mut wr) => r,
        () = client_gone(rd) => {
            // nix-daemon killed the client (`timeout`, `max-silent-time`, `max-log-size`, an
            // interrupted client): the build is cancelled by this process ending, as a killed
            // hook's is (its SSH connection, or the warm session's sockets, close with it).
            tracing::warn!("the external-build client went away; the build is cancelled");
            return 2;
        }
    };
    match outcome {
        Ok(()) => {
            let _ = send(&mut wr, &Frame::Done).await;
            0
        }
        Err(f) => {
            let _ = send(
                &mut wr,
                &Frame::Failed {
                    message: f.message,
                    exit_code: f.exit_code,
                },
            )
            .await;
            f.exit_code.max(1)
        }
    }
}

/// Resolves once the client's end of the connection is closed (it sends nothing after its
/// request, so anything read is ignored).
async fn client_gone(mut rd: BufReader<tokio::net::unix::OwnedReadHalf>) {
    let mut buf = [0u8; 256];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn send(wr: &mut OwnedWriteHalf, f: &Frame) -> std::io::Result<()> {
    wr.write_all(&f.to_line()).await
}

/// One line naming what each builder lacks for this job.
fn no_builder(job: &ExternalJob, table: &[Builder]) -> Option<String> {
    let why: Vec<String> = table
        .iter()
        .filter_map(
            |b| match check_match(b, &job.system, &job.required_features) {
                Ok(()) => None,
                Err(Mismatch::System) => {
                    Some(format!("'{}' does not build {}", b.name, job.system))
                }
                Err(Mismatch::Features(f)) => {
                    Some(format!("'{}' lacks the features {}", b.name, f.join(", ")))
                }
                Err(Mismatch::Mandatory(f)) => Some(format!(
                    "'{}' only takes derivations requiring {}",
                    b.name,
                    f.join(", ")
                )),
            },
        )
        .collect();
    if why.len() < table.len() {
        return None;
    }
    let features = if job.required_features.is_empty() {
        String::new()
    } else {
        let f: Vec<&str> = job.required_features.iter().map(String::as_str).collect();
        format!(" with features {}", f.join(", "))
    };
    Some(if table.is_empty() {
        format!(
            "no builder for '{}'{features}: nix-lazy-builder has no builders configured",
            job.system
        )
    } else {
        format!(
            "no builder for '{}'{features}: {}",
            job.system,
            why.join("; ")
        )
    })
}

async fn build(
    job: &ExternalJob,
    config: &ConfigPath,
    client_pid: Option<u32>,
    mut log: BuildLog,
    wr: &mut OwnedWriteHalf,
) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    let table = config::load_table(
        config::DEFAULT_BUILDERS,
        std_system(),
        std::env::var("NIX_SSHOPTS").ok().as_deref(),
        &cfg,
    )?;
    for n in &table.notes {
        n.emit();
    }
    let builders = &table.builders;
    if let Some(line) = no_builder(job, builders) {
        return Err(Failure {
            message: line,
            exit_code: 1,
        });
    }
    let load_dir = LoadDir::open(&nix_state_dir())?;
    let mut lazy = Lazy::new(
        cfg.supervisor.state_dir.clone(),
        config.named().map(ToOwned::to_owned),
    );
    // Nothing is ever built here: the local machine can do nothing, so the planner never
    // declines in its favour.
    let local = LocalCapability {
        system: String::new(),
        max_jobs: 0,
        ..Default::default()
    };
    let mut planner = Planner::new(builders, local, plan::Limits::new(lazy::wait_limit(5)));
    let memory_cell = std::cell::OnceCell::new();
    let memory = || memory_cell.get_or_init(|| FailureMemory::open(&cfg.supervisor.state_dir));
    let req = TryRequest {
        am_willing: false,
        needed_system: job.system.clone(),
        drv_path: job.drv_path(),
        required_features: job.required_features.clone(),
    };
    loop {
        let mut held = HeldSlot::default();
        let mut step = planner.start(&req, Instant::now());
        let declined = loop {
            for note in std::mem::take(&mut step.notes) {
                if let plan::Note::Say { text, .. } = &note {
                    // Kept for the error, if this ends in a decline.
                    tracing::debug!("planner: {text}");
                }
                say(note);
            }
            held.keep(step.holding());
            step = match carry_out(
                step.next, builders, &load_dir, &mut lazy, &memory, &mut held,
            )
            .await
            .map_err(Failure::from)?
            {
                Ok(next) => next,
                // Nothing is read here: the derivation is the one build.json describes.
                Err(DoorStep::ReadDrv(s)) => s.read(None, Instant::now()),
                Err(DoorStep::Connect(s)) => {
                    let b = &builders[s.builder()];
                    match connect(b, s.port(), &log, &mut lazy).await {
                        Ok(mut remote) => {
                            lazy.stop_progress();
                            if !b.is_lazy() {
                                memory().clear(b);
                            }
                            let slot = held.take_for(Some(s.builder()));
                            let outcome = on_builder(
                                job,
                                b,
                                &mut remote,
                                &mut log,
                                &load_dir,
                                client_pid,
                                wr,
                            )
                            .await;
                            if let Err(Some(e)) = &outcome.as_ref().map_err(|f| f.broke.clone())
                                && b.is_lazy()
                            {
                                lazy.report_failure(b, e).await;
                            }
                            drop(slot);
                            lazy.settle().await;
                            return outcome.map_err(|f| f.failure);
                        }
                        Err(e) => {
                            connect_failed(b, &e, &mut lazy, memory).await;
                            s.failed(&e.to_string(), Instant::now())
                        }
                    }
                }
                Err(DoorStep::Postpone { showing }) => {
                    // The hook would postpone; this build waits and looks again.
                    if let Some(status) = &showing {
                        lazy.show_progress(status);
                    }
                    break false;
                }
                Err(DoorStep::Decline) => break true,
            };
        };
        if declined {
            return Err(Failure {
                message: format!(
                    "no builder for '{}' can take '{}' now (see the messages above)",
                    job.system,
                    req.drv_path.name()
                ),
                exit_code: 1,
            });
        }
        drop(held);
        tokio::time::sleep(RETRY).await;
    }
}

/// A failure on the builder, and whether it was the builder breaking (for the supervisor).
struct OnBuilder {
    failure: Failure,
    broke: Option<String>,
}

fn fail(message: String, broke: bool) -> OnBuilder {
    OnBuilder {
        broke: broke.then(|| message.clone()),
        failure: Failure {
            message,
            exit_code: 1,
        },
    }
}

fn remote_broke(e: &RemoteError) -> bool {
    use crate::wire_io::WireError;
    matches!(
        e,
        RemoteError::Ssh(_)
            | RemoteError::Closed { .. }
            | RemoteError::Write { .. }
            | RemoteError::Wire(WireError::Io { .. } | WireError::UnexpectedEof { .. })
    )
}

/// Steps 3 to 5 on the connected builder: the missing inputs, the build, the outputs to the
/// client.
async fn on_builder(
    job: &ExternalJob,
    b: &Builder,
    remote: &mut crate::store::Remote,
    log: &mut BuildLog,
    load_dir: &LoadDir,
    client_pid: Option<u32>,
    wr: &mut OwnedWriteHalf,
) -> Result<(), OnBuilder> {
    let uri = b.store_uri.clone();
    let on = |what: &str| {
        let uri = uri.clone();
        let what = what.to_owned();
        move |e: RemoteError| {
            let broke = remote_broke(&e);
            fail(format!("{what} '{uri}': {e}"), broke)
        }
    };
    // 3. The inputs the remote lacks, under the builder's upload lock (as the hook).
    let lock_dir = load_dir.clone();
    let key = b.slot_key().to_owned();
    let upload_lock =
        tokio::task::spawn_blocking(move || lock_dir.upload_lock(&key, UPLOAD_LOCK_TIMEOUT))
            .await
            .map_err(|e| fail(format!("upload lock thread: {e}"), false))?
            .map_err(|e| fail(e.to_string(), false))?;
    if let UploadLockOutcome::TimedOut = upload_lock {
        tracing::warn!("somebody is hogging the upload lock for '{uri}', continuing...");
    }
    let inputs: Vec<_> = job.input_paths.iter().cloned().collect();
    let present = remote
        .query_valid_paths(&inputs, false)
        .await
        .map_err(on("copying inputs to"))?;
    let missing: Vec<_> = inputs
        .into_iter()
        .filter(|p| !present.contains(p))
        .collect();
    if !missing.is_empty() {
        let mut local = LocalStore::connect()
            .await
            .map_err(|e| fail(format!("reading the local store: {e}"), false))?;
        let infos = local
            .path_infos(&missing)
            .await
            .map_err(|e| fail(format!("reading the local store: {e}"), false))?;
        let infos = topo_sort(infos);
        logging::send(&hook_protocol::log::Message::msg(
            Verbosity::Info,
            format!("copying {} paths to '{uri}'", infos.len()),
        ));
        remote
            .add_paths(&infos, &mut local)
            .await
            .map_err(on("copying inputs to"))?;
    }
    drop(upload_lock);

    // 4. Build. The daemon enforces max-silent-time, timeout and the log size on this
    // program's own output, which is the remote's log as it comes.
    logging::send(&hook_protocol::log::Message::msg(
        Verbosity::Info,
        format!("building on '{uri}'"),
    ));
    let drv_path = job.drv_path();
    let options = BuildOptions {
        max_silent_time: 0,
        build_timeout: 0,
        max_log_size: 0,
        nr_repeats: 0,
        enforce_determinism: false,
        keep_failed: false,
    };
    let result = remote
        .build(&drv_path, &job.basic_derivation(), &options, log)
        .await
        .map_err(on("building on"))?;
    if !result.is_success() {
        let code = match result.status {
            hook_protocol::build_result::BuildStatus::TimedOut => 101,
            _ => 100,
        };
        return Err(OnBuilder {
            broke: None,
            failure: Failure {
                message: format!(
                    "build on '{uri}' failed: {}",
                    strip_ansi(result.error_msg.trim())
                ),
                exit_code: code,
            },
        });
    }

    // 5. Every output, to the client.
    let paths: Vec<_> = job.outputs.values().cloned().collect();
    let infos = remote
        .query_path_infos(&paths)
        .await
        .map_err(on("copying outputs from"))?;
    let by_path: BTreeMap<_, _> = infos.iter().map(|i| (i.path.clone(), i)).collect();
    // The client, the build user, cannot write the unpack journal under Nix's state
    // directory: this root side notes its hidden unpack directories for it, before it makes
    // them, so that if nix-daemon kills it mid-unpack the next sweep removes them.
    if let Some(pid) = client_pid {
        let real: Vec<_> = job
            .outputs
            .values()
            .filter_map(|p| StorePath::parse(&job.real_path(p)).ok())
            .collect();
        if let Err(e) = place::note_unpack_dirs(&nix_state_dir(), pid, &real) {
            tracing::warn!("cannot note the client's unpack directories: {e}");
        }
    }
    for (name, path) in &job.outputs {
        let info = by_path.get(path).ok_or_else(|| {
            fail(
                format!("'{uri}' built the derivation but has no valid output '{path}'"),
                false,
            )
        })?;
        let frame = Frame::Output {
            name: name.clone(),
            path: path.to_string(),
            nar_hash: info.nar_hash.to_base16(),
            nar_size: info.nar_size,
        };
        send(wr, &frame)
            .await
            .map_err(|e| fail(format!("sending '{path}' to the client: {e}"), false))?;
        let mut sink = SocketSink {
            wr: &mut *wr,
            left: info.nar_size,
        };
        remote
            .nar(info, &mut sink)
            .await
            .map_err(on(&format!("copying {path} from")))?;
        if sink.left != 0 {
            return Err(fail(
                format!("'{uri}' sent a NAR of '{path}' shorter than it said"),
                false,
            ));
        }
    }
    Ok(())
}

/// Writes one NAR to the client, never more than the size announced in its frame.
struct SocketSink<'a> {
    wr: &'a mut OwnedWriteHalf,
    left: u64,
}

impl NarSink for SocketSink<'_> {
    async fn write(&mut self, data: &[u8]) -> Result<(), RemoteError> {
        if data.len() as u64 > self.left {
            return Err(RemoteError::Protocol {
                peer: "the builder".into(),
                message: "a NAR longer than its size".into(),
            });
        }
        self.left -= data.len() as u64;
        self.wr
            .write_all(data)
            .await
            .map_err(|source| RemoteError::Write {
                peer: "the external-build client".into(),
                source,
            })
    }

    async fn write_from<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        reader: &mut WireReader<R>,
        max: usize,
    ) -> Result<usize, RemoteError> {
        let chunk = reader.read_raw_chunk(max, "a NAR").await?;
        let n = chunk.len();
        let chunk = chunk.to_vec();
        self.write(&chunk).await?;
        Ok(n)
    }
}

/// This machine's Nix system name (the default for machines lines without one).
fn std_system() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "x86_64-linux",
        "aarch64" => "aarch64-linux",
        _ => "x86_64-linux",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BuilderUri, HostKeySpec, Origin};
    use std::collections::BTreeSet;

    fn builder(name: &str, system: &str, features: &[&str]) -> Builder {
        let uri = format!("ssh://{name}");
        Builder {
            name: name.to_owned(),
            uri: BuilderUri::parse(&uri).unwrap(),
            store_uri: uri,
            systems: BTreeSet::from([system.to_owned()]),
            ssh_key: None,
            max_jobs: 1,
            speed_factor: 1.0,
            supported_features: features.iter().map(|f| (*f).to_owned()).collect(),
            mandatory_features: BTreeSet::new(),
            host_keys: HostKeySpec::SshDefault,
            allow_well_known_host_key: false,
            keep_warm: Duration::ZERO,
            origin: Origin::Toml {
                file: "/t".into(),
                name: name.to_owned(),
            },
            lazy: None,
        }
    }

    fn job(features: &[&str]) -> ExternalJob {
        let j = serde_json::json!({
            "version": 1, "builder": "/bin/sh", "args": [],
            "env": {"requiredSystemFeatures": features.join(" ")},
            "topTmpDir": "/t", "tmpDir": "/t/build", "tmpDirInSandbox": "/build",
            "storeDir": "/nix/store", "realStoreDir": "/nix/store",
            "system": "aarch64-linux", "inputPaths": [],
            "outputs": {"out": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x"}
        });
        ExternalJob::parse(j.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn no_builder_names_what_each_lacks() {
        let table = [
            builder("x86", "x86_64-linux", &[]),
            builder("arm", "aarch64-linux", &[]),
        ];
        assert_eq!(
            no_builder(&job(&["kvm"]), &table).unwrap(),
            "no builder for 'aarch64-linux' with features kvm: 'x86' does not build \
             aarch64-linux; 'arm' lacks the features kvm"
        );
        assert_eq!(no_builder(&job(&[]), &table), None);
        assert!(
            no_builder(&job(&[]), &[])
                .unwrap()
                .contains("no builders configured")
        );
    }
}
