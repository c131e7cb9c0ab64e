//! Operator experience (issue #7) with real Nix and real nginx: `push` with and without a terminal, `status`
//! after a daemon run, `retry` and `queue`, `doctor` on good and broken setups, and token rotation.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::cache::{hash_part, narinfo_file};
use crate::harness::daemon::{doctor_command, isolated_nixpush, FOREIGN_ENV};
use crate::harness::keys::{self, signing_key_file};
use crate::harness::process::{Guard, Run};
use crate::harness::setup::configure_signed_target;
use crate::nginx::Nginx;
use crate::util::{self, wait_until, TestDaemon, TestEnv, DEADLINE, HOOK, NIXPUSH};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Fails if `output` holds a control character other than a newline (what a CI log must never receive).
fn assert_plain(what: &str, output: &str) {
    let bad: Vec<char> = output
        .chars()
        .filter(|c| c.is_control() && *c != '\n')
        .collect();
    assert!(
        bad.is_empty(),
        "{what} has control characters {bad:?}:\n{output}"
    );
}

/// `nixpush ARGS` with nothing inherited that could point it elsewhere.
fn nixpush(args: &[&str]) -> Output {
    isolated_nixpush(&[]).args(args).stdin(Stdio::null()).run()
}

/// nginx lines that refuse the narinfo of `path` with 405 (a permanent error; 401/403 would pause the target).
fn refuse_narinfo(root: &Path, path: &str) -> String {
    format!(
        "location = /{}.narinfo {{ if ($request_method = PUT) {{ return 405; }} root {}; }}",
        hash_part(path),
        root.display()
    )
}

/// nginx lines that answer 401 unless the request carries `token`.
fn require_token(token: &str) -> String {
    format!("if ($http_authorization != \"Bearer {token}\") {{ return 401; }}")
}

