//! The NixOS module, the systemd units, the flake and the examples, checked with the real tools this machine has:
//! `nix-instantiate` (parse and evaluate), `systemd-analyze verify`, `systemd-sysusers`/`systemd-tmpfiles`,
//! `systemd-socket-activate`, `nginx -t`, and nixpush itself. There is no nixpkgs here, so the module and the
//! flake are evaluated through small stand-ins (`tests/fixtures/nixos/eval-*.nix`, each saying what it replaces);
//! the flake's `checks.x86_64-linux.vm` covers the real thing on a NixOS host.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nixpush::config::Config;
use serde_json::{json, Value};

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

/// Runs `command`, panicking with its stderr when it cannot start.
fn output(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
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

/// One `Key=value` line per value, as NixOS renders `serviceConfig`/`socketConfig`: lists repeat the key,
/// booleans are `true`/`false`.
fn render_directives(section: &Value) -> String {
    let mut text = String::new();
    for (key, value) in section.as_object().expect("an attribute set") {
        let values = match value {
            Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
        for value in values {
            let rendered = match value {
                Value::String(s) => s,
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                other => panic!("{key} = {other} has no systemd rendering"),
            };
            text.push_str(&format!("{key}={rendered}\n"));
        }
    }
    text
}

/// The `[Unit]` part NixOS writes from description/requires/after/… (space-separated lists).
fn render_unit_section(unit: &Value) -> String {
    let mut text = String::from("[Unit]\n");
    for (attr, key) in [
        ("description", "Description"),
        ("requires", "Requires"),
        ("wants", "Wants"),
        ("after", "After"),
        ("before", "Before"),
    ] {
        match &unit[attr] {
            Value::Null => {}
            Value::String(s) => text.push_str(&format!("{key}={s}\n")),
            list => text.push_str(&format!("{key}={}\n", strings(list).join(" "))),
        }
    }
    if !unit["reloadTriggers"].is_null() {
        text.push_str(&format!(
            "X-Reload-Triggers={}\n",
            strings(&unit["reloadTriggers"]).join(" ")
        ));
    }
    text
}

/// `wantedBy` becomes symlinks on NixOS; an `[Install]` section says the same to systemd-analyze.
fn render_install_section(unit: &Value) -> String {
    format!(
        "\n[Install]\nWantedBy={}\n",
        strings(&unit["wantedBy"]).join(" ")
    )
}

/// `systemd.services.nixpush` from the evaluation, as the unit file NixOS would write.
fn render_service(service: &Value) -> String {
    let mut text = render_unit_section(service);
    text.push_str("\n[Service]\n");
    let mut environment: Vec<(String, String)> = service["environment"]
        .as_object()
        .map(|env| {
            env.iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("a string").to_owned()))
                .collect()
        })
        .unwrap_or_default();
    if !service["path"].is_null() {
        let path = strings(&service["path"]);
        let bins: Vec<String> = path.iter().map(|p| format!("{p}/bin")).collect();
        let sbins: Vec<String> = path.iter().map(|p| format!("{p}/sbin")).collect();
        environment.push((
            "PATH".to_owned(),
            format!("{}:{}", bins.join(":"), sbins.join(":")),
        ));
    }
    for (key, value) in &environment {
        text.push_str(&format!("Environment=\"{key}={value}\"\n"));
    }
    text.push_str(&render_directives(&service["serviceConfig"]));
    text.push_str(&render_install_section(service));
    text
}

/// `systemd.sockets.nixpush` from the evaluation, as the unit file NixOS would write.
fn render_socket(socket: &Value) -> String {
    let mut text = render_unit_section(socket);
    text.push_str("\n[Socket]\n");
    for stream in strings(&socket["listenStreams"]) {
        text.push_str(&format!("ListenStream={stream}\n"));
    }
    text.push_str(&render_directives(&socket["socketConfig"]));
    text.push_str(&render_install_section(socket));
    text
}

/// `systemd-analyze verify` on a socket and service pair. It exits 0 even for unknown keys (it only warns), so
/// any diagnostic naming our units fails the test too; lines about the host's own units are printed, not judged.
fn verify_units(dir: &Path) {
    let out = output(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no", "--generators=no"])
            .arg(dir.join("nixpush.socket"))
            .arg(dir.join("nixpush.service")),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("nixpush")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify in {} failed ({}):\n{stderr}",
        dir.display(),
        out.status
    );
    if !stderr.trim().is_empty() {
        eprintln!("systemd-analyze verify said, about other units:\n{stderr}");
    }
}

