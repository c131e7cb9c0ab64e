//! The target's auth token, re-read when its file changes.
//!
//! sops-nix and systemd credentials replace secret files by rename or symlink swap, so the token is read from
//! `auth_token_file` again on every [`Credentials::reload`] (called on file events and on SIGHUP) rather than
//! cached for the daemon's lifetime. Without a file, an environment variable (`CACHIX_AUTH_TOKEN` for Cachix,
//! `NIXPUSH_AUTH_TOKEN` otherwise) is read once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::secret::Secret;

/// Why the token could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The token file could not be read. The message names the file, never its contents.
    #[error("cannot read auth token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The token file is empty.
    #[error("auth token file {path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// A shared, reloadable token. Cheap to clone; clones see reloads.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    file: Option<PathBuf>,
    token: RwLock<Option<Secret>>,
}

impl Credentials {
    /// Credentials from `file` if given, else from the environment variable `env_var`.
    pub fn load(file: Option<&Path>, env_var: &str) -> Result<Credentials, Error> {
        let credentials = Credentials {
            inner: Arc::new(Inner {
                file: file.map(Path::to_owned),
                token: RwLock::new(None),
            }),
        };
        match file {
            Some(_) => {
                credentials.reload()?;
            }
            None => {
                let token = std::env::var(env_var)
                    .ok()
                    .map(Secret::new)
                    .filter(|t| !t.is_empty());
                credentials.set(token);
            }
        }
        Ok(credentials)
    }

    /// No token at all.
    pub fn none() -> Credentials {
        Credentials::default()
    }

    /// A fixed token (tests, one-off `push --token-file`).
    pub fn fixed(token: Secret) -> Credentials {
        let credentials = Credentials::default();
        credentials.set(Some(token));
        credentials
    }

    /// Re-reads the token file. Returns whether the token changed. Without a file this is a no-op.
    pub fn reload(&self) -> Result<bool, Error> {
        let Some(path) = &self.inner.file else {
            return Ok(false);
        };
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        let token = Secret::new(text);
        if token.is_empty() {
            return Err(Error::Empty { path: path.clone() });
        }
        let changed = self.token().as_ref() != Some(&token);
        self.set(Some(token));
        Ok(changed)
    }

    /// The token file, if the token comes from one.
    pub fn file(&self) -> Option<&Path> {
        self.inner.file.as_deref()
    }

    /// The current token.
    pub fn token(&self) -> Option<Secret> {
        match self.inner.token.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, token: Option<Secret>) {
        match self.inner.token.write() {
            Ok(mut guard) => *guard = token,
            Err(poisoned) => *poisoned.into_inner() = token,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_sees_a_replaced_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let c = Credentials::load(Some(&path), "NIXPUSH_TEST_UNSET").unwrap();
        let clone = c.clone();
        assert_eq!(clone.token().unwrap().expose(), "first");
        let tmp = dir.path().join("token.new");
        std::fs::write(&tmp, "second").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(c.reload().unwrap());
        assert_eq!(clone.token().unwrap().expose(), "second");
        assert!(!c.reload().unwrap());
    }

    #[test]
    fn errors_name_the_file_not_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, "  \n").unwrap();
        let err = Credentials::load(Some(&path), "X").unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        let missing = dir.path().join("missing");
        let err = Credentials::load(Some(&missing), "X")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
