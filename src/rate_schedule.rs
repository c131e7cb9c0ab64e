//! Upload rates as the configuration writes them, and the rate schedule: which rate is in force at a local
//! time of day, why, and until when.
//!
//! ```toml
//! [target]
//! max_upload_rate = "4MiB/s"            # outside every window; "unlimited" (the default) for no limit
//! rate_schedule = [
//!   { from = "09:00", to = "18:00", rate = "512KiB/s" },
//!   { from = "22:00", to = "06:00", rate = "unlimited" },   # windows may cross midnight
//!   { from = "18:00", to = "18:30", rate = "0" },           # 0 holds: nothing is sent
//! ]
//! ```
//!
//! Rates: a number (decimals allowed) and a unit: `B/s`, `KiB/s`, `MiB/s`, `GiB/s` (powers of 1024), `KB/s`,
//! `MB/s`, `GB/s` (powers of 1000), `bit/s`, `Kbit/s`, `Mbit/s`, `Gbit/s` (bits, powers of 1000); units are
//! case-insensitive, spaces between number and unit are allowed; `0` and `unlimited` need no unit. A bare TOML
//! integer is bytes per second.
//!
//! Times are wall-clock `HH:MM` in the machine's local time zone (`TZ`, else `/etc/localtime`). The schedule is
//! a function of the wall clock, so across a DST change a window starts and ends at the times it names.

use std::fmt;

use chrono::{NaiveDateTime, NaiveTime, Timelike};
use serde::{Deserialize, Serialize};

const MINUTES_PER_DAY: u32 = 24 * 60;

/// A rate limit: bytes per second, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rate {
    /// No limit.
    #[default]
    Unlimited,
    /// At most this many bytes per second; 0 holds (nothing is sent).
    BytesPerSec(u64),
}

impl Rate {
    /// Whether the rate is 0: nothing may be sent.
    pub fn is_hold(self) -> bool {
        self == Rate::BytesPerSec(0)
    }

    /// Bytes per second, `None` when unlimited.
    pub fn bytes_per_sec(self) -> Option<u64> {
        match self {
            Rate::Unlimited => None,
            Rate::BytesPerSec(n) => Some(n),
        }
    }

