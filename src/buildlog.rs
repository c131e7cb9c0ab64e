//! Build logs from Nix's log directory, as a binary cache stores them.
//!
//! Nix keeps the log of `/nix/store/2lni…-ht-b.drv` in `<log dir>/drvs/2l/ni…-ht-b.drv.bz2` (or without `.bz2`
//! when `compress-build-log = false`). `nix store copy-log --to file://…` writes it decompressed to
//! `log/2lni…-ht-b.drv`, and `nix log --store <cache> <output path>` follows the output's `Deriver` to it; so does
//! nixpush.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use crate::store_path::StorePath;

/// Largest log uploaded; Nix's own `max-build-log-size` is unlimited by default, but a runaway log should not
/// fill memory. Larger logs are cut here with a note, as Nix notes a log it truncated.
pub const MAX_LOG_BYTES: u64 = 64 * 1024 * 1024;

/// Why a log could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the build log {file}: {source}")]
pub struct Error {
    /// The log file.
    pub file: PathBuf,
    /// What went wrong.
    #[source]
    pub source: std::io::Error,
}

/// The log of `drv` as text, or `None` when Nix has none (substituted, or built elsewhere).
pub fn read(log_dir: &Path, drv: &StorePath) -> Result<Option<Vec<u8>>, Error> {
    let base = drv.base_name();
    let (prefix, rest) = base.split_at(2.min(base.len()));
    let plain = log_dir.join("drvs").join(prefix).join(rest);
    let compressed = plain.with_file_name(format!("{rest}.bz2"));
    for (file, is_bz2) in [(compressed, true), (plain, false)] {
        let opened = match std::fs::File::open(&file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error { file, source }),
        };
        let mut text = Vec::new();
        let result = if is_bz2 {
            bzip2::read::MultiBzDecoder::new(opened)
                .take(MAX_LOG_BYTES)
                .read_to_end(&mut text)
        } else {
            opened.take(MAX_LOG_BYTES).read_to_end(&mut text)
        };
        result.map_err(|source| Error { file, source })?;
        if text.len() as u64 == MAX_LOG_BYTES {
            text.extend_from_slice(b"\n[nixpush: log truncated]\n");
        }
        return Ok(Some(text));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn finds_compressed_and_plain_logs() {
        let dir = tempfile::tempdir().unwrap();
        let drv = StorePath::parse(
            "/nix/store/2lni06sxywa3b9jp39iq4ccb551qs1p1-ht-b.drv",
            "/nix/store",
        )
        .unwrap();
        assert_eq!(read(dir.path(), &drv).unwrap(), None);
        let sub = dir.path().join("drvs/2l");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(
            sub.join("ni06sxywa3b9jp39iq4ccb551qs1p1-ht-b.drv"),
            "plain\n",
        )
        .unwrap();
        assert_eq!(read(dir.path(), &drv).unwrap().unwrap(), b"plain\n");
        let mut encoder = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        encoder.write_all(b"hello from the builder\n").unwrap();
        std::fs::write(
            sub.join("ni06sxywa3b9jp39iq4ccb551qs1p1-ht-b.drv.bz2"),
            encoder.finish().unwrap(),
        )
        .unwrap();
        assert_eq!(
            read(dir.path(), &drv).unwrap().unwrap(),
            b"hello from the builder\n"
        );
        std::fs::write(
            sub.join("ni06sxywa3b9jp39iq4ccb551qs1p1-ht-b.drv.bz2"),
            "not bz2",
        )
        .unwrap();
        assert!(read(dir.path(), &drv).is_err());
    }
}
