//! Trust (issue 15), the target half: `check-config` catches bad key files, token files and URLs early; a full
//! target filesystem heals by itself; presence is per target; a target that echoes our headers leaks nothing.
//! Every upload scenario ends with real Nix copying and verifying what landed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rand::RngCore;

use crate::faultproxy::{Fault, FaultProxy};
use crate::harness::keys::{public_key, signing_key_file};
use crate::harness::nix::{eval_to_store, store_query};
use crate::harness::tmpfs::Tmpfs;
use crate::nginx::Nginx;
use crate::util::{fresh_nonce, nix, wait_until, TestDaemon, TestEnv, NIXPUSH};

/// Runs `nix ARGS` (with the nix-command feature) and fails the test with its stderr unless it succeeds.
fn nix_command(args: &[&str]) {
    let output = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "nix {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Real Nix's opinion of a cache: `nix copy --from` it into a fresh store trusting only the test key (which
/// needs every reference of every path in the cache), then `nix store verify` of the copy and of the cache
/// (contents and signatures).
fn nix_copies_and_verifies(cache_url: &str, paths: &[String]) {
    let fresh = tempfile::tempdir().unwrap();
    let fresh = fresh.path().to_str().unwrap();
    let key = public_key();
    let key = key.trim();
    let mut copy = vec![
        "copy",
        "--from",
        cache_url,
        "--to",
        fresh,
        "--option",
        "trusted-public-keys",
        key,
        "--option",
        "substituters",
        "",
    ];
    copy.extend(paths.iter().map(String::as_str));
    nix_command(&copy);
    for store in [fresh, cache_url] {
        let mut verify = vec![
            "store",
            "verify",
            "--store",
            store,
            "--trusted-public-keys",
            key,
        ];
        verify.extend(paths.iter().map(String::as_str));
        nix_command(&verify);
    }
}

/// A dependency and a referrer made with `builtins.toFile`, so the referrer's closure is both: `(dep, top)`.
fn dep_and_referrer() -> (String, String) {
    let nonce = fresh_nonce();
    let expr = format!(
        r#"let dep = builtins.toFile "trust-dep" "dependency {nonce}\n";
           in builtins.toFile "trust-top" "uses ${{dep}} {nonce}\n""#
    );
    let top = eval_to_store(&expr);
    let refs = store_query("--references", &top);
    assert_eq!(refs.len(), 1, "{refs:?}");
    (refs[0].clone(), top)
}

/// `count` store paths of `bytes` random (incompressible) bytes each.
fn random_store_paths(dir: &Path, count: usize, bytes: usize) -> Vec<String> {
    fs::create_dir_all(dir).unwrap();
    let mut args = vec!["nix-store".to_owned(), "--add".to_owned()];
    for i in 0..count {
        let mut data = vec![0u8; bytes];
        rand::thread_rng().fill_bytes(&mut data);
        let file = dir.join(format!("trust-random-{i}"));
        fs::write(&file, data).unwrap();
        args.push(file.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let paths: Vec<String> = nix(&args).lines().map(str::to_owned).collect();
    assert_eq!(paths.len(), count);
    paths
}

fn file_target(cache: &Path, key: &Path, extra: &str) -> String {
    format!(
        "url = \"file://{}\"\nsigning_key_file = \"{}\"\n{extra}",
        cache.display(),
        key.display()
    )
}

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
    // Token files matter only to targets that send a token.
    let http_cache = "url = \"http://127.0.0.1:1/cache\"";
    let good_key = signing_key_file(env.dir.path());
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
            format!("{http_cache}\nauth_token_file = \"{}\"", missing.display()),
            vec![
                "line 3".into(),
                "target.auth_token_file".into(),
                "cannot read auth token file".into(),
            ],
        ),
        (
            format!(
                "{http_cache}\nauth_token_file = \"{}\"",
                token_dir.display()
            ),
            vec![
                "line 3".into(),
                "cannot read auth token file".into(),
                "directory".into(),
            ],
        ),
        (
            format!(
                "{http_cache}\nauth_token_file = \"{}\"",
                empty_token.display()
            ),
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

// See: #15
#[test]
fn a_full_target_filesystem_is_waited_out_and_uploads_resume_when_it_grows() {
    let env = TestEnv::new();
    let key = signing_key_file(env.dir.path());
    let filesystem = match Tmpfs::mount("64k") {
        Ok(filesystem) => filesystem,
        Err(e) => return eprintln!("cannot mount a tmpfs ({e}); skipping"),
    };
    let cache = filesystem.path().to_owned();
    // Two attempts would park a path whose upload failed for a reason of its own; a full target is not one.
    env.write_config_with(
        "",
        &file_target(&cache, &key, "retry_base_ms = 50\nmax_attempts = 2"),
    );
    let paths = random_store_paths(&env.dir.path().join("random"), 3, 96 * 1024);
    let daemon = TestDaemon::start_uploading(env);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    assert!(daemon.env.run_hook(&refs, None).status.success());

    wait_until("the target shown as degraded", || {
        daemon.status()["target"]["degraded"]
            .as_str()
            .is_some_and(|reason| reason.contains("No space left on device"))
    });
    wait_until("more rounds than max_attempts", || {
        daemon.log().matches("target degraded").count() >= 4
    });
    let status = daemon.status();
    assert_eq!(status["failed"], 0, "parked on a full target: {status}");
    // Waiting, not parked: queued, or in flight for the next try when the status was read.
    assert_eq!(
        status["queued"].as_u64().unwrap() + status["in_flight"].as_u64().unwrap(),
        3,
        "{status}"
    );
    let text = daemon.env.nixpush(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("DEGRADED: No space left on device"), "{text}");

    filesystem.remount("size=16m");
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");
    assert!(status["target"]["degraded"].is_null(), "{status}");
    assert!(
        daemon.log().contains("target healthy again"),
        "{}",
        daemon.log()
    );
    nix_copies_and_verifies(&format!("file://{}", cache.display()), &paths);
}

// See: #15
#[test]
fn a_new_target_or_a_cache_that_lost_paths_never_gets_a_narinfo_without_its_references() {
    let env = TestEnv::new();
    let key = signing_key_file(env.dir.path());
    let (cache_a, cache_b) = (
        env.dir.path().join("cache-a"),
        env.dir.path().join("cache-b"),
    );
    env.write_config_with("", &file_target(&cache_a, &key, ""));
    let (dep, top) = dep_and_referrer();
    let (lost_dep, lost_top) = dep_and_referrer();
    let narinfo = |cache: &Path, path: &str| {
        cache.join(format!(
            "{}.narinfo",
            &path["/nix/store/".len().."/nix/store/".len() + 32]
        ))
    };

    // The dependencies go to cache A and are remembered as present there.
    let mut daemon = TestDaemon::start_uploading(env);
    assert!(daemon
        .env
        .run_hook(&[&dep, &lost_dep], None)
        .status
        .success());
    daemon.wait_drained();
    assert!(narinfo(&cache_a, &dep).exists() && narinfo(&cache_a, &lost_dep).exists());

    // Switched to cache B: what A holds says nothing about B.
    daemon.stop();
    daemon
        .env
        .write_config_with("", &file_target(&cache_b, &key, ""));
    daemon.restart();
    assert!(daemon.env.run_hook(&[&top], None).status.success());
    daemon.wait_drained();
    assert!(narinfo(&cache_b, &dep).exists(), "{}", daemon.log());
    nix_copies_and_verifies(
        &format!("file://{}", cache_b.display()),
        std::slice::from_ref(&top),
    );

    // Back to A, which meanwhile lost a path: the answer remembered from the earlier daemon is asked again
    // before a narinfo that references it is written.
    daemon.stop();
    fs::remove_file(narinfo(&cache_a, &lost_dep)).unwrap();
    daemon
        .env
        .write_config_with("", &file_target(&cache_a, &key, ""));
    daemon.restart();
    assert!(daemon.env.run_hook(&[&lost_top], None).status.success());
    daemon.wait_drained();
    assert!(narinfo(&cache_a, &lost_dep).exists(), "{}", daemon.log());
    nix_copies_and_verifies(&format!("file://{}", cache_a.display()), &[lost_top, dep]);
}

// See: #15
#[test]
fn a_target_that_echoes_the_request_headers_leaks_no_token() {
    const TOKEN: &str = "trust-echo-token-5f3a9c1e7b";
    let env = TestEnv::new();
    let key = signing_key_file(env.dir.path());
    let token_file = env.dir.path().join("token");
    fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).unwrap();
    let www = env.dir.path().join("www");
    fs::create_dir_all(www.join("cache")).unwrap();
    let nginx = Nginx::start(&www, "");
    let proxy = FaultProxy::start(nginx.port, 0.0, &[Fault::EchoHeaders], Duration::ZERO, 1);
    // Every request is answered with our own headers, token included, until the test has seen the echo in
    // `status` and twelve requests have been echoed.
    proxy.fail_next(u64::MAX);
    env.write_config_with(
        "",
        &format!(
            "url = \"{}/cache\"\nauth_token_file = \"{}\"\nsigning_key_file = \"{}\"\nretry_base_ms = 50",
            proxy.url(),
            token_file.display(),
            key.display()
        ),
    );
    let (dep, top) = dep_and_referrer();
    let daemon = TestDaemon::start_uploading(env);
    assert!(daemon.env.run_hook(&[&top], None).status.success());
    wait_until("the echoed error in status", || {
        daemon.status()["failed_paths"]
            .to_string()
            .contains("HTTP 500")
            || daemon.status()["target"]["message"]
                .to_string()
                .contains("HTTP 500")
    });
    wait_until("twelve echoed requests", || {
        proxy.stats.faults.load(std::sync::atomic::Ordering::SeqCst) >= 12
    });
    proxy.fail_next(0);
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");
    let log = daemon.log();
    assert!(
        log.to_ascii_lowercase().contains("authorization: ***"),
        "the echo did not reach the log, so the test proves nothing:\n{log}"
    );

    let mut seen = vec![("daemon log".to_owned(), log.into_bytes())];
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["queue", "list", "--json"],
    ] {
        let output = daemon.env.nixpush(args);
        seen.push((
            format!("nixpush {}", args.join(" ")),
            [output.stdout, output.stderr].concat(),
        ));
    }
    let mut files = vec![daemon.env.state_dir.clone()];
    while let Some(file) = files.pop() {
        if file.is_dir() {
            files.extend(fs::read_dir(&file).unwrap().map(|e| e.unwrap().path()));
        } else {
            seen.push((file.display().to_string(), fs::read(&file).unwrap()));
        }
    }
    for (what, bytes) in &seen {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains(TOKEN), "the token leaked into {what}");
    }
    nix_copies_and_verifies(
        &format!("file://{}", www.join("cache").display()),
        &[top, dep],
    );
}

