//! Every check that waits on something outside doctor (Nix, the daemon, the cache, a directory that may be a dead
//! network mount) gets at most [`CHECK_DEADLINE`], and says on stderr what it is waiting for once it has waited
//! [`SAY_WAITING_AFTER`], so an unreachable cache is never a silent pause. stderr keeps `--json` output clean.

use std::future::Future;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// The longest any one check waits.
pub(super) const CHECK_DEADLINE: Duration = Duration::from_secs(5);
/// How long a check may take before doctor says what it is waiting for.
pub(super) const SAY_WAITING_AFTER: Duration = Duration::from_secs(1);

/// Tells the user that doctor waits for `what`.
pub(super) fn say_waiting(what: &str) {
    eprintln!(
        "doctor: waiting for {what} (up to {} s)...",
        CHECK_DEADLINE.as_secs()
    );
}

/// Runs `work` on a thread of its own; `None` if it did not finish within [`CHECK_DEADLINE`] (the thread is left
/// to finish or die with the process: a blocked system call cannot be cancelled).
pub(super) fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    match result.recv_timeout(SAY_WAITING_AFTER) {
        Ok(value) => return Some(value),
        Err(RecvTimeoutError::Disconnected) => return None,
        Err(RecvTimeoutError::Timeout) => {}
    }
    say_waiting(what);
    result.recv_timeout(CHECK_DEADLINE - SAY_WAITING_AFTER).ok()
}

/// Awaits `future`; `None` if it did not finish within [`CHECK_DEADLINE`].
pub(super) async fn future<F: Future>(what: &str, future: F) -> Option<F::Output> {
    let future = std::pin::pin!(future);
    let mut future = future;
    tokio::select! {
        value = &mut future => return Some(value),
        _ = tokio::time::sleep(SAY_WAITING_AFTER) => {}
    }
    say_waiting(what);
    tokio::time::timeout(CHECK_DEADLINE - SAY_WAITING_AFTER, future)
        .await
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_future_gets_the_deadline_and_no_more() {
        let started = tokio::time::Instant::now();
        assert_eq!(future("nothing", async { 7 }).await, Some(7));
        assert_eq!(started.elapsed(), Duration::ZERO);
        let never = std::future::pending::<()>();
        assert_eq!(future("a blackhole", never).await, None);
        assert_eq!(started.elapsed(), CHECK_DEADLINE);
    }

    #[test]
    fn blocking_work_returns_its_value() {
        assert_eq!(blocking("arithmetic", || 6 * 7), Some(42));
    }
}
