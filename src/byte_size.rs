//! A size in bytes as the configuration writes it: an integer (`21474836480`) or a string with a unit
//! (`"20GiB"`, `"20 GiB"`, `"1.5G"`, `"500MB"`).
//!
//! `K`, `M`, `G`, `T` and `KiB` … `TiB` are powers of 1024 (as `nix-collect-garbage --max-freed` reads `K`/`M`/`G`);
//! `KB` … `TB` are powers of 1000. Units are case-insensitive. A fraction is rounded down to whole bytes.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes, read from an integer or a size string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

const KIB: u64 = 1024;
const BINARY: [(&str, u64); 4] = [
    ("TIB", KIB * KIB * KIB * KIB),
    ("GIB", KIB * KIB * KIB),
    ("MIB", KIB * KIB),
    ("KIB", KIB),
];

impl ByteSize {
    /// Parses `20GiB`, `20 GiB`, `1.5G`, `500MB` or a plain number of bytes; the error says what was wrong.
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        if number.is_empty() || number == "." {
            return Err(format!("{text:?} is not a size such as \"20GiB\""));
        }
        let multiplier = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KIB" => KIB,
            "M" | "MIB" => KIB.pow(2),
            "G" | "GIB" => KIB.pow(3),
            "T" | "TIB" => KIB.pow(4),
            "KB" => 1000,
            "MB" => 1000u64.pow(2),
            "GB" => 1000u64.pow(3),
            "TB" => 1000u64.pow(4),
            other => {
                return Err(format!(
                    "{text:?} has an unknown unit {other:?}; use B, KiB, MiB, GiB, TiB (or K, M, G, T), \
                     KB, MB, GB or TB"
                ))
            }
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if fraction.contains('.') {
            return Err(format!("{text:?} is not a size such as \"20GiB\""));
        }
        let too_large = || format!("{text:?} is too large");
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_large())?
        };
        let mut bytes = whole.checked_mul(multiplier).ok_or_else(too_large)?;
        if !fraction.is_empty() {
            // Digits beyond 18 cannot change the result for any unit up to TiB.
            let digits = &fraction[..fraction.len().min(18)];
            let numerator: u128 = digits.parse().map_err(|_| too_large())?;
            let denominator = 10u128.pow(digits.len() as u32);
            let part = numerator * u128::from(multiplier) / denominator;
            bytes = bytes
                .checked_add(u64::try_from(part).map_err(|_| too_large())?)
                .ok_or_else(too_large)?;
        }
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    /// `20 GiB` when the size is a whole number of a binary unit, else the bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in BINARY {
            if self.0 >= size && self.0 % size == 0 {
                let name = format!("{}iB", &unit[..1]);
                return write!(f, "{} {name}", self.0 / size);
            }
        }
        write!(f, "{} B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ByteSize, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of bytes or a size such as \"20GiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("{v} is negative; a size cannot be")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        for (text, bytes) in [
            ("20GiB", 20 << 30),
            ("20 GiB", 20 << 30),
            ("20gib", 20 << 30),
            ("20G", 20 << 30),
            ("1.5G", 3 << 29),
            ("500MB", 500_000_000),
            ("4096", 4096),
            ("0", 0),
            ("2 TiB", 2 << 40),
            (".5K", 512),
            ("7 B", 7),
        ] {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in [
            "",
            "GiB",
            "20 GiBs",
            "1.2.3G",
            "-5",
            "99999999999999999999T",
        ] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
        assert!(ByteSize::parse("20 PB")
            .unwrap_err()
            .contains("unknown unit"));
    }

    #[test]
    fn display_round_trips() {
        for bytes in [20 << 30, 3 << 29, 1000, 0, 1 << 40, 12_345] {
            let shown = ByteSize(bytes).to_string();
            assert_eq!(ByteSize::parse(&shown), Ok(ByteSize(bytes)), "{shown}");
        }
        assert_eq!(ByteSize(20 << 30).to_string(), "20 GiB");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536 MiB");
    }

    #[derive(Deserialize)]
    struct Holder {
        size: ByteSize,
    }

    #[test]
    fn toml_takes_integers_and_strings() {
        let parsed: Holder = toml::from_str("size = 1024").unwrap();
        assert_eq!(parsed.size, ByteSize(1024));
        let parsed: Holder = toml::from_str("size = \"1 KiB\"").unwrap();
        assert_eq!(parsed.size, ByteSize(1024));
        let err = toml::from_str::<Holder>("size = \"lots\"").err().unwrap();
        assert!(err.to_string().contains("not a size"), "{err}");
        assert!(toml::from_str::<Holder>("size = -1").is_err());
    }
}
