//! The post-build hook: hands a finished build to the daemon and gets out of Nix's way.
//!
//! Nix runs the hook synchronously after every derivation it builds, with no arguments, and a non-zero exit stops
//! the whole build. So this code uses std only (no runtime, no config file), reads just `DRV_PATH`, `OUT_PATHS`,
//! `NIXPUSH_SOCKET` and `NIXPUSH_SPOOL`, bounds the exchange with the daemon to [`EXCHANGE_TIMEOUT`], and on any
//! failure writes the request to the spool instead. It always exits 0 (panics included) and prints nothing on
//! success, or exactly one line to stderr saying what happened.
//!
//! A request the daemon refuses (a path outside the store, a peer that may not enqueue) is not spooled: the
//! daemon judges spool files by the same rules and would refuse it again. The hook says why, once, and exits 0.
//!
//! Nix 2.8.0 leaves `OUT_PATHS` empty (NixOS/nix#6446), so the hook forwards `DRV_PATH` as well and the daemon
//! resolves the outputs.
//!
//! While the daemon is down, the spool line is printed once per build rather than once per derivation: when the
//! hook's parent is a Nix process, the hook remembers in `spool/.notice-<uid>` which one (by pid and start time)
//! was last told, and stays quiet for further derivations of that build.
//!
//! `NIXPUSH_HOOK_CHAIN` (program paths separated by `:`) lists other post-build hooks to run after the request
//! is acknowledged or spooled, so a machine can keep a hook it already had. Each runs with the same
//! environment, one after the other; its exit status is ignored for the build's sake and reported on stderr
//! when it is not 0.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::{self, Request, Response};
use crate::spool::{self, SpoolRequest};

/// Budget for connecting, sending and reading the acknowledgement. With a spool write after it, the hook stays
/// under one second even when the daemon hangs.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_millis(800);
/// Where the hook spools when `NIXPUSH_SPOOL` is not set: `spool/` under the default state directory.
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/nixpush/spool";
/// The variable naming other post-build hooks to run after this one.
pub const CHAIN_VAR: &str = "NIXPUSH_HOOK_CHAIN";

/// What the hook was asked to deliver, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookInput {
    /// `DRV_PATH`, if set and not empty.
    pub drv_path: Option<String>,
    /// `OUT_PATHS`, split on whitespace.
    pub out_paths: Vec<String>,
    /// `NIXPUSH_SOCKET`, or [`crate::config::DEFAULT_SOCKET`].
    pub socket: PathBuf,
    /// `NIXPUSH_SPOOL`, or [`DEFAULT_SPOOL_DIR`].
    pub spool_dir: PathBuf,
    /// `NIXPUSH_HOOK_CHAIN`: other hooks to run afterwards.
    pub chain: Vec<PathBuf>,
}

