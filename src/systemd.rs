//! The small part of systemd's protocol the daemon speaks, without linking libsystemd: `sd_notify` datagrams
//! (`READY=1`, `STATUS=…`, `STOPPING=1`, `WATCHDOG=1`) to `$NOTIFY_SOCKET`, the watchdog interval from
//! `$WATCHDOG_USEC`, and a socket-activated listener from `$LISTEN_FDS`.
//!
//! ```text
//! NOTIFY_SOCKET=/run/systemd/notify   (or @/org/freedesktop/systemd1/notify for an abstract socket)
//! WATCHDOG_USEC=30000000              → ping every 15 s
//! LISTEN_FDS=1 LISTEN_PID=<our pid>   → fd 3 is the listening hook socket
//! ```

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::time::Duration;

/// Sends `state` (newline-separated `KEY=value` lines) to `$NOTIFY_SOCKET`. Returns `Ok(false)` when not
/// running under systemd.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var("NOTIFY_SOCKET") {
        Ok(address) if !address.is_empty() => notify_to(&address, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to the notification socket `address`: a path, or `@name` for an abstract socket.
pub fn notify_to(address: &str, state: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let addr = match address.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(address)?,
    };
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, if the watchdog is on and meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// The listening socket systemd passed (socket activation), if any.
pub fn activated_listener() -> io::Result<Option<UnixListener>> {
    listenfd::ListenFd::from_env().take_unix_listener(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_path_and_abstract_sockets() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1\nSTATUS=ok").unwrap();
        let mut buf = [0; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=ok");

        let name = format!("nixpush-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&format!("@{name}"), "WATCHDOG=1").unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
}
