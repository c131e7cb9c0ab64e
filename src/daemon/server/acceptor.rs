//! The accept threads. A hook's request arrives with its connection, so a thread takes every connection waiting,
//! reads what each has already sent without waiting for more, and answers the complete `enqueue` requests itself:
//! all of them resolved and written, one commit, then the acks. Any other connection, or one whose request is not
//! all there yet, goes to the runtime's handler ([`super::serve`]) with the bytes read so far, which answers it
//! (and every error) as it answers everything else.
//!
//! So a hook's ack costs the wake-up of one thread. Through the runtime it crossed five (the poller, the accept
//! loop, a reader, a blocking-pool thread, a writer), and those hand-offs were most of what an ack cost beyond
//! its fdatasync.
//!
//! Two threads take turns: one waits for connections while the other answers what it took, so a slow sync or
//! Nix database in one batch does not stop the next connections from being taken.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, recv, send, sockopt, MsgFlags};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::protocol::{self, Request, Response};

use super::super::auth::Peer;
use super::super::Shared;
use super::control;
use super::framing::FIRST_READ;
use super::slots::Slots;
use super::Resume;

/// Threads taking turns at the listener.
const THREADS: usize = 2;
/// Connections taken at once; the rest wait in the listen backlog for the next turn.
const MAX_BATCH: usize = 64;
/// How long a thread waits for the requests of the connections it took. A hook writes its request right after
/// connecting, so it is there within microseconds; a client that takes longer is served by the runtime (with its
/// timeout and eviction) while the other thread keeps taking connections.
const WAIT_FOR_REQUEST: Duration = Duration::from_millis(2);

/// The running accept threads. Dropping it stops them without waiting; [`Acceptor::stop`] waits.
pub struct Acceptor {
    threads: Vec<JoinHandle<()>>,
    /// Closed to stop the threads: its peer, which they poll, then reads end of stream.
    stop: Option<UnixStream>,
}

