//! Hook latency: runs `nixpush-hook` once per store path listed in a file (each run queues a fresh path, so each
//! pays for a real fsync), interleaved with runs of a baseline program (`/bin/true`), and prints the wall-time
//! distribution of both and the difference. Used by `benches/hook_bench.sh`.
//!
//! ```text
//! hook_latency HOOK PATHS_FILE [BASELINE]     (NIXPUSH_SOCKET / NIXPUSH_SPOOL pass through)
//! ```

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn time(command: &mut Command) -> Duration {
    let started = Instant::now();
    let status = command.status().expect("cannot run the program");
    let elapsed = started.elapsed();
    assert!(status.success(), "{command:?} failed: {status}");
    elapsed
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: hook_latency HOOK PATHS_FILE [BASELINE]");
        std::process::exit(2);
    }
    let hook = &args[1];
    let paths = std::fs::read_to_string(&args[2]).expect("cannot read the paths file");
    let paths: Vec<&str> = paths.lines().filter(|l| !l.is_empty()).collect();
    let baseline = args.get(3).map(String::as_str).unwrap_or("/bin/true");
    let (mut hook_times, mut base_times) = (Vec::new(), Vec::new());
    for path in &paths {
        base_times.push(time(
            Command::new(baseline)
                .stdin(Stdio::null())
                .stderr(Stdio::null()),
        ));
        let mut command = Command::new(hook);
        command
            .env("OUT_PATHS", path)
            .env("DRV_PATH", "")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        hook_times.push(time(&mut command));
    }
    hook_times.sort();
    base_times.sort();
    println!("runs: {} each, interleaved", paths.len());
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>9}",
        "", "median", "p90", "p99", "max"
    );
    for (name, times) in [(baseline, &base_times), ("nixpush-hook", &hook_times)] {
        println!(
            "{:<14} {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms",
            name.rsplit('/').next().unwrap_or(name),
            ms(percentile(times, 0.5)),
            ms(percentile(times, 0.9)),
            ms(percentile(times, 0.99)),
            ms(*times.last().unwrap_or(&Duration::ZERO)),
        );
    }
    println!(
        "overhead: median {:.3} ms, p99 {:.3} ms",
        ms(percentile(&hook_times, 0.5)) - ms(percentile(&base_times, 0.5)),
        ms(percentile(&hook_times, 0.99)) - ms(percentile(&base_times, 0.99)),
    );
}
