//! nixpush: push every store path Nix builds to a binary cache, in the background.
//!
//! # Layout
//!
//! Data flows one way: hook → protocol → queue → scheduler → upload → backend.
//!
//! - [`config`]: the TOML configuration, its defaults and validation, with `[target]` and each `[targets.NAME]`
//!   in [`config::Target`] and one target's view of the whole ([`config::Config::for_target`]); [`byte_size`]:
//!   sizes such as `"20GiB"` in it.
//! - [`store_path`]: validated store paths.
//! - [`base32`], [`hash`]: Nix base32 and SHA-256 hash strings.
//! - [`nar`]: NAR serialisation (streaming writer), a validating reader, and listings built from the stream.
//! - [`narinfo`]: narinfo rendering, parsing and fingerprints.
//! - [`signing`]: ed25519 keys in Nix's and Cachix's formats.
//! - [`realisation`]: realisations of content-addressed derivation outputs (`realisations/*.doi`).
//! - [`cache_info`]: `nix-cache-info`, written and compared.
//! - [`buildlog`]: build logs from Nix's log directory.
//! - [`derivation`]: `.drv` parsing, enough to find outputs.
//! - [`pathinfo`]: everything read from the local Nix store: path info and closures, and
//!   ([`pathinfo::registry`]) validity and a derivation's outputs for the daemon's request checks.
//! - [`protocol`]: the hook socket's wire format, with message types of its own (not the queue's records).
//! - [`hook`]: the post-build-hook client; std only.
//! - [`spool`]: requests the hook saved while the daemon was unreachable.
//! - [`queue`]: the durable queue (SQLite: its tables and their migration in `schema`, the in-memory counts and
//!   due order per target in `index`; `queue::open` checks and salvages it, and imports an older sled queue);
//!   an entry per path and target, each target a view of one database. The only module that knows its storage
//!   engine. Its records stay inside: the protocol and the status report convert them at the boundary.
//! - [`daemon`]: the long-running service: socket server ([`daemon::server`]: connection slots, framing, control
//!   commands), request intake ([`daemon::intake`]: resolution, queue write, GC root and group commit on one
//!   blocking thread), spool import, one lane per target ([`daemon::lane`]: its queue
//!   view, status, rate and wake-ups) each with its own scheduler ([`daemon::scheduler`]: the loop, one batch, the
//!   presence memory, the observer), SIGHUP, shutdown.
//! - [`gc_roots`]: the roots that keep queued paths from Nix's garbage collector, their bound and reconcile.
//! - [`status`]: the status report shared by the daemon and `nixpush status`, with types of its own, one part per
//!   target ([`status::TargetReport`]) and its text rendering.
//! - [`outcome`]: how the engine finished with a path, one vocabulary for the queue's history and the status
//!   report.
//! - [`cli`]: the `nixpush` command line.
//! - [`systemd`]: sd_notify and socket activation.
//! - [`logging`]: journald or stderr.
//! - [`malloc_arenas`]: two glibc malloc arenas for the long-running commands.
//! - [`retry`]: the one backoff policy type, used per path, per request and for Cachix.
//! - [`upload`]: the engine ([`upload::Engine`]; its prepare-and-upload pipeline in `upload::pipeline`), with the
//!   dependency ordering ([`upload::order`]), what the
//!   target and upstreams hold ([`upload::presence`]), which paths a target takes ([`upload::filter`]: include,
//!   exclude, size, closure safety), NAR preparation, reports and log lines ([`upload::report`]).
//! - [`backend`]: where NARs go; the only code that speaks to a cache. [`backend::target`] decides what a target
//!   is (backend, token, signing key, name, identity) for the daemon, `push` and `doctor`; `file://`, HTTP, S3
//!   and Cachix (`backend::cachix`: API, multipart upload, keys) each have a module, upstream caches one more;
//!   [`backend::error`] classifies what a target answers (transient, auth, target fault) and retries a request,
//!   [`backend::documents`] names every small document (key, content type) besides NARs.
//! - [`priority`]: idle CPU and I/O priority for hashing and compression, so uploads yield to builds.
//! - [`secret`]: secrets that never print.
//! - [`metrics`]: Prometheus metrics at `/metrics` (`metrics_listen`): the text format, counters, the scrape, the
//!   listener.
//! - [`rate_schedule`]: upload rates as configured (`max_upload_rate`, `rate_schedule`) and the rate in force at a
//!   local time; [`backend::rate`] is the token bucket that enforces it, [`backend::wire`] the body stream that
//!   counts and throttles the bytes on the wire.

pub mod backend;
pub mod base32;
pub mod buildlog;
pub mod byte_size;
pub mod cache_info;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod derivation;
mod excerpt;
pub mod gc_roots;
pub mod hash;
pub mod hook;
pub mod logging;
pub mod malloc_arenas;
pub mod metrics;
pub mod nar;
pub mod narinfo;
pub mod outcome;
pub mod pathinfo;
pub mod priority;
pub mod protocol;
pub mod queue;
pub mod rate_schedule;
pub mod realisation;
pub mod retry;
pub mod secret;
pub mod signing;
pub mod spool;
pub mod status;
pub mod store_path;
pub mod systemd;
pub mod upload;
