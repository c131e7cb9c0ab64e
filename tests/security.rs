//! Security (issue #9): hostile input on the socket and in the formats nixpush parses, clients that hold
//! connections, socket and state directory permissions, secrets kept out of every output, and a hostile target.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nixpush::protocol::{self, ErrorKind, Request, Response};
use proptest::prelude::*;
use serde_json::Value;

use crate::harness::process::Run;
use crate::harness::user::{test_user, TEST_USER};
use crate::util::{self, TestDaemon, TestEnv, HOOK, NIXPUSH};

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn enqueue(out_paths: &[&str], drv_path: Option<&str>) -> Request {
    Request::Enqueue {
        drv_path: drv_path.map(str::to_owned),
        out_paths: out_paths.iter().map(|p| p.to_string()).collect(),
        source: "test".into(),
    }
}

/// One request over the socket, as root, with a generous bound.
fn call(socket: &Path, request: &Request) -> Response {
    protocol::call(socket, request, util::DEADLINE).unwrap()
}

fn assert_acked(response: &Response, path: &str) {
    match response {
        Response::Ack { accepted, .. } => assert_eq!(accepted, &[path.to_owned()], "{response:?}"),
        other => panic!("expected an ack for {path}, got {other:?}"),
    }
}

/// A file planted in the store directory behind Nix's back; removed on drop.
struct Planted(PathBuf);

impl Planted {
    fn symlink(name: &str, target: &str) -> Planted {
        let path = PathBuf::from(format!("/nix/store/{}-{name}", fresh_hash()));
        std::os::unix::fs::symlink(target, &path).unwrap();
        Planted(path)
    }

    fn file(name: &str, contents: &str) -> Planted {
        let path = PathBuf::from(format!("/nix/store/{}-{name}", fresh_hash()));
        std::fs::write(&path, contents).unwrap();
        Planted(path)
    }

