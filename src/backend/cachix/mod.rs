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

mod api;
mod keys;
mod multipart;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::Duration;

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH};
use reqwest::{Method, Response};
use serde::{Deserialize, Serialize};

use crate::config::{self, Config};
use crate::narinfo::NarInfo;
use crate::retry;
use crate::signing::PublicKey;
use crate::store_path::StorePath;

use super::documents::Document;
use super::http::{send, whole_small_body};
use super::parts::{part_ranges, part_size_for};
use super::{Backend, Credentials, DocumentBytes, Error, NarUpload, NarinfoGate, TargetInfo};

pub use api::NarInfoCreate;
pub use keys::{cache_name, key_name, load_signing_key, SIGNING_KEY_ENV};

use api::{api_error, shorten, BinaryCache};
use multipart::part_md5;

/// What Cachix's API has no endpoint for: no build logs, listings or realisations, one signature per narinfo
/// (`cSig`), a `nix-cache-info` the service writes itself, and no narinfo without its NAR upload.
pub const CANNOT_STORE: &[Document] = &[
    Document::BuildLog,
    Document::NarListing,
    Document::Realisation,
    Document::CacheInfoFields,
    Document::ExtraSignatures,
    Document::Resign,
];

/// Hashes per missing-paths request: Cachix's client sends at most this many (about 1 MB of JSON).
pub const MISSING_BATCH: usize = 32_768;

/// The parameters of Cachix's HTTP retry policy (cachix-api.md §7.1), as [`crate::retry::Policy::cachix`] takes
/// them: equal-jitter backoff from `base` doubling, each wait at most `cap`, no retry once the waits would exceed
/// `budget` in total; a server hint replaces the computed wait but is clamped to `max_hint`.
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

impl From<RetryPolicy> for retry::Policy {
    fn from(p: RetryPolicy) -> retry::Policy {
        retry::Policy::cachix(p.base, p.cap, p.budget, p.max_hint)
    }
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
    policy: retry::Policy,
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
            policy: RetryPolicy::default().into(),
            public_keys: RwLock::new(Vec::new()),
        })
    }

    /// Replaces the retry policy (tests use short waits).
    pub fn with_policy(mut self, policy: RetryPolicy) -> CachixBackend {
        self.policy = policy.into();
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
        let bytes = whole_small_body(method.as_str(), url.as_str(), response).await?;
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
            let answer: Vec<String> =
                retry::with_retries(&self.policy, "missing-paths query", || {
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
        let value: serde_json::Value = retry::with_retries(&self.policy, "cache info", || {
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

    async fn upload_when(&self, upload: NarUpload<'_>, mut gate: NarinfoGate) -> Result<(), Error> {
        let NarUpload { narinfo, nar } = upload;
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
        // Completing creates the narinfo, so it waits for the gate; the parts need not.
        let result = async {
            let parts = self.send_parts(&upload, &nar, first_md5).await?;
            gate.nar_stored().await?;
            self.complete(&upload, parts, &info).await
        }
        .await;
        let Err(error) = result else {
            return Ok(());
        };
        // Only our own upload (narId and uploadId from `create` above) is ever aborted.
        self.abort(&upload).await;
        // A refused gate (`Interrupted`) is never another writer's doing.
        if !super::race::another_writer_may_have_won(&error) {
            return Err(error);
        }
        // Another host pushing the same path may have completed it first (#22): then it is there.
        let hash = info.c_store_hash.as_str();
        let present = !self.missing_hashes(&[hash]).await?.contains(hash);
        super::race::after_failure(error, present)
    }

    async fn put_document(&self, document: DocumentBytes) -> Result<(), Error> {
        Err(Error::Config(format!(
            "Cachix's API cannot store {}; the engine should not have asked",
            document.key
        )))
    }

    async fn get_document(&self, _key: &str) -> Result<Option<Vec<u8>>, Error> {
        // Narinfos are only created with a NAR upload and read through the cache's own URL; nothing here needs
        // them back.
        Ok(None)
    }

    fn cannot_store(&self) -> &'static [Document] {
        CANNOT_STORE
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_default_policy_is_cachix_s() {
        assert_eq!(
            retry::Policy::from(RetryPolicy::default()),
            retry::Policy::cachix(
                Duration::from_secs(1),
                Duration::from_secs(15),
                Duration::from_secs(90),
                Duration::from_secs(120),
            )
        );
    }
}
