//! Scheduling priority of upload work: NAR hashing and compression run on threads at idle CPU priority
//! (`SCHED_IDLE`) and in the idle I/O class, so they use only what builds leave over, while the hook socket,
//! acks and the group commit keep the daemon's normal threads.
//!
//! Only the blocking stage that shares nothing with the ack path moves ([`crate::upload::prepare`]: walk,
//! hash, compress, write the staging file). The engine's async part stays normal because it writes the sled
//! queue that acks also wait on: a `SCHED_IDLE` thread preempted inside sled (a log buffer reservation, a
//! flush) would hold every hook behind the builds, a priority inversion. Its CPU use is small.
//!
//! Linux threads inherit the scheduling policy and I/O priority of the thread that creates them, so the
//! compression threads libzstd starts for a NAR (`zstdmt`) are idle as well; a unit test below checks it.
//! The I/O class is set explicitly because the kernel derives it from `SCHED_IDLE` only inside BFQ;
//! mq-deadline treats an unset class as best-effort, and `none` ignores classes.
//!
//! The whole service must not run at idle priority (`CPUSchedulingPolicy=idle` in the unit): acks would then
//! wait behind builds, and every build waits for its hook.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

/// `upload_priority` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadPriority {
    /// Hashing and compression at `SCHED_IDLE` and idle I/O class: builds always go first.
    #[default]
    Idle,
    /// Hashing and compression at the daemon's own priority.
    Normal,
}

/// The name of the idle threads, as `/proc/<pid>/task/<tid>/comm` shows it (at most 15 bytes).
pub const IDLE_THREAD_NAME: &str = "nixpush-upload";

/// Where the upload engine runs its blocking, CPU-heavy work.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    /// `None`: the current runtime's blocking threads.
    idle: Option<Handle>,
}

impl Pool {
    /// The current runtime's blocking threads, at the caller's priority (`nixpush push`, tests).
    pub fn inherit() -> Pool {
        Pool::default()
    }

    /// Runs `work` on one of the pool's threads.
    pub fn spawn_blocking<F, R>(&self, work: F) -> JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        match &self.idle {
            Some(handle) => handle.spawn_blocking(work),
            None => tokio::task::spawn_blocking(work),
        }
    }
}

/// Owns the threads behind an idle [`Pool`]. Dropping it stops them without waiting for work in progress, which
/// may be starved by builds; it is safe in async code.
pub struct UploadThreads {
    runtime: Option<Runtime>,
}

impl UploadThreads {
    /// Starts idle threads for [`UploadPriority::Idle`]; [`UploadPriority::Normal`] needs none.
    pub fn start(priority: UploadPriority) -> std::io::Result<UploadThreads> {
        let runtime = match priority {
            UploadPriority::Normal => None,
            UploadPriority::Idle => Some(
                tokio::runtime::Builder::new_multi_thread()
                    // Only its blocking pool does work; one parked worker is the least a runtime has.
                    .worker_threads(1)
                    .thread_name(IDLE_THREAD_NAME)
                    // Reused from batch to batch rather than started again for each (tokio's default is 10 s);
                    // at most `target.workers` of them, parked when idle.
                    .thread_keep_alive(std::time::Duration::from_secs(600))
                    .on_thread_start(lower_current_thread)
                    .build()?,
            ),
        };
        Ok(UploadThreads { runtime })
    }

    /// The pool that runs work on these threads.
    pub fn pool(&self) -> Pool {
        Pool {
            idle: self.runtime.as_ref().map(|r| r.handle().clone()),
        }
    }
}

impl Drop for UploadThreads {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // A plain drop would block until the work ends, which async code must not do.
            runtime.shutdown_background();
        }
    }
}

