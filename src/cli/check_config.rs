//! `nixpush check-config [FILE]`: validate a configuration file and print the effective configuration.
//!
//! Beyond parsing, it opens every key and token file the configuration names, with the loaders the daemon uses,
//! so a missing, unreadable or malformed secret fails here with the daemon's own message and the line that names
//! the file. `--skip-files` leaves the files out, for a build sandbox where they do not exist yet.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use crate::backend::Kind;
use crate::config::{line_of, Config, DEFAULT_CONFIG_PATH};

/// Arguments of `check-config`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file to check [default: --config, or /etc/nixpush/config.toml]
    file: Option<PathBuf>,
    /// Do not open the key and token files the configuration names (for a build sandbox, where they are absent)
    #[arg(long)]
    skip_files: bool,
}

pub(super) fn run(config_path: Option<&Path>, args: Args) -> anyhow::Result<ExitCode> {
    let path = args
        .file
        .as_deref()
        .or(config_path)
        .unwrap_or(Path::new(DEFAULT_CONFIG_PATH));
    let config = Config::load(path)?;
    if !args.skip_files {
        check_secret_files(&config, path)?;
    }
    print!("{}", config.to_effective_toml());
    Ok(ExitCode::SUCCESS)
}

/// Loads the signing key and the auth token the way the daemon does; an error names the line that set the file.
fn check_secret_files(config: &Config, path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let at = |field: &str| match line_of(&text, field) {
        Some(line) => format!(
            "invalid configuration file {}, line {line}: `{field}`",
            path.display()
        ),
        None => format!("invalid configuration file {}: `{field}`", path.display()),
    };
    let kind = Kind::of(config);
    kind.load_signing_key(config)
        .with_context(|| at("target.signing_key_file"))?;
    kind.load_credentials(config)
        .with_context(|| at("target.auth_token_file"))?;
    Ok(())
}
