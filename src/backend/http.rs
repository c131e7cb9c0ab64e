//! `http://` and `https://`: the PUT/HEAD/GET protocol of Nix's HTTP binary cache store.
//!
//! The request sequence mirrors what `nix copy --to http://…` sends (nix-formats.md §8.2):
//!
//! ```text
//! GET  /prefix/nix-cache-info          404 → PUT it (text/x-nix-cache-info)
//! HEAD /prefix/<hash>.narinfo          one per candidate path: 200 present, 404 missing
//! HEAD /prefix/nar/<filehash>.nar.zst  an existing NAR is not sent again
//! PUT  /prefix/nar/<filehash>.nar.zst  application/x-nix-nar
//! PUT  /prefix/<hash>.narinfo          text/x-nix-narinfo, always last
//! ```
//!
//! Authentication: a bearer token from `auth_token_file`, or basic auth from the URL's user info. Redirects are
//! only followed within the same host, so a target cannot send our credentials elsewhere.

use std::time::Duration;

use reqwest::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, Response, StatusCode};

use crate::config::{redact_url, Config};
use crate::secret::Secret;
use crate::store_path::StorePath;

use super::{
    Backend, Credentials, DocumentBytes, Error, NarFile, NarUpload, NarinfoGate, TargetInfo,
};

/// Largest response body read for diagnostics or small documents.
pub const MAX_SMALL_BODY: usize = 64 * 1024;
/// Longest time spent reading such a body: a target dribbling bytes cannot hold a worker.
const SMALL_BODY_TIME: Duration = Duration::from_secs(10);

/// A binary cache behind plain HTTP PUT (nginx WebDAV, a generic object store gateway, …).
#[derive(Debug, Clone)]
pub struct HttpBackend {
    base: String,
    client: reqwest::Client,
    credentials: Credentials,
    basic: Option<(String, Secret)>,
    /// The `nix-cache-info` written when the target has none.
    cache_info: String,
}

impl HttpBackend {
    /// A backend for `url` (`http(s)://[user:password@]host[:port][/prefix]`).
    pub fn new(url: &str, config: &Config, credentials: Credentials) -> Result<HttpBackend, Error> {
        let mut parsed =
            url::Url::parse(url).map_err(|e| Error::Config(format!("{}: {e}", redact_url(url))))?;
        let basic = if parsed.username().is_empty() {
            None
        } else {
            let user = percent_decode(parsed.username());
            let password = Secret::new(percent_decode(parsed.password().unwrap_or_default()));
            // What basic auth sends on the wire, in case a server echoes the header back.
            crate::secret::remember(&base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!("{user}:{}", password.expose()),
            ));
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            Some((user, password))
        };
        let base = parsed.as_str().trim_end_matches('/').to_owned();
        Ok(HttpBackend {
            base,
            client: client(Duration::from_secs(config.target.timeout_secs))?,
            credentials,
            basic,
            cache_info: crate::cache_info::CacheInfo::from_config(config).render(),
        })
    }

    fn url(&self, key: &str) -> String {
        format!("{}/{key}", self.base)
    }

    fn request(&self, method: Method, url: &str) -> RequestBuilder {
        let builder = self.client.request(method, url);
        if let Some(token) = self.credentials.token() {
            builder.bearer_auth(token.expose())
        } else if let Some((user, password)) = &self.basic {
            builder.basic_auth(user, Some(password.expose()))
        } else {
            builder
        }
    }

    /// Whether `key` exists (HEAD).
    async fn exists(&self, key: &str) -> Result<bool, Error> {
        super::with_retries(|| self.exists_once(key)).await
    }

    async fn exists_once(&self, key: &str) -> Result<bool, Error> {
        let url = self.url(key);
        let response = send(self.request(Method::HEAD, &url), "HEAD", &url).await?;
        match response.status() {
            s if s.is_success() => Ok(true),
            // S3-style servers answer 403 for absent keys in unlistable buckets.
            StatusCode::NOT_FOUND | StatusCode::FORBIDDEN if self.credentials.token().is_none() => {
                Ok(false)
            }
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error("HEAD", &url, response).await),
        }
    }

    /// PUTs a small in-memory document, retrying transient failures.
    async fn put_bytes(&self, key: &str, content_type: &str, bytes: Vec<u8>) -> Result<(), Error> {
        let length = bytes.len() as u64;
        super::with_retries(|| self.put(key, content_type, bytes.clone().into(), length)).await
    }

    /// PUTs a file, reopening it for every try.
    async fn put_file(&self, key: &str, content_type: &str, nar: NarFile<'_>) -> Result<(), Error> {
        super::with_retries(|| async {
            let body = super::wire::file_body(nar.path, 0, nar.size).await?;
            self.put(key, content_type, body, nar.size).await
        })
        .await
    }

    async fn put(
        &self,
        key: &str,
        content_type: &str,
        body: reqwest::Body,
        length: u64,
    ) -> Result<(), Error> {
        let url = self.url(key);
        let response = send(
            self.request(Method::PUT, &url)
                .header(CONTENT_TYPE, content_type)
                .header(CONTENT_LENGTH, length)
                .body(body),
            "PUT",
            &url,
        )
        .await?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(status_error("PUT", &url, response).await)
        }
    }
}

