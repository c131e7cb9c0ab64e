//! What the local Nix store recorded about a path: NarHash, NarSize, references, deriver, signatures, CA; and
//! whole closures in dependency order.
//!
//! The source is Nix's SQLite database, opened read-only (`file:/nix/var/nix/db/db.sqlite?mode=ro`):
//!
//! ```text
//! ValidPaths(id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca)
//!   hash = "sha256:cf31131517b360ceb03400adbabeec8d2549733ca024c1a2dcb3cdf254cf36b6" (hex, not base32)
//! Refs(referrer, reference)            -- ValidPaths ids, self-references included
//! DerivationOutputs(drv, id, path)     -- a .drv's outputs by name
//! ```
//!
//! When the database cannot be read (nixpush not running as root), it falls back to asking Nix:
//! `nix path-info --json [--recursive]`, with substitution off so a missing path never triggers a download.
//!
//! Why SQLite first, measured with `benches/closure_info.sh` on a closure of 3,000 paths with 8,990 references
//! (Nix 2.8, 2 cores shared with other builds, so expect some noise): `closure()` took 45–115 ms from SQLite (two
//! recursive queries in one read transaction, then the sort), and a whole process printing the result 50–170 ms
//! (mean 100 ms). `nix path-info --json --recursive` alone took 260–340 ms (mean 313 ms), and the fallback that
//! runs it and parses its JSON 290–780 ms (mean 400 ms). One `nix-store --query` process per path (35–100 ms
//! each here) would take minutes. Speaking the daemon protocol would also work without root, but costs a
//! protocol implementation for a fallback that `nix path-info` already covers.

mod nix_command;
mod realisations;
pub mod registry;
mod sqlite;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;

use rusqlite::Connection;

use crate::derivation;
use crate::hash::Sha256Hash;
use crate::nar;
use crate::store_path::StorePath;

