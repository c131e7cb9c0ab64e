//! `s3://bucket?region=…&endpoint=…&addressing=path|virtual&profile=…`: an S3 bucket laid out exactly like Nix's
//! own S3 binary cache store, written with SigV4-presigned requests (rusty-s3) sent by reqwest.
//!
//! ```text
//! nix-cache-info                          text/x-nix-cache-info, written by prepare when absent
//! <hash>.narinfo                          text/x-nix-narinfo; HEAD 200 = present, 404 (or 403) = missing
//! nar/<filehash>.nar.zst                  application/x-nix-nar; one PUT, or a multipart upload above part_size
//! <hash>.ls, log/…, realisations/…        the documents of `backend::documents`, one PUT each
//! ```
//!
//! The NAR lands before its narinfo, so a reader never sees a narinfo without its NAR. Many hosts may write one
//! bucket: narinfos and `nix-cache-info` are written with `If-None-Match: *`, so a path is described once and a
//! `412` means another writer was first (servers without conditional writes ignore the header and overwrite the
//! same content); a multipart upload that lost to another writer's (see [`super::race`]) is settled by a HEAD of
//! the NAR. A failed multipart upload is aborted, only ever with the upload id this backend created. `503
//! SlowDown` and `429` lower the number of requests in flight ([`Throttle`]) and never fail a path. With a custom `endpoint`
//! addressing is path-style (`http://host:port/bucket/key`), as Nix's store does; otherwise
//! `https://bucket.s3.<region>.amazonaws.com/key`. Credentials: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
//! `AWS_SESSION_TOKEN`, else the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`,
//! profile from `profile=`, `AWS_PROFILE` or `default`); an explicit `profile=` always uses the file. They are
//! read again on every `prepare`, so rotated keys take effect after an authentication pause.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use reqwest::{RequestBuilder, StatusCode};
use rusty_s3::actions::CreateMultipartUpload;
use rusty_s3::{Bucket, S3Action, UrlStyle};

use crate::config::{redact_url, Config};
use crate::narinfo::NarInfo;
use crate::store_path::StorePath;

use super::http::{bounded_body, send, small_body, status_error, transport_error};
use super::parts::{file_range_body, part_ranges, part_size_for, PARALLEL_PARTS};
use super::throttle::Throttle;
use super::{race, Backend, Error, NarFile, TargetInfo, MAX_REQUEST_WAIT, REQUEST_ATTEMPTS};

mod credentials;

use credentials::{load_credentials, CredentialSource};

/// How long a presigned request stays valid; requests are signed right before they are sent.
const PRESIGN_FOR: Duration = Duration::from_secs(3600);
/// How many HEAD requests run at once when asking which paths are missing.
const PARALLEL_HEADS: usize = 16;
/// Requests in flight to one bucket at most, before any `SlowDown` lowers it.
const MAX_IN_FLIGHT: usize = 64;
/// How often one request is sent again after throttling answers (`503`, `429`) before the error goes to the
/// engine, which then backs off the path; with waits up to 8 s that is minutes of patience.
const THROTTLED_TRIES: u32 = 24;
/// How often a NAR upload that lost to another writer's is tried again here before the engine retries the path.
const CONTENDED_TRIES: u32 = 3;

/// An S3 (or S3-compatible) bucket.
#[derive(Debug)]
pub struct S3Backend {
    url: String,
    bucket: Bucket,
    source: CredentialSource,
    credentials: RwLock<Option<Arc<rusty_s3::Credentials>>>,
    client: reqwest::Client,
    part_size: u64,
    /// The `nix-cache-info` written when the target has none.
    cache_info: String,
    throttle: Throttle,
}

/// The pieces of an `s3://` URL.
#[derive(Debug, PartialEq, Eq)]
struct S3Url {
    bucket: String,
    region: String,
    endpoint: url::Url,
    /// Virtual-host style (`bucket.host`) rather than path style (`host/bucket`).
    virtual_host: bool,
    profile: Option<String>,
}

