//! nixpush's integration tests: one binary, real Nix, real servers. `harness/` holds what the tests share; each
//! other module holds one area's scenarios.

mod cachix;
mod ci_example;
mod cli;
mod complete;
mod daemon_upload;
mod degraded;
mod doctor;
mod durability;
mod filters;
mod formats;
mod gc_roots;
mod harness;
mod hook;
mod memory;
mod metrics;
mod nixos;
mod offline;
mod ops;
mod priority;
mod proof;
mod rate;
mod remote;
mod s3;
mod s3_credentials;
mod s3_writers;
mod s3s;
mod security;
mod spine;
mod targets;
mod trust;
mod upload;
mod util;

#[allow(unused_imports)]
// Historical paths (`crate::nginx::Nginx`, `crate::faultproxy::FaultProxy`) for the files that use them.
use harness::{faultproxy, nginx};
