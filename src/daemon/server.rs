//! The accept loop and the per-connection handler for the hook socket.
//!
//! Each connection gets `client_timeout_ms` to deliver each request. A malformed, oversized or late request is
//! answered with an error naming the problem, logged, and the connection closed; the loop keeps serving everyone
//! else. The handler takes any `AsyncRead + AsyncWrite`, so tests drive it over `tokio::io::duplex`.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::protocol::{self, ErrorKind, Request, Response, MAX_FRAME_BYTES};
use crate::store_path::StorePath;

use super::auth::{self, Peer};
use super::{resolve, Shared};

/// Connections served at once; more wait in the kernel's backlog (and their hooks spool if they wait too long).
pub const MAX_CONNECTIONS: usize = 512;

/// Accepts connections until `stop` is cancelled. Connection tasks run on `tasks`.
pub async fn accept_loop(
    listener: UnixListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: &TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            _ = stop.cancelled() => return,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
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
                let (shared, stop) = (shared.clone(), stop.clone());
                tasks.spawn(async move {
                    serve_connection(stream, peer, &shared, &stop).await;
                    drop(slot);
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

/// Serves requests on one connection until the client closes it, sends something invalid, is too slow, or the
/// daemon stops (between requests only: a request already being read is answered).
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: Peer,
    shared: &Shared,
    stop: &CancellationToken,
) {
    let mut served = 0u64;
    loop {
        let timeout_ms = shared.config().client_timeout_ms;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let mut header = [0u8; 4];
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            read = timeout_at(deadline, stream.read(&mut header)) => read,
        };
        let got = match first {
            Ok(Ok(0)) => return,
            Ok(Ok(n)) => n,
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
        };
        let payload = match read_rest(&mut stream, header, got, deadline).await {
            Ok(payload) => payload,
            Err((kind, message)) => {
                return refuse_connection(&mut stream, peer, kind, message).await;
            }
        };
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

/// Reads the rest of a frame whose first `got` header bytes are in `header`.
async fn read_rest<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut header: [u8; 4],
    got: usize,
    deadline: Instant,
) -> Result<Vec<u8>, (ErrorKind, String)> {
    let late = || {
        (
            ErrorKind::Timeout,
            "request not complete within the client timeout".to_owned(),
        )
    };
    let closed = || {
        (
            ErrorKind::Malformed,
            "connection closed in the middle of a request".to_owned(),
        )
    };
    timeout_at(deadline, stream.read_exact(&mut header[got..]))
        .await
        .map_err(|_| late())?
        .map_err(|_| closed())?;
    let len = protocol::frame_len(header).map_err(|e| (e.kind(), e.to_string()))?;
    // Grows with what actually arrives, so a client announcing 1 MiB and sending nothing costs nothing.
    let mut payload = Vec::with_capacity(len.min(64 * 1024));
    let mut limited = (&mut *stream).take(len as u64);
    timeout_at(deadline, limited.read_to_end(&mut payload))
        .await
        .map_err(|_| late())?
        .map_err(|_| closed())?;
    if payload.len() != len {
        return Err(closed());
    }
    debug_assert!(payload.len() <= MAX_FRAME_BYTES);
    Ok(payload)
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
        Request::List => match shared.queue.entries() {
            Ok(entries) => Response::List { entries },
            Err(e) => internal(e),
        },
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
            let resolved = resolve::resolve(drv_path.as_deref(), &out_paths, &config).await;
            let refused: Vec<String> = resolved.refused.iter().map(|r| r.message()).collect();
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
            let selected = if all {
                None
            } else {
                match parse_all(&paths, config.store_dir_str()) {
                    Ok(paths) => Some(paths),
                    Err(message) => return error(ErrorKind::Refused, message),
                }
            };
            let retried = shared
                .queue
                .retry_failed(selected.as_deref(), crate::queue::now_ms());
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
    use crate::queue::{Queue, SledQueue};
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
        let config = Config {
            store_dir: store,
            state_dir: tmp.path().join("state"),
            client_timeout_ms: 200,
            ..Config::default()
        };
        let queue: Arc<dyn Queue> = Arc::new(SledQueue::temporary().unwrap());
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
        let Response::List { entries } = call(&mut client, &Request::List).await else {
            panic!()
        };
        assert_eq!(entries.len(), 1);
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
}
