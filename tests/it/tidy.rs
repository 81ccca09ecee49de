//! The house rules, checked: every Rust file opens with a `//!` header, `use` paths follow the
//! layer table in ARCHITECTURE.md, the pure rooms do no I/O and read no clock, and every
//! reference to a document (a file, a `§` section, a quoted heading) resolves in the repository.
//!
//! Reads files only; never builds, runs or changes anything, and needs no root (`cargo test
//! --test it -- tidy`). Each rule lists
//! every offence with file and line, so one run shows all there is to fix.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Folders never read: build output, fuzzing state, and vendored trees.
const SKIP_DIRS: &[&str] = &["target", ".git", "corpus", "artifacts", "node_modules"];

/// Every file under the repository whose name ends in one of `exts`, relative to the root.
fn files(exts: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                if !SKIP_DIRS.contains(&name.as_str()) {
                    walk(&p, exts, out);
                }
            } else if exts.iter().any(|x| name.ends_with(x)) {
                out.push(p);
            }
        }
    }
    let root = root();
    let mut out = Vec::new();
    walk(&root, exts, &mut out);
    out.sort();
    out.into_iter()
        .filter_map(|p| p.strip_prefix(&root).ok().map(Path::to_path_buf))
        .collect()
}

fn read(rel: &Path) -> String {
    fs::read_to_string(root().join(rel))
        .unwrap_or_else(|e| panic!("tidy: cannot read {}: {e}", rel.display()))
}

fn report(rule: &str, offences: &[String]) {
    assert!(
        offences.is_empty(),
        "{rule}: {} offence(s):\n  {}",
        offences.len(),
        offences.join("\n  ")
    );
}

/// A Rust file's lines up to its first `#[cfg(test)]` item: unit tests may do what the code
/// under test must not (read golden data, take a starting `Instant`).
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .take_while(|(_, l)| !l.starts_with("#[cfg(test)]"))
        .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("")))
}

/// A file that holds only tests (`…/tests/…` or `tests.rs` inside a source folder).
fn is_test_file(rel: &Path) -> bool {
    rel.file_name().is_some_and(|n| n == "tests.rs")
        || rel
            .iter()
            .skip(1)
            .any(|c| c == "tests" || c == "test_support.rs")
}

#[test]
fn every_rust_file_opens_with_a_module_comment() {
    let mut bad = Vec::new();
    for f in files(&[".rs"]) {
        let text = read(&f);
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        if !first.starts_with("//!") {
            bad.push(format!(
                "{}: the first line is not a `//!` comment saying what the file owns",
                f.display()
            ));
        }
    }
    report("module comments", &bad);
}

/// ARCHITECTURE.md's "## Layers" table: `| N | `room`, `room` (pure) |`.
struct Layers {
    layer: BTreeMap<String, u32>,
    pure: BTreeSet<String>,
}

impl Layers {
    fn read() -> Layers {
        Layers::parse(&read(Path::new("ARCHITECTURE.md")))
    }

    fn parse(text: &str) -> Layers {
        let section = text
            .split("\n## ")
            .find(|s| s.starts_with("Layers"))
            .expect("ARCHITECTURE.md has no \"## Layers\" section");
        let mut layer = BTreeMap::new();
        let mut pure = BTreeSet::new();
        for line in section.lines().filter(|l| l.starts_with('|')) {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let Some(n) = cells.first().and_then(|c| c.parse::<u32>().ok()) else {
                continue;
            };
            for entry in cells.get(1).copied().unwrap_or("").split(',') {
                let entry = entry.trim();
                let name = entry.split('`').nth(1).unwrap_or("").to_owned();
                assert!(
                    !name.is_empty(),
                    "ARCHITECTURE.md's layer table: cannot read `{entry}`"
                );
                if entry.ends_with("(pure)") {
                    pure.insert(name.clone());
                }
                assert!(
                    layer.insert(name.clone(), n).is_none(),
                    "ARCHITECTURE.md's layer table names `{name}` twice"
                );
            }
        }
        assert!(
            !layer.is_empty(),
            "ARCHITECTURE.md's layer table has no rows"
        );
        Layers { layer, pure }
    }

