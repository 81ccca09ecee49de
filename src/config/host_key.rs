//! Host-key lines as a configuration writes them: OpenSSH public key lines (`type base64
//! [comment]`, the TOML `host-key`, machines column 8 once its base64 is decoded), a
//! `host-key-file` (such lines, or a known_hosts file), and the keys whose private half is
//! published ([`WELL_KNOWN_HOST_KEYS`]).
//!
//! It checks that a line is well-formed (base64, a blob of the declared type) and reads the
//! file a `host-key-file` names, bounded; it never decides whether a server's key is
//! acceptable: `ssh` verifies, and `ssh::SshTarget::for_builder` refuses a well-known key.

use std::io;
use std::path::Path;

use base64::Engine as _;

use super::model::HostKeySpec;

/// One pinned public key: an OpenSSH public key line `type base64 [comment]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedKey {
    /// Key type, e.g. `ssh-ed25519`.
    pub algorithm: String,
    /// The key blob, base64 as written.
    pub key_base64: String,
    pub comment: Option<String>,
}

impl PinnedKey {
    /// Parse `type base64 [comment]`, checking that the blob is base64 and starts with the
    /// declared type (as every SSH public key blob does).
    pub fn parse_line(line: &str) -> Result<Self, String> {
        let line = line.trim();
        let mut parts = line.splitn(3, [' ', '\t']);
        let algorithm = parts.next().unwrap_or("").trim();
        let key = parts.next().map(str::trim).unwrap_or("");
        let comment = parts.next().map(str::trim).filter(|c| !c.is_empty());
        if algorithm.is_empty() || key.is_empty() {
            return Err(format!(
                "'{line}' is not a public key line ('type base64-key [comment]')"
            ));
        }
        let blob = lenient_base64(key)
            .map_err(|e| format!("the key in '{line}' is not valid base64: {e}"))?;
        let embedded = ssh_string_prefix(&blob).ok_or_else(|| {
            format!("the key in '{line}' is not an SSH public key blob (too short)")
        })?;
        if embedded != algorithm.as_bytes() {
            return Err(format!(
                "the key in '{line}' is a '{}' key, but the line says '{algorithm}'",
                String::from_utf8_lossy(embedded)
            ));
        }
        Ok(PinnedKey {
            algorithm: algorithm.to_owned(),
            key_base64: key.to_owned(),
            comment: comment.map(str::to_owned),
        })
    }

    /// The raw key blob (wire format), as SSH sends it in the key exchange.
    pub fn blob(&self) -> Vec<u8> {
        // Validated at parse time; an empty result cannot happen for parsed keys.
        lenient_base64(&self.key_base64).unwrap_or_default()
    }

    /// `type base64`, the form known_hosts and `authorized_keys` use (without the comment).
    pub fn openssh(&self) -> String {
        format!("{} {}", self.algorithm, self.key_base64)
    }
}

fn ssh_string_prefix(blob: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    blob.get(4..4usize.checked_add(len)?)
}

fn lenient_base64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(s)
}

/// Parse one or more public key lines (blank lines and `#` comments skipped).
pub fn parse_key_lines(text: &str) -> Result<Vec<PinnedKey>, String> {
    let keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(PinnedKey::parse_line)
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err("no public key in it".to_owned());
    }
    Ok(keys)
}

/// A public host key whose private half is published, so a server presenting it proves
/// nothing about who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WellKnownKey {
    /// The OpenSSH public key line (`type base64`).
    pub key: &'static str,
    /// Where its private half is published.
    pub what: &'static str,
}

/// Host keys refused unless a TOML builder says `allow-well-known-host-key = true`.
pub const WELL_KNOWN_HOST_KEYS: &[WellKnownKey] = &[WellKnownKey {
    key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJBWcxb/Blaqt1auOtE+F8QUWrUotiC5qBJ+UuEWdVCb",
    what: "nixpkgs' darwin.linux-builder (its private key is in the nixpkgs source)",
}];

