//! Imports spool files: at startup, whenever the `notify` watcher sees the spool directory change, and on a
//! periodic rescan in case an event was missed (or the watcher could not start). Each file's owner is judged like
//! a socket peer; the file is deleted only after its paths (and any refusals) are durably queued. A file that
//! cannot be read as a request is moved to `spool/bad/` with its reason, so it is never retried in a loop.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::spool;

use super::{auth, resolve, Shared};

/// Safety-net rescan interval.
const RESCAN_INTERVAL: Duration = Duration::from_secs(30);
/// Temporary files older than this were left by a hook that died mid-write.
const STALE_TEMPORARY_AGE: Duration = Duration::from_secs(3600);

pub(super) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let spool_dir = shared.config().spool_dir();
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // A full channel already means "rescan"; one pending signal is enough.
            let _ = changed_tx.try_send(());
        }
    })
    .and_then(|mut watcher| {
        watcher.watch(&spool_dir, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    let _watcher = match watcher {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::warn!(
                "cannot watch {}: {e}; relying on a rescan every {} s",
                spool_dir.display(),
                RESCAN_INTERVAL.as_secs()
            );
            None
        }
    };
    let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        import_all(&shared, &spool_dir, &stop).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changed.recv() => {}
            _ = rescan.tick() => {
                let removed = spool::remove_stale_temporaries(&spool_dir, STALE_TEMPORARY_AGE);
                if removed > 0 {
                    tracing::info!(removed, "removed stale temporary spool files");
                }
            }
        }
    }
}

async fn import_all(shared: &Shared, spool_dir: &Path, stop: &CancellationToken) {
    let files = match spool::list(spool_dir) {
        Ok(files) => files,
        Err(e) => {
            tracing::error!("cannot list the spool: {e}");
            return;
        }
    };
    for file in files {
        // Between files only: a file being imported is finished first.
        if stop.is_cancelled() {
            return;
        }
        import_one(shared, spool_dir, &file).await;
    }
}

async fn import_one(shared: &Shared, spool_dir: &Path, path: &Path) {
    let file = match spool::read(path) {
        Ok(file) => file,
        Err(spool::Error::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return
        }
        Err(e) => {
            match spool::move_aside(spool_dir, path, &e.to_string()) {
                Ok(moved) => tracing::warn!("{e}; moved it to {}", moved.display()),
                Err(move_error) => {
                    // Leaving it would retry it on every scan; deleting is the only way out.
                    tracing::error!("{e}; cannot move it aside ({move_error}); deleting it");
                    let _ = std::fs::remove_file(path);
                }
            }
            return;
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
        finish(shared, path).await;
        return;
    }
    let resolved = resolve::resolve(request.drv_path.as_deref(), &request.out_paths, &config).await;
    let source: String = request.source.chars().take(32).collect();
    match shared
        .enqueue_durably(&resolved, &source, Some(file.owner_uid), "spool")
        .await
    {
        Ok(enqueued) => {
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
        }
        Err(e) => {
            tracing::error!(
                "cannot queue spool file {}: {e}; keeping it for the next scan",
                path.display()
            );
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