impl Acceptor {
    /// Starts taking connections on `listener`. Connections the threads do not answer themselves are served on
    /// `runtime`, tracked by `tasks`, until `stop` is cancelled.
    pub fn start(
        listener: UnixListener,
        shared: Arc<Shared>,
        runtime: Handle,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> io::Result<Acceptor> {
        listener.set_nonblocking(true)?;
        let (stop_sender, stop_receiver) = UnixStream::pair()?;
        let turns = Arc::new(Turns {
            listener,
            turn: Mutex::new(()),
            stop_receiver,
            handover: Handover {
                shared,
                runtime,
                tasks,
                stop,
                slots: Arc::new(Slots::default()),
            },
        });
        let mut acceptor = Acceptor {
            threads: Vec::with_capacity(THREADS),
            stop: Some(stop_sender),
        };
        for n in 0..THREADS {
            let turns = Arc::clone(&turns);
            let thread = std::thread::Builder::new()
                .name(format!("nixpush-accept{n}"))
                .spawn(move || turns.run())?;
            acceptor.threads.push(thread);
        }
        Ok(acceptor)
    }

    /// Stops taking connections and returns once every request already read is answered. Blocks.
    pub fn stop(mut self) {
        self.stop.take();
        for thread in std::mem::take(&mut self.threads) {
            let _ = thread.join();
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.take();
    }
}

/// What the accept threads share.
struct Turns {
    listener: UnixListener,
    /// Held by the thread waiting at the listener.
    turn: Mutex<()>,
    stop_receiver: UnixStream,
    handover: Handover,
}

/// A connection taken, with what it had sent.
struct Incoming {
    stream: UnixStream,
    peer: Peer,
    /// Bytes after the first request (a client sending several at once).
    rest: Vec<u8>,
    /// Whether the client has closed its side: nothing follows, so the connection closes after the answer.
    closed: bool,
}

impl Turns {
    fn run(&self) {
        loop {
            let batch = {
                let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
                if !self.wait() {
                    return;
                }
                self.accept_batch()
            };
            self.answer(batch);
        }
    }

    /// Waits until a connection is waiting (true) or the acceptor stops (false).
    fn wait(&self) -> bool {
        loop {
            let mut fds = [
                PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.stop_receiver.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("cannot wait for connections: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
            if fds[1].any() != Some(false) {
                return false;
            }
            if fds[0].any() == Some(true) {
                return true;
            }
        }
    }

    /// Every connection waiting, up to [`MAX_BATCH`].
    fn accept_batch(&self) -> Vec<UnixStream> {
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH {
            match self.listener.accept() {
                Ok((stream, _)) => batch.push(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    if batch.is_empty() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    break;
                }
            }
        }
        batch
    }

    /// Answers the complete `enqueue` requests in `batch`, one commit for all that have arrived, and waits up to
    /// [`WAIT_FOR_REQUEST`] for the rest; hands every other connection over.
    fn answer(&self, batch: Vec<UnixStream>) {
        let handover = &self.handover;
        let deadline = Instant::now() + WAIT_FOR_REQUEST;
        let mut pending: Vec<_> = batch.into_iter().map(Partial::new).collect();
        loop {
            let mut ready = Vec::new();
            for partial in std::mem::take(&mut pending) {
                match handover.read_more(partial) {
                    Read::Enqueue(incoming, request) => ready.push((incoming, request)),
                    Read::Partial(partial) => pending.push(partial),
                    Read::Done => {}
                }
            }
            self.answer_ready(ready);
            let left = deadline.saturating_duration_since(Instant::now());
            if pending.is_empty() {
                return;
            }
            if left.is_zero() {
                for partial in pending {
                    let resume = Resume::read(partial.received);
                    handover.hand_over(partial.stream, partial.peer, resume);
                }
                return;
            }
            let mut fds: Vec<_> = pending
                .iter()
                .map(|p| PollFd::new(p.stream.as_fd(), PollFlags::POLLIN))
                .collect();
            let timeout =
                PollTimeout::try_from(left.as_millis().max(1) as u64).unwrap_or(PollTimeout::MAX);
            let _ = poll(&mut fds, timeout);
        }
    }

    /// Answers requests that have arrived whole: refusals at once, the rest with one commit.
    fn answer_ready(&self, ready: Vec<(Incoming, Request)>) {
        let handover = &self.handover;
        let mut waiting = Vec::new();
        let mut requests = Vec::new();
        for (incoming, request) in ready {
            let Request::Enqueue {
                drv_path,
                out_paths,
                source,
            } = request
            else {
                unreachable!("read_more hands over everything else")
            };
            match control::admit(
                drv_path,
                out_paths,
                &source,
                incoming.peer,
                &handover.shared,
            ) {
                Ok(request) => {
                    waiting.push(incoming);
                    requests.push(request);
                }
                Err(refusal) => handover.reply(incoming, &refusal),
            }
        }
        if requests.is_empty() {
            return;
        }
        let shared = &handover.shared;
        let mut taken = shared.intake().take_all(&requests);
        for (incoming, (resolved, enqueued)) in waiting.into_iter().zip(taken.answers.drain(..)) {
            let answer = control::answer_enqueue(&resolved, enqueued, shared);
            handover.reply(incoming, &answer);
        }
        taken.after_ack();
    }
}

/// A connection taken whose request has not arrived whole yet.
struct Partial {
    stream: UnixStream,
    peer: Peer,
    received: Vec<u8>,
}

impl Partial {
    fn new(stream: UnixStream) -> Partial {
        Partial {
            peer: peer_of(&stream),
            stream,
            received: Vec::new(),
        }
    }
}

/// What a connection has sent so far.
enum Read {
    /// A whole `enqueue` request.
    Enqueue(Incoming, Request),
    /// Not a whole request yet.
    Partial(Partial),
    /// Handed over to the runtime, or closed.
    Done,
}

/// Passing connections to the runtime's handler.
struct Handover {
    shared: Arc<Shared>,
    runtime: Handle,
    tasks: TaskTracker,
    stop: CancellationToken,
    slots: Arc<Slots>,
}

impl Handover {
    /// Reads what the connection has sent without waiting. A whole `enqueue` request is returned; any other
    /// request, anything invalid, and a request too big for one read go to the runtime's handler, which answers
    /// them (and every error) as it always does.
    fn read_more(&self, partial: Partial) -> Read {
        let Partial {
            stream,
            peer,
            mut received,
        } = partial;
        let had = received.len();
        received.resize(FIRST_READ, 0);
        let got = match recv(
            stream.as_raw_fd(),
            &mut received[had..],
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) if had == 0 => return Read::Done,
            Ok(n) => Some(n),
            Err(Errno::EAGAIN | Errno::EINTR) => None,
            Err(e) => {
                tracing::debug!(peer_uid = peer.uid, "connection error: {e}");
                return Read::Done;
            }
        };
        received.truncate(had + got.unwrap_or(0));
        let eof = got == Some(0);
        let frame_len = received
            .first_chunk::<4>()
            .map(|header| protocol::frame_len(*header).ok());
        // A request that still fits in one read waits for the rest; a whole one is taken; the rest go over.
        let (waiting, whole) = match frame_len {
            None => (!eof, None),
            Some(Some(len)) if received.len() >= 4 + len => (false, Some(len)),
            Some(Some(len)) => (!eof && 4 + len <= FIRST_READ, None),
            Some(None) => (false, None),
        };
        if waiting {
            return Read::Partial(Partial {
                stream,
                peer,
                received,
            });
        }
        let request = whole.and_then(|len| {
            let request = protocol::decode_request(&received[4..4 + len]).ok()?;
            matches!(request, Request::Enqueue { .. }).then_some((len, request))
        });
        let Some((len, request)) = request else {
            self.hand_over(stream, peer, Resume::read(received));
            return Read::Done;
        };
        let rest = received.split_off(4 + len);
        // A one-request client shuts its side after sending; finding that now saves watching the connection.
        let closed = rest.is_empty()
            && matches!(
                recv(
                    stream.as_raw_fd(),
                    &mut [0; 1],
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK
                ),
                Ok(0)
            );
        let incoming = Incoming {
            stream,
            peer,
            rest,
            closed,
        };
        Read::Enqueue(incoming, request)
    }

    /// Sends `answer`; then closes the connection or hands it over for the client's next request (or for the
    /// rest of the answer, when the socket would not take it all at once).
    fn reply(&self, incoming: Incoming, answer: &Response) {
        let frame = protocol::encode_response(answer);
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        let sent = match send(incoming.stream.as_raw_fd(), &frame, flags) {
            Ok(n) => n,
            Err(Errno::EAGAIN | Errno::EINTR) => 0,
            Err(e) => {
                tracing::debug!(peer_uid = incoming.peer.uid, "cannot send the answer: {e}");
                return;
            }
        };
        if sent == frame.len() && incoming.closed {
            return;
        }
        let resume = Resume {
            received: incoming.rest,
            served: 1,
            unsent: frame[sent..].to_vec(),
        };
        self.hand_over(incoming.stream, incoming.peer, resume);
    }

    /// Serves the connection on the runtime, from where `resume` says.
    fn hand_over(&self, stream: UnixStream, peer: Peer, resume: Resume) {
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::debug!(peer_uid = peer.uid, "connection error: {e}");
            return;
        }
        let shared = Arc::clone(&self.shared);
        let (stop, slots) = (self.stop.clone(), Arc::clone(&self.slots));
        let serve = async move {
            let stream = match tokio::net::UnixStream::from_std(stream) {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!("cannot serve a connection: {e}");
                    return;
                }
            };
            let slot = slots.take().await;
            super::serve(stream, peer, &shared, &stop, &slot, resume).await;
        };
        self.tasks.spawn_on(serve, &self.runtime);
    }
}

/// Who is on the other end, from `SO_PEERCRED`.
fn peer_of(stream: &UnixStream) -> Peer {
    match getsockopt(stream, sockopt::PeerCredentials) {
        Ok(cred) => Peer {
            uid: Some(cred.uid()),
            gid: Some(cred.gid()),
            pid: Some(cred.pid()),
        },
        Err(e) => {
            tracing::warn!("cannot read peer credentials: {e}");
            Peer::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::path::PathBuf;

    use super::*;
    use crate::daemon::server::tests::{enqueue, fixture, Fixture};
    use crate::protocol::ErrorKind;
    use crate::store_path::StorePath;

    /// The accept threads on a socket in a temporary directory; stopped when dropped.
    struct Running {
        acceptor: Option<Acceptor>,
        socket: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(acceptor) = self.acceptor.take() {
                acceptor.stop();
            }
        }
    }

    fn start(f: &Fixture) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nixpush.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let acceptor = Acceptor::start(
            listener,
            f.shared.clone(),
            Handle::current(),
            TaskTracker::new(),
            CancellationToken::new(),
        )
        .unwrap();
        Running {
            acceptor: Some(acceptor),
            socket,
            _dir: dir,
        }
    }

    /// The next answer, or `None` once the daemon has closed the connection.
    fn answer(stream: &mut UnixStream) -> Option<Response> {
        let mut header = [0; 4];
        stream.read_exact(&mut header).ok()?;
        let mut payload = vec![0; protocol::frame_len(header).unwrap()];
        stream.read_exact(&mut payload).unwrap();
        Some(protocol::decode_response(&payload).unwrap())
    }

    /// Runs the client side off the runtime's threads, which serve what the accept threads hand over.
    async fn client<T: Send + 'static>(run: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(run).await.unwrap()
    }

