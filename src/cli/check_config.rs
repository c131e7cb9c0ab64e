//! `nixpush check-config [FILE] [--json]`: validate a configuration file and print the effective configuration.
//!
//! `--json` prints `{"ok":true,"file":…,"config":{…}}` (the effective configuration, secrets redacted) or
//! `{"ok":false,"file":…,"error":…,"field":…}` (`field` is the dotted key when the problem is a value) and exits 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::{self, Config, DEFAULT_CONFIG_PATH};

/// Arguments of `check-config`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file to check [default: --config, or /etc/nixpush/config.toml]
    file: Option<PathBuf>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

pub(super) fn run(config_path: Option<&Path>, args: Args) -> anyhow::Result<ExitCode> {
    let path = args
        .file
        .as_deref()
        .or(config_path)
        .unwrap_or(Path::new(DEFAULT_CONFIG_PATH));
    if !args.json {
        let config = Config::load(path)?;
        print!("{}", config.to_effective_toml());
        return Ok(ExitCode::SUCCESS);
    }
    let (report, code) = match Config::load(path) {
        Ok(config) => {
            let effective: toml::Value = toml::from_str(&config.to_effective_toml())?;
            (
                serde_json::json!({"ok": true, "file": path, "config": effective}),
                ExitCode::SUCCESS,
            )
        }
        Err(e) => {
            let field = match &e {
                config::Error::Invalid { field, .. } => Some(*field),
                config::Error::Read { .. } | config::Error::Parse { .. } => None,
            };
            (
                serde_json::json!({"ok": false, "file": path, "error": e.to_string(), "field": field}),
                ExitCode::FAILURE,
            )
        }
    };
    println!("{report}");
    Ok(code)
}
