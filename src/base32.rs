//! Nix's base32: the encoding of hashes in store paths, narinfo files and `nix-store -q --hash`.
//!
//! Not RFC 4648. The alphabet is `0123456789abcdfghijklmnpqrsvwxyz` (no `e`, `o`, `t`, `u`), there is no padding,
//! and the bytes are read as one little-endian integer written most significant digit first, so a leading
//! `0x01` byte ends up in the *last* character:
//!
//! ```
//! use nixpush::base32;
//! let mut bytes = [0u8; 32];
//! bytes[0] = 1;
//! assert_eq!(base32::encode(&bytes), "0000000000000000000000000000000000000000000000000001");
//! assert_eq!(base32::decode("0000000000000000000000000000000000000000000000000001", 32).unwrap(), bytes);
//! ```
//!
//! Written here rather than taken from the `nix-base32` crate: that crate panics on empty input and does not
//! check the encoded length, and the whole codec is a few lines.

/// The 32 symbols, value 0 first.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

use crate::excerpt::excerpt;

/// Why a string is not the Nix base32 encoding of the expected number of bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The string has the wrong number of characters for the expected byte count.
    #[error("invalid base-32 hash {input:?}: {actual} characters, expected {expected}")]
    Length {
        /// The offending string (shortened if very long).
        input: String,
        /// Its length in characters.
        actual: usize,
        /// `encoded_len(expected bytes)`.
        expected: usize,
    },
    /// A character outside the alphabet (e.g. `e` or an upper-case letter).
    #[error("invalid base-32 hash {input:?}: character {bad:?} is not in the Nix base32 alphabet")]
    Character {
        /// The offending string (shortened if very long).
        input: String,
        /// The first character not in the alphabet.
        bad: char,
    },
    /// The first character carries bits beyond the last byte (e.g. `2zzz…` for a SHA-256), which Nix rejects.
    #[error("invalid base-32 hash {input:?}: value does not fit in {bytes} bytes")]
    Overflow {
        /// The offending string (shortened if very long).
        input: String,
        /// The expected byte count.
        bytes: usize,
    },
}

/// Number of base32 characters for `bytes` bytes: `ceil(bytes * 8 / 5)`.
pub const fn encoded_len(bytes: usize) -> usize {
    (bytes * 8).div_ceil(5)
}

/// Encodes `bytes` the way Nix prints hashes.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for i in (0..len).rev() {
        let bit = i * 5;
        let (j, k) = (bit / 8, bit % 8);
        let mut v = u16::from(bytes[j]) >> k;
        if let Some(next) = bytes.get(j + 1) {
            v |= u16::from(*next) << (8 - k);
        }
        out.push(char::from(ALPHABET[usize::from(v & 0x1f)]));
    }
    out
}

/// Decodes `s`, which must encode exactly `len` bytes. Rejects what Nix rejects: a wrong length, characters
/// outside the alphabet, and set bits that would land beyond the last byte.
pub fn decode(s: &str, len: usize) -> Result<Vec<u8>, Error> {
    let expected = encoded_len(len);
    if s.len() != expected {
        return Err(Error::Length {
            input: excerpt(s),
            actual: s.chars().count(),
            expected,
        });
    }
    let mut out = vec![0u8; len];
    for (p, c) in s.bytes().enumerate() {
        let digit = digit_value(c).ok_or_else(|| Error::Character {
            input: excerpt(s),
            bad: s[p..].chars().next().unwrap_or('?'),
        })?;
        let bit = (expected - 1 - p) * 5;
        let (j, k) = (bit / 8, bit % 8);
        let wide = u16::from(digit) << k;
        // `j < len` always holds: bit offsets stop below len * 8.
        out[j] |= (wide & 0xff) as u8;
        let high = (wide >> 8) as u8;
        match out.get_mut(j + 1) {
            Some(next) => *next |= high,
            None if high != 0 => {
                return Err(Error::Overflow {
                    input: excerpt(s),
                    bytes: len,
                })
            }
            None => {}
        }
    }
    Ok(out)
}

/// Whether every character of `s` is in the alphabet (length not checked).
pub fn is_valid_chars(s: &str) -> bool {
    s.bytes().all(|c| digit_value(c).is_some())
}

fn digit_value(c: u8) -> Option<u8> {
    // Position in a 32-entry table, so the result always fits in a u8.
    ALPHABET.iter().position(|&a| a == c).map(|v| v as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// The table of spec §2, produced by `nix-hash --type T --to-base32 HEX`.
    #[test]
    fn spec_table() {
        let mut one_first = vec![0u8; 32];
        one_first[0] = 1;
        let mut one_last = vec![0u8; 32];
        one_last[31] = 1;
        let mut high_first = vec![0u8; 32];
        high_first[0] = 0x80;
        let mut high_last = vec![0u8; 32];
        high_last[31] = 0x80;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                vec![0; 32],
                "0000000000000000000000000000000000000000000000000000",
            ),
            (
                vec![0xff; 32],
                "1zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
            ),
            (
                one_first,
                "0000000000000000000000000000000000000000000000000001",
            ),
            (
                one_last,
                "0080000000000000000000000000000000000000000000000000",
            ),
            (
                high_first,
                "0000000000000000000000000000000000000000000000000040",
            ),
            (
                high_last,
                "1000000000000000000000000000000000000000000000000000",
            ),
            (
                hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"),
                "07qy3lf1n6hr30bic58l2c91240g1q6hq2qa1440f1h50h1h4080",
            ),
            (
                hex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
                "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            ),
            (
                hex("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"),
                "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
            ),
            (vec![0; 20], "00000000000000000000000000000000"),
            (vec![0xff; 20], "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"),
            (
                hex("f572d396fae9206628714fb2ce00f72e94f2258f"),
                "iwjz551fyw0cxcjgf4l6c879zabd6wpm",
            ),
            (vec![0; 16], "00000000000000000000000000"),
            (
                hex("b1946ac92492d2347c6235b4d2611184"),
                "4425hx5d1mc9y39llj4k4nm55i",
            ),
        ];
        for (bytes, text) in cases {
            assert_eq!(encode(&bytes), text);
            assert_eq!(decode(text, bytes.len()).unwrap(), bytes, "{text}");
        }
    }

    #[test]
    fn empty_input() {
        assert_eq!(encode(&[]), "");
        assert_eq!(decode("", 0).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn rejects_what_nix_rejects() {
        // 52 chars starting with `2`: Nix says "invalid base-32 hash".
        let overflow = format!("2{}", "z".repeat(51));
        assert!(matches!(decode(&overflow, 32), Err(Error::Overflow { .. })));
        let with_e = format!("e{}", "0".repeat(51));
        assert!(matches!(
            decode(&with_e, 32),
            Err(Error::Character { bad: 'e', .. })
        ));
        assert!(matches!(
            decode("0000", 32),
            Err(Error::Length { expected: 52, .. })
        ));
        assert!(decode(&"Z".repeat(32), 20).is_err());
        let non_ascii = format!("é{}", "0".repeat(50));
        assert!(decode(&non_ascii, 32).is_err());
    }

    #[test]
    fn long_input_is_shortened_in_errors() {
        let long = "x".repeat(10_000);
        let msg = decode(&long, 32).unwrap_err().to_string();
        assert!(msg.len() < 400, "{msg}");
    }

    proptest! {
        #[test]
        fn round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let text = encode(&bytes);
            prop_assert_eq!(text.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode(&text, bytes.len()).unwrap(), bytes);
        }

        #[test]
        fn decode_never_panics(s in "\\PC{0,60}", len in 0usize..40) {
            let _ = decode(&s, len);
        }
    }
}
