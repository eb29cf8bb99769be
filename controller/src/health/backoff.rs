//! Reconnection delays: exponential, capped, with jitter so a fleet whose
//! agents all dropped at once does not reconnect in lockstep.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            failures: 0,
        }
    }

    /// The delay before the next attempt; `unit` in [0, 1) picks where in
    /// the upper half of the step it falls ("equal jitter": never less than
    /// half the step, so a flapping agent is not hammered).
    pub fn next(&mut self, unit: f64) -> Duration {
        let step = self
            .first
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.cap);
        self.failures = self.failures.saturating_add(1);
        let half = step / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// After a success the next failure starts from the first step again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A number in [0, 1) that differs per call and per process (no RNG crate:
/// the jitter needs spread, not secrecy).
pub fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let lows: Vec<Duration> = (0..10).map(|_| b.next(0.0)).collect();
        assert_eq!(lows[0], Duration::from_millis(250));
        assert_eq!(lows[1], Duration::from_millis(500));
        assert_eq!(lows[2], Duration::from_secs(1));
        assert_eq!(
            *lows.last().unwrap(),
            Duration::from_secs(15),
            "half the cap"
        );
        assert!(b.next(0.999_999) <= Duration::from_secs(30));
        b.reset();
        assert_eq!(b.next(1.0), Duration::from_millis(500));
        // Many failures never overflow.
        for _ in 0..100 {
            b.next(0.5);
        }
        assert!(b.next(0.5) <= Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_in_range_and_spreads() {
        let values: Vec<f64> = (0..200).map(|_| jitter()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let low = values.iter().filter(|v| **v < 0.5).count();
        assert!((40..160).contains(&low), "{low} of 200 below 0.5");
    }
}
