//! `cachix://NAME`: Cachix's push API (multipart NAR upload through presigned URLs), per cachix-api.md.
//!
//! For each path the backend sends, under `https://cachix.org/api/v1/cache/NAME` (or the `cachix_api` /
//! `?api=` base):
//!
//! ```text
//! POST multipart-nar?compression=zst                  → {"narId": "54558f44-…", "uploadId": "AbC/xyz+123=="}
//! POST multipart-nar/<narId>?uploadId=…&partNumber=1  {"contentMD5": "1B2M2Y8AsgTpgAmY7PhCfg=="} → {"uploadUrl": …}
//! PUT  <uploadUrl>                                    part bytes, Content-MD5, no Authorization → ETag: "9b2c…"
//! POST multipart-nar/<narId>/complete?uploadId=…      {"parts": [{"partNumber": 1, "eTag": "\"9b2c…\""}],
//!                                                      "narInfoCreate": {"cStoreHash": …, "cSig": null | "<b64>"}}
//! POST multipart-nar/<narId>/abort?uploadId=…         when giving up (best effort)
//! ```
//!
//! Parts are read from the engine's compressed file (never the whole NAR in memory), four at a time, each
//! presigned right before its PUT and presigned again when storage answers 403 (an expired URL, cachix#564).
//! Every request follows Cachix's own retry policy (§7): 429/5xx/connection failures are retried with jittered
//! backoff for up to 90 s in total, honouring `Retry-After` or a problem+json `retry_after` (at most 120 s).
//! 401/403 from the API are [`Error::Unauthorized`]: the engine pauses the target until the token changes. The
//! token is only ever put in the `Authorization` header, marked sensitive.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use base64::Engine as _;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use reqwest::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::config::{self, Config};
use crate::narinfo::NarInfo;
use crate::signing::{PublicKey, SecretKey};
use crate::store_path::StorePath;

use super::http::{bounded_body, retry_after, send, small_body, transport_error, MAX_SMALL_BODY};
use super::parts::{file_range_body, part_ranges, part_size_for, PARALLEL_PARTS};
use super::{Backend, Credentials, Error, NarFile, TargetInfo};

/// Hashes per missing-paths request: Cachix's client sends at most this many (about 1 MB of JSON).
pub const MISSING_BATCH: usize = 32_768;
/// How often one part is presigned again after storage rejected its URL with 403.
const MAX_REPRESIGNS: u32 = 3;

/// Cachix's HTTP retry policy (cachix-api.md §7.1): equal-jitter backoff from `base` doubling, each wait at most
/// `cap`, no retry once the waits would exceed `budget` in total; a server hint replaces the computed wait but
/// is clamped to `max_hint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first backoff before jitter.
    pub base: Duration,
    /// The longest computed wait.
    pub cap: Duration,
    /// The total of computed waits after which no retry is made.
    pub budget: Duration,
    /// The longest a `Retry-After` / `retry_after` hint is obeyed.
    pub max_hint: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(15),
            budget: Duration::from_secs(90),
            max_hint: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// The computed wait before retry number `retry` (0 for the first), `jitter` in `[0, 1]`:
    /// `t/2 + jitter·t/2` with `t = base·2^retry`, at most `cap`.
    pub fn backoff(&self, retry: u32, jitter: f64) -> Duration {
        let t = self.base.saturating_mul(1u32 << retry.min(20));
        (t / 2 + t.mul_f64(jitter.clamp(0.0, 1.0)) / 2).min(self.cap)
    }
}

/// The retries made so far for one request.
#[derive(Debug, Default)]
struct Retries {
    count: u32,
    spent: Duration,
}

impl Retries {
    /// How long to wait before trying `error`'s request again, or `None` to give up.
    fn next_wait(&mut self, policy: &RetryPolicy, error: &Error) -> Option<Duration> {
        if !error.is_retryable() {
            return None;
        }
        let computed = policy.backoff(self.count, rand::random::<f64>());
        if self.spent + computed > policy.budget {
            return None;
        }
        self.spent += computed;
        self.count += 1;
        Some(match error.retry_after() {
            Some(hint) if !hint.is_zero() => hint.min(policy.max_hint),
            _ => computed,
        })
    }
}

