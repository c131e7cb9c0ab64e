//! Signals: SIGTERM and SIGINT become one [`CancellationToken`], SIGHUP becomes a reload request.
//!
//! We use signal-hook's iterator on a dedicated std thread (the design card's crate) rather than
//! `tokio::signal`: the handlers are installed before the runtime exists, so a signal that arrives during startup
//! is not lost, and this module is the only place in nixpush that touches signals. A second SIGTERM or SIGINT
//! while draining exits at once; that loses nothing, because every acknowledged request was flushed before its
//! acknowledgement.
//!
//! The daemon drains in this order: stop accepting; answer the requests already read; let other tasks reach a
//! safe point; flush the queue; `STOPPING=1`; remove the socket; exit 0 (see `daemon::run`).

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Why the signal handlers could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Registering the handlers failed.
    #[error("cannot install signal handlers: {0}")]
    Install(std::io::Error),
    /// The forwarding thread could not start.
    #[error("cannot start the signal thread: {0}")]
    Thread(std::io::Error),
}

/// What the daemon listens to: cancelled on SIGTERM/SIGINT; one message per SIGHUP.
pub struct Shutdown {
    /// Cancelled when the daemon should stop.
    pub token: CancellationToken,
    /// Receives one `()` per reload request.
    pub reload: mpsc::UnboundedReceiver<()>,
}

impl Shutdown {
    /// A shutdown not tied to signals, for embedding and tests; returns the sender for reload requests.
    pub fn manual() -> (Shutdown, mpsc::UnboundedSender<()>) {
        let (tx, reload) = mpsc::unbounded_channel();
        (
            Shutdown {
                token: CancellationToken::new(),
                reload,
            },
            tx,
        )
    }
}

/// Keeps the signal thread alive; dropping it stops forwarding.
pub struct SignalGuard {
    handle: Handle,
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        self.handle.close();
    }
}

/// Installs the handlers and starts the forwarding thread.
pub fn install() -> Result<(Shutdown, SignalGuard), Error> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(Error::Install)?;
    let handle = signals.handle();
    let (shutdown, reload) = Shutdown::manual();
    let token = shutdown.token.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                match signal {
                    SIGHUP => {
                        tracing::info!("SIGHUP: reloading configuration");
                        let _ = reload.send(());
                    }
                    _ if token.is_cancelled() => {
                        tracing::warn!("second stop signal: exiting without draining");
                        std::process::exit(1);
                    }
                    _ => {
                        tracing::info!(signal, "stop signal: draining");
                        token.cancel();
                    }
                }
            }
        })
        .map_err(Error::Thread)?;
    Ok((shutdown, SignalGuard { handle }))
}