/// Why path info could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be opened or has an unexpected schema.
    #[error("cannot read the Nix database {db}: {source}")]
    Open {
        /// The database file.
        db: String,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// A query failed.
    #[error("cannot query the Nix database: {0}")]
    Query(#[from] rusqlite::Error),
    /// Running `nix` failed or it printed something unexpected.
    #[error("`{command}` failed: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// Its stderr or what was wrong with its output.
        reason: String,
    },
    /// The store recorded something nixpush cannot use (a malformed hash or path).
    #[error("Nix recorded an unusable {field} for {path}: {reason}")]
    BadRecord {
        /// The store path the record belongs to.
        path: String,
        /// The column or JSON key.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A root asked for is not a valid path in the store.
    #[error("path '{0}' is not valid")]
    NotValid(StorePath),
    /// The references form a cycle between distinct paths, so no upload order exists.
    #[error("cycle detected in the references of {0}")]
    Cycle(StorePath),
    /// Recomputing a NAR failed.
    #[error(transparent)]
    Nar(#[from] nar::Error),
    /// A derivation could not be read.
    #[error(transparent)]
    Derivation(#[from] derivation::Error),
}

/// What Nix recorded about one valid store path: its `ValidPaths` row, field for column in the table's order
/// (`path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca`), then its `Refs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The path.
    pub path: StorePath,
    /// SHA-256 of its NAR.
    pub nar_hash: Sha256Hash,
    /// When it became valid, in Unix seconds.
    pub registration_time: i64,
    /// The derivation that built it, if known.
    pub deriver: Option<StorePath>,
    /// Size of its NAR.
    pub nar_size: u64,
    /// Whether it was built locally (Nix's "ultimate" flag).
    pub ultimate: bool,
    /// Signatures (`name:base64`) Nix already holds for it.
    pub sigs: Vec<String>,
    /// Content-address assertion, for content-addressed paths.
    pub ca: Option<String>,
    /// References, sorted, self-reference included.
    pub references: Vec<StorePath>,
}

impl PathInfo {
    /// Checks a NAR hash and size computed from the path's bytes against what Nix recorded.
    pub fn check_nar(&self, computed: Sha256Hash, computed_size: u64) -> Result<(), nar::Error> {
        nar::check_recorded(
            &self.path,
            (self.nar_hash, self.nar_size),
            (computed, computed_size),
        )
    }
}

/// The result of [`verify_path`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// The contents hash to what Nix recorded.
    Ok {
        /// The NAR hash.
        nar_hash: Sha256Hash,
        /// The NAR size.
        nar_size: u64,
    },
    /// The contents changed after Nix registered the path.
    Corrupt {
        /// The hash Nix recorded.
        recorded: Sha256Hash,
        /// The hash of the contents now.
        computed: Sha256Hash,
        /// The size Nix recorded.
        recorded_size: u64,
        /// The NAR size of the contents now.
        computed_size: u64,
    },
    /// The store has no record of the path.
    NotValid,
}

/// Recomputes `path`'s NAR hash and size and compares them with what the store recorded.
pub fn verify_path(store: &LocalStore, path: &StorePath) -> Result<VerifyOutcome, Error> {
    let Some(info) = store.query(path)? else {
        return Ok(VerifyOutcome::NotValid);
    };
    let (computed, computed_size) = nar::dump_hash(path.as_path())?;
    Ok(match info.check_nar(computed, computed_size) {
        Ok(()) => VerifyOutcome::Ok {
            nar_hash: computed,
            nar_size: computed_size,
        },
        Err(_) => VerifyOutcome::Corrupt {
            recorded: info.nar_hash,
            computed,
            recorded_size: info.nar_size,
            computed_size,
        },
    })
}

/// Read access to the local store's metadata. `Send + Sync`; queries are serialized on one connection.
pub struct LocalStore {
    store_dir: String,
    source: Source,
}

enum Source {
    Sqlite(Mutex<Connection>),
    /// The database was not readable at open: the `nix` command, and the database again every
    /// [`DB_RETRY_INTERVAL`], since an unreadable database is often a passing state (locked, being replaced).
    NixCommand {
        db_path: Option<std::path::PathBuf>,
        reopened: std::sync::OnceLock<Mutex<Connection>>,
        next_try: Mutex<std::time::Instant>,
    },
}

/// How often a store that fell back to the `nix` command tries the database again.
const DB_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

impl LocalStore {
    /// Opens the store: the database at `db_path` read-only when it is readable, else the `nix` command.
    pub fn open(store_dir: &str, db_path: &Path) -> Result<LocalStore, Error> {
        match LocalStore::open_sqlite(store_dir, db_path) {
            Ok(store) => Ok(store),
            Err(e) => {
                tracing::info!(
                    db = %db_path.display(),
                    error = %e,
                    "cannot read the Nix database directly; asking `nix path-info` instead"
                );
                let mut store = LocalStore::open_nix_command(store_dir);
                if let Source::NixCommand { db_path: retry, .. } = &mut store.source {
                    *retry = Some(db_path.to_owned());
                }
                Ok(store)
            }
        }
    }

    /// Opens the database read-only and checks it has the tables and columns used here. No fallback.
    pub fn open_sqlite(store_dir: &str, db_path: &Path) -> Result<LocalStore, Error> {
        let conn = sqlite::open(db_path)?;
        Ok(LocalStore {
            store_dir: store_dir.trim_end_matches('/').to_owned(),
            source: Source::Sqlite(Mutex::new(conn)),
        })
    }

    /// Uses `nix path-info` for every query (what [`LocalStore::open`] falls back to).
    pub fn open_nix_command(store_dir: &str) -> LocalStore {
        LocalStore {
            store_dir: store_dir.trim_end_matches('/').to_owned(),
            source: Source::NixCommand {
                db_path: None,
                reopened: std::sync::OnceLock::new(),
                next_try: Mutex::new(std::time::Instant::now()),
            },
        }
    }

    /// The database connection, if the database is (or has become) readable.
    fn database(&self) -> Option<std::sync::MutexGuard<'_, Connection>> {
        match &self.source {
            Source::Sqlite(conn) => Some(lock(conn)),
            Source::NixCommand {
                db_path: Some(db_path),
                reopened,
                next_try,
            } => {
                if let Some(conn) = reopened.get() {
                    return Some(lock(conn));
                }
                let mut next = next_try
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = std::time::Instant::now();
                if now < *next {
                    return None;
                }
                *next = now + DB_RETRY_INTERVAL;
                let conn = sqlite::open(db_path).ok()?;
                tracing::info!(db = %db_path.display(), "the Nix database is readable again; using it");
                let _ = reopened.set(Mutex::new(conn));
                reopened.get().map(lock)
            }
            Source::NixCommand { db_path: None, .. } => None,
        }
    }

    /// The store directory, e.g. `/nix/store`.
    pub fn store_dir(&self) -> &str {
        &self.store_dir
    }

    /// Whether queries go to the database (`true`) or to the `nix` command.
    pub fn uses_database(&self) -> bool {
        self.database().is_some()
    }

    /// What the store recorded about `path`; `None` if it is not valid.
    pub fn query(&self, path: &StorePath) -> Result<Option<PathInfo>, Error> {
        match self.database() {
            Some(conn) => sqlite::query(&conn, &self.store_dir, path.as_str()),
            None => Ok(
                nix_command::path_info(&self.store_dir, std::slice::from_ref(path), false)?
                    .into_iter()
                    .find(|(p, _)| p == path.as_str())
                    .and_then(|(_, info)| info),
            ),
        }
    }

    /// Whether `path` is valid (registered and not garbage-collected).
    pub fn is_valid(&self, path: &StorePath) -> Result<bool, Error> {
        match self.database() {
            Some(conn) => sqlite::is_valid(&conn, path),
            None => Ok(self.query(path)?.is_some()),
        }
    }

    /// The closure of `roots` (the roots and everything they reference, recursively), sorted so that every path
    /// comes after all of its references (self-references aside). Among paths whose references are all placed,
    /// the smallest path string goes first, so the order is deterministic. A root that is not valid is
    /// [`Error::NotValid`].
    pub fn closure(&self, roots: &[StorePath]) -> Result<Vec<PathInfo>, Error> {
        let infos = match self.database() {
            Some(mut conn) => {
                // One read transaction: a consistent snapshot even while Nix registers new paths.
                let tx = conn.transaction()?;
                let infos = sqlite::closure(&tx, &self.store_dir, roots)?;
                tx.finish()?;
                infos
            }
            None => nix_command::closure(&self.store_dir, roots)?,
        };
        topo_sort(infos)
    }

    /// The output paths of the derivation `drv`, by output name. From the `DerivationOutputs` table when the
    /// derivation is registered there, else from the `.drv` file itself. The outputs need not be valid (yet).
    pub fn derivation_outputs(&self, drv: &StorePath) -> Result<Vec<StorePath>, Error> {
        if let Some(conn) = self.database() {
            let paths = sqlite::derivation_outputs(&conn, drv)?;
            if !paths.is_empty() {
                return paths
                    .iter()
                    .map(|p| parse_path(&self.store_dir, drv.as_str(), "DerivationOutputs.path", p))
                    .collect();
            }
        }
        Ok(derivation::read(drv.as_path())?.output_paths(&self.store_dir)?)
    }

    /// The realisations (content-addressed derivation outputs) whose output is `path`, with the signatures Nix
    /// holds. Only the database records them; without it (no root) there are none to push.
    pub fn realisations(
        &self,
        path: &StorePath,
    ) -> Result<Vec<crate::realisation::Realisation>, Error> {
        match self.database() {
            Some(conn) => realisations::of_output(&conn, path),
            None => Ok(Vec::new()),
        }
    }
}

