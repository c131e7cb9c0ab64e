//! The upload rate limit of one target: a token bucket shared by all its workers, which every NAR body (and,
//! for `file://`, every byte written into the cache) passes through, and the measured rate of those bytes.
//!
//! The bucket refills continuously at the rate in force and holds at most [`RateLimiter::burst`] bytes (100 ms
//! of rate, between 1 KiB and 64 KiB), and bodies take it in pieces no larger than that, so the flow stays
//! smooth rather than bursting and sleeping. A rate change applies at once to bodies already being sent. Rate 0
//! holds: no byte passes until the rate changes. [`RateLimiter::abort`] ends every wait with
//! [`Interrupted`] (Ctrl-C in `push`, shutdown during a hold).
//!
//! Waits work both in async code (HTTP bodies) and on blocking threads (the `file://` writer), on one clock:
//! `tokio::time::Instant`, so unit tests can pause time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::rate_schedule::Rate;

/// The measured rate covers this much time.
const MEASURE_WINDOW: Duration = Duration::from_secs(5);
const MIN_BURST: u64 = 1024;
const MAX_BURST: u64 = 64 * 1024;

/// The wait ended because the limiter was aborted.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("upload interrupted")]
pub struct Interrupted;

/// A target's upload rate limit.
#[derive(Debug)]
pub struct RateLimiter {
    state: Mutex<State>,
    changed: Notify,
    changed_blocking: Condvar,
    total_sent: AtomicU64,
}

#[derive(Debug)]
struct State {
    rate: Rate,
    tokens: f64,
    refilled: Instant,
    aborted: bool,
    holds_begun: u64,
    /// `(when, total_sent)`, oldest first, for the measured rate.
    samples: VecDeque<(Instant, u64)>,
}

/// What a caller should do after asking for bytes.
enum Step {
    Go,
    Wait(Option<Duration>),
}

impl RateLimiter {
    /// A limiter at `rate`.
    pub fn new(rate: Rate) -> RateLimiter {
        RateLimiter {
            state: Mutex::new(State {
                rate,
                tokens: 0.0,
                refilled: Instant::now(),
                aborted: false,
                holds_begun: u64::from(rate.is_hold()),
                samples: VecDeque::new(),
            }),
            changed: Notify::new(),
            changed_blocking: Condvar::new(),
            total_sent: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the rate; bodies in flight follow at once.
    pub fn set_rate(&self, rate: Rate) {
        let mut state = self.lock();
        if state.rate == rate {
            return;
        }
        refill(&mut state, Instant::now());
        if rate.is_hold() && !state.rate.is_hold() {
            state.holds_begun += 1;
        }
        state.rate = rate;
        state.tokens = state.tokens.min(burst_of(rate) as f64);
        drop(state);
        self.wake();
    }

    /// The rate in force.
    pub fn rate(&self) -> Rate {
        self.lock().rate
    }

    /// Whether the rate is 0.
    pub fn is_held(&self) -> bool {
        self.lock().rate.is_hold()
    }

    /// How many holds have begun; a change tells that a hold came and went.
    pub fn holds_begun(&self) -> u64 {
        self.lock().holds_begun
    }

    /// Ends every wait, now and later, with [`Interrupted`].
    pub fn abort(&self) {
        self.lock().aborted = true;
        self.wake();
    }

    /// Whether [`RateLimiter::abort`] was called.
    pub fn is_aborted(&self) -> bool {
        self.lock().aborted
    }

    /// The largest piece a body should take at once: the bucket's capacity at the rate in force.
    pub fn burst(&self) -> usize {
        burst_of(self.lock().rate) as usize
    }

    /// Bytes that passed since the limiter was made.
    pub fn total_sent(&self) -> u64 {
        self.total_sent.load(Ordering::Relaxed)
    }

    /// Bytes per second that passed over the last few seconds.
    pub fn measured_bytes_per_sec(&self) -> u64 {
        let now = Instant::now();
        let total = self.total_sent();
        let mut state = self.lock();
        sample(&mut state, now, total);
        match state.samples.front() {
            Some(&(at, then)) if now > at => {
                let secs = now.duration_since(at).as_secs_f64().max(1.0);
                ((total - then) as f64 / secs) as u64
            }
            _ => 0,
        }
    }

    /// Waits until `n` bytes (at most [`RateLimiter::burst`]) may be sent, and counts them.
    pub async fn take(&self, n: usize) -> Result<(), Interrupted> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a change between the check and the wait is not missed.
            changed.as_mut().enable();
            match self.step(n)? {
                Step::Go => return Ok(()),
                Step::Wait(None) => changed.await,
                Step::Wait(Some(wait)) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// [`RateLimiter::take`] for blocking threads.
    pub fn take_blocking(&self, n: usize) -> Result<(), Interrupted> {
        loop {
            let wait = match self.step(n)? {
                Step::Go => return Ok(()),
                Step::Wait(wait) => wait,
            };
            let state = self.lock();
            // Re-checked under the lock the condition variable is paired with, so a wake-up is not lost.
            if state.aborted {
                return Err(Interrupted);
            }
            let wait = wait.unwrap_or(Duration::from_secs(1));
            drop(
                self.changed_blocking
                    .wait_timeout(state, wait)
                    .unwrap_or_else(PoisonError::into_inner),
            );
        }
    }

    /// Waits while the rate is 0, so that no new upload starts during a hold.
    pub async fn wait_while_held(&self) -> Result<(), Interrupted> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let state = self.lock();
                if state.aborted {
                    return Err(Interrupted);
                }
                if !state.rate.is_hold() {
                    return Ok(());
                }
            }
            changed.await;
        }
    }