    /// Parses `"4MiB/s"`, `"32 Mbit/s"`, `"unlimited"`, `"0"`; the error says what is accepted.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let trimmed = text.trim();
        if trimmed.eq_ignore_ascii_case("unlimited") {
            return Ok(Rate::Unlimited);
        }
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let bad = || {
            format!(
                "{text:?} is not a rate; write e.g. \"4MiB/s\", \"512KiB/s\", \"10MB/s\", \"40Mbit/s\", \
                 \"0\" (hold) or \"unlimited\" (units: B/s, KiB/s, MiB/s, GiB/s, KB/s, MB/s, GB/s, bit/s, \
                 Kbit/s, Mbit/s, Gbit/s)"
            )
        };
        let value: f64 = number.parse().map_err(|_| bad())?;
        let unit = unit.trim().to_ascii_lowercase();
        let factor = match unit.as_str() {
            "" if value == 0.0 => 0.0,
            "b/s" => 1.0,
            "kib/s" => 1024.0,
            "mib/s" => 1024.0 * 1024.0,
            "gib/s" => 1024.0 * 1024.0 * 1024.0,
            "kb/s" => 1e3,
            "mb/s" => 1e6,
            "gb/s" => 1e9,
            "bit/s" => 1.0 / 8.0,
            "kbit/s" => 1e3 / 8.0,
            "mbit/s" => 1e6 / 8.0,
            "gbit/s" => 1e9 / 8.0,
            _ => return Err(bad()),
        };
        let bytes = value * factor;
        if !bytes.is_finite() || bytes > u64::MAX as f64 {
            return Err(bad());
        }
        let bytes = bytes.round() as u64;
        if bytes == 0 && value != 0.0 {
            return Err(format!(
                "{text:?} rounds to 0 bytes per second, which would hold uploads; write \"0\" to hold"
            ));
        }
        Ok(Rate::BytesPerSec(bytes))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Unlimited => f.write_str("unlimited"),
            Rate::BytesPerSec(0) => f.write_str("0 (hold)"),
            Rate::BytesPerSec(n) => write!(f, "{}/s", crate::upload::human_bytes(*n)),
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Rate::Unlimited => serializer.serialize_str("unlimited"),
            Rate::BytesPerSec(n) => serializer.serialize_str(&format!("{n}B/s")),
        }
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Rate, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate such as \"4MiB/s\", \"0\" or \"unlimited\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Rate, E> {
                Rate::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Rate, E> {
                u64::try_from(v)
                    .map(Rate::BytesPerSec)
                    .map_err(|_| E::custom(format!("{v} is negative; a rate is at least 0")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Rate, E> {
                Ok(Rate::BytesPerSec(v))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A time of day, `HH:MM`, as minutes since midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimeOfDay(u32);

impl TimeOfDay {
    /// Parses `"09:00"` (or `"9:00"`); `"24:00"` is midnight at the end of the day.
    pub fn parse(text: &str) -> Result<TimeOfDay, String> {
        let bad =
            || format!("{text:?} is not a time of day; write HH:MM, e.g. \"09:00\" or \"18:30\"");
        let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
        let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if m >= 60 || h > 24 || (h == 24 && m != 0) || text.trim().len() > 5 {
            return Err(bad());
        }
        Ok(TimeOfDay((h * 60 + m) % MINUTES_PER_DAY))
    }

    fn of(time: NaiveTime) -> u32 {
        time.hour() * 60 + time.minute()
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.0 / 60, self.0 % 60)
    }
}

impl Serialize for TimeOfDay {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<TimeOfDay, D::Error> {
        let text = String::deserialize(deserializer)?;
        TimeOfDay::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// One `rate_schedule` entry: `rate` applies from `from` (inclusive) to `to` (exclusive), local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateWindow {
    /// Start, `HH:MM`.
    pub from: TimeOfDay,
    /// End, `HH:MM`; earlier than `from` when the window crosses midnight.
    pub to: TimeOfDay,
    /// The rate inside the window.
    pub rate: Rate,
}

impl RateWindow {
    fn contains(&self, minute: u32) -> bool {
        let (from, to) = (self.from.0, self.to.0);
        if from < to {
            (from..to).contains(&minute)
        } else {
            minute >= from || minute < to
        }
    }

    /// The window as half-open minute ranges within one day.
    fn ranges(&self) -> Vec<(u32, u32)> {
        let (from, to) = (self.from.0, self.to.0);
        if from < to {
            vec![(from, to)]
        } else {
            vec![(from, MINUTES_PER_DAY), (0, to)]
        }
    }
}

impl fmt::Display for RateWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}–{}", self.from, self.to)
    }
}

/// Checks a schedule: no empty windows, no overlaps. The message names the windows.
pub fn validate(windows: &[RateWindow]) -> Result<(), String> {
    for w in windows {
        if w.from == w.to {
            return Err(format!(
                "window {w} is empty (from = to); for a rate all day use max_upload_rate"
            ));
        }
    }
    for (i, a) in windows.iter().enumerate() {
        for b in &windows[i + 1..] {
            let overlap = a
                .ranges()
                .iter()
                .any(|(s1, e1)| b.ranges().iter().any(|(s2, e2)| s1.max(s2) < e1.min(e2)));
            if overlap {
                return Err(format!("windows {a} and {b} overlap"));
            }
        }
    }
    Ok(())
}

/// Where the rate in force comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// No limit is configured.
    Unlimited,
    /// `max_upload_rate`, outside every window.
    MaxUploadRate,
    /// A `rate_schedule` window.
    Window(RateWindow),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Unlimited => f.write_str("unlimited"),
            Source::MaxUploadRate => f.write_str("max_upload_rate"),
            Source::Window(w) => write!(f, "rate_schedule {w}"),
        }
    }
}

/// The rate in force at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InForce {
    /// The rate.
    pub rate: Rate,
    /// Why.
    pub source: Source,
    /// The next local time at which the rate changes; `None` when it never does.
    pub until: Option<NaiveDateTime>,
}

/// The rate in force at local time `now`, given `max_upload_rate` and the (validated) windows.
pub fn in_force(max_upload_rate: Rate, windows: &[RateWindow], now: NaiveDateTime) -> InForce {
    let (rate, source) = at_minute(max_upload_rate, windows, TimeOfDay::of(now.time()));
    InForce {
        rate,
        source,
        until: next_change(max_upload_rate, windows, now, (rate, source)),
    }
}