impl HookInput {
    /// Reads the environment Nix gives the hook.
    pub fn from_env() -> HookInput {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        HookInput {
            drv_path: var("DRV_PATH"),
            out_paths: var("OUT_PATHS")
                .map(|v| v.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            socket: var("NIXPUSH_SOCKET")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_SOCKET)),
            spool_dir: var("NIXPUSH_SPOOL")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_DIR)),
            chain: var(CHAIN_VAR)
                .map(|v| {
                    v.split(':')
                        .filter(|p| !p.trim().is_empty())
                        .map(PathBuf::from)
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn what(&self) -> String {
        match &self.drv_path {
            Some(drv) => format!("the outputs of {drv}"),
            None => self.out_paths.join(" "),
        }
    }
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The daemon durably queued every path.
    Queued,
    /// Neither `DRV_PATH` nor `OUT_PATHS` was set.
    NothingToDo,
    /// The daemon refused the whole request; its answer is final.
    Refused(String),
    /// The daemon queued some paths and refused others.
    PartlyRefused(Vec<String>),
    /// The daemon could not take the request; it was saved to the spool.
    Spooled {
        /// Why the daemon could not take it.
        reason: String,
        /// The spool file.
        file: PathBuf,
    },
    /// Neither the daemon nor the spool took the request.
    Lost {
        /// Why the daemon could not take it.
        reason: String,
        /// Why the spool could not either.
        spool_error: String,
        /// What will not be pushed.
        what: String,
    },
}

impl Outcome {
    /// The one stderr line for this outcome; none when everything went well.
    pub fn message(&self) -> Option<String> {
        let line = match self {
            Outcome::Queued => return None,
            Outcome::NothingToDo => {
                "neither DRV_PATH nor OUT_PATHS is set, nothing to queue (Nix sets them when it runs the hook)"
                    .to_owned()
            }
            Outcome::Refused(message) => format!("the daemon refused the request: {message}"),
            Outcome::PartlyRefused(refused) => {
                format!("the daemon refused part of the request: {}", refused.join("; "))
            }
            // Short, because it lands in the middle of a build's output; the spool file keeps the full reason.
            Outcome::Spooled { file, reason } => format!(
                "{}; saved the request to {}",
                // The details (socket path, OS error) stay in the spool file.
                reason.split_once(" (").map_or(reason.as_str(), |(short, _)| short),
                file.parent().unwrap_or(file).display()
            ),
            Outcome::Lost {
                reason,
                spool_error,
                what,
            } => format!("{reason}; {spool_error}; {what} will not be pushed"),
        };
        Some(format!("nixpush-hook: {}", one_line(&line)))
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Sends the request to the daemon within `timeout`, or spools it.
pub fn deliver(input: &HookInput, timeout: Duration) -> Outcome {
    if input.drv_path.is_none() && input.out_paths.is_empty() {
        return Outcome::NothingToDo;
    }
    let request = Request::Enqueue {
        drv_path: input.drv_path.clone(),
        out_paths: input.out_paths.clone(),
        source: "hook".to_owned(),
    };
    let reason = match protocol::call(&input.socket, &request, timeout) {
        Ok(Response::Ack { refused, .. }) if refused.is_empty() => return Outcome::Queued,
        Ok(Response::Ack { refused, .. }) => return Outcome::PartlyRefused(refused),
        Ok(Response::Error { kind, message }) if kind.is_final() => {
            return Outcome::Refused(message)
        }
        Ok(Response::Error { message, .. }) => format!("the daemon could not queue it: {message}"),
        Ok(_) => "the daemon sent an unexpected reply".to_owned(),
        Err(e @ protocol::Error::Connect { .. })
            if matches!(&e, protocol::Error::Connect { source, .. } if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            )) =>
        {
            format!("daemon unreachable: not running ({e})")
        }
        Err(e) => format!("daemon unreachable: {e}"),
    };
    spool_request(input, reason)
}

fn spool_request(input: &HookInput, reason: String) -> Outcome {
    let request = SpoolRequest {
        v: spool::SPOOL_VERSION,
        drv_path: input.drv_path.clone(),
        out_paths: input.out_paths.clone(),
        source: "hook".to_owned(),
        created_at_ms: crate::queue::now_ms(),
        reason: Some(reason.clone()),
    };
    match spool::write(&input.spool_dir, &request) {
        Ok(file) => Outcome::Spooled { reason, file },
        Err(e) => Outcome::Lost {
            reason,
            spool_error: e.to_string(),
            what: input.what(),
        },
    }
}

/// Whether this build (the hook's parent process) was already told that the daemon is down; records that it
/// now has been. Any failure to tell counts as "not told": a second line is better than a missing one.
fn already_told_this_build(spool_dir: &Path) -> bool {
    let Some(build) = parent_identity() else {
        return false;
    };
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    let notice = spool_dir.join(format!(".notice-{uid}"));
    // The spool directory is writable by everyone: trust only a plain file of our own, and never write through
    // a name someone else may have planted (a symlink to /etc/shadow): a fresh file, then rename over it.
    let ours = std::fs::symlink_metadata(&notice).is_ok_and(|m| m.is_file() && m.uid() == uid);
    if ours && std::fs::read_to_string(&notice).is_ok_and(|told| told == build) {
        return true;
    }
    let temporary = spool_dir.join(format!(".notice-{uid}.{}.tmp", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| file.write_all(build.as_bytes()));
    if written.is_err() || std::fs::rename(&temporary, &notice).is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    false
}

/// The parent's pid and start time (`/proc/PID/stat` field 22), which together name one process for the
/// machine's uptime even when pids are reused; `None` unless the parent is Nix (`nix-daemon`'s worker for one
/// client, `nix-build`, `nix`), the only parent known to run the hook once per derivation of one build.
fn parent_identity() -> Option<String> {
    let ppid = std::os::unix::process::parent_id();
    let stat = std::fs::read_to_string(format!("/proc/{ppid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; the fields after its last ')' are plain.
    let name = &stat[stat.find('(')? + 1..stat.rfind(')')?];
    if !name.starts_with("nix") {
        return None;
    }
    let after_name = &stat[stat.rfind(')')? + 1..];
    let start_time = after_name.split_whitespace().nth(19)?;
    Some(format!("{ppid} {start_time}"))
}

/// Runs the chained hooks one after the other with this process's environment (minus [`CHAIN_VAR`], so a chain
/// that names nixpush-hook again does not loop). Returns one line per hook that failed.
pub fn run_chain(chain: &[PathBuf]) -> Vec<String> {
    let mut problems = Vec::new();
    for program in chain {
        let status = std::process::Command::new(program)
            .env_remove(CHAIN_VAR)
            .stdin(std::process::Stdio::null())
            .status();
        let problem = match status {
            Ok(status) if status.success() => continue,
            Ok(status) => format!("{} {status} (ignored)", program.display()),
            Err(e) => format!("cannot run {}: {e} (ignored)", program.display()),
        };
        problems.push(format!("nixpush-hook: chained hook {}", one_line(&problem)));
    }
    problems
}

/// The whole hook: read the environment, deliver, print at most one line, then run the chained hooks. Never
/// panics, never fails.
pub fn run() {
    // The default panic message spans several lines of the user's build log; we print our own single line.
    std::panic::set_hook(Box::new(|_| {}));
    let input = std::panic::catch_unwind(HookInput::from_env).ok();
    let line = std::panic::catch_unwind(|| {
        let input = input.as_ref()?;
        let outcome = deliver(input, EXCHANGE_TIMEOUT);
        if matches!(outcome, Outcome::Spooled { .. }) && already_told_this_build(&input.spool_dir) {
            return None;
        }
        outcome.message()
    })
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Some(format!(
            "nixpush-hook: internal error ({}); this build will not be pushed",
            one_line(&what)
        ))
    });
    if let Some(line) = line {
        // Nix may have closed the pipe; the hook still exits 0.
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
    let chain = input.map(|input| input.chain).unwrap_or_default();
    if let Ok(problems) = std::panic::catch_unwind(|| run_chain(&chain)) {
        for line in problems {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn input(dir: &std::path::Path) -> HookInput {
        HookInput {
            drv_path: Some("/nix/store/hrnw32bvgf2gvs4zqkcrbqwbjhi40kq8-ht-a.drv".into()),
            out_paths: vec![],
            socket: dir.join("missing.sock"),
            spool_dir: dir.join("spool"),
            chain: vec![],
        }
    }

    #[test]
    fn no_daemon_means_spool() {
        let tmp = tempfile::tempdir().unwrap();
        let input = input(tmp.path());
        let outcome = deliver(&input, EXCHANGE_TIMEOUT);
        let Outcome::Spooled { file, reason } = &outcome else {
            panic!("{outcome:?}")
        };
        assert!(reason.contains("missing.sock"), "{reason}");
        let saved = spool::read(file).unwrap().request;
        assert_eq!(saved.drv_path, input.drv_path);
        let line = outcome.message().unwrap();
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with("nixpush-hook: daemon unreachable"),
            "{line}"
        );
    }

    #[test]
    fn silent_daemon_times_out_then_spools() {
        let tmp = tempfile::tempdir().unwrap();
        let mut input = input(tmp.path());
        input.socket = tmp.path().join("silent.sock");
        let _listener = UnixListener::bind(&input.socket).unwrap();
        let outcome = deliver(&input, Duration::from_millis(100));
        assert!(
            matches!(&outcome, Outcome::Spooled { reason, .. } if reason.contains("within 100 ms")),
            "{outcome:?}"
        );
    }

    #[test]
    fn nothing_to_do_and_unwritable_spool() {
        let tmp = tempfile::tempdir().unwrap();
        let mut input = input(tmp.path());
        input.drv_path = None;
        assert_eq!(deliver(&input, EXCHANGE_TIMEOUT), Outcome::NothingToDo);
        input.out_paths = vec!["/nix/store/x".into()];
        std::fs::write(tmp.path().join("file"), b"").unwrap();
        input.spool_dir = tmp.path().join("file/spool");
        let outcome = deliver(&input, EXCHANGE_TIMEOUT);
        assert!(matches!(outcome, Outcome::Lost { .. }), "{outcome:?}");
        assert!(outcome.message().unwrap().contains("will not be pushed"));
    }
}