fn parse_url(url: &str) -> Result<S3Url, Error> {
    let invalid = |problem: String| Error::Config(format!("{}: {problem}", redact_url(url)));
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| invalid("not an s3:// URL".into()))?;
    let (bucket, query) = rest.split_once('?').unwrap_or((rest, ""));
    let bucket = bucket.trim_end_matches('/');
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid_bucket {
        return Err(invalid(format!(
            "{bucket:?} is not a bucket name (3-63 lowercase letters, digits, dots, dashes)"
        )));
    }
    let (mut region, mut endpoint, mut addressing, mut profile, mut scheme) =
        ("us-east-1".to_owned(), None, None, None, "https".to_owned());
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let value = value.into_owned();
        match key.as_ref() {
            "region" => region = value,
            "endpoint" => endpoint = Some(value),
            "addressing" => addressing = Some(value),
            "profile" => profile = Some(value),
            "scheme" => scheme = value,
            other => {
                return Err(invalid(format!(
                    "unknown parameter {other:?} (accepted: region, endpoint, scheme, addressing, profile)"
                )))
            }
        }
    }
    let virtual_host = match addressing.as_deref() {
        Some("path") => false,
        Some("virtual") => true,
        // Nix's S3 store: virtual-host style on AWS, path style with a custom endpoint.
        None => endpoint.is_none(),
        Some(other) => return Err(invalid(format!("addressing={other} (use path or virtual)"))),
    };
    let endpoint = match endpoint {
        Some(e) if e.contains("://") => e,
        Some(e) => format!("{scheme}://{e}"),
        None => format!("https://s3.{region}.amazonaws.com"),
    };
    let endpoint =
        url::Url::parse(&endpoint).map_err(|e| invalid(format!("endpoint {endpoint:?}: {e}")))?;
    if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host_str().is_none() {
        return Err(invalid(format!(
            "endpoint {endpoint} must be an http(s) URL with a host"
        )));
    }
    Ok(S3Url {
        bucket: bucket.to_owned(),
        region,
        endpoint,
        virtual_host,
        profile,
    })
}

/// For virtual-host addressing against `localhost`: the bucket's host name (`bucket.localhost`) and port. RFC 6761
/// reserves `*.localhost` for loopback, but glibc does not resolve it, so the client is told directly.
fn loopback_bucket_host(url: &S3Url) -> Option<(String, u16)> {
    let host = url.endpoint.host_str()?;
    (url.virtual_host && host == "localhost").then(|| {
        (
            format!("{}.{host}", url.bucket),
            url.endpoint.port_or_known_default().unwrap_or(80),
        )
    })
}

/// The backend client, with `host` resolving to 127.0.0.1.
fn loopback_client(host: &str, port: u16, timeout: Duration) -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .user_agent(concat!("nixpush/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(timeout.min(Duration::from_secs(30)))
        .read_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .resolve(host, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .build()
        .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))
}

impl S3Backend {
    /// A backend for `url`; fails when the URL is malformed or no credentials are found.
    pub fn new(url: &str, config: &Config) -> Result<S3Backend, Error> {
        let profile = parse_url(url)?.profile;
        let credentials = load_credentials(&CredentialSource { profile })?;
        S3Backend::with_credentials(url, config, credentials)
    }

    /// Looks for the credentials a backend for `url` would use, sending nothing: `doctor` tells missing keys
    /// apart from a bucket that does not answer.
    pub fn find_credentials(url: &str) -> Result<(), Error> {
        let profile = parse_url(url)?.profile;
        load_credentials(&CredentialSource { profile }).map(drop)
    }

    fn with_credentials(
        url: &str,
        config: &Config,
        credentials: rusty_s3::Credentials,
    ) -> Result<S3Backend, Error> {
        let parsed = parse_url(url)?;
        let style = if parsed.virtual_host {
            UrlStyle::VirtualHost
        } else {
            UrlStyle::Path
        };
        let timeout = Duration::from_secs(config.target.timeout_secs);
        let client = match loopback_bucket_host(&parsed) {
            Some((host, port)) => loopback_client(&host, port, timeout)?,
            None => super::http::client(timeout)?,
        };
        let bucket = Bucket::new(parsed.endpoint, style, parsed.bucket, parsed.region)
            .map_err(|e| Error::Config(format!("{}: {e}", redact_url(url))))?;
        let source = CredentialSource {
            profile: parsed.profile,
        };
        Ok(S3Backend {
            url: redact_url(url),
            bucket,
            source,
            credentials: RwLock::new(Some(Arc::new(credentials))),
            client,
            part_size: config.target.part_size,
            cache_info: crate::cache_info::CacheInfo::from_config(config).render(),
            throttle: Throttle::new(MAX_IN_FLIGHT),
        })
    }

