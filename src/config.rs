//! The configuration file: one TOML document, strict, with every default in [`Config::default`].
//!
//! ```toml
//! socket = "/run/nixpush/nixpush.sock"
//! state_dir = "/var/lib/nixpush"
//! upstream = ["https://cache.nixos.org"]
//! exclude = ["*-source", "*.drv"]
//!
//! [target]
//! url = "file:///var/cache/nix"
//! compression = "zstd"
//! signing_key_file = "/run/secrets/nix-signing-key"
//! ```
//!
//! Keys are snake_case because they are the interface every tool and test speaks. Secrets are never config
//! literals: only the paths of the files that hold them are.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::byte_size::ByteSize;

/// Where the daemon and the CLI look when neither `--config` nor `NIXPUSH_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nixpush/config.toml";
/// Socket path compiled into the hook and used when the config does not say otherwise.
pub const DEFAULT_SOCKET: &str = "/run/nixpush/nixpush.sock";
/// State directory (queue, spool) when the config does not say otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nixpush";
/// Where the daemon keeps its garbage-collector roots for queued paths when the config does not say otherwise.
pub const DEFAULT_GC_ROOTS_DIR: &str = "/nix/var/nix/gcroots/nixpush";
/// NAR bytes of rooted paths beyond which failed paths lose their roots, when the config does not say otherwise.
pub const DEFAULT_GC_ROOTS_MAX_BYTES: u64 = 20 << 30;
/// The Cachix API host used for `cachix://NAME` targets.
pub const DEFAULT_CACHIX_API: &str = "https://cachix.org";
/// The name of the `[target]` table's target, in `status`, metrics, `--target` and the queue.
pub const DEFAULT_TARGET: &str = "default";

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has unknown or mistyped keys. The message names the key and line.
    #[error("invalid configuration file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message, which names the key, line and column.
        message: String,
    },
    /// A value parsed but makes no sense.
    #[error("invalid configuration: `{field}` {problem}")]
    Invalid {
        /// Dotted key, e.g. `target.workers` or `targets.backup.url`.
        field: String,
        /// What is wrong, e.g. "must be greater than 0".
        problem: String,
    },
    /// [`Error::Invalid`], found at a line of a file.
    #[error("invalid configuration file {path}, line {line}: `{field}` {problem}")]
    InvalidAt {
        /// The file.
        path: PathBuf,
        /// The 1-based line where `field` is set.
        line: usize,
        /// Dotted key, e.g. `target.workers`.
        field: String,
        /// What is wrong.
        problem: String,
    },
}

impl Error {
    /// `self` with the line of `text` that sets its field, when it is an [`Error::Invalid`] and the line is found.
    pub fn at_line_of(self, text: &str, origin: &Path) -> Error {
        match self {
            Error::Invalid { field, problem } => match line_of(text, &field) {
                Some(line) => Error::InvalidAt {
                    path: origin.to_owned(),
                    line,
                    field,
                    problem,
                },
                None => Error::Invalid { field, problem },
            },
            other => other,
        }
    }
}

/// The 1-based line of `text` that sets the dotted key `field` (`target.url` is `url` under `[target]`). A plain
/// scan, good enough for naming a line in a message: tables are `[name]` headers, keys are `key = …` lines.
pub fn line_of(text: &str, field: &str) -> Option<usize> {
    let (table, key) = field.rsplit_once('.').unwrap_or(("", field));
    let mut current = String::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = header.trim().to_owned();
            continue;
        }
        let Some((name, _)) = line.split_once('=') else {
            continue;
        };
        let name = name.trim().trim_matches('"');
        let dotted = (table.is_empty() && current.is_empty() && name == key)
            || (current == table && name == key)
            || (current.is_empty() && !table.is_empty() && name == format!("{table}.{key}"));
        if dotted {
            return Some(number + 1);
        }
    }
    None
}

/// The query parameters nixpush reads from a target URL of `scheme`; any other one is a mistake.
pub fn accepted_query_parameters(scheme: &str) -> &'static [&'static str] {
    match scheme {
        "s3" => &["region", "endpoint", "scheme", "addressing", "profile"],
        "cachix" => &["api"],
        _ => &[],
    }
}

