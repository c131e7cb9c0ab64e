//! Prometheus's own checker, `promtool`, and a scraper for `/metrics` over TCP or a Unix socket.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::process::{output, Guard, COMMAND_DEADLINE};

/// `promtool` from `PATH`, else where `scripts/install-test-deps` unpacks it.
pub fn promtool() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("promtool"))
            .find(|candidate| candidate.is_file())
    });
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")));
    on_path
        .or_else(|| cache.map(|c| c.join("nixpush/promtool/usr/bin/promtool")))
        .filter(|p| p.is_file())
        .expect("promtool not found: run scripts/install-test-deps")
}

/// Runs `promtool check metrics` on `text` (the parser and the naming lint); fails the test with its complaint.
pub fn assert_promtool_accepts_metrics(text: &str) {
    let mut child = Guard::spawn(
        Command::new(promtool())
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "promtool check metrics",
    );
    let mut stdin = child.child_mut().stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output(COMMAND_DEADLINE);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `promtool ARGS` to completion; its output.
pub fn promtool_run(args: &[&str]) -> std::process::Output {
    output(Command::new(promtool()).args(args))
}

/// A raw HTTP/1.1 exchange over `stream`: the whole answer (the server closes after one).
fn exchange(mut stream: impl Read + Write, request: &str) -> String {
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    String::from_utf8(answer).unwrap()
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
}

/// `GET path` over TCP; the whole answer, status line and headers included.
pub fn http_get_tcp(address: &str, path: &str) -> String {
    let stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    exchange(stream, &get(path))
}

/// `GET path` over a Unix socket; the whole answer.
pub fn http_get_unix(socket: &Path, path: &str) -> String {
    let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    exchange(stream, &get(path))
}

/// The body of a `200 OK` answer; fails the test on any other.
pub fn body_of_ok(answer: &str) -> String {
    let (head, body) = answer.split_once("\r\n\r\n").expect("no end of head");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// The samples of an exposition: `name{labels}` as written → value.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}
