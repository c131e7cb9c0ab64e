//! Where the S3 backend's keys come from, in the order the AWS SDKs look:
//!
//! 1. `profile=` in the target URL (as Nix's S3 store takes it): that profile of the shared files, nothing else;
//! 2. the environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` (`env`);
//! 3. web identity: `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN` (GitHub Actions OIDC, EKS), assumed through
//!    STS (`web_identity`);
//! 4. the shared `credentials` and `config` files, profile `AWS_PROFILE` or `default` (`profile`), with keys or
//!    a `role_arn` and `web_identity_token_file`;
//! 5. the EC2 instance metadata service, IMDSv2 (`imds`).
//!
//! `Provider` holds the keys in use and gets new ones when they are due (`keys`: 5 minutes before a temporary
//! key's `Expiration`), when the bucket refuses them as expired, and, for keys without an expiration, on every
//! `prepare`. Each time it walks the chain again, so a changed file or a rotated token takes effect. Every key,
//! secret and token is remembered by [`crate::secret`], so none reaches a log, `status` or an error.

mod env;
mod imds;
mod keys;
mod profile;
mod web_identity;

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crate::backend::Kind;
use crate::config::Config;

use super::super::Error;

pub(crate) use keys::Keys;

/// Environment lookups (injected, so each source's rules can be tested without touching the process's).
type Getenv<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment; an empty variable counts as unset, as in the SDKs.
fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// How long a failed refresh waits before the next, while the current keys are still valid.
const REFRESH_RETRY: Duration = Duration::from_secs(10);
/// How long STS has to answer.
const STS_TIMEOUT: Duration = Duration::from_secs(20);

/// What the chain settled on.
enum Source {
    /// Keys at hand, from the environment or a profile (described).
    Keys(Keys, String),
    /// A role to assume with a web identity token; where the role was named.
    WebIdentity(web_identity::Role, String),
    /// The instance metadata service at this endpoint; what was looked for before it.
    Imds(String, String),
}

impl Source {
    /// Where the keys come from, without any of them.
    fn describe(&self) -> String {
        match self {
            Source::Keys(_, from) => from.clone(),
            Source::WebIdentity(role, from) => {
                format!("web identity ({from}): {}", role.describe())
            }
            Source::Imds(endpoint, _) => {
                format!("the instance metadata service (IMDSv2) at {endpoint}")
            }
        }
    }
}

/// What the chain needs from the target URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    /// `profile=`.
    profile: Option<String>,
    /// The bucket's region, the last choice for STS.
    region: String,
}

/// Walks the chain (see the module documentation) with environment `getenv`; keys at hand are read at once.
fn resolve(settings: &Settings, getenv: Getenv<'_>, now: SystemTime) -> Result<Source, Error> {
    let files = profile::Files::from_env(getenv);
    let from_profile = |found: (profile::Profile, String)| match found {
        (profile::Profile::Keys(keys), from) => Source::Keys(keys, from),
        (
            profile::Profile::WebIdentity {
                role_arn,
                token_file,
                session_name,
                region,
            },
            from,
        ) => Source::WebIdentity(
            web_identity::Role::new(
                role_arn,
                token_file,
                session_name,
                getenv,
                &[region, Some(settings.region.clone())],
            ),
            from,
        ),
    };
    if let Some(name) = &settings.profile {
        return match profile::load(name, &files, now)? {
            Some(found) => Ok(from_profile(found)),
            None => Err(Error::Config(format!(
                "profile={name}: no AWS credentials: neither {} has a [{name}] profile",
                files.describe()
            ))),
        };
    }
    if let Some(keys) = env::keys(getenv, now) {
        let token = if keys.s3.token().is_some() {
            " with AWS_SESSION_TOKEN"
        } else {
            ""
        };
        let from = format!("the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY{token})");
        return Ok(Source::Keys(keys, from));
    }
    if let Some(role) = web_identity::Role::from_env(getenv, &settings.region) {
        return Ok(Source::WebIdentity(
            role,
            "AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN".to_owned(),
        ));
    }
    let named = getenv("AWS_PROFILE");
    let name = named.clone().unwrap_or_else(|| "default".to_owned());
    match profile::load(&name, &files, now)? {
        Some(found) => return Ok(from_profile(found)),
        None if named.is_some() => {
            return Err(Error::Config(format!(
                "AWS_PROFILE={name}: no AWS credentials: neither {} has a [{name}] profile",
                files.describe()
            )))
        }
        None => {}
    }
    let tried = format!(
        "no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, no AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN, no \
         [default] profile in {}",
        files.describe()
    );
    match imds::endpoint(getenv) {
        Some(endpoint) => Ok(Source::Imds(endpoint, tried)),
        None => Err(Error::Config(format!(
            "no AWS credentials: {tried}, and the instance metadata service is turned off \
             (AWS_EC2_METADATA_DISABLED)"
        ))),
    }
}

