//! Where NARs go: the [`Backend`] trait, its error classification, and the backend chosen from config.
//!
//! The engine hands a backend a finished, compressed NAR in a file (its size and SHA-256 known) plus the signed
//! narinfo that describes it. A backend stores the NAR first and the narinfo last, so a reader never sees a
//! narinfo whose NAR is missing. Only the modules below this one speak HTTP, S3 or Cachix.

pub mod cachix;
pub mod credentials;
pub mod file;
pub mod http;
pub mod parts;
pub mod race;
pub mod s3;
pub mod throttle;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::config::{self, Config};
use crate::hash::Sha256Hash;
use crate::narinfo::NarInfo;
use crate::store_path::StorePath;

pub use credentials::Credentials;

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

    /// Stores `nar`, then `narinfo`. Idempotent: uploading the same path again is harmless.
    fn upload(
        &self,
        narinfo: &NarInfo,
        nar: NarFile<'_>,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// A directory on the target's own filesystem where the engine should write compressed NARs, so that
    /// `upload` can rename instead of copy. `None`: the engine's temporary directory.
    fn staging_dir(&self) -> Option<PathBuf> {
        None
    }
}

/// A failure talking to the target. URLs in messages have their passwords and signatures redacted; tokens
/// never appear.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made.
    #[error("cannot connect to {url}: {message}")]
    Connect {
        /// The URL, redacted.
        url: String,
        /// What failed.
        message: String,
    },
    /// The target did not answer in time.
    #[error("{url} did not answer in time")]
    Timeout {
        /// The URL, redacted.
        url: String,
    },
    /// The connection broke while sending or receiving.
    #[error("transfer to {url} broke: {message}")]
    Transfer {
        /// The URL, redacted.
        url: String,
        /// What failed.
        message: String,
    },
    /// The target answered with an unexpected status.
    #[error("{method} {url} answered HTTP {code}{}", detail_suffix(detail))]
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
    #[error(
        "{url} rejected the credentials (HTTP {code}){}",
        detail_suffix(detail)
    )]
    Unauthorized {
        /// The URL, redacted.
        url: String,
        /// 401 or 403.
        code: u16,
        /// The start of the response body.
        detail: String,
    },
    /// The target answered something we cannot accept (malformed, oversized, a redirect elsewhere).
    #[error("{url} sent an invalid response: {message}")]
    Protocol {
        /// The URL, redacted.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// Another writer of the same cache got in the way (its upload of the same object superseded ours, or its
    /// conditional write is in flight) and the object is not there yet: the path is tried again.
    #[error("{url}: another writer of the same object got in the way and it is not complete yet ({detail})")]
    Contended {
        /// The object's URL, redacted.
        url: String,
        /// What the target answered.
        detail: String,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The target URL or its options are unusable.
    #[error("invalid target: {0}")]
    Config(String),
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
            | Error::Config(_) => false,
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
            | Error::Config(_) => None,
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// How often one request is tried before its error goes up to the engine (which then backs off per path).
pub const REQUEST_ATTEMPTS: u32 = 4;
/// The longest a single request waits on a server's `Retry-After` before giving the error to the engine.
pub const MAX_REQUEST_WAIT: Duration = Duration::from_secs(30);

/// Runs `request` until it succeeds, fails permanently, or [`REQUEST_ATTEMPTS`] tries failed. Between tries it
/// waits the server's `Retry-After` (up to [`MAX_REQUEST_WAIT`]) or 250 ms doubling. A transient fault then costs
/// one request, not a whole path.
pub async fn with_retries<T, F, Fut>(mut request: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let mut attempt = 1;
    loop {
        match request().await {
            Ok(value) => return Ok(value),
            Err(e) if e.is_retryable() && attempt < REQUEST_ATTEMPTS => {
                let wait = match e.retry_after() {
                    Some(hint) if hint > MAX_REQUEST_WAIT => return Err(e),
                    Some(hint) => hint,
                    None => Duration::from_millis(250 << (attempt - 1)),
                };
                tracing::debug!("retrying in {wait:?} after: {e}");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
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

    async fn upload(&self, narinfo: &NarInfo, nar: NarFile<'_>) -> Result<(), Error> {
        match self {
            AnyBackend::File(b) => b.upload(narinfo, nar).await,
            AnyBackend::Http(b) => b.upload(narinfo, nar).await,
            AnyBackend::Cachix(b) => b.upload(narinfo, nar).await,
            AnyBackend::S3(b) => b.upload(narinfo, nar).await,
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
}
