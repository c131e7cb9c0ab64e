//! Opening the queue directory: the lock that keeps a second daemon out, the check that the database is whole,
//! what happens when it is not, and the one-time import of a sled queue from an older nixpush.
//!
//! A damaged database (unreadable, truncated, zeroed, a record whose checksum does not match, or missing while
//! `queue.created` says it existed) is never opened as if it were fine. Its files are moved to
//! `queue/damaged-<unix ms>/`, a fresh database is created, and everything [`salvage`](super::salvage) can read is
//! queued again; the [`Damage`] report goes to the log (error level) and to `status`.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::sqlite_queue::{checksum, sync_dir, SqliteQueue, DB_FILE};
use super::{now_ms, salvage, sled_import, Error, Queue};

/// Written (and fsynced) once the database exists, so a database that later vanishes or empties is noticed.
const CREATED_MARKER: &str = "queue.created";
const LOCK_FILE: &str = "lock";

/// What was wrong with the queue database at startup and what was recovered. Shown by `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damage {
    /// The damaged database file.
    pub file: PathBuf,
    /// Where its files were moved.
    pub kept_at: PathBuf,
    /// What was wrong, e.g. `database disk image is malformed`.
    pub problem: String,
    /// Whole entries read back, with their state.
    pub entries_read: u64,
    /// Rows that could not be read or failed their checksum.
    pub unreadable_rows: u64,
    /// Store paths queued again (whole entries and paths found in the raw bytes).
    pub requeued: u64,
    /// Unix time (ms) it was found.
    pub found_at_ms: u64,
}

impl Damage {
    /// The error line for the log.
    pub fn describe(&self) -> String {
        format!(
            "the queue database {} was damaged ({}); kept it in {}; read {} whole entries, {} rows unreadable, \
             queued {} paths again. Paths acknowledged but not found are not in the queue: push recent builds \
             again (see README, Troubleshooting)",
            self.file.display(),
            self.problem,
            self.kept_at.display(),
            self.entries_read,
            self.unreadable_rows,
            self.requeued
        )
    }
}

/// An open queue and what opening it found.
pub struct Opened {
    /// The queue.
    pub queue: SqliteQueue,
    /// Set when the database was damaged.
    pub damage: Option<Damage>,
    /// Entries imported from an older sled queue.
    pub imported_from_sled: Option<usize>,
    /// Held while the queue is open; a second daemon on the same directory fails to take it.
    pub lock: Flock<File>,
}