fn default_file_target() -> Value {
    enabled(
        json!({ "target": { "url": "file:///var/cache/nixpush" } }),
        json!({ "signingKeyFile": "/run/secrets/nixpush-signing-key" }),
    )
}

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

#[test]
fn module_renders_a_hardened_socket_activated_service() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let pkg = package.to_str().unwrap();
    let eval = eval_module(&package, &default_file_target()).unwrap();

    let service = &eval["service"]["serviceConfig"];
    assert_eq!(service["ExecStart"], format!("{pkg}/bin/nixpush daemon"));
    assert_eq!(service["Type"], "notify");
    assert_eq!(service["WatchdogSec"], "30s");
    assert_eq!(service["ExecReload"], "/usr/bin/kill -HUP $MAINPID");
    assert_eq!(service["User"], "nixpush");
    assert_eq!(service["StateDirectory"], "nixpush");
    assert_eq!(service["RuntimeDirectory"], "nixpush");
    assert_eq!(service["RuntimeDirectoryPreserve"], "yes");
    for (key, value) in [
        ("ProtectSystem", json!("strict")),
        ("ProtectHome", json!(true)),
        ("PrivateTmp", json!(true)),
        ("NoNewPrivileges", json!(true)),
        ("CapabilityBoundingSet", json!("")),
        (
            "RestrictAddressFamilies",
            json!(["AF_UNIX", "AF_INET", "AF_INET6"]),
        ),
        ("SystemCallFilter", json!(["@system-service"])),
    ] {
        assert_eq!(service[key], value, "{key}");
    }
    // Both would break the hook: a user namespace hides uid 0 from SO_PEERCRED, DynamicUser moves the spool.
    assert!(service["PrivateUsers"].is_null() && service["DynamicUser"].is_null());
    assert_eq!(
        strings(&service["LoadCredential"]),
        ["signing-key:/run/secrets/nixpush-signing-key"]
    );
    assert_eq!(strings(&service["ReadWritePaths"]), ["/var/cache/nixpush"]);
    assert_eq!(strings(&eval["service"]["requires"]), ["nixpush.socket"]);
    assert_eq!(strings(&eval["service"]["wantedBy"]), ["multi-user.target"]);
    assert_eq!(
        strings(&eval["service"]["reloadTriggers"]),
        [eval["configFile"]["path"].as_str().unwrap()]
    );

    let socket = &eval["socket"];
    assert_eq!(
        strings(&socket["listenStreams"]),
        ["/run/nixpush/nixpush.sock"]
    );
    assert_eq!(socket["socketConfig"]["SocketMode"], "0666");
    assert_eq!(strings(&socket["wantedBy"]), ["sockets.target"]);

    assert_eq!(
        eval["nixSettings"],
        json!({ "post-build-hook": format!("{pkg}/bin/nixpush-hook") })
    );
    assert_eq!(eval["nixDaemonEnvironment"], json!({}));
    assert_eq!(strings(&eval["systemPackages"]), [pkg]);
    assert_eq!(
        eval["users"]["users"]["nixpush"]["isSystemUser"],
        json!(true)
    );
    let tmpfiles = strings(&eval["tmpfiles"]);
    assert!(tmpfiles.contains(&"d /var/lib/nixpush/spool 1733 nixpush nixpush - -"));
    assert!(tmpfiles.contains(&"d /var/cache/nixpush 0755 nixpush nixpush - -"));
}

