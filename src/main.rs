//! The command line: parses arguments, reads the environment the library needs (the config
//! path variable and `NIX_SSHOPTS`: the library reads neither), and hands over to the library.
//! Nothing else lives here.
//!
//! nix-daemon runs the hook in two shapes: Nix 2.8/2.9 take `build-hook` as one bare path and
//! run it as `[name, VERBOSITY]`; newer Nix split the setting, so `build-hook =
//! /path/nix-lazy-builder hook` runs `[name, "hook", …, VERBOSITY]`. Both land in the hook.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nix_lazy_builder::cli;
use nix_lazy_builder::config::{self, ConfigPath};

#[derive(Parser)]
#[command(
    name = "nix-lazy-builder",
    version,
    about = "A lazy build hook for Nix"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run as nix-daemon's build hook (`build-hook = /path/nix-lazy-builder hook`).
    Hook {
        /// The lazy-builder TOML config (default: $NIX_LAZY_BUILDER_CONFIG or
        /// /etc/nix/lazy-builder.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Whatever the daemon appends; the last one is the client's verbosity (0-7).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Run the supervisor that boots lazy builders and stops idle ones (hooks start one
    /// automatically; a service manager can run it instead).
    Supervise {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Started by a hook: exit once every lazy builder is down and nobody asked for a while.
        #[arg(long)]
        auto: bool,
    },
    /// Show every lazy builder: state, uptime, idle countdown, builds, boots, last failure.
    Status {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Boot a lazy builder now (also after a failure) and wait until it is ready.
    Up {
        name: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Stop a lazy builder once its running builds are done.
    Down {
        name: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check every builder end to end (config, keys, host keys, boot, SSH, remote Nix, systems)
    /// and print one verdict per builder.
    Doctor {
        #[arg(long)]
        config: Option<PathBuf>,
        /// A Nix `builders` value to check too (default: @/etc/nix/machines).
        #[arg(long)]
        builders: Option<String>,
    },
}

/// The TOML config for this process: `--config`, else `$NIX_LAZY_BUILDER_CONFIG`, else the
/// default.
fn config_path(cli: Option<PathBuf>) -> ConfigPath {
    config::resolve_config_path(
        cli.as_deref(),
        std::env::var_os(config::CONFIG_ENV_VAR).as_deref(),
    )
}

/// `NIX_SSHOPTS`, which nix-daemon passes on to its hook as Nix's own hook expects it.
fn nix_sshopts() -> Option<String> {
    std::env::var(config::SSHOPTS_ENV_VAR).ok()
}

/// Prints a command's output, or its error on stderr with exit status 1.
fn report(r: Result<String, String>) -> ExitCode {
    match r {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nix-lazy-builder: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    // Nix 2.8: `build-hook = /path/nix-lazy-builder` gives argv [name, VERBOSITY].
    if args.len() == 2 && args[1].to_str().is_some_and(|a| a.parse::<u8>().is_ok()) {
        let verbosity = args[1].to_str().and_then(|a| a.parse().ok());
        return nix_lazy_builder::hook::main(nix_lazy_builder::hook::HookArgs {
            config: config_path(None),
            nix_sshopts: nix_sshopts(),
            verbosity,
        });
    }
    match Cli::parse_from(args).command {
        Command::Hook { config, rest } => {
            nix_lazy_builder::hook::main(nix_lazy_builder::hook::HookArgs {
                config: config_path(config),
                nix_sshopts: nix_sshopts(),
                verbosity: rest.last().and_then(|v| v.parse().ok()),
            })
        }
        Command::Supervise { config, auto } => {
            nix_lazy_builder::supervisor::main(nix_lazy_builder::supervisor::SuperviseArgs {
                config: config_path(config),
                auto,
            })
        }
        Command::Status { config, json } => report(cli::status(&config_path(config), json)),
        Command::Up { name, config } => report(cli::up(&config_path(config), &name)),
        Command::Down { name, config } => report(cli::down(&config_path(config), &name)),
        Command::Doctor { config, builders } => {
            match cli::doctor(
                &config_path(config),
                builders.as_deref(),
                nix_sshopts().as_deref(),
            ) {
                Ok((out, ok)) => {
                    print!("{out}");
                    if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => report(Err(e)),
            }
        }
    }
}
