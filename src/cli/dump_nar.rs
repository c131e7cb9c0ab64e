//! `nixpush dump-nar PATH`: writes the NAR of any file, directory or symlink to stdout, byte for byte what
//! `nix-store --dump PATH` writes, so the two can be compared with `cmp`.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
use crate::nar;
use anyhow::Context as _;

/// The exit codes, for `dump-nar --help`.
pub(super) const EXIT_CODES_HELP: &str =
    "Exit status:\n  0  the whole NAR was written\n  1  the path cannot be read";

/// Arguments of `nixpush dump-nar`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The path to serialize (a store path or any other file, directory or symlink; not followed).
    pub path: PathBuf,
}

/// Streams the NAR to stdout.
pub(super) fn run(args: &Args, _config: Option<&Config>) -> anyhow::Result<ExitCode> {
    // Write to (a duplicate of) the stdout descriptor directly: Rust's `Stdout` is line-buffered and would split
    // binary data at every newline byte. `dump` buffers its output itself.
    let mut stdout = File::from(
        std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("cannot use stdout")?,
    );
    nar::dump(&args.path, &mut stdout)
        .with_context(|| format!("cannot dump {}", args.path.display()))?;
    stdout.flush().context("cannot write NAR to stdout")?;
    Ok(ExitCode::SUCCESS)
}
