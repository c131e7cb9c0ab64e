//! The `nixpush` command line: clap definitions and one `run` per subcommand. Errors are `anyhow` here and
//! nowhere else; `main` prints them with their whole chain and turns them into an exit code.

mod check_config;
mod completions;
mod daemon;
mod doctor;
pub mod dump_nar;
mod hook;
pub mod push;
mod push_progress;
mod push_summary;
mod queue;
mod status;
pub mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::protocol::{self, Request, Response};

/// Exit codes every command shares, shown at the end of `nixpush --help`.
const EXIT_CODES: &str = "\
Exit status:
  0  success
  1  the command failed (the message on stderr says why)
  2  the command line is wrong (unknown option, missing argument)
Each command's --help lists the codes it adds.";

/// Push every Nix build to your binary cache in the background.
#[derive(Debug, Parser)]
#[command(name = "nixpush", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    /// Configuration file [default: /etc/nixpush/config.toml]
    #[arg(long, global = true, env = "NIXPUSH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands. Each `after_help` lists the command's exit codes; `cli_exit_codes_in_every_help` checks
/// that none is missing.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: accept paths on the hook socket, queue them durably, push them.
    #[command(after_help = daemon::EXIT_CODES_HELP)]
    Daemon(daemon::Args),
    /// Show the daemon's queue, target and recent activity.
    #[command(after_help = status::EXIT_CODES_HELP)]
    Status(status::Args),
    /// Check a configuration file and print it with every default filled in.
    #[command(after_help = check_config::EXIT_CODES_HELP)]
    CheckConfig(check_config::Args),
    /// Run as Nix's post-build-hook (the same as the `nixpush-hook` program).
    #[command(after_help = hook::EXIT_CODES_HELP)]
    Hook,
    /// List the queue, retry failed paths, drop a path.
    #[command(after_help = queue::EXIT_CODES_HELP)]
    Queue(queue::Args),
    /// Requeue failed and held-back paths now (the same as `queue retry`).
    #[command(after_help = queue::RETRY_EXIT_CODES_HELP)]
    Retry(queue::RetryArgs),
    /// Check the whole setup (configuration, daemon, Nix hook and trust, token, key, target, spool) and say how
    /// to fix what is wrong, without writing anything; exits 0 unless a check failed (warnings do not count).
    #[command(after_help = doctor::EXIT_CODES_HELP)]
    Doctor(doctor::Args),
    /// Upload store paths (and their closures) now, without the daemon; or queue them with `--via-daemon`.
    #[command(after_help = push::EXIT_CODES_HELP)]
    Push(push::Args),
    /// Write the NAR of a path to standard output, exactly as `nix-store --dump PATH` does.
    #[command(after_help = dump_nar::EXIT_CODES_HELP)]
    DumpNar(dump_nar::Args),
    /// Recompute NAR hashes and sizes and compare them with what Nix recorded.
    #[command(after_help = verify::EXIT_CODES_HELP)]
    Verify(verify::Args),
    /// Print a shell completion script: `nixpush completions bash > /usr/share/bash-completion/completions/nixpush`.
    #[command(after_help = completions::EXIT_CODES_HELP)]
    Completions(completions::Args),
    /// Print the manual page (roff): `nixpush man > nixpush.1; man -l nixpush.1`.
    #[command(after_help = completions::MAN_EXIT_CODES_HELP)]
    Man(completions::ManArgs),
}

/// Parses the command line, runs the subcommand, and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Daemon(_) | Command::Push(_)) {
        crate::malloc_arenas::limit();
    }
    let config_path = cli.config.as_deref();
    let result = match cli.command {
        Command::Daemon(args) => daemon::run(config_path, args),
        Command::Status(args) => status::run(config_path, args),
        Command::CheckConfig(args) => check_config::run(config_path, args),
        Command::Hook => hook::run(),
        Command::Queue(args) => queue::run(config_path, args),
        Command::Retry(args) => queue::retry(config_path, args),
        Command::Doctor(args) => doctor::run(config_path, args),
        Command::Push(args) => push::run(config_path, args),
        Command::DumpNar(args) => {
            optional_config(config_path).and_then(|config| dump_nar::run(&args, config.as_ref()))
        }
        Command::Verify(args) => {
            optional_config(config_path).and_then(|config| verify::run(&args, config.as_ref()))
        }
        Command::Completions(args) => completions::run(&args),
        Command::Man(args) => completions::man(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nixpush: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and its causes joined by ": ", leaving out a cause the message already contains: many errors print their
/// source themselves, and "No space left on device" once is enough.
fn error_chain(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

/// The configuration for commands that talk to the daemon: the given file, or the default one, or (when the
/// default file does not exist) the built-in defaults, which is all a client needs to find the socket.
fn client_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(path) => Ok(Config::load(path)?),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            Ok(Config::load(Path::new(DEFAULT_CONFIG_PATH))?)
        }
        None => Ok(Config::default()),
    }
}

/// The configuration if one was named or the default file exists; commands that work without one get `None`.
fn optional_config(path: Option<&Path>) -> anyhow::Result<Option<Config>> {
    match path {
        Some(path) => Ok(Some(Config::load(path)?)),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            Ok(Some(Config::load(Path::new(DEFAULT_CONFIG_PATH))?))
        }
        None => Ok(None),
    }
}

/// How long CLI requests to the daemon may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one request; a daemon error becomes an `anyhow` error naming the socket.
fn ask(config: &Config, request: &Request) -> anyhow::Result<Response> {
    let response = protocol::call(&config.socket, request, CLIENT_TIMEOUT)
        .with_context(|| format!("asking the daemon at {}", config.socket.display()))?;
    if let Response::Error { kind, message } = &response {
        anyhow::bail!("the daemon answered {kind:?}: {message}");
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_is_printed_once() {
        let full = std::io::Error::from_raw_os_error(28);
        let e = anyhow::Error::new(full).context("cannot open the queue");
        assert_eq!(
            error_chain(&e),
            "cannot open the queue: No space left on device (os error 28)"
        );
        let e = crate::queue::Error::Open {
            path: "/state/queue".into(),
            source: sled::Error::Io(std::io::Error::from_raw_os_error(28)),
        };
        let message = error_chain(&anyhow::Error::new(e));
        assert_eq!(
            message.matches("No space left on device").count(),
            1,
            "{message}"
        );
    }
}
