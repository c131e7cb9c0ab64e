//! The upload engine: a batch of requested store paths to a binary cache, closure first, in dependency order.
//!
//! For one batch the engine
//! 1. expands the closure of every requested root (the local store's references, topologically sorted);
//! 2. drops excluded paths, paths known to be present (remembered with an expiry), paths the target already has
//!    (one batched `missing` query) and paths an upstream cache serves, and holds back paths that reference an
//!    excluded path no cache has ([`filter`]);
//! 3. streams each remaining path into a compressed NAR file ([`prepare`]) on up to `workers` blocking threads;
//! 4. uploads a path (NAR, then the signed narinfo) only once all its references are in the cache, so a consumer
//!    never sees a narinfo whose NAR or references are missing.
//!
//! NAR preparation runs ahead of uploads, which keeps both cores busy along a chain of dependencies, but at most
//! `2 × workers` prepared NARs wait on disk at once. The lowest unfinished path in topological order always has
//! its references done, so it may start even when that limit is reached: the batch cannot deadlock.
//!
//! This file holds the [`Engine`] and its [`Settings`]; the rest of the work is split by concern:
//! [`order`] decides what may start, [`presence`] asks what the target and upstreams hold, [`prepare`] makes
//! the NAR file, [`report`] tells of outcomes, [`retry`] times the retries, and `error` classifies failures.

mod documents;
mod error;
pub mod failure_class;
pub mod filter;
mod in_flight;
pub mod order;
pub mod prepare;
pub mod presence;
pub mod rate;
pub mod report;
mod resign;
mod settings;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::backend::{self, Backend, NarFile};
use crate::narinfo::NarInfo;
use crate::pathinfo::{LocalStore, PathInfo};
use crate::signing::SecretKey;
use crate::store_path::StorePath;

use in_flight::InFlightTable;
use order::Order;
use prepare::PreparedNar;

pub use crate::retry;
pub use error::Error;
pub use failure_class::FailureClass;
pub use presence::{MemoryPresentCache, PresenceMemory, PresentCache, PRESENCE_TRIES};
pub use report::{
    human_bytes, log_report, upload_line, BatchReport, InFlight, LogObserver, Observer,
    PathOutcome, PathReport, Plan, RootOutcome,
};
pub use settings::Settings;

