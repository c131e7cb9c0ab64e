//! Notices when the token or signing key files change, so rotated secrets take effect without a restart.
//!
//! sops-nix rotates by switching a symlink to a new generation directory, systemd credentials and most tools by
//! renaming a new file over the old one. Inotify (through `notify`) on the files' directories catches renames at
//! once; a symlink switch higher up replaces the watched directory itself, which inotify cannot see, so every
//! [`POLL_INTERVAL`] the files' resolved paths and metadata are compared as well.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Shared;

/// How often the secret files are compared even without file events.
pub const POLL_INTERVAL: Duration = Duration::from_secs(30);

/// What identifies a version of a file: where it resolves to, its inode, size and modification time.
type Fingerprint = Option<(PathBuf, u64, u64, Option<SystemTime>)>;

fn fingerprint(path: &Path) -> Fingerprint {
    let resolved = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&resolved).ok()?;
    Some((resolved, meta.ino(), meta.len(), meta.modified().ok()))
}

/// The token and key files of the target `name`.
fn secret_files(shared: &Shared, name: &str) -> Vec<PathBuf> {
    let config = shared.config();
    let Some(target) = config.named_target(name) else {
        return Vec::new();
    };
    [
        target.auth_token_file.clone(),
        target.signing_key_file.clone(),
    ]
    .into_iter()
    .flatten()
    .chain(target.signing_key_files.iter().cloned())
    .collect()
}

/// Notifies a target's lane whenever one of its secret files changes, until `stop`.
pub async fn watch(shared: Arc<Shared>, stop: CancellationToken) {
    let per_lane: Vec<(Arc<Notify>, Vec<PathBuf>)> = shared
        .lanes
        .iter()
        .map(|lane| {
            (
                Arc::clone(&lane.secrets_changed),
                secret_files(&shared, &lane.name),
            )
        })
        .filter(|(_, files)| !files.is_empty())
        .collect();
    let files: Vec<PathBuf> = per_lane.iter().flat_map(|(_, f)| f.clone()).collect();
    if files.is_empty() {
        return;
    }
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let watched: Vec<PathBuf> = files.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let relevant = event.paths.iter().any(|p| {
                watched
                    .iter()
                    .any(|f| p.file_name().is_some() && p.file_name() == f.file_name())
            });
            if relevant {
                let _ = events_tx.send(());
            }
        }
    });
    let _watcher = match watcher {
        Ok(mut watcher) => {
            let dirs: std::collections::BTreeSet<&Path> =
                files.iter().filter_map(|f| f.parent()).collect();
            for dir in dirs {
                if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                    tracing::warn!(
                        "cannot watch {} for secret rotation (polling instead): {e}",
                        dir.display()
                    );
                }
            }
            Some(watcher)
        }
        Err(e) => {
            tracing::warn!("cannot watch secret files (polling instead): {e}");
            None
        }
    };
    let prints =
        |files: &[PathBuf]| -> Vec<Fingerprint> { files.iter().map(|f| fingerprint(f)).collect() };
    let mut last: Vec<Vec<Fingerprint>> = per_lane.iter().map(|(_, f)| prints(f)).collect();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = events.recv() => {}
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
        for ((changed, files), last) in per_lane.iter().zip(last.iter_mut()) {
            let now = prints(files);
            if now != *last {
                *last = now;
                tracing::info!("a secret file changed; reloading the token and signing key");
                changed.notify_one();
            }
        }
    }
}
