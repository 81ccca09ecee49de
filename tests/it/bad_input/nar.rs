//! Hostile NARs through the real unpacking path (`place::Placed::unpack`) into a temporary
//! "store" that has a sibling `outside/` directory with files in it.
//!
//! For every case the whole temporary tree is compared before and after: nothing may appear,
//! change or disappear outside the output path, and a rejected output is removed. Cases:
//! entry names `..`, `.`, `/`-containing, absolute, NUL-containing and empty; symlinks that
//! escape (`../../etc/passwd`, absolute targets), which are created as they are (as Nix does)
//! but never followed, including a later entry that tries to write "through" a symlink; the
//! same name twice and names out of order; every truncation of a valid NAR; hostile lengths
//! (`u64::MAX` contents, names and targets longer than any limit), which must fail fast without
//! a large allocation; deep nesting; trailing bytes; a hash mismatch; non-UTF-8 names, which
//! are kept byte for byte; and a stale file, directory or symlink already at the output path,
//! which is replaced and never followed.

#[path = "../../../hook-protocol/tests/bad_input/mod.rs"]
mod bad_input;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bad_input::{Counting, largest_allocation};
use hook_protocol::{Sha256, StorePath};
use nix_lazy_builder::place::{ExpectedNar, PlaceError, Placed};

/// The allocator of the whole test process (tests/it/main.rs says so): it records the largest
/// allocation per thread, which is what `hostile_lengths_fail_fast_without_allocating` reads.
#[global_allocator]
static ALLOC: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// A NAR writer that writes whatever it is told (unsorted, duplicate and invalid names too).

enum Node {
    File { exec: bool, data: Vec<u8> },
    Link(Vec<u8>),
    Dir(Vec<(Vec<u8>, Node)>),
}

fn file(data: &[u8]) -> Node {
    Node::File {
        exec: false,
        data: data.to_vec(),
    }
}

fn link(target: &str) -> Node {
    Node::Link(target.as_bytes().to_vec())
}

fn dir(entries: Vec<(&[u8], Node)>) -> Node {
    Node::Dir(entries.into_iter().map(|(n, c)| (n.to_vec(), c)).collect())
}

fn put(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
    out.resize(out.len() + (8 - b.len() % 8) % 8, 0);
}

fn put_node(out: &mut Vec<u8>, n: &Node) {
    put(out, b"(");
    put(out, b"type");
    match n {
        Node::File { exec, data } => {
            put(out, b"regular");
            if *exec {
                put(out, b"executable");
                put(out, b"");
            }
            put(out, b"contents");
            put(out, data);
        }
        Node::Link(t) => {
            put(out, b"symlink");
            put(out, b"target");
            put(out, t);
        }
        Node::Dir(entries) => {
            put(out, b"directory");
            for (name, child) in entries {
                put(out, b"entry");
                put(out, b"(");
                put(out, b"name");
                put(out, name);
                put(out, b"node");
                put_node(out, child);
                put(out, b")");
            }
        }
    }
    put(out, b")");
}

fn nar(n: &Node) -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, b"nix-archive-1");
    put_node(&mut out, n);
    out
}

// ---------------------------------------------------------------------------------------------
// The temporary store and its snapshots

struct Store {
    root: tempfile::TempDir,
}

const OUT: &str = "0123456789abcdfghijklmnpqrsvwxyz-out";

impl Store {
    fn new() -> Store {
        let root = tempfile::tempdir().expect("temp dir");
        let r = root.path();
        std::fs::create_dir_all(r.join("store")).unwrap();
        std::fs::create_dir_all(r.join("outside/dir")).unwrap();
        std::fs::write(r.join("outside/passwd"), b"root:x:0:0\n").unwrap();
        std::fs::write(r.join("outside/dir/keep"), b"keep me").unwrap();
        Store { root }
    }

    fn dest(&self) -> PathBuf {
        self.root.path().join("store").join(OUT)
    }

    fn outside(&self) -> PathBuf {
        self.root.path().join("outside")
    }

    fn expected(&self, nar: &[u8]) -> ExpectedNar {
        ExpectedNar {
            path: StorePath::parse(self.dest().to_str().unwrap()).unwrap(),
            nar_hash: Sha256::digest(nar),
            nar_size: nar.len() as u64,
            deriver: None,
            references: vec![],
        }
    }

