//! One remote build, after `# accept` (steps 1 and 2, choosing a builder and connecting, are the
//! hook's): 3. copy the missing inputs, 4. build, streaming the log, 5. bring the outputs back,
//! verified, and 6. register them. Each copy shows Nix's own activities (`logging::CopyPaths`).
//!
//! A floating content-addressed derivation (always resolved by the daemon before it reaches a
//! hook) has no output paths until it is built: the remote's BuildResult names them, with their
//! realisations. Its outputs are added through the local daemon (AddToStoreNar, which verifies
//! them and records their content address; the daemon holds no lock on those paths,
//! docs/protocol.md §4.6), then their realisations are registered (RegisterDrvOutput), as Nix's
//! own hook does.
//!
//! An `ssh-ng://` daemon that says it does not trust us gets, for an input-addressed
//! derivation, the closure of the `.drv` instead of the inputs and builds it from its own store
//! (BuildPathsWithResults), as Nix's own build-remote does; every other builder (trusted, or
//! too old to say) takes the BuildDerivation path.
//!
//! Owns the order of operations and what counts as success. It never parses a wire (that is
//! `hook-protocol`), never opens connections or starts processes (the hook hands it a
//! [`Remote`], a [`LocalStore`] and the [`Registrar`] it started at accept time), and never
//! makes a path valid except through `place`, after its hash was checked, or, for a floating
//! content-addressed output, through the local daemon, which checks it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

use hook_protocol::StorePath;
use hook_protocol::build_result::RealisationsError;
use hook_protocol::build_result::{BuildResult, BuildStatus};
use hook_protocol::derivation::{Derivation, OutputKind};
use hook_protocol::log::activity;
use hook_protocol::log::{Verbosity, strip_ansi};
use hook_protocol::path_info::PathInfo;
use hook_protocol::realisation::Realisation;
use hook_protocol::serve::BuildOptions;
use hook_protocol::worker::{RealisationsUnsupported, Trust};
use tokio::sync::mpsc;

use crate::logging::{Activity, CopyPath, CopyPaths};
use crate::place::{ChunkReader, ExpectedNar, PlaceError, Placed, Registrar};
use crate::store::{BuildLog, LocalStore, NarSink, NarSource, Remote, RemoteError};
use crate::wire_io::{WireError, WireReader};

/// Everything the daemon told us about the build.
pub struct Job {
    pub drv_path: StorePath,
    pub drv: Derivation,
    /// The input closure (from the daemon, after `# accept`).
    pub inputs: BTreeSet<StorePath>,
    /// Outputs the daemon wants (names).
    pub wanted: BTreeSet<String>,
    pub substitute_on_remote: bool,
    pub options: BuildOptions,
    /// Nix's state directory (`NIX_STATE_DIR`, `/nix/var/nix`): the unpack journal lives there.
    pub state_dir: PathBuf,
}

