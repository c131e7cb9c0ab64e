//! `nixpush-hook`: point Nix's `post-build-hook` here. Always exits 0; see `nixpush::hook`.

fn main() {
    nixpush::hook::run();
}
