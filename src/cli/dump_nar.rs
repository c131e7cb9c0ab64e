//! `nixpush dump-nar PATH`: writes the NAR of any file, directory or symlink to stdout, byte for byte what
//! `nix-store --dump PATH` writes, so the two can be compared with `cmp`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
use crate::nar;
use anyhow::Context as _;

/// Arguments of `nixpush dump-nar`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The path to serialize (a store path or any other file, directory or symlink; not followed).
    pub path: PathBuf,
}

/// Streams the NAR to stdout.
pub(super) fn run(args: &Args, _config: Option<&Config>) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    // `dump` buffers its output itself.
    nar::dump(&args.path, &mut stdout)
        .with_context(|| format!("cannot dump {}", args.path.display()))?;
    stdout.flush().context("cannot write NAR to stdout")?;
    Ok(ExitCode::SUCCESS)
}
