//! Helpers shared by the integration tests: a daemon in a temporary directory, real Nix builds through the hook,
//! fresh store paths, and waiting on conditions with a deadline.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The `nixpush` binary under test.
pub const NIXPUSH: &str = env!("CARGO_BIN_EXE_nixpush");
/// The `nixpush-hook` binary under test.
pub const HOOK: &str = env!("CARGO_BIN_EXE_nixpush-hook");
/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Options every Nix build in the tests needs when run as root without a daemon.
pub const NIX_OPTIONS: [&str; 6] = [
    "--option",
    "build-users-group",
    "",
    "--option",
    "sandbox",
    "false",
];

/// A directory with a configuration file, a socket path and a state directory.
pub struct TestEnv {
    /// Removed on drop.
    pub dir: TempDir,
    /// `config.toml`.
    pub config_path: PathBuf,
    /// The hook socket.
    pub socket: PathBuf,
    /// The state directory.
    pub state_dir: PathBuf,
    /// `state_dir/spool`.
    pub spool_dir: PathBuf,
}

impl TestEnv {
    /// An environment with the default test configuration.
    pub fn new() -> TestEnv {
        TestEnv::with_config("")
    }

    /// An environment whose configuration has `extra` top-level keys added.
    pub fn with_config(extra: &str) -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("nixpush-test")
            .tempdir()
            .unwrap();
        // Traversable by other users, for the unprivileged-peer tests.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("run/nixpush.sock");
        let state_dir = dir.path().join("state");
        let config_path = dir.path().join("config.toml");
        let env = TestEnv {
            spool_dir: state_dir.join("spool"),
            config_path,
            socket,
            state_dir,
            dir,
        };
        env.write_config(extra);
        env
    }

    /// Rewrites the configuration file with `extra` keys.
    pub fn write_config(&self, extra: &str) {
        let target = format!("url = \"file://{}/cache\"", self.dir.path().display());
        self.write_config_with(extra, &target);
    }

    /// Rewrites the configuration file with `extra` top-level keys and `target` as the body of `[target]`.
    /// Upstream caches are off unless `extra` names some: no test traffic leaves 127.0.0.1.
    pub fn write_config_with(&self, extra: &str, target: &str) {
        let upstream = if extra.contains("upstream") {
            ""
        } else {
            "upstream = []\n"
        };
        let text = format!(
            "socket = \"{}\"\nstate_dir = \"{}\"\n{upstream}{extra}\n[target]\n{target}\n",
            self.socket.display(),
            self.state_dir.display(),
        );
        fs::write(&self.config_path, text).unwrap();
    }

    /// The default `file://` target's directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// `nixpush --config … ARGS`.
    pub fn nixpush(&self, args: &[&str]) -> Output {
        Command::new(NIXPUSH)
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .output()
            .unwrap()
    }

    /// Environment variables pointing a hook at this environment.
    pub fn hook_env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("NIXPUSH_SOCKET", self.socket.clone()),
            ("NIXPUSH_SPOOL", self.spool_dir.clone()),
        ]
    }

    /// Runs `nixpush-hook` with `OUT_PATHS` (and optionally `DRV_PATH`), as Nix would.
    pub fn run_hook(&self, out_paths: &[&str], drv_path: Option<&str>) -> Output {
        self.hook_command(out_paths, drv_path).output().unwrap()
    }

    /// The hook command, ready to spawn.
    pub fn hook_command(&self, out_paths: &[&str], drv_path: Option<&str>) -> Command {
        let mut command = Command::new(HOOK);
        command
            .envs(self.hook_env())
            .env("OUT_PATHS", out_paths.join(" "))
            .env("DRV_PATH", drv_path.unwrap_or(""))
            .stdin(Stdio::null());
        command
    }

    /// Spool files waiting.
    pub fn spool_files(&self) -> Vec<PathBuf> {
        nixpush::spool::list(&self.spool_dir).unwrap()
    }
}

/// A running `nixpush daemon --hold` in a [`TestEnv`]. Dropping it sends SIGTERM, then SIGKILL after a grace period.
pub struct TestDaemon {
    /// Where it runs.
    pub env: TestEnv,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
    hold: bool,
}

impl TestDaemon {
    /// Starts a daemon in a fresh environment.
    pub fn start() -> TestDaemon {
        TestDaemon::start_in(TestEnv::new())
    }

    /// Starts a daemon with `--hold` in `env` and waits for `READY=1`.
    pub fn start_in(env: TestEnv) -> TestDaemon {
        TestDaemon::launch(env, true)
    }

    /// Starts a daemon that uploads (no `--hold`) in `env` and waits for `READY=1`.
    pub fn start_uploading(env: TestEnv) -> TestDaemon {
        TestDaemon::launch(env, false)
    }