/// How NARs are compressed in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd, `.nar.zst`.
    #[default]
    Zstd,
    /// xz, `.nar.xz`.
    Xz,
    /// Uncompressed, `.nar`.
    None,
}

impl Compression {
    /// The narinfo `Compression:` value.
    pub fn narinfo_name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::None => "none",
        }
    }

    /// The NAR file extension, including the leading `.nar`.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => ".nar.zst",
            Compression::Xz => ".nar.xz",
            Compression::None => ".nar",
        }
    }

    /// The level used when `compression_level` is not set: zstd's and xz's own defaults.
    pub fn default_level(self) -> i32 {
        match self {
            Compression::Zstd => 3,
            Compression::Xz => 6,
            Compression::None => 0,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The hook socket the daemon listens on.
    pub socket: PathBuf,
    /// Permission bits of the socket, as an octal string. Enqueueing is still limited by peer credentials.
    pub socket_mode: String,
    /// Group that owns the socket, if not the daemon's own.
    pub socket_group: Option<String>,
    /// The sled queue and `spool/` live here.
    pub state_dir: PathBuf,
    /// The Nix store directory.
    pub store_dir: PathBuf,
    /// Nix's SQLite database, read read-only for path info.
    pub nix_db: PathBuf,
    /// Nix's log directory (`drvs/<2 chars>/<rest>.bz2` below it), read when `target.upload_logs` is set.
    pub nix_log_dir: PathBuf,
    /// Users besides root allowed to enqueue.
    pub allowed_users: Vec<String>,
    /// Groups whose members may enqueue.
    pub allowed_groups: Vec<String>,
    /// Binary caches whose paths are never uploaded. Empty turns upstream skipping off.
    pub upstream: Vec<String>,
    /// Glob patterns of store paths never pushed to any target (see [`crate::upload::filter`] for what they
    /// match); a target's own `exclude` adds to these.
    pub exclude: Vec<String>,
    /// How long a socket client may take to send its request, in milliseconds.
    pub client_timeout_ms: u64,
    /// How long "the target or an upstream has this path" is remembered, in seconds.
    pub present_ttl_secs: u64,
    /// CPU and I/O priority of NAR hashing and compression in the daemon; read at start.
    pub upload_priority: crate::priority::UploadPriority,
    /// Where the daemon serves Prometheus metrics at `/metrics`: `IP:PORT` (e.g. `127.0.0.1:9464`) or an absolute
    /// Unix socket path. Unset: nothing listens.
    pub metrics_listen: Option<String>,
    /// Directory of the symlinks that protect queued, uploading and failed paths from Nix's garbage collector
    /// (see [`crate::gc_roots`]). Empty turns roots off. Read at start.
    pub gc_roots_dir: PathBuf,
    /// NAR size of the rooted paths beyond which the oldest failed paths lose their roots.
    pub gc_roots_max_bytes: crate::byte_size::ByteSize,
    /// The cache everything is pushed to: the target named `default`. Unset (no `url`) when `targets` names them
    /// all.
    #[serde(skip_serializing_if = "Target::is_unset")]
    pub target: Target,
    /// More caches, each pushed to on its own (`[targets.NAME]`, with the keys of `[target]`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, Target>,
}

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

impl Default for Config {
    fn default() -> Config {
        Config {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: "0666".to_owned(),
            socket_group: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            store_dir: PathBuf::from("/nix/store"),
            nix_db: PathBuf::from("/nix/var/nix/db/db.sqlite"),
            nix_log_dir: PathBuf::from("/nix/var/log/nix"),
            allowed_users: Vec::new(),
            allowed_groups: Vec::new(),
            upstream: vec!["https://cache.nixos.org".to_owned()],
            exclude: Vec::new(),
            client_timeout_ms: 2_000,
            present_ttl_secs: 24 * 3600,
            upload_priority: crate::priority::UploadPriority::Idle,
            metrics_listen: None,
            gc_roots_dir: PathBuf::from(DEFAULT_GC_ROOTS_DIR),
            gc_roots_max_bytes: crate::byte_size::ByteSize(DEFAULT_GC_ROOTS_MAX_BYTES),
            target: Target::default(),
            targets: BTreeMap::new(),
        }
    }
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

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text; `origin` only names the source in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, Error> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Parse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.validate().map_err(|e| e.at_line_of(text, origin))?;
        Ok(config)
    }

    /// Checks values that parse but cannot work. Errors name the field.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |field: &str, problem: &str| Error::Invalid {
            field: field.to_owned(),
            problem: problem.to_owned(),
        };
        if self.target.is_unset() && self.targets.is_empty() {
            return Err(invalid(
                "target.url",
                "is required (file://, http(s)://, s3:// or cachix://), or name targets in [targets.NAME] tables",
            ));
        }
        if !self.target.is_unset() {
            self.target.validate("target")?;
        }
        for (name, target) in &self.targets {
            let table = format!("targets.{name}");
            if !valid_target_name(name) {
                return Err(invalid(
                    &table,
                    "has an invalid name: use letters, digits, `-` and `_`, starting with a letter",
                ));
            }
            if name == DEFAULT_TARGET && !self.target.is_unset() {
                return Err(invalid(
                    &table,
                    "names the target of the [target] table (`default`); give it another name",
                ));
            }
            if target.is_unset() {
                return Err(invalid(
                    &format!("{table}.url"),
                    "is required (file://, http(s)://, s3:// or cachix://)",
                ));
            }
            target.validate(&table)?;
        }
        if self.client_timeout_ms == 0 {
            return Err(invalid("client_timeout_ms", "must be greater than 0"));
        }
        self.socket_mode_bits()?;
        if let Some(listen) = &self.metrics_listen {
            crate::metrics::listen::Address::parse(listen)
                .map_err(|problem| invalid("metrics_listen", &problem))?;
        }
        for (field, path) in [
            ("socket", &self.socket),
            ("state_dir", &self.state_dir),
            ("store_dir", &self.store_dir),
        ] {
            if !path.is_absolute() {
                return Err(invalid(field, "must be an absolute path"));
            }
        }
        if self.store_dir.to_str().is_none() {
            return Err(invalid("store_dir", "must be valid UTF-8"));
        }
        if let Some(dir) = self.gc_roots_dir() {
            if !dir.is_absolute() {
                return Err(invalid(
                    "gc_roots_dir",
                    "must be an absolute path (or \"\" to turn GC roots off)",
                ));
            }
            if dir.starts_with(&self.store_dir) {
                return Err(invalid(
                    "gc_roots_dir",
                    "must not be inside the store directory; use a directory under /nix/var/nix/gcroots",
                ));
            }
        }
        check_patterns("exclude", &self.exclude)
    }

    /// The names of the configured targets: `default` for `[target]` (when set), then each `[targets.NAME]` in
    /// name order.
    pub fn target_names(&self) -> Vec<String> {
        let default = (!self.target.is_unset()).then(|| DEFAULT_TARGET.to_owned());
        default
            .into_iter()
            .chain(self.targets.keys().cloned())
            .collect()
    }

    /// The target named `name`, if configured.
    pub fn named_target(&self, name: &str) -> Option<&Target> {
        if name == DEFAULT_TARGET && !self.target.is_unset() {
            return Some(&self.target);
        }
        self.targets.get(name)
    }

    /// This configuration as one target's uploader sees it: `[target]` is the target named `name`, and no other
    /// target is named. Everything that builds an engine reads `config.target`, so each target gets its own.
    pub fn for_target(&self, name: &str) -> Option<Config> {
        let target = self.named_target(name)?.clone();
        Some(Config {
            target,
            targets: BTreeMap::new(),
            ..self.clone()
        })
    }

    /// Each configured target's view ([`Config::for_target`]), with its name.
    pub fn each_target(&self) -> Vec<(String, Config)> {
        self.target_names()
            .into_iter()
            .filter_map(|name| {
                let config = self.for_target(&name)?;
                Some((name, config))
            })
            .collect()
    }

    /// The name of the target whose URL is `url` (compared without any password), if one is configured.
    pub fn target_named_by_url(&self, url: &str) -> Option<String> {
        let shown = redact_url(url);
        self.target_names().into_iter().find(|name| {
            self.named_target(name)
                .is_some_and(|t| t.url == url || redact_url(&t.url) == shown)
        })
    }

    /// The socket mode as permission bits.
    pub fn socket_mode_bits(&self) -> Result<u32, Error> {
        let digits = self.socket_mode.trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(bits) if bits <= 0o777 => Ok(bits),
            _ => Err(Error::Invalid {
                field: "socket_mode".to_owned(),
                problem: format!(
                    "{:?} is not an octal mode such as \"0660\"",
                    self.socket_mode
                ),
            }),
        }
    }

    /// The store directory as a string (validated UTF-8).
    pub fn store_dir_str(&self) -> &str {
        self.store_dir.to_str().unwrap_or("/nix/store")
    }

    /// The GC roots directory, or `None` when `gc_roots_dir = ""` turns roots off.
    pub fn gc_roots_dir(&self) -> Option<&Path> {
        (!self.gc_roots_dir.as_os_str().is_empty()).then_some(self.gc_roots_dir.as_path())
    }

    /// Directory where the hook drops requests when the daemon is unreachable.
    pub fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }

    /// Number of upload workers: the configured value or the number of CPUs.
    pub fn workers(&self) -> usize {
        self.target.workers.unwrap_or_else(default_workers)
    }

    /// The effective compression level.
    pub fn compression_level(&self) -> i32 {
        self.target
            .compression_level
            .unwrap_or_else(|| self.target.compression.default_level())
    }

    /// The configuration as TOML with every default filled in, for `check-config`. Holds no secrets: only the
    /// paths of secret files, and URLs with any embedded password removed.
    pub fn to_effective_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.target.is_unset() {
            shown.target = self.target.effective();
        }
        for target in shown.targets.values_mut() {
            *target = target.effective();
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

/// The number of CPUs, the default number of upload workers.
fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Target names become metric labels, `--target` arguments and queue keys: kept to plain words.
fn valid_target_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
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
    fn effective(&self) -> Target {
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

/// Each of `patterns` is a valid glob.
fn check_patterns(field: &str, patterns: &[String]) -> Result<(), Error> {
    for pattern in patterns {
        globset::Glob::new(pattern).map_err(|e| Error::Invalid {
            field: field.to_owned(),
            problem: format!("has an invalid pattern {pattern:?}: {e}"),
        })?;
    }
    Ok(())
}

/// Replaces the password of `scheme://user:password@host/…` and secret-looking query values with `***`. A URL
/// with nothing to hide comes back exactly as written (no added trailing slash, no re-encoding).
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_owned();
    };
    let mut changed = false;
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
        changed = true;
    }
    let secret_keys = ["secret", "token", "password", "secret-key", "signature"];
    let is_secret = |key: &str| {
        let lower = key.to_ascii_lowercase();
        secret_keys.iter().any(|s| lower.contains(s))
    };
    if parsed.query_pairs().any(|(k, _)| is_secret(&k)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret(&k) {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
        changed = true;
    }
    if !changed {
        return url.to_owned();
    }
    let rendered = parsed.to_string();
    // `http://host` parses with the path `/`; keep the user's form.
    if parsed.path() == "/" && !has_path(url) {
        if let Some(start) = rendered.find("://").map(|i| i + 3) {
            if let Some(slash) = rendered[start..].find('/') {
                let mut out = rendered.clone();
                out.remove(start + slash);
                return out;
            }
        }
    }
    rendered
}