async fn with_policy<T, F, Fut>(
    policy: &RetryPolicy,
    what: &str,
    mut request: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut retries = Retries::default();
    loop {
        match request().await {
            Ok(value) => return Ok(value),
            Err(e) => match retries.next_wait(policy, &e) {
                Some(wait) => {
                    tracing::debug!("{what}: retrying in {wait:?} after: {e}");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(e),
            },
        }
    }
}

/// `GET /api/v1/cache/NAME`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BinaryCache {
    uri: String,
    #[serde(default)]
    public_signing_keys: Vec<String>,
    preferred_compression_method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreatedNar {
    nar_id: String,
    upload_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PresignedPart {
    upload_url: String,
}

/// `narInfoCreate`, with the exact encodings of cachix-api.md §4.5.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NarInfoCreate {
    /// The 32-character hash part.
    pub c_store_hash: String,
    /// The name after `<hash>-`.
    pub c_store_suffix: String,
    /// `sha256:` + Nix base32 of the uncompressed NAR.
    pub c_nar_hash: String,
    /// Uncompressed NAR size.
    pub c_nar_size: u64,
    /// Lowercase hex SHA-256 of the uploaded (compressed) bytes, no prefix.
    pub c_file_hash: String,
    /// Uploaded size.
    pub c_file_size: u64,
    /// Reference base names, sorted.
    pub c_references: Vec<String>,
    /// Deriver base name or `unknown-deriver`.
    pub c_deriver: String,
    /// Bare base64 of the 64-byte signature (self-signed caches) or `null` (Cachix signs).
    pub c_sig: Option<String>,
}

impl NarInfoCreate {
    /// The fields for `narinfo` and its file `nar`, with signature `sig` (bare base64).
    pub fn new(narinfo: &NarInfo, nar: &NarFile<'_>, sig: Option<String>) -> NarInfoCreate {
        let mut references: Vec<String> = narinfo
            .references
            .iter()
            .map(|r| r.base_name().to_owned())
            .collect();
        references.sort_unstable();
        references.dedup();
        NarInfoCreate {
            c_store_hash: narinfo.store_path.hash_part().to_owned(),
            c_store_suffix: narinfo.store_path.name().to_owned(),
            c_nar_hash: narinfo.nar_hash.to_typed_base32(),
            c_nar_size: narinfo.nar_size,
            c_file_hash: nar.sha256.to_hex(),
            c_file_size: nar.size,
            c_references: references,
            c_deriver: narinfo.deriver.as_ref().map_or_else(
                || "unknown-deriver".to_owned(),
                |d| d.base_name().to_owned(),
            ),
            c_sig: sig,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CompletedPart {
    part_number: u32,
    e_tag: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CompleteRequest<'a> {
    parts: Option<Vec<CompletedPart>>,
    nar_info_create: &'a NarInfoCreate,
}

/// One multipart upload in progress.
struct Multipart {
    nar_id: String,
    upload_id: String,
}

/// How a presigned PUT failed.
enum PutFailure {
    /// Storage refused the URL (403: expired or not matching); a fresh presign may help.
    Refused(Error),
    /// Anything else.
    Other(Error),
}

/// A Cachix cache.
#[derive(Debug)]
pub struct CachixBackend {
    name: String,
    /// `<api base>/api/v1/cache/<name>`.
    cache_url: String,
    client: reqwest::Client,
    credentials: Credentials,
    signing_key_file: Option<PathBuf>,
    part_size: u64,
    policy: RetryPolicy,
    /// The cache's public keys, from the last `prepare`.
    public_keys: RwLock<Vec<PublicKey>>,
}

impl CachixBackend {
    /// A backend for `url` = `cachix://NAME[?api=http://host:port]`; the API base defaults to
    /// `config.target.cachix_api`.
    pub fn new(
        url: &str,
        config: &Config,
        credentials: Credentials,
    ) -> Result<CachixBackend, Error> {
        let (name, api) = parse_url(url, &config.target.cachix_api)?;
        if config.target.compression == config::Compression::None {
            return Err(Error::Config(
                "Cachix stores only zstd or xz NARs; set target.compression to \"zstd\" or \"xz\""
                    .into(),
            ));
        }
        // Cachix's narInfoCreate has no store directory: the server assumes /nix/store.
        if config.store_dir_str() != "/nix/store" {
            return Err(Error::Config(format!(
                "Cachix only serves paths under /nix/store, not {}",
                config.store_dir_str()
            )));
        }
        Ok(CachixBackend {
            cache_url: format!("{api}/api/v1/cache/{name}"),
            name,
            client: super::http::client(Duration::from_secs(config.target.timeout_secs))?,
            credentials,
            signing_key_file: config.target.signing_key_file.clone(),
            part_size: config.target.part_size,
            policy: RetryPolicy::default(),
            public_keys: RwLock::new(Vec::new()),
        })
    }

    /// Replaces the retry policy (tests use short waits).
    pub fn with_policy(mut self, policy: RetryPolicy) -> CachixBackend {
        self.policy = policy;
        self
    }

    /// The cache name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> Result<url::Url, Error> {
        let mut url = url::Url::parse(&format!("{}{path}", self.cache_url))
            .map_err(|e| Error::Config(format!("{}{path}: {e}", self.cache_url)))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    /// `Bearer <token>`, or `Bearer ` with an empty token as Cachix's client sends for key-only pushes.
    fn authorization(&self) -> Result<HeaderValue, Error> {
        let token = self.credentials.token();
        let value = format!("Bearer {}", token.as_ref().map_or("", |t| t.expose()));
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            Error::Config(
                "the Cachix auth token contains characters not allowed in an HTTP header".into(),
            )
        })?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// One API call; non-2xx becomes an error.
    async fn call<B: Serialize>(
        &self,
        method: Method,
        url: &url::Url,
        body: Option<&B>,
    ) -> Result<Response, Error> {
        let mut request = self
            .client
            .request(method.clone(), url.clone())
            .header(AUTHORIZATION, self.authorization()?)
            .header(reqwest::header::ACCEPT, "application/json;charset=utf-8");
        request = match body {
            Some(body) => request.json(body),
            None => request.header(CONTENT_LENGTH, 0),
        };
        let response = send(request, method.as_str(), url.as_str()).await?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(api_error(method.as_str(), url.as_str(), response, true).await)
        }
    }

    async fn call_json<B: Serialize, T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        url: &url::Url,
        body: Option<&B>,
    ) -> Result<T, Error> {
        let response = self.call(method.clone(), url, body).await?;
        let (bytes, complete) = bounded_body(response)
            .await
            .map_err(|e| transport_error(method.as_str(), url.as_str(), &e))?;
        if !complete {
            return Err(Error::Protocol {
                url: url.to_string(),
                message: format!(
                    "the answer is larger than {} KiB or did not end within 10 s",
                    MAX_SMALL_BODY / 1024
                ),
            });
        }
        let text = String::from_utf8_lossy(&bytes);
        serde_json::from_str(&text).map_err(|e| Error::Protocol {
            url: url.to_string(),
            message: format!("unexpected JSON ({e}): {}", shorten(&text)),
        })
    }

    /// Hash parts among `hashes` the cache (with its upstreams) lacks.
    async fn missing_hashes(&self, hashes: &[&str]) -> Result<HashSet<String>, Error> {
        let url = self.url("/narinfo", &[])?;
        let mut missing = HashSet::new();
        for batch in hashes.chunks(MISSING_BATCH) {
            let answer: Vec<String> = with_policy(&self.policy, "missing-paths query", || {
                self.call_json(Method::POST, &url, Some(&batch))
            })
            .await?;
            missing.extend(answer);
        }
        Ok(missing)
    }

    /// The bare base64 of the narinfo signature the cache can verify, or `None` when we do not sign.
    fn cachix_sig(&self, narinfo: &NarInfo) -> Result<Option<String>, Error> {
        if narinfo.sigs.is_empty() {
            return Ok(None);
        }
        let fingerprint = narinfo.fingerprint();
        let keys = self
            .public_keys
            .read()
            .map_or_else(|p| p.into_inner().clone(), |k| k.clone());
        for sig in &narinfo.sigs {
            let Some((_, b64)) = sig.split_once(':') else {
                continue;
            };
            // Cachix names the key itself, so only the key bytes have to match.
            if keys.is_empty()
                || keys
                    .iter()
                    .any(|k| k.verify_base64(fingerprint.as_bytes(), b64))
            {
                return Ok(Some(b64.to_owned()));
            }
        }
        Err(Error::Config(format!(
            "no signature of {} verifies against cache {}'s public keys ({}); use the cache's signing key, or \
             no signing_key_file for a Cachix-managed cache",
            narinfo.store_path,
            self.name,
            keys.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        )))
    }

    async fn create(&self, compression: &str) -> Result<Multipart, Error> {
        let url = self.url("/multipart-nar", &[("compression", compression)])?;
        let created: CreatedNar = with_policy(&self.policy, "create upload", || {
            self.call_json(Method::POST, &url, None::<&()>)
        })
        .await?;
        Ok(Multipart {
            nar_id: created.nar_id,
            upload_id: created.upload_id,
        })
    }

    async fn presign(&self, upload: &Multipart, part: u32, md5: &str) -> Result<String, Error> {
        let number = part.to_string();
        let url = self.url(
            &format!("/multipart-nar/{}", upload.nar_id),
            &[("uploadId", &upload.upload_id), ("partNumber", &number)],
        )?;
        let body = serde_json::json!({ "contentMD5": md5 });
        let presigned: PresignedPart = with_policy(&self.policy, "presign part", || {
            self.call_json(Method::POST, &url, Some(&body))
        })
        .await?;
        self.check_presigned(&presigned.upload_url)?;
        Ok(presigned.upload_url)
    }

    /// Refuses a presigned URL that could turn the daemon against another service: it must be https on a public
    /// host, or, when the API itself is on a loopback address (tests, a local mirror), on the API's own host.
    fn check_presigned(&self, upload_url: &str) -> Result<(), Error> {
        let refuse = |why: String| Error::Protocol {
            url: self.cache_url.clone(),
            message: format!(
                "presigned part URL {} refused: {why}",
                without_query(upload_url)
            ),
        };
        let parsed = url::Url::parse(upload_url).map_err(|e| refuse(e.to_string()))?;
        let host = parsed
            .host()
            .ok_or_else(|| refuse("it has no host".into()))?;
        let api = url::Url::parse(&self.cache_url).map_err(|e| refuse(e.to_string()))?;
        let api_host = api
            .host()
            .ok_or_else(|| refuse("the API URL has no host".into()))?;
        if is_local(&api_host) {
            return if parsed.host_str() == api.host_str()
                && matches!(parsed.scheme(), "http" | "https")
            {
                Ok(())
            } else {
                Err(refuse(format!(
                    "the API is on {api_host}, the part URL on another host"
                )))
            };
        }
        if parsed.scheme() != "https" {
            return Err(refuse("not https".into()));
        }
        if is_local(&host) {
            return Err(refuse(format!("{host} is not a public address")));
        }
        Ok(())
    }

    /// Uploads one part; returns its ETag (verbatim, quotes included) if storage sent one.
    async fn upload_part(
        &self,
        upload: &Multipart,
        file: &Path,
        (number, offset, length): (u32, u64, u64),
        md5: Option<String>,
    ) -> Result<Option<String>, Error> {
        let md5 = match md5 {
            Some(md5) => md5,
            None => part_md5(file, offset, length).await?,
        };
        let mut retries = Retries::default();
        let mut refusals = 0;
        loop {
            // A fresh URL for every PUT: one minted earlier may expire while we wait (cachix#564).
            let url = self.presign(upload, number, &md5).await?;
            let error = match self.put_part(&url, file, offset, length, &md5).await {
                Ok(etag) => return Ok(etag),
                Err(PutFailure::Refused(e)) => {
                    refusals += 1;
                    if refusals > MAX_REPRESIGNS {
                        return Err(Error::Transfer {
                            url: without_query(&url),
                            message: format!(
                                "part {number}: storage refused {refusals} presigned URLs in a row, last: {e}"
                            ),
                        });
                    }
                    tracing::debug!("part {number}: presigning again after: {e}");
                    continue;
                }
                Err(PutFailure::Other(e)) => e,
            };
            match retries.next_wait(&self.policy, &error) {
                Some(wait) => {
                    tracing::debug!("part {number}: retrying in {wait:?} after: {error}");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(error),
            }
        }
    }

    async fn put_part(
        &self,
        url: &str,
        file: &Path,
        offset: u64,
        length: u64,
        md5: &str,
    ) -> Result<Option<String>, PutFailure> {
        let shown = without_query(url);
        let body = file_range_body(file, offset, length)
            .await
            .map_err(PutFailure::Other)?;
        // Used verbatim: re-encoding the query would break the signature.
        let request = self
            .client
            .put(url)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header("Content-MD5", md5)
            .header(CONTENT_LENGTH, length)
            .body(body);
        let response = send(request, "PUT", &shown)
            .await
            .map_err(PutFailure::Other)?;
        let status = response.status();
        if status.is_success() {
            return Ok(response
                .headers()
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned));
        }
        let error = api_error("PUT", &shown, response, false).await;
        if status == StatusCode::FORBIDDEN {
            Err(PutFailure::Refused(error))
        } else if status == StatusCode::BAD_REQUEST {
            // BadDigest: the bytes changed on the way; sending them again can succeed.
            Err(PutFailure::Other(Error::Transfer {
                url: shown,
                message: error.to_string(),
            }))
        } else {
            Err(PutFailure::Other(error))
        }
    }

    async fn complete(
        &self,
        upload: &Multipart,
        parts: Option<Vec<CompletedPart>>,
        info: &NarInfoCreate,
    ) -> Result<(), Error> {
        let url = self.url(
            &format!("/multipart-nar/{}/complete", upload.nar_id),
            &[("uploadId", &upload.upload_id)],
        )?;
        let request = CompleteRequest {
            parts,
            nar_info_create: info,
        };
        let mut retries = Retries::default();
        let mut maybe_applied = false;
        loop {
            let error = match self.call(Method::POST, &url, Some(&request)).await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if maybe_applied && !error.is_retryable() && !error.is_auth() {
                // An earlier try may have completed the upload and only its answer got lost; if the cache now
                // has the path, that try succeeded.
                let hash = info.c_store_hash.as_str();
                if !self.missing_hashes(&[hash]).await?.contains(hash) {
                    return Ok(());
                }
                return Err(error);
            }
            match retries.next_wait(&self.policy, &error) {
                Some(wait) => {
                    maybe_applied = true;
                    tracing::debug!("complete: retrying in {wait:?} after: {error}");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(error),
            }
        }
    }

    async fn abort(&self, upload: &Multipart) {
        let result = async {
            let url = self.url(
                &format!("/multipart-nar/{}/abort", upload.nar_id),
                &[("uploadId", &upload.upload_id)],
            )?;
            self.call(Method::POST, &url, None::<&()>).await
        }
        .await;
        if let Err(e) = result {
            tracing::debug!("aborting upload {} failed (ignored): {e}", upload.nar_id);
        }
    }

    async fn send_parts_and_complete(
        &self,
        upload: &Multipart,
        nar: &NarFile<'_>,
        info: &NarInfoCreate,
        first_md5: String,
    ) -> Result<(), Error> {
        let ranges = part_ranges(nar.size, part_size_for(nar.size, self.part_size));
        let mut first_md5 = Some(first_md5);
        let mut etags: Vec<(u32, Option<String>)> = stream::iter(ranges)
            .map(|range| {
                let md5 = if range.0 == 1 { first_md5.take() } else { None };
                async move {
                    let etag = self.upload_part(upload, nar.path, range, md5).await?;
                    Ok::<_, Error>((range.0, etag))
                }
            })
            .buffer_unordered(PARALLEL_PARTS)
            .try_collect()
            .await?;
        etags.sort_unstable_by_key(|(number, _)| *number);
        // Without every ETag the server has to use the parts it stored (Cachix's client does the same).
        let parts = etags
            .into_iter()
            .map(|(part_number, etag)| etag.map(|e_tag| CompletedPart { part_number, e_tag }))
            .collect::<Option<Vec<_>>>();
        self.complete(upload, parts, info).await
    }

    fn load_signing_key(&self) -> Result<Option<SecretKey>, Error> {
        load_signing_key(&self.name, self.signing_key_file.as_deref())
            .map_err(|e| Error::Config(e.to_string()))
    }
}

impl Backend for CachixBackend {
    async fn prepare(&self) -> Result<TargetInfo, Error> {
        let signing_key = self.load_signing_key()?;
        if self.credentials.token().is_none() && signing_key.is_none() {
            return Err(Error::Config(format!(
                "no Cachix auth token for cache {}: set target.auth_token_file or CACHIX_AUTH_TOKEN",
                self.name
            )));
        }
        let url = self.url("", &[])?;
        let value: serde_json::Value = with_policy(&self.policy, "cache info", || {
            self.call_json(Method::GET, &url, None::<&()>)
        })
        .await?;
        let cache: BinaryCache =
            serde_json::from_value(value.clone()).map_err(|e| Error::Protocol {
                url: url.to_string(),
                message: format!("unexpected cache info ({e})"),
            })?;
        let keys: Vec<PublicKey> = cache
            .public_signing_keys
            .iter()
            .filter_map(|k| match PublicKey::parse(k) {
                Ok(key) => Some(key),
                Err(e) => {
                    tracing::warn!("cache {} lists an unusable public key: {e}", self.name);
                    None
                }
            })
            .collect();
        // cachix#96: a key the cache does not list would make every pushed path unverifiable.
        if let Some(key) = &signing_key {
            let ours = key.public_key();
            if !keys.iter().any(|k| k.key_base64() == ours.key_base64()) {
                return Err(Error::Config(format!(
                    "the signing key's public key {ours} is not among cache {}'s keys ({}); a Cachix-managed \
                     cache signs by itself, so remove target.signing_key_file, or use the key registered for \
                     this cache",
                    self.name,
                    cache.public_signing_keys.join(", ")
                )));
            }
        }
        if let Ok(mut guard) = self.public_keys.write() {
            *guard = keys;
        }
        let preferred_compression = match cache.preferred_compression_method.as_deref() {
            Some("ZSTD") => Some(config::Compression::Zstd),
            Some("XZ") => Some(config::Compression::Xz),
            _ => None,
        };
        Ok(TargetInfo {
            read_url: Some(cache.uri),
            public_keys: cache.public_signing_keys,
            preferred_compression,
            stats: Some(value),
        })
    }

    async fn missing(&self, paths: &[StorePath]) -> Result<Vec<StorePath>, Error> {
        let hashes: Vec<&str> = paths.iter().map(StorePath::hash_part).collect();
        let missing = self.missing_hashes(&hashes).await?;
        Ok(paths
            .iter()
            .filter(|p| missing.contains(p.hash_part()))
            .cloned()
            .collect())
    }

    async fn upload(&self, narinfo: &NarInfo, nar: NarFile<'_>) -> Result<(), Error> {
        let compression = match narinfo.compression.as_str() {
            "zstd" => "zst",
            "xz" => "xz",
            other => {
                return Err(Error::Config(format!(
                    "Cachix stores only zstd or xz NARs, not {other}"
                )))
            }
        };
        let info = NarInfoCreate::new(narinfo, &nar, self.cachix_sig(narinfo)?);
        // The first part's checksum is computed while the upload is being created.
        let first = part_ranges(nar.size, part_size_for(nar.size, self.part_size))[0];
        let (upload, first_md5) = tokio::join!(
            self.create(compression),
            part_md5(nar.path, first.1, first.2)
        );
        let upload = upload?;
        let first_md5 = match first_md5 {
            Ok(md5) => md5,
            Err(e) => {
                self.abort(&upload).await;
                return Err(e);
            }
        };
        let result = self
            .send_parts_and_complete(&upload, &nar, &info, first_md5)
            .await;
        let Err(error) = result else {
            return Ok(());
        };
        // Only our own upload (narId and uploadId from `create` above) is ever aborted.
        self.abort(&upload).await;
        if !super::race::another_writer_may_have_won(&error) {
            return Err(error);
        }
        // Another host pushing the same path may have completed it first (#22): then it is there.
        let hash = info.c_store_hash.as_str();
        let present = !self.missing_hashes(&[hash]).await?.contains(hash);
        super::race::after_failure(error, present)
    }
}

/// Splits `cachix://NAME[?api=URL]` into the name and the API base (no trailing `/`).
fn parse_url(url: &str, default_api: &str) -> Result<(String, String), Error> {
    let rest = url
        .strip_prefix("cachix://")
        .ok_or_else(|| Error::Config(format!("{url} is not a cachix:// URL")))?;
    let (name, query) = rest.split_once('?').unwrap_or((rest, ""));
    let name = name.trim_end_matches('/');
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(Error::Config(format!(
            "{url}: the cache name must be lowercase letters, digits and dashes"
        )));
    }
    let mut api = default_api.to_owned();
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "api" => api = value.into_owned(),
            other => {
                return Err(Error::Config(format!(
                    "{url}: unknown parameter {other:?} (only api=… is accepted)"
                )))
            }
        }
    }
    let parsed = url::Url::parse(&api)
        .map_err(|e| Error::Config(format!("Cachix API base {api:?}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.query().is_some() {
        return Err(Error::Config(format!(
            "Cachix API base {api:?} must be an http(s) URL without a query"
        )));
    }
    Ok((name.to_owned(), api.trim_end_matches('/').to_owned()))
}

/// The environment variable Cachix's client takes a self-signed cache's secret key from (bare base64).
pub const SIGNING_KEY_ENV: &str = "CACHIX_SIGNING_KEY";

/// The cache name of a `cachix://NAME[?…]` URL, or `None` for other URLs (unvalidated: [`CachixBackend::new`]
/// reports a bad name).
pub fn cache_name(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("cachix://")?;
    let name = rest.split_once('?').map_or(rest, |(name, _)| name);
    Some(name.trim_end_matches('/'))
}

/// The name Cachix gives a self-signed cache's key, which prefixes the signatures Nix checks.
pub fn key_name(cache: &str) -> String {
    format!("{cache}.cachix.org-1")
}

/// The secret key for cache `cache`: `file` in Nix's or Cachix's bare base64 form, else the value of
/// [`SIGNING_KEY_ENV`]; `None` when neither is set (a Cachix-managed cache signs by itself).
pub fn load_signing_key(
    cache: &str,
    file: Option<&Path>,
) -> Result<Option<SecretKey>, crate::signing::Error> {
    let env = std::env::var(SIGNING_KEY_ENV)
        .ok()
        .map(crate::secret::Secret::new);
    signing_key_from(cache, file, env.as_ref())
}

/// [`load_signing_key`] with the environment variable's value passed in. An empty variable counts as unset.
fn signing_key_from(
    cache: &str,
    file: Option<&Path>,
    env: Option<&crate::secret::Secret>,
) -> Result<Option<SecretKey>, crate::signing::Error> {
    if let Some(path) = file {
        return SecretKey::load_cachix(path, &key_name(cache)).map(Some);
    }
    match env {
        Some(value) if !value.is_empty() => {
            SecretKey::parse_cachix(value.expose(), &key_name(cache))
                .map(Some)
                .map_err(|e| match e {
                    crate::signing::Error::InvalidSecretKey { reason, .. } => {
                        crate::signing::Error::InvalidSecretKey {
                            origin: None,
                            reason: format!("{SIGNING_KEY_ENV}: {reason}"),
                        }
                    }
                    other => other,
                })
        }
        _ => Ok(None),
    }
}

/// Base64 of the MD5 of `length` bytes at `offset` (the `Content-MD5` of a part).
async fn part_md5(file: &Path, offset: u64, length: u64) -> Result<String, Error> {
    let path = file.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut handle = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        handle
            .seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io(&path, e))?;
        let mut reader = handle.take(length);
        let mut hasher = Md5::new();
        let mut buffer = vec![0u8; 256 * 1024];
        let mut read = 0u64;
        loop {
            let n = reader.read(&mut buffer).map_err(|e| Error::io(&path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            read += n as u64;
        }
        if read != length {
            return Err(Error::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("expected {length} bytes at offset {offset}, found {read}"),
                ),
            ));
        }
        Ok(base64::engine::general_purpose::STANDARD.encode(hasher.finalize()))
    })
    .await
    .map_err(|e| Error::Config(format!("hashing a part failed: {e}")))?
}

