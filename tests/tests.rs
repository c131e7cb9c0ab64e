//! nixpush's integration tests: one binary, real Nix, real servers.

mod cachix;
mod ci_example;
mod cli;
mod complete;
mod daemon_upload;
mod degraded;
mod durability;
mod faultproxy;
mod formats;
mod hook;
mod nginx;
mod nixos;
mod ops;
mod priority;
mod proof;
mod remote;
mod s3;
mod s3_writers;
mod s3s;
mod security;
mod spine;
mod trust;
mod upload;
mod util;