fn lock(conn: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // A panic while holding the lock cannot leave a read-only connection inconsistent, so recover the guard.
    conn.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn parse_path(
    store_dir: &str,
    owner: &str,
    field: &'static str,
    value: &str,
) -> Result<StorePath, Error> {
    StorePath::parse(value, store_dir).map_err(|e| Error::BadRecord {
        path: owner.to_owned(),
        field,
        reason: e.to_string(),
    })
}

fn parse_hash(owner: &str, field: &'static str, value: &str) -> Result<Sha256Hash, Error> {
    Sha256Hash::parse(value).map_err(|e| Error::BadRecord {
        path: owner.to_owned(),
        field,
        reason: e.to_string(),
    })
}

/// Kahn's algorithm, always taking the smallest ready path.
fn topo_sort(mut infos: Vec<PathInfo>) -> Result<Vec<PathInfo>, Error> {
    // Index order is path order, so the smallest ready index is the smallest ready path.
    infos.sort_by(|a, b| a.path.cmp(&b.path));
    infos.dedup_by(|a, b| a.path == b.path);
    let index: HashMap<&str, usize> = infos
        .iter()
        .enumerate()
        .map(|(i, info)| (info.path.as_str(), i))
        .collect();
    let mut unmet = vec![0usize; infos.len()];
    let mut referrers: Vec<Vec<usize>> = vec![Vec::new(); infos.len()];
    for (i, info) in infos.iter().enumerate() {
        for r in &info.references {
            match index.get(r.as_str()) {
                Some(&j) if j != i => {
                    unmet[i] += 1;
                    referrers[j].push(i);
                }
                _ => {}
            }
        }
    }
    let mut ready: BTreeSet<usize> = (0..infos.len()).filter(|&i| unmet[i] == 0).collect();
    let mut order = Vec::with_capacity(infos.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &referrer in &referrers[i] {
            unmet[referrer] -= 1;
            if unmet[referrer] == 0 {
                ready.insert(referrer);
            }
        }
    }
    if order.len() < infos.len() {
        // The smallest path left over lies on or behind a cycle.
        let stuck = (0..infos.len()).find(|&i| unmet[i] > 0).unwrap_or(0);
        return Err(Error::Cycle(infos[stuck].path.clone()));
    }
    let mut slots: Vec<Option<PathInfo>> = infos.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(name: &str) -> StorePath {
        StorePath::parse(&format!("/nix/store/{name}"), "/nix/store").unwrap()
    }

    fn info(path: &StorePath, refs: &[&StorePath]) -> PathInfo {
        let mut references: Vec<StorePath> = refs.iter().map(|r| (*r).clone()).collect();
        references.sort();
        PathInfo {
            path: path.clone(),
            nar_hash: Sha256Hash([0; 32]),
            nar_size: 8,
            references,
            deriver: None,
            sigs: vec![],
            ca: None,
            registration_time: 0,
            ultimate: false,
        }
    }

    #[test]
    fn topo_sort_puts_references_first_deterministically() {
        let a = sp("0000000000000000000000000000000a-a");
        let b = sp("0000000000000000000000000000000b-b");
        let c = sp("0000000000000000000000000000000c-c");
        let d = sp("0000000000000000000000000000000d-d");
        // a -> {c, a}, b -> {d}, d -> {c}; c, d independent of a.
        let infos = vec![
            info(&d, &[&c]),
            info(&a, &[&c, &a]),
            info(&b, &[&d]),
            info(&c, &[]),
        ];
        let order: Vec<_> = topo_sort(infos)
            .unwrap()
            .into_iter()
            .map(|i| i.path)
            .collect();
        assert_eq!(order, [c.clone(), a.clone(), d.clone(), b.clone()]);
    }

    #[test]
    fn topo_sort_reports_cycles() {
        let a = sp("0000000000000000000000000000000a-a");
        let b = sp("0000000000000000000000000000000b-b");
        let infos = vec![info(&a, &[&b]), info(&b, &[&a])];
        assert!(matches!(topo_sort(infos), Err(Error::Cycle(p)) if p == a));
    }

    #[test]
    fn unreadable_database_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        std::fs::write(&db, b"not a database").unwrap();
        let err = LocalStore::open_sqlite("/nix/store", &db).err().unwrap();
        assert!(err.to_string().contains("db.sqlite"), "{err}");
        let store = LocalStore::open("/nix/store", &db).unwrap();
        assert!(!store.uses_database());
    }

    #[test]
    fn local_store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<LocalStore>();
    }
}
