//! `nixpush daemon [--hold]`: load the configuration, set up logging and signals, take or bind the socket, and
//! run the daemon until SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::daemon::{self, shutdown, socket, Options};

/// The exit codes, for `daemon --help`.
pub(super) const EXIT_CODES_HELP: &str =
    "Exit status:\n  0  stopped by SIGTERM or SIGINT after draining\n  \
        1  cannot start (configuration, socket, queue) or a fatal error";

/// Arguments of `daemon`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Accept and persist requests, but do not upload (maintenance windows, metered links).
    #[arg(long)]
    hold: bool,
}

pub(super) fn run(config_path: Option<&Path>, args: Args) -> anyhow::Result<ExitCode> {
    let path: PathBuf = config_path
        .unwrap_or(Path::new(DEFAULT_CONFIG_PATH))
        .to_owned();
    let config = Config::load(&path)?;
    crate::logging::init("info")?;
    let (shutdown, _signals) = shutdown::install()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nixpush")
        .build()
        .context("starting the async runtime")?;
    let listener = socket::listen(&config)?;
    let options = Options {
        hold: args.hold,
        config_path: Some(path),
    };
    runtime.block_on(daemon::run(config, listener, shutdown, options))?;
    Ok(ExitCode::SUCCESS)
}
