//! Bad input for the builder table: Nix's machines grammar (`config::parse_machines` over a fake
//! file reader, so `@file` includes, include loops and unreadable files are exercised without
//! touching the disk), `NIX_SSHOPTS`, and the TOML loader (`Config::parse`): random text and
//! bytes, and valid tables with characters flipped, inserted, deleted and repeated.
//!
//! Whatever the input: no panic; an error is one line of text that starts with where (the
//! machines file or setting and the line, or the TOML file, a line inside the text and a
//! column) and then, for TOML, the key (every error in well-formed TOML names one; a syntax
//! error may have none to name), for every variant of the error; and what is accepted
//! satisfies the table's invariants (a positive finite speed factor, a usable store URI that
//! cannot break the `# accept` line, at least one system, a pinned host key for every TOML
//! builder). Golden cases pin down non-UTF-8 input: a machines file is read lossily, as Nix
//! reads it; a TOML file that is not UTF-8 is refused with the file named.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use hook_protocol::hook::Reply;
use nix_lazy_builder::config::{
    self, Builder, Config, ConfigError, ConfigPath, ConfigSource, HostKeySpec, SshOpts,
};
use proptest::prelude::*;

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFwgxv0w8zjLFNJ6M4EHyBd7/gHpLNuw1C+/JusH19ZC root@builder";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn cfg(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A reader over in-memory files; `/unreadable` fails with a permission error, anything else
/// missing is NotFound.
fn fake_fs(files: HashMap<PathBuf, Vec<u8>>) -> impl FnMut(&Path) -> io::Result<Vec<u8>> {
    move |p: &Path| {
        if p == Path::new("/unreadable") {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "denied"));
        }
        files
            .get(p)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))
    }
}

/// The invariants of an accepted builder.
fn check_builder(b: &Builder) -> Result<(), TestCaseError> {
    prop_assert!(
        b.speed_factor.is_finite() && b.speed_factor > 0.0,
        "speed {}",
        b.speed_factor
    );
    // Columns are split on ASCII white space, as Nix splits them (other Unicode white space
    // and control characters are kept, as Nix keeps them); the `# accept` reply that names the
    // builder stays one line whatever the URI holds.
    let ascii_ws = |s: &str| s.contains([' ', '\t', '\n', '\r']);
    prop_assert!(!b.store_uri.is_empty() && !ascii_ws(&b.store_uri));
    let reply = Reply::accept(&b.store_uri).to_bytes();
    prop_assert_eq!(
        reply.iter().filter(|&&c| c == b'\n').count(),
        2,
        "the accept reply for {:?} is not two lines",
        b.store_uri
    );
    prop_assert!(!b.uri.host.is_empty());
    prop_assert!(
        b.systems
            .iter()
            .chain(&b.supported_features)
            .chain(&b.mandatory_features)
            .all(|s| !s.is_empty() && !ascii_ws(s) && !s.contains(',')),
        "bad system or feature in {:?}",
        b
    );
    if let HostKeySpec::Pinned(keys) = &b.host_keys {
        prop_assert!(!keys.is_empty());
    }
    Ok(())
}

/// What every error must be, whatever the variant: one line of text that starts with where
/// (the machines file or setting and its line; the TOML file, a line inside the text and a
/// column), then names the TOML key when there is one to name: always, once the text is
/// well-formed TOML (`well_formed`; only a syntax error may have no key to name).
fn check_error(e: &ConfigError, text_lines: usize, well_formed: bool) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert!(!msg.trim().is_empty());
    prop_assert!(!msg.contains('\n'), "not one line: {:?}", msg);
    match e {
        ConfigError::Toml {
            path,
            line,
            column,
            key,
            message,
        } => {
            prop_assert!(
                *line >= 1 && *line <= text_lines + 1 && *column >= 1,
                "{msg}"
            );
            let at = format!("{}:{line}:{column}: ", path.display());
            prop_assert!(msg.starts_with(&at), "{msg} does not start with {at}");
            match key {
                Some(k) => {
                    prop_assert!(!k.trim().is_empty(), "an empty key in {msg}");
                    prop_assert!(
                        msg.starts_with(&format!("{at}{k}: ")),
                        "{msg} does not name the key {k}"
                    );
                }
                None => prop_assert!(
                    !well_formed,
                    "an error in well-formed TOML names no key: {msg}"
                ),
            }
            prop_assert!(!message.trim().is_empty(), "{msg}");
        }
        ConfigError::Machines { origin, .. }
        | ConfigError::IncludeLoop { origin, .. }
        | ConfigError::MachinesRead { origin, .. } => {
            prop_assert!(origin.line >= 1 && origin.line <= text_lines + 1, "{msg}");
            let at = format!("{origin}: ");
            prop_assert!(msg.starts_with(&at), "{msg} does not start with {at}");
            if let ConfigError::MachinesRead { path, .. } = e {
                prop_assert!(msg.contains(&path.display().to_string()), "{msg}");
            }
        }
        ConfigError::TomlRead { path, .. } | ConfigError::TomlMissing { path, .. } => {
            prop_assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
    }
    Ok(())
}

