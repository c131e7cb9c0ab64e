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
//! Over 600 lines because of its tests: the golden `status --json` string and the rendering cases pin the
//! contract.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::store_path::StorePath;

pub mod targets;
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
    /// target; the fields above are their sums (and `target` the first target).
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

/// How the engine finished with a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// NAR and narinfo written to the target.
    Uploaded,
    /// The target already had it.
    AlreadyPresent,
    /// An upstream cache serves it.
    SkippedUpstream,
    /// Filtered out by the target's `include`, `exclude` or `max_nar_size`.
    Excluded,
    /// Garbage-collected before it could be uploaded.
    SkippedGone,
    /// Gave up on it.
    Failed,
    /// Held back: a reference of it is filtered out and no cache has it.
    HeldBack,
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

impl StatusReport {
    /// One line answering "is my cache up to date?".
    pub fn verdict(&self, now_secs: u64) -> String {
        let waiting = self.queued + self.in_flight + self.spooled;
        let last = self
            .last_upload_at
            .map(|at| {
                format!(
                    "last upload {} ago",
                    human_duration(now_secs.saturating_sub(at))
                )
            })
            .unwrap_or_else(|| "no upload recorded yet".to_owned());
        let paused = self.target_in(TargetState::Paused);
        if let Some(error) = &self.state_dir_error {
            format!("NOT taking new builds: {error}; {waiting} path(s) waiting")
        } else if self.daemon.hold {
            format!("uploads held (--hold): {waiting} path(s) waiting")
        } else if let (Some((name, target)), false) = (&paused, self.up_to_date) {
            format!(
                "NOT up to date: uploads paused, {waiting} path(s) waiting. {name}{}",
                target.message
            )
        } else if let (Some((name, target)), true) = (&paused, self.up_to_date) {
            format!(
                "up to date ({last}), but new paths will wait: {name}{}",
                target.message
            )
        } else if self.up_to_date && self.held_back_waiting() > 0 {
            format!(
                "up to date: nothing waiting ({last}); {} path(s) held back by the target's filters",
                self.held_back_waiting()
            )
        } else if self.up_to_date {
            format!("up to date: nothing waiting ({last})")
        } else if self.failed > 0 {
            format!(
                "NOT up to date: {} path(s) failed (`nixpush retry --all` once the cause is fixed), \
                 {waiting} waiting ({last})",
                self.failed
            )
        } else if let Some((name, _)) = self.target_in(TargetState::Unreachable) {
            let which = match name.trim_end_matches(": ") {
                "" => "target".to_owned(),
                name => format!("target {name}"),
            };
            format!("NOT up to date: {which} unreachable, {waiting} path(s) waiting ({last})")
        } else {
            format!(
                "catching up: {} queued, {} uploading, {} spooled ({last})",
                self.queued, self.in_flight, self.spooled
            )
        }
    }

