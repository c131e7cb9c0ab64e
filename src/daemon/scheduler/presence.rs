//! What the target and the upstreams are known to hold, remembered in the queue per target.

use super::*;

/// The queue's present-cache, seen through the engine's trait, for one target.
///
/// Stored answers are keyed by the target's identity, so a configuration that names another cache starts from
/// nothing. Answers given in this process's lifetime are also kept in memory with a monotonic expiry, so a
/// backward wall-clock jump cannot stretch them; a stored expiry further ahead than `ttl` can only come from such a
/// jump and counts as expired.
pub(super) struct QueuePresence {
    queue: Arc<dyn Queue>,
    ttl_ms: u64,
    /// Prefix of every stored key: a digest of the target's identity.
    target_key: String,
    /// Answers of this lifetime: hash part → when the memory expires.
    answered: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl QueuePresence {
    pub(super) fn new(
        queue: Arc<dyn Queue>,
        ttl_secs: u64,
        target_identity: &str,
    ) -> QueuePresence {
        let digest = crate::hash::Sha256Hash::of(target_identity.as_bytes()).to_hex();
        QueuePresence {
            queue,
            ttl_ms: ttl_secs.saturating_mul(1000),
            target_key: format!("{}:", &digest[..16]),
            answered: std::sync::Mutex::default(),
        }
    }

    pub(super) fn key(&self, hash_part: &str) -> String {
        format!("{}{hash_part}", self.target_key)
    }
}

impl PresentCache for QueuePresence {
    fn presence(&self, hash_part: &str) -> PresenceMemory {
        let now = std::time::Instant::now();
        let answered = self
            .answered
            .lock()
            .map(|m| m.get(hash_part).is_some_and(|until| *until > now))
            .unwrap_or(false);
        if answered {
            return PresenceMemory::Answered;
        }
        let key = self.key(hash_part);
        let now_ms = queue::now_ms();
        let stored = self.queue.is_known_present(&key, now_ms).unwrap_or(false);
        // Still valid beyond now + ttl: written under a clock that was ahead, so not to be trusted.
        let from_the_future = stored
            && self
                .queue
                .is_known_present(&key, now_ms.saturating_add(self.ttl_ms))
                .unwrap_or(true);
        if stored && !from_the_future {
            PresenceMemory::Remembered
        } else {
            PresenceMemory::Unknown
        }
    }

    fn remember_present(&self, hash_parts: &[&str]) {
        let now = std::time::Instant::now();
        let until = now
            .checked_add(Duration::from_millis(self.ttl_ms))
            .unwrap_or(now + Duration::from_secs(u64::from(u32::MAX)));
        if let Ok(mut answered) = self.answered.lock() {
            answered.retain(|_, expiry| *expiry > std::time::Instant::now());
            answered.extend(hash_parts.iter().map(|h| ((*h).to_owned(), until)));
        }
        let keys: Vec<String> = hash_parts.iter().map(|h| self.key(h)).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let until_ms = queue::now_ms().saturating_add(self.ttl_ms);
        if let Err(e) = self.queue.remember_present(&keys, until_ms) {
            tracing::warn!("cannot remember present paths: {e}");
        }
    }
}
