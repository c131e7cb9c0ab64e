//! Whether the state directory can take queue writes right now.
//!
//! sled turns a failed write (disk full, read-only filesystem) into an error that every later operation repeats
//! until the process restarts. So the daemon looks at the filesystem before it takes new work or starts uploads
//! (whose bookkeeping writes too), and refuses while the directory is full or read-only: nothing already queued is
//! put at risk, and work is taken again as soon as space returns, without a restart.

use std::path::{Path, PathBuf};

use nix::sys::statvfs::{statvfs, FsFlags};

use crate::status::human_bytes;

/// Free space kept for the queue's own bookkeeping (marking uploads done, history, flushes) once new work is
/// refused.
pub const RESERVE_BYTES: u64 = 8 * 1024 * 1024;

/// Why the state directory cannot take writes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Less than [`RESERVE_BYTES`] free.
    #[error(
        "the state directory {} is full ({} free, nixpush keeps {} in reserve); free some space there",
        dir.display(), human_bytes(*free), human_bytes(RESERVE_BYTES)
    )]
    Full {
        /// The state directory.
        dir: PathBuf,
        /// Bytes available to the daemon.
        free: u64,
    },
    /// Mounted read-only.
    #[error("the state directory {} is on a read-only filesystem", dir.display())]
    ReadOnly {
        /// The state directory.
        dir: PathBuf,
    },
    /// `statvfs` failed.
    #[error("cannot check the state directory {}: {source}", dir.display())]
    Check {
        /// The state directory.
        dir: PathBuf,
        /// What the OS said.
        source: nix::errno::Errno,
    },
}

/// Ok when `dir` is on a writable filesystem with more than [`RESERVE_BYTES`] free.
pub fn check(dir: &Path) -> Result<(), Error> {
    let stat = statvfs(dir).map_err(|source| Error::Check {
        dir: dir.to_owned(),
        source,
    })?;
    if stat.flags().contains(FsFlags::ST_RDONLY) {
        return Err(Error::ReadOnly {
            dir: dir.to_owned(),
        });
    }
    // Both are type aliases whose width depends on the platform.
    let free = (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
    if free < RESERVE_BYTES {
        return Err(Error::Full {
            dir: dir.to_owned(),
            free,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writable_directory_passes_and_errors_name_it() {
        let dir = tempfile::tempdir().unwrap();
        // The test machine's temporary directory has room to spare.
        check(dir.path()).unwrap();
        let missing = dir.path().join("missing");
        let e = check(&missing).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        let full = Error::Full {
            dir: dir.path().to_owned(),
            free: 0,
        };
        assert!(full.to_string().contains("is full (0 B free"), "{full}");
    }
}
