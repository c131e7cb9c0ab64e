//! [`SqliteQueue`]: the [`Queue`] in one SQLite database in WAL mode, with an in-memory index of counts and due
//! order per target rebuilt at open.
//!
//! Writes go into one open transaction; [`Queue::flush`] commits it and then `fdatasync`s the write-ahead log
//! itself. So a flush is a real group commit: every write before it reaches stable storage with one fdatasync.
//! This is `synchronous=FULL` done by hand, for two reasons: SQLite (as bundled) syncs with `fsync`, which on ext4
//! also journals the log's mtime and so waits for the commit of everyone's dirty data, and it syncs while holding
//! the connection, blocking every other write for the length of the sync. With `synchronous=NORMAL` SQLite still
//! syncs the log before and the database after every checkpoint, so a checkpoint never loses a commit; our sync
//! covers what the commit itself wrote.
//!
//! One database holds every target's entries (keyed by target and path), history and totals; a
//! [`SqliteQueue`] is the view of one target ([`Queue::for_target`]), and every view shares the connection, the
//! write counter and the flush.
//!
//! Every record carries a checksum of its text ([`checksum`]), verified whenever it is read: SQLite checks the
//! structure of its pages but not their contents, and a flipped byte inside a record must not pass as data.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension as _};
use serde::Serialize;
use sha2::{Digest, Sha256};

mod durable;
mod lists;
mod rows;

pub use durable::sync_dir;

use super::index::Index;
use super::schema::{migrate_unnamed, SCHEMA};
use super::{
    Backlog, Counts, Enqueued, Entry, Error, HistoryRecord, Queue, RefusedRecord, State, Totals,
    TotalsReport, HISTORY_CAP, REFUSED_CAP,
};
use crate::config::DEFAULT_TARGET;
use crate::store_path::StorePath;

/// The database file inside the queue directory.
pub const DB_FILE: &str = "queue.sqlite3";
/// The "path" of a database in memory.
const MEMORY: &str = "(memory)";
/// The table of queue entries, one row per target and path.
pub const ENTRIES_TABLE: &str = "target_entries";

const TOTALS_KEY: &str = "totals";
const REFUSED_TOTAL_KEY: &str = "refused_total";

