//! The scheduler's waits under paused time, and the presence memory across restarts and clock jumps.

use tokio::time::Instant;

use super::*;
use crate::queue::SqliteQueue;

fn shared() -> (tempfile::TempDir, Arc<Shared>) {
    let tmp = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: tmp.path().join("state"),
        ..Config::default()
    };
    let queue: Arc<dyn Queue> = Arc::new(SqliteQueue::temporary().unwrap());
    (tmp, Shared::new(config, queue, false))
}

#[tokio::test(start_paused = true)]
async fn a_paused_target_is_probed_again_after_the_interval() {
    let (_tmp, shared) = shared();
    let (stop, secrets) = (CancellationToken::new(), Notify::new());
    let started = Instant::now();
    let lane = &shared.lanes[0];
    let changed = wait_for_change(lane, &stop, &secrets, AUTH_PROBE_INTERVAL).await;
    assert!(!changed);
    assert_eq!(started.elapsed(), AUTH_PROBE_INTERVAL);
}

#[tokio::test(start_paused = true)]
async fn a_rotated_secret_or_new_work_ends_the_wait_at_once() {
    let (_tmp, shared) = shared();
    let (stop, secrets) = (CancellationToken::new(), Notify::new());
    let started = Instant::now();
    let lane = &shared.lanes[0];
    secrets.notify_one();
    assert!(wait_for_change(lane, &stop, &secrets, AUTH_PROBE_INTERVAL).await);
    lane.work_available.notify_one();
    assert!(!wait_for_change(lane, &stop, &secrets, AUTH_PROBE_INTERVAL).await);
    stop.cancel();
    assert!(!wait_for_change(lane, &stop, &secrets, AUTH_PROBE_INTERVAL).await);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[test]
fn only_transient_presence_failures_are_outages() {
    let status = |code| {
        upload::Error::Presence(crate::backend::Error::Status {
            method: "HEAD".into(),
            url: "u".into(),
            code,
            retry_after: None,
            detail: String::new(),
        })
    };
    assert!(is_presence_outage(&status(503)));
    assert!(!is_presence_outage(&status(404)));
    let refused = upload::Error::Presence(crate::backend::Error::Unauthorized {
        url: "u".into(),
        code: 401,
        detail: String::new(),
    });
    assert!(!is_presence_outage(&refused));
    let upload = upload::Error::Backend(crate::backend::Error::Timeout { url: "u".into() });
    assert!(!is_presence_outage(&upload));
}

// See: #15
#[test]
fn presence_is_per_target_per_lifetime_and_ignores_stored_times_from_the_future() {
    let dir = tempfile::tempdir().unwrap();
    let queue: Arc<dyn Queue> =
        Arc::new(SqliteQueue::open(&dir.path().join("queue.sqlite3")).unwrap());
    let first = QueuePresence::new(Arc::clone(&queue), 3600, "file:///a");
    assert_eq!(first.presence("h1"), PresenceMemory::Unknown);
    first.remember_present(&["h1"]);
    assert_eq!(first.presence("h1"), PresenceMemory::Answered);

    // A later daemon (a new lifetime) on the same target remembers, but asks again where it matters.
    let later = QueuePresence::new(Arc::clone(&queue), 3600, "file:///a");
    assert_eq!(later.presence("h1"), PresenceMemory::Remembered);
    // Another target starts from nothing.
    let other = QueuePresence::new(Arc::clone(&queue), 3600, "file:///b");
    assert_eq!(other.presence("h1"), PresenceMemory::Unknown);

    // An expiry further ahead than the TTL was written under a clock that has since jumped back.
    let key = later.key("h2");
    let far = queue::now_ms() + 10 * 3600 * 1000;
    queue.remember_present(&[&key], far).unwrap();
    assert_eq!(later.presence("h2"), PresenceMemory::Unknown);
}
