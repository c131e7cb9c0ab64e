//! Why an upload failed, as a short class for metrics (`reason="network"`): the same questions the scheduler asks
//! of an [`Error`] (is it the credentials, a fault of the whole target, retryable?) answered with one word, so a
//! dashboard can tell a flaky link from a full disk or a damaged store path.
//!
//! The classes are a closed list ([`FailureClass::ALL`]), so a metric's label values stay bounded; the matches
//! are exhaustive, so a new error variant has to be placed in a class.

use crate::backend;

use super::{prepare, Error};

/// The class of an upload failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureClass {
    /// No connection, a timeout, or a transfer that broke.
    Network,
    /// The target rejected the credentials.
    Auth,
    /// The target asked to slow down (HTTP 408, 429).
    Throttled,
    /// The target is full, read-only or its filesystem fails (see [`backend::Error::target_fault`]).
    Degraded,
    /// The target failed (HTTP 5xx) or sent an invalid answer.
    Server,
    /// The target refused the request as wrong (other HTTP 4xx), or the target is misconfigured.
    Client,
    /// The target answered 404 or 410 where the object should be.
    NotFound,
    /// Another writer of the same object got in the way.
    Conflict,
    /// A local file (the temporary NAR, a staged file) could not be written or read.
    LocalIo,
    /// The local Nix store could not be read.
    Store,
    /// The path's bytes do not match what Nix recorded, its NAR cannot be made, or the target holds other bytes.
    Damaged,
    /// The path was garbage-collected before it could be uploaded.
    Collected,
    /// The build log could not be read.
    Log,
    /// The upload was interrupted by shutdown (or Ctrl-C in `push`).
    Cancelled,
    /// The request ended while `rate_schedule` held the target (requeued without an attempt).
    Held,
    /// A worker died.
    Internal,
}

impl FailureClass {
    /// Every class, in label order.
    pub const ALL: [FailureClass; 16] = [
        FailureClass::Network,
        FailureClass::Auth,
        FailureClass::Throttled,
        FailureClass::Degraded,
        FailureClass::Server,
        FailureClass::Client,
        FailureClass::NotFound,
        FailureClass::Conflict,
        FailureClass::LocalIo,
        FailureClass::Store,
        FailureClass::Damaged,
        FailureClass::Collected,
        FailureClass::Log,
        FailureClass::Cancelled,
        FailureClass::Held,
        FailureClass::Internal,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Network => "network",
            FailureClass::Auth => "auth",
            FailureClass::Throttled => "throttled",
            FailureClass::Degraded => "degraded",
            FailureClass::Server => "server",
            FailureClass::Client => "client",
            FailureClass::NotFound => "not_found",
            FailureClass::Conflict => "conflict",
            FailureClass::LocalIo => "local_io",
            FailureClass::Store => "store",
            FailureClass::Damaged => "damaged",
            FailureClass::Collected => "collected",
            FailureClass::Log => "log",
            FailureClass::Cancelled => "cancelled",
            FailureClass::Held => "held",
            FailureClass::Internal => "internal",
        }
    }

    /// The class of a failure talking to the target.
    pub fn of_backend(error: &backend::Error) -> FailureClass {
        if error.target_fault().is_some() {
            return FailureClass::Degraded;
        }
        match error {
            backend::Error::Connect { .. }
            | backend::Error::Timeout { .. }
            | backend::Error::Transfer { .. } => FailureClass::Network,
            backend::Error::Unauthorized { .. } => FailureClass::Auth,
            backend::Error::Status { code, .. } => match code {
                404 | 410 => FailureClass::NotFound,
                408 | 429 => FailureClass::Throttled,
                500..=599 => FailureClass::Server,
                _ => FailureClass::Client,
            },
            backend::Error::Protocol { .. } => FailureClass::Server,
            backend::Error::Contended { .. } => FailureClass::Conflict,
            backend::Error::Io { .. } => FailureClass::LocalIo,
            backend::Error::Config(_) => FailureClass::Client,
            backend::Error::Interrupted => FailureClass::Cancelled,
        }
    }
}

impl Error {
    /// The failure's class; a path held back by a failed reference takes the class of that failure.
    pub fn class(&self) -> FailureClass {
        match self {
            Error::Backend(e) | Error::Presence(e) => FailureClass::of_backend(e),
            Error::Store(_) => FailureClass::Store,
            Error::Prepare(prepare::Error::Temp { source, .. }) => {
                if backend::io_target_fault(source).is_some() {
                    FailureClass::Degraded
                } else {
                    FailureClass::LocalIo
                }
            }
            Error::Prepare(prepare::Error::Nar { .. } | prepare::Error::Listing { .. }) => {
                FailureClass::Damaged
            }
            Error::Gone(_) => FailureClass::Collected,
            Error::Corrupt { .. } | Error::TargetMismatch { .. } => FailureClass::Damaged,
            Error::DependencyFailed { cause, .. } => cause.class(),
            Error::Log(_) => FailureClass::Log,
            Error::Cancelled => FailureClass::Cancelled,
            Error::Held(_) => FailureClass::Held,
            Error::Internal(_) => FailureClass::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;
    use crate::store_path::StorePath;

    fn status(code: u16, detail: &str) -> Error {
        Error::Backend(backend::Error::Status {
            method: "PUT".into(),
            url: "u".into(),
            code,
            retry_after: None,
            detail: detail.into(),
        })
    }

    #[test]
    fn classes_follow_the_scheduler_s_questions() {
        assert_eq!(status(503, "").class(), FailureClass::Server);
        assert_eq!(
            status(503, "<Code>SlowDown</Code>").class(),
            FailureClass::Degraded
        );
        assert_eq!(status(507, "").class(), FailureClass::Degraded);
        assert_eq!(status(429, "").class(), FailureClass::Throttled);
        assert_eq!(status(404, "").class(), FailureClass::NotFound);
        assert_eq!(status(400, "").class(), FailureClass::Client);
        let timeout = Error::Presence(backend::Error::Timeout { url: "u".into() });
        assert_eq!(timeout.class(), FailureClass::Network);
        let auth = Error::Backend(backend::Error::Unauthorized {
            url: "u".into(),
            code: 401,
            detail: String::new(),
        });
        assert_eq!(auth.class(), FailureClass::Auth);
        let full = Error::Prepare(prepare::Error::Temp {
            file: PathBuf::from("/t"),
            source: std::io::Error::from_raw_os_error(28),
        });
        assert_eq!(full.class(), FailureClass::Degraded);
        let path = StorePath::parse(
            "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top",
            "/nix/store",
        )
        .unwrap();
        assert_eq!(Error::Gone(path.clone()).class(), FailureClass::Collected);
        let held = Error::DependencyFailed {
            path: path.clone(),
            reference: path,
            cause: Arc::new(status(500, "")),
        };
        assert_eq!(held.class(), FailureClass::Server);
    }

    #[test]
    fn label_values_are_distinct_snake_case() {
        let names: std::collections::BTreeSet<&str> =
            FailureClass::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), FailureClass::ALL.len());
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    }
}
