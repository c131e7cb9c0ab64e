//! The checks of the target, chosen by its kind in one place ([`check_target`]), and of its `nix-cache-info`.
//!
//! Nothing here writes to the target or creates anything: a `file://` directory is checked with `stat` and
//! `access(2)` (which also sees a read-only mount), a server only with reads (`nix-cache-info`, Cachix's cache
//! info), each within the check deadline. Whether the server accepts writes shows at the daemon's first upload.

use std::path::{Path, PathBuf};

use nix::unistd::AccessFlags;

use crate::backend::{self, Backend, Credentials, Kind, Target, TargetInfo};
use crate::config::{redact_url, Config};

use super::deadline::{self, CHECK_DEADLINE};
use super::report::Check;

const NAME: &str = "target";

/// Where the S3 backend finds credentials, for the fix when it finds none.
const S3_CREDENTIAL_SOURCES: &str = "give the daemon AWS credentials, from the first of: `profile=` in the \
    URL; AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary keys) in its environment \
    (NixOS: services.nixpush.environmentFile; systemd: EnvironmentFile=); AWS_WEB_IDENTITY_TOKEN_FILE with \
    AWS_ROLE_ARN (GitHub Actions OIDC); a profile in the shared credentials or config file \
    (AWS_SHARED_CREDENTIALS_FILE / AWS_CONFIG_FILE, else ~/.aws/ of the daemon's user; AWS_PROFILE picks it, \
    default `default`); the instance metadata service. doctor looks in its own environment: run it with the \
    daemon's";

/// Checks the target the way its kind needs. The target info is there when the target answered.
pub(super) async fn check_target(
    config: &Config,
    credentials: Option<Credentials>,
) -> (Check, Option<TargetInfo>) {
    let Some(credentials) = credentials else {
        return (
            Check::skip(
                NAME,
                "cannot ask the target without the token (see token-file)",
            ),
            None,
        );
    };
    match Kind::of(config) {
        Kind::File => file_target(config),
        Kind::Http => http_target(config, credentials).await,
        Kind::S3 => s3_target(config).await,
        Kind::Cachix { .. } => cachix_target(config, credentials).await,
        Kind::Other => {
            let detail = match Target::backend_with(config, credentials) {
                Err(e) => e.to_string(),
                Ok(_) => format!(
                    "{} is not a URL doctor can check",
                    redact_url(&config.target.url)
                ),
            };
            (
                Check::fail(
                    NAME,
                    detail,
                    "set `url` in [target] to a file:///, http(s)://, s3:// or cachix:// URL",
                ),
                None,
            )
        }
    }
}

/// The info of a target that says nothing about itself: Nix reads it at its configured URL.
fn plain_info() -> Option<TargetInfo> {
    Some(TargetInfo::default())
}

/// `file:///dir`: the directory exists and this user may write into it, checked without writing.
fn file_target(config: &Config) -> (Check, Option<TargetInfo>) {
    let url = redact_url(&config.target.url);
    let dir = match url::Url::parse(&config.target.url)
        .ok()
        .and_then(|u| u.to_file_path().ok())
    {
        Some(dir) => dir,
        None => {
            return (
                Check::fail(
                    NAME,
                    format!("{url} is not an absolute file:// URL"),
                    "set `url` in [target] to file:///ABSOLUTE/DIR",
                ),
                None,
            )
        }
    };
    let shown = dir.display().to_string();
    // A dead network mount can block `stat`; the deadline covers it.
    match deadline::blocking(&format!("{shown} to answer"), move || {
        directory_problem(&dir)
    }) {
        None => (
            Check::fail(
                NAME,
                format!(
                    "{shown} did not answer within {} s",
                    CHECK_DEADLINE.as_secs()
                ),
                "check the mount the cache directory is on",
            ),
            None,
        ),
        Some(Some((detail, fix))) => (Check::fail(NAME, detail, fix), None),
        Some(None) => (
            Check::pass(
                NAME,
                format!("{shown} is a directory this user may write to (checked without writing)"),
            ),
            plain_info(),
        ),
    }
}

