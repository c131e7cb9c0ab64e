//! The durable queue of store paths waiting to be pushed; the only module that knows SQLite's queue schema (and
//! sled, read once to import an older queue).
//!
//! One SQLite database (`state_dir/queue/queue.sqlite3`, WAL mode) with these tables, each
//! record JSON with a checksum beside it:
//!
//! - `target_entries`: (target name, store path) → [`Entry`], for example
//!   `{"path":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","state":"queued","attempts":0,
//!   "next_attempt_at_ms":1732600000000,"last_error":null,"enqueued_at_ms":1732600000000,
//!   "updated_at_ms":1732600000000,"source":"hook"}`;
//! - `present`: hash part → expiry (unix ms) of "the target or an upstream has this path";
//! - `history`: id → [`HistoryRecord`] and its target, the last [`HISTORY_CAP`] finished paths of each target;
//! - `refused`: id → [`RefusedRecord`], the last [`REFUSED_CAP`] refused requests;
//! - `meta`: all-time counters ([`Totals`] under `totals` for the target named `default` and `totals:NAME` for
//!   the others, the refused count under `refused_total`).
//!
//! A path waits for each configured target on its own (attempts, retry time, failure, hold-back); it is finished
//! when no target holds an entry for it. A [`Queue`] is one target's view ([`Queue::for_target`]); all views share
//! one database, one write counter and one flush.
//!
//! Nothing written is durable until [`Queue::flush`] returns: writes collect in one open transaction, and the
//! flush commits it and fdatasyncs the write-ahead log. The daemon acknowledges a request only after a flush that
//! started after the request's writes: read [`Queue::writes`] after writing, then wait until a flush that began at
//! or after that count has finished (`daemon::commit`). Every write happens under one lock that also bumps the
//! write counter, so a request that finds its path already queued by someone else also waits for that write.
//!
//! [`open`] takes the directory's lock, checks the database and salvages a damaged one. Counts per state and the
//! due order live in memory and are rebuilt from `entries` at open, so they cannot disagree with what is on disk
//! after a crash. Everything else talks to the [`Queue`] trait.

mod index;
mod open;
mod salvage;
mod schema;
mod sled_import;
mod sqlite_queue;
mod totals;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store_path::StorePath;

/// Shared with the status report, which shows the history's outcomes as they are.
pub use crate::outcome::Outcome;
pub use open::{open, Damage, Opened};
pub use sqlite_queue::{sync_dir, CommitStats, SqliteQueue, DB_FILE, ENTRIES_TABLE};
pub use totals::Totals;

/// The longest retry delay the engine ever sets (a server's `Retry-After` is capped at ten minutes). A stored
/// retry time further ahead than this was written under a clock that has since gone back.
pub const MAX_RETRY_DELAY_MS: u64 = 600_000;

/// How many finished paths the history keeps.
pub const HISTORY_CAP: usize = 100;
/// How many refused requests are kept.
pub const REFUSED_CAP: usize = 100;
/// Longest refused input kept in a [`RefusedRecord`], in characters.
pub const MAX_REFUSED_INPUT_CHARS: usize = 300;

/// Why the queue could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another daemon holds the queue directory's lock.
    #[error(
        "another nixpush daemon is already using the state directory {}: stop it first (systemctl stop nixpush), \
         or give this one its own state_dir",
        dir.parent().unwrap_or(dir).display()
    )]
    Locked {
        /// The queue directory.
        dir: PathBuf,
    },
    /// A file of the queue could not be created, moved, locked or synced.
    #[error("cannot use {path} ({operation}): {source}; check that the daemon's user owns the state directory")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the queue was doing, e.g. "syncing".
        operation: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// An SQLite operation failed.
    #[error("queue database {path}: error while {operation}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What the queue was doing, e.g. "committing".
        operation: &'static str,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The old sled queue could not be opened for import.
    #[error("cannot open the old queue database {path} to import it: {source}")]
    Open {
        /// The sled directory.
        path: PathBuf,
        /// What sled said.
        source: sled::Error,
    },
    /// Reading the old sled queue failed.
    #[error("old queue database error while {operation}: {source}")]
    Db {
        /// What the import was doing.
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
    /// A stored record does not match its checksum.
    #[error("corrupt queue record {key:?}: its checksum does not match")]
    Checksum {
        /// The record's key, as text.
        key: String,
    },
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
    /// Held back by the target's filters (a reference is filtered out and no cache has it), with the reason in
    /// `last_error`: finished for now, without an attempt spent, until retried or requested again.
    HeldBack,
}

