//! Where log lines go: to the journal when stderr is connected to it, otherwise human-readable to stderr.
//!
//! systemd sets `JOURNAL_STREAM=<device>:<inode>` for a service whose stderr is the journal; if stderr is still
//! that stream (not redirected since), events go through tracing-journald so their fields stay structured for
//! `journalctl -o json` and filters. The level comes from `RUST_LOG`, defaulting to the caller's choice, e.g.
//!
//! ```text
//! 2024-11-26T15:40:01.123Z  INFO nixpush::daemon::server: queued store_path=/nix/store/…-ht-b source="hook"
//! ```
//!
//! Upload events (`upload::log_report`, the scheduler's retries, failures and pauses) carry `store_path`,
//! `nar_size`, `file_size`, `attempt` and `nixpush_target`; the journal upper-cases them, so
//! `journalctl -u nixpush STORE_PATH=/nix/store/…-hello-2.12` finds a path's story and
//! `journalctl NIXPUSH_TARGET=cachix://mycache` a target's. The target is not called `target`: tracing-journald
//! writes the event's Rust module as `TARGET`, and a field of ours by that name would collide with it.

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A subscriber was already installed.
    #[error("cannot install the log subscriber: {0}")]
    Install(String),
}

/// Where events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The systemd journal.
    Journal,
    /// Plain text on stderr.
    Stderr,
}

/// Installs the global subscriber. `default_level` (e.g. `info`) applies when `RUST_LOG` is unset.
pub fn init(default_level: &str) -> Result<Destination, Error> {
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    if stderr_is_journal() {
        if let Ok(journal) = tracing_journald::layer() {
            // No prefix: fields appear as STORE_PATH rather than F_STORE_PATH.
            let journal = journal.with_field_prefix(None);
            tracing_subscriber::registry()
                .with(filter())
                .with(journal)
                .try_init()
                .map_err(|e| Error::Install(e.to_string()))?;
            return Ok(Destination::Journal);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|e| Error::Install(e.to_string()))?;
    Ok(Destination::Stderr)
}

/// Whether `$JOURNAL_STREAM` names the file stderr is connected to.
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    // /proc/self/fd/2 resolves to stderr itself, socket or not.
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    matches_stream(&stream, meta.dev(), meta.ino())
}

fn matches_stream(stream: &str, dev: u64, ino: u64) -> bool {
    let mut parts = stream.trim().splitn(2, ':');
    let (Some(d), Some(i)) = (parts.next(), parts.next()) else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::Context;
    use tracing_subscriber::Layer;

    use super::*;
    use crate::store_path::StorePath;
    use crate::upload::{PathOutcome, PathReport};

    /// One event's fields as `(name, value)`.
    type EventFields = Vec<(String, String)>;

    /// Records every event's fields.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<EventFields>>>);

    impl<S: tracing::Subscriber> Layer<S> for Recorder {
        fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
            struct Fields(Vec<(String, String)>);
            impl Visit for Fields {
                fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                    self.0.push((field.name().to_owned(), format!("{value:?}")));
                }
                fn record_str(&mut self, field: &Field, value: &str) {
                    self.0.push((field.name().to_owned(), value.to_owned()));
                }
            }
            let mut fields = Fields(Vec::new());
            event.record(&mut fields);
            self.0.lock().unwrap().push(fields.0);
        }
    }

    #[test]
    fn upload_events_carry_structured_fields_and_a_human_line() {
        let recorder = Recorder::default();
        let subscriber = tracing_subscriber::registry().with(recorder.clone());
        let report = PathReport {
            path: StorePath::parse(
                "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-hello-2.12",
                "/nix/store",
            )
            .unwrap(),
            outcome: PathOutcome::Uploaded,
            nar_size: 12_897_485,
            file_size: Some(3_250_585),
            duration_ms: Some(800),
            compression: Some(crate::config::Compression::Zstd),
        };
        tracing::subscriber::with_default(subscriber, || {
            crate::upload::log_report(&report, Some("http://127.0.0.1:8080"));
        });
        let events = recorder.0.lock().unwrap();
        let fields: std::collections::HashMap<_, _> = events[0].iter().cloned().collect();
        assert_eq!(
            fields["store_path"],
            "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-hello-2.12"
        );
        assert_eq!(fields["nar_size"], "12897485");
        assert_eq!(fields["file_size"], "3250585");
        // See: #19. `target` would become journald's TARGET, which tracing-journald fills with the module.
        assert_eq!(fields["nixpush_target"], "http://127.0.0.1:8080");
        assert!(!fields.contains_key("target"), "{fields:?}");
        assert_eq!(
            fields["message"],
            "uploaded /nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-hello-2.12 (12.3 MiB → 3.1 MiB zstd, 0.8 s)"
        );
    }

    #[test]
    fn journal_stream_must_match_exactly() {
        assert!(matches_stream("8:12345", 8, 12345));
        assert!(!matches_stream("8:12345", 8, 1));
        assert!(!matches_stream("garbage", 8, 12345));
        assert!(!matches_stream("8:", 8, 0));
    }
}
