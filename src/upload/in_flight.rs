//! What the engine is preparing or uploading right now, with the NAR bytes done so far: what `status` and
//! `push`'s progress show.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::store_path::StorePath;

use super::InFlight;

#[derive(Debug)]
struct Tracked {
    nar_size: u64,
    nar_done: Arc<AtomicU64>,
    uploading: bool,
    started: Instant,
}

/// The paths in flight.
#[derive(Debug, Default)]
pub(super) struct InFlightTable {
    paths: Mutex<BTreeMap<StorePath, Tracked>>,
}

impl InFlightTable {
    /// What is in flight now.
    pub(super) fn snapshot(&self) -> Vec<InFlight> {
        let Ok(map) = self.paths.lock() else {
            return Vec::new();
        };
        map.iter()
            .map(|(path, t)| InFlight {
                path: path.clone(),
                nar_size: t.nar_size,
                nar_done: t.nar_done.load(Ordering::Relaxed),
                phase: if t.uploading {
                    "uploading"
                } else {
                    "preparing"
                },
                elapsed_ms: t.started.elapsed().as_millis() as u64,
            })
            .collect()
    }

    /// Starts tracking `path`; the counter returned is the NAR bytes done.
    pub(super) fn track(&self, path: &StorePath, nar_size: u64) -> Arc<AtomicU64> {
        let counter = Arc::new(AtomicU64::new(0));
        if let Ok(mut map) = self.paths.lock() {
            map.insert(
                path.clone(),
                Tracked {
                    nar_size,
                    nar_done: Arc::clone(&counter),
                    uploading: false,
                    started: Instant::now(),
                },
            );
        }
        counter
    }

    /// `path` moved from preparing to uploading.
    pub(super) fn mark_uploading(&self, path: &StorePath) {
        if let Ok(mut map) = self.paths.lock() {
            if let Some(t) = map.get_mut(path) {
                t.uploading = true;
            }
        }
    }

    /// `path` finished.
    pub(super) fn untrack(&self, path: &StorePath) {
        if let Ok(mut map) = self.paths.lock() {
            map.remove(path);
        }
    }
}