/// The first 8 bytes of the SHA-256 of `text`, as SQLite's signed integer.
pub fn checksum(text: &str) -> i64 {
    let digest = Sha256::digest(text.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// The connection and whether a transaction is open, guarded by one lock that every read and write takes.
struct Inner {
    connection: Connection,
    in_transaction: bool,
    /// One index per target that has (or had, in this process) an entry.
    indexes: BTreeMap<String, Index>,
}

/// How many commits were made and how long they took, for the design notes and the shutdown log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Commits that wrote something (each one fsync of the write-ahead log).
    pub commits: u64,
    /// Time spent in them.
    pub total: Duration,
    /// The longest.
    pub longest: Duration,
}

/// What every target's view shares.
struct Database {
    path: PathBuf,
    inner: Mutex<Inner>,
    writes: AtomicU64,
    stats: Mutex<CommitStats>,
    /// Commits made so far (counted once COMMIT has returned).
    committed: AtomicU64,
    /// How many of them an fdatasync has covered.
    synced: AtomicU64,
    /// The write-ahead log, opened at the first flush (SQLite creates it at the first write). Its lock is held
    /// for the length of a sync, so syncs run one at a time and a flush waiting for one sees what it covered.
    wal: Mutex<Option<File>>,
}

/// The SQLite-backed [`Queue`]: the view of one target (the one named `default` when opened).
pub struct SqliteQueue {
    db: Arc<Database>,
    target: String,
}

impl SqliteQueue {
    /// Opens (or creates) the database at `path`. The caller holds the queue directory's lock and has checked
    /// for damage (`queue::open`).
    pub fn open(path: &Path) -> Result<SqliteQueue, Error> {
        let connection = Connection::open(path).map_err(sqlite_error(path, "opening"))?;
        SqliteQueue::from_connection(path, connection)
    }

    /// A queue in memory, for tests.
    pub fn temporary() -> Result<SqliteQueue, Error> {
        let path = Path::new(MEMORY);
        let connection = Connection::open_in_memory().map_err(sqlite_error(path, "opening"))?;
        SqliteQueue::from_connection(path, connection)
    }

    fn from_connection(path: &Path, connection: Connection) -> Result<SqliteQueue, Error> {
        // `journal_mode` answers with a row, so it is queried rather than executed.
        let mode: String = connection
            .query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))
            .map_err(sqlite_error(path, "switching to WAL mode"))?;
        if mode != "wal" && mode != "memory" {
            return Err(Error::Sqlite {
                path: path.to_owned(),
                operation: "switching to WAL mode",
                source: rusqlite::Error::InvalidParameterName(format!("journal_mode is {mode}")),
            });
        }
        connection
            .execute_batch(
                "PRAGMA synchronous=NORMAL; PRAGMA cell_size_check=ON; PRAGMA busy_timeout=5000;",
            )
            .map_err(sqlite_error(path, "setting up"))?;
        migrate_unnamed(path, &connection)?;
        connection
            .execute_batch(SCHEMA)
            .map_err(sqlite_error(path, "creating tables"))?;
        let queue = SqliteQueue {
            db: Arc::new(Database {
                path: path.to_owned(),
                inner: Mutex::new(Inner {
                    connection,
                    in_transaction: false,
                    indexes: BTreeMap::new(),
                }),
                writes: AtomicU64::new(0),
                stats: Mutex::new(CommitStats::default()),
                committed: AtomicU64::new(0),
                synced: AtomicU64::new(0),
                wal: Mutex::new(None),
            }),
            target: DEFAULT_TARGET.to_owned(),
        };
        {
            let mut inner = queue.lock();
            let mut indexes: BTreeMap<String, Index> = BTreeMap::new();
            for (target, entry) in queue.read_every_target(&inner.connection)? {
                indexes.entry(target).or_default().add(&entry);
            }
            inner.indexes = indexes;
        }
        Ok(queue)
    }

    /// The view of the target named `name`, sharing this database.
    pub fn target(&self, name: &str) -> SqliteQueue {
        SqliteQueue {
            db: Arc::clone(&self.db),
            target: name.to_owned(),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.db.path
    }

    /// Commits so far and their cost.
    pub fn commit_stats(&self) -> CommitStats {
        *self.db.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Entries (of every target) whose stored retry time lies more than `max_ahead_ms` after `now_ms` are made due
    /// now, and "present" answers remembered past `now_ms + max_present_ms` are forgotten: the wall clock went back
    /// between two runs, and waiting for it to catch up would stall them by the size of the jump.
    pub fn clamp_future_times(
        &self,
        now_ms: u64,
        max_ahead_ms: u64,
        max_present_ms: u64,
    ) -> Result<usize, Error> {
        let mut clamped = 0;
        for (target, entry) in self.entries_of_every_target()? {
            if entry.next_attempt_at_ms > now_ms.saturating_add(max_ahead_ms)
                || entry.enqueued_at_ms > now_ms.saturating_add(max_ahead_ms)
            {
                self.target(&target).set(&Entry {
                    next_attempt_at_ms: entry.next_attempt_at_ms.min(now_ms),
                    enqueued_at_ms: entry.enqueued_at_ms.min(now_ms),
                    updated_at_ms: entry.updated_at_ms.min(now_ms),
                    ..entry
                })?;
                clamped += 1;
            }
        }
        let mut inner = self.lock();
        self.begin(&mut inner)?;
        let limit = i64::try_from(now_ms.saturating_add(max_present_ms)).unwrap_or(i64::MAX);
        inner
            .connection
            .execute("DELETE FROM present WHERE until_ms > ?1", [limit])
            .map_err(self.error("forgetting present answers from the future"))?;
        self.wrote();
        Ok(clamped)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves at worst a count off by one; the data itself is in SQLite.
        self.db.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn index_mut<'a>(&self, inner: &'a mut Inner) -> &'a mut Index {
        inner.indexes.entry(self.target.clone()).or_default()
    }

    fn read_index<T: Default>(&self, read: impl FnOnce(&Index) -> T) -> T {
        self.lock()
            .indexes
            .get(&self.target)
            .map(read)
            .unwrap_or_default()
    }

    fn error(&self, operation: &'static str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
        move |source| Error::Sqlite {
            path: self.db.path.clone(),
            operation,
            source,
        }
    }

    fn wrote(&self) {
        self.db.writes.fetch_add(1, Ordering::SeqCst);
    }

    /// Opens the transaction the next flush commits, if none is open.
    fn begin(&self, inner: &mut Inner) -> Result<(), Error> {
        if !inner.in_transaction {
            inner
                .connection
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(self.error("starting a transaction"))?;
            inner.in_transaction = true;
        }
        Ok(())
    }

    /// Moves every page into the database file and empties the write-ahead log (at a clean stop).
    pub fn checkpoint(&self) -> Result<(), Error> {
        self.flush()?;
        let inner = self.lock();
        inner
            .connection
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(self.error("checkpointing"))?;
        Ok(())
    }
}

