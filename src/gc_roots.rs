//! Garbage-collector roots for the paths in the queue: while a path is queued, uploading or failed, a file in
//! `gc_roots_dir` (default `/nix/var/nix/gcroots/nixpush`) named after it keeps `nix-store --gc` from deleting it.
//!
//! ```text
//! /nix/var/nix/gcroots/nixpush/ripzxnb3whas7h2iw572d3b0sby1nxxw-hello   (a hard link of .anchor, roots /nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-hello)
//! ```
//!
//! - [`GcRoots::protect`] creates roots before the hook's ack (one `link(2)` per path, no fsync; `gc_roots/links.rs`);
//! - [`GcRoots::entry_finished`] removes one once its queue entry is gone (done for every target, or dropped);
//! - [`GcRoots::reconcile`] makes the directory match the queue at startup, since the queue is the durable record;
//! - [`GcRoots::maintain`] looks up NAR sizes off the ack path and applies `gc_roots_max_bytes` (`gc_roots/bound.rs`).
//!
//! Between the build and the root, Nix's own temporary root protects the path: Nix 2.8 adds a temporary root for
//! every output of a derivation before building it and holds it until the building process exits, and that
//! process runs the post-build-hook and waits for it, so the root exists before the temporary one can go. A path
//! that reached the daemon through the spool (the daemon was down) has no such cover once the build exits; if
//! Nix collects it first, the upload records it as skipped.
//!
//! Errors (a read-only or foreign directory) never stop an ack: they are logged once, with the fix, and shown in
//! `status` until roots can be created again.

mod bound;
mod links;
mod rooted;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::byte_size::ByteSize;
use crate::config::Config;
use crate::pathinfo::registry::Registry;
use crate::queue::{Entry, Queue, State};
use crate::status::GcRootsStatus;
use crate::store_path::StorePath;

use rooted::Rooted;

/// How long after a new root the maintenance pass (sizes, bound, healing) starts: long enough for a burst of hooks
/// to share it, short next to any upload.
const MAINTENANCE_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// The daemon's GC roots: what is rooted, what the bound released, and the last error.
pub struct GcRoots {
    /// `None` when `gc_roots_dir = ""`.
    dir: Option<PathBuf>,
    store_dir: String,
    max_bytes: u64,
    /// Set when Nix's collector does not look in `dir`.
    warning: Option<String>,
    state: Mutex<Inner>,
    /// Wakes [`GcRoots::maintain`].
    changed: Notify,
    registry: Registry,
}

#[derive(Default)]
struct Inner {
    /// Paths with a root, and their NAR size once looked up.
    rooted: Rooted,
    /// Failed paths whose roots the bound released.
    released: HashSet<StorePath>,
    /// Why roots cannot be created or removed, while they cannot.
    error: Option<String>,
    /// Set by an error: some queued paths may lack a root, to be retried once roots work again.
    needs_heal: bool,
}

/// What [`GcRoots::reconcile`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Roots already there for queued paths.
    pub kept: usize,
    /// Roots created for queued paths that had none.
    pub created: usize,
    /// Roots removed because their paths are no longer queued.
    pub removed: usize,
    /// Queued paths no longer in the store (collected before the daemon rooted them): left to the upload, which
    /// records them as skipped.
    pub gone: usize,
    /// Failed paths left without a root by the bound.
    pub released: usize,
}

impl GcRoots {
    /// Roots as `config` says. Nothing is touched on disk until [`GcRoots::reconcile`] or
    /// [`GcRoots::protect`].
    pub fn from_config(config: &Config) -> GcRoots {
        let dir = config.gc_roots_dir().map(Path::to_owned);
        // Nix's state directory holds its database (`db/db.sqlite`) and `gcroots/`.
        let nix_roots = config
            .nix_db
            .parent()
            .and_then(Path::parent)
            .map(|state| state.join("gcroots"));
        let warning = match (&dir, nix_roots) {
            (Some(dir), Some(nix_roots)) if !dir.starts_with(&nix_roots) => Some(format!(
                "gc_roots_dir {} is outside {}: Nix's garbage collector does not look there, so the roots \
                 protect nothing",
                dir.display(),
                nix_roots.display()
            )),
            _ => None,
        };
        GcRoots {
            dir,
            store_dir: config.store_dir_str().to_owned(),
            max_bytes: config.gc_roots_max_bytes.0,
            warning,
            state: Mutex::default(),
            changed: Notify::new(),
            registry: Registry::new(),
        }
    }

