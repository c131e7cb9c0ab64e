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
    wire_sent: Arc<AtomicU64>,
    /// Set once the compressed NAR is ready and its upload starts.
    file_size: Option<u64>,
    started: Instant,
    /// When the upload started, for a rate of bytes on the wire.
    uploading_since: Option<Instant>,
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
            .map(|(path, t)| {
                let wire_done = t.wire_sent.load(Ordering::Relaxed);
                InFlight {
                    path: path.clone(),
                    nar_size: t.nar_size,
                    nar_done: t.nar_done.load(Ordering::Relaxed),
                    wire_done,
                    file_size: t.file_size,
                    phase: match t.file_size {
                        None => "preparing",
                        // Every byte of the NAR is sent; what remains is the server's answer to it, then the
                        // narinfo (and its documents).
                        Some(size) if wire_done >= size && size > 0 => "narinfo",
                        Some(_) => "uploading",
                    },
                    elapsed_ms: t.started.elapsed().as_millis() as u64,
                    uploading_ms: t.uploading_since.map(|s| s.elapsed().as_millis() as u64),
                }
            })
            .collect()
    }

    /// Starts tracking `path`; the counters returned are the NAR bytes done and the bytes on the wire.
    pub(super) fn track(
        &self,
        path: &StorePath,
        nar_size: u64,
    ) -> (Arc<AtomicU64>, Arc<AtomicU64>) {
        let nar_done = Arc::new(AtomicU64::new(0));
        let wire_sent = Arc::new(AtomicU64::new(0));
        if let Ok(mut map) = self.paths.lock() {
            map.insert(
                path.clone(),
                Tracked {
                    nar_size,
                    nar_done: Arc::clone(&nar_done),
                    wire_sent: Arc::clone(&wire_sent),
                    file_size: None,
                    started: Instant::now(),
                    uploading_since: None,
                },
            );
        }
        (nar_done, wire_sent)
    }

    /// `path` moved from preparing to uploading its `file_size` compressed bytes; returns its wire counter.
    pub(super) fn mark_uploading(&self, path: &StorePath, file_size: u64) -> Arc<AtomicU64> {
        if let Ok(mut map) = self.paths.lock() {
            if let Some(t) = map.get_mut(path) {
                t.file_size = Some(file_size);
                t.uploading_since = Some(Instant::now());
                return Arc::clone(&t.wire_sent);
            }
        }
        Arc::new(AtomicU64::new(0))
    }

    /// `path` finished.
    pub(super) fn untrack(&self, path: &StorePath) {
        if let Ok(mut map) = self.paths.lock() {
            map.remove(path);
        }
    }
}