#[test]
fn module_writes_a_config_nixpush_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let mut services = default_file_target();
    services["settings"]["client_timeout_ms"] = json!(500);
    services["settings"]["target"]["workers"] = json!(3);
    services["allowedUsers"] = json!(["alice"]);
    let eval = eval_module(&package, &services).unwrap();
    let text = eval["configFile"]["text"].as_str().unwrap();

    let config =
        Config::parse(text, Path::new("module.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(config.target.url, "file:///var/cache/nixpush");
    assert_eq!(
        config.target.signing_key_file.as_deref(),
        Some(Path::new("/run/credentials/nixpush.service/signing-key"))
    );
    assert_eq!(config.target.auth_token_file, None);
    assert_eq!(config.target.workers, Some(3));
    assert_eq!(config.client_timeout_ms, 500, "freeform keys pass through");
    assert_eq!(config.allowed_users, ["alice"]);
    assert_eq!(config.socket, Path::new("/run/nixpush/nixpush.sock"));
    assert_eq!(config.state_dir, Path::new("/var/lib/nixpush"));
    assert_eq!(config.upstream, ["https://cache.nixos.org"]);

    // The build-time check runs nixpush check-config on the generated file.
    let script = eval["configFile"]["checkScript"].as_str().unwrap();
    assert!(
        script.contains(&format!(
            "{}/bin/nixpush check-config \"$raw\"",
            package.display()
        )),
        "{script}"
    );
    services["checkConfig"] = json!(false);
    let unchecked = eval_module(&package, &services).unwrap();
    assert!(unchecked["configFile"]["checkScript"].is_null());
    assert_eq!(unchecked["configFile"]["text"], eval["configFile"]["text"]);
}

#[test]
fn module_hands_secrets_over_and_trusts_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let key = "mycache.cachix.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
    let eval = eval_module(
        &package,
        &enabled(
            json!({ "target": { "url": "cachix://mycache" } }),
            json!({
                "authTokenFile": "/run/secrets/cachix-token",
                "signingKeyFile": "/run/secrets/cachix-key",
                "environmentFile": "/run/secrets/nixpush.env",
                "addToSubstituters": true,
                "publicKey": key,
            }),
        ),
    )
    .unwrap();
    let service = &eval["service"]["serviceConfig"];
    assert_eq!(
        strings(&service["LoadCredential"]),
        [
            "signing-key:/run/secrets/cachix-key",
            "auth-token:/run/secrets/cachix-token"
        ]
    );
    assert_eq!(
        strings(&service["EnvironmentFile"]),
        ["/run/secrets/nixpush.env"]
    );
    assert_eq!(strings(&service["ReadWritePaths"]), Vec::<&str>::new());
    let text = eval["configFile"]["text"].as_str().unwrap();
    assert!(!text.contains("/run/secrets"), "{text}");
    let config = Config::parse(text, Path::new("module.toml")).unwrap();
    assert_eq!(
        config.target.auth_token_file.as_deref(),
        Some(Path::new("/run/credentials/nixpush.service/auth-token"))
    );
    assert_eq!(
        strings(&eval["nixSettings"]["substituters"]),
        ["https://mycache.cachix.org"]
    );
    assert_eq!(strings(&eval["nixSettings"]["trusted-public-keys"]), [key]);

    // Any other target is read from its own URL unless substituterUrl says otherwise.
    let http = |extra: Value| {
        let mut rest = json!({ "addToSubstituters": true, "publicKey": key });
        for (k, v) in extra.as_object().unwrap() {
            rest[k] = v.clone();
        }
        eval_module(
            &package,
            &enabled(
                json!({ "target": { "url": "https://cache.example.org/nix" } }),
                rest,
            ),
        )
        .unwrap()
    };
    assert_eq!(
        strings(&http(json!({}))["nixSettings"]["substituters"]),
        ["https://cache.example.org/nix"]
    );
    assert_eq!(
        strings(
            &http(json!({ "substituterUrl": "https://read.example.org" }))["nixSettings"]
                ["substituters"]
        ),
        ["https://read.example.org"]
    );
}

#[test]
fn module_hook_and_substituters_follow_their_options() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let mut services = default_file_target();
    services["hook"] = json!({ "enable": false });
    let eval = eval_module(&package, &services).unwrap();
    assert_eq!(eval["nixSettings"], json!({}));

    let disabled = eval_module(&package, &json!({ "enable": false })).unwrap();
    assert_eq!(disabled, json!({}), "a disabled module renders nothing");
}

