//! Signing keys: the fixed test key the vectors were signed with, fresh keys made by Nix, and a key nothing was
//! signed with.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nixpush::signing::SecretKey;

use super::process::output;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vectors")
        .join(name)
}

/// The test key's public half, `nixpush-test-1:…`.
pub fn public_key() -> String {
    fs::read_to_string(fixture("test-key.pub"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The test key's secret half, loaded.
pub fn secret_key() -> SecretKey {
    SecretKey::load(&fixture("test-key.sec")).unwrap()
}

/// The test key copied to `dir/signing.sec` with mode 0600, as a real secret would be.
pub fn signing_key_file(dir: &Path) -> PathBuf {
    let path = dir.join("signing.sec");
    fs::copy(fixture("test-key.sec"), &path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A fresh key pair made by Nix: (secret key file, public key text).
pub fn nix_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let (sec, public) = (
        dir.join(format!("{name}.sec")),
        dir.join(format!("{name}.pub")),
    );
    let out = output(
        Command::new("nix-store")
            .arg("--generate-binary-cache-key")
            .arg(name)
            .arg(&sec)
            .arg(&public),
    );
    assert!(
        out.status.success(),
        "nix-store --generate-binary-cache-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (sec, fs::read_to_string(public).unwrap())
}

/// A public key with the test key's name that signed nothing: a cache trusted only under it must be refused.
pub fn wrong_key() -> String {
    nixpush::signing::generate("nixpush-test-1")
        .public_key()
        .to_string()
}
