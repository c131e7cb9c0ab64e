//! Filters per target, closure-safe (issue 18): real Nix builds of `fixtures/filters.nix` pushed by the real
//! daemon and `nixpush push`. A path whose reference is filtered out and in no cache is held back with the
//! reason; every cache written here is checked by real Nix, and none has a narinfo whose references it lacks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nixpush::narinfo::NarInfo;
use serde_json::Value;

use crate::harness::cache::{
    assert_every_narinfo_has_its_nar, assert_nix_substitutes, assert_nix_verifies, narinfo_file,
    nix_copy_from,
};
use crate::harness::keys::public_key;
use crate::harness::process::output;
use crate::harness::setup::{file_url, signed_target, HttpCache};
use crate::util::{fresh_nonce, nix, wait_until, TestDaemon, TestEnv, NIX_OPTIONS};

/// `tests/fixtures/filters.nix`.
fn filters_nix() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/filters.nix")
}

/// Builds `attrs` of `filters.nix` with a fresh nonce; returns every path of their closures by name
/// (`flt-app` → `/nix/store/…-flt-app`).
fn build(attrs: &[&str]) -> HashMap<String, String> {
    let nonce = fresh_nonce();
    let mut args = vec![
        "nix-build".to_owned(),
        filters_nix().display().to_string(),
        "--argstr".into(),
        "nonce".into(),
        nonce,
        "--no-out-link".into(),
        "--option".into(),
        "substituters".into(),
        String::new(),
    ];
    args.extend(NIX_OPTIONS.iter().map(|s| (*s).to_owned()));
    for attr in attrs {
        args.extend(["-A".to_owned(), (*attr).to_owned()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let outputs = nix(&args);
    let mut query = vec!["nix-store", "--query", "--requisites"];
    query.extend(outputs.lines());
    nix(&query)
        .lines()
        .map(|p| (p.split_once('-').unwrap().1.to_owned(), p.to_owned()))
        .collect()
}

/// The closure of `filters.nix`'s `tool`, freshly built (tool → app → secret, tool → lib): `[secret, app, lib,
/// tool]`.
fn build_tool() -> [String; 4] {
    let mut p = build(&["tool"]);
    ["flt-secret", "flt-app", "flt-lib", "flt-tool"]
        .map(|name| p.remove(name).unwrap_or_else(|| panic!("no {name}")))
}

/// An environment whose target is its own `file://` cache with `filter` added to `[target]`, and whose one
/// upstream is a directory nginx serves, empty at first. Returns the environment, nginx and that directory.
fn with_upstream(filter: &str) -> (TestEnv, HttpCache, PathBuf) {
    let env = TestEnv::new();
    let http = HttpCache::start(env.dir.path());
    let upstream = http.www.join("upstream");
    std::fs::create_dir_all(&upstream).unwrap();
    env.write_config_with(
        &format!("upstream = [\"{}/upstream\"]", http.nginx.url()),
        &signed_target(&env, &file_url(&env), filter),
    );
    (env, http, upstream)
}

/// Every narinfo in `dir` has its NAR, and every reference it lists has a narinfo in `dir` or in one of
/// `elsewhere` (upstream caches). Returns the store paths of the narinfos.
fn assert_no_dangling_references(dir: &Path, elsewhere: &[&Path]) -> Vec<String> {
    assert_every_narinfo_has_its_nar(dir);
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let file = entry.unwrap().path();
        if file.extension().is_none_or(|e| e != "narinfo") {
            continue;
        }
        let info = NarInfo::parse(&std::fs::read_to_string(&file).unwrap(), "/nix/store").unwrap();
        for reference in &info.references {
            let reference = reference.as_str();
            assert!(
                std::iter::once(dir)
                    .chain(elsewhere.iter().copied())
                    .any(|d| narinfo_file(d, reference).exists()),
                "{} references {reference}, which no cache has",
                info.store_path
            );
        }
        paths.push(info.store_path.as_str().to_owned());
    }
    paths
}

/// `nixpush push --json PATH` in `env`: the exit code, the summary, and stderr (one line per path).
fn push(env: &TestEnv, args: &[&str]) -> (Option<i32>, Value, String) {
    let mut all = vec!["push", "--json"];
    all.extend(args);
    let out: Output = env.nixpush(&all);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let summary = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}): {stderr}"));
    (out.status.code(), summary, stderr)
}

