//! The host keys a connection accepts ([`HostKeySet`]): parsed from OpenSSH public key lines
//! (the TOML config's `host-key`, and Nix's machines column 8 once `config` has decoded its
//! base64) or looked up in an OpenSSH `known_hosts` file.
//!
//! `known_hosts` support: comments and blank lines; comma-separated host patterns; `host`
//! (port 22) and `[host]:port` forms; hashed `|1|salt|hmac` entries; `*` and `?` wildcards;
//! negated `!pattern`s; `@revoked` lines (a revoked key is never pinned, even if another line
//! lists it). `@cert-authority` lines are ignored: host certificates are not accepted. The name
//! looked up is `host` when the port is 22 and `[host]:port` otherwise, as OpenSSH does; unlike
//! OpenSSH the host's IP address is not looked up separately (`CheckHostIP`).
//!
//! It reads and parses; it never decides which keys a builder should have (`target` does) and
//! never accepts an empty set (`session` refuses to connect with one).

use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PublicKey};

/// The SHA256 fingerprint of a public key, as OpenSSH prints it (`SHA256:base64-without-padding`).
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

fn supported_host_key(alg: &Algorithm) -> bool {
    matches!(
        alg,
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } | Algorithm::Rsa { .. }
    )
}

/// The host keys a connection accepts: the keys a builder is pinned to, verified (parsed) and
/// deduplicated. Comments are ignored when comparing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostKeySet {
    keys: Vec<PublicKey>,
}

impl HostKeySet {
    pub fn new(keys: Vec<PublicKey>) -> Self {
        let mut this = HostKeySet { keys: Vec::new() };
        for k in keys {
            this.push(k);
        }
        this
    }

    fn push(&mut self, key: PublicKey) {
        if !self.keys.iter().any(|k| k.key_data() == key.key_data()) {
            self.keys.push(key);
        }
    }

    /// Adds every key of `other` (duplicates are dropped).
    pub fn extend(&mut self, other: HostKeySet) {
        for k in other.keys {
            self.push(k);
        }
    }

    /// Parses one or more `type base64 [comment]` lines (blank lines and `#` comments are
    /// skipped). At least one key is required.
    pub fn parse_openssh(text: &str) -> Result<Self, HostKeyError> {
        let mut keys = HostKeySet::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            keys.push(parse_key_line(line, i + 1)?);
        }
        if keys.is_empty() {
            return Err(HostKeyError::Empty);
        }
        Ok(keys)
    }

    /// The keys that `known_hosts` text lists for `host` and `port` (see the module docs for
    /// what is supported). The result may be empty; [`connect`](super::connect) refuses an empty set.
    pub fn from_known_hosts(text: &str, host: &str, port: u16) -> Result<Self, HostKeyError> {
        parse_known_hosts(text, host, port).map_err(|(line, reason)| HostKeyError::KnownHosts {
            path: PathBuf::from("<known_hosts>"),
            line,
            reason,
        })
    }

    /// Like [`HostKeySet::from_known_hosts`], reading a file.
    pub fn from_known_hosts_file(path: &Path, host: &str, port: u16) -> Result<Self, HostKeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| HostKeyError::Io {
            path: path.to_owned(),
            source,
        })?;
        parse_known_hosts(&text, host, port).map_err(|(line, reason)| HostKeyError::KnownHosts {
            path: path.to_owned(),
            line,
            reason,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// `SHA256:…` fingerprints, in order.
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys.iter().map(fingerprint).collect()
    }

    /// Whether `key` is one of the pinned keys.
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.keys.iter().any(|k| k.key_data() == key.key_data())
    }

    /// Host key algorithms to ask the server for: the pinned key types first (so a server with
    /// several host keys presents a pinned one), then the other supported types (so a server
    /// with none of them still presents *a* key, which makes the mismatch error informative).
    pub(super) fn preferred_algorithms(&self) -> Vec<Algorithm> {
        let mut out: Vec<Algorithm> = Vec::new();
        let add = |a: Algorithm, out: &mut Vec<Algorithm>| {
            if !out.contains(&a) {
                out.push(a);
            }
        };
        for k in &self.keys {
            match k.algorithm() {
                Algorithm::Rsa { .. } => {
                    add(
                        Algorithm::Rsa {
                            hash: Some(HashAlg::Sha512),
                        },
                        &mut out,
                    );
                    add(
                        Algorithm::Rsa {
                            hash: Some(HashAlg::Sha256),
                        },
                        &mut out,
                    );
                }
                a => add(a, &mut out),
            }
        }
        for a in [
            Algorithm::Ed25519,
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP384,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP521,
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
        ] {
            add(a, &mut out);
        }
        out
    }
}

