//! Exponential backoff with jitter for the control client's retry loops (capped at
//! 30 s). Pure: the caller supplies the randomness, so tests are deterministic.

use std::time::Duration;

/// Retry delays: `base * 2^n`, capped, each scaled into `[1/2, 1]` of itself by jitter so that
/// many nodes restarted together do not hammer control in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            failures: 0,
        }
    }

    /// Consecutive failures since the last [`Backoff::succeeded`].
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Record a failure and return how long to wait before the next attempt.
    /// `jitter` is a uniform sample from `[0, 1)`; out-of-range values are clamped.
    pub fn failed(&mut self, jitter: f64) -> Duration {
        let exp = self.failures.min(16);
        self.failures = self.failures.saturating_add(1);
        let full = self.base.saturating_mul(1u32 << exp).min(self.cap);
        let scale = 0.5 + 0.5 * jitter.clamp(0.0, 1.0);
        full.mul_f64(scale)
    }

    /// The connection worked: start again from the shortest delay.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..10).map(|_| b.failed(1.0)).collect();
        assert_eq!(delays[0], Duration::from_millis(500));
        assert_eq!(delays[1], Duration::from_secs(1));
        assert_eq!(delays[2], Duration::from_secs(2));
        assert_eq!(delays[6], Duration::from_secs(30));
        assert_eq!(delays[9], Duration::from_secs(30));
        assert_eq!(b.failures(), 10);
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        let mut b = Backoff::default();
        for _ in 0..6 {
            b.failed(0.0);
        }
        assert_eq!(b.clone().failed(0.0), Duration::from_secs(15));
        assert_eq!(
            b.clone().failed(0.999_999),
            Duration::from_secs(30).mul_f64(0.9999995)
        );
        assert_eq!(
            b.clone().failed(7.0),
            Duration::from_secs(30),
            "out of range is clamped"
        );
    }

    #[test]
    fn success_resets() {
        let mut b = Backoff::default();
        b.failed(1.0);
        b.failed(1.0);
        b.succeeded();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.failed(1.0), Duration::from_millis(500));
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::default();
        for _ in 0..100_000 {
            assert!(b.failed(0.5) <= Duration::from_secs(30));
        }
    }
}
