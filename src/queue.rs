//! The durable queue of store paths waiting to be pushed; the only module that knows sled.
//!
//! One sled database (`state_dir/queue`) with these trees:
//!
//! - `entries`: store path → [`Entry`] as JSON, for example
//!   `{"path":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","state":"queued","attempts":0,
//!   "next_attempt_at_ms":1732600000000,"last_error":null,"enqueued_at_ms":1732600000000,
//!   "updated_at_ms":1732600000000,"source":"hook"}`;
//! - `present`: hash part → expiry (unix ms, 8 bytes big-endian) of "the target or an upstream has this path";
//! - `history`: id → [`HistoryRecord`], the last [`HISTORY_CAP`] finished paths;
//! - `refused`: id → [`RefusedRecord`], the last [`REFUSED_CAP`] refused requests;
//! - `meta`: all-time counters ([`Totals`] under `totals`, the refused count under `refused_total`).
//!
//! Nothing written is durable until [`Queue::flush`] returns. The daemon acknowledges a request only after a flush
//! that started after the request's writes: read [`Queue::writes`] after writing, then wait until a flush that
//! began at or after that count has finished (`daemon::commit`). Every write happens under one lock that also bumps
//! the write counter, so a request that finds its path already queued by someone else also waits for that write.
//!
//! Counts per state and the due order live in memory and are rebuilt from `entries` at open, so they cannot
//! disagree with what is on disk after a crash. Everything else talks to the [`Queue`] trait.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store_path::StorePath;

/// How many finished paths the history keeps.
pub const HISTORY_CAP: usize = 100;
/// How many refused requests are kept.
pub const REFUSED_CAP: usize = 100;
/// Longest refused input kept in a [`RefusedRecord`], in characters.
pub const MAX_REFUSED_INPUT_CHARS: usize = 300;

/// Why the queue could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be opened (often: another daemon holds its lock).
    #[error("cannot open the queue database {path}: {source}")]
    Open {
        /// The database directory.
        path: PathBuf,
        /// What sled said.
        source: sled::Error,
    },
    /// A read, write or flush failed.
    #[error("queue database error while {operation}: {source}")]
    Db {
        /// What the queue was doing, e.g. "flushing".
        operation: &'static str,
        /// What sled said.
        source: sled::Error,
    },
    /// A stored record does not decode.
    #[error("corrupt queue record {key:?}: {source}")]
    Corrupt {
        /// The record's key, as text.
        key: String,
        /// What the decoder said.
        source: serde_json::Error,
    },
}

fn db_error(operation: &'static str) -> impl FnOnce(sled::Error) -> Error {
    move |source| Error::Db { operation, source }
}

/// Where a queued path stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for its next attempt.
    Queued,
    /// A worker is uploading it. Requeued at startup, since that worker died with the last process.
    Uploading,
    /// Parked after too many attempts or a permanent error, until retried.
    Failed,
}

/// One path in the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The store path; also the key.
    pub path: StorePath,
    /// Where it stands.
    pub state: State,
    /// Upload attempts so far.
    pub attempts: u32,
    /// Unix time (ms) before which it is not due.
    pub next_attempt_at_ms: u64,
    /// The reason the last attempt failed.
    pub last_error: Option<String>,
    /// Unix time (ms) it was first queued (or requeued from failed).
    pub enqueued_at_ms: u64,
    /// Unix time (ms) of the last change.
    pub updated_at_ms: u64,
    /// Who asked for it: `hook`, `spool`, `push`, ….
    pub source: String,
}

impl Entry {
    /// A fresh entry, due at once.
    pub fn new(path: StorePath, source: &str, now_ms: u64) -> Entry {
        Entry {
            path,
            state: State::Queued,
            attempts: 0,
            next_attempt_at_ms: now_ms,
            last_error: None,
            enqueued_at_ms: now_ms,
            updated_at_ms: now_ms,
            source: source.to_owned(),
        }
    }
}

/// What [`Queue::enqueue`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// Paths newly queued, or requeued from failed.
    pub queued: Vec<StorePath>,
    /// Paths that were already queued or uploading (left as they were).
    pub duplicate: Vec<StorePath>,
}

/// Number of entries per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// In state queued.
    pub queued: u64,
    /// In state uploading.
    pub uploading: u64,
    /// In state failed.
    pub failed: u64,
}

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
    /// Matched an `exclude` pattern.
    Excluded,
    /// Garbage-collected before it could be uploaded.
    SkippedGone,
    /// Gave up on it.
    Failed,
}