/// Why a remote build did not produce its outputs.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The build itself failed on the builder: Nix's own wording.
    #[error("build of '{drv}' on '{uri}' failed: {message}")]
    BuildFailed {
        drv: String,
        uri: String,
        status: BuildStatus,
        message: String,
    },
    #[error("copying inputs to '{uri}': {source}")]
    Upload {
        uri: String,
        #[source]
        source: RemoteError,
    },
    #[error("building on '{uri}': {source}")]
    Build {
        uri: String,
        #[source]
        source: RemoteError,
    },
    /// The builder's nix-daemon does not trust the SSH user and refused what an untrusted
    /// client may not do.
    #[error(
        "'{uri}' does not trust its SSH user and refused {what}: {source}\n\
         To build there, add that user to `trusted-users` in the builder's nix.conf (or sign the \
         paths with a key in its `trusted-public-keys`)"
    )]
    Untrusted {
        uri: String,
        what: &'static str,
        #[source]
        source: RemoteError,
    },
    #[error("reading the local store: {0}")]
    Local(#[source] RemoteError),
    #[error("copying outputs from '{uri}': {source}")]
    Download {
        uri: String,
        #[source]
        source: RemoteError,
    },
    /// The NAR stream of one output broke off.
    #[error("copying {path} from '{uri}': {source}")]
    DownloadNar {
        uri: String,
        path: String,
        #[source]
        source: RemoteError,
    },
    #[error("copying outputs from '{uri}': {source}")]
    Place {
        uri: String,
        #[source]
        source: PlaceError,
    },
    #[error("'{uri}' built '{drv}' but has no valid output '{path}'")]
    OutputMissing {
        uri: String,
        drv: String,
        path: String,
    },
    #[error("'{drv}': {source}")]
    Derivation {
        drv: String,
        #[source]
        source: hook_protocol::derivation::DerivationError,
    },
    #[error(
        "'{drv}' has outputs whose paths are only known after the build but is not a resolved \
         content-addressed derivation (impure, or with unbuilt inputs), which nix-lazy-builder \
         cannot build remotely"
    )]
    FloatingOutputs { drv: String },
    /// The local daemon cannot record the realisations a content-addressed build needs.
    #[error(
        "cannot build the content-addressed '{drv}' remotely: the local store cannot record \
         its realisations: {source}"
    )]
    LocalRealisations {
        drv: String,
        #[source]
        source: RealisationsUnsupported,
    },
    /// The remote's BuildResult does not name the outputs the derivation should have.
    #[error("'{uri}' built '{drv}', but {source}")]
    Realisations {
        uri: String,
        drv: String,
        #[source]
        source: RealisationsError,
    },
    /// The local daemon refused an output (bad hash or content address) or its realisation.
    #[error("adding {what} from '{uri}' to the local store: {source}")]
    AddOutput {
        uri: String,
        what: String,
        #[source]
        source: RemoteError,
    },
}

impl TransferError {
    /// Whether the connection to the builder broke (it died, froze, or hung up), as opposed
    /// to the build failing, the builder answering with nonsense, or a local problem.
    pub fn builder_broke(&self) -> bool {
        match self {
            TransferError::Upload { source, .. }
            | TransferError::Build { source, .. }
            | TransferError::Download { source, .. }
            | TransferError::DownloadNar { source, .. } => matches!(
                source,
                RemoteError::Ssh(_)
                    | RemoteError::Closed { .. }
                    | RemoteError::Write { .. }
                    | RemoteError::Wire(WireError::Io { .. } | WireError::UnexpectedEof { .. })
            ),
            _ => false,
        }
    }

    /// The hook's exit status: Nix 2.8–2.28 map 100 to a permanent build failure and 101 to a
    /// timeout (docs/protocol.md §4.5); anything else is a miscellaneous failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            TransferError::BuildFailed { status, .. } => match status {
                BuildStatus::TimedOut => 101,
                BuildStatus::PermanentFailure
                | BuildStatus::OutputRejected
                | BuildStatus::NotDeterministic => 100,
                _ => 1,
            },
            _ => 1,
        }
    }
}

/// Milliseconds spent in each step, for the log and for benchmarks.
#[derive(Debug, Default, Clone)]
pub struct Timings {
    pub query_ms: u128,
    pub upload_ms: u128,
    pub uploaded_paths: usize,
    pub uploaded_bytes: u64,
    pub build_ms: u128,
    pub download_ms: u128,
    pub downloaded_bytes: u64,
}

