//! The S3 backend against a real S3 server on 127.0.0.1, read back by real Nix: `s3s-fs` (SigV4 checked; Nix reads
//! the bucket's directory as a `file://` cache), and moto (`tests/servers/s3_server.py`, read over HTTP) for
//! virtual-host addressing (s3s-fs only serves it on a port known before it starts) and a missing bucket (s3s-fs
//! creates one on the first PUT).

use nixpush::backend::s3::S3Backend;
use nixpush::backend::{Backend, Error};
use nixpush::config::{Compression, Config};
use nixpush::signing::SecretKey;
use nixpush::store_path::StorePath;

use crate::harness::cache::assert_nix_copies;
use crate::harness::daemon::push_summary;
use crate::harness::process::Run;
use crate::remote::{build_paths, nix_copy_from, nix_key, prepare, prepare_all, PyServer};
use crate::s3s::{S3sFs, ACCESS_KEY, SECRET_KEY};

const BUCKET: &str = "nixpush-test";

fn config(url: &str, part_size: u64) -> Config {
    let mut config = Config::default();
    config.target.url = url.to_owned();
    config.target.part_size = part_size;
    config
}

/// The backend for `s3s-fs`, with its keys from a `[nixpush]` profile in a credentials file.
fn backend(server: &S3sFs, part_size: u64) -> S3Backend {
    shared_credentials_file();
    let url = format!(
        "s3://{BUCKET}?endpoint={}&region=us-east-1&profile=nixpush",
        server.base()
    );
    S3Backend::new(&url, &config(&url, part_size)).unwrap()
}

/// A SigV4-presigned request for `key` straight to the server: (status, content type, ETag, body).
async fn signed(server: &S3sFs, method: &str, key: &str) -> (u16, String, String, Vec<u8>) {
    use rusty_s3::S3Action;
    let (bucket, creds) = server.signer(BUCKET);
    let expires = std::time::Duration::from_secs(600);
    let client = reqwest::Client::new();
    let response = match method {
        "HEAD" => client.head(bucket.head_object(Some(&creds), key).sign(expires)),
        _ => client.get(bucket.get_object(Some(&creds), key).sign(expires)),
    }
    .send()
    .await
    .unwrap();
    let header = |name| {
        response
            .headers()
            .get(name)
            .map(|v: &reqwest::header::HeaderValue| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (status, content_type, etag) = (
        response.status().as_u16(),
        header(reqwest::header::CONTENT_TYPE),
        header(reqwest::header::ETAG),
    );
    (
        status,
        content_type,
        etag,
        response.bytes().await.unwrap().to_vec(),
    )
}

/// Points `AWS_SHARED_CREDENTIALS_FILE` at a file with a `[nixpush]` profile, once per test process (before any
/// S3 backend reads it; the value never changes afterwards). `s3s::S3sFs` accepts the same keys.
pub fn shared_credentials_file() {
    static FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        // In the build's scratch directory, not /tmp: it outlives the process (statics are never dropped), and
        // every test process writes the same text, so one name, replaced atomically, is all it needs.
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        let file = dir.join("aws-credentials");
        let partial = dir.join(format!("aws-credentials.{}", std::process::id()));
        std::fs::write(
            &partial,
            "[nixpush]\naws_access_key_id = AKTEST\naws_secret_access_key = s3cr3t\n",
        )
        .unwrap();
        std::fs::rename(&partial, &file).unwrap();
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", &file);
        file
    });
}

#[test]
fn server_selftest_against_real_nix() {
    crate::harness::servers::assert_selftest_passes("s3_selftest.py");
}

#[tokio::test]
async fn bucket_written_like_nix_and_substituted() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3sFs::start(&[BUCKET]);
    // 5 MiB parts: the 12 MiB path goes up as a three-part multipart upload.
    let backend = backend(&server, 5 * 1024 * 1024);
    let (sec, public) = nix_key(dir.path(), "nixpush-s3-test-1");
    let (_, other) = nix_key(dir.path(), "other-1");
    let key = SecretKey::load(&sec).unwrap();

    backend.prepare().await.unwrap();
    let (status, content_type, _, body) = signed(&server, "GET", "nix-cache-info").await;
    assert_eq!(
        (status, content_type.as_str()),
        (200, "text/x-nix-cache-info")
    );
    assert_eq!(body, b"StoreDir: /nix/store\n");

    let paths = build_paths(dir.path(), "s3be", 12 * 1024 * 1024);
    let prepared = prepare_all(&paths, Compression::Zstd, Some(&key));
    let all: Vec<StorePath> = paths
        .iter()
        .map(|p| StorePath::parse(p, "/nix/store").unwrap())
        .collect();
    assert_eq!(backend.missing(&all).await.unwrap(), all);
    for p in &prepared {
        backend.upload(&p.narinfo, p.nar()).await.unwrap();
    }
    assert!(backend.missing(&all).await.unwrap().is_empty());

    // Every object is where Nix's S3 store puts it, with its content type and exact bytes.
    for p in &prepared {
        let narinfo_key = format!("{}.narinfo", p.narinfo.store_path.hash_part());
        let (status, content_type, _, body) = signed(&server, "GET", &narinfo_key).await;
        assert_eq!((status, content_type.as_str()), (200, "text/x-nix-narinfo"));
        assert_eq!(String::from_utf8(body).unwrap(), p.narinfo.render());
        let (status, content_type, _, body) = signed(&server, "GET", &p.narinfo.url).await;
        assert_eq!(
            (status, content_type.as_str()),
            (200, "application/x-nix-nar")
        );
        assert_eq!(body, std::fs::read(p.file.path()).unwrap());
    }

    // The big NAR went up in parts: S3 gives a multipart object the ETag `"<md5 of md5s>-<parts>"`.
    let big = prepared.iter().max_by_key(|p| p.size).unwrap();
    let (_, _, etag, _) = signed(&server, "HEAD", &big.narinfo.url).await;
    assert!(etag.trim_matches('"').ends_with("-3"), "{etag}");

    assert_nix_copies(&server.nix_url(BUCKET), &public, &paths);
    let (ok, err) = nix_copy_from(&server.nix_url(BUCKET), &other, &paths);
    assert!(!ok && err.contains("lacks a valid signature"), "{err}");

    // Pushing again is harmless.
    for p in &prepared {
        backend.upload(&p.narinfo, p.nar()).await.unwrap();
    }
}

