//! Realisations of content-addressed derivations (docs/protocol.md §10): [`DrvOutput`], the id
//! `<algorithm>:<hex>!<output>` naming one output of one derivation by the derivation's hash
//! modulo, and [`Realisation`], the record that such an output was realised at a store path, in
//! the JSON form every Nix from 2.4 to 2.34 puts on the wire (BuildResult built outputs, worker
//! ops 42 and 43).
//!
//! Owns parsing and printing both forms, exactly as Nix prints them, with every field validated:
//! a bad id or JSON is a [`RealisationError`] with a message that says what was wrong, never a
//! panic. Must never perform I/O, decide whether a realisation should be trusted (signatures
//! are carried, not checked), or know which protocol or version carries realisations.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::store_path::{StorePath, is_name_char, nix32_decode};

/// Why an id or a realisation is not what Nix writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RealisationError {
    #[error("'{id}' is not a derivation output id (<algorithm>:<hash>!<output>): {reason}")]
    BadId { id: String, reason: String },
    #[error("bad realisation{context}: {reason}")]
    BadRealisation {
        /// ` for '<id>'` when the id is known, else empty.
        context: String,
        reason: String,
    },
}

/// The hash algorithms Nix names in a hash's `<algorithm>:` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HashAlgorithm {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Md5 => "md5",
            HashAlgorithm::Sha1 => "sha1",
            HashAlgorithm::Sha256 => "sha256",
            HashAlgorithm::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlgorithm::Md5 => 16,
            HashAlgorithm::Sha1 => 20,
            HashAlgorithm::Sha256 => 32,
            HashAlgorithm::Sha512 => 64,
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "md5" => HashAlgorithm::Md5,
            "sha1" => HashAlgorithm::Sha1,
            "sha256" => HashAlgorithm::Sha256,
            "sha512" => HashAlgorithm::Sha512,
            _ => return None,
        })
    }
}

/// One output of one derivation, named by the derivation's hash modulo (Nix's `DrvOutput`):
/// printed `<algorithm>:<lowercase hex>!<output name>`, e.g. `sha256:6a9a…817c!out`. Every value
/// of this type is valid: the digest has the algorithm's length and the output name is non-empty
/// and made of store-path name characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DrvOutput {
    algorithm: HashAlgorithm,
    hex: String,
    output_name: String,
}

impl DrvOutput {
    /// `digest_hex` is base16 (either case; kept lowercase).
    pub fn new(
        algorithm: HashAlgorithm,
        digest_hex: &str,
        output_name: &str,
    ) -> Result<Self, RealisationError> {
        let shown = || format!("{}:{digest_hex}!{output_name}", algorithm.name());
        let bad = |reason: String| RealisationError::BadId {
            id: shown(),
            reason,
        };
        let want = algorithm.digest_len() * 2;
        if digest_hex.len() != want || !digest_hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "a {} hash in base16 has {want} hex digits",
                algorithm.name()
            )));
        }
        check_output_name(output_name).map_err(bad)?;
        Ok(DrvOutput {
            algorithm,
            hex: digest_hex.to_ascii_lowercase(),
            output_name: output_name.to_owned(),
        })
    }

    /// The id of `output_name` for a derivation whose SHA-256 hash modulo is `digest`.
    pub fn from_sha256(digest: &[u8; 32], output_name: &str) -> Result<Self, RealisationError> {
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        DrvOutput::new(HashAlgorithm::Sha256, &hex, output_name)
    }

    /// Parses the printed form. Like Nix, the output name is everything after the first `!`;
    /// the hash may be base16 (what every Nix prints) or nix32 (which Nix also accepts).
    pub fn parse(s: &str) -> Result<Self, RealisationError> {
        let bad = |reason: &str| RealisationError::BadId {
            id: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (hash, output_name) = s.split_once('!').ok_or_else(|| bad("no '!<output>'"))?;
        let (algo, digest) = hash
            .split_once(':')
            .ok_or_else(|| bad("the hash has no '<algorithm>:' prefix"))?;
        let algorithm =
            HashAlgorithm::from_name(algo).ok_or_else(|| bad("unknown hash algorithm"))?;
        let len = algorithm.digest_len();
        if digest.len() == len * 2 {
            return DrvOutput::new(algorithm, digest, output_name).map_err(|e| match e {
                RealisationError::BadId { reason, .. } => bad(&reason),
                other => other,
            });
        }
        match nix32_decode(digest, len) {
            Some(bytes) => {
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                DrvOutput::new(algorithm, &hex, output_name).map_err(|e| match e {
                    RealisationError::BadId { reason, .. } => bad(&reason),
                    other => other,
                })
            }
            None => Err(bad(&format!(
                "the {} hash is neither base16 ({} digits) nor nix32",
                algorithm.name(),
                len * 2
            ))),
        }
    }

    pub fn algorithm(&self) -> HashAlgorithm {
        self.algorithm
    }

    /// The digest in lowercase base16.
    pub fn hash_hex(&self) -> &str {
        &self.hex
    }

    pub fn output_name(&self) -> &str {
        &self.output_name
    }

    /// The placeholder id Nix ≥ 2.35 servers write into the realisation-JSON layout (an all-zero
    /// SHA-256: they no longer know the hash), for `output_name`.
    pub fn dummy(output_name: &str) -> Result<Self, RealisationError> {
        DrvOutput::from_sha256(&[0; 32], output_name)
    }

    /// True for [`DrvOutput::dummy`]'s ids: no derivation has that hash.
    pub fn is_dummy(&self) -> bool {
        self.algorithm == HashAlgorithm::Sha256 && self.hex.bytes().all(|c| c == b'0')
    }
}

