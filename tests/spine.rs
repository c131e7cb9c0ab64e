//! The spine (issue #3): real Nix builds through `nixpush-hook` into the daemon's durable queue, whatever state
//! the daemon is in.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

use nixpush::protocol::{self, ErrorKind, Response};

use crate::harness::process::{Guard, Run};
use crate::util::{self, TestDaemon, TestEnv, HOOK};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The hook acknowledged: exit 0, nothing printed, nothing spooled.
fn assert_acked(env: &TestEnv, output: &std::process::Output) {
    assert!(output.status.success());
    assert_eq!(stderr(output), "", "the hook should be silent on success");
    assert!(env.spool_files().is_empty(), "nothing should be spooled");
}

// See: #3
#[test]
fn spine_nix_build_outputs_are_queued_through_the_hook() {
    let daemon = TestDaemon::start();
    let build = util::nix_build_with_hook(&daemon.env);
    assert!(build.output.status.success(), "{}", build.stderr());
    assert!(
        !build.stderr().contains("nixpush-hook:"),
        "the hook complained: {}",
        build.stderr()
    );
    assert_eq!(build.outputs.len(), 3);
    // Nix 2.8 leaves OUT_PATHS empty: these were resolved from DRV_PATH by the daemon.
    let queued = daemon.queued_paths();
    for output in &build.outputs {
        assert!(queued.contains(output), "{output} not in {queued:?}");
    }
    let status = daemon.status();
    assert_eq!(status["queued"], 3);
    assert_eq!(status["refused"], 0);
    assert_eq!(status["spooled"], 0);
    assert_eq!(status["daemon"]["hold"], true);
    assert_eq!(status["target"]["state"], "hold");
    assert!(daemon.env.spool_files().is_empty());
}

// See: #3
#[test]
fn spine_daemon_down_build_succeeds_and_spool_is_imported() {
    let env = TestEnv::new();
    let build = util::nix_build_with_hook(&env);
    assert!(build.output.status.success(), "{}", build.stderr());
    // One spool file per derivation, and one line of explanation per build (#19) in the build log.
    assert_eq!(env.spool_files().len(), 2, "{}", build.stderr());
    let build_log = build.stderr();
    let lines: Vec<&str> = build_log
        .lines()
        .filter(|l| l.contains("nixpush-hook:"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", build.stderr());
    assert!(lines[0].contains("daemon unreachable"), "{}", lines[0]);

    let unreachable = env.nixpush(&["status"]);
    assert_eq!(unreachable.status.code(), Some(3));
    assert!(
        stderr(&unreachable).contains("2 request(s) wait in the spool"),
        "{}",
        stderr(&unreachable)
    );

    let daemon = TestDaemon::start_in(env);
    daemon.wait_queued(&build.outputs);
    util::wait_until("spool emptied", || daemon.env.spool_files().is_empty());
    assert_eq!(daemon.status()["queued"], 3);
}

// See: #3
#[test]
fn spine_acknowledged_path_survives_sigkill() {
    let mut daemon = TestDaemon::start();
    let paths = util::add_store_paths(1);
    let output = daemon.env.run_hook(&[&paths[0]], None);
    assert_acked(&daemon.env, &output);
    daemon.kill();
    daemon.restart();
    assert_eq!(daemon.queued_paths(), paths);
    assert_eq!(daemon.status()["queued"], 1);
}

// See: #3
#[test]
fn spine_64_concurrent_hooks_lose_nothing() {
    let daemon = TestDaemon::start();
    let paths = util::add_store_paths(64);
    let children: Vec<_> = paths
        .iter()
        .map(|p| {
            let mut command = daemon.env.hook_command(&[p], None);
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
            Guard::spawn(&mut command, "nixpush-hook")
        })
        .collect();
    for child in children {
        let output = child.wait_with_output(util::DEADLINE);
        // On a loaded machine a hook may miss its deadline and spool; that is allowed, losing a path is not.
        assert!(output.status.success(), "{}", stderr(&output));
    }
    util::wait_until("all 64 queued and the spool empty", || {
        daemon.queued_paths().len() >= 64 && daemon.env.spool_files().is_empty()
    });
    let queued = daemon.queued_paths();
    assert_eq!(queued.len(), 64, "duplicates in the queue");
    assert_eq!(
        queued.iter().collect::<BTreeSet<_>>(),
        paths.iter().collect::<BTreeSet<_>>()
    );
    assert_eq!(daemon.status()["queued"], 64);
}

fn raw_exchange(socket: &std::path::Path, bytes: &[u8]) -> Response {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(util::DEADLINE)).unwrap();
    stream.write_all(bytes).unwrap();
    let payload = protocol::read_frame(&mut stream).unwrap();
    let response = protocol::decode_response(&payload).unwrap();
    // The daemon closes the connection after an error.
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest).unwrap(), 0);
    response
}

