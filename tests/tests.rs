//! nixpush's integration tests: one binary, real Nix, real servers.

mod cachix;
mod faultproxy;
mod nginx;
mod nixos;
mod remote;
mod s3;
mod spine;
mod upload;
mod util;