#[tokio::test]
async fn virtual_host_addressing() {
    let dir = tempfile::tempdir().unwrap();
    let server = PyServer::start("s3_server.py", &["--bucket", BUCKET]);
    shared_credentials_file();
    let url = format!(
        "s3://{BUCKET}?endpoint=http://localhost:{}&addressing=virtual&profile=nixpush",
        server.port
    );
    let backend = S3Backend::new(&url, &config(&url, 5 * 1024 * 1024)).unwrap();
    assert_eq!(
        backend.object_url("x.narinfo").unwrap().as_str(),
        format!("http://{BUCKET}.localhost:{}/x.narinfo", server.port)
    );
    backend.prepare().await.unwrap();
    let paths = build_paths(dir.path(), "s3vh", 1_000);
    let (sec, public) = nix_key(dir.path(), "nixpush-s3-vh-1");
    let key = SecretKey::load(&sec).unwrap();
    for path in &paths {
        let p = prepare(path, Compression::Zstd, Some(&key));
        backend.upload(&p.narinfo, p.nar()).await.unwrap();
    }
    let bucket_url = format!("{}/{BUCKET}", server.base());
    assert_nix_copies(&bucket_url, &public, &paths);
}

#[tokio::test]
async fn a_missing_bucket_is_a_clear_error() {
    // moto: s3s-fs creates a bucket's directory on the first PUT instead of answering NoSuchBucket.
    let server = PyServer::start("s3_server.py", &[]);
    shared_credentials_file();
    let url = format!(
        "s3://{BUCKET}?endpoint={}&region=us-east-1&profile=nixpush",
        server.base()
    );
    let err = S3Backend::new(&url, &config(&url, 5 * 1024 * 1024))
        .unwrap()
        .prepare()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Status { code: 404, .. }), "{err}");
    assert!(err.to_string().contains("NoSuchBucket"), "{err}");
    assert!(!err.to_string().contains(SECRET_KEY), "{err}");
}

#[test]
fn nixpush_push_fills_a_bucket_nix_reads() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3sFs::start(&[BUCKET]);
    let (sec, public) = nix_key(dir.path(), "nixpush-s3-cli-1");
    let paths = build_paths(dir.path(), "s3cli", 6 * 1024 * 1024);
    let out = server
        .push_command(BUCKET, &sec)
        .arg("--json")
        .arg(&paths[1])
        .arg(&paths[2])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("TMPDIR", dir.path())
        .run();
    let summary = push_summary(&out, SECRET_KEY);
    assert_eq!(summary["uploaded"], 3, "{summary}");
    assert_nix_copies(&server.nix_url(BUCKET), &public, &paths);
}

#[tokio::test]
async fn hook_builds_reach_the_bucket_and_nix_substitutes() {
    use crate::util::{nix_build_with_hook, TestDaemon, TestEnv};

    let env = TestEnv::new();
    let server = S3sFs::start(&[BUCKET]);
    let (sec, public) = nix_key(env.dir.path(), "nixpush-s3-e2e-1");
    // The daemon inherits AWS_SHARED_CREDENTIALS_FILE and reads the [nixpush] profile.
    shared_credentials_file();
    env.write_config_with(
        "",
        &format!(
            "url = \"s3://{BUCKET}?endpoint={}&profile=nixpush\"\nsigning_key_file = \"{}\"",
            server.base(),
            sec.display()
        ),
    );
    let daemon = TestDaemon::start_uploading(env);
    let build = nix_build_with_hook(&daemon.env);
    assert!(build.output.status.success(), "{}", build.stderr());
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}\n{}", daemon.log());
    assert!(!daemon.log().contains("s3cr3t"));
    assert_nix_copies(&server.nix_url(BUCKET), &public, &build.outputs);
}
