//! The hook socket: the one systemd passes (socket activation), or one bound at `socket` with care: the parent
//! directory is created, a path that is not a socket is never unlinked, a socket with a live daemon behind it is
//! left alone, and mode and group are set from the configuration.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something other than a socket is in the way.
    #[error("{path} exists and is not a socket; refusing to remove it")]
    NotASocket {
        /// The configured socket path.
        path: PathBuf,
    },
    /// A daemon answers on the socket already.
    #[error("another daemon is running: {path} accepts connections")]
    AlreadyRunning {
        /// The socket path.
        path: PathBuf,
    },
    /// A filesystem or socket call failed.
    #[error("cannot {action} {path}: {source}")]
    Setup {
        /// What was being done, e.g. "bind".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// `socket_group` names no group.
    #[error("socket_group {name:?} does not exist")]
    UnknownGroup {
        /// The configured group.
        name: String,
    },
    /// The inherited file descriptor is unusable.
    #[error("cannot use the socket passed by systemd: {0}")]
    Activation(io::Error),
}

/// A listening socket and whether we must remove its path on exit.
#[derive(Debug)]
pub struct Listener {
    /// The socket.
    pub socket: UnixListener,
    /// The path we bound, removed at exit; `None` for a socket systemd owns.
    pub bound_path: Option<PathBuf>,
}

impl Listener {
    /// Where the socket lives, for logs.
    pub fn describe(&self) -> String {
        match &self.bound_path {
            Some(path) => path.display().to_string(),
            None => "the socket passed by systemd".to_owned(),
        }
    }
}

/// The socket systemd passed, or else a freshly bound one.
pub fn listen(config: &Config) -> Result<Listener, Error> {
    match crate::systemd::activated_listener().map_err(Error::Activation)? {
        Some(socket) => {
            socket.set_nonblocking(true).map_err(Error::Activation)?;
            Ok(Listener {
                socket,
                bound_path: None,
            })
        }
        None => bind(config),
    }
}

/// Binds `config.socket`, replacing only a stale socket, and applies `socket_mode` and `socket_group`.
pub fn bind(config: &Config) -> Result<Listener, Error> {
    let path = &config.socket;
    let setup = |action, path: &Path| {
        let path = path.to_owned();
        move |source| Error::Setup {
            action,
            path,
            source,
        }
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(setup("create the directory", parent))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(Error::NotASocket { path: path.clone() })
        }
        Ok(_) => match crate::protocol::connect(path, Duration::from_millis(500)) {
            Err(crate::protocol::Error::Connect { source, .. })
                if source.kind() == io::ErrorKind::ConnectionRefused =>
            {
                tracing::info!(socket = %path.display(), "removing stale socket");
                fs::remove_file(path).map_err(setup("remove the stale socket", path))?;
            }
            _ => return Err(Error::AlreadyRunning { path: path.clone() }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(setup("inspect", path)(e)),
    }
    let socket = UnixListener::bind(path).map_err(setup("bind", path))?;
    socket
        .set_nonblocking(true)
        .map_err(setup("configure", path))?;
    let listener = Listener {
        socket,
        bound_path: Some(path.clone()),
    };
    // `validate()` checked the mode already; fall back to the safest mode rather than failing here.
    let mode = config.socket_mode_bits().unwrap_or(0o600);
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(setup("set the mode of", path))?;
    if let Some(name) = &config.socket_group {
        let group = nix::unistd::Group::from_name(name)
            .map_err(|e| setup("look up the group of", path)(e.into()))?
            .ok_or_else(|| Error::UnknownGroup { name: name.clone() })?;
        nix::unistd::chown(path.as_path(), None, Some(group.gid))
            .map_err(|e| setup("change the group of", path)(e.into()))?;
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        Config {
            socket: dir.join("run/nixpush.sock"),
            socket_mode: "0660".into(),
            ..Config::default()
        }
    }

    #[test]
    fn binds_replaces_stale_and_refuses_live_or_foreign() {
        let tmp = tempfile::tempdir().unwrap();
        let config = config(tmp.path());
        let first = bind(&config).unwrap();
        let mode = fs::metadata(&config.socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(bind(&config), Err(Error::AlreadyRunning { .. })));
        drop(first);
        // The socket file is still there, but nobody listens: stale, so it is replaced.
        let second = bind(&config).unwrap();
        drop(second);
        fs::remove_file(&config.socket).unwrap();
        fs::write(&config.socket, b"precious").unwrap();
        assert!(matches!(bind(&config), Err(Error::NotASocket { .. })));
        assert_eq!(fs::read(&config.socket).unwrap(), b"precious");
    }
}
