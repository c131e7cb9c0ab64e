//! `gc_roots_max_bytes`: which failed paths lose their roots when the rooted NAR bytes exceed the bound. Paths
//! queued or uploading keep theirs whatever the total (they leave the queue soon); failed ones wait for an
//! operator, so they give way, the one that failed longest ago first.

use crate::store_path::StorePath;

/// A failed path that still has its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRoot {
    /// The path.
    pub path: StorePath,
    /// Its NAR size.
    pub nar_size: u64,
    /// When it was parked as failed (unix ms).
    pub failed_at_ms: u64,
}

/// The failed paths to release, oldest first, until `rooted_bytes` is at most `max_bytes` (or no failed path is
/// left to release).
pub fn over_limit(
    rooted_bytes: u64,
    max_bytes: u64,
    mut failed: Vec<FailedRoot>,
) -> Vec<StorePath> {
    if rooted_bytes <= max_bytes {
        return Vec::new();
    }
    failed
        .sort_by(|a, b| (a.failed_at_ms, a.path.as_str()).cmp(&(b.failed_at_ms, b.path.as_str())));
    let mut total = rooted_bytes;
    let mut released = Vec::new();
    for root in failed {
        if total <= max_bytes {
            break;
        }
        total = total.saturating_sub(root.nar_size);
        released.push(root.path);
    }
    released
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store_path::test_path;

    fn failed(name: &str, nar_size: u64, failed_at_ms: u64) -> FailedRoot {
        FailedRoot {
            path: test_path(name),
            nar_size,
            failed_at_ms,
        }
    }

    #[test]
    fn the_oldest_failed_paths_go_first_and_only_as_many_as_needed() {
        let roots = vec![
            failed("new", 50, 300),
            failed("old", 30, 100),
            failed("mid", 40, 200),
        ];
        assert!(over_limit(100, 100, roots.clone()).is_empty());
        let names = |paths: Vec<StorePath>| {
            paths
                .iter()
                .map(|p| p.name().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(over_limit(120, 100, roots.clone())), ["old"]);
        assert_eq!(names(over_limit(160, 100, roots.clone())), ["old", "mid"]);
        // Queued paths alone exceed the bound: every failed path goes, and that is all that can be done.
        assert_eq!(names(over_limit(1000, 100, roots)), ["old", "mid", "new"]);
        assert!(over_limit(1000, 100, Vec::new()).is_empty());
    }
}
