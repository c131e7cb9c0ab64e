//! `nixpush doctor [--json]`: the troubleshooting guide run as checks. Each check passes, fails (with the fix),
//! or is skipped because it does not apply or depends on one that failed; the exit status is 0 only when none
//! failed. Checks are data ([`Check`]), so scripts and tests look them up by name:
//!
//! ```text
//! pass  config              /etc/nixpush/config.toml is valid
//! pass  daemon              pid 812, up 3h 02m; target idle: queue empty
//! FAIL  post-build-hook     Nix's post-build-hook is /usr/local/bin/old-hook, not nixpush-hook
//!       fix: set `post-build-hook = /usr/bin/nixpush-hook` in /etc/nix/nix.conf (NixOS:
//!            services.nixpush.enable = true), then restart nix-daemon
//! skip  token-file          no auth_token_file configured
//! ```
//!
//! Nix's settings come from `nix show-config` (what Nix really uses, `extra-` settings merged), or, when that
//! cannot run, from `$NIX_CONF_DIR/nix.conf` (default `/etc/nix/nix.conf`) and `$NIX_CONFIG`, the same sources
//! Nix reads.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::backend::{Backend, Credentials, Kind, Target, TargetInfo};
use crate::config::{redact_url, Config, DEFAULT_CONFIG_PATH};
use crate::protocol::{self, Request, Response};
use crate::signing::SecretKey;
use crate::status::{human_duration, StatusReport, TargetState};

/// How long the target gets to answer the authenticated request.
const TARGET_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `nix show-config` may take.
const NIX_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon gets to answer.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(5);
/// A spool file older than this is not being imported (the daemon rescans every 30 s).
const SPOOL_STALE_AFTER: Duration = Duration::from_secs(120);
/// Work waiting with no upload for this long means uploads are stuck.
const STALLED_AFTER: Duration = Duration::from_secs(3600);

/// Arguments of `doctor`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the checks as JSON: `{"ok":…,"checks":[{"name":…,"outcome":"pass|fail|skip","detail":…,"fix":…}]}`.
    #[arg(long)]
    json: bool,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// All good.
    Pass,
    /// Something is wrong; the check says how to fix it.
    Fail,
    /// Does not apply here, or cannot run because an earlier check failed.
    Skip,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable name, e.g. `post-build-hook`.
    pub name: &'static str,
    /// How it came out.
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// What to do about a failure.
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            outcome: Outcome::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            outcome: Outcome::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn skip(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            outcome: Outcome::Skip,
            detail: detail.into(),
            fix: None,
        }
    }
}

/// The JSON document `--json` prints.
#[derive(Debug, Serialize)]
struct Verdict<'a> {
    ok: bool,
    checks: &'a [Check],
}

pub(super) fn run(config_path: Option<&Path>, args: Args) -> anyhow::Result<ExitCode> {
    let checks = run_checks(config_path)?;
    let ok = checks.iter().all(|c| c.outcome != Outcome::Fail);
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

/// The checks as aligned lines, each failure followed by its fix.
fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for check in checks {
        let label = match check.outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        };
        out.push_str(&format!("{label}  {:<20}{}\n", check.name, check.detail));
        if let Some(fix) = &check.fix {
            out.push_str(&format!("      fix: {fix}\n"));
        }
    }
    let count = |o: Outcome| checks.iter().filter(|c| c.outcome == o).count();
    out.push_str(&format!(
        "\n{} passed, {} failed, {} skipped\n",
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::Skip)
    ));
    out
}

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
        for name in [
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
        ] {
            if name == "post-build-hook" {
                checks.push(hook.clone());
            } else {
                checks.push(Check::skip(name, "needs a valid configuration"));
            }
        }
        return Ok(checks);
    };

    let (daemon, report) = check_daemon(&config);
    let (token, credentials) = check_token_file(&config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (target, info) = runtime.block_on(check_target(&config, credentials.clone()));
    let cache_info = runtime.block_on(check_cache_info(&config, credentials, info.is_some()));
    let (signing_key, key) = check_signing_key(&config, &nix);
    let now = SystemTime::now();
    Ok(vec![
        config_check,
        daemon,
        hook,
        check_substituter(&config, info.as_ref(), &nix),
        signing_key,
        check_public_key(key.as_ref(), info.as_ref(), &nix),
        token,
        target,
        cache_info,
        check_spool(&config, report.is_some(), now),
        check_failed_paths(report.as_ref()),
        check_last_upload(report.as_ref(), now),
    ])
}

