//! What the loader says about a configuration: [`ConfigError`] for what stops it, [`Note`] for
//! what it noticed and went past (a skipped machines line, an ignored `NIX_SSHOPTS` option).
//!
//! Every error names the file and line (or the TOML key) a user has to fix. This file holds
//! the types only; it never decides what is an error (the parsers do) and never prints a note
//! by itself ([`Note::emit`] is the caller's choice).

use std::io;
use std::path::PathBuf;

use super::model::MachinesOrigin;

/// Everything that can be wrong with the builder configuration. Each variant names the file and
/// line (or the TOML key) a user has to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A machines-table line Nix itself would reject; `message` is Nix's own text.
    #[error("{origin}: {message}")]
    Machines {
        origin: MachinesOrigin,
        message: String,
    },
    /// An `@file` include that exists but cannot be read (a missing file is ignored, like Nix).
    #[error("{origin}: cannot read machines file '{}': {source}", path.display())]
    MachinesRead {
        origin: MachinesOrigin,
        path: PathBuf,
        source: io::Error,
    },
    /// `@a` includes `@b` which includes `@a` again (Nix would recurse until it crashes).
    #[error("{origin}: machines file include loop: {chain}")]
    IncludeLoop {
        origin: MachinesOrigin,
        chain: String,
    },
    /// A TOML config problem: syntax, unknown key, bad value, failed validation.
    #[error("{}:{line}:{column}: {}{message}", path.display(), key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
    Toml {
        path: PathBuf,
        line: usize,
        column: usize,
        key: Option<String>,
        message: String,
    },
    /// The TOML config exists but cannot be read.
    #[error("cannot read config file '{}': {source}", path.display())]
    TomlRead { path: PathBuf, source: io::Error },
    /// A config file named by `--config` or the environment does not exist.
    #[error("config file '{}' (named by {source_name}) does not exist", path.display())]
    TomlMissing { path: PathBuf, source_name: String },
}

/// How loud a [`Note`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NoteLevel {
    Debug,
    Info,
    Warn,
}

/// Something the loader noticed that is not fatal (a skipped machines line, an ignored
/// `NIX_SSHOPTS` option). The caller decides where to show it; [`Note::emit`] logs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub level: NoteLevel,
    pub message: String,
}

impl Note {
    pub(super) fn new(level: NoteLevel, message: impl Into<String>) -> Self {
        Note {
            level,
            message: message.into(),
        }
    }

    /// Log the note through `tracing` at its level.
    pub fn emit(&self) {
        match self.level {
            NoteLevel::Debug => tracing::debug!("{}", self.message),
            NoteLevel::Info => tracing::info!("{}", self.message),
            NoteLevel::Warn => tracing::warn!("{}", self.message),
        }
    }
}