/// Runs the build on `remote`. `upload_lock` (the builder's upload lock, held by the caller's
/// choice) is released as soon as the inputs are there; `registrar` (started at accept time)
/// registers the outputs.
pub async fn run<L>(
    job: &Job,
    remote: &mut Remote,
    local: &mut LocalStore,
    log: &mut BuildLog,
    upload_lock: L,
    registrar: Registrar,
) -> Result<Timings, TransferError> {
    let uri = remote.uri().to_owned();
    let mut t = Timings::default();
    // A resolved floating content-addressed derivation: the realisation id of each output.
    let ca = job.drv.floating_output_ids();
    if ca.is_some() {
        // Before anything is built: a local daemon that could not record the result fails now.
        local
            .realisations_supported()
            .map_err(|source| TransferError::LocalRealisations {
                drv: job.drv_path.to_string(),
                source,
            })?;
    }

    // A daemon that does not trust us refuses unsigned input-addressed paths and
    // BuildDerivation of input-addressed derivations, but accepts content-addressed `.drv`
    // files and builds what it lacks itself (as Nix's own build-remote does). A daemon that does
    // not say (ssh://, worker < 1.35) is taken to trust us.
    let untrusted = remote.trust() == Some(Trust::NotTrusted) && is_input_addressed(&job.drv);
    if untrusted {
        tracing::debug!(
            "'{uri}' does not trust us and '{}' is input-addressed: copying the derivation's \
             closure and building it there with BuildPathsWithResults",
            job.drv_path
        );
    } else {
        tracing::debug!(
            "'{uri}': copying the missing inputs and building with BuildDerivation (trust: {:?})",
            remote.trust()
        );
    }
    upload(job, remote, local, &uri, &mut t, untrusted).await?;

    drop(upload_lock);

    // Step 4: build.
    let outputs = job
        .drv
        .output_paths()
        .map_err(|source| TransferError::Derivation {
            drv: job.drv_path.to_string(),
            source,
        })?;
    if ca.is_none() && outputs.values().any(Option::is_none) {
        return Err(TransferError::FloatingOutputs {
            drv: job.drv_path.to_string(),
        });
    }
    let start = Instant::now();
    let result: BuildResult = if untrusted {
        let names: BTreeSet<String> = outputs.keys().cloned().collect();
        remote
            .build_from_store(&job.drv_path, names, &job.options, log)
            .await
            .map_err(refused_or(
                &uri,
                "to build the derivation",
                |uri, source| TransferError::Build { uri, source },
            ))?
    } else {
        let basic = job.drv.basic_for_remote(&job.inputs);
        remote
            .build(&job.drv_path, &basic, &job.options, log)
            .await
            .map_err(|source| TransferError::Build {
                uri: uri.clone(),
                source,
            })?
    };
    t.build_ms = start.elapsed().as_millis();
    if !result.is_success() {
        return Err(TransferError::BuildFailed {
            drv: job.drv_path.to_string(),
            uri,
            status: result.status,
            message: strip_ansi(result.error_msg.trim()),
        });
    }

    if ca.is_some() {
        let start = Instant::now();
        bring_back_realised(job, &result, remote, local, &uri, &mut t).await?;
        t.download_ms = start.elapsed().as_millis();
        return Ok(t);
    }

    // Step 5: every output not valid locally (all of them, as Nix's hook does), verified.
    let start = Instant::now();
    let fetch = invalid_here(local, outputs.into_values().flatten().collect()).await?;
    if fetch.is_empty() {
        t.download_ms = start.elapsed().as_millis();
        return Ok(t);
    }
    let remote_infos = infos_there(remote, &fetch, &uri).await?;
    let by_path: BTreeMap<&StorePath, &PathInfo> =
        remote_infos.iter().map(|i| (&i.path, i)).collect();
    let _act = copying(format!("copying outputs from '{uri}'"));
    let mut copy = CopyPaths::start(
        fetch.len(),
        fetch
            .iter()
            .filter_map(|p| by_path.get(p))
            .map(|i| i.nar_size)
            .sum(),
    );
    let swept =
        crate::place::sweep_stale(std::path::Path::new(fetch[0].store_dir()), &job.state_dir);
    if swept > 0 {
        tracing::debug!("removed {swept} unpack directories left by killed hooks");
    }
    let mut placed = Placed::journaled(&job.state_dir);
    for path in &fetch {
        let info = *by_path
            .get(path)
            .ok_or_else(|| TransferError::OutputMissing {
                uri: uri.clone(),
                drv: job.drv_path.to_string(),
                path: path.to_string(),
            })?;
        let mut shown = copy.path(info.path.as_str(), &uri, false, info.nar_size);
        placed = download_one(remote, info, &job.drv_path, placed, &uri, &mut shown).await?;
        copy.finished(shown);
        t.downloaded_bytes += info.nar_size;
    }
    drop(copy);
    tokio::task::spawn_blocking(move || placed.register(registrar))
        .await
        .map_err(|_| TransferError::Place {
            uri: uri.clone(),
            source: PlaceError::Thread,
        })?
        .map_err(|source| TransferError::Place {
            uri: uri.clone(),
            source,
        })?;
    t.download_ms = start.elapsed().as_millis();
    Ok(t)
}

