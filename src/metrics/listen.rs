//! Where `/metrics` is served: `metrics_listen = "127.0.0.1:9464"` (an IP address and port) or an absolute Unix
//! socket path. Nothing is bound unless the key is set. A socket path is bound with the hook socket's care: a
//! file that is not a socket is never removed, a live socket is left alone, a stale one is replaced, and the mode
//! is 0660 (the daemon's user and group; a scraper on the same host joins the group).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a metrics socket file.
pub const SOCKET_MODE: u32 = 0o660;

/// A parsed `metrics_listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// TCP on this address and port (port 0: any free port, logged at start).
    Tcp(SocketAddr),
    /// A Unix socket at this path.
    Unix(PathBuf),
}

impl Address {
    /// Parses the configuration value; the error says what is expected.
    pub fn parse(value: &str) -> Result<Address, String> {
        if value.starts_with('/') {
            return Ok(Address::Unix(PathBuf::from(value)));
        }
        value.parse::<SocketAddr>().map(Address::Tcp).map_err(|_| {
            format!(
                "{value:?} is neither IP:PORT (e.g. \"127.0.0.1:9464\" or \"[::1]:9464\") nor an absolute \
                 Unix socket path"
            )
        })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(addr) => write!(f, "{addr}"),
            Address::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Why `metrics_listen` could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on metrics_listen = {address:?}: {problem}")]
pub struct Error {
    /// The configured value.
    pub address: String,
    /// What went wrong.
    pub problem: String,
}

/// A bound metrics listener. A socket file we bound is removed when this is dropped.
#[derive(Debug)]
pub enum Bound {
    /// A TCP listener.
    Tcp(tokio::net::TcpListener),
    /// A Unix listener and the path it owns.
    Unix(tokio::net::UnixListener, SocketFile),
}

impl Bound {
    /// Where it listens, the port resolved when 0 was asked for.
    pub fn describe(&self) -> String {
        match self {
            Bound::Tcp(listener) => listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "TCP".to_owned()),
            Bound::Unix(_, file) => file.0.display().to_string(),
        }
    }
}

/// The socket path we bound; removed on drop.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::warn!("cannot remove metrics socket {}: {e}", self.0.display());
        }
    }
}

/// Binds `value` (a `metrics_listen` value) on the current runtime.
pub fn bind(value: &str) -> Result<Bound, Error> {
    let fail = |problem: String| Error {
        address: value.to_owned(),
        problem,
    };
    match Address::parse(value).map_err(fail)? {
        Address::Tcp(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|e| fail(e.to_string()))?;
            tokio::net::TcpListener::from_std(listener)
                .map(Bound::Tcp)
                .map_err(|e| fail(e.to_string()))
        }
        Address::Unix(path) => bind_unix(&path)
            .map(|(listener, file)| Bound::Unix(listener, file))
            .map_err(fail),
    }
}

fn bind_unix(path: &Path) -> Result<(tokio::net::UnixListener, SocketFile), String> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(format!(
                "{} exists and is not a socket; refusing to remove it",
                path.display()
            ))
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .map_err(|e| format!("cannot remove the stale socket: {e}"))?;
            }
            Err(e) => return Err(format!("cannot check the existing socket: {e}")),
            Ok(_) => return Err("another process accepts connections there".to_owned()),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.to_string()),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| e.to_string())?;
    let file = SocketFile(path.to_owned());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| format!("cannot set the mode: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| e.to_string())?;
    Ok((listener, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_ip_and_port_or_a_socket_path() {
        assert_eq!(
            Address::parse("127.0.0.1:9464"),
            Ok(Address::Tcp("127.0.0.1:9464".parse().unwrap()))
        );
        assert!(matches!(Address::parse("[::1]:9464"), Ok(Address::Tcp(_))));
        assert_eq!(
            Address::parse("/run/nixpush/metrics.sock"),
            Ok(Address::Unix("/run/nixpush/metrics.sock".into()))
        );
        for bad in ["localhost:9464", "9464", "metrics.sock", ""] {
            let e = Address::parse(bad).unwrap_err();
            assert!(e.contains("IP:PORT"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn a_socket_path_is_bound_0660_and_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let bound = bind(path.to_str().unwrap()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        let e = bind(path.to_str().unwrap()).unwrap_err().to_string();
        assert!(
            e.contains("metrics_listen") && e.contains("accepts connections"),
            "{e}"
        );
        drop(bound);
        assert!(!path.exists());
        std::fs::write(&path, b"keep").unwrap();
        let e = bind(path.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }
}
