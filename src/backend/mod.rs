//! Where NARs go: the [`Backend`] trait and the backend chosen from config ([`AnyBackend`]); what a failure
//! means is in [`error`].
//!
//! The engine hands a backend a finished, compressed NAR in a file (its size and SHA-256 known) plus the signed
//! narinfo that describes it. A backend stores the NAR first and the narinfo last, so a reader never sees a
//! narinfo whose NAR is missing. Only the modules below this one speak HTTP, S3 or Cachix.

pub mod cachix;
pub mod credentials;
pub mod documents;
pub mod error;
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

use std::future::Future;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{self, Config};
use crate::hash::Sha256Hash;
use crate::narinfo::NarInfo;
use crate::store_path::StorePath;

pub use credentials::Credentials;
pub use documents::DocumentBytes;
pub use error::{io_target_fault, with_retries, Error, MAX_REQUEST_WAIT, REQUEST_ATTEMPTS};
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