/// Step 3: what the builder lacks, under one "copying dependencies" activity; for a builder
/// that does not trust us (`untrusted`) the closure of the `.drv`, else the inputs.
async fn upload(
    job: &Job,
    remote: &mut Remote,
    local: &mut LocalStore,
    uri: &str,
    t: &mut Timings,
    untrusted: bool,
) -> Result<(), TransferError> {
    let start = Instant::now();
    let _act = copying(format!("copying dependencies to '{uri}'"));
    if untrusted {
        let infos = drv_closure_to_send(job, remote, local, uri).await?;
        t.query_ms = start.elapsed().as_millis();
        let on_error = refused_or(uri, "the derivation's closure", |uri, source| {
            TransferError::Upload { uri, source }
        });
        send_paths(remote, local, &infos, uri, t, on_error).await
    } else {
        let infos = inputs_to_send(job, remote, local, uri).await?;
        t.query_ms = start.elapsed().as_millis();
        send_paths(remote, local, &infos, uri, t, |source| {
            TransferError::Upload {
                uri: uri.to_owned(),
                source,
            }
        })
        .await
    }
}

/// For a builder that trusts us: only the inputs the remote lacks, found with one batched
/// query each way, in dependency order.
async fn inputs_to_send(
    job: &Job,
    remote: &mut Remote,
    local: &mut LocalStore,
    uri: &str,
) -> Result<Vec<PathInfo>, TransferError> {
    let inputs: Vec<StorePath> = job.inputs.iter().cloned().collect();
    let present = present_there(job, remote, &inputs, uri).await?;
    let missing: Vec<StorePath> = inputs
        .iter()
        .filter(|p| !present.contains(*p))
        .cloned()
        .collect();
    let infos = local
        .path_infos(&missing)
        .await
        .map_err(TransferError::Local)?;
    Ok(topo_sort(infos))
}

/// Uploads `infos` (in dependency order) with one "copying N paths" activity (also for none,
/// as Nix shows it), and records the upload in `t`; `on_error` names what a failure means.
async fn send_paths(
    remote: &mut Remote,
    local: &mut LocalStore,
    infos: &[PathInfo],
    uri: &str,
    t: &mut Timings,
    on_error: impl FnOnce(RemoteError) -> TransferError,
) -> Result<(), TransferError> {
    let mut copy = CopyPaths::start(infos.len(), infos.iter().map(|i| i.nar_size).sum());
    if infos.is_empty() {
        return Ok(());
    }
    let start = Instant::now();
    let mut source = Shown {
        inner: local,
        copy: &mut copy,
        uri,
        upload: true,
    };
    remote
        .add_paths(infos, &mut source)
        .await
        .map_err(on_error)?;
    t.upload_ms = start.elapsed().as_millis();
    t.uploaded_paths = infos.len();
    t.uploaded_bytes = infos.iter().map(|i| i.nar_size).sum();
    Ok(())
}

/// For a builder that does not trust us: the closure of the `.drv` (the derivation, its input
/// derivations and input sources, all content-addressed, which an untrusted daemon accepts),
/// only the paths the remote lacks, in dependency order. The inputs' outputs are not copied:
/// the remote would refuse them unsigned, and builds them itself instead.
async fn drv_closure_to_send(
    job: &Job,
    remote: &mut Remote,
    local: &mut LocalStore,
    uri: &str,
) -> Result<Vec<PathInfo>, TransferError> {
    let closure = local
        .closure(std::slice::from_ref(&job.drv_path))
        .await
        .map_err(TransferError::Local)?;
    let paths: Vec<StorePath> = closure.iter().map(|i| i.path.clone()).collect();
    let present = present_there(job, remote, &paths, uri).await?;
    Ok(topo_sort(
        closure
            .into_iter()
            .filter(|i| !present.contains(&i.path))
            .collect(),
    ))
}

