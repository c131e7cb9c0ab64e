//! nixpush's integration tests: one binary, real Nix, real servers.

mod faultproxy;
mod nginx;
mod nixos;
mod spine;
mod upload;
mod util;