/// Whether `url` has a path after its authority (`scheme://host/…`).
fn has_path(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return true;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest[end..].starts_with('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_keeps_the_form_the_user_wrote() {
        for plain in [
            "https://cache.example.org",
            "https://cache.example.org/",
            "https://cache.example.org/prefix",
            "file:///var/cache/nix",
            "s3://bucket?region=eu-west-1&endpoint=http://127.0.0.1:9000",
            "cachix://mycache",
        ] {
            assert_eq!(redact_url(plain), plain);
        }
        assert_eq!(
            redact_url("https://user:hunter2@cache.example.org"),
            "https://user:***@cache.example.org"
        );
        assert_eq!(
            redact_url("https://user:hunter2@cache.example.org/"),
            "https://user:***@cache.example.org/"
        );
        assert_eq!(
            redact_url("https://user:hunter2@cache.example.org:8443?token=abc&x=1"),
            "https://user:***@cache.example.org:8443?token=***&x=1"
        );
        assert_eq!(
            redact_url("https://u:p@cache.example.org/a/b"),
            "https://u:***@cache.example.org/a/b"
        );
    }

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn minimal_config_fills_defaults() {
        let c = parse("[target]\nurl = \"file:///tmp/cache\"\n").unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.upstream, vec!["https://cache.nixos.org".to_owned()]);
        assert_eq!(c.target.max_attempts, 10);
        assert_eq!(c.target.compression, Compression::Zstd);
        assert_eq!(c.compression_level(), 3);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse("socket = \"/tmp/s\"\nworkerz = 3\n[target]\nurl = \"file:///x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("workerz"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_key_in_target_is_an_error() {
        let err = parse("[target]\nurl = \"file:///x\"\ncompresion = \"xz\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("compresion"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn named_targets_each_get_their_own_view_with_the_shared_settings() {
        let c = parse(
            "upstream = []\n[target]\nurl = \"file:///a\"\nworkers = 2\n\
             [targets.backup]\nurl = \"https://cache.example.org\"\nmax_attempts = 3\n\
             [targets.s3]\nurl = \"s3://bucket?region=eu-west-1\"\n",
        )
        .unwrap();
        assert_eq!(c.target_names(), ["default", "backup", "s3"]);
        let backup = c.for_target("backup").unwrap();
        assert_eq!(backup.target.url, "https://cache.example.org");
        assert_eq!(backup.target.max_attempts, 3);
        assert!(backup.targets.is_empty());
        assert!(backup.upstream.is_empty(), "daemon-wide keys are kept");
        assert_eq!(c.for_target("default").unwrap().target.workers, Some(2));
        assert!(c.for_target("nope").is_none());
        assert_eq!(
            c.target_named_by_url("https://cache.example.org")
                .as_deref(),
            Some("backup")
        );
        // Only named targets: no `[target]` needed, and none is called `default`.
        let c = parse("[targets.one]\nurl = \"file:///one\"\n").unwrap();
        assert_eq!(c.target_names(), ["one"]);
        assert!(c.for_target("default").is_none());
        let shown = c.to_effective_toml();
        assert!(
            shown.contains("[targets.one]") && !shown.contains("[target]\n"),
            "{shown}"
        );
        assert_eq!(parse(&shown).unwrap().target_names(), ["one"]);
    }

    #[test]
    fn a_named_target_is_checked_like_target_and_errors_name_its_table() {
        let err = parse("[targets.backup]\nurl = \"file:///x\"\nworkers = 0\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("`targets.backup.workers`") && text.contains("line 3"),
            "{text}"
        );
        let err = parse("[targets.backup]\ncompression = \"xz\"\n").unwrap_err();
        assert!(
            err.to_string().contains("`targets.backup.url` is required"),
            "{err}"
        );
        let err = parse("[targets.b]\nurl = \"file:///x?compression=xz\"\n").unwrap_err();
        assert!(err.to_string().contains("belong in [targets.b]"), "{err}");
        let err = parse("[target]\nurl = \"file:///a\"\n[targets.default]\nurl = \"file:///b\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("`targets.default`"), "{err}");
        let err = parse("[targets.\"no good\"]\nurl = \"file:///b\"\n").unwrap_err();
        assert!(err.to_string().contains("invalid name"), "{err}");
        let err = parse("socket = \"/tmp/s\"\n").unwrap_err();
        assert!(err.to_string().contains("[targets.NAME]"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let err = parse("[target]\nurl = \"file:///x\"\nworkers = 0\n").unwrap_err();
        assert!(err.to_string().contains("target.workers"), "{err}");
        let err = parse("[target]\nurl = \"ftp://x\"\n").unwrap_err();
        assert!(err.to_string().contains("target.url"), "{err}");
        let err = parse("").unwrap_err();
        assert!(err.to_string().contains("target.url"), "{err}");
        let err = parse("socket_mode = \"999\"\n[target]\nurl = \"file:///x\"\n").unwrap_err();
        assert!(err.to_string().contains("socket_mode"), "{err}");
        let err =
            parse("[target]\nurl = \"file:///x\"\ncompression = \"xz\"\ncompression_level = 12\n")
                .unwrap_err();
        assert!(err.to_string().contains("compression_level"), "{err}");
    }

    // See: #15
    #[test]
    fn target_urls_without_an_absolute_path_or_with_unused_parameters_are_refused() {
        let err = parse("[target]\nurl = \"file://relative/dir\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("absolute path") && err.contains("line 2"),
            "{err}"
        );
        let err = parse("[target]\nworkers = 2\nurl = \"file:///c?compression=xz\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"compression\"") && err.contains("line 3"),
            "{err}"
        );
        assert!(err.contains("take no query parameters"), "{err}");
        let err = parse("[target]\nurl = \"s3://bucket?regoin=eu-west-1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"regoin\""), "{err}");
        assert!(
            err.contains("region, endpoint, scheme, addressing, profile"),
            "{err}"
        );
        let err = parse("[target]\nurl = \"cachix://c?apii=http://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("take only api"), "{err}");
        for good in [
            "file:///c",
            "file://localhost/c",
            "s3://bucket?region=eu-west-1&endpoint=http://127.0.0.1:9000",
            "cachix://c?api=http://127.0.0.1:1",
            "https://cache.example.org/prefix",
        ] {
            parse(&format!("[target]\nurl = \"{good}\"\n")).unwrap();
        }
    }

    // See: #18
    #[test]
    fn filter_keys_live_in_the_target_and_bad_values_name_key_value_and_line() {
        let c = parse(
            "exclude = [\"*-source\"]\n[target]\nurl = \"file:///x\"\ninclude = [\"app-*\"]\n\
             exclude = [\"*-doc\"]\nmax_nar_size = \"2GiB\"\nallow_incomplete_closures = true\n",
        )
        .unwrap();
        assert_eq!(c.exclude, vec!["*-source".to_owned()]);
        assert_eq!(c.target.include, vec!["app-*".to_owned()]);
        assert_eq!(c.target.exclude, vec!["*-doc".to_owned()]);
        assert_eq!(c.target.max_nar_size_bytes(), Some(2 << 30));
        assert!(c.target.allow_incomplete_closures);
        let back = parse(&c.to_effective_toml()).unwrap();
        assert_eq!(back.target.max_nar_size_bytes(), Some(2 << 30));
        assert_eq!(
            parse("[target]\nurl = \"file:///x\"\nmax_nar_size = 1000\n")
                .unwrap()
                .target
                .max_nar_size_bytes(),
            Some(1000)
        );

        let err = parse("[target]\nurl = \"file:///x\"\nmax_nar_size = \"2 gigs\"\n")
            .unwrap_err()
            .to_string();
        // Refused by the TOML parser (ByteSize checks its unit while parsing): its message quotes the line, so
        // the key and value, and gives the line number.
        assert!(
            err.contains("max_nar_size = \"2 gigs\"")
                && err.contains("unknown unit")
                && err.contains("line 3"),
            "{err}"
        );
        let err = parse("[target]\nurl = \"file:///x\"\n\ninclude = [\"app-[\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("target.include") && err.contains("app-[") && err.contains("line 4"),
            "{err}"
        );
        let err = parse("[target]\nurl = \"file:///x\"\nexclude = [\"{a\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("target.exclude") && err.contains("line 3"),
            "{err}"
        );
        let err = parse("exclude = [\"[\"]\n[target]\nurl = \"file:///x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`exclude`") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn metrics_listen_is_off_by_default_and_checked() {
        assert_eq!(
            parse("[target]\nurl = \"file:///x\"\n")
                .unwrap()
                .metrics_listen,
            None
        );
        for good in ["127.0.0.1:9464", "[::1]:9464", "/run/nixpush/metrics.sock"] {
            let c = parse(&format!(
                "metrics_listen = \"{good}\"\n[target]\nurl = \"file:///x\"\n"
            ))
            .unwrap();
            assert_eq!(c.metrics_listen.as_deref(), Some(good));
        }
        let err = parse("metrics_listen = \"localhost\"\n[target]\nurl = \"file:///x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("metrics_listen") && err.contains("line 1"),
            "{err}"
        );
    }

    #[test]
    fn gc_roots_keys_have_defaults_take_sizes_and_turn_off_with_an_empty_dir() {
        let c = parse("[target]\nurl = \"file:///c\"\n").unwrap();
        assert_eq!(c.gc_roots_dir(), Some(Path::new(DEFAULT_GC_ROOTS_DIR)));
        assert_eq!(c.gc_roots_max_bytes.0, 20 << 30);
        let c = parse("gc_roots_dir = \"\"\ngc_roots_max_bytes = \"512 MiB\"\n[target]\nurl = \"file:///c\"\n")
            .unwrap();
        assert_eq!(c.gc_roots_dir(), None);
        assert_eq!(c.gc_roots_max_bytes.0, 512 << 20);
        let back = parse(&c.to_effective_toml()).unwrap();
        assert_eq!(back.gc_roots_max_bytes, c.gc_roots_max_bytes);
        assert_eq!(back.gc_roots_dir(), None);
        let err = parse("gc_roots_dir = \"roots\"\n[target]\nurl = \"file:///c\"\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("`gc_roots_dir` must be an absolute path"),
            "{err}"
        );
        let err = parse("gc_roots_max_bytes = \"20 GB please\"\n[target]\nurl = \"file:///c\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gc_roots_max_bytes") && err.contains("unknown unit"),
            "{err}"
        );
    }

    // See: #18
    #[test]
    fn upload_rates_parse_and_bad_ones_name_the_key() {
        let c = parse(
            "[target]\nurl = \"file:///x\"\nmax_upload_rate = \"4MiB/s\"\n\
             rate_schedule = [{ from = \"09:00\", to = \"18:00\", rate = \"512KiB/s\" },\
             { from = \"22:00\", to = \"06:00\", rate = \"0\" }]\n",
        )
        .unwrap();
        assert_eq!(
            c.target.max_upload_rate,
            crate::rate_schedule::Rate::BytesPerSec(4 << 20)
        );
        assert_eq!(c.target.rate_schedule.len(), 2);
        let back = parse(&c.to_effective_toml()).unwrap();
        assert_eq!(back.target.rate_schedule, c.target.rate_schedule);
        assert_eq!(back.target.max_upload_rate, c.target.max_upload_rate);
        let err = parse("[target]\nurl = \"file:///x\"\nmax_upload_rate = \"4 MiBps\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("max_upload_rate") && err.contains("line 3"),
            "{err}"
        );
        let err = parse(
            "[target]\nurl = \"file:///x\"\nrate_schedule = [{ from = \"9\", to = \"18:00\", rate = \"0\" }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("rate_schedule") && err.contains("HH:MM"),
            "{err}"
        );
        let err = parse(
            "[target]\nurl = \"file:///x\"\nrate_schedule = [{ from = \"09:00\", to = \"18:00\", rate = \"0\" },\
             { from = \"17:00\", to = \"20:00\", rate = \"1MiB/s\" }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("target.rate_schedule")
                && err.contains("09:00–18:00")
                && err.contains("17:00–20:00"),
            "{err}"
        );
    }

    #[test]
    fn line_of_finds_keys_in_their_table() {
        let text = "socket = \"/s\"\n[target]\nurl = \"x\"\n  workers=3\n";
        assert_eq!(line_of(text, "socket"), Some(1));
        assert_eq!(line_of(text, "target.url"), Some(3));
        assert_eq!(line_of(text, "target.workers"), Some(4));
        assert_eq!(line_of(text, "url"), None);
        assert_eq!(line_of("target.url = \"x\"\n", "target.url"), Some(1));
    }

    #[test]
    fn effective_toml_round_trips_and_hides_passwords() {
        let c = parse("[target]\nurl = \"https://user:hunter2@cache.example/x\"\n").unwrap();
        let shown = c.to_effective_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        let back = parse(&shown).unwrap();
        assert_eq!(back.workers(), c.workers());
        assert_eq!(back.state_dir, c.state_dir);
    }
}
