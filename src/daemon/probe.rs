//! How often the scheduler asks a target that is not ready again, and when it says so in the log.
//!
//! An offline laptop must not fill the journal, nor wake the radio every few seconds: each failed probe doubles
//! the wait before the next one, from a first wait to a cap ([`crate::retry::Policy`] without jitter, so the log can say
//! when the next try comes), and the log gets one line when the target goes down or its trouble changes, one
//! every [`STILL_DOWN_EVERY`] while it stays down, and one when it is back:
//!
//! ```text
//! WARN target not ready: cannot connect to https://cache.example/nix-cache-info: …; uploads wait, next try in 5s (waits double up to 5m 00s)
//! WARN target still not ready after 1h 00m: cannot connect to …
//! INFO target ready again after 1h 12m; uploads resume
//! ```
//!
//! Pure state over [`tokio::time::Instant`], so tests drive it under paused time.

use std::time::Duration;

use tokio::time::Instant;

use crate::retry::{Hints, Jitter, Limit, Policy};

/// The first wait after the target stops answering.
pub const FIRST_WAIT: Duration = Duration::from_secs(5);
/// The longest wait between probes.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// How often an outage that goes on is logged again.
pub const STILL_DOWN_EVERY: Duration = Duration::from_secs(3600);

/// What is wrong with the target, as far as the log is concerned: a change is logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trouble {
    /// It does not answer (offline, refused, timed out, a server error).
    Unreachable,
    /// It answers but cannot take writes (full, read-only, throttling); the reason as the backend put it.
    Degraded(String),
}

/// What a failed probe should log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogLine {
    /// The target just went down, or its trouble changed.
    Down,
    /// It has been down this long; said every [`STILL_DOWN_EVERY`].
    StillDown(Duration),
}

/// The decision after a failed probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfterFailure {
    /// How long to wait before the next probe.
    pub wait: Duration,
    /// What to log, if anything.
    pub log: Option<LogLine>,
}

/// The probes of one target: consecutive failures, and what was logged when.
#[derive(Debug, Clone)]
pub struct Probes {
    policy: Policy,
    failures: u32,
    trouble: Option<Trouble>,
    down_since: Option<Instant>,
    logged_at: Option<Instant>,
}

impl Probes {
    /// Waits doubling from `first` to `cap`.
    pub fn new(first: Duration, cap: Duration) -> Probes {
        Probes {
            policy: Policy {
                base: first,
                cap,
                max_server_hint: cap,
                jitter: Jitter::None,
                hints: Hints::Clamp,
                limit: Limit::Caller,
            },
            failures: 0,
            trouble: None,
            down_since: None,
            logged_at: None,
        }
    }

    /// The probes of a target that is not ready: [`FIRST_WAIT`] doubling to [`MAX_WAIT`].
    pub fn target() -> Probes {
        Probes::new(FIRST_WAIT, MAX_WAIT)
    }

    /// Records a failed probe at `now`. A server's `hint` (`Retry-After`) can lengthen the wait up to the cap,
    /// never shorten it: an outage stays cheap whatever the server says.
    pub fn failed(
        &mut self,
        trouble: Trouble,
        hint: Option<Duration>,
        now: Instant,
    ) -> AfterFailure {
        self.failures = self.failures.saturating_add(1);
        let wait = self
            .policy
            .delay(self.failures, None, 0.0)
            .max(hint.unwrap_or_default().min(self.policy.cap));
        let down_since = *self.down_since.get_or_insert(now);
        let log = if self.trouble.as_ref() != Some(&trouble) {
            Some(LogLine::Down)
        } else if self
            .logged_at
            .is_some_and(|at| now.saturating_duration_since(at) >= STILL_DOWN_EVERY)
        {
            Some(LogLine::StillDown(
                now.saturating_duration_since(down_since),
            ))
        } else {
            None
        };
        if log.is_some() {
            self.logged_at = Some(now);
        }
        self.trouble = Some(trouble);
        AfterFailure { wait, log }
    }

    /// Records a probe that succeeded at `now`; returns how long the target was down, if it was.
    pub fn recovered(&mut self, now: Instant) -> Option<Duration> {
        self.failures = 0;
        self.trouble = None;
        self.logged_at = None;
        self.down_since
            .take()
            .map(|since| now.saturating_duration_since(since))
    }

    /// Whether the last probe failed.
    pub fn is_down(&self) -> bool {
        self.down_since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Probes an unreachable target for a simulated day under paused time, as the scheduler does: probe, wait.
    // See: #19
    #[tokio::test(start_paused = true)]
    async fn an_unreachable_target_is_probed_ever_less_often_and_logged_on_change_and_hourly() {
        let mut probes = Probes::target();
        let started = Instant::now();
        let mut waits = Vec::new();
        let mut lines = Vec::new();
        while started.elapsed() < Duration::from_secs(24 * 3600) {
            let after = probes.failed(Trouble::Unreachable, None, Instant::now());
            if let Some(line) = after.log {
                lines.push((started.elapsed(), line));
            }
            waits.push(after.wait);
            tokio::time::sleep(after.wait).await;
        }
        let secs = |s| Duration::from_secs(s);
        assert_eq!(
            waits[..8],
            [5, 10, 20, 40, 80, 160, 300, 300].map(secs),
            "doubling to the cap"
        );
        assert!(waits.iter().all(|w| *w <= MAX_WAIT));
        // A day is 5 + 10 + … + 160 = 315 s of doubling, then one probe every 5 minutes.
        assert!(waits.len() < 300, "{} probes", waits.len());
        // One line when it went down, then one an hour: 24 in a day, not one per probe.
        assert_eq!(lines[0], (Duration::ZERO, LogLine::Down));
        assert_eq!(lines.len(), 24, "{lines:?}");
        for pair in lines.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(
                gap >= STILL_DOWN_EVERY && gap < STILL_DOWN_EVERY + MAX_WAIT,
                "{lines:?}"
            );
        }
        let (at, LogLine::StillDown(down_for)) = &lines[1] else {
            panic!("{lines:?}")
        };
        assert_eq!(at, down_for, "the outage is counted from its first probe");

        // Back up: said once, with how long it lasted; the next outage starts from the first wait again.
        let down_for = probes.recovered(Instant::now()).unwrap();
        assert!(down_for >= secs(24 * 3600), "{down_for:?}");
        assert!(!probes.is_down());
        assert_eq!(probes.recovered(Instant::now()), None);
        let again = probes.failed(Trouble::Unreachable, None, Instant::now());
        assert_eq!(
            again,
            AfterFailure {
                wait: FIRST_WAIT,
                log: Some(LogLine::Down)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_trouble_is_logged_and_hints_only_lengthen_the_wait() {
        let mut probes = Probes::target();
        let now = Instant::now();
        assert_eq!(
            probes.failed(Trouble::Unreachable, None, now).log,
            Some(LogLine::Down)
        );
        assert_eq!(probes.failed(Trouble::Unreachable, None, now).log, None);
        let full = Trouble::Degraded("the target has no space left".into());
        let after = probes.failed(full.clone(), Some(Duration::from_secs(1)), now);
        assert_eq!(after.log, Some(LogLine::Down));
        assert_eq!(
            after.wait,
            Duration::from_secs(20),
            "a short hint does not hurry the probe"
        );
        let after = probes.failed(full, Some(Duration::from_secs(86_400)), now);
        assert_eq!((after.wait, after.log), (MAX_WAIT, None));
    }
}
