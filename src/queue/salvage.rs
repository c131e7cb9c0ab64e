//! What can still be read from a damaged queue file: whole records where SQLite can read their rows and their
//! checksums match, and, from the raw bytes, every store path that appears as a record's `"path"`. Re-queueing a
//! path that was already done costs one presence check; losing one costs a missing build in the cache, so the
//! byte scan errs on the side of finding too much.

use std::collections::BTreeSet;
use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::sqlite_queue::checksum;
use super::Entry;
use crate::store_path::StorePath;

/// What a salvage found.
#[derive(Debug, Default)]
pub struct Salvaged {
    /// Entries read whole, with their state and their target's name.
    pub entries: Vec<(String, Entry)>,
    /// Store paths found in the raw bytes (whole entries included).
    pub paths: BTreeSet<StorePath>,
    /// Rows SQLite could not read or whose checksum did not match.
    pub unreadable_rows: u64,
    /// Why the structured read stopped early, if it did.
    pub read_error: Option<String>,
}

/// Reads what it can from `files` (a database and its write-ahead log) under the store directory `store_dir`.
pub fn salvage(db: &Path, files: &[&Path], store_dir: &str) -> Salvaged {
    let mut salvaged = Salvaged::default();
    read_rows(db, store_dir, &mut salvaged);
    for file in files {
        if let Ok(bytes) = std::fs::read(file) {
            salvaged.paths.extend(scan_paths(&bytes, store_dir));
        }
    }
    salvaged
        .paths
        .extend(salvaged.entries.iter().map(|(_, e)| e.path.clone()));
    salvaged
}

fn read_rows(db: &Path, store_dir: &str, salvaged: &mut Salvaged) {
    let connection = match Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE) {
        Ok(connection) => connection,
        Err(e) => {
            salvaged.read_error = Some(e.to_string());
            return;
        }
    };
    // The table of this queue, or of one from before targets had names (whose entries are the `default`
    // target's).
    let legacy = connection
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'entries'",
            [],
            |row| row.get::<_, i64>(0),
        )
        .is_ok_and(|n| n > 0);
    let (table, target_column) = if legacy {
        ("entries", "'default'")
    } else {
        (super::ENTRIES_TABLE, "target")
    };
    // Row by row, so a broken page costs the rows on it, not every row after it.
    let max_rowid: i64 =
        match connection.query_row(&format!("SELECT max(rowid) FROM {table}"), [], |row| {
            row.get::<_, Option<i64>>(0)
        }) {
            Ok(max) => max.unwrap_or(0),
            Err(e) => {
                salvaged.read_error = Some(e.to_string());
                // The table's root may be unreadable while its leaves are not; try a range anyway.
                100_000
            }
        };
    let Ok(mut statement) = connection.prepare(&format!(
        "SELECT path, record, checksum, {target_column} FROM {table} WHERE rowid = ?1"
    )) else {
        return;
    };
    let mut consecutive_errors = 0;
    for rowid in 1..=max_rowid {
        // Raw bytes, not text: a flipped byte may leave invalid UTF-8 in one column but not the other.
        let row = statement.query_row([rowid], |row| {
            Ok((
                String::from_utf8_lossy(row.get_ref(0)?.as_bytes()?).into_owned(),
                String::from_utf8(row.get_ref(1)?.as_bytes()?.to_vec()).ok(),
                row.get::<_, i64>(2)?,
                String::from_utf8(row.get_ref(3)?.as_bytes()?.to_vec()).ok(),
            ))
        });
        match row {
            Ok((path, record, sum, target)) => {
                consecutive_errors = 0;
                let entry = record
                    .filter(|record| checksum(record) == sum)
                    .and_then(|record| serde_json::from_str::<Entry>(&record).ok())
                    .filter(|e| e.path.as_str() == path);
                match (entry, target) {
                    (Some(entry), Some(target)) => salvaged.entries.push((target, entry)),
                    _ => {
                        salvaged.unreadable_rows += 1;
                        if let Ok(path) = StorePath::parse(&path, store_dir) {
                            salvaged.paths.insert(path);
                        }
                    }
                }
            }
            // Deleted rows leave gaps in the rowids.
            Err(rusqlite::Error::QueryReturnedNoRows) => {}
            Err(e) => {
                salvaged.unreadable_rows += 1;
                salvaged.read_error.get_or_insert_with(|| e.to_string());
                consecutive_errors += 1;
                if consecutive_errors > 1000 {
                    return;
                }
            }
        }
    }
}

/// Every `"path":"<store path>"` in `bytes`.
pub fn scan_paths(bytes: &[u8], store_dir: &str) -> BTreeSet<StorePath> {
    let needle = format!("\"path\":\"{store_dir}/");
    let needle = needle.as_bytes();
    let mut found = BTreeSet::new();
    let mut at = 0;
    while let Some(offset) = find(&bytes[at..], needle) {
        let start = at + offset + "\"path\":\"".len();
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'"')
            .map_or(bytes.len(), |n| start + n);
        if let Ok(text) = std::str::from_utf8(&bytes[start..end]) {
            if let Ok(path) = StorePath::parse(text, store_dir) {
                found.insert(path);
            }
        }
        at = start;
    }
    found
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_paths_in_records_and_skips_broken_ones() {
        let good = "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top";
        let bytes = format!(
            "\0\0{{\"path\":\"{good}\",\"state\":\"queued\"}}\x07\x01{{\"path\":\"/nix/store/short\"}}\
             {{\"path\":\"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxx"
        );
        let found = scan_paths(bytes.as_bytes(), "/nix/store");
        let found: Vec<&str> = found.iter().map(StorePath::as_str).collect();
        assert_eq!(found, vec![good]);
    }
}
