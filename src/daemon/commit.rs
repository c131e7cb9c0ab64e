//! Group commit: many requests, one fsync.
//!
//! A handler writes to the queue, then calls [`GroupCommit::make_durable_blocking`] on the same blocking thread. If
//! a flush that covers its writes already finished, it returns at once; otherwise it flushes. The queue's flush is
//! itself the group commit (see [`crate::queue::SqliteQueue`]): it commits whatever every writer has written so
//! far, and a flush that finds an fdatasync in progress waits for it and then syncs once for everyone who wrote
//! meanwhile. So a burst of hooks shares a handful of fsyncs, and no request waits on a hand-off to another task
//! to get its own covered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::queue::Queue;

/// Why a write could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The flush failed.
    #[error("the queue could not be flushed to disk: {0}")]
    Flush(String),
    /// The flushing thread died.
    #[error("the queue flush stopped: {0}")]
    Stopped(String),
}

/// Makes queue writes durable; clones share what is known to be on disk.
#[derive(Clone)]
pub struct GroupCommit {
    queue: Arc<dyn Queue>,
    durable: Arc<AtomicU64>,
}

impl GroupCommit {
    /// A group commit over `queue`.
    pub fn new(queue: Arc<dyn Queue>) -> GroupCommit {
        GroupCommit {
            queue,
            durable: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Returns once every queue write made before this call is on disk. Blocks for an fdatasync at most.
    pub fn make_durable_blocking(&self) -> Result<(), Error> {
        let needed = self.queue.writes();
        if self.durable.load(Ordering::SeqCst) >= needed {
            return Ok(());
        }
        self.queue
            .flush()
            .map_err(|e| Error::Flush(e.to_string()))?;
        // The flush covered every write counted before it began, so at least `needed`.
        self.durable.fetch_max(needed, Ordering::SeqCst);
        Ok(())
    }

    /// [`GroupCommit::make_durable_blocking`] on a blocking thread, when a flush is needed.
    pub async fn make_durable(&self) -> Result<(), Error> {
        if self.durable.load(Ordering::SeqCst) >= self.queue.writes() {
            return Ok(());
        }
        let commit = self.clone();
        tokio::task::spawn_blocking(move || commit.make_durable_blocking())
            .await
            .map_err(|e| Error::Stopped(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::SqliteQueue;
    use crate::store_path::StorePath;

    #[test]
    fn concurrent_writers_all_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Arc::new(SqliteQueue::open(&dir.path().join("queue.sqlite3")).unwrap());
        let queue: Arc<dyn Queue> = sqlite.clone();
        let commit = GroupCommit::new(queue.clone());
        let writers: Vec<_> = (0..50u32)
            .map(|n| {
                let (queue, commit) = (queue.clone(), commit.clone());
                std::thread::spawn(move || {
                    let path =
                        StorePath::parse(&format!("/nix/store/{n:0>32}-x"), "/nix/store").unwrap();
                    queue.enqueue(&[path], "test", 1).unwrap();
                    let needed = queue.writes();
                    commit.make_durable_blocking().unwrap();
                    assert!(commit.durable.load(Ordering::SeqCst) >= needed);
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        assert_eq!(commit.durable.load(Ordering::SeqCst), 50);
        let commits = sqlite.commit_stats().commits;
        assert!((1..=50).contains(&commits), "{commits} commits");
        // Nothing new written: no flush needed.
        commit.make_durable_blocking().unwrap();
        assert_eq!(sqlite.commit_stats().commits, commits);
    }
}
