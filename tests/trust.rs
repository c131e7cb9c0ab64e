//! Trust (issue 15), the target half: `check-config` catches bad key files, token files and URLs early; a full
//! target filesystem heals by itself; presence is per target; a target that echoes our headers leaks nothing.
//! Every upload scenario ends with real Nix copying and verifying what landed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::daemon_upload::{public_key, signing_key};
use crate::util::{TestEnv, NIXPUSH};

/// `nixpush check-config [EXTRA…] FILE`: whether it passed, and its stderr.
fn check_config(file: &Path, extra: &[&str]) -> (bool, String) {
    let output = Command::new(NIXPUSH)
        .arg("check-config")
        .args(extra)
        .arg(file)
        .env_remove("CACHIX_SIGNING_KEY")
        .env_remove("NIXPUSH_AUTH_TOKEN")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Writes a config whose `[target]` body is `target` (line 1 is `[target]`).
fn config_with_target(env: &TestEnv, target: &str) -> std::path::PathBuf {
    let file = env.dir.path().join("check.toml");
    fs::write(&file, format!("[target]\n{target}\n")).unwrap();
    file
}

// See: #15
#[test]
fn check_config_refuses_each_bad_key_token_and_url_with_its_message() {
    let env = TestEnv::new();
    let dir = env.dir.path();
    let cache = format!("url = \"file://{}/cache\"", dir.display());
    let good_key = signing_key(&env);
    let write = |name: &str, bytes: &[u8]| {
        let file = dir.join(name);
        fs::write(&file, bytes).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        file
    };
    let empty = write("empty.sec", b"");
    let garbage = write("garbage.sec", b"not a key at all\n");
    let public = write("public-as-secret.sec", public_key().as_bytes());
    let key_dir = dir.join("keydir");
    fs::create_dir(&key_dir).unwrap();
    let token_dir = dir.join("tokendir");
    fs::create_dir(&token_dir).unwrap();
    let empty_token = write("empty.token", b"\n");
    let missing = dir.join("does-not-exist");

    // (target body, what the message must say). The key or token line is line 3 of each file.
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            format!("{cache}\nsigning_key_file = \"{}\"", missing.display()),
            vec![
                "line 3".into(),
                "target.signing_key_file".into(),
                missing.display().to_string(),
                "No such file".into(),
            ],
        ),
        (
            format!("{cache}\nsigning_key_file = \"{}\"", empty.display()),
            vec![
                "line 3".into(),
                "invalid secret key".into(),
                empty.display().to_string(),
            ],
        ),
        (
            format!("{cache}\nsigning_key_file = \"{}\"", garbage.display()),
            vec!["line 3".into(), "expected NAME:BASE64".into()],
        ),
        (
            format!("{cache}\nsigning_key_file = \"{}\"", public.display()),
            vec!["line 3".into(), "this is a public key".into()],
        ),
        (
            format!("{cache}\nsigning_key_file = \"{}\"", key_dir.display()),
            vec![
                "line 3".into(),
                key_dir.display().to_string(),
                "directory".into(),
            ],
        ),
        (
            format!("{cache}\nauth_token_file = \"{}\"", missing.display()),
            vec![
                "line 3".into(),
                "target.auth_token_file".into(),
                "cannot read auth token file".into(),
            ],
        ),
        (
            format!("{cache}\nauth_token_file = \"{}\"", token_dir.display()),
            vec![
                "line 3".into(),
                "cannot read auth token file".into(),
                "directory".into(),
            ],
        ),
        (
            format!("{cache}\nauth_token_file = \"{}\"", empty_token.display()),
            vec!["line 3".into(), "is empty".into()],
        ),
        (
            "url = \"file://relative/dir\"".into(),
            vec!["line 2".into(), "target.url".into(), "absolute path".into()],
        ),
        (
            format!("url = \"file://{}/cache?compression=xz\"", dir.display()),
            vec![
                "line 2".into(),
                "\"compression\"".into(),
                "take no query parameters".into(),
            ],
        ),
        (
            "url = \"s3://bucket?regoin=eu-west-1\"".into(),
            vec![
                "line 2".into(),
                "\"regoin\"".into(),
                "region, endpoint, scheme, addressing, profile".into(),
            ],
        ),
        (
            "url = \"cachix://mycache?token=abc\"".into(),
            vec!["line 2".into(), "take only api".into()],
        ),
    ];
    for (target, needles) in &cases {
        let file = config_with_target(&env, target);
        let (ok, message) = check_config(&file, &[]);
        assert!(!ok, "check-config accepted:\n{target}");
        for needle in needles {
            assert!(
                message.contains(needle.as_str()),
                "{needle:?} not in {message:?}\nfor:\n{target}"
            );
        }
        assert!(
            !message.contains("abc"),
            "a query value was echoed: {message}"
        );
    }

    // An unreadable key file, seen by a user who cannot read it.
    let unreadable = write("unreadable.sec", &fs::read(&good_key).unwrap());
    fs::set_permissions(&unreadable, fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    let file = config_with_target(
        &env,
        &format!("{cache}\nsigning_key_file = \"{}\"", unreadable.display()),
    );
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let output = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            NIXPUSH,
        ])
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{message}");
    assert!(
        message.contains("Permission denied") && message.contains("line 3"),
        "{message}"
    );

    // The good key passes, and --skip-files passes a file that names absent secrets (a build sandbox).
    let file = config_with_target(
        &env,
        &format!("{cache}\nsigning_key_file = \"{}\"", good_key.display()),
    );
    let (ok, message) = check_config(&file, &[]);
    assert!(ok, "{message}");
    let file = config_with_target(
        &env,
        &format!("{cache}\nsigning_key_file = \"{}\"", missing.display()),
    );
    let (ok, message) = check_config(&file, &["--skip-files"]);
    assert!(ok, "{message}");
}