/// Nix's effective settings and where they came from.
#[derive(Debug, Clone)]
struct NixSettings {
    values: BTreeMap<String, String>,
    /// `nix show-config`, or the files read.
    source: String,
    /// The file a fix should edit.
    conf_file: PathBuf,
}

impl NixSettings {
    /// From `nix show-config`, falling back to the configuration files.
    fn read() -> Result<NixSettings, String> {
        let conf_dir = std::env::var_os("NIX_CONF_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/nix"));
        let conf_file = conf_dir.join("nix.conf");
        let show_config_error = match run_with_deadline(
            Command::new("nix").args([
                "--extra-experimental-features",
                "nix-command",
                "show-config",
            ]),
            NIX_TIMEOUT,
        ) {
            Ok(text) => {
                let mut values = BTreeMap::new();
                parse_nix_conf(&text, None, &mut values, 0);
                return Ok(NixSettings {
                    values,
                    source: "nix show-config".to_owned(),
                    conf_file,
                });
            }
            Err(e) => e,
        };
        let mut values = BTreeMap::new();
        let mut sources = Vec::new();
        match std::fs::read_to_string(&conf_file) {
            Ok(text) => {
                parse_nix_conf(&text, conf_file.parent(), &mut values, 0);
                sources.push(conf_file.display().to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(format!(
                    "`nix show-config` failed ({show_config_error}) and {} cannot be read: {e}",
                    conf_file.display()
                ))
            }
        }
        if let Ok(text) = std::env::var("NIX_CONFIG") {
            parse_nix_conf(&text, None, &mut values, 0);
            sources.push("$NIX_CONFIG".to_owned());
        }
        if sources.is_empty() {
            sources.push(format!("defaults ({} does not exist)", conf_file.display()));
        }
        Ok(NixSettings {
            values,
            source: sources.join(" and "),
            conf_file,
        })
    }

    fn get(&self, key: &str) -> &str {
        self.values.get(key).map(String::as_str).unwrap_or("")
    }

    fn list(&self, key: &str) -> Vec<&str> {
        self.get(key).split_whitespace().collect()
    }
}

/// Runs `command`, returning its stdout if it exits 0 within `deadline`.
fn run_with_deadline(command: &mut Command, deadline: Duration) -> Result<String, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run nix: {e}"))?;
    let mut stdout = child.stdout.take();
    // Read on a thread so a chatty child cannot block on a full pipe while we wait for it.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(out) = stdout.as_mut() {
            let _ = std::io::Read::read_to_string(out, &mut text);
        }
        text
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", deadline.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    };
    let text = reader.join().unwrap_or_default();
    if status.success() {
        Ok(text)
    } else {
        Err(format!("exited with {status}"))
    }
}

