//! The command line: parses arguments, reads the environment the library needs (the config
//! path variable, `NIX_SSHOPTS`, and for `doctor` the variables nix-daemon reads its nix.conf
//! by: the library reads none of them), hands over to the library, and
//! renders its own documentation (`help`, `completions SHELL`, `man`). Nothing else lives here.
//!
//! nix-daemon runs the hook in two shapes: Nix 2.8/2.9 take `build-hook` as one bare path and
//! run it as `[name, VERBOSITY]`; newer Nix split the setting, so `build-hook =
//! /path/nix-lazy-builder hook` runs `[name, "hook", …, VERBOSITY]`. Both land in the hook.
//!
//! Must never: print anything but the hook protocol on stdout/stderr once the hook runs (the
//! bare form is recognised before clap sees the arguments, so clap never prints there).

use std::ffi::OsString;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use nix_lazy_builder::cli;
use nix_lazy_builder::config::{self, ConfigPath};

/// What `--help` says about the two ways nix-daemon runs the hook.
const HOOK_SETUP: &str = "\
Setting it up as nix-daemon's build hook, in /etc/nix/nix.conf:
  Nix 2.10 and newer:  build-hook = /path/to/nix-lazy-builder hook
  Nix 2.8 and 2.9:     build-hook = /path/to/nix-lazy-builder
