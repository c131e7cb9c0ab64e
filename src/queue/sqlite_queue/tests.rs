//! The queue against SQLite in memory and on disk: dedup, due order, per-target state, reopen, damage.

use super::*;
use crate::queue::{Outcome, MAX_REFUSED_INPUT_CHARS};

fn path(n: u32) -> StorePath {
    StorePath::parse(&format!("/nix/store/{n:0>32}-p{n}"), "/nix/store").unwrap()
}

#[test]
fn enqueue_dedupes_and_requeues_failed() {
    let q = SqliteQueue::temporary().unwrap();
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
            failed: 1,
            held_back: 0,
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
fn backlog_follows_the_oldest_waiting_path_and_the_retrying_ones() {
    let q = SqliteQueue::temporary().unwrap();
    assert_eq!(q.backlog(), Backlog::default());
    q.enqueue(&[path(1)], "hook", 30).unwrap();
    q.enqueue(&[path(2)], "hook", 10).unwrap();
    let mut e = q.get(&path(2)).unwrap().unwrap();
    e.state = State::Uploading;
    q.set(&e).unwrap();
    assert_eq!(q.backlog().oldest_enqueued_at_ms, Some(10));
    e.state = State::Queued;
    e.last_error = Some("HTTP 500".into());
    q.set(&e).unwrap();
    assert_eq!(q.backlog().retrying, 1);
    // Parked paths wait for `retry`, not for the uploader.
    e.state = State::Failed;
    q.set(&e).unwrap();
    assert_eq!(
        q.backlog(),
        Backlog {
            oldest_enqueued_at_ms: Some(30),
            retrying: 0
        }
    );
    q.remove(&path(1)).unwrap();
    assert_eq!(q.backlog().oldest_enqueued_at_ms, None);
}

#[test]
fn due_is_earliest_first_and_respects_time() {
    let q = SqliteQueue::temporary().unwrap();
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
fn reopen_keeps_flushed_entries_only_and_requeues_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(DB_FILE);
    {
        let q = SqliteQueue::open(&file).unwrap();
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
        // Not flushed: must not survive.
        q.enqueue(&[path(3)], "hook", 6).unwrap();
    }
    let q = SqliteQueue::open(&file).unwrap();
    assert_eq!(
        q.counts(),
        Counts {
            queued: 1,
            uploading: 1,
            failed: 0,
            held_back: 0,
        }
    );
    assert_eq!(q.requeue_interrupted(50).unwrap(), 1);
    assert_eq!(q.counts().queued, 2);
    assert_eq!(q.get(&path(1)).unwrap().unwrap().next_attempt_at_ms, 50);
    assert_eq!(q.refused_total().unwrap(), 1);
    assert_eq!(q.refused(10).unwrap()[0].input, "/tmp/x");
    assert_eq!(q.commit_stats().commits, 0);
    q.flush().unwrap();
    assert_eq!(q.commit_stats().commits, 1);
}

#[test]
fn a_changed_record_is_reported_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(DB_FILE);
    let q = SqliteQueue::open(&file).unwrap();
    q.enqueue(&[path(1)], "hook", 5).unwrap();
    q.flush().unwrap();
    {
        let inner = q.lock();
        inner
            .connection
            .execute(
                "UPDATE target_entries SET record = replace(record, '\"hook\"', '\"hoom\"')",
                [],
            )
            .unwrap();
    }
    let e = q.get(&path(1)).unwrap_err();
    assert!(matches!(e, Error::Checksum { .. }), "{e}");
}

#[test]
fn list_pages_in_path_order() {
    let q = SqliteQueue::temporary().unwrap();
    q.enqueue(&[path(3), path(1), path(2)], "hook", 1).unwrap();
    let first = q.list(None, 2).unwrap();
    assert_eq!(
        first.iter().map(|e| e.path.clone()).collect::<Vec<_>>(),
        vec![path(1), path(2)]
    );
    let rest = q.list(Some(path(2).as_str()), 2).unwrap();
    assert_eq!(
        rest.iter().map(|e| e.path.clone()).collect::<Vec<_>>(),
        vec![path(3)]
    );
    assert!(q.list(Some(path(3).as_str()), 2).unwrap().is_empty());
}

