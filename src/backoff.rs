//! The exponential backoff shared by both failure memories: the supervisor's for lazy builders
//! (`supervisor::state`) and the hooks' for always-on builders (`memory`). After `n` failures in
//! a row a builder is left alone for 10 s × 2^(n−1), at most 10 min.
//!
//! Pure arithmetic over durations: it must never read a clock or decide what counts as a
//! failure (its callers count them).

use std::time::Duration;

/// First backoff delay after a failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(10);
/// Longest backoff delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(10 * 60);

/// The backoff after `consecutive` failures in a row: 10 s × 2^(n−1), capped at 10 min.
pub fn backoff(consecutive: u32) -> Duration {
    if consecutive == 0 {
        return Duration::ZERO;
    }
    let shift = (consecutive - 1).min(16);
    BACKOFF_BASE.saturating_mul(1 << shift).min(BACKOFF_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), 10 * S);
        assert_eq!(backoff(2), 20 * S);
        assert_eq!(backoff(3), 40 * S);
        assert_eq!(backoff(6), 320 * S);
        assert_eq!(backoff(7), 600 * S);
        assert_eq!(backoff(1000), 600 * S);
    }
}
