//! `nixpush queue [list|retry|drop]`: look at and change the daemon's queue.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use crate::protocol::{Request, Response};

/// Arguments of `queue`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to do; `list` when omitted.
    #[command(subcommand)]
    action: Option<Action>,
}

/// `queue` subcommands.
#[derive(Debug, Subcommand)]
enum Action {
    /// List every queued, uploading and failed path.
    List {
        /// One JSON array of entries.
        #[arg(long)]
        json: bool,
    },
    /// Requeue failed paths now.
    Retry {
        /// Every failed path.
        #[arg(long, conflicts_with = "paths")]
        all: bool,
        /// The paths to retry.
        #[arg(required_unless_present = "all")]
        paths: Vec<String>,
    },
    /// Remove a path from the queue.
    Drop {
        /// The path.
        path: String,
    },
}

pub(super) fn run(config_path: Option<&Path>, args: Args) -> anyhow::Result<ExitCode> {
    let config = super::client_config(config_path)?;
    match args.action.unwrap_or(Action::List { json: false }) {
        Action::List { json } => {
            let Response::List { entries } = super::ask(&config, &Request::List)? else {
                anyhow::bail!("unexpected answer from the daemon");
            };
            if json {
                println!("{}", serde_json::to_string(&entries)?);
            } else if entries.is_empty() {
                println!("the queue is empty");
            } else {
                for entry in entries {
                    let state = serde_json::to_value(entry.state)?;
                    let error = entry
                        .last_error
                        .map(|e| format!("  ({e})"))
                        .unwrap_or_default();
                    println!(
                        "{:<10} {:>3} attempts  {}{error}",
                        state.as_str().unwrap_or_default(),
                        entry.attempts,
                        entry.path
                    );
                }
            }
        }
        Action::Retry { all, paths } => {
            let Response::Changed { paths } = super::ask(&config, &Request::Retry { paths, all })?
            else {
                anyhow::bail!("unexpected answer from the daemon");
            };
            println!("requeued {} path(s)", paths.len());
            for path in paths {
                println!("  {path}");
            }
        }
        Action::Drop { path } => {
            let Response::Changed { paths } =
                super::ask(&config, &Request::Drop { path: path.clone() })?
            else {
                anyhow::bail!("unexpected answer from the daemon");
            };
            if paths.is_empty() {
                println!("{path} was not in the queue");
            } else {
                println!("dropped {path}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