/// The activity a copy to or from a builder shows around its "copying N paths" (as Nix's
/// `copyPaths` does), while the value lives.
fn copying(text: String) -> Activity {
    Activity::start(Verbosity::Talkative, activity::UNKNOWN, text, vec![])
}

/// Those of `paths` not valid in the local store, in their order.
async fn invalid_here(
    local: &mut LocalStore,
    paths: Vec<StorePath>,
) -> Result<Vec<StorePath>, TransferError> {
    let valid = local
        .valid_paths(&paths)
        .await
        .map_err(TransferError::Local)?;
    Ok(paths.into_iter().filter(|p| !valid.contains(p)).collect())
}

/// Those of `paths` the builder has, or substitutes if the job lets it: what step 3 skips.
async fn present_there(
    job: &Job,
    remote: &mut Remote,
    paths: &[StorePath],
    uri: &str,
) -> Result<BTreeSet<StorePath>, TransferError> {
    remote
        .query_valid_paths(paths, job.substitute_on_remote)
        .await
        .map_err(|source| TransferError::Upload {
            uri: uri.to_owned(),
            source,
        })
}

/// The builder's path infos of `paths`, which it built: what steps 5 and 6 fetch.
async fn infos_there(
    remote: &mut Remote,
    paths: &[StorePath],
    uri: &str,
) -> Result<Vec<PathInfo>, TransferError> {
    remote
        .query_path_infos(paths)
        .await
        .map_err(|source| TransferError::Download {
            uri: uri.to_owned(),
            source,
        })
}

/// For a daemon that does not trust us: its own refusal (an error it sent) is
/// [`TransferError::Untrusted`], naming `what` it refused; anything else is `other`.
fn refused_or(
    uri: &str,
    what: &'static str,
    other: fn(String, RemoteError) -> TransferError,
) -> impl FnOnce(RemoteError) -> TransferError {
    let uri = uri.to_owned();
    move |source| match source {
        RemoteError::Daemon { .. } => TransferError::Untrusted { uri, what, source },
        source => other(uri, source),
    }
}

/// Whether every output's path follows from the derivation's inputs (Nix's "input-addressed",
/// deferred outputs included): the derivations an untrusted daemon will not take by
/// BuildDerivation. Fixed-output, floating and impure derivations are content-addressed.
fn is_input_addressed(drv: &Derivation) -> bool {
    drv.basic
        .outputs
        .values()
        .all(|o| matches!(o.kind(), OutputKind::InputAddressed | OutputKind::Deferred))
}

/// Sends NAR chunks to the unpacking thread.
struct ChannelSink(mpsc::Sender<Vec<u8>>);

impl ChannelSink {
    async fn send(&mut self, chunk: Vec<u8>) -> Result<(), RemoteError> {
        self.0.send(chunk).await.map_err(|_| RemoteError::Write {
            peer: "the local unpacker".into(),
            source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
        })
    }
}

impl NarSink for ChannelSink {
    async fn write(&mut self, data: &[u8]) -> Result<(), RemoteError> {
        self.send(data.to_vec()).await
    }

    /// The reader's own buffer, handed over: no copy on the way to the unpacker.
    async fn write_from<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        reader: &mut WireReader<R>,
        max: usize,
    ) -> Result<usize, RemoteError> {
        let chunk = reader.take_raw_chunk(max, "a NAR").await?;
        let n = chunk.len();
        self.send(chunk).await?;
        Ok(n)
    }
}

