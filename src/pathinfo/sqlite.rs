//! The primary source: Nix's SQLite database, read-only.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension as _};

use super::{parse_hash, parse_path, Error, PathInfo};
use crate::store_path::StorePath;

/// How long to wait when Nix holds a write lock on the database.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens the database read-only and checks it has the tables and columns used here.
pub(super) fn open(db_path: &Path) -> Result<Connection, Error> {
    let open_error = |source| Error::Open {
        db: db_path.display().to_string(),
        source,
    };
    let conn = open_read_only(db_path, BUSY_TIMEOUT).map_err(open_error)?;
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
    Ok(conn)
}

/// Opens the database read-only, waiting up to `busy_timeout` while Nix holds a write lock. Lazy: nothing is
/// read until the first query.
pub(super) fn open_read_only(
    db_path: &Path,
    busy_timeout: std::time::Duration,
) -> Result<Connection, rusqlite::Error> {
    // A URI so that `mode=ro` applies.
    let uri = format!("file:{}?mode=ro", uri_escape(&db_path.to_string_lossy()));
    let conn = Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    Ok(conn)
}

/// Escapes the characters that would end or alter an SQLite URI's path.
fn uri_escape(path: &str) -> String {
    path.replace('%', "%25")
        .replace('?', "%3f")
        .replace('#', "%23")
}

/// Whether `path` has a `ValidPaths` row.
pub(super) fn is_valid(conn: &Connection, path: &StorePath) -> Result<bool, Error> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM ValidPaths WHERE path = ?1")?;
    Ok(stmt.exists([path.as_str()])?)
}

/// The recorded NAR size of `path` (0 when Nix left it NULL), or `None` when it is not valid.
pub(super) fn nar_size(conn: &Connection, path: &StorePath) -> Result<Option<u64>, Error> {
    let mut stmt = conn.prepare_cached("SELECT narSize FROM ValidPaths WHERE path = ?1")?;
    let size: Option<Option<i64>> = stmt
        .query_row([path.as_str()], |row| row.get(0))
        .optional()?;
    Ok(size.map(|s| s.and_then(|s| u64::try_from(s).ok()).unwrap_or(0)))
}

/// The `DerivationOutputs` rows of `drv`, ordered by output name; empty if it has none.
pub(super) fn derivation_outputs(conn: &Connection, drv: &StorePath) -> Result<Vec<String>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT o.path FROM DerivationOutputs o JOIN ValidPaths v ON v.id = o.drv \
         WHERE v.path = ?1 ORDER BY o.id",
    )?;
    let paths = stmt
        .query_map([drv.as_str()], |row| row.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(paths)
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

impl Row {
    /// Columns [`Row::read`] takes: `id, hash, registrationTime, deriver, narSize, ultimate, sigs, ca`.
    const COLUMNS: usize = 8;

    /// The row from the first [`Row::COLUMNS`] columns of a `ValidPaths` query.
    fn read(r: &rusqlite::Row<'_>) -> Result<Row, rusqlite::Error> {
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
    }
}

pub(super) fn query(
    conn: &Connection,
    store_dir: &str,
    path: &str,
) -> Result<Option<PathInfo>, Error> {
    let mut info_stmt = conn.prepare_cached(
        "SELECT id, hash, registrationTime, deriver, narSize, ultimate, sigs, ca \
         FROM ValidPaths WHERE path = ?1",
    )?;
    let row = info_stmt.query_row([path], Row::read).optional()?;
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

pub(super) fn closure(
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
        "{CLOSURE} SELECT v.id, v.hash, v.registrationTime, v.deriver, v.narSize, v.ultimate, v.sigs, v.ca, \
         v.path FROM c JOIN ValidPaths v ON v.id = c.id"
    ))?;
    let mut by_id: HashMap<i64, PathInfo> = HashMap::new();
    let mut rows = rows_stmt.query([&roots_json])?;
    while let Some(r) = rows.next()? {
        let row = Row::read(r)?;
        let path: String = r.get(Row::COLUMNS)?;
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
