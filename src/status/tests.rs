//! The `status --json` contract, pinned, and the rendering cases.

use super::*;
use crate::store_path::test_path;

pub(crate) fn sample() -> StatusReport {
    StatusReport {
        version: STATUS_VERSION,
        queued: 2,
        in_flight: 0,
        done: 0,
        failed: 1,
        refused: 1,
        skipped: 0,
        excluded: 0,
        spooled: 0,
        up_to_date: false,
        last_upload_at: None,
        state_dir_error: None,
        queue_damage: None,
        watcher: WatcherStatus {
            active: true,
            reason: None,
            rescan_secs: 30,
        },
        gc_roots: GcRootsStatus {
            dir: Some("/nix/var/nix/gcroots/nixpush".into()),
            rooted_paths: 3,
            rooted_bytes: 4096,
            max_bytes: 20 << 30,
            over_limit_unrooted: 0,
            error: None,
            warning: None,
        },
        daemon: DaemonInfo {
            pid: 42,
            started_at: 1_700_000_000,
            uptime_secs: 75,
            hold: true,
        },
        target: TargetInfo {
            upload_rate: Some(UploadRate {
                limit_bytes_per_sec: Some(524_288),
                source: "rate_schedule 09:00–18:00".into(),
                held: false,
                measured_bytes_per_sec: 0,
                next_change_local: Some("18:00".into()),
                next_change_at: Some(1_700_028_000),
            }),
            ..TargetInfo::new(
                "file:///var/cache/nix",
                TargetState::Hold,
                "uploads held (--hold)",
            )
        },
        in_flight_uploads: vec![],
        recent: vec![],
        failed_paths: vec![FailedPath {
            target: None,
            path: test_path("vec-top"),
            state: "failed".into(),
            attempts: 10,
            last_error: Some("HTTP 500".into()),
            next_attempt_at: None,
        }],
        refused_requests: vec![RefusedRequest {
            input: "/tmp/x".into(),
            reason: "not inside the store directory /nix/store".into(),
            peer_uid: Some(0),
            source: "socket".into(),
            at_ms: 1_700_000_070_000,
        }],
        totals: TotalsReport::default(),
        targets: Default::default(),
    }
}

/// `status --json` is a contract for scripts: its JSON is pinned, so a change is deliberate.
#[test]
fn json_is_pinned() {
    let mut report = sample();
    report.recent = vec![FinishedPath {
        target: None,
        path: report.failed_paths[0].path.clone(),
        outcome: Outcome::SkippedUpstream,
        nar_size: Some(400),
        file_size: None,
        duration_ms: 12,
        reason: Some("served by https://cache.nixos.org".into()),
        finished_at_ms: 1_700_000_080_000,
    }];
    report.totals.all_time.uploaded = 7;
    report.totals.since_start.file_bytes = 216;
    report.totals.since_start.excluded = 1;
    report.totals.since_start.held_back = 1;
    report.target.filtered = FilterStatus {
        excluded: 1,
        held_back: 1,
        waiting_for_retry: 1,
        recent: vec![FilteredPath {
            path: report.failed_paths[0].path.clone(),
            outcome: Outcome::HeldBack,
            reason: HELD_BACK_REASON.into(),
            at_ms: 1_700_000_080_000,
        }],
    };
    assert_eq!(serde_json::to_string(&report).unwrap(), GOLDEN_STATUS);
    let back: StatusReport = serde_json::from_str(GOLDEN_STATUS).unwrap();
    assert_eq!(back, report);
}

const HELD_BACK_REASON: &str =
    "reference /nix/store/a7hnr9dcmx3qkkn8a20g7md1wya5zc9l-secret is excluded \
    (matches exclude pattern \"*-secret\") and neither the target nor an upstream has it";

