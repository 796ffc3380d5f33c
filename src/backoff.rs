//! Capped exponential backoff with jitter, for every retry loop: broker reconnects, database
//! outages, endpoint retries. The jitter (each delay drawn between half and all of its step)
//! keeps a fleet of gateways, or a flow's many requests, from retrying in step.

use rand::Rng;
use std::time::Duration;

pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff { first, cap, next: first }
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The delay before the next attempt.
    pub fn step(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.cap);
        jitter(ceiling)
    }
}

/// The delay before attempt `attempt + 1` after `attempt` failures, without keeping state.
pub fn after_failures(attempt: u32, first: Duration, cap: Duration) -> Duration {
    let doubled =
        first.saturating_mul(1u32.checked_shl(attempt.saturating_sub(1).min(31)).unwrap_or(u32::MAX));
    jitter(doubled.min(cap))
}

fn jitter(ceiling: Duration) -> Duration {
    ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_millis(500);
    const CAP: Duration = Duration::from_secs(30);

    #[test]
    fn delays_grow_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(FIRST, CAP);
        let delays: Vec<Duration> = (0..12).map(|_| backoff.step()).collect();
        assert!(delays[0] <= FIRST && delays[0] >= FIRST / 2);
        assert!(delays.iter().all(|d| *d <= CAP));
        assert!(delays[11] >= CAP / 2, "reaches the cap: {delays:?}");
        backoff.reset();
        assert!(backoff.step() <= FIRST);
    }

    #[test]
    fn stateless_delays_follow_the_same_curve() {
        assert!(after_failures(1, FIRST, CAP) <= FIRST);
        assert!(after_failures(3, FIRST, CAP) >= FIRST * 2 && after_failures(3, FIRST, CAP) <= FIRST * 4);
        assert!(after_failures(200, FIRST, CAP) <= CAP);
        assert!(after_failures(200, FIRST, CAP) >= CAP / 2);
    }
}
