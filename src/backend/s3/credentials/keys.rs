//! One set of AWS keys as a source handed them out, and when it is due for a refresh.
//!
//! Temporary keys (STS, instance metadata) carry an `Expiration`. They are refreshed 5 minutes before it, or
//! halfway through their life when that is shorter, so a source that hands out short-lived keys is not asked on
//! every request; they stay in use until they expire if a refresh fails, so a slow or briefly unreachable STS
//! fails no upload. Keys without an expiration (environment, credentials file) are read again on every
//! `prepare`, as rotated keys should take effect after an authentication pause.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

/// How long before `Expiration` temporary keys are refreshed, at most.
pub(super) const REFRESH_BEFORE: Duration = Duration::from_secs(300);
/// The least time keys are used before a refresh, so that keys handed out already expired (a skewed clock)
/// do not send a request to their source for every request to the bucket.
const MIN_USE: Duration = Duration::from_secs(2);

/// Access key id, secret and session token, with their expiration.
pub(crate) struct Keys {
    /// The keys in the form requests are signed with.
    pub(crate) s3: rusty_s3::Credentials,
    /// When they stop working, if they are temporary.
    expires: Option<SystemTime>,
    /// When to get new ones before that.
    refresh_at: Option<SystemTime>,
    /// The bucket refused them as expired or invalid: get new ones before the next request.
    stale: AtomicBool,
}

impl Keys {
    /// Keys fetched at `now`. Every part is remembered as a secret, so no server's echo of them reaches a message.
    pub(super) fn new(
        access_key_id: String,
        secret: String,
        token: Option<String>,
        expires: Option<SystemTime>,
        now: SystemTime,
    ) -> Keys {
        crate::secret::remember(&access_key_id);
        crate::secret::remember(&secret);
        let s3 = match token {
            Some(token) => {
                crate::secret::remember(&token);
                rusty_s3::Credentials::new_with_token(access_key_id, secret, token)
            }
            None => rusty_s3::Credentials::new(access_key_id, secret),
        };
        Keys {
            s3,
            refresh_at: expires.map(|expires| refresh_at(now, expires)),
            expires,
            stale: AtomicBool::new(false),
        }
    }

    /// Whether the keys have an expiration (and so are refreshed on a schedule).
    pub(crate) fn expires(&self) -> Option<SystemTime> {
        self.expires
    }

    /// Usable at `now` without asking the source again.
    pub(super) fn fresh(&self, now: SystemTime) -> bool {
        !self.is_stale() && self.refresh_at.is_none_or(|at| now < at)
    }

    /// Still accepted at `now`, as far as we know (not expired, not refused).
    pub(super) fn valid(&self, now: SystemTime) -> bool {
        !self.is_stale() && self.expires.is_none_or(|at| now < at)
    }

    /// Marks the keys as refused by the bucket.
    pub(super) fn mark_stale(&self) {
        self.stale.store(true, Ordering::SeqCst);
    }

    fn is_stale(&self) -> bool {
        self.stale.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("expires", &self.expires)
            .field("stale", &self.is_stale())
            .finish_non_exhaustive()
    }
}

/// When keys fetched at `fetched` that expire at `expires` are refreshed: [`REFRESH_BEFORE`] ahead of the
/// expiration, or halfway through a shorter life, but never sooner than [`MIN_USE`] after they came.
pub(super) fn refresh_at(fetched: SystemTime, expires: SystemTime) -> SystemTime {
    let life = expires.duration_since(fetched).unwrap_or(Duration::ZERO);
    let at = expires - REFRESH_BEFORE.min(life / 2);
    at.max(fetched + MIN_USE)
}

/// An `Expiration` as STS and instance metadata write it (RFC 3339, `2026-12-02T01:00:00Z`).
pub(super) fn parse_expiration(text: &str) -> Option<SystemTime> {
    let parsed =
        time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some(SystemTime::from(parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn refreshed_five_minutes_ahead_or_halfway() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(refresh_at(now, now + HOUR), now + HOUR - REFRESH_BEFORE);
        assert_eq!(
            refresh_at(now, now + Duration::from_secs(8)),
            now + Duration::from_secs(4)
        );
        // Already expired on arrival (a skewed clock): used briefly, not refetched for every request.
        assert_eq!(refresh_at(now, now - HOUR), now + MIN_USE);
    }

    #[test]
    fn temporary_keys_go_stale_then_invalid() {
        let now = SystemTime::now();
        let keys = Keys::new(
            "ASIAKEYSTEST".into(),
            "secret-keys-test".into(),
            Some("token-keys-test".into()),
            Some(now + Duration::from_secs(10)),
            now,
        );
        assert!(keys.fresh(now) && keys.valid(now));
        let later = now + Duration::from_secs(6);
        assert!(!keys.fresh(later) && keys.valid(later));
        assert!(!keys.valid(now + Duration::from_secs(10)));
        keys.mark_stale();
        assert!(!keys.fresh(now) && !keys.valid(now));
        assert!(
            !crate::secret::scrub("x secret-keys-test token-keys-test ASIAKEYSTEST")
                .contains("test")
        );
        let fixed = Keys::new("AKFIXEDTEST".into(), "s3cr3t-fixed".into(), None, None, now);
        assert!(fixed.fresh(now + HOUR * 1000) && fixed.expires().is_none());
    }

    #[test]
    fn expirations_as_sts_and_imds_write_them() {
        let at = parse_expiration("2026-12-02T01:00:00Z").unwrap();
        assert_eq!(
            at.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
            Duration::from_secs(1_796_173_200)
        );
        assert!(parse_expiration("2026-12-02T01:00:00.123+00:00").is_some());
        assert!(parse_expiration("tomorrow").is_none());
    }
}
