//! Imports spool files: at startup, whenever the `notify` watcher sees the spool directory change, and on a
//! periodic rescan in case an event was missed (or the watcher could not start). Each file's owner is judged like
//! a socket peer; the file is deleted only after its paths (and any refusals) are durably queued. A file that
//! cannot be read as a request is moved to `spool/bad/` with its reason, so it is never retried in a loop.
//!
//! The watcher is a convenience, never a dependency: when it cannot start (inotify limits reached, the directory
//! missing) or stops (its channel closed, the directory removed), the importer falls back to a rescan every
//! [`RESCAN_WITHOUT_WATCHER`], recreates the spool directory when it can, tries the watcher again at each rescan,
//! and `status` says why it is off. It never waits on a channel that can no longer deliver.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::SpoolImport;
use crate::spool;
use crate::status::WatcherStatus;

use super::{auth, intake, Shared};

/// Safety-net rescan interval while the watcher runs.
const RESCAN_INTERVAL: Duration = Duration::from_secs(30);
/// Rescan interval while it does not.
const RESCAN_WITHOUT_WATCHER: Duration = Duration::from_secs(5);
/// Temporary files older than this were left by a hook that died mid-write.
const STALE_TEMPORARY_AGE: Duration = Duration::from_secs(3600);

/// A running watcher on one directory (identified by device and inode, so a replaced directory is noticed).
struct SpoolWatch {
    _watcher: RecommendedWatcher,
    changed: mpsc::Receiver<()>,
    identity: (u64, u64),
}

fn identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

fn start_watch(dir: &Path) -> Result<SpoolWatch, String> {
    let identity = identity(dir).ok_or_else(|| format!("{} is missing", dir.display()))?;
    let (changed_tx, changed) = mpsc::channel::<()>(1);
    let watched = dir.to_owned();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // The directory itself going away matters too: the importer then sets it up again at once.
        let wake = event.is_ok_and(|event| {
            is_new_file(&event.kind)
                || (matches!(event.kind, EventKind::Remove(_)) && event.paths.contains(&watched))
        });
        if wake {
            // A full channel already means "rescan"; one pending signal is enough.
            let _ = changed_tx.try_send(());
        }
    })
    .map_err(|e| format!("cannot start inotify: {e}"))?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    Ok(SpoolWatch {
        _watcher: watcher,
        changed,
        identity,
    })
}

/// Makes sure the spool directory exists and is watched; returns the watch, if any, and tells `status`.
fn ensure_watch(shared: &Shared, dir: &Path, current: Option<SpoolWatch>) -> Option<SpoolWatch> {
    if let Some(watch) = current {
        if identity(dir) == Some(watch.identity) {
            return Some(watch);
        }
        tracing::warn!(
            "the spool directory {} was removed or replaced; setting it up again",
            dir.display()
        );
    }
    if identity(dir).is_none() {
        match spool::prepare_dir(dir) {
            Ok(()) => tracing::warn!("recreated the missing spool directory {}", dir.display()),
            Err(e) => tracing::debug!("cannot recreate the spool directory: {e}"),
        }
    }
    let (watch, status) = match start_watch(dir) {
        Ok(watch) => (
            Some(watch),
            WatcherStatus {
                active: true,
                reason: None,
                rescan_secs: RESCAN_INTERVAL.as_secs(),
            },
        ),
        Err(reason) => (
            None,
            WatcherStatus {
                active: false,
                reason: Some(reason),
                rescan_secs: RESCAN_WITHOUT_WATCHER.as_secs(),
            },
        ),
    };
    let mut shown = shared
        .watcher
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if *shown != status {
        match &status.reason {
            Some(reason) => tracing::warn!(
                "spool watcher off: {reason}; rescanning {} every {} s",
                dir.display(),
                status.rescan_secs
            ),
            None if !shown.active && shown.rescan_secs != 0 => {
                tracing::info!("spool watcher running again")
            }
            None => {}
        }
        *shown = status;
    }
    watch
}

pub(super) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let spool_dir = shared.config().spool_dir();
    let mut watch = ensure_watch(&shared, &spool_dir, None);
    loop {
        let kept = import_all(&shared, &spool_dir, &stop).await;
        // A file kept for later (Nix could not be asked about its paths) is tried again soon, not in 30 s.
        let interval = if watch.is_some() && !kept {
            RESCAN_INTERVAL
        } else {
            RESCAN_WITHOUT_WATCHER
        };
        let changed = async {
            match watch.as_mut() {
                Some(watch) => watch.changed.recv().await,
                // No watcher: only the rescan wakes us.
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            event = changed => {
                if event.is_none() {
                    // The watcher's thread is gone; its channel would now return at once, forever.
                    let mut shown = shared.watcher.lock().unwrap_or_else(PoisonError::into_inner);
                    *shown = WatcherStatus {
                        active: false,
                        reason: Some("the watcher stopped".to_owned()),
                        rescan_secs: RESCAN_WITHOUT_WATCHER.as_secs(),
                    };
                    tracing::warn!("spool watcher stopped; rescanning every {} s", RESCAN_WITHOUT_WATCHER.as_secs());
                    watch = None;
                } else {
                    watch = ensure_watch(&shared, &spool_dir, watch.take());
                }
            }
            _ = tokio::time::sleep(interval) => {
                let removed = spool::remove_stale_temporaries(&spool_dir, STALE_TEMPORARY_AGE);
                if removed > 0 {
                    tracing::info!(removed, "removed stale temporary spool files");
                }
                watch = ensure_watch(&shared, &spool_dir, watch.take());
            }
        }
    }
}

