//! The status report: what the daemon says about itself, its queue and its target. `nixpush status --json`
//! prints it as is, so its JSON shape is a contract for scripts and tests: keep it flat and only ever add fields
//! (new fields carry `#[serde(default)]`, so a newer `nixpush status` still reads an older daemon's report).
//!
//! ```json
//! {"version":1,"queued":3,"in_flight":0,"done":0,"failed":0,"refused":1,"skipped":0,"excluded":0,"spooled":0,
//!  "up_to_date":false,"last_upload_at":null,"state_dir_error":null,
//!  "daemon":{"pid":4242,"started_at":1732600000,"uptime_secs":12,"hold":true},
//!  "target":{"url":"file:///var/cache/nix","state":"hold","message":"uploads held (--hold)",
//!            "reachable":null,"authorized":null,"read_url":null,"stats":null,"degraded":null,
//!            "filtered":{"excluded":0,"held_back":0,"waiting_for_retry":0,"recent":[]}},
//!  "in_flight_uploads":[],"recent":[],"failed_paths":[],
//!  "refused_requests":[{"input":"/tmp/x","reason":"not inside the store directory /nix/store","peer_uid":0,
//!                       "source":"socket","at_ms":1732600005000}],
//!  "totals":{"since_start":{"uploaded":0,…},"all_time":{"uploaded":0,…}}}
//! ```
//!
//! The types live here; `render` writes them as text, `targets` holds one target's part, and `tests` pins the
//! golden `status --json` string and the rendering cases.

use serde::{Deserialize, Serialize};

use crate::store_path::StorePath;

mod render;
pub mod targets;
#[cfg(test)]
pub(crate) mod tests;

/// Shared with the queue's history, whose outcomes the report shows as they are.
pub use crate::outcome::Outcome;
pub use render::human_duration;
pub use targets::TargetReport;

/// Sizes read the same in `status`, the log and `push`.
pub use crate::upload::human_bytes;

/// The report's format version.
pub const STATUS_VERSION: u32 = 1;

/// Everything `nixpush status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// [`STATUS_VERSION`].
    pub version: u32,
    /// Paths waiting in the queue (including those waiting to be retried).
    pub queued: u64,
    /// Paths being uploaded right now.
    pub in_flight: u64,
    /// Paths uploaded since the daemon started.
    pub done: u64,
    /// Paths parked as failed, waiting for `retry`.
    pub failed: u64,
    /// Refused requests (bad paths, peers not allowed), all time.
    pub refused: u64,
    /// Paths since start that needed no upload: already in the target, served upstream, or garbage-collected.
    pub skipped: u64,
    /// Paths since start that the target's filters left out (`include`, `exclude`, `max_nar_size`).
    pub excluded: u64,
    /// Spool files waiting to be imported.
    pub spooled: u64,
    /// Nothing waits: no path queued, uploading, failed or spooled, and uploads are not held.
    #[serde(default)]
    pub up_to_date: bool,
    /// When the most recent upload finished, in Unix seconds (from the history).
    #[serde(default)]
    pub last_upload_at: Option<u64>,
    /// Why the state directory cannot take new work (full or read-only), while it cannot.
    #[serde(default)]
    pub state_dir_error: Option<String>,
    /// What was wrong with the queue database at startup and what was recovered; `null` when it was whole.
    #[serde(default)]
    pub queue_damage: Option<crate::queue::Damage>,
    /// Whether the spool watcher runs; when it does not, the spool is rescanned periodically.
    #[serde(default)]
    pub watcher: WatcherStatus,
    /// The garbage-collector roots that protect queued paths.
    #[serde(default)]
    pub gc_roots: GcRootsStatus,
    /// The daemon process.
    pub daemon: DaemonInfo,
    /// The cache paths are pushed to.
    pub target: TargetInfo,
    /// Uploads running now.
    pub in_flight_uploads: Vec<InFlightUpload>,
    /// The most recently finished paths, newest first.
    pub recent: Vec<FinishedPath>,
    /// Paths parked as failed, and queued paths whose last attempt failed.
    pub failed_paths: Vec<FailedPath>,
    /// The most recent refused requests, newest first.
    pub refused_requests: Vec<RefusedRequest>,
    /// Counters of finished paths and bytes.
    pub totals: TotalsReport,
    /// Each configured target by name (`default` for `[target]`), with the fields above that concern one
    /// target; the fields above are their sums (and `target` is `default`, or else the first by name).
    #[serde(default)]
    pub targets: std::collections::BTreeMap<String, TargetReport>,
}

/// The spool watcher's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WatcherStatus {
    /// Whether inotify reports new spool files; when false they are found by the rescan.
    pub active: bool,
    /// Why it is off.
    pub reason: Option<String>,
    /// Seconds between rescans of the spool directory.
    pub rescan_secs: u64,
}

