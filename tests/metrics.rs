//! Prometheus metrics (#18): `/metrics` passes `promtool check metrics`, its figures match `status --json` read
//! at the same moment (the daemon held, or an upload held mid-request), hook requests and spool imports are
//! counted, a Unix socket listener works and follows a reload, a bind error names the key, nothing listens by
//! default, and the example alert rules pass `promtool`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use crate::harness::faultproxy::Fault;
use crate::harness::process::wait_until;
use crate::harness::prometheus::{
    assert_promtool_accepts_metrics, body_of_ok, http_get_tcp, http_get_unix, promtool_run, samples,
};
use crate::harness::setup::{signed_target, HttpCache};
use crate::util::{add_store_paths, TestDaemon, TestEnv};

/// The address the daemon logged it serves metrics on (`127.0.0.1:0` resolves to a free port).
fn metrics_address(daemon: &TestDaemon) -> String {
    let log = daemon.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("serving metrics on "))
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"));
    let rest = &line[line.find("serving metrics on ").unwrap() + "serving metrics on ".len()..];
    rest.split_whitespace().next().unwrap().to_owned()
}

fn scrape(daemon: &TestDaemon) -> String {
    body_of_ok(&http_get_tcp(&metrics_address(daemon), "/metrics"))
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("{series} not scraped: {samples:#?}"))
}

fn u(status: &Value, pointer: &str) -> f64 {
    status
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{pointer} not in {status}")) as f64
}

/// The gauges that mirror `status --json`, compared one by one.
fn assert_matches_status(m: &BTreeMap<String, f64>, status: &Value) {
    let t = "target=\"default\"";
    for (series, pointer) in [
        (
            format!("nixpush_queue_paths{{{t},state=\"queued\"}}"),
            "/queued",
        ),
        (
            format!("nixpush_queue_paths{{{t},state=\"uploading\"}}"),
            "/in_flight",
        ),
        (
            format!("nixpush_queue_paths{{{t},state=\"failed\"}}"),
            "/failed",
        ),
        ("nixpush_spool_files".to_owned(), "/spooled"),
        (
            "nixpush_start_time_seconds".to_owned(),
            "/daemon/started_at",
        ),
        (
            format!("nixpush_uploads_total{{{t}}}"),
            "/totals/since_start/uploaded",
        ),
        (
            format!("nixpush_uploaded_bytes_total{{{t},kind=\"nar\"}}"),
            "/totals/since_start/file_bytes",
        ),
        (
            format!("nixpush_upload_duration_seconds_count{{{t}}}"),
            "/totals/since_start/uploaded",
        ),
    ] {
        assert_eq!(
            value(m, &series),
            u(status, pointer),
            "{series} vs {pointer}: {status}"
        );
    }
    let in_progress = status["in_flight_uploads"].as_array().unwrap().len() as f64;
    assert_eq!(
        value(m, &format!("nixpush_uploads_in_progress{{{t}}}")),
        in_progress
    );
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    assert_eq!(
        value(m, "nixpush_uploads_held"),
        flag(status["daemon"]["hold"] == true)
    );
    assert_eq!(
        value(m, "nixpush_up_to_date"),
        flag(status["up_to_date"] == true)
    );
    let state = status["target"]["state"].as_str().unwrap();
    assert_eq!(
        value(m, &format!("nixpush_target_state{{{t},state=\"{state}\"}}")),
        1.0
    );
    assert_eq!(
        value(m, &format!("nixpush_target_up{{{t}}}")),
        flag(status["target"]["reachable"] == true)
    );
}

// See: #18
#[test]
fn metrics_are_off_by_default_nothing_listens() {
    let daemon = TestDaemon::start();
    let (tcp, unix) = listening_sockets(daemon.pid());
    assert!(
        tcp.is_empty(),
        "the daemon listens on TCP: {tcp:?}\n{}",
        daemon.log()
    );
    assert_eq!(
        unix,
        vec![daemon.env.socket.display().to_string()],
        "only the hook socket"
    );
    assert!(
        !daemon.log().contains("serving metrics"),
        "{}",
        daemon.log()
    );
}