fn cache_dir(env: &TestEnv, name: &str) -> PathBuf {
    let dir = env.dir.path().join(name);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Replaces `file` the way sops-nix and `mv` do: write a temporary file beside it, rename it over.
fn replace_by_rename(file: &Path, contents: &str) {
    let tmp = file.with_extension("tmp");
    fs::write(&tmp, contents).unwrap();
    fs::rename(&tmp, file).unwrap();
}

/// Waits for the daemon's status to satisfy `condition`; returns that status.
fn wait_status(daemon: &TestDaemon, what: &str, condition: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let last = daemon.status();
        if condition(&last) {
            return last;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting for {what}; last status {last:#}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn settled(status: &Value) -> bool {
    status["queued"] == 0 && status["in_flight"] == 0
}

// See: #7
#[test]
fn ops_push_to_a_file_cache_without_a_terminal_prints_plain_lines() {
    let env = TestEnv::new();
    let cache = cache_dir(&env, "cache");
    let key = signing_key_file(env.dir.path());
    let paths = util::add_store_paths(2);
    let url = format!("file://{}", cache.display());
    let mut args = vec![
        "push",
        "--target",
        &url,
        "--no-upstream",
        "--signing-key-file",
        key.to_str().unwrap(),
    ];
    args.extend(paths.iter().map(String::as_str));
    let output = nixpush(&args);
    let (out, err) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{err}");
    assert_plain("stderr", &err);
    assert_plain("stdout", &out);
    for path in &paths {
        let line = err
            .lines()
            .find(|l| l.starts_with(&format!("uploaded {path} (")))
            .unwrap_or_else(|| panic!("no upload line for {path}:\n{err}"));
        assert!(line.contains(" zstd, ") && line.ends_with(" s)"), "{line}");
        assert!(narinfo_file(&cache, path).exists());
    }
    assert!(
        err.contains(&format!(
            "pushed to {url}: 2 uploaded, 0 already present, 0 skipped (upstream), 0 excluded, 0 failed"
        )),
        "{err}"
    );

    // Again: everything is there already.
    let output = nixpush(&args);
    let err = text(&output.stderr);
    assert!(output.status.success(), "{err}");
    assert!(err.contains(": 0 uploaded, 2 already present,"), "{err}");
    assert_plain("stderr", &err);
}

// See: #7
#[test]
fn ops_push_json_to_nginx_reports_the_summary() {
    let env = TestEnv::new();
    let root = cache_dir(&env, "www");
    let nginx = Nginx::start(&root, "");
    let key = signing_key_file(env.dir.path());
    env.write_config_with(
        "",
        &format!(
            "url = \"{}\"\nsigning_key_file = \"{}\"",
            nginx.url(),
            key.display()
        ),
    );
    let paths = util::add_store_paths(1);
    let config = env.config_path.to_str().unwrap();
    let output = nixpush(&["--config", config, "push", "--json", &paths[0]]);
    let err = text(&output.stderr);
    assert!(output.status.success(), "{err}");
    assert_plain("stderr", &err);
    assert_plain("stdout", &text(&output.stdout));
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    // The URL as shown is the one configured: nothing to redact, no slash added.
    assert_eq!(summary["target"], nginx.url());
    assert_eq!(summary["uploaded"], 1);
    assert_eq!(summary["already_present"], 0);
    assert_eq!(summary["skipped_upstream"], 0);
    assert_eq!(summary["excluded"], 0);
    assert_eq!(summary["failed"], Value::Array(vec![]));
    assert_eq!(summary["gone"], Value::Array(vec![]));
    assert!(summary["nar_bytes"].as_u64().unwrap() > 0, "{summary}");
    assert!(summary["file_bytes"].as_u64().unwrap() > 0, "{summary}");
    assert!(summary["wall_time_ms"].is_u64(), "{summary}");
    assert!(narinfo_file(&root, &paths[0]).exists());
    assert!(err.contains(&format!("uploaded {} (", paths[0])), "{err}");
}

// See: #7
#[test]
fn ops_push_exits_non_zero_naming_the_failed_path_and_reason() {
    let env = TestEnv::new();
    let root = cache_dir(&env, "www");
    let paths = util::add_store_paths(2);
    let nginx = Nginx::start(&root, &refuse_narinfo(&root, &paths[1]));
    let url = nginx.url();
    let output = nixpush(&[
        "push",
        "--target",
        &url,
        "--no-upstream",
        "--json",
        &paths[0],
        &paths[1],
    ]);
    let err = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert_plain("stderr", &err);
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["uploaded"], 1, "{summary}");
    let failed = summary["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{summary}");
    assert_eq!(failed[0]["path"], paths[1].as_str());
    let reason = failed[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("PUT") && reason.contains("HTTP 405"),
        "{reason}"
    );
    assert!(err.contains(&format!("failed   {}: ", paths[1])), "{err}");

    // The human summary says the same on stderr.
    let output = nixpush(&["push", "--target", &url, "--no-upstream", &paths[1]]);
    let err = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains(", 1 failed\n"), "{err}");
    assert!(
        err.contains(&format!("  failed: {}: PUT ", paths[1])) && err.contains("HTTP 405"),
        "{err}"
    );
}

/// A tmux server on its own socket, killed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn command(&self) -> Command {
        let mut command = Command::new("tmux");
        command.arg("-S").arg(&self.socket);
        command
    }

    /// The visible screen of the only pane, as text.
    fn screen(&self) -> String {
        let output = self
            .command()
            .args(["capture-pane", "-p", "-J", "-t", "push"])
            .run();
        assert!(output.status.success(), "{}", text(&output.stderr));
        text(&output.stdout)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .command()
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
    }
}

// See: #7
#[test]
fn ops_push_on_a_terminal_draws_progress_then_the_summary() {
    let env = TestEnv::new();
    let cache = cache_dir(&env, "cache");
    let key = signing_key_file(env.dir.path());
    let paths = util::add_store_paths(2);
    let marker = env.dir.path().join("push-exit");
    let script = env.dir.path().join("push.sh");
    fs::write(
        &script,
        format!(
            "unset {}\n{NIXPUSH} push --target file://{} --no-upstream --signing-key-file {} {} {}\n\
             echo $? > {}.tmp && mv {}.tmp {}\nsleep 30\n",
            FOREIGN_ENV.join(" "),
            cache.display(),
            key.display(),
            paths[0],
            paths[1],
            marker.display(),
            marker.display(),
            marker.display(),
        ),
    )
    .unwrap();
    let tmux = Tmux {
        socket: env.dir.path().join("tmux.sock"),
    };
    let started = tmux
        .command()
        .args(["new-session", "-d", "-s", "push", "-x", "200", "-y", "50"])
        .arg(format!("sh {}", script.display()))
        .run();
    assert!(started.status.success(), "{}", text(&started.stderr));
    wait_until("push in tmux to finish", || marker.exists());
    assert_eq!(fs::read_to_string(&marker).unwrap().trim(), "0");
    let screen = tmux.screen();
    for path in &paths {
        assert!(
            screen.contains(&format!("uploaded {path} (")),
            "no upload line for {path} on screen:\n{screen}"
        );
    }
    assert!(
        screen.contains("2 path(s) in the closure, 2 to upload"),
        "{screen}"
    );
    assert!(
        screen.contains(&format!(
            "pushed to file://{}: 2 uploaded,",
            cache.display()
        )),
        "{screen}"
    );
    // The bars are cleared at the end: no half-drawn progress line stays behind.
    assert!(!screen.contains(" paths  "), "{screen}");
}

