//! What `push` shows while it runs: on a terminal, the closure header, then a bar over the whole push and a line
//! per path in flight; otherwise (CI logs) one line per finished path and a summary every ten seconds.
//!
//! Progress counts bytes on the wire, from the same counter the body stream feeds ([`crate::backend::wire`]):
//! a path's NAR counts as done in proportion to its compressed bytes sent (for `file://`, written into the cache),
//! so a NAR that is prepared but not yet sent counts for nothing.
//!
//! ```text
//! 3 path(s) in the closure, 2 to upload (40.0 MiB)
//! ⠙ [###########>------------------]  14.6 MiB/40.0 MiB  1/3 paths  ↑ 1.0 MiB/s  [00:00:14] ETA 25s
//!   abc…-big-file-a                 upload   [#######>------]   7.1 MiB/19.9 MiB   1.0 MiB/s
//!   xyz…-big-file-b                 hash+zstd [##>-----------]   3.0 MiB/20.0 MiB
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::backend::rate::RateLimiter;
use crate::backend::Backend;
use crate::store_path::StorePath;
use crate::upload::{
    human_bytes, upload_line, Engine, InFlight, Observer, PathOutcome, PathReport, Plan,
};

/// Longest path name shown on a per-path line.
const NAME_WIDTH: usize = 40;
/// A path must have been sending this long before its own rate is shown; shorter rates are noise.
const MIN_RATE_MS: u64 = 500;

/// Progress output: bars on a terminal, plain lines otherwise.
pub(super) struct Progress {
    bars: Option<Bars>,
    limiter: Arc<RateLimiter>,
    done_paths: AtomicUsize,
    planned: AtomicUsize,
    /// NAR bytes of paths uploaded.
    done_bytes: AtomicU64,
    planned_bytes: AtomicU64,
    /// Set once the closure header is printed: no per-path line comes before it.
    header_printed: AtomicBool,
    last_summary: Mutex<Instant>,
}

struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    active: Mutex<Vec<(StorePath, ProgressBar)>>,
}