/// What is wrong with `dir` as a cache directory, with the fix; `None` when nothing is.
fn directory_problem(dir: &Path) -> Option<(String, String)> {
    let shown = dir.display();
    let create = format!(
        "create it, owned by the user the daemon runs as (`install -d -m 0755 -o USER {shown}`), or correct `url` \
         in [target]"
    );
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some((format!("{shown} does not exist"), create))
        }
        Err(e) => {
            return Some((
                format!("{shown}: {e}"),
                format!(
                    "make {shown} reachable by the daemon's user, or correct `url` in [target]"
                ),
            ))
        }
        Ok(meta) if !meta.is_dir() => {
            return Some((
                format!("{shown} is not a directory"),
                "point `url` in [target] at a directory".to_owned(),
            ))
        }
        Ok(_) => {}
    }
    let nar = dir.join("nar");
    let mut dirs: Vec<PathBuf> = vec![dir.to_owned()];
    if nar.is_dir() {
        dirs.push(nar);
    }
    for dir in dirs {
        if let Err(e) = nix::unistd::access(&dir, AccessFlags::W_OK | AccessFlags::X_OK) {
            let why = match e {
                nix::errno::Errno::EROFS => "is on a read-only file system",
                _ => "is not writable by this user",
            };
            return Some((
                format!("{} {why} (uid {}): {e}", dir.display(), nix::unistd::getuid()),
                format!(
                    "let the daemon's user write to {} (`chown -R USER {}`, or `chmod u+w`), or mount it \
                     read-write",
                    dir.display(),
                    dir.display()
                ),
            ));
        }
    }
    None
}

/// `http(s)://`: the server answers a read of `nix-cache-info` with our credentials.
async fn http_target(config: &Config, credentials: Credentials) -> (Check, Option<TargetInfo>) {
    let fix = token_fix(config);
    read_cache_info(config, credentials, &fix, "").await
}

/// `s3://`: credentials are found, and the bucket answers a signed read of `nix-cache-info`.
async fn s3_target(config: &Config) -> (Check, Option<TargetInfo>) {
    let source = match backend::s3::credentials::find_source(config) {
        Ok(source) => source,
        Err(problem) => return (Check::fail(NAME, problem, S3_CREDENTIAL_SOURCES), None),
    };
    let fix = format!("use keys that may read and write the bucket ({source})");
    read_cache_info(config, Credentials::none(), &fix, &format!("; {source}")).await
}

/// The target answers a read of `nix-cache-info` (never a write) with `credentials`; `auth_fix` is the fix when
/// it refuses them, `more` ends the line when it takes them.
async fn read_cache_info(
    config: &Config,
    credentials: Credentials,
    auth_fix: &str,
    more: &str,
) -> (Check, Option<TargetInfo>) {
    let url = redact_url(&config.target.url);
    let backend = match backend_for(config, credentials) {
        Ok(backend) => backend,
        Err(failed) => return (failed, None),
    };
    let answer = deadline::future(
        &format!("{url} to answer"),
        backend.get_document("nix-cache-info"),
    )
    .await;
    match remote_answer(&url, answer, auth_fix) {
        Ok(_) => (
            Check::pass(
                NAME,
                format!(
                    "{url} answers and takes our credentials for reading (doctor writes nothing){more}"
                ),
            ),
            plain_info(),
        ),
        Err(check) => (check, None),
    }
}

/// The target's backend, or the failed check that says why there is none.
fn backend_for(config: &Config, credentials: Credentials) -> Result<backend::AnyBackend, Check> {
    Target::backend_with(config, credentials)
        .map_err(|e| Check::fail(NAME, e.to_string(), "fix `url` in [target]"))
}

/// `cachix://`: Cachix's API answers the (read-only) cache info request with our token.
async fn cachix_target(config: &Config, credentials: Credentials) -> (Check, Option<TargetInfo>) {
    let url = redact_url(&config.target.url);
    let backend = match backend_for(config, credentials) {
        Ok(backend) => backend,
        Err(failed) => return (failed, None),
    };
    let answer = deadline::future(
        &format!("Cachix's API for {url} to answer"),
        backend.prepare(),
    )
    .await;
    match remote_answer(&url, answer, &token_fix(config)) {
        Ok(info) => (
            Check::pass(NAME, format!("{url} answers and accepts our credentials")),
            Some(info),
        ),
        Err(check) => (check, None),
    }
}

