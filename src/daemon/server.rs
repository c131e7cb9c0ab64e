//! The accept loop and the per-connection handler for the hook socket.
//!
//! Each connection gets `client_timeout_ms` to deliver each request. A malformed, oversized or late request is
//! answered with an error naming the problem, logged, and the connection closed; the loop keeps serving everyone
//! else. The handler takes any `AsyncRead + AsyncWrite`, so tests drive it over `tokio::io::duplex`.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::protocol::{
    self, ErrorKind, Request, Response, MAX_FRAME_BYTES, MAX_LIST_PAGE, MAX_REFUSALS_SHOWN,
};
use crate::queue::{Queue, State};
use crate::store_path::StorePath;

use super::auth::{self, Peer};
use super::{resolve, Shared};

/// Connections served at once. When all are taken, a new connection evicts the one that has waited longest for
/// its request, so clients that connect and send nothing (or dribble) cannot lock out a hook.
pub const MAX_CONNECTIONS: usize = 512;

/// Accepts connections until `stop` is cancelled. Connection tasks run on `tasks`.
pub async fn accept_loop(
    listener: UnixListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: &TaskTracker,
) {
    let slots = Arc::new(Slots::default());
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let peer = match stream.peer_cred() {
                    Ok(cred) => Peer {
                        uid: Some(cred.uid()),
                        gid: Some(cred.gid()),
                        pid: cred.pid(),
                    },
                    Err(e) => {
                        tracing::warn!("cannot read peer credentials: {e}");
                        Peer::default()
                    }
                };
                let slot = tokio::select! {
                    _ = stop.cancelled() => return,
                    slot = slots.clone().take() => slot,
                };
                let (shared, stop) = (shared.clone(), stop.clone());
                tasks.spawn(async move {
                    serve(stream, peer, &shared, &stop, &slot).await;
                });
            }
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

/// The table of connections being served.
#[derive(Default)]
struct Slots {
    table: std::sync::Mutex<SlotTable>,
    freed: tokio::sync::Notify,
}

#[derive(Default)]
struct SlotTable {
    next_id: u64,
    open: std::collections::HashMap<u64, Arc<SlotState>>,
}

/// One connection's entry: since when it waits for a request (`None` while one is being answered), and how to
/// evict it.
struct SlotState {
    waiting_since: std::sync::Mutex<Option<Instant>>,
    evict: CancellationToken,
}

impl SlotState {
    fn set_waiting(&self, waiting: bool) {
        let mut since = self
            .waiting_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *since = waiting.then(Instant::now);
    }