fn assert_error(response: Response, expected: ErrorKind, needle: &str) {
    match response {
        Response::Error { kind, message } => {
            assert_eq!(kind, expected, "{message}");
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

// See: #3
#[test]
fn spine_bad_clients_get_errors_and_the_daemon_keeps_serving() {
    let daemon = TestDaemon::start_in(TestEnv::with_config("client_timeout_ms = 300"));
    let socket = &daemon.env.socket;
    // What each client sends, in turn, and the error the daemon answers it with.
    let bad: [(&[u8], ErrorKind, &str); 4] = [
        (
            b"\0\0\0\x0bhello world",
            ErrorKind::Malformed,
            "malformed message",
        ),
        (
            b"\x00\x20\x00\x00",
            ErrorKind::TooLarge,
            "2097152 bytes exceeds the limit of 1048576",
        ),
        (b"", ErrorKind::Timeout, "no request within 300 ms"),
        (b"\0\0\x01\0{\"v\":1", ErrorKind::Timeout, "not complete"),
    ];
    for (request, kind, needle) in bad {
        assert_error(raw_exchange(socket, request), kind, needle);
    }
    let paths = util::add_store_paths(1);
    let output = daemon.env.run_hook(&[&paths[0]], None);
    assert_acked(&daemon.env, &output);
    assert_eq!(daemon.queued_paths(), paths);
}

// See: #3
#[test]
fn spine_unprivileged_hook_is_refused() {
    let daemon = TestDaemon::start();
    let paths = util::add_store_paths(1);
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", HOOK])
        .envs(daemon.env.hook_env())
        .env("OUT_PATHS", &paths[0])
        .env("DRV_PATH", "")
        .run();
    assert!(output.status.success(), "the hook must exit 0");
    let message = stderr(&output);
    assert!(
        message.contains("permission denied: uid 65534"),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(daemon.queued_paths().is_empty());
    let status = daemon.status();
    assert_eq!(status["queued"], 0);
    assert_eq!(status["refused"], 1);
    assert_eq!(status["refused_requests"][0]["peer_uid"], 65534);
    assert!(daemon.log().contains("refused"));
}

// See: #3
#[test]
fn spine_invalid_paths_are_refused_with_a_reason() {
    let daemon = TestDaemon::start();
    let missing = util::missing_store_path();
    let cases = [
        ("/tmp/x", "not inside the store directory /nix/store"),
        (
            "/nix/store/../etc/passwd",
            "contains a `.` or `..` component",
        ),
        (missing.as_str(), "does not exist"),
        ("/nix/store/not-a-store-path", "not a valid store path"),
    ];
    for (input, reason) in cases {
        let output = daemon.env.run_hook(&[input], None);
        assert!(output.status.success());
        let message = stderr(&output);
        assert!(
            message.contains(&format!("refused {input}: {reason}")),
            "{message}"
        );
        // A refusal is final: nothing goes to the spool to be refused again.
        assert!(daemon.env.spool_files().is_empty());
    }
    let status = daemon.status();
    assert_eq!(status["queued"], 0);
    assert_eq!(status["refused"], 4);
    let refused = util::refused_requests(&status);
    for (input, reason) in cases {
        assert!(
            refused
                .iter()
                .any(|(i, r)| i == input && r.contains(reason)),
            "{input}: {reason} not in {refused:?}"
        );
    }
    let human = daemon.env.nixpush(&["status"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("not inside the store directory"));
}

// See: #3
#[test]
fn spine_second_daemon_refuses_to_start() {
    let daemon = TestDaemon::start();
    let output = daemon.env.nixpush(&["daemon", "--hold"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("another daemon is running"),
        "{}",
        stderr(&output)
    );
    // The first one is unharmed.
    assert_eq!(daemon.status()["queued"], 0);
}

// See: #3
#[test]
fn spine_sigterm_drains_and_removes_the_socket() {
    let mut daemon = TestDaemon::start();
    let status = daemon.stop();
    assert!(status.success(), "{status}\n{}", daemon.log());
    assert!(!daemon.env.socket.exists());
}

// See: #3
#[test]
fn spine_sighup_reloads_and_keeps_the_old_config_when_the_new_one_is_bad() {
    let daemon = TestDaemon::start();
    let paths = util::add_store_paths(1);
    let as_nobody = || {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", HOOK])
            .envs(daemon.env.hook_env())
            .env("OUT_PATHS", &paths[0])
            .run()
    };
    std::fs::write(&daemon.env.config_path, "socket = [nonsense\n").unwrap();
    daemon.signal("HUP");
    util::wait_until("the bad file refused", || {
        daemon.log().contains("refusing the new configuration")
    });
    assert!(stderr(&as_nobody()).contains("permission denied"));

    daemon.env.write_config("allowed_users = [\"nobody\"]");
    daemon.signal("HUP");
    util::wait_until("the new file loaded", || {
        daemon.log().contains("configuration reloaded")
    });
    let output = as_nobody();
    assert_eq!(stderr(&output), "");
    assert_eq!(daemon.queued_paths(), paths);
}

// See: #3
#[test]
fn spine_hook_spools_when_the_daemon_never_answers() {
    let env = TestEnv::new();
    std::fs::create_dir_all(env.socket.parent().unwrap()).unwrap();
    let _silent = std::os::unix::net::UnixListener::bind(&env.socket).unwrap();
    let paths = util::add_store_paths(1);
    let output = env.run_hook(&[&paths[0]], None);
    assert!(output.status.success());
    assert!(
        stderr(&output).contains("no complete answer within"),
        "{}",
        stderr(&output)
    );
    assert_eq!(env.spool_files().len(), 1);
}

// See: #3
#[test]
fn spine_check_config_names_the_typo_and_line() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let output = Command::new(util::NIXPUSH)
        .arg("check-config")
        .arg(fixture.join("config-typo.toml"))
        .run();
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("compresion"), "{message}");
    assert!(message.contains("line 5"), "{message}");

    let output = Command::new(util::NIXPUSH)
        .arg("check-config")
        .arg(fixture.join("config-good.toml"))
        .run();
    assert!(output.status.success(), "{}", stderr(&output));
    let effective = String::from_utf8(output.stdout).unwrap();
    for needle in [
        "socket = \"/run/nixpush/nixpush.sock\"",
        "client_timeout_ms = 2000",
        "[target]",
        "url = \"https://user:***@cache.example.org/\"",
        "compression_level = 3",
    ] {
        assert!(effective.contains(needle), "{needle} not in:\n{effective}");
    }
    assert!(!effective.contains("hunter2"));
}

// The spool directory stays usable for hooks of any user, but only its owner can list it.
// See: #3
#[test]
fn spine_spool_dir_is_drop_only() {
    let daemon = TestDaemon::start();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&daemon.env.spool_dir)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o1733);
    // A file dropped by an unprivileged user is judged by its owner: refused, recorded, removed.
    let paths = util::add_store_paths(1);
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", HOOK])
        .env(
            "NIXPUSH_SOCKET",
            daemon.env.dir.path().join("no-daemon-here.sock"),
        )
        .env("NIXPUSH_SPOOL", &daemon.env.spool_dir)
        .env("OUT_PATHS", &paths[0])
        .run();
    assert!(output.status.success());
    assert!(
        stderr(&output).contains("saved the request"),
        "{}",
        stderr(&output)
    );
    util::wait_until("the spool file judged", || {
        daemon.env.spool_files().is_empty() && daemon.status()["refused"] == 1
    });
    let status = daemon.status();
    assert_eq!(status["queued"], 0);
    assert_eq!(status["refused_requests"][0]["source"], "spool");
    assert_eq!(status["refused_requests"][0]["peer_uid"], 65534);
    // Garbage dropped in the spool is moved aside, once, with its reason.
    std::fs::write(daemon.env.spool_dir.join("garbage.json"), b"{nope").unwrap();
    util::wait_until("garbage moved aside", || {
        daemon
            .env
            .spool_dir
            .join("bad/garbage.json.reason")
            .exists()
    });
    assert!(daemon.env.spool_files().is_empty());
}
