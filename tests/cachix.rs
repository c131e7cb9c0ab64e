//! The Cachix backend against the local Cachix server (`tests/servers/cachix_server.py`), with real Nix
//! substituting what was pushed.

use std::process::Command;
use std::time::Duration;

use nixpush::backend::cachix::{CachixBackend, RetryPolicy};
use nixpush::backend::{Backend, Credentials, Error};
use nixpush::config::{Compression, Config};
use nixpush::secret::Secret;
use nixpush::signing::SecretKey;
use nixpush::store_path::StorePath;
use serde_json::json;

use crate::harness::cache::assert_nix_copies;
use crate::harness::daemon::push_summary;
use crate::harness::process::Run;
use crate::remote::{
    build_paths, nix_copy_from, nix_key, prepare, prepare_all, CachixServer, Prepared,
};

const TOKEN: &str = "write-token-1";

/// Short waits, so fault tests finish in seconds; the policy's shape is unit-tested.
fn quick() -> RetryPolicy {
    RetryPolicy {
        base: Duration::from_millis(40),
        cap: Duration::from_millis(200),
        budget: Duration::from_secs(5),
        max_hint: Duration::from_secs(2),
    }
}

fn config(part_size: u64, key: Option<&std::path::Path>) -> Config {
    let mut config = Config::default();
    config.target.url = "cachix://unused".into();
    config.target.part_size = part_size;
    config.target.timeout_secs = 20;
    config.target.signing_key_file = key.map(ToOwned::to_owned);
    config
}

fn backend(
    server: &CachixServer,
    cache: &str,
    config: &Config,
    token: Option<&str>,
) -> CachixBackend {
    let credentials = token.map_or_else(Credentials::none, |t| Credentials::fixed(Secret::new(t)));
    CachixBackend::new(
        &format!("cachix://{cache}?api={}", server.base()),
        config,
        credentials,
    )
    .unwrap()
    .with_policy(quick())
}

fn store_paths(paths: &[String]) -> Vec<StorePath> {
    paths
        .iter()
        .map(|p| StorePath::parse(p, "/nix/store").unwrap())
        .collect()
}

async fn push_all(backend: &CachixBackend, prepared: &[Prepared]) {
    for p in prepared {
        backend
            .upload(&p.narinfo, p.nar())
            .await
            .unwrap_or_else(|e| panic!("upload of {} failed: {e}", p.narinfo.store_path));
    }
}

#[test]
fn server_selftest_against_real_nix() {
    crate::harness::servers::assert_selftest_passes("cachix_selftest.py");
}

#[tokio::test]
async fn self_signed_push_is_substituted_by_nix() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, public) = nix_key(dir.path(), "nixpush-cachix-test-1");
    let (_, other) = nix_key(dir.path(), "other-1");
    let server = CachixServer::start(json!({"caches": [{
        "name": "selfsigned", "signing": "self-signed", "public_keys": [public.trim()],
        "tokens": {TOKEN: "write"}}]}));
    // 64 KiB parts: the 300 KB path goes up in five parts, four at a time.
    let config = config(64 * 1024, Some(&sec));
    let backend = backend(&server, "selfsigned", &config, Some(TOKEN));
    let info = backend.prepare().await.unwrap();
    assert_eq!(
        info.read_url.as_deref(),
        Some(&*format!("{}/selfsigned", server.base()))
    );
    assert_eq!(info.public_keys, vec![public.trim().to_owned()]);
    assert_eq!(info.preferred_compression, Some(Compression::Zstd));

    let paths = build_paths(dir.path(), "cxss", 300_000);
    let key = SecretKey::load(&sec).unwrap();
    let prepared = prepare_all(&paths, Compression::Zstd, Some(&key));
    let all = store_paths(&paths);
    assert_eq!(backend.missing(&all).await.unwrap(), all);
    push_all(&backend, &prepared).await;
    assert!(backend.missing(&all).await.unwrap().is_empty());
    let mut stored = server.stored("selfsigned").await;
    stored.sort();
    let mut expected = paths.clone();
    expected.sort();
    assert_eq!(stored, expected);

    let log = server.log().await;
    let puts: Vec<_> = log.iter().filter(|e| e["route"] == "put_part").collect();
    assert!(puts.len() >= 7, "expected a multipart upload: {puts:?}");
    assert!(
        puts.iter().all(|e| e["auth"] == "none"),
        "presigned PUTs must not carry the token"
    );
    assert!(log
        .iter()
        .filter(|e| e["route"] != "put_part")
        .all(|e| e["auth"] == "bearer"));

    let url = format!("{}/selfsigned", server.base());
    assert_nix_copies(&url, &public, &paths);
    let (ok, err) = nix_copy_from(&url, &other, &paths);
    assert!(!ok && err.contains("lacks a valid signature"), "{err}");
}

