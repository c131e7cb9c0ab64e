//! Every .nix file parses; the flake's outputs evaluate; its cachix-push app builds, then pushes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::{fixtures, output, repo, strings, succeed};

#[test]
fn every_nix_file_parses() {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() && name != "target" && !name.starts_with('.') {
                walk(&path, found);
            } else if name.ends_with(".nix") {
                found.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo(), &mut files);
    for expected in [
        "flake.nix",
        "nixos-module/default.nix",
        "nixos-module/test.nix",
        "examples/nixos/flake.nix",
        "examples/nixos/nixpush.nix",
    ] {
        assert!(
            files.contains(&repo().join(expected)),
            "{expected} not found"
        );
    }
    for file in &files {
        succeed(Command::new("nix-instantiate").arg("--parse").arg(file));
    }
}

/// What the flake evaluates to with nixpkgs stood in for (tests/fixtures/nixos/eval-flake.nix).
fn eval_flake() -> Value {
    let out = succeed(
        Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json"])
            .arg(fixtures().join("eval-flake.nix")),
    );
    serde_json::from_str(&out).unwrap()
}

#[test]
fn flake_outputs_evaluate() {
    let flake = eval_flake();
    let root = repo();
    assert_eq!(flake["package"]["pname"], "nixpush");
    let cargo_toml: toml::Value =
        toml::from_str(&fs::read_to_string(root.join("Cargo.toml")).unwrap()).unwrap();
    assert_eq!(
        flake["package"]["version"],
        cargo_toml["package"]["version"].as_str().unwrap()
    );
    assert_eq!(
        flake["package"]["lockFile"],
        root.join("Cargo.lock").to_str().unwrap()
    );
    assert_eq!(strings(&flake["package"]["cargoTestFlags"]), ["--lib"]);
    let src = strings(&flake["package"]["srcFiles"]);
    for needed in ["Cargo.toml", "Cargo.lock", "src", "tests"] {
        assert!(
            src.contains(&root.join(needed).to_str().unwrap()),
            "{needed} not in src"
        );
    }
    assert_eq!(flake["overlayPackage"], flake["package"]["name"]);
    assert!(flake["apps"]["default"]["program"]
        .as_str()
        .unwrap()
        .ends_with("/bin/nixpush"));
    assert!(flake["apps"]["cachix-push"]["program"]
        .as_str()
        .unwrap()
        .ends_with("/bin/cachix-push"));
    assert_eq!(
        strings(&flake["cachixPush"]["runtimeInputs"]),
        [flake["package"]["name"].as_str().unwrap()]
    );
    assert_eq!(strings(&flake["checks"]), ["package", "vm"]);
    assert_eq!(
        strings(&flake["module"]["imports"]),
        [root.join("nixos-module").to_str().unwrap()]
    );
    assert_eq!(flake["module"]["packageName"], flake["package"]["name"]);
    assert_eq!(flake["module"]["packagePriority"], 1000, "mkDefault");

    // The VM test's Python script at least compiles (the NixOS test driver runs it on a NixOS host).
    let script = flake["vmTest"]["testScript"].as_str().unwrap();
    let public_key = fs::read_to_string(fixtures().join("vm-test-key.pub")).unwrap();
    assert!(script.contains(public_key.trim()));
    succeed(
        Command::new(crate::harness::servers::python3())
            .args(["-c", "import ast, sys; ast.parse(sys.stdin.read())"])
            .stdin(fs::File::open(write_temp(script).path()).unwrap()),
    );
}

fn write_temp(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    fs::write(file.path(), text).unwrap();
    file
}

/// Runs the flake's cachix-push script as writeShellApplication would (strict bash, runtime inputs first on
/// PATH), with `nix` and `nixpush` replaced by scripts that log their arguments.
#[test]
fn cachix_push_app_builds_then_pushes() {
    let flake = eval_flake();
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let log = tmp.path().join("calls.log");
    let fake = |name: &str, body: &str| {
        let path = bin.join(name);
        fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{name} $*\" >> '{}'\n{body}\n",
                log.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    };
    fake("nixpush", "exit 0");
    let script = tmp.path().join("cachix-push");
    fs::write(
        &script,
        format!(
            "#!/usr/bin/env bash\nset -o errexit -o nounset -o pipefail\n{}",
            flake["cachixPush"]["text"].as_str().unwrap()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let _ = fs::remove_file(&log);
        let out = output(
            Command::new("bash")
                .arg(&script)
                .args(args)
                .env("PATH", format!("{}:/usr/bin:/bin", bin.display())),
        );
        let calls = fs::read_to_string(&log).unwrap_or_default();
        (out, calls)
    };
    // What bash puts in $HOSTNAME (gethostname).
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();

    fake(
        "nix",
        "printf '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a\\n/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b\\n'",
    );
    let (out, calls) = run(&[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        calls,
        format!(
            "nix --extra-experimental-features nix-command flakes build --no-link --print-out-paths \
             .#nixosConfigurations.{hostname}.config.system.build.toplevel\n\
             nixpush push /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a /nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b\n"
        )
    );

    let (out, calls) = run(&[".#one", ".#two", "--", "--json", "--no-closure"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        calls.contains("build --no-link --print-out-paths .#one .#two\n"),
        "{calls}"
    );
    assert!(
        calls.contains("nixpush push --json --no-closure /nix/store/a"),
        "{calls}"
    );

    fake("nix", "exit 1");
    let (out, calls) = run(&[]);
    assert!(!out.status.success(), "a failed build fails the app");
    assert!(
        !calls.contains("nixpush"),
        "nothing is pushed after a failed build: {calls}"
    );
}
