//! The checks of Nix's side: that Nix runs nixpush-hook after every build, and, on machines that read the cache,
//! that the target is a substituter and its key trusted. A push-only machine (CI) substitutes from elsewhere, so
//! the last two only warn there.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::backend::{Kind, TargetInfo};
use crate::config::Config;
use crate::signing::SecretKey;

use super::nix_settings::NixSettings;
use super::report::Check;

/// The `nixpush-hook` next to this program, which is what Nix should run.
fn suggested_hook() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("nixpush-hook")))
        .filter(|hook| hook.exists())
        .map(|hook| hook.display().to_string())
        .unwrap_or_else(|| "/run/current-system/sw/bin/nixpush-hook".to_owned())
}

pub(super) fn check_hook(nix: &Result<NixSettings, String>) -> Check {
    const NAME: &str = "post-build-hook";
    let nix = match nix {
        Ok(nix) => nix,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot read Nix's configuration: {e}"),
                "make sure `nix show-config` works for this user",
            )
        }
    };
    let fix = format!(
        "set `post-build-hook = {}` in {} (NixOS: `services.nixpush.enable = true`), then restart nix-daemon",
        suggested_hook(),
        nix.conf_file.display()
    );
    let hook = nix.get("post-build-hook");
    if hook.is_empty() {
        return Check::fail(
            NAME,
            format!("Nix has no post-build-hook (read from {})", nix.source),
            fix,
        );
    }
    let path = Path::new(hook);
    let executable = std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false);
    if !calls_nixpush_hook(path) {
        return Check::fail(
            NAME,
            format!("Nix's post-build-hook is {hook}, not nixpush-hook"),
            fix,
        );
    }
    if !executable {
        return Check::fail(
            NAME,
            format!("Nix's post-build-hook {hook} does not exist or is not executable"),
            fix,
        );
    }
    Check::pass(NAME, format!("Nix runs {hook} after every build"))
}

/// Whether `hook` is nixpush-hook itself, or a small script that runs it.
fn calls_nixpush_hook(hook: &Path) -> bool {
    if hook.file_name().is_some_and(|n| n == "nixpush-hook") {
        return true;
    }
    let is_small_file = std::fs::metadata(hook).is_ok_and(|m| m.is_file() && m.len() < 64 * 1024);
    is_small_file
        && std::fs::read(hook).is_ok_and(|bytes| {
            let text = String::from_utf8_lossy(&bytes);
            text.starts_with("#!")
                && (text.contains("nixpush-hook") || text.contains("nixpush hook"))
        })
}

/// The URL Nix reads the target from: what the target said, else derived from the configured URL.
pub(super) fn read_url(config: &Config, info: Option<&TargetInfo>) -> String {
    if let Some(url) = info.and_then(|i| i.read_url.clone()) {
        return url;
    }
    Kind::of(config).read_url(config)
}

/// Whether two cache URLs name the same cache (ignoring a trailing slash and `?options`).
fn same_cache(a: &str, b: &str) -> bool {
    let normal = |u: &str| {
        u.split('?')
            .next()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_owned()
    };
    normal(a) == normal(b)
}

pub(super) fn check_substituter(
    config: &Config,
    info: Option<&TargetInfo>,
    nix: &Result<NixSettings, String>,
) -> Check {
    const NAME: &str = "substituter";
    let Ok(nix) = nix else {
        return Check::skip(
            NAME,
            "Nix's configuration cannot be read (see post-build-hook)",
        );
    };
    let url = read_url(config, info);
    let listed = |key: &str| listed_in(nix, key, &url);
    if listed("substituters") {
        Check::pass(NAME, format!("{url} is in Nix's substituters"))
    } else if listed("trusted-substituters") {
        Check::pass(
            NAME,
            format!(
                "{url} is in trusted-substituters (used with `--option extra-substituters {url}`)"
            ),
        )
    } else {
        // A push-only machine (CI, a build box) rightly substitutes from elsewhere.
        Check::warn(
            NAME,
            format!(
                "{url} is in neither substituters nor trusted-substituters (read from {}): this machine pushes \
                 to the cache but does not substitute from it",
                nix.source
            ),
            format!(
                "nothing to do on a push-only machine (CI); to substitute from the cache here, add \
                 `extra-substituters = {url}` to {} (NixOS: `nix.settings.substituters`)",
                nix.conf_file.display()
            ),
        )
    }
}

/// Whether `key` (`substituters`, `trusted-substituters`) lists the cache at `url`.
fn listed_in(nix: &NixSettings, key: &str, url: &str) -> bool {
    nix.list(key).iter().any(|s| same_cache(s, url))
}

/// Whether this machine substitutes from the target: a push-only machine does not, and its trust settings are
/// then advice, not faults.
fn substitutes_from(config: &Config, info: Option<&TargetInfo>, nix: &NixSettings) -> bool {
    let url = read_url(config, info);
    listed_in(nix, "substituters", &url) || listed_in(nix, "trusted-substituters", &url)
}

pub(super) fn check_public_key(
    config: &Config,
    key: Option<&SecretKey>,
    info: Option<&TargetInfo>,
    nix: &Result<NixSettings, String>,
) -> Check {
    const NAME: &str = "trusted-public-key";
    let Ok(nix) = nix else {
        return Check::skip(
            NAME,
            "Nix's configuration cannot be read (see post-build-hook)",
        );
    };
    let wanted: Vec<String> = match key {
        Some(key) => vec![key.public_key().to_string()],
        None => info.map(|i| i.public_keys.clone()).unwrap_or_default(),
    };
    if wanted.is_empty() {
        return Check::skip(NAME, "no signing key to look for (see signing-key)");
    }
    let trusted = nix.list("trusted-public-keys");
    if let Some(found) = wanted.iter().find(|k| trusted.contains(&k.as_str())) {
        return Check::pass(NAME, format!("{found} is in Nix's trusted-public-keys"));
    }
    let detail = format!(
        "{} is not in trusted-public-keys (read from {})",
        wanted.join(" "),
        nix.source
    );
    let fix = format!(
        "add `extra-trusted-public-keys = {}` to {} (NixOS: `nix.settings.trusted-public-keys`)",
        wanted[0],
        nix.conf_file.display()
    );
    if substitutes_from(config, info, nix) {
        Check::fail(NAME, detail, fix)
    } else {
        Check::warn(
            NAME,
            format!("{detail}; this machine does not substitute from the target (see substituter)"),
            format!("nothing to do on a push-only machine; machines that substitute from the cache need it: {fix}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_urls_compare_without_slash_and_options() {
        assert!(same_cache("http://h:1/", "http://h:1"));
        assert!(same_cache("s3://b?region=x", "s3://b"));
        assert!(!same_cache("http://h:1", "http://h:2"));
    }

    #[test]
    fn read_url_drops_credentials() {
        let mut config = Config::default();
        config.target.url = "https://user:secret@cache.example/nix/".into();
        assert_eq!(read_url(&config, None), "https://cache.example/nix/");
        config.target.url = "cachix://mycache".into();
        assert_eq!(read_url(&config, None), "https://mycache.cachix.org");
    }
}
