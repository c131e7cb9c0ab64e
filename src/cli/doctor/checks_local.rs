//! The checks of this machine's side of nixpush: the daemon, the signing key and token files, the spool, and what
//! the daemon reports about failed paths and its last upload.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime};

use crate::backend::{Credentials, Kind};
use crate::config::Config;
use crate::protocol::{self, Request, Response};
use crate::signing::SecretKey;
use crate::status::{human_duration, StatusReport, TargetState};

use super::deadline::{self, CHECK_DEADLINE};
use super::nix_settings::NixSettings;
use super::report::Check;

/// A spool file older than this is not being imported (the daemon rescans every 30 s).
const SPOOL_STALE_AFTER: Duration = Duration::from_secs(120);
/// Work waiting with no upload for this long means uploads are stuck.
const STALLED_AFTER: Duration = Duration::from_secs(3600);

pub(super) fn check_daemon(config: &Config) -> (Check, Option<StatusReport>) {
    const NAME: &str = "daemon";
    let fix = format!(
        "start it: `systemctl start nixpush.socket nixpush.service` (or run `nixpush daemon`); the `socket` \
         setting ({}) must be the socket it listens on",
        config.socket.display()
    );
    let socket = config.socket.clone();
    let answer = deadline::blocking("the daemon to answer", move || {
        protocol::call(&socket, &Request::Status, CHECK_DEADLINE)
    });
    let Some(answer) = answer else {
        return (
            Check::fail(
                NAME,
                format!(
                    "the daemon at {} did not answer within {} s",
                    config.socket.display(),
                    CHECK_DEADLINE.as_secs()
                ),
                "`journalctl -u nixpush` shows what it is doing; restart it if it hangs",
            ),
            None,
        );
    };
    match answer {
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

pub(super) fn check_signing_key(
    config: &Config,
    nix: &Result<NixSettings, String>,
) -> (Check, Option<SecretKey>) {
    const NAME: &str = "signing-key";
    // Every failure but the key file's mode leaves no key to sign with.
    let no_key = |detail: String, fix: String| (Check::fail(NAME, detail, fix), None);
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
                    return no_key(
                        e.to_string(),
                        format!(
                            "set {key_var} to the key `cachix generate-keypair` printed, or unset it for a \
                             Cachix-managed cache"
                        ),
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
            return no_key(
                e.to_string(),
                format!(
                    "put a key made by `nix-store --generate-binary-cache-key` in {}",
                    file.display()
                ),
            )
        }
    };
    let mode = match std::fs::metadata(file) {
        Ok(meta) => meta.mode() & 0o7777,
        Err(e) => {
            return no_key(
                format!("{}: {e}", file.display()),
                "make the key file readable by the daemon".to_owned(),
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

pub(super) fn check_token_file(config: &Config) -> (Check, Option<Credentials>) {
    const NAME: &str = "token-file";
    let kind = Kind::of(config);
    if !kind.uses_token() {
        // The daemon does not read it either, so an empty or stale file is harmless.
        let detail = match &config.target.auth_token_file {
            Some(file) => format!(
                "{} targets send no token: auth_token_file {} is not read",
                kind.scheme(),
                file.display()
            ),
            None => format!("{} targets send no token", kind.scheme()),
        };
        return (Check::skip(NAME, detail), Some(Credentials::none()));
    }
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

pub(super) fn check_spool(config: &Config, daemon_up: bool, now: SystemTime) -> Check {
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

pub(super) fn check_failed_paths(report: Option<&StatusReport>) -> Check {
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

pub(super) fn check_last_upload(report: Option<&StatusReport>, now: SystemTime) -> Check {
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
