//! The `[target]` table and each `[targets.NAME]`: what one cache is, its defaults, and the checks of its keys.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{
    accepted_query_parameters, check_patterns, default_workers, redact_url, Compression, Error,
    DEFAULT_CACHIX_API,
};
use crate::byte_size::ByteSize;

/// The `[target]` table.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Target {
    /// `file:///dir`, `http(s)://host/prefix`, `s3://bucket?region=…&endpoint=…`, or `cachix://name`.
    pub url: String,
    /// NAR compression.
    pub compression: Compression,
    /// Compression level; the method's default when unset.
    pub compression_level: Option<i32>,
    /// Secret key in Nix's `name:base64` format (or Cachix's bare base64) used to sign narinfos.
    pub signing_key_file: Option<PathBuf>,
    /// More secret keys (Nix's `name:base64`); each adds its own signature to every narinfo and realisation.
    pub signing_key_files: Vec<PathBuf>,
    /// Re-sign paths the target already has when their narinfo lacks a signature by our keys (narinfo only, the
    /// NAR is not sent again).
    pub resign_existing: bool,
    /// Upload the build log of each derivation whose outputs are pushed, to `log/<drv>`.
    pub upload_logs: bool,
    /// Write `<hash>.ls` NAR listings, as Nix's `write-nar-listing=true` does.
    pub write_nar_listing: bool,
    /// `Priority` written to a `nix-cache-info` that nixpush creates (lower is preferred by Nix).
    pub priority: Option<u32>,
    /// `WantMassQuery` written to a `nix-cache-info` that nixpush creates.
    pub want_mass_query: Option<bool>,
    /// Bearer token (HTTP, Cachix). Re-read when the file changes.
    pub auth_token_file: Option<PathBuf>,
    /// Parallel uploads. Defaults to the number of CPUs.
    pub workers: Option<usize>,
    /// Attempts before a path is parked as failed.
    pub max_attempts: u32,
    /// Delay scale of a path's first retry, in milliseconds; each later retry may wait twice as long, up to five
    /// minutes (full jitter, see `upload::retry`). Lower it only for a local target or in tests.
    pub retry_base_ms: u64,
    /// Cachix API base for `cachix://` targets.
    pub cachix_api: String,
    /// Multipart part size in bytes (Cachix, S3).
    pub part_size: u64,
    /// Per-request timeout towards the target, in seconds (covers idle time, not the whole body).
    pub timeout_secs: u64,
    /// Glob patterns: when any is given, only paths that match one are pushed to this target.
    pub include: Vec<String>,
    /// Glob patterns of paths never pushed to this target, besides the top-level `exclude`. Exclusion wins
    /// over `include`.
    pub exclude: Vec<String>,
    /// Paths whose NAR is larger are not pushed to this target: bytes, or a size such as `"2GiB"`.
    pub max_nar_size: Option<ByteSize>,
    /// Push a path even when a reference of it is filtered out and neither the target nor an upstream has it.
    /// Nix then refuses to substitute that path unless the reference comes from somewhere else.
    pub allow_incomplete_closures: bool,
    /// Upload rate outside every `rate_schedule` window, over all workers (`"4MiB/s"`, `"unlimited"`); see
    /// [`crate::rate_schedule`] for the units.
    pub max_upload_rate: crate::rate_schedule::Rate,
    /// Local-time windows with a rate of their own (`{ from = "09:00", to = "18:00", rate = "512KiB/s" }`); a rate
    /// of `"0"` holds uploads.
    pub rate_schedule: Vec<crate::rate_schedule::RateWindow>,
}

impl Default for Target {
    fn default() -> Target {
        Target {
            url: String::new(),
            compression: Compression::Zstd,
            compression_level: None,
            signing_key_file: None,
            signing_key_files: Vec::new(),
            resign_existing: false,
            upload_logs: false,
            write_nar_listing: false,
            priority: None,
            want_mass_query: None,
            auth_token_file: None,
            workers: None,
            max_attempts: 10,
            retry_base_ms: 1000,
            cachix_api: DEFAULT_CACHIX_API.to_owned(),
            part_size: 32 * 1024 * 1024,
            timeout_secs: 60,
            include: Vec::new(),
            exclude: Vec::new(),
            max_nar_size: None,
            allow_incomplete_closures: false,
            max_upload_rate: crate::rate_schedule::Rate::Unlimited,
            rate_schedule: Vec::new(),
        }
    }
}

impl fmt::Debug for Target {
    // Only file paths are held here, never secrets, but keep Debug explicit so a secret field added later
    // cannot leak by derive.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("url", &redact_url(&self.url))
            .field("compression", &self.compression)
            .field("compression_level", &self.compression_level)
            .field("signing_key_file", &self.signing_key_file)
            .field("signing_key_files", &self.signing_key_files)
            .field("resign_existing", &self.resign_existing)
            .field("upload_logs", &self.upload_logs)
            .field("write_nar_listing", &self.write_nar_listing)
            .field("priority", &self.priority)
            .field("want_mass_query", &self.want_mass_query)
            .field("auth_token_file", &self.auth_token_file)
            .field("workers", &self.workers)
            .field("max_attempts", &self.max_attempts)
            .field("retry_base_ms", &self.retry_base_ms)
            .field("cachix_api", &self.cachix_api)
            .field("part_size", &self.part_size)
            .field("timeout_secs", &self.timeout_secs)
            .field("include", &self.include)
            .field("exclude", &self.exclude)
            .field("max_nar_size", &self.max_nar_size)
            .field("allow_incomplete_closures", &self.allow_incomplete_closures)
            .field("max_upload_rate", &self.max_upload_rate)
            .field("rate_schedule", &self.rate_schedule)
            .finish()
    }
}