/// Whether a watcher event may mean a new spool file. Access events must not count: listing the directory opens
/// it, and reacting to that would rescan forever.
fn is_new_file(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Any | EventKind::Other => true,
        EventKind::Access(_) | EventKind::Remove(_) => false,
    }
}

/// Imports every file; whether one was kept to be tried again.
async fn import_all(shared: &Shared, spool_dir: &Path, stop: &CancellationToken) -> bool {
    let files = match spool::list(spool_dir) {
        Ok(files) => files,
        Err(e) => {
            tracing::error!("cannot list the spool: {e}");
            return false;
        }
    };
    if files.is_empty() {
        return false;
    }
    // Hooks of other users could not fsync the directory after their rename; do it for them, so a file whose
    // paths are queued is never the only durable trace of a request (and none is lost before its import).
    if let Err(e) = spool::sync_dir(spool_dir) {
        tracing::warn!("{e}");
    }
    let mut kept = false;
    for file in files {
        // Between files only: a file being imported is finished first.
        if stop.is_cancelled() {
            return kept;
        }
        kept |= import_one(shared, spool_dir, &file).await;
    }
    kept
}

/// Imports one file; true when it was kept to be tried again.
async fn import_one(shared: &Shared, spool_dir: &Path, path: &Path) -> bool {
    let file = match spool::read(path) {
        Ok(file) => file,
        Err(spool::Error::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return false
        }
        Err(e) => {
            shared.metrics.spool_import(SpoolImport::Bad);
            match spool::move_aside(spool_dir, path, &e.to_string()) {
                Ok(moved) => tracing::warn!("{e}; moved it to {}", moved.display()),
                Err(move_error) => {
                    // Leaving it would retry it on every scan; deleting is the only way out.
                    tracing::error!("{e}; cannot move it aside ({move_error}); deleting it");
                    let _ = std::fs::remove_file(path);
                }
            }
            return false;
        }
    };
    let request = &file.request;
    let config = shared.config();
    if let Err(reason) = auth::check(Some(file.owner_uid), Some(file.owner_gid), &config) {
        let input = request
            .drv_path
            .clone()
            .unwrap_or_else(|| request.out_paths.join(" "));
        shared.refuse(
            &input,
            &format!("spool file {}: {reason}", path.display()),
            Some(file.owner_uid),
            "spool",
        );
        shared.metrics.spool_import(SpoolImport::Refused);
        finish(shared, path).await;
        return false;
    }
    let request = intake::Request {
        drv_path: request.drv_path.clone(),
        out_paths: request.out_paths.clone(),
        source: request.source.chars().take(32).collect(),
        peer_uid: Some(file.owner_uid),
        via: "spool",
    };
    let (resolved, enqueued) = shared.take_request(request).await;
    match enqueued {
        Ok(enqueued) => {
            shared.metrics.spool_import(SpoolImport::Imported);
            tracing::info!(
                file = %path.display(),
                queued = enqueued.queued.len(),
                duplicate = enqueued.duplicate.len(),
                refused = resolved.refused.len(),
                "imported spool file"
            );
            if let Err(e) = std::fs::remove_file(path) {
                tracing::error!("cannot delete imported spool file {}: {e}", path.display());
            }
            false
        }
        Err(e @ super::Error::Unchecked(_)) => {
            shared.metrics.spool_import(SpoolImport::Kept);
            tracing::warn!(
                "spool file {}: {e}; keeping it for the next scan",
                path.display()
            );
            true
        }
        Err(e) => {
            shared.metrics.spool_import(SpoolImport::Kept);
            tracing::error!(
                "cannot queue spool file {}: {e}; keeping it for the next scan",
                path.display()
            );
            true
        }
    }
}

/// Deletes a refused file once its refusal record is durable.
async fn finish(shared: &Shared, path: &Path) {
    match shared.commit.make_durable().await {
        Ok(()) => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::error!("cannot delete spool file {}: {e}", path.display());
            }
        }
        Err(e) => tracing::error!(
            "cannot record the refusal of {}: {e}; keeping it",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind, RenameMode};

    // See: #3 (the daemon's own directory listing must not trigger another scan)
    #[test]
    fn only_new_files_trigger_a_scan() {
        assert!(is_new_file(&EventKind::Create(CreateKind::File)));
        assert!(is_new_file(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(!is_new_file(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_new_file(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(!is_new_file(&EventKind::Remove(RemoveKind::File)));
    }
}
