//! Untrusted input quoted in error messages, cut short so a hostile megabyte-long line stays a one-line error.

/// Longest excerpt quoted, in bytes (before the ellipsis).
const MAX: usize = 128;

/// `s` itself when short, else its first [`MAX`] bytes (cut at a character boundary) followed by `…`.
pub(crate) fn excerpt(s: &str) -> String {
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_kept_whole() {
        assert_eq!(excerpt("abc"), "abc");
        assert_eq!(excerpt(&"x".repeat(MAX)), "x".repeat(MAX));
    }

    #[test]
    fn long_input_is_cut_at_a_character_boundary() {
        let long = format!("{}é{}", "x".repeat(MAX - 1), "y".repeat(10));
        let cut = excerpt(&long);
        assert_eq!(cut, format!("{}…", "x".repeat(MAX - 1)));
    }
}