#[test]
fn module_tells_nix_daemon_about_a_moved_socket_and_state_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let eval = eval_module(
        &package,
        &enabled(
            json!({
                "socket": "/run/nixpush-alt/hook.sock",
                "state_dir": "/srv/nixpush",
                "socket_mode": "0660",
                "socket_group": "nixbld",
                "target": { "url": "file:///srv/cache" },
            }),
            json!({}),
        ),
    )
    .unwrap();
    assert_eq!(
        eval["nixDaemonEnvironment"],
        json!({ "NIXPUSH_SOCKET": "/run/nixpush-alt/hook.sock", "NIXPUSH_SPOOL": "/srv/nixpush/spool" })
    );
    assert_eq!(
        strings(&eval["socket"]["listenStreams"]),
        ["/run/nixpush-alt/hook.sock"]
    );
    assert_eq!(
        eval["socket"]["socketConfig"],
        json!({ "SocketMode": "0660", "SocketGroup": "nixbld" })
    );
    let service = &eval["service"]["serviceConfig"];
    assert!(service["StateDirectory"].is_null());
    assert_eq!(
        strings(&service["ReadWritePaths"]),
        ["/srv/cache", "/srv/nixpush"]
    );
    assert!(strings(&eval["tmpfiles"]).contains(&"d /srv/nixpush/spool 1733 nixpush nixpush - -"));
}

#[test]
fn module_refuses_settings_that_cannot_work() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let file = json!({ "target": { "url": "file:///c" } });
    for (services, expected) in [
        (
            enabled(file.clone(), json!({ "addToSubstituters": true })),
            "services.nixpush.addToSubstituters needs services.nixpush.publicKey",
        ),
        (
            enabled(
                file.clone(),
                json!({ "signingKeyFile": "/nix/store/00000000000000000000000000000000-key" }),
            ),
            "services.nixpush.signingKeyFile must be an absolute path outside the Nix store",
        ),
        (
            enabled(file.clone(), json!({ "authTokenFile": "token" })),
            "services.nixpush.authTokenFile must be an absolute path",
        ),
        (
            enabled(
                json!({ "target": { "url": "file:///c", "signing_key_file": "/k" } }),
                json!({ "signingKeyFile": "/run/secrets/k" }),
            ),
            "either services.nixpush.signingKeyFile or settings.target.signing_key_file",
        ),
        (
            enabled(json!({ "target": { "url": "ftp://c" } }), json!({})),
            "services.nixpush.settings.target.url' is not of type",
        ),
        (
            enabled(
                json!({ "target": { "url": "file:///c", "compression": "gzip" } }),
                json!({}),
            ),
            "services.nixpush.settings.target.compression' is not of type",
        ),
        (
            enabled(json!({}), json!({})),
            "services.nixpush.settings.target.url' is used but not defined",
        ),
        (
            enabled(file.clone(), json!({ "signingKey": "/k" })),
            "services.nixpush.signingKey' does not exist",
        ),
    ] {
        let err = eval_module(&package, &services).expect_err(&services.to_string());
        assert!(
            err.contains(expected),
            "{services}\nwanted {expected:?} in:\n{err}"
        );
    }
}

#[test]
fn example_nixos_configuration_evaluates_against_the_module() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let example = repo().join("examples/nixos/nixpush.nix");
    let eval = eval_module_with(&package, "exampleModule", example.to_str().unwrap()).unwrap();
    assert_eq!(
        strings(&eval["service"]["serviceConfig"]["LoadCredential"]),
        [
            "signing-key:/run/secrets/cachix-signing-key",
            "auth-token:/run/secrets/cachix-token"
        ]
    );
    assert_eq!(
        strings(&eval["nixSettings"]["substituters"]),
        ["https://mycache.cachix.org"]
    );
    // Credentials are copied at start, so a rotated secret must restart the service.
    for (secret, units) in eval["sopsRestartUnits"].as_object().unwrap() {
        assert_eq!(strings(units), ["nixpush.service"], "{secret}");
    }
    Config::parse(
        eval["configFile"]["text"].as_str().unwrap(),
        Path::new("example.toml"),
    )
    .unwrap();
}

#[test]
fn module_units_pass_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    for services in [
        default_file_target(),
        enabled(
            json!({ "target": { "url": "cachix://mycache" }, "socket_group": "nixbld" }),
            json!({ "authTokenFile": "/run/secrets/t", "environmentFile": "/run/secrets/e" }),
        ),
    ] {
        let eval = eval_module(&package, &services).unwrap();
        let units = tempfile::tempdir().unwrap();
        fs::write(
            units.path().join("nixpush.service"),
            render_service(&eval["service"]),
        )
        .unwrap();
        fs::write(
            units.path().join("nixpush.socket"),
            render_socket(&eval["socket"]),
        )
        .unwrap();
        verify_units(units.path());
    }
}

