//! The harness every integration test builds on. Each module owns one thing a test starts or checks; every
//! process a test starts is owned by a [`process::Guard`], so a failing test stops what it started, and every
//! wait has a deadline.

pub mod aws;
pub mod cache;
pub mod daemon;
pub mod deadend;
pub mod faultproxy;
pub mod keys;
pub mod nginx;
pub mod nix;
pub mod process;
pub mod prometheus;
pub mod servers;
pub mod setup;
pub mod tmpfs;
pub mod user;
