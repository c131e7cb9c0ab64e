//! The hook socket's wire format, shared by the hook, the CLI and the daemon. Blocking std I/O only, so the hook
//! stays free of an async runtime.
//!
//! Every message is one frame: a 4-byte big-endian length `N` (1 ≤ `N` ≤ [`MAX_FRAME_BYTES`]), then `N` bytes of
//! JSON carrying the protocol version `v`. A request and its reply:
//!
//! ```text
//! → 00 00 00 77 {"v":1,"op":"enqueue","drv_path":"/nix/store/hrnw32bvgf2gvs4zqkcrbqwbjhi40kq8-ht-a.drv","out_paths":[],"source":"hook"}
//! ← 00 00 00 70 {"v":1,"reply":"ack","accepted":["/nix/store/5mq8v1yxr6jvfwcjgv2x9rqn8kdw8qlq-ht-a"],"duplicate":0,"refused":[]}
//! ```
//!
//! A connection may carry several requests, one after the other. The daemon answers a malformed, oversized or
//! too-slow request with an [`Response::Error`] and closes the connection.
//!
//! `tests` pins the wire format: a golden string per message and the round-trip properties.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::time::{TimeVal, TimeValLike};
use serde::{Deserialize, Serialize};

use crate::status::StatusReport;
use crate::store_path::StorePath;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Largest frame payload either side accepts.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Most queue entries in one `List` answer, so that a page stays far below [`MAX_FRAME_BYTES`].
pub const MAX_LIST_PAGE: usize = 1000;
/// Most refusals spelled out in one answer; the rest are counted.
pub const MAX_REFUSALS_SHOWN: usize = 20;

/// Why a frame could not be sent, received or understood.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting failed (no daemon, permission, …).
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// What the OS said.
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("socket i/o failed: {0}")]
    Io(#[from] io::Error),
    /// The exchange did not finish in time.
    #[error("no complete answer within {timeout_ms} ms")]
    Timeout {
        /// The deadline that passed.
        timeout_ms: u64,
    },
    /// The peer closed the connection before a complete frame.
    #[error("connection closed before a complete message")]
    Closed,
    /// The announced length is over the limit.
    #[error("message of {len} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
    },
    /// The payload is not a message this version understands.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    Version(u64),
}

impl Error {
    /// The error kind sent back to a client whose request caused this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::TooLarge { .. } => ErrorKind::TooLarge,
            Error::Malformed(_) | Error::Closed => ErrorKind::Malformed,
            Error::Version(_) => ErrorKind::Version,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Connect { .. } | Error::Io(_) => ErrorKind::Internal,
        }
    }
}

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Queue a build's outputs. Nix 2.8 leaves `OUT_PATHS` empty, so `drv_path` alone is enough: the daemon then
    /// resolves the derivation's outputs.
    Enqueue {
        /// `DRV_PATH`, if set.
        #[serde(default)]
        drv_path: Option<String>,
        /// `OUT_PATHS`, split on whitespace.
        #[serde(default)]
        out_paths: Vec<String>,
        /// Who sends it: `hook`, `push`, ….
        #[serde(default = "default_source")]
        source: String,
    },
    /// The status report; anyone who can open the socket may ask.
    Status,
    /// One page of queue entries, in path order; anyone who can open the socket may ask.
    List {
        /// Start after this path (the previous page's `next`).
        #[serde(default)]
        after: Option<String>,
        /// Page size; the daemon caps it at [`MAX_LIST_PAGE`].
        #[serde(default)]
        limit: Option<usize>,
        /// Only this target's entries; every target's (in target order) when unset.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
    },
    /// Requeue failed paths now: the listed ones, or all with `all`.
    Retry {
        /// Paths to retry.
        #[serde(default)]
        paths: Vec<String>,
        /// Retry every failed path.
        #[serde(default)]
        all: bool,
        /// Only for this target; for every target when unset.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
    },
    /// Remove a path from the queue.
    Drop {
        /// The path.
        path: String,
        /// Only for this target; for every target when unset.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
    },
}

