//! One target's lane through the daemon: its view of the queue, the status its uploader reports, its upload rate
//! and the signals that wake it. Each configured target has one, and its uploader runs on its own, so a target
//! that is down, slow or refusing the token holds up no other.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{watch, Notify};

use tokio_util::sync::CancellationToken;

use super::{EngineStatus, Error, Shared};
use crate::backend::rate::RateLimiter;
use crate::config::Config;
use crate::queue::{self, Queue};
use crate::rate_schedule::{InForce, Rate};
use crate::store_path::StorePath;

/// What the daemon's tasks share about one target.
pub struct TargetLane {
    /// The target's name (`default` for `[target]`).
    pub name: String,
    /// The queue as this target sees it.
    pub queue: Arc<dyn Queue>,
    /// The uploader's view of the target; `send_modify` it to update `status`.
    pub engine: watch::Sender<EngineStatus>,
    /// Notified whenever paths are queued or requeued for this target.
    pub work_available: Arc<Notify>,
    /// Notified when one of the target's token or key files changes.
    pub secrets_changed: Arc<Notify>,
    /// The target's upload rate limit; kept across engine rebuilds, so a reload changes the rate of uploads in
    /// flight instead of restarting them.
    pub rate: Arc<RateLimiter>,
    /// The rate in force, as the schedule last set it, for `status`.
    pub rate_in_force: Mutex<Option<InForce>>,
}

impl TargetLane {
    /// The lane of the target `name` of `config`, on `queue`'s database.
    pub fn new(name: &str, config: &Config, queue: &dyn Queue, hold: bool) -> TargetLane {
        let rate = Arc::new(RateLimiter::new(Rate::Unlimited));
        let in_force = config.named_target(name).map(|target| {
            crate::upload::rate::apply(&rate, target.max_upload_rate, &target.rate_schedule)
        });
        TargetLane {
            name: name.to_owned(),
            queue: queue.for_target(name),
            engine: watch::channel(EngineStatus::initial(hold)).0,
            work_available: Arc::new(Notify::new()),
            secrets_changed: Arc::new(Notify::new()),
            rate,
            rate_in_force: Mutex::new(in_force),
        }
    }

    /// Applies the target's rate settings from `config` at once, for uploads in flight too.
    pub fn apply_rate(&self, config: &Config) {
        let Some(target) = config.named_target(&self.name) else {
            return;
        };
        let in_force =
            crate::upload::rate::apply(&self.rate, target.max_upload_rate, &target.rate_schedule);
        tracing::info!(
            nixpush_target = %self.name,
            "upload rate {} ({})",
            in_force.rate,
            in_force.source
        );
        self.set_in_force(in_force);
    }

    /// Records the rate the schedule set, for `status`.
    pub fn set_in_force(&self, in_force: InForce) {
        *self
            .rate_in_force
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(in_force);
    }

    /// The rate the schedule last set.
    pub fn in_force(&self) -> Option<InForce> {
        *self
            .rate_in_force
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Queues the paths held for targets no longer configured (a renamed or removed `[targets.NAME]`, or
/// `[target]` given a name) for every configured target instead, so nothing queued is lost; a target that
/// already has a path finds it present.
pub(super) fn adopt_unconfigured(shared: &Shared) -> Result<(), Error> {
    let configured: Vec<&str> = shared.lanes.iter().map(|l| l.name.as_str()).collect();
    let mut adopted: std::collections::BTreeMap<String, Vec<StorePath>> = Default::default();
    for (target, entry) in shared.queue.entries_of_every_target()? {
        if !configured.contains(&target.as_str()) {
            adopted.entry(target).or_default().push(entry.path);
        }
    }
    for (target, paths) in &adopted {
        for lane in &shared.lanes {
            lane.queue.enqueue(paths, "adopted", queue::now_ms())?;
        }
        let orphan = shared.queue.for_target(target);
        for path in paths {
            orphan.remove(path)?;
        }
        tracing::warn!(
            paths = paths.len(),
            "{} path(s) were queued for the target {target:?}, which is no longer configured; they are queued \
             for {} instead",
            paths.len(),
            configured.join(", ")
        );
    }
    if !adopted.is_empty() {
        shared.queue.flush()?;
    }
    Ok(())
}

/// Keeps `lane`'s upload rate at what the schedule says; a change wakes its scheduler, which holds or resumes.
pub(super) async fn govern_rate(
    shared: Arc<Shared>,
    lane: Arc<TargetLane>,
    stop: CancellationToken,
) {
    let settings = {
        let (shared, name) = (shared.clone(), lane.name.clone());
        move || {
            let config = shared.config();
            config
                .named_target(&name)
                .map(|t| (t.max_upload_rate, t.rate_schedule.clone()))
                .unwrap_or((crate::rate_schedule::Rate::Unlimited, Vec::new()))
        }
    };
    let changed = {
        let lane = lane.clone();
        move |in_force: &crate::rate_schedule::InForce| {
            lane.set_in_force(*in_force);
            lane.work_available.notify_one();
        }
    };
    crate::upload::rate::govern(Arc::clone(&lane.rate), settings, changed, stop).await;
}
