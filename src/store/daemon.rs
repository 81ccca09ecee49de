//! `ssh-ng://`: a builder's `nix-daemon --stdio`, through the worker-protocol client (`worker`),
//! with what a remote build asks of it that the local store never does: the build's limits
//! forwarded as SetOptions, BuildDerivation, and BuildPathsWithResults for a daemon that does
//! not trust us.
//!
//! It never decides which way to build (`transfer` does, from [`trust`]).

use std::collections::BTreeSet;

use hook_protocol::StorePath;
use hook_protocol::build_result::BuildResult;
use hook_protocol::derivation::BasicDerivation;
use hook_protocol::path_info::{DerivedPath, OutputsSpec, PathInfo};
use hook_protocol::serve::BuildOptions;
use hook_protocol::worker::{ClientOptions, Trust};
use tokio::io::{AsyncRead, AsyncWrite};

use super::worker::WorkerClient;
use super::{BuildLog, RemoteError};

/// A protocol description for messages, e.g. `nix-daemon protocol 1.35 (Nix 2.34.8)`.
pub(super) fn describe<R, W>(c: &WorkerClient<R, W>) -> String
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let v = c.negotiated().version;
    match &c.server_info().nix_version {
        Some(n) => format!("nix-daemon protocol {v} (Nix {n})"),
        None => format!("nix-daemon protocol {v}"),
    }
}

/// Whether the daemon trusts us; `None` when it is too old to say (worker protocol < 1.35).
pub(super) fn trust<R, W>(c: &WorkerClient<R, W>) -> Option<Trust>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    c.server_info().trust
}

/// Path infos of the valid ones among `paths`.
pub(super) async fn query_path_infos<R, W>(
    c: &mut WorkerClient<R, W>,
    paths: &[StorePath],
) -> Result<Vec<PathInfo>, RemoteError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    Ok(c.query_path_infos(paths)
        .await?
        .into_iter()
        .flatten()
        .collect())
}

/// SetOptions with the build's limits, then BuildDerivation; output goes to `log`.
pub(super) async fn build<R, W>(
    c: &mut WorkerClient<R, W>,
    drv_path: &StorePath,
    drv: &BasicDerivation,
    options: &BuildOptions,
    log: &mut BuildLog,
) -> Result<BuildResult, RemoteError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    c.set_options(&client_options(options)).await?;
    c.build_derivation(drv_path, drv, log).await
}

/// SetOptions with the build's limits, then BuildPathsWithResults for `drv_path`'s `outputs`,
/// built from the derivation in the daemon's own store (inputs it lacks included).
pub(super) async fn build_from_store<R, W>(
    c: &mut WorkerClient<R, W>,
    drv_path: &StorePath,
    outputs: BTreeSet<String>,
    options: &BuildOptions,
    log: &mut BuildLog,
) -> Result<BuildResult, RemoteError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let wanted = DerivedPath::Built {
        drv_path: drv_path.clone(),
        outputs: OutputsSpec::Names(outputs),
    };
    c.set_options(&client_options(options)).await?;
    let results = c
        .build_paths_with_results(std::slice::from_ref(&wanted), drv_path, log)
        .await?;
    one_result(results, &wanted, c.peer())
}

/// The build's timeouts and log limit as SetOptions: Nix's own ssh-ng store forwards none of
/// these; we do.
fn client_options(options: &BuildOptions) -> ClientOptions {
    let mut overrides = Vec::new();
    if options.build_timeout > 0 {
        overrides.push(("timeout".into(), options.build_timeout.to_string()));
    }
    if options.max_log_size > 0 {
        overrides.push((
            "max-build-log-size".into(),
            options.max_log_size.to_string(),
        ));
    }
    ClientOptions {
        keep_failed: options.keep_failed,
        verbosity: 0,
        max_build_jobs: 1,
        max_silent_time: options.max_silent_time,
        verbose_build: false,
        build_cores: 0,
        use_substitutes: false,
        overrides,
        ..Default::default()
    }
}

/// The result for `wanted` from a BuildPathsWithResults reply that must hold exactly that one.
fn one_result(
    results: Vec<(DerivedPath, BuildResult)>,
    wanted: &DerivedPath,
    peer: &str,
) -> Result<BuildResult, RemoteError> {
    let n = results.len();
    let mut it = results.into_iter();
    match (it.next(), n) {
        (Some((_, result)), 1) => Ok(result),
        _ => Err(RemoteError::Protocol {
            peer: peer.to_owned(),
            message: format!(
                "asked to build {}, the daemon answered with {n} results",
                wanted.to_worker_string()
            ),
        }),
    }
}
