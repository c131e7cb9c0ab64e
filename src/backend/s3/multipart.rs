//! Multipart uploads of large NARs: create, parts in parallel, complete; a failed upload is aborted, only ever
//! with the upload id this backend created, and only once its parts in flight have landed.

use futures_util::stream::{self, StreamExt};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use reqwest::StatusCode;
use rusty_s3::actions::CreateMultipartUpload;
use rusty_s3::S3Action;

use super::super::http::{small_body, transport_error};
use super::super::parts::{file_range_body, part_ranges, part_size_for, PARALLEL_PARTS};
use super::super::{Error, NarFile};
use super::request::{error_summary, expect_success};
use super::{S3Backend, PRESIGN_FOR};

impl S3Backend {
    /// Creates a multipart upload, sends the parts, completes it; aborts it on failure.
    pub(super) async fn put_multipart(
        &self,
        key: &str,
        content_type: &str,
        nar: &NarFile<'_>,
    ) -> Result<(), Error> {
        let upload_id = self
            .retrying(|keys| async move {
                let url = self
                    .bucket
                    .create_multipart_upload(Some(&keys.s3), key)
                    .sign(PRESIGN_FOR);
                let (response, shown) = self
                    .send("POST", &url, |c, u| {
                        c.post(u)
                            .header(CONTENT_TYPE, content_type)
                            .header(CONTENT_LENGTH, 0)
                    })
                    .await?;
                let response = expect_success("POST", &shown, response).await?;
                let text = small_body(response)
                    .await
                    .map_err(|e| transport_error("POST", &shown, &e))?;
                CreateMultipartUpload::parse_response(&text)
                    .map(|r| r.upload_id().to_owned())
                    .map_err(|e| Error::Protocol {
                        url: shown.clone(),
                        message: format!("cannot read the multipart upload id ({e})"),
                    })
            })
            .await?;
        let result = self.send_parts(key, &upload_id, nar).await;
        if result.is_err() {
            // Only the upload id created above: another writer's upload of the same key is never touched.
            self.abort(key, &upload_id).await;
        }
        result
    }

    /// Sends every part (a few at once), then completes the upload.
    async fn send_parts(&self, key: &str, upload_id: &str, nar: &NarFile<'_>) -> Result<(), Error> {
        let ranges = part_ranges(nar.size, part_size_for(nar.size, self.part_size));
        // After a failure no new part starts, but the parts already sent are waited for: dropped mid-request,
        // they could still land after the abort and leave orphaned parts on the server.
        let failed = std::sync::atomic::AtomicBool::new(false);
        let results: Vec<Option<Result<(u32, String), Error>>> = stream::iter(ranges)
            .map(|range| {
                let failed = &failed;
                async move {
                    if failed.load(std::sync::atomic::Ordering::SeqCst) {
                        return None;
                    }
                    let result = self.upload_part(key, upload_id, nar, range).await;
                    if result.is_err() {
                        failed.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    Some(result.map(|etag| (range.0, etag)))
                }
            })
            .buffer_unordered(PARALLEL_PARTS)
            .collect()
            .await;
        let mut etags = Vec::with_capacity(results.len());
        for result in results.into_iter().flatten() {
            etags.push(result?);
        }
        etags.sort_unstable_by_key(|(number, _)| *number);
        let etags = &etags;
        self.retrying(|keys| async move {
            let action = self.bucket.complete_multipart_upload(
                Some(&keys.s3),
                key,
                upload_id,
                etags.iter().map(|(_, etag)| etag.as_str()),
            );
            let url = action.sign(PRESIGN_FOR);
            let body = action.body();
            let (response, shown) = self
                .send("POST", &url, |c, u| {
                    c.post(u)
                        .header(CONTENT_LENGTH, body.len())
                        .header(CONTENT_TYPE, "application/xml")
                        .body(body)
                })
                .await?;
            let response = expect_success("POST", &shown, response).await?;
            // S3 may answer 200 and put the failure in the body.
            let text = small_body(response)
                .await
                .map_err(|e| transport_error("POST", &shown, &e))?;
            if text.contains("<Error>") {
                return Err(Error::Status {
                    method: "POST".into(),
                    url: shown,
                    code: 500,
                    retry_after: None,
                    detail: error_summary(&text),
                });
            }
            Ok(())
        })
        .await
    }

    /// One part; its ETag.
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        nar: &NarFile<'_>,
        (number, offset, length): (u32, u64, u64),
    ) -> Result<String, Error> {
        let part = u16::try_from(number).map_err(|_| {
            Error::Config(format!("part {number} is beyond S3's 10,000-part limit"))
        })?;
        self.retrying(|keys| async move {
            let url = self
                .bucket
                .upload_part(Some(&keys.s3), key, part, upload_id)
                .sign(PRESIGN_FOR);
            let body = file_range_body(nar.path, offset, length).await?;
            let (response, shown) = self
                .send("PUT", &url, |c, u| {
                    c.put(u).header(CONTENT_LENGTH, length).body(body)
                })
                .await?;
            let response = expect_success("PUT", &shown, response).await?;
            response
                .headers()
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .ok_or_else(|| Error::Protocol {
                    url: shown,
                    message: format!("part {number} was stored without an ETag"),
                })
        })
        .await
    }

    /// Aborts our multipart upload `upload_id` of `key`, so no orphaned parts stay billed to the bucket's owner.
    async fn abort(&self, key: &str, upload_id: &str) {
        let result = self
            .retrying(|keys| async move {
                let url = self
                    .bucket
                    .abort_multipart_upload(Some(&keys.s3), key, upload_id)
                    .sign(PRESIGN_FOR);
                let (response, shown) = self.send("DELETE", &url, |c, u| c.delete(u)).await?;
                match response.status() {
                    // Already gone: completed, aborted, or superseded by another writer's upload.
                    StatusCode::NOT_FOUND => Ok(()),
                    _ => expect_success("DELETE", &shown, response).await.map(drop),
                }
            })
            .await;
        match result {
            Ok(()) => tracing::debug!("aborted the multipart upload of {key}"),
            Err(e) => tracing::warn!(
                "cannot abort the multipart upload of {key}; its parts stay in the bucket until a lifecycle rule \
                 removes incomplete uploads: {e}"
            ),
        }
    }
}