/// Streams one output's NAR from the remote into a blocking unpacker that hashes as it writes.
async fn download_one(
    remote: &mut Remote,
    info: &PathInfo,
    drv_path: &StorePath,
    mut placed: Placed,
    uri: &str,
    shown: &mut CopyPath,
) -> Result<Placed, TransferError> {
    let expected = ExpectedNar {
        path: info.path.clone(),
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        deriver: Some(drv_path.clone()),
        references: info.references.iter().cloned().collect(),
    };
    let (tx, rx) = mpsc::channel(16);
    let unpack = tokio::task::spawn_blocking(move || {
        // Staged: nothing is moved to its store path before every output is verified.
        let r = placed.unpack_staged(expected, ChunkReader::new(rx));
        (placed, r)
    });
    let mut channel = ChannelSink(tx);
    let mut sink = Counted {
        inner: &mut channel,
        shown,
    };
    let fetched = remote.nar(info, &mut sink).await;
    drop(channel);
    let (placed, unpacked) = unpack.await.map_err(|_| TransferError::Place {
        uri: uri.to_owned(),
        source: PlaceError::Thread,
    })?;
    // A broken stream explains a truncated unpack better than the unpacker can.
    fetched.map_err(|source| TransferError::DownloadNar {
        uri: uri.to_owned(),
        path: info.path.to_string(),
        source,
    })?;
    unpacked.map_err(|source| TransferError::Place {
        uri: uri.to_owned(),
        source,
    })?;
    Ok(placed)
}

/// Step 5 for a resolved floating content-addressed derivation, as Nix's hook does it: the
/// realisations the remote reported (their ids checked against the derivation's own), for
/// every output the daemon asked for that the local store has no realisation of yet; their
/// paths that are not valid locally are added through the local daemon (dependencies first,
/// each verified by it), then the realisations registered.
async fn bring_back_realised(
    job: &Job,
    result: &BuildResult,
    remote: &mut Remote,
    local: &mut LocalStore,
    uri: &str,
    t: &mut Timings,
) -> Result<(), TransferError> {
    let drv = job.drv_path.to_string();
    let realisations =
        result
            .realisations_of(&job.drv)
            .map_err(|source| TransferError::Realisations {
                uri: uri.to_owned(),
                drv: drv.clone(),
                source,
            })?;
    let mut missing: Vec<Realisation> = Vec::new();
    for (name, r) in realisations {
        if !job.wanted.is_empty() && !job.wanted.contains(&name) {
            continue;
        }
        if local
            .realisation(&r.id)
            .await
            .map_err(TransferError::Local)?
            .is_none()
        {
            missing.push(r);
        }
    }
    let paths: Vec<StorePath> = missing
        .iter()
        .map(|r| r.out_path.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let fetch = invalid_here(local, paths).await?;
    if !fetch.is_empty() {
        let mut infos = infos_there(remote, &fetch, uri).await?;
        if let Some(p) = fetch.iter().find(|p| !infos.iter().any(|i| &i.path == *p)) {
            return Err(TransferError::OutputMissing {
                uri: uri.to_owned(),
                drv,
                path: p.to_string(),
            });
        }
        for info in &mut infos {
            info.deriver = Some(job.drv_path.clone());
        }
        let infos = topo_sort(infos);
        let _act = copying(format!("copying outputs from '{uri}'"));
        let mut copy = CopyPaths::start(infos.len(), infos.iter().map(|i| i.nar_size).sum());
        let mut from = FromRemote {
            remote,
            broke: None,
        };
        let added = {
            let mut source = Shown {
                inner: &mut from,
                copy: &mut copy,
                uri,
                upload: false,
            };
            local.add_unlocked_paths(&infos, &mut source).await
        };
        if let Some((path, source)) = from.broke.take() {
            return Err(TransferError::DownloadNar {
                uri: uri.to_owned(),
                path,
                source,
            });
        }
        added.map_err(|source| TransferError::AddOutput {
            uri: uri.to_owned(),
            what: "the outputs".to_owned(),
            source,
        })?;
        t.downloaded_bytes = infos.iter().map(|i| i.nar_size).sum();
    }
    for r in &missing {
        local
            .register_realisation(r)
            .await
            .map_err(|source| TransferError::AddOutput {
                uri: uri.to_owned(),
                what: format!("the realisation '{}'", r.id),
                source,
            })?;
    }
    tracing::debug!(
        "'{uri}' built '{drv}': {} realisations registered, {} paths added",
        missing.len(),
        fetch.len()
    );
    Ok(())
}

/// A [`NarSource`] that shows each NAR it produces as one path of `copy` (Nix's per-path copy
/// activity with its bytes).
struct Shown<'a, S> {
    inner: &'a mut S,
    copy: &'a mut CopyPaths,
    uri: &'a str,
    upload: bool,
}

