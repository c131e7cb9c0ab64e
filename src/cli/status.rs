//! `nixpush status [--json] [--watch [SECS]]`: the daemon's report. When the daemon cannot be reached, says so,
//! counts the requests waiting in the spool, and exits 3.
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
use crate::status::StatusReport;

/// Exit code when the daemon cannot be reached (as `systemctl status` does for a stopped unit).
const EXIT_UNREACHABLE: u8 = 3;
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
                Ok(ExitCode::SUCCESS)
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
