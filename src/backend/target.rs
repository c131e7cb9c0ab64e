//! What a target is, decided in one place: from `[target]` in the configuration, which backend speaks to it,
//! where its token and signing key come from, how it is named in logs, and what identifies it.
//!
//! The daemon, `nixpush push` and `nixpush doctor` all start here: [`Target::from_config`] loads everything at
//! once, and [`Kind`] answers the questions `doctor` asks one check at a time (which environment variable holds
//! the token, whether the cache signs by itself). No code outside `backend/` looks at the URL's scheme.
//!
//! ```text
//! url = "cachix://demo"     → Cachix backend, token from $CACHIX_AUTH_TOKEN, key in Nix's or Cachix's form
//! url = "s3://b?region=x"   → S3 backend,     token from $NIXPUSH_AUTH_TOKEN (unused), key in Nix's form
//! ```

use crate::config::{redact_url, Config};
use crate::signing::SecretKey;

use super::{cachix, credentials, AnyBackend, Credentials};

/// The kind of cache a target URL names, from its scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `file:///dir`: a directory on this machine.
    File,
    /// `http://…`, `https://…`: a cache that takes PUT (nginx WebDAV and the like).
    Http,
    /// `s3://bucket?…`.
    S3,
    /// `cachix://NAME[?api=…]`.
    Cachix {
        /// The cache name (unvalidated here; the backend reports a bad one).
        cache: String,
    },
    /// A scheme this build does not know; building the backend reports it.
    Other,
}

impl Kind {
    /// The kind of `config.target.url`.
    pub fn of(config: &Config) -> Kind {
        let url = &config.target.url;
        if let Some(cache) = cachix::cache_name(url) {
            return Kind::Cachix {
                cache: cache.to_owned(),
            };
        }
        match url.split("://").next().unwrap_or_default() {
            "file" => Kind::File,
            "http" | "https" => Kind::Http,
            "s3" => Kind::S3,
            _ => Kind::Other,
        }
    }

    /// The target URL of a cache named on the command line: a URL as it is, a bare name as the Cachix cache of
    /// that name (what `cachix push NAME` means).
    pub fn url_of_named_cache(name_or_url: &str) -> String {
        if name_or_url.contains("://") {
            name_or_url.to_owned()
        } else {
            format!("cachix://{name_or_url}")
        }
    }

