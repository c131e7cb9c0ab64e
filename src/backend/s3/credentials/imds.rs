//! Temporary keys of the EC2 instance's IAM role, from the instance metadata service (IMDSv2), the last source
//! of the chain. `AWS_EC2_METADATA_DISABLED=true` turns it off; `AWS_EC2_METADATA_SERVICE_ENDPOINT` moves it.
//!
//! ```text
//! PUT /latest/api/token                                X-aws-ec2-metadata-token-ttl-seconds: 21600 → TOKEN
//! GET /latest/meta-data/iam/security-credentials/      X-aws-ec2-metadata-token: TOKEN → ROLE
//! GET /latest/meta-data/iam/security-credentials/ROLE  X-aws-ec2-metadata-token: TOKEN →
//!     {"Code":"Success","AccessKeyId":"ASIA…","SecretAccessKey":"…","Token":"…","Expiration":"2026-…Z"}
//! ```
//!
//! Off EC2 nothing answers at 169.254.169.254, so every request has a short timeout and no proxy.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::secret::Secret;

use super::super::super::http::{send, small_body, status_error, transport_error};
use super::super::super::Error;
use super::keys::{parse_expiration, Keys};
use super::Getenv;

/// Where the service is when nothing says otherwise.
const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// How long the session token lives; one is fetched per refresh.
const TOKEN_TTL_SECS: &str = "21600";
/// Connect and answer time for each request.
pub(super) const TIMEOUT: Duration = Duration::from_secs(2);

/// The metadata service's base URL, without a trailing slash; `None` when it is turned off.
pub(super) fn endpoint(getenv: Getenv<'_>) -> Option<String> {
    let disabled =
        getenv("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    (!disabled).then(|| {
        getenv("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned())
            .trim_end_matches('/')
            .to_owned()
    })
}

/// The client for the service: short timeouts, no proxy (169.254.169.254 is link-local).
pub(super) fn client() -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .user_agent(concat!("nixpush/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))
}

/// The role's keys: a session token, the role's name, then its keys.
pub(super) async fn fetch(client: &reqwest::Client, endpoint: &str) -> Result<Keys, Error> {
    let url = format!("{endpoint}/latest/api/token");
    let request = client
        .put(&url)
        .header("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECS);
    let token = Secret::new(text_of("PUT", &url, send(request, "PUT", &url).await?).await?);
    let get = |url: String| {
        let request = client
            .get(&url)
            .header("X-aws-ec2-metadata-token", token.expose());
        async move { text_of("GET", &url, send(request, "GET", &url).await?).await }
    };
    let roles_url = format!("{endpoint}/latest/meta-data/iam/security-credentials/");
    let roles = get(roles_url.clone()).await.map_err(|e| match e {
        Error::Status { code: 404, .. } => Error::Config(format!(
            "this instance has no IAM role ({roles_url} answered 404): attach an instance profile, or give \
             nixpush keys another way"
        )),
        other => other,
    })?;
    let role = roles
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or_else(|| Error::Protocol {
            url: roles_url.clone(),
            message: "no role name in the answer".to_owned(),
        })?;
    let keys_url = format!("{roles_url}{role}");
    let text = get(keys_url.clone()).await?;
    parse_answer(&text, SystemTime::now()).map_err(|message| Error::Protocol {
        url: keys_url,
        message,
    })
}

/// The body of a successful answer, else the error it is.
async fn text_of(method: &str, url: &str, response: reqwest::Response) -> Result<String, Error> {
    if !response.status().is_success() {
        return Err(status_error(method, url, response).await);
    }
    small_body(response)
        .await
        .map_err(|e| transport_error(method, url, &e))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Answer {
    code: String,
    #[serde(default)]
    message: String,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    token: Option<String>,
    expiration: Option<String>,
}

/// The keys of a security-credentials answer, fetched at `now`.
fn parse_answer(text: &str, now: SystemTime) -> Result<Keys, String> {
    let answer: Answer = serde_json::from_str(text)
        .map_err(|e| format!("not a security-credentials document ({e})"))?;
    if answer.code != "Success" {
        return Err(format!(
            "the role's credentials are not available: {} {}",
            answer.code, answer.message
        ));
    }
    match (answer.access_key_id, answer.secret_access_key) {
        (Some(key), Some(secret)) => {
            let expires = answer.expiration.as_deref().and_then(parse_expiration);
            Ok(Keys::new(key, secret, answer.token, expires, now))
        }
        _ => Err("no AccessKeyId and SecretAccessKey in the answer".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_gives_the_role_s_keys() {
        let now = SystemTime::now();
        let keys = parse_answer(
            r#"{"Code":"Success","LastUpdated":"2026-12-02T00:00:00Z","Type":"AWS-HMAC",
                "AccessKeyId":"ASIAIMDSTEST","SecretAccessKey":"imds-secret-test","Token":"imds-token-test",
                "Expiration":"2026-12-02T06:00:00Z"}"#,
            now,
        )
        .unwrap();
        assert_eq!(
            (keys.s3.key(), keys.s3.token()),
            ("ASIAIMDSTEST", Some("imds-token-test"))
        );
        assert!(keys.expires().is_some());
        let err = parse_answer(
            r#"{"Code":"AssumeRoleUnauthorizedAccess","Message":"no"}"#,
            now,
        )
        .unwrap_err();
        assert!(err.contains("AssumeRoleUnauthorizedAccess"), "{err}");
    }

    #[test]
    fn endpoint_from_the_environment() {
        assert_eq!(endpoint(&|_| None).as_deref(), Some(DEFAULT_ENDPOINT));
        let moved = |name: &str| {
            (name == "AWS_EC2_METADATA_SERVICE_ENDPOINT").then(|| "http://127.0.0.1:9/".to_owned())
        };
        assert_eq!(endpoint(&moved).as_deref(), Some("http://127.0.0.1:9"));
        let off = |name: &str| (name == "AWS_EC2_METADATA_DISABLED").then(|| "TRUE".to_owned());
        assert_eq!(endpoint(&off), None);
    }
}
