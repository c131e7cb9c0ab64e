//! The upload engine: a batch of requested store paths to a binary cache, closure first, in dependency order.
//!
//! For one batch the engine
//! 1. expands the closure of every requested root (the local store's references, topologically sorted);
//! 2. drops excluded paths, paths known to be present (remembered with an expiry), paths the target already has
//!    (one batched `missing` query) and paths an upstream cache serves;
//! 3. streams each remaining path into a compressed NAR file ([`prepare`]) on up to `workers` blocking threads;
//! 4. uploads a path (NAR, then the signed narinfo) only once all its references are in the cache, so a consumer
//!    never sees a narinfo whose NAR or references are missing.
//!
//! NAR preparation runs ahead of uploads, which keeps both cores busy along a chain of dependencies, but at most
//! `2 × workers` prepared NARs wait on disk at once. The lowest unfinished path in topological order always has
//! its references done, so it may start even when that limit is reached: the batch cannot deadlock.

pub mod prepare;
pub mod retry;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backend::{self, Backend, NarFile};
use crate::config::{Compression, Config};
use crate::hash::Sha256Hash;
use crate::narinfo::NarInfo;
use crate::pathinfo::{self, LocalStore, PathInfo};
use crate::signing::SecretKey;
use crate::store_path::StorePath;

use prepare::PreparedNar;

/// Why a path (and so the roots that need it) could not be uploaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The target failed.
    #[error(transparent)]
    Backend(#[from] backend::Error),
    /// The local store could not tell us about the path.
    #[error(transparent)]
    Store(#[from] pathinfo::Error),
    /// The NAR could not be produced.
    #[error(transparent)]
    Prepare(#[from] prepare::Error),
    /// The target could not say which paths it already has. Not any one path's fault: the daemon queues the
    /// batch again without spending the paths' attempts, unless the error is permanent.
    #[error("cannot ask the target which paths it already has: {0}")]
    Presence(#[source] backend::Error),
    /// The path is no longer in the store (garbage-collected after it was queued).
    #[error("{0} is no longer valid in the local store (garbage-collected?)")]
    Gone(StorePath),
    /// The bytes on disk do not match what Nix recorded: uploading them would poison the cache.
    #[error(
        "{path} is corrupt: Nix recorded NarHash {recorded} but its contents hash to {computed}"
    )]
    Corrupt {
        /// The store path.
        path: StorePath,
        /// `NarHash` in Nix's database.
        recorded: Sha256Hash,
        /// What nixpush computed from the bytes it streamed.
        computed: Sha256Hash,
    },
    /// A reference of this path failed, so its narinfo must not be published.
    #[error("{path} was not uploaded because its reference {reference} failed")]
    DependencyFailed {
        /// The path held back.
        path: StorePath,
        /// The reference that failed.
        reference: StorePath,
    },
    /// The upload was interrupted by shutdown.
    #[error("interrupted by shutdown")]
    Cancelled,
    /// A worker thread died.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Backend(e) | Error::Presence(e) => e.is_retryable(),
            // A store that cannot be read now (locked DB, transient I/O) may be readable later.
            Error::Store(_) => true,
            Error::Prepare(prepare::Error::Temp { .. }) => true,
            Error::Prepare(prepare::Error::Nar { .. }) => false,
            Error::Gone(_) | Error::Corrupt { .. } => false,
            Error::DependencyFailed { .. } => true,
            Error::Cancelled | Error::Internal(_) => true,
        }
    }

    /// Whether the target rejected our credentials.
    pub fn is_auth(&self) -> bool {
        match self {
            Error::Backend(e) | Error::Presence(e) => e.is_auth(),
            Error::Store(_)
            | Error::Prepare(_)
            | Error::Gone(_)
            | Error::Corrupt { .. }
            | Error::DependencyFailed { .. }
            | Error::Cancelled
            | Error::Internal(_) => false,
        }
    }

    /// The server's requested delay, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Backend(e) | Error::Presence(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// What happened to one path of a batch.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "reason")]
pub enum PathOutcome {
    /// Uploaded now.
    Uploaded,
    /// The target already had it.
    AlreadyPresent,
    /// An upstream cache serves it.
    SkippedUpstream,
    /// Matched an `exclude` pattern.
    Excluded,
    /// Could not be uploaded.
    Failed(String),
}

