//! Nix's settings as doctor reads them: from `nix show-config` (what Nix really uses, `extra-` settings merged), or,
//! when that cannot run in time, from `$NIX_CONF_DIR/nix.conf` (default `/etc/nix/nix.conf`) and `$NIX_CONFIG`,
//! the same sources Nix reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::deadline::{say_waiting, CHECK_DEADLINE, SAY_WAITING_AFTER};

/// Nix's effective settings and where they came from.
#[derive(Debug, Clone)]
pub(super) struct NixSettings {
    values: BTreeMap<String, String>,
    /// `nix show-config`, or the files read.
    pub(super) source: String,
    /// The file a fix should edit.
    pub(super) conf_file: PathBuf,
}

impl NixSettings {
    /// From `nix show-config`, falling back to the configuration files.
    pub(super) fn read() -> Result<NixSettings, String> {
        let conf_dir = std::env::var_os("NIX_CONF_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/nix"));
        let conf_file = conf_dir.join("nix.conf");
        let show_config_error = match run_with_deadline(
            Command::new("nix").args([
                "--extra-experimental-features",
                "nix-command",
                "show-config",
            ]),
            CHECK_DEADLINE,
        ) {
            Ok(text) => {
                let mut values = BTreeMap::new();
                parse_nix_conf(&text, None, &mut values, 0);
                return Ok(NixSettings {
                    values,
                    source: "nix show-config".to_owned(),
                    conf_file,
                });
            }
            Err(e) => e,
        };
        let mut values = BTreeMap::new();
        let mut sources = Vec::new();
        match std::fs::read_to_string(&conf_file) {
            Ok(text) => {
                parse_nix_conf(&text, conf_file.parent(), &mut values, 0);
                sources.push(conf_file.display().to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(format!(
                    "`nix show-config` failed ({show_config_error}) and {} cannot be read: {e}",
                    conf_file.display()
                ))
            }
        }
        if let Ok(text) = std::env::var("NIX_CONFIG") {
            parse_nix_conf(&text, None, &mut values, 0);
            sources.push("$NIX_CONFIG".to_owned());
        }
        if sources.is_empty() {
            sources.push(format!("defaults ({} does not exist)", conf_file.display()));
        }
        Ok(NixSettings {
            values,
            source: sources.join(" and "),
            conf_file,
        })
    }

    pub(super) fn get(&self, key: &str) -> &str {
        self.values.get(key).map(String::as_str).unwrap_or("")
    }

    pub(super) fn list(&self, key: &str) -> Vec<&str> {
        self.get(key).split_whitespace().collect()
    }
}

/// Runs `command`, returning its stdout if it exits 0 within `deadline`; says that it waits once it has waited
/// [`SAY_WAITING_AFTER`].
fn run_with_deadline(command: &mut Command, deadline: Duration) -> Result<String, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run nix: {e}"))?;
    let mut stdout = child.stdout.take();
    // Read on a thread so a chatty child cannot block on a full pipe while we wait for it.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(out) = stdout.as_mut() {
            let _ = std::io::Read::read_to_string(out, &mut text);
        }
        text
    });
    let started = Instant::now();
    let mut said_waiting = false;
    let status = loop {
        if !said_waiting && started.elapsed() > SAY_WAITING_AFTER {
            say_waiting("`nix show-config`");
            said_waiting = true;
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", deadline.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    };
    let text = reader.join().unwrap_or_default();
    if status.success() {
        Ok(text)
    } else {
        Err(format!("exited with {status}"))
    }
}

/// Parses `nix.conf` syntax (`key = value`, `#` comments, `include`/`!include FILE`, `extra-key` appending to
/// `key`) into `values`. `dir` resolves relative includes; a missing `!include` is fine, as in Nix.
pub(super) fn parse_nix_conf(
    text: &str,
    dir: Option<&Path>,
    values: &mut BTreeMap<String, String>,
    depth: u32,
) {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let include = line
            .strip_prefix("!include ")
            .or_else(|| line.strip_prefix("include "));
        if let Some(file) = include {
            let file = Path::new(file.trim());
            let file = match dir {
                Some(dir) if file.is_relative() => dir.join(file),
                _ => file.to_owned(),
            };
            if depth < 10 {
                if let Ok(text) = std::fs::read_to_string(&file) {
                    parse_nix_conf(&text, file.parent(), values, depth + 1);
                }
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key.strip_prefix("extra-") {
            Some(base) => {
                let entry = values.entry(base.to_owned()).or_default();
                if !entry.is_empty() && !value.is_empty() {
                    entry.push(' ');
                }
                entry.push_str(value);
            }
            None => {
                values.insert(key.to_owned(), value.to_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_conf_merges_extra_settings_and_includes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("more.conf"),
            "extra-trusted-public-keys = b:2\n",
        )
        .unwrap();
        let text =
            "# comment\nsubstituters = https://a/ # trailing\nextra-substituters = file:///c\n\
                    trusted-public-keys = a:1\ninclude more.conf\n!include missing.conf\n\
                    post-build-hook = /x/nixpush-hook\n";
        let mut values = BTreeMap::new();
        parse_nix_conf(text, Some(dir.path()), &mut values, 0);
        assert_eq!(values["substituters"], "https://a/ file:///c");
        assert_eq!(values["trusted-public-keys"], "a:1 b:2");
        assert_eq!(values["post-build-hook"], "/x/nixpush-hook");
    }
}
