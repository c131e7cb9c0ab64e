//! One S3 request: signed with the current keys right before it is sent, sent under the bucket's [`Throttle`],
//! tried again under [`crate::retry::Policy`], and its error answer reduced to S3's `Code: Message`.
//!
//! Two policies, two counts: throttling answers (`503 SlowDown`, `429`) lower the concurrency and are retried
//! under [`Policy::throttled`] without using up the [`Policy::per_request`] tries other transient faults get.
//! Keys the bucket refuses as expired (`ExpiredToken`, 400 on AWS, 403 elsewhere) are replaced and the request
//! sent again at once; if new keys are refused too, the error is an authentication failure, which pauses the
//! target rather than failing a path.

use std::future::Future;
use std::sync::Arc;

use reqwest::RequestBuilder;

use crate::retry::{Policy, Retries};

use super::super::http::{send, status_error};
use super::super::{Error, MAX_REQUEST_WAIT, REQUEST_ATTEMPTS};
use super::credentials::Keys;
use super::S3Backend;

/// How often one request is sent while throttling answers (`503`, `429`) come back, before the error goes to the
/// engine, which then backs off the path; with waits up to 8 s that is minutes of patience.
const THROTTLED_TRIES: u32 = 25;
/// How often one request gets new keys after the bucket refused them as expired.
const KEY_REFRESHES: u32 = 2;

impl S3Backend {
    /// Sends a presigned request; the error message shows the URL without its signature.
    pub(super) async fn send(
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

    /// Runs `request` with the current keys until it succeeds or fails for good (see the module documentation).
    pub(super) async fn retrying<T, F, Fut>(&self, mut request: F) -> Result<T, Error>
    where
        F: FnMut(Arc<Keys>) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let per_request = Policy::per_request(REQUEST_ATTEMPTS, MAX_REQUEST_WAIT);
        let throttled_policy = Policy::throttled(THROTTLED_TRIES, MAX_REQUEST_WAIT);
        let (mut tries, mut throttled) = (Retries::default(), Retries::default());
        let mut refreshes = 0;
        loop {
            let keys = self.credentials.current().await?;
            let e = match request(Arc::clone(&keys)).await {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            if keys_refused(&e) {
                self.credentials.refused(&keys);
                if refreshes < KEY_REFRESHES {
                    refreshes += 1;
                    tracing::info!(
                        "the bucket refused the AWS credentials as expired; getting new ones: {e}"
                    );
                    continue;
                }
            }
            let wait = if is_throttling(&e) {
                throttled.next_wait(&throttled_policy, &e, rand::random::<f64>())
            } else {
                tries.next_wait(&per_request, &e, rand::random::<f64>())
            };
            match wait {
                Some(wait) => {
                    tracing::debug!("retrying in {wait:?} after: {e}");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(e),
            }
        }
    }
}

pub(super) async fn expect_success(
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

/// S3 error codes that say the keys (not the request) are no good any more: new keys may work.
const REFUSED_KEYS: &[&str] = &["ExpiredToken", "TokenRefreshRequired", "InvalidToken"];

/// Whether the bucket refused the keys as expired or invalid.
pub(super) fn keys_refused(e: &Error) -> bool {
    match e {
        Error::Unauthorized { detail, .. } => {
            REFUSED_KEYS.iter().any(|code| detail.starts_with(code))
        }
        _ => false,
    }
}

/// The error for an S3 error answer, its detail reduced to S3's `Code: Message`. S3 echoes the request back
/// (`StringToSign`, `CanonicalRequest` with the presigned query); none of that reaches a log line.
pub(super) async fn s3_error(method: &str, shown: &str, response: reqwest::Response) -> Error {
    summarized(status_error(method, shown, response).await)
}

/// [`s3_error`] for an error already read.
fn summarized(mut error: Error) -> Error {
    match &mut error {
        Error::Status {
            url, code, detail, ..
        } => {
            *detail = error_summary(detail);
            // AWS answers an expired session token with 400: an authentication failure all the same.
            if REFUSED_KEYS.iter().any(|c| detail.starts_with(c)) {
                return Error::Unauthorized {
                    url: std::mem::take(url),
                    code: *code,
                    detail: std::mem::take(detail),
                };
            }
        }
        Error::Unauthorized { detail, .. } => {
            *detail = error_summary(detail);
            if detail.starts_with("SignatureDoesNotMatch") {
                detail.push_str(
                    " (the secret access key does not belong to the access key id: check \
                     AWS_SECRET_ACCESS_KEY or the profile's aws_secret_access_key)",
                );
            }
        }
        _ => {}
    }
    error
}

/// `Code: Message` of an S3 (or STS) `<Error>` document; other text unchanged.
pub(super) fn error_summary(body: &str) -> String {
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
pub(super) fn is_throttling(e: &Error) -> bool {
    matches!(
        e,
        Error::Status {
            code: 429 | 503,
            ..
        }
    )
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

    fn answer(code: u16, body: &str) -> Error {
        summarized(super::super::super::http::answer_error(
            "PUT",
            "http://127.0.0.1:1/b/k",
            code,
            None,
            body,
            true,
        ))
    }

    #[test]
    fn expired_keys_are_an_authentication_failure_whatever_the_status() {
        let body = "<Error><Code>ExpiredToken</Code><Message>The provided token has expired.</Message></Error>";
        for code in [400, 403] {
            let e = answer(code, body);
            assert!(keys_refused(&e) && e.is_auth(), "{code}: {e}");
        }
        let denied = answer(
            403,
            "<Error><Code>AccessDenied</Code><Message>no</Message></Error>",
        );
        assert!(denied.is_auth() && !keys_refused(&denied));
        let bad = answer(
            400,
            "<Error><Code>InvalidArgument</Code><Message>x</Message></Error>",
        );
        assert!(!bad.is_auth() && !bad.is_retryable(), "{bad}");
        let slow = answer(
            503,
            "<Error><Code>SlowDown</Code><Message>x</Message></Error>",
        );
        assert!(is_throttling(&slow) && slow.to_string().contains("SlowDown: x"));
    }
}
