//! How the engine finished with a path: one vocabulary for the queue's history and the status report. A value,
//! not a record, so the two keep their own record types and share only this. Its names are stored (history rows)
//! and shown (`status --json`) alike, so `tests` pins them: renaming one would orphan stored history.

use serde::{Deserialize, Serialize};

/// How the engine finished with a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// NAR and narinfo written to the target.
    Uploaded,
    /// The target already had it.
    AlreadyPresent,
    /// An upstream cache serves it.
    SkippedUpstream,
    /// Filtered out by the target's `include`, `exclude` or `max_nar_size`.
    Excluded,
    /// Garbage-collected before it could be uploaded.
    SkippedGone,
    /// Gave up on it.
    Failed,
    /// Held back: a reference of it is filtered out and no cache has it.
    HeldBack,
}

impl Outcome {
    /// Every outcome, in declaration order (so `outcome as usize` indexes it).
    pub const ALL: [Outcome; 7] = [
        Outcome::Uploaded,
        Outcome::AlreadyPresent,
        Outcome::SkippedUpstream,
        Outcome::Excluded,
        Outcome::SkippedGone,
        Outcome::Failed,
        Outcome::HeldBack,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_pinned() {
        let all = [
            (Outcome::Uploaded, "uploaded"),
            (Outcome::AlreadyPresent, "already_present"),
            (Outcome::SkippedUpstream, "skipped_upstream"),
            (Outcome::Excluded, "excluded"),
            (Outcome::SkippedGone, "skipped_gone"),
            (Outcome::Failed, "failed"),
            (Outcome::HeldBack, "held_back"),
        ];
        for (outcome, name) in all {
            assert_eq!(serde_json::to_value(outcome).unwrap(), name);
            assert_eq!(
                serde_json::from_value::<Outcome>(name.into()).unwrap(),
                outcome
            );
        }
    }
}