pub(super) fn sqlite_error(
    path: &Path,
    operation: &'static str,
) -> impl FnOnce(rusqlite::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Sqlite {
        path,
        operation,
        source,
    }
}

fn encode<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs (strings, integers, enums) to JSON cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, record: &str, sum: i64) -> Result<T, Error> {
    if checksum(record) != sum {
        return Err(Error::Checksum {
            key: key.to_owned(),
        });
    }
    serde_json::from_str(record).map_err(|source| Error::Corrupt {
        key: key.to_owned(),
        source,
    })
}

impl Queue for SqliteQueue {
    fn for_target(&self, name: &str) -> Arc<dyn Queue> {
        Arc::new(self.target(name))
    }

    fn target_name(&self) -> &str {
        &self.target
    }

    fn enqueue(&self, paths: &[StorePath], source: &str, now_ms: u64) -> Result<Enqueued, Error> {
        let mut inner = self.lock();
        let mut result = Enqueued::default();
        for path in paths {
            let old = self.read_entry(&inner.connection, path)?;
            match &old {
                Some(entry) if !entry.state.waits_for_retry() => {
                    result.duplicate.push(path.clone());
                }
                _ => {
                    let new = Entry::new(path.clone(), source, now_ms);
                    self.replace(&mut inner, old.as_ref(), &new)?;
                    result.queued.push(path.clone());
                }
            }
        }
        Ok(result)
    }

    fn get(&self, path: &StorePath) -> Result<Option<Entry>, Error> {
        let inner = self.lock();
        self.read_entry(&inner.connection, path)
    }

    fn set(&self, entry: &Entry) -> Result<(), Error> {
        let mut inner = self.lock();
        let old = self.read_entry(&inner.connection, &entry.path)?;
        self.replace(&mut inner, old.as_ref(), entry)
    }

    fn remove(&self, path: &StorePath) -> Result<Option<Entry>, Error> {
        let mut inner = self.lock();
        let old = self.read_entry(&inner.connection, path)?;
        if let Some(old) = &old {
            self.begin(&mut inner)?;
            inner
                .connection
                .execute(
                    "DELETE FROM target_entries WHERE target = ?1 AND path = ?2",
                    params![self.target, path.as_str()],
                )
                .map_err(self.error("removing an entry"))?;
            self.index_mut(&mut inner).remove(old);
            self.wrote();
        }
        Ok(old)
    }

    fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<Entry>, Error> {
        let inner = self.lock();
        let paths: Vec<StorePath> = inner
            .indexes
            .get(&self.target)
            .map(|index| {
                index
                    .due
                    .iter()
                    .take_while(|(at, _)| *at <= now_ms)
                    .take(limit)
                    .map(|(_, path)| path.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut out = Vec::with_capacity(paths.len());
        for path in paths {
            if let Some(entry) = self.read_entry(&inner.connection, &path)? {
                if entry.state == State::Queued && entry.next_attempt_at_ms <= now_ms {
                    out.push(entry);
                }
            }
        }
        Ok(out)
    }

    fn next_due_at(&self) -> Option<u64> {
        self.read_index(|index| index.due.first().map(|(at, _)| *at))
    }

    fn entries(&self) -> Result<Vec<Entry>, Error> {
        let inner = self.lock();
        self.read_entries(&inner.connection, None, usize::MAX)
    }

    fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<Entry>, Error> {
        let inner = self.lock();
        self.read_entries(&inner.connection, after, limit)
    }

    fn counts(&self) -> Counts {
        self.read_index(|index| index.counts)
    }

    fn backlog(&self) -> Backlog {
        self.read_index(|index| Backlog {
            oldest_enqueued_at_ms: index.waiting.first().map(|(at, _)| *at),
            retrying: index.retrying,
        })
    }

    fn requeue_interrupted(&self, now_ms: u64) -> Result<usize, Error> {
        let mut requeued = 0;
        for (target, entry) in self.entries_of_every_target()? {
            if entry.state == State::Uploading {
                self.target(&target).set(&Entry {
                    state: State::Queued,
                    next_attempt_at_ms: now_ms,
                    updated_at_ms: now_ms,
                    ..entry
                })?;
                requeued += 1;
            }
        }
        Ok(requeued)
    }

    fn retry_failed(
        &self,
        paths: Option<&[StorePath]>,
        now_ms: u64,
    ) -> Result<Vec<StorePath>, Error> {
        let candidates = match paths {
            Some(paths) => {
                let mut found = Vec::new();
                for path in paths {
                    found.extend(self.get(path)?);
                }
                found
            }
            None => self.entries()?,
        };
        let mut requeued = Vec::new();
        for entry in candidates {
            if entry.state.waits_for_retry() {
                let path = entry.path.clone();
                self.set(&Entry {
                    state: State::Queued,
                    attempts: 0,
                    next_attempt_at_ms: now_ms,
                    last_error: None,
                    updated_at_ms: now_ms,
                    ..entry
                })?;
                requeued.push(path);
            }
        }
        Ok(requeued)
    }

    fn held_by_any_target(&self, path: &StorePath) -> Result<bool, Error> {
        let inner = self.lock();
        inner
            .connection
            .prepare_cached("SELECT 1 FROM target_entries WHERE path = ?1 LIMIT 1")
            .and_then(|mut s| s.exists([path.as_str()]))
            .map_err(self.error("reading an entry"))
    }

    fn entries_of_every_target(&self) -> Result<Vec<(String, Entry)>, Error> {
        let inner = self.lock();
        self.read_every_target(&inner.connection)
    }

    fn remember_present(&self, hash_parts: &[&str], until_ms: u64) -> Result<(), Error> {
        let mut inner = self.lock();
        self.begin(&mut inner)?;
        let until = i64::try_from(until_ms).unwrap_or(i64::MAX);
        for hash_part in hash_parts {
            inner
                .connection
                .prepare_cached(
                    "INSERT INTO present (hash_part, until_ms) VALUES (?1, ?2)
                     ON CONFLICT(hash_part) DO UPDATE SET until_ms = excluded.until_ms",
                )
                .and_then(|mut s| s.execute(params![hash_part, until]))
                .map_err(self.error("writing the present cache"))?;
        }
        self.wrote();
        Ok(())
    }

    fn is_known_present(&self, hash_part: &str, now_ms: u64) -> Result<bool, Error> {
        let inner = self.lock();
        let until: Option<i64> = inner
            .connection
            .prepare_cached("SELECT until_ms FROM present WHERE hash_part = ?1")
            .and_then(|mut s| s.query_row([hash_part], |row| row.get(0)).optional())
            .map_err(self.error("reading the present cache"))?;
        Ok(until.is_some_and(|until| u64::try_from(until).unwrap_or(0) > now_ms))
    }

    fn record_finished(&self, record: &HistoryRecord) -> Result<(), Error> {
        let mut inner = self.lock();
        self.append_bounded(&mut inner, "history", HISTORY_CAP, &encode(record))?;
        let key = self.totals_key();
        let mut all_time: Totals = self.read_meta(&inner.connection, &key)?;
        all_time.add(record);
        self.write_meta(&inner.connection, &key, &all_time)?;
        self.index_mut(&mut inner).since_start.add(record);
        self.wrote();
        Ok(())
    }

    fn recent(&self, limit: usize) -> Result<Vec<HistoryRecord>, Error> {
        self.newest("history", limit)
    }

    fn record_refused(&self, record: &RefusedRecord) -> Result<(), Error> {
        let mut inner = self.lock();
        self.append_bounded(&mut inner, "refused", REFUSED_CAP, &encode(record))?;
        let total: u64 = self.read_meta(&inner.connection, REFUSED_TOTAL_KEY)?;
        self.write_meta(&inner.connection, REFUSED_TOTAL_KEY, &(total + 1))?;
        self.wrote();
        Ok(())
    }

    fn refused(&self, limit: usize) -> Result<Vec<RefusedRecord>, Error> {
        self.newest("refused", limit)
    }

    fn refused_total(&self) -> Result<u64, Error> {
        let inner = self.lock();
        self.read_meta(&inner.connection, REFUSED_TOTAL_KEY)
    }

    fn totals(&self) -> Result<TotalsReport, Error> {
        let inner = self.lock();
        Ok(TotalsReport {
            since_start: inner
                .indexes
                .get(&self.target)
                .map(|index| index.since_start)
                .unwrap_or_default(),
            all_time: self.read_meta(&inner.connection, &self.totals_key())?,
        })
    }

    fn writes(&self) -> u64 {
        self.db.writes.load(Ordering::SeqCst)
    }

    fn flush(&self) -> Result<(), Error> {
        let started = Instant::now();
        let (through, committed_now) = self.commit()?;
        // Even with nothing to commit: another flush may have committed writes this caller made and still be
        // syncing them; returning before that sync ends would call them durable too early.
        self.sync_through(through)?;
        if committed_now {
            let took = started.elapsed();
            let mut stats = self.db.stats.lock().unwrap_or_else(PoisonError::into_inner);
            stats.commits += 1;
            stats.total += took;
            stats.longest = stats.longest.max(took);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
