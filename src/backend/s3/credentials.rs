//! Where the S3 backend's keys come from: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`, else
//! a profile of the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`):
//!
//! ```text
//! [default]
//! aws_access_key_id = AKIA…
//! aws_secret_access_key = …
//! ```

use std::path::PathBuf;

use crate::secret::Secret;

use super::super::Error;

/// Where the AWS credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CredentialSource {
    /// `profile=` from the URL.
    pub(super) profile: Option<String>,
}

/// Keys from the process environment, or from a profile of the shared credentials file.
pub(super) fn load_credentials(source: &CredentialSource) -> Result<rusty_s3::Credentials, Error> {
    load_credentials_with(source, &|name| std::env::var(name).ok())
}

/// [`load_credentials`] with environment lookups through `getenv`.
fn load_credentials_with(
    source: &CredentialSource,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> Result<rusty_s3::Credentials, Error> {
    let env = |name| getenv(name).filter(|v: &String| !v.is_empty());
    if source.profile.is_none() {
        if let (Some(key), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
        {
            return Ok(remembered_credentials(
                key,
                secret,
                env("AWS_SESSION_TOKEN"),
            ));
        }
    }
    let file = match env("AWS_SHARED_CREDENTIALS_FILE") {
        Some(file) => PathBuf::from(file),
        None => PathBuf::from(env("HOME").unwrap_or_default()).join(".aws/credentials"),
    };
    let profile = source
        .profile
        .clone()
        .or_else(|| env("AWS_PROFILE"))
        .unwrap_or_else(|| "default".to_owned());
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => Secret::new(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Config(format!(
                "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or create {} with a \
                 [{profile}] profile",
                file.display()
            )))
        }
        Err(e) => return Err(Error::io(&file, e)),
    };
    let values = profile_values(text.expose(), &profile);
    let get = |key: &str| {
        values
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(key), Some(secret)) => Ok(remembered_credentials(
            key,
            secret,
            get("aws_session_token"),
        )),
        _ => Err(Error::Config(format!(
            "{}: profile [{profile}] has no aws_access_key_id and aws_secret_access_key",
            file.display()
        ))),
    }
}

/// S3 credentials whose secret parts are remembered, so that no server's echo of them reaches a message.
fn remembered_credentials(
    key: String,
    secret: String,
    token: Option<String>,
) -> rusty_s3::Credentials {
    crate::secret::remember(&secret);
    match token {
        Some(token) => {
            crate::secret::remember(&token);
            rusty_s3::Credentials::new_with_token(key, secret, token)
        }
        None => rusty_s3::Credentials::new(key, secret),
    }
}

/// `key = value` pairs of one `[profile]` section of an INI credentials file.
fn profile_values(text: &str, profile: &str) -> Vec<(String, String)> {
    let mut in_profile = false;
    let mut values = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = section.trim() == profile;
            continue;
        }
        if in_profile {
            if let Some((key, value)) = line.split_once('=') {
                values.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_file_profiles() {
        let text = "# keys\n[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key=sdefault\n\n\
                    [ci]\n AWS_ACCESS_KEY_ID = AKCI \naws_secret_access_key = sci\naws_session_token = tci\n";
        assert_eq!(
            profile_values(text, "ci"),
            vec![
                ("aws_access_key_id".to_owned(), "AKCI".to_owned()),
                ("aws_secret_access_key".to_owned(), "sci".to_owned()),
                ("aws_session_token".to_owned(), "tci".to_owned()),
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credentials");
        std::fs::write(&file, text).unwrap();
        let file = file.to_str().unwrap().to_owned();
        let env = |name: &str| match name {
            "AWS_SHARED_CREDENTIALS_FILE" => Some(file.clone()),
            "AWS_ACCESS_KEY_ID" => Some("AKENV".to_owned()),
            "AWS_SECRET_ACCESS_KEY" => Some("senv".to_owned()),
            "AWS_PROFILE" => Some("ci".to_owned()),
            _ => None,
        };
        let source = |profile: Option<&str>| CredentialSource {
            profile: profile.map(str::to_owned),
        };
        // Environment keys win unless the URL names a profile.
        let creds = load_credentials_with(&source(None), &env).unwrap();
        assert_eq!((creds.key(), creds.token()), ("AKENV", None));
        let creds = load_credentials_with(&source(Some("ci")), &env).unwrap();
        assert_eq!((creds.key(), creds.token()), ("AKCI", Some("tci")));
        let creds = load_credentials_with(&source(Some("default")), &env).unwrap();
        assert_eq!(creds.key(), "AKDEFAULT");
        let only_file = |name: &str| (name == "AWS_SHARED_CREDENTIALS_FILE").then(|| file.clone());
        assert_eq!(
            load_credentials_with(&source(None), &only_file)
                .unwrap()
                .key(),
            "AKDEFAULT"
        );
        let err = load_credentials_with(&source(Some("nope")), &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[nope]") && !err.contains("sci"), "{err}");
    }
}
