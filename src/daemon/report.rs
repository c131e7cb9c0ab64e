//! Builds the [`StatusReport`] from the queue, the spool and the engine's status. The queue's records are
//! converted here into the report's own types, so a change to how the queue stores them cannot change
//! `status --json`.

use std::collections::BTreeMap;

use crate::config::{redact_url, Config};
use crate::queue::{self, Outcome, State};
use crate::status::{
    self, targets::add_totals, DaemonInfo, FailedPath, FilterStatus, FilteredPath, FinishedPath,
    RefusedRequest, StatusReport, TargetInfo, TargetReport, TargetState, STATUS_VERSION,
};

use super::{Shared, TargetLane};

/// Finished paths shown in `recent`.
const RECENT_SHOWN: usize = 20;
/// Refused requests shown.
const REFUSED_SHOWN: usize = 20;
/// Failing paths shown.
const FAILED_SHOWN: usize = 100;
/// Paths left out by the filters shown.
const FILTERED_SHOWN: usize = 20;

/// The rate in force and the rate measured on the wire.
fn upload_rate(lane: &TargetLane) -> status::UploadRate {
    let in_force = lane.in_force();
    let rate = lane.rate.rate();
    status::UploadRate {
        limit_bytes_per_sec: rate.bytes_per_sec(),
        source: in_force
            .map(|f| f.source.to_string())
            .unwrap_or_else(|| "unlimited".to_owned()),
        held: rate.is_hold(),
        measured_bytes_per_sec: lane.rate.measured_bytes_per_sec(),
        next_change_local: in_force
            .and_then(|f| f.until)
            .map(|t| t.format("%H:%M").to_string()),
        next_change_at: in_force
            .and_then(|f| f.until)
            .map(crate::rate_schedule::unix_secs),
    }
}

/// What `status` says about the target of `lane`.
fn target_report(
    shared: &Shared,
    lane: &TargetLane,
    config: &Config,
    spooled: u64,
) -> Result<TargetReport, queue::Error> {
    let queue = &lane.queue;
    let counts = queue.counts();
    let totals = queue.totals()?;
    let engine = lane.engine.borrow().clone();
    let mut failed_paths = Vec::new();
    let mut held_back_now = Vec::new();
    if counts.failed > 0 || counts.queued > 0 || counts.held_back > 0 {
        for entry in queue.entries()? {
            if entry.state == State::HeldBack && held_back_now.len() < FILTERED_SHOWN {
                held_back_now.push(FilteredPath {
                    reason: entry.last_error.clone().unwrap_or_default(),
                    path: entry.path.clone(),
                    outcome: Outcome::HeldBack,
                    at_ms: entry.updated_at_ms,
                });
            }
            let state = match entry.state {
                State::Failed => "failed",
                State::Queued if entry.last_error.is_some() => "retrying",
                // Shown with the target's filters, not as failing.
                State::Queued | State::Uploading | State::HeldBack => continue,
            };
            if failed_paths.len() < FAILED_SHOWN {
                failed_paths.push(FailedPath {
                    next_attempt_at: (entry.state == State::Queued)
                        .then_some(entry.next_attempt_at_ms / 1000),
                    path: entry.path,
                    state: state.to_owned(),
                    attempts: entry.attempts,
                    last_error: entry.last_error,
                    target: None,
                });
            }
        }
    }
    let since = status::Totals::from(totals.since_start);
    let history = queue.recent(queue::HISTORY_CAP)?;
    let last_upload_at = history
        .iter()
        .find(|r| r.outcome == Outcome::Uploaded)
        .map(|r| r.finished_at_ms / 1000);
    let up_to_date = !shared.hold
        && counts.queued == 0
        && counts.uploading == 0
        && counts.failed == 0
        && spooled == 0;
    let info = engine.info.as_ref();
    let url = config
        .named_target(&lane.name)
        .map(|t| redact_url(&t.url))
        .unwrap_or_default();
    Ok(TargetReport {
        queued: counts.queued,
        in_flight: counts.uploading,
        done: since.uploaded,
        failed: counts.failed,
        skipped: since.already_present + since.skipped_upstream + since.skipped_gone,
        excluded: since.excluded,
        up_to_date,
        last_upload_at,
        target: TargetInfo {
            url,
            state: engine.state,
            // The target's own words (its cache info, an error it sent) are scrubbed of secrets here too.
            message: crate::secret::scrub(&engine.message),
            reachable: engine.reachable,
            authorized: engine.authorized,
            read_url: info.and_then(|i| i.read_url.as_deref().map(crate::secret::scrub)),
            stats: info.and_then(|i| i.stats.clone()).map(scrub_json),
            degraded: engine.degraded.as_deref().map(crate::secret::scrub),
            filtered: FilterStatus {
                excluded: since.excluded,
                held_back: since.held_back,
                waiting_for_retry: counts.held_back,
                recent: filtered_recent(held_back_now, &history),
            },
            upload_rate: Some(upload_rate(lane)),
        },
        in_flight_uploads: engine.in_flight.clone(),
        // The history read above, newest first: its head is what `recent` shows.
        recent: history
            .into_iter()
            .take(RECENT_SHOWN)
            .map(FinishedPath::from)
            .collect(),
        failed_paths,
        totals: status::TotalsReport {
            since_start: totals.since_start.into(),
            all_time: totals.all_time.into(),
        },
    })
}

