//! Bad input for the `.drv` (ATerm) parser: random bytes, and real `.drv` files (from Nix 2.8
//! and 2.34, `tests/data/drv`) and generated ones with bits flipped, bytes inserted and deleted
//! and runs repeated.
//!
//! Whatever the input, the parser must not panic, an error must point inside the input (its
//! offset is at most the input's length) and say what was expected, and a proper prefix of a
//! derivation is never a derivation. What it accepts it prints back in a form it parses to the
//! same value, so a mutated file can never be "repaired" into a different derivation.

mod bad_input;

use std::path::Path;

use bad_input::{mutated, read_files};
use hook_protocol::derivation::Derivation;
use proptest::prelude::*;

fn seeds() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut seeds: Vec<Vec<u8>> = read_files(&dir, &[".drv"])
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    seeds.push(Derivation::default().to_aterm());
    seeds
}

fn check(input: &[u8]) -> Result<(), TestCaseError> {
    match Derivation::parse(input) {
        Ok(d) => {
            let printed = d.to_aterm();
            let again = Derivation::parse(&printed)
                .map_err(|e| TestCaseError::fail(format!("re-parsing the printed form: {e}")))?;
            prop_assert_eq!(&again, &d);
            // Nix writes sorted, escaped output: printing is a fixed point after one round.
            prop_assert_eq!(again.to_aterm(), printed);
            for cut in [0, input.len() / 2, input.len().saturating_sub(1)] {
                if cut < input.len() {
                    prop_assert!(
                        Derivation::parse(&input[..cut]).is_err(),
                        "a prefix of {} bytes parsed",
                        cut
                    );
                }
            }
        }
        Err(e) => {
            prop_assert!(
                e.offset <= input.len(),
                "offset {} of {}",
                e.offset,
                input.len()
            );
            prop_assert!(!e.to_string().is_empty());
        }
    }
    Ok(())
}

#[test]
fn every_seed_parses_and_every_prefix_does_not() {
    for s in seeds() {
        let d = Derivation::parse(&s).unwrap_or_else(|e| panic!("seed: {e}"));
        assert_eq!(
            d.to_aterm(),
            s,
            "real .drv files are printed back byte for byte"
        );
        for cut in 0..s.len() {
            let e = Derivation::parse(&s[..cut]).expect_err("a prefix parsed");
            assert!(e.offset <= cut, "offset {} of {cut}", e.offset);
        }
    }
}

#[test]
fn deep_nesting_and_long_inputs_are_linear() {
    // Long strings with many escapes, and very many list elements: parse time must stay linear
    // (a quadratic parser takes seconds here).
    let mut t = b"Derive([],[],[],\"x\",\"".to_vec();
    t.extend(std::iter::repeat_n(b"\\n".as_slice(), 500_000).flatten());
    t.extend_from_slice(b"\",[");
    for i in 0..100_000 {
        if i > 0 {
            t.push(b',');
        }
        t.extend_from_slice(b"\"a\"");
    }
    t.extend_from_slice(b"],[])");
    let t0 = std::time::Instant::now();
    let d = Derivation::parse(&t).unwrap();
    assert_eq!(d.basic.builder.len(), 500_000);
    assert_eq!(d.basic.args.len(), 100_000);
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );
    // Unbalanced nesting is an error at the first wrong byte, not a stack overflow.
    let deep = [b"Derive(".as_slice(), &[b'['; 100_000]].concat();
    let e = Derivation::parse(&deep).unwrap_err();
    assert_eq!(e.offset, 8, "{e}");
}

proptest! {
    #![proptest_config(bad_input::config(2048))]

    #[test]
    fn random_bytes(input in prop::collection::vec(any::<u8>(), 0..256)) {
        check(&input)?;
        // And behind a valid start, so the parser gets past `Derive(`.
        let mut t = b"Derive([(\"out\",\"".to_vec();
        t.extend_from_slice(&input);
        check(&t)?;
    }

    #[test]
    fn random_text_from_the_aterm_alphabet(
        input in "(Derive\\(|\\[|\\]|\\(|\\)|,|\"|\\\\[nrt\"\\\\x]|[a-z0-9/.-]{1,8}){0,60}"
    ) {
        check(input.as_bytes())?;
    }

    #[test]
    fn mutated_derivations((_, input) in mutated(seeds())) {
        check(&input)?;
    }
}