impl Backend for HttpBackend {
    async fn prepare(&self) -> Result<TargetInfo, Error> {
        let url = self.url("nix-cache-info");
        let response = super::with_retries(|| async {
            let response = send(self.request(Method::GET, &url), "GET", &url).await?;
            match response.status() {
                s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(response),
                _ => Err(status_error("GET", &url, response).await),
            }
        })
        .await?;
        if response.status() == StatusCode::NOT_FOUND {
            let text = self.cache_info.clone();
            self.put_document(DocumentBytes::cache_info(text)).await?;
        }
        Ok(TargetInfo {
            read_url: Some(redact_url(&self.base)),
            ..TargetInfo::default()
        })
    }

    async fn missing(&self, paths: &[StorePath]) -> Result<Vec<StorePath>, Error> {
        super::missing_narinfos(paths, |key| async move { self.exists(&key).await }).await
    }

    async fn upload_when(&self, upload: NarUpload<'_>, mut gate: NarinfoGate) -> Result<(), Error> {
        let NarUpload { narinfo, nar } = upload;
        if !self.exists(&narinfo.url).await? {
            match self
                .put_file(&narinfo.url, "application/x-nix-nar", nar)
                .await
            {
                Ok(()) => {}
                // WebDAV answers 409/412 when another writer's PUT of the same file got in the way (#22); the
                // NAR it stored has the same name, so the same bytes.
                Err(
                    e @ Error::Status {
                        code: 409 | 412, ..
                    },
                ) => {
                    let present = self.exists(&narinfo.url).await?;
                    super::race::after_failure(e, present)?;
                }
                Err(e) => return Err(e),
            }
        }
        gate.nar_stored().await?;
        self.put_document(DocumentBytes::narinfo(narinfo)).await
    }

    async fn put_document(&self, document: DocumentBytes) -> Result<(), Error> {
        self.put_bytes(&document.key, document.content_type, document.bytes)
            .await
    }

    async fn get_document(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let url = self.url(key);
        super::with_retries(|| async {
            let response = send(self.request(Method::GET, &url), "GET", &url).await?;
            match response.status() {
                s if s.is_success() => whole_small_body("GET", &url, response).await.map(Some),
                StatusCode::NOT_FOUND => Ok(None),
                _ => Err(status_error("GET", &url, response).await),
            }
        })
        .await
    }
}

/// The HTTP client every backend uses: bounded connect and idle timeouts, redirects only within one origin
/// (scheme, host and port), so a target cannot send our credentials elsewhere.
pub fn client(timeout: Duration) -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .user_agent(concat!("nixpush/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(timeout.min(Duration::from_secs(30)))
        .read_timeout(timeout)
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let same_origin = attempt
                .previous()
                .first()
                .is_some_and(|first| first.origin() == attempt.url().origin());
            if attempt.previous().len() > 5 {
                attempt.error("too many redirects")
            } else if same_origin {
                attempt.follow()
            } else {
                let to = redact_url(attempt.url().as_str());
                attempt.error(format!("redirect to another host refused: {to}"))
            }
        }))
        .build()
        .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))
}

