//! The Python servers of `tests/servers/` (the Cachix and S3 stand-ins), each owned by a process guard.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::process::{output, wait_until_within, Guard};

/// The Python that has the servers' packages: `NIXPUSH_TEST_PYTHON` if set, else the virtual environment
/// `scripts/install-test-deps` makes (Debian's own Python refuses `pip install`), else `python3` from `PATH`.
pub fn python3() -> PathBuf {
    if let Some(python) = std::env::var_os("NIXPUSH_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")));
    cache
        .map(|cache| cache.join("nixpush/test-venv/bin/python3"))
        .filter(|venv| venv.exists())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

fn servers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers")
}

/// Runs `tests/servers/SCRIPT` (a server's self-test against real Nix), which must report no failure.
pub fn assert_selftest_passes(script: &str) {
    let out = output(Command::new(python3()).arg(servers_dir().join(script)));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{script}: {stdout}");
}

/// A Python server from `tests/servers/`, on 127.0.0.1; stopped when dropped.
pub struct PyServer {
    _child: Guard,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PyServer {
    /// Starts `script` with `args` plus `--port-file`, and waits (up to 60 s) for the port file.
    pub fn start(script: &str, args: &[&str]) -> PyServer {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let mut child = Guard::spawn(
            Command::new(python3())
                .arg(servers_dir().join(script))
                .args(args)
                .arg("--port-file")
                .arg(&port_file)
                .stdout(Stdio::null()),
            script,
        );
        // Importing moto alone takes many seconds on a loaded machine.
        wait_until_within(
            &format!("{script} to listen"),
            Duration::from_secs(180),
            || {
                if let Some(status) = child.try_wait() {
                    panic!("{script} exited with {status} before it listened");
                }
                port_file.exists()
            },
        );
        let port = std::fs::read_to_string(&port_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        PyServer {
            _child: child,
            port,
            _dir: dir,
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The Cachix test server with the caches in `config` (see `cachix_server.py`).
pub struct CachixServer {
    pub server: PyServer,
    client: reqwest::Client,
}

impl CachixServer {
    pub fn start(config: serde_json::Value) -> CachixServer {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), config.to_string()).unwrap();
        let server = PyServer::start(
            "cachix_server.py",
            &["--config", file.path().to_str().unwrap()],
        );
        CachixServer {
            server,
            client: reqwest::Client::new(),
        }
    }

    pub fn base(&self) -> String {
        self.server.base()
    }

    pub async fn control(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let mut request = self
            .client
            .request(method, format!("{}/_control/{path}", self.base()));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        assert!(
            response.status().is_success(),
            "control {path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    pub async fn faults(&self, faults: serde_json::Value) {
        self.control(reqwest::Method::POST, "faults", Some(faults))
            .await;
    }

    pub async fn stored(&self, cache: &str) -> Vec<String> {
        let v = self
            .control(reqwest::Method::GET, &format!("paths/{cache}"), None)
            .await;
        serde_json::from_value(v).unwrap()
    }

    pub async fn uploads(&self, cache: &str) -> serde_json::Value {
        let state = self.control(reqwest::Method::GET, "state", None).await;
        state["caches"][cache]["uploads"].clone()
    }

    pub async fn log(&self) -> Vec<serde_json::Value> {
        serde_json::from_value(self.control(reqwest::Method::GET, "log", None).await).unwrap()
    }
}
