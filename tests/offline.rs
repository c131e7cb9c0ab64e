//! An offline laptop (issue 19, item 4): a daemon whose target is gone keeps the queue, probes ever less often
//! and logs the outage once, not once per probe; `status` says the cache is not up to date with its exit status.
//! See: #19

use serde_json::Value;

use crate::harness::deadend::{Behaviour, DeadEnd};
use crate::harness::process::wait_until_within;
use crate::util::{add_store_paths, TestDaemon, TestEnv};

/// Connections one probe makes when every one fails: the backend's per-request tries (`REQUEST_ATTEMPTS`).
const TRIES_PER_PROBE: u64 = nixpush::backend::REQUEST_ATTEMPTS as u64;

/// Log lines above debug level that mention `needle`.
fn loud_lines_with(log: &str, needle: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(needle) && !l.contains("DEBUG") && !l.contains("TRACE"))
        .map(str::to_owned)
        .collect()
}

// See: #19
#[test]
fn offline_a_dead_target_is_logged_once_over_many_probes_and_nothing_is_lost() {
    let dead = DeadEnd::start(Behaviour::Close);
    let env = TestEnv::new();
    env.write_config_with("", &format!("url = \"{}/cache\"", dead.url()));
    let daemon = TestDaemon::start_uploading(env);
    let paths = add_store_paths(1);
    assert!(daemon.env.run_hook(&[&paths[0]], None).status.success());

    // Three probes in all: the first, then two more after waits of 5 s and 10 s.
    wait_until_within(
        "three probes of the dead target",
        std::time::Duration::from_secs(180),
        || dead.connections() > 2 * TRIES_PER_PROBE,
    );
    let probes = dead.connections().div_ceil(TRIES_PER_PROBE);
    let log = daemon.log();
    let lines = loud_lines_with(&log, &dead.url());
    assert!(probes >= 3, "{probes} probes");
    assert_eq!(
        lines.len(),
        1,
        "{probes} probes, so one line for the outage:\n{}",
        lines.join("\n")
    );
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
    assert!(lines[0].contains("target not ready"), "{}", lines[0]);
    assert!(lines[0].contains("next try in"), "{}", lines[0]);

    // The path waits, and `status` says the cache is not up to date because the target is unreachable.
    assert_eq!(daemon.queued_paths(), paths);
    let status = daemon.env.nixpush(&["status", "--json"]);
    let report: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(report["target"]["state"], "unreachable", "{report:#}");
    assert_eq!(status.status.code(), Some(4), "{report:#}");
}
