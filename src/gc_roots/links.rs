//! The roots on disk: one entry per path, `DIR/<hash>-<name>`, each a hard link of one empty file, `DIR/.anchor`.
//! Nix's collector takes a regular file anywhere under `/nix/var/nix/gcroots` as a root of the store path it is
//! named after (checked with Nix 2.8: `nix-store --delete` refuses such a path as "still alive", and
//! `nix-store --gc --print-roots` lists it). One `link(2)` to create, one `unlink(2)` to remove, no fsync: the
//! queue is the durable record, and the daemon re-creates missing roots from it at startup.
//!
//! Why hard links and not symlinks: a symlink to a store path is too long to live in its inode, so each one costs
//! the filesystem a new inode and a data block, the largest single cost of an ack; a hard link is a directory entry
//! only (`benches/root_links.py /var/tmp 3000 8`, ext4 root disk, load 0.27: 9.6 µs a root against 472 µs). The
//! symlinks earlier versions made are still recognised, kept and removed as roots.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::store_path::StorePath;

/// Mode of a directory the daemon creates: as Nix's own `gcroots/` directories, listable by anyone (store
/// paths are no secret), writable by the daemon's user alone.
pub const DIR_MODE: u32 = 0o755;

/// The file every root is a hard link of. Its name is no store path's, so Nix ignores it.
const ANCHOR: &str = ".anchor";

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

/// Creates the root of `path`. A root already there is kept; anything else by that name is replaced. A missing
/// directory or anchor is created once.
pub fn create(dir: &Path, path: &StorePath) -> io::Result<()> {
    let link = link_path(dir, path);
    match new_root(dir, path, &link) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if is_root_of(&link, path) {
                return Ok(());
            }
            // Not a root of this path (a link pointing elsewhere): replace it atomically.
            let temporary = dir.join(format!(".{}.new", path.base_name()));
            let _ = std::fs::remove_file(&temporary);
            new_root(dir, path, &temporary)?;
            std::fs::rename(&temporary, &link)
        }
        result => result,
    }
}

/// Makes `link` a root of `path`, which must not exist yet: a hard link of the anchor, or a symlink to `path` on a
/// filesystem without hard links.
fn new_root(dir: &Path, path: &StorePath, link: &Path) -> io::Result<()> {
    let anchor = dir.join(ANCHOR);
    let error = match std::fs::hard_link(&anchor, link) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    match error.raw_os_error() {
        // No anchor yet (or no directory): make them, then link.
        Some(nix::libc::ENOENT) => {
            ensure_dir(dir)?;
            new_anchor(dir)?;
            std::fs::hard_link(&anchor, link)
        }
        // The anchor has as many links as the filesystem allows (65,000 on ext4): the next roots link a new one.
        // The old anchor's inode lives on in its roots.
        Some(nix::libc::EMLINK) => {
            new_anchor(dir)?;
            std::fs::hard_link(&anchor, link)
        }
        // A filesystem without hard links.
        Some(nix::libc::EPERM | nix::libc::EOPNOTSUPP) => {
            std::os::unix::fs::symlink(path.as_path(), link)
        }
        _ => Err(error),
    }
}

/// Puts a fresh, empty anchor in place: written under a temporary name and renamed over the old one, so a root
/// being linked meanwhile always finds an anchor.
fn new_anchor(dir: &Path) -> io::Result<()> {
    let temporary = dir.join(format!("{ANCHOR}.new"));
    let _ = std::fs::remove_file(&temporary);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temporary)?;
    std::fs::rename(&temporary, dir.join(ANCHOR))
}

/// Whether `link` is a root of `path` in a form the daemon makes: a regular file (Nix roots the path it is named
/// after), or a symlink to `path` (what earlier versions made).
fn is_root_of(link: &Path, path: &StorePath) -> bool {
    match std::fs::symlink_metadata(link) {
        Ok(meta) if meta.file_type().is_file() => true,
        Ok(meta) if meta.file_type().is_symlink() => {
            std::fs::read_link(link).is_ok_and(|target| target == path.as_path())
        }
        _ => false,
    }
}

