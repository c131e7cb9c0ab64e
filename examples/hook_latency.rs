//! Hook latency: runs `nixpush-hook` once per line of a file, each time for a fresh registered store path (so the
//! daemon really writes and syncs), interleaved with runs of a baseline program (`/bin/true`) and, when given, a
//! peer's hook client; prints the wall-time distribution of each and the differences. Used by
//! `benches/hook_bench.sh`.
//!
//! ```text
//! hook_latency [--drv] HOOK PATHS_FILE [BASELINE] [PEER]   (NIXPUSH_SOCKET / NIXPUSH_SPOOL pass through)
//! ```
//!
//! Each line of PATHS_FILE is an output path, sent as `OUT_PATHS` with `DRV_PATH` empty. With `--drv` each line
//! is `DRV OUT`: nixpush-hook gets `DRV_PATH=DRV` and an empty `OUT_PATHS`, as Nix 2.8 sends them, and the peer
//! (which cannot resolve a derivation) gets `OUT_PATHS=OUT`.

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

fn quiet(program: &str) -> Command {
    let mut command = Command::new(program);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let drv_mode = args.first().is_some_and(|a| a == "--drv");
    if drv_mode {
        args.remove(0);
    }
    if args.len() < 2 {
        eprintln!("usage: hook_latency [--drv] HOOK PATHS_FILE [BASELINE] [PEER]");
        std::process::exit(2);
    }
    let hook = &args[0];
    let lines = std::fs::read_to_string(&args[1]).expect("cannot read the paths file");
    let baseline = args.get(2).map(String::as_str).unwrap_or("/bin/true");
    let peer = args.get(3).map(String::as_str);
    let mut times: Vec<(&str, Vec<Duration>)> = vec![(baseline, Vec::new()), (hook, Vec::new())];
    if let Some(peer) = peer {
        times.push((peer, Vec::new()));
    }
    let mut runs = 0;
    for line in lines.lines().filter(|l| !l.is_empty()) {
        let (drv, out) = match line.split_once(' ') {
            Some((drv, out)) if drv_mode => (drv, out),
            _ => ("", line),
        };
        runs += 1;
        times[0].1.push(time(&mut quiet(baseline)));
        // stderr stays visible: the hook prints only when it had to spool, which the bench must show.
        let mut command = quiet(hook);
        command.stderr(Stdio::inherit());
        if drv_mode {
            command.env("DRV_PATH", drv).env("OUT_PATHS", "");
        } else {
            command.env("DRV_PATH", "").env("OUT_PATHS", out);
        }
        times[1].1.push(time(&mut command));
        if let Some(peer) = peer {
            times[2]
                .1
                .push(time(quiet(peer).env("OUT_PATHS", out).env("DRV_PATH", drv)));
        }
    }
    for (_, t) in times.iter_mut() {
        t.sort();
    }
    let name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_owned();
    println!(
        "runs: {runs} each, interleaved{}",
        if drv_mode {
            " (nixpush-hook: fresh DRV_PATH, empty OUT_PATHS)"
        } else {
            " (fresh OUT_PATHS)"
        }
    );
    println!(
        "| program | median (ms) | p90 (ms) | p99 (ms) | max (ms) | median − {0} (ms) | p99 − {0} (ms) |",
        name(baseline)
    );
    println!("|---|---|---|---|---|---|---|");
    let base = &times[0].1;
    for (program, t) in &times {
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:+.3} | {:+.3} |",
            name(program),
            ms(percentile(t, 0.5)),
            ms(percentile(t, 0.9)),
            ms(percentile(t, 0.99)),
            ms(*t.last().unwrap_or(&Duration::ZERO)),
            ms(percentile(t, 0.5)) - ms(percentile(base, 0.5)),
            ms(percentile(t, 0.99)) - ms(percentile(base, 0.99)),
        );
    }
    println!(
        "overhead: median {:.3} ms, p99 {:.3} ms",
        ms(percentile(&times[1].1, 0.5)) - ms(percentile(base, 0.5)),
        ms(percentile(&times[1].1, 0.99)) - ms(percentile(base, 0.99)),
    );
    if let Some((peer, t)) = times.get(2) {
        println!(
            "nixpush-hook vs {}: median {:+.3} ms (goal ≤ +0.5 ms)",
            name(peer),
            ms(percentile(&times[1].1, 0.5)) - ms(percentile(t, 0.5)),
        );
    }
}
