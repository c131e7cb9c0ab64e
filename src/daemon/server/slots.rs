//! The table of connections being served: at most [`MAX_CONNECTIONS`] at once; when all are taken, a new
//! connection evicts the one that has waited longest for its request, so clients that connect and send nothing
//! (or dribble) cannot lock out a hook.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Connections served at once. When all are taken, a new connection evicts the one that has waited longest for
/// its request, so clients that connect and send nothing (or dribble) cannot lock out a hook.
pub const MAX_CONNECTIONS: usize = 512;

#[derive(Default)]
pub(super) struct Slots {
    table: std::sync::Mutex<SlotTable>,
    freed: tokio::sync::Notify,
}

#[derive(Default)]
struct SlotTable {
    next_id: u64,
    open: std::collections::HashMap<u64, Arc<SlotState>>,
}

/// One connection's entry: since when it waits for a request (`None` while one is being answered), and how to
/// evict it.
pub(super) struct SlotState {
    waiting_since: std::sync::Mutex<Option<Instant>>,
    pub(super) evict: CancellationToken,
}

impl SlotState {
    pub(super) fn set_waiting(&self, waiting: bool) {
        let mut since = self
            .waiting_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *since = waiting.then(Instant::now);
    }

    fn waiting_since(&self) -> Option<Instant> {
        *self
            .waiting_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A connection's place in [`Slots`]; leaves the table when dropped.
pub(super) struct Slot {
    slots: Arc<Slots>,
    id: u64,
    pub(super) state: Arc<SlotState>,
}

impl Slots {
    /// A place for a new connection. At [`MAX_CONNECTIONS`] the longest-waiting idle connection is evicted; if
    /// every connection is busy answering, waits until one finishes.
    pub(super) async fn take(self: Arc<Slots>) -> Slot {
        loop {
            let freed = self.freed.notified();
            if let Some((id, state)) = self.try_take() {
                drop(freed);
                return Slot {
                    slots: self,
                    id,
                    state,
                };
            }
            freed.await;
        }
    }

    fn try_take(&self) -> Option<(u64, Arc<SlotState>)> {
        let mut table = self.lock();
        if table.open.len() >= MAX_CONNECTIONS {
            let oldest = table
                .open
                .iter()
                .filter_map(|(id, state)| state.waiting_since().map(|since| (since, *id)))
                .min();
            if let Some((_, id)) = oldest {
                if let Some(state) = table.open.remove(&id) {
                    state.evict.cancel();
                }
            }
        }
        if table.open.len() >= MAX_CONNECTIONS {
            return None;
        }
        table.next_id += 1;
        let id = table.next_id;
        let state = Arc::new(SlotState {
            waiting_since: std::sync::Mutex::new(Some(Instant::now())),
            evict: CancellationToken::new(),
        });
        table.open.insert(id, state.clone());
        Some((id, state))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().open.remove(&self.id);
        self.slots.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_full_table_evicts_the_longest_waiting_idle_connection() {
        let slots = Arc::new(Slots::default());
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(slots.clone().take().await);
        }
        // The oldest is answering a request: it is skipped, the next oldest goes.
        held[0].state.set_waiting(false);
        let newcomer = slots.clone().take().await;
        assert!(!held[0].state.evict.is_cancelled());
        assert!(held[1].state.evict.is_cancelled());
        assert!(held[2..].iter().all(|s| !s.state.evict.is_cancelled()));
        // Every connection busy: a newcomer waits until one finishes.
        for slot in held.iter().skip(2).chain([&newcomer]) {
            slot.state.set_waiting(false);
        }
        let waiting = tokio::spawn(slots.clone().take());
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        held.truncate(MAX_CONNECTIONS - 1);
        let last = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(!last.state.evict.is_cancelled());
    }
}
