//! Where NARs go: the [`Backend`] trait, its error classification, and the backend chosen from config.
//!
//! The engine hands a backend a finished, compressed NAR in a file (its size and SHA-256 known) plus the signed
//! narinfo that describes it. A backend stores the NAR first and the narinfo last, so a reader never sees a
//! narinfo whose NAR is missing. Only the modules below this one speak HTTP, S3 or Cachix.

pub mod cachix;
pub mod credentials;
pub mod documents;
pub mod file;
pub mod gate;
pub mod http;
pub mod parts;
pub mod race;
pub mod rate;
pub mod s3;
pub mod target;
pub mod throttle;
pub mod upstream;
pub mod wire;

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::config::{self, Config};
use crate::hash::Sha256Hash;
use crate::narinfo::NarInfo;
use crate::store_path::StorePath;

pub use credentials::Credentials;
pub use documents::DocumentBytes;
pub use gate::NarinfoGate;
pub use target::{Kind, Target};

/// A compressed NAR waiting in a local file.
#[derive(Debug, Clone, Copy)]
pub struct NarFile<'a> {
    /// The file.
    pub path: &'a Path,
    /// Its length in bytes (`FileSize`).
    pub size: u64,
    /// SHA-256 of its bytes (`FileHash`).
    pub sha256: Sha256Hash,
}

/// One path's upload: its compressed NAR and the narinfo that describes it.
#[derive(Debug, Clone, Copy)]
pub struct NarUpload<'a> {
    /// The narinfo, written last.
    pub narinfo: &'a NarInfo,
    /// The NAR file its `URL` names.
    pub nar: NarFile<'a>,
}

/// What a backend learned about its target when it got ready.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TargetInfo {
    /// The URL Nix substitutes from (`substituters = …`), when the backend knows it.
    pub read_url: Option<String>,
    /// Public keys the target advertises (Cachix), `name:base64`.
    pub public_keys: Vec<String>,
    /// Compression the target prefers, if it says.
    pub preferred_compression: Option<config::Compression>,
    /// Statistics the target offers (e.g. Cachix cache info), shown by `status`.
    pub stats: Option<serde_json::Value>,
}

/// A binary cache nixpush can write to.
///
/// `impl Future + Send` rather than `async fn` so the engine can spawn the futures; pick the implementation with
/// [`AnyBackend`] rather than `dyn`.
pub trait Backend: Send + Sync {
    /// Gets the target ready (e.g. writes `nix-cache-info`) and reports what it learned. Called before uploads
    /// start and again after an authentication pause.
    fn prepare(&self) -> impl Future<Output = Result<TargetInfo, Error>> + Send;

    /// Which of `paths` the target does not have yet.
    fn missing(
        &self,
        paths: &[StorePath],
    ) -> impl Future<Output = Result<Vec<StorePath>, Error>> + Send;

    /// Stores `nar`, then, once `gate` lets it ([`NarinfoGate::nar_stored`]), `narinfo`; when the gate refuses,
    /// the narinfo is not written and the upload ends with [`Error::Interrupted`]. Idempotent: uploading the same
    /// path again is harmless.
    fn upload_when(
        &self,
        upload: NarUpload<'_>,
        gate: NarinfoGate,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Stores `nar`, then `narinfo`, at once: for a path whose references are in the cache.
    #[allow(clippy::manual_async_fn)]
    fn upload(
        &self,
        narinfo: &NarInfo,
        nar: NarFile<'_>,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        async move {
            self.upload_when(NarUpload { narinfo, nar }, NarinfoGate::open())
                .await
        }
    }

    /// A directory on the target's own filesystem where the engine should write compressed NARs, so that
    /// `upload` can rename instead of copy. `None`: the engine's temporary directory.
    fn staging_dir(&self) -> Option<PathBuf> {
        None
    }

    /// Stores a small document (see [`documents`]) at its key, replacing any there. Only called for documents
    /// the target can hold (not in [`Backend::cannot_store`]). The default refuses, for targets (and test
    /// fakes) that hold only NARs and narinfos.
    fn put_document(
        &self,
        document: DocumentBytes,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        let key = document.key;
        async move { Err(Error::Config(format!("this target cannot store {key}"))) }
    }

    /// Reads a small document; `None` when the target has nothing at `key`. The default has nothing.
    fn get_document(
        &self,
        _key: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, Error>> + Send {
        async { Ok(None) }
    }

    /// What of a complete cache this target's API cannot take; empty for a plain binary cache.
    fn cannot_store(&self) -> &'static [documents::Document] {
        &[]
    }
}

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

/// How many narinfo HEADs [`missing_narinfos`] has in flight at once.
const PARALLEL_HEADS: usize = 16;