/// `(path, reason)` of every held-back path in a push summary.
fn held_back(summary: &Value) -> Vec<(String, String)> {
    summary["held_back"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["path"].as_str().unwrap().to_owned(),
                h["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `nix copy --to file://DIR` of `path` (its whole closure), as an upstream cache is filled.
fn copy_to(dir: &Path, path: &str) {
    let out = output(
        Command::new("nix")
            .args(["--extra-experimental-features", "nix-command", "copy"])
            .arg("--to")
            .arg(format!("file://{}", dir.display()))
            .arg(path),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// See: #18
#[test]
fn an_excluded_dependency_no_cache_has_holds_its_referrers_back_until_an_upstream_serves_it() {
    // nginx serves the upstream for as long as the test runs.
    let (env, _http, upstream) = with_upstream("exclude = [\"*-flt-secret\"]\n");
    let cache = env.cache_dir();
    let daemon = TestDaemon::start_uploading(env);
    let [secret, app, lib, tool] = &build_tool();
    assert!(daemon.env.run_hook(&[tool], None).status.success());

    wait_until("the tool held back", || {
        let s = daemon.status();
        s["target"]["filtered"]["waiting_for_retry"] == 1 && s["queued"] == 0 && s["in_flight"] == 0
    });
    let status = daemon.status();
    assert_eq!(status["failed"], 0, "{status:#}");
    assert_eq!(status["up_to_date"], true, "{status:#}");
    let filtered = &status["target"]["filtered"];
    assert_eq!(filtered["excluded"], 1, "{status:#}");
    assert_eq!(filtered["held_back"], 2, "{status:#}");
    assert_eq!(
        status["totals"]["since_start"]["held_back"], 2,
        "{status:#}"
    );
    let reason_of = |path: &str| -> String {
        let entry = filtered["recent"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == path)
            .unwrap_or_else(|| panic!("{path} not in {filtered:#}"));
        format!(
            "{}: {}",
            entry["outcome"].as_str().unwrap(),
            entry["reason"].as_str().unwrap()
        )
    };
    assert_eq!(
        reason_of(secret),
        "excluded: matches target.exclude pattern \"*-flt-secret\""
    );
    assert_eq!(
        reason_of(app),
        format!(
            "held_back: reference {secret} is excluded (matches target.exclude pattern \"*-flt-secret\") and \
             neither the target nor an upstream has it"
        )
    );
    assert!(
        reason_of(tool).starts_with(&format!(
            "held_back: reference {app} is held back: {secret} in its closure is excluded"
        )),
        "{filtered:#}"
    );
    let text = String::from_utf8(daemon.env.nixpush(&["status"]).stdout).unwrap();
    assert!(
        text.lines()
            .next()
            .unwrap()
            .ends_with("1 path(s) held back by the target's filters"),
        "{text}"
    );
    let queue: Value =
        serde_json::from_slice(&daemon.env.nixpush(&["queue", "list", "--json"]).stdout).unwrap();
    assert_eq!(queue[0]["path"], tool.as_str(), "{queue}");
    assert_eq!(queue[0]["state"], "held_back", "{queue}");
    assert_eq!(queue[0]["attempts"], 0, "{queue}");

    // Nothing of the held-back closure is in the cache; what is there is complete and verifies.
    for path in [secret, app, tool] {
        assert!(!narinfo_file(&cache, path).exists(), "{path} in the cache");
    }
    assert_eq!(
        assert_no_dangling_references(&cache, &[]),
        vec![lib.clone()]
    );
    assert_nix_verifies(
        &format!("file://{}", cache.display()),
        &public_key(),
        std::slice::from_ref(lib),
    );

    // Once an upstream serves the excluded path, `retry` lets its referrers through; it stays out.
    copy_to(&upstream, secret);
    let retried = daemon.env.nixpush(&["retry", "--all"]);
    assert!(
        String::from_utf8_lossy(&retried.stdout).contains(tool.as_str()),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    wait_until("the tool uploaded", || {
        let s = daemon.status();
        narinfo_file(&cache, tool).exists() && s["queued"] == 0 && s["in_flight"] == 0
    });
    let status = daemon.status();
    assert_eq!(
        status["target"]["filtered"]["waiting_for_retry"], 0,
        "{status:#}"
    );
    assert!(
        !narinfo_file(&cache, secret).exists(),
        "the excluded path was uploaded"
    );
    let mut uploaded = assert_no_dangling_references(&cache, &[&upstream]);
    uploaded.sort();
    let mut expected = vec![app.clone(), lib.clone(), tool.clone()];
    expected.sort();
    assert_eq!(uploaded, expected);
    assert_nix_verifies(
        &format!("file://{}", cache.display()),
        &public_key(),
        &expected,
    );
}

// See: #18
#[test]
fn allow_incomplete_closures_uploads_the_referrer_and_its_narinfo_lists_the_reference() {
    let env = TestEnv::new();
    env.write_config_with(
        "",
        &signed_target(
            &env,
            &file_url(&env),
            "exclude = [\"*-flt-secret\"]\nallow_incomplete_closures = true\n",
        ),
    );
    let [secret, app, lib, tool] = &build_tool();
    let (code, summary, stderr) = push(&env, &[tool]);
    assert_eq!(code, Some(0), "{summary:#}\n{stderr}");
    assert_eq!(summary["uploaded"], 3, "{summary:#}");
    assert_eq!(summary["excluded"], 1, "{summary:#}");
    assert!(held_back(&summary).is_empty(), "{summary:#}");

    let cache = env.cache_dir();
    assert!(!narinfo_file(&cache, secret).exists());
    let narinfo = std::fs::read_to_string(narinfo_file(&cache, app)).unwrap();
    let info = NarInfo::parse(&narinfo, "/nix/store").unwrap();
    assert!(
        info.references
            .iter()
            .any(|r| r.as_str() == secret.as_str()),
        "{narinfo}"
    );
    let url = file_url(&env);
    let uploaded = [app.clone(), lib.clone(), tool.clone()];
    assert_nix_verifies(&url, &public_key(), &uploaded);
    // What the documentation warns of: Nix will not substitute a path whose reference no cache has.
    let (copied, _) = nix_copy_from(&url, &public_key(), std::slice::from_ref(app));
    assert!(!copied, "{app} substituted without its reference");
    assert_nix_substitutes(&url, &public_key(), std::slice::from_ref(lib));
}

// See: #18
#[test]
fn include_takes_only_matching_paths_and_holds_back_what_needs_the_rest() {
    // nginx serves the upstream for as long as the test runs.
    let (env, _http, upstream) =
        with_upstream("include = [\"flt-app\", \"flt-tool\", \"flt-lib\"]\n");
    let [secret, app, lib, tool] = &build_tool();
    let cache = env.cache_dir();

    let (code, summary, stderr) = push(&env, &[tool]);
    assert_eq!(code, Some(3), "{summary:#}\n{stderr}");
    assert_eq!(summary["uploaded"], 1, "{summary:#}");
    assert_eq!(summary["excluded"], 1, "{summary:#}");
    let held = held_back(&summary);
    assert_eq!(held.len(), 2, "{summary:#}");
    assert!(
        held.contains(&(
            app.clone(),
            format!(
                "reference {secret} is excluded (matches no target.include pattern) and neither the target \
                 nor an upstream has it"
            )
        )),
        "{held:?}"
    );
    assert!(
        stderr.contains(&format!("held back {tool}: reference {app} is held back")),
        "{stderr}"
    );
    assert_eq!(
        assert_no_dangling_references(&cache, &[]),
        vec![lib.clone()]
    );
    assert_nix_substitutes(&file_url(&env), &public_key(), std::slice::from_ref(lib));

    // The path include leaves out is served upstream: the rest goes up, and it stays out.
    copy_to(&upstream, secret);
    let (code, summary, stderr) = push(&env, &[tool]);
    assert_eq!(code, Some(0), "{summary:#}\n{stderr}");
    assert_eq!(summary["uploaded"], 2, "{summary:#}");
    assert_eq!(summary["already_present"], 1, "{summary:#}");
    assert_eq!(summary["excluded"], 1, "{summary:#}");
    assert!(!narinfo_file(&cache, secret).exists());
    let mut uploaded = assert_no_dangling_references(&cache, &[&upstream]);
    uploaded.sort();
    let mut expected = vec![app.clone(), lib.clone(), tool.clone()];
    expected.sort();
    assert_eq!(uploaded, expected);
    assert_nix_verifies(&file_url(&env), &public_key(), &expected);
}

// See: #18
#[test]
fn max_nar_size_leaves_a_large_path_out_and_holds_back_its_referrer() {
    let env = TestEnv::new();
    env.write_config_with(
        "",
        &signed_target(&env, &file_url(&env), "max_nar_size = \"32KiB\"\n"),
    );
    let p = build(&["user"]);
    let (blob, user) = (&p["flt-blob"], &p["flt-user"]);
    let cache = env.cache_dir();

    let (code, summary, stderr) = push(&env, &[user]);
    assert_eq!(code, Some(3), "{summary:#}\n{stderr}");
    assert_eq!(summary["uploaded"], 0, "{summary:#}");
    let held = held_back(&summary);
    assert_eq!(held.len(), 1, "{summary:#}");
    assert_eq!(held[0].0, *user);
    assert!(
        held[0]
            .1
            .starts_with(&format!("reference {blob} is excluded (its NAR (64.")),
        "{held:?}"
    );
    assert!(
        held[0]
            .1
            .contains("is larger than target.max_nar_size (32.0 KiB)"),
        "{held:?}"
    );
    assert!(
        stderr.contains(&format!("excluded {blob} (its NAR")),
        "{stderr}"
    );
    assert!(assert_no_dangling_references(&cache, &[]).is_empty());

    // `--no-filter` pushes everything, and the cache is whole.
    let (code, summary, stderr) = push(&env, &["--no-filter", user]);
    assert_eq!(code, Some(0), "{summary:#}\n{stderr}");
    assert_eq!(summary["uploaded"], 2, "{summary:#}");
    assert_eq!(assert_no_dangling_references(&cache, &[]).len(), 2);
    assert_nix_substitutes(&file_url(&env), &public_key(), std::slice::from_ref(user));
}

// See: #18
#[test]
fn check_config_names_a_bad_filter_key_its_value_and_line() {
    let env = TestEnv::new();
    env.write_config_with(
        "",
        &format!(
            "url = \"{}\"\ninclude = [\"app-*\"]\nmax_nar_size = \"2 gigs\"\n",
            file_url(&env)
        ),
    );
    let out = env.nixpush(&["check-config", "--skip-files"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        // The TOML reader names the line and shows it, key and value; the size parser says what is wrong.
        stderr.contains("max_nar_size = \"2 gigs\"")
            && stderr.contains("\"2 gigs\" has an unknown unit")
            && stderr.contains("at line "),
        "{stderr}"
    );
    env.write_config_with(
        "exclude = [\"*-source\"]",
        &format!("url = \"{}\"\nexclude = [\"[oops\"]\n", file_url(&env)),
    );
    let out = env.nixpush(&["check-config", "--skip-files"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("target.exclude") && stderr.contains("[oops"),
        "{stderr}"
    );
    env.write_config_with(
        "",
        &format!(
            "url = \"{}\"\nexclude = [\"*-doc\"]\nmax_nar_size = \"1.5GiB\"\n",
            file_url(&env)
        ),
    );
    let out = env.nixpush(&["check-config", "--skip-files"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    // The effective configuration shows the size in its own units.
    assert!(shown.contains("max_nar_size = \"1536 MiB\""), "{shown}");
}
