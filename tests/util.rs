//! The helpers most test files import, by their historical names: a thin re-export of [`crate::harness`].
// Not every name is used by today's files; files written against these names keep compiling.
#![allow(unused_imports)]

pub use crate::harness::daemon::{refused_requests, TestDaemon, TestEnv, HOOK, NIXPUSH};
pub use crate::harness::nix::{
    add_store_paths, fresh_nonce, hooktest_nix, missing_store_path, nix, nix_build_with_hook,
    HookBuild, NIX_OPTIONS,
};
pub use crate::harness::process::{send_signal, wait_until, DEADLINE};