const GOLDEN_STATUS: &str = concat!(
    r#"{"version":1,"queued":2,"in_flight":0,"done":0,"failed":1,"refused":1,"skipped":0,"excluded":0,"#,
    r#""spooled":0,"up_to_date":false,"last_upload_at":null,"state_dir_error":null,"queue_damage":null,"#,
    r#""watcher":{"active":true,"reason":null,"rescan_secs":30},"#,
    r#""gc_roots":{"dir":"/nix/var/nix/gcroots/nixpush","rooted_paths":3,"rooted_bytes":4096,"#,
    r#""max_bytes":21474836480,"over_limit_unrooted":0,"error":null,"warning":null},"daemon":{"pid":42,"#,
    r#""started_at":1700000000,"uptime_secs":75,"hold":true},"target":{"url":"file:///var/cache/nix","#,
    r#""state":"hold","message":"uploads held (--hold)","reachable":null,"authorized":null,"#,
    r#""read_url":null,"stats":null,"degraded":null,"filtered":{"excluded":1,"held_back":1,"#,
    r#""waiting_for_retry":1,"recent":[{"path":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","#,
    r#""outcome":"held_back","reason":"reference /nix/store/a7hnr9dcmx3qkkn8a20g7md1wya5zc9l-secret is "#,
    r#"excluded (matches exclude pattern \"*-secret\") and neither the target nor an upstream has it","#,
    r#""at_ms":1700000080000}]},"upload_rate":{"limit_bytes_per_sec":524288,"#,
    r#""source":"rate_schedule 09:00–18:00","held":false,"measured_bytes_per_sec":0,"#,
    r#""next_change_local":"18:00","next_change_at":1700028000}},"in_flight_uploads":[],"#,
    r#""recent":[{"path":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","#,
    r#""outcome":"skipped_upstream","nar_size":400,"file_size":null,"duration_ms":12,"#,
    r#""reason":"served by https://cache.nixos.org","finished_at_ms":1700000080000}],"#,
    r#""failed_paths":[{"path":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","state":"failed","#,
    r#""attempts":10,"last_error":"HTTP 500","next_attempt_at":null}],"#,
    r#""refused_requests":[{"input":"/tmp/x","reason":"not inside the store directory /nix/store","#,
    r#""peer_uid":0,"source":"socket","at_ms":1700000070000}],"totals":{"since_start":{"uploaded":0,"#,
    r#""already_present":0,"skipped_upstream":0,"excluded":1,"skipped_gone":0,"failed":0,"#,
    r#""nar_bytes":0,"file_bytes":216,"held_back":1},"all_time":{"uploaded":7,"already_present":0,"#,
    r#""skipped_upstream":0,"excluded":0,"skipped_gone":0,"failed":0,"nar_bytes":0,"file_bytes":0,"#,
    r#""held_back":0}},"targets":{}}"#,
);

#[test]
fn json_shape_is_flat_and_stable() {
    let json = serde_json::to_value(sample()).unwrap();
    for key in [
        "version",
        "queued",
        "in_flight",
        "done",
        "failed",
        "refused",
        "skipped",
        "excluded",
        "spooled",
    ] {
        assert!(json[key].is_u64(), "{key} is not an integer: {json}");
    }
    assert_eq!(json["target"]["state"], "hold");
    assert_eq!(json["daemon"]["hold"], true);
    assert!(json["totals"]["all_time"]["nar_bytes"].is_u64());
    assert_eq!(
        json["failed_paths"][0]["next_attempt_at"],
        serde_json::Value::Null
    );
    let back: StatusReport = serde_json::from_value(json).unwrap();
    assert_eq!(back, sample());
}

#[test]
fn render_mentions_counts_failures_and_refusals() {
    let text = sample().render(1_700_000_075);
    assert!(text.contains("2 queued"), "{text}");
    assert!(text.contains("uploads held"), "{text}");
    assert!(text.contains("HTTP 500"), "{text}");
    assert!(text.contains("not inside the store directory"), "{text}");
    assert!(text.contains("5s ago"), "{text}");
    assert!(
        text.contains(
            "gc roots: 3 path(s), 4.0 KiB NAR in /nix/var/nix/gcroots/nixpush (limit 20.0 GiB)"
        ),
        "{text}"
    );
    let mut report = sample();
    report.gc_roots.over_limit_unrooted = 2;
    report.gc_roots.error = Some("cannot create GC roots in /x: Permission denied".into());
    let text = report.render(1_700_000_075);
    assert!(
        text.contains("2 failed path(s) unrooted over the limit"),
        "{text}"
    );
    assert!(
        text.contains("ERROR: cannot create GC roots in /x"),
        "{text}"
    );
    report.gc_roots.dir = None;
    assert!(report.render(0).contains("gc roots: off"));
}

