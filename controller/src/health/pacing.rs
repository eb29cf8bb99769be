//! How fast a host's health streams may go. The daemon asks each agent for
//! one sample per interval; an agent that sends faster (root on its host can
//! make it send as fast as the wire allows, or end each stream and start
//! another) costs pbx01 decoding, memory and writes. So, per host and kept
//! across its streams:
//!
//! - samples are taken from a budget of [`BURST`] that one interval refills
//!   by one (a late sample and the next on time are both taken); a sample
//!   over the budget is dropped unread;
//! - a stream the agent ends early counts as a drop;
//! - [`MAX_DROPS`] drops within [`WINDOW`] intervals close the stream.
//!
//! Network jitter drops a sample now and then and never reaches the limit;
//! a flood, half again the asked rate or more, or a stream restarted every
//! moment, reach it within a few intervals; whatever the rate, no more
//! samples are taken than were asked for.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Samples that may arrive at once.
pub const BURST: f64 = 2.0;
/// Intervals over which drops are counted.
pub const WINDOW: u32 = 10;
/// Drops within the window that close the stream.
pub const MAX_DROPS: usize = 5;

/// What to do with a sample that just arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    Take,
    /// Over the budget: not looked at.
    Drop,
    /// The host keeps going too fast: close its stream.
    Close,
}

/// One host's pace.
#[derive(Debug, Clone)]
pub struct Pacer {
    interval: Duration,
    budget: f64,
    refilled: Option<Instant>,
    drops: VecDeque<Instant>,
}

impl Pacer {
    pub fn new(interval: Duration) -> Pacer {
        Pacer {
            interval,
            budget: BURST,
            refilled: None,
            drops: VecDeque::new(),
        }
    }

    /// Judges a sample that arrived at `now`.
    pub fn judge(&mut self, now: Instant) -> Pace {
        if let Some(at) = self.refilled {
            let earned =
                now.saturating_duration_since(at).as_secs_f64() / self.interval.as_secs_f64();
            self.budget = (self.budget + earned).min(BURST);
        }
        self.refilled = Some(now);
        if self.budget >= 1.0 {
            self.budget -= 1.0;
            Pace::Take
        } else {
            self.strike(now)
        }
    }

    /// Counts a misdeed other than an early sample (a stream the agent
    /// ended early) as a drop.
    pub fn strike(&mut self, now: Instant) -> Pace {
        let window = self.interval * WINDOW;
        self.drops.push_back(now);
        while self
            .drops
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.drops.pop_front();
        }
        if self.drops.len() >= MAX_DROPS {
            self.drops.clear();
            Pace::Close
        } else {
            Pace::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        p: &mut Pacer,
        t0: Instant,
        arrivals_ms: impl IntoIterator<Item = u64>,
    ) -> (u32, u32, bool) {
        let (mut taken, mut dropped) = (0, 0);
        for at in arrivals_ms {
            match p.judge(t0 + Duration::from_millis(at)) {
                Pace::Take => taken += 1,
                Pace::Drop => dropped += 1,
                Pace::Close => return (taken, dropped, true),
            }
        }
        (taken, dropped, false)
    }

    #[test]
    fn a_steady_stream_is_taken_whole() {
        let mut p = Pacer::new(Duration::from_secs(5));
        assert_eq!(
            run(&mut p, Instant::now(), (0..100).map(|i| 5000 * i)),
            (100, 0, false)
        );
    }

    #[test]
    fn jitter_is_taken_and_never_closes() {
        let mut p = Pacer::new(Duration::from_secs(1));
        // Every tenth sample is late and arrives with the next one.
        let arrivals = (0..1000u64).map(|i| {
            if i % 10 == 3 {
                1000 * i + 900
            } else {
                1000 * i
            }
        });
        let (taken, dropped, closed) = run(&mut p, Instant::now(), arrivals);
        assert!(
            !closed && dropped == 0 && taken == 1000,
            "{taken} {dropped}"
        );
    }

    #[test]
    fn a_flood_is_closed_within_a_few_samples() {
        let mut p = Pacer::new(Duration::from_secs(1));
        let (taken, dropped, closed) = run(&mut p, Instant::now(), (0..100).map(|i| i / 10));
        assert!(closed && taken <= BURST as u32 && dropped < MAX_DROPS as u32);
    }

    #[test]
    fn twice_or_more_the_asked_rate_is_closed_however_it_is_paced() {
        // Two samples every 0.76 of the interval: every other one would be
        // taken if a taken sample forgave a drop.
        let mut p = Pacer::new(Duration::from_secs(1));
        let arrivals = (0..1000u64).flat_map(|i| [760 * i, 760 * i + 1]);
        let (_, _, closed) = run(&mut p, Instant::now(), arrivals);
        assert!(closed);
        // 1.3 times the rate: not closed, but no more taken than asked for.
        let mut p = Pacer::new(Duration::from_secs(1));
        let (taken, dropped, closed) = run(&mut p, Instant::now(), (0..1000u64).map(|i| 770 * i));
        assert!(!closed && dropped > 200, "{dropped}");
        assert!(f64::from(taken) <= 770.0 + BURST, "{taken} taken in 770 s");
    }

    #[test]
    fn streams_ended_early_add_up_to_a_close() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(1));
        for i in 0..(MAX_DROPS as u64 - 1) {
            assert_eq!(p.strike(t0 + Duration::from_millis(500 * i)), Pace::Drop);
        }
        assert_eq!(p.strike(t0 + Duration::from_secs(3)), Pace::Close);
        // Spread thinly, they never do.
        let mut p = Pacer::new(Duration::from_secs(1));
        for i in 0..100u64 {
            assert_eq!(p.strike(t0 + Duration::from_secs(3 * i)), Pace::Drop);
        }
    }
}