/// `systemd/nixpush.service` with its `/usr/local/bin/` programs replaced by the binaries under test.
fn installed_service_text(package: &Path) -> String {
    let text = fs::read_to_string(repo().join("systemd/nixpush.service")).unwrap();
    assert!(text.contains(&format!("ExecStart={INSTALLED_BIN_DIR}nixpush daemon")));
    text.replace(INSTALLED_BIN_DIR, &format!("{}/bin/", package.display()))
}

#[test]
fn distribution_units_pass_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let units = tmp.path().join("units");
    fs::create_dir(&units).unwrap();
    fs::write(
        units.join("nixpush.service"),
        installed_service_text(&package),
    )
    .unwrap();
    fs::copy(
        repo().join("systemd/nixpush.socket"),
        units.join("nixpush.socket"),
    )
    .unwrap();
    verify_units(&units);

    // The checks above would notice a broken unit: a misspelt key is reported.
    let broken = tmp.path().join("broken");
    fs::create_dir(&broken).unwrap();
    fs::write(
        broken.join("nixpush.service"),
        installed_service_text(&package).replace("ProtectHome=", "ProtectHomme="),
    )
    .unwrap();
    fs::copy(
        repo().join("systemd/nixpush.socket"),
        broken.join("nixpush.socket"),
    )
    .unwrap();
    let out = output(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no", "--generators=no"])
            .arg(broken.join("nixpush.socket"))
            .arg(broken.join("nixpush.service")),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("ProtectHomme"));
}

#[test]
fn sysusers_and_tmpfiles_give_the_spool_to_the_daemon_user() {
    let root = tempfile::tempdir().unwrap();
    fs::create_dir(root.path().join("etc")).unwrap();
    succeed(
        Command::new("systemd-sysusers")
            .arg(format!("--root={}", root.path().display()))
            .arg(repo().join("systemd/nixpush.sysusers.conf")),
    );
    let passwd = fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("nixpush:"))
        .unwrap_or_else(|| panic!("no nixpush user in\n{passwd}"));
    let uid: u32 = line.split(':').nth(2).unwrap().parse().unwrap();
    assert_eq!(line.split(':').nth(5), Some("/var/lib/nixpush"));

    succeed(
        Command::new("systemd-tmpfiles")
            .arg("--create")
            .arg(format!("--root={}", root.path().display()))
            .arg(repo().join("systemd/nixpush.tmpfiles.conf")),
    );
    for (dir, mode) in [
        ("var/lib/nixpush", 0o711),
        ("var/lib/nixpush/spool", 0o1733),
        ("var/cache/nixpush", 0o755),
    ] {
        let meta = fs::metadata(root.path().join(dir)).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), uid, "{dir}");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{dir}");
    }
}

/// The sample and every example config, as files.
fn shipped_configs() -> Vec<PathBuf> {
    let mut files = vec![repo().join("systemd/config.toml")];
    for entry in fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            files.push(path);
        }
    }
    files.sort();
    assert!(
        files.len() >= 5,
        "sample plus one example per backend: {files:?}"
    );
    files
}

#[test]
fn sample_and_example_configs_load() {
    let mut schemes = Vec::new();
    for file in shipped_configs() {
        let config = Config::load(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        schemes.push(config.target.url.split("://").next().unwrap().to_owned());
    }
    for scheme in ["file", "https", "s3", "cachix"] {
        assert!(
            schemes.iter().any(|s| s == scheme),
            "no example for {scheme}://"
        );
    }
}

/// Needs `nixpush check-config` (issue 3).
#[test]
fn sample_example_and_module_configs_pass_check_config() {
    for file in shipped_configs() {
        succeed(Command::new(NIXPUSH).arg("check-config").arg(&file));
    }

    // The module's build-time check, run as the builder would run it.
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let eval = eval_module(&package, &default_file_target()).unwrap();
    let raw = tmp.path().join("nixpush.toml");
    fs::write(&raw, eval["configFile"]["text"].as_str().unwrap()).unwrap();
    let out = tmp.path().join("out.toml");
    succeed(
        Command::new("bash")
            .args(["-euo", "pipefail", "-c"])
            .arg(eval["configFile"]["checkScript"].as_str().unwrap())
            .env("raw", &raw)
            .env("out", &out),
    );
    assert_eq!(fs::read(&out).unwrap(), fs::read(&raw).unwrap());

    // ... and it fails the build on a bad file.
    fs::write(&raw, "[target]\nurl = \"file:///c\"\nworkerz = 2\n").unwrap();
    let failed = output(
        Command::new("bash")
            .args(["-euo", "pipefail", "-c"])
            .arg(eval["configFile"]["checkScript"].as_str().unwrap())
            .env("raw", &raw)
            .env("out", tmp.path().join("out2.toml")),
    );
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("workerz"));
}

