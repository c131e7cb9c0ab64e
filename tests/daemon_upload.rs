//! The daemon drains real Nix builds into real caches: a `file://` directory and nginx, with an upstream skip, a
//! flaky target, and a crash in the middle of a large upload. Every check ends with real Nix substituting.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;

use nixpush::narinfo::NarInfo;
use nixpush::store_path::StorePath;

use crate::faultproxy::{Fault, FaultProxy};
use crate::nginx::Nginx;
use crate::upload::nix_copy_from;
use crate::util::{nix, nix_build_with_hook, wait_until, TestDaemon, TestEnv, NIX_OPTIONS};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vectors")
}

pub(crate) fn public_key() -> String {
    std::fs::read_to_string(fixtures().join("test-key.pub")).unwrap()
}

/// The test key, copied to a private file as a real secret would be.
pub(crate) fn signing_key(env: &TestEnv) -> PathBuf {
    let path = env.dir.path().join("signing.sec");
    std::fs::copy(fixtures().join("test-key.sec"), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn wrong_key() -> String {
    nixpush::signing::generate("nixpush-test-1")
        .public_key()
        .to_string()
}

fn hash_part(path: &str) -> &str {
    &path["/nix/store/".len().."/nix/store/".len() + 32]
}

/// Every narinfo in `dir` names a NAR that exists; returns how many there are.
fn assert_every_narinfo_has_its_nar(dir: &Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "narinfo") {
            let info =
                NarInfo::parse(&std::fs::read_to_string(&path).unwrap(), "/nix/store").unwrap();
            assert!(
                dir.join(&info.url).exists(),
                "{} has no NAR",
                path.display()
            );
            count += 1;
        }
    }
    count
}

fn assert_substitutes(cache_url: &str, outputs: &[String]) {
    for output in outputs {
        let path = StorePath::parse(output, "/nix/store").unwrap();
        let ok = nix_copy_from(cache_url, &path, &public_key());
        assert!(
            ok.status.success(),
            "{output}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let bad = nix_copy_from(cache_url, &path, &wrong_key());
        assert!(!bad.status.success(), "{output} accepted under a wrong key");
        assert!(String::from_utf8_lossy(&bad.stderr).contains("lacks a valid signature"));
    }
}

#[test]
fn daemon_pushes_hook_builds_to_a_file_cache() {
    let env = TestEnv::new();
    let key = signing_key(&env);
    let cache = env.cache_dir();
    env.write_config_with(
        "",
        &format!(
            "url = \"file://{}\"\nsigning_key_file = \"{}\"",
            cache.display(),
            key.display()
        ),
    );
    let daemon = TestDaemon::start_uploading(env);
    let build = nix_build_with_hook(&daemon.env);
    assert!(build.output.status.success(), "{}", build.stderr());
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");
    for output in &build.outputs {
        assert!(
            cache
                .join(format!("{}.narinfo", hash_part(output)))
                .exists(),
            "{output} not in the cache:\n{}",
            daemon.log()
        );
    }
    assert!(assert_every_narinfo_has_its_nar(&cache) >= build.outputs.len());
    assert!(
        status["done"].as_u64().unwrap() >= build.outputs.len() as u64,
        "{status}"
    );
    assert_substitutes(&format!("file://{}", cache.display()), &build.outputs);
    assert!(
        daemon.log().contains("uploaded /nix/store/"),
        "{}",
        daemon.log()
    );
}

#[test]
fn daemon_pushes_hook_builds_to_nginx_and_skips_upstream_paths() {
    let env = TestEnv::new();
    let key = signing_key(&env);
    let www = env.dir.path().join("www");
    std::fs::create_dir_all(www.join("cache")).unwrap();
    std::fs::create_dir_all(www.join("upstream")).unwrap();
    let nginx = Nginx::start(&www, "");

    // Build first without a hook, put the dependency (ht-a) into the upstream cache, then hand the outputs to
    // the daemon as the hook would.
    let nonce = crate::util::fresh_nonce();
    let out = Command::new("nix-build")
        .arg(crate::util::hooktest_nix())
        .args(["--argstr", "nonce", &nonce])
        .args(NIX_OPTIONS)
        .args(["--option", "substituters", "", "--no-out-link"])
        .output()
        .unwrap();
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
    let copied = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--to",
        ])
        .arg(format!("file://{}/upstream", www.display()))
        .arg(&dep)
        .output()
        .unwrap();
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );

    env.write_config_with(
        &format!("upstream = [\"{}/upstream\"]", nginx.url()),
        &format!(
            "url = \"{}/cache\"\nsigning_key_file = \"{}\"",
            nginx.url(),
            key.display()
        ),
    );
    let daemon = TestDaemon::start_uploading(env);
    let hook = daemon.env.run_hook(&[&top], None);
    assert!(hook.status.success());
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");

    let cache = www.join("cache");
    assert!(
        cache.join(format!("{}.narinfo", hash_part(&top))).exists(),
        "{}",
        daemon.log()
    );
    assert!(
        !cache.join(format!("{}.narinfo", hash_part(&dep))).exists(),
        "the upstream path was uploaded anyway"
    );
    assert!(nginx
        .access_log()
        .contains(&format!("HEAD /upstream/{}.narinfo", hash_part(&dep))));
    let recent = status["recent"].as_array().unwrap();
    assert!(
        recent
            .iter()
            .any(|r| r["path"] == dep.as_str() && r["outcome"] == "skipped_upstream"),
        "{status}"
    );
    assert_every_narinfo_has_its_nar(&cache);
    // The uploaded narinfo still names the upstream path as a reference, signed.
    let text = std::fs::read_to_string(cache.join(format!("{}.narinfo", hash_part(&top)))).unwrap();
    let info = NarInfo::parse(&text, "/nix/store").unwrap();
    assert!(info.references.iter().any(|r| r.as_str() == dep), "{text}");
    let public = nixpush::signing::PublicKey::parse(&public_key()).unwrap();
    assert!(info.verify(&public));
}