/// Opens the queue in `dir` (created if missing) for paths in `store_dir`.
pub fn open(dir: &Path, store_dir: &str) -> Result<Opened, Error> {
    let io_error = |path: &Path, operation: &'static str| {
        let path = path.to_owned();
        move |source| Error::Io {
            path,
            operation,
            source,
        }
    };
    let lock_path = dir.join(LOCK_FILE);
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_error(&lock_path, "opening"))?;
    let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            Error::Locked {
                dir: dir.to_owned(),
            }
        } else {
            Error::Io {
                path: lock_path.clone(),
                operation: "locking",
                source: errno.into(),
            }
        }
    })?;

    let db = dir.join(DB_FILE);
    let marker = dir.join(CREATED_MARKER);
    let sled_files = sled_import::files(dir);
    let problem = if marker.exists() {
        match std::fs::metadata(&db) {
            Ok(meta) if meta.len() == 0 => Some("the file is empty".to_owned()),
            Ok(_) => check(&db).err(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some("the file is missing".to_owned())
            }
            Err(e) => Some(format!("cannot read it: {e}")),
        }
    } else if db.exists() {
        // Created but not yet marked: a first start that died right away. Still checked.
        check(&db).err()
    } else {
        None
    };

    let mut damage = None;
    let queue = match problem {
        None => SqliteQueue::open(&db)?,
        Some(problem) => {
            let found_at_ms = now_ms();
            let kept_at = dir.join(format!("damaged-{found_at_ms}"));
            std::fs::create_dir(&kept_at).map_err(io_error(&kept_at, "creating"))?;
            let mut moved = Vec::new();
            for suffix in ["", "-wal", "-shm"] {
                let from = dir.join(format!("{DB_FILE}{suffix}"));
                let to = kept_at.join(format!("{DB_FILE}{suffix}"));
                if from.exists() {
                    std::fs::rename(&from, &to).map_err(io_error(&from, "moving aside"))?;
                    moved.push(to);
                }
            }
            sync_dir(&kept_at)?;
            sync_dir(dir)?;
            let moved_refs: Vec<&Path> = moved.iter().map(PathBuf::as_path).collect();
            let found = salvage::salvage(&kept_at.join(DB_FILE), &moved_refs, store_dir);
            let queue = SqliteQueue::open(&db)?;
            let now = now_ms();
            let mut requeued = 0u64;
            for (target, entry) in &found.entries {
                queue.target(target).set(entry)?;
                requeued += 1;
            }
            // Paths found only in the raw bytes go to the `default` target; if it is not configured, the daemon
            // queues them for the configured ones at start.
            let whole: std::collections::BTreeSet<_> =
                found.entries.iter().map(|(_, e)| e.path.clone()).collect();
            let loose: Vec<_> = found
                .paths
                .iter()
                .filter(|p| !whole.contains(*p))
                .cloned()
                .collect();
            requeued += queue.enqueue(&loose, "salvage", now)?.queued.len() as u64;
            queue.flush()?;
            let problem = match &found.read_error {
                Some(read) if !problem.contains(read.as_str()) => format!("{problem}; {read}"),
                _ => problem,
            };
            damage = Some(Damage {
                file: db.clone(),
                kept_at,
                problem,
                entries_read: found.entries.len() as u64,
                unreadable_rows: found.unreadable_rows,
                requeued,
                found_at_ms,
            });
            queue
        }
    };

    let mut imported_from_sled = None;
    if !sled_files.is_empty() {
        imported_from_sled = Some(import_sled(dir, &sled_files, &queue)?);
    }
    if !marker.exists() {
        queue.flush()?;
        sync_dir(dir)?;
        File::create(&marker)
            .and_then(|f| f.sync_all())
            .map_err(io_error(&marker, "creating"))?;
        sync_dir(dir)?;
    }
    Ok(Opened {
        queue,
        damage,
        imported_from_sled,
        lock,
    })
}

/// Copies the old sled queue into `queue`, makes it durable, then moves sled's files to `sled-imported-<ms>/`.
fn import_sled(dir: &Path, files: &[PathBuf], queue: &SqliteQueue) -> Result<usize, Error> {
    let contents = sled_import::read(dir)?;
    for key in &contents.undecodable {
        tracing::warn!(
            "the old sled queue has an entry that does not decode, not imported: {key:?}"
        );
    }
    for entry in &contents.entries {
        if queue.get(&entry.path)?.is_none() {
            queue.set(entry)?;
        }
    }
    queue.import_records(
        &contents.history,
        &contents.refused,
        contents.totals,
        contents.refused_total,
    )?;
    queue.flush()?;
    let aside = dir.join(format!("sled-imported-{}", now_ms()));
    std::fs::create_dir(&aside).map_err(|source| Error::Io {
        path: aside.clone(),
        operation: "creating",
        source,
    })?;
    for file in files {
        if let Some(name) = file.file_name() {
            std::fs::rename(file, aside.join(name)).map_err(|source| Error::Io {
                path: file.clone(),
                operation: "moving aside",
                source,
            })?;
        }
    }
    sync_dir(dir)?;
    tracing::info!(
        imported = contents.entries.len(),
        kept_at = %aside.display(),
        "imported the queue of an older nixpush (sled) into {}",
        queue.path().display()
    );
    Ok(contents.entries.len())
}

