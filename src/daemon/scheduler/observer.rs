//! What happens to each finished path: a log line, a metric, and (unless it needs a retry) the history.

use super::*;

/// Logs every finished path, counts it for `/metrics`, and records the ones that need no retry in the queue's
/// history.
pub(super) struct DaemonObserver {
    pub(super) queue: Arc<dyn Queue>,
    /// The target's name, the `target` label of its metrics.
    pub(super) name: String,
    /// The target URL (password-redacted), for the `target` log field.
    pub(super) target: String,
    pub(super) metrics: Arc<Counters>,
}

impl Observer for DaemonObserver {
    fn path_finished(&self, report: &PathReport) {
        upload::log_report(report, Some(&self.target));
        count_finished(&self.metrics, &self.name, report);
        let (outcome, reason) = match &report.outcome {
            PathOutcome::Uploaded => (Outcome::Uploaded, None),
            // Every rebuild's closure is mostly paths the cache already has; listing them would bury the
            // uploads in `status`.
            PathOutcome::AlreadyPresent => return,
            PathOutcome::SkippedUpstream => (Outcome::SkippedUpstream, None),
            PathOutcome::Excluded(reason) => (Outcome::Excluded, Some(reason.clone())),
            PathOutcome::HeldBack(reason) => (Outcome::HeldBack, Some(reason.clone())),
            // Failures are recorded once the scheduler decides between retry and parking.
            PathOutcome::Failed(_) => return,
        };
        record(&*self.queue, report, outcome, reason);
    }

    fn narinfo_uploaded(&self, _path: &crate::store_path::StorePath, bytes: u64) {
        self.metrics.narinfo_uploaded(&self.name, bytes);
    }
}

/// Counts a finished path, the way `status` totals it.
fn count_finished(metrics: &Counters, target: &str, report: &PathReport) {
    match &report.outcome {
        PathOutcome::Uploaded => metrics.uploaded(
            target,
            report.file_size.unwrap_or(0),
            Duration::from_millis(report.duration_ms.unwrap_or(0)),
        ),
        PathOutcome::AlreadyPresent => metrics.skipped(target, Skip::AlreadyPresent),
        PathOutcome::SkippedUpstream => metrics.skipped(target, Skip::Upstream),
        PathOutcome::Excluded(_) => metrics.skipped(target, Skip::Excluded),
        PathOutcome::HeldBack(_) => metrics.skipped(target, Skip::HeldBack),
        // Counted per queued path once the scheduler has the error (`upload_failed`).
        PathOutcome::Failed(_) => {}
    }
}

pub(super) fn record(
    queue: &dyn Queue,
    report: &PathReport,
    outcome: Outcome,
    reason: Option<String>,
) {
    let uploaded = outcome == Outcome::Uploaded;
    let record = HistoryRecord {
        path: report.path.clone(),
        outcome,
        nar_size: uploaded.then_some(report.nar_size),
        file_size: report.file_size,
        duration_ms: report.duration_ms.unwrap_or(0),
        reason,
        finished_at_ms: queue::now_ms(),
    };
    if let Err(e) = queue.record_finished(&record) {
        tracing::warn!(store_path = %report.path, "cannot record history: {e}");
    }
}
