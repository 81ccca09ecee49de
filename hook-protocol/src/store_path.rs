//! Store paths, Nix's base-32 alphabet, and the textual forms of SHA-256 hashes.
//!
//! Owns validation of printed store paths (`<store dir>/<32 nix32 chars>-<name>`) and the
//! conversions between base16, nix32, `sha256:`-prefixed and SRI hash strings. Pure functions;
//! no I/O.

use std::fmt;
use std::str::FromStr;

/// Nix's base-32 alphabet (no e, o, u, t).
pub const NIX32_ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Length of a store path's hash part.
pub const HASH_PART_LEN: usize = 32;
/// Longest name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;

/// Encodes bytes with Nix's base-32 (least significant 5-bit group last).
pub fn nix32_encode(bytes: &[u8]) -> String {
    let len = (bytes.len() * 8).div_ceil(5);
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = bytes[i] as u16 >> j;
        let hi = if i + 1 < bytes.len() {
            (bytes[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(NIX32_ALPHABET[((lo | hi) & 31) as usize] as char);
    }
    out
}

/// Decodes Nix's base-32 into `out_len` bytes.
pub fn nix32_decode(s: &str, out_len: usize) -> Option<Vec<u8>> {
    if s.len() != (out_len * 8).div_ceil(5) {
        return None;
    }
    let mut out = vec![0u8; out_len];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = NIX32_ALPHABET.iter().position(|&a| a == c)? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        if i + 1 < out_len {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

fn is_nix32_char(c: u8) -> bool {
    NIX32_ALPHABET.contains(&c)
}

/// Characters Nix allows in a store path name.
pub fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"+-._?=".contains(&c)
}

/// Why a string is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("'{0}' is not an absolute store path")]
    NotAbsolute(String),
    #[error("'{0}' has a bad hash part")]
    BadHash(String),
    #[error("'{0}' has a bad name")]
    BadName(String),
}

/// A full printed store path, e.g. `/nix/store/zzz…-hello-2.12`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath {
    full: String,
    base_start: usize,
}

impl StorePath {
    /// Validates a full path. The store directory is whatever precedes the last `/`.
    pub fn parse(s: &str) -> Result<Self, StorePathError> {
        let slash = s
            .rfind('/')
            .filter(|&i| i > 0 && s.starts_with('/'))
            .ok_or_else(|| StorePathError::NotAbsolute(s.to_owned()))?;
        let base = &s.as_bytes()[slash + 1..];
        if base.len() < HASH_PART_LEN + 2
            || base[HASH_PART_LEN] != b'-'
            || !base[..HASH_PART_LEN].iter().all(|&c| is_nix32_char(c))
        {
            return Err(StorePathError::BadHash(s.to_owned()));
        }
        let name = &base[HASH_PART_LEN + 1..];
        if name.len() > MAX_NAME_LEN
            || name.starts_with(b".")
            || !name.iter().all(|&c| is_name_char(c))
        {
            return Err(StorePathError::BadName(s.to_owned()));
        }
        Ok(StorePath {
            full: s.to_owned(),
            base_start: slash + 1,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.full[self.base_start..]
    }

    pub fn hash_part(&self) -> &str {
        &self.base_name()[..HASH_PART_LEN]
    }

    pub fn name(&self) -> &str {
        &self.base_name()[HASH_PART_LEN + 1..]
    }

    /// The store directory, e.g. `/nix/store`.
    pub fn store_dir(&self) -> &str {
        &self.full[..self.base_start - 1]
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.full)
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StorePath::parse(s)
    }
}

impl AsRef<str> for StorePath {
    fn as_ref(&self) -> &str {
        &self.full
    }
}

impl AsRef<[u8]> for StorePath {
    fn as_ref(&self) -> &[u8] {
        self.full.as_bytes()
    }
}

/// A SHA-256 digest, as used for NAR hashes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

/// Why a string is not a SHA-256 hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a SHA-256 hash in base16, nix32, base64 or SRI form")]
pub struct HashParseError(pub String);

impl Sha256 {
    pub fn digest(data: &[u8]) -> Self {
        use sha2::Digest;
        Sha256(sha2::Sha256::digest(data).into())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_base16(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Nix base-32, 52 characters.
    pub fn to_nix32(&self) -> String {
        nix32_encode(&self.0)
    }

    /// `sha256:<nix32>`, as `nix-store -q --hash` and serve QueryPathInfos print it.
    pub fn to_prefixed_nix32(&self) -> String {
        format!("sha256:{}", self.to_nix32())
    }

    /// Accepts any form `Hash::parseAny` with a sha256 default accepts: bare or `sha256:`-prefixed
    /// base16 / nix32 / base64, and SRI `sha256-<base64>`.
    pub fn parse_any(s: &str) -> Result<Self, HashParseError> {
        let err = || HashParseError(s.to_owned());
        let body = if let Some(rest) = s.strip_prefix("sha256:") {
            rest
        } else if let Some(rest) = s.strip_prefix("sha256-") {
            return decode_base64_32(rest).map(Sha256).ok_or_else(err);
        } else {
            s
        };
        let bytes = match body.len() {
            64 => decode_hex(body),
            52 => nix32_decode(body, 32),
            44 => decode_base64_32(body).map(|a| a.to_vec()),
            _ => None,
        }
        .ok_or_else(err)?;
        Ok(Sha256(bytes.try_into().map_err(|_| err())?))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_base16())
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn decode_base64_32(s: &str) -> Option<[u8; 32]> {
    const ALPHA: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let s = s.as_bytes();
    if s.len() != 44 || s[43] != b'=' {
        return None;
    }
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut out = Vec::with_capacity(33);
    for &c in &s[..43] {
        let v = ALPHA.iter().position(|&a| a == c)? as u32;
        bits = (bits << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    if bits != 0 {
        return None;
    }
    out.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nix32_of_known_hash() {
        // sha256("") as printed by `nix hash to-base32`.
        let h = Sha256::digest(b"");
        assert_eq!(
            h.to_nix32(),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            Sha256::parse_any("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=").unwrap(),
            h
        );
        assert_eq!(Sha256::parse_any(&h.to_base16()).unwrap(), h);
        assert_eq!(Sha256::parse_any(&h.to_prefixed_nix32()).unwrap(), h);
        assert!(Sha256::parse_any("sha256:zz").is_err());
    }

    #[test]
    fn store_path_parts() {
        let p = StorePath::parse("/nix/store/00000000000000000000000000000000-hello-2.12").unwrap();
        assert_eq!(p.name(), "hello-2.12");
        assert_eq!(p.hash_part(), "00000000000000000000000000000000");
        assert_eq!(p.store_dir(), "/nix/store");
        assert!(StorePath::parse("/nix/store/eeee0000000000000000000000000000-x").is_err());
        assert!(StorePath::parse("/nix/store/00000000000000000000000000000000-a/b").is_err());
        assert!(StorePath::parse("nix/store/00000000000000000000000000000000-x").is_err());
        assert!(StorePath::parse("/nix/store/00000000000000000000000000000000-.x").is_err());
        assert!(StorePath::parse("/nix/store/00000000000000000000000000000000-").is_err());
    }

    proptest! {
        #[test]
        fn nix32_round_trip(bytes in proptest::array::uniform32(any::<u8>())) {
            let s = nix32_encode(&bytes);
            prop_assert_eq!(s.len(), 52);
            prop_assert_eq!(nix32_decode(&s, 32).unwrap(), bytes.to_vec());
        }

        #[test]
        fn nix32_decode_never_panics(s in "[0-9a-z]{0,60}") {
            let _ = nix32_decode(&s, 32);
            let _ = Sha256::parse_any(&s);
        }
    }
}