impl<S: NarSource> NarSource for Shown<'_, S> {
    async fn copy_nar<W: NarSink>(
        &mut self,
        info: &PathInfo,
        sink: &mut W,
    ) -> Result<(), RemoteError> {
        let mut shown = self
            .copy
            .path(info.path.as_str(), self.uri, self.upload, info.nar_size);
        let r = self
            .inner
            .copy_nar(
                info,
                &mut Counted {
                    inner: sink,
                    shown: &mut shown,
                },
            )
            .await;
        self.copy.finished(shown);
        r
    }
}

/// A [`NarSink`] that counts what goes through it into a path's copy activity.
struct Counted<'a, W> {
    inner: &'a mut W,
    shown: &'a mut CopyPath,
}

impl<W: NarSink> NarSink for Counted<'_, W> {
    async fn write(&mut self, data: &[u8]) -> Result<(), RemoteError> {
        self.inner.write(data).await?;
        self.shown.advance(data.len() as u64);
        Ok(())
    }

    async fn write_from<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        reader: &mut WireReader<R>,
        max: usize,
    ) -> Result<usize, RemoteError> {
        let n = self.inner.write_from(reader, max).await?;
        self.shown.advance(n as u64);
        Ok(n)
    }
}

/// The remote's NARs as a [`NarSource`], remembering a failure of the remote (as opposed to
/// the sink's) so that a broken download is told from a refused output.
struct FromRemote<'a> {
    remote: &'a mut Remote,
    broke: Option<(String, RemoteError)>,
}

impl NarSource for FromRemote<'_> {
    async fn copy_nar<W: NarSink>(
        &mut self,
        info: &PathInfo,
        sink: &mut W,
    ) -> Result<(), RemoteError> {
        let mut watched = Watched {
            inner: sink,
            failed: false,
        };
        match self.remote.nar(info, &mut watched).await {
            Ok(()) => Ok(()),
            Err(e) if watched.failed => Err(e),
            Err(e) => {
                let shown = RemoteError::Protocol {
                    peer: self.remote.uri().to_owned(),
                    message: e.to_string(),
                };
                self.broke = Some((info.path.to_string(), e));
                Err(shown)
            }
        }
    }
}

/// A [`NarSink`] that notes whether writing to it failed.
struct Watched<'a, W> {
    inner: &'a mut W,
    failed: bool,
}

impl<W: NarSink> NarSink for Watched<'_, W> {
    async fn write(&mut self, data: &[u8]) -> Result<(), RemoteError> {
        let r = self.inner.write(data).await;
        self.failed |= r.is_err();
        r
    }
}

