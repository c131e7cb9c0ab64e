//! One target's lane through the daemon: its view of the queue, the status its uploader reports, its upload rate
//! and the signals that wake it. Each configured target has one, and its uploader runs on its own, so a target
//! that is down, slow or refusing the token holds up no other.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{watch, Notify};

use super::EngineStatus;
use crate::backend::rate::RateLimiter;
use crate::config::Config;
use crate::queue::Queue;
use crate::rate_schedule::{InForce, Rate};

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
