//! The STS and instance-metadata stand-in (`tests/servers/aws_credentials_server.py`) with its web identity token
//! file, and the environment that keeps a developer's or CI's own AWS settings out of a test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::servers::PyServer;

/// Every AWS variable nixpush reads, removed (empty) unless a test sets it; the shared files point nowhere and
/// instance metadata is off. Pass the result (with the test's own variables after it) to [`apply`].
pub fn clean_env(dir: &Path) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_CREDENTIAL_EXPIRATION",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_ROLE_SESSION_NAME",
        "AWS_ENDPOINT_URL_STS",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    ]
    .iter()
    .map(|name| (name.to_string(), String::new()))
    .collect();
    let nowhere = dir.join("no-such-aws-file");
    for name in ["AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"] {
        vars.push((name.to_owned(), nowhere.display().to_string()));
    }
    vars.push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
    vars
}

/// Sets `vars` on `command`, later ones winning; an empty value removes the variable.
pub fn apply<'a>(
    command: &'a mut std::process::Command,
    vars: &[(String, String)],
) -> &'a mut std::process::Command {
    for (name, value) in vars {
        if value.is_empty() {
            command.env_remove(name);
        } else {
            command.env(name, value);
        }
    }
    command
}

/// A running stand-in, and the web identity token file it checks tokens against.
pub struct AwsStandIn {
    server: PyServer,
    /// The web identity token file (what `AWS_WEB_IDENTITY_TOKEN_FILE` names).
    pub token_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl AwsStandIn {
    /// Starts the stand-in handing out `access_key`/`secret_key` (with fresh session tokens) for `role_arn`,
    /// each set valid for `lifetime`.
    pub fn start(
        access_key: &str,
        secret_key: &str,
        role_arn: &str,
        lifetime: Duration,
    ) -> AwsStandIn {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("web-identity-token");
        let stand_in = |token_file: &Path| {
            PyServer::start(
                "aws_credentials_server.py",
                &[
                    "--access-key",
                    access_key,
                    "--secret-key",
                    secret_key,
                    "--role-arn",
                    role_arn,
                    "--web-identity-token-file",
                    token_file.to_str().unwrap(),
                    "--lifetime",
                    &lifetime.as_secs().to_string(),
                ],
            )
        };
        let stand_in = AwsStandIn {
            server: stand_in(&token_file),
            token_file,
            _dir: dir,
        };
        stand_in.rotate_token();
        stand_in
    }

    /// `http://127.0.0.1:PORT/` (STS's endpoint).
    pub fn sts_url(&self) -> String {
        format!("{}/", self.server.base())
    }

    /// `http://127.0.0.1:PORT` (the metadata service's).
    pub fn imds_url(&self) -> String {
        self.server.base()
    }

    /// The web identity token now in the file.
    pub fn token(&self) -> String {
        std::fs::read_to_string(&self.token_file)
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Replaces the token (new file, renamed over the old one, as an OIDC issuer's agent does); returns it.
    pub fn rotate_token(&self) -> String {
        let token = format!("oidc-token-{:016x}", rand::random::<u64>());
        let tmp = self.token_file.with_extension("new");
        std::fs::write(&tmp, format!("{token}\n")).unwrap();
        std::fs::rename(&tmp, &self.token_file).unwrap();
        token
    }

    /// Every call so far, in order (see the script's documentation).
    pub fn calls(&self) -> Vec<Value> {
        let (status, body) = self.get("/_control/calls", &[]);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The calls of `kind` (`sts`, `imds-token`, `imds-role`, `imds-credentials`).
    pub fn calls_of(&self, kind: &str) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|c| c["kind"] == kind)
            .collect()
    }

    /// A GET to the stand-in with `headers`: status and body.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.server.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }
}

/// When a call's keys expire (its `expiration`).
pub fn expiration_of(call: &Value) -> SystemTime {
    let text = call["expiration"].as_str().unwrap();
    let at =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap();
    SystemTime::from(at)
}
