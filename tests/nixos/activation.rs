//! The units' ExecStart run socket-activated, as systemd would start them.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::process::Guard;

use super::{
    default_file_target, eval_module, fake_package, installed_service_text, strings, succeed,
    wait_for, NIXPUSH,
};

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
    // A socket-activated daemon, started the way systemd starts the unit: `systemd-socket-activate` holds the
    // listening socket and execs the unit's `ExecStart` on the first connection, with `LISTEN_FDS`,
    // `NOTIFY_SOCKET` and `WATCHDOG_USEC` set.
    let mut daemon = Guard::spawn(
        command.args(&words).stdin(Stdio::null()),
        "systemd-socket-activate (Debian package systemd)",
    );
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

    daemon.signal(Signal::SIGTERM);
    let exit = daemon.wait(Duration::from_secs(30));
    assert!(exit.success(), "daemon exit: {exit:?}");
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
    let mut environment: Vec<(String, String)> = service["environment"]
        .as_object()
        .map(|vars| {
            vars.iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("a string").to_owned()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        environment,
        [("MALLOC_ARENA_MAX".to_owned(), "2".to_owned())]
    );
    environment.push(("PATH".to_owned(), "/usr/bin:/bin".to_owned()));
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
    // The unit's Environment= lines, passed on as systemd would.
    let environment: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|assignment| {
            let (key, value) = assignment.trim_matches('"').split_once('=')?;
            Some((key.to_owned(), value.to_owned()))
        })
        .collect();
    assert_eq!(
        environment,
        [("MALLOC_ARENA_MAX".to_owned(), "2".to_owned())]
    );
    socket_activation_answers_status(exec_start, &environment);
}
