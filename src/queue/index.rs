//! The in-memory view of one target's entries: counts per state, due order, the oldest waiting path, and the
//! since-start totals. Rebuilt from the database at open, so it cannot disagree with what is on disk.

use std::collections::BTreeSet;

use super::{Counts, Entry, State, Totals};
use crate::store_path::StorePath;

/// In-memory view of one target's entries, plus its since-start totals.
#[derive(Default)]
pub(super) struct Index {
    pub(super) counts: Counts,
    pub(super) due: BTreeSet<(u64, StorePath)>,
    pub(super) since_start: Totals,
    /// Queued and uploading entries by when they were queued, for the oldest one's age.
    pub(super) waiting: BTreeSet<(u64, StorePath)>,
    /// Queued entries whose last attempt failed.
    pub(super) retrying: u64,
}

impl Index {
    pub(super) fn add(&mut self, entry: &Entry) {
        if entry.state != State::Failed {
            self.waiting
                .insert((entry.enqueued_at_ms, entry.path.clone()));
        }
        if entry.state == State::Queued && entry.last_error.is_some() {
            self.retrying += 1;
        }
        match entry.state {
            State::Queued => {
                self.counts.queued += 1;
                self.due
                    .insert((entry.next_attempt_at_ms, entry.path.clone()));
            }
            State::Uploading => self.counts.uploading += 1,
            State::Failed => self.counts.failed += 1,
            State::HeldBack => self.counts.held_back += 1,
        }
    }

    pub(super) fn remove(&mut self, entry: &Entry) {
        if entry.state != State::Failed {
            self.waiting
                .remove(&(entry.enqueued_at_ms, entry.path.clone()));
        }
        if entry.state == State::Queued && entry.last_error.is_some() {
            self.retrying = self.retrying.saturating_sub(1);
        }
        match entry.state {
            State::Queued => {
                self.counts.queued = self.counts.queued.saturating_sub(1);
                self.due
                    .remove(&(entry.next_attempt_at_ms, entry.path.clone()));
            }
            State::Uploading => self.counts.uploading = self.counts.uploading.saturating_sub(1),
            State::Failed => self.counts.failed = self.counts.failed.saturating_sub(1),
            State::HeldBack => self.counts.held_back = self.counts.held_back.saturating_sub(1),
        }
    }
}
