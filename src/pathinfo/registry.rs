//! What Nix registered, as the daemon checks a hook's request: whether paths are valid, and a derivation's
//! outputs (Nix 2.8 leaves `OUT_PATHS` empty, NixOS/nix#6446). From Nix's database, opened read-only once and
//! kept between requests because opening it costs more than the rest of a request,
//!
//! ```sql
//! SELECT o.path FROM DerivationOutputs o JOIN ValidPaths v ON v.id = o.drv WHERE v.path = ?1
//! ```
//!
//! and, when the database cannot be read, from `nix-store --check-validity --print-invalid` and
//! `nix-store --query --outputs`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::Connection;
use tokio::runtime::Handle;

use crate::store_path::StorePath;

use super::sqlite;

/// How long a `nix-store` query may take.
const NIX_STORE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits while Nix holds a write lock on the database, before asking `nix-store`.
const BUSY_TIMEOUT: Duration = Duration::from_millis(500);

/// Why validity or a derivation's outputs could not be found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nix's database could not be read.
    #[error("cannot read {db}: {source}")]
    Db {
        /// The database file.
        db: String,
        /// What went wrong (boxed: path-info errors are large).
        source: Box<super::Error>,
    },
    /// `nix-store` failed or could not run.
    #[error("{0}")]
    NixStore(String),
    /// The lookup's thread died.
    #[error("the lookup failed: {0}")]
    Panicked(String),
}

/// Nix's registry of valid paths, with one cached read-only connection to its database (shared by clones).
#[derive(Clone, Default)]
pub struct Registry {
    db: Arc<Mutex<Option<OpenDb>>>,
}

struct OpenDb {
    path: PathBuf,
    connection: Connection,
}

impl Registry {
    /// A registry with no database connection yet.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Which of `paths` are not valid paths of the store: from the database at `nix_db`, else from
    /// `nix-store`. Blocks, on the database or on `nix-store`: call it on a blocking thread of the runtime.
    pub fn invalid_paths_blocking(
        &self,
        paths: &[StorePath],
        nix_db: &Path,
    ) -> Result<Vec<StorePath>, Error> {
        match invalid_in_db(&self.db, nix_db, paths) {
            Ok(invalid) => return Ok(invalid),
            Err(e) => tracing::warn!("database validity check failed, asking nix-store: {e}"),
        }
        Handle::current().block_on(invalid_from_nix_store(paths))
    }

    /// [`Registry::invalid_paths_blocking`] on a blocking thread.
    pub async fn invalid_paths(
        &self,
        paths: &[StorePath],
        nix_db: &Path,
    ) -> Result<Vec<StorePath>, Error> {
        let (registry, db, owned) = (self.clone(), nix_db.to_owned(), paths.to_vec());
        tokio::task::spawn_blocking(move || registry.invalid_paths_blocking(&owned, &db))
            .await
            .unwrap_or_else(|e| Err(Error::Panicked(e.to_string())))
    }

    /// The NAR size of each of `paths` that is valid (invalid ones are left out): from the database at `nix_db`,
    /// else from `nix-store`.
    pub async fn nar_sizes(
        &self,
        paths: &[StorePath],
        nix_db: &Path,
    ) -> Result<HashMap<StorePath, u64>, Error> {
        let (cache, db, owned) = (self.db.clone(), nix_db.to_owned(), paths.to_vec());
        let from_db = tokio::task::spawn_blocking(move || sizes_in_db(&cache, &db, &owned)).await;
        match from_db {
            Ok(Ok(sizes)) => return Ok(sizes),
            Ok(Err(e)) => tracing::warn!("database size lookup failed, asking nix-store: {e}"),
            Err(e) => tracing::warn!("database size lookup panicked, asking nix-store: {e}"),
        }
        let invalid = invalid_from_nix_store(paths).await?;
        let valid: Vec<&StorePath> = paths.iter().filter(|p| !invalid.contains(p)).collect();
        let mut sizes = HashMap::new();
        // `nix-store --query --size` fails on the first invalid path, so only valid ones are asked about.
        for chunk in valid.chunks(500) {
            let mut args = vec!["--query", "--size"];
            args.extend(chunk.iter().map(|p| p.as_str()));
            let printed = nix_store(&args).await?;
            for (path, size) in chunk.iter().zip(printed) {
                sizes.insert((*path).clone(), size.parse().unwrap_or(0));
            }
        }
        Ok(sizes)
    }