fn default_source() -> String {
    "hook".to_owned()
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    /// The request's paths are durably queued.
    Ack {
        /// Paths newly queued (or requeued from failed).
        accepted: Vec<String>,
        /// Paths that were already queued.
        duplicate: usize,
        /// Paths of this request that were refused, each as `refused PATH: reason`.
        #[serde(default)]
        refused: Vec<String>,
    },
    /// The request failed; `message` names what was wrong.
    Error {
        /// The class of failure.
        kind: ErrorKind,
        /// E.g. `refused /tmp/x: not inside the store directory /nix/store`.
        message: String,
    },
    /// The status report.
    Status(Box<StatusReport>),
    /// One page of the queue's entries.
    List {
        /// In path order.
        entries: Vec<QueueEntry>,
        /// Where the next page starts (send it as `after`); `None` on the last page.
        next: Option<String>,
    },
    /// A retry or drop took effect on these paths.
    Changed {
        /// The paths requeued or removed.
        paths: Vec<String>,
    },
}

/// One queued path, as [`Response::List`] sends it. A type of its own, converted from the queue's record by the
/// daemon, so that how the queue stores paths cannot change the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    /// The store path.
    pub path: StorePath,
    /// Where it stands.
    pub state: EntryState,
    /// Upload attempts so far.
    pub attempts: u32,
    /// Unix time (ms) before which it is not due.
    pub next_attempt_at_ms: u64,
    /// The reason the last attempt failed.
    pub last_error: Option<String>,
    /// Unix time (ms) it was first queued (or requeued from failed).
    pub enqueued_at_ms: u64,
    /// Unix time (ms) of the last change.
    pub updated_at_ms: u64,
    /// Who asked for it: `hook`, `spool`, `push`, ….
    pub source: String,
    /// The target it waits for (`default` for `[target]`).
    #[serde(default = "default_target")]
    pub target: String,
}

fn default_target() -> String {
    crate::config::DEFAULT_TARGET.to_owned()
}

/// Where a queued path stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    /// Waiting for its next attempt.
    Queued,
    /// Being uploaded.
    Uploading,
    /// Parked after too many attempts or a permanent error, until retried.
    Failed,
    /// Held back by the target's filters (`last_error` says why), until retried.
    HeldBack,
}

/// Classes of [`Response::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not a valid frame or message.
    Malformed,
    /// Over [`MAX_FRAME_BYTES`].
    TooLarge,
    /// The request did not arrive within the client deadline.
    Timeout,
    /// Another protocol version.
    Version,
    /// The peer may not do this.
    PermissionDenied,
    /// Every path in the request was refused.
    Refused,
    /// The daemon could not do it (e.g. the queue could not be written).
    Internal,
}

impl ErrorKind {
    /// Whether the daemon's answer is final: sending the same request again, later or through the spool, gets
    /// the same answer.
    pub fn is_final(self) -> bool {
        match self {
            ErrorKind::PermissionDenied | ErrorKind::Refused => true,
            ErrorKind::Malformed
            | ErrorKind::TooLarge
            | ErrorKind::Timeout
            | ErrorKind::Version
            | ErrorKind::Internal => false,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: Option<serde_json::Value>,
}

fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    let mut frame = vec![0; 4];
    // Serializing our own enums of strings and numbers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut frame, &Envelope { v: VERSION, body });
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame
}

fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, Error> {
    let version: VersionOnly =
        serde_json::from_slice(payload).map_err(|e| Error::Malformed(e.to_string()))?;
    match version.v {
        Some(v) if v.as_u64() == Some(u64::from(VERSION)) => {}
        Some(v) => return Err(Error::Version(v.as_u64().unwrap_or(0))),
        None => return Err(Error::Malformed("no protocol version `v`".into())),
    }
    let envelope: Envelope<T> =
        serde_json::from_slice(payload).map_err(|e| Error::Malformed(e.to_string()))?;
    Ok(envelope.body)
}

/// A request as a complete frame (length prefix included).
pub fn encode_request(request: &Request) -> Vec<u8> {
    encode(request)
}

/// A response as a complete frame (length prefix included).
pub fn encode_response(response: &Response) -> Vec<u8> {
    encode(response)
}

/// Decodes a request frame's payload.
pub fn decode_request(payload: &[u8]) -> Result<Request, Error> {
    decode(payload)
}

/// Decodes a response frame's payload.
pub fn decode_response(payload: &[u8]) -> Result<Response, Error> {
    decode(payload)
}

/// The payload length announced by a frame header, checked against the limit.
pub fn frame_len(header: [u8; 4]) -> Result<usize, Error> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(Error::TooLarge { len });
    }
    if len == 0 {
        return Err(Error::Malformed("empty message".into()));
    }
    Ok(len)
}

