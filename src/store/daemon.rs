//! `ssh-ng://`: a builder's `nix-daemon --stdio`, through the worker-protocol client (`worker`),
//! with what a remote build asks of it that the local store never does: the build's limits
//! forwarded as SetOptions, BuildDerivation, and BuildPathsWithResults for a daemon that does
//! not trust us.
//!
//! It never decides which way to build (`transfer` does, from the daemon's trust).

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

/// What a remote build asks of `ssh-ng://` that the local store never does.
impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> WorkerClient<R, W> {
    /// A protocol description for messages, e.g. `nix-daemon protocol 1.35 (Nix 2.34.8)`.
    pub(super) fn describe(&self) -> String {
        let v = self.negotiated().version;
        match &self.server_info().nix_version {
            Some(n) => format!("nix-daemon protocol {v} (Nix {n})"),
            None => format!("nix-daemon protocol {v}"),
        }
    }

    /// Whether the daemon trusts us; `None` when it is too old to say (worker protocol < 1.35).
    pub(super) fn trust(&self) -> Option<Trust> {
        self.server_info().trust
    }

    /// Path infos of the valid ones among `paths`.
    pub(super) async fn valid_path_infos(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<PathInfo>, RemoteError> {
        Ok(self
            .query_path_infos(paths)
            .await?
            .into_iter()
            .flatten()
            .collect())
    }

    /// SetOptions with the build's limits, then BuildDerivation; output goes to `log`.
    pub(super) async fn build_with_options(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        options: &BuildOptions,
        log: &mut BuildLog,
    ) -> Result<BuildResult, RemoteError> {
        self.set_options(&client_options(options)).await?;
        self.build_derivation(drv_path, drv, log).await
    }

    /// SetOptions with the build's limits, then BuildPathsWithResults for `drv_path`'s
    /// `outputs`, built from the derivation in the daemon's own store (inputs it lacks
    /// included).
    pub(super) async fn build_from_store(
        &mut self,
        drv_path: &StorePath,
        outputs: BTreeSet<String>,
        options: &BuildOptions,
        log: &mut BuildLog,
    ) -> Result<BuildResult, RemoteError> {
        let wanted = DerivedPath::Built {
            drv_path: drv_path.clone(),
            outputs: OutputsSpec::Names(outputs),
        };
        self.set_options(&client_options(options)).await?;
        let results = self
            .build_paths_with_results(std::slice::from_ref(&wanted), drv_path, log)
            .await?;
        one_result(results, &wanted, self.peer())
    }
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
