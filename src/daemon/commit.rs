//! Group commit: many requests, one fsync.
//!
//! A handler writes to the queue, then calls [`GroupCommit::make_durable`]. If a flush that covers its writes
//! already finished, it returns at once; otherwise it registers with the committer task. The committer takes
//! everyone registered so far, notes the queue's write count, flushes once, and answers them all; whoever
//! registers during that flush is served by the next one. A burst of hooks thus shares a handful of fsyncs instead
//! of queueing behind one fsync each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::queue::Queue;

/// Why a write could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The flush failed.
    #[error("the queue could not be flushed to disk: {0}")]
    Flush(String),
    /// The committer task is gone (the runtime is shutting down).
    #[error("the queue committer has stopped")]
    Stopped,
}

type Waiter = oneshot::Sender<Result<(), Error>>;

/// Handle to the committer task.
pub struct GroupCommit {
    queue: Arc<dyn Queue>,
    durable: Arc<AtomicU64>,
    requests: mpsc::UnboundedSender<Waiter>,
}

impl GroupCommit {
    /// Starts the committer on the current runtime. It stops when this handle is dropped.
    pub fn start(queue: Arc<dyn Queue>) -> GroupCommit {
        let (requests, receiver) = mpsc::unbounded_channel();
        let durable = Arc::new(AtomicU64::new(0));
        tokio::spawn(committer(queue.clone(), durable.clone(), receiver));
        GroupCommit {
            queue,
            durable,
            requests,
        }
    }

    /// Returns once every queue write made before this call is on disk.
    pub async fn make_durable(&self) -> Result<(), Error> {
        let needed = self.queue.writes();
        if self.durable.load(Ordering::SeqCst) >= needed {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.requests.send(tx).map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }
}

async fn committer(
    queue: Arc<dyn Queue>,
    durable: Arc<AtomicU64>,
    mut requests: mpsc::UnboundedReceiver<Waiter>,
) {
    while let Some(first) = requests.recv().await {
        let mut waiters = vec![first];
        while let Ok(waiter) = requests.try_recv() {
            waiters.push(waiter);
        }
        // Every waiter read the write count before registering, so this count covers all of them.
        let covered = queue.writes();
        let flushing = queue.clone();
        let result = match tokio::task::spawn_blocking(move || flushing.flush()).await {
            Ok(Ok(())) => {
                durable.fetch_max(covered, Ordering::SeqCst);
                Ok(())
            }
            Ok(Err(e)) => Err(Error::Flush(e.to_string())),
            Err(e) => Err(Error::Flush(e.to_string())),
        };
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::SqliteQueue;
    use crate::store_path::StorePath;

    #[tokio::test]
    async fn concurrent_writers_all_become_durable() {
        let queue: Arc<dyn Queue> = Arc::new(SqliteQueue::temporary().unwrap());
        let commit = Arc::new(GroupCommit::start(queue.clone()));
        let mut handles = Vec::new();
        for n in 0..50u32 {
            let (queue, commit) = (queue.clone(), commit.clone());
            handles.push(tokio::spawn(async move {
                let path =
                    StorePath::parse(&format!("/nix/store/{n:0>32}-x"), "/nix/store").unwrap();
                queue.enqueue(&[path], "test", 1).unwrap();
                let needed = queue.writes();
                commit.make_durable().await.unwrap();
                assert!(commit.durable.load(Ordering::SeqCst) >= needed);
            }));
        }
        for handle in handles {
            handle.await.unwrap();
        }
        assert_eq!(commit.durable.load(Ordering::SeqCst), 50);
        // Nothing new written: no flush needed.
        commit.make_durable().await.unwrap();
    }
}
