//! `kind = "darling"`: an x86_64-darwin builder in a Darling prefix. Runs
//! `darling shell /usr/sbin/sshd -D -f CONFIG` in the foreground and stops it with
//! `darling shutdown`, then the forced steps.
//!
//! Darling selects its prefix with the `DPREFIX` environment variable (its launcher has no
//! prefix option: `darling --help` lists only `shell`, `exec`, `shutdown` and a program path),
//! so that is how the configured `prefix` is passed. `CONFIG` is a path inside the prefix.
//! Output goes to `darling.log` in the builder's state directory.
//!
//! Must never: start a second container for the same prefix while one of ours runs, or run
//! anything in the prefix but the sshd and the shutdown.

use std::time::Instant;

use super::{
    BootContext, BootError, Instance, Kind, StopHow, StopStep, Stopping, base_env, find_program,
    run_stop_helper, spawn_logged,
};
use crate::config::DarlingBoot;

/// The sshd Darling runs, a path inside the prefix (macOS's own).
const SSHD: &str = "/usr/sbin/sshd";

pub(super) struct Container {
    spec: DarlingBoot,
    ctx: BootContext,
}

/// `darling shell /usr/sbin/sshd -D -f CONFIG`.
pub(super) fn shell_args(spec: &DarlingBoot) -> Vec<String> {
    vec![
        "shell".into(),
        SSHD.into(),
        "-D".into(),
        "-f".into(),
        spec.sshd_config.to_string_lossy().into_owned(),
    ]
}

pub(super) async fn start(spec: &DarlingBoot, ctx: &BootContext) -> Result<Instance, BootError> {
    let darling = find_program("darling", "darling")?;
    let (child, log, started) = spawn_logged(
        ctx,
        "darling",
        darling,
        shell_args(spec).into_iter().map(Into::into).collect(),
        [("DPREFIX".into(), spec.prefix.clone().into_os_string())],
        "darling.log",
    )?;
    tracing::info!(builder = %ctx.builder, pid = child.pid(), prefix = %spec.prefix.display(), "darling sshd started");
    Ok(Instance {
        kind: Kind::Darling(Container {
            spec: spec.clone(),
            ctx: ctx.clone(),
        }),
        child,
        what: "darling".into(),
        started,
        ssh_port: None,
        logs: vec![log],
        ready: None,
        link: None,
    })
}

impl Container {
    pub(super) fn builder(&self) -> &str {
        &self.ctx.builder
    }

    /// `darling shutdown`, then wait for the shell to end.
    pub(super) async fn graceful(&mut self, s: &mut Stopping<'_>) -> Option<StopStep> {
        let t0 = Instant::now();
        let ran = self.shutdown(s.how).await;
        s.after_helper(StopStep::DarlingShutdown, ran, t0, "the shell")
            .await
    }

    async fn shutdown(&self, how: &StopHow) -> Result<(), String> {
        let darling = find_program("darling", "darling").map_err(|e| e.to_string())?;
        let mut cmd = tokio::process::Command::new(&darling);
        cmd.arg("shutdown")
            .envs(base_env(&self.ctx))
            .env("DPREFIX", &self.spec.prefix)
            .current_dir(&self.ctx.dir);
        run_stop_helper(
            cmd,
            "darling shutdown",
            &self.ctx.dir.join("darling.log"),
            how.graceful_timeout,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_command_line() {
        let spec = DarlingBoot {
            prefix: "/var/lib/darling-builder".into(),
            sshd_config: "/etc/ssh/sshd_config".into(),
        };
        assert_eq!(
            shell_args(&spec),
            [
                "shell",
                "/usr/sbin/sshd",
                "-D",
                "-f",
                "/etc/ssh/sshd_config"
            ]
        );
    }
}