    fn as_str(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// 32 characters of Nix base32 no store path uses.
fn fresh_hash() -> String {
    util::missing_store_path()["/nix/store/".len().."/nix/store/".len() + 32].to_owned()
}

// Every kind of path a hostile or broken client can send is refused with its reason, nothing of it is queued,
// and the daemon keeps serving.
// See: #9
#[test]
fn security_malicious_paths_are_refused_with_a_reason() {
    let daemon = TestDaemon::start();
    let socket = &daemon.env.socket;
    let hash = fresh_hash();
    let outside = Planted::symlink("nixpush-test-escape", "/etc");
    let shadow = Planted::symlink("nixpush-test-shadow", "/etc/shadow");
    let planted_drv = Planted::file(
        "nixpush-test-planted.drv",
        "Derive([],[],[],\"\",\"\",[],[])",
    );
    let long_name = format!("/nix/store/{hash}-{}", "a".repeat(300));
    let cases: Vec<(String, &str)> = vec![
        (
            "/nix/store/../etc/passwd".into(),
            "contains a `.` or `..` component",
        ),
        (
            format!("/nix/store/{hash}-x/../../etc/shadow"),
            "contains a `.` or `..` component",
        ),
        (
            "/nix/store/./etc".into(),
            "contains a `.` or `..` component",
        ),
        (
            outside.as_str().into(),
            "not a valid path in Nix's database",
        ),
        (shadow.as_str().into(), "not a valid path in Nix's database"),
        (
            format!("/nix/store/{hash}-evil\nqueued /nix/store/forged"),
            "not a valid store path",
        ),
        (
            format!("/nix/store/{hash}-\u{1b}[31mred"),
            "not a valid store path",
        ),
        (
            format!("/nix/store/{hash}-nul\0x"),
            "not a valid store path",
        ),
        (
            format!("/nix/store/{hash}-sub/bin/sh"),
            "not a valid store path",
        ),
        (long_name, "not a valid store path"),
        ("/etc/passwd".into(), "not inside the store directory"),
        ("relative/nix/store/x".into(), "not an absolute path"),
        ("".into(), "empty path"),
        (
            format!("/gnu/store/{hash}-guix-thing"),
            "not inside the store directory /nix/store",
        ),
        (
            format!("/nix/store2/{hash}-other"),
            "not inside the store directory /nix/store",
        ),
        (
            format!("//nix/store/{hash}-double-slash"),
            "not inside the store directory /nix/store",
        ),
    ];
    for (input, reason) in &cases {
        let response = call(socket, &enqueue(&[input], None));
        match response {
            Response::Error { kind, message } => {
                assert_eq!(kind, ErrorKind::Refused, "{input:?}: {message}");
                assert!(message.contains(reason), "{input:?}: {message}");
                assert!(!message.chars().any(char::is_control), "{message:?}");
            }
            other => panic!("{input:?} was not refused: {other:?}"),
        }
    }
    // DRV_PATH is checked the same way, and a .drv planted in the store is not Nix's.
    for (drv, reason) in [
        ("/etc/passwd", "not inside the store directory"),
        (planted_drv.as_str(), "not a valid path in Nix's database"),
        (
            "/nix/store/../../etc/x.drv",
            "contains a `.` or `..` component",
        ),
    ] {
        let response = call(socket, &enqueue(&[], Some(drv)));
        let Response::Error { kind, message } = response else {
            panic!("{drv} was not refused: {response:?}")
        };
        assert_eq!(kind, ErrorKind::Refused);
        assert!(message.contains(reason), "{drv}: {message}");
    }

    let status = daemon.status();
    assert_eq!(status["queued"], 0, "{status}");
    assert!(daemon.queued_paths().is_empty());
    let refused = util::refused_requests(&status);
    for (input, reason) in &cases {
        // Control characters are shown replaced, so the record is found by its reason and clean prefix.
        let shown: String = input
            .chars()
            .take_while(|c| !c.is_control())
            .take(100)
            .collect();
        assert!(
            refused
                .iter()
                .any(|(i, r)| i.starts_with(&shown) && r.contains(reason)),
            "{input:?}: {reason} not in {refused:?}"
        );
    }
    assert!(
        refused
            .iter()
            .all(|(i, _)| !i.chars().any(char::is_control)),
        "{refused:?}"
    );
    let human = daemon.env.nixpush(&["status"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(!human.contains('\u{1b}') && !human.contains("\nqueued /nix/store/forged"));
    assert!(!daemon.log().contains("\nqueued /nix/store/forged"));

    // Still serving, and a real path goes through.
    let paths = util::add_store_paths(1);
    assert_acked(&call(socket, &enqueue(&[&paths[0]], None)), &paths[0]);
    assert_eq!(daemon.queued_paths(), paths);
}

// A symlink Nix registered may point anywhere: what is uploaded is the link, never what it points to.
// See: #9
#[test]
fn security_a_registered_symlink_out_of_the_store_uploads_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("nixpush-test-link");
    std::os::unix::fs::symlink("/etc/shadow", &link).unwrap();
    let path = util::nix(&["nix-store", "--add", link.to_str().unwrap()])
        .trim()
        .to_owned();
    let env = TestEnv::new();
    env.write_config_with(
        "",
        &format!(
            "url = \"file://{}\"\ncompression = \"none\"",
            env.cache_dir().display()
        ),
    );
    let daemon = TestDaemon::start_uploading(env);
    assert_acked(&call(&daemon.env.socket, &enqueue(&[&path], None)), &path);
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");
    let nars: Vec<PathBuf> = std::fs::read_dir(daemon.env.cache_dir().join("nar"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(nars.len(), 1, "{nars:?}");
    let uploaded = std::fs::read(&nars[0]).unwrap();
    let dumped = Command::new("nix-store")
        .args(["--dump", &path])
        .run()
        .stdout;
    assert_eq!(uploaded, dumped);
    assert!(uploaded.windows(7).any(|w| w == b"symlink"));
    let shadow = std::fs::read("/etc/shadow").unwrap_or_default();
    assert!(
        shadow.len() < 16 || !uploaded.windows(shadow.len()).any(|w| w == shadow),
        "the target's contents were uploaded"
    );
}

/// Connections that hold a slot without ever completing a request; `dribble` keeps sending a byte to half of
/// them until dropped.
struct Loris {
    streams: Arc<Vec<UnixStream>>,
    stop: Arc<AtomicBool>,
    dribbler: Option<std::thread::JoinHandle<()>>,
}

impl Loris {
    fn open(socket: &Path, count: usize) -> Loris {
        let mut streams = Vec::with_capacity(count);
        for i in 0..count {
            let mut stream = UnixStream::connect(socket).unwrap();
            if i % 2 == 1 {
                // A header announcing about 1 MB, and the first byte of it: never complete while the test runs.
                stream.write_all(&[0, 0x0f, 0, 0, b'{']).unwrap();
            }
            streams.push(stream);
        }
        Loris {
            streams: Arc::new(streams),
            stop: Arc::new(AtomicBool::new(false)),
            dribbler: None,
        }
    }

    fn dribble(&mut self) {
        let (streams, stop) = (self.streams.clone(), self.stop.clone());
        self.dribbler = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for stream in streams.iter().skip(1).step_by(2) {
                    // An evicted connection fails here; that is the point.
                    let _ = (&*stream).write(b" ");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }

    /// Waits until at least `at_least` connections were told by the daemon that they were evicted, and returns
    /// how many were.
    fn evicted(&self, at_least: usize) -> usize {
        let mut judged = vec![false; self.streams.len()];
        let mut evicted = 0;
        util::wait_until(&format!("{at_least} connections evicted"), || {
            for (stream, judged) in self.streams.iter().zip(judged.iter_mut()) {
                if *judged {
                    continue;
                }
                stream.set_nonblocking(true).unwrap();
                let mut stream = stream;
                // The daemon's answer is one small write, so it is here whole or not at all.
                match protocol::read_frame(&mut stream) {
                    Ok(payload) => {
                        *judged = true;
                        if matches!(
                            protocol::decode_response(&payload),
                            Ok(Response::Error { kind: ErrorKind::Timeout, message })
                                if message.contains("connection slots are taken")
                        ) {
                            evicted += 1;
                        }
                    }
                    Err(protocol::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => *judged = true,
                }
            }
            evicted >= at_least
        });
        evicted
    }
}

impl Drop for Loris {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(dribbler) = self.dribbler.take() {
            let _ = dribbler.join();
        }
    }
}

fn raise_open_files(wanted: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < wanted {
        assert!(
            hard >= wanted,
            "RLIMIT_NOFILE hard limit {hard} is below the {wanted} this test needs"
        );
        setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).unwrap();
    }
}

// 600 clients that connect and send nothing or dribble: the connection table is full, yet a hook is acked
// (its wait is bounded, it is not timed) because the longest-waiting idle connection makes room.
// See: #9
#[test]
fn security_slow_loris_clients_do_not_lock_out_a_hook() {
    // Idle clients would hold their slots for two minutes: only eviction lets the hook in.
    let daemon = TestDaemon::start_in(TestEnv::with_config("client_timeout_ms = 120000"));
    let paths = util::add_store_paths(2);
    let mut loris = Loris::open(&daemon.env.socket, 600);
    loris.dribble();
    assert_acked(
        &call(&daemon.env.socket, &enqueue(&[&paths[0]], None)),
        &paths[0],
    );
    // The real hook, too: acked or, on a very slow machine, spooled; never lost.
    let output = daemon.env.run_hook(&[&paths[1]], None);
    assert!(output.status.success(), "{}", stderr(&output));
    daemon.wait_queued(&paths);
    let status = daemon.status();
    assert_eq!(status["queued"], 2, "{status}");
    assert_eq!(status["refused"], 0, "{status}");
    // At least the oldest ones beyond the table's size were told why they were dropped.
    loris.evicted(600 - nixpush::daemon::server::MAX_CONNECTIONS);
}

// 10,000 connections at once: nothing panics, nothing is queued, and the daemon keeps serving.
// See: #9
#[test]
fn security_ten_thousand_connections_at_once() {
    const CONNECTIONS: usize = 10_000;
    raise_open_files(CONNECTIONS as u64 + 1024);
    let daemon = TestDaemon::start_in(TestEnv::with_config("client_timeout_ms = 120000"));
    let loris = Loris::open(&daemon.env.socket, CONNECTIONS);
    let paths = util::add_store_paths(1);
    // Accepted after all 10,000 (the listen backlog is first come, first served).
    assert_acked(
        &call(&daemon.env.socket, &enqueue(&[&paths[0]], None)),
        &paths[0],
    );
    loris.evicted(CONNECTIONS - nixpush::daemon::server::MAX_CONNECTIONS);
    drop(loris);
    let status = daemon.status();
    assert_eq!(status["queued"], 1, "{status}");
    assert_eq!(status["refused"], 0, "{status}");
    assert_eq!(daemon.queued_paths(), paths);
    let log = daemon.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// `program ARGS…` as the test user.
fn as_test_user(program: &str) -> Command {
    let (uid, gid) = test_user();
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(program);
    command
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

// The socket and the state directory have the modes the README and docs/nixos-and-systemd.md give; a real
// unprivileged user can read the status but not enqueue, list the spool or read the queue, until
// `allowed_users` names it.
// See: #9
#[test]
fn security_socket_and_state_permissions_and_an_unprivileged_user() {
    let (uid, _) = test_user();
    let daemon = TestDaemon::start();
    let env = &daemon.env;
    let socket_meta = std::fs::metadata(&env.socket).unwrap();
    assert!(socket_meta.file_type().is_socket());
    // `socket_mode` defaults to 0666: anyone may connect; peer credentials decide who may enqueue.
    assert_eq!(mode(&env.socket), 0o666);
    // tmpfiles: /var/lib/nixpush 0711 (traversable, not listable), spool/ 1733 (drop-only); the queue private.
    assert_eq!(mode(&env.state_dir), 0o711);
    assert_eq!(mode(&env.spool_dir), 0o1733);
    assert_eq!(mode(&env.state_dir.join("queue")), 0o700);

    let status = as_test_user(NIXPUSH)
        .arg("--config")
        .arg(&env.config_path)
        .args(["status", "--json"])
        .run();
    assert!(status.status.success(), "{}", stderr(&status));
    let report: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(report["queued"], 0);

    for dir in [&env.state_dir, &env.spool_dir, &env.state_dir.join("queue")] {
        let listing = as_test_user("ls").arg(dir).run();
        assert!(!listing.status.success(), "{} is listable", dir.display());
    }

    let paths = util::add_store_paths(2);
    let hook = |path: &str| {
        as_test_user(HOOK)
            .envs(env.hook_env())
            .env("OUT_PATHS", path)
            .env("DRV_PATH", "")
            .run()
    };
    let output = hook(&paths[0]);
    assert!(output.status.success(), "the hook must exit 0");
    assert!(
        stderr(&output).contains(&format!("permission denied: uid {uid} ({TEST_USER})")),
        "{}",
        stderr(&output)
    );
    let push = as_test_user(NIXPUSH)
        .arg("--config")
        .arg(&env.config_path)
        .args(["push", "--via-daemon", &paths[0]])
        .run();
    assert!(!push.status.success());
    assert!(
        stderr(&push).contains("permission denied"),
        "{}",
        stderr(&push)
    );
    assert!(daemon.queued_paths().is_empty());
    let report = daemon.status();
    assert_eq!(report["queued"], 0);
    assert!(report["refused_requests"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["peer_uid"] == uid));
    assert!(report["refused"].as_u64().unwrap() >= 2, "{report}");

    env.write_config(&format!("allowed_users = [\"{TEST_USER}\"]"));
    daemon.signal("HUP");
    util::wait_until("the new configuration", || {
        daemon.log().contains("configuration reloaded")
    });
    let output = hook(&paths[1]);
    assert_eq!(stderr(&output), "");
    assert!(output.status.success());
    assert_eq!(daemon.queued_paths(), vec![paths[1].clone()]);
}

/// A NAR from its framing tokens, as `nix-store --dump` writes them.
fn nar(tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for token in tokens {
        out.extend_from_slice(&(token.len() as u64).to_le_bytes());
        out.extend_from_slice(token);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

fn nar_with_entry(name: &[u8]) -> Vec<u8> {
    nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        name,
        b"node",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"pwned",
        b")",
        b")",
        b")",
    ])
}

/// Every file below `dir`, for checking that a restore wrote nowhere else.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                pending.push(path.clone());
            }
            found.insert(path);
        }
    }
    found
}

// A NAR cannot name an entry that escapes the directory it is restored into, nor nest deep enough to hurt.
// See: #9
#[test]
fn security_nar_entries_cannot_escape_or_nest_without_bound() {
    use nixpush::nar::reader;
    let root = tempfile::tempdir().unwrap();
    for name in [&b".."[..], b".", b"", b"a/b", b"../../escaped", b"x\0y"] {
        let bytes = nar_with_entry(name);
        let err = reader::validate(&mut &bytes[..]).unwrap_err();
        assert!(!err.to_string().is_empty());
        let dest = root.path().join("out");
        assert!(reader::restore(&mut &bytes[..], &dest).is_err());
        let _ = std::fs::remove_dir_all(&dest);
    }
    assert!(tree(root.path()).is_empty(), "{:?}", tree(root.path()));

    // Far deeper than MAX_DEPTH: refused with an error, not a stack overflow.
    let depth = reader::MAX_DEPTH * 4;
    let mut tokens: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"directory"];
    for _ in 0..depth {
        tokens.extend([
            &b"entry"[..],
            b"(",
            b"name",
            b"d",
            b"node",
            b"(",
            b"type",
            b"directory",
        ]);
    }
    let bytes = nar(&tokens);
    let err = reader::validate(&mut &bytes[..]).unwrap_err();
    assert!(err.to_string().contains("deep"), "{err}");
}

/// A valid request frame to mutate.
fn valid_frames() -> Vec<Vec<u8>> {
    let path = "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top";
    [
        enqueue(
            &[path],
            Some("/nix/store/5zj93d6iiaz2bj9hy068jfbcayc22v0p-vec-dep.drv"),
        ),
        Request::Status,
        Request::List {
            after: Some(path.into()),
            limit: Some(10),
            target: None,
        },
        Request::Retry {
            paths: vec![path.into()],
            all: false,
            target: None,
        },
        Request::Drop {
            path: path.into(),
            target: None,
        },
    ]
    .iter()
    .map(protocol::encode_request)
    .collect()
}

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/vectors");

fn vector(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(VECTORS).join(name)).unwrap()
}

fn flip(
    mut bytes: Vec<u8>,
    flips: &[(prop::sample::Index, u8)],
    cut: Option<prop::sample::Index>,
) -> Vec<u8> {
    for (at, value) in flips {
        if !bytes.is_empty() {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut.index(bytes.len() + 1));
    }
    bytes
}

/// JSON of any shape, for requests whose fields have the wrong types.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,20}".prop_map(Value::from),
        prop_oneof![
            Just("enqueue"),
            Just("status"),
            Just("list"),
            Just("retry"),
            Just("drop"),
            Just("v"),
            Just("type"),
            Just("out_paths"),
            Just("drv_path")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("v".to_owned()),
                    Just("type".to_owned()),
                    Just("out_paths".to_owned()),
                    Just("drv_path".to_owned()),
                    Just("limit".to_owned()),
                    Just("paths".to_owned()),
                    "[a-z_]{1,8}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    // Mutated and truncated request frames, and JSON of every shape: errors, never panics.
    // See: #9
    #[test]
    fn security_fuzz_socket_decoder(
        which in 0..5usize,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        json in any_json(),
    ) {
        let frame = flip(valid_frames()[which].clone(), &flips, cut);
        if let Ok(payload) = protocol::read_frame(&mut &frame[..]) {
            let _ = protocol::decode_request(&payload);
            let _ = protocol::decode_response(&payload);
        }
        let text = serde_json::to_vec(&json).unwrap();
        let _ = protocol::decode_request(&text);
        let _ = protocol::decode_response(&text);
        let mut header = [0u8; 4];
        for (i, b) in frame.iter().take(4).enumerate() {
            header[i] = *b;
        }
        if let Ok(len) = protocol::frame_len(header) {
            prop_assert!(len <= protocol::MAX_FRAME_BYTES);
        }
    }

    // Mutated NARs restored to disk: an error or a tree inside the destination, never a panic or a file
    // elsewhere.
    // See: #9
    #[test]
    fn security_fuzz_nar_restore(
        which in 0..4usize,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let name = ["tree.nar", "symlink.nar", "top.nar", "emptydir.nar"][which];
        let bytes = flip(vector(name), &flips, cut);
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        let _ = nixpush::nar::reader::restore(&mut &bytes[..], &dest);
        for path in tree(root.path()) {
            prop_assert!(path.starts_with(&dest), "{} written", path.display());
        }
    }

    // Narinfos with mutated bytes, repeated, missing or absurd fields: errors, never panics.
    // See: #9
    #[test]
    fn security_fuzz_narinfo_parser(
        which in 0..3usize,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        extra in prop::collection::vec(
            ("(StorePath|URL|Compression|FileHash|FileSize|NarHash|NarSize|References|Deriver|Sig|CA)",
             "(\\PC{0,30}|[0-9]{19,25}|-1|sha256:[0-9a-z]{0,60}| {0,3})"),
            0..4),
    ) {
        let dir = ["cache-zstd", "cache-xz", "cache-none"][which];
        let narinfo = std::fs::read_dir(Path::new(VECTORS).join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "narinfo"))
            .unwrap();
        let mut text = String::from_utf8_lossy(&flip(std::fs::read(narinfo).unwrap(), &flips, cut)).into_owned();
        for (key, value) in extra {
            text.push_str(&format!("{key}: {value}\n"));
        }
        let _ = nixpush::narinfo::NarInfo::parse(&text, "/nix/store");
    }

