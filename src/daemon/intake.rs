//! A request to queue paths, from what the client sent to a durable ack, on the calling thread: the paths checked
//! against Nix's database, the refusals recorded, every target's entry written, the paths rooted, and the
//! fdatasync that covers it all. [`Intake::take_all`] takes several at once with one commit: the socket's accept
//! threads answer every hook waiting that way, and the runtime's handler and the spool importer take one at a
//! time on a blocking thread.
use std::collections::BTreeSet;
use std::sync::Arc;

use crate::config::Config;
use crate::gc_roots::GcRoots;
use crate::queue::{self, Enqueued, Queue, RefusedRecord};
use crate::store_path::StorePath;

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

/// A request whose entries are written and not yet known to be on disk.
struct Staged<'a> {
    lanes: Vec<&'a Arc<TargetLane>>,
    queued: BTreeSet<StorePath>,
}

impl Intake {
    /// Resolves `request` and queues what it names durably. Blocks: call it on a blocking thread of the runtime.
    pub fn take(&self, request: &Request) -> (Resolved, Result<Enqueued, Error>) {
        let mut taken = self.take_all(std::slice::from_ref(request));
        taken.after_ack();
        taken.answers.pop().expect("one answer per request")
    }

    /// [`Intake::take`] for several requests at once: every request is resolved and written, then one commit
    /// makes them all durable. One answer per request, in order; a request that fails does not fail the others,
    /// a commit that fails fails them all. The caller answers the clients, then calls [`Taken::after_ack`].
    pub fn take_all(&self, requests: &[Request]) -> Taken {
        let staged: Vec<_> = requests
            .iter()
            .map(|request| {
                let resolved = self.resolver.resolve(
                    request.drv_path.as_deref(),
                    &request.out_paths,
                    &self.config,
                );
                let staged = self.stage(&resolved, request);
                (resolved, staged)
            })
            .collect();
        let committed = if staged.iter().any(|(_, staged)| staged.is_ok()) {
            self.commit.make_durable_blocking()
        } else {
            Ok(())
        };
        let mut taken = Taken {
            answers: Vec::with_capacity(requests.len()),
            logged: Vec::new(),
            woken: Vec::new(),
        };
        for ((resolved, staged), request) in staged.into_iter().zip(requests) {
            let enqueued = staged.and_then(|staged| {
                committed.clone()?;
                Ok(taken.finish(&resolved, request, staged))
            });
            taken.answers.push((resolved, enqueued));
        }
        taken
    }

    /// Records the refusals and writes the accepted paths' entries for every target; the caller's commit makes
    /// them durable.
    fn stage(&self, resolved: &Resolved, request: &Request) -> Result<Staged<'_>, Error> {
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
        Ok(Staged {
            lanes: woken,
            queued,
        })
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

/// The answers of [`Intake::take_all`], and what is left to do once the clients have them: logging each queued
/// path and waking the targets with new work. Neither is needed for the ack, and both take the answering thread's
/// time (a log write per path, a wake-up of the runtime), so hooks are answered first.
#[must_use = "call after_ack once the clients are answered"]
pub struct Taken {
    /// One answer per request, in order.
    pub answers: Vec<(Resolved, Result<Enqueued, Error>)>,
    /// Per durable request: the paths newly queued and already queued, who sent them and how.
    logged: Vec<(Vec<StorePath>, Vec<StorePath>, String, &'static str)>,
    woken: Vec<Arc<TargetLane>>,
}

impl Taken {
    /// What a durable request answers: which paths are newly queued and which were already.
    fn finish(&mut self, resolved: &Resolved, request: &Request, staged: Staged<'_>) -> Enqueued {
        let (queued, duplicate): (Vec<_>, Vec<_>) = resolved
            .paths
            .iter()
            .cloned()
            .partition(|p| staged.queued.contains(p));
        self.logged.push((
            queued.clone(),
            duplicate.clone(),
            request.source.clone(),
            request.via,
        ));
        for lane in staged.lanes {
            if !self.woken.iter().any(|woken| Arc::ptr_eq(woken, lane)) {
                self.woken.push(Arc::clone(lane));
            }
        }
        Enqueued { queued, duplicate }
    }

    /// Logs the queued paths and wakes the targets that have new work.
    pub fn after_ack(&mut self) {
        for (queued, duplicate, source, via) in self.logged.drain(..) {
            for path in &queued {
                tracing::info!(store_path = %path, source, via, "queued");
            }
            for path in &duplicate {
                tracing::debug!(store_path = %path, source, via, "already queued");
            }
        }
        for lane in self.woken.drain(..) {
            lane.work_available.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::daemon::server::tests::fixture;

    use super::*;

    #[test]
    fn requests_taken_together_share_one_commit_and_keep_their_own_answers() {
        let f = fixture();
        let request = |paths: &[&str]| Request {
            drv_path: None,
            out_paths: paths.iter().map(|p| p.to_string()).collect(),
            source: "hook".into(),
            peer_uid: Some(0),
            via: "socket",
        };
        let requests = [
            request(&[&f.good]),
            request(&[&f.good]),
            request(&["/tmp/x"]),
        ];
        let mut taken = f.shared.intake().take_all(&requests);
        assert_eq!(f.sqlite.commit_stats().commits, 1);
        let answers: Vec<_> = taken
            .answers
            .iter()
            .map(|(resolved, enqueued)| {
                let enqueued = enqueued.as_ref().unwrap();
                (
                    resolved.refused.len(),
                    enqueued.queued.len(),
                    enqueued.duplicate.len(),
                )
            })
            .collect();
        assert_eq!(answers, [(0, 1, 0), (0, 0, 1), (1, 0, 0)]);
        assert_eq!(f.shared.queue.refused_total().unwrap(), 1);

        // The target with new work is woken once the answers are out, not before.
        let lane = &f.shared.lanes[0];
        let woken = || {
            let notified = lane.work_available.notified();
            futures_util::FutureExt::now_or_never(notified).is_some()
        };
        assert!(!woken(), "woken before the answers were sent");
        taken.after_ack();
        assert!(woken(), "not woken after the answers");
    }
}
