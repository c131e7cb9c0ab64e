//! `examples/github-actions/nixpush-push.yml` run as GitHub Actions would run its shell steps (#19): the YAML
//! read with a YAML parser (PyYAML), each `run:` executed by `bash -eo pipefail` with the step's `env:`
//! (secrets filled in), `$GITHUB_ENV` carried to later steps and `if: always()` honoured. The only stand-ins:
//! `nix run .#nixpush --` runs the binary under test, `nix build INSTALLABLE --out-link result` builds a small
//! real derivation, and the config the workflow writes is pointed at the local Cachix server (`?api=`) with no
//! upstream cache, so nothing leaves 127.0.0.1. Run once with a signing-key secret and once without.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::remote::{nix_key, CachixServer};
use crate::util::{self, NIXPUSH, NIX_OPTIONS};

const WORKFLOW: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/github-actions/nixpush-push.yml"
);
const TOKEN: &str = "ci-write-token";

/// The workflow as JSON, parsed by PyYAML.
fn workflow() -> Value {
    let out = Command::new(crate::harness::servers::python3())
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
            WORKFLOW,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the workflow is not valid YAML (or PyYAML is missing: scripts/install-test-deps): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn steps() -> Vec<Value> {
    workflow()["jobs"]["build"]["steps"]
        .as_array()
        .unwrap()
        .clone()
}

// See: #19
#[test]
fn ci_example_names_every_action_at_a_release_tag() {
    let steps = steps();
    let uses: Vec<&str> = steps.iter().filter_map(|s| s["uses"].as_str()).collect();
    assert!(
        uses.iter()
            .any(|u| u.starts_with("cachix/install-nix-action@")),
        "{uses:?}"
    );
    for action in &uses {
        let (name, tag) = action
            .split_once('@')
            .unwrap_or_else(|| panic!("{action} has no @tag"));
        assert_eq!(name.split('/').count(), 2, "{action}");
        let version = tag
            .strip_prefix('v')
            .unwrap_or_else(|| panic!("{action}: not a vN tag"));
        assert!(
            version
                .split('.')
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
            "{action}: not a release tag"
        );
    }
    // install-nix-action v27 predates Nix 2.24; v31 is the current major.
    let install = uses
        .iter()
        .find(|u| u.starts_with("cachix/install-nix-action@"))
        .unwrap();
    let major: u32 = install
        .split("@v")
        .nth(1)
        .unwrap()
        .split('.')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(major >= 31, "{install}");
}

/// A `nix` for the workflow's two invocations.
fn nix_stand_in(bin: &Path, nonce: &str) {
    let script = format!(
        r#"#!/bin/bash
set -euo pipefail
if [ "$1 $2 $3" = "run .#nixpush --" ]; then shift 3; exec {nixpush} "$@"; fi
if [ "$1" = build ] && [ "$3 $4" = "--out-link result" ]; then
  exec nix-build {expr} --argstr nonce {nonce} {options} --option substituters "" -o result
fi
echo "unexpected nix invocation: $*" >&2; exit 127
"#,
        nixpush = NIXPUSH,
        expr = util::hooktest_nix().display(),
        options = NIX_OPTIONS
            .map(|o| if o.is_empty() {
                "''".to_owned()
            } else {
                o.to_owned()
            })
            .join(" "),
    );
    fs::write(bin.join("nix"), script).unwrap();
    fs::set_permissions(bin.join("nix"), fs::Permissions::from_mode(0o755)).unwrap();
}

/// Fills in `${{ secrets.NAME }}`; any other expression is a test failure (the runner would need it).
fn expand(value: &str, secrets: &BTreeMap<&str, &str>) -> String {
    let mut out = value.to_owned();
    for (name, secret) in secrets {
        out = out.replace(&format!("${{{{ secrets.{name} }}}}"), secret);
    }
    assert!(!out.contains("${{"), "unhandled expression in {value}");
    out
}

/// Runs every `run:` step in order; returns the outcome of each step by name.
fn run_workflow(
    workdir: &Path,
    secrets: &BTreeMap<&str, &str>,
    api: &str,
) -> BTreeMap<String, bool> {
    let runner_temp = workdir.join("runner-temp");
    fs::create_dir_all(&runner_temp).unwrap();
    let github_env = workdir.join("github-env");
    fs::write(&github_env, "").unwrap();
    let bin = workdir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    nix_stand_in(&bin, &util::fresh_nonce());
    let checkout = workdir.join("checkout");
    fs::create_dir_all(&checkout).unwrap();

    let mut outcomes = BTreeMap::new();
    let mut failed = false;
    for step in steps() {
        let Some(run) = step["run"].as_str() else {
            continue;
        };
        let name = step["name"].as_str().unwrap_or(run).to_owned();
        if failed && step["if"].as_str() != Some("always()") {
            continue;
        }
        // The loopback stand-ins for cachix.org and cache.nixos.org.
        let run = run
            .replace(
                "cachix://mycache\"",
                &format!("cachix://mycache?api={api}\""),
            )
            .replace("[\"https://cache.nixos.org\"]", "[]");
        let mut command = Command::new("bash");
        command
            .args(["--noprofile", "--norc", "-eo", "pipefail", "-c", &run])
            .current_dir(&checkout)
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .env("RUNNER_TEMP", &runner_temp)
            .env("GITHUB_ENV", &github_env)
            .env_remove("NIXPUSH_CONFIG")
            .env_remove("CACHIX_AUTH_TOKEN")
            .env_remove("CACHIX_SIGNING_KEY");
        for line in fs::read_to_string(&github_env).unwrap().lines() {
            let (key, value) = line.split_once('=').unwrap();
            command.env(key, value);
        }
        if let Some(env) = step["env"].as_object() {
            for (key, value) in env {
                command.env(key, expand(value.as_str().unwrap(), secrets));
            }
        }
        let out = command.output().unwrap();
        let ok = out.status.success();
        if !ok {
            eprintln!(
                "step {name:?} failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        failed |= !ok;
        outcomes.insert(name, ok);
    }
    outcomes
}

fn stored(server: &CachixServer, cache: &str) -> Vec<String> {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(server.stored(cache))
}

fn assert_pushed(workdir: &Path, outcomes: &BTreeMap<String, bool>, stored: &[String]) {
    for (name, ok) in outcomes {
        assert!(ok, "step {name:?} failed: {outcomes:?}");
    }
    assert_eq!(outcomes.len(), 4, "{outcomes:?}");
    let summary: Value = serde_json::from_str(
        &fs::read_to_string(workdir.join("checkout/push-summary.json")).unwrap(),
    )
    .unwrap();
    assert!(
        summary["failed"].as_array().unwrap().is_empty(),
        "{summary}"
    );
    let result = fs::read_link(workdir.join("checkout/result")).unwrap();
    let result = result.to_str().unwrap();
    assert!(
        stored.iter().any(|p| p == result),
        "{result} not in {stored:?}"
    );
    assert!(summary["uploaded"].as_u64().unwrap() >= 1, "{summary}");
}

// See: #19
#[test]
fn ci_example_pushes_to_a_cache_with_a_managed_key() {
    let server = CachixServer::start(json!({"caches": [{
        "name": "mycache", "signing": "managed", "tokens": {TOKEN: "write"}}]}));
    let workdir = tempfile::tempdir().unwrap();
    // The secret is not set at all: GitHub expands it to an empty string.
    let secrets = BTreeMap::from([("CACHIX_AUTH_TOKEN", TOKEN), ("CACHIX_SIGNING_KEY", "")]);
    let outcomes = run_workflow(workdir.path(), &secrets, &server.base());
    let config = fs::read_to_string(workdir.path().join("runner-temp/nixpush.toml")).unwrap();
    assert!(!config.contains("signing_key_file"), "{config}");
    assert!(!workdir
        .path()
        .join("runner-temp/cachix-signing-key")
        .exists());
    assert_pushed(workdir.path(), &outcomes, &stored(&server, "mycache"));
}

// See: #19
#[test]
fn ci_example_pushes_to_a_self_signed_cache_with_its_key() {
    let keys = tempfile::tempdir().unwrap();
    let (secret_file, public) = nix_key(keys.path(), "mycache-ci-1");
    let server = CachixServer::start(json!({"caches": [{
        "name": "mycache", "signing": "self-signed", "public_keys": [public.trim()],
        "tokens": {TOKEN: "write"}}]}));
    let workdir = tempfile::tempdir().unwrap();
    let secret = fs::read_to_string(&secret_file).unwrap();
    let secrets = BTreeMap::from([
        ("CACHIX_AUTH_TOKEN", TOKEN),
        ("CACHIX_SIGNING_KEY", secret.trim()),
    ]);
    let outcomes = run_workflow(workdir.path(), &secrets, &server.base());
    let config = fs::read_to_string(workdir.path().join("runner-temp/nixpush.toml")).unwrap();
    assert!(config.contains("signing_key_file"), "{config}");
    assert_pushed(workdir.path(), &outcomes, &stored(&server, "mycache"));
}
