//! The daemon drains real Nix builds into real caches: a `file://` directory and nginx, with an upstream skip, a
//! flaky target, and a crash in the middle of a large upload. Every check ends with real Nix substituting.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nixpush::narinfo::NarInfo;

use crate::harness::cache::{
    assert_every_narinfo_has_its_nar, assert_nix_substitutes, assert_nix_verifies, narinfo_file,
};
use crate::harness::faultproxy::Fault;
use crate::harness::keys::public_key;
use crate::harness::process::output;
use crate::harness::setup::{configure_signed_target, file_url, signed_target, HttpCache};
use crate::util::{nix, nix_build_with_hook, wait_until, TestDaemon, TestEnv, NIX_OPTIONS};

#[test]
fn daemon_pushes_hook_builds_to_a_file_cache() {
    let env = TestEnv::new();
    let cache = env.cache_dir();
    configure_signed_target(&env, &file_url(&env), "");
    let daemon = TestDaemon::start_uploading(env);
    let build = nix_build_with_hook(&daemon.env);
    assert!(build.output.status.success(), "{}", build.stderr());
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");
    for output in &build.outputs {
        assert!(
            narinfo_file(&cache, output).exists(),
            "{output} not in the cache:\n{}",
            daemon.log()
        );
    }
    assert!(assert_every_narinfo_has_its_nar(&cache) >= build.outputs.len());
    assert!(
        status["done"].as_u64().unwrap() >= build.outputs.len() as u64,
        "{status}"
    );
    assert_nix_substitutes(&file_url(&daemon.env), &public_key(), &build.outputs);
    assert!(
        daemon.log().contains("uploaded /nix/store/"),
        "{}",
        daemon.log()
    );
}