    /// No roots at all (`gc_roots_dir = ""`, and tests that build a daemon's state by hand).
    pub fn disabled() -> GcRoots {
        GcRoots {
            dir: None,
            store_dir: String::new(),
            max_bytes: 0,
            warning: None,
            state: Mutex::default(),
            changed: Notify::new(),
            registry: Registry::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Roots `paths`, which the caller has just queued (or found queued). Cheap enough for the ack path: one
    /// `link(2)` per path not rooted yet, sizes are looked up later. Never fails: an error is logged once and
    /// shown in `status`.
    pub fn protect(&self, paths: &[StorePath]) {
        let Some(dir) = &self.dir else { return };
        let mut inner = self.lock();
        let mut added = false;
        let mut failed = None;
        for path in paths {
            inner.released.remove(path);
            if inner.rooted.contains(path) {
                continue;
            }
            match links::create(dir, path) {
                Ok(()) => {
                    inner.rooted.insert(path.clone(), None);
                    added = true;
                }
                Err(e) => failed = Some(links::explain("create", dir, &e)),
            }
        }
        match failed {
            Some(message) => set_error(&mut inner, message),
            None if added => clear_error(&mut inner, dir),
            None => {}
        }
        drop(inner);
        if added {
            self.changed.notify_one();
        }
    }

    /// Removes the root of `path` once its queue entry is gone: uploaded to every target, skipped, or dropped.
    /// Call it after removing the entry; a path queued again meanwhile keeps its root.
    pub fn entry_finished(&self, path: &StorePath, queue: &dyn Queue) {
        let Some(dir) = &self.dir else { return };
        let mut inner = self.lock();
        // Under the lock, so a `protect` of a path queued again runs before or after this as a whole.
        if queue.held_by_any_target(path).unwrap_or(true) {
            return;
        }
        inner.released.remove(path);
        inner.rooted.remove(path);
        if let Err(e) = links::remove(dir, path) {
            set_error(&mut inner, links::explain("remove", dir, &e));
        }
    }

    /// Tells [`GcRoots::maintain`] that entries changed state (parked as failed), so the bound is checked.
    pub fn queue_changed(&self) {
        if self.dir.is_some() {
            self.changed.notify_one();
        }
    }

    /// Roots paths `nixpush retry` requeued, and returns those Nix collected meanwhile (their roots had been
    /// released by the bound): the caller records them as skipped.
    pub async fn restore(&self, paths: &[StorePath], nix_db: &Path) -> Vec<StorePath> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        if paths.is_empty() {
            return Vec::new();
        }
        // The root first, then the check: a path valid once rooted stays valid.
        self.protect(paths);
        let invalid = match self.registry.invalid_paths(paths, nix_db).await {
            Ok(invalid) => invalid,
            Err(e) => {
                tracing::warn!("cannot check whether retried paths are still in the store: {e}");
                return Vec::new();
            }
        };
        let mut inner = self.lock();
        for path in &invalid {
            inner.rooted.remove(path);
            let _ = links::remove(dir, path);
        }
        invalid
    }

    /// What `status` shows.
    pub fn status(&self) -> GcRootsStatus {
        let inner = self.lock();
        GcRootsStatus {
            dir: self.dir.as_ref().map(|d| d.display().to_string()),
            rooted_paths: inner.rooted.len() as u64,
            rooted_bytes: inner.rooted.bytes(),
            max_bytes: self.max_bytes,
            over_limit_unrooted: inner.released.len() as u64,
            error: inner.error.clone(),
            warning: self.warning.clone(),
        }
    }

    /// Makes the directory match the queue: a root for every queued, uploading or failed path still in the store
    /// (less the failed ones the bound releases), and none for paths no longer queued. Run once at startup,
    /// before the daemon takes requests.
    pub async fn reconcile(
        self: &Arc<Self>,
        queue: Arc<dyn Queue>,
        nix_db: &Path,
    ) -> Option<Reconciled> {
        let dir = self.dir.clone()?;
        if let Some(warning) = &self.warning {
            tracing::warn!("{warning}");
        }
        let entries = match waiting_paths(&*queue) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!("cannot read the queue to reconcile GC roots: {e}");
                return None;
            }
        };
        let paths: Vec<StorePath> = entries.iter().map(|e| e.path.clone()).collect();
        let looked_up = if paths.is_empty() {
            Ok(HashMap::new())
        } else {
            self.registry.nar_sizes(&paths, nix_db).await
        };
        let sizes = match looked_up {
            Ok(sizes) => sizes.into_iter().map(|(p, s)| (p, Some(s))).collect(),
            Err(e) => {
                // Rooting a path that is gone does no harm; leaving a valid one unrooted could.
                tracing::warn!("cannot read NAR sizes ({e}); rooting every queued path");
                paths
                    .iter()
                    .map(|p| (p.clone(), None))
                    .collect::<HashMap<_, _>>()
            }
        };
        let gone = paths.len() - sizes.len();
        let failed = entries
            .iter()
            .filter(|e| e.state == State::Failed)
            .filter_map(|e| {
                Some(bound::FailedRoot {
                    nar_size: (*sizes.get(&e.path)?).unwrap_or(0),
                    path: e.path.clone(),
                    failed_at_ms: e.updated_at_ms,
                })
            })
            .collect();
        let total: u64 = sizes.values().map(|s| s.unwrap_or(0)).sum();
        let released: HashSet<StorePath> = bound::over_limit(total, self.max_bytes, failed)
            .into_iter()
            .collect();
        let this = Arc::clone(self);
        let store_dir = self.store_dir.clone();
        let result = tokio::task::spawn_blocking(move || {
            this.reconcile_on_disk(&dir, &store_dir, sizes, released)
        })
        .await;
        match result {
            Ok(Ok(mut done)) => {
                done.gone = gone;
                tracing::info!(
                    kept = done.kept,
                    created = done.created,
                    removed = done.removed,
                    gone = done.gone,
                    released = done.released,
                    "GC roots reconciled with the queue"
                );
                if done.released > 0 {
                    self.warn_released(done.released);
                }
                Some(done)
            }
            Ok(Err(message)) => {
                set_error(&mut self.lock(), message);
                None
            }
            Err(e) => {
                tracing::error!("GC root reconcile failed: {e}");
                None
            }
        }
    }

    fn reconcile_on_disk(
        &self,
        dir: &Path,
        store_dir: &str,
        wanted: HashMap<StorePath, Option<u64>>,
        released: HashSet<StorePath>,
    ) -> Result<Reconciled, String> {
        links::ensure_dir(dir).map_err(|e| links::explain("create", dir, &e))?;
        let owned =
            links::list_owned(dir, store_dir).map_err(|e| links::explain("list", dir, &e))?;
        let mut done = Reconciled::default();
        let mut inner = self.lock();
        let mut failed = None;
        for path in &owned {
            if wanted.contains_key(path) && !released.contains(path) {
                done.kept += 1;
            } else if let Err(e) = links::remove(dir, path) {
                failed = Some(links::explain("remove", dir, &e));
            } else {
                done.removed += 1;
            }
        }
        let owned: HashSet<&StorePath> = owned.iter().collect();
        for (path, size) in wanted {
            if released.contains(&path) {
                continue;
            }
            if !owned.contains(&path) {
                match links::create(dir, &path) {
                    Ok(()) => done.created += 1,
                    Err(e) => {
                        failed = Some(links::explain("create", dir, &e));
                        continue;
                    }
                }
            }
            inner.rooted.insert(path, size);
        }
        done.released = released.len();
        inner.released = released;
        match failed {
            Some(message) => set_error(&mut inner, message),
            None => clear_error(&mut inner, dir),
        }
        Ok(done)
    }

    /// Runs until `stop`: after each change, looks up the NAR sizes of newly rooted paths (off the ack path),
    /// retries roots that could not be created, and applies `gc_roots_max_bytes`. A pass starts
    /// `MAINTENANCE_DELAY` after the change that called for it, so a burst of hooks shares one pass, and while
    /// the task waits out the delay a new root wakes no thread at all.
    pub async fn maintain(
        self: Arc<Self>,
        queue: Arc<dyn Queue>,
        nix_db: PathBuf,
        stop: CancellationToken,
    ) {
        if self.dir.is_none() {
            return;
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.changed.notified() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(MAINTENANCE_DELAY) => {}
            }
            self.maintenance_pass(&queue, &nix_db).await;
        }
    }

    /// One round of [`GcRoots::maintain`].
    async fn maintenance_pass(self: &Arc<Self>, queue: &Arc<dyn Queue>, nix_db: &Path) {
        let without_size = self.lock().rooted.take_unsized();
        if !without_size.is_empty() {
            match self.registry.nar_sizes(&without_size, nix_db).await {
                Ok(sizes) => {
                    let mut inner = self.lock();
                    for path in &without_size {
                        // Not valid any more: it counts for nothing.
                        inner
                            .rooted
                            .set_size(path, sizes.get(path).copied().unwrap_or(0));
                    }
                }
                Err(e) => {
                    tracing::warn!("cannot read NAR sizes of rooted paths: {e}");
                    self.lock().rooted.return_unsized(without_size);
                }
            }
        }
        let (this, queue) = (Arc::clone(self), Arc::clone(queue));
        let _ = tokio::task::spawn_blocking(move || {
            this.heal(&*queue);
            this.apply_bound(&*queue);
        })
        .await;
    }

    /// Once roots work again after an error, roots every queued path still without one.
    fn heal(&self, queue: &dyn Queue) {
        {
            let mut inner = self.lock();
            if !inner.needs_heal || inner.error.is_some() {
                return;
            }
            // Cleared first: an error while healing sets it again.
            inner.needs_heal = false;
        }
        let Ok(entries) = waiting_paths(queue) else {
            return;
        };
        let missing: Vec<StorePath> = {
            let inner = self.lock();
            entries
                .into_iter()
                .map(|e| e.path)
                .filter(|p| !inner.rooted.contains(p) && !inner.released.contains(p))
                .collect()
        };
        self.protect(&missing);
    }

    /// Releases the roots of the oldest failed paths while the rooted NAR bytes exceed the bound.
    fn apply_bound(&self, queue: &dyn Queue) {
        let Some(dir) = &self.dir else { return };
        let mut inner = self.lock();
        let total = inner.rooted.bytes();
        if total <= self.max_bytes {
            return;
        }
        let entries = match waiting_paths(queue) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!("cannot read the queue to apply gc_roots_max_bytes: {e}");
                return;
            }
        };
        let failed = entries
            .into_iter()
            .filter(|e| e.state == State::Failed)
            .filter_map(|e| {
                let size = inner.rooted.size(&e.path)?.unwrap_or(0);
                Some(bound::FailedRoot {
                    path: e.path,
                    nar_size: size,
                    failed_at_ms: e.updated_at_ms,
                })
            })
            .collect();
        let release = bound::over_limit(total, self.max_bytes, failed);
        for path in &release {
            if let Err(e) = links::remove(dir, path) {
                set_error(&mut inner, links::explain("remove", dir, &e));
                continue;
            }
            inner.rooted.remove(path);
            inner.released.insert(path.clone());
        }
        drop(inner);
        if !release.is_empty() {
            self.warn_released(release.len());
        }
    }

    fn warn_released(&self, count: usize) {
        tracing::warn!(
            released = count,
            "{count} failed path(s) lost their GC roots, oldest first, to keep the rooted NAR size within \
             gc_roots_max_bytes = {}; Nix may now collect them (`nixpush retry` roots them again while they \
             are in the store)",
            ByteSize(self.max_bytes)
        );
    }
}

