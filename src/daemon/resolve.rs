//! Turns what a hook sent into validated store paths, and everything else into a refusal with a reason.
//!
//! Every path must be absolute, free of `.`/`..` components, directly inside `store_dir`, a well-formed store path
//! name, present on disk, and registered as valid by Nix (so a file or symlink someone dropped into the store
//! directory by hand is never uploaded; a symlink is never followed either, its NAR is the link). When
//! `OUT_PATHS` is empty (always, with Nix 2.8.0: NixOS/nix#6446), the outputs come from `DRV_PATH`. The outputs
//! are valid by the time Nix runs the hook, and each is checked like any other path. What Nix registered
//! (validity, a derivation's outputs) comes from [`crate::pathinfo::registry`].

use std::path::Path;

use crate::config::Config;
use crate::pathinfo::registry::Registry;
use crate::store_path::{self, StorePath};

/// Why a path that exists on disk is refused anyway.
const NOT_REGISTERED: &str = "not a valid path in Nix's database (not registered by Nix)";

pub use crate::pathinfo::registry::Error;

/// A path (or raw input) that was not accepted, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What the client sent.
    pub input: String,
    /// Why it was refused, e.g. `not inside the store directory /nix/store`.
    pub reason: String,
}

impl Refusal {
    /// `refused INPUT: REASON`, the form clients see. Control characters in the input are replaced, so a client
    /// cannot forge lines in the build log the hook writes to.
    pub fn message(&self) -> String {
        let input: String = self
            .input
            .chars()
            .map(|c| if c.is_control() { '\u{fffd}' } else { c })
            .collect();
        format!("refused {input}: {}", self.reason)
    }
}

/// The outcome of resolving one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Paths to queue, without duplicates.
    pub paths: Vec<StorePath>,
    /// What was refused.
    pub refused: Vec<Refusal>,
    /// Set when Nix could not be asked whether the paths are valid (its database unreadable and `nix-store`
    /// failing): not an answer about the paths, so nothing is refused or queued, and the request is tried again
    /// later (the hook spools it, the importer keeps the spool file).
    pub unchecked: Option<String>,
}

impl Resolved {
    fn accept(&mut self, input: &str, store_dir: &str) {
        match validate(input, store_dir) {
            Ok(path) if !self.paths.contains(&path) => self.paths.push(path),
            Ok(_) => {}
            Err(reason) => self.refuse(input, reason),
        }
    }

    /// Nix could not be asked about `input`: drops every path of the request, to be tried again later.
    fn uncheckable(&mut self, input: &str, reason: String) {
        tracing::warn!(store_path = %input, "not queued for now, will be tried again: {reason}");
        self.paths.clear();
        self.refused.clear();
        self.unchecked = Some(reason);
    }

    fn refuse(&mut self, input: &str, reason: String) {
        self.refused.push(Refusal {
            input: input.to_owned(),
            reason,
        });
    }
}

/// Checks one path the client sent; the error is the reason it is refused.
pub fn validate(input: &str, store_dir: &str) -> Result<StorePath, String> {
    if input.is_empty() {
        return Err("empty path".to_owned());
    }
    if !input.starts_with('/') {
        return Err("not an absolute path".to_owned());
    }
    if input.split('/').any(|part| part == ".." || part == ".") {
        return Err("contains a `.` or `..` component".to_owned());
    }
    let path = StorePath::parse(input, store_dir).map_err(|e| match e {
        store_path::Error::NotInStore { store_dir, .. } => {
            format!("not inside the store directory {store_dir}")
        }
        store_path::Error::Invalid { reason, .. } => format!("not a valid store path: {reason}"),
    })?;
    match std::fs::symlink_metadata(path.as_path()) {
        Ok(_) => Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("does not exist".to_owned()),
        Err(e) => Err(format!("cannot be checked: {e}")),
    }
}

/// Resolves requests, asking Nix's registry (one cached database connection, shared by clones) what is valid.
/// Resolving blocks (on Nix's database, rarely on `nix-store`): it runs on a blocking thread of the runtime, with
/// the rest of the request, so that a hook's request costs one hand-off between threads rather than one per
/// lookup.
#[derive(Clone, Default)]
pub struct Resolver {
    registry: Registry,
}

