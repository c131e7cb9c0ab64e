//! A loopback HTTP proxy that fails a share of requests on purpose: 500, 429 with Retry-After, a connection reset
//! in the middle of the request body, or a stall past the client's timeout. Everything else is forwarded to the
//! upstream server. Every connection carries exactly one request (`Connection: close`), which keeps the proxy
//! simple and makes each fault hit exactly one request.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One kind of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `500 Internal Server Error`.
    ServerError,
    /// `429 Too Many Requests` with `Retry-After: 1`.
    TooManyRequests,
    /// `503 Slow Down` with S3's `<Code>SlowDown</Code>` body, as S3 throttles a bucket.
    SlowDown,
    /// Forward the request, then answer `404 NoSuchUpload` whatever the upstream said: what a writer sees when
    /// another writer's upload of the same key superseded its own.
    Superseded,
    /// Read half of the request body, then close the connection without answering.
    ResetMidBody,
    /// Read the request, then say nothing for `stall` before closing.
    Stall,
    /// `500 Internal Server Error` whose body is the request's line and headers, as a hostile target or a
    /// debugging proxy might send (token included).
    EchoHeaders,
    /// `507 Insufficient Storage`, as a WebDAV server with a full disk answers.
    InsufficientStorage,
    /// `403` with S3's `<Code>ExpiredToken</Code>`: the session token the request was signed with has expired.
    ExpiredToken,
}

/// Counters of what the proxy did.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests seen.
    pub requests: AtomicU64,
    /// Requests failed on purpose.
    pub faults: AtomicU64,
    /// Requests forwarded.
    pub forwarded: AtomicU64,
    /// Per request target (`METHOD /path`): requests seen and requests failed on purpose.
    pub by_target: Mutex<BTreeMap<String, (u64, u64)>>,
    /// Faults injected, per kind.
    pub by_fault: Mutex<BTreeMap<String, u64>>,
    /// Forwarded requests in the order they were answered: `METHOD /path?query` and the upstream's status code.
    pub answered: Mutex<Vec<(String, u16)>>,
}

impl Stats {
    /// A copy of [`Stats::answered`] so far, so that a test reads it without holding the proxy's lock.
    pub fn answered(&self) -> Vec<(String, u16)> {
        self.answered.lock().unwrap().clone()
    }

    /// Requests seen and failed for `METHOD /path` (`(0, 0)` if never seen).
    pub fn for_target(&self, method_and_path: &str) -> (u64, u64) {
        self.by_target
            .lock()
            .unwrap()
            .get(method_and_path)
            .copied()
            .unwrap_or_default()
    }
}

/// The running proxy; stops accepting on drop.
pub struct FaultProxy {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// What happened so far.
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    rate: Arc<AtomicU64>,
    only: Arc<Mutex<Option<String>>>,
    forced: Arc<AtomicU64>,
    link: Arc<AtomicU64>,
    /// The listening socket, for the receive window of connections accepted after [`FaultProxy::throttle`].
    listener: TcpListener,
}

