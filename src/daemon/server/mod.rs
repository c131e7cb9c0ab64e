//! The hook socket's server: the accept threads and the per-connection handler.
//!
//! Each connection gets `client_timeout_ms` to deliver each request. A malformed, oversized or late request is
//! answered with an error naming the problem, logged, and the connection closed; the loop keeps serving everyone
//! else. The handler takes any `AsyncRead + AsyncWrite`, so tests drive it over `tokio::io::duplex`.
//!
//! `acceptor` takes connections and answers hooks' requests itself, `slots` holds the connection table and its
//! eviction, `framing` reads frames, `control` answers requests.

mod acceptor;
mod control;
mod framing;
mod slots;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use crate::protocol::{self, ErrorKind, Response};

use super::auth::Peer;
use super::Shared;

pub use acceptor::Acceptor;
pub use control::handle;
pub use slots::MAX_CONNECTIONS;

use framing::{read_frame, read_some, FIRST_READ};
use slots::{Slot, Slots};

/// Serves requests on one connection until the client closes it, sends something invalid, is too slow, or the
/// daemon stops (between requests only: a request already being read is answered).
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: Peer,
    shared: &Shared,
    stop: &CancellationToken,
) {
    let slot = Arc::new(Slots::default()).take().await;
    serve(stream, peer, shared, stop, &slot, Resume::default()).await;
}

/// Where serving a connection starts: what the accept threads already read from it, answered and not yet sent.
#[derive(Default)]
struct Resume {
    /// Bytes received and not yet consumed.
    received: Vec<u8>,
    /// Requests already answered.
    served: u64,
    /// The end of an answer the socket did not take at once.
    unsent: Vec<u8>,
}

impl Resume {
    /// A connection nothing has been answered on yet, with what it sent so far.
    fn read(received: Vec<u8>) -> Resume {
        Resume {
            received,
            ..Resume::default()
        }
    }
}

/// Serves the connection in `slot` from where `resume` says.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: Peer,
    shared: &Shared,
    stop: &CancellationToken,
    slot: &Slot,
    resume: Resume,
) {
    let Resume {
        // Bytes received and not yet consumed. A hook's request usually arrives in one read.
        mut received,
        mut served,
        unsent,
    } = resume;
    if !unsent.is_empty() && !send_answer(&mut stream, &unsent, peer, shared).await {
        return;
    }
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
                shared
                    .metrics
                    .hook_request(crate::metrics::HookResult::Error);
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
            Err(e) => {
                shared
                    .metrics
                    .hook_request(crate::metrics::HookResult::Error);
                return refuse_connection(&mut stream, peer, e.kind(), e.to_string()).await;
            }
        };
        let response = handle(request, peer, shared).await;
        let frame = protocol::encode_response(&response);
        if !send_answer(&mut stream, &frame, peer, shared).await {
            return;
        }
        served += 1;
    }
}

/// Writes an answer within the client timeout; false when the connection is done for.
async fn send_answer<S: AsyncWrite + Unpin>(
    stream: &mut S,
    frame: &[u8],
    peer: Peer,
    shared: &Shared,
) -> bool {
    let timeout_ms = shared.config().client_timeout_ms;
    let write_deadline = Instant::now() + Duration::from_millis(timeout_ms);
    match timeout_at(write_deadline, stream.write_all(frame)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(peer_uid = peer.uid, "cannot send the answer: {e}");
            false
        }
        Err(_) => {
            tracing::debug!(
                peer_uid = peer.uid,
                "client did not read its answer in time"
            );
            false
        }
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

#[cfg(test)]
pub(in crate::daemon) mod tests {
    use super::*;
    use crate::config::Config;
    use crate::daemon::resolve;
    use crate::protocol::Request;
    use crate::queue::{Queue, SqliteQueue};
    use crate::store_path::StorePath;
    use tokio::io::AsyncReadExt;
    use tokio::io::DuplexStream;

    const ROOT: Peer = Peer {
        uid: Some(0),
        gid: Some(0),
        pid: None,
    };

    pub(in crate::daemon) struct Fixture {
        _tmp: tempfile::TempDir,
        pub(in crate::daemon) shared: Arc<Shared>,
        /// The queue behind `shared`, for its commit counts.
        pub(in crate::daemon) sqlite: Arc<SqliteQueue>,
        /// A path registered in the fixture's Nix database.
        pub(in crate::daemon) good: String,
    }

    /// A daemon's shared state over a temporary store, Nix database and queue.
    pub(in crate::daemon) fn fixture() -> Fixture {
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
        let sqlite = Arc::new(SqliteQueue::temporary().unwrap());
        let queue: Arc<dyn Queue> = sqlite.clone();
        Fixture {
            shared: Shared::new(config, queue, true),
            sqlite,
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

    /// A hook's request to queue `paths`.
    pub(in crate::daemon) fn enqueue(paths: &[&str]) -> Request {
        Request::Enqueue {
            drv_path: None,
            out_paths: paths.iter().map(|p| p.to_string()).collect(),
            source: "hook".into(),
        }
    }

    fn retry(paths: &[&str], all: bool) -> Request {
        Request::Retry {
            paths: paths.iter().map(|p| p.to_string()).collect(),
            all,
            target: None,
        }
    }

    fn list(after: Option<String>, limit: Option<usize>) -> Request {
        Request::List {
            after,
            limit,
            target: None,
        }
    }

    /// The answer to a retry or drop that changed only the fixture's path.
    fn changed_good(f: &Fixture) -> Response {
        Response::Changed {
            paths: vec![f.good.clone()],
        }
    }

    /// Enqueues the fixture's path and returns its queue entry, for the test to change and `set` back.
    async fn enqueued_good(f: &Fixture, client: &mut DuplexStream) -> crate::queue::Entry {
        call(client, &enqueue(&[&f.good])).await;
        let path = StorePath::parse(&f.good, f.shared.config().store_dir_str()).unwrap();
        f.shared.queue.get(&path).unwrap().unwrap()
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
        let mut entry = enqueued_good(&f, &mut client).await;
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
        let retried = call(&mut client, &retry(&[&f.good], false)).await;
        assert_eq!(retried, changed_good(&f));
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
        for byte in protocol::encode_request(&list(None, None)) {
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
        let mut entry = enqueued_good(&f, &mut client).await;
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
        let retried = call(&mut client, &retry(&[], true)).await;
        assert_eq!(retried, changed_good(&f));
        let Response::List { entries, next } = call(&mut client, &list(None, Some(1))).await else {
            panic!()
        };
        assert_eq!(entries.len(), 1);
        let Response::List { entries, next } = call(&mut client, &list(next, Some(1))).await else {
            panic!()
        };
        assert!(entries.is_empty() && next.is_none());
        let dropped = call(
            &mut client,
            &Request::Drop {
                path: f.good.clone(),
                target: None,
            },
        )
        .await;
        assert_eq!(dropped, changed_good(&f));
        assert_eq!(f.shared.queue.counts().queued, 0);
    }
}