#[test]
fn daemon_retries_failed_uploads_and_reports_attempts() {
    let env = TestEnv::new();
    let key = signing_key(&env);
    let www = env.dir.path().join("www");
    std::fs::create_dir_all(www.join("cache")).unwrap();
    let nginx = Nginx::start(&www, "");
    let proxy = FaultProxy::start(
        nginx.port,
        1.0,
        &[
            Fault::ServerError,
            Fault::TooManyRequests,
            Fault::ResetMidBody,
        ],
        std::time::Duration::from_secs(3),
        11,
    );
    proxy.only_matching("PUT /cache/nar/");
    env.write_config_with(
        "",
        &format!(
            "url = \"{}/cache\"\nsigning_key_file = \"{}\"\ntimeout_secs = 2",
            proxy.url(),
            key.display()
        ),
    );
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
    assert_every_narinfo_has_its_nar(&www.join("cache"));
    assert_substitutes(&format!("{}/cache", nginx.url()), &build.outputs);
}

#[test]
fn daemon_killed_mid_upload_finishes_after_restart() {
    let env = TestEnv::new();
    let key = signing_key(&env);
    let cache = env.cache_dir();
    env.write_config_with(
        "",
        &format!(
            "url = \"file://{}\"\nsigning_key_file = \"{}\"\ncompression = \"xz\"\ncompression_level = 6",
            cache.display(),
            key.display()
        ),
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
    assert!(!cache.join(format!("{}.narinfo", hash_part(&big))).exists());
    daemon.restart();
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");
    assert!(cache.join(format!("{}.narinfo", hash_part(&big))).exists());
    let verify = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "store",
            "verify",
            "--store",
        ])
        .arg(format!("file://{}", cache.display()))
        .args(["--trusted-public-keys", &public_key()])
        .arg(&big)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
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

#[test]
fn daemon_skips_a_path_garbage_collected_while_queued() {
    let env = TestEnv::new();
    let key = signing_key(&env);
    let www = env.dir.path().join("www");
    std::fs::create_dir_all(www.join("cache")).unwrap();
    let nginx = Nginx::start(&www, "");
    let proxy = FaultProxy::start(
        nginx.port,
        1.0,
        &[Fault::ServerError],
        std::time::Duration::ZERO,
        5,
    );
    proxy.only_matching("PUT /cache/nar/");
    env.write_config_with(
        "",
        &format!(
            "url = \"{}/cache\"\nsigning_key_file = \"{}\"\nmax_attempts = 1",
            proxy.url(),
            key.display()
        ),
    );
    let daemon = TestDaemon::start_uploading(env);
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
    assert!(!www
        .join("cache")
        .join(format!("{}.narinfo", hash_part(&path)))
        .exists());
}

#[test]
fn daemon_waits_out_a_failing_presence_query_without_spending_attempts() {
    let env = TestEnv::new();
    let key = signing_key(&env);
    let www = env.dir.path().join("www");
    std::fs::create_dir_all(www.join("cache")).unwrap();
    let nginx = Nginx::start(&www, "");
    let proxy = FaultProxy::start(
        nginx.port,
        1.0,
        &[Fault::ServerError],
        std::time::Duration::ZERO,
        13,
    );
    // Every HEAD fails: the target cannot say which paths it has, though nothing is wrong with the paths.
    proxy.only_matching("HEAD /cache/");
    env.write_config_with(
        "",
        &format!(
            "url = \"{}/cache\"\nsigning_key_file = \"{}\"\nmax_attempts = 1",
            proxy.url(),
            key.display()
        ),
    );
    let daemon = TestDaemon::start_uploading(env);
    let paths = crate::util::add_store_paths(2);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    assert!(daemon.env.run_hook(&refs, None).status.success());

    // Two batches in a row give up on the query. With max_attempts = 1, a single charged attempt would park the
    // paths as failed.
    wait_until("two batches given back to the queue", || {
        daemon.log().matches("trying the batch again").count() >= 2
    });
    let status = daemon.status();
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
        assert!(www
            .join("cache")
            .join(format!("{}.narinfo", hash_part(path)))
            .exists());
    }
}