/// One path's result, for logs, status history and `push` summaries.
#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    /// The store path.
    pub path: StorePath,
    /// What happened.
    pub outcome: PathOutcome,
    /// Uncompressed NAR size (from Nix's database, or measured when uploaded).
    pub nar_size: u64,
    /// Compressed size, when uploaded.
    pub file_size: Option<u64>,
    /// Time spent preparing and uploading, when uploaded.
    pub duration_ms: Option<u64>,
    /// How the uploaded file is compressed, when uploaded.
    pub compression: Option<Compression>,
}

/// What happened to one requested root.
#[derive(Debug)]
pub enum RootOutcome {
    /// The root and its whole closure are in the cache (or deliberately skipped).
    Done,
    /// The root is no longer valid in the local store.
    Gone,
    /// Something in its closure failed.
    Failed(Arc<Error>),
}

/// The result of one batch.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// One entry per requested root, in request order.
    pub roots: Vec<(StorePath, RootOutcome)>,
    /// One entry per closure member that was considered.
    pub paths: Vec<PathReport>,
    /// Set when the target rejected our credentials: nothing more can succeed until they change.
    pub auth_failure: Option<Arc<Error>>,
}

/// A path being prepared or uploaded right now.
#[derive(Debug, Clone, Serialize)]
pub struct InFlight {
    /// The store path.
    pub path: StorePath,
    /// Its NAR size as Nix recorded it.
    pub nar_size: u64,
    /// NAR bytes produced so far.
    pub nar_done: u64,
    /// `preparing` or `uploading`.
    pub phase: &'static str,
    /// Milliseconds since it started.
    pub elapsed_ms: u64,
}

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

/// What a batch is about to do, once the cache has been asked.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Plan {
    /// Closure members considered.
    pub paths: usize,
    /// Paths that will be uploaded.
    pub to_upload: usize,
    /// Their uncompressed NAR bytes.
    pub to_upload_bytes: u64,
}

/// Receives a report as each path finishes (logs, progress bars, history).
pub trait Observer: Send + Sync {
    /// Called once per batch when it is known what must be uploaded.
    fn planned(&self, _plan: &Plan) {}
    /// Called once per closure member, as soon as its outcome is known.
    fn path_finished(&self, report: &PathReport);
}

/// An observer that only logs.
#[derive(Debug, Default)]
pub struct LogObserver;

impl Observer for LogObserver {
    fn path_finished(&self, report: &PathReport) {
        log_report(report, None);
    }
}

/// `uploaded /nix/store/…-hello-2.12 (12.3 MiB → 3.1 MiB zstd, 0.8 s)`: how logs and `push` tell of an upload.
pub fn upload_line(report: &PathReport) -> String {
    format!(
        "uploaded {} ({} → {} {}, {:.1} s)",
        report.path,
        human_bytes(report.nar_size),
        human_bytes(report.file_size.unwrap_or_default()),
        report
            .compression
            .map(Compression::narinfo_name)
            .unwrap_or("?"),
        report.duration_ms.unwrap_or_default() as f64 / 1000.0
    )
}

/// Logs one finished path the way the journal should read: a human line, plus the fields `store_path`,
/// `nar_size`, `file_size`, `duration_ms`, `compression` and `target` (journald shows them upper-cased, e.g.
/// `STORE_PATH`, for `journalctl -o json` and filters such as `journalctl STORE_PATH=…`).
pub fn log_report(report: &PathReport, target: Option<&str>) {
    match &report.outcome {
        PathOutcome::Uploaded => tracing::info!(
            store_path = %report.path,
            nar_size = report.nar_size,
            file_size = report.file_size.unwrap_or_default(),
            duration_ms = report.duration_ms.unwrap_or_default(),
            compression = report.compression.map(Compression::narinfo_name),
            target,
            "{}",
            upload_line(report)
        ),
        PathOutcome::Failed(reason) => tracing::warn!(
            store_path = %report.path,
            nar_size = report.nar_size,
            target,
            "failed to upload {}: {reason}",
            report.path
        ),
        PathOutcome::AlreadyPresent | PathOutcome::SkippedUpstream | PathOutcome::Excluded => {
            tracing::debug!(
                store_path = %report.path,
                nar_size = report.nar_size,
                outcome = ?report.outcome,
                target,
                "skipped {}",
                report.path
            )
        }
    }
}

