//! The upload engine against real Nix paths, a real `file://` cache and real nginx, checked by real `nix copy`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nixpush::backend::{AnyBackend, Credentials};
use nixpush::config::Config;
use nixpush::narinfo::NarInfo;
use nixpush::pathinfo::LocalStore;
use nixpush::signing::PublicKey;
use nixpush::store_path::StorePath;
use nixpush::upload::{
    BatchReport, Engine, LogObserver, MemoryPresentCache, PathOutcome, RootOutcome, Settings,
};
use tokio_util::sync::CancellationToken;

use crate::harness::cache::{
    assert_every_narinfo_has_its_nar, assert_nix_copies, assert_nix_substitutes,
};
use crate::harness::faultproxy::Fault;
use crate::harness::keys::{public_key, secret_key};
use crate::harness::nix::NIX_OPTIONS;
use crate::harness::process::output;
use crate::harness::setup::HttpCache;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vectors")
}

/// Realises `vectors.nix` (instant once built) and returns the `vec-top` output.
fn vec_top() -> StorePath {
    let out = output(
        Command::new("nix-build")
            .arg(fixtures().join("vectors.nix"))
            .args(NIX_OPTIONS)
            .args(["--option", "substituters", "", "--no-out-link", "-A", "top"]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.ends_with("-vec-top"))
        .expect("vec-top output");
    StorePath::parse(line, "/nix/store").unwrap()
}

fn config_for(url: &str, state: &Path) -> Config {
    let text = format!(
        "state_dir = {state:?}\nupstream = []\n[target]\nurl = {url:?}\nworkers = 2\n",
        state = state.display().to_string()
    );
    Config::parse(&text, Path::new("test.toml")).unwrap()
}

fn engine(config: &Config) -> Engine<AnyBackend> {
    engine_with(config, Settings::from_config(config).unwrap())
}

/// The engine for `config`'s target with `settings`, signing with the test key.
fn engine_with(config: &Config, settings: Settings) -> Engine<AnyBackend> {
    let backend = AnyBackend::from_config(config, Credentials::none()).unwrap();
    let store = LocalStore::open(config.store_dir_str(), &config.nix_db).unwrap();
    Engine::new(
        Arc::new(backend),
        Arc::new(store),
        settings,
        Some(secret_key()),
        Arc::new(MemoryPresentCache::default()),
        Arc::new(LogObserver),
    )
    .unwrap()
}

/// The backend's one-time preparation (`nix-cache-info`), which the tests that need no faults there expect to pass.
async fn prepare(engine: &Engine<AnyBackend>) {
    nixpush::backend::Backend::prepare(engine.backend().as_ref())
        .await
        .unwrap();
}

/// Pushes `top` and its closure.
async fn push(engine: &Engine<AnyBackend>, top: &StorePath) -> BatchReport {
    engine
        .push(std::slice::from_ref(top), &CancellationToken::new())
        .await
}

/// The push of the one root finished.
fn assert_done(report: &BatchReport) {
    assert!(
        matches!(report.roots[..], [(_, RootOutcome::Done)]),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_fills_a_file_cache_that_nix_accepts() {
    let top = vec_top();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let url = format!("file://{}", cache.display());
    let config = config_for(&url, &dir.path().join("state"));
    let engine = engine(&config);
    prepare(&engine).await;

    let report = push(&engine, &top).await;
    assert_done(&report);
    let uploaded: Vec<&str> = report
        .paths
        .iter()
        .filter(|p| p.outcome == PathOutcome::Uploaded)
        .map(|p| p.path.name())
        .collect();
    assert_eq!(uploaded.len(), 2, "vec-dep and vec-top: {uploaded:?}");
    // References go first.
    assert_eq!(uploaded, ["vec-dep", "vec-top"]);

    let public = PublicKey::parse(&public_key()).unwrap();
    for report in &report.paths {
        let text =
            std::fs::read_to_string(cache.join(format!("{}.narinfo", report.path.hash_part())))
                .unwrap();
        let info = NarInfo::parse(&text, "/nix/store").unwrap();
        assert!(info.verify(&public), "signature of {}", report.path);
        assert!(cache.join(&info.url).exists(), "NAR of {}", report.path);
        assert_eq!(info.compression, "zstd");
    }
    assert_eq!(
        std::fs::read_to_string(cache.join("nix-cache-info")).unwrap(),
        "StoreDir: /nix/store\n"
    );

    assert_nix_substitutes(&url, &public_key(), &[top.as_str().to_owned()]);

    // A second push finds everything present and uploads nothing.
    let again = push(&engine, &top).await;
    assert!(
        again
            .paths
            .iter()
            .all(|p| p.outcome == PathOutcome::AlreadyPresent),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_fills_nginx_over_http_put() {
    let top = vec_top();
    let dir = tempfile::tempdir().unwrap();
    let http = HttpCache::start(dir.path());
    let url = http.direct_url();
    let config = config_for(&url, &dir.path().join("state"));
    let engine = engine(&config);
    prepare(&engine).await;
    let report = push(&engine, &top).await;
    assert_done(&report);

    // NAR before narinfo, dependency before dependant, as nginx saw it.
    let log = http.nginx.access_log();
    let puts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"PUT "))
        .filter_map(|l| l.split('"').nth(1))
        .collect();
    let position = |needle: &str| puts.iter().position(|l| l.contains(needle)).unwrap();
    let dep_info = position(&format!("{}.narinfo", "8pjibnycdlc071yls0gkbsb7l2ffmlgg"));
    let top_info = position(&format!("{}.narinfo", top.hash_part()));
    assert!(dep_info < top_info, "{puts:?}");
    assert!(
        puts[..dep_info].iter().any(|l| l.contains("/nar/")),
        "{puts:?}"
    );

    assert_nix_substitutes(&url, &public_key(), &[top.as_str().to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_survives_a_faulty_wire() {
    let top = vec_top();
    let dir = tempfile::tempdir().unwrap();
    let faults = [
        Fault::ServerError,
        Fault::TooManyRequests,
        Fault::ResetMidBody,
        Fault::Stall,
    ];
    let http = HttpCache::with_faults(dir.path(), 0.3, &faults, Duration::from_secs(3), 7);
    let url = http.url();
    let mut config = config_for(&url, &dir.path().join("state"));
    config.target.timeout_secs = 1;
    let engine = engine(&config);
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds <= 20, "still failing after 20 rounds");
        if nixpush::backend::Backend::prepare(engine.backend().as_ref())
            .await
            .is_err()
        {
            continue;
        }
        let report = push(&engine, &top).await;
        // Whatever the faults, a published narinfo always has its NAR.
        assert_every_narinfo_has_its_nar(&http.dir());
        if matches!(report.roots[..], [(_, RootOutcome::Done)]) {
            break;
        }
    }
    assert!(
        http.proxy.stats.faults.load(Ordering::SeqCst) > 0,
        "the proxy injected no fault"
    );
    assert_nix_copies(
        &http.direct_url(),
        &public_key(),
        &[top.as_str().to_owned()],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_presence_query_is_retried_without_failing_paths() {
    let top = vec_top();
    let dir = tempfile::tempdir().unwrap();
    let http = HttpCache::with_faults(dir.path(), 0.0, &[Fault::ServerError], Duration::ZERO, 3);
    let proxy = &http.proxy;
    // Every try the backend makes for one path's HEAD fails, so the whole `missing` query fails once.
    proxy.only_matching(&format!("HEAD /cache/{}.narinfo", top.hash_part()));
    proxy.fail_next(u64::from(nixpush::backend::REQUEST_ATTEMPTS));
    let config = config_for(&http.url(), &dir.path().join("state"));
    let mut settings = Settings::from_config(&config).unwrap();
    settings.presence_retry = nixpush::upload::retry::Policy {
        base: std::time::Duration::from_millis(20),
        ..Default::default()
    };
    let engine = engine_with(&config, settings);
    prepare(&engine).await;
    let report = push(&engine, &top).await;
    assert_eq!(
        proxy.stats.faults.load(Ordering::SeqCst),
        u64::from(nixpush::backend::REQUEST_ATTEMPTS),
        "the fault was not injected"
    );
    assert_done(&report);
    assert!(
        report
            .paths
            .iter()
            .all(|p| !matches!(p.outcome, PathOutcome::Failed(_))),
        "{:?}",
        report.paths
    );
    assert_nix_copies(
        &http.direct_url(),
        &public_key(),
        &[top.as_str().to_owned()],
    );
}
