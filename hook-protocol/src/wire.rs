//! Nix's wire primitives: little-endian u64s, padded strings, string lists and sets.
//!
//! Owns the one decoding discipline every codec in this crate follows: decoders read from a
//! borrowed byte slice through [`Reader`] and return [`DecodeError::Incomplete`] when the slice
//! ends too early (feed more bytes and call again) and [`DecodeError::Invalid`] when the bytes
//! can never become a valid message. Length prefixes are checked against limits *before* anything
//! is allocated, so a hostile length cannot make us reserve memory. Encoders append to a
//! `Vec<u8>`. Nothing here performs I/O.

use std::fmt;

/// Longest string we accept by default (derivation environments with `__json` can be large).
pub const MAX_STRING: u64 = 64 << 20;
/// Most elements we accept in one list, set or map.
pub const MAX_COUNT: u64 = 1 << 24;

/// Why a decoder stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended before the message did; `needed` more bytes are known to be required
    /// (a lower bound: more may be needed after those arrive).
    #[error("incomplete input: at least {needed} more bytes are needed")]
    Incomplete { needed: usize },
    /// The input can never be a valid message.
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

impl DecodeError {
    /// Shorthand for an [`Invalid::Malformed`] error.
    pub fn malformed(what: impl Into<String>) -> Self {
        DecodeError::Invalid(Invalid::Malformed(what.into()))
    }

    pub fn is_incomplete(&self) -> bool {
        matches!(self, DecodeError::Incomplete { .. })
    }
}

/// Ways in which bytes can be definitely wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("non-zero padding after a string of {len} bytes")]
    NonZeroPadding { len: u64 },
    #[error("{what} of length {len} exceeds the limit of {limit}")]
    TooLong {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("{what}: value {value} is out of range")]
    OutOfRange { what: &'static str, value: u64 },
    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: String, got: String },
    #[error("{0}")]
    Malformed(String),
}

pub type Result<T, E = DecodeError> = std::result::Result<T, E>;

/// A cursor over a borrowed byte slice that decodes Nix wire primitives.
#[derive(Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("pos", &self.pos)
            .field("len", &self.buf.len())
            .finish()
    }
}

