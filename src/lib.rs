//! nixpush: push every store path Nix builds to a binary cache, in the background.
//!
//! # Layout
//!
//! Data flows one way: hook → protocol → queue → scheduler → upload → backend.
//!
//! - [`config`]: the TOML configuration, its defaults and validation.
//! - [`store_path`]: validated store paths.
//! - [`base32`], [`hash`]: Nix base32 and SHA-256 hash strings.
//! - [`nar`]: NAR serialisation (streaming writer) and a validating reader.
//! - [`narinfo`]: narinfo rendering, parsing and fingerprints.
//! - [`signing`]: ed25519 keys in Nix's and Cachix's formats.
//! - [`derivation`]: `.drv` parsing, enough to find outputs.
//! - [`pathinfo`]: what the local Nix store records about a path and its closure.
//! - [`protocol`]: the hook socket's wire format.
//! - [`hook`]: the post-build-hook client; std only.
//! - [`spool`]: requests the hook saved while the daemon was unreachable.
//! - [`queue`]: the durable queue; the only module that knows sled.
//! - [`daemon`]: the long-running service: socket server, spool import, group commit, shutdown.
//! - [`status`]: the status report shared by the daemon and `nixpush status`.
//! - [`cli`]: the `nixpush` command line.
//! - [`systemd`]: sd_notify and socket activation.
//! - [`logging`]: journald or stderr.
//! - [`upload`]: the engine: closure, dedup, NAR pipeline, dependency-ordered uploads, retry policy.
//! - [`priority`]: idle CPU and I/O priority for hashing and compression, so uploads yield to builds.
//! - [`backend`]: where NARs go (`file://`, HTTP); the only code that speaks to a cache.
//! - [`secret`]: secrets that never print.

pub mod backend;
pub mod base32;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod derivation;
mod excerpt;
pub mod hash;
pub mod hook;
pub mod logging;
pub mod nar;
pub mod narinfo;
pub mod pathinfo;
pub mod priority;
pub mod protocol;
pub mod queue;
pub mod secret;
pub mod signing;
pub mod spool;
pub mod status;
pub mod store_path;
pub mod systemd;
pub mod upload;
