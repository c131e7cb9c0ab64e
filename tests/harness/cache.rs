//! A binary cache as real Nix sees it: `nix copy --from` into a fresh store, `nix store verify`, and what a
//! narinfo's file name and NAR must be.

use std::path::{Path, PathBuf};
use std::process::Command;

use nixpush::narinfo::NarInfo;

use super::keys::wrong_key;
use super::process::output;

/// The 32-character hash part of a store path.
pub fn hash_part(path: &str) -> &str {
    &path["/nix/store/".len().."/nix/store/".len() + 32]
}

/// `dir/<hash>.narinfo` for store path `path`.
pub fn narinfo_file(dir: &Path, path: &str) -> PathBuf {
    dir.join(format!("{}.narinfo", hash_part(path)))
}

/// `nix copy --from URL` of `paths` into a fresh store root, trusting only `public_key`. Returns whether every
/// path arrived, and Nix's stderr.
pub fn nix_copy_from(url: &str, public_key: &str, paths: &[String]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let out = output(
        Command::new("nix")
            .args(["--extra-experimental-features", "nix-command", "copy"])
            .args(["--from", url, "--to"])
            .arg(&root)
            .args(["--option", "trusted-public-keys", public_key.trim()])
            .args(["--option", "narinfo-cache-negative-ttl", "0"])
            .args(["--option", "narinfo-cache-positive-ttl", "0"])
            .args(paths)
            // A private narinfo cache per run: Nix remembers answers per cache URL.
            .env("XDG_CACHE_HOME", dir.path().join("xdg")),
    );
    let arrived = paths
        .iter()
        .all(|p| root.join(p.trim_start_matches('/')).exists());
    (
        out.status.success() && arrived,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`nix_copy_from`] of `paths` from `url` under `public_key` brings every path.
pub fn assert_nix_copies(url: &str, public_key: &str, paths: &[String]) {
    let (ok, err) = nix_copy_from(url, public_key, paths);
    assert!(ok, "nix copy --from {url} failed: {err}");
}

/// Real Nix substitutes every path in `paths` from `url` trusting `public_key`, and refuses them under a key that
/// signed nothing.
pub fn assert_nix_substitutes(url: &str, public_key: &str, paths: &[String]) {
    let (ok, stderr) = nix_copy_from(url, public_key, paths);
    assert!(ok, "nix copy --from {url} of {paths:?}: {stderr}");
    let (accepted, stderr) = nix_copy_from(url, &wrong_key(), paths);
    assert!(!accepted, "{paths:?} accepted from {url} under a wrong key");
    assert!(stderr.contains("lacks a valid signature"), "{stderr}");
}

/// `nix store verify` of `paths` in the cache at `url` under `public_key`: real Nix reads every NAR back and
/// checks its hash and the narinfo's signature.
pub fn assert_nix_verifies(url: &str, public_key: &str, paths: &[String]) {
    for chunk in paths.chunks(256) {
        let out = output(
            Command::new("nix")
                .args(["--extra-experimental-features", "nix-command"])
                .args(["store", "verify", "--store", url])
                .args(["--trusted-public-keys", public_key.trim()])
                .args(chunk),
        );
        assert!(
            out.status.success(),
            "nix store verify --store {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every narinfo in `dir` names a NAR that exists; returns how many there are.
pub fn assert_every_narinfo_has_its_nar(dir: &Path) -> usize {
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
