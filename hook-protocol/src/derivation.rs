//! Derivations: the ATerm `.drv` format parsed into a [`Derivation`] and printed back exactly as
//! Nix writes it, and the [`BasicDerivation`] wire encoding that serve cmd 8 and worker op 36 carry
//! (docs/protocol.md §7.1), plus what the hook derives from a `.drv`: its output paths, the
//! BasicDerivation to send for a remote build (docs/protocol.md §3.4 step 4) and, for a resolved
//! content-addressed derivation, the ids of its realisations (§7.2).
//!
//! Pure functions over bytes: nothing here reads a `.drv` from disk, and no input, however
//! malformed, may make a parser panic. Strings in a `.drv` are raw bytes; only the fields whose
//! type is `String` (names, store paths, platform, hashes) must be UTF-8.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::realisation::DrvOutput;
use crate::store_path::{Sha256, StorePath, StorePathError};
use crate::wire::{self, DecodeError, Reader, WireWrite};

/// One output as the wire and the ATerm file carry it: `path` is empty for floating and
/// deferred outputs; `hash_algo`/`hash` are empty for input-addressed ones.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DerivationOutput {
    pub path: String,
    pub hash_algo: String,
    pub hash: String,
}

/// What kind of output a [`DerivationOutput`] triple describes (docs/protocol.md §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// Path known, no hash: the usual case.
    InputAddressed,
    /// Path and hash known in advance (fetchers).
    Fixed,
    /// Content-addressed with the path known only after the build.
    Floating,
    /// Input-addressed, but the path depends on a floating input and is not known yet.
    Deferred,
    /// An impure derivation's output (`hash` is `"impure"`).
    Impure,
}

impl DerivationOutput {
    pub fn kind(&self) -> OutputKind {
        match (
            self.path.is_empty(),
            self.hash_algo.is_empty(),
            self.hash.as_str(),
        ) {
            (_, false, "impure") => OutputKind::Impure,
            (true, false, "") => OutputKind::Floating,
            (_, false, _) => OutputKind::Fixed,
            (true, true, _) => OutputKind::Deferred,
            (false, true, _) => OutputKind::InputAddressed,
        }
    }
}

/// A derivation without its input derivations: what a remote needs to build it.
/// Strings that reach the builder are kept as raw bytes (a `.drv` may hold any bytes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BasicDerivation {
    /// Keyed by output name; sorted, as Nix writes them.
    pub outputs: BTreeMap<String, DerivationOutput>,
    pub input_srcs: BTreeSet<String>,
    pub platform: String,
    pub builder: Vec<u8>,
    pub args: Vec<Vec<u8>>,
    /// Sorted by key, as Nix writes them.
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A full `.drv`: the basic derivation plus its input derivations and their wanted outputs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    pub basic: BasicDerivation,
    pub input_drvs: BTreeMap<String, BTreeSet<String>>,
}

/// Problems with a derivation's contents or its path (not its syntax; see [`ParseError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DerivationError {
    #[error("output '{output}' of the derivation has a bad path: {source}")]
    BadOutputPath {
        output: String,
        source: StorePathError,
    },
    #[error("'{0}' is not a derivation path: its name does not end in '.drv'")]
    NotDrvPath(String),
}

impl BasicDerivation {
    /// Appends the BasicDerivation wire form (docs/protocol.md §7.1).
    pub fn encode(&self, w: &mut Vec<u8>) {
        w.put_u64(self.outputs.len() as u64);
        for (name, o) in &self.outputs {
            w.put_str(name);
            w.put_str(&o.path);
            w.put_str(&o.hash_algo);
            w.put_str(&o.hash);
        }
        w.put_strings(&self.input_srcs);
        w.put_str(&self.platform);
        w.put_bytes(&self.builder);
        w.put_strings(&self.args);
        w.put_u64(self.env.len() as u64);
        for (k, v) in &self.env {
            w.put_bytes(k);
            w.put_bytes(v);
        }
    }