/// Turns a non-2xx answer into an error. From the API (`api`), 401/403 mean our token is refused; from storage
/// they do not. A 429/5xx without `Retry-After` may carry `retry_after` in a JSON body (cachix#729).
async fn api_error(method: &str, url: &str, response: Response, api: bool) -> Error {
    let code = response.status().as_u16();
    let headers: HeaderMap = response.headers().clone();
    let body = small_body(response).await.unwrap_or_default();
    let retry_after = retry_after(&headers).or_else(|| json_retry_after(&headers, &body));
    let detail: String = body.chars().filter(|c| !c.is_control()).take(200).collect();
    let url = config::redact_url(url);
    match code {
        401 | 403 if api => Error::Unauthorized { url, code, detail },
        _ => Error::Status {
            method: method.to_owned(),
            url,
            code,
            retry_after,
            detail,
        },
    }
}

/// `retry_after` (seconds) from an `application/problem+json` or `application/json` body.
fn json_retry_after(headers: &HeaderMap, body: &str) -> Option<Duration> {
    let content_type = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = content_type.split(';').next()?.trim();
    if essence != "application/problem+json" && essence != "application/json" {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    value
        .get("retry_after")?
        .as_u64()
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

/// Whether `host` names this machine or a private, link-local or otherwise non-public address.
fn is_local(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
        url::Host::Ipv4(ip) => {
            ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || ip.is_multicast()
                || ip.octets()[0] == 0
                // 100.64.0.0/10, carrier-grade NAT
                || (ip.octets()[0] == 100 && ip.octets()[1] & 0xc0 == 64)
        }
        url::Host::Ipv6(ip) => {
            let first = ip.segments()[0];
            ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || first & 0xfe00 == 0xfc00 // unique local
                || first & 0xffc0 == 0xfe80 // link-local
                || ip
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_local(&url::Host::Ipv4(v4)))
        }
    }
}

