//! The Cachix API's request and answer bodies (cachix-api.md §4) and how a non-2xx answer becomes an
//! [`Error`]: 401/403 from the API mean the token is refused, a 429/5xx may carry `retry_after` in a
//! problem+json body.

use std::time::Duration;

use reqwest::header::{HeaderMap, CONTENT_TYPE};
use reqwest::Response;
use serde::{Deserialize, Serialize};

use crate::narinfo::NarInfo;

use super::super::http::{answer_error, retry_after, small_body};
use super::super::{Error, NarFile};

/// `GET /api/v1/cache/NAME`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct BinaryCache {
    pub(super) uri: String,
    #[serde(default)]
    pub(super) public_signing_keys: Vec<String>,
    pub(super) preferred_compression_method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct CreatedNar {
    pub(super) nar_id: String,
    pub(super) upload_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PresignedPart {
    pub(super) upload_url: String,
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
pub(super) struct CompletedPart {
    pub(super) part_number: u32,
    pub(super) e_tag: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct CompleteRequest<'a> {
    pub(super) parts: Option<Vec<CompletedPart>>,
    pub(super) nar_info_create: &'a NarInfoCreate,
}

/// Turns a non-2xx answer into an error. From the API (`api`), 401/403 mean our token is refused; from storage
/// they do not. A 429/5xx without `Retry-After` may carry `retry_after` in a JSON body (cachix#729).
pub(super) async fn api_error(method: &str, url: &str, response: Response, api: bool) -> Error {
    let code = response.status().as_u16();
    let headers: HeaderMap = response.headers().clone();
    let body = small_body(response).await.unwrap_or_default();
    let retry_after = retry_after(&headers).or_else(|| json_retry_after(&headers, &body));
    answer_error(method, url, code, retry_after, &body, api)
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

pub(super) fn shorten(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use reqwest::header::HeaderValue;

    use super::*;
    use crate::hash::Sha256Hash;

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
            "../../../tests/fixtures/vectors/cache-zstd/ripzxnb3whas7h2iw572d3b0sby1nxxw.narinfo"
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
            "../../../tests/fixtures/vectors/cache-zstd/3104630xpvc1j0fnzpa60lzv3x9a7k10.narinfo"
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
