//! Nix's machines grammar: a `builders` value (`;`- and newline-separated entries, `#`
//! comments, `@file` includes) expanded into entries ([`expand_builders`]), and one entry's
//! columns (URI, systems, ssh key, maxJobs, speedFactor, supported and mandatory features,
//! base64 host key) parsed into a [`Builder`] ([`parse_machine_entry`]).
//!
//! Nix 2.8 and current Nix differ in how a `builders` value is cut into entries (see
//! [`expand_builders`]); this follows current Nix. Where Nix has an error text for a bad line
//! (`bad machine specification: …`) the error quotes it, prefixed by the file and line. The only
//! files it reads are the `@file` includes, through the reader the caller passes.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use super::error::{ConfigError, Note, NoteLevel};
use super::host_key::{decode_base64_text, parse_key_lines};
use super::model::{Builder, HostKeySpec, MachinesOrigin, MachinesSource, Origin};
use super::uri::{BuilderUri, nix_store_uri};

/// How deep `@file` includes may nest; a backstop behind the include-loop check.
const MAX_INCLUDE_DEPTH: usize = 32;

/// One machine entry after expansion: its text and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineEntry {
    pub origin: MachinesOrigin,
    pub text: String,
}

/// Expand a `builders` value into machine entries, following `@file` includes.
///
/// Current Nix's order (2.29 and later): split into lines, cut each line at the first `#`, then
/// split on `;`; trim each entry and skip empty ones. Nix 2.8 split on `\n` and `;` first and
/// cut at `#` afterwards, so in 2.8 `a # note ; b` still yields machine `b`; here (as in current
/// Nix) the comment swallows it.
///
/// `@path` reads the file with `read` and expands it by the same rules, recursively. A missing
/// file (`NotFound`) is silently ignored, like Nix; other read errors are fatal. Unlike Nix, an
/// include loop is an error instead of unbounded recursion.
pub fn expand_builders(
    spec: &str,
    read: &mut dyn FnMut(&Path) -> io::Result<Vec<u8>>,
) -> Result<Vec<MachineEntry>, ConfigError> {
    let mut out = Vec::new();
    let mut stack = Vec::new();
    expand_into(spec, &MachinesSource::Setting, read, &mut stack, &mut out)?;
    Ok(out)
}

fn expand_into(
    text: &str,
    source: &MachinesSource,
    read: &mut dyn FnMut(&Path) -> io::Result<Vec<u8>>,
    stack: &mut Vec<PathBuf>,
    out: &mut Vec<MachineEntry>,
) -> Result<(), ConfigError> {
    for (index, line) in text.split('\n').enumerate() {
        let origin = MachinesOrigin {
            source: source.clone(),
            line: index + 1,
        };
        let line = line.split('#').next().unwrap_or("");
        for entry in line.split(';') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let Some(path) = entry.strip_prefix('@') else {
                out.push(MachineEntry {
                    origin: origin.clone(),
                    text: entry.to_owned(),
                });
                continue;
            };
            let path = PathBuf::from(path.trim());
            let identity = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            if stack.contains(&identity) || stack.len() >= MAX_INCLUDE_DEPTH {
                let mut chain: Vec<String> =
                    stack.iter().map(|p| p.display().to_string()).collect();
                chain.push(identity.display().to_string());
                return Err(ConfigError::IncludeLoop {
                    origin,
                    chain: chain.join(" -> "),
                });
            }
            let bytes = match read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::debug!("cannot find machines file '{}'", path.display());
                    continue;
                }
                Err(source) => {
                    return Err(ConfigError::MachinesRead {
                        origin,
                        path,
                        source,
                    });
                }
            };
            let text = String::from_utf8_lossy(&bytes);
            stack.push(identity);
            let result = expand_into(&text, &MachinesSource::File(path), read, stack, out);
            stack.pop();
            result?;
        }
    }
    Ok(())
}

/// The result of parsing one machine entry.
#[derive(Clone, Debug, PartialEq)]
pub enum MachineParse {
    Builder(Box<Builder>),
    /// A valid Nix machine we cannot use (not an SSH store): kept out of the table. This is a
    /// note, not an error, so that one such line does not stop every remote build.
    Skipped(Note),
}

