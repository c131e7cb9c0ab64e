//! The long-running commands run with two glibc malloc arenas, however they were started, so their memory stays
//! flat in the work; a value the user chose is kept.
// See: #16

use crate::util::{TestDaemon, TestEnv};

/// `MALLOC_ARENA_MAX` in the environment the process `pid` runs with now.
fn arena_max(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(b"MALLOC_ARENA_MAX="))
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

#[test]
fn a_daemon_started_without_the_variable_runs_with_two_arenas() {
    let daemon = TestDaemon::start_uploading_with_env(TestEnv::new(), &[("MALLOC_ARENA_MAX", "")]);
    // The pid the test spawned is the daemon that announced READY=1: it ran itself again in place.
    assert_eq!(arena_max(daemon.pid()).as_deref(), Some("2"));
    assert!(daemon.status()["queued"].is_number(), "{}", daemon.log());
}

#[test]
fn a_daemon_keeps_the_arena_limit_it_was_given() {
    let daemon = TestDaemon::start_uploading_with_env(TestEnv::new(), &[("MALLOC_ARENA_MAX", "4")]);
    assert_eq!(arena_max(daemon.pid()).as_deref(), Some("4"));
}