    /// Decodes the wire form written by [`BasicDerivation::encode`] (what a remote
    /// `nix-store --serve` or `nix-daemon` reads). Order is not checked (Nix does not check it
    /// either), but a duplicate output name, input or environment key is invalid: it would be
    /// silently lost in the maps; so is an output path (when there is one) or input source that
    /// is not a store path, as Nix parses both.
    pub fn decode(r: &mut Reader<'_>) -> wire::Result<Self> {
        let outputs = r.list("derivation outputs", |r| {
            let name = r.string("output name")?;
            let path = r.string("output path")?;
            // A path is a store path, as Nix parses it; none (empty) is a floating output.
            if !path.is_empty() {
                wire_store_path(&path, "output path")?;
            }
            let hash_algo = r.string("output hash algorithm")?;
            let hash = r.string("output hash")?;
            Ok((
                name,
                DerivationOutput {
                    path,
                    hash_algo,
                    hash,
                },
            ))
        })?;
        let outputs = collect_unique(outputs, "output name", |k| k.clone())?;
        let input_srcs = r.strings("input sources")?;
        for p in &input_srcs {
            wire_store_path(p, "input source")?;
        }
        let input_srcs = collect_unique_set(input_srcs, "input source")?;
        let platform = r.string("platform")?;
        let builder = r.bytes()?.to_vec();
        let args = r.list("builder arguments", |r| Ok(r.bytes()?.to_vec()))?;
        let env = r.list("environment", |r| {
            let k = r.bytes()?.to_vec();
            let v = r.bytes()?.to_vec();
            Ok((k, v))
        })?;
        let env = collect_unique(env, "environment variable", |k| {
            String::from_utf8_lossy(k).into_owned()
        })?;
        Ok(BasicDerivation {
            outputs,
            input_srcs,
            platform,
            builder,
            args,
            env,
        })
    }

    /// The output paths by output name: `Some` where the path is known in advance (input-addressed
    /// and fixed outputs), `None` for floating, deferred and impure ones.
    pub fn output_paths(&self) -> Result<BTreeMap<String, Option<StorePath>>, DerivationError> {
        self.outputs
            .iter()
            .map(|(name, o)| {
                let path = if o.path.is_empty() {
                    None
                } else {
                    Some(StorePath::parse(&o.path).map_err(|source| {
                        DerivationError::BadOutputPath {
                            output: name.clone(),
                            source,
                        }
                    })?)
                };
                Ok((name.clone(), path))
            })
            .collect()
    }

    /// True if any output is fixed-output (Nix treats their failures as transient).
    pub fn is_fixed_output(&self) -> bool {
        self.outputs.values().any(|o| o.kind() == OutputKind::Fixed)
    }
}

/// `s` is a store path, or the wire form that carries it is Invalid.
fn wire_store_path(s: &str, what: &str) -> wire::Result<()> {
    StorePath::parse(s)
        .map(drop)
        .map_err(|e| DecodeError::malformed(format!("{what}: {e}")))
}

fn collect_unique<K: Ord, V>(
    items: Vec<(K, V)>,
    what: &str,
    show: impl Fn(&K) -> String,
) -> wire::Result<BTreeMap<K, V>> {
    let mut map = BTreeMap::new();
    for (k, v) in items {
        if map.contains_key(&k) {
            return Err(DecodeError::malformed(format!(
                "duplicate {what} '{}' in a derivation",
                show(&k)
            )));
        }
        map.insert(k, v);
    }
    Ok(map)
}

fn collect_unique_set(items: Vec<String>, what: &str) -> wire::Result<BTreeSet<String>> {
    let mut set = BTreeSet::new();
    for s in items {
        if set.contains(&s) {
            return Err(DecodeError::malformed(format!(
                "duplicate {what} '{s}' in a derivation"
            )));
        }
        set.insert(s);
    }
    Ok(set)
}

/// The derivation's name as Nix derives it from the `.drv` path: the base name without the hash
/// part and without `.drv` (`/nix/store/<hash>-hello-2.12.drv` → `hello-2.12`).
pub fn drv_name(drv_path: &StorePath) -> Result<&str, DerivationError> {
    drv_path
        .name()
        .strip_suffix(".drv")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| DerivationError::NotDrvPath(drv_path.to_string()))
}