/// The TCP ports and Unix socket paths process `pid` listens on, from /proc.
fn listening_sockets(pid: u32) -> (Vec<String>, Vec<String>) {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.ok()?.path()).ok()?;
            let link = link.to_str()?;
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut tcp = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // 0A: LISTEN.
            if fields.get(3) == Some(&"0A")
                && inodes.iter().any(|i| Some(&i.as_str()) == fields.get(9))
            {
                tcp.push(fields[1].to_owned());
            }
        }
    }
    let mut unix = Vec::new();
    for line in std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .skip(1)
    {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Flags 00010000: accepting connections.
        if fields.get(3) == Some(&"00010000")
            && inodes.iter().any(|i| Some(&i.as_str()) == fields.get(6))
        {
            unix.push(fields.get(7).unwrap_or(&"").to_string());
        }
    }
    (tcp, unix)
}

// See: #18
#[test]
fn metrics_match_status_while_held_and_count_hook_requests_and_spool_imports() {
    let env = TestEnv::with_config("metrics_listen = \"127.0.0.1:0\"");
    let paths = add_store_paths(3);
    // Spooled while no daemon runs: imported at start.
    assert!(env.run_hook(&[&paths[0]], None).status.success());
    assert_eq!(env.spool_files().len(), 1);
    let daemon = TestDaemon::start_in(env);
    wait_until("the spool imported", || daemon.env.spool_files().is_empty());
    assert!(daemon
        .env
        .run_hook(&[&paths[1], &paths[2]], None)
        .status
        .success());
    assert!(daemon.env.run_hook(&["/etc/passwd"], None).status.success());
    daemon.wait_queued(&paths);

    // Held: nothing moves, so a scrape and a status in a row see the same queue.
    let text = scrape(&daemon);
    let status = daemon.status();
    assert_promtool_accepts_metrics(&text);
    let m = samples(&text);
    assert_matches_status(&m, &status);
    assert_eq!(status["queued"], 3, "{status}");
    assert_eq!(
        value(&m, "nixpush_hook_requests_total{result=\"acked\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(&m, "nixpush_hook_requests_total{result=\"refused\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(&m, "nixpush_hook_requests_total{result=\"error\"}"),
        0.0,
        "{text}"
    );
    assert_eq!(
        value(&m, "nixpush_spool_imports_total{result=\"imported\"}"),
        1.0,
        "{text}"
    );
    let uptime = u(&status, "/daemon/uptime_secs");
    let oldest = value(&m, "nixpush_queue_oldest_age_seconds{target=\"default\"}");
    assert!(oldest <= uptime + 1.0, "oldest {oldest} s, up {uptime} s");
    assert_eq!(
        value(
            &m,
            "nixpush_target_state{target=\"default\",state=\"hold\"}"
        ),
        1.0
    );

    // Only /metrics, only GET and HEAD.
    let address = metrics_address(&daemon);
    assert!(http_get_tcp(&address, "/").starts_with("HTTP/1.1 404 Not Found\r\n"));
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    let post = "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
    std::io::Write::write_all(&mut stream, post.as_bytes()).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
}

// See: #18
#[test]
fn metrics_during_an_upload_match_status() {
    let env = TestEnv::new();
    // Every NAR upload stalls at the proxy (past nothing: the target's timeout is longer) once faults are on.
    let http = HttpCache::with_faults(
        env.dir.path(),
        0.0,
        &[Fault::Stall],
        Duration::from_secs(600),
        7,
    );
    http.proxy.only_matching("PUT /cache/nar/");
    env.write_config_with(
        "metrics_listen = \"127.0.0.1:0\"",
        &signed_target(&env, &http.url(), "timeout_secs = 900"),
    );
    let daemon = TestDaemon::start_uploading(env);
    let paths = add_store_paths(2);
    assert!(daemon.env.run_hook(&[&paths[0]], None).status.success());
    daemon.wait_drained();

    // The second path's NAR is held by the proxy: it stays in flight until the test ends.
    http.proxy.set_rate(1.0);
    assert!(daemon.env.run_hook(&[&paths[1]], None).status.success());
    wait_until("the NAR upload to reach the proxy and stall", || {
        http.proxy.stats.faults.load(Ordering::SeqCst) >= 1
            && daemon.status()["in_flight_uploads"]
                .as_array()
                // A small NAR is handed to the connection at once: then it waits for the server's answer
                // ("narinfo": every byte sent, the narinfo next).
                .is_some_and(|a| {
                    a.iter()
                        .any(|u| u["phase"] == "uploading" || u["phase"] == "narinfo")
                })
    });
    let text = scrape(&daemon);
    let status = daemon.status();
    assert_promtool_accepts_metrics(&text);
    let m = samples(&text);
    assert_matches_status(&m, &status);
    assert_eq!(status["in_flight"], 1, "{status}");
    assert_eq!(status["totals"]["since_start"]["uploaded"], 1, "{status}");
    assert!(
        value(
            &m,
            "nixpush_uploaded_bytes_total{target=\"default\",kind=\"narinfo\"}"
        ) > 0.0
    );
    assert_eq!(
        value(&m, "nixpush_target_up{target=\"default\"}"),
        1.0,
        "{text}"
    );
    let failures: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("nixpush_upload_failures_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(failures, 0.0, "{text}");
}

// See: #18
#[test]
fn metrics_on_a_unix_socket_follow_a_reload_and_count_failures() {
    let env = TestEnv::new();
    let first = env.dir.path().join("run/metrics.sock");
    let second = env.dir.path().join("run/metrics-2.sock");
    // Every NAR upload fails with HTTP 500 and is parked at once.
    let http = HttpCache::with_faults(
        env.dir.path(),
        1.0,
        &[Fault::ServerError],
        Duration::ZERO,
        3,
    );
    http.proxy.only_matching("PUT /cache/nar/");
    let write = |listen: &Path| {
        env.write_config_with(
            &format!("metrics_listen = \"{}\"", listen.display()),
            &signed_target(&env, &http.url(), "max_attempts = 1"),
        )
    };
    write(&first);
    let mut daemon = TestDaemon::start_uploading(env);
    let mode = std::fs::metadata(&first).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let path = add_store_paths(1).remove(0);
    assert!(daemon.env.run_hook(&[&path], None).status.success());
    wait_until("the path parked as failed", || {
        daemon.status()["failed"] == 1
    });
    let text = body_of_ok(&http_get_unix(&first, "/metrics"));
    assert_promtool_accepts_metrics(&text);
    let m = samples(&text);
    assert_matches_status(&m, &daemon.status());
    assert_eq!(
        value(
            &m,
            "nixpush_upload_failures_total{target=\"default\",reason=\"server\"}"
        ),
        1.0,
        "{text}"
    );

    // SIGHUP with another path: the new socket serves, the old one is gone.
    let env = &daemon.env;
    env.write_config_with(
        &format!("metrics_listen = \"{}\"", second.display()),
        &signed_target(env, &http.url(), "max_attempts = 1"),
    );
    daemon.signal("HUP");
    wait_until("the new metrics socket", || {
        second.exists() && !first.exists()
    });
    body_of_ok(&http_get_unix(&second, "/metrics"));
    daemon.stop();
    assert!(!second.exists(), "the metrics socket outlived the daemon");
}

// See: #18
#[test]
fn metrics_bind_error_names_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let env = TestEnv::with_config(&format!("metrics_listen = \"{address}\""));
    let out = env.nixpush(&["daemon", "--hold"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("metrics_listen = \"{address}\"")) && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(!env.socket.exists(), "the hook socket was left behind");
}

// See: #18
#[test]
fn metrics_example_alert_rules_pass_promtool() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = root.join("examples/prometheus/alerts.yml");
    let out = promtool_run(&["check", "rules", rules.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The rules fire on the series nixpush writes, and only then.
    let unit = root.join("tests/fixtures/prometheus/alerts_test.yml");
    let out = promtool_run(&["test", "rules", unit.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let scrape_config =
        std::fs::read_to_string(root.join("examples/prometheus/scrape.yml")).unwrap();
    assert!(scrape_config.contains("127.0.0.1:9464"), "{scrape_config}");
}
