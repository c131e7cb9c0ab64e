//! Where log lines go: to the journal when stderr is connected to it, otherwise human-readable to stderr.
//!
//! systemd sets `JOURNAL_STREAM=<device>:<inode>` for a service whose stderr is the journal; if stderr is still
//! that stream (not redirected since), events go through tracing-journald so their fields (`STORE_PATH`, …) stay
//! structured for `journalctl -o json`. The level comes from `RUST_LOG`, defaulting to the caller's choice, e.g.
//!
//! ```text
//! 2024-11-26T15:40:01.123Z  INFO nixpush::daemon::server: queued store_path=/nix/store/…-ht-b source="hook"
//! ```

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
    use super::*;

    #[test]
    fn journal_stream_must_match_exactly() {
        assert!(matches_stream("8:12345", 8, 12345));
        assert!(!matches_stream("8:12345", 8, 1));
        assert!(!matches_stream("garbage", 8, 12345));
        assert!(!matches_stream("8:", 8, 0));
    }
}
