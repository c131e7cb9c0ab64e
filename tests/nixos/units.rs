//! Units rendered from the module and the ones in systemd/, checked by systemd's own tools.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use super::{
    default_file_target, enabled, eval_module, fake_package, installed_service_text, output, repo,
    strings, succeed,
};

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
        ("startLimitIntervalSec", "StartLimitIntervalSec"),
    ] {
        match &unit[attr] {
            Value::Null => {}
            Value::String(s) => text.push_str(&format!("{key}={s}\n")),
            Value::Number(n) => text.push_str(&format!("{key}={n}\n")),
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
    // A crash loop is restarted forever: no start limit, set in [Unit] where systemd reads it.
    let text = installed_service_text(&package);
    let unit_section = text.split("[Service]").next().unwrap();
    assert!(
        unit_section.lines().any(|l| l == "StartLimitIntervalSec=0"),
        "{unit_section}"
    );
    // The GC roots directory is writable, and a missing one does not stop the unit. See: #18
    assert!(
        text.lines()
            .any(|l| l == "ReadWritePaths=-/nix/var/nix/gcroots/nixpush"),
        "{text}"
    );

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
        // See: #18
        ("nix/var/nix/gcroots/nixpush", 0o755),
    ] {
        let meta = fs::metadata(root.path().join(dir)).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), uid, "{dir}");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{dir}");
    }
}
