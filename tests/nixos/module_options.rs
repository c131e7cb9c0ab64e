//! The module as a new user meets it (#19): imported without the flake, cross-built, next to another
//! post-build hook, and with credentials pasted into a URL.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use super::{default_file_target, enabled, fake_package, fixtures, output, strings};

/// Evaluates the module with `services.nixpush` and extra `--argstr` pairs for the stand-in.
fn eval_with(package: &Path, services: &Value, extra: &[(&str, &str)]) -> Result<Value, String> {
    let mut command = Command::new("nix-instantiate");
    command
        .args(["--eval", "--strict", "--json"])
        .arg(fixtures().join("eval-module.nix"))
        .arg("--argstr")
        .arg("packagePath")
        .arg(package)
        .args(["--argstr", "servicesNixpush", &services.to_string()]);
    for (name, value) in extra {
        command.args(["--argstr", name, value]);
    }
    let out = output(&mut command);
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("nix-instantiate prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

// See: #19
#[test]
fn module_imported_without_the_flake_says_where_the_package_comes_from() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let no_overlay = [("withPackage", "false")];
    let err = eval_with(&package, &default_file_target(), &no_overlay).unwrap_err();
    assert!(
        err.contains("pkgs.nixpush does not exist")
            && err.contains("nixosModules.default")
            && err.contains("overlays.default")
            && err.contains("services.nixpush.package"),
        "{err}"
    );

    // Setting the package is the way out, and the build-time check then runs that package.
    let mut services = default_file_target();
    let pkg = package.to_str().unwrap();
    services["package"] = json!(pkg);
    let eval = eval_with(&package, &services, &no_overlay).unwrap();
    assert_eq!(
        eval["service"]["serviceConfig"]["ExecStart"],
        format!("{pkg}/bin/nixpush daemon")
    );
    let check = eval["configFile"]["checkScript"].as_str().unwrap();
    assert!(
        check.contains(&format!("{pkg}/bin/nixpush check-config")),
        "{check}"
    );
}

// See: #19
#[test]
fn module_checks_the_config_with_the_build_platforms_nixpush() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let pkg = package.to_str().unwrap();
    let cross = eval_with(
        &package,
        &default_file_target(),
        &[("cross", "true"), ("buildPackagePath", "/build/nixpush")],
    )
    .unwrap();
    let check = cross["configFile"]["checkScript"].as_str().unwrap();
    assert!(
        check.contains("/build/nixpush/bin/nixpush check-config") && !check.contains(pkg),
        "{check}"
    );
    // The service itself runs the host's package.
    assert_eq!(
        cross["service"]["serviceConfig"]["ExecStart"],
        format!("{pkg}/bin/nixpush daemon")
    );

    let native = eval_with(&package, &default_file_target(), &[]).unwrap();
    let check = native["configFile"]["checkScript"].as_str().unwrap();
    assert!(
        check.contains(&format!("{pkg}/bin/nixpush check-config")),
        "{check}"
    );
}

// See: #19
#[test]
fn module_chains_an_existing_post_build_hook_instead_of_conflicting() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let mut services = default_file_target();
    services["hook"] =
        json!({ "chain": ["/run/current-system/sw/bin/old-hook", "/etc/notify-hook"] });
    let eval = eval_with(&package, &services, &[]).unwrap();
    assert_eq!(
        eval["nixSettings"]["post-build-hook"],
        format!("{}/bin/nixpush-hook", package.display())
    );
    assert_eq!(
        eval["nixDaemonEnvironment"]["NIXPUSH_HOOK_CHAIN"],
        "/run/current-system/sw/bin/old-hook:/etc/notify-hook"
    );
    // No chain, no variable.
    let plain = eval_with(&package, &default_file_target(), &[]).unwrap();
    assert_eq!(plain["nixDaemonEnvironment"], json!({}));
}

// See: #19
#[test]
fn module_refuses_credentials_in_urls() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    for (services, option) in [
        (
            enabled(
                json!({ "target": { "url": "https://alice:hunter2@cache.example.org/nix" } }),
                json!({}),
            ),
            "services.nixpush.settings.target.url holds a credential",
        ),
        (
            enabled(
                json!({ "target": { "url": "s3://cache?region=eu-west-1&aws_secret_access_key=abc" } }),
                json!({}),
            ),
            "services.nixpush.settings.target.url holds a credential",
        ),
        (
            enabled(
                json!({ "target": { "url": "file:///c" } }),
                json!({ "substituterUrl": "https://bob:pw@cache.example.org" }),
            ),
            "services.nixpush.substituterUrl holds a credential",
        ),
    ] {
        let err = eval_with(&package, &services, &[]).expect_err(&services.to_string());
        assert!(
            err.contains(option)
                && err.contains("authTokenFile")
                && err.contains("environmentFile"),
            "{services}\n{err}"
        );
        assert!(
            !err.contains("hunter2"),
            "the assertion repeats the password: {err}"
        );
    }
    // A port or a user without a password is not a credential.
    for url in [
        "https://cache.example.org:8443/nix",
        "s3://cache?region=eu-west-1&endpoint=http://127.0.0.1:9000",
    ] {
        let services = enabled(json!({ "target": { "url": url } }), json!({}));
        let eval = eval_with(&package, &services, &[]).unwrap();
        assert!(strings(&eval["tmpfiles"]).len() >= 2, "{url}");
    }
}
