//! Realisations of content-addressed derivation outputs, from the tables Nix adds with `ca-derivations`:
//!
//! ```text
//! Realisations(id, drvPath, outputName, outputPath, signatures)
//!   drvPath = "sha256:c1a16cd3…aee7" (the derivation's hash modulo), outputPath = ValidPaths id
//! RealisationsRefs(referrer, realisationReference)   -- Realisations ids
//! ```
//!
//! A store that never enabled `ca-derivations` has no such tables, and so no realisations.

use rusqlite::{Connection, OptionalExtension as _};

use super::Error;
use crate::realisation::Realisation;
use crate::store_path::StorePath;

/// Every realisation whose output is `path` (a path can be the output of several derivations, e.g. the one
/// Nix evaluated and the resolved one it built).
pub(super) fn of_output(conn: &Connection, path: &StorePath) -> Result<Vec<Realisation>, Error> {
    let has_table: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'Realisations'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if has_table.is_none() {
        return Ok(Vec::new());
    }
    let mut rows_stmt = conn.prepare_cached(
        "SELECT r.id, r.drvPath, r.outputName, r.signatures FROM Realisations r \
         JOIN ValidPaths v ON v.id = r.outputPath WHERE v.path = ?1 ORDER BY r.id",
    )?;
    let rows = rows_stmt
        .query_map([path.as_str()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut deps_stmt = conn.prepare_cached(
        "SELECT d.drvPath, d.outputName, v.path FROM RealisationsRefs rr \
         JOIN Realisations d ON d.id = rr.realisationReference \
         JOIN ValidPaths v ON v.id = d.outputPath WHERE rr.referrer = ?1",
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for (id, drv_hash, output, sigs) in rows {
        let dependent_realisations = deps_stmt
            .query_map([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?
            .map(|row| {
                let (dep_hash, dep_output, dep_path) = row?;
                Ok((format!("{dep_hash}!{dep_output}"), base_name(&dep_path)))
            })
            .collect::<Result<_, Error>>()?;
        let mut signatures: Vec<String> = sigs
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        signatures.sort();
        out.push(Realisation {
            dependent_realisations,
            id: format!("{drv_hash}!{output}"),
            out_path: path.base_name().to_owned(),
            signatures,
        });
    }
    Ok(out)
}

fn base_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_owned()
}