impl Progress {
    pub(super) fn new(terminal: bool, limiter: Arc<RateLimiter>) -> Progress {
        let bars = terminal.then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let overall = multi.add(ProgressBar::new(0));
            overall.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}  [{elapsed_precise}] ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("#>-"),
            );
            overall.enable_steady_tick(Duration::from_millis(120));
            Bars {
                multi,
                overall,
                active: Mutex::new(Vec::new()),
            }
        });
        Progress {
            bars,
            limiter,
            done_paths: AtomicUsize::new(0),
            planned: AtomicUsize::new(0),
            done_bytes: AtomicU64::new(0),
            planned_bytes: AtomicU64::new(0),
            header_printed: AtomicBool::new(false),
            last_summary: Mutex::new(Instant::now()),
        }
    }

    /// `1/3 paths  ↑ 1.0 MiB/s`.
    fn overall_message(&self) -> String {
        format!(
            "{}/{} paths  ↑ {}/s",
            self.done_paths.load(Ordering::Relaxed),
            self.planned.load(Ordering::Relaxed),
            human_bytes(self.limiter.measured_bytes_per_sec())
        )
    }

    /// Prints a line above the bars.
    pub(super) fn note(&self, line: &str) {
        match &self.bars {
            Some(bars) => bars.multi.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    pub(super) fn finish(&self) {
        if let Some(bars) = &self.bars {
            if let Ok(mut active) = bars.active.lock() {
                for (_, bar) in active.drain(..) {
                    bar.finish_and_clear();
                }
            }
            bars.overall.finish_and_clear();
        }
    }

    /// Refreshes the bars from the engine's in-flight view (terminal), or prints a periodic summary.
    pub(super) fn refresh<B: Backend + 'static>(&self, engine: &Engine<B>) {
        let in_flight = engine.in_flight();
        let running: u64 = in_flight.iter().map(nar_bytes_landed).sum();
        let done = self.done_bytes.load(Ordering::Relaxed) + running;
        let Some(bars) = &self.bars else {
            let mut last = self.last_summary.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() >= Duration::from_secs(10) {
                *last = Instant::now();
                eprintln!(
                    "progress: {}/{} paths, {} of {} NAR sent, ↑ {}/s, {} in flight",
                    self.done_paths.load(Ordering::Relaxed),
                    self.planned.load(Ordering::Relaxed),
                    human_bytes(done),
                    human_bytes(self.planned_bytes.load(Ordering::Relaxed)),
                    human_bytes(self.limiter.measured_bytes_per_sec()),
                    in_flight.len()
                );
            }
            return;
        };
        bars.overall.set_position(done);
        bars.overall.set_message(self.overall_message());
        let Ok(mut active) = bars.active.lock() else {
            return;
        };
        active.retain(|(path, bar)| {
            let keep = in_flight.iter().any(|f| &f.path == path);
            if !keep {
                bar.finish_and_clear();
                bars.multi.remove(bar);
            }
            keep
        });
        if !self.header_printed.load(Ordering::Acquire) {
            return;
        }
        for f in &in_flight {
            let bar = match active.iter().find(|(p, _)| p == &f.path) {
                Some((_, bar)) => bar.clone(),
                None => {
                    let bar = bars.multi.add(ProgressBar::new(f.nar_size));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "  {prefix:<40} {msg:<22} [{bar:20}] {bytes:>10}/{total_bytes:<10}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("#>-"),
                    );
                    bar.set_prefix(short_name(f.path.name()));
                    active.push((f.path.clone(), bar.clone()));
                    bar
                }
            };
            let (done, total) = match f.file_size {
                // Sending: compressed bytes on the wire out of the compressed size.
                Some(size) => (f.wire_done.min(size), size),
                // Preparing: NAR bytes hashed and compressed (for file://, written into the cache as they go).
                None => (f.nar_done.min(f.nar_size), f.nar_size),
            };
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(path_message(f));
        }
    }
}

/// The NAR bytes of an in-flight path that count as landed: in proportion to its compressed bytes sent.
fn nar_bytes_landed(f: &InFlight) -> u64 {
    match f.file_size {
        Some(0) => 0,
        Some(size) => (f.nar_size as f64 * (f.wire_done.min(size) as f64 / size as f64)) as u64,
        // file://: the compressed stream goes into the cache as the NAR is read.
        None if f.wire_done > 0 => f.nar_done.min(f.nar_size),
        None => 0,
    }
}

/// `upload 1.0 MiB/s`, `hash+zstd`, `narinfo`: the phase and, once it means something, the path's own rate
/// of bytes on the wire.
fn path_message(f: &InFlight) -> String {
    let writing_into_cache = f.file_size.is_none() && f.wire_done > 0;
    let (phase, since_ms) = match f.phase {
        "preparing" if writing_into_cache => ("zstd→cache", Some(f.elapsed_ms)),
        "preparing" => ("hash+zstd", None),
        "uploading" => ("upload", f.uploading_ms),
        "narinfo" => ("narinfo", None),
        other => (other, None),
    };
    match since_ms {
        Some(ms) if ms >= MIN_RATE_MS => format!(
            "{phase} {}/s",
            human_bytes((f.wire_done as f64 / (ms as f64 / 1000.0)) as u64)
        ),
        _ => phase.to_owned(),
    }
}

/// The name, cut to [`NAME_WIDTH`] characters with an ellipsis.
fn short_name(name: &str) -> String {
    if name.chars().count() <= NAME_WIDTH {
        return name.to_owned();
    }
    let mut short: String = name.chars().take(NAME_WIDTH - 1).collect();
    short.push('…');
    short
}

