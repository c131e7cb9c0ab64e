//! The fallback source: `nix path-info --json [--recursive]`, for when Nix's database is not readable.
//!
//! ```text
//! [{"path":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","narHash":"sha256-zzETFRezYM6wNACtur7sjSVJczygJMGi3LPN8lTPNrY=",
//!   "narSize":400,"references":[…],"deriver":"/nix/store/n5yfvnmayipw3yksgvfs2vkkkq50fl4k-vec-top.drv",
//!   "registrationTime":1795708037,"ultimate":true},
//!  {"path":"/nix/store/00000000000000000000000000000000-nope","valid":false}]
//! ```

use std::process::Command;

use serde::Deserialize;

use super::{parse_hash, parse_path, Error, PathInfo};
use crate::store_path::StorePath;

/// The closure of `roots`, unsorted; [`Error::NotValid`] for an invalid root.
pub(super) fn closure(store_dir: &str, roots: &[StorePath]) -> Result<Vec<PathInfo>, Error> {
    if roots.is_empty() {
        return Ok(Vec::new());
    }
    // `--recursive` fails as a whole on an invalid root; find out which one first.
    let listed = path_info(store_dir, roots, false)?;
    for root in roots {
        if !listed
            .iter()
            .any(|(p, info)| p == root.as_str() && info.is_some())
        {
            return Err(Error::NotValid(root.clone()));
        }
    }
    Ok(path_info(store_dir, roots, true)?
        .into_iter()
        .filter_map(|(_, info)| info)
        .collect())
}

/// Runs `nix path-info --json`: each path it lists (sorted, not in argument order), with `None` for an
/// invalid one.
pub(super) fn path_info(
    store_dir: &str,
    paths: &[StorePath],
    recursive: bool,
) -> Result<Vec<(String, Option<PathInfo>)>, Error> {
    let mut cmd = Command::new("nix");
    cmd.args([
        "--extra-experimental-features",
        "nix-command",
        "path-info",
        "--json",
        // Never try to download a path that is missing: report it as invalid.
        "--option",
        "substitute",
        "false",
    ]);
    if recursive {
        cmd.arg("--recursive");
    }
    cmd.args(paths.iter().map(StorePath::as_str));
    let command = format!(
        "nix path-info --json{} {}",
        if recursive { " --recursive" } else { "" },
        paths.first().map(StorePath::as_str).unwrap_or_default()
    ) + if paths.len() > 1 { " …" } else { "" };
    let output = cmd.output().map_err(|e| Error::Command {
        command: command.clone(),
        reason: e.to_string(),
    })?;
    if !output.status.success() {
        return Err(Error::Command {
            command,
            reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let entries: Vec<CliPathInfo> =
        serde_json::from_slice(&output.stdout).map_err(|e| Error::Command {
            command: command.clone(),
            reason: format!("unexpected JSON: {e}"),
        })?;
    entries
        .into_iter()
        .map(|e| Ok((e.path.clone(), e.into_path_info(store_dir)?)))
        .collect()
}

/// One element of `nix path-info --json` (Nix 2.8).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CliPathInfo {
    path: String,
    #[serde(default = "default_true")]
    valid: bool,
    nar_hash: Option<String>,
    nar_size: Option<u64>,
    #[serde(default)]
    references: Vec<String>,
    deriver: Option<String>,
    #[serde(default)]
    registration_time: i64,
    #[serde(default)]
    ultimate: bool,
    #[serde(default)]
    signatures: Vec<String>,
    ca: Option<String>,
}

fn default_true() -> bool {
    true
}

impl CliPathInfo {
    fn into_path_info(self, store_dir: &str) -> Result<Option<PathInfo>, Error> {
        if !self.valid {
            return Ok(None);
        }
        let owner = self.path.as_str();
        let missing = |field| Error::BadRecord {
            path: owner.to_owned(),
            field,
            reason: "missing".to_owned(),
        };
        let mut references = self
            .references
            .iter()
            .map(|r| parse_path(store_dir, owner, "references", r))
            .collect::<Result<Vec<_>, _>>()?;
        references.sort();
        Ok(Some(PathInfo {
            path: parse_path(store_dir, owner, "path", owner)?,
            nar_hash: parse_hash(
                owner,
                "narHash",
                self.nar_hash.as_deref().ok_or_else(|| missing("narHash"))?,
            )?,
            nar_size: self.nar_size.ok_or_else(|| missing("narSize"))?,
            references,
            deriver: self
                .deriver
                .as_deref()
                .map(|d| parse_path(store_dir, owner, "deriver", d))
                .transpose()?,
            sigs: self.signatures,
            ca: self.ca,
            registration_time: self.registration_time,
            ultimate: self.ultimate,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_json_is_understood() {
        let json = r#"[{"path":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","narHash":"sha256-zzETFRezYM6wNACtur7sjSVJczygJMGi3LPN8lTPNrY=","narSize":400,"references":["/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","/nix/store/8pjibnycdlc071yls0gkbsb7l2ffmlgg-vec-dep"],"deriver":"/nix/store/n5yfvnmayipw3yksgvfs2vkkkq50fl4k-vec-top.drv","registrationTime":1795708037,"ultimate":true},
                       {"path":"/nix/store/00000000000000000000000000000000-nope","valid":false}]"#;
        let entries: Vec<CliPathInfo> = serde_json::from_str(json).unwrap();
        let infos: Vec<_> = entries
            .into_iter()
            .map(|e| e.into_path_info("/nix/store").unwrap())
            .collect();
        let top = infos[0].as_ref().unwrap();
        assert_eq!(
            top.nar_hash.to_string(),
            "sha256:1dinrxag5kdkvjic29507irlj9cdxjzbmb806jqcwq5k2wai6cfg"
        );
        assert_eq!(top.references[0].name(), "vec-dep");
        assert!(top.ultimate && top.sigs.is_empty() && top.ca.is_none());
        assert!(infos[1].is_none());
    }
}