    /// The report as a few readable lines, relative to `now_secs` (Unix seconds).
    pub fn render(&self, now_secs: u64) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.verdict(now_secs));
        out.push('\n');
        let d = &self.daemon;
        let _ = writeln!(
            out,
            "daemon:   pid {}, up {}{}",
            d.pid,
            human_duration(d.uptime_secs),
            if d.hold { ", uploads held" } else { "" }
        );
        if self.targets.len() > 1 {
            for (name, target) in &self.targets {
                targets::render_block(&mut out, name, target, d.hold, now_secs);
            }
        } else {
            render_target(&mut out, "target:  ", &self.target, d.hold);
        }
        let _ = writeln!(
            out,
            "queue:    {} queued, {} in flight, {} failed, {} spooled; {} refused request(s) all time",
            self.queued, self.in_flight, self.failed, self.spooled, self.refused
        );
        if let Some(damage) = &self.queue_damage {
            let _ = writeln!(out, "DAMAGED QUEUE at startup: {}", damage.describe());
        }
        if !self.watcher.active {
            let _ = writeln!(
                out,
                "spool:    watcher off ({}); rescanning every {} s",
                self.watcher.reason.as_deref().unwrap_or("unknown"),
                self.watcher.rescan_secs
            );
        }
        let _ = writeln!(out, "{}", gc_roots_line(&self.gc_roots));
        let _ = writeln!(
            out,
            "since start: {}",
            totals_line(&self.totals.since_start)
        );
        let _ = writeln!(out, "all time:    {}", totals_line(&self.totals.all_time));
        if self.targets.len() <= 1 {
            render_filtered(&mut out, &self.target.filtered, now_secs);
        }
        if !self.in_flight_uploads.is_empty() {
            out.push_str("\nuploading:\n");
            for u in &self.in_flight_uploads {
                let progress = match u.nar_size {
                    Some(size) if size > 0 => format!(
                        "{} / {} ({:.0} %)",
                        human_bytes(u.nar_bytes_done),
                        human_bytes(size),
                        u.nar_bytes_done.min(size) as f64 * 100.0 / size as f64
                    ),
                    _ => human_bytes(u.nar_bytes_done),
                };
                let wire = match u.file_size {
                    Some(size) => format!(
                        ", {} / {} sent",
                        human_bytes(u.wire_bytes_done.min(size)),
                        human_bytes(size)
                    ),
                    None if u.wire_bytes_done > 0 => {
                        format!(", {} written", human_bytes(u.wire_bytes_done))
                    }
                    None => String::new(),
                };
                let _ = writeln!(
                    out,
                    "  {}  {progress}{wire}  {}, {}",
                    u.path,
                    u.phase.as_deref().unwrap_or("running"),
                    human_duration(now_secs.saturating_sub(u.started_at))
                );
            }
        }
        if !self.failed_paths.is_empty() {
            out.push_str("\nfailed:\n");
            for f in &self.failed_paths {
                let when = match f.next_attempt_at {
                    Some(at) if at > now_secs => {
                        format!(", next try in {}", human_duration(at - now_secs))
                    }
                    Some(_) => ", next try now".to_owned(),
                    None => ", parked until `nixpush retry`".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "  {}  {} attempts{}: {}",
                    f.path,
                    f.attempts,
                    when,
                    f.last_error.as_deref().unwrap_or("no reason recorded")
                );
            }
        }
        if !self.recent.is_empty() {
            out.push_str("\nrecent:\n");
            for r in &self.recent {
                let what = match (r.outcome, r.nar_size, r.file_size) {
                    (Outcome::Uploaded, Some(nar), Some(file)) => format!(
                        "uploaded {} → {}{}, {:.1} s",
                        human_bytes(nar),
                        human_bytes(file),
                        ratio(nar, file)
                            .map(|p| format!(" ({p:.0} %)"))
                            .unwrap_or_default(),
                        r.duration_ms as f64 / 1000.0
                    ),
                    (outcome, _, _) => format!(
                        "{}{}",
                        outcome_name(outcome),
                        r.reason
                            .as_deref()
                            .map(|why| format!(" ({why})"))
                            .unwrap_or_default()
                    ),
                };
                let _ = writeln!(
                    out,
                    "  {}  {what}  {} ago",
                    r.path,
                    human_duration(now_secs.saturating_sub(r.finished_at_ms / 1000))
                );
            }
        }
        if !self.refused_requests.is_empty() {
            out.push_str("\nrefused:\n");
            for r in &self.refused_requests {
                let uid = r
                    .peer_uid
                    .map(|u| format!("uid {u}"))
                    .unwrap_or_else(|| "unknown uid".into());
                let _ = writeln!(
                    out,
                    "  {} ago  {} via {}: {:?}: {}",
                    human_duration(now_secs.saturating_sub(r.at_ms / 1000)),
                    uid,
                    r.source,
                    r.input,
                    r.reason
                );
            }
        }
        out
    }
}

/// The target's URL, state, reachability, what it reports and its rate, under `label` (`target:  `).
fn render_target(out: &mut String, label: &str, t: &TargetInfo, hold: bool) {
    let _ = write!(out, "{label} {} ({})", t.url, t.state.as_str());
    if !t.message.is_empty() {
        let _ = write!(out, ": {}", t.message);
    }
    out.push('\n');
    let reachable = match t.reachable {
        Some(true) => "reachable",
        Some(false) => "unreachable",
        None if hold => "not contacted (uploads held)",
        None => "reachability not known yet",
    };
    let authorized = match t.authorized {
        Some(true) => ", credentials accepted",
        Some(false) => ", credentials REJECTED",
        None => "",
    };
    let _ = write!(out, "          {reachable}{authorized}");
    if let Some(read_url) = t.read_url.as_deref().filter(|u| *u != t.url) {
        let _ = write!(out, "; Nix reads it from {read_url}");
    }
    out.push('\n');
    if let Some(stats) = &t.stats {
        let _ = writeln!(out, "          target reports: {}", flat_stats(stats));
    }
    if let Some(reason) = &t.degraded {
        let _ = writeln!(
            out,
            "          DEGRADED: {reason}; uploads wait and resume by themselves"
        );
    }
    if let Some(rate) = &t.upload_rate {
        let _ = writeln!(out, "rate:     {}", rate.describe());
    }
}

