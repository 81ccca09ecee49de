//! `kind = "command"`: any foreground command is the builder (e.g. a script that starts an
//! sshd in the foreground). Stopped by its `stop-command` if given, else by its `stop-signal`
//! (default SIGTERM) sent to its process group, then by the forced steps.
//!
//! The command runs in the builder's state directory with stdout and stderr in `command.log`,
//! and with `NIX_LAZY_BUILDER_BUILDER` and `NIX_LAZY_BUILDER_STATE_DIR` set. A stop command
//! also gets `NIX_LAZY_BUILDER_PID` (the command's pid, which is also its process group).
//!
//! Must never: run the command through a shell (the argv is used as is), or let a stop
//! command outlive its timeout.

use std::time::Instant;

use super::{
    BootContext, BootError, Instance, Kind, StopHow, StopStep, Stopping, base_env, find_program,
    fmt_elapsed, run_stop_helper, spawn_logged,
};
use crate::config::CommandBoot;

pub(super) struct Cmd {
    spec: CommandBoot,
    ctx: BootContext,
}

pub(super) async fn start(spec: &CommandBoot, ctx: &BootContext) -> Result<Instance, BootError> {
    let Some((program, args)) = spec.command.split_first() else {
        return Err(BootError::Config(format!(
            "builder '{}': the boot command is empty",
            ctx.builder
        )));
    };
    let what = format!("boot command {program}");
    let path = find_program(program, &what)?;
    let (child, log, started) = spawn_logged(
        ctx,
        &what,
        path,
        args.iter().map(Into::into).collect(),
        spec.environment.iter().map(|(k, v)| (k.into(), v.into())),
        "command.log",
    )?;
    tracing::info!(builder = %ctx.builder, pid = child.pid(), command = ?spec.command, "boot command started");
    Ok(Instance {
        kind: Kind::Command(Cmd {
            spec: spec.clone(),
            ctx: ctx.clone(),
        }),
        child,
        what,
        started,
        ssh_port: None,
        logs: vec![log],
        ready: None,
        link: None,
    })
}

impl Cmd {
    pub(super) fn builder(&self) -> &str {
        &self.ctx.builder
    }

    /// The stop command, or the stop signal; `Some` if the command is gone afterwards.
    pub(super) async fn graceful(&mut self, s: &mut Stopping<'_>) -> Option<StopStep> {
        let t0 = Instant::now();
        let timeout = s.how.graceful_timeout;
        match &self.spec.stop_command {
            Some(stop) => {
                let pid = s.child.pid();
                let ran =
                    run_stop_command(&self.spec.environment, stop, &self.ctx, pid, s.how).await;
                s.after_helper(StopStep::StopCommand, ran, t0, "the command")
                    .await
            }
            None => {
                let sig = self.spec.stop_signal.as_raw();
                let step = StopStep::StopSignal(sig);
                match s.child.signal_group(sig) {
                    Ok(false) => return Some(step),
                    Ok(true) => {}
                    Err(e) => {
                        s.note_failed(&step, e);
                        return None;
                    }
                }
                let still = format!("still running after {}", fmt_elapsed(timeout));
                s.exits_within(step, timeout, still).await
            }
        }
    }
}

/// Runs the stop command to completion within the graceful timeout; its output goes to
/// `command.log` too.
async fn run_stop_command(
    environment: &std::collections::BTreeMap<String, String>,
    argv: &[String],
    ctx: &BootContext,
    pid: u32,
    how: &StopHow,
) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("empty stop command".into());
    };
    let path = find_program(program, "stop command").map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new(&path);
    cmd.args(args)
        .envs(base_env(ctx))
        .envs(environment)
        .env("NIX_LAZY_BUILDER_PID", pid.to_string())
        .current_dir(&ctx.dir);
    run_stop_helper(
        cmd,
        program,
        &ctx.dir.join("command.log"),
        how.graceful_timeout,
    )
    .await
}
