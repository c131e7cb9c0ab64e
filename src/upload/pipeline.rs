//! The second half of a batch: prepare NARs ahead, send them with bounded parallelism, and let each path's
//! narinfo be written once its references' are in the cache; [`super::order::Order`] decides what may start.

use super::*;

/// A prepared NAR with its signed narinfo and the time preparing took.
type Staged = (NarInfo, PreparedNar, Duration);

/// What uploading one prepared path takes.
struct UploadJob {
    narinfo: NarInfo,
    prepared: PreparedNar,
    prep_time: Duration,
    /// Bytes of the NAR on the wire so far, for progress.
    sent: Arc<std::sync::atomic::AtomicU64>,
    gate: backend::NarinfoGate,
}

enum Event {
    Prepared(usize, Result<Box<Staged>, Error>),
    /// The path's NAR is in the cache (`false`: its upload ended before that).
    Stored(usize, bool),
    Uploaded(usize, Result<Uploaded, Error>),
}

impl<B: Backend + 'static> Engine<B> {
    /// Prepares and uploads `paths` (topologically sorted) with bounded parallelism, each narinfo after its
    /// references'; the [`Order`] decides what may start.
    pub(super) async fn upload_in_order(
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
        // NARs prepared and waiting for an upload slot.
        let mut staged: HashMap<usize, Box<Staged>> = HashMap::new();
        // What lets each uploading path write its narinfo; dropped, the narinfo is never written.
        let mut openers: HashMap<usize, backend::gate::Opener> = HashMap::new();
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
                openers.remove(&i);
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
                        let (gate, stored, opener) = backend::NarinfoGate::closed();
                        openers.insert(i, opener);
                        tasks.push(
                            Box::pin(async move { Event::Stored(i, stored.wait().await) })
                                as std::pin::Pin<
                                    Box<dyn std::future::Future<Output = _> + Send + '_>,
                                >,
                        );
                        let upload = UploadJob {
                            narinfo,
                            prepared,
                            prep_time,
                            sent,
                            gate,
                        };
                        tasks.push(Box::pin(self.upload_one(i, upload)));
                    }
                    order::Start::Publish(i) => {
                        if let Some(opener) = openers.remove(&i) {
                            opener.open();
                        }
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
                Event::Stored(i, true) => order.stored(i),
                Event::Stored(_, false) => {}
                // Its result is in already: a reference failed, and dropping its gate ended the upload.
                Event::Uploaded(i, Err(_)) if order.is_finished(i) => {
                    self.in_flight.untrack(&paths[i].path);
                }
                Event::Prepared(i, Err(e)) | Event::Uploaded(i, Err(e)) => {
                    order.failed(i);
                    openers.remove(&i);
                    self.in_flight.untrack(&paths[i].path);
                    let e = Arc::new(e);
                    if e.is_auth() {
                        // Nothing else can succeed until the credentials change.
                        for j in order.fail_pending() {
                            staged.remove(&j);
                            openers.remove(&j);
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

    async fn upload_one(&self, i: usize, job: UploadJob) -> Event {
        let UploadJob {
            narinfo,
            prepared,
            prep_time,
            sent,
            gate,
        } = job;
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
            Ok(()) => {
                let upload = self.backend.upload_when(
                    backend::NarUpload {
                        narinfo: &narinfo,
                        nar,
                    },
                    gate,
                );
                backend::wire::metered(meter, upload)
                    .await
                    .map_err(Error::from)
            }
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