fn parse_key_line(line: &str, line_no: usize) -> Result<PublicKey, HostKeyError> {
    let mut words = line.split_whitespace();
    let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
        return Err(HostKeyError::BadLine {
            line: line_no,
            reason: "expected at least two fields".into(),
        });
    };
    let key =
        PublicKey::from_openssh(&format!("{kind} {blob}")).map_err(|e| HostKeyError::BadLine {
            line: line_no,
            reason: e.to_string(),
        })?;
    if !supported_host_key(&key.algorithm()) {
        return Err(HostKeyError::Unsupported {
            line: line_no,
            algorithm: key.algorithm().as_str().to_owned(),
        });
    }
    Ok(key)
}

/// The name a `known_hosts` file records for `host:port`.
fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// OpenSSH-style wildcard match: `*` any run of characters, `?` exactly one.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c.eq_ignore_ascii_case(&text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

fn hashed_match(entry: &str, name: &str) -> Result<bool, String> {
    use hmac::{KeyInit, Mac};
    // |1|salt|hash
    let mut parts = entry.split('|');
    let (Some(""), Some("1"), Some(salt), Some(hash), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(format!("malformed hashed host entry {entry:?}"));
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let salt = b64
        .decode(salt)
        .map_err(|e| format!("hashed host entry: bad salt: {e}"))?;
    let hash = b64
        .decode(hash)
        .map_err(|e| format!("hashed host entry: bad hash: {e}"))?;
    let mut mac = <hmac::Hmac<sha1::Sha1> as KeyInit>::new_from_slice(&salt)
        .map_err(|e| format!("hashed host entry: {e}"))?;
    mac.update(name.as_bytes());
    Ok(mac.verify_slice(&hash).is_ok())
}

/// Whether a comma-separated host pattern list matches `name`.
fn host_patterns_match(patterns: &str, name: &str) -> Result<bool, String> {
    let mut positive = false;
    for pat in patterns.split(',') {
        if pat.is_empty() {
            continue;
        }
        if pat.starts_with('|') {
            if hashed_match(pat, name)? {
                positive = true;
            }
            continue;
        }
        let (negated, pat) = match pat.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, pat),
        };
        if wildcard_match(pat.as_bytes(), name.as_bytes()) {
            if negated {
                return Ok(false);
            }
            positive = true;
        }
    }
    Ok(positive)
}

fn parse_known_hosts(text: &str, host: &str, port: u16) -> Result<HostKeySet, (usize, String)> {
    let name = known_hosts_name(host, port);
    let mut found = HostKeySet::default();
    let mut revoked = HostKeySet::default();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace().peekable();
        let marker = match fields.peek() {
            Some(m) if m.starts_with('@') => fields.next(),
            _ => None,
        };
        let (Some(patterns), Some(kind), Some(blob)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err((line_no, "expected `hosts keytype base64 [comment]`".into()));
        };
        match marker {
            None => {
                if host_patterns_match(patterns, &name).map_err(|e| (line_no, e))? {
                    let key = parse_key_line(&format!("{kind} {blob}"), line_no)
                        .map_err(|e| (line_no, e.to_string()))?;
                    found.push(key);
                }
            }
            Some("@revoked") => {
                // A revoked key is revoked for every host, whatever the pattern says.
                if let Ok(key) = PublicKey::from_openssh(&format!("{kind} {blob}")) {
                    revoked.push(key);
                }
            }
            Some("@cert-authority") => {}
            Some(other) => return Err((line_no, format!("unknown marker {other}"))),
        }
    }
    found.keys.retain(|k| !revoked.contains(k));
    Ok(found)
}

