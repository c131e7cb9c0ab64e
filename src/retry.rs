//! When to try again, for every retry in nixpush: one [`Policy`] type, used four ways.
//!
//! - **Per path** ([`Policy::default`], `target.retry_base_ms`): the scheduler's backoff between attempts at a
//!   path, and the engine's between tries of the presence query. Attempt `n` waits a uniformly random time in
//!   `[0, min(cap, base·2ⁿ⁻¹)]` ("full jitter", which spreads a fleet of daemons that all lost the same target at
//!   once); a server's `Retry-After` replaces it, clamped so a hostile or confused server cannot park us for days.
//! - **Per request** ([`Policy::per_request`]): HTTP and S3 requests, 4 tries, 250 ms doubling; a server asking for
//!   more than 30 s gets the error handed to the per-path policy instead, so one request never holds a worker.
//! - **Throttled** ([`Policy::throttled`]): S3's `503 SlowDown` and `429`, counted apart from the per-request
//!   tries, 500 ms doubling to 8 s, 25 tries.
//! - **Cachix** ([`Policy::cachix`], cachix-api.md §7.1): equal jitter from 1 s doubling, each wait at most 15 s,
//!   no retry once the computed waits would pass 90 s in total; a non-zero hint replaces the wait, clamped to
//!   120 s.
//!
//! The waits are pure functions of the retry count and a random number passed in, so tests pin them down;
//! [`Retries`] counts one operation's retries and [`with_retries`] runs a request under a policy.

use std::future::Future;
use std::time::Duration;

/// How the computed wait is spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly `min(cap, base·2ⁿ)`.
    None,
    /// Uniform in `[0, min(cap, base·2ⁿ)]`.
    Full,
    /// `min(cap, t/2 + u·t/2)` with `t = base·2ⁿ` (never less than half the backoff).
    Equal,
}

/// What a server's hint (`Retry-After`, a problem+json `retry_after`) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hints {
    /// Replaces the computed wait, clamped to `max_server_hint`.
    Clamp,
    /// As `Clamp`, but a zero hint counts as none (Cachix: retrying at once would hammer the API).
    ClampNonZero,
    /// Replaces the computed wait; a hint over `max_server_hint` ends the retries, so that a slower loop (the
    /// per-path one) waits instead of this one.
    GiveUpAbove,
}

/// When an operation stops being retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The caller counts (the scheduler has `max_attempts`, the engine its presence tries).
    Caller,
    /// After this many tries in all.
    Tries(u32),
    /// Once the computed waits would pass this much in total.
    Budget(Duration),
}

/// A backoff policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Delay scale of the first retry.
    pub base: Duration,
    /// Upper bound of any computed delay.
    pub cap: Duration,
    /// Upper bound of a server-provided hint.
    pub max_server_hint: Duration,
    /// How the computed delay is spread.
    pub jitter: Jitter,
    /// What a server's hint does.
    pub hints: Hints,
    /// When to stop.
    pub limit: Limit,
}

impl Default for Policy {
    /// The per-path policy.
    fn default() -> Policy {
        Policy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            max_server_hint: Duration::from_secs(600),
            jitter: Jitter::Full,
            hints: Hints::Clamp,
            limit: Limit::Caller,
        }
    }
}

impl Policy {
    /// The per-path policy with the configured first-retry scale (`target.retry_base_ms`).
    pub fn with_base(base: Duration) -> Policy {
        Policy {
            base,
            ..Policy::default()
        }
    }

    /// The per-request policy for HTTP and S3: `tries` in all, 250 ms doubling, hints up to `max_hint`.
    pub fn per_request(tries: u32, max_hint: Duration) -> Policy {
        Policy {
            base: Duration::from_millis(250),
            cap: max_hint,
            max_server_hint: max_hint,
            jitter: Jitter::None,
            hints: Hints::GiveUpAbove,
            limit: Limit::Tries(tries),
        }
    }

    /// Throttling answers (S3's `503 SlowDown`, `429`): `tries` in all, 500 ms doubling to at most 8 s with equal
    /// jitter, hints obeyed up to `max_hint`. The request rate is at fault, not the request, so a caller counts
    /// these tries apart from [`Policy::per_request`]'s, and lowers its concurrency meanwhile.
    pub fn throttled(tries: u32, max_hint: Duration) -> Policy {
        Policy {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(8),
            max_server_hint: max_hint,
            jitter: Jitter::Equal,
            hints: Hints::Clamp,
            limit: Limit::Tries(tries),
        }
    }