/// Ok when SQLite finds the database whole and every record matches its checksum; otherwise what is wrong.
fn check(db: &Path) -> Result<(), String> {
    let connection = Connection::open(db).map_err(|e| e.to_string())?;
    let problems: Vec<String> = connection
        .prepare("PRAGMA integrity_check(20)")
        .and_then(|mut s| {
            s.query_map([], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| e.to_string())?;
    if problems != ["ok"] {
        return Err(format!("integrity check: {}", problems.join("; ")));
    }
    let mut bad = 0u64;
    let mut total = 0u64;
    let tables: Vec<String> = connection
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .and_then(|mut s| {
            s.query_map([], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| e.to_string())?;
    // `entries` only in a queue from before targets had names, not yet moved.
    let entry_tables: Vec<&str> = [super::ENTRIES_TABLE, "entries"]
        .into_iter()
        .filter(|t| tables.iter().any(|name| name == t))
        .collect();
    let record_tables = ["history", "refused", "meta"]
        .into_iter()
        .filter(|t| tables.iter().any(|name| name == t));
    for table in entry_tables.iter().copied().chain(record_tables) {
        let sums: Vec<(String, i64)> = connection
            .prepare(&format!("SELECT record, checksum FROM {table}"))
            .and_then(|mut s| {
                s.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(|e| e.to_string())?;
        total += sums.len() as u64;
        bad += sums.iter().filter(|(r, sum)| checksum(r) != *sum).count() as u64;
    }
    // An entry that decodes but is not an entry (a flipped byte in a field name) is damage too.
    let mut unreadable_entries = 0;
    for table in &entry_tables {
        unreadable_entries += connection
            .prepare(&format!("SELECT record FROM {table}"))
            .and_then(|mut s| {
                s.query_map([], |row| row.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(|e| e.to_string())?
            .iter()
            .filter(|r| serde_json::from_str::<super::Entry>(r).is_err())
            .count();
    }
    if bad > 0 || unreadable_entries > 0 {
        return Err(format!(
            "{} of {total} records fail their checksum or do not decode",
            bad.max(unreadable_entries as u64)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store_path::StorePath;

    fn path(n: u32) -> StorePath {
        StorePath::parse(&format!("/nix/store/{n:0>32}-p{n}"), "/nix/store").unwrap()
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path(), "/nix/store").unwrap();
        let e = open(dir.path(), "/nix/store").err().unwrap();
        assert!(matches!(e, Error::Locked { .. }), "{e}");
        assert!(e.to_string().contains("another nixpush daemon"), "{e}");
        drop(first);
        open(dir.path(), "/nix/store").unwrap();
    }

    #[test]
    fn an_emptied_database_is_damage_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let opened = open(dir.path(), "/nix/store").unwrap();
            opened.queue.enqueue(&[path(1)], "hook", 1).unwrap();
            opened.queue.checkpoint().unwrap();
        }
        std::fs::write(dir.path().join(DB_FILE), b"").unwrap();
        let opened = open(dir.path(), "/nix/store").unwrap();
        let damage = opened.damage.unwrap();
        assert!(
            damage.problem.starts_with("the file is empty"),
            "{damage:?}"
        );
        assert!(damage.kept_at.join(DB_FILE).exists());
    }

    #[test]
    fn a_changed_record_is_damage_and_its_path_is_requeued() {
        let dir = tempfile::tempdir().unwrap();
        {
            let opened = open(dir.path(), "/nix/store").unwrap();
            opened
                .queue
                .enqueue(&[path(1), path(2)], "hook", 1)
                .unwrap();
            opened.queue.checkpoint().unwrap();
        }
        let db = dir.path().join(DB_FILE);
        let mut bytes = std::fs::read(&db).unwrap();
        let at = bytes
            .windows(6)
            .position(|w| w == b"\"hook\"")
            .expect("a record in the file");
        bytes[at + 2] ^= 0x01;
        std::fs::write(&db, bytes).unwrap();
        let opened = open(dir.path(), "/nix/store").unwrap();
        let damage = opened.damage.expect("damage reported");
        assert!(damage.problem.contains("checksum"), "{damage:?}");
        assert_eq!(damage.requeued, 2, "{damage:?}");
        assert_eq!(opened.queue.counts().queued, 2);
    }

    #[test]
    fn an_older_sled_queue_is_imported_once_and_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let entries = db.open_tree("entries").unwrap();
            for n in [1, 2] {
                let entry = super::super::Entry::new(path(n), "hook", 5);
                entries
                    .insert(path(n).as_str(), serde_json::to_vec(&entry).unwrap())
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let opened = open(dir.path(), "/nix/store").unwrap();
        assert_eq!(opened.imported_from_sled, Some(2));
        assert_eq!(opened.queue.counts().queued, 2);
        assert!(!dir.path().join("db").exists(), "sled's files moved aside");
        drop(opened);
        let again = open(dir.path(), "/nix/store").unwrap();
        assert_eq!(again.imported_from_sled, None);
        assert_eq!(again.queue.counts().queued, 2);
        assert!(again.damage.is_none());
    }
}