/// A host key specification that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("line {line}: not a public key line (`type base64 [comment]`): {reason}")]
    BadLine { line: usize, reason: String },
    #[error(
        "line {line}: unsupported host key type {algorithm} (supported: ssh-ed25519, \
             ecdsa-sha2-nistp256/384/521, ssh-rsa)"
    )]
    Unsupported { line: usize, algorithm: String },
    #[error("no host key found in the given text")]
    Empty,
    #[error("cannot read known_hosts file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}:{line}: {reason}", path.display())]
    KnownHosts {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    const ED2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA6rWI3G1sz07DnfFlrouTcysQlj2P+jpNSOEWD9OJ3X";

    /// (The machines column's base64 is decoded, padded or not, by `config`, and tested there.)
    #[test]
    fn parses_one_or_more_key_lines() {
        let one = HostKeySet::parse_openssh(&format!("{ED1} root@host")).unwrap();
        assert_eq!(one.len(), 1);
        let two = HostKeySet::parse_openssh(&format!("{ED1} c1\n{ED2} c2\n")).unwrap();
        assert_eq!(two.len(), 2);
        assert!(two.contains(&one.keys()[0]));
        assert!(matches!(
            HostKeySet::parse_openssh("hello world"),
            Err(HostKeyError::BadLine { line: 1, .. })
        ));
        assert!(matches!(
            HostKeySet::parse_openssh("\n# only a comment\n"),
            Err(HostKeyError::Empty)
        ));
    }

    #[test]
    fn fingerprint_is_openssh_format() {
        let k = HostKeySet::parse_openssh(ED1).unwrap();
        let fp = fingerprint(&k.keys()[0]);
        assert!(fp.starts_with("SHA256:"), "{fp}");
        assert_eq!(fp.len(), "SHA256:".len() + 43);
        assert!(!fp.ends_with('='));
    }

    #[test]
    fn preferred_algorithms_put_pinned_types_first() {
        let k = HostKeySet::parse_openssh(ED1).unwrap();
        assert_eq!(k.preferred_algorithms()[0], Algorithm::Ed25519);
        assert!(
            !k.preferred_algorithms()
                .contains(&Algorithm::Rsa { hash: None }),
            "SHA-1 RSA signatures are never offered"
        );
    }

    fn hashed(name: &str, salt: &[u8]) -> String {
        use hmac::{KeyInit, Mac};
        let mut mac = <hmac::Hmac<sha1::Sha1> as KeyInit>::new_from_slice(salt).unwrap();
        mac.update(name.as_bytes());
        let e = base64::engine::general_purpose::STANDARD;
        format!(
            "|1|{}|{}",
            e.encode(salt),
            e.encode(mac.finalize().into_bytes())
        )
    }

    /// For each `(host, port, want)`: `text` gives that host exactly the keys `want`.
    fn assert_gives(text: &str, cases: &[(&str, u16, &HostKeySet)]) {
        for &(host, port, want) in cases {
            assert_eq!(
                &HostKeySet::from_known_hosts(text, host, port).unwrap(),
                want,
                "{host} port {port} in {text:?}"
            );
        }
    }

    #[test]
    fn known_hosts_matching() {
        let k1 = HostKeySet::parse_openssh(ED1).unwrap();
        let k2 = HostKeySet::parse_openssh(ED2).unwrap();
        let text = format!(
            "# comment\n\
             \n\
             other.example {ED2}\n\
             builder.example,10.0.0.1 {ED1} comment words\n\
             [builder.example]:2222 {ED2}\n"
        );
        let none = HostKeySet::default();
        assert_gives(
            &text,
            &[
                ("builder.example", 22, &k1),
                ("10.0.0.1", 22, &k1),
                ("builder.example", 2222, &k2),
                ("builder.example", 2223, &none),
                ("nobody", 22, &none),
            ],
        );
    }

    #[test]
    fn known_hosts_hashed_wildcards_negation_revoked() {
        let k1 = HostKeySet::parse_openssh(ED1).unwrap();
        let none = HostKeySet::default();
        let text = format!(
            "{} {ED1}\n",
            hashed("[127.0.0.1]:2200", b"0123456789abcdefghij")
        );
        assert_gives(
            &text,
            &[
                ("127.0.0.1", 2200, &k1),
                ("127.0.0.1", 22, &none),
                ("127.0.0.2", 2200, &none),
            ],
        );

        let text = format!("*.example,!bad.example {ED1}\n");
        assert_gives(
            &text,
            &[("good.example", 22, &k1), ("bad.example", 22, &none)],
        );
        let text = format!("b?ilder {ED1}\n");
        assert_gives(&text, &[("builder", 22, &k1), ("bilder", 22, &none)]);

        let text =
            format!("builder {ED1}\nbuilder {ED2}\n@revoked * {ED1}\n@cert-authority * {ED2}\n");
        let got = HostKeySet::from_known_hosts(&text, "builder", 22).unwrap();
        assert_eq!(got, HostKeySet::parse_openssh(ED2).unwrap());

        assert!(matches!(
            HostKeySet::from_known_hosts("builder ssh-ed25519\n", "builder", 22),
            Err(HostKeyError::KnownHosts { line: 1, .. })
        ));
        assert!(matches!(
            HostKeySet::from_known_hosts(&format!("|1|zz|yy|x {ED1}\n"), "builder", 22),
            Err(HostKeyError::KnownHosts { line: 1, .. })
        ));
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match(b"*", b""));
        assert!(wildcard_match(b"a*c", b"abbbc"));
        assert!(!wildcard_match(b"a*c", b"abbbd"));
        assert!(wildcard_match(b"[h]:*", b"[h]:22"));
        assert!(wildcard_match(b"*.Example", b"x.example"));
        assert!(!wildcard_match(b"?", b""));
    }
}
