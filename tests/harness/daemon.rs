//! A `nixpush daemon` in a temporary directory ([`TestEnv`], [`TestDaemon`]), and the hook and CLI run against it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::process::{output, send_signal, wait_until, Guard, DEADLINE};

/// The `nixpush` binary under test.
pub const NIXPUSH: &str = env!("CARGO_BIN_EXE_nixpush");
/// The `nixpush-hook` binary under test.
pub const HOOK: &str = env!("CARGO_BIN_EXE_nixpush-hook");
/// Environment variables that would make a command read configuration other than the test's.
pub const FOREIGN_ENV: [&str; 4] = [
    "NIXPUSH_CONFIG",
    "NIXPUSH_AUTH_TOKEN",
    "CACHIX_AUTH_TOKEN",
    "NIX_CONFIG",
];

/// `nixpush`, under `wrapper` (a program and its arguments, e.g. setpriv) unless it is empty, with none of
/// [`FOREIGN_ENV`] inherited.
pub fn isolated_nixpush(wrapper: &[&str]) -> Command {
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(NIXPUSH);
            c
        }
        None => Command::new(NIXPUSH),
    };
    for var in FOREIGN_ENV {
        command.env_remove(var);
    }
    command
}

/// `nixpush --config CONFIG doctor --json` as [`isolated_nixpush`] runs it, with Nix's configuration read from
/// `nix_conf_dir/nix.conf` alone.
pub fn doctor_command(wrapper: &[&str], config: &Path, nix_conf_dir: &Path) -> Command {
    let mut command = isolated_nixpush(wrapper);
    command
        .env("NIX_CONF_DIR", nix_conf_dir)
        .env("NIX_USER_CONF_FILES", nix_conf_dir.join("none.conf"))
        .arg("--config")
        .arg(config)
        .args(["doctor", "--json"]);
    command
}

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
    /// Upstream caches are off unless `extra` names some: no test traffic leaves 127.0.0.1. GC roots go to
    /// [`TestEnv::gc_roots_dir`] unless `extra` sets `gc_roots_dir`, so no test daemon touches the real
    /// `/nix/var/nix/gcroots/nixpush` (nor another test daemon's roots).
    pub fn write_config_with(&self, extra: &str, target: &str) {
        let upstream = if extra.contains("upstream") {
            ""
        } else {
            "upstream = []\n"
        };
        let gc_roots = if extra.contains("gc_roots_dir") {
            String::new()
        } else {
            format!("gc_roots_dir = \"{}\"\n", self.gc_roots_dir().display())
        };
        let text = format!(
            "socket = \"{}\"\nstate_dir = \"{}\"\n{upstream}{gc_roots}{extra}\n[target]\n{target}\n",
            self.socket.display(),
            self.state_dir.display(),
        );
        fs::write(&self.config_path, text).unwrap();
    }

    /// Where the daemon keeps its GC roots unless the configuration says otherwise: inside the test's
    /// directory, where Nix's collector does not look.
    pub fn gc_roots_dir(&self) -> PathBuf {
        self.dir.path().join("gcroots")
    }

    /// The default `file://` target's directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// `nixpush --config … ARGS`.
    pub fn nixpush(&self, args: &[&str]) -> Output {
        output(
            Command::new(NIXPUSH)
                .arg("--config")
                .arg(&self.config_path)
                .args(args),
        )
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
        output(&mut self.hook_command(out_paths, drv_path))
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

/// A running `nixpush daemon --hold` in a [`TestEnv`]. Dropping it, also when the test fails, sends SIGTERM, then
/// SIGKILL after a grace period, and reaps the process.
pub struct TestDaemon {
    child: Option<Guard>,
    /// Where it runs; dropped after the daemon is stopped.
    pub env: TestEnv,
    log: PathBuf,
    starts: u32,
    hold: bool,
    /// Variables set in the daemon's environment (on every start), beside the test process's own.
    vars: Vec<(String, String)>,
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

    /// [`TestDaemon::start_uploading`] with `vars` added to the daemon's environment, an empty value removing
    /// the variable (credentials for a target, without changing the test process's environment).
    pub fn start_uploading_with_env(env: TestEnv, vars: &[(&str, &str)]) -> TestDaemon {
        TestDaemon::launch_with(env, false, vars)
    }

    fn launch(env: TestEnv, hold: bool) -> TestDaemon {
        TestDaemon::launch_with(env, hold, &[])
    }

    fn launch_with(env: TestEnv, hold: bool, vars: &[(&str, &str)]) -> TestDaemon {
        let mut daemon = TestDaemon {
            log: env.dir.path().join("daemon.log"),
            env,
            child: None,
            starts: 0,
            hold,
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
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
        let notify = notify_socket(&notify_path);
        let mut command = Command::new(NIXPUSH);
        for (name, value) in &self.vars {
            if value.is_empty() {
                command.env_remove(name);
            } else {
                command.env(name, value);
            }
        }
        daemon_command(
            &mut command,
            &self.env.config_path,
            self.hold,
            &notify_path,
            &self.log,
        );
        self.child = Some(Guard::spawn(&mut command, "nixpush daemon"));
        let log = self.log.clone();
        wait_ready(
            &notify,
            || self.child.as_mut().unwrap().try_wait(),
            || fs::read_to_string(&log).unwrap_or_default(),
        );
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().pid()
    }

    /// Sends `signal` (e.g. `HUP`) to the daemon.
    pub fn signal(&self, signal: &str) {
        assert!(send_signal(self.pid(), signal), "cannot send SIG{signal}");
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// SIGTERM and wait for the exit status; fails the test (and the drop kills the daemon) if it does not exit.
    pub fn stop(&mut self) -> ExitStatus {
        let status = self.child.as_mut().expect("daemon not running").stop();
        self.child = None;
        status
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

/// A bound sd_notify socket at `path` whose reads time out, so that a wait for `READY=1` can look at the daemon
/// between them.
pub fn notify_socket(path: &Path) -> UnixDatagram {
    let notify = UnixDatagram::bind(path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    notify
}

/// Adds to `command` (`nixpush`, or a wrapper that runs it) what every test daemon runs with: `--config CONFIG
/// daemon [--hold]`, sd_notify to `notify`, debug logs appended to `log`, and none of the systemd variables the
/// test itself may have been started with.
pub fn daemon_command(command: &mut Command, config: &Path, hold: bool, notify: &Path, log: &Path) {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    command
        .arg("--config")
        .arg(config)
        .arg("daemon")
        .args(hold.then_some("--hold"))
        .env("NOTIFY_SOCKET", notify)
        .env("RUST_LOG", "debug")
        .env_remove("LISTEN_FDS")
        .env_remove("WATCHDOG_USEC")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
}

/// Waits for `READY=1` on `notify`; fails with `log()` if the daemon exits first (`exited` returns its status)
/// or [`DEADLINE`] passes.
pub fn wait_ready(
    notify: &UnixDatagram,
    mut exited: impl FnMut() -> Option<ExitStatus>,
    log: impl Fn() -> String,
) {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(n) = notify.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]);
            if message.lines().any(|line| line == "READY=1") {
                return;
            }
        }
        if let Some(status) = exited() {
            panic!("daemon exited with {status} before READY=1:\n{}", log());
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no READY=1 within {DEADLINE:?}:\n{}",
            log()
        );
    }
}

/// The JSON summary printed by a `nixpush push --json` run that succeeded; fails the test if it failed or if
/// `secret` shows in anything it printed.
pub fn push_summary(out: &Output, secret: &str) -> Value {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains(secret) && !stderr.contains(secret));
    serde_json::from_str(&stdout).unwrap()
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