/// Parse one machine entry (Nix's columns: URI, systems, ssh key, maxJobs, speedFactor,
/// supported features, mandatory features, base64 host key; `-` or missing = unset).
pub fn parse_machine_entry(
    entry: &MachineEntry,
    default_system: &str,
) -> Result<MachineParse, ConfigError> {
    let line = entry.text.as_str();
    let origin = &entry.origin;
    let bad = |message: String| ConfigError::Machines {
        origin: origin.clone(),
        message: format!("bad machine specification: {message}"),
    };
    let tokens: Vec<&str> = line
        .split([' ', '\t', '\n', '\r'])
        .filter(|t| !t.is_empty())
        .collect();
    let get = |i: usize| tokens.get(i).copied().filter(|t| *t != "-");

    let Some(first) = get(0) else {
        return Err(bad(format!(
            "store URL was not found at the first column of a row: '{line}'"
        )));
    };
    let store_uri = nix_store_uri(first);
    let systems: BTreeSet<String> = match get(1) {
        Some(s) => split_commas(s),
        None => BTreeSet::from([default_system.to_owned()]),
    };
    let ssh_key_column = get(2).map(PathBuf::from);
    let max_jobs = match get(3) {
        None => 1,
        Some(s) => parse_unsigned(s).ok_or_else(|| {
            bad(format!(
                "failed to convert column #3 in a row: '{line}' to 'unsigned int'"
            ))
        })?,
    };
    let speed_factor = match get(4) {
        None => 1.0,
        Some(s) => {
            let v: f64 = s
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite())
                .ok_or_else(|| {
                    bad(format!(
                        "failed to convert column #4 in a row: '{line}' to 'float'"
                    ))
                })?;
            if v < 0.0 {
                return Err(ConfigError::Machines {
                    origin: origin.clone(),
                    message: format!("speed factor must be >= 0 (in '{line}')"),
                });
            }
            if v == 0.0 { 1.0 } else { v }
        }
    };
    let supported_features = get(5).map(split_commas).unwrap_or_default();
    let mandatory_features = get(6).map(split_commas).unwrap_or_default();
    let host_key_column = match get(7) {
        None => None,
        Some(b64) => Some(decode_base64_text(b64).map_err(|e| {
            bad(format!(
                "a column #7 in a row: '{line}' is not valid base64 string: {e}"
            ))
        })?),
    };
    let host_key_column = match host_key_column {
        None => None,
        Some(text) => Some(parse_key_lines(&text).map_err(|e| {
            bad(format!(
                "column #7 in a row: '{line}' does not hold an SSH public host key: {e}"
            ))
        })?),
    };

    let uri = match BuilderUri::parse(&store_uri) {
        Ok(uri) => uri,
        Err(e) => {
            // Nix accepts these stores as machines, but we can only build over SSH. Skipping the
            // line (instead of failing the whole table) keeps the other builders usable.
            return Ok(MachineParse::Skipped(Note::new(
                NoteLevel::Warn,
                format!("{origin}: ignoring machine: {e}"),
            )));
        }
    };

    // Machine columns override same-named URI parameters (Nix's map-insert order).
    let ssh_key = ssh_key_column.or_else(|| uri.params.get("ssh-key").map(PathBuf::from));
    let host_keys = match host_key_column {
        Some(keys) => HostKeySpec::Pinned(keys),
        None => match uri.params.get("base64-ssh-public-host-key") {
            Some(b64) => {
                let text = decode_base64_text(b64).map_err(|e| {
                    bad(format!(
                        "the base64-ssh-public-host-key parameter in '{line}' is not valid base64: {e}"
                    ))
                })?;
                HostKeySpec::Pinned(parse_key_lines(&text).map_err(|e| {
                    bad(format!(
                        "the base64-ssh-public-host-key parameter in '{line}' does not hold an SSH public host key: {e}"
                    ))
                })?)
            }
            None => HostKeySpec::SshDefault,
        },
    };
    if tokens.len() > 8 {
        tracing::debug!("{origin}: ignoring extra columns after the 8th (as Nix does)");
    }
    Ok(MachineParse::Builder(Box::new(Builder {
        name: store_uri.clone(),
        uri,
        store_uri,
        systems,
        ssh_key,
        max_jobs,
        speed_factor,
        supported_features,
        mandatory_features,
        host_keys,
        allow_well_known_host_key: false,
        keep_warm: super::DEFAULT_KEEP_WARM,
        origin: Origin::Machines(origin.clone()),
        lazy: None,
    })))
}