fn at_minute(max_upload_rate: Rate, windows: &[RateWindow], minute: u32) -> (Rate, Source) {
    match windows.iter().find(|w| w.contains(minute)) {
        Some(w) => (w.rate, Source::Window(*w)),
        None if max_upload_rate == Rate::Unlimited => (Rate::Unlimited, Source::Unlimited),
        None => (max_upload_rate, Source::MaxUploadRate),
    }
}

/// The first window edge after `now` (within two days) where the rate or its source changes.
fn next_change(
    max_upload_rate: Rate,
    windows: &[RateWindow],
    now: NaiveDateTime,
    current: (Rate, Source),
) -> Option<NaiveDateTime> {
    let mut edges: Vec<u32> = windows.iter().flat_map(|w| [w.from.0, w.to.0]).collect();
    edges.sort_unstable();
    edges.dedup();
    let today = now.date();
    let now_minute = TimeOfDay::of(now.time());
    (0..=2)
        .filter_map(|day| today.checked_add_days(chrono::Days::new(day)))
        .flat_map(|date| edges.iter().map(move |&m| (date, m)))
        .filter(|&(date, m)| date > today || m > now_minute)
        .find(|&(_, m)| at_minute(max_upload_rate, windows, m) != current)
        .and_then(|(date, m)| date.and_hms_opt(m / 60, m % 60, 0))
}

/// The local time now (`TZ`, else `/etc/localtime`).
pub fn local_now() -> NaiveDateTime {
    chrono::Local::now().naive_local()
}

/// Seconds from now until the local time `at`, for sleeping to a window edge. A time skipped by a DST change
/// counts from the end of the gap.
pub fn secs_until(at: NaiveDateTime) -> u64 {
    use chrono::TimeZone as _;
    let local = chrono::Local;
    let when = local
        .from_local_datetime(&at)
        .earliest()
        .or_else(|| {
            local
                .from_local_datetime(&(at + chrono::Duration::hours(1)))
                .earliest()
        })
        .map(|t| t.timestamp())
        .unwrap_or_else(|| chrono::Local::now().timestamp());
    when.saturating_sub(chrono::Local::now().timestamp()).max(0) as u64
}