/// `12.3 MiB` style sizes for humans.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Tries of the presence query per batch (with the default policy, at most 1 + 2 + 4 s of waiting).
pub const PRESENCE_TRIES: u32 = 4;
/// The longest the engine waits between presence tries; a server asking for more gets the batch back in the
/// queue instead, so shutdown and status are not held up.
const PRESENCE_MAX_WAIT: Duration = Duration::from_secs(30);

/// Engine settings derived from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// NAR compression.
    pub compression: Compression,
    /// Compression level.
    pub level: i32,
    /// Parallel NAR preparations and uploads.
    pub workers: usize,
    /// Where compressed NARs are written when the backend has no staging directory.
    pub temp_dir: PathBuf,
    /// Patterns of paths never pushed.
    pub exclude: globset::GlobSet,
    /// Upstream caches whose paths are skipped.
    pub upstream: Vec<String>,
    /// Backoff between tries of the target's presence query within one batch.
    pub presence_retry: retry::Policy,
    /// Tries of the presence query within one batch before the batch gives up on it.
    pub presence_tries: u32,
    /// Threads that hash and compress NARs (the daemon's run at idle priority).
    pub prepare_pool: crate::priority::Pool,
}

impl Settings {
    /// Settings from a validated configuration.
    pub fn from_config(config: &Config) -> Result<Settings, crate::config::Error> {
        let mut exclude = globset::GlobSetBuilder::new();
        for pattern in &config.exclude {
            exclude.add(globset::Glob::new(pattern).map_err(|e| {
                crate::config::Error::Invalid {
                    field: "exclude",
                    problem: format!("has an invalid pattern {pattern:?}: {e}"),
                }
            })?);
        }
        Ok(Settings {
            compression: config.target.compression,
            level: config.compression_level(),
            workers: config.workers(),
            temp_dir: config.state_dir.join("tmp"),
            exclude: exclude.build().map_err(|e| crate::config::Error::Invalid {
                field: "exclude",
                problem: e.to_string(),
            })?,
            upstream: config.upstream.clone(),
            presence_retry: retry::Policy::default(),
            presence_tries: PRESENCE_TRIES,
            prepare_pool: crate::priority::Pool::inherit(),
        })
    }

    /// Whether an `exclude` pattern matches the path's name or base name.
    pub fn is_excluded(&self, path: &StorePath) -> bool {
        self.exclude.is_match(path.name()) || self.exclude.is_match(path.base_name())
    }
}

/// The upload engine for one backend.
pub struct Engine<B> {
    backend: Arc<B>,
    store: Arc<LocalStore>,
    settings: Settings,
    signing_key: RwLock<Option<Arc<SecretKey>>>,
    present: Arc<dyn PresentCache>,
    observer: Arc<dyn Observer>,
    upstream_client: reqwest::Client,
    in_flight: Mutex<BTreeMap<StorePath, Tracked>>,
}

#[derive(Debug)]
struct Tracked {
    nar_size: u64,
    nar_done: Arc<AtomicU64>,
    uploading: bool,
    started: Instant,
}