    /// The environment variable the token comes from when `auth_token_file` is not set.
    pub fn token_env_var(&self) -> &'static str {
        match self {
            Kind::Cachix { .. } => "CACHIX_AUTH_TOKEN",
            Kind::File | Kind::Http | Kind::S3 | Kind::Other => "NIXPUSH_AUTH_TOKEN",
        }
    }

    /// The environment variable a signing key may come from when `signing_key_file` is not set, if this kind
    /// takes one (Cachix's client reads `CACHIX_SIGNING_KEY`).
    pub fn signing_key_env_var(&self) -> Option<&'static str> {
        match self {
            Kind::Cachix { .. } => Some(cachix::SIGNING_KEY_ENV),
            Kind::File | Kind::Http | Kind::S3 | Kind::Other => None,
        }
    }

    /// Whether the cache signs paths with its own key when nixpush has none (a Cachix-managed cache).
    pub fn signs_by_itself(&self) -> bool {
        matches!(self, Kind::Cachix { .. })
    }

    /// What of a complete cache this kind of target cannot hold (see [`super::Backend::cannot_store`]).
    pub fn cannot_store(&self) -> &'static [super::documents::Document] {
        match self {
            Kind::Cachix { .. } => cachix::CANNOT_STORE,
            Kind::File | Kind::Http | Kind::S3 | Kind::Other => &[],
        }
    }

    /// Whether the target is a directory on this machine rather than a server.
    pub fn is_local(&self) -> bool {
        matches!(self, Kind::File)
    }

    /// The URL scheme, for messages: `file://`, `http(s)://`, `s3://`, `cachix://`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Kind::File => "file://",
            Kind::Http => "http(s)://",
            Kind::S3 => "s3://",
            Kind::Cachix { .. } => "cachix://",
            Kind::Other => "unknown",
        }
    }

    /// Whether requests to this kind of target carry the token: HTTP (bearer) and Cachix do; a directory and S3
    /// (AWS keys) do not.
    pub fn uses_token(&self) -> bool {
        match self {
            Kind::Http | Kind::Cachix { .. } => true,
            Kind::File | Kind::S3 | Kind::Other => false,
        }
    }

    /// Reads the token: `auth_token_file`, else [`Kind::token_env_var`]. A kind that sends no token reads
    /// nothing, so an empty or missing token file left in the configuration cannot stop it.
    pub fn load_credentials(&self, config: &Config) -> Result<Credentials, credentials::Error> {
        if !self.uses_token() {
            return Ok(Credentials::none());
        }
        Credentials::load(
            config.target.auth_token_file.as_deref(),
            self.token_env_var(),
        )
    }

    /// Loads the signing key named by the configuration, if any. A Cachix target also takes Cachix's bare
    /// base64 form, in the file or in `CACHIX_SIGNING_KEY`.
    pub fn load_signing_key(
        &self,
        config: &Config,
    ) -> Result<Option<SecretKey>, crate::signing::Error> {
        let file = config.target.signing_key_file.as_deref();
        match self {
            Kind::Cachix { cache } => cachix::load_signing_key(cache, file),
            Kind::File | Kind::Http | Kind::S3 | Kind::Other => {
                file.map(SecretKey::load).transpose()
            }
        }
    }

    /// The URL Nix substitutes from when the target does not say: `https://NAME.cachix.org` for Cachix, else the
    /// configured URL without user name and password.
    pub fn read_url(&self, config: &Config) -> String {
        let url = &config.target.url;
        if let Kind::Cachix { cache } = self {
            return format!("https://{cache}.cachix.org");
        }
        match url::Url::parse(url) {
            Ok(mut parsed) => {
                let _ = parsed.set_username("");
                let _ = parsed.set_password(None);
                parsed.to_string()
            }
            Err(_) => redact_url(url),
        }
    }

    /// What identifies the cache behind `config.target.url`: the Cachix cache name, else the URL without
    /// secrets. Two configurations with the same identity write to the same cache.
    pub fn identity(&self, config: &Config) -> String {
        match self {
            Kind::Cachix { cache } => format!("cachix://{cache}"),
            Kind::File | Kind::Http | Kind::S3 | Kind::Other => redact_url(&config.target.url)
                .trim_end_matches('/')
                .to_owned(),
        }
    }
}

