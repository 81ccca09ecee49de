//! Store URIs: the `ssh://` and `ssh-ng://` URIs a builder is reached at ([`BuilderUri`]), and
//! Nix's rule that turns a bare machines column (`user@host`) into one ([`nix_store_uri`]).
//!
//! Parsing only: it never resolves a host name or opens a connection. Anything that is not an
//! SSH store (`local`, `daemon`, a path, `https://…`) is a [`UriError::NotSsh`], which the
//! machines parser turns into a skipped line and the TOML parser into an error.

use std::collections::BTreeMap;
use std::fmt;

/// The two remote-store kinds we can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `ssh://`: `nix-store --serve --write` (serve protocol).
    Ssh,
    /// `ssh-ng://`: `nix-daemon --stdio` (worker protocol).
    SshNg,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Ssh => "ssh",
            Scheme::SshNg => "ssh-ng",
        }
    }

    /// The remote program Nix runs when the URI has no `remote-program` parameter.
    pub fn default_remote_program(self) -> &'static str {
        match self {
            Scheme::Ssh => "nix-store",
            Scheme::SshNg => "nix-daemon",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a store URI cannot be used as a builder.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// A store Nix knows but we cannot build on (`local`, `auto`, `daemon`, a path, `http…`).
    #[error("'{uri}' is not an SSH store ({kind}); only ssh:// and ssh-ng:// builders can be used")]
    NotSsh { uri: String, kind: String },
    /// An ssh URI we cannot make sense of.
    #[error("'{uri}' is not a valid SSH store URI: {reason}")]
    Malformed { uri: String, reason: String },
}

/// A parsed `ssh://` or `ssh-ng://` store URI: `scheme://[user@]host[:port][?k=v&…]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuilderUri {
    pub scheme: Scheme,
    pub user: Option<String>,
    /// Host name or address; IPv6 addresses without their brackets.
    pub host: String,
    /// `None` when neither the URI nor `NIX_SSHOPTS` gave one: ssh's default (22).
    pub port: Option<u16>,
    /// Query parameters (store settings such as `remote-program`, `remote-store`, `ssh-key`),
    /// percent-decoded.
    pub params: BTreeMap<String, String>,
}

impl BuilderUri {
    /// Parse a URI that must carry an explicit `ssh://` or `ssh-ng://` scheme.
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        let malformed = |reason: &str| UriError::Malformed {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err(UriError::NotSsh {
                uri: uri.to_owned(),
                kind: non_ssh_kind(uri),
            });
        };
        let scheme = match scheme {
            "ssh" => Scheme::Ssh,
            "ssh-ng" => Scheme::SshNg,
            other => {
                return Err(UriError::NotSsh {
                    uri: uri.to_owned(),
                    kind: format!("scheme '{other}'"),
                });
            }
        };
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        if authority.contains('/') {
            return Err(malformed("a path after the host is not supported"));
        }
        if authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(malformed("white space in the host part"));
        }
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => {
                if u.is_empty() {
                    return Err(malformed("empty user name before '@'"));
                }
                (Some(u.to_owned()), h)
            }
            None => (None, authority),
        };
        let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
            let Some((host, after)) = bracketed.split_once(']') else {
                return Err(malformed("'[' without a closing ']'"));
            };
            let port = match after {
                "" => None,
                p => match p.strip_prefix(':') {
                    Some(p) => Some(p),
                    None => return Err(malformed("unexpected text after ']'")),
                },
            };
            (host, port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => {
                    if p.contains(':') {
                        return Err(malformed("IPv6 addresses must be written in brackets"));
                    }
                    (h, Some(p))
                }
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(malformed("no host name"));
        }
        let port = match port {
            None => None,
            Some(p) => match parse_port(p) {
                Some(p) => Some(p),
                None => return Err(malformed(&format!("bad port '{p}'"))),
            },
        };
        let mut params = BTreeMap::new();
        for pair in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            // Like Nix, a parameter without '=' is ignored.
            if let Some((k, v)) = pair.split_once('=') {
                params.insert(percent_decode(k), percent_decode(v));
            }
        }
        Ok(BuilderUri {
            scheme,
            user,
            host: host.to_owned(),
            port,
            params,
        })
    }

    /// `remote-program` parameter, or the scheme's default program.
    pub fn remote_program(&self) -> &str {
        self.params
            .get("remote-program")
            .map(String::as_str)
            .unwrap_or(self.scheme.default_remote_program())
    }

    /// `remote-store` parameter (passed as `--store` on the remote side).
    pub fn remote_store(&self) -> Option<&str> {
        self.params.get("remote-store").map(String::as_str)
    }

    /// The port to connect to: the explicit one, else 22.
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(22)
    }
}

impl fmt::Display for BuilderUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme)?;
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        for (i, (k, v)) in self.params.iter().enumerate() {
            write!(f, "{}{}={}", if i == 0 { '?' } else { '&' }, k, v)?;
        }
        Ok(())
    }
}

pub(super) fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

