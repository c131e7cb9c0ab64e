//! `nixpush doctor` as issue 19 (item 5) found it wanting: it must never write to the target or create a
//! directory, choose its checks by the kind of target, only warn about substituter and key trust on a push-only
//! machine, ignore a token file for a target that sends no token, and give every check at most 5 s, saying what
//! it waits for. The good and broken setups of an HTTP target are in `ops.rs`.
//! See: #19

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use serde_json::Value;

use crate::harness::daemon::doctor_command;
use crate::harness::deadend::{Behaviour, DeadEnd};
use crate::harness::keys;
use crate::harness::process::Run;
use crate::harness::setup::configure_signed_target;
use crate::util::{TestDaemon, TestEnv, HOOK};

/// Root without the capabilities that bypass file modes, so that modes apply to the test as to any user.
const WITHOUT_DAC: [&str; 3] = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
];

/// What one `doctor --json` run said.
struct Doctor {
    output: Output,
    verdict: Value,
}

impl Doctor {
    /// Runs `doctor --json` with `config` and a Nix configuration of `nix_conf` alone, under `wrapper`.
    fn run(config: &Path, nix_conf: &str, wrapper: &[&str]) -> Doctor {
        let nix_dir = config.parent().unwrap().join("nix-conf");
        fs::create_dir_all(&nix_dir).unwrap();
        fs::write(nix_dir.join("nix.conf"), nix_conf).unwrap();
        let output = doctor_command(wrapper, config, &nix_dir)
            .stdin(Stdio::null())
            .run();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let verdict: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&output.stderr))
        });
        assert_eq!(verdict["ok"], output.status.success(), "{verdict:#}");
        Doctor { output, verdict }
    }

    fn check(&self, name: &str) -> &Value {
        self.verdict["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {:#}", self.verdict))
    }

    fn outcome(&self, name: &str) -> &str {
        self.check(name)["outcome"].as_str().unwrap()
    }

    fn text(&self, name: &str) -> String {
        let check = self.check(name);
        format!(
            "{} / fix: {}",
            check["detail"].as_str().unwrap_or_default(),
            check["fix"].as_str().unwrap_or_default()
        )
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
}

/// Every file and directory under `dir`, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            found.push(entry.path());
            found.extend(tree(&entry.path()));
        }
    }
    found.sort();
    found
}

// See: #19
#[test]
fn doctor_a_missing_cache_directory_is_not_created_and_fails_with_the_fix() {
    let env = TestEnv::new();
    let root = env.dir.path().join("nonexistent");
    configure_signed_target(&env, &format!("file://{}/dir", root.display()), "");
    let before = tree(env.dir.path());

    let doctor = Doctor::run(&env.config_path, "", &[]);
    assert!(!doctor.output.status.success());
    assert_eq!(doctor.outcome("target"), "fail", "{:#}", doctor.verdict);
    let text = doctor.text("target");
    assert!(
        text.contains(&format!("{}/dir does not exist", root.display())),
        "{text}"
    );
    assert!(text.contains("install -d"), "{text}");
    assert!(!root.exists(), "doctor created {}", root.display());
    let after: Vec<PathBuf> = tree(env.dir.path())
        .into_iter()
        .filter(|p| !p.starts_with(env.dir.path().join("nix-conf")))
        .collect();
    assert_eq!(after, before, "doctor wrote files");
}

// See: #19
#[test]
fn doctor_an_unwritable_cache_directory_fails_without_a_write() {
    let env = TestEnv::new();
    let cache = env.cache_dir();
    fs::create_dir_all(&cache).unwrap();
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o555)).unwrap();
    configure_signed_target(&env, &format!("file://{}", cache.display()), "");

    let doctor = Doctor::run(&env.config_path, "", &WITHOUT_DAC);
    assert_eq!(doctor.outcome("target"), "fail", "{:#}", doctor.verdict);
    let text = doctor.text("target");
    assert!(text.contains("is not writable by this user"), "{text}");
    assert!(text.contains("chown"), "{text}");
    assert!(tree(&cache).is_empty(), "{:?}", tree(&cache));

    // Writable again: the same check passes, still without writing anything.
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o755)).unwrap();
    let doctor = Doctor::run(&env.config_path, "", &WITHOUT_DAC);
    assert_eq!(doctor.outcome("target"), "pass", "{:#}", doctor.verdict);
    assert!(tree(&cache).is_empty(), "{:?}", tree(&cache));
}

