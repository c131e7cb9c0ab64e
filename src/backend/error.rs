//! A failure talking to a target, and what the engine does about it: whether trying again can succeed, whether
//! the token was refused, whether the target itself is full or failing, and the per-request retries that
//! absorb a transient fault before it reaches the engine.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A failure talking to the target. URLs in messages have their passwords and signatures redacted; tokens
/// never appear.
///
/// Much of the text comes from the target (error bodies, redirect URLs, transport errors quoting presigned
/// URLs), so `Display` and `Debug` pass every message through [`crate::secret::scrub`]: whatever a backend
/// puts in an error, no secret nixpush knows can reach a log line, `status` or the queue through it.
pub enum Error {
    /// No connection could be made.
    Connect {
        /// The URL, redacted.
        url: String,
        /// What failed.
        message: String,
    },
    /// The target did not answer in time.
    Timeout {
        /// The URL, redacted.
        url: String,
    },
    /// The connection broke while sending or receiving.
    Transfer {
        /// The URL, redacted.
        url: String,
        /// What failed.
        message: String,
    },
    /// The target answered with an unexpected status.
    Status {
        /// Request method.
        method: String,
        /// The URL, redacted.
        url: String,
        /// HTTP status code.
        code: u16,
        /// The server's `Retry-After` (or equivalent), if any.
        retry_after: Option<Duration>,
        /// The start of the response body, for the log.
        detail: String,
    },
    /// The target rejected our credentials (401/403): retrying cannot help until they change.
    Unauthorized {
        /// The URL, redacted.
        url: String,
        /// 401 or 403.
        code: u16,
        /// The start of the response body.
        detail: String,
    },
    /// The target answered something we cannot accept (malformed, oversized, a redirect elsewhere).
    Protocol {
        /// The URL, redacted.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// Another writer of the same cache got in the way (its upload of the same object superseded ours, or its
    /// conditional write is in flight) and the object is not there yet: the path is tried again.
    Contended {
        /// The object's URL, redacted.
        url: String,
        /// What the target answered.
        detail: String,
    },
    /// A local file could not be read or written.
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The target URL or its options are unusable.
    Config(String),
    /// The upload was stopped on purpose (Ctrl-C in `push`, or shutdown during a rate hold).
    Interrupted,
}

impl Error {
    /// The message before scrubbing; only [`fmt::Display`] may see it.
    fn unscrubbed(&self) -> String {
        match self {
            Error::Connect { url, message } => format!("cannot connect to {url}: {message}"),
            Error::Timeout { url } => format!("{url} did not answer in time"),
            Error::Transfer { url, message } => format!("transfer to {url} broke: {message}"),
            Error::Status {
                method,
                url,
                code,
                detail,
                ..
            } => format!(
                "{method} {url} answered HTTP {code}{}",
                detail_suffix(detail)
            ),
            Error::Unauthorized { url, code, detail } => format!(
                "{url} rejected the credentials (HTTP {code}){}",
                detail_suffix(detail)
            ),
            Error::Protocol { url, message } => {
                format!("{url} sent an invalid response: {message}")
            }
            Error::Contended { url, detail } => format!(
                "{url}: another writer of the same object got in the way and it is not complete yet ({detail})"
            ),
            Error::Io { path, source } => format!("{}: {source}", path.display()),
            Error::Config(message) => format!("invalid target: {message}"),
            Error::Interrupted => "upload interrupted".to_owned(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::secret::scrub(&self.unscrubbed()))
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("backend::Error")
            .field(&self.to_string())
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Connect { .. }
            | Error::Timeout { .. }
            | Error::Transfer { .. }
            | Error::Status { .. }
            | Error::Unauthorized { .. }
            | Error::Protocol { .. }
            | Error::Contended { .. }
            | Error::Config(_)
            | Error::Interrupted => None,
        }
    }
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl Error {
    /// Whether trying again later can succeed. Decides requeue-with-backoff versus parking as failed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout { .. } | Error::Transfer { .. } => true,
            Error::Status { code, .. } => matches!(code, 408 | 429 | 500..=599),
            // The other writer finishes or gives up; either way a later try succeeds.
            Error::Contended { .. } => true,
            // A full or flaky local disk recovers; the path is still worth uploading.
            Error::Io { .. } => true,
            // Auth failures pause the whole target instead of burning attempts; see `is_auth`.
            Error::Unauthorized { .. } => false,
            Error::Protocol { .. } | Error::Config(_) => false,
            // Stopped on purpose; whoever stopped it decides what happens to the path.
            Error::Interrupted => false,
        }
    }