/// A presigned URL without its query (which holds the signature).
fn without_query(url: &str) -> String {
    url.split('?').next().unwrap_or(url).to_owned()
}

fn shorten(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Sha256Hash;

    fn bare_and_nix_key_files(dir: &Path) -> (SecretKey, PathBuf, PathBuf) {
        let key = crate::signing::generate("mine-1");
        let nix_form = key.to_nix_string();
        let nix_file = dir.join("nix.sec");
        std::fs::write(&nix_file, nix_form.expose()).unwrap();
        let bare_file = dir.join("bare.sec");
        std::fs::write(&bare_file, nix_form.expose().split_once(':').unwrap().1).unwrap();
        (key, nix_file, bare_file)
    }

    #[test]
    fn signing_key_from_a_file_in_either_form() {
        let dir = tempfile::tempdir().unwrap();
        let (key, nix_file, bare_file) = bare_and_nix_key_files(dir.path());
        let bare = signing_key_from("demo", Some(&bare_file), None)
            .unwrap()
            .unwrap();
        assert_eq!(bare.name(), "demo.cachix.org-1");
        assert_eq!(
            bare.public_key().key_base64(),
            key.public_key().key_base64()
        );
        let nix = signing_key_from("demo", Some(&nix_file), None)
            .unwrap()
            .unwrap();
        assert_eq!(nix.public_key(), key.public_key());
    }

    #[test]
    fn signing_key_from_the_environment_when_no_file_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let (key, nix_file, _) = bare_and_nix_key_files(dir.path());
        let nix_form = key.to_nix_string();
        let env = crate::secret::Secret::new(nix_form.expose().split_once(':').unwrap().1);
        let from_env = signing_key_from("demo", None, Some(&env)).unwrap().unwrap();
        assert_eq!(from_env.name(), "demo.cachix.org-1");
        assert_eq!(
            from_env.public_key().key_base64(),
            key.public_key().key_base64()
        );
        // The file is the explicit choice and wins over the environment.
        let other = crate::signing::generate("other-1").to_nix_string();
        let other_env = crate::secret::Secret::new(other.expose().split_once(':').unwrap().1);
        let from_file = signing_key_from("demo", Some(&nix_file), Some(&other_env))
            .unwrap()
            .unwrap();
        assert_eq!(from_file.public_key(), key.public_key());
        // Unset or empty: no key, and the cache signs by itself.
        assert!(signing_key_from("demo", None, None).unwrap().is_none());
        let empty = crate::secret::Secret::new("  ");
        assert!(signing_key_from("demo", None, Some(&empty))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_bad_environment_key_is_named_without_its_value() {
        let secret = "c2VjcmV0LWJ1dC10b28tc2hvcnQ=";
        let err = signing_key_from("demo", None, Some(&crate::secret::Secret::new(secret)))
            .unwrap_err()
            .to_string();
        assert!(err.contains(SIGNING_KEY_ENV), "{err}");
        assert!(!err.contains(secret), "{err}");
    }

    #[test]
    fn cache_names() {
        assert_eq!(cache_name("cachix://demo"), Some("demo"));
        assert_eq!(cache_name("cachix://demo/?api=http://x"), Some("demo"));
        assert_eq!(cache_name("s3://demo"), None);
        assert_eq!(key_name("demo"), "demo.cachix.org-1");
    }

    #[test]
    fn presigned_urls_must_point_at_public_https_or_the_local_api() {
        let public =
            CachixBackend::new("cachix://c", &Config::default(), Credentials::none()).unwrap();
        assert!(public
            .check_presigned("https://bucket.s3.amazonaws.com/nar/x?X-Sig=1")
            .is_ok());
        for bad in [
            "http://bucket.s3.amazonaws.com/nar/x",
            "https://169.254.169.254/latest/meta-data",
            "https://10.1.2.3/x",
            "https://127.0.0.1:9000/x",
            "https://localhost/x",
            "https://[::1]/x",
            "https://[::ffff:192.168.1.1]/x",
            "file:///etc/passwd",
            "not a url",
        ] {
            let err = public.check_presigned(bad).unwrap_err().to_string();
            assert!(err.contains("presigned part URL"), "{bad}: {err}");
            assert!(!err.contains("X-Sig"), "{err}");
        }
        let mut config = Config::default();
        config.target.cachix_api = "http://127.0.0.1:8080".into();
        let local = CachixBackend::new("cachix://c", &config, Credentials::none()).unwrap();
        assert!(local
            .check_presigned("http://127.0.0.1:9999/_s3/1?x=y")
            .is_ok());
        for bad in [
            "http://127.0.0.2:8080/x",
            "https://bucket.s3.amazonaws.com/x",
        ] {
            assert!(local.check_presigned(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn url_forms() {
        let (name, api) = parse_url("cachix://mycache", "https://cachix.org").unwrap();
        assert_eq!(
            (name.as_str(), api.as_str()),
            ("mycache", "https://cachix.org")
        );
        let (name, api) = parse_url(
            "cachix://my-cache2/?api=http%3A%2F%2F127.0.0.1%3A8080%2F",
            "https://cachix.org",
        )
        .unwrap();
        assert_eq!(
            (name.as_str(), api.as_str()),
            ("my-cache2", "http://127.0.0.1:8080")
        );
        for bad in [
            "cachix://",
            "cachix://My_Cache",
            "cachix://c?token=x",
            "http://c",
        ] {
            assert!(parse_url(bad, "https://cachix.org").is_err(), "{bad}");
        }
        assert!(parse_url("cachix://c", "ftp://x").is_err());
    }

    #[test]
    fn backoff_follows_cachix() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(0, 0.0), Duration::from_millis(500));
        assert_eq!(p.backoff(0, 1.0), Duration::from_secs(1));
        assert_eq!(p.backoff(3, 1.0), Duration::from_secs(8));
        assert_eq!(p.backoff(10, 0.5), Duration::from_secs(15));
        // Without hints the waits stop once they would pass 90 s in total.
        let e = Error::Timeout { url: "u".into() };
        let mut r = Retries::default();
        let mut total = Duration::ZERO;
        while let Some(w) = r.next_wait(&p, &e) {
            total += w;
        }
        assert!(
            total <= p.budget && r.count >= 7,
            "{total:?} after {}",
            r.count
        );
    }

    #[test]
    fn hints_replace_the_wait_and_are_clamped() {
        let p = RetryPolicy::default();
        let status = |retry_after| Error::Status {
            method: "GET".into(),
            url: "u".into(),
            code: 429,
            retry_after,
            detail: String::new(),
        };
        let mut r = Retries::default();
        assert_eq!(
            r.next_wait(&p, &status(Some(Duration::from_secs(7)))),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            r.next_wait(&p, &status(Some(Duration::from_secs(600)))),
            Some(p.max_hint)
        );
        let refused = Error::Unauthorized {
            url: "u".into(),
            code: 401,
            detail: String::new(),
        };
        assert_eq!(r.next_wait(&p, &refused), None);
    }

    #[test]
    fn problem_json_retry_after() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        let body = r#"{"title":"Error 502","retry_after":60}"#;
        assert_eq!(json_retry_after(&h, body), Some(Duration::from_secs(60)));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
        assert_eq!(json_retry_after(&h, body), None);
    }

    #[test]
    fn nar_info_create_encodings() {
        let text = include_str!(
            "../../tests/fixtures/vectors/cache-zstd/ripzxnb3whas7h2iw572d3b0sby1nxxw.narinfo"
        );
        let narinfo = NarInfo::parse(text, "/nix/store").unwrap();
        let file_hash = narinfo.file_hash.unwrap();
        let nar = NarFile {
            path: Path::new("/dev/null"),
            size: 216,
            sha256: file_hash,
        };
        let (_, b64) = narinfo.sigs[0].split_once(':').unwrap();
        let info = NarInfoCreate::new(&narinfo, &nar, Some(b64.to_owned()));
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cStoreHash": "ripzxnb3whas7h2iw572d3b0sby1nxxw",
                "cStoreSuffix": "vec-top",
                "cNarHash": "sha256:1dinrxag5kdkvjic29507irlj9cdxjzbmb806jqcwq5k2wai6cfg",
                "cNarSize": 400,
                "cFileHash": file_hash.to_hex(),
                "cFileSize": 216,
                "cReferences": ["8pjibnycdlc071yls0gkbsb7l2ffmlgg-vec-dep", "ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top"],
                "cDeriver": "n5yfvnmayipw3yksgvfs2vkkkq50fl4k-vec-top.drv",
                "cSig": b64,
            })
        );
        assert_eq!(info.c_file_hash.len(), 64);
        assert!(info
            .c_file_hash
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
        let added = include_str!(
            "../../tests/fixtures/vectors/cache-zstd/3104630xpvc1j0fnzpa60lzv3x9a7k10.narinfo"
        );
        let narinfo = NarInfo::parse(added, "/nix/store").unwrap();
        let nar = NarFile {
            path: Path::new("/dev/null"),
            size: 1,
            sha256: Sha256Hash::of(b""),
        };
        let json = serde_json::to_value(NarInfoCreate::new(&narinfo, &nar, None)).unwrap();
        assert_eq!(json["cDeriver"], "unknown-deriver");
        assert_eq!(json["cReferences"], serde_json::json!([]));
        assert!(json["cSig"].is_null());
    }
}
