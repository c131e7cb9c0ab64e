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
//! The loop lives here; `batch` runs one batch, `presence` and `observer` are what the engine is built with.

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

mod batch;
mod observer;
mod presence;
#[cfg(test)]
mod tests;

#[cfg(test)]
use batch::is_presence_outage;
use batch::{run_batch, Outages};
use observer::{record, DaemonObserver};
use presence::QueuePresence;

/// How many queued roots one batch takes at most.
const BATCH_LIMIT: usize = 256;
/// How often a target paused for authentication is asked again.
pub const AUTH_PROBE_INTERVAL: Duration = Duration::from_secs(60);
/// How often `status` sees fresh in-flight progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

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