    /// Why the target as a whole cannot take writes now, when that is the problem: a full disk or quota, a
    /// read-only or failing filesystem under a `file://` cache, HTTP 507 Insufficient Storage, S3's 503 SlowDown.
    /// Such faults heal (space is freed, the throttle lifts) and are no path's fault: the scheduler retries with
    /// a backoff of the target's own, spends no attempt, and shows the target as degraded.
    pub fn target_fault(&self) -> Option<String> {
        match self {
            Error::Io { source, .. } => io_target_fault(source),
            Error::Status { code: 507, .. } => {
                Some("the target has no space left (HTTP 507)".into())
            }
            Error::Status {
                code: 503, detail, ..
            } if detail.contains("SlowDown") => {
                Some("the target asks to slow down (HTTP 503 SlowDown)".into())
            }
            Error::Status { .. }
            | Error::Connect { .. }
            | Error::Timeout { .. }
            | Error::Transfer { .. }
            | Error::Unauthorized { .. }
            | Error::Protocol { .. }
            | Error::Contended { .. }
            | Error::Config(_)
            | Error::Interrupted => None,
        }
    }

    /// Whether the target rejected our credentials, so the whole target should pause until they change.
    pub fn is_auth(&self) -> bool {
        match self {
            Error::Unauthorized { .. } => true,
            Error::Connect { .. }
            | Error::Timeout { .. }
            | Error::Transfer { .. }
            | Error::Status { .. }
            | Error::Contended { .. }
            | Error::Io { .. }
            | Error::Protocol { .. }
            | Error::Config(_)
            | Error::Interrupted => false,
        }
    }

    /// The server's own idea of when to come back, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Status { retry_after, .. } => *retry_after,
            Error::Connect { .. }
            | Error::Timeout { .. }
            | Error::Transfer { .. }
            | Error::Unauthorized { .. }
            | Error::Contended { .. }
            | Error::Protocol { .. }
            | Error::Io { .. }
            | Error::Config(_)
            | Error::Interrupted => None,
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The reason when `error` is a filesystem fault that heals (ENOSPC, EDQUOT, EROFS, EIO), see
/// [`Error::target_fault`].
pub fn io_target_fault(error: &std::io::Error) -> Option<String> {
    const EIO: i32 = 5;
    const ENOSPC: i32 = 28;
    const EROFS: i32 = 30;
    const EDQUOT: i32 = 122;
    match error.raw_os_error()? {
        ENOSPC | EDQUOT | EROFS | EIO => Some(error.to_string()),
        _ => None,
    }
}

/// How often one request is tried before its error goes up to the engine (which then backs off per path).
pub const REQUEST_ATTEMPTS: u32 = 4;
/// The longest a single request waits on a server's `Retry-After` before giving the error to the engine.
pub const MAX_REQUEST_WAIT: Duration = Duration::from_secs(30);

/// Runs `request` until it succeeds, fails permanently, or [`REQUEST_ATTEMPTS`] tries failed, under
/// [`crate::retry::Policy::per_request`]: between tries it waits the server's `Retry-After` (up to
/// [`MAX_REQUEST_WAIT`]) or 250 ms doubling. A transient fault then costs one request, not a whole path.
pub async fn with_retries<T, F, Fut>(request: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let policy = crate::retry::Policy::per_request(REQUEST_ATTEMPTS, MAX_REQUEST_WAIT);
    crate::retry::with_retries(&policy, "request", request).await
}

impl crate::retry::Transient for Error {
    fn is_retryable(&self) -> bool {
        Error::is_retryable(self)
    }

    fn retry_after(&self) -> Option<Duration> {
        Error::retry_after(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Error {
        Error::Status {
            method: "PUT".into(),
            url: "http://127.0.0.1/x".into(),
            code,
            retry_after: None,
            detail: String::new(),
        }
    }

    #[test]
    fn classification() {
        for code in [408, 429, 500, 502, 503, 599] {
            assert!(status(code).is_retryable(), "{code}");
        }
        for code in [400, 404, 405, 409, 413] {
            assert!(!status(code).is_retryable(), "{code}");
        }
        let auth = Error::Unauthorized {
            url: "u".into(),
            code: 401,
            detail: String::new(),
        };
        assert!(auth.is_auth() && !auth.is_retryable());
        assert!(Error::Timeout { url: "u".into() }.is_retryable());
    }

    // See: #15
    #[test]
    fn full_read_only_and_failing_targets_are_target_faults() {
        for errno in [5, 28, 30, 122] {
            let e = Error::io(Path::new("/c"), std::io::Error::from_raw_os_error(errno));
            assert!(e.is_retryable() && e.target_fault().is_some(), "{errno}");
        }
        let e = Error::io(Path::new("/c"), std::io::Error::from_raw_os_error(13));
        assert!(e.target_fault().is_none());
        assert!(status(507).target_fault().is_some() && status(507).is_retryable());
        let slow_down = Error::Status {
            method: "PUT".into(),
            url: "http://127.0.0.1/x".into(),
            code: 503,
            retry_after: None,
            detail: "<Error><Code>SlowDown</Code></Error>".into(),
        };
        assert!(slow_down.target_fault().is_some());
        assert!(status(503).target_fault().is_none());
        assert!(status(500).target_fault().is_none());
    }
}
