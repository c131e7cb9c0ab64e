//! `nixpush status [--json]`: the daemon's report. When the daemon cannot be reached, says so, counts the
//! requests waiting in the spool, and exits 3.

use std::path::Path;
use std::process::ExitCode;

use crate::protocol::{self, Request, Response};
use crate::status::StatusReport;

/// Exit code when the daemon cannot be reached (as `systemctl status` does for a stopped unit).
const EXIT_UNREACHABLE: u8 = 3;

/// Arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the report as one JSON object (a stable format for scripts).
    #[arg(long)]
    json: bool,
}

pub(super) fn run(config_path: Option<&Path>, args: Args) -> anyhow::Result<ExitCode> {
    let config = super::client_config(config_path)?;
    let report: StatusReport =
        match protocol::call(&config.socket, &Request::Status, super::CLIENT_TIMEOUT) {
            Ok(Response::Status(report)) => *report,
            Ok(Response::Error { message, .. }) => anyhow::bail!("the daemon answered: {message}"),
            Ok(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
            Err(e) => {
                let spool_dir = config.spool_dir();
                let waiting = crate::spool::list(&spool_dir)
                    .map(|files| files.len().to_string())
                    .unwrap_or_else(|e| format!("an unknown number of ({e})"));
                eprintln!("nixpush daemon is not reachable: {e}");
                eprintln!(
                    "{waiting} request(s) wait in the spool at {}",
                    spool_dir.display()
                );
                return Ok(ExitCode::from(EXIT_UNREACHABLE));
            }
        };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.render(crate::queue::now_ms() / 1000));
    }
    Ok(ExitCode::SUCCESS)
}