impl fmt::Display for DrvOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}!{}",
            self.algorithm.name(),
            self.hex,
            self.output_name
        )
    }
}

impl std::str::FromStr for DrvOutput {
    type Err = RealisationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DrvOutput::parse(s)
    }
}

/// An output name as the ids and derivations carry it.
pub(crate) fn check_output_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the output name is empty".into());
    }
    if !name.bytes().all(is_name_char) {
        return Err(format!(
            "the output name '{name}' has characters a store path name cannot have"
        ));
    }
    Ok(())
}

/// The record that `id` was realised at `out_path` (Nix's `Realisation`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Realisation {
    pub id: DrvOutput,
    pub out_path: StorePath,
    /// `<key name>:<base64 signature>` over the realisation's fingerprint; carried, never checked
    /// here.
    pub signatures: BTreeSet<String>,
    /// The realisations this one depends on (id → path), as Nix up to 2.33 reads and writes
    /// them; Nix 2.34 always writes `{}` and ignores what it reads. Kept so that a realisation
    /// passes through unchanged (on those versions its signatures cover this field).
    pub dependent_realisations: BTreeMap<DrvOutput, StorePath>,
}

/// The JSON object as Nix writes it: the fields in this order are the keys sorted, which is how
/// Nix's JSON library prints them.
#[derive(Serialize)]
struct JsonOut<'a> {
    #[serde(rename = "dependentRealisations")]
    dependent_realisations: BTreeMap<String, &'a str>,
    id: String,
    #[serde(rename = "outPath")]
    out_path: &'a str,
    signatures: &'a BTreeSet<String>,
}

/// The JSON object as Nix reads it: `id` and `outPath` required, `signatures` and
/// `dependentRealisations` optional (null counts as absent), other keys ignored.
#[derive(Deserialize)]
struct JsonIn {
    id: String,
    #[serde(rename = "outPath")]
    out_path: String,
    #[serde(default)]
    signatures: Option<Vec<String>>,
    #[serde(default, rename = "dependentRealisations")]
    dependent_realisations: Option<BTreeMap<String, String>>,
}

impl Realisation {
    /// Parses Nix's realisation JSON. `outPath` (and each dependent realisation's path) is a
    /// store path's base name, as every Nix writes it; `store_dir` (normally `/nix/store`)
    /// completes it.
    pub fn from_json(json: &str, store_dir: &str) -> Result<Self, RealisationError> {
        let raw: JsonIn =
            serde_json::from_str(json).map_err(|e| RealisationError::BadRealisation {
                context: String::new(),
                reason: format!("not a realisation JSON object: {e}"),
            })?;
        let bad = |reason: String| RealisationError::BadRealisation {
            context: format!(" for '{}'", raw.id),
            reason,
        };
        let id = DrvOutput::parse(&raw.id).map_err(|e| bad(e.to_string()))?;
        let out_path = path_from_base_name(store_dir, &raw.out_path)
            .map_err(|e| bad(format!("outPath: {e}")))?;
        let mut dependent_realisations = BTreeMap::new();
        for (dep, path) in raw.dependent_realisations.unwrap_or_default() {
            let dep_id = DrvOutput::parse(&dep).map_err(|e| bad(e.to_string()))?;
            let path = path_from_base_name(store_dir, &path)
                .map_err(|e| bad(format!("dependent realisation '{dep}': {e}")))?;
            dependent_realisations.insert(dep_id, path);
        }
        Ok(Realisation {
            id,
            out_path,
            signatures: raw.signatures.unwrap_or_default().into_iter().collect(),
            dependent_realisations,
        })
    }

