//! `nixpush`: parses the command line and runs one subcommand.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nixpush::config::Config;

#[derive(Parser)]
#[command(name = "nixpush", version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "NIXPUSH_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the NAR of PATH to stdout, exactly as `nix-store --dump PATH` does.
    DumpNar(cli::dump_nar::Args),
    /// Recompute the NAR hash and size of store paths and compare them with what Nix recorded.
    Verify(cli::verify::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.config.as_deref().map(Config::load).transpose() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("nixpush: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match &cli.command {
        Command::DumpNar(args) => cli::dump_nar::run(args, config.as_ref()),
        Command::Verify(args) => cli::verify::run(args, config.as_ref()),
    };
    result.unwrap_or_else(|e| {
        eprintln!("nixpush: {e:#}");
        ExitCode::from(2)
    })
}
