//! Drives the upload engine from the durable queue: takes due paths, uploads their closures, and writes each
//! outcome back (done, retry with backoff, parked as failed, held back by the target's filters, skipped because
//! garbage-collected).
//!
//! An authentication failure pauses the whole target instead of burning attempts: the paths go back to the queue
//! unchanged, and uploads resume when the token or key file changes (or SIGHUP), or when a probe (after
//! [`AUTH_PROBE_INTERVAL`], then doubling to 5 minutes) finds the target accepting the credentials again. A token or
//! key rotated while uploads run normally is re-read before the next batch. A target that is not ready (offline,
//! full) is probed ever less often and logged only when that changes ([`super::probe`]).
//!
//! Just over 600 lines with its tests (the waits under paused time); the code itself is one loop and one batch.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::{AnyBackend, Backend, Credentials, Kind, Target};
use crate::config::{redact_url, Config};
use crate::metrics::{Counters, Skip};
use crate::priority::Pool;
use crate::queue::{self, Entry, HistoryRecord, Outcome, Queue, State};
use crate::status::{InFlightUpload, TargetState};
use crate::upload::{
    self, retry, Engine, Observer, PathOutcome, PathReport, PresenceMemory, PresentCache,
    RootOutcome, Settings,
};

use super::probe::{LogLine, Probes, Trouble};
use super::{EngineStatus, Shared, TargetLane};

/// How many queued roots one batch takes at most.
const BATCH_LIMIT: usize = 256;
/// How often a target paused for authentication is asked again.
pub const AUTH_PROBE_INTERVAL: Duration = Duration::from_secs(60);
/// How often `status` sees fresh in-flight progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// The queue's present-cache, seen through the engine's trait, for one target.
///
/// Stored answers are keyed by the target's identity, so a configuration that names another cache starts from
/// nothing. Answers given in this process's lifetime are also kept in memory with a monotonic expiry, so a
/// backward wall-clock jump cannot stretch them; a stored expiry further ahead than `ttl` can only come from such a
/// jump and counts as expired.
struct QueuePresence {
    queue: Arc<dyn Queue>,
    ttl_ms: u64,
    /// Prefix of every stored key: a digest of the target's identity.
    target_key: String,
    /// Answers of this lifetime: hash part → when the memory expires.
    answered: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl QueuePresence {
    fn new(queue: Arc<dyn Queue>, ttl_secs: u64, target_identity: &str) -> QueuePresence {
        let digest = crate::hash::Sha256Hash::of(target_identity.as_bytes()).to_hex();
        QueuePresence {
            queue,
            ttl_ms: ttl_secs.saturating_mul(1000),
            target_key: format!("{}:", &digest[..16]),
            answered: std::sync::Mutex::default(),
        }
    }

    fn key(&self, hash_part: &str) -> String {
        format!("{}{hash_part}", self.target_key)
    }
}

impl PresentCache for QueuePresence {
    fn presence(&self, hash_part: &str) -> PresenceMemory {
        let now = std::time::Instant::now();
        let answered = self
            .answered
            .lock()
            .map(|m| m.get(hash_part).is_some_and(|until| *until > now))
            .unwrap_or(false);
        if answered {
            return PresenceMemory::Answered;
        }
        let key = self.key(hash_part);
        let now_ms = queue::now_ms();
        let stored = self.queue.is_known_present(&key, now_ms).unwrap_or(false);
        // Still valid beyond now + ttl: written under a clock that was ahead, so not to be trusted.
        let from_the_future = stored
            && self
                .queue
                .is_known_present(&key, now_ms.saturating_add(self.ttl_ms))
                .unwrap_or(true);
        if stored && !from_the_future {
            PresenceMemory::Remembered
        } else {
            PresenceMemory::Unknown
        }
    }

