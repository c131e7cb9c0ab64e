//! The sample config, the per-backend examples and the nginx example.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nixpush::config::Config;

use crate::harness::process::Guard;

use super::{
    default_file_target, eval_module, fake_package, output, repo, succeed, wait_for, NIXPUSH,
};

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
        // The shipped files name secrets under /run, which this machine does not have.
        succeed(
            Command::new(NIXPUSH)
                .args(["check-config", "--skip-files"])
                .arg(&file),
        );
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
    // nginx running `examples/nginx-webdav.conf`; the guard stops it and its workers.
    let mut nginx = Guard::spawn(
        Command::new("nginx")
            .arg("-p")
            .arg(tmp.path())
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"]),
        "nginx",
    );
    wait_for("nginx to listen", Duration::from_secs(10), || {
        assert!(nginx.is_running(), "nginx exited before it listened");
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
