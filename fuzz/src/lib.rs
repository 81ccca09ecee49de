//! Shared checks of the fuzz targets: the contract every wire decoder keeps whatever the bytes
//! (the same one `hook-protocol/tests/bad_input_decoders.rs` checks with proptest), so the
//! fuzzer reports a wrong answer as a crash, not only a panic.
//!
//! Must never: allocate in proportion to the input's claims or do I/O (the targets run millions
//! of times).

use hook_protocol::wire::{self, DecodeError, Reader};

/// Decodes `input` with `f` and panics if the answer breaks the contract the async adapter
/// relies on: `Ok(n)` consumes at most the input and every proper prefix of those `n` bytes is
/// `Incomplete`; `Invalid` stays `Invalid` when more bytes follow; `Incomplete { needed }`
/// asks for at least one byte and stays `Incomplete` with fewer than `needed` more.
pub fn check<T>(name: &str, input: &[u8], f: impl Fn(&mut Reader<'_>) -> wire::Result<T>) {
    let run = |b: &[u8]| wire::decode_with(b, &f).map(|(_, n)| n);
    match run(input) {
        Ok(n) => {
            assert!(n <= input.len(), "{name}: consumed {n} of {}", input.len());
            if n == 0 {
                assert!(matches!(run(&[]), Ok(0)), "{name}: consumed nothing");
                return;
            }
            // A spread of prefixes, always including the last few: enough to catch an early
            // answer without making each run quadratic.
            let step = (n / 32).max(1);
            for cut in (0..n).step_by(step).chain(n.saturating_sub(9)..n) {
                match run(&input[..cut]) {
                    Err(e) if e.is_incomplete() => {}
                    other => panic!("{name}: {n} bytes decode, but {cut} gave {other:?}"),
                }
            }
            let mut longer = input[..n].to_vec();
            longer.extend_from_slice(&[0x5a; 16]);
            assert!(
                matches!(run(&longer), Ok(m) if m == n),
                "{name}: trailing bytes changed the answer"
            );
        }
        Err(DecodeError::Invalid(e)) => {
            assert!(!e.to_string().is_empty(), "{name}: empty error");
            let mut longer = input.to_vec();
            longer.extend_from_slice(&[0; 16]);
            assert!(
                matches!(run(&longer), Err(DecodeError::Invalid(_))),
                "{name}: Invalid ({e}) became something else with more bytes"
            );
        }
        Err(DecodeError::Incomplete { needed }) => {
            assert!(needed >= 1, "{name}: needed 0");
            let mut longer = input.to_vec();
            longer.resize(input.len() + needed.min(4096) - 1, 0);
            assert!(
                run(&longer).is_err_and(|e| e.is_incomplete()),
                "{name}: needed {needed}, but fewer bytes sufficed"
            );
        }
    }
}

/// Splits fuzz input into `n` parts at `0xff 0x00` separators (missing parts are empty).
pub fn split(input: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts = Vec::with_capacity(n);
    let mut rest = input;
    while parts.len() + 1 < n {
        match rest.windows(2).position(|w| w == [0xff, 0x00]) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + 2..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts.resize(n, &[]);
    parts
}