    /// Cachix's policy with its own scale: equal jitter, waits budgeted in total.
    pub fn cachix(base: Duration, cap: Duration, budget: Duration, max_hint: Duration) -> Policy {
        Policy {
            base,
            cap,
            max_server_hint: max_hint,
            jitter: Jitter::Equal,
            hints: Hints::ClampNonZero,
            limit: Limit::Budget(budget),
        }
    }

    /// The longest wait before the retry that follows failed attempt `attempt` (1-based), before jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.backoff(attempt.saturating_sub(1)).min(self.cap)
    }

    /// `base·2^retry`, saturating.
    fn backoff(&self, retry: u32) -> Duration {
        self.base.saturating_mul(1u32 << retry.min(31))
    }

    /// The computed wait before retry number `retry` (0 for the first), `unit` uniform in `[0, 1]`.
    pub fn computed(&self, retry: u32, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        let t = self.backoff(retry);
        match self.jitter {
            Jitter::None => t.min(self.cap),
            Jitter::Full => t.min(self.cap).mul_f64(unit),
            Jitter::Equal => (t / 2 + t.mul_f64(unit) / 2).min(self.cap),
        }
    }

    /// The wait before the next try after failed attempt `attempt` (1-based), the server's hint taking
    /// precedence; `None` when the hint ends the retries. `unit` is a uniform random number in `[0, 1)`, passed in
    /// so the policy stays a pure function that tests can pin down.
    pub fn wait(&self, attempt: u32, server_hint: Option<Duration>, unit: f64) -> Option<Duration> {
        let computed = self.computed(attempt.saturating_sub(1), unit);
        match (server_hint, self.hints) {
            (Some(hint), Hints::GiveUpAbove) if hint > self.max_server_hint => None,
            (Some(hint), Hints::ClampNonZero) if hint.is_zero() => Some(computed),
            (Some(hint), _) => Some(hint.min(self.max_server_hint)),
            (None, _) => Some(computed),
        }
    }

    /// [`Policy::wait`] for a policy whose hints never end the retries (the per-path one).
    pub fn delay(&self, attempt: u32, server_hint: Option<Duration>, unit: f64) -> Duration {
        self.wait(attempt, server_hint, unit)
            .unwrap_or(self.max_server_hint)
    }
}

/// What a retry loop needs to know about a failure.
pub trait Transient {
    /// Whether trying again can succeed.
    fn is_retryable(&self) -> bool;
    /// The server's own idea of when to come back.
    fn retry_after(&self) -> Option<Duration>;
}

/// The retries made so far for one operation.
#[derive(Debug, Default)]
pub struct Retries {
    count: u32,
    spent: Duration,
}

impl Retries {
    /// Retries made so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// How long to wait before trying `error`'s operation again, or `None` to give up. `unit` is uniform in
    /// `[0, 1]`.
    pub fn next_wait(
        &mut self,
        policy: &Policy,
        error: &impl Transient,
        unit: f64,
    ) -> Option<Duration> {
        if !error.is_retryable() {
            return None;
        }
        let computed = policy.computed(self.count, unit);
        match policy.limit {
            Limit::Caller => {}
            Limit::Tries(tries) if self.count.saturating_add(1) >= tries => return None,
            Limit::Tries(_) => {}
            Limit::Budget(budget) if self.spent + computed > budget => return None,
            Limit::Budget(_) => {}
        }
        let wait = policy.wait(self.count + 1, error.retry_after(), unit)?;
        self.spent += computed;
        self.count += 1;
        Some(wait)
    }
}

