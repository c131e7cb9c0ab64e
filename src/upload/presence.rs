//! What the target and the upstream caches already hold, so that only the rest is uploaded: the memory of
//! paths seen present ([`PresentCache`]), the target's `missing` query tried again while it fails transiently
//! ([`Presence::target_lacks`]), and the upstream caches (through [`crate::backend::upstream`]).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::{upstream::Upstreams, Backend};
use crate::pathinfo::PathInfo;
use crate::store_path::StorePath;

use super::{retry, Error};

/// What is remembered about whether the target (or an upstream) holds a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceMemory {
    /// Nothing, or the memory expired.
    Unknown,
    /// The target said so, or we uploaded it, in this process's lifetime: good enough to reference it.
    Answered,
    /// Remembered from before this process started: good enough to skip the path, not to publish a narinfo that
    /// references it (the cache may have lost it since), so such paths are asked again where that matters.
    Remembered,
}

/// Remembers which paths the target or an upstream is known to hold, so a rebuild does not ask again. Answers
/// belong to one target: an implementation keeps them apart by the target's identity.
pub trait PresentCache: Send + Sync {
    /// What is known about `hash_part`.
    fn presence(&self, hash_part: &str) -> PresenceMemory;
    /// Remembers these paths as present for the configured time.
    fn remember_present(&self, hash_parts: &[&str]);
}

/// A [`PresentCache`] for one process (used by `nixpush push`): every answer is from this lifetime.
#[derive(Debug, Default)]
pub struct MemoryPresentCache(Mutex<HashSet<String>>);

impl PresentCache for MemoryPresentCache {
    fn presence(&self, hash_part: &str) -> PresenceMemory {
        let known = self
            .0
            .lock()
            .map(|set| set.contains(hash_part))
            .unwrap_or(false);
        if known {
            PresenceMemory::Answered
        } else {
            PresenceMemory::Unknown
        }
    }

    fn remember_present(&self, hash_parts: &[&str]) {
        if let Ok(mut set) = self.0.lock() {
            set.extend(hash_parts.iter().map(|h| (*h).to_owned()));
        }
    }
}

/// Which of the `remembered` paths of `closure` must be asked again: those a path that may be uploaded
/// references, transitively, since a narinfo may only reference what the target is known to hold now.
/// `unknown` are the paths that will be asked anyway (and so may be uploaded).
pub fn to_recheck<'a>(
    closure: &'a [PathInfo],
    unknown: &HashSet<&'a StorePath>,
    remembered: &HashSet<&'a StorePath>,
) -> HashSet<&'a StorePath> {
    let by_path: HashMap<&StorePath, &PathInfo> = closure.iter().map(|i| (&i.path, i)).collect();
    let mut recheck: HashSet<&StorePath> = HashSet::new();
    let mut frontier: Vec<&StorePath> = unknown.iter().copied().collect();
    while let Some(path) = frontier.pop() {
        let Some(info) = by_path.get(path) else {
            continue;
        };
        for reference in &info.references {
            if reference != path && remembered.contains(reference) && recheck.insert(reference) {
                frontier.push(reference);
            }
        }
    }
    recheck
}

/// Tries of the presence query per batch (with the default policy, at most 1 + 2 + 4 s of waiting).
pub const PRESENCE_TRIES: u32 = 4;
/// The longest the engine waits between presence tries; a server asking for more gets the batch back in the
/// queue instead, so shutdown and status are not held up.
const PRESENCE_MAX_WAIT: Duration = Duration::from_secs(30);

/// Asks the target and the upstream caches which paths they hold.
pub struct Presence<'a, B> {
    /// The target.
    pub backend: &'a B,
    /// The upstream caches.
    pub upstreams: &'a Upstreams,
    /// Backoff between tries of the target's query.
    pub retry: &'a retry::Policy,
    /// Tries of the target's query before giving up.
    pub tries: u32,
}