    fn step(&self, n: usize) -> Result<Step, Interrupted> {
        let now = Instant::now();
        let mut state = self.lock();
        if state.aborted {
            return Err(Interrupted);
        }
        let step = match state.rate {
            Rate::Unlimited => Step::Go,
            Rate::BytesPerSec(0) => Step::Wait(None),
            Rate::BytesPerSec(rate) => {
                refill(&mut state, now);
                let wanted = (n as u64).min(burst_of(state.rate)) as f64;
                if state.tokens >= wanted {
                    state.tokens -= wanted;
                    Step::Go
                } else {
                    let missing = wanted - state.tokens;
                    Step::Wait(Some(Duration::from_secs_f64(missing / rate as f64)))
                }
            }
        };
        if matches!(step, Step::Go) {
            let total = self.total_sent.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            sample(&mut state, now, total);
        }
        Ok(step)
    }

    fn wake(&self) {
        self.changed.notify_waiters();
        // Taken so a blocking waiter between its check and its wait cannot miss the notification.
        let _state = self.lock();
        self.changed_blocking.notify_all();
    }
}

fn burst_of(rate: Rate) -> u64 {
    match rate {
        Rate::Unlimited => MAX_BURST,
        Rate::BytesPerSec(rate) => (rate / 10).clamp(MIN_BURST, MAX_BURST),
    }
}

fn refill(state: &mut State, now: Instant) {
    let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
    state.refilled = now;
    if let Rate::BytesPerSec(rate) = state.rate {
        state.tokens = (state.tokens + elapsed * rate as f64).min(burst_of(state.rate) as f64);
    }
}

fn sample(state: &mut State, now: Instant, total: u64) {
    while state
        .samples
        .front()
        .is_some_and(|&(at, _)| now.saturating_duration_since(at) > MEASURE_WINDOW)
        && state.samples.len() > 1
    {
        state.samples.pop_front();
    }
    match state.samples.back_mut() {
        // At most one sample per 200 ms; the newest carries the latest total.
        Some((at, latest)) if now.saturating_duration_since(*at) < Duration::from_millis(200) => {
            *latest = total
        }
        _ => state.samples.push_back((now, total)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn send(limiter: &RateLimiter, bytes: usize) {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(limiter.burst());
            limiter.take(n).await.unwrap();
            left -= n;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_bounds_the_bytes_over_all_workers() {
        let limiter = Arc::new(RateLimiter::new(Rate::BytesPerSec(1 << 20)));
        let start = Instant::now();
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let limiter = Arc::clone(&limiter);
                tokio::spawn(async move { send(&limiter, 5 << 20).await })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        // 20 MiB at 1 MiB/s with an empty bucket at the start.
        assert!((19.9..20.2).contains(&secs), "{secs}");
        assert_eq!(limiter.total_sent(), 20 << 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_flow_is_smooth_not_burst_and_sleep() {
        let limiter = Arc::new(RateLimiter::new(Rate::BytesPerSec(512 * 1024)));
        let sender = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move { send(&limiter, 10 << 20).await })
        };
        let burst = limiter.burst() as u64;
        assert_eq!(burst, 52_428, "100 ms of rate");
        let mut last = limiter.total_sent();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = limiter.total_sent();
            // Every 500 ms about 256 KiB (five bursts) passes, within one burst.
            assert!(
                (4 * burst..=6 * burst).contains(&(now - last)),
                "{}",
                now - last
            );
            last = now;
        }
        sender.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_stops_bytes_until_the_rate_changes() {
        let limiter = Arc::new(RateLimiter::new(Rate::BytesPerSec(0)));
        assert!(limiter.is_held());
        let sender = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move { send(&limiter, 1 << 20).await })
        };
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(limiter.total_sent(), 0);
        assert!(!sender.is_finished());
        let holds = limiter.holds_begun();
        limiter.set_rate(Rate::BytesPerSec(1 << 20));
        tokio::time::timeout(Duration::from_millis(1100), sender)
            .await
            .expect("released by the new rate")
            .unwrap();
        limiter.set_rate(Rate::BytesPerSec(0));
        assert_eq!(limiter.holds_begun(), holds + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_change_applies_to_a_body_in_flight() {
        let limiter = Arc::new(RateLimiter::new(Rate::BytesPerSec(100 * 1024)));
        let start = Instant::now();
        let sender = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move { send(&limiter, 2 << 20).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        limiter.set_rate(Rate::BytesPerSec(4 << 20));
        sender.await.unwrap();
        // At 100 KiB/s alone it would take over 20 s.
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn abort_ends_waits_and_later_takes() {
        let limiter = Arc::new(RateLimiter::new(Rate::BytesPerSec(0)));
        let waiter = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move { limiter.take(10).await })
        };
        let opener = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move { limiter.wait_while_held().await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        limiter.abort();
        assert!(waiter.await.unwrap().is_err());
        assert!(opener.await.unwrap().is_err());
        assert!(limiter.take(1).await.is_err());
    }

    #[test]
    fn blocking_takes_wait_for_the_rate_and_wake_on_abort() {
        let limiter = Arc::new(RateLimiter::new(Rate::Unlimited));
        limiter.take_blocking(1 << 20).unwrap();
        limiter.set_rate(Rate::BytesPerSec(0));
        let waiter = {
            let limiter = Arc::clone(&limiter);
            std::thread::spawn(move || limiter.take_blocking(10))
        };
        limiter.abort();
        assert!(waiter.join().unwrap().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_measured_rate_is_bytes_over_the_last_seconds() {
        let limiter = RateLimiter::new(Rate::BytesPerSec(200 * 1024));
        send(&limiter, 2 << 20).await;
        let measured = limiter.measured_bytes_per_sec();
        assert!((190 * 1024..=215 * 1024).contains(&measured), "{measured}");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(limiter.measured_bytes_per_sec(), 0);
    }
}