/// Runs `request` until it succeeds, fails permanently, or `policy` gives up, sleeping between tries. `what`
/// names the request in the debug log.
pub async fn with_retries<T, E, F, Fut>(policy: &Policy, what: &str, mut request: F) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut retries = Retries::default();
    loop {
        match request().await {
            Ok(value) => return Ok(value),
            Err(e) => match retries.next_wait(policy, &e, rand::random::<f64>()) {
                Some(wait) => {
                    tracing::debug!("{what}: retrying in {wait:?} after: {e}");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Failure {
        retryable: bool,
        hint: Option<Duration>,
    }

    impl Transient for Failure {
        fn is_retryable(&self) -> bool {
            self.retryable
        }
        fn retry_after(&self) -> Option<Duration> {
            self.hint
        }
    }

    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "failure")
        }
    }

    const TRANSIENT: Failure = Failure {
        retryable: true,
        hint: None,
    };

    fn hinted(secs: u64) -> Failure {
        Failure {
            retryable: true,
            hint: Some(Duration::from_secs(secs)),
        }
    }

    #[test]
    fn per_path_ceiling_doubles_to_the_cap() {
        let p = Policy::default();
        assert_eq!(p.ceiling(1), Duration::from_secs(1));
        assert_eq!(p.ceiling(2), Duration::from_secs(2));
        assert_eq!(p.ceiling(5), Duration::from_secs(16));
        assert_eq!(p.ceiling(9), Duration::from_secs(256));
        assert_eq!(p.ceiling(10), Duration::from_secs(300));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn per_path_jitter_spans_zero_to_ceiling() {
        let p = Policy::default();
        assert_eq!(p.delay(4, None, 0.0), Duration::ZERO);
        assert_eq!(p.delay(4, None, 0.5), Duration::from_secs(4));
        assert!(p.delay(4, None, 0.999) < Duration::from_secs(8));
    }

    #[test]
    fn per_path_server_hint_wins_but_is_clamped() {
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

    #[test]
    fn per_request_tries_four_times_doubling_from_250_ms() {
        let p = Policy::per_request(4, Duration::from_secs(30));
        let mut r = Retries::default();
        let waits: Vec<_> = std::iter::from_fn(|| r.next_wait(&p, &TRANSIENT, 0.7)).collect();
        assert_eq!(waits, [250, 500, 1000].map(Duration::from_millis).to_vec());
        // A hint is obeyed up to 30 s; a longer one hands the error up at once.
        let mut r = Retries::default();
        assert_eq!(
            r.next_wait(&p, &hinted(7), 0.0),
            Some(Duration::from_secs(7))
        );
        assert_eq!(r.next_wait(&p, &hinted(31), 0.0), None);
        let permanent = Failure {
            retryable: false,
            hint: None,
        };
        assert_eq!(Retries::default().next_wait(&p, &permanent, 0.0), None);
    }

    #[test]
    fn throttled_waits_double_to_8_s_and_obey_hints() {
        let p = Policy::throttled(25, Duration::from_secs(30));
        let mut r = Retries::default();
        let waits: Vec<_> = std::iter::from_fn(|| r.next_wait(&p, &TRANSIENT, 1.0)).collect();
        assert_eq!(waits.len(), 24);
        assert_eq!(
            waits[..6],
            [500, 1000, 2000, 4000, 8000, 8000].map(Duration::from_millis)
        );
        assert_eq!(p.computed(0, 0.0), Duration::from_millis(250));
        // A long hint is clamped, never the end of the retries.
        assert_eq!(
            Retries::default().next_wait(&p, &hinted(90), 0.0),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn cachix_backoff_is_equal_jitter_within_a_budget() {
        let p = Policy::cachix(
            Duration::from_secs(1),
            Duration::from_secs(15),
            Duration::from_secs(90),
            Duration::from_secs(120),
        );
        assert_eq!(p.computed(0, 0.0), Duration::from_millis(500));
        assert_eq!(p.computed(0, 1.0), Duration::from_secs(1));
        assert_eq!(p.computed(3, 1.0), Duration::from_secs(8));
        assert_eq!(p.computed(10, 0.5), Duration::from_secs(15));
        // Without hints the waits stop once they would pass 90 s in total.
        let mut r = Retries::default();
        let mut total = Duration::ZERO;
        while let Some(w) = r.next_wait(&p, &TRANSIENT, 0.5) {
            total += w;
        }
        assert!(
            total <= Duration::from_secs(90) && r.count() >= 7,
            "{total:?}"
        );
        // A hint replaces the wait and is clamped; a zero hint counts as none.
        let mut r = Retries::default();
        assert_eq!(
            r.next_wait(&p, &hinted(7), 0.0),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            r.next_wait(&p, &hinted(600), 0.0),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            r.next_wait(&p, &hinted(0), 0.0),
            Some(Duration::from_secs(2))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_retries_sleeps_the_policy_s_waits() {
        let p = Policy::per_request(4, Duration::from_secs(30));
        let started = tokio::time::Instant::now();
        let mut tries = 0;
        let result: Result<(), Failure> = with_retries(&p, "test", || {
            tries += 1;
            async { Err(TRANSIENT) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(tries, 4);
        // 250 + 500 + 1000 ms of virtual time, no wall-clock wait.
        assert_eq!(started.elapsed(), Duration::from_millis(1750));

        let started = tokio::time::Instant::now();
        let mut tries = 0;
        let result: Result<u32, Failure> = with_retries(&p, "test", || {
            tries += 1;
            let attempt = tries;
            async move {
                if attempt < 3 {
                    Err(hinted(5))
                } else {
                    Ok(attempt)
                }
            }
        })
        .await;
        assert_eq!(result.unwrap(), 3);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
