//! How fast a health stream may go. The daemon asks each agent for one
//! sample per interval; an agent that sends faster (root on its host can
//! make it send as fast as the wire allows) costs pbx01 decoding, memory and
//! writes. Samples closer together than [`MIN_GAP`] of the interval are
//! dropped, each a strike; a taken sample forgives one strike; at
//! [`MAX_STRIKES`] the stream is closed. Network jitter bunches samples now
//! and then and never reaches the limit; a flood reaches it in a moment.

use std::time::{Duration, Instant};

/// The share of the interval two taken samples are apart at least.
pub const MIN_GAP: f64 = 0.75;
/// Early samples (net of forgiven ones) that close the stream.
pub const MAX_STRIKES: u32 = 10;

/// What to do with a sample that just arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    Take,
    /// Too soon after the last one: not looked at.
    Drop,
    /// The stream keeps going too fast: close it.
    Close,
}

/// One stream's pace.
#[derive(Debug, Clone)]
pub struct Pacer {
    min_gap: Duration,
    last: Option<Instant>,
    strikes: u32,
}

impl Pacer {
    pub fn new(interval: Duration) -> Pacer {
        Pacer {
            min_gap: interval.mul_f64(MIN_GAP),
            last: None,
            strikes: 0,
        }
    }

    /// Judges a sample that arrived at `now`.
    pub fn judge(&mut self, now: Instant) -> Pace {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.min_gap => {
                self.strikes += 1;
                if self.strikes >= MAX_STRIKES {
                    Pace::Close
                } else {
                    Pace::Drop
                }
            }
            _ => {
                self.last = Some(now);
                self.strikes = self.strikes.saturating_sub(1);
                Pace::Take
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_stream_is_taken_whole() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(5));
        for i in 0..100 {
            assert_eq!(p.judge(t0 + Duration::from_secs(5 * i)), Pace::Take);
        }
    }

    #[test]
    fn jitter_drops_a_sample_now_and_then_but_never_closes() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Pacer::new(Duration::from_secs(1));
        let mut dropped = 0;
        for i in 0..1000u64 {
            // Every tenth sample is late and arrives with the next one.
            let at = if i % 10 == 3 {
                1000 * i + 900
            } else {
                1000 * i
            };
            match p.judge(t0 + ms(at)) {
                Pace::Take => {}
                Pace::Drop => dropped += 1,
                Pace::Close => panic!("closed a jittery stream at {i}"),
            }
        }
        assert!(dropped <= 100, "{dropped}");
    }

    #[test]
    fn a_flood_is_dropped_then_closed() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(1));
        assert_eq!(p.judge(t0), Pace::Take);
        for i in 1..MAX_STRIKES {
            assert_eq!(
                p.judge(t0 + Duration::from_micros(u64::from(i))),
                Pace::Drop
            );
        }
        assert_eq!(p.judge(t0 + Duration::from_millis(1)), Pace::Close);
    }
}
