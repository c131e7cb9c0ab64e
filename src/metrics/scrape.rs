//! One scrape: the gauges, read from the status report and the queue at that moment (so they always agree with
//! `nixpush status --json`), then the counters.
//!
//! Gauges about targets are written from a list of per-target blocks ([`TargetBlock`]), one per target the
//! report describes. Figures a target or the daemon does not report (a rate limit, GC roots) are left out rather
//! than shown as zero.

use std::collections::BTreeMap;

use crate::queue::Backlog;
use crate::status::{StatusReport, TargetState};

use super::counters::Counters;
use super::exposition::Exposition;

/// The label value of the target configured as `[target]`.
pub const DEFAULT_TARGET: &str = crate::config::DEFAULT_TARGET;

const TARGET_STATES: [TargetState; 5] = [
    TargetState::Idle,
    TargetState::Ok,
    TargetState::Paused,
    TargetState::Unreachable,
    TargetState::Hold,
];

/// What one scrape shows of one target.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetBlock {
    /// The target's name (the `target` label).
    pub name: String,
    /// Paths queued for it (retrying ones included).
    pub queued: u64,
    /// Paths being uploaded to it.
    pub uploading: u64,
    /// Paths parked as failed.
    pub failed: u64,
    /// Queued paths whose last attempt failed.
    pub retrying: u64,
    /// Seconds the longest-waiting queued or uploading path has waited; 0 when none waits.
    pub oldest_queued_age_secs: u64,
    /// Store paths being prepared or uploaded now (closure members included).
    pub uploads_in_progress: u64,
    /// The target's state.
    pub state: TargetState,
    /// Whether the target answered the last request.
    pub reachable: Option<bool>,
    /// Whether it cannot take writes now (full, read-only, throttling).
    pub degraded: bool,
    /// The upload rate limit in force, in bytes per second, where the daemon applies one.
    pub rate_limit_bytes_per_second: Option<u64>,
}

/// Paths and bytes kept from garbage collection by the daemon, where it roots them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcRoots {
    /// Rooted store paths.
    pub paths: u64,
    /// Their NAR bytes.
    pub bytes: u64,
}

/// What one scrape shows of the daemon as a whole.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonBlock {
    /// When the daemon started, in Unix seconds.
    pub started_at: u64,
    /// Started with `--hold`.
    pub hold: bool,
    /// Nothing waits.
    pub up_to_date: bool,
    /// Spool files waiting to be imported.
    pub spooled: u64,
    /// Whether the state directory takes new work.
    pub state_dir_writable: bool,
    /// Whether the queue database was damaged at startup.
    pub queue_damaged: bool,
    /// Whether the spool watcher runs.
    pub spool_watcher_active: bool,
    /// GC roots held, where the daemon holds them.
    pub gc_roots: Option<GcRoots>,
}

/// The blocks of a status report and each target's backlog (by name) at `now_ms`.
pub fn blocks(
    report: &StatusReport,
    backlogs: &BTreeMap<String, Backlog>,
    now_ms: u64,
) -> (DaemonBlock, Vec<TargetBlock>) {
    let daemon = DaemonBlock {
        started_at: report.daemon.started_at,
        hold: report.daemon.hold,
        up_to_date: report.up_to_date,
        spooled: report.spooled,
        state_dir_writable: report.state_dir_error.is_none(),
        queue_damaged: report.queue_damage.is_some(),
        spool_watcher_active: report.watcher.active,
        gc_roots: report.gc_roots.dir.is_some().then_some(GcRoots {
            paths: report.gc_roots.rooted_paths,
            bytes: report.gc_roots.rooted_bytes,
        }),
    };
    let block = |name: &str, figures: Figures<'_>| {
        let backlog = backlogs.get(name).copied().unwrap_or_default();
        TargetBlock {
            name: name.to_owned(),
            queued: figures.queued,
            uploading: figures.in_flight,
            failed: figures.failed,
            retrying: backlog.retrying,
            oldest_queued_age_secs: backlog
                .oldest_enqueued_at_ms
                .map(|at| now_ms.saturating_sub(at) / 1000)
                .unwrap_or(0),
            uploads_in_progress: figures.uploads_in_progress,
            state: figures.target.state,
            reachable: figures.target.reachable,
            degraded: figures.target.degraded.is_some(),
            // Unlimited has no figure; a hold is a limit of 0.
            rate_limit_bytes_per_second: figures.target.upload_rate.as_ref().and_then(|r| {
                if r.held {
                    Some(0)
                } else {
                    r.limit_bytes_per_sec
                }
            }),
        }
    };
    let targets = if report.targets.is_empty() {
        // A report without per-target parts: its top level is the one target's.
        vec![block(
            DEFAULT_TARGET,
            Figures {
                queued: report.queued,
                in_flight: report.in_flight,
                failed: report.failed,
                uploads_in_progress: report.in_flight_uploads.len() as u64,
                target: &report.target,
            },
        )]
    } else {
        report
            .targets
            .iter()
            .map(|(name, t)| {
                block(
                    name,
                    Figures {
                        queued: t.queued,
                        in_flight: t.in_flight,
                        failed: t.failed,
                        uploads_in_progress: t.in_flight_uploads.len() as u64,
                        target: &t.target,
                    },
                )
            })
            .collect()
    };
    (daemon, targets)
}