    fn waiting_since(&self) -> Option<Instant> {
        *self
            .waiting_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A connection's place in [`Slots`]; leaves the table when dropped.
struct Slot {
    slots: Arc<Slots>,
    id: u64,
    state: Arc<SlotState>,
}

impl Slots {
    /// A place for a new connection. At [`MAX_CONNECTIONS`] the longest-waiting idle connection is evicted; if
    /// every connection is busy answering, waits until one finishes.
    async fn take(self: Arc<Slots>) -> Slot {
        loop {
            let freed = self.freed.notified();
            if let Some((id, state)) = self.try_take() {
                drop(freed);
                return Slot {
                    slots: self,
                    id,
                    state,
                };
            }
            freed.await;
        }
    }

    fn try_take(&self) -> Option<(u64, Arc<SlotState>)> {
        let mut table = self.lock();
        if table.open.len() >= MAX_CONNECTIONS {
            let oldest = table
                .open
                .iter()
                .filter_map(|(id, state)| state.waiting_since().map(|since| (since, *id)))
                .min();
            if let Some((_, id)) = oldest {
                if let Some(state) = table.open.remove(&id) {
                    state.evict.cancel();
                }
            }
        }
        if table.open.len() >= MAX_CONNECTIONS {
            return None;
        }
        table.next_id += 1;
        let id = table.next_id;
        let state = Arc::new(SlotState {
            waiting_since: std::sync::Mutex::new(Some(Instant::now())),
            evict: CancellationToken::new(),
        });
        table.open.insert(id, state.clone());
        Some((id, state))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().open.remove(&self.id);
        self.slots.freed.notify_one();
    }
}

/// Serves requests on one connection until the client closes it, sends something invalid, is too slow, or the
/// daemon stops (between requests only: a request already being read is answered).
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: Peer,
    shared: &Shared,
    stop: &CancellationToken,
) {
    let slot = Arc::new(Slots::default()).take().await;
    serve(stream, peer, shared, stop, &slot).await;
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: Peer,
    shared: &Shared,
    stop: &CancellationToken,
    slot: &Slot,
) {
    let mut served = 0u64;
    // Bytes received and not yet consumed. A hook's request usually arrives in one read.
    let mut received = Vec::new();
    loop {
        slot.state.set_waiting(true);
        let timeout_ms = shared.config().client_timeout_ms;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        if received.is_empty() {
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                _ = slot.state.evict.cancelled() => return evicted(&mut stream, peer).await,
                read = timeout_at(deadline, read_some(&mut stream, &mut received, FIRST_READ)) => read,
            };
            match first {
                Ok(Ok(0)) => return,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(peer_uid = peer.uid, "connection error: {e}");
                    return;
                }
                // An idle connection after a served request just closes; a silent new one is told why.
                Err(_) if served > 0 => return,
                Err(_) => {
                    let message = format!("no request within {timeout_ms} ms");
                    return refuse_connection(&mut stream, peer, ErrorKind::Timeout, message).await;
                }
            }
        }
        let frame = tokio::select! {
            _ = slot.state.evict.cancelled() => return evicted(&mut stream, peer).await,
            frame = read_frame(&mut stream, &mut received, deadline) => frame,
        };
        let payload = match frame {
            Ok(payload) => payload,
            Err((kind, message)) => {
                return refuse_connection(&mut stream, peer, kind, message).await;
            }
        };
        // A request being answered is never evicted.
        slot.state.set_waiting(false);
        if slot.state.evict.is_cancelled() {
            return evicted(&mut stream, peer).await;
        }
        let request = match protocol::decode_request(&payload) {
            Ok(request) => request,
            Err(e) => return refuse_connection(&mut stream, peer, e.kind(), e.to_string()).await,
        };
        let response = handle(request, peer, shared).await;
        let frame = protocol::encode_response(&response);
        let write_deadline = Instant::now() + Duration::from_millis(timeout_ms);
        match timeout_at(write_deadline, stream.write_all(&frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(peer_uid = peer.uid, "cannot send the answer: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(
                    peer_uid = peer.uid,
                    "client did not read its answer in time"
                );
                return;
            }
        }
        served += 1;
    }
}

/// Tells an evicted client why its connection closes.
async fn evicted<S: AsyncWrite + Unpin>(stream: &mut S, peer: Peer) {
    let message = format!(
        "connection closed: all {MAX_CONNECTIONS} connection slots are taken and this one waited longest \
         without a complete request"
    );
    tracing::debug!(peer_uid = peer.uid, peer_pid = peer.pid, "{message}");
    let frame = protocol::encode_response(&Response::Error {
        kind: ErrorKind::Timeout,
        message,
    });
    let deadline = Instant::now() + Duration::from_millis(100);
    let _ = timeout_at(deadline, stream.write_all(&frame)).await;
    let _ = timeout_at(deadline, stream.shutdown()).await;
}

/// The first read of a request: enough for any hook's request.
const FIRST_READ: usize = 4096;
/// Largest single read; a frame bigger than this arrives in several.
const READ_CHUNK: usize = 64 * 1024;

