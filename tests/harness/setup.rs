//! The setup the end-to-end tests share: a target signed with the test key, either a `file://` directory or an
//! nginx cache reached through the fault proxy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::daemon::TestEnv;
use super::faultproxy::{Fault, FaultProxy};
use super::keys::signing_key_file;
use super::nginx::Nginx;

/// nginx serving `www/` with an empty cache at `/cache`, behind a [`FaultProxy`]. Stopped on drop.
pub struct HttpCache {
    /// Faults nothing unless told to (or started [`HttpCache::with_faults`]).
    pub proxy: FaultProxy,
    /// The real server.
    pub nginx: Nginx,
    /// What nginx serves.
    pub www: PathBuf,
}

impl HttpCache {
    /// An nginx cache in `dir/www`, behind a proxy that forwards everything.
    pub fn start(dir: &Path) -> HttpCache {
        HttpCache::with_faults(dir, 0.0, &[Fault::ServerError], Duration::ZERO, 1)
    }

    /// An nginx cache in `dir/www`, behind a proxy that fails a share `rate` of requests with `faults` in turn
    /// (see [`FaultProxy::start`]).
    pub fn with_faults(
        dir: &Path,
        rate: f64,
        faults: &[Fault],
        stall: Duration,
        seed: u64,
    ) -> HttpCache {
        let www = dir.join("www");
        std::fs::create_dir_all(www.join("cache")).unwrap();
        let nginx = Nginx::start(&www, "");
        let proxy = FaultProxy::start(nginx.port, rate, faults, stall, seed);
        HttpCache { proxy, nginx, www }
    }

    /// The cache's directory on disk.
    pub fn dir(&self) -> PathBuf {
        self.www.join("cache")
    }

    /// The cache's URL through the proxy: what the daemon or engine under test uses.
    pub fn url(&self) -> String {
        format!("{}/cache", self.proxy.url())
    }

    /// The cache's URL straight to nginx: what the checks by real Nix use.
    pub fn direct_url(&self) -> String {
        format!("{}/cache", self.nginx.url())
    }
}

/// Writes `env`'s configuration with `url` as the target, signed with the test key (copied into `env`), and
/// `extra` lines added to `[target]`.
pub fn configure_signed_target(env: &TestEnv, url: &str, extra: &str) {
    env.write_config_with("", &signed_target(env, url, extra));
}

/// The body of a `[target]` table for `url`, signed with the test key (copied into `env`), plus `extra` lines.
pub fn signed_target(env: &TestEnv, url: &str, extra: &str) -> String {
    let key = signing_key_file(env.dir.path());
    format!(
        "url = \"{url}\"\nsigning_key_file = \"{}\"\n{extra}",
        key.display()
    )
}

/// `file://` URL of `env`'s default cache directory.
pub fn file_url(env: &TestEnv) -> String {
    format!("file://{}", env.cache_dir().display())
}
