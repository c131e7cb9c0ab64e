//! Issue 18: queued paths are garbage-collector roots until they are uploaded, with real Nix.
//!
//! The machine's store is shared with other tests, so no test here runs a deleting `nix-store --gc`: rooting is
//! checked on exactly our path with `nix-store --delete PATH` (which refuses a live path, "Cannot delete path …
//! since it is still alive") and with the dry run `nix-store --gc --print-dead` (our path must not be listed).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use nixpush::queue::{Queue, State};
use nixpush::store_path::StorePath;

use crate::harness::daemon::{TestDaemon, TestEnv, HOOK};
use crate::harness::nix::{add_store_paths, fresh_nonce, nix, NIX_OPTIONS};
use crate::harness::process::{output, wait_until};

/// A roots directory under Nix's real `gcroots/`, removed (with any root left in it) when dropped.
struct NixRootsDir(PathBuf);

impl NixRootsDir {
    fn new() -> NixRootsDir {
        NixRootsDir(PathBuf::from(format!(
            "/nix/var/nix/gcroots/nixpush-test-{}",
            fresh_nonce()
        )))
    }
}

impl Drop for NixRootsDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn link(dir: &Path, path: &str) -> PathBuf {
    dir.join(Path::new(path).file_name().unwrap())
}

/// Whether the daemon's root of `path` is in `dir`: a regular file named after the path (a hard link of the
/// directory's anchor).
fn has_root(dir: &Path, path: &str) -> bool {
    fs::symlink_metadata(link(dir, path)).is_ok_and(|meta| meta.file_type().is_file())
}

