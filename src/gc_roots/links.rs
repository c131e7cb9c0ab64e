//! The roots on disk: one symlink per path, `DIR/<hash>-<name>` → `/nix/store/<hash>-<name>`, the form Nix's
//! collector takes as a root anywhere under `/nix/var/nix/gcroots` (checked with Nix 2.8: `nix-store --delete`
//! refuses such a path as "still alive"). One `symlink(2)` to create, one `unlink(2)` to remove, no fsync: the queue
//! is the durable record, and the daemon re-creates missing roots from it at startup.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::store_path::StorePath;

/// Mode of a directory the daemon creates: as Nix's own `gcroots/` directories, listable by anyone (store
/// paths are no secret), writable by the daemon's user alone.
pub const DIR_MODE: u32 = 0o755;

/// Creates `dir` (and missing parents) with [`DIR_MODE`], owned by whoever runs the daemon. An existing
/// directory is left as its admin made it.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Where the root of `path` lives.
pub fn link_path(dir: &Path, path: &StorePath) -> PathBuf {
    dir.join(path.base_name())
}

/// Creates the root of `path`. A root already there is kept; a link to anything else by that name is
/// replaced. A missing directory is created once.
pub fn create(dir: &Path, path: &StorePath) -> io::Result<()> {
    let link = link_path(dir, path);
    match std::os::unix::fs::symlink(path.as_path(), &link) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if std::fs::read_link(&link).is_ok_and(|target| target == path.as_path()) {
                return Ok(());
            }
            // Not ours (or pointing elsewhere): replace it atomically.
            let temporary = dir.join(format!(".{}.new", path.base_name()));
            let _ = std::fs::remove_file(&temporary);
            std::os::unix::fs::symlink(path.as_path(), &temporary)?;
            std::fs::rename(&temporary, &link)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            ensure_dir(dir)?;
            std::os::unix::fs::symlink(path.as_path(), &link)
        }
        Err(e) => Err(e),
    }
}

/// Removes the root of `path`; one that is already gone is fine.
pub fn remove(dir: &Path, path: &StorePath) -> io::Result<()> {
    match std::fs::remove_file(link_path(dir, path)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The roots in `dir` that have the daemon's form (a symlink named like the store path it points to). Anything
/// else in the directory is someone else's and left alone.
pub fn list_owned(dir: &Path, store_dir: &str) -> io::Result<Vec<StorePath>> {
    let mut owned = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_symlink() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Ok(path) = StorePath::from_base_name(&name, store_dir) else {
            continue;
        };
        if std::fs::read_link(entry.path()).is_ok_and(|target| target == path.as_path()) {
            owned.push(path);
        }
    }
    Ok(owned)
}

/// What went wrong doing `action` in `dir`, with what fixes it.
pub fn explain(action: &str, dir: &Path, error: &io::Error) -> String {
    let shown = dir.display();
    let fix = match error.raw_os_error() {
        Some(nix::libc::EACCES | nix::libc::EPERM) => format!(
            "the daemon's user may not write there: give it the directory (systemd/nixpush.tmpfiles.conf: \
             `d {shown} 0755 nixpush nixpush - -`) and write access (nixpush.service: ReadWritePaths=-{shown})"
        ),
        Some(nix::libc::EROFS) => format!(
            "it is on a read-only filesystem; under ProtectSystem=strict the unit needs ReadWritePaths=-{shown}"
        ),
        Some(nix::libc::ENOENT | nix::libc::ENOTDIR) => format!(
            "the directory is missing and cannot be created; create {shown} for the daemon's user \
             (systemd/nixpush.tmpfiles.conf does)"
        ),
        Some(nix::libc::ENOSPC | nix::libc::EDQUOT) => "the filesystem is full".to_owned(),
        _ => format!("check {shown}"),
    };
    format!(
        "cannot {action} GC roots in {shown}: {error}; queued paths are not protected from Nix's garbage \
         collector until this is fixed ({fix}; or set gc_roots_dir = \"\" to turn GC roots off)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store_path::test_path;

    #[test]
    fn roots_are_created_idempotently_repaired_listed_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("roots");
        let p = test_path("hello");
        create(&dir, &p).unwrap();
        create(&dir, &p).unwrap();
        let link = link_path(&dir, &p);
        assert_eq!(std::fs::read_link(&link).unwrap(), p.as_path());
        // Someone else's files are not listed as ours.
        std::fs::write(dir.join("notes"), b"").unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("etc")).unwrap();
        let q = test_path("other");
        std::os::unix::fs::symlink("/tmp", link_path(&dir, &q)).unwrap();
        assert_eq!(list_owned(&dir, "/nix/store").unwrap(), vec![p.clone()]);
        // A link by our name pointing elsewhere is replaced.
        create(&dir, &q).unwrap();
        assert_eq!(
            std::fs::read_link(link_path(&dir, &q)).unwrap(),
            q.as_path()
        );
        remove(&dir, &p).unwrap();
        remove(&dir, &p).unwrap();
        assert!(!link.exists() && std::fs::symlink_metadata(&link).is_err());
    }

    #[test]
    fn errors_name_the_directory_and_the_fix() {
        let denied = io::Error::from_raw_os_error(nix::libc::EACCES);
        let text = explain("create", Path::new("/nix/var/nix/gcroots/nixpush"), &denied);
        assert!(
            text.contains("ReadWritePaths=-/nix/var/nix/gcroots/nixpush"),
            "{text}"
        );
        assert!(text.contains("gc_roots_dir = \"\""), "{text}");
        let text = explain(
            "create",
            Path::new("/x"),
            &io::Error::from_raw_os_error(nix::libc::EROFS),
        );
        assert!(text.contains("read-only"), "{text}");
    }
}