    fn remember_present(&self, hash_parts: &[&str]) {
        let now = std::time::Instant::now();
        let until = now
            .checked_add(Duration::from_millis(self.ttl_ms))
            .unwrap_or(now + Duration::from_secs(u64::from(u32::MAX)));
        if let Ok(mut answered) = self.answered.lock() {
            answered.retain(|_, expiry| *expiry > std::time::Instant::now());
            answered.extend(hash_parts.iter().map(|h| ((*h).to_owned(), until)));
        }
        let keys: Vec<String> = hash_parts.iter().map(|h| self.key(h)).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let until_ms = queue::now_ms().saturating_add(self.ttl_ms);
        if let Err(e) = self.queue.remember_present(&keys, until_ms) {
            tracing::warn!("cannot remember present paths: {e}");
        }
    }
}

/// Logs every finished path, counts it for `/metrics`, and records the ones that need no retry in the queue's
/// history.
struct DaemonObserver {
    queue: Arc<dyn Queue>,
    /// The target's name, the `target` label of its metrics.
    name: String,
    /// The target URL (password-redacted), for the `target` log field.
    target: String,
    metrics: Arc<Counters>,
}

impl Observer for DaemonObserver {
    fn path_finished(&self, report: &PathReport) {
        upload::log_report(report, Some(&self.target));
        count_finished(&self.metrics, &self.name, report);
        let (outcome, reason) = match &report.outcome {
            PathOutcome::Uploaded => (Outcome::Uploaded, None),
            // Every rebuild's closure is mostly paths the cache already has; listing them would bury the
            // uploads in `status`.
            PathOutcome::AlreadyPresent => return,
            PathOutcome::SkippedUpstream => (Outcome::SkippedUpstream, None),
            PathOutcome::Excluded(reason) => (Outcome::Excluded, Some(reason.clone())),
            PathOutcome::HeldBack(reason) => (Outcome::HeldBack, Some(reason.clone())),
            // Failures are recorded once the scheduler decides between retry and parking.
            PathOutcome::Failed(_) => return,
        };
        record(&*self.queue, report, outcome, reason);
    }