impl Target {
    /// Whether no `url` is set: a `[target]` table left out because `[targets.NAME]` names every target.
    pub fn is_unset(&self) -> bool {
        self.url.is_empty()
    }

    /// Checks values that parse but cannot work; errors name the key below `table` (`target`, `targets.NAME`).
    pub fn validate(&self, table: &str) -> Result<(), Error> {
        let field = |key: &str| format!("{table}.{key}");
        let invalid = |key: &str, problem: &str| Error::Invalid {
            field: field(key),
            problem: problem.to_owned(),
        };
        let scheme = self.url.split("://").next().unwrap_or_default();
        if !self.url.contains("://")
            || !matches!(scheme, "file" | "http" | "https" | "s3" | "cachix")
        {
            return Err(invalid(
                "url",
                &format!(
                    "has unsupported scheme in {:?}; use file://, http(s)://, s3:// or cachix://",
                    redact_url(&self.url)
                ),
            ));
        }
        self.validate_url(scheme, table)
            .map_err(|problem| invalid("url", &problem))?;
        if self.workers == Some(0) {
            return Err(invalid("workers", "must be greater than 0"));
        }
        if self.max_attempts == 0 {
            return Err(invalid("max_attempts", "must be greater than 0"));
        }
        if self.retry_base_ms == 0 {
            return Err(invalid("retry_base_ms", "must be greater than 0"));
        }
        if let Some(level) = self.compression_level {
            let range = match self.compression {
                Compression::Zstd => 1..=19,
                Compression::Xz => 0..=9,
                Compression::None => 0..=0,
            };
            if !range.contains(&level) {
                return Err(invalid(
                    "compression_level",
                    &format!(
                        "{level} is out of range {}..={} for {}",
                        range.start(),
                        range.end(),
                        self.compression.narinfo_name()
                    ),
                ));
            }
        }
        if self.part_size < 5 * 1024 * 1024 {
            return Err(invalid("part_size", "must be at least 5 MiB (5242880)"));
        }
        if self.timeout_secs == 0 {
            return Err(invalid("timeout_secs", "must be greater than 0"));
        }
        if self.resign_existing
            && self.signing_key_file.is_none()
            && self.signing_key_files.is_empty()
        {
            return Err(invalid(
                "resign_existing",
                &format!(
                    "needs a key to sign with: set {} or {}",
                    field("signing_key_file"),
                    field("signing_key_files")
                ),
            ));
        }
        crate::rate_schedule::validate(&self.rate_schedule)
            .map_err(|problem| invalid("rate_schedule", &problem))?;
        check_patterns(&field("include"), &self.include)?;
        check_patterns(&field("exclude"), &self.exclude)
    }

    /// `file://` URLs name an absolute directory; no URL carries a query parameter nixpush would ignore.
    fn validate_url(&self, scheme: &str, table: &str) -> Result<(), String> {
        let url = &self.url;
        let shown = redact_url(url);
        let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
        let accepted = accepted_query_parameters(scheme);
        for (key, _) in url::form_urlencoded::parse(query.as_bytes()) {
            if !accepted.contains(&key.as_ref()) {
                let known = if accepted.is_empty() {
                    format!("{scheme}:// URLs take no query parameters")
                } else {
                    format!("{scheme}:// URLs take only {}", accepted.join(", "))
                };
                return Err(format!(
                    "{shown:?} has the query parameter {key:?}, which nixpush does not use ({known}); \
                     other settings belong in [{table}], e.g. compression = \"xz\""
                ));
            }
        }
        if scheme == "file" {
            let parsed =
                url::Url::parse(url).map_err(|e| format!("{shown:?} is not a valid URL: {e}"))?;
            let host = parsed.host_str().unwrap_or("");
            if !(host.is_empty() || host == "localhost") || parsed.to_file_path().is_err() {
                return Err(format!(
                    "{shown:?} is not an absolute directory: a file:// URL needs an absolute path, \
                     e.g. file:///var/cache/nix (three slashes)"
                ));
            }
        }
        Ok(())
    }

    /// This target with its URL's password removed and the worker count and compression level filled in.
    pub(super) fn effective(&self) -> Target {
        Target {
            url: redact_url(&self.url),
            workers: Some(self.workers.unwrap_or_else(default_workers)),
            compression_level: Some(
                self.compression_level
                    .unwrap_or_else(|| self.compression.default_level()),
            ),
            ..self.clone()
        }
    }

    /// `max_nar_size` in bytes; `None` when unset. (A size that does not parse is refused when the file is read.)
    pub fn max_nar_size_bytes(&self) -> Option<u64> {
        self.max_nar_size.map(|size| size.0)
    }
}