/// Unix seconds of the local time `at` (see [`secs_until`] for DST gaps).
pub fn unix_secs(at: NaiveDateTime) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    now + secs_until(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: u32, m: u32) -> NaiveDateTime {
        chrono::NaiveDate::from_ymd_opt(2026, 3, 29)
            .unwrap()
            .and_hms_opt(h, m, 0)
            .unwrap()
    }

    fn window(from: &str, to: &str, rate: &str) -> RateWindow {
        RateWindow {
            from: TimeOfDay::parse(from).unwrap(),
            to: TimeOfDay::parse(to).unwrap(),
            rate: Rate::parse(rate).unwrap(),
        }
    }

    #[test]
    fn rates_parse_with_every_documented_unit() {
        let cases = [
            ("unlimited", Rate::Unlimited),
            ("Unlimited", Rate::Unlimited),
            ("0", Rate::BytesPerSec(0)),
            ("0B/s", Rate::BytesPerSec(0)),
            ("100B/s", Rate::BytesPerSec(100)),
            ("512KiB/s", Rate::BytesPerSec(512 * 1024)),
            ("4MiB/s", Rate::BytesPerSec(4 << 20)),
            ("1.5 MiB/s", Rate::BytesPerSec(1536 * 1024)),
            ("1GiB/s", Rate::BytesPerSec(1 << 30)),
            ("10KB/s", Rate::BytesPerSec(10_000)),
            ("10MB/s", Rate::BytesPerSec(10_000_000)),
            ("2GB/s", Rate::BytesPerSec(2_000_000_000)),
            ("800bit/s", Rate::BytesPerSec(100)),
            ("8Kbit/s", Rate::BytesPerSec(1000)),
            ("4Mbit/s", Rate::BytesPerSec(500_000)),
            ("1gbit/s", Rate::BytesPerSec(125_000_000)),
        ];
        for (text, rate) in cases {
            assert_eq!(Rate::parse(text), Ok(rate), "{text}");
        }
        for bad in [
            "", "fast", "4", "4MiB", "4 MiBps", "-1MiB/s", "1bit/s", "4TiB/s",
        ] {
            let err = Rate::parse(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn rates_round_trip_through_toml() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct T {
            rate: Rate,
        }
        for rate in [
            Rate::Unlimited,
            Rate::BytesPerSec(0),
            Rate::BytesPerSec(12345),
        ] {
            let text = toml::to_string(&T { rate }).unwrap();
            assert_eq!(toml::from_str::<T>(&text).unwrap(), T { rate });
        }
        assert_eq!(
            toml::from_str::<T>("rate = 2048").unwrap().rate,
            Rate::BytesPerSec(2048)
        );
    }

    #[test]
    fn times_of_day() {
        assert_eq!(TimeOfDay::parse("09:00").unwrap().to_string(), "09:00");
        assert_eq!(TimeOfDay::parse("9:05").unwrap().to_string(), "09:05");
        assert_eq!(TimeOfDay::parse("24:00").unwrap().to_string(), "00:00");
        for bad in ["9", "25:00", "12:60", "ab:cd", "24:01", "12:00:00"] {
            assert!(TimeOfDay::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overlaps_and_empty_windows_are_refused_naming_both() {
        let ok = [
            window("09:00", "18:00", "512KiB/s"),
            window("18:00", "19:00", "0"),
            window("22:00", "06:00", "unlimited"),
        ];
        validate(&ok).unwrap();
        let err = validate(&[
            window("09:00", "18:00", "1MiB/s"),
            window("17:00", "19:00", "0"),
        ])
        .unwrap_err();
        assert!(
            err.contains("09:00–18:00") && err.contains("17:00–19:00"),
            "{err}"
        );
        let err = validate(&[
            window("23:00", "02:00", "1MiB/s"),
            window("01:00", "03:00", "0"),
        ])
        .unwrap_err();
        assert!(
            err.contains("23:00–02:00") && err.contains("01:00–03:00"),
            "{err}"
        );
        assert!(validate(&[window("10:00", "10:00", "0")])
            .unwrap_err()
            .contains("empty"));
    }

    #[test]
    fn the_rate_in_force_follows_the_windows_and_names_the_next_edge() {
        let max = Rate::parse("4MiB/s").unwrap();
        let windows = [
            window("09:00", "18:00", "512KiB/s"),
            window("01:00", "06:00", "unlimited"),
            window("18:00", "18:30", "0"),
        ];
        let noon = in_force(max, &windows, at(12, 0));
        assert_eq!(noon.rate, Rate::BytesPerSec(512 * 1024));
        assert_eq!(noon.source, Source::Window(windows[0]));
        assert_eq!(noon.until, Some(at(18, 0)));
        let held = in_force(max, &windows, at(18, 10));
        assert!(held.rate.is_hold());
        assert_eq!(held.until, Some(at(18, 30)));
        let evening = in_force(max, &windows, at(20, 0));
        assert_eq!((evening.rate, evening.source), (max, Source::MaxUploadRate));
        assert_eq!(
            evening.until,
            Some(at(1, 0) + chrono::Duration::days(1)),
            "the next window starts after midnight"
        );
        let night = in_force(max, &windows, at(5, 59));
        assert_eq!(night.rate, Rate::Unlimited);
        assert_eq!(night.until, Some(at(6, 0)));
        // From inclusive, to exclusive.
        assert_eq!(in_force(max, &windows, at(9, 0)).rate, noon.rate);
        assert_eq!(in_force(max, &windows, at(18, 30)).rate, max);
    }

    #[test]
    fn windows_cross_midnight_and_adjacent_edges_with_one_rate_are_skipped() {
        let windows = [window("22:00", "06:00", "1MiB/s")];
        let late = in_force(Rate::Unlimited, &windows, at(23, 0));
        assert_eq!(late.rate, Rate::BytesPerSec(1 << 20));
        assert_eq!(late.until, Some(at(6, 0) + chrono::Duration::days(1)));
        let early = in_force(Rate::Unlimited, &windows, at(2, 0));
        assert_eq!(early.rate, Rate::BytesPerSec(1 << 20));
        assert_eq!(early.until, Some(at(6, 0)));
        let day = in_force(Rate::Unlimited, &windows, at(12, 0));
        assert_eq!((day.rate, day.source), (Rate::Unlimited, Source::Unlimited));
        assert_eq!(day.until, Some(at(22, 0)));
        assert_eq!(in_force(Rate::Unlimited, &[], at(12, 0)).until, None);
    }
}
