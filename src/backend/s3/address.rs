//! The `s3://` target URL: `s3://bucket?region=…&endpoint=…&scheme=…&addressing=path|virtual&profile=…`, the
//! parameters Nix's own S3 store takes, and the HTTP client a virtual-host bucket on `localhost` needs.

use std::time::Duration;

use crate::config::redact_url;

use super::super::Error;

/// The pieces of an `s3://` URL.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct S3Url {
    pub(super) bucket: String,
    pub(super) region: String,
    pub(super) endpoint: url::Url,
    /// Virtual-host style (`bucket.host`) rather than path style (`host/bucket`).
    pub(super) virtual_host: bool,
    pub(super) profile: Option<String>,
}

pub(super) fn parse_url(url: &str) -> Result<S3Url, Error> {
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
pub(super) fn loopback_bucket_host(url: &S3Url) -> Option<(String, u16)> {
    let host = url.endpoint.host_str()?;
    (url.virtual_host && host == "localhost").then(|| {
        (
            format!("{}.{host}", url.bucket),
            url.endpoint.port_or_known_default().unwrap_or(80),
        )
    })
}

/// The backend client, with `host` resolving to 127.0.0.1.
pub(super) fn loopback_client(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .user_agent(concat!("nixpush/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(timeout.min(Duration::from_secs(30)))
        .read_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .resolve(host, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .build()
        .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))
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
}
