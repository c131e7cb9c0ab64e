//! What makes a write durable: the commit, and an fdatasync of the write-ahead log that covers it, shared by every
//! flush that began before it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::{SqliteQueue, MEMORY};
use crate::queue::Error;

impl SqliteQueue {
    /// Commits the open transaction, if any. Returns the number of commits a sync must cover for every write
    /// made so far to be durable, and whether this call committed.
    pub(super) fn commit(&self) -> Result<(u64, bool), Error> {
        let mut inner = self.lock();
        if !inner.in_transaction {
            return Ok((self.db.committed.load(Ordering::SeqCst), false));
        }
        let committed = inner.connection.execute_batch("COMMIT");
        if committed.is_err() {
            // A failed COMMIT may leave the transaction open or rolled back; either way the next write starts
            // afresh, and the writes it covered are reported as not durable.
            let _ = inner.connection.execute_batch("ROLLBACK");
        }
        inner.in_transaction = false;
        committed.map_err(self.error("committing"))?;
        Ok((self.db.committed.fetch_add(1, Ordering::SeqCst) + 1, true))
    }

    /// Returns once an fdatasync of the write-ahead log that began after the first `commits` commits has ended:
    /// one already done, one in progress, or one of its own. Outside the connection's lock, so writes for the
    /// next group go on while this one syncs.
    pub(super) fn sync_through(&self, commits: u64) -> Result<(), Error> {
        if self.db.path == Path::new(MEMORY) {
            return Ok(());
        }
        let mut wal = self.db.wal.lock().unwrap_or_else(PoisonError::into_inner);
        if self.db.synced.load(Ordering::SeqCst) >= commits {
            return Ok(());
        }
        // Every commit counted now is in the log: the sync below covers at least these.
        let covering = self.db.committed.load(Ordering::SeqCst);
        let wal_path = PathBuf::from(format!("{}-wal", self.db.path.display()));
        let io_error = |source| Error::Io {
            path: wal_path.clone(),
            operation: "syncing",
            source,
        };
        if wal.is_none() {
            let file = File::open(&wal_path).map_err(io_error)?;
            // The log's name must survive too; SQLite created it in the queue directory.
            if let Some(dir) = self.db.path.parent() {
                sync_dir(dir)?;
            }
            *wal = Some(file);
        }
        if let Some(file) = wal.as_ref() {
            file.sync_data().map_err(io_error)?;
        }
        self.db.synced.fetch_max(covering, Ordering::SeqCst);
        Ok(())
    }
}

/// `fsync`s a directory, so that a file created or renamed in it survives a power cut.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| Error::Io {
            path: dir.to_owned(),
            operation: "syncing",
            source,
        })
}
