//! A target that is down, on 127.0.0.1: a listener that either closes every connection at once (a server that is
//! gone) or accepts and never answers (a blackholed network path). It counts connections, so a test can tell how
//! often a client tried. Stopped, with every connection it holds, on drop.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What the listener does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Closes it before reading anything.
    Close,
    /// Keeps it open and never writes a byte.
    Silent,
}

/// A listener on 127.0.0.1 that never answers.
pub struct DeadEnd {
    /// The port it listens on.
    pub port: u16,
    connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl DeadEnd {
    /// Starts listening on a free port.
    pub fn start(behaviour: Behaviour) -> DeadEnd {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (connections, stop, held) = (connections.clone(), stop.clone(), held.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    match behaviour {
                        Behaviour::Close => drop(stream),
                        Behaviour::Silent => held.lock().unwrap().push(stream),
                    }
                }
            })
        };
        DeadEnd {
            port,
            connections,
            stop,
            held,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for DeadEnd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        for stream in self.held.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}
