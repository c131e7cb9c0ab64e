//! Why a path (and so the roots that need it) could not be uploaded, classified for the scheduler: retry with
//! backoff, pause the target, or park the path as failed.

use std::sync::Arc;
use std::time::Duration;

use crate::backend;
use crate::hash::Sha256Hash;
use crate::pathinfo;
use crate::store_path::StorePath;

use super::prepare;

/// Why a path (and so the roots that need it) could not be uploaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The target failed.
    #[error(transparent)]
    Backend(#[from] backend::Error),
    /// The local store could not tell us about the path.
    #[error(transparent)]
    Store(#[from] pathinfo::Error),
    /// The NAR could not be produced.
    #[error(transparent)]
    Prepare(#[from] prepare::Error),
    /// The target could not say which paths it already has. Not any one path's fault: the daemon queues the
    /// batch again without spending the paths' attempts, unless the error is permanent.
    #[error("cannot ask the target which paths it already has: {0}")]
    Presence(#[source] backend::Error),
    /// The path is no longer in the store (garbage-collected after it was queued).
    #[error("{0} is no longer valid in the local store (garbage-collected?)")]
    Gone(StorePath),
    /// The bytes on disk do not match what Nix recorded: uploading them would poison the cache.
    #[error(
        "{path} is corrupt: Nix recorded NarHash {recorded} but its contents hash to {computed}"
    )]
    Corrupt {
        /// The store path.
        path: StorePath,
        /// `NarHash` in Nix's database.
        recorded: Sha256Hash,
        /// What nixpush computed from the bytes it streamed.
        computed: Sha256Hash,
    },
    /// A reference of this path failed, so its narinfo must not be published.
    #[error("{path} was not uploaded because its reference {reference} failed: {cause}")]
    DependencyFailed {
        /// The path held back.
        path: StorePath,
        /// The reference that failed.
        reference: StorePath,
        /// Why the reference failed.
        cause: Arc<Error>,
    },
    /// `resign_existing` found a narinfo in the target that describes other bytes than the local store has:
    /// damage to report, not something to sign.
    #[error(
        "not re-signing {path}: the target's narinfo does not match the local store ({reason})"
    )]
    TargetMismatch {
        /// The store path.
        path: StorePath,
        /// What differs.
        reason: String,
    },
    /// The build log could not be read from Nix's log directory.
    #[error(transparent)]
    Log(#[from] crate::buildlog::Error),
    /// The upload was interrupted by shutdown.
    #[error("interrupted by shutdown")]
    Cancelled,
    /// The rate schedule held the target (rate 0) while the upload was in flight, and the request ended (the
    /// server or the client timed out waiting for bytes). No fault of the path: it is sent again after the hold
    /// without spending an attempt.
    #[error("held by the rate schedule while in flight, and the request ended: {0}")]
    Held(Box<Error>),
    /// A worker thread died.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Backend(e) | Error::Presence(e) => e.is_retryable(),
            // A store that cannot be read now (locked DB, transient I/O) may be readable later.
            Error::Store(_) => true,
            Error::Prepare(prepare::Error::Temp { .. }) => true,
            Error::Prepare(prepare::Error::Nar { .. } | prepare::Error::Listing { .. }) => false,
            // An unreadable log file (permissions, a disk error) may be fixed; the path waits for it.
            Error::Log(_) => true,
            Error::TargetMismatch { .. } => false,
            Error::Gone(_) | Error::Corrupt { .. } => false,
            Error::DependencyFailed { .. } => true,
            Error::Cancelled | Error::Internal(_) => true,
            Error::Held(_) => true,
        }
    }

    /// Why the target as a whole cannot take writes now (full, read-only, throttling), when that is the problem;
    /// see [`backend::Error::target_fault`]. A NAR staged on the target's filesystem counts too.
    pub fn target_fault(&self) -> Option<String> {
        match self {
            Error::Backend(e) | Error::Presence(e) => e.target_fault(),
            Error::Prepare(prepare::Error::Temp { source, .. }) => backend::io_target_fault(source),
            Error::DependencyFailed { cause, .. } => cause.target_fault(),
            Error::Store(_)
            | Error::Prepare(prepare::Error::Nar { .. } | prepare::Error::Listing { .. })
            | Error::Gone(_)
            | Error::Corrupt { .. }
            | Error::Log(_)
            | Error::TargetMismatch { .. }
            | Error::Cancelled
            | Error::Held(_)
            | Error::Internal(_) => None,
        }
    }

    /// Whether the target rejected our credentials.
    pub fn is_auth(&self) -> bool {
        match self {
            Error::Backend(e) | Error::Presence(e) => e.is_auth(),
            Error::Store(_)
            | Error::Prepare(_)
            | Error::Gone(_)
            | Error::Corrupt { .. }
            | Error::DependencyFailed { .. }
            | Error::Cancelled
            | Error::Held(_)
            | Error::Log(_)
            | Error::TargetMismatch { .. }
            | Error::Internal(_) => false,
        }
    }

    /// The server's requested delay, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Backend(e) | Error::Presence(e) => e.retry_after(),
            _ => None,
        }
    }
}
