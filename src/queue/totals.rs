//! All-time and since-start counters of one target's finished paths: one count per [`Outcome`] and the byte
//! sums of uploads. Stored in `meta` as one JSON object keyed by the outcomes' own names, for example
//! `{"uploaded":3,"skipped_upstream":1,"nar_bytes":4096,"file_bytes":1024}` (an absent key is zero), so a new
//! outcome is counted without a new field here or a migration of stored counters.

use std::collections::BTreeMap;

use serde::de::value::StrDeserializer;
use serde::de::IntoDeserializer;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{HistoryRecord, Outcome};

const NAR_BYTES: &str = "nar_bytes";
const FILE_BYTES: &str = "file_bytes";

/// Counters of finished paths and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Paths finished with each outcome, indexed by `Outcome as usize`.
    paths: [u64; Outcome::ALL.len()],
    /// Uncompressed NAR bytes uploaded.
    pub nar_bytes: u64,
    /// Compressed bytes uploaded.
    pub file_bytes: u64,
}

impl Totals {
    /// Paths finished with `outcome`.
    pub fn paths(&self, outcome: Outcome) -> u64 {
        self.paths[outcome as usize]
    }

    /// Adds one finished path.
    pub fn add(&mut self, record: &HistoryRecord) {
        self.paths[record.outcome as usize] += 1;
        if record.outcome == Outcome::Uploaded {
            self.nar_bytes += record.nar_size.unwrap_or(0);
            self.file_bytes += record.file_size.unwrap_or(0);
        }
    }
}

impl Serialize for Totals {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.paths.len() + 2))?;
        for outcome in Outcome::ALL {
            map.serialize_entry(&outcome, &self.paths(outcome))?;
        }
        map.serialize_entry(NAR_BYTES, &self.nar_bytes)?;
        map.serialize_entry(FILE_BYTES, &self.file_bytes)?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for Totals {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Totals, D::Error> {
        let mut totals = Totals::default();
        for (key, count) in BTreeMap::<String, u64>::deserialize(deserializer)? {
            match key.as_str() {
                NAR_BYTES => totals.nar_bytes = count,
                FILE_BYTES => totals.file_bytes = count,
                // A key this version does not know (a newer outcome) is left alone, as serde does for fields.
                name => {
                    let name: StrDeserializer<'_, serde::de::value::Error> =
                        name.into_deserializer();
                    if let Ok(outcome) = Outcome::deserialize(name) {
                        totals.paths[outcome as usize] = count;
                    }
                }
            }
        }
        Ok(totals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store_path::StorePath;

    fn finished(outcome: Outcome, nar_size: u64) -> HistoryRecord {
        HistoryRecord {
            path: StorePath::parse(
                "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top",
                "/nix/store",
            )
            .unwrap(),
            outcome,
            nar_size: Some(nar_size),
            file_size: Some(nar_size / 2),
            duration_ms: 0,
            reason: None,
            finished_at_ms: 1,
        }
    }

    #[test]
    fn counts_each_outcome_and_the_bytes_of_uploads_only() {
        let mut totals = Totals::default();
        totals.add(&finished(Outcome::Uploaded, 100));
        totals.add(&finished(Outcome::Uploaded, 50));
        totals.add(&finished(Outcome::AlreadyPresent, 7));
        totals.add(&finished(Outcome::HeldBack, 9));
        assert_eq!(totals.paths(Outcome::Uploaded), 2);
        assert_eq!(totals.paths(Outcome::AlreadyPresent), 1);
        assert_eq!(totals.paths(Outcome::HeldBack), 1);
        assert_eq!(totals.paths(Outcome::Failed), 0);
        assert_eq!((totals.nar_bytes, totals.file_bytes), (150, 75));
    }

    /// The stored form is the one older versions wrote (a field per outcome), so their counters carry over.
    #[test]
    fn reads_and_writes_the_stored_form() {
        let stored = r#"{"uploaded":3,"already_present":4,"skipped_upstream":5,"excluded":6,"skipped_gone":7,"failed":8,"nar_bytes":9,"file_bytes":10,"held_back":11}"#;
        let totals: Totals = serde_json::from_str(stored).unwrap();
        let expected = [3, 4, 5, 6, 7, 8, 11];
        for (outcome, count) in Outcome::ALL.into_iter().zip(expected) {
            assert_eq!(totals.paths(outcome), count, "{outcome:?}");
        }
        assert_eq!((totals.nar_bytes, totals.file_bytes), (9, 10));
        let again: Totals = serde_json::from_str(&serde_json::to_string(&totals).unwrap()).unwrap();
        assert_eq!(again, totals);
    }

    #[test]
    fn absent_and_unknown_keys_are_zero_and_ignored() {
        let totals: Totals =
            serde_json::from_str(r#"{"uploaded":2,"some_later_outcome":5}"#).unwrap();
        assert_eq!(totals.paths(Outcome::Uploaded), 2);
        assert_eq!(totals.paths(Outcome::Failed), 0);
        assert_eq!(
            serde_json::from_str::<Totals>("{}").unwrap(),
            Totals::default()
        );
    }
}
