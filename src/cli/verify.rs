//! `nixpush verify PATH…`: recomputes each store path's NAR hash and size and compares them with what Nix
//! recorded, the same check the upload engine applies before pushing. One line per path:
//!
//! ```text
//! ok /nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top sha256:1dinrxag5kdkvjic29507irlj9cdxjzbmb806jqcwq5k2wai6cfg 400
//! corrupt /nix/store/…-x: recorded sha256:… (400 bytes), computed sha256:… (408 bytes)
//! not-valid /nix/store/…-y
//! ```
//!
//! With `--json`, one array instead, an object per path:
//! `{"path":…,"status":"ok|corrupt|not-valid|error","nar_hash":…,"nar_size":…,"recorded_hash":…,
//! "recorded_size":…,"error":…}` (fields that do not apply are `null`).
//!
//! Exits 1 if any path is corrupt, not valid or unreadable.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::pathinfo::{self, LocalStore, VerifyOutcome};
use crate::store_path::{self, StorePath};
use anyhow::Context as _;

/// The exit codes, for `verify --help`.
pub(super) const EXIT_CODES_HELP: &str = "Exit status:\n  0  every path matches what Nix recorded\n  1  a path is corrupt, not valid or unreadable";

/// Arguments of `nixpush verify`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store paths, or symlinks into the store such as `./result`.
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Print one JSON array with an object per path.
    #[arg(long)]
    pub json: bool,
}

/// One path's result, as `--json` prints it.
#[derive(Debug, Default, serde::Serialize)]
struct Verdict {
    path: String,
    status: &'static str,
    /// The hash computed from the store's bytes.
    nar_hash: Option<String>,
    nar_size: Option<u64>,
    /// What Nix recorded, when it differs.
    recorded_hash: Option<String>,
    recorded_size: Option<u64>,
    error: Option<String>,
}

impl Verdict {
    /// The line printed without `--json`.
    fn line(&self) -> String {
        let path = &self.path;
        match self.status {
            "ok" => format!(
                "ok {path} {} {}",
                self.nar_hash.as_deref().unwrap_or_default(),
                self.nar_size.unwrap_or_default()
            ),
            "corrupt" => format!(
                "corrupt {path}: recorded {} ({} bytes), computed {} ({} bytes)",
                self.recorded_hash.as_deref().unwrap_or_default(),
                self.recorded_size.unwrap_or_default(),
                self.nar_hash.as_deref().unwrap_or_default(),
                self.nar_size.unwrap_or_default()
            ),
            "not-valid" => format!("not-valid {path}"),
            _ => format!(
                "error {path}: {}",
                self.error.as_deref().unwrap_or_default()
            ),
        }
    }
}

/// Verifies every path and prints one line each.
pub(super) fn run(args: &Args, config: Option<&Config>) -> anyhow::Result<ExitCode> {
    let defaults = Config::default();
    let config = config.unwrap_or(&defaults);
    let store_dir = config.store_dir_str();
    let store = LocalStore::open(store_dir, &config.nix_db)
        .with_context(|| format!("cannot open the Nix store at {store_dir}"))?;
    let mut out = std::io::stdout().lock();
    let mut verdicts = Vec::new();
    for arg in &args.paths {
        let verdict = verify_one(&store, arg, store_dir);
        if !args.json {
            writeln!(out, "{}", verdict.line()).context("cannot write to stdout")?;
        }
        verdicts.push(verdict);
    }
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&verdicts)?).context("cannot write to stdout")?;
    }
    out.flush().context("cannot write to stdout")?;
    Ok(if verdicts.iter().all(|v| v.status == "ok") {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn verify_one(store: &LocalStore, arg: &str, store_dir: &str) -> Verdict {
    let path = match resolve(arg, store_dir) {
        Ok(path) => path,
        Err(e) => {
            return Verdict {
                path: arg.to_owned(),
                status: "error",
                error: Some(e.to_string()),
                ..Verdict::default()
            }
        }
    };
    let base = Verdict {
        path: path.to_string(),
        ..Verdict::default()
    };
    match pathinfo::verify_path(store, &path) {
        Ok(VerifyOutcome::Ok { nar_hash, nar_size }) => Verdict {
            status: "ok",
            nar_hash: Some(nar_hash.to_string()),
            nar_size: Some(nar_size),
            ..base
        },
        Ok(VerifyOutcome::Corrupt {
            recorded,
            computed,
            recorded_size,
            computed_size,
        }) => Verdict {
            status: "corrupt",
            nar_hash: Some(computed.to_string()),
            nar_size: Some(computed_size),
            recorded_hash: Some(recorded.to_string()),
            recorded_size: Some(recorded_size),
            ..base
        },
        Ok(VerifyOutcome::NotValid) => Verdict {
            status: "not-valid",
            ..base
        },
        Err(e) => Verdict {
            status: "error",
            error: Some(e.to_string()),
            ..base
        },
    }
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
