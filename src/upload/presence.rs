//! What the target and the upstream caches already hold, so that only the rest is uploaded: the memory of
//! paths seen present ([`PresentCache`]), the target's `missing` query tried again while it fails transiently
//! ([`Presence::target_lacks`]), and the upstream caches (through [`crate::backend::upstream`]).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::{upstream::Upstreams, Backend};
use crate::store_path::StorePath;

use super::{retry, Error};

/// Remembers which paths the target or an upstream is known to hold, so a rebuild does not ask again.
pub trait PresentCache: Send + Sync {
    /// Whether `hash_part` was seen present and the memory has not expired.
    fn is_known_present(&self, hash_part: &str) -> bool;
    /// Remembers these paths as present for the configured time.
    fn remember_present(&self, hash_parts: &[&str]);
}

/// A [`PresentCache`] for one process (used by `nixpush push`).
#[derive(Debug, Default)]
pub struct MemoryPresentCache(Mutex<HashSet<String>>);

impl PresentCache for MemoryPresentCache {
    fn is_known_present(&self, hash_part: &str) -> bool {
        self.0
            .lock()
            .map(|set| set.contains(hash_part))
            .unwrap_or(false)
    }

    fn remember_present(&self, hash_parts: &[&str]) {
        if let Ok(mut set) = self.0.lock() {
            set.extend(hash_parts.iter().map(|h| (*h).to_owned()));
        }
    }
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
