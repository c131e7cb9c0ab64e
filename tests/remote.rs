//! Helpers for the remote backend tests (Cachix, S3): the Python servers of `tests/servers/` and store paths made
//! by real Nix, ready to upload the way the engine hands them over (a compressed NAR in a file plus a signed
//! narinfo).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixpush::backend::NarFile;
use nixpush::config::Compression;
use nixpush::hash::Sha256Hash;
use nixpush::narinfo::{self, NarInfo};
use nixpush::signing::SecretKey;
use nixpush::store_path::StorePath;

pub const BUILD_OPTS: [&str; 6] = [
    "--option",
    "build-users-group",
    "",
    "--option",
    "sandbox",
    "false",
];

fn servers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers")
}

/// A Python server from `tests/servers/`, on 127.0.0.1; killed when dropped.
pub struct PyServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PyServer {
    /// Starts `script` with `args` plus `--port-file`, and waits (up to 60 s) for the port file.
    pub fn start(script: &str, args: &[&str]) -> PyServer {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let mut child = Command::new("python3")
            .arg(servers_dir().join(script))
            .args(args)
            .arg("--port-file")
            .arg(&port_file)
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 must be installed (scripts/install-test-deps)");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !port_file.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{script} exited with {status} before it listened");
            }
            assert!(
                Instant::now() < deadline,
                "{script} did not start within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let port = std::fs::read_to_string(&port_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        PyServer {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A fresh key pair made by Nix: (secret key file, public key text).
pub fn nix_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let (sec, public) = (
        dir.join(format!("{name}.sec")),
        dir.join(format!("{name}.pub")),
    );
    run(Command::new("nix-store")
        .arg("--generate-binary-cache-key")
        .arg(name)
        .arg(&sec)
        .arg(&public));
    (sec, std::fs::read_to_string(public).unwrap())
}

/// Builds a fresh two-derivation closure (`<tag>-dep` ← `<tag>-top`, with a deriver and references) plus an
/// added file of `big_bytes` random bytes, and returns every path, references first.
pub fn build_paths(dir: &Path, tag: &str, big_bytes: usize) -> Vec<String> {
    let nonce: u64 = rand::random();
    let expr = dir.join(format!("{tag}.nix"));
    std::fs::write(
        &expr,
        format!(
            "let dep = derivation {{ name = \"{tag}-dep\"; system = builtins.currentSystem; builder = \"/bin/sh\";\n\
             args = [\"-c\" \"echo {nonce} > $out\"]; }};\n\
             in derivation {{ name = \"{tag}-top\"; system = builtins.currentSystem; builder = \"/bin/sh\";\n\
             args = [\"-c\" \"echo ${{dep}} > $out\"]; }}\n"
        ),
    )
    .unwrap();
    let top = run(Command::new("nix-build")
        .arg(&expr)
        .arg("--no-out-link")
        .args(BUILD_OPTS)
        .args(["--option", "substituters", ""]));
    let top = top.lines().last().unwrap().to_owned();
    let mut paths: Vec<String> = run(Command::new("nix-store").args(["-q", "--requisites", &top]))
        .lines()
        .map(str::to_owned)
        .collect();
    let big = dir.join(format!("{tag}-big-{nonce}"));
    let bytes: Vec<u8> = (0..big_bytes).map(|_| rand::random::<u8>()).collect();
    std::fs::write(&big, bytes).unwrap();
    paths.push(run(Command::new("nix-store").arg("--add").arg(&big)));
    paths
}

/// A path ready to upload: what the engine would hand a backend.
pub struct Prepared {
    pub narinfo: NarInfo,
    pub file: tempfile::NamedTempFile,
    pub size: u64,
    pub sha256: Sha256Hash,
}

impl Prepared {
    pub fn nar(&self) -> NarFile<'_> {
        NarFile {
            path: self.file.path(),
            size: self.size,
            sha256: self.sha256,
        }
    }
}

/// The NAR of `path` from `nix-store --dump`, compressed, described by a narinfo built from `nix-store -q` and
/// signed with `key`.
pub fn prepare(path: &str, compression: Compression, key: Option<&SecretKey>) -> Prepared {
    let nar = Command::new("nix-store")
        .args(["--dump", path])
        .output()
        .unwrap()
        .stdout;
    let nar_hash = Sha256Hash::of(&nar);
    assert_eq!(
        nar_hash.to_typed_base32(),
        run(Command::new("nix-store").args(["-q", "--hash", path]))
    );
    let compressed = match compression {
        Compression::Zstd => zstd::encode_all(&nar[..], 3).unwrap(),
        Compression::Xz => {
            let mut out = Vec::new();
            let mut encoder = xz2::write::XzEncoder::new(&mut out, 6);
            std::io::Write::write_all(&mut encoder, &nar).unwrap();
            encoder.finish().unwrap();
            out
        }
        Compression::None => nar.clone(),
    };
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &compressed).unwrap();
    let sha256 = Sha256Hash::of(&compressed);
    let store_path = StorePath::parse(path, "/nix/store").unwrap();
    let references = run(Command::new("nix-store").args(["-q", "--references", path]))
        .lines()
        .map(|r| StorePath::parse(r, "/nix/store").unwrap())
        .collect();
    let deriver = run(Command::new("nix-store").args(["-q", "--deriver", path]));
    let mut narinfo = NarInfo {
        store_path,
        url: narinfo::nar_url(&sha256, compression),
        compression: compression.narinfo_name().to_owned(),
        file_hash: Some(sha256),
        file_size: Some(compressed.len() as u64),
        nar_hash,
        nar_size: nar.len() as u64,
        references,
        deriver: (deriver != "unknown-deriver")
            .then(|| StorePath::parse(&deriver, "/nix/store").unwrap()),
        sigs: Vec::new(),
        ca: None,
    };
    if let Some(key) = key {
        narinfo.sign(key);
    }
    Prepared {
        narinfo,
        file,
        size: compressed.len() as u64,
        sha256,
    }
}

/// `nix copy --from URL` of `paths` into a fresh store root, trusting only `public_key`. Returns whether every
/// path arrived, and Nix's stderr.
pub fn nix_copy_from(url: &str, public_key: &str, paths: &[String]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let out = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--from",
            url,
            "--to",
        ])
        .arg(&root)
        .args(["--option", "trusted-public-keys", public_key.trim()])
        .args(["--option", "narinfo-cache-negative-ttl", "0"])
        .args(paths)
        // A private narinfo cache per run: Nix remembers answers per cache URL.
        .env("XDG_CACHE_HOME", dir.path().join("xdg"))
        .output()
        .unwrap();
    let arrived = paths
        .iter()
        .all(|p| root.join(p.trim_start_matches('/')).exists());
    (
        out.status.success() && arrived,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