// See: #7
#[test]
fn ops_status_json_after_a_success_a_failure_and_skips() {
    let env = TestEnv::new();
    let root = cache_dir(&env, "www");
    // nixpush-test-0 lands, -1 is refused by the cache, -2 is excluded.
    let paths = util::add_store_paths(3);
    let nginx = Nginx::start(&root, &refuse_narinfo(&root, &paths[1]));
    let key = signing_key_file(env.dir.path());
    env.write_config_with(
        "exclude = [\"*-nixpush-test-2\"]",
        &format!(
            "url = \"{}\"\nsigning_key_file = \"{}\"",
            nginx.url(),
            key.display()
        ),
    );
    let config_path = env.config_path.clone();
    let config = config_path.to_str().unwrap();
    let daemon = TestDaemon::start_uploading(env);
    let mut args = vec!["--config", config, "push", "--via-daemon"];
    args.extend(paths.iter().map(String::as_str));
    let queued = nixpush(&args);
    assert!(queued.status.success(), "{}", text(&queued.stderr));
    let status = wait_status(&daemon, "the queue to settle with one failure", |s| {
        settled(s) && s["failed"] == 1 && s["done"] == 1
    });

    assert_eq!(status["done"], 1, "{status:#}");
    assert_eq!(status["failed"], 1, "{status:#}");
    assert_eq!(status["excluded"], 1, "{status:#}");
    assert_eq!(status["skipped"], 0, "{status:#}");
    assert_eq!(status["refused"], 0, "{status:#}");
    assert_eq!(status["spooled"], 0, "{status:#}");
    assert_eq!(status["up_to_date"], false, "{status:#}");
    assert!(status["last_upload_at"].is_u64(), "{status:#}");
    let target = &status["target"];
    assert_eq!(target["url"], nginx.url());
    assert_eq!(target["read_url"], nginx.url());
    assert_eq!(target["reachable"], true, "{status:#}");
    assert_eq!(target["authorized"], true, "{status:#}");
    assert!(
        target["state"] == "idle" || target["state"] == "ok",
        "{status:#}"
    );

    let recent = status["recent"].as_array().unwrap();
    let outcome_of = |path: &str| {
        recent
            .iter()
            .find(|r| r["path"] == path)
            .unwrap_or_else(|| panic!("{path} not in recent: {status:#}"))
    };
    let uploaded = outcome_of(&paths[0]);
    assert_eq!(uploaded["outcome"], "uploaded");
    assert!(uploaded["nar_size"].as_u64().unwrap() > 0);
    assert!(uploaded["file_size"].as_u64().unwrap() > 0);
    assert!(uploaded["duration_ms"].is_u64());
    assert_eq!(outcome_of(&paths[1])["outcome"], "failed");
    assert_eq!(outcome_of(&paths[2])["outcome"], "excluded");

    let failed = &status["failed_paths"][0];
    assert_eq!(failed["path"], paths[1].as_str());
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["attempts"], 1);
    assert_eq!(failed["next_attempt_at"], Value::Null);
    assert!(
        failed["last_error"].as_str().unwrap().contains("HTTP 405"),
        "{failed}"
    );
    for totals in ["since_start", "all_time"] {
        let t = &status["totals"][totals];
        assert_eq!(t["uploaded"], 1, "{totals}: {t}");
        assert_eq!(t["failed"], 1, "{totals}: {t}");
        assert_eq!(t["excluded"], 1, "{totals}: {t}");
        assert!(t["nar_bytes"].as_u64().unwrap() > 0, "{totals}: {t}");
    }

    // The same for humans, without control characters on a pipe.
    let output = daemon.env.nixpush(&["status"]);
    let report = text(&output.stdout);
    // See: #19. A failed path means the cache is not up to date: exit 6.
    assert_eq!(output.status.code(), Some(6));
    assert_plain("status", &report);
    assert!(
        report.starts_with("NOT up to date: 1 path(s) failed"),
        "{report}"
    );
    assert!(
        report.contains("reachable, credentials accepted"),
        "{report}"
    );
    assert!(report.contains("HTTP 405"), "{report}");
    assert!(
        report.contains("since start: 1 uploaded (")
            && report.contains("all time:    1 uploaded ("),
        "{report}"
    );

    // `retry` requeues it; the cache refuses it again, and it is parked again after one more attempt.
    let output = daemon.env.nixpush(&["retry", &paths[1]]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("requeued 1 path(s)"),
        "{}",
        text(&output.stdout)
    );
    wait_status(&daemon, "the retried path to fail again", |s| {
        settled(s) && s["failed"] == 1 && s["totals"]["since_start"]["failed"] == 2
    });
    // `queue` lists it; `queue drop` removes it, and the status is clean again.
    let entries: Vec<Value> =
        serde_json::from_slice(&daemon.env.nixpush(&["queue", "list", "--json"]).stdout).unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["path"], paths[1].as_str());
    assert_eq!(entries[0]["state"], "failed");
    let output = daemon.env.nixpush(&["queue", "drop", &paths[1]]);
    assert!(
        text(&output.stdout).contains(&format!("dropped {}", paths[1])),
        "{}",
        text(&output.stdout)
    );
    let status = daemon.status();
    assert_eq!(status["failed"], 0, "{status:#}");
    assert_eq!(status["up_to_date"], true, "{status:#}");
    let output = daemon.env.nixpush(&["retry", "--all"]);
    assert!(text(&output.stdout).contains("nothing to retry"));

    // `--watch` on a pipe appends one plain report per interval.
    let mut watch = Guard::spawn(
        Command::new(NIXPUSH)
            .arg("--config")
            .arg(config)
            .args(["status", "--watch", "1"])
            .stdout(Stdio::piped()),
        "nixpush status --watch",
    );
    let mut stdout = watch.child_mut().stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while seen.matches("daemon:   pid").count() < 2 {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        seen
    });
    let deadline = Instant::now() + DEADLINE;
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    watch.kill();
    let seen = reader.join().unwrap();
    assert_eq!(seen.matches("daemon:   pid").count(), 2, "{seen}");
    assert_plain("status --watch", &seen);
    assert!(seen.starts_with("up to date"), "{seen}");
}

