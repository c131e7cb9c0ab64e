//! Store paths: `/nix/store/<32-char hash>-<name>`, parsed and validated.
//!
//! Everything that crosses a trust boundary (the hook socket, spool files, `push` arguments, the queue) is turned
//! into a [`StorePath`] first, so the rest of nixpush never sees `..`, control characters or paths outside the store.
//!
//! ```
//! use nixpush::store_path::StorePath;
//! let p = StorePath::parse("/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top", "/nix/store").unwrap();
//! assert_eq!(p.hash_part(), "ripzxnb3whas7h2iw572d3b0sby1nxxw");
//! assert_eq!(p.name(), "vec-top");
//! assert_eq!(p.base_name(), "ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top");
//! ```

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Length of the hash part of a store path's base name.
pub const HASH_LEN: usize = 32;
/// Longest name Nix accepts after the hash and dash.
pub const MAX_NAME_LEN: usize = 211;

/// Characters of Nix's base32 alphabet (no `e`, `o`, `t`, `u`).
const BASE32_CHARS: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not a store path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Not below the configured store directory.
    #[error("{path:?} is not inside the store directory {store_dir}")]
    NotInStore {
        /// The offending path.
        path: String,
        /// The store directory it was checked against.
        store_dir: String,
    },
    /// The base name is malformed.
    #[error("{path:?} is not a valid store path: {reason}")]
    Invalid {
        /// The offending path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A validated top-level store path, e.g. `/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top`.
///
/// Ordering and equality follow the full path string. Serialized as that string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StorePath {
    full: String,
    /// Byte offset of the base name (after the last `/`).
    base_start: usize,
}

impl StorePath {
    /// Parses `path`, which must be exactly `<store_dir>/<hash>-<name>` (no trailing components).
    pub fn parse(path: &str, store_dir: &str) -> Result<StorePath, Error> {
        let store_dir = store_dir.trim_end_matches('/');
        let base = path
            .strip_prefix(store_dir)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| Error::NotInStore {
                path: path.to_owned(),
                store_dir: store_dir.to_owned(),
            })?;
        validate_base_name(base).map_err(|reason| Error::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        Ok(StorePath {
            full: path.to_owned(),
            base_start: store_dir.len() + 1,
        })
    }

    /// Parses a path that may point inside a store path (`/nix/store/…-hello/bin/hello`) and returns the
    /// top-level store path that contains it.
    pub fn parse_containing(path: &str, store_dir: &str) -> Result<StorePath, Error> {
        let store_dir_trimmed = store_dir.trim_end_matches('/');
        let rest = path
            .strip_prefix(store_dir_trimmed)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| Error::NotInStore {
                path: path.to_owned(),
                store_dir: store_dir_trimmed.to_owned(),
            })?;
        let base = rest.split('/').next().unwrap_or_default();
        StorePath::parse(&format!("{store_dir_trimmed}/{base}"), store_dir_trimmed)
    }

    /// Builds a store path from a base name such as a narinfo `References` entry.
    pub fn from_base_name(base: &str, store_dir: &str) -> Result<StorePath, Error> {
        StorePath::parse(
            &format!("{}/{base}", store_dir.trim_end_matches('/')),
            store_dir,
        )
    }

    /// The full path as a string.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The full path as a filesystem path.
    pub fn as_path(&self) -> &Path {
        Path::new(&self.full)
    }

    /// The store directory this path lives in, without a trailing slash.
    pub fn store_dir(&self) -> &str {
        &self.full[..self.base_start - 1]
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.full[self.base_start..]
    }

    /// The 32 base32 characters that name the path's narinfo.
    pub fn hash_part(&self) -> &str {
        &self.base_name()[..HASH_LEN]
    }

    /// The part after `<hash>-`.
    pub fn name(&self) -> &str {
        &self.base_name()[HASH_LEN + 1..]
    }

    /// Whether this is a derivation (`.drv`).
    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }
}