#[test]
fn daemon_pushes_hook_builds_to_nginx_and_skips_upstream_paths() {
    let env = TestEnv::new();
    let http = HttpCache::start(env.dir.path());
    let www = &http.www;
    std::fs::create_dir_all(www.join("upstream")).unwrap();

    // Build first without a hook, put the dependency (ht-a) into the upstream cache, then hand the outputs to
    // the daemon as the hook would.
    let nonce = crate::util::fresh_nonce();
    let out = output(
        Command::new("nix-build")
            .arg(crate::util::hooktest_nix())
            .args(["--argstr", "nonce", &nonce])
            .args(NIX_OPTIONS)
            .args(["--option", "substituters", "", "--no-out-link"]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let closure = nix(&["nix-store", "--query", "--requisites", &top]);
    let dep = closure
        .lines()
        .find(|l| l.ends_with("-ht-a"))
        .expect("ht-a in the closure")
        .to_owned();
    let copied = output(
        Command::new("nix")
            .args([
                "--extra-experimental-features",
                "nix-command",
                "copy",
                "--to",
            ])
            .arg(format!("file://{}/upstream", www.display()))
            .arg(&dep),
    );
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );

    env.write_config_with(
        &format!("upstream = [\"{}/upstream\"]", http.nginx.url()),
        &signed_target(&env, &http.direct_url(), ""),
    );
    let daemon = TestDaemon::start_uploading(env);
    let hook = daemon.env.run_hook(&[&top], None);
    assert!(hook.status.success());
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");

    let cache = http.dir();
    assert!(narinfo_file(&cache, &top).exists(), "{}", daemon.log());
    assert!(
        !narinfo_file(&cache, &dep).exists(),
        "the upstream path was uploaded anyway"
    );
    assert!(http.nginx.access_log().contains(&format!(
        "HEAD /upstream/{}",
        narinfo_file(Path::new(""), &dep).display()
    )));
    let recent = status["recent"].as_array().unwrap();
    assert!(
        recent
            .iter()
            .any(|r| r["path"] == dep.as_str() && r["outcome"] == "skipped_upstream"),
        "{status}"
    );
    assert_every_narinfo_has_its_nar(&cache);
    // The uploaded narinfo still names the upstream path as a reference, signed.
    let text = std::fs::read_to_string(narinfo_file(&cache, &top)).unwrap();
    let info = NarInfo::parse(&text, "/nix/store").unwrap();
    assert!(info.references.iter().any(|r| r.as_str() == dep), "{text}");
    let public = nixpush::signing::PublicKey::parse(&public_key()).unwrap();
    assert!(info.verify(&public));
}

#[test]
fn daemon_retries_failed_uploads_and_reports_attempts() {
    let env = TestEnv::new();
    let faults = [
        Fault::ServerError,
        Fault::TooManyRequests,
        Fault::ResetMidBody,
    ];
    let http = HttpCache::with_faults(env.dir.path(), 1.0, &faults, Duration::from_secs(3), 11);
    let proxy = &http.proxy;
    proxy.only_matching("PUT /cache/nar/");
    configure_signed_target(&env, &http.url(), "timeout_secs = 2");
    let daemon = TestDaemon::start_uploading(env);
    let build = nix_build_with_hook(&daemon.env);
    assert!(build.output.status.success(), "{}", build.stderr());

    // While every NAR upload fails, the paths wait with attempts and a reason.
    wait_until("a failed attempt in status", || {
        let status = daemon.status();
        status["failed_paths"].as_array().is_some_and(|f| {
            f.iter()
                .any(|p| p["attempts"].as_u64() >= Some(1) && p["last_error"].is_string())
        })
    });
    assert!(proxy.stats.faults.load(Ordering::SeqCst) > 0);

    // The target comes back, still flaky on every request: everything lands without intervention.
    proxy.only_matching("");
    proxy.set_rate(0.3);
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");
    assert_every_narinfo_has_its_nar(&http.dir());
    assert_nix_substitutes(&http.direct_url(), &public_key(), &build.outputs);
}

#[test]
fn daemon_killed_mid_upload_finishes_after_restart() {
    let env = TestEnv::new();
    let cache = env.cache_dir();
    configure_signed_target(
        &env,
        &file_url(&env),
        "compression = \"xz\"\ncompression_level = 6",
    );
    // A large, compressible path, so that xz keeps the daemon busy long enough to be killed mid-upload.
    let big = big_store_path(&env.dir.path().join("big"), 32);
    let mut daemon = TestDaemon::start_uploading(env);
    let hook = daemon.env.run_hook(&[&big], None);
    assert!(hook.status.success());
    wait_until("the upload to start", || {
        daemon.status()["in_flight_uploads"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    daemon.kill();
    assert!(!narinfo_file(&cache, &big).exists());
    daemon.restart();
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");
    assert!(narinfo_file(&cache, &big).exists());
    assert_nix_verifies(&file_url(&daemon.env), &public_key(), &[big]);
}

/// A store path of `mib` MiB of text, added with `nix-store --add`.
fn big_store_path(dir: &Path, mib: usize) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let nonce = crate::util::fresh_nonce();
    let line = format!("{nonce} the quick brown fox jumps over the lazy dog\n");
    let mut text = String::with_capacity(mib << 20);
    let mut i = 0u64;
    while text.len() < mib << 20 {
        text.push_str(&format!("{i} {line}"));
        i += 1;
    }
    std::fs::write(dir.join("data"), text).unwrap();
    nix(&["nix-store", "--add", dir.to_str().unwrap()])
        .trim()
        .to_owned()
}

/// An uploading daemon with `max_attempts = 1`, so one charged attempt parks a path, in front of an nginx cache
/// whose proxy fails (500) every request matching `only` until its rate is set to 0. The daemon stops first.
struct FailingTarget {
    daemon: TestDaemon,
    http: HttpCache,
}

impl FailingTarget {
    fn start(only: &str, seed: u64) -> FailingTarget {
        let env = TestEnv::new();
        let http = HttpCache::with_faults(
            env.dir.path(),
            1.0,
            &[Fault::ServerError],
            Duration::ZERO,
            seed,
        );
        http.proxy.only_matching(only);
        configure_signed_target(&env, &http.url(), "max_attempts = 1");
        FailingTarget {
            daemon: TestDaemon::start_uploading(env),
            http,
        }
    }
}

#[test]
fn daemon_skips_a_path_garbage_collected_while_queued() {
    let target = FailingTarget::start("PUT /cache/nar/", 5);
    let (daemon, http, proxy) = (&target.daemon, &target.http, &target.http.proxy);
    let path = crate::util::add_store_paths(1).remove(0);
    assert!(daemon.env.run_hook(&[&path], None).status.success());
    wait_until("a failed attempt", || {
        daemon.status()["failed_paths"]
            .as_array()
            .is_some_and(|f| f.iter().any(|p| p["path"] == path.as_str()))
    });
    // Parked after one attempt (max_attempts = 1), so no retry can read the path before it is deleted.
    nix(&["nix-store", "--delete", &path]);
    proxy.set_rate(0.0);
    let retry = daemon.env.nixpush(&["retry", &path]);
    assert!(
        retry.status.success(),
        "{}",
        String::from_utf8_lossy(&retry.stderr)
    );
    let status = daemon.wait_drained();
    let recent = status["recent"].as_array().unwrap();
    let record = recent
        .iter()
        .find(|r| r["path"] == path.as_str())
        .unwrap_or_else(|| panic!("{path} not in history: {status}"));
    assert_eq!(record["outcome"], "skipped_gone", "{record}");
    assert!(
        record["reason"]
            .as_str()
            .unwrap()
            .contains("garbage-collected"),
        "{record}"
    );
    assert!(!narinfo_file(&http.dir(), &path).exists());
}

#[test]
fn daemon_waits_out_a_failing_presence_query_without_spending_attempts() {
    // Every HEAD fails: the target cannot say which paths it has, though nothing is wrong with the paths.
    let target = FailingTarget::start("HEAD /cache/", 13);
    let (daemon, http, proxy) = (&target.daemon, &target.http, &target.http.proxy);
    let paths = crate::util::add_store_paths(2);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    assert!(daemon.env.run_hook(&refs, None).status.success());

    // Two batches in a row give up on the query. With max_attempts = 1, a single charged attempt would park the
    // paths as failed.
    wait_until("two batches given back to the queue", || {
        daemon.log().matches("trying the batch again").count() >= 2
    });
    // Between two batches the paths show as retrying; while a batch runs they are in flight.
    let mut status = daemon.status();
    wait_until("every path shown as retrying between batches", || {
        status = daemon.status();
        let failed = status["failed_paths"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        paths
            .iter()
            .all(|path| failed.iter().any(|p| p["path"] == path.as_str()))
    });
    assert_eq!(status["failed"], 0, "{status}");
    let failed = status["failed_paths"].as_array().unwrap();
    for path in &paths {
        let entry = failed
            .iter()
            .find(|p| p["path"] == path.as_str())
            .unwrap_or_else(|| panic!("{path} not retrying: {status}"));
        assert_eq!(entry["state"], "retrying", "{entry}");
        assert_eq!(entry["attempts"], 0, "{entry}");
        assert!(
            entry["last_error"]
                .as_str()
                .unwrap()
                .contains("cannot ask the target which paths it already has"),
            "{entry}"
        );
    }
    assert!(proxy.stats.faults.load(Ordering::SeqCst) > 0);

    // The target answers again: everything lands.
    proxy.set_rate(0.0);
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");
    for path in &paths {
        assert!(narinfo_file(&http.dir(), path).exists());
    }
}
