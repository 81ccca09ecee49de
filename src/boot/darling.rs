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

use super::child::{Child, SpawnSpec};
use super::{
    BootContext, BootError, Instance, Kind, StopHow, StopStep, base_env, find_program, fmt_elapsed,
    open_log, run_stop_helper,
};
use crate::config::DarlingBoot;

/// The sshd Darling runs, a path inside the prefix (macOS's own).
const SSHD: &str = "/usr/sbin/sshd";

pub(super) struct Container {
    builder: String,
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
    let (log, out) = open_log(&ctx.dir, "darling.log")?;
    let err = out.try_clone().map_err(|source| BootError::Io {
        what: "cannot duplicate the log file".into(),
        path: log.clone(),
        source,
    })?;
    let mut env = base_env(ctx);
    env.push(("DPREFIX".into(), spec.prefix.clone().into_os_string()));
    let started = Instant::now();
    let child = Child::spawn(SpawnSpec {
        program: darling.clone(),
        args: shell_args(spec).into_iter().map(Into::into).collect(),
        env,
        cwd: ctx.dir.clone(),
        stdout: out,
        stderr: err,
    })
    .map_err(|source| BootError::Spawn {
        what: "darling".into(),
        program: darling,
        source,
    })?;
    tracing::info!(builder = %ctx.builder, pid = child.pid(), prefix = %spec.prefix.display(), "darling sshd started");
    Ok(Instance {
        kind: Kind::Darling(Container {
            builder: ctx.builder.clone(),
            spec: spec.clone(),
            ctx: ctx.clone(),
        }),
        child,
        what: "darling".into(),
        started,
        ssh_port: None,
        logs: vec![log],
    })
}

impl Container {
    pub(super) fn builder(&self) -> &str {
        &self.builder
    }

    /// `darling shutdown`, then wait for the shell to end.
    pub(super) async fn graceful(
        &mut self,
        child: &mut Child,
        how: &StopHow,
        failed: &mut Vec<String>,
    ) -> Option<StopStep> {
        let step = StopStep::DarlingShutdown;
        let t0 = Instant::now();
        if let Err(why) = self.shutdown(how).await {
            failed.push(format!("{step}: {why}"));
            return child
                .wait_for(std::time::Duration::from_millis(200))
                .await
                .map(|_| step);
        }
        let left = how.graceful_timeout.saturating_sub(t0.elapsed());
        if child.wait_for(left).await.is_some() {
            return Some(step);
        }
        failed.push(format!(
            "{step}: the shell was still running {} later",
            fmt_elapsed(how.graceful_timeout)
        ));
        None
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