/// One finished path, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// The store path.
    pub path: StorePath,
    /// What happened.
    pub outcome: Outcome,
    /// Uncompressed NAR size, when a NAR was made.
    pub nar_size: Option<u64>,
    /// Size of the uploaded (compressed) file, when one was uploaded.
    pub file_size: Option<u64>,
    /// Time spent on the path, in milliseconds.
    pub duration_ms: u64,
    /// Why, for anything but a plain upload.
    pub reason: Option<String>,
    /// Unix time (ms) it finished.
    pub finished_at_ms: u64,
}

/// One refused request, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedRecord {
    /// The path (or raw input) that was refused, truncated to [`MAX_REFUSED_INPUT_CHARS`].
    pub input: String,
    /// Why, e.g. `not inside the store directory /nix/store`.
    pub reason: String,
    /// The requester's uid (socket peer or spool file owner), when known.
    pub peer_uid: Option<u32>,
    /// `socket` or `spool`.
    pub source: String,
    /// Unix time (ms) of the refusal.
    pub at_ms: u64,
}

impl RefusedRecord {
    /// A record for `input`, truncated so a hostile client cannot fill the database.
    pub fn new(
        input: &str,
        reason: impl Into<String>,
        peer_uid: Option<u32>,
        source: &str,
        at_ms: u64,
    ) -> RefusedRecord {
        // Control characters would let a client forge lines in logs and `status`.
        let mut kept: String = input
            .chars()
            .take(MAX_REFUSED_INPUT_CHARS)
            .map(|c| if c.is_control() { '\u{fffd}' } else { c })
            .collect();
        if input.chars().nth(MAX_REFUSED_INPUT_CHARS).is_some() {
            kept.push('…');
        }
        RefusedRecord {
            input: kept,
            reason: reason.into(),
            peer_uid,
            source: source.to_owned(),
            at_ms,
        }
    }
}

/// Counters of finished paths and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    /// Paths uploaded.
    pub uploaded: u64,
    /// Paths the target already had.
    pub already_present: u64,
    /// Paths an upstream cache serves.
    pub skipped_upstream: u64,
    /// Paths matching `exclude`.
    pub excluded: u64,
    /// Paths garbage-collected before upload.
    pub skipped_gone: u64,
    /// Paths given up on.
    pub failed: u64,
    /// Uncompressed NAR bytes uploaded.
    pub nar_bytes: u64,
    /// Compressed bytes uploaded.
    pub file_bytes: u64,
}

impl Totals {
    /// Adds one finished path.
    pub fn add(&mut self, record: &HistoryRecord) {
        match record.outcome {
            Outcome::Uploaded => {
                self.uploaded += 1;
                self.nar_bytes += record.nar_size.unwrap_or(0);
                self.file_bytes += record.file_size.unwrap_or(0);
            }
            Outcome::AlreadyPresent => self.already_present += 1,
            Outcome::SkippedUpstream => self.skipped_upstream += 1,
            Outcome::Excluded => self.excluded += 1,
            Outcome::SkippedGone => self.skipped_gone += 1,
            Outcome::Failed => self.failed += 1,
        }
    }
}

/// Totals since the queue was opened and since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TotalsReport {
    /// Since this process opened the queue.
    pub since_start: Totals,
    /// Since the database was created.
    pub all_time: Totals,
}

