//! The engine's settings, derived once from the configuration: compression, parallelism, the target's filters,
//! upstream caches and the presence query's retries.

use std::path::PathBuf;

use crate::config::{Compression, Config};

use super::filter::Filter;
use super::presence::PRESENCE_TRIES;
use super::retry;

/// Engine settings derived from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// NAR compression.
    pub compression: Compression,
    /// Compression level.
    pub level: i32,
    /// Parallel NAR preparations and uploads.
    pub workers: usize,
    /// Where compressed NARs are written when the backend has no staging directory.
    pub temp_dir: PathBuf,
    /// Which paths the target takes (`include`, `exclude`, `max_nar_size`, `allow_incomplete_closures`).
    pub filter: Filter,
    /// Upstream caches whose paths are skipped.
    pub upstream: Vec<String>,
    /// Backoff between tries of the target's presence query within one batch.
    pub presence_retry: retry::Policy,
    /// Tries of the presence query within one batch before the batch gives up on it.
    pub presence_tries: u32,
    /// Write `<hash>.ls` NAR listings.
    pub write_nar_listing: bool,
    /// Upload build logs from `nix_log_dir`.
    pub upload_logs: bool,
    /// Nix's log directory.
    pub nix_log_dir: PathBuf,
    /// Re-sign present paths whose narinfo lacks our signature.
    pub resign_existing: bool,
    /// Threads that hash and compress NARs (the daemon's run at idle priority).
    pub prepare_pool: crate::priority::Pool,
    /// The target's upload rate limit, shared by all workers; the daemon keeps one across reloads and sets its
    /// rate from the schedule.
    pub rate: std::sync::Arc<crate::backend::rate::RateLimiter>,
}

impl Settings {
    /// Settings from a validated configuration.
    pub fn from_config(config: &Config) -> Result<Settings, crate::config::Error> {
        Ok(Settings {
            compression: config.target.compression,
            level: config.compression_level(),
            workers: config.workers(),
            temp_dir: config.state_dir.join("tmp"),
            filter: Filter::new(config, &config.target)?,
            upstream: config.upstream.clone(),
            presence_retry: retry::Policy::default(),
            presence_tries: PRESENCE_TRIES,
            write_nar_listing: config.target.write_nar_listing,
            upload_logs: config.target.upload_logs,
            nix_log_dir: config.nix_log_dir.clone(),
            resign_existing: config.target.resign_existing,
            prepare_pool: crate::priority::Pool::inherit(),
            rate: std::sync::Arc::new(crate::backend::rate::RateLimiter::new(
                crate::rate_schedule::in_force(
                    config.target.max_upload_rate,
                    &config.target.rate_schedule,
                    crate::rate_schedule::local_now(),
                )
                .rate,
            )),
        })
    }
}