/// Appends up to `max` bytes from one read to `received`; returns how many (0 at end of stream).
async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    received: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<usize> {
    // `read_buf` on a full Vec would only grow it by 64 bytes at a time.
    received.reserve(max);
    let mut limited = (&mut *stream).take(max as u64);
    limited.read_buf(received).await
}

/// Takes one frame's payload from `received`, reading more until it is complete. The buffer grows only with
/// what actually arrives, so a client announcing 1 MiB and sending nothing costs nothing.
async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    received: &mut Vec<u8>,
    deadline: Instant,
) -> Result<Vec<u8>, (ErrorKind, String)> {
    let mut needed = 4;
    let mut len = None;
    loop {
        if len.is_none() && received.len() >= 4 {
            let header = [received[0], received[1], received[2], received[3]];
            let frame_len = protocol::frame_len(header).map_err(|e| (e.kind(), e.to_string()))?;
            len = Some(frame_len);
            needed = 4 + frame_len;
        }
        if received.len() >= needed {
            if let Some(len) = len {
                debug_assert!(len <= MAX_FRAME_BYTES);
                let payload = received[4..needed].to_vec();
                received.drain(..needed);
                return Ok(payload);
            }
        }
        let want = (needed - received.len()).min(READ_CHUNK);
        match timeout_at(deadline, read_some(stream, received, want)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Err((
                    ErrorKind::Malformed,
                    "connection closed in the middle of a request".to_owned(),
                ))
            }
            Ok(Ok(_)) => {}
            Err(_) => {
                return Err((
                    ErrorKind::Timeout,
                    "request not complete within the client timeout".to_owned(),
                ))
            }
        }
    }
}