pub(super) fn build(shared: &Shared) -> Result<StatusReport, queue::Error> {
    let config = shared.config();
    let spooled = crate::spool::list(&config.spool_dir())
        .map(|files| files.len() as u64)
        .unwrap_or(0);
    let mut targets = BTreeMap::new();
    for lane in &shared.lanes {
        targets.insert(
            lane.name.clone(),
            target_report(shared, lane, &config, spooled)?,
        );
    }
    let several = targets.len() > 1;
    // The top level: the sums, one target's `target`, and the lists merged (each entry then names its
    // target).
    let named = |name: &str| several.then(|| name.to_owned());
    let mut in_flight_uploads = Vec::new();
    let mut recent = Vec::new();
    let mut failed_paths = Vec::new();
    let mut totals = status::TotalsReport::default();
    for (name, t) in &targets {
        in_flight_uploads.extend(t.in_flight_uploads.iter().cloned().map(|mut u| {
            u.target = named(name);
            u
        }));
        recent.extend(t.recent.iter().cloned().map(|mut r| {
            r.target = named(name);
            r
        }));
        failed_paths.extend(t.failed_paths.iter().cloned().map(|mut f| {
            f.target = named(name);
            f
        }));
        totals.since_start = add_totals(totals.since_start, t.totals.since_start);
        totals.all_time = add_totals(totals.all_time, t.totals.all_time);
    }
    recent.sort_by_key(|r| std::cmp::Reverse(r.finished_at_ms));
    recent.truncate(RECENT_SHOWN);
    failed_paths.truncate(FAILED_SHOWN);
    let sum = |field: fn(&TargetReport) -> u64| targets.values().map(field).sum::<u64>();
    // `[target]` when there is one, as before there were several; else the first by name.
    let first = targets
        .get(crate::config::DEFAULT_TARGET)
        .or_else(|| targets.values().next());
    Ok(StatusReport {
        version: STATUS_VERSION,
        queued: sum(|t| t.queued),
        in_flight: sum(|t| t.in_flight),
        done: sum(|t| t.done),
        failed: sum(|t| t.failed),
        refused: shared.queue.refused_total()?,
        skipped: sum(|t| t.skipped),
        excluded: sum(|t| t.excluded),
        spooled,
        up_to_date: targets.values().all(|t| t.up_to_date),
        last_upload_at: targets.values().filter_map(|t| t.last_upload_at).max(),
        state_dir_error: super::state_dir::check(&config.state_dir)
            .err()
            .map(|e| e.to_string()),
        queue_damage: shared.queue_damage.get().cloned(),
        watcher: shared
            .watcher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone(),
        gc_roots: shared.gc_roots.status(),
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
        target: first.map(|t| t.target.clone()).unwrap_or_else(|| {
            TargetInfo::new(String::new(), TargetState::Paused, "no target configured")
        }),
        in_flight_uploads,
        recent,
        failed_paths,
        refused_requests: shared
            .queue
            .refused(REFUSED_SHOWN)?
            .into_iter()
            .map(RefusedRequest::from)
            .collect(),
        totals,
        targets,
    })
}

/// The paths held back now (from the queue), then the history's later filter decisions on other paths, newest
/// first, at most [`FILTERED_SHOWN`].
fn filtered_recent(
    mut held_back_now: Vec<FilteredPath>,
    history: &[queue::HistoryRecord],
) -> Vec<FilteredPath> {
    for record in history {
        if held_back_now.len() >= FILTERED_SHOWN {
            break;
        }
        if !matches!(record.outcome, Outcome::Excluded | Outcome::HeldBack)
            || held_back_now.iter().any(|f| f.path == record.path)
        {
            continue;
        }
        held_back_now.push(FilteredPath {
            path: record.path.clone(),
            outcome: record.outcome,
            reason: record.reason.clone().unwrap_or_default(),
            at_ms: record.finished_at_ms,
        });
    }
    held_back_now.sort_by_key(|f| std::cmp::Reverse(f.at_ms));
    held_back_now
}

impl From<queue::HistoryRecord> for FinishedPath {
    fn from(record: queue::HistoryRecord) -> FinishedPath {
        FinishedPath {
            path: record.path,
            outcome: record.outcome,
            nar_size: record.nar_size,
            file_size: record.file_size,
            duration_ms: record.duration_ms,
            reason: record.reason,
            finished_at_ms: record.finished_at_ms,
            target: None,
        }
    }
}

impl From<queue::RefusedRecord> for RefusedRequest {
    fn from(record: queue::RefusedRecord) -> RefusedRequest {
        RefusedRequest {
            input: record.input,
            reason: record.reason,
            peer_uid: record.peer_uid,
            source: record.source,
            at_ms: record.at_ms,
        }
    }
}

impl From<queue::Totals> for status::Totals {
    fn from(totals: queue::Totals) -> status::Totals {
        status::Totals {
            uploaded: totals.paths(Outcome::Uploaded),
            already_present: totals.paths(Outcome::AlreadyPresent),
            skipped_upstream: totals.paths(Outcome::SkippedUpstream),
            excluded: totals.paths(Outcome::Excluded),
            skipped_gone: totals.paths(Outcome::SkippedGone),
            failed: totals.paths(Outcome::Failed),
            held_back: totals.paths(Outcome::HeldBack),
            nar_bytes: totals.nar_bytes,
            file_bytes: totals.file_bytes,
        }
    }
}

/// `value` with every string in it scrubbed of secrets.
fn scrub_json(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(crate::secret::scrub(&s)),
        Value::Array(items) => Value::Array(items.into_iter().map(scrub_json).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (crate::secret::scrub(&k), scrub_json(v)))
                .collect(),
        ),
        other => other,
    }
}
