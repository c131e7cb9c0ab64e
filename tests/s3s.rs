//! `s3s-fs`, a real S3 server (SigV4 checked, 403 `SignatureDoesNotMatch` for a wrong secret, conditional PUT,
//! multipart) that keeps each bucket as a directory, started on 127.0.0.1 for the tests. Installed by
//! `scripts/install-test-deps` (`cargo install s3s-fs --features binary`, into `~/.cargo/bin`).
//!
//! Debian's Nix 2.8 has no S3 store, and s3s-fs serves no anonymous reads, so Nix reads what nixpush wrote from
//! the bucket's directory as a `file://` binary cache: the objects are plain files at `ROOT/BUCKET/KEY`
//! (s3s-fs keeps its own metadata beside the bucket directories, at `ROOT/.…`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key id and secret the server accepts; the same pair as the `[nixpush]` profile of
/// `s3::shared_credentials_file`.
pub const ACCESS_KEY: &str = "AKTEST";
/// See [`ACCESS_KEY`].
pub const SECRET_KEY: &str = "s3cr3t";

/// A running `s3s-fs`; killed when dropped.
pub struct S3sFs {
    child: Child,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// The data directory: one subdirectory per bucket.
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

/// The `s3s-fs` binary: `~/.cargo/bin` (where `cargo install` puts it), else `PATH`.
fn binary() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    cargo_home
        .map(|home| home.join("bin/s3s-fs"))
        .filter(|b| b.exists())
        .unwrap_or_else(|| PathBuf::from("s3s-fs"))
}

impl S3sFs {
    /// Starts the server with `buckets` (created as directories) and waits (up to 60 s) until it listens.
    pub fn start(buckets: &[&str]) -> S3sFs {
        S3sFs::start_with_keys(buckets, ACCESS_KEY, SECRET_KEY)
    }

    /// [`S3sFs::start`], accepting only the key pair `access_key`, `secret_key`. s3s-fs checks the SigV4
    /// signature (which covers `X-Amz-Security-Token`) but keeps no list of session tokens, so any token passes.
    pub fn start_with_keys(buckets: &[&str], access_key: &str, secret_key: &str) -> S3sFs {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        for bucket in buckets {
            std::fs::create_dir_all(root.join(bucket)).unwrap();
        }
        std::fs::create_dir_all(&root).unwrap();
        let log = dir.path().join("s3s-fs.log");
        let mut child = Command::new(binary())
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--access-key", access_key, "--secret-key", secret_key])
            .arg(&root)
            .env("RUST_LOG", "s3s_fs=info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs must be installed (scripts/install-test-deps)");
        // It logs "server is running at http://127.0.0.1:PORT" once it listens.
        let deadline = Instant::now() + Duration::from_secs(60);
        let port = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let port = text
                .split("server is running at http://")
                .nth(1)
                .and_then(|rest| {
                    let addr: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                        .collect();
                    addr.rsplit(':').next()?.parse::<u16>().ok()
                });
            if let Some(port) = port {
                break port;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("s3s-fs exited with {status} before it listened:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen within 60 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        S3sFs {
            child,
            port,
            root,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The directory holding `bucket`'s objects.
    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.join(bucket)
    }

    /// The bucket as a binary cache URL real Nix reads.
    pub fn nix_url(&self, bucket: &str) -> String {
        format!("file://{}", self.bucket_dir(bucket).display())
    }

    /// `nixpush push` to `bucket` on this server (path-style, us-east-1) signed with `signing_key`, upstream
    /// caches not asked; the caller adds the paths, the keys and the rest.
    pub fn push_command(&self, bucket: &str, signing_key: &Path) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nixpush"));
        command
            .arg("push")
            .arg("--target")
            .arg(format!(
                "s3://{bucket}?endpoint={}&region=us-east-1",
                self.base()
            ))
            .arg("--signing-key-file")
            .arg(signing_key)
            .arg("--no-upstream");
        command
    }

    /// `bucket` on this server (path-style, us-east-1) and the keys it accepts, for requests signed straight to it
    /// as another client would sign them.
    pub fn signer(&self, bucket: &str) -> (rusty_s3::Bucket, rusty_s3::Credentials) {
        let bucket = rusty_s3::Bucket::new(
            url::Url::parse(&self.base()).unwrap(),
            rusty_s3::UrlStyle::Path,
            bucket.to_owned(),
            "us-east-1".to_owned(),
        )
        .unwrap();
        (bucket, rusty_s3::Credentials::new(ACCESS_KEY, SECRET_KEY))
    }

    /// Multipart uploads the server still holds (its `.upload-<id>.json` records), by upload id.
    pub fn open_uploads(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.root)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                let id = name.strip_prefix(".upload-")?.strip_suffix(".json")?;
                Some(id.to_owned())
            })
            .collect();
        ids.sort();
        ids
    }

    /// Stored parts of unfinished multipart uploads (`.upload_id-<id>.part-<n>`).
    pub fn stored_parts(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".upload_id-"))
            .collect()
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