async fn refuse_connection<S: AsyncWrite + Unpin>(
    stream: &mut S,
    peer: Peer,
    kind: ErrorKind,
    message: String,
) {
    tracing::warn!(
        peer_uid = peer.uid,
        peer_pid = peer.pid,
        "bad request: {message}"
    );
    let frame = protocol::encode_response(&Response::Error { kind, message });
    let deadline = Instant::now() + Duration::from_millis(500);
    let _ = timeout_at(deadline, stream.write_all(&frame)).await;
    let _ = timeout_at(deadline, stream.shutdown()).await;
}

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
        Request::List { after, limit } => {
            let limit = limit.unwrap_or(MAX_LIST_PAGE).clamp(1, MAX_LIST_PAGE);
            match shared.queue.list(after.as_deref(), limit) {
                Ok(entries) => Response::List {
                    next: (entries.len() == limit)
                        .then(|| entries.last().map(|e| e.path.to_string()))
                        .flatten(),
                    entries,
                },
                Err(e) => internal(e),
            }
        }
        Request::Enqueue {
            drv_path,
            out_paths,
            source,
        } => {
            if let Err(reason) = denied() {
                let input = drv_path.clone().unwrap_or_else(|| out_paths.join(" "));
                shared.refuse(&input, &reason, peer.uid, "socket");
                return error(ErrorKind::PermissionDenied, reason);
            }
            let source: String = source.chars().take(32).collect();
            let resolved = shared
                .resolver
                .resolve(drv_path.as_deref(), &out_paths, &config)
                .await;
            let refused = refusal_messages(&resolved.refused);
            match shared
                .enqueue_durably(&resolved, &source, peer.uid, "socket")
                .await
            {
                Ok(_) if resolved.paths.is_empty() => error(ErrorKind::Refused, refused.join("; ")),
                Ok(enqueued) => Response::Ack {
                    accepted: enqueued.queued.iter().map(|p| p.to_string()).collect(),
                    duplicate: enqueued.duplicate.len(),
                    refused,
                },
                Err(e) => internal(e),
            }
        }
        Request::Retry { paths, all } => {
            if let Err(reason) = denied() {
                return error(ErrorKind::PermissionDenied, reason);
            }
            // A write the filesystem refuses would break the queue until a restart.
            if let Err(e) = super::state_dir::check(&config.state_dir) {
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
            let now = crate::queue::now_ms();
            let retried = shared
                .queue
                .retry_failed(selected.as_deref(), now)
                .and_then(|mut retried| {
                    retried.extend(bring_forward(&*shared.queue, selected.as_deref(), now)?);
                    Ok(retried)
                });
            match retried {
                Ok(retried) => {
                    if let Err(e) = shared.commit.make_durable().await {
                        return internal(e);
                    }
                    for path in &retried {
                        tracing::info!(store_path = %path, "requeued by retry");
                    }
                    if !retried.is_empty() {
                        shared.work_available.notify_one();
                    }
                    Response::Changed {
                        paths: retried.iter().map(|p| p.to_string()).collect(),
                    }
                }
                Err(e) => internal(e),
            }
        }
        Request::Drop { path } => {
            if let Err(reason) = denied() {
                return error(ErrorKind::PermissionDenied, reason);
            }
            // A write the filesystem refuses would break the queue until a restart.
            if let Err(e) = super::state_dir::check(&config.state_dir) {
                return internal(e);
            }
            let path = match parse_all(&[path], config.store_dir_str()) {
                Ok(mut paths) => paths.remove(0),
                Err(message) => return error(ErrorKind::Refused, message),
            };
            match shared.queue.remove(&path) {
                Ok(removed) => {
                    if let Err(e) = shared.commit.make_durable().await {
                        return internal(e);
                    }
                    if removed.is_some() {
                        tracing::info!(store_path = %path, "dropped from the queue");
                    }
                    Response::Changed {
                        paths: removed.map(|e| e.path.to_string()).into_iter().collect(),
                    }
                }
                Err(e) => internal(e),
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::queue::{Queue, SqliteQueue};
    use tokio::io::DuplexStream;

    const ROOT: Peer = Peer {
        uid: Some(0),
        gid: Some(0),
        pid: None,
    };

    struct Fixture {
        _tmp: tempfile::TempDir,
        shared: Arc<Shared>,
        good: String,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let good = store.join("5gnj0y388labni6sfyda6isvycfvxmmg-good");
        std::fs::write(&good, b"").unwrap();
        // The daemon checks the state directory's filesystem before it takes work.
        std::fs::create_dir(tmp.path().join("state")).unwrap();
        let config = Config {
            store_dir: store,
            state_dir: tmp.path().join("state"),
            nix_db: tmp.path().join("db.sqlite"),
            client_timeout_ms: 200,
            ..Config::default()
        };
        resolve::register_for_tests(&config.nix_db, &[good.to_str().unwrap()]);
        let queue: Arc<dyn Queue> = Arc::new(SqliteQueue::temporary().unwrap());
        Fixture {
            shared: Shared::new(config, queue, true),
            good: good.display().to_string(),
            _tmp: tmp,
        }
    }

    fn connect(fixture: &Fixture, peer: Peer) -> DuplexStream {
        let (client, server) = tokio::io::duplex(4096);
        let shared = fixture.shared.clone();
        tokio::spawn(async move {
            serve_connection(server, peer, &shared, &CancellationToken::new()).await;
        });
        client
    }

    async fn read_response(client: &mut DuplexStream) -> Option<Response> {
        let mut header = [0; 4];
        client.read_exact(&mut header).await.ok()?;
        let mut payload = vec![0; protocol::frame_len(header).unwrap()];
        client.read_exact(&mut payload).await.unwrap();
        Some(protocol::decode_response(&payload).unwrap())
    }

    async fn call(client: &mut DuplexStream, request: &Request) -> Response {
        client
            .write_all(&protocol::encode_request(request))
            .await
            .unwrap();
        read_response(client).await.unwrap()
    }

    fn enqueue(paths: &[&str]) -> Request {
        Request::Enqueue {
            drv_path: None,
            out_paths: paths.iter().map(|p| p.to_string()).collect(),
            source: "hook".into(),
        }
    }

    #[tokio::test]
    async fn enqueue_acks_dedupes_and_reports() {
        let f = fixture();
        let mut client = connect(&f, ROOT);
        let response = call(&mut client, &enqueue(&[&f.good])).await;
        assert_eq!(
            response,
            Response::Ack {
                accepted: vec![f.good.clone()],
                duplicate: 0,
                refused: vec![]
            }
        );
        let response = call(&mut client, &enqueue(&[&f.good, "/tmp/x"])).await;
        let Response::Ack {
            duplicate, refused, ..
        } = response
        else {
            panic!("{response:?}")
        };
        assert_eq!(duplicate, 1);
        assert!(refused[0].starts_with("refused /tmp/x: not inside the store directory"));
        let Response::Status(report) = call(&mut client, &Request::Status).await else {
            panic!()
        };
        assert_eq!((report.queued, report.refused), (1, 1));
        assert_eq!(report.refused_requests[0].input, "/tmp/x");
    }

    #[tokio::test]
    async fn refused_and_denied_requests_name_the_reason() {
        let f = fixture();
        let mut client = connect(&f, ROOT);
        let response = call(&mut client, &enqueue(&["/tmp/x"])).await;
        assert!(
            matches!(&response, Response::Error { kind: ErrorKind::Refused, message }
                if message.contains("refused /tmp/x: not inside the store directory")),
            "{response:?}"
        );
        let nobody = Peer {
            uid: Some(65534),
            gid: Some(65534),
            pid: None,
        };
        let mut client = connect(&f, nobody);
        let response = call(&mut client, &enqueue(&[&f.good])).await;
        assert!(
            matches!(&response, Response::Error { kind: ErrorKind::PermissionDenied, message }
                if message.contains("permission denied")),
            "{response:?}"
        );
        // Reading the status is open to anyone.
        assert!(matches!(
            call(&mut client, &Request::Status).await,
            Response::Status(_)
        ));
        assert_eq!(f.shared.queue.counts().queued, 0);
        assert_eq!(f.shared.queue.refused_total().unwrap(), 2);
    }

    #[tokio::test]
    async fn bad_frames_get_an_error_and_the_connection_closes() {
        let f = fixture();
        for (bytes, kind) in [
            (b"\0\0\0\x05hello".to_vec(), ErrorKind::Malformed),
            (b"GET / HTTP/1.1\r\n\r\n".to_vec(), ErrorKind::TooLarge),
            (b"\0\0\0\x0e{\"v\":9,\"op\":1}".to_vec(), ErrorKind::Version),
            (b"\0\0\0".to_vec(), ErrorKind::Timeout),
            (Vec::new(), ErrorKind::Timeout),
        ] {
            let mut client = connect(&f, ROOT);
            client.write_all(&bytes).await.unwrap();
            let response = read_response(&mut client).await.unwrap();
            assert!(
                matches!(&response, Response::Error { kind: k, .. } if *k == kind),
                "{bytes:?}: {response:?}"
            );
            assert!(read_response(&mut client).await.is_none(), "not closed");
        }
        let mut client = connect(&f, ROOT);
        assert!(matches!(
            call(&mut client, &enqueue(&[&f.good])).await,
            Response::Ack { .. }
        ));
    }

    #[tokio::test]
    async fn retry_makes_a_path_waiting_out_a_backoff_due_now() {
        let f = fixture();
        let mut client = connect(&f, ROOT);
        call(&mut client, &enqueue(&[&f.good])).await;
        let path = StorePath::parse(&f.good, f.shared.config().store_dir_str()).unwrap();
        let mut entry = f.shared.queue.get(&path).unwrap().unwrap();
        entry.attempts = 3;
        entry.last_error = Some("HTTP 503".into());
        entry.next_attempt_at_ms = crate::queue::now_ms() + 300_000;
        f.shared.queue.set(&entry).unwrap();
        assert!(f
            .shared
            .queue
            .due(crate::queue::now_ms(), 10)
            .unwrap()
            .is_empty());
        let retried = call(
            &mut client,
            &Request::Retry {
                paths: vec![f.good.clone()],
                all: false,
            },
        )
        .await;
        assert_eq!(
            retried,
            Response::Changed {
                paths: vec![f.good.clone()]
            }
        );
        let due = f.shared.queue.due(crate::queue::now_ms(), 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].attempts, 3, "the attempts so far are kept");
    }

    #[tokio::test]
    async fn pipelined_and_trickled_requests_are_framed() {
        let f = fixture();
        let mut client = connect(&f, ROOT);
        let mut two = protocol::encode_request(&Request::Status);
        two.extend(protocol::encode_request(&enqueue(&[&f.good])));
        client.write_all(&two).await.unwrap();
        assert!(matches!(
            read_response(&mut client).await,
            Some(Response::Status(_))
        ));
        assert!(matches!(
            read_response(&mut client).await,
            Some(Response::Ack { .. })
        ));
        let list = Request::List {
            after: None,
            limit: None,
        };
        for byte in protocol::encode_request(&list) {
            client.write_all(&[byte]).await.unwrap();
        }
        assert!(matches!(
            read_response(&mut client).await,
            Some(Response::List { .. })
        ));
    }

    #[tokio::test]
    async fn retry_and_drop() {
        let f = fixture();
        let mut client = connect(&f, ROOT);
        call(&mut client, &enqueue(&[&f.good])).await;
        let path = StorePath::parse(&f.good, f.shared.config().store_dir_str()).unwrap();
        let mut entry = f.shared.queue.get(&path).unwrap().unwrap();
        entry.state = crate::queue::State::Failed;
        entry.last_error = Some("HTTP 500".into());
        f.shared.queue.set(&entry).unwrap();
        let Response::Status(report) = call(&mut client, &Request::Status).await else {
            panic!()
        };
        assert_eq!(
            report.failed_paths[0].last_error.as_deref(),
            Some("HTTP 500")
        );
        let retried = call(
            &mut client,
            &Request::Retry {
                paths: vec![],
                all: true,
            },
        )
        .await;
        assert_eq!(
            retried,
            Response::Changed {
                paths: vec![f.good.clone()]
            }
        );
        let list = Request::List {
            after: None,
            limit: Some(1),
        };
        let Response::List { entries, next } = call(&mut client, &list).await else {
            panic!()
        };
        assert_eq!(entries.len(), 1);
        let list = Request::List {
            after: next,
            limit: Some(1),
        };
        let Response::List { entries, next } = call(&mut client, &list).await else {
            panic!()
        };
        assert!(entries.is_empty() && next.is_none());
        let dropped = call(
            &mut client,
            &Request::Drop {
                path: f.good.clone(),
            },
        )
        .await;
        assert_eq!(
            dropped,
            Response::Changed {
                paths: vec![f.good.clone()]
            }
        );
        assert_eq!(f.shared.queue.counts().queued, 0);
    }

    #[tokio::test]
    async fn a_full_table_evicts_the_longest_waiting_idle_connection() {
        let slots = Arc::new(Slots::default());
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(slots.clone().take().await);
        }
        // The oldest is answering a request: it is skipped, the next oldest goes.
        held[0].state.set_waiting(false);
        let newcomer = slots.clone().take().await;
        assert!(!held[0].state.evict.is_cancelled());
        assert!(held[1].state.evict.is_cancelled());
        assert!(held[2..].iter().all(|s| !s.state.evict.is_cancelled()));
        // Every connection busy: a newcomer waits until one finishes.
        for slot in held.iter().skip(2).chain([&newcomer]) {
            slot.state.set_waiting(false);
        }
        let waiting = tokio::spawn(slots.clone().take());
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        held.truncate(MAX_CONNECTIONS - 1);
        let last = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(!last.state.evict.is_cancelled());
    }
}