#[tokio::test]
async fn managed_cache_signs_and_xz_works() {
    let dir = tempfile::tempdir().unwrap();
    let server = CachixServer::start(json!({"caches": [{
        "name": "managed", "signing": "managed", "preferred_compression": "XZ",
        "tokens": {TOKEN: "write"}}]}));
    let config = config(5 * 1024 * 1024, None);
    let backend = backend(&server, "managed", &config, Some(TOKEN));
    let info = backend.prepare().await.unwrap();
    assert_eq!(info.preferred_compression, Some(Compression::Xz));
    let server_key = info.public_keys[0].clone();
    let paths = build_paths(dir.path(), "cxmg", 10_000);
    let prepared = prepare_all(&paths, Compression::Xz, None);
    push_all(&backend, &prepared).await;
    assert_nix_copies(&format!("{}/managed", server.base()), &server_key, &paths);
}

#[tokio::test]
async fn everything_lands_through_faults() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, public) = nix_key(dir.path(), "nixpush-cachix-faults-1");
    let server = CachixServer::start(json!({"caches": [{
        "name": "faulty", "signing": "self-signed", "public_keys": [public.trim()],
        "tokens": {TOKEN: "write"}}]}));
    let config = config(64 * 1024, Some(&sec));
    let backend = backend(&server, "faulty", &config, Some(TOKEN));
    server
        .faults(json!([
            {"route": "cache_info", "action": "status", "status": 502, "problem_retry_after": 1},
            {"route": "narinfo_bulk", "action": "status", "status": 429, "retry_after_date": 1},
            {"route": "create", "action": "status", "status": 429, "retry_after": "1"},
            {"route": "create", "action": "status", "status": 500},
            {"route": "presign", "action": "status", "status": 503, "count": 2},
            {"route": "presign", "action": "expired_presign", "count": 2},
            {"route": "put_part", "action": "reset_after_bytes", "bytes": 1000, "count": 2},
            {"route": "put_part", "action": "status", "status": 500, "count": 2},
            {"route": "put_part", "action": "no_etag", "match": {"partNumber": 2}},
            {"route": "complete", "action": "status", "status": 503},
            {"route": "complete", "action": "reset_before_response"},
        ]))
        .await;
    backend.prepare().await.unwrap();
    let paths = build_paths(dir.path(), "cxft", 300_000);
    let key = SecretKey::load(&sec).unwrap();
    let prepared = prepare_all(&paths, Compression::Zstd, Some(&key));
    let all = store_paths(&paths);
    assert_eq!(backend.missing(&all).await.unwrap().len(), all.len());
    push_all(&backend, &prepared).await;
    let state = server.control(reqwest::Method::GET, "state", None).await;
    let left: Vec<_> = state["faults"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["count"] != 0)
        .collect();
    assert!(left.is_empty(), "faults never triggered: {left:?}");
    assert_nix_copies(&format!("{}/faulty", server.base()), &public, &paths);
}

