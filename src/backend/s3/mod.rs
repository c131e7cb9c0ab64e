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
//! SlowDown` and `429` lower the number of requests in flight ([`Throttle`]) and never fail a path. With a custom
//! `endpoint` addressing is path-style (`http://host:port/bucket/key`), as Nix's store does; otherwise
//! `https://bucket.s3.<region>.amazonaws.com/key`. Credentials come from the chain AWS users know (see
//! [`credentials`]): `profile=`, the environment, web identity, the shared files, instance metadata.
//!
//! The URL is `address`'s, one request's signing, throttling and retries `request`'s, single objects
//! `objects`' and large NARs `multipart`'s.

use std::time::Duration;

use reqwest::StatusCode;
use rusty_s3::{Bucket, S3Action, UrlStyle};

use crate::config::{redact_url, Config};
use crate::store_path::StorePath;

use super::http::{status_error, whole_small_body};
use super::throttle::Throttle;
use super::{Backend, DocumentBytes, Error, NarUpload, NarinfoGate, TargetInfo};

mod address;
pub mod credentials;
mod multipart;
mod objects;
mod request;

use request::s3_error;

/// How long a presigned request stays valid; requests are signed right before they are sent.
const PRESIGN_FOR: Duration = Duration::from_secs(3600);
/// Requests in flight to one bucket at most, before any `SlowDown` lowers it.
const MAX_IN_FLIGHT: usize = 64;

/// An S3 (or S3-compatible) bucket.
#[derive(Debug)]
pub struct S3Backend {
    url: String,
    bucket: Bucket,
    /// Boxed: the chain's state would make every `AnyBackend` large.
    credentials: Box<credentials::Provider>,
    client: reqwest::Client,
    part_size: u64,
    /// The `nix-cache-info` written when the target has none.
    cache_info: String,
    throttle: Throttle,
}

impl S3Backend {
    /// A backend for `url`; fails when the URL is malformed or the credentials named (a profile, keys in a file)
    /// cannot be read. Keys from STS or instance metadata are fetched on first use.
    pub fn new(url: &str, config: &Config) -> Result<S3Backend, Error> {
        let parsed = address::parse_url(url)?;
        let credentials =
            credentials::Provider::new(parsed.profile.clone(), parsed.region.clone())?;
        S3Backend::with_provider(url, config, credentials)
    }

    fn with_provider(
        url: &str,
        config: &Config,
        credentials: credentials::Provider,
    ) -> Result<S3Backend, Error> {
        let parsed = address::parse_url(url)?;
        let style = if parsed.virtual_host {
            UrlStyle::VirtualHost
        } else {
            UrlStyle::Path
        };
        let timeout = Duration::from_secs(config.target.timeout_secs);
        let client = match address::loopback_bucket_host(&parsed) {
            Some((host, port)) => address::loopback_client(&host, port, timeout)?,
            None => super::http::client(timeout)?,
        };
        let bucket = Bucket::new(parsed.endpoint, style, parsed.bucket, parsed.region)
            .map_err(|e| Error::Config(format!("{}: {e}", redact_url(url))))?;
        Ok(S3Backend {
            url: redact_url(url),
            bucket,
            credentials: Box::new(credentials),
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

    /// Where the credentials in use came from (never the keys): the environment, a profile, web identity, …
    pub fn credentials_source(&self) -> String {
        self.credentials.source()
    }
}

impl Backend for S3Backend {
    async fn prepare(&self) -> Result<TargetInfo, Error> {
        self.credentials.reread_fixed();
        self.credentials.current().await?;
        if !self.exists("nix-cache-info").await? {
            let text = self.cache_info.clone();
            self.put_bytes_if_absent(DocumentBytes::cache_info(text))
                .await?;
        }
        Ok(TargetInfo {
            read_url: Some(self.url.clone()),
            ..TargetInfo::default()
        })
    }

    async fn missing(&self, paths: &[StorePath]) -> Result<Vec<StorePath>, Error> {
        crate::backend::missing_narinfos(paths, |key| async move { self.exists(&key).await }).await
    }

    async fn upload_when(&self, upload: NarUpload<'_>, mut gate: NarinfoGate) -> Result<(), Error> {
        let NarUpload { narinfo, nar } = upload;
        // As Nix does: a NAR already there (same file hash, same bytes) is not sent again.
        if self.object_size(&narinfo.url).await? != Some(nar.size) {
            self.put_nar(&narinfo.url, &nar).await?;
        }
        gate.nar_stored().await?;
        self.put_bytes_if_absent(DocumentBytes::narinfo(narinfo))
            .await
    }

    async fn put_document(&self, document: DocumentBytes) -> Result<(), Error> {
        self.put_bytes(document).await
    }

    async fn get_document(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        self.retrying(|keys| async move {
            let url = self
                .bucket
                .get_object(Some(&keys.s3), key)
                .sign(PRESIGN_FOR);
            let (response, shown) = self.send("GET", &url, |c, u| c.get(u)).await?;
            match response.status() {
                s if s.is_success() => whole_small_body("GET", &shown, response).await.map(Some),
                StatusCode::NOT_FOUND => Ok(None),
                // Without s3:ListBucket, S3 answers 403 for a key that does not exist; but refused keys are
                // refused keys.
                StatusCode::FORBIDDEN => match s3_error("GET", &shown, response).await {
                    e if request::keys_refused(&e) => Err(e),
                    _ => Ok(None),
                },
                _ => Err(status_error("GET", &shown, response).await),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_urls_by_style() {
        let config = Config::default();
        let fixed =
            || credentials::Provider::fixed(rusty_s3::Credentials::new("test", "test")).unwrap();
        let path = S3Backend::with_provider(
            "s3://cache?endpoint=http://127.0.0.1:9000",
            &config,
            fixed(),
        )
        .unwrap();
        assert_eq!(
            path.object_url("nar/x.nar.zst").unwrap().as_str(),
            "http://127.0.0.1:9000/cache/nar/x.nar.zst"
        );
        let virt =
            S3Backend::with_provider("s3://cache?region=eu-west-1", &config, fixed()).unwrap();
        assert_eq!(
            virt.object_url("abc.narinfo").unwrap().as_str(),
            "https://cache.s3.eu-west-1.amazonaws.com/abc.narinfo"
        );
    }
}