impl Observer for Progress {
    fn planned(&self, plan: &Plan) {
        self.planned.fetch_add(plan.paths, Ordering::Relaxed);
        self.planned_bytes
            .fetch_add(plan.to_upload_bytes, Ordering::Relaxed);
        let header = format!(
            "{} path(s) in the closure, {} to upload ({})",
            plan.paths,
            plan.to_upload,
            human_bytes(plan.to_upload_bytes)
        );
        if let Some(bars) = &self.bars {
            bars.overall.inc_length(plan.to_upload_bytes);
            bars.overall.set_message(self.overall_message());
        }
        self.note(&header);
        self.header_printed.store(true, Ordering::Release);
    }

    fn path_finished(&self, report: &PathReport) {
        self.done_paths.fetch_add(1, Ordering::Relaxed);
        if report.outcome == PathOutcome::Uploaded {
            self.done_bytes
                .fetch_add(report.nar_size, Ordering::Relaxed);
        }
        let line = match &report.outcome {
            PathOutcome::Uploaded => upload_line(report),
            PathOutcome::AlreadyPresent => format!("present  {}", report.path),
            PathOutcome::SkippedUpstream => format!("upstream {}", report.path),
            PathOutcome::Excluded(reason) => format!("excluded {} ({reason})", report.path),
            PathOutcome::HeldBack(reason) => format!("held back {}: {reason}", report.path),
            PathOutcome::Failed(reason) => format!("failed   {}: {reason}", report.path),
        };
        match &self.bars {
            Some(bars) => {
                bars.overall.set_message(self.overall_message());
                if matches!(
                    report.outcome,
                    PathOutcome::Uploaded | PathOutcome::Failed(_) | PathOutcome::HeldBack(_)
                ) {
                    bars.multi.suspend(|| eprintln!("{line}"));
                }
            }
            None => eprintln!("{line}"),
        }
    }
}

/// Refreshes `progress` five times a second.
pub(super) async fn tick<B: Backend + 'static>(progress: Arc<Progress>, engine: Arc<Engine<B>>) {
    loop {
        progress.refresh(&engine);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight(phase: &'static str, file_size: Option<u64>, wire_done: u64) -> InFlight {
        InFlight {
            path: StorePath::parse(
                "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top",
                "/nix/store",
            )
            .unwrap(),
            nar_size: 1000,
            nar_done: 1000,
            wire_done,
            file_size,
            phase,
            elapsed_ms: 5000,
            uploading_ms: file_size.map(|_| 2000),
        }
    }

    // See: #19
    #[test]
    fn a_prepared_nar_counts_only_as_its_bytes_are_sent() {
        assert_eq!(nar_bytes_landed(&in_flight("preparing", None, 0)), 0);
        assert_eq!(nar_bytes_landed(&in_flight("uploading", Some(400), 0)), 0);
        assert_eq!(
            nar_bytes_landed(&in_flight("uploading", Some(400), 100)),
            250
        );
        // A retried body counts its bytes again on the wire, but a path never counts for more than itself.
        assert_eq!(
            nar_bytes_landed(&in_flight("narinfo", Some(400), 900)),
            1000
        );
        assert_eq!(
            nar_bytes_landed(&in_flight("preparing", None, 300)),
            1000,
            "file://"
        );
    }

    #[test]
    fn per_path_rates_are_wire_bytes_over_the_time_sending() {
        assert_eq!(
            path_message(&in_flight("uploading", Some(4 << 20), 2 << 20)),
            "upload 1.0 MiB/s"
        );
        let mut quick = in_flight("uploading", Some(4 << 20), 2 << 20);
        quick.uploading_ms = Some(20);
        assert_eq!(path_message(&quick), "upload", "no rate from 20 ms");
        assert_eq!(path_message(&in_flight("preparing", None, 0)), "hash+zstd");
        assert_eq!(
            path_message(&in_flight("preparing", None, 5 << 20)),
            "zstd→cache 1.0 MiB/s"
        );
        assert_eq!(short_name(&"x".repeat(60)).chars().count(), NAME_WIDTH);
    }
}
