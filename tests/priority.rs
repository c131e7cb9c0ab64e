//! Uploads yield to builds: the daemon hashes and compresses NARs on `SCHED_IDLE` threads in the idle I/O class,
//! while the threads that serve the hook socket and commit the queue keep the normal policy.
//! `upload_priority = "normal"` turns it off.
// See: #16

use std::path::Path;

use crate::util::{add_store_paths, TestDaemon, TestEnv};

const SCHED_OTHER: u32 = 0;
const SCHED_IDLE: u32 = 5;

/// One thread of the daemon as `/proc` shows it.
#[derive(Debug)]
struct Thread {
    comm: String,
    /// The `policy` field (41st) of `stat`.
    policy: u32,
    io_idle: bool,
}

fn threads(pid: u32) -> Vec<Thread> {
    let task_dir = format!("/proc/{pid}/task");
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(&task_dir).unwrap() {
        let tid: u32 = entry
            .unwrap()
            .file_name()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let dir = Path::new(&task_dir).join(tid.to_string());
        // A thread may end between the listing and the read.
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue;
        };
        // `comm` (the 2nd field) may hold spaces: count from its closing parenthesis.
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        let policy = after_comm.split(' ').nth(38).unwrap().parse().unwrap();
        let io = ioprio::get_priority(ioprio::Target::Process(ioprio::Pid::from_raw(tid as i32)));
        threads.push(Thread {
            comm: comm.trim_end().to_owned(),
            policy,
            io_idle: io.is_ok_and(|p| p.class() == Some(ioprio::Class::Idle)),
        });
    }
    threads
}

/// Starts an uploading daemon, has it upload real store paths sent through the hook, and returns its threads.
fn threads_after_uploading(extra_config: &str) -> (TestDaemon, Vec<Thread>) {
    let daemon = TestDaemon::start_uploading(TestEnv::with_config(extra_config));
    let paths = add_store_paths(3);
    for path in &paths {
        let hook = daemon.env.run_hook(&[path], None);
        assert!(hook.status.success(), "{hook:?}");
    }
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");
    for path in &paths {
        let hash = &path["/nix/store/".len()..][..32];
        let narinfo = daemon.env.cache_dir().join(format!("{hash}.narinfo"));
        assert!(narinfo.exists(), "{path} not uploaded:\n{}", daemon.log());
    }
    let threads = threads(daemon.pid());
    (daemon, threads)
}

#[test]
fn hashing_and_compression_run_at_idle_priority_and_the_socket_threads_do_not() {
    let (daemon, threads) = threads_after_uploading("");
    let upload: Vec<&Thread> = threads
        .iter()
        .filter(|t| t.comm == "nixpush-upload")
        .collect();
    // The idle runtime's worker, plus the blocking thread that prepared the NARs (kept alive between batches):
    // two or more means the NARs were prepared there.
    assert!(
        upload.len() >= 2,
        "no NAR prepared on the idle threads: {threads:?}"
    );
    for thread in &upload {
        assert_eq!(thread.policy, SCHED_IDLE, "{thread:?}");
        assert!(thread.io_idle, "{thread:?} is not in the idle I/O class");
    }
    // The main thread and the runtime that accepts, reads, commits and acks.
    let normal: Vec<&Thread> = threads.iter().filter(|t| t.comm == "nixpush").collect();
    assert!(normal.len() >= 2, "{threads:?}");
    for thread in &normal {
        assert_eq!(thread.policy, SCHED_OTHER, "{thread:?}");
        assert!(!thread.io_idle, "{thread:?} is in the idle I/O class");
    }
    // Hooks are still answered by the normal threads, not spooled.
    let path = &add_store_paths(1)[0];
    let hook = daemon.env.run_hook(&[path], None);
    assert!(hook.status.success() && hook.stderr.is_empty(), "{hook:?}");
    assert!(daemon.env.spool_files().is_empty());
}

#[test]
fn upload_priority_normal_leaves_every_thread_normal() {
    let (_daemon, threads) = threads_after_uploading("upload_priority = \"normal\"");
    assert!(
        !threads.iter().any(|t| t.comm == "nixpush-upload"),
        "{threads:?}"
    );
    for thread in &threads {
        assert_eq!(thread.policy, SCHED_OTHER, "{thread:?}");
        assert!(!thread.io_idle, "{thread:?}");
    }
}
