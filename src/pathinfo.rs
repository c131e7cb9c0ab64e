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
//! Why SQLite first, measured with `benches/closure_info.sh` (2 shared cores, Nix 2.8, a closure of 3,000 paths
//! with 9,000 references): the whole closure, topologically sorted, takes about 50 ms from SQLite (two recursive
//! queries in one read transaction) against about 240 ms for `nix path-info --json --recursive` alone and 350 ms
//! for the fallback that runs it and parses its JSON. One `nix-store --query` process per path (about 30 ms
//! each) would take over a minute. Speaking the daemon protocol would also work without root, but costs a protocol implementation for a
//! fallback that `nix path-info` already covers.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension as _};
use serde::Deserialize;

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

/// What Nix recorded about one valid store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The path.
    pub path: StorePath,
    /// SHA-256 of its NAR.
    pub nar_hash: Sha256Hash,
    /// Size of its NAR.
    pub nar_size: u64,
    /// References, sorted, self-reference included.
    pub references: Vec<StorePath>,
    /// The derivation that built it, if known.
    pub deriver: Option<StorePath>,
    /// Signatures (`name:base64`) Nix already holds for it.
    pub sigs: Vec<String>,
    /// Content-address assertion, for content-addressed paths.
    pub ca: Option<String>,
    /// When it became valid, in Unix seconds.
    pub registration_time: i64,
    /// Whether it was built locally (Nix's "ultimate" flag).
    pub ultimate: bool,
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
    NixCommand,
}

