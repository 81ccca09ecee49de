//! Nix's own configuration, read for one setting the way nix-daemon reads it: the system file
//! (`$NIX_CONF_DIR/nix.conf`, default `/etc/nix/nix.conf`), the user files
//! (`$NIX_USER_CONF_FILES`, else `nix/nix.conf` under `$XDG_CONFIG_DIRS` and
//! `$XDG_CONFIG_HOME`, default `/etc/xdg` and `~/.config`), then `$NIX_CONFIG`; the last
//! assignment wins. `doctor` uses it to find the daemon's `builders` ([`daemon_setting`]).
//!
//! The grammar is Nix's: one `name = value` per line, `#` starts a comment, the value is the
//! rest of the line's words joined by single spaces; `include PATH` reads another file
//! (relative to the including one), and `!include PATH` the same unless it is missing.
//!
//! Owns the grammar and the search order. Must never read the environment (the caller passes
//! [`NixConfEnv`]) or any file but the ones the order and the includes name, and never fails
//! on what Nix would only warn about: a missing `include` becomes a [`Note`].

use std::io;
use std::path::{Path, PathBuf};

use super::error::{Note, NoteLevel};

/// The environment nix-daemon reads its configuration by (read by `main`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NixConfEnv {
    /// `NIX_CONF_DIR` (default `/etc/nix`).
    pub conf_dir: Option<PathBuf>,
    /// `NIX_USER_CONF_FILES`: `:`-separated files that replace the XDG search.
    pub user_conf_files: Option<String>,
    /// `XDG_CONFIG_DIRS` (default `/etc/xdg`).
    pub xdg_config_dirs: Option<String>,
    /// `XDG_CONFIG_HOME` (default `$HOME/.config`).
    pub xdg_config_home: Option<PathBuf>,
    /// `HOME`.
    pub home: Option<PathBuf>,
    /// `NIX_CONFIG`: configuration text applied last.
    pub nix_config: Option<String>,
}

impl NixConfEnv {
    /// `NIX_CONF_DIR`, or Nix's default.
    pub fn conf_dir(&self) -> PathBuf {
        self.conf_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/nix"))
    }

    /// The files read, in the order they are applied (a later one wins).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.conf_dir().join("nix.conf")];
        let user: Vec<PathBuf> = match &self.user_conf_files {
            Some(list) => list
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect(),
            None => {
                let home = self
                    .xdg_config_home
                    .clone()
                    .or_else(|| self.home.as_ref().map(|h| h.join(".config")));
                let dirs = self.xdg_config_dirs.as_deref().unwrap_or("/etc/xdg");
                home.into_iter()
                    .chain(dirs.split(':').filter(|s| !s.is_empty()).map(PathBuf::from))
                    .map(|d| d.join("nix/nix.conf"))
                    .collect()
            }
        };
        // Nix applies the user files in reverse: the first one named wins.
        files.extend(user.into_iter().rev());
        files
    }
}

/// A setting's value and where it was set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingValue {
    pub value: String,
    /// `/etc/nix/nix.conf:4`, `NIX_CONFIG, line 1`.
    pub origin: String,
}

/// Why the configuration cannot be read as Nix would read it.
#[derive(Debug, thiserror::Error)]
pub enum NixConfError {
    /// A line Nix rejects (`illegal configuration line`).
    #[error("{origin}: illegal configuration line '{line}' (Nix refuses it)")]
    Illegal { origin: String, line: String },
    /// A file that exists but cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// `include` files that include each other.
    #[error("{origin}: include loop through {}", path.display())]
    Loop { origin: String, path: PathBuf },
}

/// The value of `name` as nix-daemon would have it from its configuration (`None`: never set,
/// Nix's default applies), with the notes a user should see (a missing `include`). Files that
/// do not exist are skipped, as Nix skips them.
pub fn daemon_setting(
    env: &NixConfEnv,
    name: &str,
    read: &mut dyn FnMut(&Path) -> io::Result<Vec<u8>>,
) -> Result<(Option<SettingValue>, Vec<Note>), NixConfError> {
    let mut found = None;
    let mut notes = Vec::new();
    for file in env.files() {
        let bytes = match read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(NixConfError::Read { path: file, source }),
        };
        let mut stack = vec![file.clone()];
        let text = String::from_utf8_lossy(&bytes);
        apply(
            &text,
            Source::File(&file),
            name,
            read,
            &mut stack,
            &mut found,
            &mut notes,
        )?;
    }
    if let Some(text) = &env.nix_config {
        let mut stack = Vec::new();
        apply(
            text,
            Source::Env,
            name,
            read,
            &mut stack,
            &mut found,
            &mut notes,
        )?;
    }
    Ok((found, notes))
}

#[derive(Clone, Copy)]
enum Source<'a> {
    File(&'a Path),
    Env,
}

impl Source<'_> {
    fn origin(self, line: usize) -> String {
        match self {
            Source::File(p) => format!("{}:{line}", p.display()),
            Source::Env => format!("NIX_CONFIG, line {line}"),
        }
    }
}