#[test]
fn retry_failed_all_or_some() {
    let q = SqliteQueue::temporary().unwrap();
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
            failed: 0,
            held_back: 0,
        }
    );
}

#[test]
fn held_back_paths_wait_for_a_retry_or_a_new_request_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(DB_FILE);
    {
        let q = SqliteQueue::open(&file).unwrap();
        q.enqueue(&[path(1), path(2)], "hook", 1).unwrap();
        for n in [1, 2] {
            let mut e = q.get(&path(n)).unwrap().unwrap();
            e.state = State::HeldBack;
            e.last_error = Some("reference … is excluded".into());
            q.set(&e).unwrap();
        }
        q.flush().unwrap();
    }
    let q = SqliteQueue::open(&file).unwrap();
    assert_eq!(q.counts().held_back, 2);
    assert!(q.due(u64::MAX, 10).unwrap().is_empty());
    assert_eq!(q.next_due_at(), None);
    // The hook brings one again (a rebuild), `retry` the other.
    assert_eq!(
        q.enqueue(&[path(1)], "hook", 5).unwrap().queued,
        vec![path(1)]
    );
    assert_eq!(q.retry_failed(None, 6).unwrap(), vec![path(2)]);
    let e = q.get(&path(2)).unwrap().unwrap();
    assert_eq!(
        (e.state, e.attempts, e.last_error),
        (State::Queued, 0, None)
    );
    assert_eq!(
        q.counts(),
        Counts {
            queued: 2,
            uploading: 0,
            failed: 0,
            held_back: 0,
        }
    );
}

#[test]
fn lists_are_bounded_and_totals_add_up() {
    let q = SqliteQueue::temporary().unwrap();
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
    assert_eq!(totals.all_time.paths(Outcome::Uploaded), 53);
    assert_eq!(totals.all_time.paths(Outcome::SkippedUpstream), 52);
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
fn each_target_keeps_its_own_entries_history_and_totals() {
    let q = SqliteQueue::temporary().unwrap();
    let backup = q.target("backup");
    q.enqueue(&[path(1), path(2)], "hook", 10).unwrap();
    assert_eq!(
        backup.enqueue(&[path(1)], "hook", 10).unwrap().queued,
        [path(1)],
        "queued for the other target too"
    );
    let mut failed = backup.get(&path(1)).unwrap().unwrap();
    failed.state = State::Failed;
    failed.attempts = 3;
    backup.set(&failed).unwrap();
    assert_eq!((q.counts().queued, q.counts().failed), (2, 0));
    assert_eq!((backup.counts().queued, backup.counts().failed), (0, 1));
    assert_eq!(q.due(10, 10).unwrap().len(), 2);
    assert!(backup.due(10, 10).unwrap().is_empty());

    // Done for `default`, still held for `backup`: the path is not finished.
    q.remove(&path(1)).unwrap();
    assert!(q.held_by_any_target(&path(1)).unwrap());
    backup.remove(&path(1)).unwrap();
    assert!(!q.held_by_any_target(&path(1)).unwrap());
    let every: Vec<(String, StorePath)> = q
        .entries_of_every_target()
        .unwrap()
        .into_iter()
        .map(|(t, e)| (t, e.path))
        .collect();
    assert_eq!(every, [("default".to_owned(), path(2))]);

    let record = |n| HistoryRecord {
        path: path(n),
        outcome: Outcome::Uploaded,
        nar_size: Some(100),
        file_size: Some(10),
        duration_ms: 1,
        reason: None,
        finished_at_ms: 20,
    };
    q.record_finished(&record(1)).unwrap();
    backup.record_finished(&record(2)).unwrap();
    backup.record_finished(&record(3)).unwrap();
    assert_eq!(q.recent(10).unwrap().len(), 1);
    assert_eq!(backup.recent(10).unwrap()[0].path, path(3));
    assert_eq!(q.totals().unwrap().all_time.paths(Outcome::Uploaded), 1);
    assert_eq!(
        backup.totals().unwrap().all_time.paths(Outcome::Uploaded),
        2
    );
    assert_eq!(backup.totals().unwrap().since_start.nar_bytes, 200);
    // Refusals belong to the daemon, not a target.
    backup
        .record_refused(&RefusedRecord::new("/tmp/x", "outside", None, "socket", 1))
        .unwrap();
    assert_eq!(q.refused_total().unwrap(), 1);
}

#[test]
fn a_queue_from_before_named_targets_is_moved_to_the_default_target() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(DB_FILE);
    {
        let old = Connection::open(&file).unwrap();
        old.execute_batch(
            "CREATE TABLE entries (path TEXT PRIMARY KEY, record TEXT NOT NULL, checksum INTEGER NOT NULL);
             CREATE TABLE history (id INTEGER PRIMARY KEY, record TEXT NOT NULL, checksum INTEGER NOT NULL);",
        )
        .unwrap();
        let record = encode(&Entry::new(path(1), "hook", 5));
        old.execute(
            "INSERT INTO entries VALUES (?1, ?2, ?3)",
            params![path(1).as_str(), record, checksum(&record)],
        )
        .unwrap();
        let finished = encode(&HistoryRecord {
            path: path(2),
            outcome: Outcome::Uploaded,
            nar_size: None,
            file_size: None,
            duration_ms: 0,
            reason: None,
            finished_at_ms: 1,
        });
        old.execute(
            "INSERT INTO history (record, checksum) VALUES (?1, ?2)",
            params![finished, checksum(&finished)],
        )
        .unwrap();
    }
    for _ in 0..2 {
        let q = SqliteQueue::open(&file).unwrap();
        assert_eq!(q.get(&path(1)).unwrap().unwrap().source, "hook");
        assert_eq!(q.counts().queued, 1);
        assert_eq!(q.recent(10).unwrap()[0].path, path(2));
        assert!(q.target("other").get(&path(1)).unwrap().is_none());
    }
}