/// How long to wait when Nix holds a write lock on the database.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
                Ok(LocalStore::open_nix_command(store_dir))
            }
        }
    }

    /// Opens the database read-only and checks it has the tables and columns used here. No fallback.
    pub fn open_sqlite(store_dir: &str, db_path: &Path) -> Result<LocalStore, Error> {
        let open_error = |source| Error::Open {
            db: db_path.display().to_string(),
            source,
        };
        let uri = format!("file:{}?mode=ro", uri_escape(&db_path.to_string_lossy()));
        let conn = Connection::open_with_flags(
            uri,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_error)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
        // Opening is lazy: these fail now if the file is unreadable or the schema is not what we expect.
        for probe in [
            "SELECT id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca FROM ValidPaths LIMIT 1",
            "SELECT referrer, reference FROM Refs LIMIT 1",
            "SELECT drv, id, path FROM DerivationOutputs LIMIT 1",
        ] {
            conn.prepare(probe)
                .and_then(|mut s| s.exists([]).map(|_| ()))
                .map_err(open_error)?;
        }
        Ok(LocalStore {
            store_dir: store_dir.trim_end_matches('/').to_owned(),
            source: Source::Sqlite(Mutex::new(conn)),
        })
    }

    /// Uses `nix path-info` for every query (what [`LocalStore::open`] falls back to).
    pub fn open_nix_command(store_dir: &str) -> LocalStore {
        LocalStore {
            store_dir: store_dir.trim_end_matches('/').to_owned(),
            source: Source::NixCommand,
        }
    }

    /// Whether queries go to the database (`true`) or to the `nix` command.
    pub fn uses_database(&self) -> bool {
        matches!(self.source, Source::Sqlite(_))
    }

    /// What the store recorded about `path`; `None` if it is not valid.
    pub fn query(&self, path: &StorePath) -> Result<Option<PathInfo>, Error> {
        match &self.source {
            Source::Sqlite(conn) => {
                let conn = lock(conn);
                sql_query(&conn, &self.store_dir, path.as_str())
            }
            Source::NixCommand => Ok(self
                .nix_path_info(std::slice::from_ref(path), false)?
                .into_iter()
                .find(|(p, _)| p == path.as_str())
                .and_then(|(_, info)| info)),
        }
    }

    /// Whether `path` is valid (registered and not garbage-collected).
    pub fn is_valid(&self, path: &StorePath) -> Result<bool, Error> {
        match &self.source {
            Source::Sqlite(conn) => {
                let conn = lock(conn);
                let mut stmt = conn.prepare_cached("SELECT 1 FROM ValidPaths WHERE path = ?1")?;
                Ok(stmt.exists([path.as_str()])?)
            }
            Source::NixCommand => Ok(self.query(path)?.is_some()),
        }
    }

    /// The closure of `roots` (the roots and everything they reference, recursively), sorted so that every path
    /// comes after all of its references (self-references aside). Among paths whose references are all placed,
    /// the smallest path string goes first, so the order is deterministic. A root that is not valid is
    /// [`Error::NotValid`].
    pub fn closure(&self, roots: &[StorePath]) -> Result<Vec<PathInfo>, Error> {
        let infos = match &self.source {
            Source::Sqlite(conn) => {
                let mut conn = lock(conn);
                // One read transaction: a consistent snapshot even while Nix registers new paths.
                let tx = conn.transaction()?;
                let infos = sql_closure(&tx, &self.store_dir, roots)?;
                tx.finish()?;
                infos
            }
            Source::NixCommand => self.nix_closure(roots)?,
        };
        topo_sort(infos)
    }

    /// The output paths of the derivation `drv`, by output name. From the `DerivationOutputs` table when the
    /// derivation is registered there, else from the `.drv` file itself. The outputs need not be valid (yet).
    pub fn derivation_outputs(&self, drv: &StorePath) -> Result<Vec<StorePath>, Error> {
        if let Source::Sqlite(conn) = &self.source {
            let conn = lock(conn);
            let mut stmt = conn.prepare_cached(
                "SELECT o.path FROM DerivationOutputs o JOIN ValidPaths v ON v.id = o.drv \
                 WHERE v.path = ?1 ORDER BY o.id",
            )?;
            let paths = stmt
                .query_map([drv.as_str()], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            if !paths.is_empty() {
                return paths
                    .iter()
                    .map(|p| parse_path(&self.store_dir, drv.as_str(), "DerivationOutputs.path", p))
                    .collect();
            }
        }
        Ok(derivation::read(drv.as_path())?.output_paths(&self.store_dir)?)
    }

    fn nix_closure(&self, roots: &[StorePath]) -> Result<Vec<PathInfo>, Error> {
        if roots.is_empty() {
            return Ok(Vec::new());
        }
        // `--recursive` fails as a whole on an invalid root; find out which one first.
        let listed = self.nix_path_info(roots, false)?;
        for root in roots {
            if !listed
                .iter()
                .any(|(p, info)| p == root.as_str() && info.is_some())
            {
                return Err(Error::NotValid(root.clone()));
            }
        }
        Ok(self
            .nix_path_info(roots, true)?
            .into_iter()
            .filter_map(|(_, info)| info)
            .collect())
    }

    /// Runs `nix path-info --json`: each path it lists (sorted, not in argument order), with `None` for an
    /// invalid one.
    fn nix_path_info(
        &self,
        paths: &[StorePath],
        recursive: bool,
    ) -> Result<Vec<(String, Option<PathInfo>)>, Error> {
        let mut cmd = Command::new("nix");
        cmd.args([
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            // Never try to download a path that is missing: report it as invalid.
            "--option",
            "substitute",
            "false",
        ]);
        if recursive {
            cmd.arg("--recursive");
        }
        cmd.args(paths.iter().map(StorePath::as_str));
        let command = format!(
            "nix path-info --json{} {}",
            if recursive { " --recursive" } else { "" },
            paths.first().map(StorePath::as_str).unwrap_or_default()
        ) + if paths.len() > 1 { " …" } else { "" };
        let output = cmd.output().map_err(|e| Error::Command {
            command: command.clone(),
            reason: e.to_string(),
        })?;
        if !output.status.success() {
            return Err(Error::Command {
                command,
                reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        let entries: Vec<CliPathInfo> =
            serde_json::from_slice(&output.stdout).map_err(|e| Error::Command {
                command: command.clone(),
                reason: format!("unexpected JSON: {e}"),
            })?;
        entries
            .into_iter()
            .map(|e| Ok((e.path.clone(), e.into_path_info(&self.store_dir)?)))
            .collect()
    }
}

fn lock(conn: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // A panic while holding the lock cannot leave a read-only connection inconsistent, so recover the guard.
    conn.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Escapes the characters that would end or alter an SQLite URI's path.
fn uri_escape(path: &str) -> String {
    path.replace('%', "%25")
        .replace('?', "%3f")
        .replace('#', "%23")
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

struct Row {
    id: i64,
    hash: String,
    registration_time: i64,
    deriver: Option<String>,
    nar_size: Option<i64>,
    ultimate: Option<i64>,
    sigs: Option<String>,
    ca: Option<String>,
}

fn sql_query(conn: &Connection, store_dir: &str, path: &str) -> Result<Option<PathInfo>, Error> {
    let mut info_stmt = conn.prepare_cached(
        "SELECT id, hash, registrationTime, deriver, narSize, ultimate, sigs, ca \
         FROM ValidPaths WHERE path = ?1",
    )?;
    let row = info_stmt
        .query_row([path], |r| {
            Ok(Row {
                id: r.get(0)?,
                hash: r.get(1)?,
                registration_time: r.get(2)?,
                deriver: r.get(3)?,
                nar_size: r.get(4)?,
                ultimate: r.get(5)?,
                sigs: r.get(6)?,
                ca: r.get(7)?,
            })
        })
        .optional()?;
    let Some(row) = row else {
        return Ok(None);
    };
    let mut refs_stmt = conn.prepare_cached(
        "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference WHERE r.referrer = ?1",
    )?;
    let mut references = refs_stmt
        .query_map([row.id], |r| r.get::<_, String>(0))?
        .map(|p| parse_path(store_dir, path, "Refs", &p?))
        .collect::<Result<Vec<_>, Error>>()?;
    references.sort();
    Ok(Some(path_info(store_dir, path, row, references)?))
}

/// Builds a [`PathInfo`] from a `ValidPaths` row.
fn path_info(
    store_dir: &str,
    path: &str,
    row: Row,
    references: Vec<StorePath>,
) -> Result<PathInfo, Error> {
    let nar_size = row.nar_size.ok_or_else(|| Error::BadRecord {
        path: path.to_owned(),
        field: "narSize",
        reason: "NULL".to_owned(),
    })?;
    Ok(PathInfo {
        path: parse_path(store_dir, path, "path", path)?,
        nar_hash: parse_hash(path, "hash", &row.hash)?,
        nar_size: u64::try_from(nar_size).map_err(|_| Error::BadRecord {
            path: path.to_owned(),
            field: "narSize",
            reason: format!("negative: {nar_size}"),
        })?,
        references,
        deriver: row
            .deriver
            .filter(|d| !d.is_empty())
            .map(|d| parse_path(store_dir, path, "deriver", &d))
            .transpose()?,
        sigs: row
            .sigs
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
        ca: row.ca.filter(|c| !c.is_empty()),
        registration_time: row.registration_time,
        ultimate: row.ultimate.unwrap_or(0) != 0,
    })
}

fn sql_closure(
    conn: &Connection,
    store_dir: &str,
    roots: &[StorePath],
) -> Result<Vec<PathInfo>, Error> {
    let mut root_ids = Vec::with_capacity(roots.len());
    {
        let mut stmt = conn.prepare_cached("SELECT id FROM ValidPaths WHERE path = ?1")?;
        for root in roots {
            let id: Option<i64> = stmt.query_row([root.as_str()], |r| r.get(0)).optional()?;
            root_ids.push(id.ok_or_else(|| Error::NotValid(root.clone()))?);
        }
    }
    if root_ids.is_empty() {
        return Ok(Vec::new());
    }
    // Two recursive queries instead of two per path: the closure's rows, then its references by id.
    let roots_json = serde_json::Value::from(root_ids).to_string();
    const CLOSURE: &str = "WITH RECURSIVE c(id) AS (SELECT value FROM json_each(?1) \
                           UNION SELECT r.reference FROM Refs r JOIN c ON r.referrer = c.id) ";
    let mut rows_stmt = conn.prepare(&format!(
        "{CLOSURE} SELECT v.id, v.path, v.hash, v.registrationTime, v.deriver, v.narSize, v.ultimate, \
         v.sigs, v.ca FROM c JOIN ValidPaths v ON v.id = c.id"
    ))?;
    let mut by_id: HashMap<i64, PathInfo> = HashMap::new();
    let mut rows = rows_stmt.query([&roots_json])?;
    while let Some(r) = rows.next()? {
        let path: String = r.get(1)?;
        let row = Row {
            id: r.get(0)?,
            hash: r.get(2)?,
            registration_time: r.get(3)?,
            deriver: r.get(4)?,
            nar_size: r.get(5)?,
            ultimate: r.get(6)?,
            sigs: r.get(7)?,
            ca: r.get(8)?,
        };
        by_id.insert(row.id, path_info(store_dir, &path, row, Vec::new())?);
    }
    let mut refs_stmt = conn.prepare(&format!(
        "{CLOSURE} SELECT r.referrer, r.reference FROM c JOIN Refs r ON r.referrer = c.id"
    ))?;
    let edges = refs_stmt
        .query_map([&roots_json], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (referrer, reference) in edges {
        // Both ends are in the closure by construction of the query.
        let Some(target) = by_id.get(&reference).map(|i| i.path.clone()) else {
            continue;
        };
        if let Some(info) = by_id.get_mut(&referrer) {
            info.references.push(target);
        }
    }
    Ok(by_id
        .into_values()
        .map(|mut info| {
            info.references.sort();
            info
        })
        .collect())
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

/// One element of `nix path-info --json` (Nix 2.8).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CliPathInfo {
    path: String,
    #[serde(default = "default_true")]
    valid: bool,
    nar_hash: Option<String>,
    nar_size: Option<u64>,
    #[serde(default)]
    references: Vec<String>,
    deriver: Option<String>,
    #[serde(default)]
    registration_time: i64,
    #[serde(default)]
    ultimate: bool,
    #[serde(default)]
    signatures: Vec<String>,
    ca: Option<String>,
}

fn default_true() -> bool {
    true
}

impl CliPathInfo {
    fn into_path_info(self, store_dir: &str) -> Result<Option<PathInfo>, Error> {
        if !self.valid {
            return Ok(None);
        }
        let owner = self.path.as_str();
        let missing = |field| Error::BadRecord {
            path: owner.to_owned(),
            field,
            reason: "missing".to_owned(),
        };
        let mut references = self
            .references
            .iter()
            .map(|r| parse_path(store_dir, owner, "references", r))
            .collect::<Result<Vec<_>, _>>()?;
        references.sort();
        Ok(Some(PathInfo {
            path: parse_path(store_dir, owner, "path", owner)?,
            nar_hash: parse_hash(
                owner,
                "narHash",
                self.nar_hash.as_deref().ok_or_else(|| missing("narHash"))?,
            )?,
            nar_size: self.nar_size.ok_or_else(|| missing("narSize"))?,
            references,
            deriver: self
                .deriver
                .as_deref()
                .map(|d| parse_path(store_dir, owner, "deriver", d))
                .transpose()?,
            sigs: self.signatures,
            ca: self.ca,
            registration_time: self.registration_time,
            ultimate: self.ultimate,
        }))
    }
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
    fn cli_json_is_understood() {
        let json = r#"[{"path":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","narHash":"sha256-zzETFRezYM6wNACtur7sjSVJczygJMGi3LPN8lTPNrY=","narSize":400,"references":["/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","/nix/store/8pjibnycdlc071yls0gkbsb7l2ffmlgg-vec-dep"],"deriver":"/nix/store/n5yfvnmayipw3yksgvfs2vkkkq50fl4k-vec-top.drv","registrationTime":1795708037,"ultimate":true},
                       {"path":"/nix/store/00000000000000000000000000000000-nope","valid":false}]"#;
        let entries: Vec<CliPathInfo> = serde_json::from_str(json).unwrap();
        let infos: Vec<_> = entries
            .into_iter()
            .map(|e| e.into_path_info("/nix/store").unwrap())
            .collect();
        let top = infos[0].as_ref().unwrap();
        assert_eq!(
            top.nar_hash.to_string(),
            "sha256:1dinrxag5kdkvjic29507irlj9cdxjzbmb806jqcwq5k2wai6cfg"
        );
        assert_eq!(top.references[0].name(), "vec-dep");
        assert!(top.ultimate && top.sigs.is_empty() && top.ca.is_none());
        assert!(infos[1].is_none());
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
