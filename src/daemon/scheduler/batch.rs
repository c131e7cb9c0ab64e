//! One batch: mark the roots uploading, push them, and write each root's outcome back (done, retry with
//! backoff, parked, held back, gone), with the target's own backoff for faults that are no path's fault.

use super::*;

/// Batches in a row that met a fault of the whole target: the target's own backoff, apart from the paths'
/// attempts.
#[derive(Debug, Default)]
pub(super) struct Outages {
    /// Batches whose presence query failed.
    presence_failures: u32,
    /// Batches that met a target fault (full disk, 507, SlowDown).
    target_faults: u32,
}

/// Whether `error` is a transient failure of the target's presence query, which is no path's fault.
pub(super) fn is_presence_outage(error: &upload::Error) -> bool {
    matches!(error, upload::Error::Presence(_)) && error.is_retryable() && !error.is_auth()
}

/// Uploads one batch and writes every root's outcome back. Returns whether the target must pause.
/// `outages` counts batches in a row that met a fault of the whole target.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_batch(
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
