//! Secrets (tokens, key material) that never reach a log line, an error or `status`.
//!
//! Every [`Secret`] made in this process is also remembered, so that [`scrub`] can take it out of text nixpush
//! did not write itself: a target's error body that echoes our `Authorization` header, a redirect URL, a
//! transport error quoting a presigned URL. Backend errors pass their text through [`scrub`] when they are
//! displayed, which covers logs, `status` and the queue alike.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::RwLock;

/// Shorter values are not scrubbed from text: they would match ordinary words and no real token is that short.
const MIN_SCRUBBED_LEN: usize = 6;
/// What a scrubbed secret reads as.
const REDACTED: &str = "***";

/// Every secret value this process has held.
static KNOWN: RwLock<BTreeSet<String>> = RwLock::new(BTreeSet::new());

/// Remembers `value` as a secret for [`scrub`] (e.g. a derived form such as the base64 of `user:password` that
/// HTTP basic auth sends).
pub fn remember(value: &str) {
    let value = value.trim();
    if value.len() < MIN_SCRUBBED_LEN {
        return;
    }
    let mut known = KNOWN
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !known.contains(value) {
        known.insert(value.to_owned());
    }
}

/// `text` without any secret it may hold: every value [`remember`]ed (longest first), the value of anything
/// that looks like an `Authorization` or token header, and the signature, credential and token parameters of
/// URLs (presigned query strings).
pub fn scrub(text: &str) -> String {
    let mut out = text.to_owned();
    {
        let known = KNOWN
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut values: Vec<&String> = known.iter().filter(|v| out.contains(v.as_str())).collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        for value in values {
            out = out.replace(value.as_str(), REDACTED);
        }
    }
    let out = redact_after(
        &out,
        &["authorization", "x-amz-security-token", "cookie"],
        b"\r\n\"'<>",
    );
    redact_query_values(&out)
}

/// Replaces what follows each (case-insensitive) `names` occurrence, after separators such as `": "`, up to a
/// byte of `stop`, with [`REDACTED`].
fn redact_after(text: &str, names: &[&str], stop: &[u8]) -> String {
    let lower = text.to_ascii_lowercase();
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some((at, name)) = names
        .iter()
        .filter_map(|n| lower[search..].find(n).map(|i| (search + i, *n)))
        .min()
    {
        let mut start = at + name.len();
        while start < bytes.len()
            && matches!(bytes[start], b'"' | b'\'' | b':' | b'=' | b' ' | b'\t')
        {
            start += 1;
        }
        let mut end = start;
        while end < bytes.len() && !stop.contains(&bytes[end]) {
            end += 1;
        }
        if end > start {
            out.push_str(&text[copied..start]);
            out.push_str(REDACTED);
            copied = end;
        }
        search = end.max(at + name.len());
    }
    out.push_str(&text[copied..]);
    out
}

/// Whether a URL query parameter carries a credential (AWS `X-Amz-Signature`, `X-Amz-Credential`,
/// `X-Amz-Security-Token`, Azure-style `sig`, plain `token`, …).
fn is_secret_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["signature", "credential", "token", "secret", "password"]
        .iter()
        .any(|s| name.contains(s))
        || name == "sig"
}

/// Replaces the values of secret parameters (see [`is_secret_parameter`]) in every `?…` / `&…` query of `text`.
fn redact_query_values(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if matches!(bytes[i], b'?' | b'&') {
            let name_start = i + 1;
            let mut eq = name_start;
            while eq < bytes.len()
                && (bytes[eq].is_ascii_alphanumeric() || matches!(bytes[eq], b'-' | b'_' | b'.'))
            {
                eq += 1;
            }
            if eq < bytes.len() && bytes[eq] == b'=' && is_secret_parameter(&text[name_start..eq]) {
                let mut end = eq + 1;
                while end < bytes.len()
                    && !matches!(
                        bytes[end],
                        b'&' | b'#' | b' ' | b'"' | b'\'' | b')' | b'>' | b'<' | b'\r' | b'\n'
                    )
                {
                    end += 1;
                }
                out.push_str(&text[copied..=eq]);
                out.push_str(REDACTED);
                copied = end;
                i = end;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&text[copied..]);
    out
}

/// A secret string. `Debug` and `Display` print `[redacted]`; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`, trimming the surrounding whitespace people leave in secret files.
    pub fn new(value: impl Into<String>) -> Secret {
        let value: String = value.into();
        let value = value.trim().to_owned();
        remember(&value);
        Secret(value)
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
    use super::{remember, scrub, Secret};

    // See: #15
    #[test]
    fn scrub_takes_out_known_secrets_auth_headers_and_presigned_parameters() {
        let token = Secret::new("tok-scrub-4711-abcdef");
        remember("dXNlcjpodW50ZXIy");
        let echoed = format!(
            "host: 127.0.0.1\r\nauthorization: Bearer {}\r\nx-basic: Basic dXNlcjpodW50ZXIy\r\n",
            token.expose()
        );
        let clean = scrub(&echoed);
        assert!(!clean.contains("tok-scrub"), "{clean}");
        assert!(!clean.contains("dXNlcjpodW50ZXIy"), "{clean}");
        assert!(clean.contains("host: 127.0.0.1"), "{clean}");
        let json = scrub(
            r#"{"headers":{"Authorization":"AWS4-HMAC-SHA256 Credential=AKIA/x, Signature=ff"}}"#,
        );
        assert!(!json.contains("AKIA") && !json.contains("ff\""), "{json}");
        let url = scrub(
            "error sending request for url (https://b.s3/k?X-Amz-Credential=AKIA%2F1&X-Amz-Date=1&X-Amz-Signature=abc123)",
        );
        assert_eq!(
            url,
            "error sending request for url (https://b.s3/k?X-Amz-Credential=***&X-Amz-Date=1&X-Amz-Signature=***)"
        );
        let plain = "PUT http://127.0.0.1:8080/nar/x.nar.zst?uploadId=7 answered HTTP 500: oops";
        assert_eq!(scrub(plain), plain);
    }

    #[test]
    fn never_prints() {
        let s = Secret::new(" tok-123\n");
        assert_eq!(s.expose(), "tok-123");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
    }
}
