//! SHA-256 hashes and the string forms Nix writes them in, plus reader/writer adapters that hash a stream.
//!
//! The same NAR hash, in every form nixpush meets:
//!
//! | where | form |
//! |---|---|
//! | narinfo `NarHash`, fingerprints, `nix-store -q --hash` | `sha256:1dinrxag5kdkvjic29507irlj9cdxjzbmb806jqcwq5k2wai6cfg` |
//! | SQLite `ValidPaths.hash` | `sha256:cf31131517b360ceb03400adbabeec8d2549733ca024c1a2dcb3cdf254cf36b6` |
//! | `nix path-info --json` | `sha256-zzETFRezYM6wNACtur7sjSVJczygJMGi3LPN8lTPNrY=` |
//!
//! ```
//! use nixpush::hash::Sha256Hash;
//! let h = Sha256Hash::parse("sha256-zzETFRezYM6wNACtur7sjSVJczygJMGi3LPN8lTPNrY=").unwrap();
//! assert_eq!(h.to_typed_base32(), "sha256:1dinrxag5kdkvjic29507irlj9cdxjzbmb806jqcwq5k2wai6cfg");
//! ```

use std::fmt;
use std::io::{self, Read, Write};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::base32;
use crate::excerpt::excerpt;

/// Why a string is not a SHA-256 hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A hash type other than SHA-256 (`md5:…`, `sha512-…`).
    #[error("unsupported hash type {algo:?} in {input:?}: only sha256 is used here")]
    UnsupportedType {
        /// The type prefix found.
        algo: String,
        /// The offending string (shortened if very long).
        input: String,
    },
    /// The digest part is not 52 base32, 64 hex or 44 base64 characters of a SHA-256.
    #[error("invalid sha256 hash {input:?}: {reason}")]
    Invalid {
        /// The offending string (shortened if very long).
        input: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Hash(pub [u8; 32]);

impl Sha256Hash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Sha256Hash {
        Sha256Hash(Sha256::digest(bytes).into())
    }

    /// 52 characters of Nix base32, no prefix.
    pub fn to_base32(&self) -> String {
        base32::encode(&self.0)
    }

    /// `sha256:<base32>`, as in narinfo files, fingerprints and Cachix's `cNarHash`.
    pub fn to_typed_base32(&self) -> String {
        format!("sha256:{}", self.to_base32())
    }

    /// 64 lower-case hex characters, no prefix (Cachix's `cFileHash`).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// `sha256-<base64>`, as `nix path-info --json` prints it.
    pub fn to_sri(&self) -> String {
        format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }

    /// Parses `sha256:<base32 or hex>`, `sha256-<base64>` (SRI), or a bare base32 or hex digest.
    pub fn parse(s: &str) -> Result<Sha256Hash, Error> {
        let invalid = |reason: &str| Error::Invalid {
            input: excerpt(s),
            reason: reason.to_owned(),
        };
        if let Some((algo, rest)) = s.split_once(':') {
            if algo != "sha256" {
                return Err(Error::UnsupportedType {
                    algo: excerpt(algo),
                    input: excerpt(s),
                });
            }
            return Sha256Hash::parse_digest(rest).ok_or_else(|| {
                invalid("expected 52 base32 or 64 hex characters after \"sha256:\"")
            });
        }
        if let Some((algo, rest)) = s.split_once('-') {
            if algo != "sha256" {
                return Err(Error::UnsupportedType {
                    algo: excerpt(algo),
                    input: excerpt(s),
                });
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|e| invalid(&format!("bad base64 after \"sha256-\": {e}")))?;
            let bytes: [u8; 32] = bytes
                .try_into()
                .map_err(|_| invalid("SRI digest is not 32 bytes"))?;
            return Ok(Sha256Hash(bytes));
        }
        Sha256Hash::parse_digest(s)
            .ok_or_else(|| invalid("expected sha256:…, sha256-…, 52 base32 or 64 hex characters"))
    }

    fn parse_digest(s: &str) -> Option<Sha256Hash> {
        let bytes = match s.len() {
            52 => base32::decode(s, 32).ok()?,
            // Nix accepts upper-case hex too.
            64 => hex::decode(s).ok()?,
            _ => return None,
        };
        bytes.try_into().ok().map(Sha256Hash)
    }
}