/// Everything `doctor` needs to pass: nginx requiring a token, a daemon uploading to it, Nix configured.
struct DoctorSetup {
    daemon: TestDaemon,
    nginx: Nginx,
    nix_conf_dir: PathBuf,
    token_file: PathBuf,
    token: String,
    public_key: String,
}

impl DoctorSetup {
    fn new() -> DoctorSetup {
        let env = TestEnv::new();
        let root = cache_dir(&env, "www");
        let token = format!("doctor-{}", util::fresh_nonce());
        let nginx = Nginx::start(&root, &require_token(&token));
        let public_key = keys::public_key();
        let token_file = env.dir.path().join("auth-token");
        fs::write(&token_file, format!("{token}\n")).unwrap();
        fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).unwrap();
        let token_line = format!("auth_token_file = \"{}\"", token_file.display());
        configure_signed_target(&env, &nginx.url(), &token_line);
        let nix_conf_dir = env.dir.path().join("nix");
        fs::create_dir_all(&nix_conf_dir).unwrap();
        let setup = DoctorSetup {
            daemon: TestDaemon::start_uploading(env),
            nginx,
            nix_conf_dir,
            token_file,
            token,
            public_key,
        };
        setup.write_nix_conf(HOOK, &setup.public_key);
        setup
    }

    fn write_nix_conf(&self, hook: &str, public_key: &str) {
        fs::write(
            self.nix_conf_dir.join("nix.conf"),
            format!(
                "post-build-hook = {hook}\nsubstituters = {}/\n\
                 trusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY= \
                 {public_key}\n",
                self.nginx.url()
            ),
        )
        .unwrap();
    }

    /// `doctor --json` (optionally under `wrapper`, e.g. setpriv): exit success and the checks by name.
    fn doctor(&self, wrapper: &[&str]) -> (bool, Vec<(String, String)>, String) {
        let output =
            doctor_command(wrapper, &self.daemon.env.config_path, &self.nix_conf_dir).run();
        let out = text(&output.stdout);
        let verdict: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{e}: {out}\n{}", text(&output.stderr)));
        let checks = verdict["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_owned(),
                    c["outcome"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(verdict["ok"], output.status.success(), "{out}");
        (output.status.success(), checks, out)
    }

    /// Runs doctor and checks that exactly `expected` failed (none: everything passed).
    fn expect_failures(&self, wrapper: &[&str], expected: &[&str]) -> String {
        let (ok, checks, out) = self.doctor(wrapper);
        let failed: Vec<&str> = checks
            .iter()
            .filter(|(_, o)| o == "fail")
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(failed, expected, "{out}");
        assert_eq!(ok, expected.is_empty(), "{out}");
        out
    }
}

// See: #7
#[test]
fn ops_doctor_passes_a_good_setup_and_names_each_broken_one() {
    let setup = DoctorSetup::new();
    let paths = util::add_store_paths(1);
    let hook = setup.daemon.env.run_hook(&[&paths[0]], None);
    assert!(hook.status.success());
    wait_status(&setup.daemon, "the path to land", |s| {
        settled(s) && s["done"] == 1
    });

    let (ok, checks, out) = setup.doctor(&[]);
    assert!(ok, "{out}");
    let names: Vec<&str> = checks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "config",
            "daemon",
            "post-build-hook",
            "substituter",
            "signing-key",
            "trusted-public-key",
            "token-file",
            "target",
            "cache-info",
            "spool",
            "failed-paths",
            "last-upload",
        ]
    );
    assert!(checks.iter().all(|(_, o)| o == "pass"), "{out}");

    // The same for humans.
    let output = Command::new(NIXPUSH)
        .env("NIX_CONF_DIR", &setup.nix_conf_dir)
        .env("NIX_USER_CONF_FILES", setup.nix_conf_dir.join("none.conf"))
        .env_remove("NIX_CONFIG")
        .arg("--config")
        .arg(&setup.daemon.env.config_path)
        .arg("doctor")
        .run();
    let report = text(&output.stdout);
    assert!(output.status.success(), "{report}");
    assert_plain("doctor", &report);
    assert!(report.contains("pass  post-build-hook"), "{report}");
    assert!(
        report.contains("12 passed, 0 failed, 0 skipped"),
        "{report}"
    );

    // Wrong hook path.
    setup.write_nix_conf("/usr/bin/true", &setup.public_key);
    let out = setup.expect_failures(&[], &["post-build-hook"]);
    assert!(out.contains("/usr/bin/true, not nixpush-hook"), "{out}");
    assert!(out.contains(&format!("post-build-hook = {HOOK}")), "{out}");

    // The signing key's public key missing from trusted-public-keys.
    setup.write_nix_conf(HOOK, "");
    let out = setup.expect_failures(&[], &["trusted-public-key"]);
    assert!(
        out.contains(&format!("extra-trusted-public-keys = {}", setup.public_key)),
        "{out}"
    );
    setup.write_nix_conf(HOOK, &setup.public_key);

    // A token file the doctor cannot read (root without the capabilities that bypass file modes).
    fs::set_permissions(&setup.token_file, fs::Permissions::from_mode(0o000)).unwrap();
    let drop_caps = [
        "setpriv",
        "--inh-caps=-dac_override,-dac_read_search",
        "--bounding-set=-dac_override,-dac_read_search",
    ];
    let out = setup.expect_failures(&drop_caps, &["token-file"]);
    assert!(out.contains("Permission denied"), "{out}");
    fs::set_permissions(&setup.token_file, fs::Permissions::from_mode(0o600)).unwrap();
    setup.expect_failures(&drop_caps, &[]);

    // A token the target rejects.
    replace_by_rename(&setup.token_file, "not-the-token\n");
    let out = setup.expect_failures(&[], &["target"]);
    assert!(out.contains("rejected the credentials (HTTP 401)"), "{out}");
    assert!(!out.contains(&setup.token) && !out.contains("not-the-token"));
}