impl FaultProxy {
    /// Forwards to `127.0.0.1:upstream_port`, failing each request with probability `rate` (0.0–1.0) using the
    /// faults in `faults` in turn. `seed` makes the sequence reproducible.
    pub fn start(
        upstream_port: u16,
        rate: f64,
        faults: &[Fault],
        stall: Duration,
        seed: u64,
    ) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let kept = listener.try_clone().unwrap();
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let rng = Arc::new(Mutex::new(seed | 1));
        let faults = faults.to_vec();
        let rate = Arc::new(AtomicU64::new(rate.to_bits()));
        let only: Arc<Mutex<Option<String>>> = Arc::default();
        let forced: Arc<AtomicU64> = Arc::default();
        let link: Arc<AtomicU64> = Arc::default();
        let decide = Decide {
            link: Arc::clone(&link),
            forced: Arc::clone(&forced),
            rng,
            faults: faults.to_vec(),
            rate: Arc::clone(&rate),
            only: Arc::clone(&only),
            stats: Arc::clone(&stats),
        };
        let decide = Arc::new(decide);
        let stop2 = Arc::clone(&stop);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let decide = Arc::clone(&decide);
                std::thread::spawn(move || {
                    let _ = handle(stream, upstream_port, &decide, stall);
                });
            }
        });
        FaultProxy {
            port,
            stats,
            stop,
            rate,
            only,
            forced,
            link,
            listener: kept,
        }
    }

    /// Reads request bodies at most `bytes_per_sec` from now on, like a slow link (0: as fast as they come).
    /// Connections accepted from now on get a small receive window, as the far end of a slow link holds little
    /// that the link has not carried: the kernel would otherwise take megabytes ahead of the "link". (Only
    /// here: a small window on every connection changes the timing of the tests that race writers.)
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.link.store(bytes_per_sec, Ordering::SeqCst);
        if bytes_per_sec > 0 {
            nix::sys::socket::setsockopt(
                &self.listener,
                nix::sys::socket::sockopt::RcvBuf,
                &(64 * 1024),
            )
            .unwrap();
        }
    }

    /// Fails the next `n` requests that match [`FaultProxy::only_matching`], whatever the rate.
    pub fn fail_next(&self, n: u64) {
        self.forced.store(n, Ordering::SeqCst);
    }

    /// Limits faults to requests whose request line contains `needle` (e.g. `"PUT /cache/nar/"`).
    pub fn only_matching(&self, needle: &str) {
        *self.only.lock().unwrap() = Some(needle.to_owned());
    }

    /// Changes the share of requests that fail from now on.
    pub fn set_rate(&self, rate: f64) {
        self.rate.store(rate.to_bits(), Ordering::SeqCst);
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// What decides whether a request fails, and how.
struct Decide {
    /// The link's rate in bytes per second; 0 is unthrottled.
    link: Arc<AtomicU64>,
    rng: Arc<Mutex<u64>>,
    faults: Vec<Fault>,
    rate: Arc<AtomicU64>,
    only: Arc<Mutex<Option<String>>>,
    forced: Arc<AtomicU64>,
    stats: Arc<Stats>,
}

impl Decide {
    fn fault_for(&self, request_line: &str) -> Option<Fault> {
        let n = self.stats.requests.fetch_add(1, Ordering::SeqCst);
        if let Some(needle) = self.only.lock().unwrap().as_deref() {
            if !request_line.contains(needle) {
                return None;
            }
        }
        let forced = self
            .forced
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if forced && !self.faults.is_empty() {
            return Some(self.faults[(n as usize) % self.faults.len()]);
        }
        let rate = f64::from_bits(self.rate.load(Ordering::SeqCst));
        let fault = (next_unit(&self.rng) < rate && !self.faults.is_empty())
            .then(|| self.faults[(n as usize) % self.faults.len()]);
        // "PUT /cache/nar/x.nar.zst HTTP/1.1" → "PUT /cache/nar/x.nar.zst"
        let target: String = request_line
            .rsplit_once(' ')
            .map_or(request_line, |(head, _)| head)
            .to_owned();
        let mut by_target = self.stats.by_target.lock().unwrap();
        let counts = by_target.entry(target).or_default();
        counts.0 += 1;
        if let Some(fault) = fault {
            counts.1 += 1;
            *self
                .stats
                .by_fault
                .lock()
                .unwrap()
                .entry(format!("{fault:?}"))
                .or_default() += 1;
        }
        fault
    }
}

/// Reads `length` bytes, paced to `bytes_per_sec` when it is not 0.
fn read_body(
    reader: &mut impl Read,
    length: usize,
    bytes_per_sec: u64,
) -> std::io::Result<Vec<u8>> {
    let mut body = vec![0u8; length];
    if bytes_per_sec == 0 {
        reader.read_exact(&mut body)?;
        return Ok(body);
    }
    let started = std::time::Instant::now();
    let mut done = 0;
    while done < length {
        let n = (length - done).min(16 * 1024);
        reader.read_exact(&mut body[done..done + n])?;
        done += n;
        let due = Duration::from_secs_f64(done as f64 / bytes_per_sec as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(body)
}

/// xorshift64: deterministic, dependency-free randomness for fault decisions.
fn next_unit(state: &Mutex<u64>) -> f64 {
    let mut s = state.lock().unwrap();
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    (*s >> 11) as f64 / (1u64 << 53) as f64
}

fn handle(
    client: TcpStream,
    upstream_port: u16,
    decide: &Decide,
    stall: Duration,
) -> std::io::Result<()> {
    let stats = &*decide.stats;
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("connection:") {
            continue;
        }
        if line == "\r\n" {
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            break;
        }
        head.extend_from_slice(line.as_bytes());
    }
    let request_line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let fault = decide.fault_for(&request_line);
    let mut client = client;
    let superseded = fault == Some(Fault::Superseded);
    match fault.filter(|f| *f != Fault::Superseded) {
        Some(Fault::ResetMidBody) => {
            stats.faults.fetch_add(1, Ordering::SeqCst);
            let mut half = vec![0u8; content_length / 2];
            let _ = reader.read_exact(&mut half);
            // Close with unread data pending, which makes the kernel send a reset.
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        Some(other) => {
            let mut body = vec![0u8; content_length];
            reader.read_exact(&mut body)?;
            stats.faults.fetch_add(1, Ordering::SeqCst);
            match other {
                Fault::ServerError => client.write_all(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops\n",
                )?,
                Fault::TooManyRequests => client.write_all(
                    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )?,
                Fault::EchoHeaders => {
                    let answer = format!(
                        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        head.len()
                    );
                    client.write_all(answer.as_bytes())?;
                    client.write_all(&head)?;
                }
                Fault::InsufficientStorage => client.write_all(
                    b"HTTP/1.1 507 Insufficient Storage\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )?,
                Fault::SlowDown => client.write_all(
                    b"HTTP/1.1 503 Slow Down\r\nContent-Length: 87\r\nConnection: close\r\n\r\n\
                      <Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
                )?,
                Fault::ExpiredToken => {
                    let body = "<Error><Code>ExpiredToken</Code><Message>The provided token has expired.</Message></Error>";
                    let answer = format!(
                        "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    client.write_all(answer.as_bytes())?;
                }
                Fault::Stall => std::thread::sleep(stall),
                Fault::ResetMidBody | Fault::Superseded => {}
            }
            return Ok(());
        }
        None => {}
    }
    let body = read_body(
        &mut reader,
        content_length,
        decide.link.load(Ordering::SeqCst),
    )?;
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    upstream.write_all(&head)?;
    upstream.write_all(&body)?;
    let mut response = Vec::new();
    upstream.read_to_end(&mut response)?;
    if superseded {
        stats.faults.fetch_add(1, Ordering::SeqCst);
        let body = "<Error><Code>NoSuchUpload</Code><Message>The specified upload does not exist.</Message></Error>";
        response = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
    }
    client.write_all(&response)?;
    stats.forwarded.fetch_add(1, Ordering::SeqCst);
    // "HTTP/1.1 412 Precondition Failed" → 412
    let status = String::from_utf8_lossy(&response[..response.len().min(32)])
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let target = request_line
        .split(' ')
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    stats.answered.lock().unwrap().push((target, status));
    Ok(())
}