impl Derivation {
    /// Parses a `.drv` file's bytes (the ATerm form `Derive([outputs],[inputDrvs],[inputSrcs],
    /// "platform","builder",[args],[env])`). The whole input must be the derivation: trailing
    /// bytes, even a newline, are an error.
    pub fn parse(bytes: &[u8]) -> Result<Self, ParseError> {
        let mut p = Parser { buf: bytes, pos: 0 };
        let d = p.derivation()?;
        if p.pos != bytes.len() {
            return Err(p.err(ParseErrorKind::Trailing));
        }
        Ok(d)
    }

    /// The ATerm form exactly as Nix writes it to the store (no trailing newline).
    pub fn to_aterm(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.aterm_size_hint());
        self.write_aterm(&mut out);
        out
    }

    /// Appends the ATerm form to `out`.
    pub fn write_aterm(&self, out: &mut Vec<u8>) {
        let b = &self.basic;
        out.extend_from_slice(b"Derive([");
        for (i, (name, o)) in b.outputs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'(');
            put_string(out, name.as_bytes());
            out.push(b',');
            put_string(out, o.path.as_bytes());
            out.push(b',');
            put_string(out, o.hash_algo.as_bytes());
            out.push(b',');
            put_string(out, o.hash.as_bytes());
            out.push(b')');
        }
        out.extend_from_slice(b"],[");
        for (i, (path, wanted)) in self.input_drvs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'(');
            put_string(out, path.as_bytes());
            out.push(b',');
            put_string_list(out, wanted.iter().map(|s| s.as_bytes()));
            out.push(b')');
        }
        out.extend_from_slice(b"],");
        put_string_list(out, b.input_srcs.iter().map(|s| s.as_bytes()));
        out.push(b',');
        put_string(out, b.platform.as_bytes());
        out.push(b',');
        put_string(out, &b.builder);
        out.push(b',');
        put_string_list(out, b.args.iter().map(|a| a.as_slice()));
        out.extend_from_slice(b",[");
        for (i, (k, v)) in b.env.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'(');
            put_string(out, k);
            out.push(b',');
            put_string(out, v);
            out.push(b')');
        }
        out.extend_from_slice(b"])");
    }

    fn aterm_size_hint(&self) -> usize {
        let b = &self.basic;
        64 + b
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>()
            + b.args.iter().map(|a| a.len() + 3).sum::<usize>()
            + b.input_srcs.iter().map(|s| s.len() + 3).sum::<usize>()
            + self.input_drvs.keys().map(|s| s.len() + 16).sum::<usize>()
            + b.outputs
                .values()
                .map(|o| o.path.len() + o.hash.len() + 24)
                .sum::<usize>()
    }

    /// The output paths by output name (see [`BasicDerivation::output_paths`]).
    pub fn output_paths(&self) -> Result<BTreeMap<String, Option<StorePath>>, DerivationError> {
        self.basic.output_paths()
    }

    /// True if every output is floating content-addressed (a `__contentAddressed` derivation):
    /// its output paths are known only once it is built, and each build yields a realisation.
    pub fn is_floating_ca(&self) -> bool {
        !self.basic.outputs.is_empty()
            && self
                .basic
                .outputs
                .values()
                .all(|o| o.kind() == OutputKind::Floating)
    }

    /// The ids under which Nix records the realisations of this derivation's outputs
    /// (`sha256:<hex>!<output>`), where Nix computes them from this `.drv` alone: every output
    /// floating content-addressed and no input derivations. That is a *resolved* derivation,
    /// which is what the daemon hands a build hook for a content-addressed one (its inputs
    /// already realised; docs/protocol.md §3.4), and the remote reports its realisations under
    /// the same ids. The hash is Nix's hash modulo for that case: SHA-256 of the ATerm with each
    /// output's environment variable blanked (their paths are empty already). `None` for any
    /// other derivation: input derivations would need their own hashes first.
    pub fn floating_output_ids(&self) -> Option<BTreeMap<String, DrvOutput>> {
        if !self.input_drvs.is_empty() || !self.is_floating_ca() {
            return None;
        }
        let mut masked = self.clone();
        for name in self.basic.outputs.keys() {
            if let Some(v) = masked.basic.env.get_mut(name.as_bytes()) {
                v.clear();
            }
        }
        let digest = Sha256::digest(&masked.to_aterm());
        self.basic
            .outputs
            .keys()
            .map(|name| Some((name.clone(), DrvOutput::from_sha256(&digest.0, name).ok()?)))
            .collect()
    }

    /// The BasicDerivation a hook sends for a remote build (docs/protocol.md §3.4 step 4): if the
    /// derivation has any input derivations, its `inputSrcs` are replaced by the full input
    /// closure the daemon sent after `# accept` (so the remote sees every path the build may
    /// use); otherwise they are kept as they are (changing them would break content-addressed
    /// derivations).
    pub fn basic_for_remote<I, S>(&self, input_closure: I) -> BasicDerivation
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut basic = self.basic.clone();
        if !self.input_drvs.is_empty() {
            basic.input_srcs = input_closure
                .into_iter()
                .map(|p| p.as_ref().to_owned())
                .collect();
        }
        basic
    }
}

