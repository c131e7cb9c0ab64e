//! Objects in the bucket: HEAD for presence and size, one-PUT writes (conditional for narinfos and
//! `nix-cache-info`), and the NAR upload that settles a race with another writer of the same key (see
//! [`super::super::race`]).

use std::time::Duration;

use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, IF_NONE_MATCH};
use reqwest::StatusCode;
use rusty_s3::S3Action;

use super::super::parts::file_range_body;
use super::super::{race, DocumentBytes, Error, NarFile};
use super::credentials::Keys;
use super::request::{expect_success, s3_error};
use super::{S3Backend, PRESIGN_FOR};

/// How often a NAR upload that lost to another writer's is tried again here before the engine retries the path.
const CONTENDED_TRIES: u32 = 3;

impl S3Backend {
    /// Whether `key` exists.
    pub(super) async fn exists(&self, key: &str) -> Result<bool, Error> {
        Ok(self.object_size(key).await?.is_some())
    }

    /// The size of object `key`, `None` when it does not exist.
    pub(super) async fn object_size(&self, key: &str) -> Result<Option<u64>, Error> {
        self.retrying(|keys| async move {
            let url = self
                .bucket
                .head_object(Some(&keys.s3), key)
                .sign(PRESIGN_FOR);
            let (response, shown) = self.send("HEAD", &url, |c, u| c.head(u)).await?;
            match response.status() {
                // The header, not the (empty) body of a HEAD answer.
                s if s.is_success() => Ok(Some(
                    response
                        .headers()
                        .get(CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                )),
                // Without s3:ListBucket, S3 answers 403 for a key that does not exist.
                StatusCode::NOT_FOUND | StatusCode::FORBIDDEN => Ok(None),
                _ => Err(s3_error("HEAD", &shown, response).await),
            }
        })
        .await
    }

    /// An unconditional PUT: documents that may be replaced (a re-signed narinfo, listings, logs).
    pub(super) async fn put_bytes(&self, document: DocumentBytes) -> Result<(), Error> {
        let document = &document;
        self.retrying(|keys| async move { self.put_object(&keys, document, false).await })
            .await
    }

    /// One signed PUT of `bytes`; `if_absent` adds `If-None-Match: *`.
    async fn put_object(
        &self,
        keys: &Keys,
        document: &DocumentBytes,
        if_absent: bool,
    ) -> Result<(), Error> {
        let DocumentBytes {
            key,
            content_type,
            bytes,
        } = document;
        let url = self
            .bucket
            .put_object(Some(&keys.s3), key)
            .sign(PRESIGN_FOR);
        let (response, shown) = self
            .send("PUT", &url, |c, u| {
                let request = c
                    .put(u)
                    .header(CONTENT_TYPE, *content_type)
                    .header(CONTENT_LENGTH, bytes.len());
                let request = if if_absent {
                    request.header(IF_NONE_MATCH, "*")
                } else {
                    request
                };
                request.body(bytes.to_vec())
            })
            .await?;
        expect_success("PUT", &shown, response).await.map(drop)
    }

    /// PUTs a small document unless `key` exists (`If-None-Match: *`). Another writer's copy counts as ours:
    /// a `412` means it was first, a `409` that its write is in flight (settled by a HEAD).
    pub(super) async fn put_bytes_if_absent(&self, document: DocumentBytes) -> Result<(), Error> {
        let document = &document;
        contended(
            &document.key,
            "was written by another writer first",
            || self.retrying(|keys| async move { self.put_object(&keys, document, true).await }),
            || self.exists(&document.key),
        )
        .await
    }

    /// Stores the NAR `key`. When the upload lost to another writer's upload of the same key, the NAR that writer
    /// completed (same key, so same bytes, and the expected size) counts as ours.
    pub(super) async fn put_nar(&self, key: &str, nar: &NarFile<'_>) -> Result<(), Error> {
        contended(
            key,
            "was completed by another writer",
            || self.put_file(key, "application/x-nix-nar", nar),
            || async { Ok(self.object_size(key).await? == Some(nar.size)) },
        )
        .await
    }

    /// One PUT of the whole file, or a multipart upload above the part size.
    async fn put_file(
        &self,
        key: &str,
        content_type: &str,
        nar: &NarFile<'_>,
    ) -> Result<(), Error> {
        if nar.size > self.part_size {
            return self.put_multipart(key, content_type, nar).await;
        }
        self.retrying(|keys| async move {
            let url = self
                .bucket
                .put_object(Some(&keys.s3), key)
                .sign(PRESIGN_FOR);
            let body = file_range_body(nar.path, 0, nar.size).await?;
            let (response, shown) = self
                .send("PUT", &url, |c, u| {
                    c.put(u)
                        .header(CONTENT_TYPE, content_type)
                        .header(CONTENT_LENGTH, nar.size)
                        .body(body)
                })
                .await?;
            expect_success("PUT", &shown, response).await.map(drop)
        })
        .await
    }
}

/// A pause before writing an object again that another writer was busy with.
fn contended_wait(tries: u32) -> Duration {
    Duration::from_millis((500 << tries) + rand::random::<u64>() % 500)
}

/// Runs `write` until it succeeds, fails for a reason no other writer explains, or `present` shows that another
/// writer stored `key` first (`done` says how, in the debug log); a write lost in a race is tried again up to
/// [`CONTENDED_TRIES`] times, waiting [`contended_wait`] between tries.
async fn contended<W, P>(
    key: &str,
    done: &str,
    mut write: impl FnMut() -> W,
    mut present: impl FnMut() -> P,
) -> Result<(), Error>
where
    W: std::future::Future<Output = Result<(), Error>>,
    P: std::future::Future<Output = Result<bool, Error>>,
{
    let mut tries = 1;
    loop {
        let error = match write().await {
            Ok(()) => return Ok(()),
            Err(e) if !race::another_writer_may_have_won(&e) => return Err(e),
            Err(e) => e,
        };
        match race::after_failure(error, present().await?) {
            Ok(()) => {
                tracing::debug!("{key} {done}");
                return Ok(());
            }
            Err(e) if tries < CONTENDED_TRIES => {
                tracing::debug!("{key}: {e}; trying again");
                tokio::time::sleep(contended_wait(tries)).await;
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
