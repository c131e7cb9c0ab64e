//! Many writers, one cache: which failures can mean that another writer stored (or is storing) the same object,
//! and what such a failure means once the object's presence is known.
//!
//! Two hosts that push overlapping closures upload the same `nar/<filehash>.nar.zst` at the same time. Stores such
//! as Garage let the first `CompleteMultipartUpload` win and drop the other upload of that key, so the loser sees
//!
//! ```text
//! PUT  …?partNumber=3&uploadId=…   404 <Code>NoSuchUpload</Code>     (its upload id vanished)
//! POST …?uploadId=…                400 <Code>InvalidPart</Code>      (its parts were superseded)
//! PUT  <hash>.narinfo              412 <Code>PreconditionFailed</Code> (If-None-Match: *, the object exists)
//! PUT  …                           409 <Code>ConditionalRequestConflict</Code> (a conditional write is in flight)
//! ```
//!
//! None of these is permanent: the loser looks at the object (HEAD, expected size), and goes on as if it had
//! stored it when it is there, or tries again later when it is not ([`Error::Contended`], retryable). The same
//! holds for a Cachix multipart upload and for a WebDAV PUT that lost to another writer's.

use super::Error;

/// S3 error codes that mean "your upload of this key was superseded or is not the one that counts".
const SUPERSEDED_CODES: [&str; 4] = [
    "NoSuchUpload",
    "InvalidPart",
    "PreconditionFailed",
    "ConditionalRequestConflict",
];

/// Whether `error`, from a write of one object, can mean that another writer stored or is storing it.
///
/// A 404 counts (an upload id that vanished), unless the bucket itself is missing: that is a configuration problem
/// and stays what it is.
pub fn another_writer_may_have_won(error: &Error) -> bool {
    match error {
        Error::Status { code, detail, .. } => {
            let named = SUPERSEDED_CODES.iter().any(|c| detail.contains(c));
            match code {
                404 => !detail.contains("NoSuchBucket"),
                409 | 412 => true,
                // S3 may answer a CompleteMultipartUpload with 200 and an <Error> body, reported as 500.
                _ => named,
            }
        }
        Error::Contended { .. } => true,
        Error::Connect { .. }
        | Error::Timeout { .. }
        | Error::Transfer { .. }
        | Error::Unauthorized { .. }
        | Error::Protocol { .. }
        | Error::Io { .. }
        | Error::Config(_)
        | Error::Interrupted => false,
    }
}

/// What a failed write means once the target has been asked whether the object is there: `Ok` when another
/// writer's copy counts as ours, [`Error::Contended`] (retryable) when the object is not there yet, and the error
/// itself when it has nothing to do with another writer.
pub fn after_failure(error: Error, object_present: bool) -> Result<(), Error> {
    if !another_writer_may_have_won(&error) {
        return Err(error);
    }
    if object_present {
        return Ok(());
    }
    match error {
        Error::Contended { .. } => Err(error),
        Error::Status { url, detail, .. } => Err(Error::Contended { url, detail }),
        other => Err(Error::Contended {
            url: String::new(),
            detail: other.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(method: &str, code: u16, detail: &str) -> Error {
        Error::Status {
            method: method.into(),
            url: "http://127.0.0.1:9000/cache/nar/x.nar.zst".into(),
            code,
            retry_after: None,
            detail: detail.into(),
        }
    }

    /// Each answer a losing writer gets is "present" or retryable, never permanent. See: #22
    #[test]
    fn issue_22_lost_races_are_never_permanent() {
        let xml = |code: &str| {
            format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code></Error>")
        };
        let answers = [
            status("PUT", 404, &xml("NoSuchUpload")),
            status("POST", 404, &xml("NoSuchUpload")),
            // A vanished upload id, answered without a body.
            status("PUT", 404, ""),
            status("POST", 400, &xml("InvalidPart")),
            status("POST", 400, &xml("InvalidPartOrder")),
            status("PUT", 409, &xml("ConditionalRequestConflict")),
            status("PUT", 409, ""),
            status("PUT", 412, &xml("PreconditionFailed")),
            // CompleteMultipartUpload's 200-with-<Error>, reported as 500.
            status("POST", 500, &xml("NoSuchUpload")),
            Error::Contended {
                url: "u".into(),
                detail: "d".into(),
            },
        ];
        for answer in answers {
            let shown = answer.to_string();
            assert!(another_writer_may_have_won(&answer), "{shown}");
            assert!(
                after_failure(clone(&answer), true).is_ok(),
                "{shown}: present"
            );
            let e = after_failure(answer, false).unwrap_err();
            assert!(e.is_retryable() && !e.is_auth(), "{shown}: {e}");
            assert!(matches!(e, Error::Contended { .. }), "{shown}: {e}");
        }
    }

    #[test]
    fn other_failures_stay_what_they_are() {
        let answers = [
            status("PUT", 404, "<Error><Code>NoSuchBucket</Code></Error>"),
            status("PUT", 400, "<Error><Code>EntityTooSmall</Code></Error>"),
            status("PUT", 413, ""),
            status("PUT", 503, "<Error><Code>SlowDown</Code></Error>"),
            Error::Unauthorized {
                url: "u".into(),
                code: 403,
                detail: "SignatureDoesNotMatch".into(),
            },
            Error::Timeout { url: "u".into() },
        ];
        for answer in answers {
            let shown = answer.to_string();
            let (retryable, auth) = (answer.is_retryable(), answer.is_auth());
            assert!(!another_writer_may_have_won(&answer), "{shown}");
            let e = after_failure(answer, true).unwrap_err();
            assert_eq!(
                (e.is_retryable(), e.is_auth()),
                (retryable, auth),
                "{shown}"
            );
        }
    }

    fn clone(e: &Error) -> Error {
        match e {
            Error::Status {
                method,
                url,
                code,
                retry_after,
                detail,
            } => Error::Status {
                method: method.clone(),
                url: url.clone(),
                code: *code,
                retry_after: *retry_after,
                detail: detail.clone(),
            },
            Error::Contended { url, detail } => Error::Contended {
                url: url.clone(),
                detail: detail.clone(),
            },
            other => panic!("not cloned in this test: {other}"),
        }
    }
}
