//! Enqueue throughput: CLIENTS threads send enqueue requests for TOTAL distinct paths, each request on a new
//! connection (as hooks do), and wait for every acknowledgement, which the daemon sends only after the paths are
//! flushed to disk. The paths are empty files with valid store path names in STORE_DIR, which must be the
//! daemon's `store_dir`. Used by `benches/hook_bench.sh`.
//!
//! ```text
//! enqueue_bench SOCKET STORE_DIR [TOTAL=20000] [CLIENTS=32] [PATHS_PER_REQUEST=1]
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixpush::protocol::{self, Request, Response};

fn store_path(store_dir: &str, run: u64, i: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut n = (run << 24) ^ i as u64;
    let hash: String = (0..32)
        .map(|_| {
            let c = ALPHABET[(n % 32) as usize] as char;
            n /= 32;
            c
        })
        .collect();
    format!("{store_dir}/{hash}-bench-{i}")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: enqueue_bench SOCKET STORE_DIR [TOTAL] [CLIENTS] [PATHS_PER_REQUEST]");
        std::process::exit(2);
    }
    let socket = PathBuf::from(&args[1]);
    let store_dir = args[2].trim_end_matches('/').to_owned();
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (total, clients, per_request) = (arg(3, 20_000), arg(4, 32), arg(5, 1));
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let paths: Arc<Vec<String>> =
        Arc::new((0..total).map(|i| store_path(&store_dir, run, i)).collect());
    for path in paths.iter() {
        std::fs::write(path, b"").expect("cannot create a path in STORE_DIR");
    }
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
    for path in paths.iter() {
        let _ = std::fs::remove_file(path);
    }
}