/// Sends a request, turning transport failures into classified errors.
pub async fn send(request: RequestBuilder, method: &str, url: &str) -> Result<Response, Error> {
    request
        .send()
        .await
        .map_err(|e| transport_error(method, url, &e))
}

/// Classifies a reqwest error that happened before a status was available.
pub fn transport_error(method: &str, url: &str, e: &reqwest::Error) -> Error {
    let url = redact_url(url);
    // The reqwest message embeds the URL; ours is already in the variant, so keep only the cause chain.
    let mut message = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    if message.is_empty() {
        message = format!("{method} failed");
    }
    if e.is_timeout() {
        Error::Timeout { url }
    } else if e.is_connect() {
        Error::Connect { url, message }
    } else if e.is_redirect() {
        Error::Protocol { url, message }
    } else {
        Error::Transfer { url, message }
    }
}

/// Turns a non-success response into an error, reading a bounded start of its body for the message.
pub async fn status_error(method: &str, url: &str, response: Response) -> Error {
    let code = response.status().as_u16();
    let retry_after = retry_after(response.headers());
    let body = small_body(response).await.unwrap_or_default();
    answer_error(method, url, code, retry_after, &body, true)
}

/// The error for an answer with status `code` and body `body` (its start, without control characters, becomes
/// the detail). 401/403 mean the credentials were refused when `from_target` is set (not when a presigned
/// storage URL answers).
pub fn answer_error(
    method: &str,
    url: &str,
    code: u16,
    retry_after: Option<Duration>,
    body: &str,
    from_target: bool,
) -> Error {
    let detail: String = body.chars().filter(|c| !c.is_control()).take(200).collect();
    let url = redact_url(url);
    match code {
        401 | 403 if from_target => Error::Unauthorized { url, code, detail },
        _ => Error::Status {
            method: method.to_owned(),
            url,
            code,
            retry_after,
            detail,
        },
    }
}

/// Reads at most 64 KiB of a response body as text, for at most 10 s; the rest is dropped unread.
pub async fn small_body(response: Response) -> Result<String, reqwest::Error> {
    let (body, _) = bounded_body(response).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Reads a whole response body of at most 64 KiB that ends within 10 s; anything larger or slower is a protocol
/// error naming `url` (redacted here), never a truncated document.
pub async fn whole_small_body(
    method: &str,
    url: &str,
    response: Response,
) -> Result<Vec<u8>, Error> {
    let (bytes, complete) = bounded_body(response)
        .await
        .map_err(|e| transport_error(method, url, &e))?;
    if !complete {
        return Err(Error::Protocol {
            url: redact_url(url),
            message: format!(
                "the answer is larger than {} KiB or did not end within {} s",
                MAX_SMALL_BODY / 1024,
                SMALL_BODY_TIME.as_secs()
            ),
        });
    }
    Ok(bytes)
}

/// Reads at most 64 KiB of a response body, for at most 10 s. The flag says whether that was the whole body.
pub async fn bounded_body(mut response: Response) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let deadline = tokio::time::Instant::now() + SMALL_BODY_TIME;
    let mut body = Vec::new();
    loop {
        let chunk = match tokio::time::timeout_at(deadline, response.chunk()).await {
            Ok(chunk) => chunk?,
            Err(_) => return Ok((body, false)),
        };
        let Some(chunk) = chunk else {
            return Ok((body, true));
        };
        let room = MAX_SMALL_BODY - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
}

/// Parses `Retry-After` as delta-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    when.duration_since(std::time::SystemTime::now()).ok()
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d <= Duration::from_secs(120) && d >= Duration::from_secs(100),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn credentials_in_url_become_basic_auth() {
        let config = Config::default();
        let b = HttpBackend::new(
            "http://alice:s%3Acret@127.0.0.1:9/cache/",
            &config,
            Credentials::none(),
        )
        .unwrap();
        assert_eq!(b.base, "http://127.0.0.1:9/cache");
        let (user, password) = b.basic.as_ref().unwrap();
        assert_eq!(user, "alice");
        assert_eq!(password.expose(), "s:cret");
    }
}