/// The keys in use, and how to get new ones.
#[derive(Debug)]
pub(crate) struct Provider {
    /// `None`: fixed keys, never replaced.
    settings: Option<Settings>,
    sts: reqwest::Client,
    imds: reqwest::Client,
    current: RwLock<Option<Arc<Keys>>>,
    /// Where the keys in use came from.
    source: RwLock<String>,
    /// One refresh at a time; requests meanwhile use the current keys while they are valid.
    refreshing: tokio::sync::Mutex<()>,
    /// After a failed refresh: no other before this time while the current keys are valid.
    retry_refresh_at: Mutex<Option<SystemTime>>,
}

impl Provider {
    /// The chain for a target with `profile=` (if any) in `region`. Keys at hand are read now, so a broken
    /// profile is reported before any upload; keys from STS or instance metadata are fetched on first use.
    pub(crate) fn new(profile: Option<String>, region: String) -> Result<Provider, Error> {
        let settings = Settings { profile, region };
        let source = resolve(&settings, &process_env, SystemTime::now())?;
        let provider = Provider::with(Some(settings), source.describe())?;
        if let Source::Keys(keys, _) = source {
            provider.store(Arc::new(keys), None);
        }
        Ok(provider)
    }

    /// Fixed keys (tests).
    #[cfg(test)]
    pub(crate) fn fixed(keys: rusty_s3::Credentials) -> Result<Provider, Error> {
        let provider = Provider::with(None, "fixed keys".to_owned())?;
        let keys = Keys::new(
            keys.key().to_owned(),
            keys.secret().to_owned(),
            keys.token().map(str::to_owned),
            None,
            SystemTime::now(),
        );
        provider.store(Arc::new(keys), None);
        Ok(provider)
    }

    fn with(settings: Option<Settings>, source: String) -> Result<Provider, Error> {
        Ok(Provider {
            settings,
            sts: super::super::http::client(STS_TIMEOUT)?,
            imds: imds::client()?,
            current: RwLock::new(None),
            source: RwLock::new(source),
            refreshing: tokio::sync::Mutex::new(()),
            retry_refresh_at: Mutex::new(None),
        })
    }

