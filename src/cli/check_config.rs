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
    // On stderr, so the effective configuration on stdout stays a file one can use as is.
    let kind = crate::backend::target::Kind::of(&config);
    if let Some(note) = crate::backend::documents::cannot_store_note(kind.cannot_store(), &config) {
        eprintln!("note: {note}");
    }
    Ok(ExitCode::SUCCESS)
}