/// Parses `nix.conf` syntax (`key = value`, `#` comments, `include`/`!include FILE`, `extra-key` appending to
/// `key`) into `values`. `dir` resolves relative includes; a missing `!include` is fine, as in Nix.
fn parse_nix_conf(
    text: &str,
    dir: Option<&Path>,
    values: &mut BTreeMap<String, String>,
    depth: u32,
) {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let include = line
            .strip_prefix("!include ")
            .or_else(|| line.strip_prefix("include "));
        if let Some(file) = include {
            let file = Path::new(file.trim());
            let file = match dir {
                Some(dir) if file.is_relative() => dir.join(file),
                _ => file.to_owned(),
            };
            if depth < 10 {
                if let Ok(text) = std::fs::read_to_string(&file) {
                    parse_nix_conf(&text, file.parent(), values, depth + 1);
                }
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key.strip_prefix("extra-") {
            Some(base) => {
                let entry = values.entry(base.to_owned()).or_default();
                if !entry.is_empty() && !value.is_empty() {
                    entry.push(' ');
                }
                entry.push_str(value);
            }
            None => {
                values.insert(key.to_owned(), value.to_owned());
            }
        }
    }
}

fn check_daemon(config: &Config) -> (Check, Option<StatusReport>) {
    const NAME: &str = "daemon";
    let fix = format!(
        "start it: `systemctl start nixpush.socket nixpush.service` (or run `nixpush daemon`); the `socket` \
         setting ({}) must be the socket it listens on",
        config.socket.display()
    );
    match protocol::call(&config.socket, &Request::Status, DAEMON_TIMEOUT) {
        Ok(Response::Status(report)) => {
            let detail = format!(
                "pid {}, up {}; target {}: {}",
                report.daemon.pid,
                human_duration(report.daemon.uptime_secs),
                report.target.state.as_str(),
                report.target.message
            );
            (Check::pass(NAME, detail), Some(*report))
        }
        Ok(other) => (
            Check::fail(
                NAME,
                format!(
                    "unexpected answer from {}: {other:?}",
                    config.socket.display()
                ),
                fix,
            ),
            None,
        ),
        Err(e) => (
            Check::fail(
                NAME,
                format!(
                    "cannot reach the daemon at {}: {e}",
                    config.socket.display()
                ),
                fix,
            ),
            None,
        ),
    }
}

/// The `nixpush-hook` next to this program, which is what Nix should run.
fn suggested_hook() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("nixpush-hook")))
        .filter(|hook| hook.exists())
        .map(|hook| hook.display().to_string())
        .unwrap_or_else(|| "/run/current-system/sw/bin/nixpush-hook".to_owned())
}

fn check_hook(nix: &Result<NixSettings, String>) -> Check {
    const NAME: &str = "post-build-hook";
    let nix = match nix {
        Ok(nix) => nix,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot read Nix's configuration: {e}"),
                "make sure `nix show-config` works for this user",
            )
        }
    };
    let fix = format!(
        "set `post-build-hook = {}` in {} (NixOS: `services.nixpush.enable = true`), then restart nix-daemon",
        suggested_hook(),
        nix.conf_file.display()
    );
    let hook = nix.get("post-build-hook");
    if hook.is_empty() {
        return Check::fail(
            NAME,
            format!("Nix has no post-build-hook (read from {})", nix.source),
            fix,
        );
    }
    let path = Path::new(hook);
    let executable = std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false);
    if !calls_nixpush_hook(path) {
        return Check::fail(
            NAME,
            format!("Nix's post-build-hook is {hook}, not nixpush-hook"),
            fix,
        );
    }
    if !executable {
        return Check::fail(
            NAME,
            format!("Nix's post-build-hook {hook} does not exist or is not executable"),
            fix,
        );
    }
    Check::pass(NAME, format!("Nix runs {hook} after every build"))
}

/// Whether `hook` is nixpush-hook itself, or a small script that runs it.
fn calls_nixpush_hook(hook: &Path) -> bool {
    if hook.file_name().is_some_and(|n| n == "nixpush-hook") {
        return true;
    }
    let is_small_file = std::fs::metadata(hook).is_ok_and(|m| m.is_file() && m.len() < 64 * 1024);
    is_small_file
        && std::fs::read(hook).is_ok_and(|bytes| {
            let text = String::from_utf8_lossy(&bytes);
            text.starts_with("#!")
                && (text.contains("nixpush-hook") || text.contains("nixpush hook"))
        })
}

/// The URL Nix reads the target from: what the target said, else derived from the configured URL.
fn read_url(config: &Config, info: Option<&TargetInfo>) -> String {
    if let Some(url) = info.and_then(|i| i.read_url.clone()) {
        return url;
    }
    Kind::of(config).read_url(config)
}

/// Whether two cache URLs name the same cache (ignoring a trailing slash and `?options`).
fn same_cache(a: &str, b: &str) -> bool {
    let normal = |u: &str| {
        u.split('?')
            .next()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_owned()
    };
    normal(a) == normal(b)
}