/// The presence query of a cache that answers one request per narinfo (HTTP, S3): the paths whose
/// `<hash>.narinfo` `exists` does not find, asked [`PARALLEL_HEADS`] at a time, in the order given.
pub(crate) async fn missing_narinfos<F, Fut>(
    paths: &[StorePath],
    exists: F,
) -> Result<Vec<StorePath>, Error>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<bool, Error>>,
{
    use futures_util::stream::{self, StreamExt as _, TryStreamExt as _};
    let exists = &exists;
    let answers: Vec<(StorePath, bool)> = stream::iter(paths.iter().cloned())
        .map(|path| async move {
            let present = exists(documents::narinfo_key(&path)).await?;
            Ok::<_, Error>((path, present))
        })
        .buffered(PARALLEL_HEADS)
        .try_collect()
        .await?;
    Ok(answers
        .into_iter()
        .filter(|(_, present)| !present)
        .map(|(path, _)| path)
        .collect())
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

/// The backend a configuration asks for.
pub enum AnyBackend {
    /// `file:///dir`
    File(file::FileBackend),
    /// `http://…`, `https://…`
    Http(http::HttpBackend),
    /// `cachix://name`
    Cachix(cachix::CachixBackend),
    /// `s3://bucket?…`
    S3(s3::S3Backend),
}

impl AnyBackend {
    /// Builds the backend for `config.target.url`.
    pub fn from_config(config: &Config, credentials: Credentials) -> Result<AnyBackend, Error> {
        let url = &config.target.url;
        let scheme = url.split("://").next().unwrap_or_default();
        match scheme {
            "file" => Ok(AnyBackend::File(file::FileBackend::new(url, config)?)),
            "http" | "https" => Ok(AnyBackend::Http(http::HttpBackend::new(
                url,
                config,
                credentials,
            )?)),
            "cachix" => Ok(AnyBackend::Cachix(cachix::CachixBackend::new(
                url,
                config,
                credentials,
            )?)),
            "s3" => Ok(AnyBackend::S3(s3::S3Backend::new(url, config)?)),
            other => Err(Error::Config(format!(
                "the {other}:// backend is not available in this build of nixpush"
            ))),
        }
    }

    /// A short description for logs and status (password-redacted URL).
    pub fn describe(&self, config: &Config) -> String {
        config::redact_url(&config.target.url)
    }
}

/// An error for a document key that would leave the cache ([`documents::is_safe_key`]).
fn refuse_unsafe_key(key: &str) -> Result<(), Error> {
    if documents::is_safe_key(key) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "document key {key:?} points outside the cache"
        )))
    }
}

impl Backend for AnyBackend {
    async fn prepare(&self) -> Result<TargetInfo, Error> {
        match self {
            AnyBackend::File(b) => b.prepare().await,
            AnyBackend::Http(b) => b.prepare().await,
            AnyBackend::Cachix(b) => b.prepare().await,
            AnyBackend::S3(b) => b.prepare().await,
        }
    }

    async fn missing(&self, paths: &[StorePath]) -> Result<Vec<StorePath>, Error> {
        match self {
            AnyBackend::File(b) => b.missing(paths).await,
            AnyBackend::Http(b) => b.missing(paths).await,
            AnyBackend::Cachix(b) => b.missing(paths).await,
            AnyBackend::S3(b) => b.missing(paths).await,
        }
    }

    async fn upload_when(&self, upload: NarUpload<'_>, gate: NarinfoGate) -> Result<(), Error> {
        match self {
            AnyBackend::File(b) => b.upload_when(upload, gate).await,
            AnyBackend::Http(b) => b.upload_when(upload, gate).await,
            AnyBackend::Cachix(b) => b.upload_when(upload, gate).await,
            AnyBackend::S3(b) => b.upload_when(upload, gate).await,
        }
    }

    fn staging_dir(&self) -> Option<PathBuf> {
        match self {
            AnyBackend::File(b) => b.staging_dir(),
            AnyBackend::Http(b) => b.staging_dir(),
            AnyBackend::Cachix(b) => b.staging_dir(),
            AnyBackend::S3(b) => b.staging_dir(),
        }
    }

    async fn put_document(&self, document: DocumentBytes) -> Result<(), Error> {
        refuse_unsafe_key(&document.key)?;
        match self {
            AnyBackend::File(b) => b.put_document(document).await,
            AnyBackend::Http(b) => b.put_document(document).await,
            AnyBackend::Cachix(b) => b.put_document(document).await,
            AnyBackend::S3(b) => b.put_document(document).await,
        }
    }

    async fn get_document(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        refuse_unsafe_key(key)?;
        match self {
            AnyBackend::File(b) => b.get_document(key).await,
            AnyBackend::Http(b) => b.get_document(key).await,
            AnyBackend::Cachix(b) => b.get_document(key).await,
            AnyBackend::S3(b) => b.get_document(key).await,
        }
    }

    fn cannot_store(&self) -> &'static [documents::Document] {
        match self {
            AnyBackend::File(b) => b.cannot_store(),
            AnyBackend::Http(b) => b.cannot_store(),
            AnyBackend::Cachix(b) => b.cannot_store(),
            AnyBackend::S3(b) => b.cannot_store(),
        }
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
