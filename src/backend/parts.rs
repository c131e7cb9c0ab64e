//! Multipart uploads from a local file, shared by the Cachix and S3 backends: how a file is cut into parts
//! (at most 10,000, as S3 and Cachix allow) and a request body that streams one part from disk.
//!
//! A 70 MiB NAR with 32 MiB parts: `(1, 0, 32 MiB)`, `(2, 32 MiB, 32 MiB)`, `(3, 64 MiB, 6 MiB)`.

use std::path::Path;

use super::Error;

/// S3's (and so Cachix's) limit on parts per upload.
pub const MAX_PARTS: u64 = 10_000;
/// Parts in flight per NAR (Cachix's `--num-concurrent-chunks` default; S3 uses the same).
pub const PARALLEL_PARTS: usize = 4;
const MIB: u64 = 1024 * 1024;

/// The part size for a file of `file_size` bytes: `configured`, grown (to whole MiB) when the file would
/// otherwise need more than [`MAX_PARTS`] parts (cachix#639).
pub fn part_size_for(file_size: u64, configured: u64) -> u64 {
    let needed = file_size.div_ceil(MAX_PARTS);
    if needed <= configured {
        configured
    } else {
        needed.div_ceil(MIB) * MIB
    }
}

/// `(part number, offset, length)` of each part; a 0-byte file is one empty part.
pub fn part_ranges(file_size: u64, part_size: u64) -> Vec<(u32, u64, u64)> {
    if file_size == 0 {
        return vec![(1, 0, 0)];
    }
    let part_size = part_size.max(1);
    (0..file_size.div_ceil(part_size))
        .map(|i| {
            let offset = i * part_size;
            // part_size_for keeps the count at most MAX_PARTS, far below u32::MAX.
            let number = u32::try_from(i + 1).unwrap_or(u32::MAX);
            (number, offset, part_size.min(file_size - offset))
        })
        .collect()
}

/// A request body streaming `length` bytes of `file` from `offset`, opened afresh for each try; counted and
/// throttled as bytes on the wire ([`super::wire::file_body`]).
pub async fn file_range_body(
    file: &Path,
    offset: u64,
    length: u64,
) -> Result<reqwest::Body, Error> {
    super::wire::file_body(file, offset, length).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let p = 32 * MIB;
        assert_eq!(part_size_for(10, p), p);
        assert_eq!(part_size_for(p * MAX_PARTS, p), p);
        // 32 MiB parts cover 312.5 GiB; 400 GiB needs bigger ones to stay within 10,000 (cachix#639).
        let huge = 400 * 1024 * MIB;
        let size = part_size_for(huge, p);
        assert!(
            size > p && size % MIB == 0 && huge.div_ceil(size) <= MAX_PARTS,
            "{size}"
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(part_ranges(0, 4), vec![(1, 0, 0)]);
        assert_eq!(part_ranges(10, 4), vec![(1, 0, 4), (2, 4, 4), (3, 8, 2)]);
        assert_eq!(part_ranges(8, 4), vec![(1, 0, 4), (2, 4, 4)]);
        let total: u64 = part_ranges(70 * MIB, 32 * MIB).iter().map(|r| r.2).sum();
        assert_eq!(total, 70 * MIB);
    }
}