#[test]
fn older_reports_without_new_fields_still_parse() {
    let mut json = serde_json::to_value(sample()).unwrap();
    let object = json.as_object_mut().unwrap();
    object.remove("up_to_date");
    object.remove("last_upload_at");
    object.remove("state_dir_error");
    object.remove("gc_roots");
    let target = object["target"].as_object_mut().unwrap();
    for key in ["reachable", "authorized", "read_url", "stats", "filtered"] {
        target.remove(key);
    }
    let back: StatusReport = serde_json::from_value(json).unwrap();
    let mut expected = sample();
    expected.gc_roots = GcRootsStatus::default();
    assert_eq!(back, expected);
}

/// The sample with nothing waiting: not held, nothing queued or failed, up to date.
fn up_to_date_sample() -> StatusReport {
    let mut report = sample();
    report.daemon.hold = false;
    report.queued = 0;
    report.failed = 0;
    report.failed_paths.clear();
    report.up_to_date = true;
    report
}

#[test]
fn render_answers_whether_the_cache_is_up_to_date() {
    let now = 1_700_000_100;
    let mut report = up_to_date_sample();
    report.last_upload_at = Some(now - 120);
    report.target = TargetInfo {
        reachable: Some(true),
        authorized: Some(true),
        read_url: Some("http://127.0.0.1:8080".into()),
        stats: Some(serde_json::json!({"paths": 12, "size": "3 GiB"})),
        upload_rate: Some(UploadRate {
            limit_bytes_per_sec: Some(512 * 1024),
            source: "rate_schedule 09:00–18:00".into(),
            held: false,
            measured_bytes_per_sec: 500 * 1024,
            next_change_local: Some("18:00".into()),
            next_change_at: Some(now + 3600),
        }),
        ..TargetInfo::new("http://127.0.0.1:8080", TargetState::Idle, "queue empty")
    };
    report.recent = vec![FinishedPath {
        target: None,
        path: test_path("hello-2.12"),
        outcome: Outcome::Uploaded,
        nar_size: Some(4 * 1024 * 1024),
        file_size: Some(1024 * 1024),
        duration_ms: 800,
        reason: None,
        finished_at_ms: (now - 120) * 1000,
    }];
    report.totals.since_start.uploaded = 1;
    report.totals.since_start.nar_bytes = 4 * 1024 * 1024;
    report.totals.since_start.file_bytes = 1024 * 1024;
    let text = report.render(now);
    let first = text.lines().next().unwrap();
    assert!(first.starts_with("up to date"), "{text}");
    assert!(first.contains("last upload 2m 00s ago"), "{text}");
    assert!(text.contains("reachable, credentials accepted"), "{text}");
    assert!(
        text.contains("target reports: paths: 12, size: 3 GiB"),
        "{text}"
    );
    assert!(
        text.contains("uploaded 4.0 MiB → 1.0 MiB (25 %), 0.8 s  2m 00s ago"),
        "{text}"
    );
    assert!(
        text.contains("1 uploaded (4.0 MiB NAR → 1.0 MiB stored, 25 %)"),
        "{text}"
    );

    report.up_to_date = false;
    report.queued = 1;
    report.target.state = TargetState::Paused;
    report.target.authorized = Some(false);
    report.target.message =
        "paused: http://127.0.0.1:8080/nix-cache-info rejected the credentials".into();
    report.in_flight_uploads = vec![InFlightUpload {
        target: None,
        path: test_path("big"),
        started_at: now - 3,
        nar_bytes_done: 512,
        nar_size: Some(2048),
        phase: Some("preparing".into()),
        wire_bytes_done: 0,
        file_size: None,
    }];
    let text = report.render(now);
    assert!(
        text.contains(
            "rate:     512.0 KiB/s (rate_schedule 09:00–18:00) until 18:00, measured 500.0 KiB/s"
        ),
        "{text}"
    );
    assert!(
        text.starts_with("NOT up to date: uploads paused, 1 path(s) waiting"),
        "{text}"
    );
    assert!(text.contains("credentials REJECTED"), "{text}");
    assert!(
        text.contains("512 B / 2.0 KiB (25 %)  preparing, 3s"),
        "{text}"
    );

    // See: #18
    report.in_flight_uploads[0].phase = Some("uploading".into());
    report.in_flight_uploads[0].file_size = Some(1024);
    report.in_flight_uploads[0].wire_bytes_done = 256;
    report.target.upload_rate = Some(UploadRate {
        limit_bytes_per_sec: Some(0),
        source: "rate_schedule 18:00–18:30".into(),
        held: true,
        measured_bytes_per_sec: 0,
        next_change_local: Some("18:30".into()),
        next_change_at: Some(now + 600),
    });
    let text = report.render(now);
    assert!(
        text.contains("rate:     HELD by rate_schedule 18:00–18:30 until 18:30"),
        "{text}"
    );
    assert!(text.contains(", 256 B / 1.0 KiB sent  uploading"), "{text}");
}