#[test]
fn a_flush_with_nothing_to_commit_still_waits_for_the_sync_of_an_earlier_commit() {
    let dir = tempfile::tempdir().unwrap();
    let q = SqliteQueue::open(&dir.path().join(DB_FILE)).unwrap();
    q.enqueue(&[path(1)], "hook", 5).unwrap();
    // Another flush committed this write and has not synced it yet.
    let (through, committed) = q.commit().unwrap();
    assert!(committed);
    assert!(q.db.synced.load(Ordering::SeqCst) < through);
    // This caller's write is in that commit: its flush must not return before a sync covers it.
    q.flush().unwrap();
    assert_eq!(q.db.synced.load(Ordering::SeqCst), through);
    // Once covered, a flush with nothing new returns at once, without another sync.
    q.flush().unwrap();
    assert_eq!(q.commit_stats().commits, 0, "no commit of its own");
}

#[test]
fn present_cache_expires() {
    let q = SqliteQueue::temporary().unwrap();
    q.remember_present(&["abc", "def"], 100).unwrap();
    assert!(q.is_known_present("abc", 99).unwrap());
    assert!(!q.is_known_present("abc", 100).unwrap());
    assert!(!q.is_known_present("xyz", 0).unwrap());
}

#[test]
fn writes_count_every_change() {
    let q = SqliteQueue::temporary().unwrap();
    let before = q.writes();
    q.enqueue(&[path(1)], "hook", 1).unwrap();
    q.enqueue(&[path(1)], "hook", 1).unwrap();
    assert_eq!(q.writes(), before + 1);
    q.flush().unwrap();
}

// See: #15 (a backward clock jump between two runs must not stall retries or keep presence forever)
#[test]
fn times_from_the_future_are_clamped() {
    let q = SqliteQueue::temporary().unwrap();
    q.enqueue(&[path(1), path(2)], "hook", 1_000_000).unwrap();
    let mut e = q.get(&path(2)).unwrap().unwrap();
    e.next_attempt_at_ms = 1_000_000 + 30_000;
    q.set(&e).unwrap();
    q.remember_present(&["far", "near"], 1_000_000 + 86_400_000)
        .unwrap();
    q.remember_present(&["far"], 1_000_000 + 365 * 86_400_000)
        .unwrap();
    // The clock now reads 1000 s earlier than when these were written.
    let now = 1_000_000 - 1_000_000;
    assert_eq!(q.clamp_future_times(now, 600_000, 86_400_000).unwrap(), 2);
    assert_eq!(q.due(now, 10).unwrap().len(), 2);
    assert!(!q.is_known_present("far", now).unwrap());
}
