//! The Prometheus text exposition format (version 0.0.4), written by hand: `# HELP` and `# TYPE` lines, escaped
//! label values, counters named `…_total`, histograms as cumulative `_bucket{le="…"}` series with `_sum` and
//! `_count`. See <https://prometheus.io/docs/instrumenting/exposition_formats/>.
//!
//! ```text
//! # HELP nixpush_queue_paths Paths in the queue, by state.
//! # TYPE nixpush_queue_paths gauge
//! nixpush_queue_paths{target="default",state="queued"} 3
//! ```
//!
//! Every family is written whole, at once, so a family's samples are never split (the format requires it).

use std::fmt::Write as _;

/// The `Content-Type` of what [`Exposition`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A sample's labels: name and value pairs, names fixed by the code, values escaped when written.
pub type Labels<'a> = [(&'a str, &'a str)];

/// A metric family's kind, as its `# TYPE` line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A value that only goes up (reset by a restart); the name ends in `_total`.
    Counter,
    /// Observations counted into buckets.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
        }
    }
}

/// One histogram series: cumulative counts per upper bound, the sum and the count.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSample {
    /// `(upper bound, observations ≤ bound)`, bounds ascending, without `+Inf` (that is `count`).
    pub buckets: Vec<(f64, u64)>,
    /// Sum of all observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

/// The text of one scrape, family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// The text to serve.
    pub fn finish(self) -> String {
        self.text
    }

    fn header(&mut self, name: &str, help: &str, kind: Kind) {
        debug_assert!(is_valid_name(name), "{name}");
        debug_assert!(kind != Kind::Counter || name.ends_with("_total"), "{name}");
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {}", kind.as_str());
    }

    fn sample(
        &mut self,
        name: &str,
        labels: &Labels<'_>,
        extra: Option<(&str, &str)>,
        value: &str,
    ) {
        self.text.push_str(name);
        let mut all = labels.iter().copied().chain(extra).peekable();
        if all.peek().is_some() {
            self.text.push('{');
            for (i, (label, value)) in all.enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape_label_value(value));
            }
            self.text.push('}');
        }
        self.text.push(' ');
        self.text.push_str(value);
        self.text.push('\n');
    }

    /// A gauge family with its samples. A family without samples is left out entirely.
    pub fn gauge<'a>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, f64)>,
    ) {
        self.scalar(name, help, Kind::Gauge, samples);
    }

    /// A counter family (`name` ends in `_total`) with its samples.
    pub fn counter<'a>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, f64)>,
    ) {
        self.scalar(name, help, Kind::Counter, samples);
    }

    fn scalar<'a>(
        &mut self,
        name: &str,
        help: &str,
        kind: Kind,
        samples: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, f64)>,
    ) {
        let mut samples = samples.into_iter().peekable();
        if samples.peek().is_none() {
            return;
        }
        self.header(name, help, kind);
        for (labels, value) in samples {
            self.sample(name, &labels, None, &format_value(value));
        }
    }

    /// A histogram family with its series.
    pub fn histogram<'a>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, HistogramSample)>,
    ) {
        let mut series = series.into_iter().peekable();
        if series.peek().is_none() {
            return;
        }
        self.header(name, help, Kind::Histogram);
        let (bucket, sum, count) = (
            format!("{name}_bucket"),
            format!("{name}_sum"),
            format!("{name}_count"),
        );
        for (labels, h) in series {
            for (bound, cumulative) in &h.buckets {
                let le = format_value(*bound);
                self.sample(&bucket, &labels, Some(("le", &le)), &cumulative.to_string());
            }
            self.sample(&bucket, &labels, Some(("le", "+Inf")), &h.count.to_string());
            self.sample(&sum, &labels, None, &format_value(h.sum));
            self.sample(&count, &labels, None, &h.count.to_string());
        }
    }
}

/// A sample value as the format spells it: integers without a fraction, `+Inf`, `-Inf`, `NaN`.
pub fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// A label value with `\`, `"` and line feeds escaped; anything else (UTF-8 included) stays as it is.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `# HELP` text with `\` and line feeds escaped.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Whether `name` is a valid metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_type_and_escaped_labels() {
        let mut e = Exposition::new();
        e.gauge(
            "nixpush_queue_paths",
            "Paths in the queue,\nby state.",
            [(vec![("target", "a\"b\\c\nd"), ("state", "queued")], 3.0)],
        );
        e.counter("nixpush_x_total", "X.", [(vec![], 2.5)]);
        e.gauge("nixpush_empty", "Never written.", []);
        assert_eq!(
            e.finish(),
            "# HELP nixpush_queue_paths Paths in the queue,\\nby state.\n\
             # TYPE nixpush_queue_paths gauge\n\
             nixpush_queue_paths{target=\"a\\\"b\\\\c\\nd\",state=\"queued\"} 3\n\
             # HELP nixpush_x_total X.\n\
             # TYPE nixpush_x_total counter\n\
             nixpush_x_total 2.5\n"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_inf_sum_and_count() {
        let mut e = Exposition::new();
        e.histogram(
            "nixpush_d_seconds",
            "D.",
            [(
                vec![("target", "default")],
                HistogramSample {
                    buckets: vec![(0.5, 1), (1.0, 2)],
                    sum: 3.25,
                    count: 3,
                },
            )],
        );
        assert_eq!(
            e.finish(),
            "# HELP nixpush_d_seconds D.\n# TYPE nixpush_d_seconds histogram\n\
             nixpush_d_seconds_bucket{target=\"default\",le=\"0.5\"} 1\n\
             nixpush_d_seconds_bucket{target=\"default\",le=\"1\"} 2\n\
             nixpush_d_seconds_bucket{target=\"default\",le=\"+Inf\"} 3\n\
             nixpush_d_seconds_sum{target=\"default\"} 3.25\n\
             nixpush_d_seconds_count{target=\"default\"} 3\n"
        );
    }

    #[test]
    fn values_and_names() {
        assert_eq!(format_value(12.0), "12");
        assert_eq!(format_value(0.25), "0.25");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(1e20), "100000000000000000000");
        assert!(is_valid_name("nixpush_queue_paths"));
        assert!(!is_valid_name("9lives") && !is_valid_name("a-b") && !is_valid_name(""));
    }
}
