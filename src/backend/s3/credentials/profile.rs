//! Profiles of the shared files, as the AWS CLI and SDKs read them: the credentials file
//! (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`, sections `[NAME]`) and the config file
//! (`AWS_CONFIG_FILE`, else `~/.aws/config`, sections `[default]` and `[profile NAME]`). A key set in both comes
//! from the credentials file.
//!
//! ```text
//! # ~/.aws/credentials                     # ~/.aws/config
//! [default]                                [profile ci]
//! aws_access_key_id = AKIA…                role_arn = arn:aws:iam::123456789012:role/cache-writer
//! aws_secret_access_key = …                web_identity_token_file = /run/secrets/oidc-token
//! ```
//!
//! A profile holds keys, or `role_arn` with `web_identity_token_file` (assumed through STS). Profiles that need
//! another profile (`source_profile`), a program (`credential_process`) or a browser (`sso_*`) are refused with a
//! message saying so, never skipped silently.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::secret::Secret;

use super::super::super::Error;
use super::keys::{parse_expiration, Keys};
use super::Getenv;

/// The two shared files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Files {
    /// The credentials file.
    pub(super) credentials: PathBuf,
    /// The config file.
    pub(super) config: PathBuf,
}

impl Files {
    /// Where the files are, from the environment.
    pub(super) fn from_env(getenv: Getenv<'_>) -> Files {
        let home = PathBuf::from(getenv("HOME").unwrap_or_default());
        let path = |var: &str, default: &str| match getenv(var) {
            Some(file) => match file.strip_prefix("~/") {
                Some(rest) => home.join(rest),
                None => PathBuf::from(file),
            },
            None => home.join(default),
        };
        Files {
            credentials: path("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"),
            config: path("AWS_CONFIG_FILE", ".aws/config"),
        }
    }

    /// Both files, for messages.
    pub(super) fn describe(&self) -> String {
        format!(
            "{} or {}",
            self.credentials.display(),
            self.config.display()
        )
    }
}

/// What a profile says to do.
#[derive(Debug)]
pub(super) enum Profile {
    /// Use these keys.
    Keys(Keys),
    /// Assume `role_arn` with the token in `token_file`.
    WebIdentity {
        /// The role.
        role_arn: String,
        /// The token file.
        token_file: PathBuf,
        /// `role_session_name`, if set.
        session_name: Option<String>,
        /// `region`, if set.
        region: Option<String>,
    },
}

/// The profile `name`: `None` when neither file has it.
pub(super) fn load(
    name: &str,
    files: &Files,
    now: SystemTime,
) -> Result<Option<(Profile, String)>, Error> {
    let from_config = read(&files.config)?
        .map(|text| {
            let section = if name == "default" {
                "default".to_owned()
            } else {
                format!("profile {name}")
            };
            // `[profile default]` is the same profile as `[default]`.
            let mut values = section_values(text.expose(), &section);
            if name == "default" {
                values.extend(section_values(text.expose(), "profile default"));
            }
            values
        })
        .unwrap_or_default();
    let from_credentials = read(&files.credentials)?
        .map(|text| section_values(text.expose(), name))
        .unwrap_or_default();
    if from_config.is_none() && from_credentials.is_none() {
        return Ok(None);
    }
    let where_ = |key: &str| {
        if from_credentials.get(key).is_some() {
            &files.credentials
        } else {
            &files.config
        }
    };
    let get = |key: &str| {
        from_credentials
            .get(key)
            .or_else(|| from_config.get(key))
            .map(str::to_owned)
    };
    let described = |file: &Path| format!("profile [{name}] of {}", file.display());
    if let Some(role_arn) = get("role_arn") {
        let file = where_("role_arn");
        return match get("web_identity_token_file") {
            Some(token_file) => Ok(Some((
                Profile::WebIdentity {
                    role_arn,
                    token_file: PathBuf::from(token_file),
                    session_name: get("role_session_name"),
                    region: get("region"),
                },
                described(file),
            ))),
            None => Err(Error::Config(format!(
                "{}: role_arn without web_identity_token_file (assuming a role from source_profile or \
                 credential_source is not supported; give the profile keys, or a web identity token file)",
                described(file)
            ))),
        };
    }
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(key), Some(secret)) => {
            let expires = get("aws_credential_expiration").and_then(|e| parse_expiration(&e));
            let keys = Keys::new(key, secret, get("aws_session_token"), expires, now);
            Ok(Some((
                Profile::Keys(keys),
                described(where_("aws_access_key_id")),
            )))
        }
        _ => {
            let unsupported = ["credential_process", "sso_session", "sso_start_url"]
                .into_iter()
                .find(|key| get(key).is_some());
            let why = match unsupported {
                Some(key) => format!(
                    "uses {key}, which nixpush does not support; give the profile aws_access_key_id and \
                     aws_secret_access_key (`aws configure export-credentials --profile {name}` prints them), \
                     or role_arn with web_identity_token_file"
                ),
                None => "has no aws_access_key_id and aws_secret_access_key (nor role_arn with \
                         web_identity_token_file)"
                    .to_owned(),
            };
            Err(Error::Config(format!(
                "profile [{name}] in {} {why}",
                files.describe()
            )))
        }
    }
}