/// One target's figures as a report states them.
struct Figures<'a> {
    queued: u64,
    in_flight: u64,
    failed: u64,
    uploads_in_progress: u64,
    target: &'a crate::status::TargetInfo,
}

/// One sample per target, labelled with its name.
fn per_target<'a>(
    targets: &'a [TargetBlock],
    value: impl Fn(&TargetBlock) -> f64 + 'a,
) -> impl Iterator<Item = (Vec<(&'a str, &'a str)>, f64)> + 'a {
    targets
        .iter()
        .map(move |t| (vec![("target", t.name.as_str())], value(t)))
}

fn flag(value: bool) -> f64 {
    if value {
        1.0
    } else {
        0.0
    }
}

/// The text of one scrape.
pub fn render(daemon: &DaemonBlock, targets: &[TargetBlock], counters: &Counters) -> String {
    let mut out = Exposition::new();
    out.gauge(
        "nixpush_build_info",
        "Always 1; the version of the running daemon is in the label.",
        [(vec![("version", env!("CARGO_PKG_VERSION"))], 1.0)],
    );
    out.gauge(
        "nixpush_start_time_seconds",
        "When the daemon started, in Unix seconds.",
        [(vec![], daemon.started_at as f64)],
    );
    out.gauge(
        "nixpush_uploads_held",
        "1 when the daemon runs with --hold (accepting, never uploading).",
        [(vec![], flag(daemon.hold))],
    );
    out.gauge(
        "nixpush_up_to_date",
        "1 when no path is queued, uploading, failed or spooled and uploads are not held.",
        [(vec![], flag(daemon.up_to_date))],
    );
    out.gauge(
        "nixpush_spool_files",
        "Spool files waiting to be imported.",
        [(vec![], daemon.spooled as f64)],
    );
    out.gauge(
        "nixpush_spool_watcher_active",
        "1 when the spool watcher runs (0: the spool is only rescanned periodically).",
        [(vec![], flag(daemon.spool_watcher_active))],
    );
    out.gauge(
        "nixpush_state_dir_writable",
        "1 when the state directory takes new work (0: full or read-only, new builds are not queued).",
        [(vec![], flag(daemon.state_dir_writable))],
    );
    out.gauge(
        "nixpush_queue_damaged",
        "1 when the queue database was damaged at startup (see nixpush status).",
        [(vec![], flag(daemon.queue_damaged))],
    );
    if let Some(roots) = daemon.gc_roots {
        out.gauge(
            "nixpush_gc_rooted_paths",
            "Store paths the daemon keeps from garbage collection until they are uploaded.",
            [(vec![], roots.paths as f64)],
        );
        out.gauge(
            "nixpush_gc_rooted_bytes",
            "NAR bytes of the store paths the daemon keeps from garbage collection.",
            [(vec![], roots.bytes as f64)],
        );
    }
    out.gauge(
        "nixpush_queue_paths",
        "Paths in the queue, by state (queued includes those waiting to be retried).",
        targets.iter().flat_map(|t| {
            [
                ("queued", t.queued),
                ("uploading", t.uploading),
                ("failed", t.failed),
            ]
            .map(|(state, n)| {
                (
                    vec![("target", t.name.as_str()), ("state", state)],
                    n as f64,
                )
            })
        }),
    );
    out.gauge(
        "nixpush_queue_retrying_paths",
        "Queued paths whose last upload attempt failed.",
        per_target(targets, |t| t.retrying as f64),
    );
    out.gauge(
        "nixpush_queue_oldest_age_seconds",
        "Age of the longest-waiting queued or uploading path; 0 when none waits.",
        per_target(targets, |t| t.oldest_queued_age_secs as f64),
    );
    out.gauge(
        "nixpush_uploads_in_progress",
        "Store paths being prepared or uploaded right now.",
        per_target(targets, |t| t.uploads_in_progress as f64),
    );
    out.gauge(
        "nixpush_target_up",
        "1 when the target answered the last request (0: unreachable, or not contacted yet).",
        per_target(targets, |t| flag(t.reachable == Some(true))),
    );
    out.gauge(
        "nixpush_target_paused",
        "1 while uploads to the target are paused (credentials refused, state directory full, target unusable).",
        per_target(targets, |t| flag(t.state == TargetState::Paused)),
    );
    out.gauge(
        "nixpush_target_degraded",
        "1 while the target cannot take writes (full, read-only, asking to slow down); uploads resume by themselves.",
        per_target(targets, |t| flag(t.degraded)),
    );
    out.gauge(
        "nixpush_target_state",
        "1 for the target's current state, as nixpush status names it.",
        targets.iter().flat_map(|t| {
            TARGET_STATES.map(|state| {
                (
                    vec![("target", t.name.as_str()), ("state", state.as_str())],
                    flag(t.state == state),
                )
            })
        }),
    );
    out.gauge(
        "nixpush_rate_limit_bytes_per_second",
        "The upload rate limit in force for the target.",
        targets.iter().filter_map(|t| {
            t.rate_limit_bytes_per_second
                .map(|rate| (vec![("target", t.name.as_str())], rate as f64))
        }),
    );
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    counters.render(&mut out, &names);
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_report_reads_as_gauges_per_target() {
        let mut report = crate::status::tests::sample();
        report.in_flight = 1;
        let backlog = Backlog {
            oldest_enqueued_at_ms: Some(1_000),
            retrying: 1,
        };
        let backlogs = BTreeMap::from([(DEFAULT_TARGET.to_owned(), backlog)]);
        let (daemon, targets) = blocks(&report, &backlogs, 3_601_000);
        let text = render(&daemon, &targets, &Counters::default());
        for line in [
            "nixpush_uploads_held 1",
            "nixpush_start_time_seconds 1700000000",
            "nixpush_queue_paths{target=\"default\",state=\"queued\"} 2",
            "nixpush_queue_paths{target=\"default\",state=\"uploading\"} 1",
            "nixpush_queue_paths{target=\"default\",state=\"failed\"} 1",
            "nixpush_queue_retrying_paths{target=\"default\"} 1",
            "nixpush_queue_oldest_age_seconds{target=\"default\"} 3600",
            "nixpush_target_state{target=\"default\",state=\"hold\"} 1",
            "nixpush_target_state{target=\"default\",state=\"paused\"} 0",
            "nixpush_target_up{target=\"default\"} 0",
            "nixpush_uploads_total{target=\"default\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(
            text.contains("\nnixpush_rate_limit_bytes_per_second{target=\"default\"} 524288\n"),
            "{text}"
        );
        assert!(text.contains("\nnixpush_gc_rooted_paths 3\n"), "{text}");
    }

    #[test]
    fn an_unlimited_target_and_roots_turned_off_have_no_made_up_figures() {
        let mut report = crate::status::tests::sample();
        report.target.upload_rate = None;
        report.gc_roots.dir = None;
        let (daemon, targets) = blocks(&report, &BTreeMap::new(), 0);
        let text = render(&daemon, &targets, &Counters::default());
        assert!(
            !text.contains("nixpush_rate_limit_bytes_per_second"),
            "{text}"
        );
        assert!(!text.contains("nixpush_gc_rooted"), "{text}");
    }

    // See: #18
    #[test]
    fn each_target_of_a_report_gets_its_own_labels() {
        let mut report = crate::status::tests::sample();
        let mut offsite = crate::status::TargetReport {
            queued: 4,
            in_flight: 0,
            done: 0,
            failed: 2,
            skipped: 0,
            excluded: 0,
            up_to_date: false,
            last_upload_at: None,
            target: report.target.clone(),
            in_flight_uploads: Vec::new(),
            recent: Vec::new(),
            failed_paths: Vec::new(),
            totals: Default::default(),
        };
        offsite.target.state = TargetState::Paused;
        let mut default = offsite.clone();
        default.queued = 1;
        default.failed = 0;
        default.target.state = TargetState::Ok;
        report.targets = [
            ("default".to_owned(), default),
            ("offsite".to_owned(), offsite),
        ]
        .into();
        let backlogs = BTreeMap::from([(
            "offsite".to_owned(),
            Backlog {
                oldest_enqueued_at_ms: Some(0),
                retrying: 3,
            },
        )]);
        let (daemon, targets) = blocks(&report, &backlogs, 60_000);
        let text = render(&daemon, &targets, &Counters::default());
        for line in [
            "nixpush_queue_paths{target=\"default\",state=\"queued\"} 1",
            "nixpush_queue_paths{target=\"offsite\",state=\"queued\"} 4",
            "nixpush_queue_paths{target=\"offsite\",state=\"failed\"} 2",
            "nixpush_queue_retrying_paths{target=\"offsite\"} 3",
            "nixpush_queue_retrying_paths{target=\"default\"} 0",
            "nixpush_queue_oldest_age_seconds{target=\"offsite\"} 60",
            "nixpush_target_state{target=\"offsite\",state=\"paused\"} 1",
            "nixpush_target_state{target=\"default\",state=\"ok\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn rate_limits_and_gc_roots_are_written_when_known() {
        let report = crate::status::tests::sample();
        let (mut daemon, mut targets) = blocks(&report, &BTreeMap::new(), 0);
        daemon.gc_roots = Some(GcRoots {
            paths: 3,
            bytes: 4096,
        });
        targets[0].rate_limit_bytes_per_second = Some(1_000_000);
        let text = render(&daemon, &targets, &Counters::default());
        assert!(text.contains("\nnixpush_gc_rooted_paths 3\n"), "{text}");
        assert!(text.contains("\nnixpush_gc_rooted_bytes 4096\n"), "{text}");
        assert!(
            text.contains("\nnixpush_rate_limit_bytes_per_second{target=\"default\"} 1000000\n"),
            "{text}"
        );
        assert!(text.contains("nixpush_queue_oldest_age_seconds{target=\"default\"} 0"));
    }
}
