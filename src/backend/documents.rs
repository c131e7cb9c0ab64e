//! The small documents of a complete binary cache besides NARs and narinfos, where they live, and what a target
//! cannot hold.
//!
//! ```text
//! <hash>.ls                                  NAR listing (JSON), Nix's `write-nar-listing=true`
//! log/<drv base name>                        build log, plain text, as `nix store copy-log` writes it
//! realisations/sha256:<drv hash>!out.doi     realisation of a content-addressed derivation output (JSON)
//! ```

use crate::store_path::StorePath;

/// A kind of document (or narinfo detail) a target may be unable to store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Document {
    /// `<hash>.ls`.
    NarListing,
    /// `log/<drv>`.
    BuildLog,
    /// `realisations/<id>.doi`.
    Realisation,
    /// `Priority` and `WantMassQuery` in `nix-cache-info`.
    CacheInfoFields,
    /// Signatures beyond the one the target verifies (kept from Nix's database, or from extra keys).
    ExtraSignatures,
    /// A new narinfo for a path already present, without sending its NAR again.
    Resign,
}

impl Document {
    /// The configuration key that asks for it.
    pub fn config_key(self) -> &'static str {
        match self {
            Document::NarListing => "target.write_nar_listing",
            Document::BuildLog => "target.upload_logs",
            Document::Realisation => "realisations (content-addressed outputs)",
            Document::CacheInfoFields => "target.priority / target.want_mass_query",
            Document::ExtraSignatures => {
                "target.signing_key_files and signatures kept from Nix's database"
            }
            Document::Resign => "target.resign_existing",
        }
    }
}

impl Document {
    /// Whether `config` asks for this document (so a target that cannot hold it deserves a warning).
    pub fn is_requested(self, config: &crate::config::Config) -> bool {
        let target = &config.target;
        match self {
            Document::NarListing => target.write_nar_listing,
            Document::BuildLog => target.upload_logs,
            // Realisations are pushed whenever Nix has them; nothing to switch on.
            Document::Realisation => false,
            Document::CacheInfoFields => {
                target.priority.is_some() || target.want_mass_query.is_some()
            }
            Document::ExtraSignatures => !target.signing_key_files.is_empty(),
            Document::Resign => target.resign_existing,
        }
    }

    /// A phrase for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Document::NarListing => "NAR listings",
            Document::BuildLog => "build logs",
            Document::Realisation => "realisations",
            Document::CacheInfoFields => "nix-cache-info fields",
            Document::ExtraSignatures => "more than one signature per narinfo",
            Document::Resign => "re-signing a narinfo without its NAR",
        }
    }
}

/// One line saying what a target cannot hold, or `None` when it holds everything.
pub fn cannot_store_note(cannot: &[Document], config: &crate::config::Config) -> Option<String> {
    if cannot.is_empty() {
        return None;
    }
    let listed: Vec<String> = cannot
        .iter()
        .map(|d| {
            if d.is_requested(config) {
                format!(
                    "{} (asked for by {}: ignored)",
                    d.describe(),
                    d.config_key()
                )
            } else {
                d.describe().to_owned()
            }
        })
        .collect();
    Some(format!(
        "this target's API cannot take {}",
        listed.join(", ")
    ))
}

/// A small document to store: its key in the cache, its content type and its bytes. The constructors give each
/// kind of document its one key and content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentBytes {
    /// Where it goes, relative to the cache root.
    pub key: String,
    /// What a web server should answer it as.
    pub content_type: &'static str,
    /// The document.
    pub bytes: Vec<u8>,
}

impl DocumentBytes {
    /// The NAR listing of `path`.
    pub fn listing(path: &StorePath, listing: &str) -> DocumentBytes {
        DocumentBytes {
            key: listing_key(path),
            content_type: LISTING_TYPE,
            bytes: listing.as_bytes().to_vec(),
        }
    }

    /// The build log of `drv`.
    pub fn build_log(drv: &StorePath, log: Vec<u8>) -> DocumentBytes {
        DocumentBytes {
            key: log_key(drv),
            content_type: LOG_TYPE,
            bytes: log,
        }
    }

    /// A realisation, at the key it names itself by.
    pub fn realisation(realisation: &crate::realisation::Realisation) -> DocumentBytes {
        DocumentBytes {
            key: realisation.key(),
            content_type: REALISATION_TYPE,
            bytes: realisation.to_json().into_bytes(),
        }
    }

    /// `nix-cache-info`.
    pub fn cache_info(text: String) -> DocumentBytes {
        DocumentBytes {
            key: "nix-cache-info".to_owned(),
            content_type: "text/x-nix-cache-info",
            bytes: text.into_bytes(),
        }
    }

    /// A narinfo, rendered.
    pub fn narinfo(narinfo: &crate::narinfo::NarInfo) -> DocumentBytes {
        DocumentBytes {
            key: narinfo_key(&narinfo.store_path),
            content_type: NARINFO_TYPE,
            bytes: narinfo.render().into_bytes(),
        }
    }
}

/// Content type of a NAR listing.
const LISTING_TYPE: &str = "application/json";
/// Content type of a build log (what Nix's `addBuildLog` sends).
const LOG_TYPE: &str = "text/plain; charset=utf-8";
/// Content type of a realisation.
const REALISATION_TYPE: &str = "application/json";
/// Content type of a narinfo.
const NARINFO_TYPE: &str = "text/x-nix-narinfo";

/// `<hash>.ls`.
fn listing_key(path: &StorePath) -> String {
    format!("{}.ls", path.hash_part())
}

/// `log/<drv base name>`.
fn log_key(drv: &StorePath) -> String {
    format!("log/{}", drv.base_name())
}

/// `realisations/<id>.doi`, `id` being `sha256:<hex>!<output>`.
pub fn realisation_key(id: &str) -> String {
    format!("realisations/{id}.doi")
}

/// `<hash>.narinfo`.
pub fn narinfo_key(path: &StorePath) -> String {
    format!("{}.narinfo", path.hash_part())
}

/// Whether `key` stays inside the cache: relative, no `..`, no empty segment. The engine builds every key from
/// validated store paths and hashes, so this only guards against a bug turning into a write elsewhere.
pub fn is_safe_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('/')
        && key
            .split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_inside() {
        assert!(is_safe_key("log/abc-hello.drv"));
        assert!(is_safe_key("realisations/sha256:00!out.doi"));
        for bad in ["", "/etc/passwd", "log/../../x", "log//x", "./x"] {
            assert!(!is_safe_key(bad), "{bad}");
        }
    }
}