    /// Every path under the root except the output path's subtree: kind, mode, contents or
    /// symlink target.
    fn snapshot(&self) -> BTreeMap<Vec<u8>, String> {
        let mut out = BTreeMap::new();
        let dest = self.dest();
        let mut stack = vec![self.root.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p == dest {
                    continue;
                }
                let m = std::fs::symlink_metadata(&p).unwrap();
                let what = if m.file_type().is_symlink() {
                    format!("link {:?}", std::fs::read_link(&p).unwrap())
                } else if m.is_dir() {
                    stack.push(p.clone());
                    format!("dir {:o}", m.permissions().mode())
                } else {
                    format!(
                        "file {:o} {:?}",
                        m.permissions().mode(),
                        std::fs::read(&p).unwrap()
                    )
                };
                out.insert(p.as_os_str().as_bytes().to_vec(), what);
            }
        }
        out
    }

    /// Unpacks `nar` (vouched for with its own hash and size unless `expected` says
    /// otherwise) and checks that nothing outside the output path changed.
    fn unpack(
        &self,
        nar: &[u8],
        expected: Option<ExpectedNar>,
    ) -> (Placed, Result<(), PlaceError>) {
        let before = self.snapshot();
        let mut placed = Placed::new();
        let r = placed.unpack(expected.unwrap_or_else(|| self.expected(nar)), nar);
        assert_eq!(
            before,
            self.snapshot(),
            "something outside the output path changed"
        );
        (placed, r)
    }

    /// A NAR that must be refused: the error, the output removed, nothing else touched.
    #[track_caller]
    fn refuse(&self, case: &str, nar: &[u8]) -> PlaceError {
        let (placed, r) = self.unpack(nar, None);
        let e = match r {
            Err(e) => e,
            Ok(()) => panic!("{case}: accepted"),
        };
        assert!(placed.is_empty(), "{case}");
        assert!(
            std::fs::symlink_metadata(self.dest()).is_err(),
            "{case}: the rejected output is still there"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(OUT),
            "{case}: the error does not name the path: {msg}"
        );
        e
    }
}

