//! The daemon's counters and its upload-duration histogram: incremented where each event happens (one call per
//! event), rendered at scrape time. They start at zero with the process, as Prometheus expects of counters;
//! totals kept across restarts are in `status` (`totals.all_time`).
//!
//! Label values are bounded: targets come from the configuration, results and reasons from closed lists, so
//! every known combination is written from the first scrape on, at zero, and `increase()` sees the first event.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::upload::FailureClass;

use super::exposition::{Exposition, HistogramSample};

/// Upper bounds of the upload-duration buckets, in seconds: from a small path on a LAN to a large one over a
/// slow link.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// How a hook request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HookResult {
    /// Its paths were queued durably (some may have been refused).
    Acked,
    /// Refused: no path was acceptable, or the peer may not enqueue.
    Refused,
    /// Not answered with an ack: malformed, too slow, or the daemon could not queue it.
    Error,
}

impl HookResult {
    const ALL: [HookResult; 3] = [HookResult::Acked, HookResult::Refused, HookResult::Error];

    fn as_str(self) -> &'static str {
        match self {
            HookResult::Acked => "acked",
            HookResult::Refused => "refused",
            HookResult::Error => "error",
        }
    }
}

/// What became of a spool file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SpoolImport {
    /// Its paths were queued and the file deleted.
    Imported,
    /// Its owner may not enqueue; the refusal was recorded.
    Refused,
    /// It could not be read as a request and was moved to `spool/bad/`.
    Bad,
    /// It could not be queued now and stays for the next scan.
    Kept,
}

impl SpoolImport {
    const ALL: [SpoolImport; 4] = [
        SpoolImport::Imported,
        SpoolImport::Refused,
        SpoolImport::Bad,
        SpoolImport::Kept,
    ];

    fn as_str(self) -> &'static str {
        match self {
            SpoolImport::Imported => "imported",
            SpoolImport::Refused => "refused",
            SpoolImport::Bad => "bad",
            SpoolImport::Kept => "kept",
        }
    }
}

/// Why a path needed no upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// The target already had it.
    AlreadyPresent,
    /// An upstream cache serves it.
    Upstream,
    /// The target's filters leave it out.
    Excluded,
    /// A reference of it is filtered out and no cache has it.
    HeldBack,
    /// It was garbage-collected before its upload.
    Gone,
}

impl Skip {
    const ALL: [Skip; 5] = [
        Skip::AlreadyPresent,
        Skip::Upstream,
        Skip::Excluded,
        Skip::HeldBack,
        Skip::Gone,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Skip::AlreadyPresent => "already_present",
            Skip::Upstream => "upstream",
            Skip::Excluded => "excluded",
            Skip::HeldBack => "held_back",
            Skip::Gone => "gone",
        }
    }
}

/// What kind of file was uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileKind {
    /// A (compressed) NAR.
    Nar,
    /// A narinfo.
    Narinfo,
}

impl FileKind {
    const ALL: [FileKind; 2] = [FileKind::Nar, FileKind::Narinfo];