#[tokio::test]
async fn a_lost_complete_answer_is_verified_with_the_missing_query() {
    let dir = tempfile::tempdir().unwrap();
    let server = CachixServer::start(json!({"caches": [{
        "name": "lost", "signing": "managed", "tokens": {TOKEN: "write"}}]}));
    let config = config(5 * 1024 * 1024, None);
    let backend = backend(&server, "lost", &config, Some(TOKEN));
    backend.prepare().await.unwrap();
    let paths = build_paths(dir.path(), "cxlost", 1_000);
    let p = prepare(&paths[0], Compression::Zstd, None);
    // The first complete is applied but its answer lost; the retry is refused with 400.
    server
        .faults(json!([
            {"route": "complete", "action": "reset_before_response"},
            {"route": "complete", "action": "status", "status": 400, "body": "already completed"},
        ]))
        .await;
    backend.upload(&p.narinfo, p.nar()).await.unwrap();
    assert_eq!(server.stored("lost").await, vec![paths[0].clone()]);
    let log = server.log().await;
    let completes: Vec<_> = log
        .iter()
        .filter(|e| e["route"] == "complete")
        .map(|e| e["status"].clone())
        .collect();
    assert_eq!(completes, vec![json!("reset"), json!(400)]);
    assert_eq!(log.last().unwrap()["route"], "narinfo_bulk");
}

#[tokio::test]
async fn giving_up_aborts_the_upload() {
    let dir = tempfile::tempdir().unwrap();
    let server = CachixServer::start(json!({"caches": [{
        "name": "gone", "signing": "managed", "tokens": {TOKEN: "write"}}]}));
    let config = config(5 * 1024 * 1024, None);
    let backend = backend(&server, "gone", &config, Some(TOKEN));
    let paths = build_paths(dir.path(), "cxgone", 1_000);
    let p = prepare(&paths[0], Compression::Zstd, None);
    server
        .faults(
            json!({"route": "put_part", "action": "status", "status": 404, "body": "NoSuchUpload"}),
        )
        .await;
    // NoSuchUpload can mean another writer completed the path; the cache does not have it, so the path is tried
    // again later, never given up for good (#22).
    let err = backend.upload(&p.narinfo, p.nar()).await.unwrap_err();
    assert!(
        err.is_retryable() && !err.is_auth() && matches!(err, Error::Contended { .. }),
        "{err}"
    );
    assert_eq!(
        server.uploads("gone").await,
        json!({"open": 0, "aborted": 1, "completed": 0})
    );
    // A server that keeps failing is retryable for the engine once the policy gives up.
    server
        .faults(json!({"route": "create", "action": "status", "status": 503, "probability": 1.0}))
        .await;
    let err = backend.upload(&p.narinfo, p.nar()).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
}

/// Another writer completed the path while our multipart upload of it was superseded (`NoSuchUpload`): the cache
/// has it, so it counts as ours; our own upload is aborted. See: #22
#[tokio::test]
async fn issue_22_a_lost_multipart_race_counts_when_the_cache_has_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let server = CachixServer::start(json!({"caches": [{
        "name": "race", "signing": "managed", "tokens": {TOKEN: "write"}}]}));
    let config = config(5 * 1024 * 1024, None);
    let other_writer = backend(&server, "race", &config, Some(TOKEN));
    let ours = backend(&server, "race", &config, Some(TOKEN));
    ours.prepare().await.unwrap();
    let paths = build_paths(dir.path(), "cxrace", 1_000);
    let p = prepare(&paths[0], Compression::Zstd, None);
    other_writer.upload(&p.narinfo, p.nar()).await.unwrap();
    server
        .faults(
            json!({"route": "put_part", "action": "status", "status": 404, "body": "NoSuchUpload"}),
        )
        .await;
    ours.upload(&p.narinfo, p.nar()).await.unwrap();
    assert_eq!(
        server.uploads("race").await,
        json!({"open": 0, "aborted": 1, "completed": 1})
    );
}

