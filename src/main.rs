//! The command line: parses arguments and hands over to the library. Nothing else lives here.
//!
//! nix-daemon runs the hook in two shapes: Nix 2.8/2.9 take `build-hook` as one bare path and
//! run it as `[name, VERBOSITY]`; newer Nix split the setting, so `build-hook =
//! /path/nix-lazy-builder hook` runs `[name, "hook", …, VERBOSITY]`. Both land in the hook.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "nix-lazy-builder", version, about = "A lazy build hook for Nix")]
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
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    // Nix 2.8: `build-hook = /path/nix-lazy-builder` gives argv [name, VERBOSITY].
    if args.len() == 2 && args[1].to_str().is_some_and(|a| a.parse::<u8>().is_ok()) {
        let verbosity = args[1].to_str().and_then(|a| a.parse().ok());
        return nix_lazy_builder::hook::main(nix_lazy_builder::hook::HookArgs {
            config: None,
            verbosity,
        });
    }
    match Cli::parse_from(args).command {
        Command::Hook { config, rest } => {
            nix_lazy_builder::hook::main(nix_lazy_builder::hook::HookArgs {
                config,
                verbosity: rest.last().and_then(|v| v.parse().ok()),
            })
        }
    }
}