fn check_substituter(
    config: &Config,
    info: Option<&TargetInfo>,
    nix: &Result<NixSettings, String>,
) -> Check {
    const NAME: &str = "substituter";
    let Ok(nix) = nix else {
        return Check::skip(
            NAME,
            "Nix's configuration cannot be read (see post-build-hook)",
        );
    };
    let url = read_url(config, info);
    let listed = |key: &str| nix.list(key).iter().any(|s| same_cache(s, &url));
    if listed("substituters") {
        Check::pass(NAME, format!("{url} is in Nix's substituters"))
    } else if listed("trusted-substituters") {
        Check::pass(
            NAME,
            format!(
                "{url} is in trusted-substituters (used with `--option extra-substituters {url}`)"
            ),
        )
    } else {
        Check::fail(
            NAME,
            format!(
                "{url} is in neither substituters nor trusted-substituters (read from {})",
                nix.source
            ),
            format!(
                "add `extra-substituters = {url}` to {} (NixOS: `nix.settings.substituters`), so builds \
                 substitute from the cache",
                nix.conf_file.display()
            ),
        )
    }
}

fn check_signing_key(
    config: &Config,
    nix: &Result<NixSettings, String>,
) -> (Check, Option<SecretKey>) {
    const NAME: &str = "signing-key";
    let kind = Kind::of(config);
    let Some(file) = &config.target.signing_key_file else {
        if let Some(key_var) = kind.signing_key_env_var() {
            match kind.load_signing_key(config) {
                Ok(Some(key)) => {
                    let detail = format!(
                        "{key_var} holds key {} (public key {})",
                        key.name(),
                        key.public_key()
                    );
                    return (Check::pass(NAME, detail), Some(key));
                }
                Ok(None) => {}
                Err(e) => {
                    return (
                        Check::fail(
                            NAME,
                            e.to_string(),
                            format!(
                                "set {key_var} to the key `cachix generate-keypair` printed, or unset it for a \
                                 Cachix-managed cache"
                            ),
                        ),
                        None,
                    )
                }
            }
        }
        let unsigned_ok = nix.as_ref().is_ok_and(|n| n.get("require-sigs") == "false");
        let check = if kind.signs_by_itself() {
            Check::skip(
                NAME,
                "no signing_key_file or CACHIX_SIGNING_KEY: Cachix signs with its own key",
            )
        } else if unsigned_ok {
            Check::skip(NAME, "no signing_key_file; Nix has require-sigs = false")
        } else {
            Check::fail(
                NAME,
                "no signing_key_file: narinfos go out unsigned, and Nix refuses unsigned paths",
                "`nix-store --generate-binary-cache-key NAME-1 /etc/nixpush/signing-key \
                 /etc/nixpush/signing-key.pub`, then set `signing_key_file = \"/etc/nixpush/signing-key\"` \
                 in [target]",
            )
        };
        return (check, None);
    };
    let key = match kind.load_signing_key(config) {
        Ok(Some(key)) => key,
        Ok(None) => return (Check::skip(NAME, "no signing key"), None),
        Err(e) => {
            return (
                Check::fail(
                    NAME,
                    e.to_string(),
                    format!(
                        "put a key made by `nix-store --generate-binary-cache-key` in {}",
                        file.display()
                    ),
                ),
                None,
            )
        }
    };
    let mode = match std::fs::metadata(file) {
        Ok(meta) => meta.mode() & 0o7777,
        Err(e) => {
            return (
                Check::fail(
                    NAME,
                    format!("{}: {e}", file.display()),
                    "make the key file readable by the daemon",
                ),
                None,
            )
        }
    };
    if mode & 0o077 != 0 {
        return (
            Check::fail(
                NAME,
                format!(
                    "{} (key {}) has mode {mode:04o}: group or others may read the secret key",
                    file.display(),
                    key.name()
                ),
                format!(
                    "`chmod 600 {}` (owned by the daemon's user), and rotate the key if others could read it",
                    file.display()
                ),
            ),
            Some(key),
        );
    }
    let detail = format!(
        "{} holds key {}, mode {mode:04o}",
        file.display(),
        key.name()
    );
    (Check::pass(NAME, detail), Some(key))
}