    /// The most specific room a module path (`["supervisor", "state", "requests"]`) is in.
    fn room(&self, module: &[String]) -> Option<String> {
        (1..=module.len())
            .rev()
            .map(|n| module[..n].join("/"))
            .find(|r| self.layer.contains_key(r))
    }
}

/// The module path of a file of the root library: `src/hook/plan.rs` → `["hook", "plan"]`,
/// `src/store/mod.rs` → `["store"]`. `None` for `lib.rs` and `main.rs` (the crate roots).
fn module_of(rel: &Path) -> Option<Vec<String>> {
    let rel = rel.strip_prefix("src").ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts.is_empty() || parts == ["lib"] || parts == ["main"] {
        return None;
    }
    Some(parts)
}

/// Every path a line names into this crate, resolved to a module path: `crate::a::b`,
/// `super::b` (relative to `module`, as written in that file), `self::b`.
fn paths_named(line: &str, module: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < line.len() {
        let rest = &line[i..];
        let starts_word = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b':');
        let prefix = ["crate::", "super::", "self::"]
            .into_iter()
            .find(|p| starts_word && rest.starts_with(p));
        let Some(prefix) = prefix else {
            i += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        let path: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        i += path.len().max(1);
        let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        // `crate::` is absolute; `self::` and `super::` start at this file's module.
        let mut base: Vec<String> = match prefix {
            "crate::" => {
                segs.remove(0);
                Vec::new()
            }
            _ => module.to_vec(),
        };
        if prefix == "self::" {
            segs.remove(0);
        }
        while segs.first() == Some(&"super") {
            segs.remove(0);
            base.pop();
        }
        base.extend(segs.iter().map(|s| (*s).to_owned()));
        out.push(base);
    }
    out
}

#[test]
fn imports_follow_the_layer_table() {
    let layers = Layers::read();
    let mut bad = Vec::new();
    for f in files(&[".rs"]) {
        let Some(module) = module_of(&f) else {
            continue;
        };
        if is_test_file(&f) {
            continue;
        }
        let Some(room) = layers.room(&module) else {
            bad.push(format!(
                "{}: module `{}` is in no room of ARCHITECTURE.md's layer table",
                f.display(),
                module.join("::")
            ));
            continue;
        };
        let mine = layers.layer[&room];
        let text = read(&f);
        for (no, line) in code_lines(&text) {
            for path in paths_named(line, &module) {
                let Some(target) = layers.room(&path) else {
                    // A crate-root item (`crate::Error`) or a room's own private module.
                    if !path.is_empty() && !path[0].is_empty() && layers.room(&path[..1]).is_none()
                    {
                        bad.push(format!(
                            "{}:{no}: `{}` is in no room of the layer table",
                            f.display(),
                            path.join("::")
                        ));
                    }
                    continue;
                };
                if target == room {
                    continue;
                }
                let theirs = layers.layer[&target];
                if theirs >= mine {
                    bad.push(format!(
                        "{}:{no}: `{room}` (layer {mine}) uses `{}` of `{target}` (layer {theirs}): \
                         a room uses only lower layers",
                        f.display(),
                        path.join("::")
                    ));
                }
            }
        }
    }
    report("layer order", &bad);
}

/// What a pure room never names: I/O, the async runtime, logging, the clock.
const IMPURE: &[&str] = &[
    "std::fs",
    "std::net",
    "std::process",
    "std::env",
    "tokio",
    "tracing",
    "Instant::now",
    "SystemTime::now",
];