    /// The output paths of `drv`: from the database at `nix_db`, else from `nix-store`. Blocks like
    /// [`Registry::invalid_paths_blocking`].
    pub fn derivation_outputs_blocking(
        &self,
        drv: &StorePath,
        nix_db: &Path,
    ) -> Result<Vec<String>, Error> {
        match outputs_from_db(&self.db, nix_db, drv) {
            Ok(outputs) if !outputs.is_empty() => return Ok(outputs),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(store_path = %drv, "database lookup failed, asking nix-store: {e}")
            }
        }
        Handle::current().block_on(outputs_from_nix_store(drv))
    }
}

fn outputs_from_db(
    cache: &Mutex<Option<OpenDb>>,
    db: &Path,
    drv: &StorePath,
) -> Result<Vec<String>, Error> {
    with_db(cache, db, |connection| {
        sqlite::derivation_outputs(connection, drv)
    })
}

fn sizes_in_db(
    cache: &Mutex<Option<OpenDb>>,
    db: &Path,
    paths: &[StorePath],
) -> Result<HashMap<StorePath, u64>, Error> {
    with_db(cache, db, |connection| {
        let mut sizes = HashMap::new();
        for path in paths {
            if let Some(size) = sqlite::nar_size(connection, path)? {
                sizes.insert(path.clone(), size);
            }
        }
        Ok(sizes)
    })
}

fn invalid_in_db(
    cache: &Mutex<Option<OpenDb>>,
    db: &Path,
    paths: &[StorePath],
) -> Result<Vec<StorePath>, Error> {
    with_db(cache, db, |connection| {
        let mut invalid = Vec::new();
        for path in paths {
            if !sqlite::is_valid(connection, path)? {
                invalid.push(path.clone());
            }
        }
        Ok(invalid)
    })
}

/// Runs `query` on the cached read-only connection to `db`, opening it first if needed.
fn with_db<T>(
    cache: &Mutex<Option<OpenDb>>,
    db: &Path,
    query: impl FnOnce(&Connection) -> Result<T, super::Error>,
) -> Result<T, Error> {
    let db_error = |source| Error::Db {
        db: db.display().to_string(),
        source: Box::new(source),
    };
    // A panic while querying leaves at worst no cached connection.
    let mut cached = cache.lock().unwrap_or_else(PoisonError::into_inner);
    let open = match cached.take() {
        Some(open) if open.path == db => open,
        _ => OpenDb {
            path: db.to_owned(),
            connection: sqlite::open_read_only(db, BUSY_TIMEOUT)
                .map_err(|e| db_error(super::Error::Query(e)))?,
        },
    };
    let answer = query(&open.connection).map_err(db_error)?;
    // Kept only after a successful query, so a connection that went bad is reopened next time.
    *cached = Some(open);
    Ok(answer)
}

async fn invalid_from_nix_store(paths: &[StorePath]) -> Result<Vec<StorePath>, Error> {
    let mut args = vec!["--check-validity", "--print-invalid"];
    args.extend(paths.iter().map(StorePath::as_str));
    let printed = nix_store(&args).await?;
    Ok(paths
        .iter()
        .filter(|p| printed.iter().any(|line| line == p.as_str()))
        .cloned()
        .collect())
}

async fn outputs_from_nix_store(drv: &StorePath) -> Result<Vec<String>, Error> {
    nix_store(&["--query", "--outputs", drv.as_str()]).await
}

/// Runs `nix-store ARGS` with a timeout; its non-empty stdout lines.
async fn nix_store(args: &[&str]) -> Result<Vec<String>, Error> {
    let run = tokio::process::Command::new("nix-store")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(NIX_STORE_TIMEOUT, run)
        .await
        .map_err(|_| {
            Error::NixStore(format!(
                "`nix-store {}` gave no answer within {} s",
                args[0],
                NIX_STORE_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| Error::NixStore(e.to_string()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(Error::NixStore(format!(
            "`nix-store {}`: {}: {}",
            args[0],
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

/// Creates (or extends) a Nix-like database at `db` in which `paths` are valid.
#[cfg(test)]
pub(crate) fn register_for_tests(db: &Path, paths: &[&str]) {
    let connection = Connection::open(db).unwrap();
    connection
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS ValidPaths (id integer primary key, path text unique not null);
             CREATE TABLE IF NOT EXISTS DerivationOutputs (drv integer, id text, path text);",
        )
        .unwrap();
    for path in paths {
        connection
            .execute(
                "INSERT OR IGNORE INTO ValidPaths (path) VALUES (?1)",
                [path],
            )
            .unwrap();
    }
}