/// Removes the root of `path`; one that is already gone is fine.
pub fn remove(dir: &Path, path: &StorePath) -> io::Result<()> {
    match std::fs::remove_file(link_path(dir, path)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The roots in `dir` that have the daemon's form (a regular file named like a store path, or a symlink named like
/// the store path it points to). Anything else in the directory is someone else's and left alone.
pub fn list_owned(dir: &Path, store_dir: &str) -> io::Result<Vec<StorePath>> {
    let mut owned = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if !kind.is_symlink() && !kind.is_file() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Ok(path) = StorePath::from_base_name(&name, store_dir) else {
            continue;
        };
        // The kind is known from the listing: only a symlink's target is left to check.
        if kind.is_file()
            || std::fs::read_link(entry.path()).is_ok_and(|target| target == path.as_path())
        {
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

    use std::os::unix::fs::MetadataExt;

    fn inode(path: &Path) -> u64 {
        std::fs::symlink_metadata(path).unwrap().ino()
    }

    /// A store path per `i`, its hash part spelled in Nix's base32.
    fn numbered_path(i: u32) -> StorePath {
        const DIGITS: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
        let mut hash = vec![b'0'; 32];
        let mut rest = i;
        for digit in hash.iter_mut().rev() {
            *digit = DIGITS[(rest % 32) as usize];
            rest /= 32;
        }
        let hash = String::from_utf8(hash).unwrap();
        StorePath::parse(&format!("/nix/store/{hash}-p"), "/nix/store").unwrap()
    }

    #[test]
    fn roots_are_hard_links_of_one_anchor_created_idempotently_repaired_listed_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("roots");
        let (p, r) = (test_path("hello"), test_path("world"));
        create(&dir, &p).unwrap();
        create(&dir, &p).unwrap();
        create(&dir, &r).unwrap();
        let link = link_path(&dir, &p);
        let meta = std::fs::symlink_metadata(&link).unwrap();
        assert!(meta.file_type().is_file() && meta.len() == 0);
        // Both roots and the anchor are one inode: no inode is allocated per root.
        assert_eq!(inode(&link), inode(&dir.join(ANCHOR)));
        assert_eq!(inode(&link_path(&dir, &r)), inode(&link));
        assert_eq!(meta.nlink(), 3);
        // Someone else's files are not listed as ours; the anchor is not a root.
        std::fs::write(dir.join("notes"), b"").unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("etc")).unwrap();
        let q = test_path("other");
        std::os::unix::fs::symlink("/tmp", link_path(&dir, &q)).unwrap();
        // The form earlier versions made, a symlink to the path, is ours and kept.
        let old = test_path("old");
        std::os::unix::fs::symlink(old.as_path(), link_path(&dir, &old)).unwrap();
        create(&dir, &old).unwrap();
        assert!(std::fs::symlink_metadata(link_path(&dir, &old))
            .unwrap()
            .file_type()
            .is_symlink());
        let mut listed = list_owned(&dir, "/nix/store").unwrap();
        listed.sort();
        let mut expected = vec![p.clone(), r.clone(), old.clone()];
        expected.sort();
        assert_eq!(listed, expected);
        // A link by our name pointing elsewhere is replaced by a root.
        create(&dir, &q).unwrap();
        assert_eq!(inode(&link_path(&dir, &q)), inode(&link));
        remove(&dir, &p).unwrap();
        remove(&dir, &p).unwrap();
        remove(&dir, &old).unwrap();
        assert!(std::fs::symlink_metadata(&link).is_err());
        assert!(std::fs::symlink_metadata(link_path(&dir, &old)).is_err());
        // A removed anchor is made again.
        std::fs::remove_file(dir.join(ANCHOR)).unwrap();
        create(&dir, &p).unwrap();
        assert_eq!(inode(&link_path(&dir, &p)), inode(&dir.join(ANCHOR)));
    }

    #[test]
    fn roots_past_the_filesystems_link_limit_go_to_a_new_anchor() {
        // The temporary directory's filesystem: on ext4 (65,000 links a file) the limit is crossed; elsewhere the
        // roots must all be made just the same.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("roots");
        let count = 65_010;
        let paths: Vec<StorePath> = (0..count).map(numbered_path).collect();
        for path in &paths {
            create(&dir, path).unwrap();
        }
        let inodes: std::collections::HashSet<u64> = paths
            .iter()
            .map(|path| inode(&link_path(&dir, path)))
            .collect();
        let ext4 = nix::sys::statfs::statfs(&dir).unwrap().filesystem_type()
            == nix::sys::statfs::EXT4_SUPER_MAGIC;
        if ext4 {
            assert_eq!(inodes.len(), 2, "65,000 roots per anchor on ext4");
        }
        assert!(inodes.contains(&inode(&dir.join(ANCHOR))));
        assert_eq!(list_owned(&dir, "/nix/store").unwrap().len(), paths.len());
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
