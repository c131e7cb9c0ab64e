//! The queue database's tables, and the move of a queue written before targets had names into them.

use std::path::Path;

use rusqlite::Connection;

use super::sqlite_queue::sqlite_error;
use super::Error;

pub(super) const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS target_entries (target TEXT NOT NULL, path TEXT NOT NULL, record TEXT NOT NULL,
        checksum INTEGER NOT NULL, PRIMARY KEY (target, path));
    CREATE TABLE IF NOT EXISTS present (hash_part TEXT PRIMARY KEY, until_ms INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS history (id INTEGER PRIMARY KEY, record TEXT NOT NULL, checksum INTEGER NOT NULL,
        target TEXT NOT NULL DEFAULT 'default');
    CREATE TABLE IF NOT EXISTS refused (id INTEGER PRIMARY KEY, record TEXT NOT NULL, checksum INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, record TEXT NOT NULL, checksum INTEGER NOT NULL);
";

/// Moves a queue written before targets had names (one `entries` table keyed by path, a history without a target)
/// into the current tables; its entries belong to the target named `default`. Idempotent, in one transaction.
const MIGRATE_UNNAMED: &str = "
    INSERT OR IGNORE INTO target_entries (target, path, record, checksum)
        SELECT 'default', path, record, checksum FROM entries;
    DROP TABLE entries;
";

/// Runs [`MIGRATE_UNNAMED`] when the database still has the `entries` table of a queue without named targets, and
/// gives an older `history` its `target` column; in one transaction.
pub(super) fn migrate_unnamed(path: &Path, connection: &Connection) -> Result<(), Error> {
    let has_table = |name: &str| -> Result<bool, Error> {
        connection
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [name],
                |row| row.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(sqlite_error(path, "reading the schema"))
    };
    let unnamed_entries = has_table("entries")?;
    let untargeted_history = has_table("history")?
        && connection
            .prepare("SELECT target FROM history LIMIT 0")
            .is_err();
    if !unnamed_entries && !untargeted_history {
        return Ok(());
    }
    let mut steps = format!("BEGIN IMMEDIATE; {SCHEMA}");
    if untargeted_history {
        steps.push_str("ALTER TABLE history ADD COLUMN target TEXT NOT NULL DEFAULT 'default';");
    }
    if unnamed_entries {
        steps.push_str(MIGRATE_UNNAMED);
    }
    steps.push_str("COMMIT;");
    connection.execute_batch(&steps).map_err(|e| {
        let _ = connection.execute_batch("ROLLBACK");
        sqlite_error(path, "moving the queue to per-target tables")(e)
    })
}
