//! Keeps a target's [`RateLimiter`] at the rate its schedule says, as the local time crosses window edges and
//! as the configuration changes (SIGHUP): the limiter's new rate applies to uploads already in flight.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::rate::RateLimiter;
use crate::rate_schedule::{self, InForce, Rate, RateWindow};

/// Longest sleep between two looks at the clock: a window edge, a reload or a clock change (DST, NTP) takes
/// effect within it.
const RECHECK: Duration = Duration::from_secs(1);

/// The rate in force now for `max_upload_rate` and `windows`, set on `limiter`.
pub fn apply(limiter: &RateLimiter, max_upload_rate: Rate, windows: &[RateWindow]) -> InForce {
    let in_force = rate_schedule::in_force(max_upload_rate, windows, rate_schedule::local_now());
    limiter.set_rate(in_force.rate);
    in_force
}

/// Applies the schedule `settings()` returns until `stop`, telling `changed` whenever the rate in force (or
/// its source or end) changes. When `stop` comes during a hold, the limiter is aborted, so uploads paused by
/// the hold end instead of holding up shutdown.
pub async fn govern(
    limiter: Arc<RateLimiter>,
    settings: impl Fn() -> (Rate, Vec<RateWindow>),
    changed: impl Fn(&InForce),
    stop: CancellationToken,
) {
    let mut last: Option<InForce> = None;
    loop {
        let (max_upload_rate, windows) = settings();
        let in_force = apply(&limiter, max_upload_rate, &windows);
        if last != Some(in_force) {
            if last.is_some_and(|l| l.rate != in_force.rate) {
                tracing::info!(
                    "upload rate now {} ({}){}",
                    in_force.rate,
                    in_force.source,
                    in_force
                        .until
                        .map(|t| format!(" until {}", t.format("%H:%M")))
                        .unwrap_or_default()
                );
            }
            changed(&in_force);
            last = Some(in_force);
        }
        let until_edge = in_force
            .until
            .map(|t| Duration::from_secs(rate_schedule::secs_until(t)))
            .unwrap_or(RECHECK);
        tokio::select! {
            _ = stop.cancelled() => {
                if limiter.is_held() {
                    limiter.abort();
                }
                return;
            }
            _ = tokio::time::sleep(until_edge.clamp(Duration::from_millis(100), RECHECK)) => {}
        }
    }
}
