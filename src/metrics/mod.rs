//! Prometheus metrics: `metrics_listen` (off unless set) serves `/metrics` in the text exposition format.
//!
//! - [`exposition`]: the text format (HELP/TYPE lines, escaping, counters, histograms), written by hand: a few
//!   hundred lines instead of a dependency tree, and exactly the 0.0.4 text that `promtool` and every
//!   Prometheus version read.
//! - [`counters`]: what is counted where it happens (hook requests, spool imports, uploads, bytes, failures by
//!   reason class, the upload-duration histogram).
//! - [`scrape`]: one scrape: gauges read from the status report and the queue at that moment, so they always agree
//!   with `nixpush status --json`, then the counters.
//! - [`listen`]: `metrics_listen` parsed and bound (TCP or a Unix socket).
//! - [`server`]: the small HTTP/1.1 responder.

pub mod counters;
pub mod exposition;
pub mod listen;
pub mod scrape;
pub mod server;

pub use counters::{Counters, FileKind, HookResult, Skip, SpoolImport};
pub use scrape::DEFAULT_TARGET;