fn non_ssh_kind(uri: &str) -> String {
    match uri.split(['?', '/']).next().unwrap_or("") {
        "" if uri.starts_with('/') => "a local store path".to_owned(),
        "" => "a store with default settings".to_owned(),
        word @ ("auto" | "daemon" | "local") => format!("the '{word}' store"),
        _ if uri.contains('/') => "a local store path".to_owned(),
        word => format!("'{word}'"),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex_val(bytes[i + 1]), hex_val(bytes[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Nix's compatibility rule for the first machines column: a word with no `://`, no `/` and
/// not one of the special store words gets `ssh://` prepended (`user@host` → `ssh://user@host`).
/// The result is the machine's store URI exactly as Nix's hook names it (slot files, `# accept`).
pub fn nix_store_uri(first_column: &str) -> String {
    let s = first_column;
    let keep = s.contains("://")
        || s.contains('/')
        || matches!(s, "auto" | "daemon" | "local")
        || s.starts_with("auto?")
        || s.starts_with("daemon?")
        || s.starts_with("local?")
        || s.starts_with('?');
    if keep {
        s.to_owned()
    } else {
        format!("ssh://{s}")
    }
}

#[cfg(test)]
mod tests {
    use super::super::SshOpts;
    use super::super::test_support::machines;
    use super::*;

    #[test]
    fn bare_words_get_ssh_prefix_like_nix() {
        assert_eq!(nix_store_uri("root@host"), "ssh://root@host");
        assert_eq!(nix_store_uri("host:22"), "ssh://host:22");
        assert_eq!(nix_store_uri("ssh-ng://h"), "ssh-ng://h");
        for kept in [
            "auto",
            "daemon",
            "local",
            "auto?x=1",
            "daemon?x",
            "local?root=/x",
            "?x=1",
            "/some/dir",
            "https://cache",
        ] {
            assert_eq!(nix_store_uri(kept), kept);
        }
    }

    #[test]
    fn uri_parts() {
        let u = BuilderUri::parse("ssh-ng://root@127.0.0.1:31022").unwrap();
        assert_eq!(u.scheme, Scheme::SshNg);
        assert_eq!(u.user.as_deref(), Some("root"));
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(u.port, Some(31022));
        assert_eq!(u.remote_program(), "nix-daemon");
        let u = BuilderUri::parse("ssh://h").unwrap();
        assert_eq!(
            (u.user.as_deref(), u.port, u.port_or_default()),
            (None, None, 22)
        );
        assert_eq!(u.remote_program(), "nix-store");
        let u = BuilderUri::parse("ssh://[::1]:2222").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", Some(2222)));
        assert_eq!(u.to_string(), "ssh://[::1]:2222");
        let u = BuilderUri::parse(
            "ssh://a@b@h?remote-program=/opt/nix%20store&remote-store=/tmp/x&flag",
        )
        .unwrap();
        assert_eq!(u.user.as_deref(), Some("a@b"));
        assert_eq!(u.remote_program(), "/opt/nix store");
        assert_eq!(u.remote_store(), Some("/tmp/x"));
        assert_eq!(u.params.len(), 2, "a parameter without '=' is ignored");
    }

    #[test]
    fn uri_errors() {
        for (uri, what) in [
            ("ssh://", "no host"),
            ("ssh://u@", "no host"),
            ("ssh://@h", "empty user"),
            ("ssh://h:0", "bad port"),
            ("ssh://h:99999", "bad port"),
            ("ssh://h:x", "bad port"),
            ("ssh://h/path", "path"),
            ("ssh://::1", "brackets"),
            ("ssh://[::1", "closing"),
        ] {
            match BuilderUri::parse(uri) {
                Err(UriError::Malformed { reason, .. }) => {
                    assert!(reason.contains(what), "{uri}: {reason}")
                }
                other => panic!("{uri}: {other:?}"),
            }
        }
        for uri in [
            "local",
            "auto",
            "daemon",
            "/some/store",
            "https://cache.example",
            "file:///x",
            "unix:///s",
        ] {
            assert!(
                matches!(BuilderUri::parse(uri), Err(UriError::NotSsh { .. })),
                "{uri}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn uri_display_round_trips(
            ng in proptest::bool::ANY,
            user in proptest::option::of("[a-z][a-z0-9_]{0,8}"),
            host in "[a-z0-9][a-z0-9.-]{0,20}",
            port in proptest::option::of(1u16..),
            params in proptest::collection::btree_map("[a-z-]{1,12}", "[A-Za-z0-9/._-]{0,12}", 0..3),
        ) {
            let uri = BuilderUri { scheme: if ng { Scheme::SshNg } else { Scheme::Ssh }, user, host, port, params };
            proptest::prop_assert_eq!(BuilderUri::parse(&uri.to_string()).unwrap(), uri);
        }

        #[test]
        fn uri_parse_never_panics(s in "\\PC{0,40}") {
            let _ = BuilderUri::parse(&s);
            let _ = machines(&s, &[]);
            let _ = SshOpts::parse(&s);
        }
    }
}
