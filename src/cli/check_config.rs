//! `nixpush check-config [FILE] [--json] [--skip-files]`: validate a configuration file and print the effective
//! configuration.
//!
//! Beyond parsing, it opens every key and token file the configuration names, with the loaders the daemon uses,
//! so a missing, unreadable or malformed secret fails here with the daemon's own message and the line that names
//! the file. `--skip-files` leaves the files out, for a build sandbox where they do not exist yet.
//!
//! `--json` prints `{"ok":true,"file":…,"config":{…}}` (the effective configuration, secrets redacted) or
//! `{"ok":false,"file":…,"error":…,"field":…}` (`field` is the dotted key when the problem is a value) and exits 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use crate::backend::{documents, Kind};
use crate::config::{self, line_of, Config, DEFAULT_CONFIG_PATH};

/// The exit codes, for `check-config --help`.
pub(super) const EXIT_CODES_HELP: &str =
    "Exit status:\n  0  the file is valid\n  1  it is not (the message names the key)";

/// Arguments of `check-config`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file to check [default: --config, or /etc/nixpush/config.toml]
    file: Option<PathBuf>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// Do not open the key and token files the configuration names (for a build sandbox, where they are absent)
    #[arg(long)]
    skip_files: bool,
}

/// Why a configuration is not usable: the file itself, or a key or token file it names.
enum Problem {
    Config(config::Error),
    Files(anyhow::Error),
}

pub(super) fn run(config_path: Option<&Path>, args: Args) -> anyhow::Result<ExitCode> {
    let path = args
        .file
        .as_deref()
        .or(config_path)
        .unwrap_or(Path::new(DEFAULT_CONFIG_PATH));
    let checked = Config::load(path)
        .map_err(Problem::Config)
        .and_then(|config| {
            if !args.skip_files {
                check_secret_files(&config, path).map_err(Problem::Files)?;
            }
            Ok(config)
        });
    if !args.json {
        return match checked {
            Ok(config) => {
                print!("{}", config.to_effective_toml());
                // On stderr, so the effective configuration on stdout stays a file one can use as is.
                let each = config.each_target();
                if each.len() > 1 {
                    eprintln!(
                        "{} targets, each uploaded to on its own: {}",
                        each.len(),
                        each.iter()
                            .map(|(name, view)| format!(
                                "{name} ({})",
                                config::redact_url(&view.target.url)
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                for (name, view) in &each {
                    let prefix = if each.len() > 1 {
                        format!("target {name}: ")
                    } else {
                        String::new()
                    };
                    let kind = Kind::of(view);
                    if let Some(note) = documents::cannot_store_note(kind.cannot_store(), view) {
                        eprintln!("note: {prefix}{note}");
                    }
                    if let Some(source) = crate::backend::s3::credentials::describe_source(view) {
                        eprintln!("note: {prefix}{source}");
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(Problem::Config(e)) => Err(e.into()),
            Err(Problem::Files(e)) => Err(e),
        };
    }
    let (report, code) = match checked {
        Ok(config) => {
            let effective: toml::Value = toml::from_str(&config.to_effective_toml())?;
            let mut report = serde_json::json!({"ok": true, "file": path, "config": effective});
            let each = config.each_target();
            if let Some(source) = each
                .first()
                .and_then(|(_, view)| crate::backend::s3::credentials::describe_source(view))
            {
                report["credentials"] = source.into();
            }
            report["targets"] = each
                .iter()
                .map(|(name, view)| {
                    let credentials = crate::backend::s3::credentials::describe_source(view);
                    (
                        name.clone(),
                        serde_json::json!({
                            "url": config::redact_url(&view.target.url),
                            "credentials": credentials,
                        }),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into();
            (report, ExitCode::SUCCESS)
        }
        Err(problem) => {
            let (error, field) = match &problem {
                Problem::Config(e) => (
                    e.to_string(),
                    match e {
                        config::Error::Invalid { field, .. }
                        | config::Error::InvalidAt { field, .. } => Some(field.to_string()),
                        config::Error::Read { .. } | config::Error::Parse { .. } => None,
                    },
                ),
                // The file check's context names the field between backquotes.
                Problem::Files(e) => (format!("{e:#}"), file_field(e)),
            };
            (
                serde_json::json!({"ok": false, "file": path, "error": error, "field": field}),
                ExitCode::FAILURE,
            )
        }
    };
    println!("{report}");
    Ok(code)
}

/// The configuration key a failed file check names, e.g. `target.signing_key_file`.
fn file_field(error: &anyhow::Error) -> Option<String> {
    let context = error.to_string();
    let start = context.find('`')? + 1;
    let end = start + context[start..].find('`')?;
    Some(context[start..end].to_string())
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
    for (name, view) in config.each_target() {
        let table = if name == config::DEFAULT_TARGET && !config.target.is_unset() {
            "target".to_owned()
        } else {
            format!("targets.{name}")
        };
        let kind = Kind::of(&view);
        kind.load_signing_key(&view)
            .with_context(|| at(&format!("{table}.signing_key_file")))?;
        kind.load_credentials(&view)
            .with_context(|| at(&format!("{table}.auth_token_file")))?;
        crate::signing::SecretKey::load_all(&view.target.signing_key_files)
            .with_context(|| at(&format!("{table}.signing_key_files")))?;
    }
    Ok(())
}
