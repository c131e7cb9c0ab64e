//! Who may change the queue: root (Nix's daemon runs the hook as root), the daemon's own user, `allowed_users`
//! (names or numeric uids) and members of `allowed_groups` (primary or supplementary). Socket peers are
//! identified by `SO_PEERCRED`, spool files by their owner. Anyone who can open the socket may read the status.

use nix::unistd::{Gid, Group, Uid, User};

use crate::config::Config;

/// The other end of a connection, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer {
    /// Effective uid, when known.
    pub uid: Option<u32>,
    /// Effective gid, when known.
    pub gid: Option<u32>,
    /// Process id, when known.
    pub pid: Option<i32>,
}

/// Whether `uid` (with primary group `gid`) may enqueue, retry or drop. The error is the reason, for the client
/// and the refused list.
pub fn check(uid: Option<u32>, gid: Option<u32>, config: &Config) -> Result<(), String> {
    let Some(uid) = uid else {
        return Err("permission denied: the peer's credentials are unknown".to_owned());
    };
    if uid == 0 || uid == Uid::effective().as_raw() {
        return Ok(());
    }
    // Name lookups go through NSS; a failed lookup just means "no name".
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
    let name = user.as_ref().map(|u| u.name.clone());
    let uid_text = uid.to_string();
    if config
        .allowed_users
        .iter()
        .any(|allowed| *allowed == uid_text || Some(allowed) == name.as_ref())
    {
        return Ok(());
    }
    if !config.allowed_groups.is_empty() {
        let mut gids: Vec<Gid> = gid.map(Gid::from_raw).into_iter().collect();
        if let Some(user) = &user {
            gids.push(user.gid);
            if let Ok(c_name) = std::ffi::CString::new(user.name.clone()) {
                gids.extend(nix::unistd::getgrouplist(&c_name, user.gid).unwrap_or_default());
            }
        }
        for allowed in &config.allowed_groups {
            let group_gid = match allowed.parse::<u32>() {
                Ok(raw) => Some(Gid::from_raw(raw)),
                Err(_) => Group::from_name(allowed).ok().flatten().map(|g| g.gid),
            };
            if group_gid.is_some_and(|g| gids.contains(&g)) {
                return Ok(());
            }
        }
    }
    let who = match name {
        Some(name) => format!("uid {uid} ({name})"),
        None => format!("uid {uid}"),
    };
    Err(format!(
        "permission denied: {who} is not root and not in allowed_users or allowed_groups"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_listed_users_and_groups() {
        let mut config = Config::default();
        assert!(check(Some(0), Some(0), &config).is_ok());
        let err = check(Some(65534), Some(65534), &config).unwrap_err();
        assert!(
            err.contains("permission denied: uid 65534 (nobody)"),
            "{err}"
        );
        assert!(check(None, None, &config).is_err());
        config.allowed_users = vec!["nobody".into()];
        assert!(check(Some(65534), Some(65534), &config).is_ok());
        config.allowed_users = vec!["65534".into()];
        assert!(check(Some(65534), None, &config).is_ok());
        config.allowed_users.clear();
        config.allowed_groups = vec!["nogroup".into()];
        assert!(check(Some(65534), None, &config).is_ok());
        config.allowed_groups = vec!["daemon".into()];
        assert!(check(Some(65534), Some(65534), &config).is_err());
    }
}
