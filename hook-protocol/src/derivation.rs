//! Derivations: the ATerm `.drv` format parsed into a [`Derivation`], and the
//! [`BasicDerivation`] wire encoding that serve cmd 8 and worker op 36 carry.
//! (Being completed: ATerm parser, decoder and tests.)

use std::collections::{BTreeMap, BTreeSet};

use crate::wire::WireWrite;

/// One output as the wire and the ATerm file carry it: `path` is empty for floating and
/// deferred outputs; `hash_algo`/`hash` are empty for input-addressed ones.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DerivationOutput {
    pub path: String,
    pub hash_algo: String,
    pub hash: String,
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

impl BasicDerivation {
    /// Appends the BasicDerivation wire form (PROTOCOL.md §7.1).
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
}
