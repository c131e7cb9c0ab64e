//! nixpush's integration tests: one binary, real Nix, real servers.

mod formats;