/// The queue as the daemon and the upload engine see it. All methods are quick (no fsync) except
/// [`Queue::flush`], which callers on an async runtime run on a blocking thread.
pub trait Queue: Send + Sync {
    /// Queues each path. A path already queued or uploading is left alone and reported as a duplicate; a failed
    /// one is requeued with its attempts reset.
    fn enqueue(&self, paths: &[StorePath], source: &str, now_ms: u64) -> Result<Enqueued, Error>;
    /// The entry for `path`.
    fn get(&self, path: &StorePath) -> Result<Option<Entry>, Error>;
    /// Inserts or replaces an entry (the engine's state changes).
    fn set(&self, entry: &Entry) -> Result<(), Error>;
    /// Removes a path (done, or dropped by the operator); returns what was there.
    fn remove(&self, path: &StorePath) -> Result<Option<Entry>, Error>;
    /// Queued entries with `next_attempt_at_ms <= now_ms`, earliest first, at most `limit`.
    fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<Entry>, Error>;
    /// When the earliest queued entry is due (unix ms), if any is queued.
    fn next_due_at(&self) -> Option<u64>;
    /// Every entry, in path order.
    fn entries(&self) -> Result<Vec<Entry>, Error>;
    /// Entries per state.
    fn counts(&self) -> Counts;
    /// Puts entries left `uploading` by a previous process back to `queued`, due now. Run once at startup.
    fn requeue_interrupted(&self, now_ms: u64) -> Result<usize, Error>;
    /// Requeues failed entries (all, or those listed) with attempts reset; returns the paths requeued.
    fn retry_failed(
        &self,
        paths: Option<&[StorePath]>,
        now_ms: u64,
    ) -> Result<Vec<StorePath>, Error>;
    /// Remembers that these hash parts are present in the target or an upstream until `until_ms`.
    fn remember_present(&self, hash_parts: &[&str], until_ms: u64) -> Result<(), Error>;
    /// Whether `hash_part` is remembered as present at `now_ms`.
    fn is_known_present(&self, hash_part: &str, now_ms: u64) -> Result<bool, Error>;
    /// Appends to the history (keeping the last [`HISTORY_CAP`]) and adds to the totals.
    fn record_finished(&self, record: &HistoryRecord) -> Result<(), Error>;
    /// The last `limit` finished paths, newest first.
    fn recent(&self, limit: usize) -> Result<Vec<HistoryRecord>, Error>;
    /// Appends a refused request (keeping the last [`REFUSED_CAP`]) and counts it.
    fn record_refused(&self, record: &RefusedRecord) -> Result<(), Error>;
    /// The last `limit` refused requests, newest first.
    fn refused(&self, limit: usize) -> Result<Vec<RefusedRecord>, Error>;
    /// Refused requests since the database was created.
    fn refused_total(&self) -> Result<u64, Error>;
    /// Finished-path totals.
    fn totals(&self) -> Result<TotalsReport, Error>;
    /// How many writes this queue has made since it was opened. A flush that starts after reading `n` makes the
    /// first `n` writes durable.
    fn writes(&self) -> u64;
    /// Makes every write so far durable (fsync).
    fn flush(&self) -> Result<(), Error>;
}

/// Milliseconds since the Unix epoch, the time unit of every record.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// In-memory view of `entries`, plus list lengths and since-start totals. Guarded by one lock that every write
/// takes.
#[derive(Default)]
struct Index {
    counts: Counts,
    due: BTreeSet<(u64, StorePath)>,
    history_len: usize,
    refused_len: usize,
    since_start: Totals,
}

impl Index {
    fn add(&mut self, entry: &Entry) {
        match entry.state {
            State::Queued => {
                self.counts.queued += 1;
                self.due
                    .insert((entry.next_attempt_at_ms, entry.path.clone()));
            }
            State::Uploading => self.counts.uploading += 1,
            State::Failed => self.counts.failed += 1,
        }
    }

    fn remove(&mut self, entry: &Entry) {
        match entry.state {
            State::Queued => {
                self.counts.queued = self.counts.queued.saturating_sub(1);
                self.due
                    .remove(&(entry.next_attempt_at_ms, entry.path.clone()));
            }
            State::Uploading => self.counts.uploading = self.counts.uploading.saturating_sub(1),
            State::Failed => self.counts.failed = self.counts.failed.saturating_sub(1),
        }
    }
}

/// The sled-backed [`Queue`].
pub struct SledQueue {
    db: sled::Db,
    entries: sled::Tree,
    present: sled::Tree,
    history: sled::Tree,
    refused: sled::Tree,
    meta: sled::Tree,
    index: Mutex<Index>,
    writes: AtomicU64,
}

const TOTALS_KEY: &[u8] = b"totals";
const REFUSED_TOTAL_KEY: &[u8] = b"refused_total";

impl SledQueue {
    /// Opens (or creates) the queue in `dir`. Fails if another process has it open.
    pub fn open(dir: &Path) -> Result<SledQueue, Error> {
        let config = sled::Config::new()
            .path(dir)
            // The page cache only needs to hold the working set; sled's 1 GiB default would dominate our RSS.
            .cache_capacity(16 * 1024 * 1024)
            .flush_every_ms(Some(1000));
        let db = config.open().map_err(|source| Error::Open {
            path: dir.to_owned(),
            source,
        })?;
        SledQueue::from_db(db)
    }

