//! `nixpush verify PATH…`: recomputes each store path's NAR hash and size and compares them with what Nix
//! recorded, the same check the upload engine applies before pushing. One line per path:
//!
//! ```text
//! ok /nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top sha256:1dinrxag5kdkvjic29507irlj9cdxjzbmb806jqcwq5k2wai6cfg 400
//! corrupt /nix/store/…-x: recorded sha256:… (400 bytes), computed sha256:… (408 bytes)
//! not-valid /nix/store/…-y
//! ```
//!
//! Exits 1 if any path is corrupt, not valid or unreadable.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::pathinfo::{self, LocalStore, VerifyOutcome};
use crate::store_path::{self, StorePath};
use anyhow::Context as _;

/// Arguments of `nixpush verify`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store paths, or symlinks into the store such as `./result`.
    #[arg(required = true)]
    pub paths: Vec<String>,
}

/// Verifies every path and prints one line each.
pub(super) fn run(args: &Args, config: Option<&Config>) -> anyhow::Result<ExitCode> {
    let defaults = Config::default();
    let config = config.unwrap_or(&defaults);
    let store_dir = config.store_dir_str();
    let store = LocalStore::open(store_dir, &config.nix_db)
        .with_context(|| format!("cannot open the Nix store at {store_dir}"))?;
    let mut out = std::io::stdout().lock();
    let mut all_ok = true;
    for arg in &args.paths {
        let line = match resolve(arg, store_dir) {
            Err(e) => format!("error {arg}: {e}"),
            Ok(path) => match pathinfo::verify_path(&store, &path) {
                Ok(VerifyOutcome::Ok { nar_hash, nar_size }) => {
                    format!("ok {path} {nar_hash} {nar_size}")
                }
                Ok(VerifyOutcome::Corrupt {
                    recorded,
                    computed,
                    recorded_size,
                    computed_size,
                }) => format!(
                    "corrupt {path}: recorded {recorded} ({recorded_size} bytes), \
                     computed {computed} ({computed_size} bytes)"
                ),
                Ok(VerifyOutcome::NotValid) => format!("not-valid {path}"),
                Err(e) => format!("error {path}: {e}"),
            },
        };
        all_ok &= line.starts_with("ok ");
        writeln!(out, "{line}").context("cannot write to stdout")?;
    }
    out.flush().context("cannot write to stdout")?;
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A store path as given, or the store path a symlink such as `./result` points into.
fn resolve(arg: &str, store_dir: &str) -> Result<StorePath, store_path::Error> {
    match StorePath::parse(arg, store_dir) {
        Err(store_path::Error::NotInStore { .. }) => match std::fs::canonicalize(Path::new(arg)) {
            Ok(real) => StorePath::parse_containing(&real.to_string_lossy(), store_dir),
            Err(_) => StorePath::parse(arg, store_dir),
        },
        other => other,
    }
}
