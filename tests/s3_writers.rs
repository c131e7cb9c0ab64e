//! Many writers, one bucket, on a real S3 server (`s3s-fs`) behind a loopback proxy that keeps the request log:
//! concurrent `nixpush push` runs and daemons of three "hosts" (each with its own state_dir and socket) push
//! overlapping closures of large paths as multipart uploads; every path lands, real Nix substitutes the union,
//! and each narinfo is written exactly once (conditional PUT). Also: nixpush aborts the multipart uploads it gives
//! up on and no other; a wrong secret is a clear error that names the signature problem and shows no secret.
//! See: #22, #20

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use nixpush::backend::s3::S3Backend;
use nixpush::backend::{Backend, Error};
use nixpush::config::{Compression, Config};
use nixpush::signing::SecretKey;

use crate::faultproxy::{Fault, FaultProxy};
use crate::harness::cache::assert_nix_copies;
use crate::remote::{build_paths, nix_key, prepare, BUILD_OPTS};
use crate::s3::shared_credentials_file;
use crate::s3s::{S3sFs, ACCESS_KEY, SECRET_KEY};
use crate::util::{nix, TestDaemon, TestEnv};

const BUCKET: &str = "nixpush-writers";
/// S3's smallest part: a 12 MiB NAR goes up in three parts.
const PART_SIZE: u64 = 5 * 1024 * 1024;

/// The `[target]` body for `s3s-fs` reached through `proxy`, keys from the `[nixpush]` profile.
fn target(proxy: &FaultProxy, signing_key: &Path) -> String {
    shared_credentials_file();
    format!(
        "url = \"s3://{BUCKET}?endpoint={}&region=us-east-1&profile=nixpush\"\nsigning_key_file = \"{}\"\n\
         part_size = {PART_SIZE}",
        proxy.url(),
        signing_key.display()
    )
}

/// Successful and refused PUTs per narinfo, from the proxy's request log.
fn narinfo_writes(proxy: &FaultProxy) -> BTreeMap<String, (u32, u32)> {
    let mut writes: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for (target, status) in &proxy.stats.answered() {
        let target = target.split('?').next().unwrap_or_default();
        if let Some(key) = target.strip_prefix(&format!("PUT /{BUCKET}/")) {
            if key.ends_with(".narinfo") {
                let counts = writes.entry(key.to_owned()).or_default();
                match status {
                    200..=299 => counts.0 += 1,
                    _ => counts.1 += 1,
                }
            }
        }
    }
    writes
}

/// Requests per kind (`PUT narinfo`, `PUT nar part`, `POST complete`, …), for the test's output.
fn request_counts(proxy: &FaultProxy) -> BTreeMap<String, u32> {
    let mut counts = BTreeMap::new();
    for (target, _) in &proxy.stats.answered() {
        let Some((method, path)) = target.split_once(' ') else {
            continue;
        };
        let (key, query) = path.split_once('?').unwrap_or((path, ""));
        let what = if key.ends_with(".narinfo") {
            "narinfo"
        } else if query.contains("partNumber=") {
            "nar part"
        } else if query.contains("uploads") {
            "nar create upload"
        } else if query.contains("uploadId=") {
            "nar complete/abort"
        } else if key.contains("/nar/") {
            "nar"
        } else {
            key.rsplit('/').next().unwrap_or(key)
        };
        let kind = format!("{method} {what}");
        *counts.entry(kind).or_default() += 1;
    }
    counts
}

/// Every narinfo the log shows was written once and the other writers' attempts were refused (412), except where
/// the server itself raced: s3s-fs checks `If-None-Match: *` with an `exists()` before a write that is not atomic
/// with it, so two conditional PUTs in flight at the same moment can both succeed there. A second write of one
/// narinfo is accepted only beside refusals elsewhere in the run, which show the condition was sent and honoured,
/// and never more writes of one narinfo than there are writers.
fn assert_each_narinfo_written_once(proxy: &FaultProxy, expected: usize) {
    let writes = narinfo_writes(proxy);
    eprintln!(
        "narinfo PUTs (written, refused): {writes:?}\nrequests: {:?}",
        request_counts(proxy)
    );
    assert_eq!(writes.len(), expected, "{writes:?}");
    let refused: u32 = writes.values().map(|(_, refused)| refused).sum();
    for (key, (written, _)) in &writes {
        assert!(*written >= 1, "{key} was never written: {writes:?}");
        assert!(
            *written == 1 || (refused > 0 && *written <= 3),
            "{key} was written {written} times: {writes:?}"
        );
    }
}