    /// Where the keys in use came from (never the keys).
    pub(crate) fn source(&self) -> String {
        self.source
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Keys to sign the next request with: the current ones, or new ones when they are due.
    pub(crate) async fn current(&self) -> Result<Arc<Keys>, Error> {
        let cached = self.cached();
        if let Some(keys) = cached.as_ref().filter(|k| self.usable(k)) {
            return Ok(Arc::clone(keys));
        }
        let _refreshing = match self.refreshing.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                // Another request is getting new keys; the current ones serve until they expire.
                if let Some(keys) = cached.filter(|k| k.valid(SystemTime::now())) {
                    return Ok(keys);
                }
                self.refreshing.lock().await
            }
        };
        // The refresh may have happened while this request waited.
        if let Some(keys) = self.cached().filter(|k| self.usable(k)) {
            return Ok(keys);
        }
        match self.fetch().await {
            Ok((keys, source)) => {
                let keys = Arc::new(keys);
                tracing::debug!(
                    "AWS credentials from {source}{}",
                    match keys.expires() {
                        Some(at) => format!(", valid until {}", httpdate::fmt_http_date(at)),
                        None => String::new(),
                    }
                );
                self.store(Arc::clone(&keys), Some(source));
                Ok(keys)
            }
            Err(e) => match self.cached().filter(|k| k.valid(SystemTime::now())) {
                Some(keys) => {
                    tracing::warn!(
                        "cannot refresh the AWS credentials, using the current ones until they expire: {e}"
                    );
                    *self
                        .retry_refresh_at
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(SystemTime::now() + REFRESH_RETRY);
                    Ok(keys)
                }
                None => Err(e),
            },
        }
    }

    /// The bucket refused `keys` (expired, revoked, or not yet valid where it is): the next request gets new ones.
    pub(crate) fn refused(&self, keys: &Keys) {
        keys.mark_stale();
    }

    /// Before `prepare`: keys without an expiration are read again (a rotated key file takes effect after an
    /// authentication pause); temporary ones are kept until they are due.
    pub(crate) fn reread_fixed(&self) {
        if self.settings.is_none() {
            return;
        }
        if let Some(keys) = self.cached().filter(|k| k.expires().is_none()) {
            keys.mark_stale();
        }
    }

    fn usable(&self, keys: &Keys) -> bool {
        let now = SystemTime::now();
        if keys.fresh(now) || (self.settings.is_none() && keys.valid(now)) {
            return true;
        }
        let retry_at = *self
            .retry_refresh_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        keys.valid(now) && retry_at.is_some_and(|at| now < at)
    }

    fn cached(&self) -> Option<Arc<Keys>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn store(&self, keys: Arc<Keys>, source: Option<String>) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(keys);
        *self
            .retry_refresh_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        if let Some(source) = source {
            *self
                .source
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = source;
        }
    }

    /// New keys from wherever the chain points now.
    async fn fetch(&self) -> Result<(Keys, String), Error> {
        let Some(settings) = &self.settings else {
            return Err(Error::Config(
                "the fixed AWS keys were refused and there are no others".to_owned(),
            ));
        };
        let source = resolve(settings, &process_env, SystemTime::now())?;
        let described = source.describe();
        let keys = match source {
            Source::Keys(keys, _) => keys,
            Source::WebIdentity(role, _) => role.fetch(&self.sts).await?,
            Source::Imds(endpoint, tried) => imds::fetch(&self.imds, &endpoint)
                .await
                .map_err(|e| last_resort(e, &endpoint, &tried))?,
        };
        Ok((keys, described))
    }
}

/// An unreachable instance metadata service, when it was only asked because nothing else had keys: the message
/// says what was looked for first, since off EC2 the problem is rather a missing key or profile.
fn last_resort(e: Error, endpoint: &str, tried: &str) -> Error {
    let message = match &e {
        Error::Connect { message, .. } => message.clone(),
        Error::Timeout { .. } => format!("no answer within {} s", imds::TIMEOUT.as_secs()),
        _ => return e,
    };
    Error::Connect {
        url: endpoint.to_owned(),
        message: format!(
            "{message}; it was asked for AWS credentials because there are no others ({tried})"
        ),
    }
}

/// For `doctor`: where an S3 target's credentials come from (never their values), or why none can be found.
/// Reads the environment and the shared files, asks no server (the instance metadata service is only named).
pub fn find_source(config: &Config) -> Result<String, String> {
    let url = super::address::parse_url(&config.target.url).map_err(|e| e.to_string())?;
    let settings = Settings {
        profile: url.profile,
        region: url.region,
    };
    resolve(&settings, &process_env, SystemTime::now())
        .map(|source| format!("AWS credentials from {}", source.describe()))
        .map_err(|e| format!("no usable AWS credentials: {e}"))
}

