//! `nixpush hook`: the post-build hook, for setups that prefer one binary. Always exits 0.

use std::process::ExitCode;

pub(super) fn run() -> anyhow::Result<ExitCode> {
    crate::hook::run();
    Ok(ExitCode::SUCCESS)
}