Nix 2.8 and 2.9 take build-hook as one bare path and run it with a single argument, the
client's verbosity (0-7): `nix-lazy-builder 3` is the hook, exactly as `nix-lazy-builder hook 3`.
Newer Nix split the setting into words and append the verbosity after them.
Some daemons (about Nix 2.25 to 2.33, NixOS/nix#15083) ignore build-hook in nix.conf: give
nix-daemon the same line in its NIX_CONFIG environment variable too.";

/// What `external-build --help` says about setting it up.
const EXTERNAL_SETUP: &str = "\
Setting it up as an external builder, in /etc/nix/nix.conf (Nix 2.32 and newer):
  experimental-features = external-builders
  external-builders = [{\"systems\": [\"aarch64-linux\"], \"program\": \"/path/to/nix-lazy-builder\", \"args\": [\"external-build\"]}]
The supervisor must be running (`systemctl start nix-lazy-builder` or `nix-lazy-builder
supervise` as root): the program runs as a build user and cannot start it.";

#[derive(Parser)]
#[command(
    name = "nix-lazy-builder",
    version,
    about = "A lazy build hook for Nix: boots builders on demand and stops them when idle",
    after_long_help = HOOK_SETUP,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--config FILE`, shared by every subcommand that reads the config.
#[derive(Args)]
struct ConfigArg {
    /// The lazy-builder TOML config to read [default: $NIX_LAZY_BUILDER_CONFIG, else
    /// /etc/nix/lazy-builder.toml].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run as nix-daemon's build hook (`build-hook = /path/nix-lazy-builder hook`; on Nix 2.8
    /// and 2.9 the bare path).
    #[command(after_long_help = HOOK_SETUP)]
    Hook {
        #[command(flatten)]
        config: ConfigArg,
        /// Whatever the daemon appends; the last one is the client's verbosity (0-7).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        rest: Vec<String>,
    },
    /// Run the supervisor that boots lazy builders and stops idle ones (hooks start one
    /// automatically; a service manager can run it instead).
    Supervise {
        #[command(flatten)]
        config: ConfigArg,
        /// Started by a hook: exit once every lazy builder is down and nobody asked for a while.
        #[arg(long)]
        auto: bool,
    },
    /// Run as a Nix `external-builders` program (Nix 2.32 and newer, experimental): nix-daemon
    /// runs it as the build user with the path of build.json; a running supervisor does the
    /// build on a builder from the same config.
    #[command(after_long_help = EXTERNAL_SETUP)]
    ExternalBuild {
        #[command(flatten)]
        config: ConfigArg,
        /// The build.json nix-daemon wrote.
        #[arg(value_name = "BUILD_JSON")]
        build_json: PathBuf,
    },
    /// The supervisor's helper for one external build (started by the supervisor, not by hand).
    #[command(hide = true)]
    ExternalServe {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show every lazy builder: state, uptime, idle countdown, builds, boots, last failure.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Boot a lazy builder now (also after a failure) and wait until it is ready.
    Up {
        #[command(flatten)]
        name: BuilderName,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Stop a lazy builder once its running builds are done.
    Down {
        #[command(flatten)]
        name: BuilderName,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Check every builder end to end (config, keys, host keys, boot, SSH, remote Nix, systems)
    /// and print one verdict per builder.
    Doctor {
        #[command(flatten)]
        config: ConfigArg,
        /// A Nix `builders` value to check instead of the daemon's (default: `builders` as
        /// nix-daemon reads it from nix.conf, its includes and NIX_CONFIG; unset, Nix's
        /// @/etc/nix/machines).
        #[arg(long, value_name = "BUILDERS")]
        builders: Option<String>,
        /// Stop every lazy builder doctor booted once the check is done (otherwise it stops
        /// when its idle-timeout runs out, and doctor says when).
        #[arg(long)]
        stop: bool,
    },
    /// Print a shell completion script on stdout.
    #[command(after_long_help = "\
Install, for example:
  bash: nix-lazy-builder completions bash > /etc/bash_completion.d/nix-lazy-builder
  zsh:  nix-lazy-builder completions zsh > /usr/local/share/zsh/site-functions/_nix-lazy-builder
  fish: nix-lazy-builder completions fish > ~/.config/fish/completions/nix-lazy-builder.fish")]
    Completions {
        /// The shell to complete for.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on stdout, or write one page per command into a directory.
    Man {
        /// Write nix-lazy-builder.1 and nix-lazy-builder-COMMAND.1 for every command into DIR
        /// (e.g. /usr/local/share/man/man1) instead of printing the main page.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print this help, or the help of the given command.
    Help {
        /// The command (and subcommand) to explain.
        #[arg(value_name = "COMMAND")]
        command: Vec<String>,
    },
}

/// The NAME of `up` and `down`.
#[derive(Args)]
struct BuilderName {
    /// A lazy builder: the NAME of a `[builders.NAME]` table with a `[boot]` section in the
    /// config (`status` lists them).
    #[arg(value_name = "NAME")]
    name: String,
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

/// The environment nix-daemon reads its configuration by (for `doctor`).
fn nix_conf_env() -> config::NixConfEnv {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    config::NixConfEnv {
        conf_dir: var("NIX_CONF_DIR").map(PathBuf::from),
        user_conf_files: var("NIX_USER_CONF_FILES").map(|v| v.to_string_lossy().into_owned()),
        xdg_config_dirs: var("XDG_CONFIG_DIRS").map(|v| v.to_string_lossy().into_owned()),
        xdg_config_home: var("XDG_CONFIG_HOME").map(PathBuf::from),
        home: var("HOME").map(PathBuf::from),
        nix_config: std::env::var("NIX_CONFIG").ok(),
    }
}

/// Nix's `build-users-group`, read as nix-daemon reads its configuration (a hook-started
/// supervisor has the daemon's environment, `NIX_CONFIG` included): the group admitted to the
/// build socket. Nix's default when no file sets it or a file cannot be read (with a warning);
/// `None` when it is set empty (Nix then builds as its own user).
fn build_users_group(env: &config::NixConfEnv) -> Option<String> {
    let default = nix_lazy_builder::external::proto::DEFAULT_BUILD_USERS_GROUP;
    let value = match config::daemon_setting(env, "build-users-group", &mut |p| std::fs::read(p)) {
        Ok((found, _notes)) => found.map(|v| v.value),
        Err(e) => {
            eprintln!("nix-lazy-builder: warning: {e}; the build socket admits '{default}'");
            None
        }
    };
    match value {
        Some(v) if v.is_empty() => None,
        Some(v) => Some(v),
        None => Some(default.to_owned()),
    }
}

/// Prints a command's error (stderr, first) and output, exit status 1 with an error.
fn print(p: cli::Printed) -> ExitCode {
    if let Some(e) = &p.error {
        eprintln!("nix-lazy-builder: {e}");
    }
    let code = write_stdout(p.stdout.as_bytes());
    if p.error.is_some() {
        ExitCode::from(1)
    } else {
        code
    }
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

/// `help [COMMAND…]`: exactly what `COMMAND… --help` prints (clap's own help subcommand is
/// off because it took `help --help` for a command named `--help`).
fn help(path: &[String]) -> ExitCode {
    let args = std::iter::once("nix-lazy-builder")
        .chain(path.iter().map(String::as_str))
        .chain(std::iter::once("--help"));
    match Cli::try_parse_from(args) {
        Err(e) => {
            let code = e.exit_code();
            let _ = e.print();
            ExitCode::from(u8::try_from(code).unwrap_or(2))
        }
        // `help hook 3`: the hook takes any arguments, so `--help` became one of them; show
        // the help of the deepest command the path names.
        Ok(_) => {
            let mut cmd = Cli::command();
            cmd.build();
            let mut at: &clap::Command = &cmd;
            for name in path {
                match at.find_subcommand(name) {
                    Some(sub) => at = sub,
                    None => break,
                }
            }
            let _ = at.clone().print_help();
            ExitCode::SUCCESS
        }
    }
}

/// `completions SHELL`.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "nix-lazy-builder", &mut out);
    write_stdout(&out)
}

/// `man [--dir DIR]`.
fn man(dir: Option<PathBuf>) -> ExitCode {
    let cmd = Cli::command();
    match dir {
        Some(dir) => match clap_mangen::generate_to(cmd, &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report(Err(format!(
                "cannot write the manual pages into {}: {e}",
                dir.display()
            ))),
        },
        None => {
            let mut out = Vec::new();
            match clap_mangen::Man::new(cmd).render(&mut out) {
                Ok(()) => write_stdout(&out),
                Err(e) => report(Err(format!("cannot render the manual page: {e}"))),
            }
        }
    }
}

/// Writes generated text to stdout; a closed pipe (`… | head`) is not an error worth a panic.
fn write_stdout(bytes: &[u8]) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => report(Err(format!("cannot write to stdout: {e}"))),
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
                config: config_path(config.config),
                nix_sshopts: nix_sshopts(),
                verbosity: rest.last().and_then(|v| v.parse().ok()),
            })
        }
        Command::Supervise { config, auto } => {
            nix_lazy_builder::supervisor::main(nix_lazy_builder::supervisor::SuperviseArgs {
                config: config_path(config.config),
                auto,
                build_users_group: build_users_group(&nix_conf_env()),
            })
        }
        Command::ExternalBuild { config, build_json } => {
            nix_lazy_builder::external::client::main(config_path(config.config), &build_json)
        }
        Command::ExternalServe { config } => {
            nix_lazy_builder::external::serve::main(config_path(config.config))
        }
        Command::Status { config, json } => print(cli::status(&config_path(config.config), json)),
        Command::Up { name, config } => report(cli::up(&config_path(config.config), &name.name)),
        Command::Down { name, config } => {
            report(cli::down(&config_path(config.config), &name.name))
        }
        Command::Doctor {
            config,
            builders,
            stop,
        } => {
            let config = config_path(config.config);
            let sshopts = nix_sshopts();
            let nix_conf = nix_conf_env();
            match cli::doctor(cli::DoctorArgs {
                config: &config,
                builders: builders.as_deref(),
                nix_sshopts: sshopts.as_deref(),
                nix_conf: &nix_conf,
                stop,
            }) {
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
        Command::Completions { shell } => completions(shell),
        Command::Man { dir } => man(dir),
        Command::Help { command } => help(&command),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
