//! `nixpush status` as text: the one-line verdict ("is my cache up to date?") and the readable report.

use std::fmt::Write as _;

use super::*;

impl StatusReport {
    /// One line answering "is my cache up to date?".
    pub fn verdict(&self, now_secs: u64) -> String {
        let waiting = self.queued + self.in_flight + self.spooled;
        let last = last_upload(self.last_upload_at, now_secs);
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
                render_block(&mut out, name, target, d.hold, now_secs);
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
pub(super) fn render_target(out: &mut String, label: &str, t: &TargetInfo, hold: bool) {
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
pub(super) fn render_filtered(out: &mut String, filtered: &FilterStatus, now_secs: u64) {
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
pub(super) fn totals_line(t: &Totals) -> String {
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

/// One target's block in `nixpush status` when there are several.
pub(super) fn render_block(
    out: &mut String,
    name: &str,
    report: &TargetReport,
    hold: bool,
    now_secs: u64,
) {
    render_target(out, &format!("target {name}:"), &report.target, hold);
    let last = last_upload(report.last_upload_at, now_secs);
    let _ = writeln!(
        out,
        "          {} queued, {} in flight, {} failed; {}{last}",
        report.queued,
        report.in_flight,
        report.failed,
        if report.up_to_date {
            "up to date, "
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "          since start: {}",
        totals_line(&report.totals.since_start)
    );
    render_filtered(out, &report.target.filtered, now_secs);
}

/// `last upload 2m ago`, or `no upload recorded yet`.
fn last_upload(at: Option<u64>, now_secs: u64) -> String {
    at.map(|at| {
        format!(
            "last upload {} ago",
            human_duration(now_secs.saturating_sub(at))
        )
    })
    .unwrap_or_else(|| "no upload recorded yet".to_owned())
}
