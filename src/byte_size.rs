//! Sizes in configuration files: a plain number of bytes, or a number with a unit.
//!
//! ```toml
//! max_nar_size = 2147483648   # bytes
//! max_nar_size = "2GiB"       # the same
//! max_nar_size = "1.5 G"      # K, M, G, T are powers of 1024, as in Nix's own settings
//! max_nar_size = "500MB"      # KB, MB, GB, TB are powers of 1000
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// A size as written in the configuration: bytes, or a string such as `"2GiB"`. [`ByteSize::bytes`] reads it;
/// `Config::validate` calls it, so a bad value is reported with its key and line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    /// A plain number of bytes.
    Bytes(u64),
    /// A number with a unit, e.g. `"2GiB"`.
    Text(String),
}

/// Why a size string is not a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a size: write bytes (2147483648) or a number with a unit: B, K/KiB, M/MiB, G/GiB, T/TiB \
     (powers of 1024) or KB, MB, GB, TB (powers of 1000), e.g. \"2GiB\""
)]
pub struct Error(pub String);

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64, Error> {
        match self {
            ByteSize::Bytes(n) => Ok(*n),
            ByteSize::Text(text) => parse(text),
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ByteSize::Bytes(n) => write!(f, "{n}"),
            ByteSize::Text(text) => write!(f, "{text:?}"),
        }
    }
}

/// Parses `"2GiB"`, `"1.5 G"`, `"500MB"`, `"4096"`; units are case-insensitive.
pub fn parse(text: &str) -> Result<u64, Error> {
    let bad = || Error(text.to_owned());
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(bad());
    }
    match number.split_once('.') {
        None => number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(multiplier))
            .ok_or_else(bad),
        Some((whole, fraction)) => {
            if fraction.contains('.') || fraction.len() > 9 {
                return Err(bad());
            }
            let whole = whole
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(multiplier))
                .ok_or_else(bad)?;
            // Exact in integers: a fraction of up to nine digits over 10^9, rounded down to whole bytes.
            let digits: u64 = fraction.parse().map_err(|_| bad())?;
            let scale = 10u128.pow(fraction.len() as u32);
            let part = u64::try_from(u128::from(digits) * u128::from(multiplier) / scale)
                .map_err(|_| bad())?;
            whole.checked_add(part).ok_or_else(bad)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_follow_nix_and_the_si_prefixes() {
        assert_eq!(parse("4096").unwrap(), 4096);
        assert_eq!(parse("12 B").unwrap(), 12);
        assert_eq!(parse("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse("2G").unwrap(), 2 << 30);
        assert_eq!(parse("2 gib").unwrap(), 2 << 30);
        assert_eq!(parse("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse("0.5KiB").unwrap(), 512);
        assert_eq!(parse("500MB").unwrap(), 500_000_000);
        assert_eq!(parse("1T").unwrap(), 1 << 40);
        assert_eq!(ByteSize::Bytes(7).bytes().unwrap(), 7);
        assert_eq!(ByteSize::Text("1K".into()).bytes().unwrap(), 1024);
    }

    #[test]
    fn anything_else_is_refused_with_the_value() {
        for bad in [
            "",
            "GiB",
            "2 gigs",
            "-1",
            "1.2.3",
            ".5G",
            "5.G",
            "1e9",
            "99999999999T",
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.0, bad);
            assert!(err.to_string().contains("not a size"), "{err}");
        }
    }
}