/// Why a target cannot be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The token could not be read.
    #[error(transparent)]
    Credentials(#[from] credentials::Error),
    /// The signing key could not be read.
    #[error(transparent)]
    Key(#[from] crate::signing::Error),
    /// The URL or its options are unusable.
    #[error(transparent)]
    Backend(#[from] super::Error),
}

/// A target ready to use: its backend, the credentials and key it uses, and how it is named.
pub struct Target {
    /// The backend that speaks to the cache.
    pub backend: AnyBackend,
    /// The token, shared with the backend (reloading it here reloads it there).
    pub credentials: Credentials,
    /// The key narinfos are signed with, if any.
    pub signing_key: Option<SecretKey>,
    /// The keys of `signing_key_files`, each adding a signature after the main key's.
    pub extra_signing_keys: Vec<SecretKey>,
    /// The kind of cache.
    pub kind: Kind,
    /// The URL for logs, status and errors, passwords and signatures redacted.
    pub display_name: String,
    /// What identifies the cache (see [`Kind::identity`]); presence will be keyed by it.
    pub identity: String,
}

impl Target {
    /// Reads the token and the signing key named by `config.target` and builds the backend for its URL.
    pub fn from_config(config: &Config) -> Result<Target, Error> {
        let kind = Kind::of(config);
        let credentials = kind.load_credentials(config)?;
        let backend = AnyBackend::from_config(config, credentials.clone())?;
        let signing_key = kind.load_signing_key(config)?;
        let extra_signing_keys = SecretKey::load_all(&config.target.signing_key_files)?;
        Ok(Target {
            backend,
            credentials,
            signing_key,
            extra_signing_keys,
            display_name: redact_url(&config.target.url),
            identity: kind.identity(config),
            kind,
        })
    }

    /// Only the backend, with credentials already loaded: for `doctor`, which checks the token, the key and the
    /// target one at a time.
    pub fn backend_with(
        config: &Config,
        credentials: Credentials,
    ) -> Result<AnyBackend, super::Error> {
        AnyBackend::from_config(config, credentials)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_cache_name_is_a_cachix_cache_and_a_url_stays_as_it_is() {
        assert_eq!(Kind::url_of_named_cache("demo"), "cachix://demo");
        for url in [
            "file:///srv/cache",
            "https://cache.example/x",
            "s3://b?region=x",
            "cachix://demo",
        ] {
            assert_eq!(Kind::url_of_named_cache(url), url);
        }
    }

    fn config(url: &str) -> Config {
        let mut config = Config::default();
        config.target.url = url.into();
        config
    }

    #[test]
    fn kinds_and_their_token_variables() {
        let cachix = Kind::of(&config("cachix://demo?api=http://127.0.0.1:1"));
        assert_eq!(
            cachix,
            Kind::Cachix {
                cache: "demo".into()
            }
        );
        assert_eq!(cachix.token_env_var(), "CACHIX_AUTH_TOKEN");
        assert_eq!(cachix.signing_key_env_var(), Some("CACHIX_SIGNING_KEY"));
        for (url, kind) in [
            ("file:///tmp/c", Kind::File),
            ("https://cache.example/nix", Kind::Http),
            ("http://127.0.0.1:8080", Kind::Http),
            ("s3://bucket?region=x", Kind::S3),
            ("ftp://x", Kind::Other),
        ] {
            let found = Kind::of(&config(url));
            assert_eq!(found, kind, "{url}");
            assert_eq!(found.token_env_var(), "NIXPUSH_AUTH_TOKEN", "{url}");
            assert_eq!(found.signing_key_env_var(), None, "{url}");
        }
    }

    // See: #19
    #[test]
    fn only_targets_that_send_a_token_read_the_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty-token");
        std::fs::write(&empty, "").unwrap();
        for (url, reads) in [
            ("file:///tmp/c", false),
            ("s3://bucket?region=x", false),
            ("https://cache.example", true),
            ("cachix://demo", true),
        ] {
            let mut config = config(url);
            config.target.auth_token_file = Some(empty.clone());
            let kind = Kind::of(&config);
            assert_eq!(kind.uses_token(), reads, "{url}");
            assert_eq!(kind.load_credentials(&config).is_err(), reads, "{url}");
        }
    }

    #[test]
    fn identity_names_the_cache_without_secrets() {
        let cachix = config("cachix://demo/?api=http://127.0.0.1:1");
        assert_eq!(Kind::of(&cachix).identity(&cachix), "cachix://demo");
        let http = config("https://user:hunter2@cache.example/nix/");
        let identity = Kind::of(&http).identity(&http);
        assert!(!identity.contains("hunter2"), "{identity}");
        assert!(identity.starts_with("https://"), "{identity}");
        assert!(identity.ends_with("cache.example/nix"), "{identity}");
    }

    #[test]
    fn cachix_targets_take_bare_base64_keys_and_others_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::signing::generate("mine-1").to_nix_string();
        let bare = dir.path().join("bare.sec");
        std::fs::write(&bare, key.expose().split_once(':').unwrap().1).unwrap();
        let mut config = config("cachix://demo?api=http://127.0.0.1:1");
        config.target.signing_key_file = Some(bare.clone());
        let loaded = Kind::of(&config)
            .load_signing_key(&config)
            .unwrap()
            .unwrap();
        assert_eq!(loaded.name(), "demo.cachix.org-1");

        config.target.url = "file:///tmp/cache".into();
        let err = Kind::of(&config)
            .load_signing_key(&config)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&bare.display().to_string()), "{err}");
    }

    #[test]
    fn from_config_builds_the_backend_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&format!("file://{}", dir.path().display()));
        let target = Target::from_config(&config).unwrap();
        assert!(matches!(target.backend, AnyBackend::File(_)));
        assert_eq!(target.kind, Kind::File);
        assert_eq!(target.display_name, config.target.url);
        assert!(target.signing_key.is_none());
    }

    #[test]
    fn read_url_drops_credentials() {
        let http = config("https://u:p@cache.example/nix/");
        assert_eq!(
            Kind::of(&http).read_url(&http),
            "https://cache.example/nix/"
        );
        let cachix = config("cachix://mycache");
        assert_eq!(
            Kind::of(&cachix).read_url(&cachix),
            "https://mycache.cachix.org"
        );
    }
}