fn split_commas(s: &str) -> BTreeSet<String> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_unsigned(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parse a whole `builders` value: expand it, then parse every entry. Returns the usable
/// builders in table order and the notes about lines that were skipped.
pub fn parse_machines(
    spec: &str,
    default_system: &str,
    read: &mut dyn FnMut(&Path) -> io::Result<Vec<u8>>,
) -> Result<(Vec<Builder>, Vec<Note>), ConfigError> {
    let mut builders = Vec::new();
    let mut notes = Vec::new();
    for entry in expand_builders(spec, read)? {
        match parse_machine_entry(&entry, default_system)? {
            MachineParse::Builder(b) => builders.push(*b),
            MachineParse::Skipped(note) => notes.push(note),
        }
    }
    Ok((builders, notes))
}

/// The file reader for [`expand_builders`] / [`parse_machines`] that reads the real files.
pub fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    std::fs::read(path)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{ECDSA, ED25519, b64, err_text, fake_fs, machines, one, set};
    use super::*;

    #[test]
    fn separators_comments_and_line_numbers() {
        let e = expand_builders(
            "a ; b\n# all comment\n  c x86_64-linux # trailing ; d\n\n;;e",
            &mut fake_fs(&[]),
        )
        .unwrap();
        let got: Vec<(&str, usize)> = e.iter().map(|e| (e.text.as_str(), e.origin.line)).collect();
        // Current Nix: the `#` cuts the rest of its line, so `d` is gone (Nix 2.8 kept it).
        assert_eq!(got, [("a", 1), ("b", 1), ("c x86_64-linux", 3), ("e", 5)]);
        assert!(e.iter().all(|e| e.origin.source == MachinesSource::Setting));
    }

    #[test]
    fn includes_are_recursive_and_missing_files_ignored() {
        let fs = [
            (
                "/etc/nix/machines",
                "first\n@ /etc/nix/more\n@/nonexistent\nlast",
            ),
            ("/etc/nix/more", "# header\n\nmiddle;other"),
        ];
        let e = expand_builders("@/etc/nix/machines; setting", &mut fake_fs(&fs)).unwrap();
        let got: Vec<String> = e
            .iter()
            .map(|e| format!("{} {}", e.origin, e.text))
            .collect();
        assert_eq!(
            got,
            [
                "/etc/nix/machines:1 first",
                "/etc/nix/more:3 middle",
                "/etc/nix/more:3 other",
                "/etc/nix/machines:4 last",
                "the 'builders' setting, line 1 setting",
            ]
        );
    }

    #[test]
    fn unreadable_include_is_fatal_and_loops_are_caught() {
        let msg = err_text(machines("ok\n@/denied", &[]));
        assert!(msg.contains("line 2") && msg.contains("/denied"), "{msg}");
        let fs = [("/a", "x\n@/b"), ("/b", "@/a")];
        let msg = err_text(machines("@/a", &fs));
        assert!(
            msg.contains("include loop")
                && msg.contains("/a -> /b -> /a")
                && msg.starts_with("/b:1"),
            "{msg}"
        );
        // The same file twice, not nested, is fine.
        let (b, _) = machines("@/b2;@/b2", &[("/b2", "h1")]).unwrap();
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn all_columns() {
        let key = b64(&format!("{ED25519}\n{ECDSA}\n"));
        let b = one(&format!(
            "ssh-ng://root@h:2222 aarch64-linux,armv7l-linux /k 4 2.5 kvm,big-parallel benchmark {key}"
        ));
        assert_eq!(b.name, "ssh-ng://root@h:2222");
        assert_eq!(b.store_uri, "ssh-ng://root@h:2222");
        assert_eq!(b.uri.port, Some(2222));
        assert_eq!(b.systems, set(&["aarch64-linux", "armv7l-linux"]));
        assert_eq!(b.ssh_key.as_deref(), Some(Path::new("/k")));
        assert_eq!((b.max_jobs, b.speed_factor), (4, 2.5));
        assert_eq!(b.supported_features, set(&["big-parallel", "kvm"]));
        assert_eq!(b.mandatory_features, set(&["benchmark"]));
        let HostKeySpec::Pinned(keys) = &b.host_keys else {
            panic!("{:?}", b.host_keys)
        };
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].algorithm, "ssh-ed25519");
        assert_eq!(keys[0].comment.as_deref(), Some("root@builder"));
        assert_eq!(keys[1].algorithm, "ecdsa-sha2-nistp256");
        assert_eq!(keys[0].blob().len(), 51);
        assert!(b.lazy.is_none());
        // Unpadded base64 is accepted, like Nix's decoder.
        let unpadded = b64(&format!("{ED25519}\n"))
            .trim_end_matches('=')
            .to_owned();
        assert!(!unpadded.len().is_multiple_of(4), "{unpadded}");
        let b = one(&format!("ssh://h x86_64-linux - 1 1 - - {unpadded}"));
        assert!(matches!(&b.host_keys, HostKeySpec::Pinned(k) if k.len() == 1));
        assert_eq!(
            b.origin.to_string(),
            "machines line the 'builders' setting, line 1"
        );
    }

    #[test]
    fn placeholders_and_defaults() {
        let b = one("root@h - - - - - - -");
        assert_eq!(b.store_uri, "ssh://root@h");
        assert_eq!(b.systems, set(&["x86_64-linux"]));
        assert_eq!(
            (b.ssh_key.clone(), b.max_jobs, b.speed_factor),
            (None, 1, 1.0)
        );
        assert!(b.supported_features.is_empty() && b.mandatory_features.is_empty());
        assert_eq!(b.host_keys, HostKeySpec::SshDefault);
        let b = one("h\tx86_64-linux,,i686-linux - 0 0");
        assert_eq!(b.systems, set(&["i686-linux", "x86_64-linux"]));
        assert_eq!(
            (b.max_jobs, b.speed_factor),
            (0, 1.0),
            "maxJobs 0 is kept; speed 0 means 1"
        );
    }

    #[test]
    fn bad_columns_quote_nix() {
        let msg = err_text(machines("a\nh x86_64-linux - two", &[]));
        assert_eq!(
            msg,
            "the 'builders' setting, line 2: bad machine specification: failed to convert column #3 in a row: 'h x86_64-linux - two' to 'unsigned int'"
        );
        assert!(err_text(machines("h - - -1", &[])).contains("column #3"));
        assert!(err_text(machines("h - - +1", &[])).contains("column #3"));
        assert!(
            err_text(machines("h - - 1 fast", &[]))
                .contains("column #4 in a row: 'h - - 1 fast' to 'float'")
        );
        assert!(err_text(machines("h - - 1 inf", &[])).contains("'float'"));
        assert!(err_text(machines("h - - 1 -2", &[])).contains("speed factor must be >= 0"));
        let msg = err_text(machines("- x86_64-linux", &[("/x", "")]));
        assert!(
            msg.contains("store URL was not found at the first column of a row: '- x86_64-linux'"),
            "{msg}"
        );
        let msg = err_text(machines("@/m", &[("/m", "\n\nh - - - - - - !!notbase64")]));
        assert!(
            msg.starts_with("/m:3: bad machine specification: a column #7 in a row:")
                && msg.contains("is not valid base64 string"),
            "{msg}"
        );
        let msg = err_text(machines(
            &format!("h - - - - - - {}", b64("hello world")),
            &[],
        ));
        assert!(
            msg.contains("does not hold an SSH public host key"),
            "{msg}"
        );
        // A key line whose blob says another type.
        let lie = ED25519.replacen("ssh-ed25519", "ssh-rsa", 1);
        assert!(
            err_text(machines(&format!("h - - - - - - {}", b64(&lie)), &[]))
                .contains("is a 'ssh-ed25519' key")
        );
    }

    #[test]
    fn columns_override_uri_parameters() {
        // (line, the key used, the host key's algorithm, the URI as written)
        for (line, key, algorithm, uri) in [
            (
                format!(
                    "ssh://h?ssh-key=/from-param&base64-ssh-public-host-key={} - /from-column",
                    b64(ECDSA)
                ),
                "/from-column",
                "ecdsa-sha2-nistp256",
                None,
            ),
            (
                format!("ssh://h?ssh-key=/from-param - - - - - - {}", b64(ED25519)),
                "/from-param",
                "ssh-ed25519",
                Some("ssh://h?ssh-key=/from-param"),
            ),
        ] {
            let b = one(&line);
            assert_eq!(b.ssh_key.as_deref(), Some(Path::new(key)), "{line}");
            let HostKeySpec::Pinned(k) = &b.host_keys else {
                panic!("{line}: {:?}", b.host_keys)
            };
            assert_eq!(k[0].algorithm, algorithm, "{line}");
            if let Some(uri) = uri {
                assert_eq!(b.store_uri, uri, "the slot key is the URI as written");
            }
        }
    }

    #[test]
    fn non_ssh_stores_are_skipped_with_a_warning() {
        let (b, notes) = machines(
            "local x86_64-linux\n/tmp/store\nauto\nhttps://c\nssh://h:bad\nroot@good",
            &[],
        )
        .unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].store_uri, "ssh://root@good");
        assert_eq!(notes.len(), 5);
        assert!(notes.iter().all(|n| n.level == NoteLevel::Warn));
        assert!(
            notes[0]
                .message
                .starts_with("the 'builders' setting, line 1: ignoring machine: 'local'"),
            "{:?}",
            notes[0]
        );
        assert!(notes[4].message.contains("bad port"));
    }
}
