//! Upload rates (#18) and the truth of `push`'s progress (#19): a rate-0 window holds, SIGHUP lifts it, a cap
//! slows a push, and in a real terminal the bar counts bytes on the wire and Ctrl-C stops cleanly.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::cache::{assert_every_narinfo_has_its_nar, narinfo_file};
use crate::harness::daemon::{TestDaemon, TestEnv, NIXPUSH};
use crate::harness::nix::build_paths;
use crate::harness::process::{output, wait_until, wait_until_within};
use crate::harness::setup::{configure_signed_target, file_url, HttpCache};

/// A window around the local time now, one hour either side (it may cross midnight).
fn window_around_now() -> (String, String) {
    let now = chrono::Local::now().naive_local().time();
    let from = now - chrono::Duration::hours(1);
    let to = now + chrono::Duration::hours(1);
    (
        from.format("%H:%M").to_string(),
        to.format("%H:%M").to_string(),
    )
}

// See: #18
#[test]
fn a_window_with_rate_zero_holds_and_sighup_to_a_higher_rate_lets_it_finish() {
    let env = TestEnv::new();
    let url = file_url(&env);
    let (from, to) = window_around_now();
    let held = format!("rate_schedule = [{{ from = \"{from}\", to = \"{to}\", rate = \"0\" }}]\n");
    configure_signed_target(&env, &url, &held);
    let paths = build_paths(env.dir.path(), "held", 1 << 20);
    let daemon = TestDaemon::start_uploading(env);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    assert!(daemon.env.run_hook(&refs, None).status.success());
    daemon.env.nixpush(&["status"]);
    wait_until("the target shows as held", || {
        let status = daemon.status();
        status["queued"].as_u64() == Some(paths.len() as u64)
            && status["target"]["state"] == "hold"
            && status["target"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(&format!("held by rate_schedule until {to}")))
    });
    let status = daemon.status();
    let rate = &status["target"]["upload_rate"];
    assert_eq!(rate["held"], true, "{status}");
    assert_eq!(rate["limit_bytes_per_sec"], 0, "{status}");
    assert_eq!(
        rate["source"],
        format!("rate_schedule {from}–{to}"),
        "{status}"
    );
    assert_eq!(rate["next_change_local"], to.as_str(), "{status}");
    let text = String::from_utf8(daemon.env.nixpush(&["status"]).stdout).unwrap();
    assert!(text.contains("HELD by rate_schedule"), "{text}");
    // Absence can only be shown over time: the daemon has had the work for a while, and across several looks
    // nothing reaches the cache and nothing is in flight.
    let cache = daemon.env.cache_dir();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        for path in &paths {
            assert!(
                !narinfo_file(&cache, path).exists(),
                "{path} arrived while held"
            );
        }
        let status = daemon.status();
        assert_eq!(
            status["in_flight_uploads"],
            serde_json::json!([]),
            "{status}"
        );
        assert_eq!(status["target"]["state"], "hold", "{status}");
    }

    let open = format!(
        "max_upload_rate = \"1MiB/s\"\nrate_schedule = [{{ from = \"{from}\", to = \"{to}\", rate = \"64MiB/s\" }}]\n"
    );
    configure_signed_target(&daemon.env, &url, &open);
    daemon.signal("HUP");
    let status = daemon.wait_drained();
    for path in &paths {
        assert!(
            narinfo_file(&cache, path).exists(),
            "{path} missing after the hold"
        );
    }
    assert_eq!(assert_every_narinfo_has_its_nar(&cache), paths.len());
    let rate = &status["target"]["upload_rate"];
    assert_eq!(rate["held"], false, "{status}");
    assert_eq!(rate["limit_bytes_per_sec"], 64 << 20, "{status}");
    assert!(
        daemon.log().contains("upload rate 64.0 MiB/s"),
        "{}",
        daemon.log()
    );
}

// See: #18
#[test]
fn a_rate_cap_slows_a_push_to_the_wire() {
    // A lower bound only, so load cannot make it flake: without a working limiter a 3 MiB local push takes well
    // under a second; at 1 MiB/s it cannot take less than about 3 s (the bucket starts empty, bursts are 64 KiB).
    let env = TestEnv::new();
    let url = file_url(&env);
    configure_signed_target(&env, &url, "max_upload_rate = \"1MiB/s\"\n");
    let paths = build_paths(env.dir.path(), "capped", 3 << 20);
    let started = Instant::now();
    let mut args = vec!["push", "--no-closure", "--compression", "none"];
    args.extend(paths.iter().map(String::as_str));
    let out = env.nixpush(&args);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took >= Duration::from_secs_f64(3.0 * 0.6), "{took:?}");
    assert_eq!(
        assert_every_narinfo_has_its_nar(&env.cache_dir()),
        paths.len()
    );
}

/// A tmux server of its own, killed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn start(dir: &Path, command: &str) -> Tmux {
        let tmux = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let out = output(tmux.command().args([
            "new-session",
            "-d",
            "-s",
            "push",
            "-x",
            "200",
            "-y",
            "50",
            command,
        ]));
        assert!(
            out.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tmux
    }

    fn command(&self) -> Command {
        let mut command = Command::new("tmux");
        command.arg("-S").arg(&self.socket);
        command
    }

    fn capture(&self) -> String {
        let out =
            output(
                self.command()
                    .args(["capture-pane", "-p", "-J", "-S", "-", "-t", "push"]),
            );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ctrl_c(&self) {
        assert!(
            output(self.command().args(["send-keys", "-t", "push", "C-c"]))
                .status
                .success()
        );
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = output(self.command().arg("kill-server"));
    }
}

