//! nixpush's integration tests: one binary, real Nix, real servers.

mod daemon_upload;
mod faultproxy;
mod formats;
mod nginx;
mod nixos;
mod ops;
mod spine;
mod upload;
mod util;
