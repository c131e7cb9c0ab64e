//! The NixOS module, the systemd units, the flake and the examples, checked with the real tools this machine has:
//! `nix-instantiate` (parse and evaluate), `systemd-analyze verify`, `systemd-sysusers`/`systemd-tmpfiles`,
//! `systemd-socket-activate`, `nginx -t`, and nixpush itself. There is no nixpkgs here, so the module and the
//! flake are evaluated through small stand-ins (`tests/fixtures/nixos/eval-*.nix`, each saying what it replaces);
//! the flake's `checks.x86_64-linux.vm` covers the real thing on a NixOS host.

mod activation;
mod configs;
mod flake;
mod flake_install;
mod install_snippet;
mod module;
mod module_options;
mod units;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::harness::process::{wait_until_within as wait_for, Run};

const NIXPUSH: &str = env!("CARGO_BIN_EXE_nixpush");
const NIXPUSH_HOOK: &str = env!("CARGO_BIN_EXE_nixpush-hook");
/// Where `systemd/nixpush.service` expects the binaries (`cargo install --root /usr/local`).
const INSTALLED_BIN_DIR: &str = "/usr/local/bin/";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures/nixos")
}

/// Runs `command`, panicking if it cannot start.
fn output(command: &mut Command) -> Output {
    command.run()
}

/// Runs `command` and returns its stdout, panicking with everything it said if it fails.
fn succeed(command: &mut Command) -> String {
    let out = output(command);
    assert!(
        out.status.success(),
        "{command:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// A directory laid out like the nixpush package (`bin/nixpush`, `bin/nixpush-hook`), pointing at the binaries
/// under test, so rendered units name programs that exist.
fn fake_package(dir: &Path) -> PathBuf {
    let package = dir.join("nixpush-package");
    fs::create_dir_all(package.join("bin")).unwrap();
    std::os::unix::fs::symlink(NIXPUSH, package.join("bin/nixpush")).unwrap();
    std::os::unix::fs::symlink(NIXPUSH_HOOK, package.join("bin/nixpush-hook")).unwrap();
    package
}

/// Evaluates the module with `services.nixpush` set to `services_nixpush`; `Err` holds nix-instantiate's stderr.
fn eval_module(package: &Path, services_nixpush: &Value) -> Result<Value, String> {
    eval_module_with(package, "servicesNixpush", &services_nixpush.to_string())
}

fn eval_module_with(package: &Path, arg: &str, value: &str) -> Result<Value, String> {
    let out = output(
        Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json"])
            .arg(fixtures().join("eval-module.nix"))
            .arg("--argstr")
            .arg("packagePath")
            .arg(package)
            .args(["--argstr", arg, value]),
    );
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("nix-instantiate prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn enabled(settings: Value, rest: Value) -> Value {
    let mut config = json!({ "enable": true, "settings": settings });
    for (key, value) in rest.as_object().expect("an object") {
        config[key] = value.clone();
    }
    config
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{value} is not a list"))
        .iter()
        .map(|v| v.as_str().expect("a string"))
        .collect()
}

fn default_file_target() -> Value {
    enabled(
        json!({ "target": { "url": "file:///var/cache/nixpush" } }),
        json!({ "signingKeyFile": "/run/secrets/nixpush-signing-key" }),
    )
}

/// `systemd/nixpush.service` with its `/usr/local/bin/` programs replaced by the binaries under test.
fn installed_service_text(package: &Path) -> String {
    let text = fs::read_to_string(repo().join("systemd/nixpush.service")).unwrap();
    assert!(text.contains(&format!("ExecStart={INSTALLED_BIN_DIR}nixpush daemon")));
    text.replace(INSTALLED_BIN_DIR, &format!("{}/bin/", package.display()))
}