#[tokio::test]
async fn refused_tokens_are_auth_errors_and_rotation_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let server = CachixServer::start(json!({"caches": [
        {"name": "private", "public": false, "signing": "managed",
         "tokens": {"new-token-2": "write", "read-token": "read"}}]}));
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "old-token-1\n").unwrap();
    let credentials = Credentials::load(Some(&token_file), "CACHIX_AUTH_TOKEN").unwrap();
    let config = config(5 * 1024 * 1024, None);
    let backend = CachixBackend::new(
        &format!("cachix://private?api={}", server.base()),
        &config,
        credentials.clone(),
    )
    .unwrap()
    .with_policy(quick());
    let err = backend.prepare().await.unwrap_err();
    assert!(err.is_auth(), "{err}");
    assert!(!err.to_string().contains("old-token-1"), "{err}");

    // sops-nix swaps the file; the daemon reloads the credentials.
    std::fs::write(dir.path().join("token.new"), "new-token-2").unwrap();
    std::fs::rename(dir.path().join("token.new"), &token_file).unwrap();
    assert!(credentials.reload().unwrap());
    let info = backend.prepare().await.unwrap();
    let paths = build_paths(dir.path(), "cxrot", 1_000);
    let p = prepare(&paths[0], Compression::Zstd, None);
    backend.upload(&p.narinfo, p.nar()).await.unwrap();

    // Revoked mid-run: the next upload is an auth error, not a retry loop.
    server
        .control(
            reqwest::Method::POST,
            "cache/private",
            Some(json!({"tokens": {"read-token": "read"}})),
        )
        .await;
    let p = prepare(&paths[1], Compression::Zstd, None);
    let err = backend.upload(&p.narinfo, p.nar()).await.unwrap_err();
    assert!(err.is_auth(), "{err}");
    assert!(!err.to_string().contains("new-token-2"), "{err}");

    // Private reads need the token as the netrc password.
    let netrc = dir.path().join("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1 login \"\" password read-token\n").unwrap();
    let out = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--from",
        ])
        .arg(format!("{}/private", server.base()))
        .arg("--to")
        .arg(dir.path().join("root"))
        .args(["--option", "trusted-public-keys", &info.public_keys[0]])
        .args(["--option", "netrc-file", netrc.to_str().unwrap()])
        .arg(&paths[0])
        .env("XDG_CACHE_HOME", dir.path().join("xdg"))
        .run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_key_the_cache_does_not_list_is_refused_before_uploading() {
    let dir = tempfile::tempdir().unwrap();
    let (_, registered) = nix_key(dir.path(), "registered-1");
    let (wrong, _) = nix_key(dir.path(), "wrong-1");
    let server = CachixServer::start(json!({"caches": [
        {"name": "selfsigned", "signing": "self-signed", "public_keys": [registered.trim()],
         "tokens": {TOKEN: "write"}},
        {"name": "managed", "signing": "managed", "tokens": {TOKEN: "write"}}]}));
    for cache in ["selfsigned", "managed"] {
        let backend = backend(
            &server,
            cache,
            &config(5 * 1024 * 1024, Some(&wrong)),
            Some(TOKEN),
        );
        let err = backend.prepare().await.unwrap_err();
        assert!(
            matches!(err, Error::Config(_)) && err.to_string().contains("not among cache"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn bare_base64_signing_key_without_token() {
    // CACHIX_SIGNING_KEY's format in a file, on a public self-signed cache that accepts key-only pushes.
    let dir = tempfile::tempdir().unwrap();
    let (sec, public) = nix_key(dir.path(), "keyonly-1");
    let nix_form = std::fs::read_to_string(&sec).unwrap();
    let bare = dir.path().join("cachix-signing-key");
    std::fs::write(&bare, nix_form.split_once(':').unwrap().1).unwrap();
    let server = CachixServer::start(json!({"caches": [{
        "name": "keyonly", "signing": "self-signed", "public_keys": [public.trim()],
        "keyless_push": true, "tokens": {}}]}));
    let backend = backend(
        &server,
        "keyonly",
        &config(5 * 1024 * 1024, Some(&bare)),
        None,
    );
    backend.prepare().await.unwrap();
    let paths = build_paths(dir.path(), "cxko", 1_000);
    let key = SecretKey::load_cachix(&bare, "keyonly.cachix.org-1").unwrap();
    let prepared = prepare_all(&paths, Compression::Zstd, Some(&key));
    push_all(&backend, &prepared).await;
    assert!(server.log().await.iter().all(|e| e["auth"] != "bearer"));
    assert_nix_copies(&format!("{}/keyonly", server.base()), &public, &paths);
}

#[tokio::test]
async fn nixpush_push_lands_a_closure_through_faults() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, public) = nix_key(dir.path(), "nixpush-cachix-cli-1");
    let server = CachixServer::start(json!({"caches": [{
        "name": "cli", "signing": "self-signed", "public_keys": [public.trim()],
        "tokens": {TOKEN: "write"}}]}));
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let paths = build_paths(dir.path(), "cxcli", 300_000);
    server
        .faults(json!([
            {"route": "cache_info", "action": "status", "status": 502, "problem_retry_after": 1},
            {"route": "narinfo_bulk", "action": "status", "status": 503},
            {"route": "create", "action": "status", "status": 429, "retry_after": "1"},
            {"route": "presign", "action": "expired_presign"},
            {"route": "presign", "action": "status", "status": 500},
            {"route": "put_part", "action": "reset_after_bytes", "bytes": 100},
            {"route": "complete", "action": "reset_before_response"},
        ]))
        .await;
    let out = Command::new(env!("CARGO_BIN_EXE_nixpush"))
        .arg("push")
        .arg("--target")
        .arg(format!("cachix://cli?api={}", server.base()))
        .arg("--auth-token-file")
        .arg(&token_file)
        .arg("--signing-key-file")
        .arg(&sec)
        .args(["--no-upstream", "--json"])
        .arg(&paths[1])
        .arg(&paths[2])
        .env("TMPDIR", dir.path())
        .run();
    let summary = push_summary(&out, TOKEN);
    assert_eq!(summary["uploaded"], 3, "{summary}");
    let mut stored = server.stored("cli").await;
    stored.sort();
    let mut expected = paths.clone();
    expected.sort();
    assert_eq!(stored, expected);
    let state = server.control(reqwest::Method::GET, "state", None).await;
    assert!(
        state["faults"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["count"] == 0),
        "{state}"
    );
    assert_nix_copies(&format!("{}/cli", server.base()), &public, &paths);
}

/// Runs `nixpush push` of `paths` to cache `cache` on `server` with the write token; returns the JSON summary.
fn push_cli(
    server: &CachixServer,
    cache: &str,
    dir: &std::path::Path,
    extra: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
    paths: &[String],
) -> (serde_json::Value, String) {
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nixpush"))
        .arg("push")
        .arg("--target")
        .arg(format!("cachix://{cache}?api={}", server.base()))
        .arg("--auth-token-file")
        .arg(&token_file)
        .args(extra)
        .args(["--no-upstream", "--json"])
        .args(paths)
        .env_remove("CACHIX_SIGNING_KEY")
        .envs(env.iter().copied())
        .env("TMPDIR", dir)
        .run();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (serde_json::from_str(&stdout).unwrap(), stderr)
}

#[tokio::test]
async fn push_signs_with_cachix_signing_key_or_a_bare_key_file() {
    // What `cachix generate-keypair` hands out: the bare base64 secret, named by the cache.
    let dir = tempfile::tempdir().unwrap();
    let (sec, public) = nix_key(dir.path(), "barekey.cachix.org-1");
    let nix_form = std::fs::read_to_string(&sec).unwrap();
    let bare = nix_form.split_once(':').unwrap().1.trim().to_owned();
    let server = CachixServer::start(json!({"caches": [{
        "name": "barekey", "signing": "self-signed", "public_keys": [public.trim()],
        "tokens": {TOKEN: "write"}}]}));

    // 1. CACHIX_SIGNING_KEY in the environment, no key file.
    let from_env = build_paths(dir.path(), "cxenv", 2_000);
    let (summary, stderr) = push_cli(
        &server,
        "barekey",
        dir.path(),
        &[],
        &[("CACHIX_SIGNING_KEY", &bare)],
        &from_env,
    );
    assert_eq!(summary["uploaded"], from_env.len(), "{summary}");
    assert!(!stderr.contains(&bare), "{stderr}");

    // 2. The same bare base64 in a signing_key_file.
    let bare_file = dir.path().join("cachix-signing-key");
    std::fs::write(&bare_file, &bare).unwrap();
    let from_file = build_paths(dir.path(), "cxbarefile", 2_000);
    let (summary, stderr) = push_cli(
        &server,
        "barekey",
        dir.path(),
        &["--signing-key-file".as_ref(), bare_file.as_os_str()],
        &[],
        &from_file,
    );
    assert_eq!(summary["uploaded"], from_file.len(), "{summary}");
    assert!(!stderr.contains(&bare), "{stderr}");

    let all: Vec<String> = from_env.iter().chain(&from_file).cloned().collect();
    assert_nix_copies(&format!("{}/barekey", server.base()), &public, &all);
    // Without the signatures made by that key, Nix refuses.
    let (_, other) = nix_key(dir.path(), "barekey.cachix.org-2");
    let (ok, _) = nix_copy_from(&format!("{}/barekey", server.base()), &other, &all);
    assert!(!ok, "nix copy accepted paths signed by another key");
}

#[tokio::test]
async fn hook_builds_reach_cachix_through_faults_and_nix_substitutes() {
    use crate::util::{nix_build_with_hook, TestDaemon, TestEnv};

    let env = TestEnv::new();
    let (sec, public) = nix_key(env.dir.path(), "nixpush-cachix-e2e-1");
    let (_, other) = nix_key(env.dir.path(), "other-1");
    let server = CachixServer::start(json!({"caches": [{
        "name": "e2e", "signing": "self-signed", "public_keys": [public.trim()],
        "tokens": {TOKEN: "write"}}]}));
    let token_file = env.dir.path().join("cachix-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    env.write_config_with(
        "",
        &format!(
            "url = \"cachix://e2e\"\ncachix_api = \"{}\"\nauth_token_file = \"{}\"\nsigning_key_file = \"{}\"",
            server.base(),
            token_file.display(),
            sec.display()
        ),
    );
    server
        .faults(json!([
            {"route": "narinfo_bulk", "action": "status", "status": 502, "problem_retry_after": 1},
            {"route": "create", "action": "status", "status": 429, "retry_after": "1"},
            {"route": "presign", "action": "expired_presign"},
            {"route": "put_part", "action": "reset_after_bytes", "bytes": 64},
            {"route": "put_part", "action": "status", "status": 500, "probability": 0.3, "count": 4},
            {"route": "complete", "action": "status", "status": 503},
            {"route": "complete", "action": "reset_before_response"},
        ]))
        .await;
    let daemon = TestDaemon::start_uploading(env);
    let build = nix_build_with_hook(&daemon.env);
    assert!(build.output.status.success(), "{}", build.stderr());
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");
    let stored = server.stored("e2e").await;
    for output in &build.outputs {
        assert!(
            stored.contains(output),
            "{output} not pushed:\n{}",
            daemon.log()
        );
    }
    assert!(!daemon.log().contains(TOKEN));
    let state = server.control(reqwest::Method::GET, "state", None).await;
    let untriggered: Vec<_> = state["faults"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["count"] != 0 && f.get("probability") == Some(&json!(1.0)))
        .collect();
    assert!(untriggered.is_empty(), "{untriggered:?}");
    let url = format!("{}/e2e", server.base());
    assert_nix_copies(&url, &public, &build.outputs);
    let (ok, err) = nix_copy_from(&url, &other, &build.outputs);
    assert!(!ok && err.contains("lacks a valid signature"), "{err}");
}
