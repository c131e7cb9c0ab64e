//! Several targets from one queue (issue 18): `[target]` plus `[targets.NAME]` tables, each uploaded to on its
//! own. Real Nix builds pushed by the real daemon to a `file://` cache and nginx; every cache is checked by real
//! Nix with its key; a target that hangs or refuses the token holds up no other.

use std::fs;
use std::path::Path;

use serde_json::Value;

use crate::harness::cache::{
    assert_every_narinfo_has_its_nar, assert_nix_substitutes, narinfo_file, nix_copy_from,
};
use crate::harness::deadend::{Behaviour, DeadEnd};
use crate::harness::keys::{nix_key, public_key};
use crate::harness::nginx::Nginx;
use crate::harness::nix::build_paths;
use crate::harness::setup::{file_url, signed_target, HttpCache};
use crate::util::{wait_until, TestDaemon, TestEnv};

/// The configuration body: `[target]` is `default` (a `file://` cache), then each `(name, body)` as a
/// `[targets.NAME]` table.
fn configure(env: &TestEnv, extra: &str, named: &[(&str, String)]) {
    let mut target = signed_target(env, &file_url(env), "");
    for (name, body) in named {
        target.push_str(&format!("\n[targets.{name}]\n{body}\n"));
    }
    env.write_config_with(extra, &target);
}

/// Whether every one of `paths` has a narinfo in the cache directory `dir`.
fn all_in(dir: &Path, paths: &[String]) -> bool {
    paths.iter().all(|p| narinfo_file(dir, p).exists())
}

/// The part of `status` about the target `name`.
fn target<'a>(status: &'a Value, name: &str) -> &'a Value {
    &status["targets"][name]
}

// See: #18
#[test]
fn every_build_lands_in_every_target_and_each_cache_is_one_nix_accepts() {
    let env = TestEnv::new();
    let http = HttpCache::start(env.dir.path());
    // The web target signs with a key of its own.
    let (web_key, web_public) = nix_key(env.dir.path(), "web-cache-1");
    let web = format!(
        "url = \"{}\"\nsigning_key_file = \"{}\"",
        http.url(),
        web_key.display()
    );
    configure(&env, "", &[("web", web)]);
    let daemon = TestDaemon::start_uploading(env);
    let paths = build_paths(daemon.env.dir.path(), "tgt-both", 64 * 1024);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    assert!(daemon.env.run_hook(&refs, None).status.success());
    let status = daemon.wait_drained();

    for name in ["default", "web"] {
        let t = target(&status, name);
        assert_eq!(t["queued"], 0, "{status:#}");
        assert_eq!(t["failed"], 0, "{status:#}");
        assert_eq!(t["done"], paths.len(), "{name}: {status:#}");
        assert_eq!(t["up_to_date"], true, "{status:#}");
    }
    // The top level keeps the sums.
    assert_eq!(status["done"], 2 * paths.len(), "{status:#}");
    assert_eq!(
        status["totals"]["since_start"]["uploaded"],
        2 * paths.len(),
        "{status:#}"
    );
    assert_eq!(target(&status, "web")["target"]["url"], http.url().as_str());
    assert_every_narinfo_has_its_nar(&daemon.env.cache_dir());
    assert_every_narinfo_has_its_nar(&http.dir());
    assert_nix_substitutes(&file_url(&daemon.env), &public_key(), &paths);
    assert_nix_substitutes(&http.direct_url(), web_public.trim(), &paths);
    // Each cache carries its own target's signature only.
    let (accepted, _) = nix_copy_from(&http.direct_url(), &public_key(), &paths);
    assert!(
        !accepted,
        "the web cache is not signed with the default target's key"
    );

    let text = String::from_utf8(daemon.env.nixpush(&["status"]).stdout).unwrap();
    assert!(text.contains("target default: file://"), "{text}");
    assert!(
        text.contains(&format!("target web: {}", http.url())),
        "{text}"
    );
    let log = daemon.log();
    assert!(
        log.contains("nixpush_target=web") || log.contains("web"),
        "{log}"
    );
}