    fn as_str(self) -> &'static str {
        match self {
            FileKind::Nar => "nar",
            FileKind::Narinfo => "narinfo",
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Histogram {
    buckets: [u64; DURATION_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, value: f64) {
        for (bound, count) in DURATION_BUCKETS.iter().zip(&mut self.buckets) {
            if value <= *bound {
                *count += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    fn sample(&self) -> HistogramSample {
        HistogramSample {
            buckets: DURATION_BUCKETS
                .iter()
                .copied()
                .zip(self.buckets.iter().copied())
                .collect(),
            sum: self.sum,
            count: self.count,
        }
    }
}

/// Per-target figures.
#[derive(Debug, Clone, Default)]
struct PerTarget {
    uploads: u64,
    bytes: BTreeMap<FileKind, u64>,
    failures: BTreeMap<FailureClass, u64>,
    skipped: BTreeMap<Skip, u64>,
    durations: Histogram,
}

#[derive(Debug, Default)]
struct State {
    hook_requests: BTreeMap<HookResult, u64>,
    spool_imports: BTreeMap<SpoolImport, u64>,
    targets: BTreeMap<String, PerTarget>,
}

/// The daemon's counters. Every method is a short critical section, safe to call from any task or thread.
#[derive(Debug, Default)]
pub struct Counters {
    state: Mutex<State>,
}

impl Counters {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn with_target(&self, target: &str, f: impl FnOnce(&mut PerTarget)) {
        self.with(|s| f(s.targets.entry(target.to_owned()).or_default()));
    }

    /// A hook request was answered.
    pub fn hook_request(&self, result: HookResult) {
        self.with(|s| *s.hook_requests.entry(result).or_default() += 1);
    }

    /// A spool file was handled.
    pub fn spool_import(&self, result: SpoolImport) {
        self.with(|s| *s.spool_imports.entry(result).or_default() += 1);
    }

    /// A path was uploaded to `target`: its NAR file of `nar_file_bytes`, in `duration` (preparing included).
    pub fn uploaded(&self, target: &str, nar_file_bytes: u64, duration: Duration) {
        self.with_target(target, |t| {
            t.uploads += 1;
            *t.bytes.entry(FileKind::Nar).or_default() += nar_file_bytes;
            t.durations.observe(duration.as_secs_f64());
        });
    }

    /// A narinfo of `bytes` was written to `target`.
    pub fn narinfo_uploaded(&self, target: &str, bytes: u64) {
        self.with_target(target, |t| {
            *t.bytes.entry(FileKind::Narinfo).or_default() += bytes
        });
    }

    /// An upload attempt of a queued path failed.
    pub fn upload_failed(&self, target: &str, class: FailureClass) {
        self.with_target(target, |t| *t.failures.entry(class).or_default() += 1);
    }

    /// A path needed no upload.
    pub fn skipped(&self, target: &str, why: Skip) {
        self.with_target(target, |t| *t.skipped.entry(why).or_default() += 1);
    }

    /// Writes every counter family, with a zero for each known combination of the `targets` given (and any
    /// target that has counted something).
    pub fn render(&self, out: &mut Exposition, targets: &[&str]) {
        let state = self.with(|s| {
            let mut copy = State {
                hook_requests: s.hook_requests.clone(),
                spool_imports: s.spool_imports.clone(),
                targets: s.targets.clone(),
            };
            for target in targets {
                copy.targets.entry((*target).to_owned()).or_default();
            }
            copy
        });
        out.counter(
            "nixpush_hook_requests_total",
            "Enqueue requests on the hook socket, by how they were answered.",
            HookResult::ALL.iter().map(|r| {
                let n = state.hook_requests.get(r).copied().unwrap_or(0);
                (vec![("result", r.as_str())], n as f64)
            }),
        );
        out.counter(
            "nixpush_spool_imports_total",
            "Spool files the daemon handled, by result.",
            SpoolImport::ALL.iter().map(|r| {
                let n = state.spool_imports.get(r).copied().unwrap_or(0);
                (vec![("result", r.as_str())], n as f64)
            }),
        );
        let targets = &state.targets;
        out.counter(
            "nixpush_uploads_total",
            "Store paths uploaded (NAR and narinfo written).",
            targets
                .iter()
                .map(|(name, t)| (vec![("target", name.as_str())], t.uploads as f64)),
        );
        out.counter(
            "nixpush_uploaded_bytes_total",
            "Bytes uploaded, by kind: nar (the compressed NAR file) or narinfo.",
            targets.iter().flat_map(|(name, t)| {
                FileKind::ALL.iter().map(move |kind| {
                    let n = t.bytes.get(kind).copied().unwrap_or(0);
                    (
                        vec![("target", name.as_str()), ("kind", kind.as_str())],
                        n as f64,
                    )
                })
            }),
        );
        out.counter(
            "nixpush_upload_failures_total",
            "Failed upload attempts of queued paths, by reason class (a path tried three times counts three).",
            targets.iter().flat_map(|(name, t)| {
                FailureClass::ALL.iter().map(move |class| {
                    let n = t.failures.get(class).copied().unwrap_or(0);
                    (
                        vec![("target", name.as_str()), ("reason", class.as_str())],
                        n as f64,
                    )
                })
            }),
        );
        out.counter(
            "nixpush_skipped_paths_total",
            "Store paths that needed no upload, by reason.",
            targets.iter().flat_map(|(name, t)| {
                Skip::ALL.iter().map(move |why| {
                    let n = t.skipped.get(why).copied().unwrap_or(0);
                    (
                        vec![("target", name.as_str()), ("reason", why.as_str())],
                        n as f64,
                    )
                })
            }),
        );
        out.histogram(
            "nixpush_upload_duration_seconds",
            "Time to prepare and upload one store path.",
            targets
                .iter()
                .map(|(name, t)| (vec![("target", name.as_str())], t.durations.sample())),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_with_zeros_for_known_combinations() {
        let counters = Counters::default();
        counters.hook_request(HookResult::Acked);
        counters.hook_request(HookResult::Acked);
        counters.uploaded("default", 1000, Duration::from_millis(300));
        counters.uploaded("default", 24, Duration::from_secs(20));
        counters.narinfo_uploaded("default", 500);
        counters.upload_failed("default", FailureClass::Network);
        let mut out = Exposition::new();
        counters.render(&mut out, &["default", "other"]);
        let text = out.finish();
        for line in [
            "nixpush_hook_requests_total{result=\"acked\"} 2",
            "nixpush_hook_requests_total{result=\"error\"} 0",
            "nixpush_spool_imports_total{result=\"kept\"} 0",
            "nixpush_uploads_total{target=\"default\"} 2",
            "nixpush_uploads_total{target=\"other\"} 0",
            "nixpush_uploaded_bytes_total{target=\"default\",kind=\"nar\"} 1024",
            "nixpush_uploaded_bytes_total{target=\"default\",kind=\"narinfo\"} 500",
            "nixpush_upload_failures_total{target=\"default\",reason=\"network\"} 1",
            "nixpush_upload_failures_total{target=\"other\",reason=\"damaged\"} 0",
            "nixpush_upload_duration_seconds_bucket{target=\"default\",le=\"0.25\"} 0",
            "nixpush_upload_duration_seconds_bucket{target=\"default\",le=\"0.5\"} 1",
            "nixpush_upload_duration_seconds_bucket{target=\"default\",le=\"30\"} 2",
            "nixpush_upload_duration_seconds_bucket{target=\"default\",le=\"+Inf\"} 2",
            "nixpush_upload_duration_seconds_sum{target=\"default\"} 20.3",
            "nixpush_upload_duration_seconds_count{target=\"default\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
