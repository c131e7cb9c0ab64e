//! One target's part of the status report ([`TargetReport`], the `targets` object of `status --json`), and the
//! sums the report's top level shows.

use serde::{Deserialize, Serialize};

use super::{
    FailedPath, FinishedPath, InFlightUpload, StatusReport, TargetInfo, TargetState, Totals,
    TotalsReport,
};

/// What `status` says about one target: the top-level fields of a report that concern a target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetReport {
    /// Paths waiting for this target (including those waiting to be retried).
    pub queued: u64,
    /// Paths being uploaded to it right now.
    pub in_flight: u64,
    /// Paths uploaded to it since the daemon started.
    pub done: u64,
    /// Paths parked as failed for it, waiting for `retry`.
    pub failed: u64,
    /// Paths since start it needed no upload of.
    pub skipped: u64,
    /// Paths since start its filters left out.
    pub excluded: u64,
    /// Nothing waits for it and uploads are not held.
    pub up_to_date: bool,
    /// When its most recent upload finished, in Unix seconds.
    pub last_upload_at: Option<u64>,
    /// The target itself.
    pub target: TargetInfo,
    /// Its uploads running now.
    pub in_flight_uploads: Vec<InFlightUpload>,
    /// Its most recently finished paths, newest first.
    pub recent: Vec<FinishedPath>,
    /// Its paths parked as failed, and queued ones whose last attempt failed.
    pub failed_paths: Vec<FailedPath>,
    /// Its counters of finished paths and bytes.
    pub totals: TotalsReport,
}

impl StatusReport {
    /// The targets as (name, info): every one of `targets`, or the top-level `target` of a report without them.
    pub fn target_infos(&self) -> Vec<(&str, &TargetInfo)> {
        if self.targets.is_empty() {
            vec![(crate::config::DEFAULT_TARGET, &self.target)]
        } else {
            self.targets
                .iter()
                .map(|(name, t)| (name.as_str(), &t.target))
                .collect()
        }
    }

    /// The first target in `state`, named when the report has several: (`NAME: `, info).
    pub(super) fn target_in(&self, state: TargetState) -> Option<(String, &TargetInfo)> {
        let several = self.targets.len() > 1;
        self.target_infos()
            .into_iter()
            .find(|(_, t)| t.state == state)
            .map(|(name, t)| {
                let label = if several {
                    format!("{name}: ")
                } else {
                    String::new()
                };
                (label, t)
            })
    }

    /// Paths held back by any target's filters until `nixpush retry`.
    pub(super) fn held_back_waiting(&self) -> u64 {
        self.target_infos()
            .iter()
            .map(|(_, t)| t.filtered.waiting_for_retry)
            .sum()
    }
}

/// `a` plus `b`.
pub fn add_totals(a: Totals, b: Totals) -> Totals {
    Totals {
        uploaded: a.uploaded + b.uploaded,
        already_present: a.already_present + b.already_present,
        skipped_upstream: a.skipped_upstream + b.skipped_upstream,
        excluded: a.excluded + b.excluded,
        skipped_gone: a.skipped_gone + b.skipped_gone,
        failed: a.failed + b.failed,
        nar_bytes: a.nar_bytes + b.nar_bytes,
        file_bytes: a.file_bytes + b.file_bytes,
        held_back: a.held_back + b.held_back,
    }
}