// See: #15
#[test]
fn an_http_target_answering_507_is_waited_out_without_parking() {
    let env = TestEnv::new();
    let key = signing_key_file(env.dir.path());
    let www = env.dir.path().join("www");
    fs::create_dir_all(www.join("cache")).unwrap();
    let nginx = Nginx::start(&www, "");
    let proxy = FaultProxy::start(
        nginx.port,
        0.0,
        &[Fault::InsufficientStorage],
        Duration::ZERO,
        1,
    );
    // The NAR PUTs; readying the target (its nix-cache-info PUT) is retried apart from the paths.
    proxy.only_matching("PUT /cache/nar/");
    // Every NAR PUT is refused until the test has seen the target degraded and more refusals than one attempt
    // per path could absorb (one attempt allowed); only then does the target heal.
    proxy.fail_next(u64::MAX);
    env.write_config_with(
        "",
        &format!(
            "url = \"{}/cache\"\nsigning_key_file = \"{}\"\nretry_base_ms = 50\nmax_attempts = 1",
            proxy.url(),
            key.display()
        ),
    );
    let (dep, top) = dep_and_referrer();
    let daemon = TestDaemon::start_uploading(env);
    assert!(daemon.env.run_hook(&[&top], None).status.success());
    wait_until("the target shown as degraded", || {
        daemon.status()["target"]["degraded"]
            .as_str()
            .is_some_and(|reason| reason.contains("507"))
    });
    wait_until("eight refused PUTs", || {
        proxy.stats.faults.load(std::sync::atomic::Ordering::SeqCst) >= 8
    });
    proxy.fail_next(0);
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");
    assert!(status["target"]["degraded"].is_null(), "{status}");
    nix_copies_and_verifies(
        &format!("file://{}", www.join("cache").display()),
        &[top, dep],
    );
}