    /// The URL of `key` without a signature (where an anonymous HTTP reader finds it).
    pub fn object_url(&self, key: &str) -> Result<url::Url, Error> {
        self.bucket
            .object_url(key)
            .map_err(|e| Error::Config(format!("object key {key:?}: {e}")))
    }

    fn credentials(&self) -> Option<Arc<rusty_s3::Credentials>> {
        match self.credentials.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Sends a presigned request; the error message shows the URL without its signature.
    async fn send(
        &self,
        method: &str,
        url: &url::Url,
        build: impl FnOnce(&reqwest::Client, &str) -> RequestBuilder,
    ) -> Result<(reqwest::Response, String), Error> {
        let shown = without_query(url);
        let _permit = self.throttle.acquire().await;
        let response = send(build(&self.client, url.as_str()), method, &shown).await?;
        match response.status().as_u16() {
            429 | 503 => {
                self.throttle.slow_down();
            }
            code if code < 500 => self.throttle.succeeded(),
            _ => {}
        }
        Ok((response, shown))
    }

    /// Runs `request` until it succeeds or fails for good, like [`super::with_retries`], except that throttling
    /// answers (`503 SlowDown`, `429`) do not use up its tries: the [`Throttle`] has already lowered the load.
    async fn retrying<T, F, Fut>(&self, mut request: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let (mut attempt, mut throttled) = (1, 0);
        loop {
            let e = match request().await {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            let wait = if is_throttling(&e) && throttled < THROTTLED_TRIES {
                throttled += 1;
                let backoff = Duration::from_millis(250 << throttled.min(5));
                let jitter = Duration::from_millis(rand::random::<u64>() % 250);
                e.retry_after().unwrap_or(backoff).min(MAX_REQUEST_WAIT) + jitter
            } else if e.is_retryable() && !is_throttling(&e) && attempt < REQUEST_ATTEMPTS {
                attempt += 1;
                match e.retry_after() {
                    Some(hint) if hint > MAX_REQUEST_WAIT => return Err(e),
                    Some(hint) => hint,
                    None => Duration::from_millis(250 << (attempt - 2)),
                }
            } else {
                return Err(e);
            };
            tracing::debug!("retrying in {wait:?} after: {e}");
            tokio::time::sleep(wait).await;
        }
    }

    /// Whether `key` exists.
    async fn exists(&self, key: &str) -> Result<bool, Error> {
        Ok(self.object_size(key).await?.is_some())
    }

    /// The size of object `key`, `None` when it does not exist.
    async fn object_size(&self, key: &str) -> Result<Option<u64>, Error> {
        self.retrying(|| async {
            let creds = self.credentials();
            let url = self
                .bucket
                .head_object(creds.as_deref(), key)
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

    /// PUTs a small document unless `key` exists (`If-None-Match: *`). Another writer's copy counts as ours:
    /// a `412` means it was first, a `409` that its write is in flight (settled by a HEAD).
    /// An unconditional PUT: documents that may be replaced (a re-signed narinfo, listings, logs).
    async fn put_bytes(&self, key: &str, content_type: &str, bytes: Vec<u8>) -> Result<(), Error> {
        self.retrying(|| self.put_object(key, content_type, &bytes, false))
            .await
    }

    /// One signed PUT of `bytes`; `if_absent` adds `If-None-Match: *`.
    async fn put_object(
        &self,
        key: &str,
        content_type: &str,
        bytes: &[u8],
        if_absent: bool,
    ) -> Result<(), Error> {
        let creds = self.credentials();
        let url = self
            .bucket
            .put_object(creds.as_deref(), key)
            .sign(PRESIGN_FOR);
        let (response, shown) = self
            .send("PUT", &url, |c, u| {
                let request = c
                    .put(u)
                    .header(CONTENT_TYPE, content_type)
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

    async fn put_bytes_if_absent(
        &self,
        key: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<(), Error> {
        let mut tries = 1;
        loop {
            let result = self
                .retrying(|| self.put_object(key, content_type, &bytes, true))
                .await;
            let error = match result {
                Ok(()) => return Ok(()),
                Err(e) if !race::another_writer_may_have_won(&e) => return Err(e),
                Err(e) => e,
            };
            let present = self.exists(key).await?;
            match race::after_failure(error, present) {
                Ok(()) => {
                    tracing::debug!("{key} was written by another writer first");
                    return Ok(());
                }
                Err(e) if tries < CONTENDED_TRIES => {
                    tracing::debug!("{key}: {e}");
                    tokio::time::sleep(contended_wait(tries)).await;
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores the NAR `key`. When the upload lost to another writer's upload of the same key, the NAR that writer
    /// completed (same key, so same bytes, and the expected size) counts as ours.
    async fn put_nar(&self, key: &str, nar: &NarFile<'_>) -> Result<(), Error> {
        let mut tries = 1;
        loop {
            let error = match self.put_file(key, "application/x-nix-nar", nar).await {
                Ok(()) => return Ok(()),
                Err(e) if !race::another_writer_may_have_won(&e) => return Err(e),
                Err(e) => e,
            };
            let present = self.object_size(key).await? == Some(nar.size);
            match race::after_failure(error, present) {
                Ok(()) => {
                    tracing::debug!("{key} was completed by another writer");
                    return Ok(());
                }
                Err(e) if tries < CONTENDED_TRIES => {
                    tracing::debug!("{key}: {e}; uploading it again");
                    tokio::time::sleep(contended_wait(tries)).await;
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn put_file(
        &self,
        key: &str,
        content_type: &str,
        nar: &NarFile<'_>,
    ) -> Result<(), Error> {
        if nar.size > self.part_size {
            return self.put_multipart(key, content_type, nar).await;
        }
        self.retrying(|| async {
            let creds = self.credentials();
            let url = self
                .bucket
                .put_object(creds.as_deref(), key)
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

    async fn put_multipart(
        &self,
        key: &str,
        content_type: &str,
        nar: &NarFile<'_>,
    ) -> Result<(), Error> {
        let upload_id = self
            .retrying(|| async {
                let creds = self.credentials();
                let url = self
                    .bucket
                    .create_multipart_upload(creds.as_deref(), key)
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
        self.retrying(|| async {
            let creds = self.credentials();
            let action = self.bucket.complete_multipart_upload(
                creds.as_deref(),
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
        self.retrying(|| async {
            let creds = self.credentials();
            let url = self
                .bucket
                .upload_part(creds.as_deref(), key, part, upload_id)
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
            .retrying(|| async {
                let creds = self.credentials();
                let url = self
                    .bucket
                    .abort_multipart_upload(creds.as_deref(), key, upload_id)
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

impl Backend for S3Backend {
    async fn prepare(&self) -> Result<TargetInfo, Error> {
        let credentials = load_credentials(&self.source)?;
        if let Ok(mut guard) = self.credentials.write() {
            *guard = Some(Arc::new(credentials));
        }
        if !self.exists("nix-cache-info").await? {
            let text = self.cache_info.clone();
            self.put_bytes_if_absent("nix-cache-info", "text/x-nix-cache-info", text.into_bytes())
                .await?;
        }
        Ok(TargetInfo {
            read_url: Some(self.url.clone()),
            ..TargetInfo::default()
        })
    }

    async fn missing(&self, paths: &[StorePath]) -> Result<Vec<StorePath>, Error> {
        let answers: Vec<(StorePath, bool)> = stream::iter(paths.iter().cloned())
            .map(|path| async move {
                let present = self
                    .exists(&format!("{}.narinfo", path.hash_part()))
                    .await?;
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

    async fn upload(&self, narinfo: &NarInfo, nar: NarFile<'_>) -> Result<(), Error> {
        // As Nix does: a NAR already there (same file hash, same bytes) is not sent again.
        if self.object_size(&narinfo.url).await? != Some(nar.size) {
            self.put_nar(&narinfo.url, &nar).await?;
        }
        self.put_bytes_if_absent(
            &format!("{}.narinfo", narinfo.store_path.hash_part()),
            "text/x-nix-narinfo",
            narinfo.render().into_bytes(),
        )
        .await
    }

    async fn put_document(
        &self,
        key: &str,
        content_type: &'static str,
        bytes: Vec<u8>,
    ) -> Result<(), Error> {
        self.put_bytes(key, content_type, bytes).await
    }

    async fn get_document(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        self.retrying(|| async {
            let creds = self.credentials();
            let url = self
                .bucket
                .get_object(creds.as_deref(), key)
                .sign(PRESIGN_FOR);
            let (response, shown) = self.send("GET", &url, |c, u| c.get(u)).await?;
            match response.status() {
                s if s.is_success() => {
                    let (bytes, complete) = bounded_body(response)
                        .await
                        .map_err(|e| transport_error("GET", &shown, &e))?;
                    if !complete {
                        return Err(Error::Protocol {
                            url: shown,
                            message: "document larger than 64 KiB".to_owned(),
                        });
                    }
                    Ok(Some(bytes))
                }
                // Without s3:ListBucket, S3 answers 403 for a key that does not exist.
                StatusCode::NOT_FOUND | StatusCode::FORBIDDEN => Ok(None),
                _ => Err(status_error("GET", &shown, response).await),
            }
        })
        .await
    }
}

async fn expect_success(
    method: &str,
    shown: &str,
    response: reqwest::Response,
) -> Result<reqwest::Response, Error> {
    if response.status().is_success() {
        Ok(response)
    } else {
        Err(s3_error(method, shown, response).await)
    }
}

/// The error for an S3 error answer, its detail reduced to S3's `Code: Message`. S3 echoes the request back
/// (`StringToSign`, `CanonicalRequest` with the presigned query); none of that reaches a log line.
async fn s3_error(method: &str, shown: &str, response: reqwest::Response) -> Error {
    match status_error(method, shown, response).await {
        Error::Status {
            method,
            url,
            code,
            retry_after,
            detail,
        } => Error::Status {
            method,
            url,
            code,
            retry_after,
            detail: error_summary(&detail),
        },
        Error::Unauthorized { url, code, detail } => {
            let mut detail = error_summary(&detail);
            if detail.starts_with("SignatureDoesNotMatch") {
                detail.push_str(
                    " (the secret access key does not belong to the access key id: check \
                     AWS_SECRET_ACCESS_KEY or the profile's aws_secret_access_key)",
                );
            }
            Error::Unauthorized { url, code, detail }
        }
        other => other,
    }
}

/// `Code: Message` of an S3 `<Error>` document; other text unchanged.
fn error_summary(body: &str) -> String {
    let element = |name: &str| {
        let start = body.find(&format!("<{name}>"))? + name.len() + 2;
        let end = body[start..].find(&format!("</{name}>"))? + start;
        Some(body[start..end].to_owned())
    };
    match (element("Code"), element("Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ if body.contains("<Error>") => "an S3 error without a <Code>".to_owned(),
        _ => body.to_owned(),
    }
}

/// Whether the target asked us to send fewer requests.
fn is_throttling(e: &Error) -> bool {
    matches!(
        e,
        Error::Status {
            code: 429 | 503,
            ..
        }
    )
}

/// A pause before writing an object again that another writer was busy with.
fn contended_wait(tries: u32) -> Duration {
    Duration::from_millis((500 << tries) + rand::random::<u64>() % 500)
}

/// A presigned URL without its query (which holds the signature and credentials).
fn without_query(url: &url::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        let u = parse_url("s3://my-bucket?region=eu-west-1").unwrap();
        assert_eq!(u.endpoint.as_str(), "https://s3.eu-west-1.amazonaws.com/");
        assert_eq!((u.virtual_host, u.region.as_str()), (true, "eu-west-1"));
        let u = parse_url("s3://cache?endpoint=http://127.0.0.1:9000&profile=ci").unwrap();
        assert!(!u.virtual_host);
        assert_eq!(u.profile.as_deref(), Some("ci"));
        let u =
            parse_url("s3://cache?endpoint=minio.lan:9000&scheme=http&addressing=virtual").unwrap();
        assert_eq!(u.endpoint.as_str(), "http://minio.lan:9000/");
        assert!(u.virtual_host);
        for bad in [
            "s3://",
            "s3://Bucket",
            "s3://b",
            "s3://bucket?compression=xz",
            "s3://bucket?addressing=x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn object_urls_by_style() {
        let config = Config::default();
        let creds = || rusty_s3::Credentials::new("test", "test");
        let path = S3Backend::with_credentials(
            "s3://cache?endpoint=http://127.0.0.1:9000",
            &config,
            creds(),
        )
        .unwrap();
        assert_eq!(
            path.object_url("nar/x.nar.zst").unwrap().as_str(),
            "http://127.0.0.1:9000/cache/nar/x.nar.zst"
        );
        let virt =
            S3Backend::with_credentials("s3://cache?region=eu-west-1", &config, creds()).unwrap();
        assert_eq!(
            virt.object_url("abc.narinfo").unwrap().as_str(),
            "https://cache.s3.eu-west-1.amazonaws.com/abc.narinfo"
        );
    }
}