/// Appends `s` as an ATerm string: quoted, with exactly the escapes Nix's printer uses.
fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    let mut start = 0;
    for (i, &c) in s.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}

fn put_string_list<'a>(out: &mut Vec<u8>, items: impl Iterator<Item = &'a [u8]>) {
    out.push(b'[');
    for (i, s) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        put_string(out, s);
    }
    out.push(b']');
}

/// Why bytes are not a `.drv`: what was wrong and the byte offset where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid derivation at byte {offset}: {kind}")]
pub struct ParseError {
    pub offset: usize,
    pub kind: ParseErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("expected {expected}, found {found}")]
    Expected {
        expected: &'static str,
        found: Found,
    },
    #[error("unknown escape sequence '\\{}' in a string", Found::Byte(*.0))]
    BadEscape(u8),
    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{what} is not a store path: {source}")]
    BadStorePath {
        what: &'static str,
        source: StorePathError,
    },
    #[error("duplicate {what} '{key}'")]
    Duplicate { what: &'static str, key: String },
    #[error("unexpected data after the end of the derivation")]
    Trailing,
}

/// What the parser saw where it expected something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    End,
    Byte(u8),
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Found::End => f.write_str("the end of the input"),
            Found::Byte(b) if b.is_ascii_graphic() || b == b' ' => write!(f, "'{}'", b as char),
            Found::Byte(b) => write!(f, "byte 0x{b:02x}"),
        }
    }
}

struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, kind: ParseErrorKind) -> ParseError {
        ParseError {
            offset: self.pos,
            kind,
        }
    }

    fn err_at(&self, offset: usize, kind: ParseErrorKind) -> ParseError {
        ParseError { offset, kind }
    }

    /// A second `what` named `key`, the item starting at `start`.
    fn duplicate(&self, start: usize, what: &'static str, key: String) -> ParseError {
        self.err_at(start, ParseErrorKind::Duplicate { what, key })
    }

    fn found(&self) -> Found {
        self.buf
            .get(self.pos)
            .map_or(Found::End, |&b| Found::Byte(b))
    }

    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// Consumes `lit` or fails naming `expected`.
    fn expect(&mut self, lit: &[u8], expected: &'static str) -> Result<(), ParseError> {
        for (i, &want) in lit.iter().enumerate() {
            if self.buf.get(self.pos + i) != Some(&want) {
                self.pos += i;
                let found = self.found();
                return Err(self.err(ParseErrorKind::Expected { expected, found }));
            }
        }
        self.pos += lit.len();
        Ok(())
    }

    /// `[item,item,...]`, calling `item` for each element.
    fn list(
        &mut self,
        what: &'static str,
        mut item: impl FnMut(&mut Self) -> Result<(), ParseError>,
    ) -> Result<(), ParseError> {
        self.expect(b"[", what)?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => {
                    let found = self.found();
                    return Err(self.err(ParseErrorKind::Expected {
                        expected: "',' or ']'",
                        found,
                    }));
                }
            }
        }
    }

    /// A quoted string with Nix's escapes, as raw bytes.
    fn bytes(&mut self) -> Result<Vec<u8>, ParseError> {
        self.expect(b"\"", "'\"' (a string)")?;
        let mut out = Vec::new();
        loop {
            let rest = &self.buf[self.pos..];
            let Some(i) = rest.iter().position(|&b| b == b'"' || b == b'\\') else {
                self.pos = self.buf.len();
                return Err(self.err(ParseErrorKind::Expected {
                    expected: "'\"' (the end of the string)",
                    found: Found::End,
                }));
            };
            out.extend_from_slice(&rest[..i]);
            self.pos += i;
            if rest[i] == b'"' {
                self.pos += 1;
                return Ok(out);
            }
            // A backslash: exactly the escapes Nix's printer writes.
            let c = match self.buf.get(self.pos + 1) {
                Some(b'"') => b'"',
                Some(b'\\') => b'\\',
                Some(b'n') => b'\n',
                Some(b'r') => b'\r',
                Some(b't') => b'\t',
                Some(&other) => return Err(self.err(ParseErrorKind::BadEscape(other))),
                None => {
                    self.pos += 1;
                    return Err(self.err(ParseErrorKind::Expected {
                        expected: "an escaped character",
                        found: Found::End,
                    }));
                }
            };
            out.push(c);
            self.pos += 2;
        }
    }

    /// A string that must be UTF-8.
    fn string(&mut self, what: &'static str) -> Result<String, ParseError> {
        let start = self.pos;
        let b = self.bytes()?;
        String::from_utf8(b).map_err(|_| self.err_at(start, ParseErrorKind::NotUtf8 { what }))
    }

    /// A string that must be a store path.
    fn store_path(&mut self, what: &'static str) -> Result<String, ParseError> {
        let start = self.pos;
        let s = self.string(what)?;
        StorePath::parse(&s)
            .map_err(|source| self.err_at(start, ParseErrorKind::BadStorePath { what, source }))?;
        Ok(s)
    }

    fn derivation(&mut self) -> Result<Derivation, ParseError> {
        self.expect(b"Derive(", "'Derive('")?;

        let mut outputs = BTreeMap::new();
        self.list("'[' (the outputs)", |p| {
            p.expect(b"(", "'(' (an output)")?;
            let start = p.pos;
            let name = p.string("an output name")?;
            p.expect(b",", "','")?;
            let path_start = p.pos;
            let path = p.string("an output path")?;
            if !path.is_empty() {
                StorePath::parse(&path).map_err(|source| {
                    p.err_at(
                        path_start,
                        ParseErrorKind::BadStorePath {
                            what: "an output path",
                            source,
                        },
                    )
                })?;
            }
            p.expect(b",", "','")?;
            let hash_algo = p.string("an output hash algorithm")?;
            p.expect(b",", "','")?;
            let hash = p.string("an output hash")?;
            p.expect(b")", "')'")?;
            if outputs.contains_key(&name) {
                return Err(p.duplicate(start, "output", name));
            }
            outputs.insert(
                name,
                DerivationOutput {
                    path,
                    hash_algo,
                    hash,
                },
            );
            Ok(())
        })?;
        self.expect(b",", "','")?;

        let mut input_drvs = BTreeMap::new();
        self.list("'[' (the input derivations)", |p| {
            p.expect(b"(", "'(' (an input derivation)")?;
            let start = p.pos;
            let path = p.store_path("an input derivation")?;
            p.expect(b",", "','")?;
            let mut wanted = BTreeSet::new();
            p.list("'[' (the wanted outputs)", |p| {
                let start = p.pos;
                let name = p.string("an output name")?;
                if !wanted.insert(name.clone()) {
                    return Err(p.duplicate(start, "wanted output", name));
                }
                Ok(())
            })?;
            p.expect(b")", "')'")?;
            if input_drvs.contains_key(&path) {
                return Err(p.duplicate(start, "input derivation", path));
            }
            input_drvs.insert(path, wanted);
            Ok(())
        })?;
        self.expect(b",", "','")?;

        let mut input_srcs = BTreeSet::new();
        self.list("'[' (the input sources)", |p| {
            let start = p.pos;
            let path = p.store_path("an input source")?;
            if input_srcs.contains(&path) {
                return Err(p.duplicate(start, "input source", path));
            }
            input_srcs.insert(path);
            Ok(())
        })?;
        self.expect(b",", "','")?;

        let platform = self.string("the platform")?;
        self.expect(b",", "','")?;
        let builder = self.bytes()?;
        self.expect(b",", "','")?;

        let mut args = Vec::new();
        self.list("'[' (the builder arguments)", |p| {
            args.push(p.bytes()?);
            Ok(())
        })?;
        self.expect(b",", "','")?;

        let mut env = BTreeMap::new();
        self.list("'[' (the environment)", |p| {
            p.expect(b"(", "'(' (an environment variable)")?;
            let start = p.pos;
            let k = p.bytes()?;
            p.expect(b",", "','")?;
            let v = p.bytes()?;
            p.expect(b")", "')'")?;
            if env.contains_key(&k) {
                return Err(p.duplicate(
                    start,
                    "environment variable",
                    String::from_utf8_lossy(&k).into_owned(),
                ));
            }
            env.insert(k, v);
            Ok(())
        })?;
        self.expect(b")", "')' (the end of the derivation)")?;

        Ok(Derivation {
            basic: BasicDerivation {
                outputs,
                input_srcs,
                platform,
                builder,
                args,
                env,
            },
            input_drvs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::decode_with;
    use proptest::prelude::*;

    const P1: &str = "/nix/store/00000000000000000000000000000000-a";
    const P2: &str = "/nix/store/11111111111111111111111111111111-b.drv";

    fn sample() -> Derivation {
        let mut d = Derivation::default();
        d.basic.outputs.insert(
            "out".into(),
            DerivationOutput {
                path: P1.into(),
                ..Default::default()
            },
        );
        d.basic.input_srcs.insert(P1.into());
        d.input_drvs
            .insert(P2.into(), ["dev".to_owned(), "out".to_owned()].into());
        d.basic.platform = "x86_64-linux".into();
        d.basic.builder = b"/bin/sh".to_vec();
        d.basic.args = vec![b"-c".to_vec(), b"a\"b\\c\nd\re\tf".to_vec()];
        d.basic.env.insert(b"k".to_vec(), b"v\xff".to_vec());
        d
    }

    #[test]
    fn prints_exactly_like_nix() {
        let got = sample().to_aterm();
        let want = format!(
            "Derive([(\"out\",\"{P1}\",\"\",\"\")],[(\"{P2}\",[\"dev\",\"out\"])],[\"{P1}\"],\
             \"x86_64-linux\",\"/bin/sh\",[\"-c\",\"a\\\"b\\\\c\\nd\\re\\tf\"],[(\"k\",\"v"
        );
        let mut want = want.into_bytes();
        want.extend_from_slice(b"\xff\")])");
        assert_eq!(got, want, "{}", String::from_utf8_lossy(&got));
        assert_eq!(Derivation::parse(&got).unwrap(), sample());
    }

    #[test]
    fn empty_lists_round_trip() {
        let d = Derivation::default();
        let t = d.to_aterm();
        assert_eq!(t, b"Derive([],[],[],\"\",\"\",[],[])");
        assert_eq!(Derivation::parse(&t).unwrap(), d);
    }

    fn parse_err(s: &[u8]) -> ParseError {
        Derivation::parse(s).unwrap_err()
    }

    #[test]
    fn errors_name_what_and_where() {
        let e = parse_err(b"Derivx");
        assert_eq!(e.offset, 5);
        assert_eq!(
            e.to_string(),
            "invalid derivation at byte 5: expected 'Derive(', found 'x'"
        );

        let mut t = sample().to_aterm();
        t.push(b'\n');
        let e = parse_err(&t);
        assert_eq!(e.offset, t.len() - 1);
        assert_eq!(e.kind, ParseErrorKind::Trailing);

        let e = parse_err(b"Derive([(\"out\"");
        assert_eq!(e.offset, 14);
        assert!(
            e.to_string()
                .contains("expected ',', found the end of the input"),
            "{e}"
        );

        let e = parse_err(b"Derive([],[],[],\"x\\q\"");
        assert_eq!(e.kind, ParseErrorKind::BadEscape(b'q'));
        assert_eq!(e.offset, 18);

        let e = parse_err(b"Derive([],[],[\"/nix/store/short\"]");
        assert_eq!(e.offset, 14);
        assert!(matches!(
            e.kind,
            ParseErrorKind::BadStorePath {
                what: "an input source",
                ..
            }
        ));

        let e = parse_err(b"Derive([],[],[],\"\xff\"");
        assert_eq!(
            e.kind,
            ParseErrorKind::NotUtf8 {
                what: "the platform"
            }
        );

        let e = parse_err(b"Derive([],[],[],\"\",\"\",[],[(\"a\",\"1\"),(\"a\",\"2\")])");
        assert!(matches!(
            e.kind,
            ParseErrorKind::Duplicate {
                what: "environment variable",
                ..
            }
        ));

        let e = parse_err(b"Derive([],[],[],\"\",\"\",[\"a\" \"b\"],[])");
        assert_eq!(
            e.to_string(),
            "invalid derivation at byte 26: expected ',' or ']', found ' '"
        );

        let e = parse_err(b"Derive([],[],[],\"unterminated");
        assert_eq!(e.offset, 29);
    }

    #[test]
    fn output_kinds_and_paths() {
        let o = |path: &str, algo: &str, hash: &str| DerivationOutput {
            path: path.into(),
            hash_algo: algo.into(),
            hash: hash.into(),
        };
        assert_eq!(o(P1, "", "").kind(), OutputKind::InputAddressed);
        assert_eq!(o(P1, "r:sha256", "ab").kind(), OutputKind::Fixed);
        assert_eq!(o("", "r:sha256", "").kind(), OutputKind::Floating);
        assert_eq!(o("", "", "").kind(), OutputKind::Deferred);
        assert_eq!(o("", "r:sha256", "impure").kind(), OutputKind::Impure);

        let mut b = BasicDerivation::default();
        b.outputs.insert("out".into(), o(P1, "", ""));
        b.outputs.insert("dev".into(), o("", "", ""));
        let paths = b.output_paths().unwrap();
        assert_eq!(paths["out"].as_ref().map(|p| p.as_str()), Some(P1));
        assert_eq!(paths["dev"], None);
        assert!(!b.is_fixed_output());
        b.outputs.insert("bad".into(), o("/nope", "", ""));
        assert!(matches!(
            b.output_paths(),
            Err(DerivationError::BadOutputPath { ref output, .. }) if output == "bad"
        ));
    }

    #[test]
    fn basic_for_remote_replaces_srcs_only_with_input_drvs() {
        let closure = [P1, "/nix/store/22222222222222222222222222222222-c"];
        let d = sample();
        let b = d.basic_for_remote(closure);
        assert_eq!(
            b.input_srcs,
            closure
                .iter()
                .map(|s| s.to_string())
                .collect::<BTreeSet<_>>()
        );
        assert_eq!(b.env, d.basic.env);

        let mut no_inputs = sample();
        no_inputs.input_drvs.clear();
        let b = no_inputs.basic_for_remote(closure);
        assert_eq!(b, no_inputs.basic);
    }

    /// A floating CA derivation without inputs, as Nix 2.34 wrote it (tests/data/ca): its
    /// realisation id is the one the local daemon recorded for it.
    #[test]
    fn floating_output_ids_are_nix_hash_modulo() {
        let aterm = br#"Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",["-c","echo building caA ssh-ng; echo caA ssh-ng > $out"],[("builder","/bin/sh"),("name","capture-caA-ssh-ng"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])"#;
        let d = Derivation::parse(aterm).unwrap();
        assert!(d.is_floating_ca());
        assert_eq!(d.output_paths().unwrap()["out"], None);
        let ids = d.floating_output_ids().unwrap();
        assert_eq!(
            ids["out"].to_string(),
            "sha256:201d8ebb3454c4b324778df90d8b1455972cb396971630ef1c9f575363d4e5f9!out"
        );
        // With an input derivation the hash needs the input's: not computed.
        let mut unresolved = d.clone();
        unresolved
            .input_drvs
            .insert(P2.into(), ["out".to_owned()].into());
        assert_eq!(unresolved.floating_output_ids(), None);
        // Input-addressed outputs are not realised this way.
        assert_eq!(sample().floating_output_ids(), None);
        assert!(!sample().is_floating_ca());
        assert!(!Derivation::default().is_floating_ca());
    }

    #[test]
    fn drv_names() {
        let p = StorePath::parse(P2).unwrap();
        assert_eq!(drv_name(&p).unwrap(), "b");
        let p = StorePath::parse(P1).unwrap();
        assert!(drv_name(&p).is_err());
        let p = StorePath::parse("/nix/store/11111111111111111111111111111111-.drv");
        assert!(p.is_err());
    }

    #[test]
    fn wire_decode_rejects_duplicates() {
        let mut w = Vec::new();
        w.put_u64(0);
        w.put_strings([P1, P1]);
        assert!(matches!(
            decode_with(&w, BasicDerivation::decode),
            Err(DecodeError::Invalid(_))
        ));
    }

    fn store_path() -> impl Strategy<Value = String> {
        (
            "[0-9a-df-np-sv-z]{32}",
            "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,20}",
        )
            .prop_map(|(h, n)| format!("/nix/store/{h}-{n}"))
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop_oneof![
                any::<u8>(),
                Just(b'"'),
                Just(b'\\'),
                Just(b'\n'),
                Just(b'\t'),
                Just(b'\r')
            ],
            0..24,
        )
    }

    fn output() -> impl Strategy<Value = DerivationOutput> {
        (
            prop_oneof![Just(String::new()), store_path()],
            "[a-z0-9:\"\\\\\n]{0,10}",
            ".{0,12}",
        )
            .prop_map(|(path, hash_algo, hash)| DerivationOutput {
                path,
                hash_algo,
                hash,
            })
    }

    fn basic() -> impl Strategy<Value = BasicDerivation> {
        (
            prop::collection::btree_map(".{0,8}", output(), 0..4),
            prop::collection::btree_set(store_path(), 0..4),
            ".{0,16}",
            bytes(),
            prop::collection::vec(bytes(), 0..5),
            prop::collection::btree_map(bytes(), bytes(), 0..6),
        )
            .prop_map(|(outputs, input_srcs, platform, builder, args, env)| {
                BasicDerivation {
                    outputs,
                    input_srcs,
                    platform,
                    builder,
                    args,
                    env,
                }
            })
    }

    fn derivation() -> impl Strategy<Value = Derivation> {
        (
            basic(),
            prop::collection::btree_map(
                store_path(),
                prop::collection::btree_set(".{0,6}", 0..3),
                0..3,
            ),
        )
            .prop_map(|(basic, input_drvs)| Derivation { basic, input_drvs })
    }

    proptest! {
        #[test]
        fn aterm_round_trips(d in derivation()) {
            let t = d.to_aterm();
            prop_assert_eq!(Derivation::parse(&t).unwrap(), d);
        }

        #[test]
        fn wire_round_trips(b in basic()) {
            let mut w = Vec::new();
            b.encode(&mut w);
            let (got, used) = decode_with(&w, BasicDerivation::decode).unwrap();
            prop_assert_eq!(used, w.len());
            prop_assert_eq!(got, b);
            for cut in 0..w.len() {
                let e = decode_with(&w[..cut], BasicDerivation::decode).unwrap_err();
                prop_assert!(e.is_incomplete(), "cut {}: {:?}", cut, e);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = Derivation::parse(&data);
            let mut with_prefix = b"Derive(".to_vec();
            with_prefix.extend_from_slice(&data);
            let _ = Derivation::parse(&with_prefix);
            let _ = decode_with(&data, BasicDerivation::decode);
        }

        #[test]
        fn damaged_derivations_error_without_panicking(
            d in derivation(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let t = d.to_aterm();
            let cut = cut.index(t.len());
            let e = Derivation::parse(&t[..cut]).unwrap_err();
            prop_assert!(e.offset <= cut, "{} > {}", e.offset, cut);
            let mut m = t.clone();
            let i = flip.index(m.len());
            m[i] = byte;
            if let Ok(got) = Derivation::parse(&m) {
                // Whatever parses must survive a print/parse cycle unchanged.
                prop_assert_eq!(Derivation::parse(&got.to_aterm()).unwrap(), got);
            }
        }
    }
}
