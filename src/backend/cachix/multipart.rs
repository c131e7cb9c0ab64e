//! Cachix's multipart NAR upload (cachix-api.md §4): create the upload, presign and PUT each part (four at
//! a time, read from the compressed file), complete it with the narinfo, or abort it. A presigned URL must point
//! at public https storage (or the API's own host when the API is local), and one storage refuses with 403 is
//! presigned again (an expired URL, cachix#564).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use base64::Engine as _;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use reqwest::{Method, StatusCode};

use super::super::http::send;
use super::super::parts::{file_range_body, part_ranges, part_size_for, PARALLEL_PARTS};
use super::super::{Error, NarFile};
use super::api::{
    api_error, CompleteRequest, CompletedPart, CreatedNar, NarInfoCreate, PresignedPart,
};
use super::CachixBackend;
use crate::retry::{self, Retries};

/// How often one part is presigned again after storage rejected its URL with 403.
const MAX_REPRESIGNS: u32 = 3;

/// One multipart upload in progress.
pub(super) struct Multipart {
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

impl CachixBackend {
    pub(super) async fn create(&self, compression: &str) -> Result<Multipart, Error> {
        let url = self.url("/multipart-nar", &[("compression", compression)])?;
        let created: CreatedNar = retry::with_retries(&self.policy, "create upload", || {
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
        let presigned: PresignedPart = retry::with_retries(&self.policy, "presign part", || {
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
            match retries.next_wait(&self.policy, &error, rand::random::<f64>()) {
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

    /// Completes the upload, which creates the narinfo.
    pub(super) async fn complete(
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
            match retries.next_wait(&self.policy, &error, rand::random::<f64>()) {
                Some(wait) => {
                    maybe_applied = true;
                    tracing::debug!("complete: retrying in {wait:?} after: {error}");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(error),
            }
        }
    }

    pub(super) async fn abort(&self, upload: &Multipart) {
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

    /// Sends every part of `nar`; what `complete` needs of them (`None`: some part's PUT returned no ETag).
    pub(super) async fn send_parts(
        &self,
        upload: &Multipart,
        nar: &NarFile<'_>,
        first_md5: String,
    ) -> Result<Option<Vec<CompletedPart>>, Error> {
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
        Ok(etags
            .into_iter()
            .map(|(part_number, etag)| etag.map(|e_tag| CompletedPart { part_number, e_tag }))
            .collect::<Option<Vec<_>>>())
    }
}

/// Base64 of the MD5 of `length` bytes at `offset` (the `Content-MD5` of a part).
pub(super) async fn part_md5(file: &Path, offset: u64, length: u64) -> Result<String, Error> {
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

#[cfg(test)]
mod tests {
    use crate::backend::Credentials;
    use crate::config::Config;

    use super::*;

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
}
