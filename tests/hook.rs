//! The hook as a user sees it in a build's output (#19): one short line per build while the daemon is down, and
//! other post-build hooks kept with `NIXPUSH_HOOK_CHAIN`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::util::{self, TestDaemon, TestEnv, HOOK, NIX_OPTIONS};

// See: #19
#[test]
fn hook_says_daemon_down_once_per_build_and_briefly() {
    let env = TestEnv::new();
    let build = util::nix_build_with_hook(&env);
    assert!(build.output.status.success(), "{}", build.stderr());
    // Both derivations were spooled, but the build log says so once.
    assert_eq!(env.spool_files().len(), 2, "{}", build.stderr());
    let log = build.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("nixpush-hook:"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    // Short: the temporary spool directory aside, it fits in a terminal line (it used to be ~200 characters).
    let spool = env.spool_dir.display().to_string();
    let length = lines[0].replace(&spool, "").len();
    assert!(length <= 100, "{length} characters: {}", lines[0]);
    assert!(lines[0].contains("daemon unreachable"), "{}", lines[0]);

    // A second build is told again.
    let again = util::nix_build_with_hook(&env);
    let log = again.stderr();
    assert_eq!(
        log.lines().filter(|l| l.contains("nixpush-hook:")).count(),
        1,
        "{log}"
    );
    assert_eq!(env.spool_files().len(), 4);
}

/// A hook script that appends its `DRV_PATH` to `record` and exits with `status`.
fn hook_script(dir: &std::path::Path, name: &str, record: &std::path::Path, status: u8) -> String {
    let path = dir.join(name);
    fs::write(
        &path,
        format!(
            "#!/bin/sh\necho \"$DRV_PATH ${{NIXPUSH_HOOK_CHAIN:-unset}}\" >> {}\nexit {status}\n",
            record.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path.to_str().unwrap().to_owned()
}

// See: #19
#[test]
fn hook_runs_chained_hooks_after_queueing_and_ignores_their_failure() {
    let daemon = TestDaemon::start();
    let scripts = daemon.env.dir.path();
    let record = scripts.join("chain.log");
    let failing = hook_script(scripts, "failing-hook", &record, 3);
    let passing = hook_script(scripts, "passing-hook", &record, 0);

    let nonce = util::fresh_nonce();
    let build = Command::new("nix-build")
        .arg(util::hooktest_nix())
        .args(["--argstr", "nonce", &nonce])
        .args(NIX_OPTIONS)
        .args(["--option", "substituters", ""])
        .args(["--option", "post-build-hook", HOOK])
        .arg("--no-out-link")
        .envs(daemon.env.hook_env())
        .env("NIXPUSH_HOOK_CHAIN", format!("{failing}:{passing}"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&build.stderr);
    assert!(
        build.status.success(),
        "a chained hook failed the build:\n{stderr}"
    );

    // Both hooks ran for both derivations, in order, without the variable (no loops), after nixpush queued.
    let ran = fs::read_to_string(&record).unwrap();
    let lines: Vec<&str> = ran.lines().collect();
    assert_eq!(lines.len(), 4, "{ran}");
    for line in &lines {
        assert!(line.ends_with(".drv unset"), "{ran}");
    }
    assert_eq!(lines[0], lines[1], "{ran}");
    assert_eq!(daemon.status()["queued"], 3, "{stderr}");
    let reported: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("nixpush-hook: chained hook"))
        .collect();
    assert_eq!(reported.len(), 2, "{stderr}");
    assert!(
        reported[0].contains("failing-hook") && reported[0].contains("exit status: 3"),
        "{stderr}"
    );

    // A chained program that does not exist is reported, and the hook still exits 0.
    let output = daemon
        .env
        .hook_command(
            &[],
            Some("/nix/store/00000000000000000000000000000000-none.drv"),
        )
        .env("NIXPUSH_HOOK_CHAIN", "/nonexistent/hook")
        .output()
        .unwrap();
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot run /nonexistent/hook"), "{stderr}");
}

// See: #19
#[test]
fn hook_never_writes_its_notice_through_a_planted_symlink() {
    let env = TestEnv::new();
    fs::create_dir_all(&env.spool_dir).unwrap();
    let victim = env.dir.path().join("victim");
    fs::write(&victim, "precious").unwrap();
    let uid = fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    std::os::unix::fs::symlink(&victim, env.spool_dir.join(format!(".notice-{uid}"))).unwrap();
    let build = util::nix_build_with_hook(&env);
    assert!(build.output.status.success(), "{}", build.stderr());
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(env.spool_files().len(), 2);
}
