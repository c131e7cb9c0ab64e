//! The answers to each request on the hook socket: `enqueue` (validate, resolve, store durably, then ack),
//! `status`, `list`, `retry`, `drop` and the rest of the control commands, with the checks on who may send them.

use crate::metrics::HookResult;
use crate::protocol::{
    EntryState, ErrorKind, QueueEntry, Request, Response, MAX_LIST_PAGE, MAX_REFUSALS_SHOWN,
};
use crate::queue::{Queue, State};
use crate::store_path::StorePath;

use super::super::auth::{self, Peer};
use super::super::{intake, resolve, Shared};

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error {
        kind,
        message: message.into(),
    }
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!("request failed: {e}");
    error(ErrorKind::Internal, e.to_string())
}

/// Answers one request.
pub async fn handle(request: Request, peer: Peer, shared: &Shared) -> Response {
    let config = shared.config();
    let denied = || auth::check(peer.uid, peer.gid, &config);
    match request {
        Request::Status => match shared.report() {
            Ok(report) => Response::Status(Box::new(report)),
            Err(e) => internal(e),
        },
        Request::List {
            after,
            limit,
            target,
        } => {
            let limit = limit.unwrap_or(MAX_LIST_PAGE).clamp(1, MAX_LIST_PAGE);
            let lanes = match shared.lanes_named(target.as_deref()) {
                Ok(lanes) => lanes,
                Err(message) => return error(ErrorKind::Refused, message),
            };
            match list_page(&lanes, after.as_deref(), limit) {
                Ok((entries, next)) => Response::List { next, entries },
                Err(e) => internal(e),
            }
        }
        Request::Enqueue {
            drv_path,
            out_paths,
            source,
        } => {
            let request = match admit(drv_path, out_paths, &source, peer, shared) {
                Ok(request) => request,
                Err(answer) => return answer,
            };
            let (resolved, enqueued) = shared.take_request(request).await;
            answer_enqueue(&resolved, enqueued, shared)
        }
        Request::Retry { paths, all, target } => {
            if let Err(reason) = denied() {
                return error(ErrorKind::PermissionDenied, reason);
            }
            // A write the filesystem refuses would break the queue until a restart.
            if let Err(e) = crate::daemon::state_dir::check(&config.state_dir) {
                return internal(e);
            }
            let selected = if all {
                None
            } else {
                match parse_all(&paths, config.store_dir_str()) {
                    Ok(paths) => Some(paths),
                    Err(message) => return error(ErrorKind::Refused, message),
                }
            };
            let lanes = match shared.lanes_named(target.as_deref()) {
                Ok(lanes) => lanes,
                Err(message) => return error(ErrorKind::Refused, message),
            };
            let now = crate::queue::now_ms();
            let mut retried = Vec::new();
            let mut requeued = Vec::new();
            for lane in &lanes {
                let queue = &*lane.queue;
                let done = queue
                    .retry_failed(selected.as_deref(), now)
                    .and_then(|again| {
                        let moved = bring_forward(queue, selected.as_deref(), now)?;
                        Ok((again, moved))
                    });
                match done {
                    Ok((again, moved)) => {
                        if !again.is_empty() || !moved.is_empty() {
                            lane.work_available.notify_one();
                        }
                        for path in again.iter().chain(&moved) {
                            tracing::info!(
                                store_path = %path,
                                nixpush_target = %lane.name,
                                "requeued by retry"
                            );
                        }
                        retried.extend(again.iter().chain(&moved).cloned());
                        requeued.extend(again);
                    }
                    Err(e) => return internal(e),
                }
            }
            retried.sort();
            retried.dedup();
            requeued.sort();
            requeued.dedup();
            shared.reroot_retried(&requeued).await;
            if let Err(e) = shared.commit.make_durable().await {
                return internal(e);
            }
            Response::Changed {
                paths: retried.iter().map(|p| p.to_string()).collect(),
            }
        }
        Request::Drop { path, target } => {
            if let Err(reason) = denied() {
                return error(ErrorKind::PermissionDenied, reason);
            }
            // A write the filesystem refuses would break the queue until a restart.
            if let Err(e) = crate::daemon::state_dir::check(&config.state_dir) {
                return internal(e);
            }
            let path = match parse_all(&[path], config.store_dir_str()) {
                Ok(mut paths) => paths.remove(0),
                Err(message) => return error(ErrorKind::Refused, message),
            };
            let lanes = match shared.lanes_named(target.as_deref()) {
                Ok(lanes) => lanes,
                Err(message) => return error(ErrorKind::Refused, message),
            };
            let mut removed = false;
            for lane in &lanes {
                match lane.queue.remove(&path) {
                    Ok(Some(_)) => {
                        tracing::info!(
                            store_path = %path,
                            nixpush_target = %lane.name,
                            "dropped from the queue"
                        );
                        removed = true;
                    }
                    Ok(None) => {}
                    Err(e) => return internal(e),
                }
            }
            if let Err(e) = shared.commit.make_durable().await {
                return internal(e);
            }
            shared.gc_roots.entry_finished(&path, &*shared.queue);
            Response::Changed {
                paths: removed.then(|| path.to_string()).into_iter().collect(),
            }
        }
    }
}

