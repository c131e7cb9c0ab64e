//! A real nginx on 127.0.0.1 serving a directory with WebDAV PUT, started and stopped by a test.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::process::{wait_until_within, Guard};

/// nginx serving `root` at `http://127.0.0.1:<port>/`, accepting PUT. Stopped gracefully (SIGQUIT, so its
/// workers go too) on drop.
pub struct Nginx {
    _child: Guard,
    /// The port it listens on.
    pub port: u16,
    _prefix: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx serving `root`. `extra` is added inside the `server` block (more locations, auth checks).
    pub fn start(root: &Path, extra: &str) -> Nginx {
        let prefix = tempfile::tempdir().expect("nginx prefix");
        let port = free_port();
        for dir in ["logs", "tmp"] {
            std::fs::create_dir_all(prefix.path().join(dir)).unwrap();
        }
        let conf = format!(
            r#"
user root root;
worker_processes 1;
daemon off;
error_log {p}/logs/error.log warn;
pid {p}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log {p}/logs/access.log;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        {extra}
        location / {{
            root {root};
            dav_methods PUT;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
        }}
    }}
}}
"#,
            p = prefix.path().display(),
            root = root.display(),
        );
        let conf_path = prefix.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = Guard::spawn(
            Command::new("nginx")
                .arg("-p")
                .arg(prefix.path())
                .arg("-c")
                .arg(&conf_path)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit()),
            "nginx",
        )
        .stop_signal(Signal::SIGQUIT);
        wait_until_within(
            &format!("nginx to listen on {port}"),
            Duration::from_secs(10),
            || {
                assert!(child.is_running(), "nginx exited before it listened");
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            },
        );
        Nginx {
            _child: child,
            port,
            _prefix: prefix,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The access log so far.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self._prefix.path().join("logs/access.log")).unwrap_or_default()
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}
