//! A request to queue paths, from what the client sent to a durable ack, on one blocking thread: the paths checked
//! against Nix's database, the refusals recorded, every target's entry written, the paths rooted, and the
//! fdatasync that covers it all. The hook waits for one hand-off from the runtime to that thread and one back,
//! rather than one per lookup and write; each hand-off costs a wake-up and two context switches, which is most of
//! what an ack costs beyond its sync.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::config::Config;
use crate::gc_roots::GcRoots;
use crate::queue::{self, Enqueued, Queue, RefusedRecord};

use super::commit::GroupCommit;
use super::lane::TargetLane;
use super::resolve::{Resolved, Resolver};
use super::{state_dir, Error};

/// What a client asked to queue, and who asked.
#[derive(Debug, Clone)]
pub struct Request {
    /// The derivation whose outputs to queue, when `out_paths` is empty.
    pub drv_path: Option<String>,
    /// The paths to queue.
    pub out_paths: Vec<String>,
    /// Who is sending (`hook`, `push`, …), shortened to what the queue keeps.
    pub source: String,
    /// The client's uid, for refusal records.
    pub peer_uid: Option<u32>,
    /// How it arrived: `socket` or `spool`.
    pub via: &'static str,
}

/// What taking a request needs from the daemon's shared state; cheap to clone onto a blocking thread.
#[derive(Clone)]
pub struct Intake {
    pub(super) config: Arc<Config>,
    pub(super) queue: Arc<dyn Queue>,
    pub(super) lanes: Vec<Arc<TargetLane>>,
    pub(super) gc_roots: Arc<GcRoots>,
    pub(super) commit: GroupCommit,
    pub(super) resolver: Resolver,
}

impl Intake {
    /// Resolves `request` and queues what it names durably. Blocks: call it on a blocking thread of the runtime.
    pub fn take(&self, request: &Request) -> (Resolved, Result<Enqueued, Error>) {
        let resolved = self.resolver.resolve(
            request.drv_path.as_deref(),
            &request.out_paths,
            &self.config,
        );
        let enqueued = self.enqueue(&resolved, request);
        (resolved, enqueued)
    }

    /// Records the refusals, queues the accepted paths for every target and returns once both are on disk.
    fn enqueue(&self, resolved: &Resolved, request: &Request) -> Result<Enqueued, Error> {
        if let Some(reason) = &resolved.unchecked {
            return Err(Error::Unchecked(reason.clone()));
        }
        // Before any write: a full filesystem would fail the commit and every write until space returns.
        state_dir::check(&self.config.state_dir)?;
        for refusal in &resolved.refused {
            self.refuse(
                &refusal.input,
                &refusal.reason,
                request.peer_uid,
                request.via,
            );
        }
        let now = queue::now_ms();
        let mut queued = BTreeSet::new();
        let mut woken = Vec::new();
        // Every target gets its own entry; one commit covers them all.
        for lane in &self.lanes {
            let enqueued = lane.queue.enqueue(&resolved.paths, &request.source, now)?;
            if !enqueued.queued.is_empty() {
                woken.push(lane);
            }
            queued.extend(enqueued.queued);
        }
        // Before the ack, while the hook (and so the build's temporary root in Nix) still waits for it.
        self.gc_roots.protect(&resolved.paths);
        self.commit.make_durable_blocking()?;
        let (queued, duplicate): (Vec<_>, Vec<_>) = resolved
            .paths
            .iter()
            .cloned()
            .partition(|p| queued.contains(p));
        let (source, via) = (request.source.as_str(), request.via);
        for path in &queued {
            tracing::info!(store_path = %path, source, via, "queued");
        }
        for path in &duplicate {
            tracing::debug!(store_path = %path, source, via, "already queued");
        }
        for lane in woken {
            lane.work_available.notify_one();
        }
        Ok(Enqueued { queued, duplicate })
    }

    /// Records and logs a refusal; written to disk by the next commit.
    pub fn refuse(&self, input: &str, reason: &str, peer_uid: Option<u32>, via: &str) {
        let record = RefusedRecord::new(input, reason, peer_uid, via, queue::now_ms());
        tracing::warn!(store_path = %record.input, peer_uid, via, "refused: {reason}");
        if let Err(e) = state_dir::check(&self.config.state_dir) {
            // Logged only: a write the filesystem refuses would break the queue until a restart.
            tracing::warn!("not recording the refusal: {e}");
            return;
        }
        if let Err(e) = self.queue.record_refused(&record) {
            tracing::error!("cannot record a refusal: {e}");
        }
    }
}