impl<B: Backend> Presence<'_, B> {
    /// The paths among `paths` the target lacks. A transient failure (one HEAD among hundreds timing out, a 503)
    /// says nothing about any single path, so the whole query is tried again with backoff before the batch gives
    /// up with [`Error::Presence`].
    pub async fn target_lacks(
        &self,
        paths: &[StorePath],
        cancel: &CancellationToken,
    ) -> Result<Vec<StorePath>, Error> {
        let tries = self.tries.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let e = match self.backend.missing(paths).await {
                Ok(missing) => return Ok(missing),
                Err(e) => e,
            };
            let delay = self.retry.delay(attempt, e.retry_after(), rand::random());
            if !e.is_retryable() || attempt >= tries || delay > PRESENCE_MAX_WAIT {
                return Err(Error::Presence(e));
            }
            tracing::warn!(
                "asking the target which of {} path(s) it has failed (try {attempt}/{tries}), trying again in \
                 {:.1} s: {e}",
                paths.len(),
                delay.as_secs_f64()
            );
            tokio::select! {
                _ = cancel.cancelled() => return Err(Error::Cancelled),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The paths among `paths` an upstream cache serves; one that cannot be reached counts as not having them.
    pub async fn upstream_serves(&self, paths: &[StorePath]) -> HashSet<StorePath> {
        self.upstreams.serving(paths).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::time::Instant;

    use super::*;
    use crate::backend::{self, TargetInfo};

    /// A target whose `missing` query fails `failures` times with a 503 asking to come back after `hint`.
    struct Flaky {
        failures: AtomicU32,
        hint: Duration,
    }

    impl Backend for Flaky {
        async fn prepare(&self) -> Result<TargetInfo, backend::Error> {
            Ok(TargetInfo::default())
        }

        async fn missing(&self, paths: &[StorePath]) -> Result<Vec<StorePath>, backend::Error> {
            if self.failures.load(Ordering::SeqCst) == 0 {
                return Ok(paths.to_vec());
            }
            self.failures.fetch_sub(1, Ordering::SeqCst);
            Err(backend::Error::Status {
                method: "HEAD".into(),
                url: "http://127.0.0.1:1/x.narinfo".into(),
                code: 503,
                retry_after: Some(self.hint),
                detail: String::new(),
            })
        }

        async fn upload_when(
            &self,
            _: backend::NarUpload<'_>,
            _: backend::NarinfoGate,
        ) -> Result<(), backend::Error> {
            Ok(())
        }
    }

    fn paths() -> Vec<StorePath> {
        vec![StorePath::parse(
            "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top",
            "/nix/store",
        )
        .unwrap()]
    }

    async fn ask(
        failures: u32,
        hint: Duration,
        cancel: &CancellationToken,
    ) -> Result<usize, Error> {
        let backend = Flaky {
            failures: AtomicU32::new(failures),
            hint,
        };
        let upstreams = Upstreams::new(Vec::new()).unwrap();
        let policy = retry::Policy::default();
        let presence = Presence {
            backend: &backend,
            upstreams: &upstreams,
            retry: &policy,
            tries: PRESENCE_TRIES,
        };
        presence
            .target_lacks(&paths(), cancel)
            .await
            .map(|lacking| lacking.len())
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_query_is_asked_again_after_the_server_s_delay() {
        let started = Instant::now();
        let lacking = ask(2, Duration::from_secs(3), &CancellationToken::new()).await;
        assert_eq!(lacking.unwrap(), 1);
        assert_eq!(started.elapsed(), Duration::from_secs(6));
    }

    #[tokio::test(start_paused = true)]
    async fn the_batch_gives_up_after_its_tries() {
        let started = Instant::now();
        let err = ask(
            PRESENCE_TRIES,
            Duration::from_secs(2),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Presence(_)), "{err}");
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2) * (PRESENCE_TRIES - 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_asking_for_more_than_the_longest_wait_gets_the_batch_back_at_once() {
        let started = Instant::now();
        let err = ask(1, PRESENCE_MAX_WAIT * 2, &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Presence(_)), "{err}");
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_wait() {
        let cancel = CancellationToken::new();
        let stopper = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            stopper.cancel();
        });
        let started = Instant::now();
        let err = ask(1, Duration::from_secs(20), &cancel).await.unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }
}
