//! A self-signed Cachix cache's signing key: from `signing_key_file` in Nix's or Cachix's bare base64 form,
//! else from `CACHIX_SIGNING_KEY` as Cachix's client reads it, named `<cache>.cachix.org-1`.

use std::path::Path;

use crate::signing::SecretKey;

use super::super::Error;
use super::CachixBackend;

/// The environment variable Cachix's client takes a self-signed cache's secret key from (bare base64).
pub const SIGNING_KEY_ENV: &str = "CACHIX_SIGNING_KEY";

/// The cache name of a `cachix://NAME[?…]` URL, or `None` for other URLs (unvalidated: [`CachixBackend::new`]
/// reports a bad name).
pub fn cache_name(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("cachix://")?;
    let name = rest.split_once('?').map_or(rest, |(name, _)| name);
    Some(name.trim_end_matches('/'))
}

/// The name Cachix gives a self-signed cache's key, which prefixes the signatures Nix checks.
pub fn key_name(cache: &str) -> String {
    format!("{cache}.cachix.org-1")
}

/// The secret key for cache `cache`: `file` in Nix's or Cachix's bare base64 form, else the value of
/// [`SIGNING_KEY_ENV`]; `None` when neither is set (a Cachix-managed cache signs by itself).
pub fn load_signing_key(
    cache: &str,
    file: Option<&Path>,
) -> Result<Option<SecretKey>, crate::signing::Error> {
    let env = std::env::var(SIGNING_KEY_ENV)
        .ok()
        .map(crate::secret::Secret::new);
    signing_key_from(cache, file, env.as_ref())
}

/// [`load_signing_key`] with the environment variable's value passed in. An empty variable counts as unset.
fn signing_key_from(
    cache: &str,
    file: Option<&Path>,
    env: Option<&crate::secret::Secret>,
) -> Result<Option<SecretKey>, crate::signing::Error> {
    if let Some(path) = file {
        return SecretKey::load_cachix(path, &key_name(cache)).map(Some);
    }
    match env {
        Some(value) if !value.is_empty() => {
            SecretKey::parse_cachix(value.expose(), &key_name(cache))
                .map(Some)
                .map_err(|e| match e {
                    crate::signing::Error::InvalidSecretKey { reason, .. } => {
                        crate::signing::Error::InvalidSecretKey {
                            origin: None,
                            reason: format!("{SIGNING_KEY_ENV}: {reason}"),
                        }
                    }
                    other => other,
                })
        }
        _ => Ok(None),
    }
}

impl CachixBackend {
    pub(super) fn load_signing_key(&self) -> Result<Option<SecretKey>, Error> {
        load_signing_key(&self.name, self.signing_key_file.as_deref())
            .map_err(|e| Error::Config(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn bare_and_nix_key_files(dir: &Path) -> (SecretKey, PathBuf, PathBuf) {
        let key = crate::signing::generate("mine-1");
        let nix_form = key.to_nix_string();
        let nix_file = dir.join("nix.sec");
        std::fs::write(&nix_file, nix_form.expose()).unwrap();
        let bare_file = dir.join("bare.sec");
        std::fs::write(&bare_file, nix_form.expose().split_once(':').unwrap().1).unwrap();
        (key, nix_file, bare_file)
    }

    #[test]
    fn signing_key_from_a_file_in_either_form() {
        let dir = tempfile::tempdir().unwrap();
        let (key, nix_file, bare_file) = bare_and_nix_key_files(dir.path());
        let bare = signing_key_from("demo", Some(&bare_file), None)
            .unwrap()
            .unwrap();
        assert_eq!(bare.name(), "demo.cachix.org-1");
        assert_eq!(
            bare.public_key().key_base64(),
            key.public_key().key_base64()
        );
        let nix = signing_key_from("demo", Some(&nix_file), None)
            .unwrap()
            .unwrap();
        assert_eq!(nix.public_key(), key.public_key());
    }

    #[test]
    fn signing_key_from_the_environment_when_no_file_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let (key, nix_file, _) = bare_and_nix_key_files(dir.path());
        let nix_form = key.to_nix_string();
        let env = crate::secret::Secret::new(nix_form.expose().split_once(':').unwrap().1);
        let from_env = signing_key_from("demo", None, Some(&env)).unwrap().unwrap();
        assert_eq!(from_env.name(), "demo.cachix.org-1");
        assert_eq!(
            from_env.public_key().key_base64(),
            key.public_key().key_base64()
        );
        // The file is the explicit choice and wins over the environment.
        let other = crate::signing::generate("other-1").to_nix_string();
        let other_env = crate::secret::Secret::new(other.expose().split_once(':').unwrap().1);
        let from_file = signing_key_from("demo", Some(&nix_file), Some(&other_env))
            .unwrap()
            .unwrap();
        assert_eq!(from_file.public_key(), key.public_key());
        // Unset or empty: no key, and the cache signs by itself.
        assert!(signing_key_from("demo", None, None).unwrap().is_none());
        let empty = crate::secret::Secret::new("  ");
        assert!(signing_key_from("demo", None, Some(&empty))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_bad_environment_key_is_named_without_its_value() {
        let secret = "c2VjcmV0LWJ1dC10b28tc2hvcnQ=";
        let err = signing_key_from("demo", None, Some(&crate::secret::Secret::new(secret)))
            .unwrap_err()
            .to_string();
        assert!(err.contains(SIGNING_KEY_ENV), "{err}");
        assert!(!err.contains(secret), "{err}");
    }

    #[test]
    fn cache_names() {
        assert_eq!(cache_name("cachix://demo"), Some("demo"));
        assert_eq!(cache_name("cachix://demo/?api=http://x"), Some("demo"));
        assert_eq!(cache_name("s3://demo"), None);
        assert_eq!(key_name("demo"), "demo.cachix.org-1");
    }
}