/// The file's text, `None` when it does not exist. The whole text is a secret: it may hold keys of other profiles.
fn read(path: &Path) -> Result<Option<Secret>, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(Secret::new(text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// The `key = value` pairs of a section.
#[derive(Debug, Default)]
struct Section {
    /// `None` when the file has no such section.
    values: Option<Vec<(String, String)>>,
}

impl Section {
    fn is_none(&self) -> bool {
        self.values.is_none()
    }

    fn get(&self, key: &str) -> Option<&str> {
        // The last assignment wins, as in the SDKs.
        self.values
            .as_ref()?
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn extend(&mut self, other: Section) {
        if let Some(more) = other.values {
            self.values.get_or_insert_with(Vec::new).extend(more);
        }
    }
}

/// The `key = value` pairs of every `[section]` of an INI file. Comments start with `#` or `;`; indented lines
/// under a key without a value (nested `s3 =` settings) are skipped.
fn section_values(text: &str, section: &str) -> Section {
    let mut inside = false;
    let mut found = Section::default();
    let mut nesting = false;
    for line in text.lines() {
        let nested = nesting && line.starts_with([' ', '\t']);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            nesting = false;
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            inside = name == section;
            if inside {
                found.values.get_or_insert_with(Vec::new);
            }
            continue;
        }
        if nested {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        nesting = value.trim().is_empty();
        if let (true, Some(values)) = (inside, &mut found.values) {
            values.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, credentials: &str, config: &str) -> Files {
        let files = Files {
            credentials: dir.join("credentials"),
            config: dir.join("config"),
        };
        std::fs::write(&files.credentials, credentials).unwrap();
        std::fs::write(&files.config, config).unwrap();
        files
    }

    fn keys_of(profile: Option<(Profile, String)>) -> (String, Option<String>, String) {
        match profile {
            Some((Profile::Keys(keys), described)) => (
                keys.s3.key().to_owned(),
                keys.s3.token().map(str::to_owned),
                described,
            ),
            other => panic!("not keys: {other:?}"),
        }
    }

    #[test]
    fn sections_of_both_files() {
        let text = "# keys\n[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key=sdefault\n\n\
                    [ci]\n AWS_ACCESS_KEY_ID = AKCI \naws_secret_access_key = sci\naws_session_token = tci\n";
        let ci = section_values(text, "ci");
        assert_eq!(
            (ci.get("aws_access_key_id"), ci.get("aws_session_token")),
            (Some("AKCI"), Some("tci"))
        );
        assert!(section_values(text, "nope").is_none());
        let config = "[profile  ci]\nregion = eu-west-1\ns3 =\n  max_concurrent_requests = 20\n";
        let ci = section_values(config, "profile ci");
        assert_eq!(ci.get("region"), Some("eu-west-1"));
        assert_eq!(ci.get("max_concurrent_requests"), None);
    }

    #[test]
    fn profiles_from_the_credentials_and_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let files = files(
            dir.path(),
            "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = sdefault\n\
             [both]\naws_access_key_id = AKFROMCREDS\n",
            "[default]\naws_access_key_id = AKIGNORED\n\
             [profile ci]\naws_access_key_id = AKCONFIG\naws_secret_access_key = sconfig\naws_session_token = tconfig\n\
             [profile both]\naws_access_key_id = AKFROMCONFIG\naws_secret_access_key = sboth\n\
             [profile oidc]\nrole_arn = arn:aws:iam::1:role/r\nweb_identity_token_file = /t\nregion = eu-west-1\n\
             [profile chained]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = default\n\
             [profile sso]\nsso_session = corp\n\
             [ci]\naws_access_key_id = AKNOTAPROFILE\n",
        );
        let (key, _, described) = keys_of(load("default", &files, now).unwrap());
        assert_eq!(key, "AKDEFAULT");
        assert!(described.ends_with("credentials"), "{described}");
        let (key, token, described) = keys_of(load("ci", &files, now).unwrap());
        assert_eq!(
            (key.as_str(), token.as_deref()),
            ("AKCONFIG", Some("tconfig"))
        );
        assert!(described.starts_with("profile [ci] of") && described.ends_with("config"));
        // The credentials file wins key by key.
        assert_eq!(keys_of(load("both", &files, now).unwrap()).0, "AKFROMCREDS");
        match load("oidc", &files, now).unwrap() {
            Some((
                Profile::WebIdentity {
                    role_arn,
                    token_file,
                    region,
                    ..
                },
                _,
            )) => {
                assert_eq!(role_arn, "arn:aws:iam::1:role/r");
                assert_eq!(token_file, Path::new("/t"));
                assert_eq!(region.as_deref(), Some("eu-west-1"));
            }
            other => panic!("{other:?}"),
        }
        assert!(load("nope", &files, now).unwrap().is_none());
        for (name, says) in [("chained", "source_profile"), ("sso", "sso_session")] {
            let err = load(name, &files, now).unwrap_err().to_string();
            assert!(
                err.contains(&format!("[{name}]")) && err.contains(says),
                "{err}"
            );
            assert!(!err.contains("sdefault"), "{err}");
        }
    }

    #[test]
    fn files_from_the_environment() {
        let env = |name: &str| match name {
            "HOME" => Some("/home/u".to_owned()),
            "AWS_CONFIG_FILE" => Some("~/cfg".to_owned()),
            _ => None,
        };
        let files = Files::from_env(&env);
        assert_eq!(files.credentials, Path::new("/home/u/.aws/credentials"));
        assert_eq!(files.config, Path::new("/home/u/cfg"));
    }
}