    /// The JSON byte for byte as Nix prints it: keys sorted, no spaces, paths as base names,
    /// e.g. `{"dependentRealisations":{},"id":"sha256:…!out","outPath":"<hash>-<name>",
    /// "signatures":[]}`.
    pub fn to_json(&self) -> String {
        let out = JsonOut {
            dependent_realisations: self
                .dependent_realisations
                .iter()
                .map(|(k, v)| (k.to_string(), v.base_name()))
                .collect(),
            id: self.id.to_string(),
            out_path: self.out_path.base_name(),
            signatures: &self.signatures,
        };
        // Serialising strings, maps and sets of strings cannot fail.
        serde_json::to_string(&out).unwrap_or_default()
    }
}

/// `<store_dir>/<base>`, where `base` must be a store path's base name (no `/`).
pub(crate) fn path_from_base_name(store_dir: &str, base: &str) -> Result<StorePath, String> {
    if base.contains('/') {
        return Err(format!(
            "'{base}' is not a store path base name (<hash>-<name>)"
        ));
    }
    StorePath::parse(&format!("{}/{base}", store_dir.trim_end_matches('/')))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::path_info::tests::arb_path;
    use proptest::prelude::*;

    const HEX: &str = "6a9a04274261feb920e9f073c4210bad20eb4ba8201d73556e604ff6c8dc817c";

    pub(crate) fn arb_drv_output() -> impl Strategy<Value = DrvOutput> {
        (
            proptest::sample::select(vec![
                HashAlgorithm::Md5,
                HashAlgorithm::Sha1,
                HashAlgorithm::Sha256,
                HashAlgorithm::Sha512,
            ]),
            proptest::collection::vec(any::<u8>(), 64),
            "[a-zA-Z0-9+._?=-]{1,12}",
        )
            .prop_map(|(algo, bytes, name)| {
                let hex: String = bytes[..algo.digest_len()]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                DrvOutput::new(algo, &hex, &name).expect("a valid id")
            })
    }

    pub(crate) fn arb_realisation() -> impl Strategy<Value = Realisation> {
        (
            arb_drv_output(),
            arb_path(),
            proptest::collection::btree_set("[a-z.-]{1,8}:[A-Za-z0-9+/=]{4,20}", 0..3),
            proptest::collection::btree_map(arb_drv_output(), arb_path(), 0..3),
        )
            .prop_map(
                |(id, out_path, signatures, dependent_realisations)| Realisation {
                    id,
                    out_path,
                    signatures,
                    dependent_realisations,
                },
            )
    }

    #[test]
    fn ids_print_and_parse_like_nix() {
        let s = format!("sha256:{HEX}!out");
        let id = DrvOutput::parse(&s).unwrap();
        assert_eq!(id.algorithm(), HashAlgorithm::Sha256);
        assert_eq!(id.hash_hex(), HEX);
        assert_eq!(id.output_name(), "out");
        assert_eq!(id.to_string(), s);
        // Upper-case hex and nix32 are accepted and printed as Nix prints them.
        let upper = format!("sha256:{}!out", HEX.to_ascii_uppercase());
        assert_eq!(DrvOutput::parse(&upper).unwrap(), id);
        let bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&HEX[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let nix32 = crate::store_path::nix32_encode(&bytes);
        assert_eq!(
            DrvOutput::parse(&format!("sha256:{nix32}!out")).unwrap(),
            id
        );
        assert!(!id.is_dummy());
        assert!(DrvOutput::dummy("dev").unwrap().is_dummy());
        assert_eq!(
            DrvOutput::dummy("dev").unwrap().to_string(),
            format!("sha256:{}!dev", "0".repeat(64))
        );
    }

    #[test]
    fn bad_ids_say_what_is_wrong() {
        for (s, why) in [
            (format!("sha256:{HEX}"), "no '!<output>'"),
            (format!("{HEX}!out"), "no '<algorithm>:' prefix"),
            (format!("sha257:{HEX}!out"), "unknown hash algorithm"),
            (format!("sha256:{}!out", &HEX[1..]), "neither base16"),
            (format!("sha256:{}x!out", &HEX[1..]), "64 hex digits"),
            (format!("sha256:{HEX}!"), "the output name is empty"),
            (format!("sha256:{HEX}!o/ut"), "characters a store path name"),
            (format!("sha256:{HEX}!a!b"), "characters a store path name"),
        ] {
            let e = DrvOutput::parse(&s).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(&s), "{s}: {e}");
        }
    }

    #[test]
    fn realisation_json_is_nix_byte_for_byte() {
        // As a Nix 2.34 remote sent it (tests/data/ca), and as Nix 2.8 writes it too.
        let json = format!(
            r#"{{"dependentRealisations":{{}},"id":"sha256:{HEX}!out","outPath":"xir33c0vw0pwzg1qvr95lvxzs3ksga9v-lab-caA","signatures":[]}}"#
        );
        let r = Realisation::from_json(&json, "/nix/store").unwrap();
        assert_eq!(
            r.out_path.as_str(),
            "/nix/store/xir33c0vw0pwzg1qvr95lvxzs3ksga9v-lab-caA"
        );
        assert_eq!(r.id.output_name(), "out");
        assert!(r.signatures.is_empty() && r.dependent_realisations.is_empty());
        assert_eq!(r.to_json(), json);
        // What Nix ≥ 2.35 servers write over serve 2.7: no signatures, no dependencies.
        let short = format!(
            r#"{{"id":"sha256:{HEX}!out","outPath":"xir33c0vw0pwzg1qvr95lvxzs3ksga9v-lab-caA"}}"#
        );
        assert_eq!(Realisation::from_json(&short, "/nix/store").unwrap(), r);
        // Nix 2.8's dependencies, and a signature.
        let dep = format!("sha256:{}!dev", "1".repeat(64));
        let full = format!(
            r#"{{"dependentRealisations":{{"{dep}":"00000000000000000000000000000000-d"}},"id":"sha256:{HEX}!out","outPath":"xir33c0vw0pwzg1qvr95lvxzs3ksga9v-lab-caA","signatures":["k-1:AAAA"]}}"#
        );
        let r = Realisation::from_json(&full, "/nix/store").unwrap();
        assert_eq!(r.signatures.len(), 1);
        assert_eq!(
            r.dependent_realisations[&DrvOutput::parse(&dep).unwrap()].as_str(),
            "/nix/store/00000000000000000000000000000000-d"
        );
        assert_eq!(r.to_json(), full);
    }

    #[test]
    fn bad_realisations_say_what_is_wrong() {
        let base = "xir33c0vw0pwzg1qvr95lvxzs3ksga9v-a";
        for (json, why) in [
            ("not json".to_owned(), "not a realisation JSON object"),
            ("[]".to_owned(), "not a realisation JSON object"),
            (format!(r#"{{"outPath":"{base}"}}"#), "missing field `id`"),
            (
                format!(r#"{{"id":"sha256:{HEX}!out"}}"#),
                "missing field `outPath`",
            ),
            (
                format!(r#"{{"id":"sha256:{HEX}!out","outPath":5}}"#),
                "not a realisation JSON object",
            ),
            (
                format!(r#"{{"id":"sha256:00!out","outPath":"{base}"}}"#),
                "is not a derivation output id",
            ),
            (
                format!(r#"{{"id":"sha256:{HEX}!out","outPath":"/nix/store/{base}"}}"#),
                "not a store path base name",
            ),
            (
                format!(r#"{{"id":"sha256:{HEX}!out","outPath":"short"}}"#),
                "bad hash part",
            ),
            (
                format!(r#"{{"id":"sha256:{HEX}!out","outPath":"{base}","signatures":[1]}}"#),
                "not a realisation JSON object",
            ),
            (
                format!(
                    r#"{{"id":"sha256:{HEX}!out","outPath":"{base}","dependentRealisations":{{"x":"{base}"}}}}"#
                ),
                "'x' is not a derivation output id",
            ),
        ] {
            let e = Realisation::from_json(&json, "/nix/store")
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{json}: {e}");
        }
    }

    proptest! {
        #[test]
        fn ids_round_trip(id in arb_drv_output()) {
            prop_assert_eq!(DrvOutput::parse(&id.to_string()).unwrap(), id);
        }

        #[test]
        fn realisations_round_trip(r in arb_realisation()) {
            let json = r.to_json();
            prop_assert_eq!(Realisation::from_json(&json, "/nix/store").unwrap(), r);
        }

        #[test]
        fn garbage_never_panics(s in ".{0,80}") {
            let _ = DrvOutput::parse(&s);
            let _ = Realisation::from_json(&s, "/nix/store");
        }
    }
}
