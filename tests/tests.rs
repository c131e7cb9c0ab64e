//! nixpush's integration tests: one binary, real Nix, real servers. `harness/` holds what the tests share; each
//! other module holds one area's scenarios.

mod cachix;
mod daemon_upload;
mod formats;
mod harness;
mod nixos;
mod ops;
mod proof;
mod remote;
mod s3;
mod security;
mod spine;
mod upload;
mod util;

#[allow(unused_imports)]
// Historical paths (`crate::nginx::Nginx`, `crate::faultproxy::FaultProxy`) for the files that use them.
use harness::{faultproxy, nginx};
