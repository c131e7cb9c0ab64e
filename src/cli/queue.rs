//! `nixpush queue [list|retry|drop]`: look at and change the daemon's queue. `nixpush retry` is `queue retry`.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use crate::protocol::{Request, Response};

/// The exit codes, for `queue --help`.
pub(super) const EXIT_CODES_HELP: &str =
    "Exit status:\n  0  done\n  1  the daemon cannot be reached or refused";

/// The exit codes, for `retry --help`.
pub(super) const RETRY_EXIT_CODES_HELP: &str = "Exit status:\n  0  done (also when nothing matched)\n  1  the daemon cannot be reached or refused";

/// Arguments of `queue`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to do; `list` when omitted.
    #[command(subcommand)]
    action: Option<Action>,
    /// Only the target with this name (`default` for [target]); every target when omitted.
    #[arg(long, value_name = "NAME")]
    target: Option<String>,
}

/// `queue` subcommands.
#[derive(Debug, Subcommand)]
enum Action {
    /// List every queued, uploading and failed path.
    List {
        /// One JSON array of entries.
        #[arg(long)]
        json: bool,
        /// Only the target with this name; every target when omitted.
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
    },
    /// Requeue failed paths now.
    Retry(RetryArgs),
    /// Remove a path from the queue.
    Drop {
        /// The path.
        path: String,
        /// Drop it only for the target with this name; for every target when omitted.
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
    },
}

/// Arguments of `retry` (and `queue retry`).
#[derive(Debug, clap::Args)]
pub struct RetryArgs {
    /// Every failed or held-back path, and every path waiting out a backoff.
    #[arg(long, conflicts_with = "paths")]
    all: bool,
    /// The paths to retry (store paths, or links to them such as ./result).
    #[arg(required_unless_present = "all")]
    paths: Vec<String>,
    /// Print `{"requeued":[PATH…]}` instead of the text.
    #[arg(long)]
    json: bool,
    /// Only paths waiting for the target with this name (`default` for [target]); every target's when omitted.
    #[arg(long, value_name = "NAME")]
    target: Option<String>,
}

/// Requeues failed and held-back paths (and paths waiting for their next attempt) to be tried now.
pub(super) fn retry(config_path: Option<&Path>, args: RetryArgs) -> anyhow::Result<ExitCode> {
    let config = super::client_config(config_path)?;
    // `./result` and friends name the store path they point at; anything else goes as typed, and the daemon
    // says what is wrong with it.
    let paths = args
        .paths
        .iter()
        .map(|input| {
            super::push::resolve_store_path(Path::new(input), config.store_dir_str())
                .map(|p| p.to_string())
                .unwrap_or_else(|_| input.clone())
        })
        .collect();
    let request = Request::Retry {
        paths,
        all: args.all,
        target: args.target,
    };
    let Response::Changed { paths } = super::ask(&config, &request)? else {
        anyhow::bail!("unexpected answer from the daemon");
    };
    if args.json {
        println!("{}", serde_json::json!({ "requeued": paths }));
    } else if paths.is_empty() {
        println!(
            "nothing to retry: no failed, held-back or waiting path matched (`nixpush queue` lists the queue)"
        );
    } else {
        println!("requeued {} path(s)", paths.len());
        for path in paths {
            println!("  {path}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn run(config_path: Option<&Path>, args: Args) -> anyhow::Result<ExitCode> {
    let config = super::client_config(config_path)?;
    let action = args.action.unwrap_or(Action::List {
        json: false,
        target: None,
    });
    match action {
        Action::List { json, target } => {
            let target = target.or(args.target);
            let several = target.is_none();
            let mut entries = Vec::new();
            let mut after = None;
            loop {
                let page = Request::List {
                    after,
                    limit: None,
                    target: target.clone(),
                };
                let Response::List {
                    entries: mut page,
                    next,
                } = super::ask(&config, &page)?
                else {
                    anyhow::bail!("unexpected answer from the daemon");
                };
                entries.append(&mut page);
                match next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            if json {
                println!("{}", serde_json::to_string(&entries)?);
            } else if entries.is_empty() {
                println!("the queue is empty");
            } else {
                let names: std::collections::BTreeSet<&str> =
                    entries.iter().map(|e| e.target.as_str()).collect();
                let several = several && names.len() > 1;
                for entry in &entries {
                    let state = serde_json::to_value(entry.state)?;
                    let error = entry
                        .last_error
                        .as_ref()
                        .map(|e| format!("  ({e})"))
                        .unwrap_or_default();
                    let target = if several {
                        format!("{:<12} ", entry.target)
                    } else {
                        String::new()
                    };
                    println!(
                        "{target}{:<10} {:>3} attempts  {}{error}",
                        state.as_str().unwrap_or_default(),
                        entry.attempts,
                        entry.path
                    );
                }
            }
        }
        Action::Retry(args) => return retry(config_path, args),
        Action::Drop { path, target } => {
            let request = Request::Drop {
                path: path.clone(),
                target: target.or(args.target),
            };
            let Response::Changed { paths } = super::ask(&config, &request)? else {
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
