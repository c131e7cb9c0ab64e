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
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod target;

pub use target::Target;

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
    /// Directory of the roots (files named after store paths) that protect queued, uploading and failed paths from
    /// Nix's garbage collector (see [`crate::gc_roots`]). Empty turns roots off. Read at start.
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
pub(super) fn default_workers() -> usize {
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

/// Each of `patterns` is a valid glob.
pub(super) fn check_patterns(field: &str, patterns: &[String]) -> Result<(), Error> {
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
mod tests;