/// Checks `<hash>-<name>` the way Nix does: 32 base32 characters, a dash, then 1–211 characters from
/// `[A-Za-z0-9+-._?=]`, not starting with a dot.
pub fn validate_base_name(base: &str) -> Result<(), &'static str> {
    let bytes = base.as_bytes();
    if bytes.len() < HASH_LEN + 2 {
        return Err("base name is shorter than a 32-character hash, a dash and a name");
    }
    if !bytes[..HASH_LEN].iter().all(|c| BASE32_CHARS.contains(c)) {
        return Err("hash part is not 32 characters of Nix base32");
    }
    if bytes[HASH_LEN] != b'-' {
        return Err("no dash after the hash part");
    }
    let name = &bytes[HASH_LEN + 1..];
    if name.len() > MAX_NAME_LEN {
        return Err("name is longer than 211 characters");
    }
    if name[0] == b'.' {
        return Err("name starts with a dot");
    }
    if !name
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(c))
    {
        return Err("name contains a character outside [A-Za-z0-9+-._?=]");
    }
    Ok(())
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.full)
    }
}

impl TryFrom<String> for StorePath {
    type Error = Error;

    /// Parses a full path, taking everything before the last `/` as the store directory.
    fn try_from(full: String) -> Result<StorePath, Error> {
        let store_dir = match full.rfind('/') {
            Some(i) if i > 0 => &full[..i],
            _ => {
                return Err(Error::Invalid {
                    path: full.clone(),
                    reason: "not an absolute path below a store directory",
                })
            }
        };
        StorePath::parse(&full, store_dir)
    }
}

impl From<StorePath> for String {
    fn from(p: StorePath) -> String {
        p.full
    }
}

/// `/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-NAME`: a valid path for unit tests that care only about its name.
#[cfg(test)]
pub(crate) fn test_path(name: &str) -> StorePath {
    StorePath::parse(
        &format!("/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-{name}"),
        "/nix/store",
    )
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORE: &str = "/nix/store";

    #[test]
    fn parses_vector_paths() {
        let p = StorePath::parse(
            "/nix/store/59sqgcsmssgl7absp1w5vhja26baj5z5-vec-top-doc",
            STORE,
        )
        .unwrap();
        assert_eq!(p.store_dir(), "/nix/store");
        assert_eq!(p.name(), "vec-top-doc");
        assert!(!p.is_derivation());
        let d = StorePath::parse(
            "/nix/store/5zj93d6iiaz2bj9hy068jfbcayc22v0p-vec-dep.drv",
            STORE,
        )
        .unwrap();
        assert!(d.is_derivation());
    }

    #[test]
    fn rejects_hostile_paths() {
        for bad in [
            "/nix/store/../etc/passwd",
            "/nix/store/5gnj0y388labni6sfyda6isvycfvxmmg-..",
            "/nix/store/5gnj0y388labni6sfyda6isvycfvxmmg-.hidden",
            "/nix/store/5gnj0y388labni6sfyda6isvycfvxmmg-a/b",
            "/nix/store/5gnj0y388labni6sfyda6isvycfvxmmg-a\nb",
            "/nix/store/5gnj0y388labni6sfyda6isvycfvxmmg-",
            "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x",
            "/nix/store/5gnj0y388labni6sfyda6isvycfvxmmgXx",
            "/nix/storeX/5gnj0y388labni6sfyda6isvycfvxmmg-x",
            "/tmp/5gnj0y388labni6sfyda6isvycfvxmmg-x",
            "relative/5gnj0y388labni6sfyda6isvycfvxmmg-x",
        ] {
            assert!(StorePath::parse(bad, STORE).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn other_store_dir_is_not_ours() {
        let err =
            StorePath::parse("/gnu/store/5gnj0y388labni6sfyda6isvycfvxmmg-x", STORE).unwrap_err();
        assert!(matches!(err, Error::NotInStore { .. }));
    }

    #[test]
    fn containing_path_strips_subpath() {
        let p = StorePath::parse_containing(
            "/nix/store/5gnj0y388labni6sfyda6isvycfvxmmg-hello/bin/hello",
            STORE,
        )
        .unwrap();
        assert_eq!(
            p.as_str(),
            "/nix/store/5gnj0y388labni6sfyda6isvycfvxmmg-hello"
        );
    }

    #[test]
    fn serde_round_trip() {
        let p = StorePath::parse(
            "/nix/store/5gnj0y388labni6sfyda6isvycfvxmmg-vec-regular",
            STORE,
        )
        .unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            "\"/nix/store/5gnj0y388labni6sfyda6isvycfvxmmg-vec-regular\""
        );
        let back: StorePath = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        assert!(serde_json::from_str::<StorePath>("\"/nix/store/nope\"").is_err());
    }
}
