//! Secrets (tokens, key material) that never reach a log line, an error or `status`.

use std::fmt;

/// A secret string. `Debug` and `Display` print `[redacted]`; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`, trimming the surrounding whitespace people leave in secret files.
    pub fn new(value: impl Into<String>) -> Secret {
        let value: String = value.into();
        Secret(value.trim().to_owned())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn never_prints() {
        let s = Secret::new(" tok-123\n");
        assert_eq!(s.expose(), "tok-123");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
    }
}