/// Orders path infos so that every path comes after the paths it references (among `infos`).
pub fn topo_sort(infos: Vec<PathInfo>) -> Vec<PathInfo> {
    let mut by_path: BTreeMap<StorePath, PathInfo> =
        infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut out = Vec::with_capacity(by_path.len());
    let mut visiting = BTreeSet::new();
    let keys: Vec<StorePath> = by_path.keys().cloned().collect();
    fn visit(
        p: &StorePath,
        by_path: &mut BTreeMap<StorePath, PathInfo>,
        visiting: &mut BTreeSet<StorePath>,
        out: &mut Vec<PathInfo>,
    ) {
        // Self-references and cycles (which a valid store cannot contain) are cut here.
        if !visiting.insert(p.clone()) {
            return;
        }
        let refs: Vec<StorePath> = match by_path.get(p) {
            Some(info) => info.references.iter().cloned().collect(),
            None => return,
        };
        for r in refs.iter().filter(|r| *r != p) {
            visit(r, by_path, visiting, out);
        }
        if let Some(info) = by_path.remove(p) {
            out.push(info);
        }
    }
    for k in keys {
        visit(&k, &mut by_path, &mut visiting, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hook_protocol::Sha256;

    fn info(name: char, refs: &[char]) -> PathInfo {
        let p = |c: char| {
            StorePath::parse(&format!(
                "/nix/store/{}-{c}",
                "0".repeat(31) + &c.to_string()
            ))
            .unwrap()
        };
        let mut i = PathInfo::new(p(name), Sha256::digest(b""), 1);
        i.references = refs.iter().map(|&c| p(c)).collect();
        i
    }

    #[test]
    fn only_input_addressed_derivations_need_the_untrusted_path() {
        use hook_protocol::derivation::DerivationOutput;
        let drv = |outs: &[(&str, &str, &str)]| {
            let mut d = Derivation::default();
            for (i, (path, algo, hash)) in outs.iter().enumerate() {
                d.basic.outputs.insert(
                    format!("o{i}"),
                    DerivationOutput {
                        path: (*path).into(),
                        hash_algo: (*algo).into(),
                        hash: (*hash).into(),
                    },
                );
            }
            d
        };
        let p = "/nix/store/00000000000000000000000000000000-x";
        assert!(is_input_addressed(&drv(&[(p, "", ""), (p, "", "")])));
        // Deferred (path unknown until a floating input is built): still input-addressed.
        assert!(is_input_addressed(&drv(&[("", "", "")])));
        assert!(!is_input_addressed(&drv(&[(p, "sha256", "abcd")])));
        assert!(!is_input_addressed(&drv(&[("", "r:sha256", "")])));
        assert!(!is_input_addressed(&drv(&[
            (p, "", ""),
            ("", "sha256", "impure")
        ])));
    }

    #[test]
    fn dependencies_come_first() {
        let sorted = topo_sort(vec![
            info('a', &['b', 'c', 'a']),
            info('c', &['d']),
            info('b', &['c', 'x']),
            info('d', &[]),
        ]);
        let names: Vec<&str> = sorted.iter().map(|i| i.path.name()).collect();
        assert_eq!(names, ["d", "c", "b", "a"]);
    }

    #[test]
    fn only_a_broken_connection_counts_as_a_broken_builder() {
        let io = |peer: &str| {
            RemoteError::Wire(WireError::Io {
                peer: peer.into(),
                source: std::io::Error::other("the builder stopped answering keepalives"),
            })
        };
        let build = |source| TransferError::Build {
            uri: "u".into(),
            source,
        };
        assert!(build(io("p")).builder_broke());
        assert!(
            TransferError::DownloadNar {
                uri: "u".into(),
                path: "/nix/store/x".into(),
                source: RemoteError::Closed {
                    peer: "p".into(),
                    what: "a NAR",
                    stderr: String::new()
                }
            }
            .builder_broke()
        );
        // Nonsense from the builder, a failed build, the local store: not a dead connection.
        assert!(
            !build(RemoteError::Protocol {
                peer: "p".into(),
                message: "m".into()
            })
            .builder_broke()
        );
        assert!(
            !TransferError::BuildFailed {
                drv: "d".into(),
                uri: "u".into(),
                status: BuildStatus::PermanentFailure,
                message: "m".into()
            }
            .builder_broke()
        );
        assert!(!TransferError::Local(io("the local daemon")).builder_broke());
    }

    #[test]
    fn exit_codes_follow_nix() {
        let failed = |status| TransferError::BuildFailed {
            drv: "d".into(),
            uri: "u".into(),
            status,
            message: "m".into(),
        };
        assert_eq!(failed(BuildStatus::PermanentFailure).exit_code(), 100);
        assert_eq!(failed(BuildStatus::TimedOut).exit_code(), 101);
        assert_eq!(failed(BuildStatus::MiscFailure).exit_code(), 1);
        assert_eq!(
            TransferError::Local(RemoteError::Protocol {
                peer: "p".into(),
                message: "m".into()
            })
            .exit_code(),
            1
        );
    }
}
