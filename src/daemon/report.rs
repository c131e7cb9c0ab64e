//! Builds the [`StatusReport`] from the queue, the spool and the engine's status.

use crate::config::redact_url;
use crate::queue::{self, Outcome, State};
use crate::status::{DaemonInfo, FailedPath, StatusReport, TargetInfo, STATUS_VERSION};

use super::Shared;

/// Finished paths shown in `recent`.
const RECENT_SHOWN: usize = 20;
/// Refused requests shown.
const REFUSED_SHOWN: usize = 20;
/// Failing paths shown.
const FAILED_SHOWN: usize = 100;

pub(super) fn build(shared: &Shared) -> Result<StatusReport, queue::Error> {
    let config = shared.config();
    let counts = shared.queue.counts();
    let totals = shared.queue.totals()?;
    let engine = shared.engine.borrow().clone();
    let mut failed_paths = Vec::new();
    if counts.failed > 0 || counts.queued > 0 {
        for entry in shared.queue.entries()? {
            let state = match entry.state {
                State::Failed => "failed",
                State::Queued if entry.last_error.is_some() => "retrying",
                State::Queued | State::Uploading => continue,
            };
            failed_paths.push(FailedPath {
                next_attempt_at: (entry.state == State::Queued)
                    .then_some(entry.next_attempt_at_ms / 1000),
                path: entry.path,
                state: state.to_owned(),
                attempts: entry.attempts,
                last_error: entry.last_error,
            });
            if failed_paths.len() == FAILED_SHOWN {
                break;
            }
        }
    }
    let since = totals.since_start;
    let spooled = crate::spool::list(&config.spool_dir())
        .map(|files| files.len() as u64)
        .unwrap_or(0);
    let last_upload_at = shared
        .queue
        .recent(queue::HISTORY_CAP)?
        .iter()
        .find(|r| r.outcome == Outcome::Uploaded)
        .map(|r| r.finished_at_ms / 1000);
    let up_to_date = !shared.hold
        && counts.queued == 0
        && counts.uploading == 0
        && counts.failed == 0
        && spooled == 0;
    let info = engine.info.as_ref();
    Ok(StatusReport {
        version: STATUS_VERSION,
        queued: counts.queued,
        in_flight: counts.uploading,
        done: since.uploaded,
        failed: counts.failed,
        refused: shared.queue.refused_total()?,
        skipped: since.already_present + since.skipped_upstream + since.skipped_gone,
        excluded: since.excluded,
        spooled,
        up_to_date,
        last_upload_at,
        state_dir_error: super::state_dir::check(&config.state_dir)
            .err()
            .map(|e| e.to_string()),
        queue_damage: shared.queue_damage.get().cloned(),
        watcher: shared
            .watcher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone(),
        daemon: DaemonInfo {
            pid: std::process::id(),
            started_at: shared
                .started_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            uptime_secs: shared.started.elapsed().as_secs(),
            hold: shared.hold,
        },
        target: TargetInfo {
            url: redact_url(&config.target.url),
            state: engine.state,
            message: engine.message.clone(),
            reachable: engine.reachable,
            authorized: engine.authorized,
            read_url: info.and_then(|i| i.read_url.clone()),
            stats: info.and_then(|i| i.stats.clone()),
        },
        in_flight_uploads: engine.in_flight.clone(),
        recent: shared.queue.recent(RECENT_SHOWN)?,
        failed_paths,
        refused_requests: shared.queue.refused(REFUSED_SHOWN)?,
        totals,
    })
}