impl fmt::Display for Sha256Hash {
    /// `sha256:<base32>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        f.write_str(&self.to_base32())
    }
}

impl fmt::Debug for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Hash({self})")
    }
}

/// Passes writes through to `inner`, hashing and counting the bytes that `inner` accepted.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> HashingWriter<W> {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The inner writer, the hash of everything written and the byte count. Does not flush.
    pub fn finish(self) -> (W, Sha256Hash, u64) {
        (
            self.inner,
            Sha256Hash(self.hasher.finalize().into()),
            self.count,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Passes reads through from `inner`, hashing and counting the bytes returned.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> HashingReader<R> {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The inner reader, the hash of everything read and the byte count.
    pub fn finish(self) -> (R, Sha256Hash, u64) {
        (
            self.inner,
            Sha256Hash(self.hasher.finalize().into()),
            self.count,
        )
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP_B32: &str = "1dinrxag5kdkvjic29507irlj9cdxjzbmb806jqcwq5k2wai6cfg";
    const TOP_HEX: &str = "cf31131517b360ceb03400adbabeec8d2549733ca024c1a2dcb3cdf254cf36b6";
    const TOP_SRI: &str = "sha256-zzETFRezYM6wNACtur7sjSVJczygJMGi3LPN8lTPNrY=";

    #[test]
    fn all_forms_of_one_hash() {
        let h = Sha256Hash::parse(&format!("sha256:{TOP_B32}")).unwrap();
        assert_eq!(h.to_base32(), TOP_B32);
        assert_eq!(h.to_hex(), TOP_HEX);
        assert_eq!(h.to_sri(), TOP_SRI);
        assert_eq!(h.to_typed_base32(), format!("sha256:{TOP_B32}"));
        assert_eq!(h.to_string(), format!("sha256:{TOP_B32}"));
        for form in [
            TOP_B32.to_owned(),
            TOP_HEX.to_owned(),
            TOP_HEX.to_uppercase(),
            TOP_SRI.to_owned(),
            format!("sha256:{TOP_HEX}"),
        ] {
            assert_eq!(Sha256Hash::parse(&form).unwrap(), h, "{form}");
        }
    }

    #[test]
    fn of_matches_known_digest() {
        assert_eq!(
            Sha256Hash::of(b"hello\n").to_base32(),
            "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"
        );
    }

    #[test]
    fn rejects_other_types_and_garbage() {
        assert!(matches!(
            Sha256Hash::parse("md5:4425hx5d1mc9y39llj4k4nm55i"),
            Err(Error::UnsupportedType { .. })
        ));
        assert!(matches!(
            Sha256Hash::parse("sha512-AAAA"),
            Err(Error::UnsupportedType { .. })
        ));
        for bad in [
            "",
            "sha256:",
            "sha256:xyz",
            "sha256-AAAA",
            "sha256-!!!",
            &format!("sha256:2{}", "z".repeat(51)),
            &TOP_HEX[..63],
        ] {
            assert!(Sha256Hash::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn adapters_hash_and_count() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hel").unwrap();
        w.write_all(b"lo\n").unwrap();
        let (inner, h, n) = w.finish();
        assert_eq!(inner, b"hello\n");
        assert_eq!((h, n), (Sha256Hash::of(b"hello\n"), 6));

        let mut r = HashingReader::new(&b"hello\n"[..]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        let (_, h, n) = r.finish();
        assert_eq!((h, n), (Sha256Hash::of(b"hello\n"), 6));
    }
}
