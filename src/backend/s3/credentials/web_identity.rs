//! Temporary keys for a role, from STS `AssumeRoleWithWebIdentity` with an OIDC token read from a file: what GitHub
//! Actions (`aws-actions/configure-aws-credentials`), EKS (IRSA) and other OIDC issuers set up with
//! `AWS_WEB_IDENTITY_TOKEN_FILE`, `AWS_ROLE_ARN` and `AWS_ROLE_SESSION_NAME`, or a profile's `role_arn` and
//! `web_identity_token_file`. The token file is read again for every refresh, since its issuer rotates it.
//!
//! ```text
//! POST https://sts.<region>.amazonaws.com/        (AWS_ENDPOINT_URL_STS overrides; region from AWS_REGION,
//! Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=…&RoleSessionName=…&WebIdentityToken=…
//!
//! <AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>
//!   <AccessKeyId>ASIA…</AccessKeyId><SecretAccessKey>…</SecretAccessKey><SessionToken>…</SessionToken>
//!   <Expiration>2026-12-02T02:00:00Z</Expiration>
//! </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>
//! ```
//!
//! The request needs no signature: the token is the proof. An answer that refuses the token or the role is an
//! authentication failure (uploads pause until it is fixed); throttling and an unreachable identity provider
//! are transient.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::Deserialize;

use crate::secret::Secret;

use super::super::super::http::{send, small_body, transport_error};
use super::super::super::Error;
use super::super::request::error_summary;
use super::keys::{parse_expiration, Keys};
use super::Getenv;

/// One role to assume, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Role {
    /// `arn:aws:iam::ACCOUNT:role/NAME`.
    pub(super) role_arn: String,
    /// The file holding the OIDC token.
    pub(super) token_file: PathBuf,
    /// Names the session in the role's CloudTrail entries.
    pub(super) session_name: String,
    /// The STS endpoint.
    pub(super) endpoint: String,
}

impl Role {
    /// A role to assume: the session name defaults to `nixpush-<unix time>`, the endpoint to the regional STS
    /// (`AWS_ENDPOINT_URL_STS` overrides it; the region is `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's, then
    /// the bucket's).
    pub(super) fn new(
        role_arn: String,
        token_file: PathBuf,
        session_name: Option<String>,
        getenv: Getenv<'_>,
        regions: &[Option<String>],
    ) -> Role {
        let session_name = session_name.unwrap_or_else(|| {
            let secs = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            format!("nixpush-{secs}")
        });
        let region = getenv("AWS_REGION")
            .or_else(|| getenv("AWS_DEFAULT_REGION"))
            .or_else(|| regions.iter().flatten().next().cloned())
            .unwrap_or_else(|| "us-east-1".to_owned());
        let endpoint = getenv("AWS_ENDPOINT_URL_STS")
            .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com/"));
        Role {
            role_arn,
            token_file,
            session_name,
            endpoint,
        }
    }

    /// The role named by `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN`, when both are set.
    pub(super) fn from_env(getenv: Getenv<'_>, bucket_region: &str) -> Option<Role> {
        let token_file = getenv("AWS_WEB_IDENTITY_TOKEN_FILE")?;
        let role_arn = getenv("AWS_ROLE_ARN")?;
        Some(Role::new(
            role_arn,
            PathBuf::from(token_file),
            getenv("AWS_ROLE_SESSION_NAME"),
            getenv,
            &[Some(bucket_region.to_owned())],
        ))
    }

    /// For messages: the role, the token file and the endpoint (no secret among them).
    pub(super) fn describe(&self) -> String {
        format!(
            "role {} with the web identity token in {}, through STS at {}",
            self.role_arn,
            self.token_file.display(),
            self.endpoint
        )
    }

