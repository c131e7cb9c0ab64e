//! `nixpush check-config [FILE]`: validate a configuration file and print the effective configuration.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::{Config, DEFAULT_CONFIG_PATH};

/// Arguments of `check-config`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file to check [default: --config, or /etc/nixpush/config.toml]
    file: Option<PathBuf>,
}

pub(super) fn run(config_path: Option<&Path>, args: Args) -> anyhow::Result<ExitCode> {
    let path = args
        .file
        .as_deref()
        .or(config_path)
        .unwrap_or(Path::new(DEFAULT_CONFIG_PATH));
    let config = Config::load(path)?;
    print!("{}", config.to_effective_toml());
    Ok(ExitCode::SUCCESS)
}
