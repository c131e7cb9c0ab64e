//! Turns what a hook sent into validated store paths, and everything else into a refusal with a reason.
//!
//! Every path must be absolute, free of `.`/`..` components, directly inside `store_dir`, a well-formed store path
//! name, and present on disk. When `OUT_PATHS` is empty (always, with Nix 2.8.0: NixOS/nix#6446), the outputs
//! come from `DRV_PATH`: first from Nix's database, opened read-only,
//!
//! ```sql
//! SELECT o.path FROM DerivationOutputs o JOIN ValidPaths v ON v.id = o.drv WHERE v.path = ?1
//! ```
//!
//! and, if that fails, from `nix-store --query --outputs DRV`. The outputs are valid by the time Nix runs the hook,
//! and each is checked like any other path.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::config::Config;
use crate::store_path::{self, StorePath};

/// How long `nix-store --query --outputs` may take.
const NIX_STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a derivation's outputs could not be found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nix's database could not be read.
    #[error("cannot read {db}: {source}")]
    Db {
        /// The database file.
        db: String,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// `nix-store` failed or could not run.
    #[error("`nix-store --query --outputs` failed: {0}")]
    NixStore(String),
}

/// A path (or raw input) that was not accepted, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What the client sent.
    pub input: String,
    /// Why it was refused, e.g. `not inside the store directory /nix/store`.
    pub reason: String,
}

impl Refusal {
    /// `refused INPUT: REASON`, the form clients see.
    pub fn message(&self) -> String {
        format!("refused {}: {}", self.input, self.reason)
    }
}

/// The outcome of resolving one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Paths to queue, without duplicates.
    pub paths: Vec<StorePath>,
    /// What was refused.
    pub refused: Vec<Refusal>,
}

impl Resolved {
    fn accept(&mut self, input: &str, store_dir: &str) {
        match validate(input, store_dir) {
            Ok(path) if !self.paths.contains(&path) => self.paths.push(path),
            Ok(_) => {}
            Err(reason) => self.refuse(input, reason),
        }
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

/// Validates `out_paths`, or, when there are none, resolves and validates the outputs of `drv_path`.
pub async fn resolve(drv_path: Option<&str>, out_paths: &[String], config: &Config) -> Resolved {
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
        Ok(drv) if drv.is_derivation() => drv,
        Ok(_) => {
            resolved.refuse(drv_input, "DRV_PATH is not a derivation (.drv)".to_owned());
            return resolved;
        }
        Err(reason) => {
            resolved.refuse(drv_input, reason);
            return resolved;
        }
    };
    match derivation_outputs(&drv, &config.nix_db).await {
        Ok(outputs) if !outputs.is_empty() => {
            for output in &outputs {
                resolved.accept(output, store_dir);
            }
        }
        Ok(_) => resolved.refuse(drv_input, "the derivation has no valid outputs".to_owned()),
        Err(e) => resolved.refuse(drv_input, format!("cannot resolve its outputs: {e}")),
    }
    resolved
}

/// The output paths of `drv`: from the database, else from `nix-store`.
async fn derivation_outputs(drv: &StorePath, nix_db: &Path) -> Result<Vec<String>, Error> {
    let (db, path) = (nix_db.to_owned(), drv.as_str().to_owned());
    let from_db = tokio::task::spawn_blocking(move || outputs_from_db(&db, &path)).await;
    match from_db {
        Ok(Ok(outputs)) if !outputs.is_empty() => return Ok(outputs),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(store_path = %drv, "database lookup failed: {e}"),
        Err(e) => tracing::debug!(store_path = %drv, "database lookup panicked: {e}"),
    }
    outputs_from_nix_store(drv).await
}

fn outputs_from_db(db: &Path, drv: &str) -> Result<Vec<String>, Error> {
    let db_error = |source| Error::Db {
        db: db.display().to_string(),
        source,
    };
    // A URI so that `mode=ro` applies; '?', '#' and '%' would otherwise be read as URI syntax.
    let escaped = db
        .display()
        .to_string()
        .replace('%', "%25")
        .replace('?', "%3f")
        .replace('#', "%23");
    let connection = Connection::open_with_flags(
        format!("file:{escaped}?mode=ro"),
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_error)?;
    connection
        .busy_timeout(Duration::from_millis(500))
        .map_err(db_error)?;
    let mut statement = connection
        .prepare(
            "SELECT o.path FROM DerivationOutputs o JOIN ValidPaths v ON v.id = o.drv \
             WHERE v.path = ?1 ORDER BY o.id",
        )
        .map_err(db_error)?;
    let rows = statement
        .query_map([drv], |row| row.get::<_, String>(0))
        .map_err(db_error)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(db_error)
}

async fn outputs_from_nix_store(drv: &StorePath) -> Result<Vec<String>, Error> {
    let run = tokio::process::Command::new("nix-store")
        .args(["--query", "--outputs", drv.as_str()])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(NIX_STORE_TIMEOUT, run)
        .await
        .map_err(|_| {
            Error::NixStore(format!(
                "no answer within {} s",
                NIX_STORE_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| Error::NixStore(e.to_string()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(Error::NixStore(format!(
            "{}: {}",
            output.status,
            stderr.trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Config) {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        std::fs::create_dir(&store).unwrap();
        std::fs::write(store.join("5gnj0y388labni6sfyda6isvycfvxmmg-present"), b"").unwrap();
        let config = Config {
            store_dir: store,
            nix_db: tmp.path().join("no-such.sqlite"),
            ..Config::default()
        };
        (tmp, config)
    }

    #[tokio::test]
    async fn out_paths_are_validated_with_reasons() {
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
        let resolved = resolve(None, &inputs, &config).await;
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

    #[tokio::test]
    async fn drv_path_must_be_a_derivation() {
        let (_tmp, config) = store();
        let dir = config.store_dir_str().to_owned();
        let resolved = resolve(
            Some(&format!("{dir}/5gnj0y388labni6sfyda6isvycfvxmmg-present")),
            &[],
            &config,
        )
        .await;
        assert!(resolved.paths.is_empty());
        assert!(resolved.refused[0].reason.contains("not a derivation"));
        let resolved = resolve(None, &[], &config).await;
        assert_eq!(resolved.refused[0].reason, "the request names no paths");
    }
}