#[test]
fn several_targets_get_a_block_each_and_the_verdict_names_the_one_at_fault() {
    let now = 1_700_000_100;
    let mut report = sample();
    report.daemon.hold = false;
    let target = |url: &str, state, message: &str| TargetReport {
        queued: 1,
        in_flight: 0,
        done: 2,
        failed: 0,
        skipped: 0,
        excluded: 0,
        up_to_date: false,
        last_upload_at: Some(now - 60),
        target: TargetInfo {
            reachable: Some(state != TargetState::Unreachable),
            authorized: Some(state != TargetState::Paused),
            ..TargetInfo::new(url, state, message)
        },
        in_flight_uploads: Vec::new(),
        recent: Vec::new(),
        failed_paths: Vec::new(),
        totals: TotalsReport::default(),
    };
    report.targets = [
        (
            "default".to_owned(),
            target("file:///a", TargetState::Ok, "uploading"),
        ),
        (
            "offsite".to_owned(),
            target(
                "https://cache.example.org",
                TargetState::Paused,
                "paused: HTTP 401",
            ),
        ),
    ]
    .into();
    report.failed = 0;
    report.up_to_date = false;
    let text = report.render(now);
    assert!(
        text.lines()
            .next()
            .unwrap()
            .contains("offsite: paused: HTTP 401"),
        "{text}"
    );
    assert!(
        text.contains("target default: file:///a (ok): uploading"),
        "{text}"
    );
    assert!(
        text.contains("target offsite: https://cache.example.org (paused)"),
        "{text}"
    );
    assert!(text.contains("credentials REJECTED"), "{text}");
    assert_eq!(
        text.matches("1 queued, 0 in flight, 0 failed").count(),
        2,
        "{text}"
    );
    let back: StatusReport =
        serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
    assert_eq!(back.targets["offsite"].target.message, "paused: HTTP 401");
}

#[test]
fn render_counts_what_the_filters_left_out_with_their_reasons() {
    let now = 1_700_000_100;
    let mut report = up_to_date_sample();
    report.target.filtered = FilterStatus {
        excluded: 2,
        held_back: 1,
        waiting_for_retry: 1,
        recent: vec![
            FilteredPath {
                path: test_path("app"),
                outcome: Outcome::HeldBack,
                reason: HELD_BACK_REASON.into(),
                at_ms: (now - 5) * 1000,
            },
            FilteredPath {
                path: test_path("secret"),
                outcome: Outcome::Excluded,
                reason: "matches exclude pattern \"*-secret\"".into(),
                at_ms: (now - 5) * 1000,
            },
        ],
    };
    let text = report.render(now);
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with("up to date")
            && first.ends_with("1 path(s) held back by the target's filters"),
        "{text}"
    );
    assert!(
        text.contains(
            "filters:     2 excluded, 1 held back since start; 1 held back until `nixpush retry`"
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!("-app  held back: {HELD_BACK_REASON}  5s ago")),
        "{text}"
    );
    assert!(
        text.contains("-secret  excluded: matches exclude pattern \"*-secret\"  5s ago"),
        "{text}"
    );
}

#[test]
fn human_units() {
    assert_eq!(human_duration(59), "59s");
    assert_eq!(human_duration(3725), "1h 02m");
    assert_eq!(human_bytes(1536), "1.5 KiB");
    assert_eq!(human_bytes(100), "100 B");
}