#[test]
fn pure_rooms_do_no_io_and_read_no_clock() {
    let layers = Layers::read();
    assert!(
        !layers.pure.is_empty(),
        "ARCHITECTURE.md's layer table marks no room (pure)"
    );
    let mut bad = Vec::new();
    let mut checked = BTreeSet::new();
    for f in files(&[".rs"]) {
        if is_test_file(&f) {
            continue;
        }
        let room = if f.starts_with("hook-protocol/src") {
            Some("hook-protocol".to_owned())
        } else {
            module_of(&f)
                .and_then(|m| layers.room(&m))
                .filter(|r| layers.pure.contains(r))
        };
        let Some(room) = room else { continue };
        checked.insert(room);
        let text = read(&f);
        for (no, code) in code_lines(&text) {
            for word in IMPURE {
                if code.contains(word) {
                    bad.push(format!(
                        "{}:{no}: the pure room names `{word}`",
                        f.display()
                    ));
                }
            }
        }
    }
    for room in &layers.pure {
        assert!(
            checked.contains(room),
            "no file of the pure room `{room}` was found"
        );
    }
    report("pure rooms", &bad);
}

/// The headings of a Markdown file, without their `#`s.
fn headings(text: &str) -> Vec<String> {
    let mut fenced = false;
    text.lines()
        .filter(|l| {
            if l.starts_with("```") {
                fenced = !fenced;
            }
            !fenced && l.starts_with('#')
        })
        .map(|l| l.trim_start_matches('#').trim().to_owned())
        .collect()
}

/// Document references in one line: `(the document's name, what follows it)`.
fn doc_names(line: &str) -> Vec<(String, &str)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = line[from..].find(".md") {
        let end = from + i + 3;
        let before = &line[..from + i];
        let start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || "_-/.".contains(c)))
            .map_or(0, |j| j + c_len(before, j));
        let name = &line[start..end];
        let after = &line[end..];
        from = end;
        let next = after.chars().next();
        // `foo.mdx`, `x.md5`: not a Markdown reference.
        if next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let name = name.trim_start_matches("./");
        if name == ".md" || name.starts_with('.') && !name.starts_with("../") {
            continue;
        }
        out.push((name.to_owned(), after));
    }
    out
}

fn c_len(s: &str, at: usize) -> usize {
    s[at..].chars().next().map_or(1, char::len_utf8)
}