    /// A queue in a temporary database that disappears when dropped, for tests.
    pub fn temporary() -> Result<SledQueue, Error> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(|source| Error::Open {
                path: PathBuf::from("(temporary)"),
                source,
            })?;
        SledQueue::from_db(db)
    }

    fn from_db(db: sled::Db) -> Result<SledQueue, Error> {
        let tree = |name: &str| db.open_tree(name).map_err(db_error("opening a tree"));
        let queue = SledQueue {
            entries: tree("entries")?,
            present: tree("present")?,
            history: tree("history")?,
            refused: tree("refused")?,
            meta: tree("meta")?,
            db,
            index: Mutex::new(Index::default()),
            writes: AtomicU64::new(0),
        };
        let mut index = Index::default();
        for item in queue.entries.iter() {
            let (key, value) = item.map_err(db_error("reading entries"))?;
            match decode::<Entry>(&key, &value) {
                Ok(entry) => index.add(&entry),
                // A record that does not decode (written by a newer version, say) must not stop the daemon; it
                // stays on disk for a later version and is left out of every list.
                Err(e) => tracing::warn!("skipping queue entry: {e}"),
            }
        }
        index.history_len = queue.history.len();
        index.refused_len = queue.refused.len();
        *queue.lock() = index;
        queue.prune_present(now_ms())?;
        Ok(queue)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock leaves at worst a count off by one; the data itself is in sled.
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::SeqCst);
    }

    fn read_entry(&self, path: &StorePath) -> Result<Option<Entry>, Error> {
        match self
            .entries
            .get(path.as_str())
            .map_err(db_error("reading an entry"))?
        {
            Some(value) => Ok(Some(decode(path.as_str().as_bytes(), &value)?)),
            None => Ok(None),
        }
    }

    /// Writes `new` in place of `old`; the caller holds the lock.
    fn replace(&self, index: &mut Index, old: Option<&Entry>, new: &Entry) -> Result<(), Error> {
        self.entries
            .insert(new.path.as_str(), encode(new))
            .map_err(db_error("writing an entry"))?;
        if let Some(old) = old {
            index.remove(old);
        }
        index.add(new);
        self.wrote();
        Ok(())
    }

    /// Appends to a bounded list tree and trims its oldest items.
    fn append_bounded(
        &self,
        tree: &sled::Tree,
        len: &mut usize,
        cap: usize,
        value: Vec<u8>,
    ) -> Result<(), Error> {
        let id = self
            .db
            .generate_id()
            .map_err(db_error("generating an id"))?;
        tree.insert(id.to_be_bytes(), value)
            .map_err(db_error("appending to a list"))?;
        *len += 1;
        while *len > cap {
            if tree
                .pop_min()
                .map_err(db_error("trimming a list"))?
                .is_none()
            {
                break;
            }
            *len -= 1;
        }
        Ok(())
    }

    fn newest<T: serde::de::DeserializeOwned>(
        tree: &sled::Tree,
        limit: usize,
    ) -> Result<Vec<T>, Error> {
        let mut out = Vec::new();
        for item in tree.iter().rev().take(limit) {
            let (key, value) = item.map_err(db_error("reading a list"))?;
            out.push(decode(&key, &value)?);
        }
        Ok(out)
    }

    fn read_u64(&self, key: &[u8]) -> Result<u64, Error> {
        Ok(self
            .meta
            .get(key)
            .map_err(db_error("reading a counter"))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    fn all_time_totals(&self) -> Result<Totals, Error> {
        match self
            .meta
            .get(TOTALS_KEY)
            .map_err(db_error("reading totals"))?
        {
            Some(value) => decode(TOTALS_KEY, &value),
            None => Ok(Totals::default()),
        }
    }

    fn prune_present(&self, now_ms: u64) -> Result<(), Error> {
        for item in self.present.iter() {
            let (key, value) = item.map_err(db_error("reading the present cache"))?;
            if expiry(&value) <= now_ms {
                self.present
                    .remove(key)
                    .map_err(db_error("pruning the present cache"))?;
            }
        }
        Ok(())
    }
}

fn expiry(value: &[u8]) -> u64 {
    <[u8; 8]>::try_from(value)
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs (strings, integers, enums) to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(value).map_err(|source| Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

impl Queue for SledQueue {
    fn enqueue(&self, paths: &[StorePath], source: &str, now_ms: u64) -> Result<Enqueued, Error> {
        let mut index = self.lock();
        let mut result = Enqueued::default();
        for path in paths {
            let old = self.read_entry(path)?;
            match &old {
                Some(entry) if entry.state != State::Failed => {
                    result.duplicate.push(path.clone());
                }
                _ => {
                    let new = Entry::new(path.clone(), source, now_ms);
                    self.replace(&mut index, old.as_ref(), &new)?;
                    result.queued.push(path.clone());
                }
            }
        }
        Ok(result)
    }

    fn get(&self, path: &StorePath) -> Result<Option<Entry>, Error> {
        self.read_entry(path)
    }

    fn set(&self, entry: &Entry) -> Result<(), Error> {
        let mut index = self.lock();
        let old = self.read_entry(&entry.path)?;
        self.replace(&mut index, old.as_ref(), entry)
    }

    fn remove(&self, path: &StorePath) -> Result<Option<Entry>, Error> {
        let mut index = self.lock();
        let old = self.read_entry(path)?;
        if let Some(old) = &old {
            self.entries
                .remove(path.as_str())
                .map_err(db_error("removing an entry"))?;
            index.remove(old);
            self.wrote();
        }
        Ok(old)
    }

    fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<Entry>, Error> {
        let paths: Vec<StorePath> = self
            .lock()
            .due
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .take(limit)
            .map(|(_, path)| path.clone())
            .collect();
        let mut out = Vec::with_capacity(paths.len());
        for path in paths {
            // Re-read: the entry may have changed since the index was consulted.
            if let Some(entry) = self.read_entry(&path)? {
                if entry.state == State::Queued && entry.next_attempt_at_ms <= now_ms {
                    out.push(entry);
                }
            }
        }
        Ok(out)
    }

    fn next_due_at(&self) -> Option<u64> {
        self.lock().due.first().map(|(at, _)| *at)
    }

    fn entries(&self) -> Result<Vec<Entry>, Error> {
        let mut out = Vec::new();
        for item in self.entries.iter() {
            let (key, value) = item.map_err(db_error("reading entries"))?;
            match decode(&key, &value) {
                Ok(entry) => out.push(entry),
                Err(e) => tracing::warn!("skipping queue entry: {e}"),
            }
        }
        Ok(out)
    }

    fn counts(&self) -> Counts {
        self.lock().counts
    }

    fn requeue_interrupted(&self, now_ms: u64) -> Result<usize, Error> {
        let mut index = self.lock();
        let mut requeued = 0;
        for entry in self.entries()? {
            if entry.state == State::Uploading {
                let new = Entry {
                    state: State::Queued,
                    next_attempt_at_ms: now_ms,
                    updated_at_ms: now_ms,
                    ..entry.clone()
                };
                self.replace(&mut index, Some(&entry), &new)?;
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
        let mut index = self.lock();
        let candidates = match paths {
            Some(paths) => {
                let mut found = Vec::new();
                for path in paths {
                    found.extend(self.read_entry(path)?);
                }
                found
            }
            None => self.entries()?,
        };
        let mut requeued = Vec::new();
        for entry in candidates {
            if entry.state == State::Failed {
                let new = Entry {
                    state: State::Queued,
                    attempts: 0,
                    next_attempt_at_ms: now_ms,
                    last_error: None,
                    updated_at_ms: now_ms,
                    ..entry.clone()
                };
                self.replace(&mut index, Some(&entry), &new)?;
                requeued.push(new.path);
            }
        }
        Ok(requeued)
    }

    fn remember_present(&self, hash_parts: &[&str], until_ms: u64) -> Result<(), Error> {
        for hash_part in hash_parts {
            self.present
                .insert(hash_part.as_bytes(), &until_ms.to_be_bytes())
                .map_err(db_error("writing the present cache"))?;
        }
        self.wrote();
        Ok(())
    }

    fn is_known_present(&self, hash_part: &str, now_ms: u64) -> Result<bool, Error> {
        Ok(self
            .present
            .get(hash_part.as_bytes())
            .map_err(db_error("reading the present cache"))?
            .is_some_and(|value| expiry(&value) > now_ms))
    }

    fn record_finished(&self, record: &HistoryRecord) -> Result<(), Error> {
        let mut index = self.lock();
        let Index {
            history_len,
            since_start,
            ..
        } = &mut *index;
        self.append_bounded(&self.history, history_len, HISTORY_CAP, encode(record))?;
        let mut all_time = self.all_time_totals()?;
        all_time.add(record);
        self.meta
            .insert(TOTALS_KEY, encode(&all_time))
            .map_err(db_error("writing totals"))?;
        since_start.add(record);
        self.wrote();
        Ok(())
    }

    fn recent(&self, limit: usize) -> Result<Vec<HistoryRecord>, Error> {
        SledQueue::newest(&self.history, limit)
    }

    fn record_refused(&self, record: &RefusedRecord) -> Result<(), Error> {
        let mut index = self.lock();
        self.append_bounded(
            &self.refused,
            &mut index.refused_len,
            REFUSED_CAP,
            encode(record),
        )?;
        let total = self.read_u64(REFUSED_TOTAL_KEY)? + 1;
        self.meta
            .insert(REFUSED_TOTAL_KEY, &total.to_be_bytes())
            .map_err(db_error("counting a refusal"))?;
        self.wrote();
        Ok(())
    }

    fn refused(&self, limit: usize) -> Result<Vec<RefusedRecord>, Error> {
        SledQueue::newest(&self.refused, limit)
    }

    fn refused_total(&self) -> Result<u64, Error> {
        self.read_u64(REFUSED_TOTAL_KEY)
    }

    fn totals(&self) -> Result<TotalsReport, Error> {
        let since_start = self.lock().since_start;
        Ok(TotalsReport {
            since_start,
            all_time: self.all_time_totals()?,
        })
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    fn flush(&self) -> Result<(), Error> {
        self.db.flush().map_err(db_error("flushing"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(n: u32) -> StorePath {
        StorePath::parse(&format!("/nix/store/{n:0>32}-p{n}"), "/nix/store").unwrap()
    }

    #[test]
    fn enqueue_dedupes_and_requeues_failed() {
        let q = SledQueue::temporary().unwrap();
        let r = q.enqueue(&[path(1), path(2)], "hook", 10).unwrap();
        assert_eq!(r.queued, vec![path(1), path(2)]);
        let r = q.enqueue(&[path(1)], "hook", 11).unwrap();
        assert_eq!(r.duplicate, vec![path(1)]);
        assert!(r.queued.is_empty());

        let mut e = q.get(&path(2)).unwrap().unwrap();
        e.state = State::Uploading;
        q.set(&e).unwrap();
        assert_eq!(
            q.enqueue(&[path(2)], "hook", 12).unwrap().duplicate.len(),
            1
        );
        e.state = State::Failed;
        e.attempts = 10;
        e.last_error = Some("HTTP 500".into());
        q.set(&e).unwrap();
        assert_eq!(
            q.counts(),
            Counts {
                queued: 1,
                uploading: 0,
                failed: 1
            }
        );
        let r = q.enqueue(&[path(2)], "spool", 13).unwrap();
        assert_eq!(r.queued, vec![path(2)]);
        let e = q.get(&path(2)).unwrap().unwrap();
        assert_eq!(
            (e.state, e.attempts, e.last_error),
            (State::Queued, 0, None)
        );
        assert_eq!(q.counts().queued, 2);
    }

    #[test]
    fn due_is_earliest_first_and_respects_time() {
        let q = SledQueue::temporary().unwrap();
        q.enqueue(&[path(1)], "hook", 30).unwrap();
        q.enqueue(&[path(2)], "hook", 10).unwrap();
        q.enqueue(&[path(3)], "hook", 20).unwrap();
        let mut later = q.get(&path(3)).unwrap().unwrap();
        later.next_attempt_at_ms = 100;
        later.attempts = 1;
        q.set(&later).unwrap();
        let due: Vec<_> = q.due(50, 10).unwrap().into_iter().map(|e| e.path).collect();
        assert_eq!(due, vec![path(2), path(1)]);
        assert_eq!(q.due(50, 1).unwrap().len(), 1);
        assert_eq!(q.next_due_at(), Some(10));
        q.remove(&path(2)).unwrap();
        q.remove(&path(1)).unwrap();
        assert_eq!(q.next_due_at(), Some(100));
        assert!(q.due(99, 10).unwrap().is_empty());
        assert_eq!(q.due(100, 10).unwrap().len(), 1);
    }

    #[test]
    fn reopen_keeps_entries_and_requeues_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let q = SledQueue::open(dir.path()).unwrap();
            q.enqueue(&[path(1), path(2)], "hook", 5).unwrap();
            let mut e = q.get(&path(1)).unwrap().unwrap();
            e.state = State::Uploading;
            q.set(&e).unwrap();
            q.record_refused(&RefusedRecord::new(
                "/tmp/x",
                "outside",
                Some(1000),
                "socket",
                7,
            ))
            .unwrap();
            q.flush().unwrap();
        }
        let q = SledQueue::open(dir.path()).unwrap();
        assert_eq!(
            q.counts(),
            Counts {
                queued: 1,
                uploading: 1,
                failed: 0
            }
        );
        assert_eq!(q.requeue_interrupted(50).unwrap(), 1);
        assert_eq!(q.counts().queued, 2);
        assert_eq!(q.get(&path(1)).unwrap().unwrap().next_attempt_at_ms, 50);
        assert_eq!(q.refused_total().unwrap(), 1);
        assert_eq!(q.refused(10).unwrap()[0].input, "/tmp/x");
    }

    #[test]
    fn retry_failed_all_or_some() {
        let q = SledQueue::temporary().unwrap();
        q.enqueue(&[path(1), path(2), path(3)], "hook", 1).unwrap();
        for n in [1, 2] {
            let mut e = q.get(&path(n)).unwrap().unwrap();
            e.state = State::Failed;
            e.attempts = 3;
            q.set(&e).unwrap();
        }
        assert_eq!(
            q.retry_failed(Some(&[path(2), path(3)]), 9).unwrap(),
            vec![path(2)]
        );
        assert_eq!(q.counts().failed, 1);
        assert_eq!(q.retry_failed(None, 9).unwrap(), vec![path(1)]);
        assert_eq!(
            q.counts(),
            Counts {
                queued: 3,
                uploading: 0,
                failed: 0
            }
        );
    }

    #[test]
    fn lists_are_bounded_and_totals_add_up() {
        let q = SledQueue::temporary().unwrap();
        for n in 0..(HISTORY_CAP as u32 + 5) {
            q.record_finished(&HistoryRecord {
                path: path(n),
                outcome: if n % 2 == 0 {
                    Outcome::Uploaded
                } else {
                    Outcome::SkippedUpstream
                },
                nar_size: Some(100),
                file_size: Some(40),
                duration_ms: 3,
                reason: None,
                finished_at_ms: u64::from(n),
            })
            .unwrap();
        }
        let recent = q.recent(1000).unwrap();
        assert_eq!(recent.len(), HISTORY_CAP);
        assert_eq!(recent[0].path, path(HISTORY_CAP as u32 + 4));
        let totals = q.totals().unwrap();
        assert_eq!(totals.all_time, totals.since_start);
        assert_eq!(totals.all_time.uploaded, 53);
        assert_eq!(totals.all_time.skipped_upstream, 52);
        assert_eq!(totals.all_time.nar_bytes, 5300);

        for n in 0..(REFUSED_CAP + 3) {
            q.record_refused(&RefusedRecord::new(
                &"x".repeat(1000),
                "bad",
                None,
                "socket",
                n as u64,
            ))
            .unwrap();
        }
        let refused = q.refused(1000).unwrap();
        assert_eq!(refused.len(), REFUSED_CAP);
        assert!(refused[0].input.chars().count() <= MAX_REFUSED_INPUT_CHARS + 1);
        assert_eq!(q.refused_total().unwrap(), REFUSED_CAP as u64 + 3);
    }

    #[test]
    fn present_cache_expires() {
        let q = SledQueue::temporary().unwrap();
        q.remember_present(&["abc", "def"], 100).unwrap();
        assert!(q.is_known_present("abc", 99).unwrap());
        assert!(!q.is_known_present("abc", 100).unwrap());
        assert!(!q.is_known_present("xyz", 0).unwrap());
    }

    #[test]
    fn writes_count_every_change() {
        let q = SledQueue::temporary().unwrap();
        let before = q.writes();
        q.enqueue(&[path(1)], "hook", 1).unwrap();
        q.enqueue(&[path(1)], "hook", 1).unwrap();
        assert_eq!(q.writes(), before + 1);
        q.flush().unwrap();
    }
}