// See: #19
#[test]
fn doctor_a_push_only_machine_with_a_leftover_empty_token_file_exits_0_with_warnings() {
    let env = TestEnv::new();
    let cache = env.cache_dir();
    let token = env.dir.path().join("empty-token");
    fs::write(&token, "").unwrap();
    configure_signed_target(
        &env,
        &format!("file://{}", cache.display()),
        &format!("auth_token_file = \"{}\"", token.display()),
    );
    let daemon = TestDaemon::start_uploading(env);
    // The daemon, too, ignores the token file of a target that sends none: it gets the cache ready.
    crate::util::wait_until("the daemon to ready the cache", || {
        cache.join("nix-cache-info").exists()
    });

    // CI: the hook is set, but the machine substitutes from cache.nixos.org only and trusts only its key.
    let nix_conf = format!(
        "post-build-hook = {HOOK}\nsubstituters = https://cache.nixos.org/\n\
         trusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\n"
    );
    let doctor = Doctor::run(&daemon.env.config_path, &nix_conf, &[]);
    assert!(doctor.output.status.success(), "{:#}", doctor.verdict);
    assert_eq!(
        doctor.outcome("substituter"),
        "warn",
        "{:#}",
        doctor.verdict
    );
    assert_eq!(
        doctor.outcome("trusted-public-key"),
        "warn",
        "{:#}",
        doctor.verdict
    );
    assert!(doctor.text("substituter").contains("push-only"));
    let token_check = doctor.text("token-file");
    assert_eq!(doctor.outcome("token-file"), "skip", "{token_check}");
    assert!(token_check.contains("send no token"), "{token_check}");
    assert_eq!(doctor.outcome("target"), "pass", "{:#}", doctor.verdict);
    let failed: Vec<&Value> = doctor.verdict["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["outcome"] == "fail")
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");

    // The same machine substituting from the cache without trusting its key is broken: that fails.
    let reads_the_cache = format!(
        "post-build-hook = {HOOK}\nsubstituters = file://{}\ntrusted-public-keys = {}\n",
        cache.display(),
        keys::wrong_key()
    );
    let doctor = Doctor::run(&daemon.env.config_path, &reads_the_cache, &[]);
    assert!(!doctor.output.status.success());
    assert_eq!(
        doctor.outcome("substituter"),
        "pass",
        "{:#}",
        doctor.verdict
    );
    assert_eq!(
        doctor.outcome("trusted-public-key"),
        "fail",
        "{:#}",
        doctor.verdict
    );
}

/// Runs doctor against a target that accepts connections and never answers; returns what it said.
fn doctor_against_a_blackhole(target: impl Fn(&str) -> String) -> Doctor {
    let blackhole = DeadEnd::start(Behaviour::Silent);
    let env = TestEnv::new();
    let token = env.dir.path().join("token");
    fs::write(&token, "a-token\n").unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    let body = format!(
        "{}\nauth_token_file = \"{}\"",
        target(&blackhole.url()),
        token.display()
    );
    env.write_config_with("", &body);
    let doctor = Doctor::run(&env.config_path, "", &[]);
    assert!(blackhole.connections() > 0, "doctor never asked the target");
    doctor
}

/// The target check gave up at its deadline, after saying what it waited for.
fn assert_waited_and_gave_up(doctor: &Doctor, waiting_for: &str) {
    assert!(!doctor.output.status.success());
    assert_eq!(doctor.outcome("target"), "fail", "{:#}", doctor.verdict);
    let text = doctor.text("target");
    assert!(text.contains("did not answer within 5 s"), "{text}");
    assert!(text.contains("network path"), "{text}");
    let stderr = doctor.stderr();
    assert!(
        stderr.contains(&format!("waiting for {waiting_for}")) && stderr.contains("(up to 5 s)"),
        "{stderr}"
    );
    assert_eq!(doctor.outcome("cache-info"), "skip", "{:#}", doctor.verdict);
}

// See: #19
#[test]
fn doctor_a_blackholed_http_target_says_it_waits_and_gives_up_at_the_deadline() {
    let doctor = doctor_against_a_blackhole(|url| format!("url = \"{url}/cache\""));
    assert_waited_and_gave_up(&doctor, "http://127.0.0.1:");
}

// See: #19
#[test]
fn doctor_a_blackholed_cachix_api_says_it_waits_and_gives_up_at_the_deadline() {
    let doctor = doctor_against_a_blackhole(|url| {
        format!("url = \"cachix://demo\"\ncachix_api = \"{url}\"")
    });
    assert_waited_and_gave_up(&doctor, "Cachix's API for cachix://demo");
}