/// Every variant of [`ConfigError`], from real input, passes [`check_error`] (the random
/// inputs below reach only some of them).
#[test]
fn every_error_variant_says_where_in_one_line() {
    let check = |e: &ConfigError, lines: usize, well_formed: bool| {
        check_error(e, lines, well_formed).unwrap_or_else(|f| panic!("{f}"));
        e.to_string()
    };
    let files = HashMap::from([
        (PathBuf::from("/m1"), b"@/m2\n".to_vec()),
        (PathBuf::from("/m2"), b"@/m1\n".to_vec()),
    ]);
    let mut seen = Vec::new();
    for spec in [
        "ssh://a x86_64-linux - 1 -1",
        "ssh://a x86_64-linux\n@/unreadable",
        "@/m1",
    ] {
        let e =
            config::parse_machines(spec, "x86_64-linux", &mut fake_fs(files.clone())).unwrap_err();
        seen.push(std::mem::discriminant(&e));
        check(&e, 2, false);
    }
    let file = Path::new("/etc/nix/lazy-builder.toml");
    // A syntax error (no key to name), then a bad value (its key named).
    for (text, well_formed) in [("x = \"\n", false), ("[builders.b]\nuri = 3\n", true)] {
        let e = Config::parse(text, file).unwrap_err();
        seen.push(std::mem::discriminant(&e));
        let msg = check(&e, text.lines().count(), well_formed);
        if well_formed {
            assert!(msg.contains("builders.b.uri: "), "{msg}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, b"\xff").unwrap();
    for path in [bad, dir.path().join("missing.toml")] {
        let e = Config::load(&ConfigPath {
            path,
            source: ConfigSource::Cli,
        })
        .unwrap_err();
        seen.push(std::mem::discriminant(&e));
        check(&e, 0, false);
    }
    seen.sort_by_key(|d| format!("{d:?}"));
    seen.dedup();
    // Machines, MachinesRead, IncludeLoop, Toml, TomlRead, TomlMissing.
    assert_eq!(seen.len(), 6, "not every variant was made: {seen:?}");
}

#[test]
fn odd_keys_are_named_as_written_and_an_empty_header_names_none() {
    // Both found by `check_error`'s key rule: an escaped quoted key was not named at all, and
    // `[]` was named as an empty key (": unquoted keys cannot be empty").
    let file = Path::new("/etc/nix/lazy-builder.toml");
    let e = Config::parse("\"\\u0000\" = 1\n", file).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/etc/nix/lazy-builder.toml:1:1: \"\\u0000\": unknown key"),
        "{e}"
    );
    let e = Config::parse("[]\n", file).unwrap_err();
    match &e {
        ConfigError::Toml { key, .. } => assert_eq!(key, &None, "{e}"),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Machines grammar

/// Tokens a machines table is made of, plus ones that should not be there.
fn machine_token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("ssh://root@127.0.0.1:2222".to_owned()),
        Just("ssh-ng://b?remote-program=/bin/nix-daemon&ssh-key=/k".to_owned()),
        Just("user@host".to_owned()),
        Just("[::1]:22".to_owned()),
        Just("ssh://[fe80::1".to_owned()),
        Just("local".to_owned()),
        Just("http://cache".to_owned()),
        Just("aarch64-linux,x86_64-linux".to_owned()),
        Just("-".to_owned()),
        Just("/root/.ssh/id".to_owned()),
        Just(b64(ED25519)),
        Just(b64("ssh-rsa AAAA")),
        Just("!!!".to_owned()),
        Just("kvm,big-parallel".to_owned()),
        Just(",".to_owned()),
        Just(",,x,".to_owned()),
        Just("@/m1".to_owned()),
        Just("@/m2".to_owned()),
        Just("@/unreadable".to_owned()),
        Just("@/missing".to_owned()),
        Just("#".to_owned()),
        Just(";".to_owned()),
        Just("\n".to_owned()),
        Just("\t".to_owned()),
        Just("\r".to_owned()),
        prop::sample::select(vec![
            "0",
            "1",
            "4294967296",
            "-1",
            "1e308",
            "1e999",
            "NaN",
            "inf",
            "0.0",
            "-0",
        ])
        .prop_map(str::to_owned),
        "[ -~]{0,12}",
        any::<String>().prop_map(|s| s.chars().take(12).collect()),
    ]
}

fn machines_text() -> impl Strategy<Value = String> {
    prop::collection::vec(machine_token(), 0..24).prop_map(|t| t.join(" "))
}

fn check_machines(
    spec: &str,
    m1: &[u8],
    m2: &[u8],
    sshopts: Option<&str>,
) -> Result<(), TestCaseError> {
    let files = HashMap::from([
        (PathBuf::from("/m1"), m1.to_vec()),
        (PathBuf::from("/m2"), m2.to_vec()),
    ]);
    let lines = spec.lines().count()
        + String::from_utf8_lossy(m1).lines().count()
        + String::from_utf8_lossy(m2).lines().count();
    match config::parse_machines(spec, "x86_64-linux", &mut fake_fs(files)) {
        Ok((builders, notes)) => {
            for b in &builders {
                check_builder(b)?;
            }
            for n in &notes {
                prop_assert!(!n.message.is_empty());
            }
        }
        Err(e) => check_error(&e, lines, false)?,
    }
    if let Some(o) = sshopts {
        let parsed = SshOpts::parse(o);
        prop_assert!(parsed.port != Some(0), "port 0 from {o:?}");
    }
    Ok(())
}

const VALID_MACHINES: &str = "\
ssh://root@127.0.0.1:2222 aarch64-linux /root/.ssh/id 2 1.5 kvm,big-parallel - HOSTKEY # a comment
ssh-ng://builder?remote-program=/run/current-system/sw/bin/nix-daemon x86_64-linux,i686-linux - 4 - - benchmark -
  user@host ; @/m1
";

fn valid_machines() -> String {
    VALID_MACHINES.replace("HOSTKEY", &b64(ED25519))
}

#[test]
fn the_valid_machines_table_parses() {
    let files = HashMap::from([(
        PathBuf::from("/m1"),
        b"ssh://other x86_64-linux\n@/m2\n".to_vec(),
    )]);
    let (b, notes) =
        config::parse_machines(&valid_machines(), "x86_64-linux", &mut fake_fs(files)).unwrap();
    assert_eq!(b.len(), 4, "{b:#?}");
    assert!(notes.is_empty(), "{notes:?}");
    assert!(matches!(&b[0].host_keys, HostKeySpec::Pinned(k) if k.len() == 1));
}

#[test]
fn a_systems_column_of_only_commas_gives_a_machine_that_never_matches() {
    // As in Nix: the column is split on ',' and empty parts are dropped. Found by the
    // `machines` fuzz target.
    let (b, _) = config::parse_machines(
        "ssh://a , - 1",
        "x86_64-linux",
        &mut fake_fs(HashMap::new()),
    )
    .unwrap();
    assert!(b[0].systems.is_empty());
}

#[test]
fn include_loops_and_unreadable_files_are_errors_naming_the_line() {
    let files = HashMap::from([
        (
            PathBuf::from("/m1"),
            b"ssh://a x86_64-linux\n@/m2\n".to_vec(),
        ),
        (PathBuf::from("/m2"), b"\n\n@/m1\n".to_vec()),
    ]);
    let e = config::parse_machines("@/m1", "x86_64-linux", &mut fake_fs(files)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "/m2:3: machines file include loop: /m1 -> /m2 -> /m1"
    );
    let e = config::parse_machines(
        "ssh://a x86_64-linux\n@/unreadable",
        "x86_64-linux",
        &mut fake_fs(HashMap::new()),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("the 'builders' setting, line 2: cannot read machines file '/unreadable'"),
        "{e}"
    );
}

#[test]
fn non_utf8_machines_files_are_read_lossily_like_nix() {
    // Nix reads the file as bytes; a stray byte in a comment or a feature name must not take
    // down the whole table. The replacement character makes the feature unusable, not the line.
    let files = HashMap::from([(
        PathBuf::from("/m1"),
        b"ssh://a x86_64-linux - 1 1 kvm,f\xff # caf\xe9\n".to_vec(),
    )]);
    let (b, _) = config::parse_machines("@/m1", "x86_64-linux", &mut fake_fs(files)).unwrap();
    assert_eq!(b.len(), 1);
    assert!(b[0].supported_features.contains("f\u{fffd}"), "{b:?}");
    // A host key column that decodes to non-text is a clear error.
    let line = format!(
        "ssh://a x86_64-linux - 1 1 - - {}",
        base64::engine::general_purpose::STANDARD.encode(b"\xff\xfe")
    );
    let e =
        config::parse_machines(&line, "x86_64-linux", &mut fake_fs(HashMap::new())).unwrap_err();
    assert!(e.to_string().contains("does not decode to text"), "{e}");
}

/// `text` after the edits `muts`, each `(at, c, op)` at `at` modulo the length: op 0 replaces a
/// character with `c`, 1 inserts `c`, 2 deletes a character, 3 repeats the line (duplicate keys
/// and tables). An edit of an empty text other than an insert does nothing.
fn mutated(text: &str, muts: Vec<(usize, char, u8)>) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for (at, c, op) in muts {
        let n = chars.len();
        match op {
            0 if n > 0 => chars[at % n] = c,
            1 => chars.insert(at % (n + 1), c),
            2 if n > 0 => {
                chars.remove(at % n);
            }
            3 if n > 0 => {
                let at = at % n;
                let start = chars[..at]
                    .iter()
                    .rposition(|&c| c == '\n')
                    .map_or(0, |i| i + 1);
                let end = chars[at..]
                    .iter()
                    .position(|&c| c == '\n')
                    .map_or(n, |i| at + i + 1);
                let line: Vec<char> = chars[start..end].to_vec();
                chars.splice(end..end, line);
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(cfg(1024))]

    #[test]
    fn machines_from_random_tokens(
        spec in machines_text(),
        m1 in machines_text(),
        m2 in machines_text(),
    ) {
        check_machines(&spec, m1.as_bytes(), m2.as_bytes(), None)?;
    }

    #[test]
    fn machines_from_random_bytes(
        spec in any::<String>(),
        m1 in prop::collection::vec(any::<u8>(), 0..200),
        sshopts in any::<String>(),
    ) {
        check_machines(&spec, &m1, b"", Some(&sshopts))?;
    }

    #[test]
    fn machines_mutated(
        muts in prop::collection::vec((any::<usize>(), any::<char>(), 0u8..3), 1..8),
    ) {
        let spec = mutated(&valid_machines(), muts);
        check_machines(&spec, b"ssh://x aarch64-linux\n", b"", None)?;
    }
}

// ---------------------------------------------------------------------------------------------
// TOML

/// A valid file with every backend and most keys (tests/fixtures/every-backend.toml, which
/// fuzz/seed-corpora.sh seeds the fuzzer with too).
fn valid_toml() -> String {
    include_str!("../../fixtures/every-backend.toml").replace("@HOST_KEY@", ED25519)
}

fn check_toml(text: &str) -> Result<(), TestCaseError> {
    let lines = text.lines().count();
    match Config::parse(text, Path::new("/etc/nix/lazy-builder.toml")) {
        Ok(c) => {
            for b in &c.builders {
                check_builder(b)?;
                prop_assert!(
                    !matches!(b.host_keys, HostKeySpec::SshDefault),
                    "TOML builder '{}' is not pinned",
                    b.name
                );
                prop_assert!(b.max_jobs >= 1);
                prop_assert!(!b.systems.is_empty(), "TOML builder without systems");
                if let Some(l) = &b.lazy {
                    prop_assert!(!l.boot_timeout.is_zero());
                }
            }
            prop_assert!(c.supervisor.state_dir.is_absolute());
        }
        Err(e) => {
            // Whether the text is TOML at all: then every error is about a key and names it.
            let well_formed = text.parse::<toml::Table>().is_ok();
            check_error(&e, lines, well_formed)?;
            prop_assert!(
                e.to_string().contains("/etc/nix/lazy-builder.toml"),
                "the error does not name the file: {e}"
            );
        }
    }
    Ok(())
}

#[test]
fn the_valid_toml_parses() {
    let c = Config::parse(&valid_toml(), Path::new("/etc/nix/lazy-builder.toml")).unwrap();
    assert_eq!(c.builders.len(), 4);
    assert!(c.builders[1].allow_well_known_host_key);
    assert!(!c.builders[0].allow_well_known_host_key);
}

#[test]
fn non_utf8_toml_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lazy-builder.toml");
    std::fs::write(&p, b"[builders.a\xff]\n").unwrap();
    let e = Config::load(&ConfigPath {
        path: p.clone(),
        source: ConfigSource::Cli,
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("cannot read config file '{}': not valid UTF-8", p.display())
    );
}

#[test]
fn an_endless_host_key_file_is_refused_not_read_forever() {
    for (file, why) in [
        ("/dev/zero", "larger than 1024 KiB"),
        ("/dev/urandom", "valid UTF-8"),
    ] {
        let text = format!(
            "[builders.b]\nuri = \"ssh://h\"\nsystems = [\"x86_64-linux\"]\nhost-key-file = \"{file}\"\n"
        );
        let t0 = std::time::Instant::now();
        let e = Config::parse(&text, Path::new("/etc/nix/lazy-builder.toml")).unwrap_err();
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
        let msg = e.to_string();
        assert!(
            msg.contains(why) && msg.contains("builders.b.host-key-file") && msg.contains(file),
            "{msg}"
        );
    }
}

fn toml_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("[builders.b]\n".to_owned()),
        Just("[builders.b.boot]\n".to_owned()),
        Just("[supervisor]\n".to_owned()),
        Just("[[builders]]\n".to_owned()),
        Just("uri = \"ssh://h\"\n".to_owned()),
        Just("systems = [\"x86_64-linux\"]\n".to_owned()),
        Just(format!("host-key = \"{ED25519}\"\n")),
        Just("host-key-file = \"/nonexistent\"\n".to_owned()),
        Just("kind = \"qemu\"\n".to_owned()),
        Just("kind = \"command\"\n".to_owned()),
        Just("command = []\n".to_owned()),
        Just("memory = \"99999999999999T\"\n".to_owned()),
        Just("memory = -1\n".to_owned()),
        Just("max-jobs = 9223372036854775807\n".to_owned()),
        Just("speed-factor = nan\n".to_owned()),
        Just("speed-factor = inf\n".to_owned()),
        Just("idle-timeout = \"1000000000000000000000y\"\n".to_owned()),
        Just("ssh-port = 65536\n".to_owned()),
        Just("state-dir = \"relative\"\n".to_owned()),
        Just("a.b.c = 1\n".to_owned()),
        Just("\"\\u0000\" = 1\n".to_owned()),
        Just("x = \"\"\"\n".to_owned()),
        "[ -~]{0,20}\n?",
        any::<String>().prop_map(|s| s.chars().take(16).collect()),
    ]
}

proptest! {
    #![proptest_config(cfg(512))]

    #[test]
    fn toml_from_random_pieces(pieces in prop::collection::vec(toml_piece(), 0..16)) {
        check_toml(&pieces.concat())?;
    }

    #[test]
    fn toml_from_random_text(text in any::<String>()) {
        check_toml(&text)?;
    }

    #[test]
    fn toml_mutated(
        muts in prop::collection::vec((any::<usize>(), any::<char>(), 0u8..4), 1..8),
    ) {
        check_toml(&mutated(&valid_toml(), muts))?;
    }
}