/// One entry per queued path over every target: a path failed for one target but still waiting for another counts
/// as waiting (its root is not the bound's to release), and one failed everywhere as failed at its latest failure.
fn waiting_paths(queue: &dyn Queue) -> Result<Vec<Entry>, crate::queue::Error> {
    let mut by_path: HashMap<StorePath, Entry> = HashMap::new();
    for (_, entry) in queue.entries_of_every_target()? {
        match by_path.get_mut(&entry.path) {
            None => {
                by_path.insert(entry.path.clone(), entry);
            }
            Some(kept) if kept.state == State::Failed => {
                if entry.state != State::Failed || entry.updated_at_ms > kept.updated_at_ms {
                    *kept = entry;
                }
            }
            Some(_) => {}
        }
    }
    Ok(by_path.into_values().collect())
}

/// Records `message`, logging it only when it is new.
fn set_error(inner: &mut Inner, message: String) {
    if inner.error.as_ref() != Some(&message) {
        tracing::error!("{message}");
    }
    inner.error = Some(message);
    inner.needs_heal = true;
}

fn clear_error(inner: &mut Inner, dir: &Path) {
    if inner.error.take().is_some() {
        tracing::info!("GC roots in {} work again", dir.display());
    }
}

#[cfg(test)]
mod tests;