/// For `check-config`: [`find_source`]'s answer either way; `None` for targets other than S3.
pub fn describe_source(config: &Config) -> Option<String> {
    (Kind::of(config) == Kind::S3).then(|| find_source(config).unwrap_or_else(|problem| problem))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(profile: Option<&str>) -> Settings {
        Settings {
            profile: profile.map(str::to_owned),
            region: "eu-west-1".to_owned(),
        }
    }

    #[test]
    fn chain_order() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = dir.path().join("credentials");
        std::fs::write(
            &credentials,
            "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = sdefault\n\
             [ci]\naws_access_key_id = AKCI\naws_secret_access_key = sci\n",
        )
        .unwrap();
        let credentials = credentials.to_str().unwrap().to_owned();
        let missing = dir.path().join("none").to_str().unwrap().to_owned();
        let now = SystemTime::now();
        let env = |vars: &'static [(&'static str, &'static str)], files: String| {
            let missing = missing.clone();
            move |name: &str| match name {
                "AWS_SHARED_CREDENTIALS_FILE" => Some(files.clone()),
                "AWS_CONFIG_FILE" => Some(missing.clone()),
                _ => vars
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string()),
            }
        };
        let key_of = |source: Source| match source {
            Source::Keys(keys, _) => keys.s3.key().to_owned(),
            Source::WebIdentity(..) => "web identity".to_owned(),
            Source::Imds(..) => "imds".to_owned(),
        };
        let keys = &[
            ("AWS_ACCESS_KEY_ID", "AKENV"),
            ("AWS_SECRET_ACCESS_KEY", "senv"),
        ];
        let web = &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r"),
        ];
        let both = &[
            ("AWS_ACCESS_KEY_ID", "AKENV"),
            ("AWS_SECRET_ACCESS_KEY", "senv"),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r"),
        ];
        let resolved = |profile, vars, files: &String| {
            resolve(&settings(profile), &env(vars, files.clone()), now).map(key_of)
        };
        // profile= first, then the environment's keys, web identity, AWS_PROFILE or [default], IMDS.
        assert_eq!(resolved(Some("ci"), both, &credentials).unwrap(), "AKCI");
        assert_eq!(resolved(None, both, &credentials).unwrap(), "AKENV");
        assert_eq!(resolved(None, web, &credentials).unwrap(), "web identity");
        assert_eq!(resolved(None, &[], &credentials).unwrap(), "AKDEFAULT");
        assert_eq!(
            resolved(None, &[("AWS_PROFILE", "ci")], &credentials).unwrap(),
            "AKCI"
        );
        assert_eq!(resolved(None, &[], &missing).unwrap(), "imds");
        assert_eq!(resolved(None, keys, &missing).unwrap(), "AKENV");
        // A profile that was asked for by name and is not there is an error, not a fall-through.
        let err = resolved(Some("nope"), keys, &credentials)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[nope]") && !err.contains("sci"), "{err}");
        let err = resolved(None, &[("AWS_PROFILE", "nope")], &credentials)
            .unwrap_err()
            .to_string();
        assert!(err.contains("AWS_PROFILE=nope"), "{err}");
        let err = resolved(None, &[("AWS_EC2_METADATA_DISABLED", "true")], &missing)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no AWS credentials") && err.contains("AWS_EC2_METADATA_DISABLED"),
            "{err}"
        );
    }

    #[test]
    fn descriptions_name_the_source_not_the_keys() {
        let now = SystemTime::now();
        let env = |name: &str| match name {
            "AWS_WEB_IDENTITY_TOKEN_FILE" => Some("/run/oidc".to_owned()),
            "AWS_ROLE_ARN" => Some("arn:aws:iam::1:role/r".to_owned()),
            "AWS_ENDPOINT_URL_STS" => Some("http://127.0.0.1:9/".to_owned()),
            _ => None,
        };
        let text = resolve(&settings(None), &env, now).unwrap().describe();
        assert_eq!(
            text,
            "web identity (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN): role arn:aws:iam::1:role/r with the \
             web identity token in /run/oidc, through STS at http://127.0.0.1:9/"
        );
        let keys = |name: &str| match name {
            "AWS_ACCESS_KEY_ID" => Some("AKDESCRIBE".to_owned()),
            "AWS_SECRET_ACCESS_KEY" => Some("sdescribe-secret".to_owned()),
            _ => None,
        };
        let text = resolve(&settings(None), &keys, now).unwrap().describe();
        assert!(
            text.starts_with("the environment") && !text.contains("AKDESCRIBE"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn refused_keys_are_read_again() {
        let provider =
            Provider::fixed(rusty_s3::Credentials::new("AKFIXEDPROV", "sfixed-prov")).unwrap();
        let keys = provider.current().await.unwrap();
        assert_eq!(keys.s3.key(), "AKFIXEDPROV");
        // Fixed keys have nowhere to come from again: refused, they are an error, not a loop.
        provider.refused(&keys);
        assert!(provider.current().await.is_err());
    }

    #[test]
    fn an_unreachable_metadata_service_says_what_else_was_tried() {
        let e = last_resort(
            Error::Timeout {
                url: "http://169.254.169.254".into(),
            },
            "http://169.254.169.254",
            "no AWS_ACCESS_KEY_ID",
        );
        assert!(e.is_retryable());
        assert!(e.to_string().contains("no AWS_ACCESS_KEY_ID"), "{e}");
    }
}