/// Reads one frame's payload.
pub fn read_frame<R: Read>(reader: &mut R) -> Result<Vec<u8>, Error> {
    let mut header = [0; 4];
    read_exact(reader, &mut header)?;
    let len = frame_len(header)?;
    let mut payload = Vec::new();
    reader.take(len as u64).read_to_end(&mut payload)?;
    if payload.len() != len {
        return Err(Error::Closed);
    }
    Ok(payload)
}

fn read_exact<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<(), Error> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Closed,
        _ => Error::Io(e),
    })
}

/// Connects to `path`, giving up after `timeout` even when the daemon's accept backlog is full (`connect` on a
/// Unix socket honours `SO_SNDTIMEO`, which std's `UnixStream::connect` offers no way to set beforehand).
pub fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, Error> {
    let connect_error = |source: io::Error| Error::Connect {
        path: path.display().to_string(),
        source,
    };
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| connect_error(e.into()))?;
    let timeval = TimeVal::milliseconds(timeout.as_millis().max(1) as i64);
    socket::setsockopt(&fd, sockopt::SendTimeout, &timeval).map_err(|e| connect_error(e.into()))?;
    let addr = UnixAddr::new(path).map_err(|e| connect_error(e.into()))?;
    socket::connect(fd.as_raw_fd(), &addr).map_err(|e| connect_error(e.into()))?;
    Ok(UnixStream::from(fd))
}

/// Sends `request` and reads the answer, all within `timeout`.
pub fn call(path: &Path, request: &Request, timeout: Duration) -> Result<Response, Error> {
    let deadline = Instant::now() + timeout;
    let timed_out = || Error::Timeout {
        timeout_ms: timeout.as_millis() as u64,
    };
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(timed_out)
    };
    let mut stream = connect(path, remaining()?)?;
    let is_timeout = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        )
    };
    stream.set_write_timeout(Some(remaining()?))?;
    stream.write_all(&encode_request(request)).map_err(|e| {
        if is_timeout(&e) {
            timed_out()
        } else {
            e.into()
        }
    })?;
    // Nothing follows: the daemon can close after its answer rather than watch for another request.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut header = [0; 4];
    read_exact_by(&mut stream, &mut header, &remaining, &timed_out)?;
    let mut payload = vec![0; frame_len(header)?];
    read_exact_by(&mut stream, &mut payload, &remaining, &timed_out)?;
    decode_response(&payload)
}

/// Fills `buf`, giving each read only the time left before the deadline (a socket read timeout alone would apply
/// afresh to every read).
fn read_exact_by(
    stream: &mut UnixStream,
    buf: &mut [u8],
    remaining: &dyn Fn() -> Result<Duration, Error>,
    timed_out: &dyn Fn() -> Error,
) -> Result<(), Error> {
    let mut filled = 0;
    while filled < buf.len() {
        stream.set_read_timeout(Some(remaining()?))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(Error::Closed),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out())
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
