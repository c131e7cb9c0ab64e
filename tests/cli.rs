//! Command-line habits a new user expects (#19): completions and a man page, `--json` where scripts need it,
//! exit codes in every `--help`, `push CACHE PATH…` as `cachix push` takes it, and `status` failing when the cache
//! is not up to date.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

use crate::remote::CachixServer;
use crate::util::{self, TestDaemon, TestEnv, NIXPUSH};

fn nixpush(args: &[&str]) -> Output {
    Command::new(NIXPUSH)
        .args(args)
        .env_remove("NIXPUSH_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

// See: #19
#[test]
fn cli_completion_scripts_parse_in_their_shells() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, check) in [
        ("bash", vec!["bash", "-n"]),
        ("zsh", vec!["zsh", "-n"]),
        ("fish", vec!["fish", "--no-execute"]),
    ] {
        let out = nixpush(&["completions", shell]);
        assert!(out.status.success(), "completions {shell}");
        let script = dir.path().join(format!("nixpush.{shell}"));
        std::fs::write(&script, &out.stdout).unwrap();
        let text = stdout(&out);
        // Every subcommand is offered.
        for sub in [
            "push",
            "status",
            "retry",
            "doctor",
            "check-config",
            "completions",
        ] {
            assert!(text.contains(sub), "{shell} completion lacks {sub}");
        }
        // scripts/install-test-deps installs all three; a machine without one skips only that shell.
        if !have(check[0]) {
            eprintln!(
                "{} is not installed: not parsing its completion script",
                check[0]
            );
            continue;
        }
        let parsed = Command::new(check[0])
            .args(&check[1..])
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            parsed.status.success(),
            "{shell} rejects its completion script: {}",
            String::from_utf8_lossy(&parsed.stderr)
        );
    }
    // The checks would notice a broken script.
    let broken = dir.path().join("broken.bash");
    std::fs::write(
        &broken,
        "complete -F _nixpush nixpush\n_nixpush() { if then; }\n",
    )
    .unwrap();
    assert!(!Command::new("bash")
        .arg("-n")
        .arg(&broken)
        .status()
        .unwrap()
        .success());
}

/// `man -l` output as plain text.
fn render_man(page: &Path) -> String {
    let out = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .env("MAN_KEEP_FORMATTING", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "man -l {}: {}",
        page.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // man may still embolden with backspaces when stdout is not a terminal.
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut plain = String::new();
    for c in text.chars() {
        if c == '\u{8}' {
            plain.pop();
        } else {
            plain.push(c);
        }
    }
    plain
}

// See: #19
#[test]
fn cli_man_pages_render() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("nixpush.1");
    let out = nixpush(&["man"]);
    assert!(out.status.success());
    std::fs::write(&page, &out.stdout).unwrap();
    let text = render_man(&page);
    for section in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "SUBCOMMANDS",
        "Exit status",
    ] {
        assert!(text.contains(section), "no {section} in\n{text}");
    }

    let pages = dir.path().join("man1");
    assert!(nixpush(&["man", "--dir", pages.to_str().unwrap()])
        .status
        .success());
    let push = render_man(&pages.join("nixpush-push.1"));
    assert!(push.contains("--workers"), "{push}");
    assert!(push.contains("every path is in the cache"), "{push}");
    let groff = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(pages.join("nixpush-status.1"))
        .output()
        .unwrap();
    assert!(
        groff.status.success() && groff.stderr.is_empty(),
        "groff warns: {}",
        String::from_utf8_lossy(&groff.stderr)
    );
}

// See: #19
#[test]
fn cli_every_help_lists_its_exit_codes() {
    let top = stdout(&nixpush(&["--help"]));
    assert!(top.contains("Exit status:"), "{top}");
    let subcommands: Vec<String> = top
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();
    assert!(subcommands.len() >= 12, "{subcommands:?}");
    for sub in &subcommands {
        let help = stdout(&nixpush(&[sub, "--help"]));
        assert!(
            help.contains("Exit status:\n  0  "),
            "`nixpush {sub} --help` lacks exit codes:\n{help}"
        );
    }
    let status = stdout(&nixpush(&["status", "--help"]));
    for code in ["  3  ", "  4  ", "  5  ", "  6  "] {
        assert!(status.contains(code), "{status}");
    }
}