/// The filters' counts and recent decisions, when they left anything out.
fn render_filtered(out: &mut String, filtered: &FilterStatus, now_secs: u64) {
    if filtered.excluded == 0 && filtered.held_back == 0 && filtered.recent.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "filters:     {} excluded, {} held back since start; {} held back until `nixpush retry`",
        filtered.excluded, filtered.held_back, filtered.waiting_for_retry
    );
    for f in &filtered.recent {
        let _ = writeln!(
            out,
            "  {}  {}: {}  {} ago",
            f.path,
            outcome_name(f.outcome),
            f.reason,
            human_duration(now_secs.saturating_sub(f.at_ms / 1000))
        );
    }
}

/// `gc roots: 3 path(s), 1.2 MiB NAR in DIR (limit 20.0 GiB)`, with what is wrong after it.
fn gc_roots_line(roots: &GcRootsStatus) -> String {
    let Some(dir) = &roots.dir else {
        return "gc roots: off (gc_roots_dir = \"\"); queued paths are not protected from nix-store --gc"
            .to_owned();
    };
    let mut line = format!(
        "gc roots: {} path(s), {} NAR in {dir} (limit {})",
        roots.rooted_paths,
        human_bytes(roots.rooted_bytes),
        human_bytes(roots.max_bytes)
    );
    if roots.over_limit_unrooted > 0 {
        let _ = write!(
            line,
            "; {} failed path(s) unrooted over the limit",
            roots.over_limit_unrooted
        );
    }
    for problem in [&roots.error, &roots.warning].into_iter().flatten() {
        let _ = write!(line, "\n          ERROR: {problem}");
    }
    line
}

/// Compressed size as a percentage of the NAR size.
fn ratio(nar_bytes: u64, file_bytes: u64) -> Option<f64> {
    (nar_bytes > 0).then(|| file_bytes as f64 * 100.0 / nar_bytes as f64)
}

/// `3 uploaded (12.3 MiB NAR → 3.1 MiB stored, 25 %), 4 skipped (…), 1 excluded, 0 held back, 0 failed`.
fn totals_line(t: &Totals) -> String {
    let ratio = ratio(t.nar_bytes, t.file_bytes)
        .map(|p| format!(", {p:.0} %"))
        .unwrap_or_default();
    format!(
        "{} uploaded ({} NAR → {} stored{ratio}), {} skipped ({} already there, {} upstream, {} gone), \
         {} excluded, {} held back, {} failed",
        t.uploaded,
        human_bytes(t.nar_bytes),
        human_bytes(t.file_bytes),
        t.already_present + t.skipped_upstream + t.skipped_gone,
        t.already_present,
        t.skipped_upstream,
        t.skipped_gone,
        t.excluded,
        t.held_back,
        t.failed
    )
}

/// A target's statistics on one line: `key: value, …` for an object, the JSON text otherwise.
fn flat_stats(stats: &serde_json::Value) -> String {
    match stats.as_object() {
        Some(map) => map
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}: {s}"),
                other => format!("{k}: {other}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        None => stats.to_string(),
    }
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Uploaded => "uploaded",
        Outcome::AlreadyPresent => "already present",
        Outcome::SkippedUpstream => "skipped (upstream has it)",
        Outcome::Excluded => "excluded",
        Outcome::SkippedGone => "skipped (gone)",
        Outcome::Failed => "failed",
        Outcome::HeldBack => "held back",
    }
}

