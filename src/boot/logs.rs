//! The per-builder log files a backend writes into its state directory (`console.log`,
//! `qemu.log`, `darling.log`, `command.log`): rotation at each start, and the last meaningful
//! line for one-line error messages.
//!
//! Must never: read a whole (possibly huge) log into memory; only the tail is read.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How much of a log's end is read to find its last line.
const TAIL_BYTES: u64 = 8192;
/// Longest line shown in an error message.
const MAX_LINE_CHARS: usize = 300;

/// Moves `path` to `path.1` (replacing an older one), so each start writes a fresh log and
/// the previous boot's log stays around for a post-mortem.
pub(super) fn rotate(path: &Path) -> io::Result<()> {
    match std::fs::rename(path, rotated(path)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Creates (truncating) a log file readable by its owner only.
pub(super) fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Opens `path` for appending (several writers may share it), creating it if needed.
pub(super) fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// The last non-empty line of the file, cleaned for a one-line message.
pub(super) fn last_line(path: &Path) -> Option<String> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.take(TAIL_BYTES).read_to_end(&mut buf).ok()?;
    last_line_of(&buf)
}

/// The first of `paths` that has a last line.
pub(super) fn last_line_of_any(paths: &[PathBuf]) -> Option<String> {
    paths.iter().find_map(|p| last_line(p))
}

/// The last line with visible text in `bytes`: ANSI escape sequences and control characters
/// removed, white space collapsed, cut to a sensible length.
pub(super) fn last_line_of(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    text.split(['\n', '\r'])
        .rev()
        .map(clean)
        .find(|l| !l.is_empty())
}

fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte; other escapes: ESC + one char.
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
            continue;
        }
        if c.is_control() {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    let collapsed = out.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.chars().count() > MAX_LINE_CHARS {
        let cut: String = collapsed.chars().take(MAX_LINE_CHARS).collect();
        format!("{cut}…")
    } else {
        collapsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines() {
        assert_eq!(last_line_of(b""), None);
        assert_eq!(last_line_of(b"\n\n  \r\n"), None);
        assert_eq!(last_line_of(b"one\ntwo\n\n").as_deref(), Some("two"));
        assert_eq!(
            last_line_of(b"a\r\n\x1b[1;31merror:\x1b[0m bad\tthing\r\n").as_deref(),
            Some("error: bad thing")
        );
        assert_eq!(last_line_of(b"x\n\x1b[2J\x1b[H\n").as_deref(), Some("x"));
        assert_eq!(
            last_line_of(b"bytes \xff\xfe here").as_deref(),
            Some("bytes \u{fffd}\u{fffd} here")
        );
        let long = "y".repeat(1000);
        let l = last_line_of(long.as_bytes()).unwrap();
        assert_eq!(l.chars().count(), MAX_LINE_CHARS + 1);
        assert!(l.ends_with('…'));
    }

    #[test]
    fn tail_of_a_big_file_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        assert_eq!(last_line(&p), None);
        let mut text = "filler line\n".repeat(10_000);
        text.push_str("the end\n");
        std::fs::write(&p, &text).unwrap();
        assert_eq!(last_line(&p).as_deref(), Some("the end"));
        rotate(&p).unwrap();
        assert!(!p.exists());
        assert_eq!(
            last_line(&dir.path().join("x.log.1")).as_deref(),
            Some("the end")
        );
        rotate(&p).unwrap(); // nothing to rotate: fine
        let f = create(&p).unwrap();
        drop(f);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(dir.path().join("b.log"), "b\n").unwrap();
        assert_eq!(
            last_line_of_any(&[p.clone(), dir.path().join("b.log")]).as_deref(),
            Some("b")
        );
    }
}
