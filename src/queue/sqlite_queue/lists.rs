//! The bounded lists (`history` per target, `refused` for the daemon) and the counters in `meta`.

use rusqlite::{params, Connection, OptionalExtension as _};
use serde::Serialize;

use super::{checksum, decode, encode, Inner, SqliteQueue, REFUSED_TOTAL_KEY, TOTALS_KEY};
use crate::config::DEFAULT_TARGET;
use crate::queue::{Error, HistoryRecord, RefusedRecord, Totals, HISTORY_CAP, REFUSED_CAP};

impl SqliteQueue {
    /// Appends to a bounded list table and trims its oldest rows: `history` per target, `refused` as a whole.
    pub(super) fn append_bounded(
        &self,
        inner: &mut Inner,
        table: &'static str,
        cap: usize,
        record: &str,
    ) -> Result<(), Error> {
        self.begin(inner)?;
        let connection = &inner.connection;
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        if table == "history" {
            connection
                .execute(
                    "INSERT INTO history (record, checksum, target) VALUES (?1, ?2, ?3)",
                    params![record, checksum(record), self.target],
                )
                .map_err(self.error("appending to a list"))?;
            connection
                .execute(
                    "DELETE FROM history WHERE target = ?1 AND id NOT IN
                     (SELECT id FROM history WHERE target = ?1 ORDER BY id DESC LIMIT ?2)",
                    params![self.target, cap],
                )
                .map_err(self.error("trimming a list"))?;
        } else {
            connection
                .execute(
                    &format!("INSERT INTO {table} (record, checksum) VALUES (?1, ?2)"),
                    params![record, checksum(record)],
                )
                .map_err(self.error("appending to a list"))?;
            connection
                .execute(
                    &format!("DELETE FROM {table} WHERE id <= (SELECT max(id) FROM {table}) - ?1"),
                    [cap],
                )
                .map_err(self.error("trimming a list"))?;
        }
        Ok(())
    }

    pub(super) fn newest<T: serde::de::DeserializeOwned>(
        &self,
        table: &'static str,
        limit: usize,
    ) -> Result<Vec<T>, Error> {
        let inner = self.lock();
        // Only `history` is kept per target; every view sees the one list of refusals.
        let (filter, target) = match table {
            "history" => ("target = ?2", self.target.as_str()),
            _ => ("?2 = ?2", ""),
        };
        let mut statement = inner
            .connection
            .prepare_cached(&format!(
                "SELECT id, record, checksum FROM {table} WHERE {filter} ORDER BY id DESC LIMIT ?1"
            ))
            .map_err(self.error("reading a list"))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = statement
            .query_map(params![limit, target], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get(2)?))
            })
            .map_err(self.error("reading a list"))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, record, sum) = row.map_err(self.error("reading a list"))?;
            out.push(decode(&format!("{table}/{id}"), &record, sum)?);
        }
        Ok(out)
    }

    /// The key of this target's totals in `meta` (the `default` target keeps the key of older queues).
    pub(super) fn totals_key(&self) -> String {
        if self.target == DEFAULT_TARGET {
            TOTALS_KEY.to_owned()
        } else {
            format!("{TOTALS_KEY}:{}", self.target)
        }
    }

    pub(super) fn read_meta<T: serde::de::DeserializeOwned + Default>(
        &self,
        connection: &Connection,
        key: &str,
    ) -> Result<T, Error> {
        let row: Option<(String, i64)> = connection
            .query_row(
                "SELECT record, checksum FROM meta WHERE key = ?1",
                [key],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(self.error("reading a counter"))?;
        match row {
            Some((record, sum)) => decode(key, &record, sum),
            None => Ok(T::default()),
        }
    }

    pub(super) fn write_meta<T: Serialize>(
        &self,
        connection: &Connection,
        key: &str,
        value: &T,
    ) -> Result<(), Error> {
        let record = encode(value);
        connection
            .execute(
                "INSERT INTO meta (key, record, checksum) VALUES (?1, ?2, ?3)
                 ON CONFLICT(key) DO UPDATE SET record = excluded.record, checksum = excluded.checksum",
                params![key, record, checksum(&record)],
            )
            .map_err(self.error("writing a counter"))?;
        Ok(())
    }

    /// Adds imported history, refusals and totals (from an older queue) without counting them as this run's.
    pub fn import_records(
        &self,
        history: &[HistoryRecord],
        refused: &[RefusedRecord],
        totals: Totals,
        refused_total: u64,
    ) -> Result<(), Error> {
        let mut inner = self.lock();
        for record in history {
            self.append_bounded(&mut inner, "history", HISTORY_CAP, &encode(record))?;
        }
        for record in refused {
            self.append_bounded(&mut inner, "refused", REFUSED_CAP, &encode(record))?;
        }
        self.write_meta(&inner.connection, &self.totals_key(), &totals)?;
        self.write_meta(&inner.connection, REFUSED_TOTAL_KEY, &refused_total)?;
        self.wrote();
        Ok(())
    }
}
