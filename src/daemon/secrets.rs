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

fn secret_files(shared: &Shared) -> Vec<PathBuf> {
    let config = shared.config();
    [
        config.target.auth_token_file.clone(),
        config.target.signing_key_file.clone(),
    ]
    .into_iter()
    .flatten()
    .chain(config.target.signing_key_files.iter().cloned())
    .collect()
}

/// Notifies `changed` whenever a secret file changes, until `stop`.
pub async fn watch(shared: Arc<Shared>, changed: Arc<Notify>, stop: CancellationToken) {
    let files = secret_files(&shared);
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
            for dir in files.iter().filter_map(|f| f.parent()) {
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
    let mut last: Vec<Fingerprint> = files.iter().map(|f| fingerprint(f)).collect();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = events.recv() => {}
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
        let now: Vec<Fingerprint> = files.iter().map(|f| fingerprint(f)).collect();
        if now != last {
            last = now;
            tracing::info!("a secret file changed; reloading the token and signing key");
            changed.notify_one();
        }
    }
}
