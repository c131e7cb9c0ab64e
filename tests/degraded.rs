//! The daemon when its surroundings fail: Nix's database unreadable with `nix-store` missing (a failure to check
//! is not a refusal), and the spool watcher gone (removed directory, inotify exhausted) without a busy loop.
//! See: #15

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::daemon::{daemon_command, notify_socket, wait_ready};
use crate::harness::keys::{public_key, signing_key_file};
use crate::harness::user::test_user;
use crate::util::{
    add_store_paths, send_signal, wait_until, TestDaemon, TestEnv, DEADLINE, NIXPUSH,
};

/// A daemon started with a chosen environment and user, stopped (SIGTERM, then SIGKILL) on drop.
struct CustomDaemon {
    child: Child,
    log: PathBuf,
}

impl CustomDaemon {
    fn start(env: &TestEnv, hold: bool, path_var: &str, user: Option<(u32, u32)>) -> CustomDaemon {
        let notify_path = env.dir.path().join("notify-custom.sock");
        let _ = fs::remove_file(&notify_path);
        let notify = notify_socket(&notify_path);
        // The daemon may run as the test user, who must be able to send to the socket.
        fs::set_permissions(&notify_path, fs::Permissions::from_mode(0o777)).unwrap();
        let log = env.dir.path().join("daemon-custom.log");
        let mut command = match user {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg(NIXPUSH);
                c
            }
            None => Command::new(NIXPUSH),
        };
        daemon_command(&mut command, &env.config_path, hold, &notify_path, &log);
        command.env("PATH", path_var);
        let mut daemon = CustomDaemon {
            child: command.spawn().unwrap(),
            log,
        };
        let log = daemon.log.clone();
        wait_ready(
            &notify,
            || daemon.child.try_wait().unwrap(),
            || fs::read_to_string(&log).unwrap_or_default(),
        );
        daemon
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CustomDaemon {
    fn drop(&mut self) {
        send_signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn status(env: &TestEnv) -> Value {
    let output = env.nixpush(&["status", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn queued_paths(env: &TestEnv) -> Vec<String> {
    let output = env.nixpush(&["queue", "list", "--json"]);
    assert!(output.status.success());
    let entries: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    entries
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_owned())
        .collect()
}

/// User plus system CPU time of `pid`, from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces; fields are counted after its closing parenthesis.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = String::from_utf8(
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse::<u64>()
    .unwrap();
    Duration::from_millis(ticks * 1000 / per_second)
}

/// CPU time `pid` uses over a 10 s window.
fn cpu_over_ten_seconds(pid: u32) -> Duration {
    let before = cpu_time(pid);
    // A measurement window, not a wait for a condition.
    std::thread::sleep(Duration::from_secs(10));
    cpu_time(pid) - before
}

fn spool_one(env: &TestEnv, path: &str) {
    nixpush::spool::write(
        &env.spool_dir,
        &nixpush::spool::SpoolRequest {
            v: nixpush::spool::SPOOL_VERSION,
            drv_path: None,
            out_paths: vec![path.to_owned()],
            source: "hook".to_owned(),
            created_at_ms: 1,
            reason: Some("test".to_owned()),
        },
    )
    .unwrap();
}

// Nix's database unreadable and nix-store not on PATH: the hook gets a non-final answer and spools, nothing is
// refused, and once the database is back the path lands, verified by real Nix. See: #15
#[test]
fn degraded_a_failure_to_check_validity_is_not_final() {
    let env = TestEnv::new();
    let key = signing_key_file(env.dir.path());
    let nix_db = env.dir.path().join("nix-db.sqlite");
    std::os::unix::fs::symlink("/nonexistent/db.sqlite", &nix_db).unwrap();
    let cache = env.cache_dir();
    env.write_config_with(
        &format!("nix_db = \"{}\"", nix_db.display()),
        &format!(
            "url = \"file://{}\"\nsigning_key_file = \"{}\"",
            cache.display(),
            key.display()
        ),
    );
    let empty_path = env.dir.path().join("empty-path");
    fs::create_dir(&empty_path).unwrap();
    let daemon = CustomDaemon::start(&env, false, empty_path.to_str().unwrap(), None);
    let path = add_store_paths(1).remove(0);
    let hook = env.run_hook(&[&path], None);
    let stderr = String::from_utf8_lossy(&hook.stderr).into_owned();
    assert!(hook.status.success());
    assert!(
        stderr.contains("saved the request"),
        "the hook spools instead of taking a refusal: {stderr}\n{}",
        daemon.log()
    );
    assert!(!stderr.contains("refused"), "{stderr}");
    let report = status(&env);
    assert_eq!(report["refused"], 0, "{report}");
    assert_eq!(report["queued"], 0, "{report}");
    let log = daemon.log();
    assert!(
        log.contains("WARN")
            && (log.contains("/nonexistent/db.sqlite") || log.contains("nix-db.sqlite")),
        "the real cause is logged at warn:\n{log}"
    );

    // The database comes back.
    fs::remove_file(&nix_db).unwrap();
    std::os::unix::fs::symlink("/nix/var/nix/db/db.sqlite", &nix_db).unwrap();
    let hash = &path["/nix/store/".len()..][..32];
    let started = Instant::now();
    while !(cache.join(format!("{hash}.narinfo")).exists() && status(&env)["queued"] == 0) {
        assert!(
            started.elapsed() < DEADLINE,
            "the spooled path not uploaded: {}\n{}",
            status(&env),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = status(&env);
    assert_eq!(report["refused"], 0, "{report}");
    assert_eq!(report["spooled"], 0, "{report}");

    let store = tempfile::tempdir().unwrap();
    let copied = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command", "copy"])
        .arg("--from")
        .arg(format!("file://{}", cache.display()))
        .arg("--to")
        .arg(store.path().join("root"))
        .args(["--option", "trusted-public-keys", &public_key()])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        copied.status.success(),
        "nix copy: {}",
        String::from_utf8_lossy(&copied.stderr)
    );
    drop(daemon);
}

// The spool directory removed under a running daemon: no busy loop, the directory comes back, and spool files
// are imported again. See: #15
#[test]
fn degraded_a_removed_spool_directory_is_set_up_again_without_spinning() {
    let daemon = TestDaemon::start();
    wait_until("the watcher running", || {
        daemon.status()["watcher"]["active"] == true
    });
    fs::remove_dir_all(&daemon.env.spool_dir).unwrap();
    let cpu = cpu_over_ten_seconds(daemon.pid());
    assert!(
        cpu < Duration::from_millis(500),
        "{cpu:?} of CPU in 10 s:\n{}",
        daemon.log()
    );
    wait_until("the spool directory recreated", || {
        daemon.env.spool_dir.join("bad").is_dir()
    });
    let mode = fs::metadata(&daemon.env.spool_dir)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o1733);
    let path = add_store_paths(1).remove(0);
    spool_one(&daemon.env, &path);
    daemon.wait_queued(std::slice::from_ref(&path));
    // Deleted right after its paths are durably queued.
    wait_until("the imported spool file deleted", || {
        daemon.env.spool_files().is_empty()
    });
}

/// A process of the test user holding every inotify instance that user may have, until dropped.
struct InotifyHog(Child);

impl InotifyHog {
    fn start((uid, gid): (u32, u32)) -> InotifyHog {
        let script = "import ctypes, sys\n\
                      libc = ctypes.CDLL(None, use_errno=True)\n\
                      fds = []\n\
                      while libc.inotify_init() >= 0 and len(fds) < 100000:\n    fds.append(1)\n\
                      print(len(fds), flush=True)\n\
                      sys.stdin.read()\n";
        let mut child = Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .args(["/usr/bin/python3", "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.trim().parse::<u64>().is_ok(), "{line:?}");
        InotifyHog(child)
    }
}

impl Drop for InotifyHog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chown(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

// A daemon whose user has no inotify instance left (the limit reached, as on busy desktops): no busy loop, status
// says the watcher is off and why, and spool files are imported by the rescan. See: #15
#[test]
fn degraded_no_inotify_means_rescans_not_a_busy_loop() {
    let user = test_user();
    let env = TestEnv::new();
    for dir in [
        env.state_dir.clone(),
        env.socket.parent().unwrap().to_owned(),
    ] {
        fs::create_dir_all(&dir).unwrap();
        chown(&dir, user);
    }
    let _hog = InotifyHog::start(user);
    let daemon = CustomDaemon::start(&env, true, "/usr/bin:/bin", Some(user));
    let report = status(&env);
    assert_eq!(report["watcher"]["active"], false, "{report}");
    let reason = report["watcher"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("inotify"), "{report}");
    let text = env.nixpush(&["status"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("watcher off"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    let cpu = cpu_over_ten_seconds(daemon.pid());
    assert!(
        cpu < Duration::from_millis(500),
        "{cpu:?} of CPU in 10 s:\n{}",
        daemon.log()
    );
    let path = add_store_paths(1).remove(0);
    spool_one(&env, &path);
    wait_until("the spool file imported by the rescan", || {
        queued_paths(&env).contains(&path)
    });
    wait_until("the imported spool file deleted", || {
        env.spool_files().is_empty()
    });
}