impl Resolver {
    /// A resolver with no database connection yet.
    pub fn new() -> Resolver {
        Resolver::default()
    }

    /// Validates `out_paths`, or, when there are none, resolves and validates the outputs of `drv_path`.
    pub fn resolve(
        &self,
        drv_path: Option<&str>,
        out_paths: &[String],
        config: &Config,
    ) -> Resolved {
        let mut resolved = self.resolve_on_disk(drv_path, out_paths, config);
        self.refuse_unregistered(&mut resolved, &config.nix_db);
        resolved
    }

    /// Everything but the registration check.
    fn resolve_on_disk(
        &self,
        drv_path: Option<&str>,
        out_paths: &[String],
        config: &Config,
    ) -> Resolved {
        let store_dir = config.store_dir_str();
        let mut resolved = Resolved::default();
        if !out_paths.is_empty() {
            for input in out_paths {
                resolved.accept(input, store_dir);
            }
            return resolved;
        }
        let Some(drv_input) = drv_path else {
            resolved.refuse("", "the request names no paths".to_owned());
            return resolved;
        };
        let drv = match validate(drv_input, store_dir) {
            Ok(drv) if drv.is_derivation() => {
                match self
                    .registry
                    .invalid_paths_blocking(std::slice::from_ref(&drv), &config.nix_db)
                {
                    Ok(invalid) if invalid.is_empty() => drv,
                    Ok(_) => {
                        resolved.refuse(drv_input, NOT_REGISTERED.to_owned());
                        return resolved;
                    }
                    Err(e) => {
                        resolved.uncheckable(drv_input, format!("cannot check its validity: {e}"));
                        return resolved;
                    }
                }
            }
            Ok(_) => {
                resolved.refuse(drv_input, "DRV_PATH is not a derivation (.drv)".to_owned());
                return resolved;
            }
            Err(reason) => {
                resolved.refuse(drv_input, reason);
                return resolved;
            }
        };
        match self
            .registry
            .derivation_outputs_blocking(&drv, &config.nix_db)
        {
            Ok(outputs) if !outputs.is_empty() => {
                for output in &outputs {
                    resolved.accept(output, store_dir);
                }
            }
            Ok(_) => resolved.refuse(drv_input, "the derivation has no valid outputs".to_owned()),
            Err(e) => resolved.uncheckable(drv_input, format!("cannot resolve its outputs: {e}")),
        }
        resolved
    }

    /// Moves paths Nix does not know as valid from `paths` to `refused`.
    fn refuse_unregistered(&self, resolved: &mut Resolved, nix_db: &Path) {
        if resolved.paths.is_empty() {
            return;
        }
        match self
            .registry
            .invalid_paths_blocking(&resolved.paths, nix_db)
        {
            Ok(invalid) => {
                for path in invalid {
                    resolved.paths.retain(|p| *p != path);
                    resolved.refuse(path.as_str(), NOT_REGISTERED.to_owned());
                }
            }
            Err(e) => {
                let what = resolved
                    .paths
                    .iter()
                    .map(StorePath::as_str)
                    .collect::<Vec<_>>()
                    .join(" ");
                resolved.uncheckable(&what, format!("cannot check their validity: {e}"));
            }
        }
    }
}