    fn narinfo_uploaded(&self, _path: &crate::store_path::StorePath, bytes: u64) {
        self.metrics.narinfo_uploaded(&self.name, bytes);
    }
}

/// Counts a finished path, the way `status` totals it.
fn count_finished(metrics: &Counters, target: &str, report: &PathReport) {
    match &report.outcome {
        PathOutcome::Uploaded => metrics.uploaded(
            target,
            report.file_size.unwrap_or(0),
            Duration::from_millis(report.duration_ms.unwrap_or(0)),
        ),
        PathOutcome::AlreadyPresent => metrics.skipped(target, Skip::AlreadyPresent),
        PathOutcome::SkippedUpstream => metrics.skipped(target, Skip::Upstream),
        PathOutcome::Excluded(_) => metrics.skipped(target, Skip::Excluded),
        PathOutcome::HeldBack(_) => metrics.skipped(target, Skip::HeldBack),
        // Counted per queued path once the scheduler has the error (`upload_failed`).
        PathOutcome::Failed(_) => {}
    }
}

fn record(queue: &dyn Queue, report: &PathReport, outcome: Outcome, reason: Option<String>) {
    let uploaded = outcome == Outcome::Uploaded;
    let record = HistoryRecord {
        path: report.path.clone(),
        outcome,
        nar_size: uploaded.then_some(report.nar_size),
        file_size: report.file_size,
        duration_ms: report.duration_ms.unwrap_or(0),
        reason,
        finished_at_ms: queue::now_ms(),
    };
    if let Err(e) = queue.record_finished(&record) {
        tracing::warn!(store_path = %report.path, "cannot record history: {e}");
    }
}

/// Why the scheduler cannot build its engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The target is unusable: its token, its signing key or its URL.
    #[error(transparent)]
    Target(#[from] crate::backend::target::Error),
    /// The upload engine cannot talk to upstream caches.
    #[error(transparent)]
    Backend(#[from] crate::backend::Error),
    /// The local store cannot be read.
    #[error(transparent)]
    Store(#[from] crate::pathinfo::Error),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
}

/// The engine and the pieces it was built from.
struct Built {
    /// The daemon's configuration it was built from, to notice a reload.
    source: Arc<Config>,
    /// That configuration as this target's uploader sees it ([`Config::for_target`]).
    config: Arc<Config>,
    engine: Arc<Engine<AnyBackend>>,
    credentials: Credentials,
    /// Where the signing key comes from, to read it again after a change.
    kind: Kind,
    /// The public half of the signing key in use (`name:base64`), to tell a rotated key in the log.
    public_key: std::sync::Mutex<Option<String>>,
}

fn build(
    shared: &Shared,
    lane: &TargetLane,
    source: Arc<Config>,
    pool: &Pool,
) -> Result<Built, Error> {
    let config =
        Arc::new(
            source
                .for_target(&lane.name)
                .ok_or_else(|| crate::config::Error::Invalid {
                    field: format!("targets.{}", lane.name),
                    problem: "is no longer configured; restart the daemon".to_owned(),
                })?,
        );
    let target = Target::from_config(&config)?;
    let store = crate::pathinfo::LocalStore::open(config.store_dir_str(), &config.nix_db)?;
    let public_key = target
        .signing_key
        .as_ref()
        .map(|k| k.public_key().to_string());
    let settings = Settings {
        prepare_pool: pool.clone(),
        rate: Arc::clone(&lane.rate),
        ..Settings::from_config(&config)?
    };
    let engine = Engine::new(
        Arc::new(target.backend),
        Arc::new(store),
        settings,
        target.signing_key,
        Arc::new(QueuePresence::new(
            Arc::clone(&lane.queue),
            config.present_ttl_secs,
            &target.identity,
        )),
        Arc::new(DaemonObserver {
            queue: Arc::clone(&lane.queue),
            name: lane.name.clone(),
            target: target.display_name,
            metrics: Arc::clone(&shared.metrics),
        }),
    )?;
    engine.set_extra_signing_keys(target.extra_signing_keys);
    Ok(Built {
        source,
        config,
        engine: Arc::new(engine),
        credentials: target.credentials,
        kind: target.kind,
        public_key: std::sync::Mutex::new(public_key),
    })
}

fn set_status(lane: &TargetLane, state: TargetState, message: impl Into<String>) {
    let message = message.into();
    lane.engine.send_modify(|s| {
        s.state = state;
        s.message = message;
    });
}

/// Records what the last request to the target showed: whether it answered, and whether it took the credentials
/// (`None` leaves what was known).
fn set_reachability(lane: &TargetLane, reachable: bool, authorized: Option<bool>) {
    lane.engine.send_modify(|s| {
        s.reachable = Some(reachable);
        if authorized.is_some() {
            s.authorized = authorized;
        }
    });
}

/// Runs until `stop`. `secrets_changed` is notified when a token or key file changes.
///
/// NARs are hashed and compressed on `pool`'s threads.
pub async fn run(shared: Arc<Shared>, lane: Arc<TargetLane>, stop: CancellationToken, pool: Pool) {
    let secrets_changed = Arc::clone(&lane.secrets_changed);
    let mut built: Option<Built> = None;
    let mut paused = false;
    // Set when a wait ended because a secret file changed.
    let mut secrets_dirty = false;
    // Set while uploads wait for room in the state directory, so that the wait is logged once.
    let mut state_dir_full = false;
    let mut outages = Outages::default();
    let mut probes = Probes::target();
    let mut auth_probes = Probes::new(AUTH_PROBE_INTERVAL, super::probe::MAX_WAIT);
    // The wait before the next probe of a paused target.
    let mut auth_wait = AUTH_PROBE_INTERVAL;
    // Why the engine could not be built last time, so that the retries stay out of the log.
    let mut build_error: Option<String> = None;
    while !stop.is_cancelled() {
        let source = shared.config();
        // (Re)build on start and after a configuration reload.
        if built
            .as_ref()
            .is_none_or(|b| !Arc::ptr_eq(&b.source, &source))
        {
            match build(&shared, &lane, Arc::clone(&source), &pool) {
                Ok(b) => {
                    if build_error.take().is_some() {
                        tracing::info!("uploads started");
                    }
                    built = Some(b);
                    paused = false;
                }
                Err(e) => {
                    // Tried again every minute: the log says it once per distinct reason.
                    let message = e.to_string();
                    if build_error.as_deref() != Some(message.as_str()) {
                        tracing::error!(nixpush_target = %lane.name, "cannot start uploads: {message}");
                        build_error = Some(message);
                    }
                    set_status(&lane, TargetState::Paused, e.to_string());
                    built = None;
                    wait_for_change(&lane, &stop, &secrets_changed, AUTH_PROBE_INTERVAL).await;
                    continue;
                }
            }
        }
        let Some(current) = built.as_ref() else {
            continue;
        };
        let engine = Arc::clone(&current.engine);
        let config = Arc::clone(&current.config);

        if paused {
            wait_for_probe(&shared, &lane, &source, &stop, &secrets_changed, auth_wait).await;
            if stop.is_cancelled() {
                break;
            }
            reload_secrets(current);
            secrets_dirty = false;
        } else if secrets_dirty || secrets_changed.notified().now_or_never().is_some() {
            // A key or token rotated while uploads ran normally (the change may have come during a batch):
            // the next batch uses the new one.
            reload_secrets(current);
            secrets_dirty = false;
        }
        // Ready the target (nix-cache-info, cache info); this doubles as the auth probe while paused.
        let target = redact_url(&config.target.url);
        match engine.backend().prepare().await {
            Ok(info) => {
                if paused {
                    tracing::info!(
                        nixpush_target = %target,
                        "target accepts the credentials again; resuming uploads"
                    );
                }
                if let Some(down_for) = probes.recovered(tokio::time::Instant::now()) {
                    tracing::info!(
                        nixpush_target = %target,
                        "target ready again after {}; uploads resume",
                        crate::status::human_duration(down_for.as_secs())
                    );
                }
                auth_probes.recovered(tokio::time::Instant::now());
                auth_wait = AUTH_PROBE_INTERVAL;
                paused = false;
                lane.engine.send_modify(|s| {
                    s.reachable = Some(true);
                    s.authorized = Some(true);
                    s.info = Some(info);
                });
            }
            Err(e) if e.is_auth() => {
                if !paused {
                    tracing::error!(
                        nixpush_target = %target,
                        "uploads paused: {e}. Fix the token or key; uploads resume by themselves."
                    );
                }
                paused = true;
                auth_wait = auth_probes
                    .failed(Trouble::Unreachable, None, tokio::time::Instant::now())
                    .wait;
                set_reachability(&lane, true, Some(false));
                set_status(&lane, TargetState::Paused, format!("paused: {e}"));
                continue;
            }
            Err(e) => {
                let trouble = match e.target_fault() {
                    Some(reason) => Trouble::Degraded(reason),
                    None => Trouble::Unreachable,
                };
                let after = probes.failed(trouble, e.retry_after(), tokio::time::Instant::now());
                let next = crate::status::human_duration(after.wait.as_secs());
                match after.log {
                    Some(LogLine::Down) => tracing::warn!(
                        nixpush_target = %target,
                        retry_in_ms = after.wait.as_millis() as u64,
                        "target not ready: {e}; uploads wait, next try in {next} (waits double up to {})",
                        crate::status::human_duration(super::probe::MAX_WAIT.as_secs())
                    ),
                    Some(LogLine::StillDown(down_for)) => tracing::warn!(
                        nixpush_target = %target,
                        retry_in_ms = after.wait.as_millis() as u64,
                        "target still not ready after {}: {e}",
                        crate::status::human_duration(down_for.as_secs())
                    ),
                    None => tracing::debug!(
                        nixpush_target = %target,
                        "target not ready: {e}; next try in {next}"
                    ),
                }
                if let Some(reason) = e.target_fault() {
                    // It answered: full or throttling, not unreachable.
                    lane.engine
                        .send_modify(|s| s.degraded = Some(reason.clone()));
                    set_reachability(&lane, true, None);
                    set_status(&lane, TargetState::Ok, format!("degraded: {reason}"));
                } else {
                    set_reachability(&lane, false, None);
                    set_status(&lane, TargetState::Unreachable, e.to_string());
                }
                secrets_dirty |=
                    wait_for_probe(&shared, &lane, &source, &stop, &secrets_changed, after.wait)
                        .await;
                continue;
            }
        }

        let due = match lane.queue.due(queue::now_ms(), BATCH_LIMIT) {
            Ok(due) => due,
            Err(e) => {
                tracing::error!("cannot read the queue: {e}");
                secrets_dirty |=
                    wait_for_change(&lane, &stop, &secrets_changed, Duration::from_secs(5)).await;
                continue;
            }
        };
        if due.is_empty() {
            set_status(&lane, TargetState::Idle, "queue empty");
            // Nothing waits on the target, so a fault seen earlier holds nothing back; paths waiting out a
            // fault are queued, only not due yet, and keep it shown.
            if lane.queue.next_due_at().is_none() {
                lane.engine.send_modify(|s| s.degraded = None);
            }
            let wait = lane
                .queue
                .next_due_at()
                .map(|at| Duration::from_millis(at.saturating_sub(queue::now_ms())))
                .unwrap_or(Duration::from_secs(3600));
            secrets_dirty |= wait_for_change(&lane, &stop, &secrets_changed, wait).await;
            continue;
        }
        // A rate of 0 holds: no upload starts (so no request can time out waiting); the governor's next change
        // wakes this loop.
        if lane.rate.is_held() {
            set_status(&lane, TargetState::Hold, held_message(&lane));
            secrets_dirty |=
                wait_for_change(&lane, &stop, &secrets_changed, Duration::from_secs(60)).await;
            continue;
        }
        // Uploading writes to the queue (marking paths done, history): wait while the state directory cannot take it.
        if let Err(e) = super::state_dir::check(&config.state_dir) {
            if !state_dir_full {
                tracing::error!("uploads paused: {e}");
                state_dir_full = true;
            }
            set_status(&lane, TargetState::Paused, format!("uploads paused: {e}"));
            secrets_dirty |=
                wait_for_change(&lane, &stop, &secrets_changed, Duration::from_secs(5)).await;
            continue;
        }
        if std::mem::take(&mut state_dir_full) {
            tracing::info!("the state directory has room again; resuming uploads");
        }
        set_status(&lane, TargetState::Ok, "uploading");
        let policy = retry::Policy::with_base(Duration::from_millis(config.target.retry_base_ms));
        let batch_paused = run_batch(
            &shared,
            &lane,
            &engine,
            due,
            &config,
            &policy,
            &stop,
            &mut outages,
        )
        .await;
        if batch_paused {
            paused = true;
        }
    }
}

/// `held by rate_schedule until 18:30 (window 18:00–18:30)`, or `held by max_upload_rate = 0`.
fn held_message(lane: &TargetLane) -> String {
    let in_force = lane.in_force();
    let until = in_force
        .and_then(|f| f.until)
        .map(|t| format!(" until {}", t.format("%H:%M")))
        .unwrap_or_default();
    match in_force.map(|f| f.source) {
        Some(crate::rate_schedule::Source::Window(w)) => {
            format!("held by rate_schedule{until} (window {w})")
        }
        _ => format!("held by max_upload_rate = 0{until}"),
    }
}

/// Re-reads the token and the signing key after a change. Errors keep the old values and are logged, without the
/// secrets themselves (a key is named by its public half).
fn reload_secrets(built: &Built) {
    match built.credentials.reload() {
        Ok(true) => tracing::info!("auth token reloaded"),
        Ok(false) => {}
        Err(e) => tracing::warn!("keeping the previous auth token: {e}"),
    }
    match built.kind.load_signing_key(&built.config) {
        Ok(key) => {
            let public_key = key.as_ref().map(|k| k.public_key().to_string());
            let mut current = built
                .public_key
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *current != public_key {
                tracing::info!(
                    "signing key reloaded; narinfos are now signed by {}",
                    public_key.as_deref().unwrap_or("no key")
                );
                *current = public_key;
            }
            built.engine.set_signing_key(key);
        }
        Err(e) => tracing::warn!("keeping the previous signing key: {e}"),
    }
    match crate::signing::SecretKey::load_all(&built.config.target.signing_key_files) {
        Ok(keys) => built.engine.set_extra_signing_keys(keys),
        Err(e) => tracing::warn!("keeping the previous signing_key_files keys: {e}"),
    }
}

/// Waits until work arrives, secrets change, `timeout` passes, or shutdown. Returns whether a secret file changed.
async fn wait_for_change(
    lane: &TargetLane,
    stop: &CancellationToken,
    secrets_changed: &Notify,
    timeout: Duration,
) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = lane.work_available.notified() => false,
        _ = secrets_changed.notified() => true,
        _ = tokio::time::sleep(timeout) => false,
    }
}

/// Waits `timeout` before the next probe of a target that is not ready. New work does not end the wait (an
/// offline laptop that builds would otherwise probe after every build); a changed secret, a new configuration or
/// shutdown does. Returns whether a secret file changed.
async fn wait_for_probe(
    shared: &Shared,
    lane: &TargetLane,
    config: &Arc<Config>,
    stop: &CancellationToken,
    secrets_changed: &Notify,
    timeout: Duration,
) -> bool {
    let until = tokio::time::Instant::now() + timeout;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() || stop.is_cancelled() || !Arc::ptr_eq(config, &shared.config()) {
            return false;
        }
        if wait_for_change(lane, stop, secrets_changed, left).await {
            return true;
        }
    }
}