    /// Reads the token (again) and asks STS for keys.
    pub(super) async fn fetch(&self, client: &reqwest::Client) -> Result<Keys, Error> {
        let token = std::fs::read_to_string(&self.token_file)
            .map(Secret::new)
            .map_err(|e| Error::io(&self.token_file, e))?;
        if token.is_empty() {
            return Err(Error::Config(format!(
                "the web identity token file {} is empty",
                self.token_file.display()
            )));
        }
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("Action", "AssumeRoleWithWebIdentity")
            .append_pair("Version", "2011-06-15")
            .append_pair("RoleArn", &self.role_arn)
            .append_pair("RoleSessionName", &self.session_name)
            .append_pair("WebIdentityToken", token.expose())
            .finish();
        let url = &self.endpoint;
        let request = client
            .post(url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        let response = send(request, "POST", url).await?;
        let code = response.status().as_u16();
        let text = small_body(response)
            .await
            .map_err(|e| transport_error("POST", url, &e))?;
        if (200..300).contains(&code) {
            parse_answer(&text, SystemTime::now()).map_err(|message| Error::Protocol {
                url: url.clone(),
                message,
            })
        } else {
            Err(refusal(url, code, &text))
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Answer {
    assume_role_with_web_identity_result: AnswerResult,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AnswerResult {
    credentials: AnswerCredentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AnswerCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    expiration: String,
}

/// The keys in an `AssumeRoleWithWebIdentityResponse`, fetched at `now`.
fn parse_answer(text: &str, now: SystemTime) -> Result<Keys, String> {
    let answer: Answer = quick_xml::de::from_str(text)
        .map_err(|e| format!("not an AssumeRoleWithWebIdentity answer ({e})"))?;
    let c = answer.assume_role_with_web_identity_result.credentials;
    let expires = parse_expiration(&c.expiration)
        .ok_or_else(|| format!("Expiration {:?} is not an RFC 3339 time", c.expiration))?;
    Ok(Keys::new(
        c.access_key_id,
        c.secret_access_key,
        Some(c.session_token),
        Some(expires),
        now,
    ))
}

/// The error for an STS error answer: throttling and an unreachable identity provider are transient, anything
/// else refuses the token or the role.
fn refusal(url: &str, code: u16, body: &str) -> Error {
    let detail = error_summary(body);
    let transient = ["Throttling", "IDPCommunicationError", "ServiceUnavailable"]
        .iter()
        .any(|c| detail.starts_with(c));
    if transient || code >= 500 {
        Error::Status {
            method: "POST".into(),
            url: url.to_owned(),
            // STS answers throttling with 400; as a status it is what 503 means (the detail keeps the real one).
            code: if code >= 500 { code } else { 503 },
            retry_after: None,
            detail: if code >= 500 {
                detail
            } else {
                format!("{detail} (HTTP {code}, transient)")
            },
        }
    } else {
        Error::Unauthorized {
            url: url.to_owned(),
            code,
            detail: format!("STS AssumeRoleWithWebIdentity refused: {detail}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>repo:o/r:ref:refs/heads/main</SubjectFromWebIdentityToken>
    <Audience>sts.amazonaws.com</Audience>
    <AssumedRoleUser><Arn>arn:aws:sts::1:assumed-role/r/s</Arn><AssumedRoleId>AROA:s</AssumedRoleId></AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIAWEBIDTEST</AccessKeyId>
      <SecretAccessKey>webid-secret-test</SecretAccessKey>
      <SessionToken>webid-session-token-test</SessionToken>
      <Expiration>2026-12-02T02:00:00Z</Expiration>
    </Credentials>
    <Provider>token.actions.githubusercontent.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>1</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#;

    #[test]
    fn answer_gives_temporary_keys() {
        let now = parse_expiration("2026-12-02T01:00:00Z").unwrap();
        let keys = parse_answer(ANSWER, now).unwrap();
        assert_eq!(keys.s3.key(), "ASIAWEBIDTEST");
        assert_eq!(keys.s3.token(), Some("webid-session-token-test"));
        assert_eq!(keys.expires(), parse_expiration("2026-12-02T02:00:00Z"));
        assert!(parse_answer("<ErrorResponse/>", now).is_err());
    }

    #[test]
    fn refusals_pause_and_throttling_retries() {
        let body = |code: &str| {
            format!(
                "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>m</Message></Error></ErrorResponse>"
            )
        };
        let e = refusal("http://127.0.0.1:1/", 400, &body("InvalidIdentityToken"));
        assert!(e.is_auth(), "{e}");
        assert!(e.to_string().contains("InvalidIdentityToken: m"), "{e}");
        let e = refusal("http://127.0.0.1:1/", 400, &body("IDPCommunicationError"));
        assert!(e.is_retryable() && !e.is_auth(), "{e}");
        assert!(refusal("u", 500, "oops").is_retryable());
    }

    #[test]
    fn role_from_the_environment() {
        let env = |name: &str| match name {
            "AWS_WEB_IDENTITY_TOKEN_FILE" => Some("/run/token".to_owned()),
            "AWS_ROLE_ARN" => Some("arn:aws:iam::1:role/r".to_owned()),
            "AWS_DEFAULT_REGION" => Some("eu-central-1".to_owned()),
            _ => None,
        };
        let role = Role::from_env(&env, "us-west-2").unwrap();
        assert_eq!(role.endpoint, "https://sts.eu-central-1.amazonaws.com/");
        assert!(role.session_name.starts_with("nixpush-"));
        let overridden = |name: &str| match name {
            "AWS_ENDPOINT_URL_STS" => Some("http://127.0.0.1:9/".to_owned()),
            "AWS_ROLE_SESSION_NAME" => Some("ci-run".to_owned()),
            other => env(other),
        };
        let role = Role::from_env(&overridden, "us-west-2").unwrap();
        assert_eq!(
            (role.endpoint.as_str(), role.session_name.as_str()),
            ("http://127.0.0.1:9/", "ci-run")
        );
        let no_role = |name: &str| (name == "AWS_WEB_IDENTITY_TOKEN_FILE").then(|| "/t".to_owned());
        assert!(Role::from_env(&no_role, "us-west-2").is_none());
    }
}