// See: #18
#[test]
fn a_target_that_never_answers_holds_up_no_other() {
    let env = TestEnv::new();
    let dead = DeadEnd::start(Behaviour::Silent);
    configure(
        &env,
        "",
        &[(
            "offsite",
            signed_target(
                &env,
                &dead.url(),
                "timeout_secs = 600\nretry_base_ms = 60000",
            ),
        )],
    );
    let daemon = TestDaemon::start_uploading(env);
    let paths = build_paths(daemon.env.dir.path(), "tgt-dead", 1024);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    assert!(daemon.env.run_hook(&refs, None).status.success());

    // The default target completes while the other's first request still hangs (it waits up to ten minutes):
    // nothing of it has failed or been retried yet, so the two did not take turns.
    wait_until("the default target up to date", || {
        let status = daemon.status();
        target(&status, "default")["up_to_date"] == true
    });
    assert!(all_in(&daemon.env.cache_dir(), &paths));
    assert_nix_substitutes(&file_url(&daemon.env), &public_key(), &paths);
    let status = daemon.status();
    let offsite = target(&status, "offsite");
    assert_eq!(
        offsite["queued"].as_u64().unwrap() + offsite["in_flight"].as_u64().unwrap(),
        paths.len() as u64
    );
    assert_eq!(offsite["failed_paths"], Value::Array(vec![]), "{status:#}");
    assert!(dead.connections() >= 1, "the offsite target was asked");
    assert_eq!(status["up_to_date"], false, "{status:#}");

    // Its queue stays whole for later: listed with its target, and `--target` picks one.
    let listed: Vec<Value> = serde_json::from_slice(
        &daemon
            .env
            .nixpush(&["queue", "list", "--target", "offsite", "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(listed.len(), paths.len());
    assert!(
        listed.iter().all(|e| e["target"] == "offsite"),
        "{listed:?}"
    );
    let unknown = daemon.env.nixpush(&["queue", "list", "--target", "nope"]);
    assert!(!unknown.status.success());
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        said.contains("no target is named \"nope\" (configured: default, offsite)"),
        "{said}"
    );
}

// See: #18
#[test]
fn a_rejected_token_pauses_only_its_target_and_a_new_token_resumes_it() {
    let env = TestEnv::new();
    let root = env.dir.path().join("www");
    fs::create_dir_all(root.join("cache")).unwrap();
    let token = "tok-ok-0123456789";
    let nginx = Nginx::start(
        &root,
        &format!("if ($http_authorization != \"Bearer {token}\") {{ return 401; }}"),
    );
    let token_file = env.dir.path().join("web-token");
    fs::write(&token_file, "tok-stale-9876543210").unwrap();
    let web_url = format!("{}/cache", nginx.url());
    configure(
        &env,
        "",
        &[(
            "web",
            signed_target(
                &env,
                &web_url,
                &format!("auth_token_file = \"{}\"", token_file.display()),
            ),
        )],
    );
    let daemon = TestDaemon::start_uploading(env);
    let paths = build_paths(daemon.env.dir.path(), "tgt-auth", 1024);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    assert!(daemon.env.run_hook(&refs, None).status.success());

    wait_until("web paused and default up to date", || {
        let status = daemon.status();
        target(&status, "web")["target"]["state"] == "paused"
            && target(&status, "default")["up_to_date"] == true
    });
    let status = daemon.status();
    let web = target(&status, "web");
    assert_eq!(web["target"]["authorized"], false, "{status:#}");
    assert_eq!(
        web["failed"], 0,
        "no attempt is spent on a refused token: {status:#}"
    );
    assert_eq!(
        target(&status, "default")["target"]["state"],
        "idle",
        "{status:#}"
    );
    assert!(all_in(&daemon.env.cache_dir(), &paths));
    let text = String::from_utf8(daemon.env.nixpush(&["status"]).stdout).unwrap();
    assert!(
        text.lines().next().unwrap().contains("web: paused"),
        "{text}"
    );
    assert!(
        !text.contains(token) && !text.contains("tok-stale"),
        "{text}"
    );

    // Rotated the way sops-nix does it: a new file renamed over the old one.
    let fresh = token_file.with_extension("new");
    fs::write(&fresh, token).unwrap();
    fs::rename(&fresh, &token_file).unwrap();
    let status = daemon.wait_drained();
    assert_eq!(target(&status, "web")["done"], paths.len(), "{status:#}");
    // nginx asks Nix for the token too; what it stored is read back as the cache directory it is.
    assert_every_narinfo_has_its_nar(&root.join("cache"));
    let stored = format!("file://{}", root.join("cache").display());
    assert_nix_substitutes(&stored, &public_key(), &paths);
    assert_nix_substitutes(&file_url(&daemon.env), &public_key(), &paths);
}

// See: #18
#[test]
fn push_goes_to_every_target_named_on_the_command_line_or_configured() {
    let env = TestEnv::new();
    let second = env.dir.path().join("second");
    configure(
        &env,
        "",
        &[(
            "second",
            signed_target(&env, &format!("file://{}", second.display()), ""),
        )],
    );
    let paths = build_paths(env.dir.path(), "tgt-push", 1024);
    let top = paths.last().unwrap().as_str();

    // Configured targets, all of them.
    let out = env.nixpush(&["push", "--json", top]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        summary["targets"].as_array().unwrap().len(),
        2,
        "{summary:#}"
    );
    assert_eq!(summary["uploaded"], 2, "{summary:#}");
    assert!(narinfo_file(&env.cache_dir(), top).exists());
    assert!(narinfo_file(&second, top).exists());

    // One by name, and one by URL that no table names (it takes [target]'s key).
    let third = env.dir.path().join("third");
    let third_url = format!("file://{}", third.display());
    let dep = paths[0].as_str();
    let out = env.nixpush(&[
        "push",
        "--json",
        "--no-closure",
        "--target",
        "second",
        "--target",
        &third_url,
        dep,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = summary["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["target"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [format!("file://{}", second.display()), third_url.clone()]
    );
    assert!(narinfo_file(&third, dep).exists());
    assert_nix_substitutes(&third_url, &public_key(), &[dep.to_owned()]);

    let out = env.nixpush(&["push", "--target", "nope", top]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("no configured target has that name (configured: default, second)"),
        "{said}"
    );
}

// See: #18
#[test]
fn paths_queued_for_a_target_no_longer_configured_are_queued_for_the_configured_ones() {
    let env = TestEnv::new();
    let mut daemon = TestDaemon::start_in(env);
    let paths = build_paths(daemon.env.dir.path(), "tgt-rename", 1024);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    assert!(daemon.env.run_hook(&refs, None).status.success());
    daemon.wait_queued(&paths);
    daemon.stop();

    // `[target]` becomes `[targets.main]`: the queue it left stays whole.
    let body = signed_target(&daemon.env, &file_url(&daemon.env), "");
    let config = fs::read_to_string(&daemon.env.config_path).unwrap();
    let head = config.split("\n[target]\n").next().unwrap();
    fs::write(
        &daemon.env.config_path,
        format!("{head}\n[targets.main]\n{body}\n"),
    )
    .unwrap();
    daemon.set_hold(false);
    daemon.restart();
    let status = daemon.wait_drained();
    assert_eq!(target(&status, "main")["done"], paths.len(), "{status:#}");
    assert!(status["targets"].get("default").is_none(), "{status:#}");
    assert!(all_in(&daemon.env.cache_dir(), &paths));
    assert!(
        daemon.log().contains("which is no longer configured"),
        "{}",
        daemon.log()
    );
}
