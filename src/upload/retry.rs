//! When to try a failed upload again: exponential backoff with full jitter, as a pure function.
//!
//! Attempt `n` (1-based, the attempt that just failed) waits a uniformly random time in `[0, min(cap, base·2ⁿ⁻¹)]`
//! ("full jitter", which spreads a fleet of daemons that all lost the same target at once). A server's
//! `Retry-After` replaces the computed delay, clamped so a hostile or confused server cannot park us for days.

use std::time::Duration;

/// The backoff policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Delay scale of the first retry.
    pub base: Duration,
    /// Upper bound of any computed delay.
    pub cap: Duration,
    /// Upper bound of a server-provided `Retry-After`.
    pub max_server_hint: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            max_server_hint: Duration::from_secs(600),
        }
    }
}

impl Policy {
    /// The default policy with the configured first-retry scale (`target.retry_base_ms`).
    pub fn with_base(base: Duration) -> Policy {
        Policy {
            base,
            ..Policy::default()
        }
    }

    /// The longest wait before the retry that follows failed attempt `attempt` (1-based), before jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(32);
        self.base
            .checked_mul(1u32 << doublings.min(31))
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The wait before the next try. `unit` is a uniform random number in `[0, 1)`, passed in so the policy
    /// stays a pure function that tests can pin down.
    pub fn delay(&self, attempt: u32, server_hint: Option<Duration>, unit: f64) -> Duration {
        if let Some(hint) = server_hint {
            return hint.min(self.max_server_hint);
        }
        self.ceiling(attempt).mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_to_the_cap() {
        let p = Policy::default();
        assert_eq!(p.ceiling(1), Duration::from_secs(1));
        assert_eq!(p.ceiling(2), Duration::from_secs(2));
        assert_eq!(p.ceiling(5), Duration::from_secs(16));
        assert_eq!(p.ceiling(9), Duration::from_secs(256));
        assert_eq!(p.ceiling(10), Duration::from_secs(300));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn jitter_spans_zero_to_ceiling() {
        let p = Policy::default();
        assert_eq!(p.delay(4, None, 0.0), Duration::ZERO);
        assert_eq!(p.delay(4, None, 0.5), Duration::from_secs(4));
        assert!(p.delay(4, None, 0.999) < Duration::from_secs(8));
    }

    #[test]
    fn server_hint_wins_but_is_clamped() {
        let p = Policy::default();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(7)), 0.9),
            Duration::from_secs(7)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(86_400)), 0.9),
            Duration::from_secs(600)
        );
    }
}
