//! The status report: what the daemon says about itself, its queue and its target. `nixpush status --json`
//! prints it as is, so its JSON shape is a contract for scripts and tests: keep it flat and only ever add fields.
//!
//! ```json
//! {"version":1,"queued":3,"in_flight":0,"done":0,"failed":0,"refused":1,"skipped":0,"excluded":0,"spooled":0,
//!  "daemon":{"pid":4242,"started_at":1732600000,"uptime_secs":12,"hold":true},
//!  "target":{"url":"file:///var/cache/nix","state":"hold","message":"uploads held (--hold)"},
//!  "in_flight_uploads":[],"recent":[],"failed_paths":[],
//!  "refused_requests":[{"input":"/tmp/x","reason":"not inside the store directory /nix/store","peer_uid":0,
//!                       "source":"socket","at_ms":1732600005000}],
//!  "totals":{"since_start":{"uploaded":0,…},"all_time":{"uploaded":0,…}}}
//! ```

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::queue::{HistoryRecord, Outcome, RefusedRecord, TotalsReport};
use crate::store_path::StorePath;

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
    /// Paths since start that matched `exclude`.
    pub excluded: u64,
    /// Spool files waiting to be imported.
    pub spooled: u64,
    /// The daemon process.
    pub daemon: DaemonInfo,
    /// The cache paths are pushed to.
    pub target: TargetInfo,
    /// Uploads running now.
    pub in_flight_uploads: Vec<InFlightUpload>,
    /// The most recently finished paths, newest first.
    pub recent: Vec<HistoryRecord>,
    /// Paths parked as failed, and queued paths whose last attempt failed.
    pub failed_paths: Vec<FailedPath>,
    /// The most recent refused requests, newest first.
    pub refused_requests: Vec<RefusedRecord>,
    /// Counters of finished paths and bytes.
    pub totals: TotalsReport,
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
}

impl StatusReport {
    /// The report as a few readable lines, relative to `now_secs` (Unix seconds).
    pub fn render(&self, now_secs: u64) -> String {
        let mut out = String::new();
        let d = &self.daemon;
        let _ = writeln!(
            out,
            "nixpush daemon (pid {}) up {}{}",
            d.pid,
            human_duration(d.uptime_secs),
            if d.hold { ", uploads held" } else { "" }
        );
        let _ = write!(
            out,
            "target:   {} ({})",
            self.target.url,
            self.target.state.as_str()
        );
        if !self.target.message.is_empty() {
            let _ = write!(out, ": {}", self.target.message);
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "queue:    {} queued, {} in flight, {} failed, {} spooled",
            self.queued, self.in_flight, self.failed, self.spooled
        );
        let _ = writeln!(
            out,
            "finished: {} done, {} skipped, {} excluded since start; {} refused requests all time",
            self.done, self.skipped, self.excluded, self.refused
        );
        let t = &self.totals.all_time;
        let _ = writeln!(
            out,
            "all time: {} uploaded ({} NAR, {} stored)",
            t.uploaded,
            human_bytes(t.nar_bytes),
            human_bytes(t.file_bytes)
        );
        if !self.in_flight_uploads.is_empty() {
            out.push_str("\nuploading:\n");
            for u in &self.in_flight_uploads {
                let size = u.nar_size.map(human_bytes).unwrap_or_else(|| "?".into());
                let _ = writeln!(
                    out,
                    "  {}  {} / {}",
                    u.path,
                    human_bytes(u.nar_bytes_done),
                    size
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
                let _ = writeln!(
                    out,
                    "  {}  {}{}  {} ago",
                    r.path,
                    outcome_name(r.outcome),
                    r.reason
                        .as_deref()
                        .map(|why| format!(" ({why})"))
                        .unwrap_or_default(),
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

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Uploaded => "uploaded",
        Outcome::AlreadyPresent => "already present",
        Outcome::SkippedUpstream => "skipped (upstream has it)",
        Outcome::Excluded => "excluded",
        Outcome::SkippedGone => "skipped (gone)",
        Outcome::Failed => "failed",
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

/// `512 B`, `1.5 KiB`, `12.3 MiB`.
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
            },
            in_flight_uploads: vec![],
            recent: vec![],
            failed_paths: vec![FailedPath {
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
            refused_requests: vec![RefusedRecord::new(
                "/tmp/x",
                "not inside the store directory /nix/store",
                Some(0),
                "socket",
                1_700_000_070_000,
            )],
            totals: TotalsReport::default(),
        }
    }

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
    }

    #[test]
    fn human_units() {
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(3725), "1h 02m");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(100), "100 B");
    }
}