fn check_public_key(
    key: Option<&SecretKey>,
    info: Option<&TargetInfo>,
    nix: &Result<NixSettings, String>,
) -> Check {
    const NAME: &str = "trusted-public-key";
    let Ok(nix) = nix else {
        return Check::skip(
            NAME,
            "Nix's configuration cannot be read (see post-build-hook)",
        );
    };
    let wanted: Vec<String> = match key {
        Some(key) => vec![key.public_key().to_string()],
        None => info.map(|i| i.public_keys.clone()).unwrap_or_default(),
    };
    if wanted.is_empty() {
        return Check::skip(NAME, "no signing key to look for (see signing-key)");
    }
    let trusted = nix.list("trusted-public-keys");
    match wanted.iter().find(|k| trusted.contains(&k.as_str())) {
        Some(found) => Check::pass(NAME, format!("{found} is in Nix's trusted-public-keys")),
        None => Check::fail(
            NAME,
            format!(
                "{} is not in trusted-public-keys (read from {})",
                wanted.join(" "),
                nix.source
            ),
            format!(
                "add `extra-trusted-public-keys = {}` to {} (NixOS: `nix.settings.trusted-public-keys`)",
                wanted[0],
                nix.conf_file.display()
            ),
        ),
    }
}

fn check_token_file(config: &Config) -> (Check, Option<Credentials>) {
    const NAME: &str = "token-file";
    let kind = Kind::of(config);
    let var = kind.token_env_var();
    let Some(file) = &config.target.auth_token_file else {
        let credentials = kind.load_credentials(config).ok();
        let from_env = credentials.as_ref().is_some_and(|c| c.token().is_some());
        let detail = if from_env {
            format!("no auth_token_file; the token comes from ${var}")
        } else {
            "no auth_token_file configured".to_owned()
        };
        return (Check::skip(NAME, detail), credentials);
    };
    match kind.load_credentials(config) {
        Ok(credentials) => (
            Check::pass(NAME, format!("{} is readable", file.display())),
            Some(credentials),
        ),
        Err(e) => (
            Check::fail(
                NAME,
                e.to_string(),
                format!(
                    "write the token to {} (one line, readable by the daemon's user only); with systemd, \
                     `LoadCredential=` provides it",
                    file.display()
                ),
            ),
            None,
        ),
    }
}

async fn check_target(
    config: &Config,
    credentials: Option<Credentials>,
) -> (Check, Option<TargetInfo>) {
    const NAME: &str = "target";
    let url = redact_url(&config.target.url);
    let Some(credentials) = credentials else {
        return (
            Check::skip(
                NAME,
                "cannot ask the target without the token (see token-file)",
            ),
            None,
        );
    };
    let backend = match Target::backend_with(config, credentials) {
        Ok(backend) => backend,
        Err(e) => {
            return (
                Check::fail(NAME, e.to_string(), "fix `url` in [target]"),
                None,
            )
        }
    };
    match tokio::time::timeout(TARGET_TIMEOUT, backend.prepare()).await {
        Ok(Ok(info)) => {
            let detail = if Kind::of(config).is_local() {
                format!("{url} is writable")
            } else {
                format!("{url} answers and accepts our credentials")
            };
            let detail = match crate::backend::s3::credentials::describe_source(config) {
                Some(source) => format!("{detail}; {source}"),
                None => detail,
            };
            (Check::pass(NAME, detail), Some(info))
        }
        Ok(Err(e)) if e.is_auth() => {
            let fix = match &config.target.auth_token_file {
                Some(file) => format!(
                    "put a valid token in {} (write a new file and rename it over the old one); the daemon \
                     picks it up without a restart",
                    file.display()
                ),
                None => "set `auth_token_file` in [target] to a file holding a valid token".to_owned(),
            };
            (Check::fail(NAME, e.to_string(), fix), None)
        }
        Ok(Err(e)) => (
            Check::fail(
                NAME,
                e.to_string(),
                "check `url` in [target] and that the cache is up and writable",
            ),
            None,
        ),
        Err(_) => (
            Check::fail(
                NAME,
                format!("{url} did not answer within {} s", TARGET_TIMEOUT.as_secs()),
                "check the network path to the cache and that it is up",
            ),
            None,
        ),
    }
}