/// Moves the calling thread to `SCHED_IDLE` and the idle I/O class. A kernel or seccomp filter that refuses
/// leaves the thread as it was: uploads then compete with builds but still work, so this only warns (once).
pub fn lower_current_thread() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy as Policy,
    };
    let idle = Policy::Normal(NormalThreadSchedulePolicy::Idle);
    let cpu = thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        ThreadPriority::Min,
        idle,
    );
    // The crate also resets the nice value to 0, which a thread already niced above 0 may not do; the policy
    // is what counts (nice has no effect under SCHED_IDLE).
    let cpu_ok = cpu.is_ok() || thread_priority::thread_schedule_policy().ok() == Some(idle);
    let io = ioprio::set_priority(
        ioprio::Target::Process(ioprio::Pid::from_raw(0)),
        ioprio::Priority::new(ioprio::Class::Idle),
    );
    if (!cpu_ok || io.is_err()) && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            cpu = ?cpu.err(),
            io = ?io.err(),
            "cannot lower the priority of the upload threads; uploads will compete with builds"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::io::Write as _;

    const SCHED_OTHER: u32 = 0;
    const SCHED_IDLE: u32 = 5;

    /// The `policy` field (41st) of `/proc/self/task/<tid>/stat`; `comm` (2nd) may hold spaces, so count
    /// from the closing parenthesis.
    fn policy(tid: u32) -> u32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        after_comm.split(' ').nth(38).unwrap().parse().unwrap()
    }

    fn threads_named(name: &str) -> BTreeSet<u32> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|tid: &u32| {
                std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                    .map(|c| c.trim_end() == name)
                    .unwrap_or(false)
            })
            .collect()
    }

    fn io_class_is_idle(tid: u32) -> bool {
        let p = ioprio::get_priority(ioprio::Target::Process(ioprio::Pid::from_raw(tid as i32)))
            .unwrap();
        p.class() == Some(ioprio::Class::Idle)
    }

    #[test]
    fn zstd_compression_threads_inherit_idle_priority() {
        // A unique name: libzstd's threads inherit it, which tells them from other tests' threads.
        const NAME: &str = "idle-inherit";
        std::thread::Builder::new()
            .name(NAME.into())
            .spawn(|| {
                lower_current_thread();
                let me = threads_named(NAME);
                assert_eq!(me.len(), 1);
                let me = *me.first().unwrap();
                assert_eq!(policy(me), SCHED_IDLE);
                assert!(io_class_is_idle(me));
                // The same settings as `upload::prepare`: one compression thread beside this one.
                let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
                encoder.multithread(1).unwrap();
                encoder.write_all(&[7u8; 1 << 20]).unwrap();
                encoder.flush().unwrap();
                let workers: Vec<u32> = threads_named(NAME)
                    .into_iter()
                    .filter(|t| *t != me)
                    .collect();
                assert!(!workers.is_empty(), "libzstd started no thread");
                for tid in workers {
                    assert_eq!(policy(tid), SCHED_IDLE, "zstd thread {tid}");
                    assert!(io_class_is_idle(tid), "zstd thread {tid}");
                }
                encoder.finish().unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[tokio::test]
    async fn idle_pool_runs_work_at_idle_priority_and_normal_pool_does_not() {
        let threads = UploadThreads::start(UploadPriority::Idle).unwrap();
        let tid = || std::fs::read_link("/proc/thread-self").unwrap();
        let read_policy = move || {
            let link = tid();
            let tid: u32 = link.file_name().unwrap().to_str().unwrap().parse().unwrap();
            policy(tid)
        };
        assert_eq!(
            threads.pool().spawn_blocking(read_policy).await.unwrap(),
            SCHED_IDLE
        );
        let normal = UploadThreads::start(UploadPriority::Normal).unwrap();
        assert_eq!(
            normal.pool().spawn_blocking(read_policy).await.unwrap(),
            SCHED_OTHER
        );
        // This test's own thread is untouched.
        assert_eq!(read_policy(), SCHED_OTHER);
    }

    #[test]
    fn config_spelling() {
        #[derive(Deserialize)]
        struct T {
            p: UploadPriority,
        }
        let parse = |s: &str| toml::from_str::<T>(&format!("p = \"{s}\"")).map(|t| t.p);
        assert_eq!(parse("idle").unwrap(), UploadPriority::Idle);
        assert_eq!(parse("normal").unwrap(), UploadPriority::Normal);
        assert!(parse("low").is_err());
    }
}