impl<B: Backend + 'static> Engine<B> {
    /// An engine that uploads to `backend`.
    pub fn new(
        backend: Arc<B>,
        store: Arc<LocalStore>,
        settings: Settings,
        signing_key: Option<SecretKey>,
        present: Arc<dyn PresentCache>,
        observer: Arc<dyn Observer>,
    ) -> Result<Engine<B>, backend::Error> {
        Ok(Engine {
            backend,
            store,
            settings,
            signing_key: RwLock::new(signing_key.map(Arc::new)),
            present,
            observer,
            upstream_client: backend::http::client(Duration::from_secs(10))?,
            in_flight: Mutex::new(BTreeMap::new()),
        })
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Replaces the signing key (after the key file was rotated).
    pub fn set_signing_key(&self, key: Option<SecretKey>) {
        if let Ok(mut guard) = self.signing_key.write() {
            *guard = key.map(Arc::new);
        }
    }

    /// What is being prepared or uploaded right now.
    pub fn in_flight(&self) -> Vec<InFlight> {
        let Ok(map) = self.in_flight.lock() else {
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

    /// Uploads the closures of `roots`. Never panics on bad input; every failure is reported per root.
    pub async fn push(&self, roots: &[StorePath], cancel: &CancellationToken) -> BatchReport {
        self.push_paths(roots, true, cancel).await
    }

    /// Uploads `roots`, with their closures when `closure` is set. Without, only the roots themselves are
    /// considered (their references must reach the cache some other way).
    pub async fn push_paths(
        &self,
        roots: &[StorePath],
        closure: bool,
        cancel: &CancellationToken,
    ) -> BatchReport {
        let mut report = BatchReport::default();
        // Roots that are gone are reported as such; the rest form one closure.
        let mut live = Vec::new();
        for root in roots {
            match self.query(root).await {
                Ok(Some(_)) => live.push(root.clone()),
                Ok(None) => report.roots.push((root.clone(), RootOutcome::Gone)),
                Err(e) => report
                    .roots
                    .push((root.clone(), RootOutcome::Failed(Arc::new(e)))),
            }
        }
        if live.is_empty() {
            return report;
        }
        let expanded = if closure {
            self.closure(&live).await
        } else {
            self.infos_in_order(&live).await
        };
        let closure = match expanded {
            Ok(c) => c,
            Err(e) => {
                let e = Arc::new(e);
                for root in live {
                    report
                        .roots
                        .push((root, RootOutcome::Failed(Arc::clone(&e))));
                }
                return report;
            }
        };
        let outcomes = self.push_closure(&closure, cancel, &mut report).await;
        // A root is done when nothing in its own closure failed.
        for root in live {
            let failure = self
                .store_closure_of(&root, &closure)
                .into_iter()
                .find_map(|p| outcomes.get(&p).and_then(|o| o.clone()));
            let outcome = match failure {
                Some(e) => RootOutcome::Failed(e),
                None => RootOutcome::Done,
            };
            report.roots.push((root, outcome));
        }
        report
    }

    async fn query(&self, path: &StorePath) -> Result<Option<PathInfo>, Error> {
        let store = Arc::clone(&self.store);
        let path = path.clone();
        tokio::task::spawn_blocking(move || store.query(&path))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(Error::from)
    }

    /// The path infos of `paths` alone, references (among them) first.
    async fn infos_in_order(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, Error> {
        let mut infos = Vec::new();
        for path in paths {
            match self.query(path).await? {
                Some(info) if !infos.iter().any(|i: &PathInfo| i.path == info.path) => {
                    infos.push(info)
                }
                Some(_) => {}
                None => return Err(Error::Gone(path.clone())),
            }
        }
        Ok(topological(infos))
    }

    async fn closure(&self, roots: &[StorePath]) -> Result<Vec<PathInfo>, Error> {
        let store = Arc::clone(&self.store);
        let roots = roots.to_vec();
        tokio::task::spawn_blocking(move || store.closure(&roots))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(Error::from)
    }

    /// The members of `closure` reachable from `root` (the batch closure may hold several roots).
    fn store_closure_of(&self, root: &StorePath, closure: &[PathInfo]) -> Vec<StorePath> {
        let by_path: HashMap<&StorePath, &PathInfo> =
            closure.iter().map(|i| (&i.path, i)).collect();
        let mut seen = HashSet::new();
        let mut stack = vec![root.clone()];
        while let Some(p) = stack.pop() {
            if !seen.insert(p.clone()) {
                continue;
            }
            if let Some(info) = by_path.get(&p) {
                stack.extend(
                    info.references
                        .iter()
                        .filter(|r| !seen.contains(*r))
                        .cloned(),
                );
            }
        }
        seen.into_iter().collect()
    }

    /// Uploads what the cache lacks of `closure` (topologically sorted). Returns, per path, its failure if any.
    async fn push_closure(
        &self,
        closure: &[PathInfo],
        cancel: &CancellationToken,
        report: &mut BatchReport,
    ) -> HashMap<StorePath, Option<Arc<Error>>> {
        let mut outcomes: HashMap<StorePath, Option<Arc<Error>>> = HashMap::new();
        let finish = |report: &mut BatchReport, info: &PathInfo, outcome: PathOutcome| {
            let path_report = PathReport {
                path: info.path.clone(),
                outcome,
                nar_size: info.nar_size,
                file_size: None,
                duration_ms: None,
                compression: None,
            };
            self.observer.path_finished(&path_report);
            report.paths.push(path_report);
        };

        // 1. Exclusions and remembered answers.
        let mut candidates = Vec::new();
        for info in closure {
            if self.settings.is_excluded(&info.path) {
                outcomes.insert(info.path.clone(), None);
                finish(report, info, PathOutcome::Excluded);
            } else if self.present.is_known_present(info.path.hash_part()) {
                outcomes.insert(info.path.clone(), None);
                finish(report, info, PathOutcome::AlreadyPresent);
            } else {
                candidates.push(info);
            }
        }

        // 2. One batched question to the target.
        let candidate_paths: Vec<StorePath> = candidates.iter().map(|i| i.path.clone()).collect();
        let missing: HashSet<StorePath> =
            match self.missing_retrying(&candidate_paths, cancel).await {
                Ok(m) => m.into_iter().collect(),
                Err(e) => {
                    // No path was tried, so none is reported as failed; the roots carry the error.
                    let e = Arc::new(e);
                    if e.is_auth() {
                        report.auth_failure = Some(Arc::clone(&e));
                    }
                    for info in candidates {
                        outcomes.insert(info.path.clone(), Some(Arc::clone(&e)));
                    }
                    return outcomes;
                }
            };
        let mut present_now = Vec::new();
        let mut to_check_upstream = Vec::new();
        for info in candidates {
            if missing.contains(&info.path) {
                to_check_upstream.push(info);
            } else {
                present_now.push(info.path.hash_part().to_owned());
                outcomes.insert(info.path.clone(), None);
                finish(report, info, PathOutcome::AlreadyPresent);
            }
        }

        // 3. Upstream caches.
        let upstream_has = self.upstream_has(&to_check_upstream).await;
        let mut to_upload = Vec::new();
        for info in to_check_upstream {
            if upstream_has.contains(&info.path) {
                present_now.push(info.path.hash_part().to_owned());
                outcomes.insert(info.path.clone(), None);
                finish(report, info, PathOutcome::SkippedUpstream);
            } else {
                to_upload.push(info);
            }
        }
        let refs: Vec<&str> = present_now.iter().map(String::as_str).collect();
        self.present.remember_present(&refs);
        self.observer.planned(&Plan {
            paths: closure.len(),
            to_upload: to_upload.len(),
            to_upload_bytes: to_upload.iter().map(|i| i.nar_size).sum(),
        });

        // 4. Prepare and upload in dependency order. The observer hears of each path as it finishes.
        let infos: HashMap<&StorePath, &PathInfo> =
            to_upload.iter().map(|i| (&i.path, *i)).collect();
        for (path, result) in self.upload_in_order(&to_upload, cancel).await {
            let Some(info) = infos.get(&path) else {
                continue;
            };
            report.paths.push(self.upload_report(info, &result));
            match result {
                Ok(_) => {
                    self.present.remember_present(&[info.path.hash_part()]);
                    outcomes.insert(path, None);
                }
                Err(e) => {
                    if e.is_auth() && report.auth_failure.is_none() {
                        report.auth_failure = Some(Arc::clone(&e));
                    }
                    outcomes.insert(path, Some(e));
                }
            }
        }
        outcomes
    }

    /// The paths among `paths` the target lacks. A transient failure (one HEAD among hundreds timing out, a 503)
    /// says nothing about any single path, so the whole query is tried again with backoff before the batch gives
    /// up with [`Error::Presence`].
    async fn missing_retrying(
        &self,
        paths: &[StorePath],
        cancel: &CancellationToken,
    ) -> Result<Vec<StorePath>, Error> {
        let tries = self.settings.presence_tries.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let e = match self.backend.missing(paths).await {
                Ok(missing) => return Ok(missing),
                Err(e) => e,
            };
            let delay =
                self.settings
                    .presence_retry
                    .delay(attempt, e.retry_after(), rand::random());
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

    /// The report of a path that was to be uploaded.
    fn upload_report(&self, info: &PathInfo, result: &Result<Uploaded, Arc<Error>>) -> PathReport {
        match result {
            Ok(done) => PathReport {
                path: info.path.clone(),
                outcome: PathOutcome::Uploaded,
                nar_size: done.nar_size,
                file_size: Some(done.file_size),
                duration_ms: Some(done.duration.as_millis() as u64),
                compression: Some(self.settings.compression),
            },
            Err(e) => PathReport {
                path: info.path.clone(),
                outcome: PathOutcome::Failed(e.to_string()),
                nar_size: info.nar_size,
                file_size: None,
                duration_ms: None,
                compression: None,
            },
        }
    }

    /// Asks every upstream cache about `paths`; a cache that cannot be reached counts as not having them.
    async fn upstream_has(&self, paths: &[&PathInfo]) -> HashSet<StorePath> {
        let mut found = HashSet::new();
        for base in &self.settings.upstream {
            let unknown: Vec<&PathInfo> = paths
                .iter()
                .copied()
                .filter(|i| !found.contains(&i.path))
                .collect();
            let unknown: Vec<StorePath> = unknown.into_iter().map(|i| i.path.clone()).collect();
            let client = &self.upstream_client;
            let answers: Vec<(StorePath, Result<bool, backend::Error>)> =
                futures_util::stream::iter(unknown)
                    .map(|path| async move {
                        let has = backend::http::cache_has(client, base, &path).await;
                        (path, has)
                    })
                    .buffer_unordered(16)
                    .collect()
                    .await;
            let mut warned = false;
            for (path, answer) in answers {
                match answer {
                    Ok(true) => {
                        found.insert(path);
                    }
                    Ok(false) => {}
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(upstream = %base, "upstream cache unavailable, uploading instead: {e}");
                    }
                    Err(_) => {}
                }
            }
        }
        found
    }

    /// Prepares and uploads `paths` (topologically sorted) with bounded parallelism, references first.
    async fn upload_in_order(
        &self,
        paths: &[&PathInfo],
        cancel: &CancellationToken,
    ) -> Vec<(StorePath, Result<Uploaded, Arc<Error>>)> {
        let index: HashMap<&StorePath, usize> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| (&p.path, i))
            .collect();
        // References inside this batch; anything else is already in the cache.
        let deps: Vec<Vec<usize>> = paths
            .iter()
            .enumerate()
            .map(|(i, info)| {
                info.references
                    .iter()
                    .filter_map(|r| index.get(r).copied())
                    .filter(|&j| j != i)
                    .collect()
            })
            .collect();
        let mut states: Vec<State> = paths.iter().map(|_| State::Waiting).collect();
        let mut results: Vec<(StorePath, Result<Uploaded, Arc<Error>>)> = Vec::new();
        let workers = self.settings.workers.max(1);
        let staged_limit = 2 * workers;
        let mut tasks = FuturesUnordered::new();
        let (mut preparing, mut uploading) = (0usize, 0usize);
        // Results up to here have been reported to the observer.
        let mut notified = 0;
        let notify = |results: &[(StorePath, Result<Uploaded, Arc<Error>>)],
                      notified: &mut usize| {
            for (path, result) in &results[*notified..] {
                if let Some(&i) = index.get(path) {
                    self.observer
                        .path_finished(&self.upload_report(paths[i], result));
                }
            }
            *notified = results.len();
        };

        loop {
            // Fail paths whose references failed; they must not be published.
            for i in 0..paths.len() {
                if !matches!(states[i], State::Waiting) {
                    continue;
                }
                if let Some(&j) = deps[i]
                    .iter()
                    .find(|&&j| matches!(states[j], State::Finished(false)))
                {
                    states[i] = State::Finished(false);
                    results.push((
                        paths[i].path.clone(),
                        Err(Arc::new(Error::DependencyFailed {
                            path: paths[i].path.clone(),
                            reference: paths[j].path.clone(),
                        })),
                    ));
                }
            }
            let refs_done = |i: usize, states: &[State]| {
                deps[i]
                    .iter()
                    .all(|&j| matches!(states[j], State::Finished(true)))
            };
            // Start uploads of prepared paths whose references are in.
            for i in 0..paths.len() {
                if uploading >= workers {
                    break;
                }
                if matches!(states[i], State::Prepared(_)) && refs_done(i, &states) {
                    let State::Prepared(boxed) =
                        std::mem::replace(&mut states[i], State::Uploading)
                    else {
                        continue;
                    };
                    let (narinfo, prepared, prep_time) = *boxed;
                    uploading += 1;
                    self.mark_uploading(&paths[i].path);
                    tasks.push(Box::pin(self.upload_one(i, narinfo, prepared, prep_time))
                        as std::pin::Pin<
                            Box<dyn std::future::Future<Output = _> + Send + '_>,
                        >);
                }
            }
            // Start preparations, lowest topological index first.
            if !cancel.is_cancelled() {
                let staged = states
                    .iter()
                    .filter(|s| matches!(s, State::Prepared(_) | State::Preparing))
                    .count();
                for i in 0..paths.len() {
                    if preparing >= workers {
                        break;
                    }
                    if matches!(states[i], State::Waiting)
                        && (staged + preparing < staged_limit || refs_done(i, &states))
                    {
                        states[i] = State::Preparing;
                        preparing += 1;
                        tasks.push(Box::pin(self.prepare_one(i, paths[i])));
                    }
                }
            }
            let Some(event) = tasks.next().await else {
                break;
            };
            match event {
                Event::Prepared(i, Ok(prepared)) => {
                    preparing -= 1;
                    states[i] = State::Prepared(prepared);
                }
                Event::Prepared(i, Err(e)) | Event::Uploaded(i, Err(e)) => {
                    if matches!(states[i], State::Uploading) {
                        uploading -= 1;
                    } else {
                        preparing -= 1;
                    }
                    self.untrack(&paths[i].path);
                    states[i] = State::Finished(false);
                    let e = Arc::new(e);
                    if e.is_auth() {
                        // Nothing else can succeed until the credentials change.
                        fail_pending(&mut states, &mut results, paths, &e);
                    }
                    results.push((paths[i].path.clone(), Err(e)));
                }
                Event::Uploaded(i, Ok(done)) => {
                    uploading -= 1;
                    self.untrack(&paths[i].path);
                    states[i] = State::Finished(true);
                    results.push((paths[i].path.clone(), Ok(done)));
                }
            }
            notify(&results, &mut notified);
            if cancel.is_cancelled() && preparing == 0 && uploading == 0 {
                break;
            }
        }
        // Whatever never started was cut short by shutdown.
        for (i, state) in states.iter().enumerate() {
            if !matches!(state, State::Finished(_)) {
                results.push((paths[i].path.clone(), Err(Arc::new(Error::Cancelled))));
            }
        }
        notify(&results, &mut notified);
        results
    }

    async fn prepare_one(&self, i: usize, info: &PathInfo) -> Event {
        let started = Instant::now();
        let result = self.prepare_narinfo(info).await;
        Event::Prepared(i, result.map(|(n, p)| Box::new((n, p, started.elapsed()))))
    }

    async fn prepare_narinfo(&self, info: &PathInfo) -> Result<(NarInfo, PreparedNar), Error> {
        // Between closure expansion and now the path may have been garbage-collected.
        if self.query(&info.path).await?.is_none() {
            return Err(Error::Gone(info.path.clone()));
        }
        let progress = self.track(&info.path, info.nar_size);
        let dir = self
            .backend
            .staging_dir()
            .unwrap_or_else(|| self.settings.temp_dir.clone());
        std::fs::create_dir_all(&dir).map_err(|source| prepare::Error::Temp {
            file: dir.clone(),
            source,
        })?;
        let (path, compression, level) = (
            info.path.clone(),
            self.settings.compression,
            self.settings.level,
        );
        let prepared = self
            .settings
            .prepare_pool
            .spawn_blocking(move || prepare::prepare(&path, compression, level, &dir, &progress))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        if prepared.nar_hash != info.nar_hash || prepared.nar_size != info.nar_size {
            return Err(Error::Corrupt {
                path: info.path.clone(),
                recorded: info.nar_hash,
                computed: prepared.nar_hash,
            });
        }
        let mut narinfo = NarInfo {
            store_path: info.path.clone(),
            url: format!(
                "nar/{}{}",
                prepared.file_hash.to_base32(),
                compression.extension()
            ),
            compression: compression.narinfo_name().to_owned(),
            file_hash: Some(prepared.file_hash),
            file_size: Some(prepared.file_size),
            nar_hash: prepared.nar_hash,
            nar_size: prepared.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            sigs: Vec::new(),
            ca: info.ca.clone(),
        };
        let key = self.signing_key.read().ok().and_then(|k| k.clone());
        if let Some(key) = key {
            narinfo.sign(&key);
        }
        Ok((narinfo, prepared))
    }

    async fn upload_one(
        &self,
        i: usize,
        narinfo: NarInfo,
        prepared: PreparedNar,
        prep_time: Duration,
    ) -> Event {
        let started = Instant::now();
        let nar = NarFile {
            path: &prepared.file,
            size: prepared.file_size,
            sha256: prepared.file_hash,
        };
        let result = self.backend.upload(&narinfo, nar).await;
        let (nar_size, file_size) = (prepared.nar_size, prepared.file_size);
        match result {
            Ok(()) => {
                // A backend that renamed the file into place owns it now.
                if !prepared.file.exists() {
                    prepared.keep();
                }
                Event::Uploaded(
                    i,
                    Ok(Uploaded {
                        nar_size,
                        file_size,
                        duration: prep_time + started.elapsed(),
                    }),
                )
            }
            Err(e) => Event::Uploaded(i, Err(Error::Backend(e))),
        }
    }

    fn track(&self, path: &StorePath, nar_size: u64) -> Arc<AtomicU64> {
        let counter = Arc::new(AtomicU64::new(0));
        if let Ok(mut map) = self.in_flight.lock() {
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

    fn mark_uploading(&self, path: &StorePath) {
        if let Ok(mut map) = self.in_flight.lock() {
            if let Some(t) = map.get_mut(path) {
                t.uploading = true;
            }
        }
    }

    fn untrack(&self, path: &StorePath) {
        if let Ok(mut map) = self.in_flight.lock() {
            map.remove(path);
        }
    }
}

/// Orders `infos` so that each comes after the references it has among them (self-references ignored).
fn topological(infos: Vec<PathInfo>) -> Vec<PathInfo> {
    let paths: HashSet<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
    let mut placed: HashSet<StorePath> = HashSet::new();
    let mut remaining = infos;
    let mut ordered = Vec::with_capacity(remaining.len());
    while !remaining.is_empty() {
        let before = remaining.len();
        let (ready, waiting): (Vec<PathInfo>, Vec<PathInfo>) =
            remaining.into_iter().partition(|info| {
                info.references
                    .iter()
                    .all(|r| r == &info.path || !paths.contains(r) || placed.contains(r))
            });
        placed.extend(ready.iter().map(|i| i.path.clone()));
        ordered.extend(ready);
        remaining = waiting;
        if remaining.len() == before {
            // A reference cycle cannot happen in a valid store; keep the rest in the given order.
            ordered.append(&mut remaining);
        }
    }
    ordered
}

/// Where one path of a batch stands.
#[derive(Debug)]
enum State {
    Waiting,
    Preparing,
    Prepared(Box<(NarInfo, PreparedNar, Duration)>),
    Uploading,
    Finished(bool),
}

/// Marks every path that has not started, or waits with a prepared NAR, as failed with `cause`.
fn fail_pending(
    states: &mut [State],
    results: &mut Vec<(StorePath, Result<Uploaded, Arc<Error>>)>,
    paths: &[&PathInfo],
    cause: &Arc<Error>,
) {
    for (i, state) in states.iter_mut().enumerate() {
        if matches!(state, State::Waiting | State::Prepared(_)) {
            *state = State::Finished(false);
            results.push((paths[i].path.clone(), Err(Arc::clone(cause))));
        }
    }
}

/// A finished upload's figures.
#[derive(Debug, Clone, Copy)]
struct Uploaded {
    nar_size: u64,
    file_size: u64,
    duration: Duration,
}

enum Event {
    Prepared(usize, Result<Box<(NarInfo, PreparedNar, Duration)>, Error>),
    Uploaded(usize, Result<Uploaded, Error>),
}