/// The upload engine for one backend.
pub struct Engine<B> {
    backend: Arc<B>,
    store: Arc<LocalStore>,
    settings: Settings,
    signing_key: RwLock<Option<Arc<SecretKey>>>,
    /// Keys from `signing_key_files`, each adding its signature after the main key's.
    extra_keys: RwLock<Vec<Arc<SecretKey>>>,
    /// Derivations whose build log was sent (see `documents`).
    logs_sent: Mutex<HashSet<StorePath>>,
    present: Arc<dyn PresentCache>,
    observer: Arc<dyn Observer>,
    upstreams: backend::upstream::Upstreams,
    in_flight: InFlightTable,
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
        let upstreams = backend::upstream::Upstreams::new(settings.upstream.clone())?;
        Ok(Engine {
            backend,
            store,
            settings,
            signing_key: RwLock::new(signing_key.map(Arc::new)),
            extra_keys: RwLock::new(Vec::new()),
            logs_sent: Mutex::new(HashSet::new()),
            present,
            observer,
            upstreams,
            in_flight: InFlightTable::default(),
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

    /// Replaces the keys from `signing_key_files` (at start and after a key file changed).
    pub fn set_extra_signing_keys(&self, keys: Vec<SecretKey>) {
        if let Ok(mut guard) = self.extra_keys.write() {
            *guard = keys.into_iter().map(Arc::new).collect();
        }
    }

    /// Every key that signs, the main one first.
    fn signing_keys(&self) -> Vec<Arc<SecretKey>> {
        let mut keys: Vec<Arc<SecretKey>> = self
            .signing_key
            .read()
            .ok()
            .and_then(|k| k.clone())
            .into_iter()
            .collect();
        if let Ok(extra) = self.extra_keys.read() {
            keys.extend(extra.iter().cloned());
        }
        keys
    }

    /// What is being prepared or uploaded right now.
    pub fn in_flight(&self) -> Vec<InFlight> {
        self.in_flight.snapshot()
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
        let held_back: HashMap<&StorePath, &String> = report
            .paths
            .iter()
            .filter_map(|p| match &p.outcome {
                PathOutcome::HeldBack(reason) => Some((&p.path, reason)),
                _ => None,
            })
            .collect();
        // A root is done when nothing in its own closure failed; a root held back waits for a retry.
        for root in live {
            let failure = self
                .store_closure_of(&root, &closure)
                .into_iter()
                .find_map(|p| outcomes.get(&p).and_then(|o| o.clone()));
            let outcome = match (failure, held_back.get(&root)) {
                (Some(e), _) => RootOutcome::Failed(e),
                (None, Some(reason)) => RootOutcome::HeldBack((*reason).clone()),
                (None, None) => RootOutcome::Done,
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

        // 1. Filters and remembered answers. An excluded path is never uploaded, but whether a cache has it
        // decides whether the paths that reference it may be (see `filter`), so those are asked about too. An
        // answer from before this lifetime is asked again, in the same query as the unknown paths, when a path
        // that may be uploaded references it.
        let filter = &self.settings.filter;
        let exclusions = filter.exclusions(closure);
        let excluded_to_check = filter.references_to_check(closure, &exclusions);
        let asked = |info: &PathInfo, exclusion: &Option<filter::Exclusion>| {
            exclusion.is_none() || excluded_to_check.contains(&info.path)
        };
        let memory: Vec<PresenceMemory> = closure
            .iter()
            .zip(&exclusions)
            .map(|(info, exclusion)| {
                if asked(info, exclusion) {
                    self.present.presence(info.path.hash_part())
                } else {
                    PresenceMemory::Unknown
                }
            })
            .collect();
        let with = |wanted: PresenceMemory, passing_only: bool| -> HashSet<&StorePath> {
            closure
                .iter()
                .zip(&exclusions)
                .zip(&memory)
                .filter(|((info, e), m)| {
                    **m == wanted && asked(info, e) && (e.is_none() || !passing_only)
                })
                .map(|((info, _), _)| &info.path)
                .collect()
        };
        let recheck = presence::to_recheck(
            closure,
            &with(PresenceMemory::Unknown, true),
            &with(PresenceMemory::Remembered, false),
        );
        let mut candidates = Vec::new();
        // Excluded paths whose presence is asked; those a cache has go into `available`.
        let mut excluded_candidates = Vec::new();
        let mut available: HashSet<&StorePath> = HashSet::new();
        for ((info, remembered), exclusion) in closure.iter().zip(&memory).zip(&exclusions) {
            let known = *remembered == PresenceMemory::Answered
                || (*remembered == PresenceMemory::Remembered && !recheck.contains(&info.path));
            if let Some(exclusion) = exclusion {
                outcomes.insert(info.path.clone(), None);
                finish(report, info, PathOutcome::Excluded(exclusion.to_string()));
                if known {
                    available.insert(&info.path);
                } else if excluded_to_check.contains(&info.path) {
                    excluded_candidates.push(info);
                }
            } else if known {
                available.insert(&info.path);
                outcomes.insert(info.path.clone(), None);
                finish(report, info, PathOutcome::AlreadyPresent);
            } else {
                candidates.push(info);
            }
        }

        // 2. One batched question to the target.
        let candidate_paths: Vec<StorePath> = candidates
            .iter()
            .chain(&excluded_candidates)
            .map(|i| i.path.clone())
            .collect();
        let presence = self.presence();
        let missing: HashSet<StorePath> =
            match presence.target_lacks(&candidate_paths, cancel).await {
                Ok(m) => m.into_iter().collect(),
                Err(e) => {
                    // No path was tried, so none is reported as failed; the roots carry the error.
                    let e = Arc::new(e);
                    if e.is_auth() {
                        report.auth_failure = Some(Arc::clone(&e));
                    }
                    for info in candidates.iter().chain(&excluded_candidates) {
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
            } else if let Err(e) = self.complete_present(info).await {
                // Not remembered as present, so the next try completes it.
                let e = Arc::new(e);
                if e.is_auth() && report.auth_failure.is_none() {
                    report.auth_failure = Some(Arc::clone(&e));
                }
                finish(report, info, PathOutcome::Failed(e.to_string()));
                outcomes.insert(info.path.clone(), Some(e));
                available.insert(&info.path);
            } else {
                present_now.push(info.path.hash_part().to_owned());
                outcomes.insert(info.path.clone(), None);
                finish(report, info, PathOutcome::AlreadyPresent);
                available.insert(&info.path);
            }
        }
        let (excluded_missing, excluded_present): (Vec<&PathInfo>, Vec<&PathInfo>) =
            excluded_candidates
                .into_iter()
                .partition(|info| missing.contains(&info.path));
        for info in excluded_present {
            present_now.push(info.path.hash_part().to_owned());
            available.insert(&info.path);
        }

        // 3. Upstream caches.
        let unknown: Vec<StorePath> = to_check_upstream
            .iter()
            .chain(&excluded_missing)
            .map(|i| i.path.clone())
            .collect();
        let upstream_has = presence.upstream_serves(&unknown).await;
        let mut absent = Vec::new();
        for info in to_check_upstream {
            if upstream_has.contains(&info.path) {
                present_now.push(info.path.hash_part().to_owned());
                outcomes.insert(info.path.clone(), None);
                finish(report, info, PathOutcome::SkippedUpstream);
                available.insert(&info.path);
            } else {
                absent.push(info);
            }
        }
        for info in excluded_missing {
            if upstream_has.contains(&info.path) {
                present_now.push(info.path.hash_part().to_owned());
                available.insert(&info.path);
            }
        }

        // 4. Closure safety: what no cache has and references a filtered-out path no cache has waits.
        let decisions = filter.decide(closure, &exclusions, |p| available.contains(p));
        let decided: HashMap<&StorePath, &filter::Decision> =
            closure.iter().map(|i| &i.path).zip(&decisions).collect();
        let mut to_upload = Vec::new();
        for info in absent {
            match decided.get(&info.path) {
                Some(filter::Decision::HeldBack(held)) => {
                    outcomes.insert(info.path.clone(), None);
                    finish(report, info, PathOutcome::HeldBack(held.to_string()));
                }
                _ => to_upload.push(info),
            }
        }
        let refs: Vec<&str> = present_now.iter().map(String::as_str).collect();
        self.present.remember_present(&refs);
        self.observer.planned(&Plan {
            paths: closure.len(),
            to_upload: to_upload.len(),
            to_upload_bytes: to_upload.iter().map(|i| i.nar_size).sum(),
        });

        // 5. Prepare and upload in dependency order. The observer hears of each path as it finishes.
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

    /// What a path the target already has may still lack: our signature (`resign_existing`) and realisations.
    async fn complete_present(&self, info: &PathInfo) -> Result<(), Error> {
        match self.resign_if_unsigned(info).await? {
            resign::Resigned::Unchanged => {}
            resign::Resigned::Signed => {
                tracing::info!(store_path = %info.path, "re-signed {} (narinfo only)", info.path)
            }
            resign::Resigned::Mismatch(reason) => {
                return Err(Error::TargetMismatch {
                    path: info.path.clone(),
                    reason,
                })
            }
        }
        self.put_missing_realisations(&info.path).await
    }

    fn presence(&self) -> presence::Presence<'_, B> {
        presence::Presence {
            backend: &self.backend,
            upstreams: &self.upstreams,
            retry: &self.settings.presence_retry,
            tries: self.settings.presence_tries,
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

    /// Prepares and uploads `paths` (topologically sorted) with bounded parallelism, references first; the
    /// [`Order`] decides what may start.
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
            .map(|info| {
                info.references
                    .iter()
                    .filter_map(|r| index.get(r).copied())
                    .collect()
            })
            .collect();
        let mut order = Order::new(deps, self.settings.workers);
        // NARs prepared and waiting for their references.
        let mut staged: HashMap<usize, Box<Staged>> = HashMap::new();
        let mut results: Vec<(StorePath, Result<Uploaded, Arc<Error>>)> = Vec::new();
        let mut tasks = FuturesUnordered::new();
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
            // Paths whose references failed must not be published.
            for (i, j) in order.fail_dependents() {
                staged.remove(&i);
                let cause = results
                    .iter()
                    .find(|(p, _)| p == &paths[j].path)
                    .and_then(|(_, r)| r.as_ref().err().cloned())
                    .unwrap_or_else(|| Arc::new(Error::Internal("unknown failure".into())));
                // Name the first failure, not a chain of held-back referrers.
                let cause = match &*cause {
                    Error::DependencyFailed { cause: first, .. } => Arc::clone(first),
                    _ => cause,
                };
                results.push((
                    paths[i].path.clone(),
                    Err(Arc::new(Error::DependencyFailed {
                        path: paths[i].path.clone(),
                        reference: paths[j].path.clone(),
                        cause,
                    })),
                ));
            }
            for start in order.next(!cancel.is_cancelled()) {
                match start {
                    order::Start::Upload(i) => {
                        let Some(boxed) = staged.remove(&i) else {
                            continue;
                        };
                        let (narinfo, prepared, prep_time) = *boxed;
                        let sent = self
                            .in_flight
                            .mark_uploading(&paths[i].path, prepared.file_size);
                        tasks.push(
                            Box::pin(self.upload_one(i, narinfo, prepared, prep_time, sent))
                                as std::pin::Pin<
                                    Box<dyn std::future::Future<Output = _> + Send + '_>,
                                >,
                        );
                    }
                    order::Start::Prepare(i) => {
                        tasks.push(Box::pin(self.prepare_one(i, paths[i])));
                    }
                }
            }
            let Some(event) = tasks.next().await else {
                break;
            };
            match event {
                Event::Prepared(i, Ok(prepared)) => {
                    order.prepared(i);
                    staged.insert(i, prepared);
                }
                Event::Prepared(i, Err(e)) | Event::Uploaded(i, Err(e)) => {
                    order.failed(i);
                    self.in_flight.untrack(&paths[i].path);
                    let e = Arc::new(e);
                    if e.is_auth() {
                        // Nothing else can succeed until the credentials change.
                        for j in order.fail_pending() {
                            staged.remove(&j);
                            results.push((paths[j].path.clone(), Err(Arc::clone(&e))));
                        }
                    }
                    results.push((paths[i].path.clone(), Err(e)));
                }
                Event::Uploaded(i, Ok(done)) => {
                    order.uploaded(i);
                    self.in_flight.untrack(&paths[i].path);
                    results.push((paths[i].path.clone(), Ok(done)));
                }
            }
            notify(&results, &mut notified);
            if cancel.is_cancelled() && order.is_idle() {
                break;
            }
        }
        // Whatever never started was cut short by shutdown.
        for i in order.unfinished() {
            results.push((paths[i].path.clone(), Err(Arc::new(Error::Cancelled))));
        }
        notify(&results, &mut notified);
        results
    }

    async fn prepare_one(&self, i: usize, info: &PathInfo) -> Event {
        let started = Instant::now();
        let result = self.prepare_narinfo(info).await.map_err(|e| {
            // A `file://` NAR is written through the limiter, which an interruption aborts.
            if self.settings.rate.is_aborted() {
                Error::Cancelled
            } else {
                e
            }
        });
        Event::Prepared(i, result.map(|(n, p)| Box::new((n, p, started.elapsed()))))
    }

    async fn prepare_narinfo(&self, info: &PathInfo) -> Result<(NarInfo, PreparedNar), Error> {
        // Between closure expansion and now the path may have been garbage-collected.
        if self.query(&info.path).await?.is_none() {
            return Err(Error::Gone(info.path.clone()));
        }
        let (progress, wire_sent) = self.in_flight.track(&info.path, info.nar_size);
        let staging = self.backend.staging_dir();
        // Written into the cache itself (`file://`): these are the bytes on the wire.
        let on_the_wire = staging.is_some().then(|| backend::wire::Meter {
            limiter: Arc::clone(&self.settings.rate),
            sent: wire_sent,
        });
        let limiter = Arc::clone(&self.settings.rate);
        let dir = staging.unwrap_or_else(|| self.settings.temp_dir.clone());
        std::fs::create_dir_all(&dir).map_err(|source| prepare::Error::Temp {
            file: dir.clone(),
            source,
        })?;
        let (path, compression, level, listing) = (
            info.path.clone(),
            self.settings.compression,
            self.settings.level,
            self.wants_listing(),
        );
        let prepared = self
            .settings
            .prepare_pool
            .spawn_blocking(move || {
                let stages = prepare::Stages {
                    progress: &progress,
                    limiter: &limiter,
                    on_the_wire,
                };
                prepare::prepare(&path, compression, level, &dir, stages, listing)
            })
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
        // Ours first, then the signatures Nix holds (a path substituted from cache.nixos.org keeps its
        // `cache.nixos.org-1` signature), unless the target takes only one.
        let kept = if self
            .backend
            .cannot_store()
            .contains(&backend::documents::Document::ExtraSignatures)
        {
            &[][..]
        } else {
            &info.sigs[..]
        };
        let keys = self.signing_keys();
        narinfo.add_signatures(keys.iter().map(|k| k.as_ref()), kept);
        Ok((narinfo, prepared))
    }

    async fn upload_one(
        &self,
        i: usize,
        narinfo: NarInfo,
        prepared: PreparedNar,
        prep_time: Duration,
        sent: Arc<std::sync::atomic::AtomicU64>,
    ) -> Event {
        let started = Instant::now();
        let nar = NarFile {
            path: &prepared.file,
            size: prepared.file_size,
            sha256: prepared.file_hash,
        };
        let limiter = &self.settings.rate;
        // A held target starts no upload: no request is open while it waits, so no timeout can fail it.
        if limiter.wait_while_held().await.is_err() {
            return Event::Uploaded(i, Err(Error::Cancelled));
        }
        let holds = limiter.holds_begun();
        let meter = backend::wire::Meter {
            limiter: Arc::clone(limiter),
            sent,
        };
        let result = match self
            .put_before_narinfo(&narinfo, prepared.listing.as_deref())
            .await
        {
            Ok(()) => backend::wire::metered(meter, self.backend.upload(&narinfo, nar))
                .await
                .map_err(Error::from),
            Err(e) => Err(e),
        };
        let result = result.map_err(|e| {
            if limiter.is_aborted() {
                Error::Cancelled
            } else if limiter.is_held() || limiter.holds_begun() != holds {
                Error::Held(Box::new(e))
            } else {
                e
            }
        });
        let (nar_size, file_size) = (prepared.nar_size, prepared.file_size);
        match result {
            Ok(()) => {
                // A backend that renamed the file into place owns it now.
                if !prepared.file.exists() {
                    prepared.keep();
                }
                self.observer
                    .narinfo_uploaded(&narinfo.store_path, narinfo.render().len() as u64);
                if let Err(e) = self.put_after_narinfo(&narinfo).await {
                    return Event::Uploaded(i, Err(e));
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
            Err(e) => Event::Uploaded(i, Err(e)),
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

/// A prepared NAR with its signed narinfo and the time preparing took.
type Staged = (NarInfo, PreparedNar, Duration);

/// A finished upload's figures.
#[derive(Debug, Clone, Copy)]
struct Uploaded {
    nar_size: u64,
    file_size: u64,
    duration: Duration,
}

enum Event {
    Prepared(usize, Result<Box<Staged>, Error>),
    Uploaded(usize, Result<Uploaded, Error>),
}