/// No multipart upload is left open in the bucket.
fn assert_no_open_uploads(server: &S3sFs) {
    let open = server.open_uploads();
    assert!(open.is_empty(), "{open:?}");
}

/// A proxy in front of `server` that answers the next `times` requests matching `only` with `fault`.
fn proxy_failing(server: &S3sFs, fault: Fault, only: &str, times: u64, seed: u64) -> FaultProxy {
    let proxy = FaultProxy::start(server.port, 0.0, &[fault], std::time::Duration::ZERO, seed);
    proxy.only_matching(only);
    proxy.fail_next(times);
    proxy
}

/// Three concurrent `nixpush push` runs of the same large path (multipart) all succeed. See: #22
#[test]
fn issue_22_three_pushes_of_one_large_path() {
    let server = S3sFs::start(&[BUCKET]);
    let proxy = FaultProxy::start(server.port, 0.0, &[], std::time::Duration::ZERO, 1);
    let dir = tempfile::tempdir().unwrap();
    let (sec, public) = nix_key(dir.path(), "nixpush-writers-push-1");
    let paths = build_paths(dir.path(), "writers3", 12 * 1024 * 1024);
    let big = paths.last().unwrap().clone();
    let hosts: Vec<TestEnv> = (0..3).map(|_| TestEnv::new()).collect();
    for host in &hosts {
        host.write_config_with("", &target(&proxy, &sec));
    }
    let children: Vec<_> = hosts
        .iter()
        .map(|host| {
            Command::new(env!("CARGO_BIN_EXE_nixpush"))
                .arg("--config")
                .arg(&host.config_path)
                .args(["push", "--no-upstream", "--json"])
                .arg(&big)
                .env("TMPDIR", host.dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_nix_copies(&server.nix_url(BUCKET), &public, &[big]);
    assert_each_narinfo_written_once(&proxy, 1);
    assert_no_open_uploads(&server);
}

/// Builds three roots whose closures overlap in large paths: r1 → a, b; r2 → a, c; r3 → b, c. Returns the roots
/// and every path of the union.
fn overlapping_closures(dir: &Path) -> (Vec<String>, Vec<String>) {
    let nonce: u64 = rand::random();
    let expr = dir.join("overlap.nix");
    std::fs::write(
        &expr,
        format!(
            "let\n\
             sh = name: script: derivation {{ inherit name; system = builtins.currentSystem; builder = \"/bin/sh\";\n\
               args = [\"-c\" script]; }};\n\
             big = name: bytes: sh \"overlap-${{name}}\"\n\
               \"/usr/bin/head -c ${{toString bytes}} /dev/urandom > $out; echo {nonce} >> $out\";\n\
             a = big \"a\" 12000000; b = big \"b\" 7000000; c = big \"c\" 6000000;\n\
             root = name: deps: sh \"overlap-${{name}}\" \"echo ${{toString deps}} > $out\";\n\
             in {{ r1 = root \"r1\" [a b]; r2 = root \"r2\" [a c]; r3 = root \"r3\" [b c]; }}\n"
        ),
    )
    .unwrap();
    let mut build = vec!["nix-build", expr.to_str().unwrap()];
    build.extend(["-A", "r1", "-A", "r2", "-A", "r3", "--no-out-link"]);
    build.extend(BUILD_OPTS);
    build.extend(["--option", "substituters", ""]);
    let roots: Vec<String> = nix(&build).lines().map(str::to_owned).collect();
    assert_eq!(roots.len(), 3, "{roots:?}");
    let out = Command::new("nix-store")
        .args(["-q", "--requisites"])
        .args(&roots)
        .output()
        .unwrap();
    let union: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    (roots, union)
}

/// Three daemons, each with its own state_dir and socket, push overlapping closures of large paths to one
/// bucket at once: nothing fails, real Nix substitutes the union, and each narinfo is written once. See: #22, #20
#[test]
fn issue_22_three_daemons_overlapping_closures() {
    let server = S3sFs::start(&[BUCKET]);
    let proxy = FaultProxy::start(server.port, 0.0, &[], std::time::Duration::ZERO, 2);
    let keys = tempfile::tempdir().unwrap();
    let (sec, public) = nix_key(keys.path(), "nixpush-writers-daemons-1");
    let (roots, union) = overlapping_closures(keys.path());
    let daemons: Vec<TestDaemon> = (0..3)
        .map(|_| {
            let env = TestEnv::new();
            env.write_config_with("", &target(&proxy, &sec));
            TestDaemon::start_uploading(env)
        })
        .collect();
    // As close to "at once" as three builds finishing together.
    let hooks: Vec<_> = daemons
        .iter()
        .zip(&roots)
        .map(|(daemon, root)| daemon.env.hook_command(&[root], None).spawn().unwrap())
        .collect();
    for mut hook in hooks {
        assert!(hook.wait().unwrap().success());
    }
    for daemon in &daemons {
        let status = daemon.wait_drained();
        assert_eq!(status["failed"], 0, "{status}\n{}", daemon.log());
        assert!(!daemon.log().contains(SECRET_KEY), "{}", daemon.log());
    }
    assert_nix_copies(&server.nix_url(BUCKET), &public, &union);
    assert_each_narinfo_written_once(&proxy, union.len());
    assert_no_open_uploads(&server);
}

/// A signed request straight to the server (not through nixpush), as another host's client would send it.
async fn foreign_multipart_upload(server: &S3sFs, key: &str) -> String {
    let (bucket, creds) = server.signer(BUCKET);
    use rusty_s3::S3Action;
    let url = bucket
        .create_multipart_upload(Some(&creds), key)
        .sign(std::time::Duration::from_secs(600));
    let client = reqwest::Client::new();
    let text = client
        .post(url)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .text()
        .await
        .unwrap();
    let id = rusty_s3::actions::CreateMultipartUpload::parse_response(&text)
        .unwrap()
        .upload_id()
        .to_owned();
    let url = bucket
        .upload_part(Some(&creds), key, 1, &id)
        .sign(std::time::Duration::from_secs(600));
    client
        .put(url)
        .body(vec![7u8; 1024])
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    id
}

/// nixpush aborts the multipart upload it gives up on, and leaves another writer's upload of the same key alone.
/// See: #22
#[tokio::test]
async fn issue_22_aborts_only_its_own_multipart_uploads() {
    let server = S3sFs::start(&[BUCKET]);
    // Every part PUT fails (500, after the backend's own retries), so the upload is given up.
    let proxy = proxy_failing(&server, Fault::ServerError, "partNumber=", u64::MAX, 3);
    let dir = tempfile::tempdir().unwrap();
    let paths = build_paths(dir.path(), "writersabort", 12 * 1024 * 1024);
    let p = prepare(paths.last().unwrap(), Compression::Zstd, None);
    let foreign = foreign_multipart_upload(&server, &p.narinfo.url).await;
    assert_eq!(server.open_uploads(), vec![foreign.clone()]);

    let backend = proxied_backend(&proxy);
    backend.prepare().await.unwrap();
    let err = backend.upload(&p.narinfo, p.nar()).await.unwrap_err();
    assert!(matches!(err, Error::Status { code: 500, .. }), "{err}");

    // Its own upload is gone with its parts; the other writer's is still there, part included.
    assert_eq!(server.open_uploads(), vec![foreign.clone()]);
    let parts = server.stored_parts();
    assert!(
        !parts.is_empty() && parts.iter().all(|name| name.contains(&foreign)),
        "{parts:?}"
    );
    // The proxy logs a request after it has answered it, so the abort's entry may come a moment later.
    let deletes = || -> Vec<String> {
        proxy
            .stats
            .answered()
            .into_iter()
            .map(|(target, _)| target)
            .filter(|t| t.starts_with("DELETE "))
            .collect()
    };
    crate::harness::process::wait_until("the abort in the proxy's log", || !deletes().is_empty());
    let deletes = deletes();
    assert_eq!(
        deletes.len(),
        1,
        "one abort, of its own upload: {deletes:?}"
    );
    assert!(
        deletes[0].contains("uploadId=") && !deletes[0].contains(&foreign),
        "{deletes:?}"
    );
}

/// A wrong secret against a server that checks SigV4: a clear error naming the signature problem, and no secret
/// (nor a presigned query) in it. See: #20
#[test]
fn issue_20_wrong_secret_names_the_signature_problem() {
    let server = S3sFs::start(&[BUCKET]);
    let dir = tempfile::tempdir().unwrap();
    let (sec, _) = nix_key(dir.path(), "nixpush-writers-secret-1");
    let key_text = std::fs::read_to_string(&sec).unwrap();
    SecretKey::load(&sec).unwrap();
    let paths = build_paths(dir.path(), "writerssecret", 1000);
    let wrong = "wr0ng-s3cr3t-not-the-one";
    let out = server
        .push_command(BUCKET, &sec)
        .arg(&paths[0])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", wrong)
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("SignatureDoesNotMatch"), "{text}");
    assert!(text.contains("AWS_SECRET_ACCESS_KEY"), "{text}");
    for secret in [wrong, SECRET_KEY, "X-Amz-Signature", "X-Amz-Credential"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    let key_secret = key_text.trim().split(':').nth(1).unwrap();
    assert!(!text.contains(key_secret), "{text}");
}

/// A daemon pushing through a proxy that answers part of the requests with `503 SlowDown` or `429`: the bucket's
/// concurrency is lowered, nothing fails, and real Nix substitutes every path. See: #20
#[test]
fn issue_20_slow_down_lowers_concurrency_and_fails_nothing() {
    let server = S3sFs::start(&[BUCKET]);
    let proxy = FaultProxy::start(
        server.port,
        0.3,
        &[Fault::SlowDown, Fault::TooManyRequests],
        std::time::Duration::ZERO,
        4,
    );
    let env = TestEnv::new();
    let (sec, public) = nix_key(env.dir.path(), "nixpush-writers-slowdown-1");
    let paths = build_paths(env.dir.path(), "writersslow", 12 * 1024 * 1024);
    env.write_config_with("", &target(&proxy, &sec));
    let daemon = TestDaemon::start_uploading(env);
    let roots: Vec<&str> = paths.iter().map(String::as_str).collect();
    assert!(daemon.env.run_hook(&roots, None).status.success());
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}\n{}", daemon.log());
    let faults = proxy.stats.by_fault.lock().unwrap().clone();
    assert!(
        faults.get("SlowDown").copied().unwrap_or(0) > 0
            && faults.get("TooManyRequests").copied().unwrap_or(0) > 0,
        "{faults:?}"
    );
    let log = daemon.log();
    assert!(log.contains("asked to slow down"), "{log}");
    assert!(!log.contains("giving up"), "{log}");
    assert_nix_copies(&server.nix_url(BUCKET), &public, &paths);
}

/// When the target stops answering mid-batch, every path's failure names the real reason, never "interrupted by
/// shutdown" (nothing is shutting down). See: #22
#[test]
fn issue_22_an_unreachable_target_is_the_reason_given() {
    let server = S3sFs::start(&[BUCKET]);
    // Every NAR upload fails, after the presence check and the preparation of all paths succeeded.
    let proxy = proxy_failing(&server, Fault::ServerError, "/nar/", u64::MAX, 5);
    let dir = tempfile::tempdir().unwrap();
    let (sec, _) = nix_key(dir.path(), "nixpush-writers-reason-1");
    let paths = build_paths(dir.path(), "writersreason", 1000);
    let host = TestEnv::new();
    host.write_config_with("", &target(&proxy, &sec));
    let out = Command::new(env!("CARGO_BIN_EXE_nixpush"))
        .arg("--config")
        .arg(&host.config_path)
        .args(["push", "--no-upstream", "--json"])
        .args(&paths)
        .env("TMPDIR", host.dir.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains("shutdown") && !stderr.contains("shutdown"),
        "{stdout}\n{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let failed = summary["failed"].as_array().unwrap();
    assert_eq!(failed.len(), paths.len(), "{summary}");
    for failure in failed {
        let reason = failure["reason"].as_str().unwrap();
        assert!(
            reason.contains("HTTP 500") || reason.contains("because its reference"),
            "{reason}"
        );
    }
}

/// A closure with a large path uploaded by the library backend to `s3s-fs` through a proxy that answers the first
/// request matching `only` with `404 NoSuchUpload`, as when another writer's upload of the same NAR won.
struct Superseded {
    server: S3sFs,
    proxy: FaultProxy,
    public: String,
    paths: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Superseded {
    async fn upload(only: &str, tag: &str, seed: u64) -> Superseded {
        let server = S3sFs::start(&[BUCKET]);
        let proxy = proxy_failing(&server, Fault::Superseded, only, 1, seed);
        let dir = tempfile::tempdir().unwrap();
        let (sec, public) = nix_key(dir.path(), &format!("nixpush-{tag}-1"));
        let key = SecretKey::load(&sec).unwrap();
        let paths = build_paths(dir.path(), tag, 12 * 1024 * 1024);
        let backend = proxied_backend(&proxy);
        backend.prepare().await.unwrap();
        for path in &paths {
            let p = prepare(path, Compression::Zstd, Some(&key));
            backend.upload(&p.narinfo, p.nar()).await.unwrap();
        }
        assert_eq!(
            proxy.stats.faults.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        Superseded {
            server,
            proxy,
            public,
            paths,
            _dir: dir,
        }
    }
}

/// The library backend for `s3s-fs` behind `proxy`.
fn proxied_backend(proxy: &FaultProxy) -> S3Backend {
    shared_credentials_file();
    let url = format!(
        "s3://{BUCKET}?endpoint={}&region=us-east-1&profile=nixpush",
        proxy.url()
    );
    let mut config = Config::default();
    config.target.url = url.clone();
    config.target.part_size = PART_SIZE;
    S3Backend::new(&url, &config).unwrap()
}

/// Our CompleteMultipartUpload is answered `404 NoSuchUpload` although the object is complete (another writer
/// won): the NAR there counts as ours and the narinfo is written. See: #22
#[tokio::test]
async fn issue_22_a_superseded_upload_counts_when_the_nar_is_there() {
    // The complete request (a part PUT has partNumber= before its uploadId=).
    let run = Superseded::upload("SignedHeaders=host&uploadId=", "writerswon", 6).await;
    let (server, proxy, public, paths) = (&run.server, &run.proxy, &run.public, &run.paths);
    let creates = request_counts(proxy).get("POST nar create upload").copied();
    assert_eq!(creates, Some(1), "{:?}", request_counts(proxy));
    assert_nix_copies(&server.nix_url(BUCKET), public, paths);
}

/// A part PUT answered `404 NoSuchUpload` and the object is not there: the NAR is uploaded again (a new upload of
/// ours, the old one aborted), not given up. See: #22
#[tokio::test]
async fn issue_22_a_superseded_upload_is_sent_again_when_the_nar_is_not_there() {
    let run = Superseded::upload("partNumber=", "writerslost", 7).await;
    let (server, proxy, public, paths) = (&run.server, &run.proxy, &run.public, &run.paths);
    let counts = request_counts(proxy);
    assert_eq!(counts.get("POST nar create upload"), Some(&2), "{counts:?}");
    assert_no_open_uploads(server);
    assert!(
        server.stored_parts().is_empty(),
        "{:?}",
        server.stored_parts()
    );
    assert_nix_copies(&server.nix_url(BUCKET), public, paths);
}
