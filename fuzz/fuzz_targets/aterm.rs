//! The `.drv` (ATerm) parser: no panic, errors point inside the input, and what parses prints
//! back to a form that parses to the same derivation (and is a fixed point after one round).
#![no_main]

use hook_protocol::derivation::Derivation;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Derivation::parse(data) {
        Ok(d) => {
            let printed = d.to_aterm();
            let again = Derivation::parse(&printed).expect("printed form parses");
            assert_eq!(again, d);
            assert_eq!(again.to_aterm(), printed);
            let _ = d.output_paths();
            let mut w = Vec::new();
            d.basic.encode(&mut w);
            let (back, n) = hook_protocol::wire::decode_with(
                &w,
                hook_protocol::derivation::BasicDerivation::decode,
            )
            .expect("wire form decodes");
            assert_eq!((back, n), (d.basic, w.len()));
        }
        Err(e) => {
            assert!(e.offset <= data.len());
            assert!(!e.to_string().is_empty());
        }
    }
});