#[cfg(test)]
pub(crate) use crate::pathinfo::registry::register_for_tests;

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;

    fn store() -> (tempfile::TempDir, Config) {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let present = store.join("5gnj0y388labni6sfyda6isvycfvxmmg-present");
        std::fs::write(&present, b"").unwrap();
        let config = Config {
            store_dir: store,
            nix_db: tmp.path().join("db.sqlite"),
            ..Config::default()
        };
        register_for_tests(&config.nix_db, &[present.to_str().unwrap()]);
        (tmp, config)
    }

    #[test]
    fn out_paths_are_validated_with_reasons() {
        let (_tmp, config) = store();
        let dir = config.store_dir_str().to_owned();
        let good = format!("{dir}/5gnj0y388labni6sfyda6isvycfvxmmg-present");
        let inputs = vec![
            good.clone(),
            good.clone(),
            "/tmp/x".to_owned(),
            format!("{dir}/../etc/passwd"),
            format!("{dir}/5gnj0y388labni6sfyda6isvycfvxmmg-missing"),
            "relative/path".to_owned(),
            format!("{dir}/not-a-store-path"),
        ];
        let resolved = Resolver::new().resolve(None, &inputs, &config);
        assert_eq!(resolved.paths.len(), 1);
        let reasons: Vec<_> = resolved.refused.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(
            reasons[..4],
            [
                format!("not inside the store directory {dir}").as_str(),
                "contains a `.` or `..` component",
                "does not exist",
                "not an absolute path",
            ]
        );
        assert!(
            reasons[4].starts_with("not a valid store path"),
            "{reasons:?}"
        );
        assert_eq!(
            resolved.refused[0].message(),
            format!("refused /tmp/x: not inside the store directory {dir}")
        );
    }

    #[test]
    fn drv_path_must_be_a_derivation() {
        let (_tmp, config) = store();
        let dir = config.store_dir_str().to_owned();
        let resolved = Resolver::new().resolve(
            Some(&format!("{dir}/5gnj0y388labni6sfyda6isvycfvxmmg-present")),
            &[],
            &config,
        );
        assert!(resolved.paths.is_empty());
        assert!(resolved.refused[0].reason.contains("not a derivation"));
        let resolved = Resolver::new().resolve(None, &[], &config);
        assert_eq!(resolved.refused[0].reason, "the request names no paths");
    }

    #[test]
    fn drv_outputs_come_from_the_database() {
        let (tmp, mut config) = store();
        let dir = config.store_dir_str().to_owned();
        let drv = format!("{dir}/hrnw32bvgf2gvs4zqkcrbqwbjhi40kq8-ht-b.drv");
        let out = format!("{dir}/5gnj0y388labni6sfyda6isvycfvxmmg-present");
        let gone = format!("{dir}/8pjibnycdlc071yls0gkbsb7l2ffmlgg-ht-b-dev");
        std::fs::write(&drv, b"Derive(...)").unwrap();
        config.nix_db = tmp.path().join("outputs.sqlite");
        let db = Connection::open(&config.nix_db).unwrap();
        db.execute_batch(&format!(
            "CREATE TABLE ValidPaths (id integer primary key, path text unique not null);
             CREATE TABLE DerivationOutputs (drv integer, id text, path text);
             INSERT INTO ValidPaths VALUES (1, '{drv}'), (2, '{out}');
             INSERT INTO DerivationOutputs VALUES (1, 'dev', '{gone}'), (1, 'out', '{out}');"
        ))
        .unwrap();
        let resolver = Resolver::new();
        for _ in 0..2 {
            let resolved = resolver.resolve(Some(&drv), &[], &config);
            assert_eq!(resolved.paths.len(), 1);
            assert_eq!(resolved.paths[0].as_str(), out);
            assert_eq!(resolved.refused[0].input, gone);
            assert_eq!(resolved.refused[0].reason, "does not exist");
        }
    }

    #[test]
    fn paths_nix_did_not_register_are_refused() {
        let (_tmp, config) = store();
        let dir = config.store_dir_str().to_owned();
        let planted = format!("{dir}/0000000000000000000000000000000a-planted");
        std::os::unix::fs::symlink("/etc", &planted).unwrap();
        let present = format!("{dir}/5gnj0y388labni6sfyda6isvycfvxmmg-present");
        let resolved = Resolver::new().resolve(None, &[planted.clone(), present.clone()], &config);
        assert_eq!(resolved.paths.len(), 1);
        assert_eq!(resolved.paths[0].as_str(), present);
        assert_eq!(resolved.refused[0].input, planted);
        assert_eq!(resolved.refused[0].reason, NOT_REGISTERED);
    }
}