/// Batches in a row that met a fault of the whole target: the target's own backoff, apart from the paths'
/// attempts.
#[derive(Debug, Default)]
struct Outages {
    /// Batches whose presence query failed.
    presence_failures: u32,
    /// Batches that met a target fault (full disk, 507, SlowDown).
    target_faults: u32,
}

/// Whether `error` is a transient failure of the target's presence query, which is no path's fault.
fn is_presence_outage(error: &upload::Error) -> bool {
    matches!(error, upload::Error::Presence(_)) && error.is_retryable() && !error.is_auth()
}

/// Uploads one batch and writes every root's outcome back. Returns whether the target must pause.
/// `outages` counts batches in a row that met a fault of the whole target.
#[allow(clippy::too_many_arguments)]
async fn run_batch(
    shared: &Arc<Shared>,
    lane: &Arc<TargetLane>,
    engine: &Arc<Engine<AnyBackend>>,
    due: Vec<Entry>,
    config: &Config,
    policy: &retry::Policy,
    stop: &CancellationToken,
    outages: &mut Outages,
) -> bool {
    let mut entries = due;
    for entry in &mut entries {
        entry.state = State::Uploading;
        entry.updated_at_ms = queue::now_ms();
        if let Err(e) = lane.queue.set(entry) {
            tracing::error!(store_path = %entry.path, "cannot mark uploading: {e}");
        }
    }
    let roots: Vec<_> = entries.iter().map(|e| e.path.clone()).collect();
    let progress = tokio::spawn(report_progress(
        Arc::clone(lane),
        Arc::clone(engine),
        stop.child_token(),
    ));
    let batch_stop = stop.child_token();
    let report = engine.push(&roots, &batch_stop).await;
    progress.abort();
    lane.engine.send_modify(|s| s.in_flight.clear());

    let now = queue::now_ms();
    let target = redact_url(&config.target.url);
    let mut pause = report.auth_failure.is_some();
    // The engine already retried the presence query; when it still fails, the roots wait for the target with a
    // backoff of the target's own, their attempts untouched.
    let outage = report.roots.iter().find_map(|(_, outcome)| match outcome {
        RootOutcome::Failed(e) if is_presence_outage(e) => Some(Arc::clone(e)),
        _ => None,
    });
    let outage_delay = match &outage {
        Some(error) => {
            outages.presence_failures = outages.presence_failures.saturating_add(1);
            let delay = policy.delay(
                outages.presence_failures,
                error.retry_after(),
                rand::random(),
            );
            tracing::warn!(
                nixpush_target = %target,
                retry_in_ms = delay.as_millis() as u64,
                "{error}; trying the batch again in {:.1} s without counting an attempt",
                delay.as_secs_f64()
            );
            set_reachability(lane, false, None);
            set_status(lane, TargetState::Unreachable, error.to_string());
            Some(delay)
        }
        None => {
            outages.presence_failures = 0;
            None
        }
    };
    // A full, read-only or throttling target is no path's fault: its roots wait for the target to heal with a
    // backoff of the target's own, their attempts untouched, and `status` shows the target as degraded.
    let fault = report.roots.iter().find_map(|(_, outcome)| match outcome {
        RootOutcome::Failed(e) => e.target_fault(),
        RootOutcome::Done | RootOutcome::Gone | RootOutcome::HeldBack(_) => None,
    });
    let fault_delay = match &fault {
        Some(reason) => {
            outages.target_faults = outages.target_faults.saturating_add(1);
            let delay = policy.delay(outages.target_faults, None, rand::random());
            tracing::warn!(
                nixpush_target = %target,
                retry_in_ms = delay.as_millis() as u64,
                "target degraded: {reason}; trying again in {:.1} s without counting an attempt",
                delay.as_secs_f64()
            );
            lane.engine
                .send_modify(|s| s.degraded = Some(reason.clone()));
            set_status(lane, TargetState::Ok, format!("degraded: {reason}"));
            Some(delay)
        }
        None => {
            // Healed only once the target took something again: a batch that uploaded nothing (its roots not
            // due yet, or answered from presence alone) says nothing about a full disk.
            let uploaded = report
                .roots
                .iter()
                .any(|(_, outcome)| matches!(outcome, RootOutcome::Done));
            if uploaded {
                if std::mem::take(&mut outages.target_faults) > 0 {
                    tracing::info!(nixpush_target = %target, "target healthy again; uploads resumed");
                }
                lane.engine.send_modify(|s| s.degraded = None);
            }
            None
        }
    };
    for (root, outcome) in report.roots {
        let Some(mut entry) = entries.iter().find(|e| e.path == root).cloned() else {
            continue;
        };
        if let RootOutcome::Failed(error) = &outcome {
            shared.metrics.upload_failed(&lane.name, error.class());
        }
        entry.updated_at_ms = now;
        let result = match outcome {
            RootOutcome::Done => {
                tracing::debug!(store_path = %root, "closure complete");
                finish(shared, lane, &root)
            }
            RootOutcome::Gone => {
                let reason = "garbage-collected before upload".to_owned();
                tracing::info!(store_path = %root, "skipped {root}: {reason}");
                let gone = PathReport {
                    path: root.clone(),
                    outcome: PathOutcome::Failed(reason.clone()),
                    nar_size: 0,
                    file_size: None,
                    duration_ms: None,
                    compression: None,
                };
                shared.metrics.skipped(&lane.name, Skip::Gone);
                record(&*lane.queue, &gone, Outcome::SkippedGone, Some(reason));
                finish(shared, lane, &root)
            }
            // Dropped by the operator while it was uploading: do not bring it back.
            RootOutcome::Failed(_) | RootOutcome::HeldBack(_)
                if matches!(lane.queue.get(&root), Ok(None)) =>
            {
                tracing::info!(store_path = %root, "{root} was dropped from the queue while uploading");
                Ok(())
            }
            // Finished for now without spending an attempt: only other filters, or the reference reaching a
            // cache, can change the answer, so it waits for `nixpush retry` or a new request for the path.
            RootOutcome::HeldBack(reason) => {
                tracing::info!(
                    store_path = %root,
                    nixpush_target = %target,
                    "holding back {root} until `nixpush retry` or a new build of it: {reason}"
                );
                entry.state = State::HeldBack;
                entry.last_error = Some(reason);
                lane.queue.set(&entry)
            }
            RootOutcome::Failed(error) if is_presence_outage(&error) => {
                entry.last_error = Some(error.to_string());
                entry.state = State::Queued;
                let delay = outage_delay.unwrap_or_default();
                entry.next_attempt_at_ms = now + delay.as_millis() as u64;
                lane.queue.set(&entry)
            }
            RootOutcome::Failed(error) if error.target_fault().is_some() => {
                entry.last_error = Some(error.to_string());
                entry.state = State::Queued;
                let delay = fault_delay.unwrap_or_default();
                entry.next_attempt_at_ms = now + delay.as_millis() as u64;
                lane.queue.set(&entry)
            }
            RootOutcome::Failed(error) => {
                entry.last_error = Some(error.to_string());
                if matches!(*error, upload::Error::Cancelled | upload::Error::Held(_))
                    || error.is_auth()
                {
                    // Not the path's fault: back to the queue without spending an attempt.
                    pause |= error.is_auth();
                    entry.state = State::Queued;
                } else {
                    entry.attempts += 1;
                    if !error.is_retryable() || entry.attempts >= config.target.max_attempts {
                        entry.state = State::Failed;
                        tracing::error!(
                            store_path = %root,
                            attempt = entry.attempts,
                            nixpush_target = %target,
                            "giving up on {root} after {} attempt(s): {error}",
                            entry.attempts
                        );
                        let failed = PathReport {
                            path: root.clone(),
                            outcome: PathOutcome::Failed(error.to_string()),
                            nar_size: 0,
                            file_size: None,
                            duration_ms: None,
                            compression: None,
                        };
                        record(
                            &*lane.queue,
                            &failed,
                            Outcome::Failed,
                            Some(error.to_string()),
                        );
                    } else {
                        let delay =
                            policy.delay(entry.attempts, error.retry_after(), rand::random());
                        entry.state = State::Queued;
                        entry.next_attempt_at_ms = now + delay.as_millis() as u64;
                        tracing::warn!(
                            store_path = %root,
                            attempt = entry.attempts,
                            nixpush_target = %target,
                            retry_in_ms = delay.as_millis() as u64,
                            "upload of {root} failed (attempt {}/{}), retrying in {:.1} s: {error}",
                            entry.attempts,
                            config.target.max_attempts,
                            delay.as_secs_f64()
                        );
                    }
                }
                lane.queue.set(&entry)
            }
        };
        if let Err(e) = result {
            tracing::error!(store_path = %root, "cannot update the queue: {e}");
        }
    }
    // Paths parked as failed may now give way to gc_roots_max_bytes.
    shared.gc_roots.queue_changed();
    if pause {
        if let Some(e) = &report.auth_failure {
            tracing::error!(
                nixpush_target = %target,
                "uploads paused: {e}. Fix the token or key; uploads resume by themselves."
            );
            set_reachability(lane, true, Some(false));
            set_status(lane, TargetState::Paused, format!("paused: {e}"));
        }
    }
    let queue = Arc::clone(&lane.queue);
    match tokio::task::spawn_blocking(move || queue.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("cannot flush the queue: {e}"),
        Err(e) => tracing::error!("queue flush task failed: {e}"),
    }
    pause
}