    fn acked(good: &str, duplicate: usize) -> Response {
        let accepted = if duplicate == 0 {
            vec![good.to_owned()]
        } else {
            vec![]
        };
        Response::Ack {
            accepted,
            duplicate,
            refused: vec![],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hook_request_is_acked_durably_and_the_connection_closed() {
        let f = fixture();
        let running = start(&f);
        let (socket, good) = (running.socket.clone(), f.good.clone());
        let answers = client(move || {
            let mut stream = UnixStream::connect(&socket).unwrap();
            stream
                .write_all(&protocol::encode_request(&enqueue(&[&good])))
                .unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            (answer(&mut stream), answer(&mut stream))
        })
        .await;
        assert_eq!(answers, (Some(acked(&f.good, 0)), None));
        let path = StorePath::parse(&f.good, f.shared.config().store_dir_str()).unwrap();
        assert!(f.shared.queue.get(&path).unwrap().is_some());
        assert_eq!(f.sqlite.commit_stats().commits, 1, "acked after a commit");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_kept_open_is_served_after_its_first_answer() {
        let f = fixture();
        let running = start(&f);
        let (socket, good) = (running.socket.clone(), f.good.clone());
        let answers = client(move || {
            let mut stream = UnixStream::connect(&socket).unwrap();
            let mut answers = Vec::new();
            stream
                .write_all(&protocol::encode_request(&enqueue(&[&good])))
                .unwrap();
            answers.push(answer(&mut stream));
            // Two requests in one write: the second waits in what the first read took.
            let mut two = protocol::encode_request(&enqueue(&[&good]));
            two.extend(protocol::encode_request(&Request::Status));
            stream.write_all(&two).unwrap();
            answers.push(answer(&mut stream));
            answers.push(answer(&mut stream));
            stream.shutdown(Shutdown::Write).unwrap();
            answers.push(answer(&mut stream));
            answers
        })
        .await;
        assert_eq!(answers[0], Some(acked(&f.good, 0)));
        assert_eq!(answers[1], Some(acked(&f.good, 1)));
        assert!(
            matches!(&answers[2], Some(Response::Status(report)) if report.queued == 1),
            "{:?}",
            answers[2]
        );
        assert_eq!(answers[3], None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_requests_and_bad_frames_are_answered_by_the_runtime() {
        let f = fixture();
        let running = start(&f);
        let (socket, good) = (running.socket.clone(), f.good.clone());
        let answers = client(move || {
            let call = |bytes: &[u8]| {
                let mut stream = UnixStream::connect(&socket).unwrap();
                stream.write_all(bytes).unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
                answer(&mut stream)
            };
            let mut pieces = UnixStream::connect(&socket).unwrap();
            for byte in protocol::encode_request(&enqueue(&[&good])) {
                pieces.write_all(&[byte]).unwrap();
            }
            vec![
                call(&protocol::encode_request(&Request::Status)),
                call(b"\0\0\0\x05hello"),
                call(&protocol::encode_request(&enqueue(&["/tmp/x"]))),
                answer(&mut pieces),
            ]
        })
        .await;
        assert!(
            matches!(answers[0], Some(Response::Status(_))),
            "{answers:?}"
        );
        assert!(
            matches!(
                &answers[1],
                Some(Response::Error {
                    kind: ErrorKind::Malformed,
                    ..
                })
            ),
            "{answers:?}"
        );
        assert!(
            matches!(&answers[2], Some(Response::Error { kind: ErrorKind::Refused, message })
                if message.contains("not inside the store directory")),
            "{answers:?}"
        );
        assert_eq!(answers[3], Some(acked(&f.good, 0)));
        assert_eq!(f.shared.queue.refused_total().unwrap(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_returns_once_both_threads_have_let_go_of_the_listener() {
        let f = fixture();
        let mut running = start(&f);
        running.acceptor.take().unwrap().stop();
        let refused = UnixStream::connect(&running.socket).map_err(|e| e.kind());
        assert_eq!(refused.err(), Some(io::ErrorKind::ConnectionRefused));
    }
}
