//! Connecting to the chosen builder and, once that worked, the accepted build: `# accept`, the
//! inputs and wanted outputs from the daemon, the upload lock, and `transfer`.
//!
//! The one place the hook reaches builders and stores: `ssh::SshTarget::for_builder` (the
//! trust policy, also for a warm session: the supervisor connects with the target it gives),
//! a warm session from the supervisor (`lazy.lease_session`, `Remote::warm`) when the builder
//! keeps one warm and one is ready, else `ssh::connect` and `Remote::open`; then
//! `place::Registrar` and `LocalStore`. A warm session that fails before its first answer is
//! replaced by a direct connection (`Remote::warm`'s reconnect). It never chooses a builder and
//! never answers a `try` with anything but `# accept`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use hook_protocol::derivation::Derivation;
use hook_protocol::hook::{AcceptedBuild, Reply, Settings, TryRequest};
use hook_protocol::log::{Verbosity, activity};
use hook_protocol::serve::BuildOptions;
use tokio::io::AsyncRead;

use super::{HookError, nix_state_dir};
use crate::config::Builder;
use crate::lazy::Lazy;
use crate::logging::{self, Activity};
use crate::slots::{LoadDir, SlotLock, UploadLockOutcome};
use crate::ssh;
use crate::store::warm::session_spec;
use crate::store::{BuildLog, LocalStore, Reconnect, Remote, RemoteError};
use crate::transfer::{self, Job};
use crate::wire_io::WireReader;

/// How long Nix's hook waits for another hook's upload to the same builder.
const UPLOAD_LOCK_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// SSH + the remote program's handshake to `b` (at `port`, when the supervisor gave one),
/// inside Nix's "connecting to" activity: a warm session from the supervisor when `b` keeps
/// one and one is ready, else a connection of our own.
pub(crate) async fn connect(
    b: &Builder,
    port: Option<u16>,
    log: &BuildLog,
    lazy: &mut Lazy,
) -> Result<Remote, RemoteError> {
    let mut target = b.clone();
    if port.is_some() {
        target.uri.port = port;
    }
    let b = &target;
    let _act = Activity::start(
        Verbosity::Talkative,
        activity::UNKNOWN,
        format!("connecting to '{}'", b.store_uri),
        vec![],
    );
    let ssh_target = ssh::SshTarget::for_builder(b)?;
    if b.warm() {
        let spec = session_spec(b, &ssh_target)?;
        if let Some(session) = lazy.lease_session(&spec).await {
            let (direct_b, direct_t, direct_log) = (b.clone(), ssh_target.clone(), log.clone());
            let reconnect: Reconnect = Box::new(move || {
                Box::pin(async move { direct(&direct_b, &direct_t, &direct_log).await })
            });
            match Remote::warm(session, b, log, reconnect) {
                Ok(remote) => {
                    tracing::debug!(builder = %b.name, protocol = %remote.describe(), "warm session");
                    return Ok(remote);
                }
                Err(e) => tracing::debug!(builder = %b.name, "cannot use the warm session: {e}"),
            }
        }
    }
    direct(b, &ssh_target, log).await
}

/// A connection of our own to `b`.
async fn direct(
    b: &Builder,
    target: &ssh::SshTarget,
    log: &BuildLog,
) -> Result<Remote, RemoteError> {
    let session = ssh::connect(target).await?;
    let remote = Remote::open(session, b, log).await?;
    tracing::debug!(builder = %b.name, protocol = %remote.describe(), "connected");
    Ok(remote)
}

/// Replies `# accept` for `builder` (connected as `remote`) and runs the build; `slot` is the
/// builder's slot, held until the build is over.
#[allow(clippy::too_many_arguments)]
pub(super) async fn accepted(
    stdin: &mut WireReader<Box<dyn AsyncRead + Unpin + Send>>,
    settings: &Settings,
    req: &TryRequest,
    drv: Result<Derivation, HookError>,
    builder: &Builder,
    mut remote: Remote,
    mut log: BuildLog,
    slot: Option<SlotLock>,
    load_dir: &LoadDir,
) -> Result<u8, HookError> {
    logging::reply(&Reply::accept(&builder.store_uri));
    // Start the registering `nix-store` now: its start-up overlaps the build.
    let nix_store = which::which("nix-store").unwrap_or_else(|_| PathBuf::from("nix-store"));
    let registrar = crate::place::Registrar::start(&nix_store);
    let accepted = stdin
        .decode("the inputs and wanted outputs", AcceptedBuild::decode)
        .await?;
    let drv_path = req.drv_path.clone();
    let drv = drv?;
    let job = Job {
        drv_path,
        drv,
        inputs: accepted.input_paths,
        wanted: accepted
            .missing_outputs
            .into_iter()
            .collect::<BTreeSet<_>>(),
        substitute_on_remote: settings.builders_use_substitutes()?,
        options: BuildOptions {
            max_silent_time: settings.max_silent_time()?,
            build_timeout: settings.timeout()?,
            max_log_size: settings.max_build_log_size()?,
            nr_repeats: 0,
            enforce_determinism: false,
            keep_failed: settings.keep_failed()?,
        },
        state_dir: nix_state_dir(),
    };
    let mut local = LocalStore::connect()
        .await
        .map_err(transfer::TransferError::Local)?;

    // Nix's hook serialises uploads to one builder with this lock; we do the same so concurrent
    // builds never upload the same closure twice, and so Nix's hooks see us.
    let lock_dir = load_dir.clone();
    let key = builder.slot_key().to_owned();
    let upload_lock =
        tokio::task::spawn_blocking(move || lock_dir.upload_lock(&key, UPLOAD_LOCK_TIMEOUT))
            .await
            .map_err(|e| HookError::Internal(format!("upload lock thread: {e}")))??;
    if let UploadLockOutcome::TimedOut = upload_lock {
        tracing::warn!(
            "somebody is hogging the upload lock for '{}', continuing...",
            builder.store_uri
        );
    }
    // The daemon shows the build itself ("building '<drv>' on '<uri>'", its log lines under
    // it), as for Nix's own hook, which adds no activity of its own for it.
    let timings = transfer::run(
        &job,
        &mut remote,
        &mut local,
        &mut log,
        upload_lock,
        registrar,
    )
    .await?;
    tracing::debug!(?timings, "remote build finished");
    drop(slot);
    Ok(0)
}
