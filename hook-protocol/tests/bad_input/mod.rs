//! Shared pieces of the `bad_input_*` tests: byte-level mutations of valid encodings (the
//! proptest counterpart of a fuzzer's mutator), the length values that break decoders most
//! often, and an allocator that records the largest single allocation made by the current
//! thread, so "no huge allocation from a length prefix" is measured, not assumed.
//!
//! Must never: depend on anything but `hook-protocol`'s public API and proptest.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use hook_protocol::wire::{MAX_COUNT, MAX_STRING};
use proptest::prelude::*;

/// u64 values that sit on the edges decoders check: lengths and counts just inside and just
/// outside the limits, values that overflow `usize` arithmetic, and small ones.
pub const INTERESTING_U64: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    9,
    255,
    0x1_0000,
    u32::MAX as u64,
    u32::MAX as u64 + 1,
    MAX_STRING,
    MAX_STRING + 1,
    MAX_COUNT,
    MAX_COUNT + 1,
    1 << 62,
    1 << 63,
    u64::MAX - 8,
    u64::MAX - 7,
    u64::MAX,
];

/// One edit of a byte string.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Flip one bit.
    Flip { at: usize, bit: u8 },
    /// Overwrite one byte.
    Set { at: usize, byte: u8 },
    /// Insert bytes.
    Insert { at: usize, bytes: Vec<u8> },
    /// Delete a run of bytes.
    Delete { at: usize, len: usize },
    /// Cut the input short.
    Truncate { len: usize },
    /// Overwrite the 8-byte-aligned word at `word` (where the wire keeps every length, count
    /// and tag) with an interesting value.
    Word { word: usize, value: u64 },
    /// Copy a run of bytes to another place (repeats a field or a whole message).
    Splice { from: usize, len: usize, to: usize },
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..24).prop_map(|(at, len)| Mutation::Delete { at, len }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (any::<usize>(), prop::sample::select(INTERESTING_U64))
            .prop_map(|(word, value)| Mutation::Word { word, value }),
        (any::<usize>(), 1usize..64, any::<usize>()).prop_map(|(from, len, to)| Mutation::Splice {
            from,
            len,
            to
        }),
    ]
}

/// Applies `muts` to a copy of `seed` (positions are taken modulo the current length).
pub fn apply(seed: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in muts {
        let n = b.len();
        match m {
            Mutation::Flip { at, bit } if n > 0 => b[at % n] ^= 1 << bit,
            Mutation::Set { at, byte } if n > 0 => b[at % n] = *byte,
            Mutation::Insert { at, bytes } => {
                let at = at % (n + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Mutation::Delete { at, len } if n > 0 => {
                let at = at % n;
                let end = (at + len).min(n);
                b.drain(at..end);
            }
            Mutation::Truncate { len } => b.truncate(len % (n + 1)),
            Mutation::Word { word, value } if n >= 8 => {
                let at = (word % (n / 8)) * 8;
                b[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            Mutation::Splice { from, len, to } if n > 0 => {
                let from = from % n;
                let end = (from + len).min(n);
                let chunk = b[from..end].to_vec();
                let to = to % (n + 1);
                b.splice(to..to, chunk);
            }
            _ => {}
        }
    }
    b
}

/// Proptest settings: `default_cases`, or `PROPTEST_CASES` from the environment for a longer
/// run; failures are not persisted into the source tree.
pub fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A seed picked from `seeds`, then 1–8 mutations.
pub fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = (usize, Vec<u8>)> {
    assert!(!seeds.is_empty(), "no seeds");
    let n = seeds.len();
    (0..n, prop::collection::vec(mutation(), 1..8))
        .prop_map(move |(i, muts)| (i, apply(&seeds[i], &muts)))
}

/// The system allocator, recording the largest single allocation (or reallocation) made by
/// each thread. Install it in a test binary with
/// `#[global_allocator] static A: bad_input::Counting = bad_input::Counting;`.
pub struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: during thread teardown the slot may be gone; the measurement does not matter
    // then.
    let _ = LARGEST.try_with(|c| {
        if size > c.get() {
            c.set(size);
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` and returns its value with the largest single allocation this thread made while it
/// ran (needs [`Counting`] installed as the global allocator).
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LARGEST.with(|c| c.replace(0));
    let v = f();
    let largest = LARGEST.with(|c| c.replace(before.max(c.get())));
    (v, largest)
}

/// Reads every file under `dir` (recursively) whose name ends with one of `suffixes`.
pub fn read_files(dir: &std::path::Path, suffixes: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for e in entries {
            let p = e.expect("directory entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if suffixes.iter().any(|s| p.to_string_lossy().ends_with(s)) {
                let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                out.push((p.to_string_lossy().into_owned(), bytes));
            }
        }
    }
    out.sort();
    out
}
