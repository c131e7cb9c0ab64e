//! `nixpush completions SHELL` and `nixpush man`: shell completion scripts and the manual page, generated from
//! the clap definitions so they never fall behind the real options. The flake package installs both.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::CommandFactory as _;

use super::Cli;

/// The exit codes, for `completions --help`.
pub(super) const EXIT_CODES_HELP: &str = "Exit status:\n  0  the script was written";

/// The exit codes, for `man --help`.
pub(super) const MAN_EXIT_CODES_HELP: &str =
    "Exit status:\n  0  the pages were written\n  1  they could not be";

/// Arguments of `completions`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

/// Shells with completion scripts.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

pub(super) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "nixpush", &mut out);
    write_stdout(&out)
}

/// Arguments of `man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write nixpush.1 and one page per subcommand (nixpush-push.1, …) into DIR instead of printing nixpush.1.
    #[arg(long, value_name = "DIR")]
    dir: Option<std::path::PathBuf>,
}

/// The manual page `nixpush(1)` on stdout, or every page into a directory.
pub(super) fn man(args: &ManArgs) -> anyhow::Result<ExitCode> {
    let command = Cli::command();
    if let Some(dir) = &args.dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        clap_mangen::generate_to(command, dir)
            .with_context(|| format!("cannot write manual pages to {}", dir.display()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = Vec::new();
    clap_mangen::Man::new(command).render(&mut out)?;
    write_stdout(&out)
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}
