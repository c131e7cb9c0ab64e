//! `nix-cache-info`, the document at the root of every binary cache, and how an existing one compares with the
//! configuration.
//!
//! ```text
//! StoreDir: /nix/store
//! WantMassQuery: 1
//! Priority: 30
//! ```
//!
//! nixpush writes it only where the target has none; one that differs from the configuration is reported by
//! `doctor` and left alone, because other writers or readers may rely on it.

use crate::config::Config;

/// The fields of `nix-cache-info` that nixpush knows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheInfo {
    /// `StoreDir`.
    pub store_dir: Option<String>,
    /// `WantMassQuery`.
    pub want_mass_query: Option<bool>,
    /// `Priority`.
    pub priority: Option<u32>,
}

impl CacheInfo {
    /// What nixpush writes for `config`.
    pub fn from_config(config: &Config) -> CacheInfo {
        CacheInfo {
            store_dir: Some(config.store_dir_str().to_owned()),
            want_mass_query: config.target.want_mass_query,
            priority: config.target.priority,
        }
    }

    /// The document, in the order Nix writes it.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Some(dir) = &self.store_dir {
            text.push_str(&format!("StoreDir: {dir}\n"));
        }
        if let Some(want) = self.want_mass_query {
            text.push_str(&format!("WantMassQuery: {}\n", u8::from(want)));
        }
        if let Some(priority) = self.priority {
            text.push_str(&format!("Priority: {priority}\n"));
        }
        text
    }

    /// Parses a document the way Nix does: `Key: value` lines, unknown keys and malformed lines ignored.
    pub fn parse(text: &str) -> CacheInfo {
        let mut info = CacheInfo::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "StoreDir" => info.store_dir = Some(value.to_owned()),
                "WantMassQuery" => info.want_mass_query = Some(value == "1"),
                "Priority" => info.priority = value.parse().ok(),
                _ => {}
            }
        }
        info
    }

    /// How `existing` differs from this wanted document, one sentence per field; a field this document leaves
    /// unset is not compared.
    pub fn differences(&self, existing: &CacheInfo) -> Vec<String> {
        let mut out = Vec::new();
        let show = |v: Option<String>| v.unwrap_or_else(|| "unset".to_owned());
        if self.store_dir.is_some() && existing.store_dir != self.store_dir {
            out.push(format!(
                "StoreDir is {} but the store is {}",
                show(existing.store_dir.clone()),
                show(self.store_dir.clone())
            ));
        }
        if self.want_mass_query.is_some() && existing.want_mass_query != self.want_mass_query {
            out.push(format!(
                "WantMassQuery is {} but target.want_mass_query asks for {}",
                show(existing.want_mass_query.map(|b| u8::from(b).to_string())),
                show(self.want_mass_query.map(|b| u8::from(b).to_string()))
            ));
        }
        if self.priority.is_some() && existing.priority != self.priority {
            out.push(format!(
                "Priority is {} but target.priority asks for {}",
                show(existing.priority.map(|p| p.to_string())),
                show(self.priority.map(|p| p.to_string()))
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_parses_what_nix_writes() {
        let info = CacheInfo {
            store_dir: Some("/nix/store".into()),
            want_mass_query: Some(true),
            priority: Some(30),
        };
        let text = info.render();
        assert_eq!(
            text,
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
        );
        assert_eq!(CacheInfo::parse(&text), info);
        assert!(info.differences(&CacheInfo::parse(&text)).is_empty());
    }

    #[test]
    fn differences_name_the_field() {
        let wanted = CacheInfo {
            store_dir: Some("/nix/store".into()),
            want_mass_query: None,
            priority: Some(30),
        };
        let existing = CacheInfo::parse("StoreDir: /nix/store\nPriority: 40\nWantMassQuery: 0\n");
        let diffs = wanted.differences(&existing);
        assert_eq!(diffs.len(), 1, "{diffs:?}");
        assert!(diffs[0].contains("Priority is 40") && diffs[0].contains("30"));
    }
}