impl State {
    /// Whether the entry waits for `retry` (or a new request for the path) rather than for its next attempt.
    pub fn waits_for_retry(self) -> bool {
        match self {
            State::Failed | State::HeldBack => true,
            State::Queued | State::Uploading => false,
        }
    }
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
    /// The reason the last attempt failed, or why the path is held back.
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
    /// In state held back.
    #[serde(default)]
    pub held_back: u64,
}

/// What waits, beyond the counts per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// When the longest-waiting queued or uploading path was queued (unix ms); `None` when none waits.
    pub oldest_enqueued_at_ms: Option<u64>,
    /// Queued paths whose last attempt failed (waiting out a backoff, or due again).
    pub retrying: u64,
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

/// Totals since the queue was opened and since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TotalsReport {
    /// Since this process opened the queue.
    pub since_start: Totals,
    /// Since the database was created.
    pub all_time: Totals,
}

/// The queue as the daemon and the upload engine see it. All methods are quick (no fsync) except
/// [`Queue::flush`], which callers on an async runtime run on a blocking thread (a write may wait for a flush in
/// progress to finish).
pub trait Queue: Send + Sync {
    /// The view of the target named `name`, sharing this queue's database, writes and flushes.
    fn for_target(&self, name: &str) -> Arc<dyn Queue>;
    /// The name of the target this view belongs to.
    fn target_name(&self) -> &str;
    /// Whether any target still holds an entry for `path` (in any state).
    fn held_by_any_target(&self, path: &StorePath) -> Result<bool, Error>;
    /// Every target's entries as (target name, entry), in target and path order.
    fn entries_of_every_target(&self) -> Result<Vec<(String, Entry)>, Error>;
    /// Queues each path. A path already queued or uploading is left alone and reported as a duplicate; a failed
    /// or held-back one is requeued with its attempts reset.
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
    /// Up to `limit` entries with paths after `after` (all when `None`), in path order: one page of a listing.
    fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<Entry>, Error>;
    /// Entries per state.
    fn counts(&self) -> Counts;
    /// The oldest waiting path and the number retrying; as quick as [`Queue::counts`].
    fn backlog(&self) -> Backlog;
    /// Puts entries (of every target) left `uploading` by a previous process back to `queued`, due now. Run once
    /// at startup.
    fn requeue_interrupted(&self, now_ms: u64) -> Result<usize, Error>;
    /// Requeues failed and held-back entries (all, or those listed) with attempts reset; returns the paths
    /// requeued.
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
    /// Makes every write so far durable (commits, then fdatasyncs the write-ahead log).
    fn flush(&self) -> Result<(), Error>;
}

/// Milliseconds since the Unix epoch, the time unit of every record. Never goes back within a process: it follows
/// the wall clock forward, but a backward jump of the wall clock is ignored (monotonic time carries on from the
/// last reading), so retry times and "present" expiry do not stall for the size of the jump.
pub fn now_ms() -> u64 {
    static ANCHOR: Mutex<Option<(u64, Instant)>> = Mutex::new(None);
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let now = Instant::now();
    let mut anchor = ANCHOR.lock().unwrap_or_else(PoisonError::into_inner);
    let (anchor_wall, anchor_at) = *anchor.get_or_insert((wall, now));
    let monotonic = anchor_wall + now.duration_since(anchor_at).as_millis() as u64;
    if wall >= monotonic {
        // Re-anchor on the wall clock, so a forward jump (or time spent suspended) is followed.
        *anchor = Some((wall, now));
        wall
    } else {
        monotonic
    }
}