fn apply(
    text: &str,
    source: Source<'_>,
    name: &str,
    read: &mut dyn FnMut(&Path) -> io::Result<Vec<u8>>,
    stack: &mut Vec<PathBuf>,
    found: &mut Option<SettingValue>,
    notes: &mut Vec<Note>,
) -> Result<(), NixConfError> {
    for (i, raw) in text.split('\n').enumerate() {
        let origin = source.origin(i + 1);
        let line = raw.split('#').next().unwrap_or("");
        let words: Vec<&str> = line
            .split([' ', '\t', '\r'])
            .filter(|w| !w.is_empty())
            .collect();
        if words.is_empty() {
            continue;
        }
        let illegal = || NixConfError::Illegal {
            origin: origin.clone(),
            line: line.trim().to_owned(),
        };
        if words[0] == "include" || words[0] == "!include" {
            let [_, path] = words[..] else {
                return Err(illegal());
            };
            // Relative to the including file (NIX_CONFIG: to the working directory, as Nix).
            let path = match source {
                Source::File(f) => f.parent().unwrap_or(Path::new("/")).join(path),
                Source::Env => PathBuf::from(path),
            };
            match read(&path) {
                Ok(bytes) => {
                    if stack.contains(&path) {
                        return Err(NixConfError::Loop { origin, path });
                    }
                    stack.push(path.clone());
                    let text = String::from_utf8_lossy(&bytes);
                    apply(&text, Source::File(&path), name, read, stack, found, notes)?;
                    stack.pop();
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if words[0] == "include" {
                        notes.push(Note::new(
                            NoteLevel::Warn,
                            format!(
                                "{origin}: included file {} does not exist (Nix refuses this \
                                 configuration; `!include` allows a missing file)",
                                path.display()
                            ),
                        ));
                    }
                }
                Err(source) => return Err(NixConfError::Read { path, source }),
            }
            continue;
        }
        if words.len() < 2 || words[1] != "=" {
            return Err(illegal());
        }
        if words[0] == name {
            *found = Some(SettingValue {
                value: words[2..].join(" "),
                origin,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn fs(files: &[(&str, &str)]) -> impl FnMut(&Path) -> io::Result<Vec<u8>> {
        let map: HashMap<PathBuf, Vec<u8>> = files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.as_bytes().to_vec()))
            .collect();
        move |p: &Path| {
            map.get(p)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
    }

    fn env() -> NixConfEnv {
        NixConfEnv {
            home: Some("/root".into()),
            ..NixConfEnv::default()
        }
    }

    #[test]
    fn the_search_order_is_nixs() {
        assert_eq!(
            env().files(),
            [
                PathBuf::from("/etc/nix/nix.conf"),
                "/etc/xdg/nix/nix.conf".into(),
                "/root/.config/nix/nix.conf".into()
            ]
        );
        let e = NixConfEnv {
            conf_dir: Some("/x".into()),
            user_conf_files: Some("/a.conf:/b.conf".into()),
            ..env()
        };
        assert_eq!(
            e.files(),
            [
                PathBuf::from("/x/nix.conf"),
                "/b.conf".into(),
                "/a.conf".into()
            ]
        );
    }

    #[test]
    fn the_last_assignment_wins_through_includes_and_nix_config() {
        let mut read = fs(&[
            (
                "/etc/nix/nix.conf",
                "# comment\nbuilders = @/etc/nix/machines   # trailing\ninclude extra.conf\n\
                 !include /absent.conf\nsubstituters =\n",
            ),
            (
                "/etc/nix/extra.conf",
                "builders   =  @/etc/nix/more   ssh://b\n",
            ),
        ]);
        let (v, notes) = daemon_setting(&env(), "builders", &mut read).unwrap();
        assert_eq!(
            v,
            Some(SettingValue {
                value: "@/etc/nix/more ssh://b".into(),
                origin: "/etc/nix/extra.conf:1".into()
            })
        );
        assert!(notes.is_empty(), "{notes:?}");
        let e = NixConfEnv {
            nix_config: Some("max-jobs = 2\nbuilders = @/from/env\n".into()),
            ..env()
        };
        let (v, _) = daemon_setting(&e, "builders", &mut read).unwrap();
        assert_eq!(
            v,
            Some(SettingValue {
                value: "@/from/env".into(),
                origin: "NIX_CONFIG, line 2".into()
            })
        );
        // An empty value is a value (no builders).
        let mut read = fs(&[("/etc/nix/nix.conf", "builders =\n")]);
        let (v, _) = daemon_setting(&env(), "builders", &mut read).unwrap();
        assert_eq!(v.unwrap().value, "");
        // Nothing set anywhere.
        let (v, _) = daemon_setting(&env(), "builders", &mut fs(&[])).unwrap();
        assert_eq!(v, None);
    }

    #[test]
    fn what_nix_refuses_or_warns_about() {
        let mut read = fs(&[("/etc/nix/nix.conf", "builders @/x\n")]);
        let e = daemon_setting(&env(), "builders", &mut read).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/nix/nix.conf:1: illegal configuration line 'builders @/x' (Nix refuses it)"
        );
        let mut read = fs(&[("/etc/nix/nix.conf", "include gone.conf\nbuilders = a\n")]);
        let (v, notes) = daemon_setting(&env(), "builders", &mut read).unwrap();
        assert_eq!(v.unwrap().value, "a");
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].message.starts_with(
                "/etc/nix/nix.conf:1: included file /etc/nix/gone.conf does not exist"
            ),
            "{notes:?}"
        );
        let mut read = fs(&[
            ("/etc/nix/nix.conf", "include a.conf\n"),
            ("/etc/nix/a.conf", "include nix.conf\n"),
        ]);
        assert!(matches!(
            daemon_setting(&env(), "builders", &mut read),
            Err(NixConfError::Loop { .. })
        ));
    }
}