// See: #7
#[test]
fn ops_token_rotation_by_rename_resumes_a_paused_target_without_restart() {
    let env = TestEnv::new();
    let root = cache_dir(&env, "www");
    let nonce = util::fresh_nonce();
    let (old_token, new_token) = (format!("old-{nonce}"), format!("new-{nonce}"));
    let nginx = Nginx::start(&root, &require_token(&new_token));
    let secrets = env.dir.path().join("secrets");
    fs::create_dir_all(&secrets).unwrap();
    let token_file = secrets.join("auth-token");
    fs::write(&token_file, &old_token).unwrap();
    let token_line = format!("auth_token_file = \"{}\"", token_file.display());
    configure_signed_target(&env, &nginx.url(), &token_line);
    let daemon = TestDaemon::start_uploading(env);
    let paths = util::add_store_paths(1);
    let hook = daemon.env.run_hook(&[&paths[0]], None);
    assert!(hook.status.success());

    let status = wait_status(&daemon, "the target to pause with the path queued", |s| {
        s["target"]["state"] == "paused" && s["queued"] == 1
    });
    assert_eq!(status["failed"], 0, "{status:#}");
    assert_eq!(status["target"]["authorized"], false, "{status:#}");
    assert!(
        status["target"]["message"]
            .as_str()
            .unwrap()
            .contains("rejected the credentials"),
        "{status:#}"
    );
    let report = text(&daemon.env.nixpush(&["status"]).stdout);
    assert!(
        report.starts_with("NOT up to date: uploads paused, 1 path(s) waiting."),
        "{report}"
    );
    assert!(report.contains("credentials REJECTED"), "{report}");
    let queued = daemon.queued_paths();
    assert_eq!(queued, [paths[0].clone()]);
    assert!(!narinfo_file(&root, &paths[0]).exists());

    replace_by_rename(&token_file, &format!("{new_token}\n"));
    let status = wait_status(&daemon, "the path to land after rotation", |s| {
        settled(s) && s["done"] == 1
    });
    assert_eq!(status["target"]["authorized"], true, "{status:#}");
    assert_ne!(status["target"]["state"], "paused", "{status:#}");
    assert!(narinfo_file(&root, &paths[0]).exists());

    let log = daemon.log();
    assert!(log.contains("uploads paused"), "{log}");
    assert!(log.contains("auth token reloaded"), "{log}");
    assert!(log.contains(&format!("uploaded {} (", paths[0])), "{log}");
    for token in [&old_token, &new_token] {
        assert!(
            !log.lines().any(|l| l.contains(token.as_str())),
            "a log line contains a token:\n{log}"
        );
    }
    let report = text(&daemon.env.nixpush(&["status", "--json"]).stdout);
    assert!(!report.contains(&old_token) && !report.contains(&new_token));
}