    fn launch(env: TestEnv, hold: bool) -> TestDaemon {
        let mut daemon = TestDaemon {
            log: env.dir.path().join("daemon.log"),
            env,
            child: None,
            starts: 0,
            hold,
        };
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let notify_path = self
            .env
            .dir
            .path()
            .join(format!("notify-{}.sock", self.starts));
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(NIXPUSH)
            .arg("--config")
            .arg(&self.env.config_path)
            .arg("daemon")
            .args(self.hold.then_some("--hold"))
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "debug")
            .env_remove("LISTEN_FDS")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = notify.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]);
                if message.lines().any(|line| line == "READY=1") {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "daemon exited with {status} before READY=1:\n{}",
                    self.log()
                );
            }
            assert!(
                started.elapsed() < DEADLINE,
                "no READY=1 within {DEADLINE:?}:\n{}",
                self.log()
            );
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `signal` (e.g. `HUP`) to the daemon.
    pub fn signal(&self, signal: &str) {
        assert!(send_signal(self.pid(), signal), "cannot send SIG{signal}");
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon not running");
        assert!(send_signal(child.id(), "TERM"), "cannot send SIGTERM");
        wait_with_deadline(&mut child, DEADLINE).expect("daemon ignored SIGTERM")
    }

    /// Whether the next [`TestDaemon::restart`] holds uploads (`--hold`) or uploads.
    pub fn set_hold(&mut self, hold: bool) {
        self.hold = hold;
    }

    /// Starts the daemon again on the same state.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "daemon still running");
        self.spawn();
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> Value {
        let output = self.env.nixpush(&["status", "--json"]);
        // 4 to 7 say why the cache is not up to date; the report is printed all the same.
        assert!(
            matches!(output.status.code(), Some(0 | 4..=7)),
            "status failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// The paths in the queue (`queue list --json`), in queue order, duplicates kept.
    pub fn queued_paths(&self) -> Vec<String> {
        let output = self.env.nixpush(&["queue", "list", "--json"]);
        assert!(
            output.status.success(),
            "queue list failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let entries: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
        entries
            .iter()
            .map(|e| e["path"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits until the queue is empty and nothing is in flight, or fails with the daemon's log.
    pub fn wait_drained(&self) -> Value {
        let started = Instant::now();
        loop {
            let last = self.status();
            if last["queued"] == 0
                && last["in_flight"] == 0
                && last["failed"] == 0
                && last["spooled"] == 0
            {
                return last;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "queue not drained within {DEADLINE:?}: {last}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every path in `paths` is queued, or fails with the daemon's log.
    pub fn wait_queued(&self, paths: &[String]) {
        wait_until(&format!("{paths:?} queued"), || {
            let queued = self.queued_paths();
            paths.iter().all(|p| queued.contains(p))
        });
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(child.id(), "TERM");
            if wait_with_deadline(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `kill -s SIGNAL PID`; whether it was delivered.
pub fn send_signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_with_deadline(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if started.elapsed() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `condition` until it holds; panics naming `what` after [`DEADLINE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A string no earlier test run has used, so that Nix really builds.
pub fn fresh_nonce() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `tests/fixtures/hooktest.nix`.
pub fn hooktest_nix() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hooktest.nix")
}

/// A real build of `hooktest.nix` (two derivations, three outputs) with `nixpush-hook` as post-build-hook.
pub struct HookBuild {
    /// nix-build's output.
    pub output: Output,
    /// All outputs of both derivations, as Nix reports them.
    pub outputs: Vec<String>,
}

impl HookBuild {
    /// nix-build's stderr.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
}

/// Builds `hooktest.nix` with a fresh nonce, running the hook with `env`'s socket and spool.
pub fn nix_build_with_hook(env: &TestEnv) -> HookBuild {
    let nonce = fresh_nonce();
    let output = Command::new("nix-build")
        .arg(hooktest_nix())
        .args(["--argstr", "nonce", &nonce])
        .args(NIX_OPTIONS)
        .args(["--option", "substituters", ""])
        .args(["--option", "post-build-hook", HOOK])
        .arg("--no-out-link")
        .envs(env.hook_env())
        .output()
        .unwrap();
    let drv = nix(&[
        "nix-instantiate",
        hooktest_nix().to_str().unwrap(),
        "--argstr",
        "nonce",
        &nonce,
    ]);
    let drvs: Vec<String> = nix(&["nix-store", "--query", "--requisites", drv.trim()])
        .lines()
        .filter(|l| l.ends_with(".drv"))
        .map(str::to_owned)
        .collect();
    assert_eq!(drvs.len(), 2, "{drvs:?}");
    let mut args = vec!["nix-store", "--query", "--outputs"];
    args.extend(drvs.iter().map(String::as_str));
    let outputs = nix(&args).lines().map(str::to_owned).collect();
    HookBuild { output, outputs }
}

/// Runs a Nix command that must succeed and returns its stdout.
pub fn nix(args: &[&str]) -> String {
    let output = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `count` new, distinct, real store paths (`nix-store --add` of small files).
pub fn add_store_paths(count: usize) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let nonce = fresh_nonce();
    let files: Vec<PathBuf> = (0..count)
        .map(|i| {
            let file = dir.path().join(format!("nixpush-test-{i}"));
            fs::write(&file, format!("{nonce} {i}\n")).unwrap();
            file
        })
        .collect();
    let mut args = vec!["nix-store".to_owned(), "--add".to_owned()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let paths: Vec<String> = nix(&args).lines().map(str::to_owned).collect();
    assert_eq!(paths.len(), count);
    paths
}

/// A store path that is well-formed but does not exist.
pub fn missing_store_path() -> String {
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    let seed = fresh_nonce();
    let hash: String = (0..32)
        .map(|i| {
            let byte = seed.as_bytes()[i % seed.len()] as usize + i * 7;
            alphabet[byte % 32] as char
        })
        .collect();
    format!("/nix/store/{hash}-nixpush-test-missing")
}

/// `(input, reason)` of every refused request in a `status --json` object.
pub fn refused_requests(status: &serde_json::Value) -> Vec<(String, String)> {
    status["refused_requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["input"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}