/// The fix for a token the target refused.
fn token_fix(config: &Config) -> String {
    match &config.target.auth_token_file {
        Some(file) => format!(
            "put a valid token in {} (write a new file and rename it over the old one); the daemon picks it up \
             without a restart",
            file.display()
        ),
        None => "set `auth_token_file` in [target] to a file holding a valid token".to_owned(),
    }
}

/// A server's answer within the deadline, or the failed check that says why there is none.
fn remote_answer<T>(
    url: &str,
    answer: Option<Result<T, backend::Error>>,
    auth_fix: &str,
) -> Result<T, Check> {
    match answer {
        Some(Ok(value)) => Ok(value),
        Some(Err(e)) if e.is_auth() => Err(Check::fail(NAME, e.to_string(), auth_fix)),
        Some(Err(backend::Error::Config(message))) => Err(Check::fail(
            NAME,
            message,
            "fix [target] as the message says",
        )),
        Some(Err(e)) => Err(Check::fail(
            NAME,
            e.to_string(),
            "check `url` in [target] and that the cache is up",
        )),
        None => Err(Check::fail(
            NAME,
            format!("{url} did not answer within {} s", CHECK_DEADLINE.as_secs()),
            "check the network path to the cache (offline? a firewall?) and that it is up; the daemon keeps \
             paths queued until it answers",
        )),
    }
}

/// What the target cannot hold of a complete cache, and whether its `nix-cache-info` says what the configuration
/// asks for. A differing one is reported, never rewritten: other readers and writers may rely on it.
pub(super) async fn check_cache_info(
    config: &Config,
    credentials: Option<Credentials>,
    target_ok: bool,
) -> Check {
    const NAME: &str = "cache-info";
    let kind = Kind::of(config);
    if let Some(note) = crate::backend::documents::cannot_store_note(kind.cannot_store(), config) {
        let requested = kind.cannot_store().iter().any(|d| d.is_requested(config));
        return if requested {
            Check::fail(
                NAME,
                note,
                "remove those keys from [target], or push to a file://, http(s):// or s3:// cache for them",
            )
        } else {
            Check::skip(NAME, note)
        };
    }
    let (Some(credentials), true) = (credentials, target_ok) else {
        return Check::skip(NAME, "needs a reachable target (see target)");
    };
    let backend = match Target::backend_with(config, credentials) {
        Ok(backend) => backend,
        Err(e) => return Check::skip(NAME, e.to_string()),
    };
    let wanted = crate::cache_info::CacheInfo::from_config(config);
    let answer = deadline::future(
        "the target's nix-cache-info",
        backend.get_document("nix-cache-info"),
    )
    .await;
    match answer {
        Some(Ok(Some(bytes))) => {
            let existing = crate::cache_info::CacheInfo::parse(&String::from_utf8_lossy(&bytes));
            let differences = wanted.differences(&existing);
            if differences.is_empty() {
                Check::pass(NAME, "nix-cache-info matches the configuration")
            } else {
                Check::fail(
                    NAME,
                    format!("the target's nix-cache-info differs: {}", differences.join("; ")),
                    "nixpush never rewrites an existing nix-cache-info: edit it in the cache, or set \
                     target.priority / target.want_mass_query to what it says",
                )
            }
        }
        Some(Ok(None)) => Check::pass(
            NAME,
            "no nix-cache-info yet; nixpush writes one with the configured fields",
        ),
        Some(Err(e)) => Check::fail(NAME, e.to_string(), "check that the cache is readable"),
        None => Check::fail(
            NAME,
            format!(
                "nix-cache-info did not arrive within {} s",
                CHECK_DEADLINE.as_secs()
            ),
            "check the network path to the cache and that it is up",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // See: #19
    #[test]
    fn a_missing_cache_directory_is_reported_and_not_created() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nonexistent/dir");
        let (detail, fix) = directory_problem(&dir).unwrap();
        assert!(detail.ends_with("does not exist"), "{detail}");
        assert!(fix.contains("install -d"), "{fix}");
        assert!(!tmp.path().join("nonexistent").exists());
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(directory_problem(&dir), None);
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(directory_problem(&file)
            .unwrap()
            .0
            .contains("not a directory"));
    }
}