/// Takes a finished path out of the queue and releases its GC root.
fn finish(
    shared: &Shared,
    lane: &TargetLane,
    root: &crate::store_path::StorePath,
) -> Result<(), queue::Error> {
    lane.queue.remove(root)?;
    shared.gc_roots.entry_finished(root, &*lane.queue);
    Ok(())
}

/// Copies the engine's in-flight view into the status every [`PROGRESS_INTERVAL`].
async fn report_progress(
    lane: Arc<TargetLane>,
    engine: Arc<Engine<AnyBackend>>,
    stop: CancellationToken,
) {
    loop {
        let now_secs = queue::now_ms() / 1000;
        let in_flight: Vec<InFlightUpload> = engine
            .in_flight()
            .into_iter()
            .map(|f| InFlightUpload {
                target: None,
                path: f.path,
                started_at: now_secs.saturating_sub(f.elapsed_ms / 1000),
                nar_bytes_done: f.nar_done,
                nar_size: Some(f.nar_size),
                phase: Some(f.phase.to_owned()),
                wire_bytes_done: f.wire_done,
                file_size: f.file_size,
            })
            .collect();
        lane.engine
            .send_modify(|s: &mut EngineStatus| s.in_flight = in_flight);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROGRESS_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;
    use crate::queue::SqliteQueue;

    fn shared() -> (tempfile::TempDir, Arc<Shared>) {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: tmp.path().join("state"),
            ..Config::default()
        };
        let queue: Arc<dyn Queue> = Arc::new(SqliteQueue::temporary().unwrap());
        (tmp, Shared::new(config, queue, false))
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_target_is_probed_again_after_the_interval() {
        let (_tmp, shared) = shared();
        let (stop, secrets) = (CancellationToken::new(), Notify::new());
        let started = Instant::now();
        let lane = &shared.lanes[0];
        let changed = wait_for_change(lane, &stop, &secrets, AUTH_PROBE_INTERVAL).await;
        assert!(!changed);
        assert_eq!(started.elapsed(), AUTH_PROBE_INTERVAL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rotated_secret_or_new_work_ends_the_wait_at_once() {
        let (_tmp, shared) = shared();
        let (stop, secrets) = (CancellationToken::new(), Notify::new());
        let started = Instant::now();
        let lane = &shared.lanes[0];
        secrets.notify_one();
        assert!(wait_for_change(lane, &stop, &secrets, AUTH_PROBE_INTERVAL).await);
        lane.work_available.notify_one();
        assert!(!wait_for_change(lane, &stop, &secrets, AUTH_PROBE_INTERVAL).await);
        stop.cancel();
        assert!(!wait_for_change(lane, &stop, &secrets, AUTH_PROBE_INTERVAL).await);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[test]
    fn only_transient_presence_failures_are_outages() {
        let status = |code| {
            upload::Error::Presence(crate::backend::Error::Status {
                method: "HEAD".into(),
                url: "u".into(),
                code,
                retry_after: None,
                detail: String::new(),
            })
        };
        assert!(is_presence_outage(&status(503)));
        assert!(!is_presence_outage(&status(404)));
        let refused = upload::Error::Presence(crate::backend::Error::Unauthorized {
            url: "u".into(),
            code: 401,
            detail: String::new(),
        });
        assert!(!is_presence_outage(&refused));
        let upload = upload::Error::Backend(crate::backend::Error::Timeout { url: "u".into() });
        assert!(!is_presence_outage(&upload));
    }

    // See: #15
    #[test]
    fn presence_is_per_target_per_lifetime_and_ignores_stored_times_from_the_future() {
        let dir = tempfile::tempdir().unwrap();
        let queue: Arc<dyn Queue> =
            Arc::new(SqliteQueue::open(&dir.path().join("queue.sqlite3")).unwrap());
        let first = QueuePresence::new(Arc::clone(&queue), 3600, "file:///a");
        assert_eq!(first.presence("h1"), PresenceMemory::Unknown);
        first.remember_present(&["h1"]);
        assert_eq!(first.presence("h1"), PresenceMemory::Answered);

        // A later daemon (a new lifetime) on the same target remembers, but asks again where it matters.
        let later = QueuePresence::new(Arc::clone(&queue), 3600, "file:///a");
        assert_eq!(later.presence("h1"), PresenceMemory::Remembered);
        // Another target starts from nothing.
        let other = QueuePresence::new(Arc::clone(&queue), 3600, "file:///b");
        assert_eq!(other.presence("h1"), PresenceMemory::Unknown);

        // An expiry further ahead than the TTL was written under a clock that has since jumped back.
        let key = later.key("h2");
        let far = queue::now_ms() + 10 * 3600 * 1000;
        queue.remember_present(&[&key], far).unwrap();
        assert_eq!(later.presence("h2"), PresenceMemory::Unknown);
    }
}