/// What the target cannot hold of a complete cache, and whether its `nix-cache-info` says what the configuration
/// asks for. A differing one is reported, never rewritten: other readers and writers may rely on it.
async fn check_cache_info(
    config: &Config,
    credentials: Option<Credentials>,
    target_ok: bool,
) -> Check {
    const NAME: &str = "cache-info";
    let kind = Kind::of(config);
    if let Some(note) = crate::backend::documents::cannot_store_note(kind.cannot_store(), config) {
        let requested = kind.cannot_store().iter().any(|d| d.is_requested(config));
        return if requested {
            Check::fail(
                NAME,
                note,
                "remove those keys from [target], or push to a file://, http(s):// or s3:// cache for them",
            )
        } else {
            Check::skip(NAME, note)
        };
    }
    let (Some(credentials), true) = (credentials, target_ok) else {
        return Check::skip(NAME, "needs a reachable target (see target)");
    };
    let backend = match Target::backend_with(config, credentials) {
        Ok(backend) => backend,
        Err(e) => return Check::skip(NAME, e.to_string()),
    };
    let wanted = crate::cache_info::CacheInfo::from_config(config);
    match tokio::time::timeout(TARGET_TIMEOUT, backend.get_document("nix-cache-info")).await {
        Ok(Ok(Some(bytes))) => {
            let existing = crate::cache_info::CacheInfo::parse(&String::from_utf8_lossy(&bytes));
            let differences = wanted.differences(&existing);
            if differences.is_empty() {
                Check::pass(NAME, "nix-cache-info matches the configuration")
            } else {
                Check::fail(
                    NAME,
                    format!("the target's nix-cache-info differs: {}", differences.join("; ")),
                    "nixpush never rewrites an existing nix-cache-info: edit it in the cache, or set \
                     target.priority / target.want_mass_query to what it says",
                )
            }
        }
        Ok(Ok(None)) => Check::pass(
            NAME,
            "no nix-cache-info yet; nixpush writes one with the configured fields",
        ),
        Ok(Err(e)) => Check::fail(NAME, e.to_string(), "check that the cache is readable"),
        Err(_) => Check::fail(
            NAME,
            format!(
                "nix-cache-info did not arrive within {} s",
                TARGET_TIMEOUT.as_secs()
            ),
            "check the network path to the cache and that it is up",
        ),
    }
}

fn check_spool(config: &Config, daemon_up: bool, now: SystemTime) -> Check {
    const NAME: &str = "spool";
    let dir = config.spool_dir();
    let files = match crate::spool::list(&dir) {
        Ok(files) => files,
        Err(e) => {
            return Check::fail(
                NAME,
                e.to_string(),
                "the spool directory must be listable (the daemon creates it with mode 1733)",
            )
        }
    };
    if files.is_empty() {
        return Check::pass(NAME, format!("{} is empty", dir.display()));
    }
    let oldest = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .filter_map(|t| now.duration_since(t).ok())
        .max()
        .unwrap_or_default();
    let waiting = format!(
        "{} request(s) wait in {}, the oldest for {}",
        files.len(),
        dir.display(),
        human_duration(oldest.as_secs())
    );
    if !daemon_up {
        Check::fail(
            NAME,
            format!("{waiting}, and the daemon is not running"),
            "start the daemon; it imports the spool when it starts",
        )
    } else if oldest > SPOOL_STALE_AFTER {
        Check::fail(
            NAME,
            format!("{waiting}: the daemon is not importing them"),
            format!(
                "read the daemon's log (`journalctl -u nixpush`); files it cannot import move to {}",
                dir.join("bad").display()
            ),
        )
    } else {
        Check::pass(NAME, format!("{waiting}; the daemon is importing them"))
    }
}