impl Default for WatcherStatus {
    fn default() -> WatcherStatus {
        WatcherStatus {
            active: false,
            reason: Some("not started yet".to_owned()),
            rescan_secs: 0,
        }
    }
}

/// The garbage-collector roots of queued, uploading and failed paths.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GcRootsStatus {
    /// The roots' directory; `null` when roots are off (`gc_roots_dir = ""`).
    pub dir: Option<String>,
    /// Paths with a root now.
    pub rooted_paths: u64,
    /// Their NAR size (of the paths themselves, not their closures), as far as looked up.
    pub rooted_bytes: u64,
    /// `gc_roots_max_bytes`.
    pub max_bytes: u64,
    /// Failed paths left without a root because the rooted size exceeded `max_bytes`.
    pub over_limit_unrooted: u64,
    /// Why roots cannot be created or removed, while they cannot; `null` when they work.
    pub error: Option<String>,
    /// A configuration problem that makes the roots useless (a directory Nix's collector does not read).
    pub warning: Option<String>,
}

/// The daemon process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// Its process id.
    pub pid: u32,
    /// When it started, in Unix seconds.
    pub started_at: u64,
    /// Seconds since then.
    pub uptime_secs: u64,
    /// Started with `--hold`: accepting and persisting, never uploading.
    pub hold: bool,
}

/// What the daemon knows about its target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// The target URL, any password redacted.
    pub url: String,
    /// Its state.
    pub state: TargetState,
    /// A human explanation of the state, e.g. the last error.
    pub message: String,
    /// Whether the target answered the last request; `null` until the daemon has asked.
    #[serde(default)]
    pub reachable: Option<bool>,
    /// Whether the target accepted the credentials; `null` until known.
    #[serde(default)]
    pub authorized: Option<bool>,
    /// The URL Nix substitutes from, as the target reported it.
    #[serde(default)]
    pub read_url: Option<String>,
    /// The target's own statistics, where the backend offers them (Cachix cache info).
    #[serde(default)]
    pub stats: Option<serde_json::Value>,
    /// Why the target cannot take writes now (full disk or quota, read-only, HTTP 507, S3 SlowDown), while it
    /// cannot: uploads wait and resume by themselves. `null` when healthy.
    #[serde(default)]
    pub degraded: Option<String>,
    /// What the target's filters left out, and why.
    #[serde(default)]
    pub filtered: FilterStatus,
    /// The upload rate in force and the rate measured on the wire; `null` from a daemon that does not say.
    #[serde(default)]
    pub upload_rate: Option<UploadRate>,
}

impl TargetInfo {
    /// A target in `state` that nothing more is known about: not asked yet, nothing filtered, no rate.
    pub fn new(
        url: impl Into<String>,
        state: TargetState,
        message: impl Into<String>,
    ) -> TargetInfo {
        TargetInfo {
            url: url.into(),
            state,
            message: message.into(),
            reachable: None,
            authorized: None,
            read_url: None,
            stats: None,
            degraded: None,
            filtered: FilterStatus::default(),
            upload_rate: None,
        }
    }
}

/// What a target's filters (`include`, `exclude`, `max_nar_size`) left out: paths excluded, and paths held back
/// because a reference of theirs is excluded and no cache has it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FilterStatus {
    /// Paths excluded since the daemon started.
    pub excluded: u64,
    /// Paths held back since the daemon started.
    pub held_back: u64,
    /// Requested paths held back now: they wait for `nixpush retry` (or a new build of them).
    pub waiting_for_retry: u64,
    /// The latest paths left out, with the reason, newest first.
    pub recent: Vec<FilteredPath>,
}

/// One path a target's filters left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilteredPath {
    /// The store path.
    pub path: StorePath,
    /// `excluded` or `held_back`.
    pub outcome: Outcome,
    /// Which rule excluded it, or which reference holds it back.
    pub reason: String,
    /// Unix time (ms) of the decision.
    pub at_ms: u64,
}

/// A target's upload rate (`max_upload_rate`, `rate_schedule`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRate {
    /// Bytes per second in force over all workers; `null` when unlimited, 0 while held.
    pub limit_bytes_per_sec: Option<u64>,
    /// Where it comes from: `unlimited`, `max_upload_rate`, or `rate_schedule HH:MM–HH:MM` (the window).
    pub source: String,
    /// Whether the rate in force is 0: no new upload starts and uploads in flight pause.
    pub held: bool,
    /// Bytes per second on the wire (for `file://`, written into the cache) over the last few seconds.
    pub measured_bytes_per_sec: u64,
    /// The local time (`HH:MM`) of the next window edge where the rate changes; `null` when it never does.
    pub next_change_local: Option<String>,
    /// The same moment in Unix seconds.
    pub next_change_at: Option<u64>,
}

