//! What a push did: the summary it prints (for humans, or as JSON), per target and summed over several, and the
//! tally that turns the rounds' reports into each path's final outcome.

use std::collections::HashMap;

use serde::Serialize;

use crate::store_path::StorePath;
use crate::upload::{human_bytes, PathOutcome, PathReport};

/// The end-of-run summary, printed for humans or as JSON. A push to several targets prints the sums, with each
/// target's own summary in `targets`.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// Target (password-redacted); several are joined by `, `.
    pub target: String,
    /// Paths uploaded now.
    pub uploaded: usize,
    /// Paths the target already had.
    pub already_present: usize,
    /// Paths an upstream cache serves.
    pub skipped_upstream: usize,
    /// Paths the filters left out (`include`, `exclude`, `max_nar_size`).
    pub excluded: usize,
    /// Paths held back: a reference of each is filtered out and neither the target nor an upstream has it.
    pub held_back: Vec<Failure>,
    /// Requested paths no longer in the store.
    pub gone: Vec<StorePath>,
    /// Paths that failed, with the reason.
    pub failed: Vec<Failure>,
    /// Uncompressed NAR bytes uploaded.
    pub nar_bytes: u64,
    /// Compressed bytes uploaded.
    pub file_bytes: u64,
    /// Wall time in milliseconds.
    pub wall_time_ms: u64,
    /// Stopped by Ctrl-C: the `landed` paths are in the cache, the `failed` ones are not.
    pub interrupted: bool,
    /// Paths uploaded now, in the order they landed.
    pub landed: Vec<StorePath>,
    /// Each target's summary, when the push went to more than one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<Summary>,
}

/// One path that did not reach the cache, with the reason (failed or held back).
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// The path.
    pub path: StorePath,
    /// Why.
    pub reason: String,
}

impl Summary {
    /// The sums of several targets' summaries, which it keeps in `targets`.
    pub(super) fn sum(targets: Vec<Summary>) -> Summary {
        let mut sum = Summary {
            target: targets
                .iter()
                .map(|t| t.target.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            ..Summary::default()
        };
        for t in &targets {
            sum.uploaded += t.uploaded;
            sum.already_present += t.already_present;
            sum.skipped_upstream += t.skipped_upstream;
            sum.excluded += t.excluded;
            sum.nar_bytes += t.nar_bytes;
            sum.file_bytes += t.file_bytes;
            sum.wall_time_ms = sum.wall_time_ms.max(t.wall_time_ms);
            sum.interrupted |= t.interrupted;
            sum.held_back.extend(t.held_back.iter().cloned());
            sum.gone.extend(t.gone.iter().cloned());
            sum.failed.extend(t.failed.iter().cloned());
            sum.landed.extend(t.landed.iter().cloned());
        }
        sum.targets = targets;
        sum
    }
}

/// The final outcome of every path a push considered, in the order they first finished. An upload is final
/// even when a later round finds the path already present.
#[derive(Default)]
pub(super) struct Tally {
    order: Vec<StorePath>,
    latest: HashMap<StorePath, PathReport>,
}

impl Tally {
    pub(super) fn add(&mut self, report: &PathReport) {
        match self.latest.get(&report.path) {
            Some(earlier) if earlier.outcome == PathOutcome::Uploaded => {}
            Some(_) => {
                self.latest.insert(report.path.clone(), report.clone());
            }
            None => {
                self.order.push(report.path.clone());
                self.latest.insert(report.path.clone(), report.clone());
            }
        }
    }

    pub(super) fn fill(&self, summary: &mut Summary) {
        for report in self.order.iter().filter_map(|p| self.latest.get(p)) {
            match &report.outcome {
                PathOutcome::Uploaded => {
                    summary.uploaded += 1;
                    summary.landed.push(report.path.clone());
                    summary.nar_bytes += report.nar_size;
                    summary.file_bytes += report.file_size.unwrap_or(0);
                }
                PathOutcome::AlreadyPresent => summary.already_present += 1,
                PathOutcome::SkippedUpstream => summary.skipped_upstream += 1,
                PathOutcome::Excluded(_) => summary.excluded += 1,
                PathOutcome::HeldBack(reason) => summary.held_back.push(Failure {
                    path: report.path.clone(),
                    reason: reason.clone(),
                }),
                PathOutcome::Failed(reason) => summary.failed.push(Failure {
                    path: report.path.clone(),
                    reason: reason.clone(),
                }),
            }
        }
    }
}

/// The human summary.
pub fn render_summary(s: &Summary) -> String {
    // The held-back count only when there is one, so the line reads as before for a target without filters.
    let held_back = match s.held_back.len() {
        0 => String::new(),
        n => format!(", {n} held back"),
    };
    let mut out = format!(
        "pushed to {}: {} uploaded, {} already present, {} skipped (upstream), {} excluded{held_back}, {} failed\n",
        s.target,
        s.uploaded,
        s.already_present,
        s.skipped_upstream,
        s.excluded,
        s.failed.len() + s.gone.len()
    );
    if s.uploaded > 0 {
        let ratio = if s.nar_bytes > 0 {
            s.file_bytes as f64 / s.nar_bytes as f64 * 100.0
        } else {
            0.0
        };
        out.push_str(&format!(
            "{} of NARs → {} compressed ({ratio:.0} %) in {:.1} s\n",
            human_bytes(s.nar_bytes),
            human_bytes(s.file_bytes),
            s.wall_time_ms as f64 / 1000.0
        ));
    } else {
        out.push_str(&format!(
            "done in {:.1} s\n",
            s.wall_time_ms as f64 / 1000.0
        ));
    }
    for path in &s.gone {
        out.push_str(&format!("  gone: {path} is no longer in the store\n"));
    }
    if s.interrupted {
        out.push_str(&format!(
            "interrupted: {} path(s) uploaded before the interruption, {} not uploaded\n",
            s.landed.len(),
            s.failed.len()
        ));
        for path in &s.landed {
            out.push_str(&format!("  landed: {path}\n"));
        }
        for failure in &s.failed {
            out.push_str(&format!("  not uploaded: {}\n", failure.path));
        }
        return out;
    }
    for held in &s.held_back {
        out.push_str(&format!("  held back: {}: {}\n", held.path, held.reason));
    }
    for failure in &s.failed {
        out.push_str(&format!("  failed: {}: {}\n", failure.path, failure.reason));
    }
    out
}
