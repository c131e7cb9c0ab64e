//! Enqueue throughput: CLIENTS threads send enqueue requests for the paths listed in PATHS_FILE, each request on a
//! new connection (as hooks do), and wait for every acknowledgement, which the daemon sends only after the paths
//! are synced to disk. The paths must be real, registered store paths not yet queued (`nix-store --add` of fresh
//! files): the daemon refuses anything Nix has not registered. Used by `benches/hook_bench.sh`.
//!
//! ```text
//! enqueue_bench SOCKET PATHS_FILE [CLIENTS=32] [PATHS_PER_REQUEST=1]
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixpush::protocol::{self, Request, Response};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: enqueue_bench SOCKET PATHS_FILE [CLIENTS] [PATHS_PER_REQUEST]");
        std::process::exit(2);
    }
    let socket = PathBuf::from(&args[1]);
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (clients, per_request) = (arg(3, 32), arg(4, 1));
    let paths: Arc<Vec<String>> = Arc::new(
        std::fs::read_to_string(&args[2])
            .expect("cannot read PATHS_FILE")
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
    );
    let total = paths.len();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (paths, next, socket) = (paths.clone(), next.clone(), socket.clone());
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                loop {
                    let first = next.fetch_add(per_request, Ordering::SeqCst);
                    if first >= paths.len() {
                        return latencies;
                    }
                    let batch = paths[first..(first + per_request).min(paths.len())].to_vec();
                    let sent = batch.len();
                    let request = Request::Enqueue {
                        drv_path: None,
                        out_paths: batch,
                        source: "bench".into(),
                    };
                    let t = Instant::now();
                    match protocol::call(&socket, &request, Duration::from_secs(30)) {
                        // Every path must be newly queued: a refused or duplicate one did no durable write.
                        Ok(Response::Ack { accepted, .. }) if accepted.len() == sent => {}
                        other => panic!("unexpected answer: {other:?}"),
                    }
                    latencies.push(t.elapsed());
                }
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
    };
    println!(
        "{total} paths, {clients} clients, {per_request} path(s)/request: {:.2} s, {:.0} paths/s; \
         ack latency median {:.2} ms, p99 {:.2} ms",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.99)
    );
}
