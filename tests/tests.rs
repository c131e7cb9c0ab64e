//! nixpush's integration tests: one binary, real Nix, real servers.

mod cachix;
mod daemon_upload;
mod faultproxy;
mod formats;
mod nginx;
mod nixos;
mod ops;
mod priority;
mod proof;
mod remote;
mod s3;
mod security;
mod spine;
mod upload;
mod util;