#[test]
fn document_references_resolve() {
    let mut docs: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for f in files(&[".md"]) {
        let heads = headings(&read(&f));
        docs.insert(f, heads);
    }
    let mut bad = Vec::new();
    for f in files(&[
        ".rs",
        ".md",
        ".sh",
        ".nix",
        ".toml",
        ".py",
        "run",
        "make-image",
        "check-image",
    ]) {
        let text = read(&f);
        let here = f.parent().unwrap_or(Path::new(""));
        for (no, line) in text.lines().enumerate() {
            for (name, after) in doc_names(line) {
                // Relative to the file (Markdown links), to its crate (a workspace member's
                // tests name its own files), else from the root.
                let krate = f.iter().next().map(PathBuf::from).unwrap_or_default();
                let candidates = [
                    normalise(&here.join(&name)),
                    normalise(&krate.join(&name)),
                    normalise(Path::new(&name)),
                ];
                let Some(heads) = candidates.iter().find_map(|c| docs.get(c)) else {
                    bad.push(format!(
                        "{}:{}: `{name}` is not a document in the repository",
                        f.display(),
                        no + 1
                    ));
                    continue;
                };
                // A section (` §4.3`) or a quoted heading (` "Layers"`), each after one space
                // (a `"` right after the name closes a string literal, not a heading).
                let after = after.trim_start_matches([')', '`']);
                if let Some(sec) = after.strip_prefix(" §") {
                    let sec: String = sec
                        .chars()
                        .take_while(|c| c.is_ascii_digit() || *c == '.')
                        .collect();
                    let sec = sec.trim_end_matches('.');
                    let found = heads.iter().any(|h| {
                        h.strip_prefix(sec)
                            .is_some_and(|r| r.starts_with(". ") || r.starts_with(' '))
                    });
                    if sec.is_empty() || !found {
                        bad.push(format!(
                            "{}:{}: `{name} §{sec}` names no section of it",
                            f.display(),
                            no + 1
                        ));
                    }
                } else if let Some(q) = after.strip_prefix(" \"") {
                    let title = q.split('"').next().unwrap_or("");
                    if !heads
                        .iter()
                        .any(|h| h == title || h.replace('`', "") == title.replace('`', ""))
                    {
                        bad.push(format!(
                            "{}:{}: `{name} \"{title}\"` names no heading of it",
                            f.display(),
                            no + 1
                        ));
                    }
                }
            }
        }
    }
    report("document references", &bad);
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalise(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// The rows of ARCHITECTURE.md's "## Code map": the paths each row's first cell names
/// (`src/a/b.rs`, `c.rs` — a bare name is beside the one before it).
fn code_map_paths() -> Vec<PathBuf> {
    let text = read(Path::new("ARCHITECTURE.md"));
    let section = text
        .split("\n## ")
        .find(|s| s.starts_with("Code map"))
        .expect("ARCHITECTURE.md has no \"## Code map\" section");
    let mut out = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let first = line.trim_matches('|').split('|').next().unwrap_or("");
        let mut dir = PathBuf::new();
        for name in first.split('`').skip(1).step_by(2) {
            let p = if name.contains('/') {
                PathBuf::from(name.trim_end_matches('/'))
            } else {
                dir.join(name)
            };
            dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
            out.push(p);
        }
    }
    out
}

#[test]
fn the_code_map_names_every_room_and_nothing_else() {
    let root = root();
    let named = code_map_paths();
    let mut bad: Vec<String> = named
        .iter()
        .filter(|p| !root.join(p).exists())
        .map(|p| {
            format!(
                "ARCHITECTURE.md's code map names `{}`, which does not exist",
                p.display()
            )
        })
        .collect();
    // Every source file of the library is in the map: named itself, or inside a folder the
    // map names.
    for f in files(&[".rs"]).into_iter().filter(|f| f.starts_with("src")) {
        if f == Path::new("src/lib.rs") || named.iter().any(|n| f.starts_with(n)) {
            continue;
        }
        bad.push(format!(
            "`{}` is not in ARCHITECTURE.md's code map",
            f.display()
        ));
    }
    for room in Layers::read().layer.keys() {
        let file = Path::new("src").join(format!("{room}.rs"));
        let dir = Path::new("src").join(room);
        if !root.join(&file).exists() && !root.join(&dir).join("mod.rs").exists() {
            bad.push(format!(
                "the layer table names `{room}`, but neither {} nor {}/mod.rs exists",
                file.display(),
                dir.display()
            ));
        }
    }
    report("code map", &bad);
}

/// The checks above must be able to fail: each is run on a planted offence.
#[test]
fn the_checks_catch_planted_offences() {
    let layers = Layers::parse(
        "# A\n\n## Layers\n\n| layer | rooms |\n|---|---|\n| 0 | `os` |\n| 1 | `hook/plan` (pure), `store` |\n| 2 | `hook` |\n",
    );
    assert_eq!(layers.layer["hook/plan"], 1);
    assert!(layers.pure.contains("hook/plan") && !layers.pure.contains("store"));
    let m = |s: &str| s.split('/').map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(layers.room(&m("hook/plan/x")).as_deref(), Some("hook/plan"));
    assert_eq!(layers.room(&m("hook/accept")).as_deref(), Some("hook"));
    // `super::` from a sub-room reaches its parent; `crate::` paths are absolute.
    assert_eq!(
        paths_named("use super::HookError;", &m("hook/plan")),
        vec![m("hook/HookError")]
    );
    assert_eq!(
        paths_named("x(crate::store::Remote, self::y)", &m("hook")),
        vec![m("store/Remote"), m("hook/y")]
    );
    assert!(paths_named("nix_lazy_builder::store", &m("hook")).is_empty());
    assert_eq!(
        doc_names("see docs/protocol.md §4.3.")[0].0,
        "docs/protocol.md"
    );
    assert_eq!(doc_names("[x](../README.md)")[0].0, "../README.md");
    assert!(doc_names("a.mdx b.md5").is_empty());
    assert_eq!(
        normalise(Path::new("examples/vm/../../README.md")),
        PathBuf::from("README.md")
    );
    assert!(headings("# T\n```\n# not a heading\n```\n## 4.3 X\n").contains(&"4.3 X".to_owned()));
}
