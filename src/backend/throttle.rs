//! How many requests one target gets at once, lowered when it says to slow down and raised again as it copes.
//!
//! Many hosts writing one S3 bucket hit its request rate limit; S3 answers `503 SlowDown`, other stores `429 Too
//! Many Requests`. Such an answer halves the limit (never below 1) and the request is sent again once the limit
//! lets it; every success raises the limit by `1/limit`, so it creeps back by about one per round of requests
//! (additive increase, multiplicative decrease, as TCP does). A throttled request is never a failed path.
//!
//! ```text
//! limit 64 ─ SlowDown → 32 ─ SlowDown → 16 ─ ~17 successes → 17 ─ ~18 successes → 18 …
//! ```

use std::sync::Mutex;

use tokio::sync::Notify;

/// A concurrency limit that adapts to the target's answers.
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<State>,
    freed: Notify,
    max: f64,
}

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: usize,
}

/// One request's place under the limit; gives it back when dropped.
#[derive(Debug)]
pub struct Permit<'a> {
    throttle: &'a Throttle,
}

impl Throttle {
    /// A throttle that starts at, and never rises above, `max` requests at once.
    pub fn new(max: usize) -> Throttle {
        let max = max.max(1) as f64;
        Throttle {
            state: Mutex::new(State {
                limit: max,
                in_flight: 0,
            }),
            freed: Notify::new(),
            max,
        }
    }

    /// Waits until the limit has room for one more request.
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a release between the check and the wait is not missed.
            freed.as_mut().enable();
            {
                let mut state = self.lock();
                if (state.in_flight as f64) < state.limit.floor() {
                    state.in_flight += 1;
                    return Permit { throttle: self };
                }
            }
            freed.await;
        }
    }

    /// The target asked to slow down: halve the limit.
    pub fn slow_down(&self) -> usize {
        let mut state = self.lock();
        state.limit = (state.limit / 2.0).max(1.0);
        tracing::debug!(
            "target asked to slow down; at most {} request(s) at once",
            state.limit as usize
        );
        state.limit as usize
    }

    /// A request succeeded: creep back towards the maximum.
    pub fn succeeded(&self) {
        let mut state = self.lock();
        state.limit = (state.limit + 1.0 / state.limit).min(self.max);
        drop(state);
        self.freed.notify_waiters();
    }

    /// The current limit, whole requests.
    pub fn limit(&self) -> usize {
        self.lock().limit as usize
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two numbers that every update leaves consistent, so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.throttle.lock().in_flight -= 1;
        self.throttle.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn halves_then_creeps_back() {
        let t = Throttle::new(64);
        assert_eq!(t.limit(), 64);
        assert_eq!(t.slow_down(), 32);
        assert_eq!(t.slow_down(), 16);
        // About one more per round of 16 successes.
        for _ in 0..18 {
            t.succeeded();
        }
        assert_eq!(t.limit(), 17);
        for _ in 0..10_000 {
            t.succeeded();
        }
        assert_eq!(t.limit(), 64, "never above the maximum");
        for _ in 0..20 {
            t.slow_down();
        }
        assert_eq!(t.limit(), 1, "never below one");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_room_under_a_lowered_limit() {
        let t = std::sync::Arc::new(Throttle::new(4));
        t.slow_down();
        t.slow_down();
        let first = t.acquire().await;
        let waiter = {
            let t = std::sync::Arc::clone(&t);
            tokio::spawn(async move {
                let _second = t.acquire().await;
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "a limit of 1 admits one request");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the waiter gets the freed place")
            .unwrap();
    }
}
