//! The upload engine: a batch of requested store paths to a binary cache, closure first, in dependency order.
//!
//! For one batch the engine
//! 1. expands the closure of every requested root (the local store's references, topologically sorted);
//! 2. drops excluded paths, paths known to be present (remembered with an expiry), paths the target already has
//!    (one batched `missing` query) and paths an upstream cache serves, and holds back paths that reference an
//!    excluded path no cache has ([`filter`]);
//! 3. streams each remaining path into a compressed NAR file ([`prepare`]) on up to `workers` blocking threads;
//! 4. uploads each path's NAR as soon as it is prepared, and its signed narinfo only once its NAR and all its
//!    references' narinfos are in the cache, so a consumer never sees a narinfo whose NAR or references are
//!    missing.
//!
//! NAR preparation runs ahead of uploads, which keeps both cores busy along a chain of dependencies, but at most
//! `2 × workers` prepared NARs wait on disk at once. The lowest unfinished path in topological order always has
//! its references done, so it may start even when that limit is reached: the batch cannot deadlock.
//!
//! This file holds the [`Engine`] and its [`Settings`]; the rest of the work is split by concern:
//! `pipeline` prepares and uploads in dependency order, [`order`] decides what may start, [`presence`] asks what the target and upstreams hold, [`prepare`] makes
//! the NAR file, [`report`] tells of outcomes, [`retry`] times the retries, and `error` classifies failures.

mod documents;
mod error;
pub mod failure_class;
pub mod filter;
mod in_flight;
pub mod order;
mod pipeline;
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

/// A finished upload's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Uploaded {
    pub(crate) nar_size: u64,
    pub(crate) file_size: u64,
    pub(crate) duration: Duration,
}