/// `14.6 MiB/40.0 MiB` on the overall bar line (the one with `ETA`), in bytes.
fn overall_bytes(screen: &str) -> Option<(f64, f64)> {
    let line = screen
        .lines()
        .rev()
        .find(|l| l.contains("ETA") && l.contains('['))?;
    let after_bar = &line[line.find(']')? + 1..];
    let (done, rest) = after_bar.trim_start().split_once('/')?;
    let total: String = rest
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    Some((bytes(done.trim())?, bytes(&total)?))
}

fn bytes(text: &str) -> Option<f64> {
    let (number, unit) = text.trim().split_once(' ')?;
    let n: f64 = number.parse().ok()?;
    let factor = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(n * factor)
}

fn push_in_tmux(env: &TestEnv, extra_args: &str, paths: &[String], exit_file: &Path) -> Tmux {
    // The shell traps SIGINT (a handler, reset for the child at exec) so Ctrl-C reaches nixpush and the shell
    // lives on to record its exit status.
    let command = format!(
        "trap true INT; {NIXPUSH} --config {} push --no-closure {extra_args} {}; echo $? > {}; sleep 600",
        env.config_path.display(),
        paths.join(" "),
        exit_file.display()
    );
    Tmux::start(env.dir.path(), &command)
}

// See: #19
#[test]
fn in_a_terminal_the_bar_counts_bytes_on_a_throttled_link_and_ctrl_c_stops_cleanly() {
    // Part 1: HTTP through a loopback link of 4 MiB/s. The NAR is ready long before its bytes are through,
    // so a bar that counted preparation would read full at once. 48 MiB, so the bytes the client's kernel still
    // buffers when the bar counts them sent (its send buffer, up to tcp_wmem's 4 MiB) stay a small share.
    let env = TestEnv::new();
    let http = HttpCache::start(env.dir.path());
    http.proxy.throttle(4 << 20);
    configure_signed_target(&env, &http.url(), "");
    let paths = build_paths(env.dir.path(), "wire", 48 << 20);
    let exit_file = env.dir.path().join("exit-1");
    let started = Instant::now();
    let tmux = push_in_tmux(&env, "--compression none", &paths, &exit_file);
    let mut screens: Vec<(Duration, String)> = Vec::new();
    wait_until_within(
        "the push over the throttled link ends",
        Duration::from_secs(300),
        || {
            screens.push((started.elapsed(), tmux.capture()));
            std::thread::sleep(Duration::from_millis(200));
            exit_file.exists()
        },
    );
    let wall = started.elapsed();
    let last = tmux.capture();
    assert_eq!(
        std::fs::read_to_string(&exit_file).unwrap().trim(),
        "0",
        "{last}"
    );
    let quarter = wall / 4;
    let (_, screen) = screens
        .iter()
        .rev()
        .find(|(at, s)| *at <= quarter && overall_bytes(s).is_some())
        .unwrap_or_else(|| panic!("no progress bar on screen before {quarter:?}: {last}"));
    let (done, total) = overall_bytes(screen).unwrap();
    assert!(total >= (48 << 20) as f64, "{screen}");
    assert!(
        done < total / 2.0,
        "at {quarter:?} of {wall:?} the bar read {done}/{total}:\n{screen}"
    );
    assert!(
        screen.contains('#') || screen.contains('-'),
        "a real bar: {screen}"
    );
    let header = screen
        .find("to upload")
        .unwrap_or_else(|| panic!("no closure header: {screen}"));
    let per_path = screen.find("upload ").or_else(|| screen.find("hash+zstd"));
    assert!(
        per_path.is_none_or(|p| p > header),
        "header first: {screen}"
    );
    drop(tmux);

    // Part 2: file:// at 1 MiB/s; Ctrl-C while the big NAR is being written into the cache.
    let url = file_url(&env);
    configure_signed_target(&env, &url, "max_upload_rate = \"1MiB/s\"\n");
    let paths = build_paths(env.dir.path(), "interrupted", 16 << 20);
    let exit_file = env.dir.path().join("exit-2");
    let tmux = push_in_tmux(&env, "--compression none", &paths, &exit_file);
    let nar_dir = env.cache_dir().join("nar");
    let temporaries = || -> Vec<String> {
        std::fs::read_dir(&nar_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".nixpush-tmp-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_until("the big NAR is being written into the cache", || {
        !temporaries().is_empty() && tmux.capture().contains("zstd→cache")
    });
    tmux.ctrl_c();
    wait_until("push exits after Ctrl-C", || exit_file.exists());
    let screen = tmux.capture();
    assert_eq!(
        std::fs::read_to_string(&exit_file).unwrap().trim(),
        "130",
        "{screen}"
    );
    assert!(screen.contains("interrupted:"), "{screen}");
    assert!(screen.contains("not uploaded:"), "{screen}");
    assert!(temporaries().is_empty(), "left behind: {:?}", temporaries());
    let big = paths.last().unwrap();
    assert!(!narinfo_file(&env.cache_dir(), big).exists());
    assert!(screen.contains(&format!("not uploaded: {big}")), "{screen}");
}