fn check_failed_paths(report: Option<&StatusReport>) -> Check {
    const NAME: &str = "failed-paths";
    let Some(report) = report else {
        return Check::skip(NAME, "the daemon is not reachable");
    };
    if report.failed == 0 {
        return Check::pass(NAME, "no path is parked as failed");
    }
    let example = report
        .failed_paths
        .iter()
        .find(|f| f.state == "failed")
        .map(|f| {
            format!(
                ", e.g. {}: {}",
                f.path,
                f.last_error.as_deref().unwrap_or("no reason recorded")
            )
        })
        .unwrap_or_default();
    Check::fail(
        NAME,
        format!("{} path(s) failed{example}", report.failed),
        "fix the cause (`nixpush status` lists every reason), then `nixpush retry --all`",
    )
}

fn check_last_upload(report: Option<&StatusReport>, now: SystemTime) -> Check {
    const NAME: &str = "last-upload";
    let Some(report) = report else {
        return Check::skip(NAME, "the daemon is not reachable");
    };
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let last = match report.last_upload_at {
        Some(at) => format!(
            "last upload {} ago",
            human_duration(now_secs.saturating_sub(at))
        ),
        None => "no upload recorded yet".to_owned(),
    };
    if report.daemon.hold {
        return Check::skip(NAME, format!("uploads are held (--hold); {last}"));
    }
    let waiting = report.queued + report.in_flight;
    if waiting == 0 {
        return Check::pass(NAME, format!("nothing waiting; {last}"));
    }
    // Since the last upload, or since the daemon started if it has not uploaded anything yet.
    let active_at = report
        .last_upload_at
        .unwrap_or(report.daemon.started_at)
        .max(report.daemon.started_at);
    let quiet_for = now_secs.saturating_sub(active_at);
    if quiet_for > STALLED_AFTER.as_secs() || report.target.state == TargetState::Paused {
        Check::fail(
            NAME,
            format!(
                "{waiting} path(s) waiting and nothing uploaded for {} ({last}); target {}: {}",
                human_duration(quiet_for),
                report.target.state.as_str(),
                report.target.message
            ),
            "`nixpush status` shows why (a paused target, an unreachable cache, failures)",
        )
    } else {
        Check::pass(NAME, format!("{waiting} path(s) being uploaded; {last}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_conf_merges_extra_settings_and_includes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("more.conf"),
            "extra-trusted-public-keys = b:2\n",
        )
        .unwrap();
        let text =
            "# comment\nsubstituters = https://a/ # trailing\nextra-substituters = file:///c\n\
                    trusted-public-keys = a:1\ninclude more.conf\n!include missing.conf\n\
                    post-build-hook = /x/nixpush-hook\n";
        let mut values = BTreeMap::new();
        parse_nix_conf(text, Some(dir.path()), &mut values, 0);
        assert_eq!(values["substituters"], "https://a/ file:///c");
        assert_eq!(values["trusted-public-keys"], "a:1 b:2");
        assert_eq!(values["post-build-hook"], "/x/nixpush-hook");
    }

    #[test]
    fn cache_urls_compare_without_slash_and_options() {
        assert!(same_cache("http://h:1/", "http://h:1"));
        assert!(same_cache("s3://b?region=x", "s3://b"));
        assert!(!same_cache("http://h:1", "http://h:2"));
    }

    #[test]
    fn read_url_drops_credentials() {
        let mut config = Config::default();
        config.target.url = "https://user:secret@cache.example/nix/".into();
        assert_eq!(read_url(&config, None), "https://cache.example/nix/");
        config.target.url = "cachix://mycache".into();
        assert_eq!(read_url(&config, None), "https://mycache.cachix.org");
    }

    #[test]
    fn render_shows_fixes_under_failures() {
        let text = render(&[
            Check::pass("config", "ok"),
            Check::fail("post-build-hook", "wrong", "set it"),
            Check::skip("token-file", "none"),
        ]);
        assert!(
            text.contains("FAIL  post-build-hook     wrong\n      fix: set it\n"),
            "{text}"
        );
        assert!(text.contains("1 passed, 1 failed, 1 skipped"), "{text}");
    }
}