/// Number of zero bytes that pad a string of `len` bytes to a multiple of eight.
pub fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The unconsumed rest of the input.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// Takes exactly `n` raw bytes.
    pub fn raw(&mut self, n: usize) -> Result<&'a [u8]> {
        let avail = self.buf.len() - self.pos;
        if avail < n {
            return Err(DecodeError::Incomplete { needed: n - avail });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn u64(&mut self) -> Result<u64> {
        let b = self.raw(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A u64 that must fit `max` (Nix's `unsigned int` fields and enums).
    pub fn u64_max(&mut self, what: &'static str, max: u64) -> Result<u64> {
        let v = self.u64()?;
        if v > max {
            return Err(Invalid::OutOfRange { what, value: v }.into());
        }
        Ok(v)
    }

    /// A u64 that `known` maps to a value (a command, an operation, a version); any other is
    /// [`Invalid::OutOfRange`] named `what`.
    pub fn code<T>(
        &mut self,
        what: &'static str,
        known: impl FnOnce(u64) -> Option<T>,
    ) -> Result<T> {
        let v = self.u64()?;
        known(v).ok_or_else(|| Invalid::OutOfRange { what, value: v }.into())
    }

    /// Nix's bool: any non-zero u64 is true.
    pub fn bool(&mut self) -> Result<bool> {
        Ok(self.u64()? != 0)
    }

    /// A length-prefixed, zero-padded byte string of at most `limit` bytes.
    pub fn bytes_limited(&mut self, what: &'static str, limit: u64) -> Result<&'a [u8]> {
        let start = self.pos;
        let len = self.u64()?;
        if len > limit {
            self.pos = start;
            return Err(Invalid::TooLong { what, len, limit }.into());
        }
        let pad = padding(len);
        let total = len as usize + pad;
        let avail = self.buf.len() - self.pos;
        if avail < total {
            self.pos = start;
            return Err(DecodeError::Incomplete {
                needed: total - avail,
            });
        }
        let data = &self.buf[self.pos..self.pos + len as usize];
        let padding_bytes = &self.buf[self.pos + len as usize..self.pos + total];
        if padding_bytes.iter().any(|&b| b != 0) {
            self.pos = start;
            return Err(Invalid::NonZeroPadding { len }.into());
        }
        self.pos += total;
        Ok(data)
    }

    /// A byte string with the default limit.
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        self.bytes_limited("string", MAX_STRING)
    }

    /// A string that must be UTF-8.
    pub fn str(&mut self, what: &'static str) -> Result<&'a str> {
        let start = self.pos;
        let b = self.bytes()?;
        std::str::from_utf8(b).map_err(|_| {
            self.pos = start;
            Invalid::NotUtf8 { what }.into()
        })
    }

    /// An owned UTF-8 string.
    pub fn string(&mut self, what: &'static str) -> Result<String> {
        self.str(what).map(str::to_owned)
    }

    /// Text from a peer that may not be UTF-8 (log lines, error messages): decoded lossily.
    pub fn text(&mut self) -> Result<String> {
        Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
    }

    /// A u64 count followed by that many elements decoded by `f`.
    pub fn list<T>(
        &mut self,
        what: &'static str,
        mut f: impl FnMut(&mut Self) -> Result<T>,
    ) -> Result<Vec<T>> {
        let count = self.u64()?;
        if count > MAX_COUNT {
            return Err(Invalid::TooLong {
                what,
                len: count,
                limit: MAX_COUNT,
            }
            .into());
        }
        // Never trust the count for an allocation: each element needs at least 8 bytes.
        let mut out = Vec::with_capacity((count as usize).min(self.rest().len() / 8));
        for _ in 0..count {
            out.push(f(self)?);
        }
        Ok(out)
    }

    /// A list of UTF-8 strings.
    pub fn strings(&mut self, what: &'static str) -> Result<Vec<String>> {
        self.list(what, |r| r.string(what))
    }

    /// Expects the exact u64 `want`.
    pub fn expect_u64(&mut self, what: &str, want: u64) -> Result<()> {
        let got = self.u64()?;
        if got != want {
            return Err(Invalid::Unexpected {
                expected: format!("{what} {want:#x}"),
                got: format!("{got:#x}"),
            }
            .into());
        }
        Ok(())
    }
}

/// Runs `f` over `buf` and returns its value with the number of bytes it consumed.
pub fn decode_with<'a, T>(
    buf: &'a [u8],
    f: impl FnOnce(&mut Reader<'a>) -> Result<T>,
) -> Result<(T, usize)> {
    let mut r = Reader::new(buf);
    let v = f(&mut r)?;
    Ok((v, r.position()))
}

/// Appends Nix wire primitives to a byte buffer.
pub trait WireWrite {
    fn put_u64(&mut self, v: u64);
    fn put_bool(&mut self, v: bool) {
        self.put_u64(v as u64)
    }
    fn put_bytes(&mut self, b: &[u8]);
    fn put_str(&mut self, s: &str) {
        self.put_bytes(s.as_bytes())
    }
    fn put_strings<I, S>(&mut self, items: I)
    where
        I: IntoIterator<Item = S>,
        I::IntoIter: ExactSizeIterator,
        S: AsRef<[u8]>,
    {
        let it = items.into_iter();
        self.put_u64(it.len() as u64);
        for s in it {
            self.put_bytes(s.as_ref());
        }
    }
}

impl WireWrite for Vec<u8> {
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }

    fn put_bytes(&mut self, b: &[u8]) {
        self.put_u64(b.len() as u64);
        self.extend_from_slice(b);
        self.extend_from_slice(&[0u8; 8][..padding(b.len() as u64)]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Checks the decoder contract's first half on `bytes`, a whole message: every proper
    /// prefix of it is merely Incomplete.
    pub(crate) fn assert_prefixes_incomplete<T: fmt::Debug>(
        bytes: &[u8],
        mut f: impl FnMut(&mut Reader<'_>) -> Result<T>,
    ) {
        for cut in 0..bytes.len() {
            match f(&mut Reader::new(&bytes[..cut])) {
                Err(e) if e.is_incomplete() => {}
                other => panic!("prefix of {cut}/{} bytes: {other:?}", bytes.len()),
            }
        }
    }

    #[test]
    fn string_layout_matches_nix() {
        let mut b = Vec::new();
        b.put_str("false");
        assert_eq!(b, b"\x05\0\0\0\0\0\0\0false\0\0\0");
        let mut b = Vec::new();
        b.put_str("");
        assert_eq!(b, [0u8; 8]);
        let mut b = Vec::new();
        b.put_str("12345678");
        assert_eq!(b.len(), 16);
    }

    #[test]
    fn incomplete_is_not_invalid() {
        let mut b = Vec::new();
        b.put_str("hello");
        for cut in 0..b.len() {
            let e = Reader::new(&b[..cut]).bytes().unwrap_err();
            assert!(e.is_incomplete(), "cut {cut}: {e:?}");
        }
        let mut bad = b.clone();
        *bad.last_mut().unwrap() = 1;
        assert_eq!(
            Reader::new(&bad).bytes().unwrap_err(),
            DecodeError::Invalid(Invalid::NonZeroPadding { len: 5 })
        );
    }

    #[test]
    fn hostile_lengths_are_invalid_without_allocating() {
        let b = u64::MAX.to_le_bytes();
        assert!(matches!(
            Reader::new(&b).bytes(),
            Err(DecodeError::Invalid(Invalid::TooLong { .. }))
        ));
        let b = (MAX_COUNT + 1).to_le_bytes();
        assert!(matches!(
            Reader::new(&b).strings("paths"),
            Err(DecodeError::Invalid(Invalid::TooLong { .. }))
        ));
        // A plausible count with no elements behind it is merely incomplete.
        let b = 1000u64.to_le_bytes();
        assert!(
            Reader::new(&b)
                .strings("paths")
                .unwrap_err()
                .is_incomplete()
        );
    }

    #[test]
    fn failed_string_read_does_not_consume() {
        let mut b = Vec::new();
        b.put_str("abc");
        let mut r = Reader::new(&b[..10]);
        assert!(r.bytes().is_err());
        assert_eq!(r.position(), 0);
    }

    proptest! {
        #[test]
        fn strings_round_trip(items in proptest::collection::vec(".{0,40}", 0..20)) {
            let mut b = Vec::new();
            b.put_strings(&items);
            prop_assert_eq!(b.len() % 8, 0);
            let (got, used) = decode_with(&b, |r| r.strings("items")).unwrap();
            prop_assert_eq!(used, b.len());
            prop_assert_eq!(got, items);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut r = Reader::new(&data);
            let _ = r.strings("x");
            let mut r = Reader::new(&data);
            let _ = r.bytes();
        }
    }
}
