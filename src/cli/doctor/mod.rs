//! `nixpush doctor [--json]`: the troubleshooting guide run as checks. Each check passes, warns (worth a look,
//! not wrong everywhere), fails (with the fix), or is skipped because it does not apply or depends on one that
//! failed; the exit status is 0 unless one failed ([`EXIT_CODES_HELP`]). Checks are data ([`report::Check`]), so
//! scripts and tests look them up by name:
//!
//! ```text
//! pass  config              /etc/nixpush/config.toml is valid
//! pass  daemon              pid 812, up 3h 02m; target idle: queue empty
//! FAIL  post-build-hook     Nix's post-build-hook is /usr/local/bin/old-hook, not nixpush-hook
//!       fix: set `post-build-hook = /usr/bin/nixpush-hook` in /etc/nix/nix.conf (NixOS:
//!            services.nixpush.enable = true), then restart nix-daemon
//! warn  substituter         https://cache.example/ is in neither substituters nor trusted-substituters …
//! skip  token-file          no auth_token_file configured
//! ```
//!
//! doctor only looks: it never writes to the target or creates a directory, and every check that waits on
//! something gets at most 5 s ([`deadline`]). The checks of the target depend on its kind ([`checks_target`]).

mod checks_local;
mod checks_nix;
mod checks_target;
mod deadline;
mod nix_settings;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use crate::config::{Config, DEFAULT_CONFIG_PATH};

use checks_local::{
    check_daemon, check_failed_paths, check_last_upload, check_signing_key, check_spool,
    check_token_file,
};
use checks_nix::{check_hook, check_public_key, check_substituter};
use checks_target::{check_cache_info, check_target};
use nix_settings::NixSettings;
use report::{all_ok, render, Check, Verdict};

/// The exit codes and what fails versus warns, for `doctor --help`.
pub(super) const EXIT_CODES_HELP: &str = "\
Exit status:
  0  no check failed (warnings and skipped checks do not count)
  1  a check failed: its fix is printed under it
Warnings, not failures: `substituter` when the target is not among Nix's substituters, and
`trusted-public-key` when the key is not trusted on a machine that does not substitute from the target
(a push-only machine such as CI). Every other check fails when something is wrong.
Each check waits at most 5 s, saying on stderr what it waits for after 1 s; doctor writes nothing.";

/// Arguments of `doctor`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the checks as JSON: `{"ok":…,"checks":[{"name":…,"outcome":"pass|warn|fail|skip","detail":…,"fix":…}]}`.
    #[arg(long)]
    json: bool,
}

pub(super) fn run(config_path: Option<&Path>, args: Args) -> anyhow::Result<ExitCode> {
    let checks = run_checks(config_path)?;
    let ok = all_ok(&checks);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Verdict {
                ok,
                checks: &checks
            })?
        );
    } else {
        print!("{}", render(&checks));
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The checks that need a valid configuration, in the order they are printed after `config`.
const NEED_CONFIG: [&str; 11] = [
    "daemon",
    "post-build-hook",
    "substituter",
    "signing-key",
    "trusted-public-key",
    "token-file",
    "target",
    "cache-info",
    "spool",
    "failed-paths",
    "last-upload",
];

/// Runs every check, in the order they are printed.
fn run_checks(config_path: Option<&Path>) -> anyhow::Result<Vec<Check>> {
    let nix = NixSettings::read();
    let path = config_path
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let (config_check, config) = match Config::load(&path) {
        Ok(config) => (
            Check::pass("config", format!("{} is valid", path.display())),
            Some(config),
        ),
        Err(e) => (
            Check::fail(
                "config",
                e.to_string(),
                format!(
                    "write a valid configuration to {} (`nixpush check-config {}` names the field at fault; \
                     examples/ has one per backend), or pass --config FILE",
                    path.display(),
                    path.display()
                ),
            ),
            None,
        ),
    };
    let hook = check_hook(&nix);
    let Some(config) = config else {
        let mut checks = vec![config_check];
        for name in NEED_CONFIG {
            if name == "post-build-hook" {
                checks.push(hook.clone());
            } else {
                checks.push(Check::skip(name, "needs a valid configuration"));
            }
        }
        return Ok(checks);
    };

    let (daemon, report) = check_daemon(&config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let each = config.each_target();
    let mut per_target = Vec::new();
    for (name, view) in &each {
        let (token, credentials) = check_token_file(view);
        let (target, info) = runtime.block_on(check_target(view, credentials.clone()));
        let cache_info = runtime.block_on(check_cache_info(view, credentials, info.is_some()));
        let (signing_key, key) = check_signing_key(view, &nix);
        let checks = [
            check_substituter(view, info.as_ref(), &nix),
            signing_key,
            check_public_key(view, key.as_ref(), info.as_ref(), &nix),
            token,
            target,
            cache_info,
        ];
        per_target.extend(checks.into_iter().map(|check| {
            if each.len() > 1 {
                check.about(name)
            } else {
                check
            }
        }));
    }
    let now = SystemTime::now();
    let mut checks = vec![config_check, daemon, hook];
    checks.extend(per_target);
    checks.extend([
        check_spool(&config, report.is_some(), now),
        check_failed_paths(report.as_ref()),
        check_last_upload(report.as_ref(), now),
    ]);
    Ok(checks)
}