// See: #19
#[test]
fn cli_verify_retry_and_check_config_speak_json() {
    let paths = util::add_store_paths(1);
    let out = nixpush(&[
        "verify",
        "--json",
        &paths[0],
        "/nix/store/00000000000000000000000000000000-gone",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let verdicts: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdicts[0]["path"], paths[0].as_str());
    assert_eq!(verdicts[0]["status"], "ok");
    assert!(verdicts[0]["nar_hash"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert_eq!(verdicts[1]["status"], "not-valid");
    // The text form is unchanged.
    let text = stdout(&nixpush(&["verify", &paths[0]]));
    assert!(
        text.starts_with(&format!("ok {} sha256:", paths[0])),
        "{text}"
    );

    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let good = nixpush(&[
        "check-config",
        "--json",
        fixtures.join("config-good.toml").to_str().unwrap(),
    ]);
    assert!(good.status.success());
    let good: Value = serde_json::from_slice(&good.stdout).unwrap();
    assert_eq!(good["ok"], true);
    assert!(good["config"]["target"]["url"].is_string(), "{good}");
    let typo = nixpush(&[
        "check-config",
        "--json",
        fixtures.join("config-typo.toml").to_str().unwrap(),
    ]);
    assert_eq!(typo.status.code(), Some(1));
    let typo: Value = serde_json::from_slice(&typo.stdout).unwrap();
    assert_eq!(typo["ok"], false);
    assert!(
        typo["error"].as_str().unwrap().contains("compresion"),
        "{typo}"
    );
    let dir = tempfile::tempdir().unwrap();
    let zero = dir.path().join("zero.toml");
    std::fs::write(&zero, "[target]\nurl = \"file:///c\"\nworkers = 0\n").unwrap();
    let zero: Value = serde_json::from_slice(
        &nixpush(&["check-config", "--json", zero.to_str().unwrap()]).stdout,
    )
    .unwrap();
    assert_eq!(zero["field"], "target.workers", "{zero}");

    let daemon = TestDaemon::start();
    let retry = daemon.env.nixpush(&["retry", "--all", "--json"]);
    assert!(retry.status.success());
    let retry: Value = serde_json::from_slice(&retry.stdout).unwrap();
    assert_eq!(retry, serde_json::json!({ "requeued": [] }));
}

/// `nixpush --config CONFIG push ARGS` with `stdin` piped in when given.
fn push(config: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(NIXPUSH)
        .arg("--config")
        .arg(config)
        .arg("push")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn narinfo_exists(cache: &Path, path: &str) -> bool {
    let name = path.trim_start_matches("/nix/store/");
    cache.join(format!("{}.narinfo", &name[..32])).exists()
}

// See: #19
#[test]
fn cli_push_takes_the_cache_first_paths_from_a_pipe_and_j() {
    let env = TestEnv::new();
    let other = env.dir.path().join("other-cache");
    let paths = util::add_store_paths(2);

    // `nixpush push CACHE PATH`, the cache a URL.
    let out = push(
        &env.config_path,
        &[&format!("file://{}", other.display()), "-j", "1", &paths[0]],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(narinfo_exists(&other, &paths[0]));
    assert!(!narinfo_exists(&env.cache_dir(), &paths[0]));

    // Paths from a pipe, to the configured target.
    let out = push(
        &env.config_path,
        &["--json"],
        Some(&format!("{}\n", paths[1])),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["uploaded"], 1, "{summary}");
    assert!(narinfo_exists(&env.cache_dir(), &paths[1]));

    // A bare name is a Cachix cache: the configured one (with its API and token) or another on the same API.
    let server = CachixServer::start(json!({"caches": [
        {"name": "mycache", "signing": "managed", "tokens": {"write-token-1": "write"}},
        {"name": "othercache", "signing": "managed", "tokens": {"write-token-1": "write"}},
    ]}));
    let token = env.dir.path().join("token");
    std::fs::write(&token, "write-token-1").unwrap();
    let cachix = env.dir.path().join("cachix.toml");
    std::fs::write(
        &cachix,
        format!(
            "upstream = []\nstate_dir = \"{}\"\n[target]\nurl = \"cachix://mycache\"\n\
             cachix_api = \"{}\"\nauth_token_file = \"{}\"\n",
            env.state_dir.display(),
            server.base(),
            token.display()
        ),
    )
    .unwrap();
    for (cache, path) in [("mycache", &paths[0]), ("othercache", &paths[1])] {
        let out = push(&cachix, &[cache, path], None);
        assert!(
            out.status.success(),
            "{cache}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stored = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(server.stored(cache));
        assert_eq!(stored, std::slice::from_ref(path), "{cache}");
    }
    // Naming the cache twice is refused.
    let out = push(
        &env.config_path,
        &["--target", "file:///x", "mycache", &paths[0]],
        None,
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not both"));
    // ./result-style links stay paths, even without a slash.
    std::os::unix::fs::symlink(&paths[0], env.dir.path().join("result")).unwrap();
    let out = Command::new(NIXPUSH)
        .current_dir(env.dir.path())
        .args([
            "--config",
            env.config_path.to_str().unwrap(),
            "push",
            "result",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(narinfo_exists(&env.cache_dir(), &paths[0]));
}

// See: #19
#[test]
fn cli_status_exits_non_zero_while_the_target_is_unreachable() {
    let env = TestEnv::new();
    // Port 9 on loopback: nothing listens, so every request is refused at once.
    env.write_config_with("", "url = \"http://127.0.0.1:9/cache\"\nretry_base_ms = 50");
    let daemon = TestDaemon::start_uploading(env);
    let paths = util::add_store_paths(1);
    let hook = daemon.env.run_hook(&[&paths[0]], None);
    assert!(hook.status.success());
    util::wait_until("the target reported unreachable", || {
        daemon.status()["target"]["state"] == "unreachable"
    });
    let human = daemon.env.nixpush(&["status"]);
    assert_eq!(human.status.code(), Some(4), "{}", stdout(&human));
    assert!(
        stdout(&human).starts_with("NOT up to date"),
        "{}",
        stdout(&human)
    );
    let json = daemon.env.nixpush(&["status", "--json"]);
    assert_eq!(json.status.code(), Some(4));

    // An empty queue is up to date whatever the target's state: exit 0.
    let idle = TestDaemon::start();
    assert_eq!(idle.env.nixpush(&["status"]).status.code(), Some(0));
}
