//! The long-running service: opens the queue, serves the hook socket, imports the spool, and shuts down cleanly.
//!
//! [`run`] takes an already bound listener and a [`Shutdown`], so tests and systemd socket activation go through
//! the same code path as a plain start. Everything the tasks share lives in [`Shared`]: the configuration (swapped
//! on SIGHUP), the queue behind the [`Queue`] trait, the group commit, the "work available" signal the upload
//! scheduler waits on, and the engine's status for `nixpush status`.

pub mod auth;
pub mod commit;
mod importer;
pub mod intake;
pub mod lane;
pub mod probe;
mod reload;
mod report;
pub mod resolve;
pub mod scheduler;
mod scrape;
pub mod secrets;
pub mod server;
pub mod shutdown;
pub mod socket;
pub mod state_dir;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::gc_roots::GcRoots;
use crate::queue::{self, Enqueued, HistoryRecord, Outcome, Queue};
use crate::status::{InFlightUpload, StatusReport, TargetState, WatcherStatus};

use crate::store_path::StorePath;
use crate::{spool, systemd};
pub use lane::TargetLane;

pub use shutdown::Shutdown;

/// How long requests already read and the spool import get to finish after a stop signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the daemon could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spool directory could not be prepared.
    #[error(transparent)]
    Spool(#[from] spool::Error),
    /// The queue could not be opened, read or written.
    #[error(transparent)]
    Queue(#[from] queue::Error),
    /// The socket could not be used.
    #[error(transparent)]
    Socket(#[from] socket::Error),
    /// Queue writes could not be made durable.
    #[error(transparent)]
    Commit(#[from] commit::Error),
    /// The state directory is full or read-only; new work is refused until it is not.
    #[error(transparent)]
    StateDir(#[from] state_dir::Error),
    /// The state directory could not be created.
    #[error("cannot create {dir}: {source}")]
    CreateStateDir {
        /// The directory.
        dir: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A blocking task died.
    #[error("a background task failed: {0}")]
    Task(String),
    /// Nix could not be asked whether the paths are valid; the request is to be tried again later.
    #[error("{0}; not queued for now, the request will be tried again")]
    Unchecked(String),
    /// `metrics_listen` could not be bound.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::listen::Error),
}

/// How the daemon runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Accept and persist requests but never upload (`--hold`).
    pub hold: bool,
    /// The file to re-read on SIGHUP.
    pub config_path: Option<PathBuf>,
}

/// What the upload engine reports about the target, for `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineStatus {
    /// The target's state.
    pub state: TargetState,
    /// Why it is in that state.
    pub message: String,
    /// Uploads running now.
    pub in_flight: Vec<InFlightUpload>,
    /// Whether the target answered the last request; `None` until asked.
    pub reachable: Option<bool>,
    /// Whether the target accepted the credentials; `None` until known.
    pub authorized: Option<bool>,
    /// What the target reported the last time it was readied.
    pub info: Option<crate::backend::TargetInfo>,
    /// Why the target cannot take writes now (full, read-only, throttling), while it cannot.
    pub degraded: Option<String>,
}

impl EngineStatus {
    pub(crate) fn initial(hold: bool) -> EngineStatus {
        let (state, message) = if hold {
            (TargetState::Hold, "uploads held (--hold)")
        } else {
            (TargetState::Idle, "starting")
        };
        EngineStatus {
            state,
            message: message.to_owned(),
            in_flight: Vec::new(),
            reachable: None,
            authorized: None,
            info: None,
            degraded: None,
        }
    }
}

/// State shared by the daemon's tasks.
pub struct Shared {
    config: RwLock<Arc<Config>>,
    /// The durable queue, as the first target sees it; refusals and flushes are the same in every view.
    pub queue: Arc<dyn Queue>,
    /// One lane per configured target, in [`Config::target_names`] order.
    pub lanes: Vec<Arc<TargetLane>>,
    /// Makes queue writes durable, one fsync per burst.
    pub commit: commit::GroupCommit,
    /// Turns requests into validated store paths.
    pub resolver: resolve::Resolver,
    /// Whether uploads are held.
    pub hold: bool,
    /// What was wrong with the queue database at startup, if anything.
    pub queue_damage: OnceLock<queue::Damage>,
    /// Whether the spool watcher runs, for `status`.
    pub watcher: Mutex<WatcherStatus>,
    /// Events counted for `/metrics`.
    pub metrics: Arc<crate::metrics::Counters>,
    /// The GC roots of queued paths.
    pub gc_roots: Arc<GcRoots>,
    started_at: SystemTime,
    started: Instant,
}

impl Shared {
    /// Builds the shared state, without GC roots.
    pub fn new(config: Config, queue: Arc<dyn Queue>, hold: bool) -> Arc<Shared> {
        Shared::with_gc_roots(config, queue, hold, Arc::new(GcRoots::disabled()))
    }

    /// [`Shared::new`] with `gc_roots` protecting what is queued.
    pub fn with_gc_roots(
        config: Config,
        queue: Arc<dyn Queue>,
        hold: bool,
        gc_roots: Arc<GcRoots>,
    ) -> Arc<Shared> {
        let mut names = config.target_names();
        if names.is_empty() {
            // A configuration that names no target (only ever unvalidated, in tests) still has the one queue.
            names.push(crate::config::DEFAULT_TARGET.to_owned());
        }
        let lanes: Vec<Arc<TargetLane>> = names
            .iter()
            .map(|name| Arc::new(TargetLane::new(name, &config, &*queue, hold)))
            .collect();
        let queue = lanes
            .first()
            .map(|lane| Arc::clone(&lane.queue))
            .unwrap_or(queue);
        Arc::new(Shared {
            lanes,
            config: RwLock::new(Arc::new(config)),
            commit: commit::GroupCommit::new(queue.clone()),
            queue,
            resolver: resolve::Resolver::new(),
            hold,
            queue_damage: OnceLock::new(),
            watcher: Mutex::new(WatcherStatus::default()),
            metrics: Arc::default(),
            gc_roots,
            started_at: SystemTime::now(),
            started: Instant::now(),
        })
    }

    /// The lane of the target named `name`.
    pub fn lane(&self, name: &str) -> Option<&Arc<TargetLane>> {
        self.lanes.iter().find(|lane| lane.name == name)
    }

    /// The lanes a control command names: the one called `target`, or every lane. The error names the
    /// configured targets.
    pub fn lanes_named(&self, target: Option<&str>) -> Result<Vec<Arc<TargetLane>>, String> {
        match target {
            None => Ok(self.lanes.clone()),
            Some(name) => match self.lane(name) {
                Some(lane) => Ok(vec![Arc::clone(lane)]),
                None => Err(format!(
                    "no target is named {name:?} (configured: {})",
                    self.lanes
                        .iter()
                        .map(|l| l.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            },
        }
    }

    /// The current configuration.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace_config(&self, config: Config) {
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
    }

    /// What taking a request needs, with the current configuration.
    pub fn intake(&self) -> intake::Intake {
        intake::Intake {
            config: self.config(),
            queue: Arc::clone(&self.queue),
            lanes: self.lanes.clone(),
            gc_roots: Arc::clone(&self.gc_roots),
            commit: self.commit.clone(),
            resolver: self.resolver.clone(),
        }
    }

    /// Records and logs a refusal. `via` is `socket` or `spool`.
    pub fn refuse(&self, input: &str, reason: &str, peer_uid: Option<u32>, via: &str) {
        self.intake().refuse(input, reason, peer_uid, via);
    }

    /// Resolves `request`, records its refusals, queues what it names and waits until all of it is on disk; see
    /// [`intake`].
    pub async fn take_request(
        &self,
        request: intake::Request,
    ) -> (resolve::Resolved, Result<Enqueued, Error>) {
        let intake = self.intake();
        tokio::task::spawn_blocking(move || intake.take(&request))
            .await
            .unwrap_or_else(|e| {
                (
                    resolve::Resolved::default(),
                    Err(Error::Task(e.to_string())),
                )
            })
    }

    /// Roots paths `nixpush retry` requeued again; one Nix collected while its root was released (over
    /// `gc_roots_max_bytes`) is recorded as skipped by every target that held it and leaves the queue. Written to
    /// disk by the caller's commit.
    pub async fn reroot_retried(&self, retried: &[StorePath]) {
        let gone = self.gc_roots.restore(retried, &self.config().nix_db).await;
        for path in gone {
            let reason = "garbage-collected before upload (its GC root had been released over \
                          gc_roots_max_bytes)";
            tracing::info!(store_path = %path, "skipped {path}: {reason}");
            for lane in &self.lanes {
                match lane.queue.remove(&path) {
                    Ok(Some(_)) => {}
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::error!(store_path = %path, "cannot update the queue: {e}");
                        continue;
                    }
                }
                let record = HistoryRecord {
                    path: path.clone(),
                    outcome: Outcome::SkippedGone,
                    nar_size: None,
                    file_size: None,
                    duration_ms: 0,
                    reason: Some(reason.to_owned()),
                    finished_at_ms: queue::now_ms(),
                };
                if let Err(e) = lane.queue.record_finished(&record) {
                    tracing::warn!(store_path = %path, "cannot record history: {e}");
                }
            }
            self.gc_roots.entry_finished(&path, &*self.queue);
        }
    }

    /// The status report.
    pub fn report(&self) -> Result<StatusReport, queue::Error> {
        report::build(self)
    }

    /// Entries per state, summed over every target.
    pub fn counts(&self) -> queue::Counts {
        self.lanes
            .iter()
            .map(|l| l.queue.counts())
            .fold(queue::Counts::default(), |sum, c| queue::Counts {
                queued: sum.queued + c.queued,
                uploading: sum.uploading + c.uploading,
                failed: sum.failed + c.failed,
                held_back: sum.held_back + c.held_back,
            })
    }

    fn status_line(&self) -> String {
        let counts = self.counts();
        format!(
            "{} queued, {} uploading, {} failed{}",
            counts.queued,
            counts.uploading,
            counts.failed,
            if self.hold { " (uploads held)" } else { "" }
        )
    }
}

/// Runs the daemon until `shutdown.token` is cancelled, then drains: stop accepting, answer requests already
/// read, flush the queue, `STOPPING=1`, remove the socket.
pub async fn run(
    config: Config,
    listener: socket::Listener,
    shutdown: Shutdown,
    options: Options,
) -> Result<(), Error> {
    let Shutdown {
        token: stop,
        reload,
    } = shutdown;
    // Removes the socket we bound however `run` ends, last (after STOPPING=1 on a clean stop).
    let _socket_file = SocketFile(listener.bound_path.clone());
    let queue_dir = config.state_dir.join("queue");
    create_private_dir(&config.state_dir, 0o711)?;
    create_private_dir(&queue_dir, 0o700)?;
    spool::prepare_dir(&config.spool_dir())?;
    let store_dir = config.store_dir.to_string_lossy().into_owned();
    let present_ttl_ms = config.present_ttl_secs.saturating_mul(1000);
    let opened = tokio::task::spawn_blocking(move || queue::open(&queue_dir, &store_dir))
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
    let queue::Opened {
        queue,
        damage,
        imported_from_sled,
        lock: _queue_lock,
    } = opened;
    if let Some(damage) = &damage {
        tracing::error!("{}", damage.describe());
    }
    if let Some(imported) = imported_from_sled {
        tracing::info!(
            imported,
            "the queue now lives in {}",
            queue.path().display()
        );
    }
    let requeued = queue.requeue_interrupted(queue::now_ms())?;
    if requeued > 0 {
        tracing::info!(requeued, "requeued paths whose upload was interrupted");
    }
    let clamped =
        queue.clamp_future_times(queue::now_ms(), queue::MAX_RETRY_DELAY_MS, present_ttl_ms)?;
    if clamped > 0 {
        tracing::warn!(
            clamped,
            "the clock went back since these were queued; they are due now"
        );
    }
    queue.flush()?;
    let queue = Arc::new(queue);
    let description = listener.describe();
    // Hashing and compression yield to builds; the socket, acks and group commit stay on this runtime. Dropped
    // when `run` returns, abandoning a NAR still being prepared rather than waiting for it behind the builds: its
    // path is still `uploading` in the queue and starts over after a restart.
    let upload_threads = crate::priority::UploadThreads::start(config.upload_priority)
        .map_err(|e| Error::Task(format!("cannot start the upload threads: {e}")))?;
    let gc_roots = Arc::new(GcRoots::from_config(&config));
    let shared_queue: Arc<dyn Queue> = queue.clone();
    gc_roots
        .reconcile(shared_queue.clone(), &config.nix_db)
        .await;
    let nix_db = config.nix_db.clone();
    let shared = Shared::with_gc_roots(config, queue.clone(), options.hold, gc_roots.clone());
    if let Some(damage) = damage {
        let _ = shared.queue_damage.set(damage);
    }
    // Before READY=1: a scraper may connect as soon as systemd reports the daemon up.
    let metrics_endpoint = scrape::start(&shared, stop.clone())?;
    let tasks = TaskTracker::new();
    tasks.spawn(importer::run(shared.clone(), stop.clone()));
    tokio::spawn(gc_roots.maintain(shared_queue, nix_db, stop.clone()));
    lane::adopt_unconfigured(&shared)?;
    for lane in &shared.lanes {
        tokio::spawn(lane::govern_rate(
            shared.clone(),
            Arc::clone(lane),
            stop.clone(),
        ));
    }
    tokio::spawn(watchdog(shared.clone(), stop.clone()));
    tokio::spawn(reload::reload_on_signal(
        shared.clone(),
        reload,
        options.config_path.clone(),
        stop.clone(),
        metrics_endpoint,
    ));
    if !options.hold {
        // Not on `tasks`: shutdown does not wait for uploads. Whatever is mid-upload stays `uploading` in the
        // queue and starts over after the restart.
        tokio::spawn(secrets::watch(shared.clone(), stop.clone()));
        for lane in &shared.lanes {
            tokio::spawn(scheduler::run(
                shared.clone(),
                Arc::clone(lane),
                stop.clone(),
                upload_threads.pool(),
            ));
        }
    }

    let acceptor = server::Acceptor::start(
        listener.socket,
        shared.clone(),
        tokio::runtime::Handle::current(),
        tasks.clone(),
        stop.clone(),
    )
    .map_err(|source| socket::Error::Setup {
        action: "listen on",
        path: PathBuf::from(&description),
        source,
    })?;
    if let Err(e) = systemd::notify(&format!("READY=1\nSTATUS={}", shared.status_line())) {
        tracing::warn!("cannot notify systemd: {e}");
    }
    tracing::info!(
        socket = %description,
        queued = shared.counts().queued,
        targets = %shared
            .lanes
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(","),
        hold = options.hold,
        "nixpush daemon ready"
    );

    stop.cancelled().await;
    // Answers what the accept threads already read before the drain below waits for the rest.
    tokio::task::spawn_blocking(move || acceptor.stop())
        .await
        .map_err(|e| Error::Task(e.to_string()))?;
    tracing::info!("stopped accepting; draining");
    let _ = systemd::notify("STATUS=draining");
    tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still running after {} s; stopping anyway (nothing unacknowledged is lost)",
            DRAIN_TIMEOUT.as_secs()
        );
    }
    let closing = queue.clone();
    tokio::task::spawn_blocking(move || closing.checkpoint())
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
    let stats = queue.commit_stats();
    tracing::info!(
        commits = stats.commits,
        mean_us = (stats.total.as_micros() as u64)
            .checked_div(stats.commits)
            .unwrap_or(0),
        longest_us = stats.longest.as_micros() as u64,
        "queue commits (one fdatasync of the write-ahead log each)"
    );
    let _ = systemd::notify("STOPPING=1");
    tracing::info!("stopped");
    Ok(())
}

/// Creates `dir` with `mode` if it is missing (as systemd's tmpfiles would: the state directory traversable, so
/// hooks reach `spool/`, but not listable; the queue private). An existing directory keeps the mode its admin
/// gave it.
fn create_private_dir(dir: &std::path::Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|source| Error::CreateStateDir {
            dir: dir.to_owned(),
            source,
        })
}

/// The socket path we bound; removed on drop so that no later hook connects to a dead socket.
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("cannot remove socket {}: {e}", path.display());
            }
        }
    }
}

/// Pings the systemd watchdog (and refreshes `STATUS=`) at half of `WATCHDOG_USEC`.
async fn watchdog(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(interval) = systemd::watchdog_interval() else {
        return;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if let Err(e) = systemd::notify(&format!("WATCHDOG=1\nSTATUS={}", shared.status_line())) {
            tracing::warn!("cannot ping the systemd watchdog: {e}");
        }
    }
}