    // .drv files with mutated bytes anywhere, truncated, or with absurd nesting: errors, never panics.
    // See: #9
    #[test]
    fn security_fuzz_drv_parser(
        which in 0..3usize,
        flips in prop::collection::vec((any::<prop::sample::Index>(), 0x20u8..0x7f), 0..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        nesting in 0..5000usize,
    ) {
        let name = ["vec-top.drv", "vec-dep.drv", "vec-fod.drv"][which];
        let bytes = flip(vector(name), &flips, cut);
        let _ = nixpush::derivation::parse(&String::from_utf8_lossy(&bytes));
        let nested = format!("Derive({}", "[(\"".repeat(nesting));
        prop_assert!(nixpush::derivation::parse(&nested).is_err());
    }
}

/// What the hostile target does with one request (its request line and headers are given).
type Behaviour =
    dyn Fn(&str, &mut std::net::TcpStream, &std::sync::atomic::AtomicU64) + Send + Sync;

/// A tiny HTTP server on 127.0.0.1 that misbehaves on purpose; stopped when dropped.
struct Hostile {
    port: u16,
    /// Every request's head, in arrival order.
    requests: Arc<std::sync::Mutex<Vec<String>>>,
    /// Body bytes the server managed to send.
    sent: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hostile {
    fn start(
        behaviour: impl Fn(&str, &mut std::net::TcpStream, &std::sync::atomic::AtomicU64)
            + Send
            + Sync
            + 'static,
    ) -> Hostile {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let behaviour: Arc<Behaviour> = Arc::new(behaviour);
        let thread = {
            let (requests, sent, stop) = (requests.clone(), sent.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut stream, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let (requests, sent, stop, behaviour) = (
                        requests.clone(),
                        sent.clone(),
                        stop.clone(),
                        behaviour.clone(),
                    );
                    std::thread::spawn(move || {
                        stream.set_nonblocking(false).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(5)))
                            .unwrap();
                        let Some(head) = read_head(&mut stream) else {
                            return;
                        };
                        requests.lock().unwrap().push(head.clone());
                        if !stop.load(Ordering::Relaxed) {
                            behaviour(&head, &mut stream, &sent);
                        }
                    });
                }
            })
        };
        Hostile {
            port,
            requests,
            sent,
            stop,
            thread: Some(thread),
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn read_head(stream: &mut std::net::TcpStream) -> Option<String> {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Writes `chunk` until the client goes away or the test ends, counting what was sent.
fn endless(
    stream: &mut std::net::TcpStream,
    sent: &std::sync::atomic::AtomicU64,
    chunk: &[u8],
    chunked: bool,
) {
    let mut framed = Vec::new();
    if chunked {
        framed.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        framed.extend_from_slice(chunk);
        framed.extend_from_slice(b"\r\n");
    } else {
        framed.extend_from_slice(chunk);
    }
    // Bounded even if the client never stops reading: 4 GiB.
    for _ in 0..(4u64 << 30) / framed.len() as u64 {
        if stream.write_all(&framed).is_err() {
            return;
        }
        sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
}

const HOSTILE_TOKEN: &str = "hostile-target-token-7f3a";

fn http_backend(base: &str) -> nixpush::backend::http::HttpBackend {
    let mut config = nixpush::config::Config::default();
    config.target.timeout_secs = 20;
    nixpush::backend::http::HttpBackend::new(
        base,
        &config,
        nixpush::backend::Credentials::fixed(nixpush::secret::Secret::new(HOSTILE_TOKEN)),
    )
    .unwrap()
}

/// `prepare()` (GET nix-cache-info) against `hostile`, bounded by the test deadline.
fn prepare_against(
    hostile: &Hostile,
) -> Result<nixpush::backend::TargetInfo, nixpush::backend::Error> {
    use nixpush::backend::Backend;
    let backend = http_backend(&hostile.base());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        tokio::time::timeout(util::DEADLINE, backend.prepare())
            .await
            .expect("the backend hung on a hostile target")
    })
}

/// Client gave up reading after a bounded amount: what is left is the socket buffers.
const READ_BOUND: u64 = 32 << 20;

// An error answer with an endless body (chunked, or a huge Content-Length), or one that dribbles: the error
// names the status, its detail is short, and only a bounded amount is read.
// See: #9
#[test]
fn security_hostile_target_error_bodies_are_bounded() {
    let chunked = Hostile::start(|_, stream, sent| {
        let _ = stream
            .write_all(b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n");
        endless(stream, sent, &[b'x'; 64 * 1024], true);
    });
    let huge = Hostile::start(|_, stream, sent| {
        let _ = stream
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10737418240\r\n\r\n");
        endless(stream, sent, &[b'y'; 64 * 1024], false);
    });
    let drip = Hostile::start(|_, stream, sent| {
        let _ = stream.write_all(b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n");
        for _ in 0..100_000 {
            if stream.write_all(b"1\r\nz\r\n").is_err() {
                return;
            }
            sent.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    for (server, code) in [(&chunked, 500), (&huge, 503), (&drip, 502)] {
        let err = prepare_against(server).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, nixpush::backend::Error::Status { code: c, .. } if c == code),
            "{message}"
        );
        assert!(message.contains(&format!("HTTP {code}")), "{message}");
        assert!(message.len() < 512, "{message}");
        assert!(!message.contains(HOSTILE_TOKEN));
        assert!(server.sent() < READ_BOUND, "{} bytes read", server.sent());
        assert!(server.requests()[0].contains(&format!("authorization: Bearer {HOSTILE_TOKEN}")));
    }
}

// A giant nix-cache-info is not read; garbage instead of HTTP is an error naming the target.
// See: #9
#[test]
fn security_hostile_target_giant_and_malformed_answers() {
    let giant = Hostile::start(|_, stream, sent| {
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        endless(stream, sent, b"StoreDir: /nix/store\n", true);
    });
    prepare_against(&giant).unwrap();
    assert!(giant.sent() < READ_BOUND, "{} bytes read", giant.sent());

    let garbage = Hostile::start(|_, stream, _| {
        let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\xff\xfe\x00garbage\r\n\r\n");
    });
    let err = prepare_against(&garbage).unwrap_err().to_string();
    assert!(
        err.contains(&format!("127.0.0.1:{}", garbage.port)),
        "{err}"
    );

    let bad_length = Hostile::start(|_, stream, _| {
        let _ = stream
            .write_all(b"HTTP/1.1 500 Oops\r\nContent-Length: -5\r\nContent-Length: 7\r\n\r\nnope");
    });
    let err = prepare_against(&bad_length).unwrap_err().to_string();
    assert!(
        err.contains(&format!("127.0.0.1:{}", bad_length.port)),
        "{err}"
    );
}

// A redirect to another host (here: another port) is refused with an error saying so; the other host never
// sees a request, let alone the token. A redirect within the target is followed.
// See: #9
#[test]
fn security_hostile_target_redirects_elsewhere_are_refused() {
    let elsewhere = Hostile::start(|_, stream, _| {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 21\r\n\r\nStoreDir: /nix/store\n");
    });
    // Another port of the same address is another origin, as is another name for it.
    for location in [
        format!("http://127.0.0.1:{}/stolen", elsewhere.port),
        format!("http://localhost:{}/stolen", elsewhere.port),
    ] {
        let redirecting = Hostile::start(move |_, stream, _| {
            let _ = stream.write_all(
                format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n")
                    .as_bytes(),
            );
        });
        let err = prepare_against(&redirecting).unwrap_err().to_string();
        assert!(err.contains("redirect to another host refused"), "{err}");
    }
    assert!(
        elsewhere.requests().is_empty(),
        "{:?}",
        elsewhere.requests()
    );

    let within = Hostile::start(move |head, stream, _| {
        let answer: &[u8] = if head.starts_with("GET /moved/") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 21\r\n\r\nStoreDir: /nix/store\n"
        } else {
            b"HTTP/1.1 301 Moved\r\nLocation: /moved/nix-cache-info\r\nContent-Length: 0\r\n\r\n"
        };
        let _ = stream.write_all(answer);
    });
    prepare_against(&within).unwrap();
    assert_eq!(within.requests().len(), 2, "{:?}", within.requests());
}

// Cachix's presign answers a part URL on another host: refused before any byte is sent there, with an error
// naming the URL (without its signature).
// See: #9
#[tokio::test]
async fn security_hostile_cachix_presigned_urls_elsewhere_are_refused() {
    use crate::remote::{build_paths, prepare, CachixServer};
    use nixpush::backend::cachix::{CachixBackend, RetryPolicy};
    use nixpush::backend::{Backend, Credentials};
    use serde_json::json;

    let dir = tempfile::tempdir().unwrap();
    let server = CachixServer::start(json!({"caches": [{
        "name": "managed", "signing": "managed", "tokens": {"presign-token": "write"}}]}));
    let bystander = Hostile::start(|_, stream, _| {
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    });
    let mut config = nixpush::config::Config::default();
    config.target.timeout_secs = 20;
    let backend = CachixBackend::new(
        &format!("cachix://managed?api={}", server.base()),
        &config,
        Credentials::fixed(nixpush::secret::Secret::new("presign-token")),
    )
    .unwrap()
    .with_policy(RetryPolicy {
        base: Duration::from_millis(40),
        cap: Duration::from_millis(200),
        budget: Duration::from_secs(5),
        max_hint: Duration::from_secs(2),
    });
    backend.prepare().await.unwrap();
    let paths = build_paths(dir.path(), "cxhostile", 1_000);
    for base in [
        format!("http://localhost:{}", bystander.port),
        "http://192.0.2.1:9".to_owned(),
        "https://169.254.169.254".to_owned(),
    ] {
        server
            .faults(json!([{"route": "presign", "action": "presign_elsewhere", "base": base}]))
            .await;
        let p = prepare(&paths[0], nixpush::config::Compression::Zstd, None);
        let err = tokio::time::timeout(util::DEADLINE, backend.upload(&p.narinfo, p.nar()))
            .await
            .expect("upload hung")
            .unwrap_err();
        let message = err.to_string();
        assert!(!err.is_retryable(), "{message}");
        assert!(message.contains("presigned part URL"), "{message}");
        assert!(message.contains(&base), "{message}");
        assert!(!message.contains("X-Signature"), "{message}");
    }
    assert!(
        bystander.requests().is_empty(),
        "{:?}",
        bystander.requests()
    );
    // With the fault gone the same backend uploads normally.
    server.faults(json!([])).await;
    let p = prepare(&paths[0], nixpush::config::Compression::Zstd, None);
    backend.upload(&p.narinfo, p.nar()).await.unwrap();
}

// The daemon against a target that answers every request with an endless error: it reports the error, keeps
// answering, reads only a bounded amount, and never logs the token.
// See: #9
#[test]
fn security_hostile_target_does_not_take_the_daemon_down() {
    let hostile = Hostile::start(|_, stream, sent| {
        let _ = stream
            .write_all(b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n");
        endless(stream, sent, &[b'!'; 64 * 1024], true);
    });
    let env = TestEnv::new();
    let token_file = env.dir.path().join("token");
    std::fs::write(&token_file, HOSTILE_TOKEN).unwrap();
    env.write_config_with(
        "",
        &format!(
            "url = \"{}/cache\"\nauth_token_file = \"{}\"",
            hostile.base(),
            token_file.display()
        ),
    );
    let daemon = TestDaemon::start_uploading(env);
    let paths = util::add_store_paths(1);
    assert_acked(
        &call(&daemon.env.socket, &enqueue(&[&paths[0]], None)),
        &paths[0],
    );
    util::wait_until("the target's error in status", || {
        daemon.status().to_string().contains("HTTP 500")
    });
    util::wait_until("a second request to the target", || {
        hostile.requests().len() >= 2
    });
    let status = daemon.status();
    assert!(
        status["queued"].as_u64().unwrap() + status["failed"].as_u64().unwrap() == 1,
        "{status}"
    );
    assert!(hostile.sent() < READ_BOUND * hostile.requests().len() as u64);
    let more = util::add_store_paths(1);
    assert!(matches!(
        call(&daemon.env.socket, &enqueue(&[&more[0]], None)),
        Response::Ack { .. }
    ));
    assert!(!daemon.log().contains(HOSTILE_TOKEN));
    assert!(!daemon.status().to_string().contains(HOSTILE_TOKEN));
}

/// Every form a secret key could leak in: the `name:base64` text, its base64, and the raw key and seed as bytes,
/// hex and base64 (standard, unpadded, URL-safe).
fn key_needles(secret_key_file: &Path) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(secret_key_file).unwrap();
    let b64 = text.trim().split_once(':').unwrap().1.to_owned();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&b64)
        .unwrap();
    assert_eq!(raw.len(), 64);
    let mut needles = vec![b64.into_bytes()];
    for bytes in [&raw[..], &raw[..32]] {
        needles.push(bytes.to_vec());
        needles.push(hex::encode(bytes).into_bytes());
        needles.push(hex::encode_upper(bytes).into_bytes());
        needles.push(
            base64::engine::general_purpose::STANDARD
                .encode(bytes)
                .into_bytes(),
        );
        needles.push(
            base64::engine::general_purpose::STANDARD_NO_PAD
                .encode(bytes)
                .into_bytes(),
        );
        needles.push(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(bytes)
                .into_bytes(),
        );
    }
    needles
}

/// Everything a user or admin could see, gathered for the final grep.
#[derive(Default)]
struct Seen(Vec<(String, Vec<u8>)>);

impl Seen {
    fn output(&mut self, what: &str, output: &Output) {
        self.0
            .push((format!("{what} (stdout)"), output.stdout.clone()));
        self.0
            .push((format!("{what} (stderr)"), output.stderr.clone()));
    }

    fn text(&mut self, what: &str, text: impl Into<Vec<u8>>) {
        self.0.push((what.to_owned(), text.into()));
    }

    fn files_under(&mut self, dir: &Path) {
        for path in tree(dir) {
            if path.is_file() {
                self.0
                    .push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }

    /// Panics naming where any needle appears.
    fn assert_free_of(&self, needles: &[(&str, Vec<u8>)]) {
        let mut leaks = Vec::new();
        for (where_, haystack) in &self.0 {
            for (name, needle) in needles {
                if haystack.windows(needle.len()).any(|w| w == &needle[..]) {
                    leaks.push(format!("{name} in {where_}"));
                }
            }
        }
        assert!(leaks.is_empty(), "secrets leaked: {leaks:?}");
    }
}

// After the daemon pushed to Cachix through a token rotation (with a rejected token on the way) and `nixpush
// push` went to S3 and HTTP (with good and bad credentials), no log line, status output, error or file in
// state_dir holds a token, a password or the secret key in any encoding. A key file readable by others gets a
// warning naming it.
// See: #9
#[tokio::test]
async fn security_secrets_never_reach_logs_status_errors_or_state() {
    use crate::remote::{nix_key, CachixServer, PyServer};
    use serde_json::json;

    const OLD_TOKEN: &str = "cachix-token-old-4c1d9e";
    const NEW_TOKEN: &str = "cachix-token-new-8b2f6a";
    const HTTP_TOKEN: &str = "http-token-5e7a1b";
    const WRONG_TOKEN: &str = "wrong-token-0d3c2f";
    const PASSWORD: &str = "basic-password-9a4e7c";
    const S3_SECRET: &str = "s3-secret-key-2f8d4b";

    let mut seen = Seen::default();
    let env = TestEnv::new();
    let (sec, public) = nix_key(env.dir.path(), "nixpush-secrets-1");
    // Readable by everyone: the daemon must say so, naming the file.
    std::fs::set_permissions(&sec, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = CachixServer::start(json!({"caches": [{
        "name": "secrets", "signing": "self-signed", "public_keys": [public.trim()],
        "tokens": {OLD_TOKEN: "write"}}]}));
    let token_file = env.dir.path().join("cachix-token");
    std::fs::write(&token_file, OLD_TOKEN).unwrap();
    env.write_config_with(
        "",
        &format!(
            "url = \"cachix://secrets\"\ncachix_api = \"{}\"\nauth_token_file = \"{}\"\nsigning_key_file = \"{}\"",
            server.base(),
            token_file.display(),
            sec.display()
        ),
    );
    let mut daemon = TestDaemon::start_uploading(env);
    let paths = util::add_store_paths(2);
    assert_acked(
        &call(&daemon.env.socket, &enqueue(&[&paths[0]], None)),
        &paths[0],
    );
    daemon.wait_drained();

    // The token is revoked: the target pauses, saying why.
    server
        .control(
            reqwest::Method::POST,
            "cache/secrets",
            Some(json!({"tokens": {NEW_TOKEN: "write"}})),
        )
        .await;
    assert_acked(
        &call(&daemon.env.socket, &enqueue(&[&paths[1]], None)),
        &paths[1],
    );
    util::wait_until("the target paused", || {
        daemon.status()["target"]["state"] == "paused"
    });
    seen.output(
        "status --json while paused",
        &daemon.env.nixpush(&["status", "--json"]),
    );
    seen.output("status while paused", &daemon.env.nixpush(&["status"]));
    // Rotation as sops-nix does it: a new file renamed over the old one.
    let staged = daemon.env.dir.path().join("cachix-token.new");
    std::fs::write(&staged, NEW_TOKEN).unwrap();
    std::fs::rename(&staged, &token_file).unwrap();
    let status = daemon.wait_drained();
    let stored = server.stored("secrets").await;
    assert!(
        paths.iter().all(|p| stored.contains(p)),
        "{stored:?}\n{status}"
    );

    for args in [
        &["status"][..],
        &["status", "--json"],
        &["queue", "list", "--json"],
        &["check-config"],
        &["doctor"],
    ] {
        seen.output(
            &format!("nixpush {}", args.join(" ")),
            &daemon.env.nixpush(args),
        );
    }
    let log = daemon.log();
    let warning = log
        .lines()
        .find(|l| l.contains("secret key file is readable by group or others"))
        .unwrap_or_else(|| panic!("no warning about the key file's mode:\n{log}"));
    assert!(warning.contains(sec.to_str().unwrap()), "{warning}");
    assert!(warning.contains("644"), "{warning}");
    assert!(daemon.stop().success());
    seen.text("daemon log", daemon.log());
    seen.files_under(&daemon.env.state_dir);
    assert!(
        seen.0.iter().any(|(w, _)| w.contains("/queue/")),
        "the queue's files were not read"
    );

    // `nixpush push` to S3 and to HTTP, with good and bad credentials.
    let s3 = PyServer::start("s3_server.py", &["--bucket", "secrets"]);
    let store_paths = util::add_store_paths(2);
    let push = |target: &str, extra: &[&str], envs: &[(&str, &str)]| {
        let mut command = Command::new(NIXPUSH);
        command
            .arg("push")
            .args(["--target", target, "--no-upstream", "--signing-key-file"])
            .arg(&sec)
            .args(extra)
            .arg(&store_paths[0])
            .env_remove("CACHIX_AUTH_TOKEN")
            .env_remove("NIXPUSH_AUTH_TOKEN");
        for (key, value) in envs {
            command.env(key, value);
        }
        command.run()
    };
    let s3_env = [
        ("AWS_ACCESS_KEY_ID", "AKSECRETS"),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
    ];
    let ok = push(
        &format!("s3://secrets?endpoint={}&region=us-east-1", s3.base()),
        &[],
        &s3_env,
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    seen.output("push to s3", &ok);
    let bad = push(
        &format!(
            "s3://no-such-bucket?endpoint={}&region=us-east-1",
            s3.base()
        ),
        &[],
        &s3_env,
    );
    assert!(!bad.status.success());
    seen.output("push to a missing bucket", &bad);

    let root = tempfile::tempdir().unwrap();
    let nginx = crate::nginx::Nginx::start(
        root.path(),
        &format!("if ($http_authorization != \"Bearer {HTTP_TOKEN}\") {{ return 401; }}"),
    );
    let http = format!("http://127.0.0.1:{}/", nginx.port);
    let token_dir = tempfile::tempdir().unwrap();
    let write_token = |name: &str, token: &str| {
        let file = token_dir.path().join(name);
        std::fs::write(&file, token).unwrap();
        file
    };
    let good = write_token("good", HTTP_TOKEN);
    let ok = push(&http, &["--auth-token-file", good.to_str().unwrap()], &[]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    seen.output("push to http", &ok);
    let wrong = write_token("wrong", WRONG_TOKEN);
    let bad = push(&http, &["--auth-token-file", wrong.to_str().unwrap()], &[]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("401") || String::from_utf8_lossy(&bad.stdout).contains("401"));
    seen.output("push to http with a wrong token", &bad);
    let with_password = format!("http://alice:{PASSWORD}@127.0.0.1:{}/", nginx.port);
    let bad = push(&with_password, &[], &[]);
    assert!(!bad.status.success());
    seen.output("push to http with a password", &bad);
    let cachix = format!("cachix://secrets?api={}", server.base());
    let bad = push(
        &cachix,
        &["--auth-token-file", wrong.to_str().unwrap()],
        &[],
    );
    assert!(!bad.status.success());
    seen.output("push to cachix with a wrong token", &bad);

    let mut needles: Vec<(&str, Vec<u8>)> = vec![
        ("the old Cachix token", OLD_TOKEN.into()),
        ("the new Cachix token", NEW_TOKEN.into()),
        ("the HTTP token", HTTP_TOKEN.into()),
        ("the wrong token", WRONG_TOKEN.into()),
        ("the basic-auth password", PASSWORD.into()),
        ("the S3 secret", S3_SECRET.into()),
    ];
    needles.extend(key_needles(&sec).into_iter().map(|n| ("the secret key", n)));
    seen.assert_free_of(&needles);
}
