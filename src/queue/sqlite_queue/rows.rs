//! The `target_entries` rows of this view's target: read one, read a page, read every target's, write one.

use rusqlite::{params, Connection, OptionalExtension as _};

use super::{checksum, decode, encode, Inner, SqliteQueue};
use crate::queue::{Entry, Error};
use crate::store_path::StorePath;

impl SqliteQueue {
    pub(super) fn read_entry(
        &self,
        connection: &Connection,
        path: &StorePath,
    ) -> Result<Option<Entry>, Error> {
        let row: Option<(String, i64)> = connection
            .prepare_cached(
                "SELECT record, checksum FROM target_entries WHERE target = ?1 AND path = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![self.target, path.as_str()], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()
            })
            .map_err(self.error("reading an entry"))?;
        row.map(|(record, sum)| decode(path.as_str(), &record, sum))
            .transpose()
    }

    pub(super) fn read_entries(
        &self,
        connection: &Connection,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, Error> {
        let mut statement = connection
            .prepare_cached(
                "SELECT path, record, checksum FROM target_entries WHERE target = ?1 AND path > ?2
                 ORDER BY path LIMIT ?3",
            )
            .map_err(self.error("reading entries"))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = statement
            .query_map(params![self.target, after.unwrap_or(""), limit], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get(2)?,
                ))
            })
            .map_err(self.error("reading entries"))?;
        let mut out = Vec::new();
        for row in rows {
            let (key, record, sum) = row.map_err(self.error("reading entries"))?;
            out.push(decode(&key, &record, sum)?);
        }
        Ok(out)
    }

    /// Every target's entries, as (target, entry), in target and path order.
    pub(super) fn read_every_target(
        &self,
        connection: &Connection,
    ) -> Result<Vec<(String, Entry)>, Error> {
        let mut statement = connection
            .prepare_cached(
                "SELECT target, path, record, checksum FROM target_entries ORDER BY target, path",
            )
            .map_err(self.error("reading entries"))?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get(3)?,
                ))
            })
            .map_err(self.error("reading entries"))?;
        let mut out = Vec::new();
        for row in rows {
            let (target, key, record, sum) = row.map_err(self.error("reading entries"))?;
            out.push((target, decode(&key, &record, sum)?));
        }
        Ok(out)
    }

    /// Writes `new` in place of `old`; the caller holds the lock.
    pub(super) fn replace(
        &self,
        inner: &mut Inner,
        old: Option<&Entry>,
        new: &Entry,
    ) -> Result<(), Error> {
        self.begin(inner)?;
        let record = encode(new);
        inner
            .connection
            .prepare_cached(
                "INSERT INTO target_entries (target, path, record, checksum) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(target, path) DO UPDATE SET record = excluded.record, checksum = excluded.checksum",
            )
            .and_then(|mut s| {
                s.execute(params![
                    self.target,
                    new.path.as_str(),
                    record,
                    checksum(&record)
                ])
            })
            .map_err(self.error("writing an entry"))?;
        let index = self.index_mut(inner);
        if let Some(old) = old {
            index.remove(old);
        }
        index.add(new);
        self.wrote();
        Ok(())
    }
}
