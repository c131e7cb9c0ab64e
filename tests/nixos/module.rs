//! The module evaluated: units, nix.settings, config, refusals, and the NixOS example.

use std::path::Path;

use nixpush::config::Config;
use serde_json::{json, Value};

use super::{
    default_file_target, enabled, eval_module, eval_module_with, fake_package, repo, strings,
};

/// The module enabled with `settings` and the other options `rest`, evaluated against a fake package.
fn eval_enabled(settings: Value, rest: Value) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    eval_module(&fake_package(tmp.path()), &enabled(settings, rest)).unwrap()
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
    assert_eq!(
        strings(&service["ReadWritePaths"]),
        ["/var/cache/nixpush", "-/nix/var/nix/gcroots/nixpush"]
    );
    assert_eq!(strings(&eval["service"]["requires"]), ["nixpush.socket"]);
    assert_eq!(strings(&eval["service"]["wantedBy"]), ["multi-user.target"]);
    // A crash loop is restarted forever, not given up on after systemd's default start limit.
    assert_eq!(eval["service"]["startLimitIntervalSec"], 0);
    assert_eq!(service["Restart"], "on-failure");
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
    // See: #18
    assert!(tmpfiles.contains(&"d /nix/var/nix/gcroots/nixpush 0755 nixpush nixpush - -"));
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
    assert_eq!(
        config.gc_roots_dir(),
        Some(Path::new("/nix/var/nix/gcroots/nixpush"))
    );

    // GC roots off: no setting, no tmpfiles rule, no write access to /nix. See: #18
    let mut off = services.clone();
    off["gcRootsDir"] = json!("");
    let eval_off = eval_module(&package, &off).unwrap();
    let text_off = eval_off["configFile"]["text"].as_str().unwrap();
    assert_eq!(
        Config::parse(text_off, Path::new("module.toml"))
            .unwrap()
            .gc_roots_dir(),
        None
    );
    assert!(
        !strings(&eval_off["service"]["serviceConfig"]["ReadWritePaths"])
            .iter()
            .any(|p| p.contains("gcroots"))
    );
    assert!(!strings(&eval_off["tmpfiles"])
        .iter()
        .any(|p| p.contains("gcroots")));

    // The build-time check runs nixpush check-config on the generated file.
    let script = eval["configFile"]["checkScript"].as_str().unwrap();
    assert!(
        script.contains(&format!(
            "{}/bin/nixpush check-config --skip-files \"$raw\"",
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
    let key = "mycache.cachix.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
    let eval = eval_enabled(
        json!({ "target": { "url": "cachix://mycache" } }),
        json!({
            "authTokenFile": "/run/secrets/cachix-token",
            "signingKeyFile": "/run/secrets/cachix-key",
            "environmentFile": "/run/secrets/nixpush.env",
            "addToSubstituters": true,
            "publicKey": key,
        }),
    );
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
    assert_eq!(
        strings(&service["ReadWritePaths"]),
        ["-/nix/var/nix/gcroots/nixpush"]
    );
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
        eval_enabled(
            json!({ "target": { "url": "https://cache.example.org/nix" } }),
            rest,
        )
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
    let eval = eval_enabled(
        json!({
            "socket": "/run/nixpush-alt/hook.sock",
            "state_dir": "/srv/nixpush",
            "socket_mode": "0660",
            "socket_group": "nixbld",
            "target": { "url": "file:///srv/cache" },
        }),
        json!({}),
    );
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
        [
            "/srv/cache",
            "/srv/nixpush",
            "-/nix/var/nix/gcroots/nixpush"
        ]
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
            "services.nixpush.settings.target.url is not set",
        ),
        (
            enabled(
                json!({ "targets": { "offsite": { "compression": "xz" } } }),
                json!({}),
            ),
            "services.nixpush.settings.targets.offsite.url is not set",
        ),
        (
            enabled(
                file.clone(),
                json!({ "targetSecrets": { "offsite": { "signingKeyFile": "/run/secrets/k" } } }),
            ),
            "services.nixpush.targetSecrets.offsite names no target in settings.targets",
        ),
        (
            enabled(
                json!({ "targets": { "offsite": { "url": "https://u:p@cache.example.org" } } }),
                json!({}),
            ),
            "services.nixpush.settings.targets.offsite.url holds a credential",
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

// See: #18
#[test]
fn module_renders_named_targets_with_their_own_secrets_and_cache_directories() {
    let eval = eval_enabled(
        json!({
            "target": { "url": "file:///var/cache/nix" },
            "targets": {
                "offsite": { "url": "https://cache.example.org", "max_upload_rate": "2MiB/s" },
                "local2": { "url": "file:///srv/cache2" },
            },
        }),
        json!({
            "signingKeyFile": "/run/secrets/key",
            "targetSecrets": {
                "offsite": {
                    "signingKeyFile": "/run/secrets/offsite-key",
                    "authTokenFile": "/run/secrets/offsite-token",
                },
            },
        }),
    );
    let service = &eval["service"]["serviceConfig"];
    assert_eq!(
        strings(&service["LoadCredential"]),
        [
            "signing-key:/run/secrets/key",
            "signing-key-offsite:/run/secrets/offsite-key",
            "auth-token-offsite:/run/secrets/offsite-token",
        ]
    );
    assert_eq!(
        strings(&service["ReadWritePaths"]),
        [
            "/var/cache/nix",
            "/srv/cache2",
            "-/nix/var/nix/gcroots/nixpush"
        ]
    );
    let text = eval["configFile"]["text"].as_str().unwrap();
    assert!(!text.contains("/run/secrets"), "{text}");
    let config = Config::parse(text, Path::new("module.toml")).unwrap();
    assert_eq!(config.target_names(), ["default", "local2", "offsite"]);
    let offsite = &config.targets["offsite"];
    assert_eq!(
        offsite.signing_key_file.as_deref(),
        Some(Path::new(
            "/run/credentials/nixpush.service/signing-key-offsite"
        ))
    );
    assert_eq!(
        offsite.auth_token_file.as_deref(),
        Some(Path::new(
            "/run/credentials/nixpush.service/auth-token-offsite"
        ))
    );
    assert_eq!(config.targets["local2"].signing_key_file, None);

    // Named targets alone: no [target] table in the file.
    let eval = eval_enabled(
        json!({ "targets": { "one": { "url": "file:///srv/one" } } }),
        json!({}),
    );
    let text = eval["configFile"]["text"].as_str().unwrap();
    assert!(!text.contains("[target]"), "{text}");
    let config = Config::parse(text, Path::new("module.toml")).unwrap();
    assert_eq!(config.target_names(), ["one"]);
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

// See: #18
#[test]
fn module_metrics_are_off_by_default_and_open_no_port() {
    let tmp = tempfile::tempdir().unwrap();
    let package = fake_package(tmp.path());
    let mut services = default_file_target();
    let config_of = |eval: &Value| {
        let text = eval["configFile"]["text"].as_str().unwrap().to_owned();
        Config::parse(&text, Path::new("module.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
    };
    let off = eval_module(&package, &services).unwrap();
    assert_eq!(config_of(&off).metrics_listen, None);

    services["metrics"] = json!({ "enable": true });
    let on = eval_module(&package, &services).unwrap();
    assert_eq!(
        config_of(&on).metrics_listen.as_deref(),
        Some("127.0.0.1:9464")
    );
    let top: Vec<&str> = on["topLevel"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        top.contains(&"systemd") && !top.contains(&"networking"),
        "{top:?}"
    );

    services["metrics"]["listen"] = json!("/run/nixpush/metrics.sock");
    let socket = eval_module(&package, &services).unwrap();
    assert_eq!(
        config_of(&socket).metrics_listen.as_deref(),
        Some("/run/nixpush/metrics.sock")
    );

    services["settings"]["metrics_listen"] = json!("127.0.0.1:1");
    let err = eval_module(&package, &services).unwrap_err();
    assert!(err.contains("settings.metrics_listen, not both"), "{err}");
}