/// `1h 02m`, `3m 12s`, `45s`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m {:02}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> StatusReport {
        StatusReport {
            version: STATUS_VERSION,
            queued: 2,
            in_flight: 0,
            done: 0,
            failed: 1,
            refused: 1,
            skipped: 0,
            excluded: 0,
            spooled: 0,
            up_to_date: false,
            last_upload_at: None,
            state_dir_error: None,
            queue_damage: None,
            watcher: WatcherStatus {
                active: true,
                reason: None,
                rescan_secs: 30,
            },
            gc_roots: GcRootsStatus {
                dir: Some("/nix/var/nix/gcroots/nixpush".into()),
                rooted_paths: 3,
                rooted_bytes: 4096,
                max_bytes: 20 << 30,
                over_limit_unrooted: 0,
                error: None,
                warning: None,
            },
            daemon: DaemonInfo {
                pid: 42,
                started_at: 1_700_000_000,
                uptime_secs: 75,
                hold: true,
            },
            target: TargetInfo {
                url: "file:///var/cache/nix".into(),
                state: TargetState::Hold,
                message: "uploads held (--hold)".into(),
                reachable: None,
                authorized: None,
                read_url: None,
                stats: None,
                degraded: None,
                filtered: FilterStatus::default(),
                upload_rate: Some(UploadRate {
                    limit_bytes_per_sec: Some(524_288),
                    source: "rate_schedule 09:00–18:00".into(),
                    held: false,
                    measured_bytes_per_sec: 0,
                    next_change_local: Some("18:00".into()),
                    next_change_at: Some(1_700_028_000),
                }),
            },
            in_flight_uploads: vec![],
            recent: vec![],
            failed_paths: vec![FailedPath {
                target: None,
                path: StorePath::parse(
                    "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top",
                    "/nix/store",
                )
                .unwrap(),
                state: "failed".into(),
                attempts: 10,
                last_error: Some("HTTP 500".into()),
                next_attempt_at: None,
            }],
            refused_requests: vec![RefusedRequest {
                input: "/tmp/x".into(),
                reason: "not inside the store directory /nix/store".into(),
                peer_uid: Some(0),
                source: "socket".into(),
                at_ms: 1_700_000_070_000,
            }],
            totals: TotalsReport::default(),
            targets: Default::default(),
        }
    }

    /// `status --json` is a contract for scripts: its JSON is pinned, so a change is deliberate.
    #[test]
    fn json_is_pinned() {
        let mut report = sample();
        report.recent = vec![FinishedPath {
            target: None,
            path: report.failed_paths[0].path.clone(),
            outcome: Outcome::SkippedUpstream,
            nar_size: Some(400),
            file_size: None,
            duration_ms: 12,
            reason: Some("served by https://cache.nixos.org".into()),
            finished_at_ms: 1_700_000_080_000,
        }];
        report.totals.all_time.uploaded = 7;
        report.totals.since_start.file_bytes = 216;
        report.totals.since_start.excluded = 1;
        report.totals.since_start.held_back = 1;
        report.target.filtered = FilterStatus {
            excluded: 1,
            held_back: 1,
            waiting_for_retry: 1,
            recent: vec![FilteredPath {
                path: report.failed_paths[0].path.clone(),
                outcome: Outcome::HeldBack,
                reason: HELD_BACK_REASON.into(),
                at_ms: 1_700_000_080_000,
            }],
        };
        assert_eq!(serde_json::to_string(&report).unwrap(), GOLDEN_STATUS);
        let back: StatusReport = serde_json::from_str(GOLDEN_STATUS).unwrap();
        assert_eq!(back, report);
    }

    const HELD_BACK_REASON: &str =
        "reference /nix/store/a7hnr9dcmx3qkkn8a20g7md1wya5zc9l-secret is excluded \
        (matches exclude pattern \"*-secret\") and neither the target nor an upstream has it";

    const GOLDEN_STATUS: &str = concat!(
        r#"{"version":1,"queued":2,"in_flight":0,"done":0,"failed":1,"refused":1,"skipped":0,"excluded":0,"#,
        r#""spooled":0,"up_to_date":false,"last_upload_at":null,"state_dir_error":null,"queue_damage":null,"#,
        r#""watcher":{"active":true,"reason":null,"rescan_secs":30},"#,
        r#""gc_roots":{"dir":"/nix/var/nix/gcroots/nixpush","rooted_paths":3,"rooted_bytes":4096,"#,
        r#""max_bytes":21474836480,"over_limit_unrooted":0,"error":null,"warning":null},"daemon":{"pid":42,"#,
        r#""started_at":1700000000,"uptime_secs":75,"hold":true},"target":{"url":"file:///var/cache/nix","#,
        r#""state":"hold","message":"uploads held (--hold)","reachable":null,"authorized":null,"#,
        r#""read_url":null,"stats":null,"degraded":null,"filtered":{"excluded":1,"held_back":1,"#,
        r#""waiting_for_retry":1,"recent":[{"path":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","#,
        r#""outcome":"held_back","reason":"reference /nix/store/a7hnr9dcmx3qkkn8a20g7md1wya5zc9l-secret is "#,
        r#"excluded (matches exclude pattern \"*-secret\") and neither the target nor an upstream has it","#,
        r#""at_ms":1700000080000}]},"upload_rate":{"limit_bytes_per_sec":524288,"#,
        r#""source":"rate_schedule 09:00–18:00","held":false,"measured_bytes_per_sec":0,"#,
        r#""next_change_local":"18:00","next_change_at":1700028000}},"in_flight_uploads":[],"#,
        r#""recent":[{"path":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","#,
        r#""outcome":"skipped_upstream","nar_size":400,"file_size":null,"duration_ms":12,"#,
        r#""reason":"served by https://cache.nixos.org","finished_at_ms":1700000080000}],"#,
        r#""failed_paths":[{"path":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","state":"failed","#,
        r#""attempts":10,"last_error":"HTTP 500","next_attempt_at":null}],"#,
        r#""refused_requests":[{"input":"/tmp/x","reason":"not inside the store directory /nix/store","#,
        r#""peer_uid":0,"source":"socket","at_ms":1700000070000}],"totals":{"since_start":{"uploaded":0,"#,
        r#""already_present":0,"skipped_upstream":0,"excluded":1,"skipped_gone":0,"failed":0,"#,
        r#""nar_bytes":0,"file_bytes":216,"held_back":1},"all_time":{"uploaded":7,"already_present":0,"#,
        r#""skipped_upstream":0,"excluded":0,"skipped_gone":0,"failed":0,"nar_bytes":0,"file_bytes":0,"#,
        r#""held_back":0}},"targets":{}}"#,
    );

    #[test]
    fn json_shape_is_flat_and_stable() {
        let json = serde_json::to_value(sample()).unwrap();
        for key in [
            "version",
            "queued",
            "in_flight",
            "done",
            "failed",
            "refused",
            "skipped",
            "excluded",
            "spooled",
        ] {
            assert!(json[key].is_u64(), "{key} is not an integer: {json}");
        }
        assert_eq!(json["target"]["state"], "hold");
        assert_eq!(json["daemon"]["hold"], true);
        assert!(json["totals"]["all_time"]["nar_bytes"].is_u64());
        assert_eq!(
            json["failed_paths"][0]["next_attempt_at"],
            serde_json::Value::Null
        );
        let back: StatusReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn render_mentions_counts_failures_and_refusals() {
        let text = sample().render(1_700_000_075);
        assert!(text.contains("2 queued"), "{text}");
        assert!(text.contains("uploads held"), "{text}");
        assert!(text.contains("HTTP 500"), "{text}");
        assert!(text.contains("not inside the store directory"), "{text}");
        assert!(text.contains("5s ago"), "{text}");
        assert!(
            text.contains(
                "gc roots: 3 path(s), 4.0 KiB NAR in /nix/var/nix/gcroots/nixpush (limit 20.0 GiB)"
            ),
            "{text}"
        );
        let mut report = sample();
        report.gc_roots.over_limit_unrooted = 2;
        report.gc_roots.error = Some("cannot create GC roots in /x: Permission denied".into());
        let text = report.render(1_700_000_075);
        assert!(
            text.contains("2 failed path(s) unrooted over the limit"),
            "{text}"
        );
        assert!(
            text.contains("ERROR: cannot create GC roots in /x"),
            "{text}"
        );
        report.gc_roots.dir = None;
        assert!(report.render(0).contains("gc roots: off"));
    }

    #[test]
    fn older_reports_without_new_fields_still_parse() {
        let mut json = serde_json::to_value(sample()).unwrap();
        let object = json.as_object_mut().unwrap();
        object.remove("up_to_date");
        object.remove("last_upload_at");
        object.remove("state_dir_error");
        object.remove("gc_roots");
        let target = object["target"].as_object_mut().unwrap();
        for key in ["reachable", "authorized", "read_url", "stats", "filtered"] {
            target.remove(key);
        }
        let back: StatusReport = serde_json::from_value(json).unwrap();
        let mut expected = sample();
        expected.gc_roots = GcRootsStatus::default();
        assert_eq!(back, expected);
    }

    fn path(name: &str) -> StorePath {
        StorePath::parse(
            &format!("/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-{name}"),
            "/nix/store",
        )
        .unwrap()
    }

    #[test]
    fn render_answers_whether_the_cache_is_up_to_date() {
        let now = 1_700_000_100;
        let mut report = sample();
        report.daemon.hold = false;
        report.queued = 0;
        report.failed = 0;
        report.failed_paths.clear();
        report.up_to_date = true;
        report.last_upload_at = Some(now - 120);
        report.target = TargetInfo {
            url: "http://127.0.0.1:8080".into(),
            state: TargetState::Idle,
            message: "queue empty".into(),
            reachable: Some(true),
            authorized: Some(true),
            read_url: Some("http://127.0.0.1:8080".into()),
            stats: Some(serde_json::json!({"paths": 12, "size": "3 GiB"})),
            degraded: None,
            filtered: FilterStatus::default(),
            upload_rate: Some(UploadRate {
                limit_bytes_per_sec: Some(512 * 1024),
                source: "rate_schedule 09:00–18:00".into(),
                held: false,
                measured_bytes_per_sec: 500 * 1024,
                next_change_local: Some("18:00".into()),
                next_change_at: Some(now + 3600),
            }),
        };
        report.recent = vec![FinishedPath {
            target: None,
            path: path("hello-2.12"),
            outcome: Outcome::Uploaded,
            nar_size: Some(4 * 1024 * 1024),
            file_size: Some(1024 * 1024),
            duration_ms: 800,
            reason: None,
            finished_at_ms: (now - 120) * 1000,
        }];
        report.totals.since_start.uploaded = 1;
        report.totals.since_start.nar_bytes = 4 * 1024 * 1024;
        report.totals.since_start.file_bytes = 1024 * 1024;
        let text = report.render(now);
        let first = text.lines().next().unwrap();
        assert!(first.starts_with("up to date"), "{text}");
        assert!(first.contains("last upload 2m 00s ago"), "{text}");
        assert!(text.contains("reachable, credentials accepted"), "{text}");
        assert!(
            text.contains("target reports: paths: 12, size: 3 GiB"),
            "{text}"
        );
        assert!(
            text.contains("uploaded 4.0 MiB → 1.0 MiB (25 %), 0.8 s  2m 00s ago"),
            "{text}"
        );
        assert!(
            text.contains("1 uploaded (4.0 MiB NAR → 1.0 MiB stored, 25 %)"),
            "{text}"
        );

        report.up_to_date = false;
        report.queued = 1;
        report.target.state = TargetState::Paused;
        report.target.authorized = Some(false);
        report.target.message =
            "paused: http://127.0.0.1:8080/nix-cache-info rejected the credentials".into();
        report.in_flight_uploads = vec![InFlightUpload {
            target: None,
            path: path("big"),
            started_at: now - 3,
            nar_bytes_done: 512,
            nar_size: Some(2048),
            phase: Some("preparing".into()),
            wire_bytes_done: 0,
            file_size: None,
        }];
        let text = report.render(now);
        assert!(
            text.contains(
                "rate:     512.0 KiB/s (rate_schedule 09:00–18:00) until 18:00, measured 500.0 KiB/s"
            ),
            "{text}"
        );
        assert!(
            text.starts_with("NOT up to date: uploads paused, 1 path(s) waiting"),
            "{text}"
        );
        assert!(text.contains("credentials REJECTED"), "{text}");
        assert!(
            text.contains("512 B / 2.0 KiB (25 %)  preparing, 3s"),
            "{text}"
        );

        // See: #18
        report.in_flight_uploads[0].phase = Some("uploading".into());
        report.in_flight_uploads[0].file_size = Some(1024);
        report.in_flight_uploads[0].wire_bytes_done = 256;
        report.target.upload_rate = Some(UploadRate {
            limit_bytes_per_sec: Some(0),
            source: "rate_schedule 18:00–18:30".into(),
            held: true,
            measured_bytes_per_sec: 0,
            next_change_local: Some("18:30".into()),
            next_change_at: Some(now + 600),
        });
        let text = report.render(now);
        assert!(
            text.contains("rate:     HELD by rate_schedule 18:00–18:30 until 18:30"),
            "{text}"
        );
        assert!(text.contains(", 256 B / 1.0 KiB sent  uploading"), "{text}");
    }

    #[test]
    fn several_targets_get_a_block_each_and_the_verdict_names_the_one_at_fault() {
        let now = 1_700_000_100;
        let mut report = sample();
        report.daemon.hold = false;
        let target = |url: &str, state, message: &str| TargetReport {
            queued: 1,
            in_flight: 0,
            done: 2,
            failed: 0,
            skipped: 0,
            excluded: 0,
            up_to_date: false,
            last_upload_at: Some(now - 60),
            target: TargetInfo {
                url: url.into(),
                state,
                message: message.into(),
                reachable: Some(state != TargetState::Unreachable),
                authorized: Some(state != TargetState::Paused),
                read_url: None,
                stats: None,
                degraded: None,
                filtered: FilterStatus::default(),
                upload_rate: None,
            },
            in_flight_uploads: Vec::new(),
            recent: Vec::new(),
            failed_paths: Vec::new(),
            totals: TotalsReport::default(),
        };
        report.targets = [
            (
                "default".to_owned(),
                target("file:///a", TargetState::Ok, "uploading"),
            ),
            (
                "offsite".to_owned(),
                target(
                    "https://cache.example.org",
                    TargetState::Paused,
                    "paused: HTTP 401",
                ),
            ),
        ]
        .into();
        report.failed = 0;
        report.up_to_date = false;
        let text = report.render(now);
        assert!(
            text.lines()
                .next()
                .unwrap()
                .contains("offsite: paused: HTTP 401"),
            "{text}"
        );
        assert!(
            text.contains("target default: file:///a (ok): uploading"),
            "{text}"
        );
        assert!(
            text.contains("target offsite: https://cache.example.org (paused)"),
            "{text}"
        );
        assert!(text.contains("credentials REJECTED"), "{text}");
        assert_eq!(
            text.matches("1 queued, 0 in flight, 0 failed").count(),
            2,
            "{text}"
        );
        let back: StatusReport =
            serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        assert_eq!(back.targets["offsite"].target.message, "paused: HTTP 401");
    }

    #[test]
    fn render_counts_what_the_filters_left_out_with_their_reasons() {
        let now = 1_700_000_100;
        let mut report = sample();
        report.daemon.hold = false;
        report.queued = 0;
        report.failed = 0;
        report.failed_paths.clear();
        report.up_to_date = true;
        report.target.filtered = FilterStatus {
            excluded: 2,
            held_back: 1,
            waiting_for_retry: 1,
            recent: vec![
                FilteredPath {
                    path: path("app"),
                    outcome: Outcome::HeldBack,
                    reason: HELD_BACK_REASON.into(),
                    at_ms: (now - 5) * 1000,
                },
                FilteredPath {
                    path: path("secret"),
                    outcome: Outcome::Excluded,
                    reason: "matches exclude pattern \"*-secret\"".into(),
                    at_ms: (now - 5) * 1000,
                },
            ],
        };
        let text = report.render(now);
        let first = text.lines().next().unwrap();
        assert!(
            first.starts_with("up to date")
                && first.ends_with("1 path(s) held back by the target's filters"),
            "{text}"
        );
        assert!(
            text.contains(
                "filters:     2 excluded, 1 held back since start; 1 held back until `nixpush retry`"
            ),
            "{text}"
        );
        assert!(
            text.contains(&format!("-app  held back: {HELD_BACK_REASON}  5s ago")),
            "{text}"
        );
        assert!(
            text.contains("-secret  excluded: matches exclude pattern \"*-secret\"  5s ago"),
            "{text}"
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(3725), "1h 02m");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(100), "100 B");
    }
}
