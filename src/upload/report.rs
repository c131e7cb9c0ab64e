//! What the engine tells about a batch: per-path and per-root outcomes, the plan, what is in flight, the
//! [`Observer`] that hears of each path as it finishes, and how a finished path reads in the log.
//!
//! ```text
//! uploaded /nix/store/…-hello-2.12 (12.3 MiB → 3.1 MiB zstd, 0.8 s)
//! ```

use std::sync::Arc;

use serde::Serialize;

use crate::config::Compression;
use crate::store_path::StorePath;

use super::Error;

/// What happened to one path of a batch.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "reason")]
pub enum PathOutcome {
    /// Uploaded now.
    Uploaded,
    /// The target already had it.
    AlreadyPresent,
    /// An upstream cache serves it.
    SkippedUpstream,
    /// Filtered out by the target's filters; the reason names the rule (see [`super::filter`]).
    Excluded(String),
    /// Passes the filters, but a reference of it is filtered out and no cache has it; the reason names it.
    HeldBack(String),
    /// Could not be uploaded.
    Failed(String),
}

/// One path's result, for logs, status history and `push` summaries.
#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    /// The store path.
    pub path: StorePath,
    /// What happened.
    pub outcome: PathOutcome,
    /// Uncompressed NAR size (from Nix's database, or measured when uploaded).
    pub nar_size: u64,
    /// Compressed size, when uploaded.
    pub file_size: Option<u64>,
    /// Time spent preparing and uploading, when uploaded.
    pub duration_ms: Option<u64>,
    /// How the uploaded file is compressed, when uploaded.
    pub compression: Option<Compression>,
}

/// What happened to one requested root.
#[derive(Debug)]
pub enum RootOutcome {
    /// The root and its whole closure are in the cache (or deliberately skipped).
    Done,
    /// The root is no longer valid in the local store.
    Gone,
    /// The root is held back by the target's filters; the reason names the reference that is filtered out.
    HeldBack(String),
    /// Something in its closure failed.
    Failed(Arc<Error>),
}

/// The result of one batch.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// One entry per requested root, in request order.
    pub roots: Vec<(StorePath, RootOutcome)>,
    /// One entry per closure member that was considered.
    pub paths: Vec<PathReport>,
    /// Set when the target rejected our credentials: nothing more can succeed until they change.
    pub auth_failure: Option<Arc<Error>>,
}

/// A path being prepared or uploaded right now.
#[derive(Debug, Clone, Serialize)]
pub struct InFlight {
    /// The store path.
    pub path: StorePath,
    /// Its NAR size as Nix recorded it.
    pub nar_size: u64,
    /// NAR bytes produced so far.
    pub nar_done: u64,
    /// Compressed bytes on the wire so far (for `file://`, written into the cache), every try counted.
    pub wire_done: u64,
    /// The compressed size, once the NAR is prepared.
    pub file_size: Option<u64>,
    /// `preparing` (hashing and compressing; for `file://` also writing into the cache), `uploading` (the NAR
    /// on the wire) or `narinfo` (the NAR is sent; the narinfo is being written).
    pub phase: &'static str,
    /// Milliseconds since it started.
    pub elapsed_ms: u64,
    /// Milliseconds since its upload started, once it has.
    pub uploading_ms: Option<u64>,
}

/// What a batch is about to do, once the cache has been asked.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Plan {
    /// Closure members considered.
    pub paths: usize,
    /// Paths that will be uploaded.
    pub to_upload: usize,
    /// Their uncompressed NAR bytes.
    pub to_upload_bytes: u64,
}

/// Receives a report as each path finishes (logs, progress bars, history).
pub trait Observer: Send + Sync {
    /// Called once per batch when it is known what must be uploaded.
    fn planned(&self, _plan: &Plan) {}
    /// Called once per closure member, as soon as its outcome is known.
    fn path_finished(&self, report: &PathReport);
    /// Called when a narinfo of `bytes` (its text) was written for `path`.
    fn narinfo_uploaded(&self, _path: &StorePath, _bytes: u64) {}
}

/// An observer that only logs.
#[derive(Debug, Default)]
pub struct LogObserver;

impl Observer for LogObserver {
    fn path_finished(&self, report: &PathReport) {
        log_report(report, None);
    }
}

/// `uploaded /nix/store/…-hello-2.12 (12.3 MiB → 3.1 MiB zstd, 0.8 s)`: how logs and `push` tell of an upload.
pub fn upload_line(report: &PathReport) -> String {
    format!(
        "uploaded {} ({} → {} {}, {:.1} s)",
        report.path,
        human_bytes(report.nar_size),
        human_bytes(report.file_size.unwrap_or_default()),
        report
            .compression
            .map(Compression::narinfo_name)
            .unwrap_or("?"),
        report.duration_ms.unwrap_or_default() as f64 / 1000.0
    )
}

/// Logs one finished path the way the journal should read: a human line, plus the fields `store_path`,
/// `nar_size`, `file_size`, `duration_ms`, `compression` and `nixpush_target` (journald shows them upper-cased, e.g.
/// `STORE_PATH`, for `journalctl -o json` and filters such as `journalctl STORE_PATH=…`).
pub fn log_report(report: &PathReport, target: Option<&str>) {
    use tracing::Level;
    // The fields every finished path carries, once; each arm adds its own and the message.
    macro_rules! path_event {
        ($level:expr, $($fields_and_message:tt)+) => {
            tracing::event!(
                $level,
                store_path = %report.path,
                nar_size = report.nar_size,
                nixpush_target = target,
                $($fields_and_message)+
            )
        };
    }
    match &report.outcome {
        PathOutcome::Uploaded => path_event!(
            Level::INFO,
            file_size = report.file_size.unwrap_or_default(),
            duration_ms = report.duration_ms.unwrap_or_default(),
            compression = report.compression.map(Compression::narinfo_name),
            "{}",
            upload_line(report)
        ),
        PathOutcome::Failed(reason) => {
            path_event!(Level::WARN, "failed to upload {}: {reason}", report.path)
        }
        PathOutcome::HeldBack(reason) => {
            path_event!(Level::INFO, "held back {}: {reason}", report.path)
        }
        PathOutcome::AlreadyPresent | PathOutcome::SkippedUpstream | PathOutcome::Excluded(_) => {
            path_event!(
                Level::DEBUG,
                outcome = ?report.outcome,
                "skipped {}",
                report.path
            )
        }
    }
}

/// `512 B`, `1.5 KiB`, `12.3 MiB`: sizes for humans, in logs, `push` and `status`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_the_same_everywhere() {
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 20), "5.0 MiB");
        assert_eq!(human_bytes(3 << 50), "3.0 PiB");
    }

    #[test]
    fn upload_lines_give_sizes_compression_and_time() {
        let report = PathReport {
            path: StorePath::parse(
                "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top",
                "/nix/store",
            )
            .unwrap(),
            outcome: PathOutcome::Uploaded,
            nar_size: 12 << 20,
            file_size: Some(3 << 20),
            duration_ms: Some(800),
            compression: Some(Compression::Zstd),
        };
        assert_eq!(
            upload_line(&report),
            "uploaded /nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top (12.0 MiB → 3.0 MiB zstd, 0.8 s)"
        );
    }
}
