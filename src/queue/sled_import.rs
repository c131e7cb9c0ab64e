//! Reading the sled database that nixpush used before SQLite (`state_dir/queue/{conf,db,snap.*}`), once, so an
//! upgrade keeps every queued path, the history, the refusals and the totals. sled stays a dependency only for
//! this.

use std::path::{Path, PathBuf};

use super::{Entry, Error, HistoryRecord, RefusedRecord, Totals};

/// Everything the old queue held that is worth keeping ("present" answers are not: they are cheap to ask again).
#[derive(Debug, Default)]
pub struct SledContents {
    /// Queued, uploading and failed paths.
    pub entries: Vec<Entry>,
    /// Records that did not decode, by key.
    pub undecodable: Vec<String>,
    /// Finished paths, oldest first.
    pub history: Vec<HistoryRecord>,
    /// Refused requests, oldest first.
    pub refused: Vec<RefusedRecord>,
    /// All-time totals.
    pub totals: Totals,
    /// All-time refusals.
    pub refused_total: u64,
}

/// The files sled keeps in `dir`, if it has a sled database.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = read
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| n == "conf" || n == "db" || n == "blobs" || n.starts_with("snap."))
        })
        .collect();
    files.sort();
    if files.iter().any(|p| p.ends_with("db")) {
        files
    } else {
        Vec::new()
    }
}

/// Reads the sled database in `dir`.
pub fn read(dir: &Path) -> Result<SledContents, Error> {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(16 * 1024 * 1024)
        .open()
        .map_err(|source| Error::Open {
            path: dir.to_owned(),
            source,
        })?;
    let tree = |name: &str| {
        db.open_tree(name).map_err(|source| Error::Db {
            operation: "opening a tree of the old queue",
            source,
        })
    };
    let items = |name: &str| -> Result<Vec<(String, Vec<u8>)>, Error> {
        let mut out = Vec::new();
        for item in tree(name)?.iter() {
            let (key, value) = item.map_err(|source| Error::Db {
                operation: "reading the old queue",
                source,
            })?;
            out.push((String::from_utf8_lossy(&key).into_owned(), value.to_vec()));
        }
        Ok(out)
    };
    let mut contents = SledContents::default();
    for (key, value) in items("entries")? {
        match serde_json::from_slice(&value) {
            Ok(entry) => contents.entries.push(entry),
            Err(_) => contents.undecodable.push(key),
        }
    }
    contents.history = items("history")?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect();
    contents.refused = items("refused")?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect();
    for (key, value) in items("meta")? {
        match key.as_str() {
            "totals" => contents.totals = serde_json::from_slice(&value).unwrap_or_default(),
            "refused_total" => {
                contents.refused_total = <[u8; 8]>::try_from(value.as_slice())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0)
            }
            _ => {}
        }
    }
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store_path::StorePath;

    /// sled's background threads may hold the directory's lock for a moment after the writer's `Db` is dropped
    /// (the daemon reads an old queue only after the process that wrote it is gone), so the open is retried while
    /// it is refused for the lock alone.
    fn read_once_unlocked(dir: &Path) -> SledContents {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match read(dir) {
                Ok(contents) => return contents,
                Err(Error::Open { source, .. })
                    if source.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn reads_what_the_sled_queue_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = StorePath::parse(
            "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top",
            "/nix/store",
        )
        .unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let entry = Entry::new(path.clone(), "hook", 5);
            db.open_tree("entries")
                .unwrap()
                .insert(path.as_str(), serde_json::to_vec(&entry).unwrap())
                .unwrap();
            db.open_tree("entries")
                .unwrap()
                .insert("garbage", b"{".to_vec())
                .unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert("refused_total", &7u64.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        assert!(!files(dir.path()).is_empty());
        let contents = read_once_unlocked(dir.path());
        assert_eq!(contents.entries.len(), 1);
        assert_eq!(contents.entries[0].path, path);
        assert_eq!(contents.undecodable, vec!["garbage".to_owned()]);
        assert_eq!(contents.refused_total, 7);
    }
}
