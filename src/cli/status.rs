//! `nixpush status [--json] [--watch [SECS]]`: the daemon's report. When the daemon cannot be reached, says so,
//! counts the requests waiting in the spool, and exits 3. When paths wait because the target cannot take them
//! (unreachable, paused, failed paths, a full state directory), it exits non-zero too, so scripts and monitoring
//! can ask "is my cache up to date?" with the exit status alone ([`EXIT_CODES_HELP`]).
//!
//! `--watch` asks again every few seconds until interrupted: on a terminal it redraws the screen in place; when
//! stdout is a file or pipe it appends one report per interval (one JSON object per line with `--json`), so logs
//! never receive control characters.

use std::io::{IsTerminal, Write as _};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;
use crate::protocol::{self, Request, Response};
use crate::status::{StatusReport, TargetState};

/// Exit code when the daemon cannot be reached (as `systemctl status` does for a stopped unit).
const EXIT_UNREACHABLE: u8 = 3;
/// Paths wait and the target cannot be reached.
const EXIT_TARGET_UNREACHABLE: u8 = 4;
/// Paths wait and uploads are paused (the target refused the credentials). `--hold` is the operator's choice
/// and exits 0.
const EXIT_PAUSED: u8 = 5;
/// Paths failed for good and wait for `nixpush retry`.
const EXIT_FAILED: u8 = 6;
/// The daemon takes no new builds (state directory full or read-only).
const EXIT_NOT_TAKING_BUILDS: u8 = 7;

/// The exit codes, for `status --help`.
pub(super) const EXIT_CODES_HELP: &str = "\
Exit status:
  0  up to date, catching up (paths queued or uploading), or held by `daemon --hold`
  1  the command failed (e.g. the daemon sent something unexpected)
  3  the daemon cannot be reached (the spool is counted)
  4  NOT up to date: paths wait and the target is unreachable
  5  NOT up to date: paths wait and uploads are paused (the target refused the credentials)
  6  NOT up to date: paths failed (`nixpush retry --all` once the cause is fixed)
  7  NOT taking new builds: the state directory is full or read-only
With --watch the command runs until interrupted.";

/// What the exit status says about `report`: 0 unless the cache is not up to date for a reason someone must
/// look at (see [`EXIT_CODES_HELP`]).
fn exit_code(report: &StatusReport) -> u8 {
    let waiting = report.queued + report.in_flight + report.spooled > 0;
    if report.state_dir_error.is_some() {
        EXIT_NOT_TAKING_BUILDS
    } else if report.up_to_date {
        0
    } else if report.failed > 0 {
        EXIT_FAILED
    } else if waiting && any_waiting_target_is(report, TargetState::Paused) {
        EXIT_PAUSED
    } else if waiting && any_waiting_target_is(report, TargetState::Unreachable) {
        EXIT_TARGET_UNREACHABLE
    } else {
        0
    }
}
/// Whether a target with paths waiting for it (any target, for a report without per-target parts) is in `state`.
fn any_waiting_target_is(report: &StatusReport, state: TargetState) -> bool {
    if report.targets.is_empty() {
        return report.target.state == state;
    }
    report
        .targets
        .values()
        .any(|t| t.target.state == state && t.queued + t.in_flight > 0)
}

/// ANSI: cursor home, clear screen.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

/// Arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the report as one JSON object (a stable format for scripts).
    #[arg(long)]
    json: bool,
    /// Refresh every SECS seconds (default 2) until interrupted.
    #[arg(
        long,
        value_name = "SECS",
        num_args = 0..=1,
        default_missing_value = "2",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    watch: Option<u64>,
}

/// Asks the daemon for its report; `Err` carries what to tell the user when it cannot be reached.
fn fetch(config: &Config) -> anyhow::Result<Result<StatusReport, String>> {
    match protocol::call(&config.socket, &Request::Status, super::CLIENT_TIMEOUT) {
        Ok(Response::Status(report)) => Ok(Ok(*report)),
        Ok(Response::Error { message, .. }) => anyhow::bail!("the daemon answered: {message}"),
        Ok(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
        Err(e) => {
            let spool_dir = config.spool_dir();
            let waiting = crate::spool::list(&spool_dir)
                .map(|files| files.len().to_string())
                .unwrap_or_else(|e| format!("an unknown number of ({e})"));
            Ok(Err(format!(
                "nixpush daemon is not reachable: {e}\n{waiting} request(s) wait in the spool at {}",
                spool_dir.display()
            )))
        }
    }
}

/// The report as printed: JSON on one line, or the rendered text.
fn format(report: &StatusReport, json: bool) -> anyhow::Result<String> {
    Ok(if json {
        format!("{}\n", serde_json::to_string(report)?)
    } else {
        report.render(crate::queue::now_ms() / 1000)
    })
}

pub(super) fn run(config_path: Option<&Path>, args: Args) -> anyhow::Result<ExitCode> {
    let config = super::client_config(config_path)?;
    let Some(interval) = args.watch else {
        return match fetch(&config)? {
            Ok(report) => {
                print!("{}", format(&report, args.json)?);
                Ok(ExitCode::from(exit_code(&report)))
            }
            Err(message) => {
                eprintln!("{message}");
                Ok(ExitCode::from(EXIT_UNREACHABLE))
            }
        };
    };
    let terminal = std::io::stdout().is_terminal();
    let mut stdout = std::io::stdout().lock();
    loop {
        // A daemon that is down or restarting is reported and asked again, not a reason to stop watching.
        let text = match fetch(&config)? {
            Ok(report) => format(&report, args.json)?,
            Err(message) if args.json => {
                eprintln!("{message}");
                String::new()
            }
            Err(message) => format!("{message}\n"),
        };
        if terminal {
            write!(stdout, "{CLEAR_SCREEN}{text}")?;
        } else if args.json {
            write!(stdout, "{text}")?;
        } else {
            writeln!(stdout, "{text}")?;
        }
        stdout.flush()?;
        std::thread::sleep(Duration::from_secs(interval));
    }
}
