//! Keys from the process environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and, for temporary keys,
//! `AWS_SESSION_TOKEN` (`AWS_CREDENTIAL_EXPIRATION` says when they expire, as `aws configure export-credentials`
//! writes it).

use std::time::SystemTime;

use super::keys::{parse_expiration, Keys};
use super::Getenv;

/// The keys, when both the id and the secret are set.
pub(super) fn keys(getenv: Getenv<'_>, now: SystemTime) -> Option<Keys> {
    let key = getenv("AWS_ACCESS_KEY_ID")?;
    let secret = getenv("AWS_SECRET_ACCESS_KEY")?;
    let expires = getenv("AWS_CREDENTIAL_EXPIRATION").and_then(|e| parse_expiration(&e));
    Some(Keys::new(
        key,
        secret,
        getenv("AWS_SESSION_TOKEN"),
        expires,
        now,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_parts_or_nothing() {
        let now = SystemTime::now();
        let env = |name: &str| match name {
            "AWS_ACCESS_KEY_ID" => Some("AKENVTEST".to_owned()),
            "AWS_SECRET_ACCESS_KEY" => Some("senv-secret".to_owned()),
            "AWS_SESSION_TOKEN" => Some("tenv-token".to_owned()),
            _ => None,
        };
        let keys = keys(&env, now).unwrap();
        assert_eq!(
            (keys.s3.key(), keys.s3.token()),
            ("AKENVTEST", Some("tenv-token"))
        );
        assert!(keys.expires().is_none());
        let only_id = |name: &str| (name == "AWS_ACCESS_KEY_ID").then(|| "AKENVTEST".to_owned());
        assert!(super::keys(&only_id, now).is_none());
    }
}