fn nar_error(e: &PlaceError) -> String {
    match e {
        PlaceError::Unpack { source, .. } => format!("{source:?}"),
        other => panic!("expected an unpack error, got {other}"),
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn bad_entry_names_are_refused() {
    let s = Store::new();
    for name in [
        b"..".as_slice(),
        b".",
        b"a/b",
        b"/abs",
        b"../outside",
        b"a\0b",
        b"",
    ] {
        let n = nar(&dir(vec![(name, file(b"x"))]));
        let e = s.refuse(&format!("name {name:?}"), &n);
        assert!(nar_error(&e).starts_with("InvalidName"), "{name:?}: {e}");
    }
}

#[test]
fn duplicate_and_unsorted_entries_are_refused() {
    let s = Store::new();
    let dup = nar(&dir(vec![(b"a", file(b"1")), (b"a", file(b"2"))]));
    assert!(nar_error(&s.refuse("duplicate", &dup)).starts_with("UnsortedEntries"));
    let unsorted = nar(&dir(vec![(b"b", file(b"1")), (b"a", file(b"2"))]));
    assert!(nar_error(&s.refuse("unsorted", &unsorted)).starts_with("UnsortedEntries"));
    // A symlink to a directory outside, then the same name again as a directory with a file in
    // it: the second entry would write "through" the symlink. It is a duplicate, refused before
    // anything is written for it.
    let through = nar(&dir(vec![
        (b"a", link("../../outside/dir")),
        (b"a", dir(vec![(b"pwned", file(b"x"))])),
    ]));
    s.refuse("write through a symlink", &through);
    assert!(!s.outside().join("dir/pwned").exists());
}

#[test]
fn escaping_symlinks_are_created_as_they_are_and_never_followed() {
    let s = Store::new();
    let n = nar(&dir(vec![
        (b"abs", link("/etc/passwd")),
        (b"dotdot", link("../../etc/passwd")),
        (b"sub", dir(vec![(b"up", link("../../outside/dir"))])),
        (b"z-after", file(b"written inside")),
    ]));
    let (placed, r) = s.unpack(&n, None);
    r.unwrap();
    let d = s.dest();
    assert_eq!(
        std::fs::read_link(d.join("abs")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        std::fs::read_link(d.join("dotdot")).unwrap(),
        Path::new("../../etc/passwd")
    );
    assert_eq!(
        std::fs::read_link(d.join("sub/up")).unwrap(),
        Path::new("../../outside/dir")
    );
    assert_eq!(std::fs::read(d.join("z-after")).unwrap(), b"written inside");
    drop(placed);
    assert!(
        std::fs::symlink_metadata(&d).is_err(),
        "unregistered output left behind"
    );
    // The symlinks' targets survived the removal.
    assert_eq!(
        std::fs::read(s.outside().join("dir/keep")).unwrap(),
        b"keep me"
    );

    // The output itself may be a symlink, to anywhere.
    let n = nar(&link("../outside/passwd"));
    let (placed, r) = s.unpack(&n, None);
    r.unwrap();
    assert_eq!(
        std::fs::read_link(s.dest()).unwrap(),
        Path::new("../outside/passwd")
    );
    drop(placed);
    assert!(std::fs::symlink_metadata(s.dest()).is_err());
    assert_eq!(
        std::fs::read(s.outside().join("passwd")).unwrap(),
        b"root:x:0:0\n"
    );
}

#[test]
fn non_utf8_names_and_targets_are_kept_byte_for_byte() {
    let s = Store::new();
    let n = nar(&dir(vec![
        (b"caf\xe9", file(b"x")),
        (b"l\xff", Node::Link(b"t\xfe".to_vec())),
    ]));
    let (placed, r) = s.unpack(&n, None);
    r.unwrap();
    let names: Vec<Vec<u8>> = std::fs::read_dir(s.dest())
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    assert!(names.contains(&b"caf\xe9".to_vec()), "{names:?}");
    assert_eq!(
        std::fs::read_link(s.dest().join(OsStr::from_bytes(b"l\xff")))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        b"t\xfe"
    );
    drop(placed);
    assert!(!s.dest().exists());
}

fn sample_tree() -> Vec<u8> {
    nar(&dir(vec![
        (
            b"bin",
            dir(vec![(
                b"hello",
                Node::File {
                    exec: true,
                    data: b"#!/bin/sh\necho hi\n".to_vec(),
                },
            )]),
        ),
        (b"lib", link("bin")),
        (b"share", dir(vec![(b"doc", file(&[7u8; 100]))])),
    ]))
}

#[test]
fn every_truncation_is_refused() {
    let s = Store::new();
    let full = sample_tree();
    // The remote vouched for the whole NAR; the stream breaks off early.
    let expected = s.expected(&full);
    for cut in 0..full.len() {
        let (placed, r) = s.unpack(&full[..cut], Some(expected.clone()));
        match r {
            Err(PlaceError::Truncated {
                got, expected: e, ..
            }) => {
                assert_eq!((got, e), (cut as u64, full.len() as u64), "cut {cut}")
            }
            other => panic!("cut {cut}: {other:?}"),
        }
        assert!(placed.is_empty());
        assert!(std::fs::symlink_metadata(s.dest()).is_err(), "cut {cut}");
    }
    // And a truncated NAR that the remote described as exactly that long: a NAR error.
    let cut = &full[..full.len() - 8];
    assert!(nar_error(&s.refuse("short but vouched for", cut)).contains("UnexpectedEof"));
}

#[test]
fn trailing_bytes_and_hash_mismatches_are_refused() {
    let s = Store::new();
    let mut n = sample_tree();
    n.extend_from_slice(&[0; 8]);
    let e = s.refuse("trailing", &n);
    assert!(nar_error(&e).contains("TrailingBytes"), "{e}");

    let n = sample_tree();
    let mut wrong = s.expected(&n);
    wrong.nar_hash = Sha256::digest(b"another nar");
    let (placed, r) = s.unpack(&n, Some(wrong));
    assert!(matches!(r, Err(PlaceError::HashMismatch { .. })), "{r:?}");
    assert!(placed.is_empty() && !s.dest().exists());

    let mut wrong = s.expected(&n);
    wrong.nar_size += 1;
    let (_, r) = s.unpack(&n, Some(wrong));
    assert!(
        matches!(
            r,
            Err(PlaceError::HashMismatch { .. }) | Err(PlaceError::Truncated { .. })
        ),
        "{r:?}"
    );
    assert!(!s.dest().exists());
}

#[test]
fn hostile_lengths_fail_fast_without_allocating() {
    let s = Store::new();
    let header = |kind: &[u8]| {
        let mut out = Vec::new();
        put(&mut out, b"nix-archive-1");
        put(&mut out, b"(");
        put(&mut out, b"type");
        put(&mut out, kind);
        out
    };
    let mut contents = header(b"regular");
    put(&mut contents, b"contents");
    contents.extend_from_slice(&u64::MAX.to_le_bytes());
    contents.extend_from_slice(b"only a few bytes");
    let mut target = header(b"symlink");
    put(&mut target, b"target");
    target.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let mut name = header(b"directory");
    put(&mut name, b"entry");
    put(&mut name, b"(");
    put(&mut name, b"name");
    name.extend_from_slice(&u64::MAX.to_le_bytes());
    let mut token = Vec::new();
    token.extend_from_slice(&u64::MAX.to_le_bytes());
    for (case, n) in [
        ("file contents of u64::MAX bytes", contents),
        ("symlink target of 1 TiB", target),
        ("entry name of u64::MAX bytes", name),
        ("magic of u64::MAX bytes", token),
    ] {
        let t0 = Instant::now();
        let (e, largest) = largest_allocation(|| s.refuse(case, &n));
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "{case}: {:?}",
            t0.elapsed()
        );
        // The unpacker's own read buffer is 256 KiB; nothing may be sized by the length.
        assert!(
            largest <= 512 << 10,
            "{case}: allocated {largest} bytes: {e}"
        );
    }
}

#[test]
fn deep_nesting_is_refused_and_cleaned_up() {
    let s = Store::new();
    let mut node = file(b"bottom");
    for _ in 0..200 {
        node = dir(vec![(b"d", node)]);
    }
    let e = s.refuse("200 levels", &nar(&node));
    assert!(nar_error(&e).contains("MaxDepth"), "{e}");
}

/// Puts something stale at the output path.
type MakeStale = dyn Fn(&Path);

#[test]
fn a_stale_output_path_is_replaced_never_followed() {
    let s = Store::new();
    let n = sample_tree();
    let stale: [(&str, &MakeStale); 5] = [
        ("file", &|d| std::fs::write(d, b"stale").unwrap()),
        ("symlink to an outside directory", &|d| {
            std::os::unix::fs::symlink("../outside/dir", d).unwrap()
        }),
        ("symlink to an outside file", &|d| {
            std::os::unix::fs::symlink("../outside/passwd", d).unwrap()
        }),
        ("dangling symlink", &|d| {
            std::os::unix::fs::symlink("/nonexistent/x", d).unwrap()
        }),
        ("read-only directory tree, as the store leaves it", &|d| {
            std::fs::create_dir_all(d.join("bin")).unwrap();
            std::fs::write(d.join("bin/old"), b"old").unwrap();
            std::fs::set_permissions(d.join("bin/old"), std::fs::Permissions::from_mode(0o444))
                .unwrap();
            std::fs::set_permissions(d.join("bin"), std::fs::Permissions::from_mode(0o555))
                .unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o555)).unwrap();
        }),
    ];
    for (case, make) in stale {
        make(&s.dest());
        let (placed, r) = s.unpack(&n, None);
        r.unwrap_or_else(|e| panic!("{case}: {e}"));
        let m = std::fs::symlink_metadata(s.dest()).unwrap();
        assert!(m.is_dir(), "{case}: the output is not a fresh directory");
        assert!(!s.dest().join("bin/old").exists(), "{case}");
        assert_eq!(
            std::fs::read(s.dest().join("bin/hello")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            std::fs::symlink_metadata(s.dest().join("bin/hello"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        drop(placed);
        assert!(std::fs::symlink_metadata(s.dest()).is_err(), "{case}");
    }
    // The stale symlinks' targets are untouched (the snapshot checked the rest).
    assert_eq!(
        std::fs::read(s.outside().join("dir/keep")).unwrap(),
        b"keep me"
    );
}