impl UploadRate {
    /// `512.0 KiB/s (rate_schedule 09:00–18:00) until 18:00, measured 498.0 KiB/s`.
    pub fn describe(&self) -> String {
        let until = self
            .next_change_local
            .as_deref()
            .map(|t| format!(" until {t}"))
            .unwrap_or_default();
        let measured = human_bytes(self.measured_bytes_per_sec);
        match self.limit_bytes_per_sec {
            _ if self.held => format!("HELD by {}{until}: nothing is sent", self.source),
            None => format!("unlimited ({}){until}, measured {measured}/s", self.source),
            Some(limit) => format!(
                "{}/s ({}){until}, measured {measured}/s",
                human_bytes(limit),
                self.source
            ),
        }
    }
}

/// How the target is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// Nothing to upload.
    Idle,
    /// The last request to the target succeeded.
    Ok,
    /// Uploads paused, e.g. because the target refused the credentials.
    Paused,
    /// The target could not be reached.
    Unreachable,
    /// The daemon runs with `--hold`.
    Hold,
}

impl TargetState {
    /// The name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Idle => "idle",
            TargetState::Ok => "ok",
            TargetState::Paused => "paused",
            TargetState::Unreachable => "unreachable",
            TargetState::Hold => "hold",
        }
    }
}

/// One running upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlightUpload {
    /// The store path.
    pub path: StorePath,
    /// When the upload started, in Unix seconds.
    pub started_at: u64,
    /// NAR bytes processed so far.
    pub nar_bytes_done: u64,
    /// The NAR's size, when known.
    pub nar_size: Option<u64>,
    /// `preparing` (streaming and compressing the NAR; for `file://` also writing it into the cache),
    /// `uploading` (the NAR on the wire) or `narinfo` (the NAR is sent, the narinfo is being written).
    #[serde(default)]
    pub phase: Option<String>,
    /// Compressed bytes on the wire so far (for `file://`, written into the cache).
    #[serde(default)]
    pub wire_bytes_done: u64,
    /// The compressed size, once the NAR is prepared.
    #[serde(default)]
    pub file_size: Option<u64>,
    /// The target, in the lists that merge several targets' (the top level of a report with more than one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A path whose last attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedPath {
    /// The store path.
    pub path: StorePath,
    /// `failed` (parked until retried) or `retrying` (queued with backoff).
    pub state: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When it is tried again, in Unix seconds; `null` when parked.
    pub next_attempt_at: Option<u64>,
    /// The target, in the lists that merge several targets' (the top level of a report with more than one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// One finished path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedPath {
    /// The store path.
    pub path: StorePath,
    /// What happened.
    pub outcome: Outcome,
    /// Uncompressed NAR size, when a NAR was made.
    pub nar_size: Option<u64>,
    /// Size of the uploaded (compressed) file, when one was uploaded.
    pub file_size: Option<u64>,
    /// Time spent on the path, in milliseconds.
    pub duration_ms: u64,
    /// Why, for anything but a plain upload.
    pub reason: Option<String>,
    /// Unix time (ms) it finished.
    pub finished_at_ms: u64,
    /// The target, in the lists that merge several targets' (the top level of a report with more than one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// One refused request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedRequest {
    /// The path (or raw input) that was refused, truncated.
    pub input: String,
    /// Why, e.g. `not inside the store directory /nix/store`.
    pub reason: String,
    /// The requester's uid (socket peer or spool file owner), when known.
    pub peer_uid: Option<u32>,
    /// `socket` or `spool`.
    pub source: String,
    /// Unix time (ms) of the refusal.
    pub at_ms: u64,
}

/// Counters of finished paths and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    /// Paths uploaded.
    pub uploaded: u64,
    /// Paths the target already had.
    pub already_present: u64,
    /// Paths an upstream cache serves.
    pub skipped_upstream: u64,
    /// Paths filtered out (`include`, `exclude`, `max_nar_size`).
    pub excluded: u64,
    /// Paths garbage-collected before upload.
    pub skipped_gone: u64,
    /// Paths given up on.
    pub failed: u64,
    /// Uncompressed NAR bytes uploaded.
    pub nar_bytes: u64,
    /// Compressed bytes uploaded.
    pub file_bytes: u64,
    /// Paths held back because a reference of theirs is filtered out and no cache has it.
    pub held_back: u64,
}

/// Totals since the daemon started and since its queue was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TotalsReport {
    /// Since this process opened the queue.
    pub since_start: Totals,
    /// Since the queue was created.
    pub all_time: Totals,
}