/// `nix-store --delete PATH`: whether Nix deleted it.
fn nix_store_delete(path: &str) -> (bool, String) {
    let out = output(Command::new("nix-store").args(["--delete", path]));
    (
        out.status.success() && !Path::new(path).exists(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Builds a fresh derivation with `nixpush-hook` as post-build-hook, keeping `out_link` as its only other root.
fn build_with_hook(env: &TestEnv, out_link: &Path) -> String {
    let expr = env.dir.path().join("gcroot-test.nix");
    fs::write(
        &expr,
        format!(
            "derivation {{ name = \"nixpush-gcroot-test\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [\"-c\" \"echo {} > $out\"]; }}\n",
            fresh_nonce()
        ),
    )
    .unwrap();
    let out = output(
        Command::new("nix-build")
            .arg(&expr)
            .args(NIX_OPTIONS)
            .args(["--option", "substituters", ""])
            .args(["--option", "post-build-hook", HOOK])
            .arg("--out-link")
            .arg(out_link)
            .envs(env.hook_env()),
    );
    assert!(
        out.status.success(),
        "nix-build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .lines()
        .last()
        .unwrap()
        .to_owned()
}

// See: #18
#[test]
fn a_queued_path_survives_nix_gc_until_it_is_uploaded() {
    let roots = NixRootsDir::new();
    let env = TestEnv::with_config(&format!("gc_roots_dir = \"{}\"", roots.0.display()));
    let mut daemon = TestDaemon::start_in(env);
    let result = daemon.env.dir.path().join("result");
    let path = build_with_hook(&daemon.env, &result);
    daemon.wait_queued(std::slice::from_ref(&path));
    assert!(has_root(&roots.0, &path), "{}", daemon.log());

    // nixpush's root is the only one left.
    fs::remove_file(&result).unwrap();
    let dead = nix(&["nix-store", "--gc", "--print-dead"]);
    assert!(
        !dead.lines().any(|l| l == path),
        "{path} would be collected"
    );
    let (deleted, stderr) = nix_store_delete(&path);
    assert!(!deleted, "Nix deleted a queued path");
    assert!(stderr.contains("still alive"), "{stderr}");
    let roots_listed = nix(&["nix-store", "--gc", "--print-roots"]);
    assert!(
        roots_listed.contains(&link(&roots.0, &path).display().to_string()),
        "{roots_listed}"
    );
    wait_until("the root's NAR size in status", || {
        let status = daemon.status();
        status["gc_roots"]["rooted_paths"] == 1
            && status["gc_roots"]["rooted_bytes"].as_u64() > Some(0)
    });
    let status = daemon.status();
    assert_eq!(status["gc_roots"]["dir"], roots.0.display().to_string());
    assert_eq!(status["gc_roots"]["error"], serde_json::Value::Null);
    assert_eq!(status["gc_roots"]["warning"], serde_json::Value::Null);

    // Uploaded: the root goes, and Nix may collect the path.
    daemon.stop();
    daemon.set_hold(false);
    daemon.restart();
    daemon.wait_drained();
    wait_until("the root removed after the upload", || {
        fs::symlink_metadata(link(&roots.0, &path)).is_err()
    });
    assert_eq!(daemon.status()["gc_roots"]["rooted_paths"], 0);
    let (deleted, stderr) = nix_store_delete(&path);
    assert!(deleted, "{stderr}");
}

// See: #18
#[test]
fn a_roots_directory_that_cannot_be_written_does_not_stop_the_ack() {
    let env = TestEnv::new();
    // A file where a parent directory should be: nothing can be created below it, not even by root.
    let blocker = env.dir.path().join("not-a-dir");
    fs::write(&blocker, b"").unwrap();
    let dir = blocker.join("roots");
    env.write_config(&format!("gc_roots_dir = \"{}\"", dir.display()));
    let daemon = TestDaemon::start_in(env);
    let paths = add_store_paths(2);
    let out = daemon.env.run_hook(&[&paths[0]], None);
    assert!(out.status.success());
    assert!(daemon.env.spool_files().is_empty(), "acked, not spooled");
    daemon.wait_queued(&paths[..1]);
    let status = daemon.status();
    let error = status["gc_roots"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("cannot create GC roots in"), "{status}");
    assert!(error.contains("gc_roots_dir = \"\""), "{error}");
    assert_eq!(status["gc_roots"]["rooted_paths"], 0);
    let text = daemon.env.nixpush(&["status"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("ERROR: cannot create GC roots"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    assert_eq!(
        daemon.log().matches("cannot create GC roots").count(),
        1,
        "logged once: {}",
        daemon.log()
    );

    // Fixed: the next request roots both paths and the error clears.
    fs::remove_file(&blocker).unwrap();
    assert!(daemon.env.run_hook(&[&paths[1]], None).status.success());
    wait_until("both paths rooted again", || {
        let status = daemon.status();
        status["gc_roots"]["rooted_paths"] == 2 && status["gc_roots"]["error"].is_null()
    });
    assert!(has_root(&dir, &paths[0]) && has_root(&dir, &paths[1]));
}

// See: #18
#[test]
fn roots_are_reconciled_with_the_queue_at_startup() {
    let mut daemon = TestDaemon::start();
    let dir = daemon.env.gc_roots_dir();
    let paths = add_store_paths(3);
    assert!(daemon
        .env
        .run_hook(&[&paths[0], &paths[1]], None)
        .status
        .success());
    daemon.wait_queued(&paths[..2]);
    assert!(has_root(&dir, &paths[0]) && has_root(&dir, &paths[1]));
    // A not-in-directory-form warning: the test's directory is outside /nix/var/nix/gcroots.
    assert!(daemon.status()["gc_roots"]["warning"]
        .as_str()
        .is_some_and(|w| w.contains("outside /nix/var/nix/gcroots")));
    daemon.stop();

    // While the daemon was down: one root lost, one stale root for a path not queued (in the symlink form earlier
    // versions made), and a foreign file.
    // A queued path's root in that old form is kept as it is.
    fs::remove_file(link(&dir, &paths[0])).unwrap();
    std::os::unix::fs::symlink(&paths[2], link(&dir, &paths[2])).unwrap();
    fs::remove_file(link(&dir, &paths[1])).unwrap();
    std::os::unix::fs::symlink(&paths[1], link(&dir, &paths[1])).unwrap();
    fs::write(dir.join("README"), b"not nixpush's").unwrap();
    daemon.restart();
    assert!(has_root(&dir, &paths[0]), "missing root re-created");
    assert_eq!(
        fs::read_link(link(&dir, &paths[1])).unwrap(),
        Path::new(&paths[1]),
        "a root in the old form is kept"
    );
    assert!(
        fs::symlink_metadata(link(&dir, &paths[2])).is_err(),
        "stale root removed"
    );
    assert!(dir.join("README").exists(), "foreign files are left alone");
    assert_eq!(daemon.status()["gc_roots"]["rooted_paths"], 2);
    assert!(daemon.log().contains("GC roots reconciled with the queue"));
}

// See: #18
#[test]
fn over_the_bound_the_oldest_failed_paths_lose_their_roots_and_retry_restores_them() {
    let paths = add_store_paths(3);
    let sizes: Vec<u64> = nix(&[
        "nix-store",
        "--query",
        "--size",
        &paths[0],
        &paths[1],
        &paths[2],
    ])
    .lines()
    .map(|l| l.parse().unwrap())
    .collect();
    // Room for the queued path and the newer failed one.
    let limit = sizes[2] + sizes[1];
    let mut daemon = TestDaemon::start_in(TestEnv::with_config(&format!(
        "gc_roots_max_bytes = \"{limit} B\""
    )));
    let dir = daemon.env.gc_roots_dir();
    assert!(daemon
        .env
        .run_hook(&[&paths[0], &paths[1], &paths[2]], None)
        .status
        .success());
    daemon.wait_queued(&paths);
    daemon.stop();

    // Park two as failed, the first one earlier, as the upload engine would after its last attempt.
    {
        let queue_dir = daemon.env.state_dir.join("queue");
        let opened = nixpush::queue::open(&queue_dir, "/nix/store").unwrap();
        for (path, failed_at_ms) in [(&paths[0], 1_000), (&paths[1], 2_000)] {
            let path = StorePath::parse(path, "/nix/store").unwrap();
            let mut entry = opened.queue.get(&path).unwrap().unwrap();
            entry.state = State::Failed;
            entry.attempts = 10;
            entry.last_error = Some("HTTP 500".into());
            entry.updated_at_ms = failed_at_ms;
            opened.queue.set(&entry).unwrap();
        }
        opened.queue.flush().unwrap();
    }
    daemon.restart();
    assert!(
        !has_root(&dir, &paths[0]),
        "the oldest failed path gives way"
    );
    assert!(has_root(&dir, &paths[1]) && has_root(&dir, &paths[2]));
    let status = daemon.status();
    assert_eq!(status["gc_roots"]["over_limit_unrooted"], 1, "{status}");
    assert_eq!(status["gc_roots"]["rooted_paths"], 2);
    assert_eq!(status["gc_roots"]["max_bytes"], limit);
    let warnings = daemon
        .log()
        .lines()
        .filter(|l| l.contains("lost their GC roots"))
        .count();
    assert_eq!(warnings, 1, "{}", daemon.log());
    assert!(daemon
        .log()
        .contains("1 failed path(s) lost their GC roots"));

    // `nixpush retry` roots it again (it is still in the store); queued again, it outranks the failed path left,
    // which gives way in turn.
    let out = daemon.env.nixpush(&["retry", &paths[0]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(has_root(&dir, &paths[0]));
    wait_until("the newer failed path released in turn", || {
        !has_root(&dir, &paths[1]) && daemon.status()["gc_roots"]["over_limit_unrooted"] == 1
    });
    assert!(has_root(&dir, &paths[0]) && has_root(&dir, &paths[2]));
    assert_eq!(daemon.status()["queued"], 2);
}