// See: #7
#[test]
fn ops_signing_key_rotation_by_rename_takes_effect_without_restart() {
    let env = TestEnv::new();
    let cache = cache_dir(&env, "cache");
    let secrets = env.dir.path().join("secrets");
    fs::create_dir_all(&secrets).unwrap();
    let key_file = signing_key_file(&secrets);
    let old_key = nixpush::signing::SecretKey::load(&key_file).unwrap();
    env.write_config_with(
        "",
        &format!(
            "url = \"file://{}\"\nsigning_key_file = \"{}\"",
            cache.display(),
            key_file.display()
        ),
    );
    let daemon = TestDaemon::start_uploading(env);
    let paths = util::add_store_paths(2);
    let narinfo = |path: &str| {
        let text = fs::read_to_string(narinfo_file(&cache, path)).unwrap();
        nixpush::narinfo::NarInfo::parse(&text, "/nix/store").unwrap()
    };

    assert!(daemon.env.run_hook(&[&paths[0]], None).status.success());
    wait_status(&daemon, "the first path to land", |s| {
        settled(s) && s["done"] == 1
    });
    assert!(narinfo(&paths[0]).verify(&old_key.public_key()));

    let new_key = nixpush::signing::generate("nixpush-rotated-1");
    replace_by_rename(&key_file, new_key.to_nix_string().expose());
    wait_until("the daemon to reload the signing key", || {
        daemon.log().contains("signing key reloaded")
    });
    assert!(daemon.env.run_hook(&[&paths[1]], None).status.success());
    wait_status(&daemon, "the second path to land", |s| {
        settled(s) && s["done"] == 2
    });
    let second = narinfo(&paths[1]);
    assert!(second.verify(&new_key.public_key()), "{}", second.render());
    assert!(!second.verify(&old_key.public_key()), "{}", second.render());

    let log = daemon.log();
    assert!(
        log.contains(&new_key.public_key().to_string()),
        "the log names the new key by its public half:\n{log}"
    );
    for key in [&old_key, &new_key] {
        let secret = key.to_nix_string();
        let secret_part = secret.expose().split_once(':').unwrap().1;
        assert!(
            !log.contains(secret_part),
            "a log line holds a secret key:\n{log}"
        );
    }
}