/// nginx running `examples/nginx-webdav.conf`, stopped (gracefully, so its workers go too) on drop.
struct Nginx {
    child: Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.0 request; returns the status code and body.
fn http(port: u16, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn nginx_webdav_example_takes_uploads_only_with_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let example = repo().join("examples/nginx-webdav.conf");
    let wrapper = |include: &Path| {
        format!(
            "user root;\nerror_log {dir}/error.log;\npid {dir}/nginx.pid;\nevents {{}}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  include {include};\n}}\n",
            dir = tmp.path().display(),
            include = include.display()
        )
    };
    // The example as shipped is valid nginx configuration.
    let conf = tmp.path().join("nginx.conf");
    fs::write(&conf, wrapper(&example)).unwrap();
    let check = |conf: &Path| {
        succeed(
            Command::new("nginx")
                .arg("-t")
                .arg("-p")
                .arg(tmp.path())
                .arg("-c")
                .arg(conf),
        )
    };
    check(&conf);

    // Served on a free port and a scratch root, everything else as shipped.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let root = tmp.path().join("cache");
    fs::create_dir(&root).unwrap();
    let text = fs::read_to_string(&example).unwrap();
    assert!(text.contains("listen 127.0.0.1:8080;") && text.contains("root /var/cache/nix-http;"));
    let served = tmp.path().join("served.conf");
    fs::write(
        &served,
        text.replace(
            "listen 127.0.0.1:8080;",
            &format!("listen 127.0.0.1:{port};"),
        )
        .replace(
            "root /var/cache/nix-http;",
            &format!("root {};", root.display()),
        ),
    )
    .unwrap();
    fs::write(&conf, wrapper(&served)).unwrap();
    check(&conf);
    let _nginx = Nginx {
        child: Command::new("nginx")
            .arg("-p")
            .arg(tmp.path())
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .spawn()
            .expect("nginx runs"),
    };
    wait_for("nginx to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let put = |auth: &str| {
        http(
            port,
            &format!(
                "PUT /nix/nar/x.nar.zst HTTP/1.0\r\nHost: cache.example.org\r\n{auth}Content-Length: 5\r\n\r\nhello"
            ),
        )
        .0
    };
    assert_eq!(put(""), 401, "an anonymous PUT is refused");
    assert_eq!(put("Authorization: Bearer wrong\r\n"), 401);
    assert!(!root.join("nix/nar/x.nar.zst").exists());
    assert_eq!(
        put("Authorization: Bearer CHANGE-ME-TO-THE-TOKEN\r\n"),
        201,
        "the token's PUT creates the file, directories included"
    );
    let get = http(
        port,
        "GET /nix/nar/x.nar.zst HTTP/1.0\r\nHost: cache.example.org\r\n\r\n",
    );
    assert_eq!(get, (200, "hello".to_owned()), "reads are public");
    let head = http(
        port,
        "HEAD /nix/missing.narinfo HTTP/1.0\r\nHost: cache.example.org\r\n\r\n",
    );
    assert_eq!(head.0, 404);
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
        Command::new("python3")
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

/// A socket-activated daemon, started the way systemd starts the unit: `systemd-socket-activate` holds the
/// listening socket and execs the unit's `ExecStart` on the first connection, with `LISTEN_FDS`,
/// `NOTIFY_SOCKET` and `WATCHDOG_USEC` set.
struct ActivatedDaemon {
    child: Child,
}

impl Drop for ActivatedDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads sd_notify datagrams until one contains `wanted`.
fn wait_for_notify(notify: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while !seen.iter().any(|m| m.lines().any(|l| l == wanted)) {
        assert!(Instant::now() < deadline, "no {wanted} among {seen:?}");
        match notify.recv(&mut buf) {
            Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
}

/// Needs `nixpush daemon` and `nixpush status` (issue 3).
fn socket_activation_answers_status(exec_start: &str, environment: &[(String, String)]) {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("nixpush.sock");
    let state = tmp.path().join("state");
    fs::create_dir_all(state.join("spool")).unwrap();
    let key = tmp.path().join("signing-key");
    succeed(
        Command::new("nix-store")
            .args(["--generate-binary-cache-key", "nixpush-test-1"])
            .arg(&key)
            .arg(tmp.path().join("signing-key.pub")),
    );
    let config = tmp.path().join("config.toml");
    fs::write(
        &config,
        format!(
            "socket = \"{}\"\nstate_dir = \"{}\"\nupstream = []\n\n[target]\nurl = \"file://{}\"\nsigning_key_file = \"{}\"\n",
            socket.display(),
            state.display(),
            tmp.path().join("cache").display(),
            key.display()
        ),
    )
    .unwrap();
    let notify_path = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let words: Vec<&str> = exec_start.split_whitespace().collect();
    assert!(
        words.iter().all(|w| !w.contains(['$', '%', '"', '\''])),
        "ExecStart needs systemd's expansion, which this test does not do: {exec_start}"
    );
    let mut command = Command::new("systemd-socket-activate");
    command
        .arg("--listen")
        .arg(&socket)
        .arg("--fdname=nixpush.socket");
    let mut setenv = |key: &str, value: &str| {
        command.arg(format!("--setenv={key}={value}"));
    };
    for (key, value) in environment {
        setenv(key, value);
    }
    setenv("NIXPUSH_CONFIG", config.to_str().unwrap());
    setenv("NOTIFY_SOCKET", notify_path.to_str().unwrap());
    setenv("WATCHDOG_USEC", "1000000");
    let mut daemon = ActivatedDaemon {
        child: command
            .args(&words)
            .stdin(Stdio::null())
            .spawn()
            .expect("systemd-socket-activate (Debian package systemd) runs"),
    };
    wait_for("the activation socket", Duration::from_secs(10), || {
        fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket())
    });

    // The first connection starts the daemon, as with a real socket unit; status still gets its answer.
    let status = succeed(
        Command::new(NIXPUSH)
            .args(["status", "--json"])
            .env("NIXPUSH_CONFIG", &config),
    );
    let status: Value = serde_json::from_str(&status).unwrap_or_else(|e| panic!("{e}: {status}"));
    assert!(status.is_object(), "{status}");

    let mut seen = Vec::new();
    wait_for_notify(&notify, "READY=1", &mut seen);
    wait_for_notify(&notify, "WATCHDOG=1", &mut seen);

    succeed(
        Command::new("kill")
            .arg("-TERM")
            .arg(daemon.child.id().to_string()),
    );
    let mut exit = None;
    wait_for("the daemon to stop", Duration::from_secs(30), || {
        exit = daemon.child.try_wait().unwrap();
        exit.is_some()
    });
    assert!(exit.unwrap().success(), "daemon exit: {exit:?}");
    wait_for_notify(&notify, "STOPPING=1", &mut seen);
    // The socket belongs to the socket unit: the daemon must leave it for the next activation.
    assert!(
        fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()),
        "the daemon removed the socket systemd passed it"
    );
}

#[test]
fn module_exec_start_runs_socket_activated() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let eval = eval_module(&package, &default_file_target()).unwrap();
    let service = &eval["service"];
    let exec_start = service["serviceConfig"]["ExecStart"].as_str().unwrap();
    // The unit's own environment, with PATH pointing at this machine's tools instead of config.nix.package.
    let environment = vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())];
    assert_eq!(strings(&service["path"]), ["/usr"]);
    socket_activation_answers_status(exec_start, &environment);
}

#[test]
fn distribution_exec_start_runs_socket_activated() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let text = installed_service_text(&package);
    let exec_start = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    assert!(
        !text.contains("\nEnvironment="),
        "pass the unit's Environment= on too"
    );
    socket_activation_answers_status(exec_start, &[]);
}