/// The intake request for an `enqueue` from `peer`, or the answer refusing it (recorded and counted) when `peer`
/// may not enqueue.
pub(super) fn admit(
    drv_path: Option<String>,
    out_paths: Vec<String>,
    source: &str,
    peer: Peer,
    shared: &Shared,
) -> Result<intake::Request, Response> {
    if let Err(reason) = auth::check(peer.uid, peer.gid, &shared.config()) {
        let input = drv_path.unwrap_or_else(|| out_paths.join(" "));
        shared.refuse(&input, &reason, peer.uid, "socket");
        shared.metrics.hook_request(HookResult::Refused);
        return Err(error(ErrorKind::PermissionDenied, reason));
    }
    Ok(intake::Request {
        drv_path,
        out_paths,
        source: source.chars().take(32).collect(),
        peer_uid: peer.uid,
        via: "socket",
    })
}

/// The answer to an `enqueue` once it is taken: the ack, or why nothing was queued. Counted in the metrics.
pub(super) fn answer_enqueue(
    resolved: &resolve::Resolved,
    enqueued: Result<crate::queue::Enqueued, crate::daemon::Error>,
    shared: &Shared,
) -> Response {
    let refused = refusal_messages(&resolved.refused);
    let answer = match enqueued {
        Ok(_) if resolved.paths.is_empty() => error(ErrorKind::Refused, refused.join("; ")),
        Ok(enqueued) => Response::Ack {
            accepted: enqueued.queued.iter().map(|p| p.to_string()).collect(),
            duplicate: enqueued.duplicate.len(),
            refused,
        },
        Err(e) => internal(e),
    };
    shared.metrics.hook_request(match &answer {
        Response::Ack { .. } => HookResult::Acked,
        Response::Error {
            kind: ErrorKind::Refused,
            ..
        } => HookResult::Refused,
        _ => HookResult::Error,
    });
    answer
}

/// One page of the entries of `lanes`, in lane then path order, after the cursor `after`, and the cursor of the
/// next page when there may be one. With one lane the cursor is the last path (as it always was); with several,
/// `NAME PATH` (neither holds a space).
fn list_page(
    lanes: &[std::sync::Arc<crate::daemon::TargetLane>],
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<QueueEntry>, Option<String>), crate::queue::Error> {
    let (start_lane, mut after_path) = match after.and_then(|a| a.split_once(' ')) {
        Some((name, path)) => (Some(name), Some(path)),
        None => (None, after),
    };
    let skip = start_lane
        .and_then(|name| lanes.iter().position(|l| l.name == name))
        .unwrap_or(0);
    let mut entries = Vec::new();
    let mut last = None;
    for lane in &lanes[skip..] {
        let page = lane.queue.list(after_path.take(), limit - entries.len())?;
        for entry in page {
            last = Some((lane.name.clone(), entry.path.to_string()));
            let mut entry = QueueEntry::from(entry);
            entry.target = lane.name.clone();
            entries.push(entry);
        }
        if entries.len() == limit {
            break;
        }
    }
    let next = (entries.len() == limit)
        .then_some(last)
        .flatten()
        .map(|(name, path)| {
            if lanes.len() == 1 {
                path
            } else {
                format!("{name} {path}")
            }
        });
    Ok((entries, next))
}

/// Makes queued paths that wait out a backoff due now (an operator who says "retry" means now); their attempt
/// counts stay.
fn bring_forward(
    queue: &dyn Queue,
    selected: Option<&[StorePath]>,
    now_ms: u64,
) -> Result<Vec<StorePath>, crate::queue::Error> {
    let candidates = match selected {
        Some(paths) => {
            let mut found = Vec::new();
            for path in paths {
                found.extend(queue.get(path)?);
            }
            found
        }
        None => queue.entries()?,
    };
    let mut moved = Vec::new();
    for mut entry in candidates {
        if entry.state == State::Queued && entry.next_attempt_at_ms > now_ms {
            entry.next_attempt_at_ms = now_ms;
            entry.updated_at_ms = now_ms;
            queue.set(&entry)?;
            moved.push(entry.path);
        }
    }
    Ok(moved)
}

/// The refusals as clients see them, capped so an answer stays small whatever the request held.
fn refusal_messages(refused: &[resolve::Refusal]) -> Vec<String> {
    let mut messages: Vec<String> = refused
        .iter()
        .take(MAX_REFUSALS_SHOWN)
        .map(|r| r.message())
        .collect();
    if refused.len() > MAX_REFUSALS_SHOWN {
        messages.push(format!(
            "and {} more refused paths (see `nixpush status`)",
            refused.len() - MAX_REFUSALS_SHOWN
        ));
    }
    messages
}

/// Parses store paths named by an operator (they need not exist any more).
fn parse_all(inputs: &[String], store_dir: &str) -> Result<Vec<StorePath>, String> {
    inputs
        .iter()
        .map(|input| {
            StorePath::parse(input, store_dir).map_err(|e| format!("refused {input}: {e}"))
        })
        .collect()
}

/// The queue's record as the wire sends it.
impl From<crate::queue::Entry> for QueueEntry {
    fn from(entry: crate::queue::Entry) -> QueueEntry {
        QueueEntry {
            path: entry.path,
            state: match entry.state {
                State::Queued => EntryState::Queued,
                State::Uploading => EntryState::Uploading,
                State::Failed => EntryState::Failed,
                State::HeldBack => EntryState::HeldBack,
            },
            attempts: entry.attempts,
            next_attempt_at_ms: entry.next_attempt_at_ms,
            last_error: entry.last_error,
            enqueued_at_ms: entry.enqueued_at_ms,
            updated_at_ms: entry.updated_at_ms,
            source: entry.source,
            target: crate::config::DEFAULT_TARGET.to_owned(),
        }
    }
}