/// The well-known key whose SSH wire blob is `blob`, if any.
pub fn well_known_host_key(blob: &[u8]) -> Option<&'static WellKnownKey> {
    WELL_KNOWN_HOST_KEYS.iter().find(|k| {
        k.key
            .split_whitespace()
            .nth(1)
            .and_then(|b64| lenient_base64(b64).ok())
            .is_some_and(|known| known == blob)
    })
}

/// A base64 field that holds public key lines (machines column 8, the
/// `base64-ssh-public-host-key` URI parameter), decoded to text; padded or not, like Nix.
pub(super) fn decode_base64_text(b64: &str) -> Result<String, String> {
    let bytes = lenient_base64(b64).map_err(|e| e.to_string())?;
    String::from_utf8(bytes).map_err(|_| "it does not decode to text".to_owned())
}

/// A `host-key-file`: either `.pub`-style lines (`type key [comment]`), pinned as they are, or
/// a known_hosts file (`hosts type key`), looked up at connect time.
pub(super) fn host_key_file(file: &Path) -> Result<HostKeySpec, String> {
    // Bounded: a key file is a few KiB, and a config naming `/dev/zero` (or any huge file) must
    // fail, not make every hook read forever.
    const MAX_KEY_FILE: u64 = 1 << 20;
    let mut text = String::new();
    std::fs::File::open(file)
        .and_then(|f| io::Read::read_to_string(&mut io::Read::take(f, MAX_KEY_FILE + 1), &mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_KEY_FILE {
        return Err(format!(
            "larger than {} KiB: not a public key or known_hosts file",
            MAX_KEY_FILE >> 10
        ));
    }
    if let Ok(keys) = parse_key_lines(&text) {
        return Ok(HostKeySpec::Pinned(keys));
    }
    let mut entries = 0;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut rest = line;
        if rest.starts_with('@') {
            // `@cert-authority` / `@revoked` marker.
            rest = rest
                .split_once([' ', '\t'])
                .map_or("", |(_, r)| r.trim_start());
        }
        let key = rest
            .split_once([' ', '\t'])
            .map_or("", |(_, r)| r.trim_start());
        PinnedKey::parse_line(key)
            .map_err(|e| format!("neither a public key file nor a known_hosts file: {e}"))?;
        entries += 1;
    }
    if entries == 0 {
        return Err("holds no keys".to_owned());
    }
    Ok(HostKeySpec::KnownHostsFile(file.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{ED25519, MINI, b64, fake_fs, mini, toml_err};
    use super::super::{Config, parse_machines};
    use super::*;

    #[test]
    fn well_known_host_key_is_recognised_and_allowed_only_by_toml() {
        let wk = WELL_KNOWN_HOST_KEYS[0].key;
        let blob = |line: &str| PinnedKey::parse_line(line).unwrap().blob();
        assert_eq!(
            well_known_host_key(&blob(wk)),
            Some(&WELL_KNOWN_HOST_KEYS[0])
        );
        // A comment does not hide it.
        let commented = format!("{wk} root@darwin-builder");
        assert!(well_known_host_key(&blob(&commented)).is_some());
        assert_eq!(well_known_host_key(&blob(ED25519)), None);

        let parse = |extra: &str| {
            let text = format!("{MINI}host-key = \"{wk}\"\n{extra}");
            Config::parse(&text, Path::new("/etc/nix/lazy-builder.toml")).unwrap()
        };
        assert!(!parse("").builders[0].allow_well_known_host_key);
        assert!(parse("allow-well-known-host-key = true\n").builders[0].allow_well_known_host_key);
        assert!(
            !parse("allow-well-known-host-key = false\n").builders[0].allow_well_known_host_key
        );
        let (line, key, _) = toml_err(&mini("allow-well-known-host-key = \"yes\"\n"));
        assert_eq!(
            (line, key.as_deref()),
            (5, Some("builders.b.allow-well-known-host-key"))
        );
        // The machines grammar has no column for it.
        let line = format!("ssh://h x86_64-linux - 1 1 - - {}", b64(wk));
        let (b, _) = parse_machines(&line, "x86_64-linux", &mut fake_fs(&[])).unwrap();
        assert!(!b[0].allow_well_known_host_key);
    }
}
