//! A tmpfs the test mounts on a fresh directory of its own, for a filesystem that fills up or turns read-only on
//! cue. Its mount point is never inside a [`crate::util::TestEnv`]'s directory: that directory is removed when the
//! daemon that owns it is dropped, which may be before the tmpfs is, and a mounted directory cannot be removed.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use super::process::output;

/// A mounted tmpfs, unmounted on drop (lazily, in case a daemon still has a file open) and then removed.
pub struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `64k`); the error is what `mount` said (the suite mounts as root).
    pub fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::Builder::new()
            .prefix("nixpush-tmpfs")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let out = output(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")])
                .arg("tmpfs")
                .arg(dir.path()),
        );
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `mount -o remount,OPTION`, e.g. `ro` or `size=16m`.
    pub fn remount(&self, option: &str) {
        let out = output(
            Command::new("mount")
                .args(["-o", &format!("remount,{option}")])
                .arg(self.path()),
        );
        assert!(
            out.status.success(),
            "remount {option}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Writes zeros until the filesystem is full; returns the file to delete to free the space.
    pub fn fill(&self) -> PathBuf {
        let path = self.path().join("fill");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 1 << 20];
        loop {
            match file.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        // What did not fit in whole chunks.
        while file.write_all(&[0u8; 4096]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .output();
    }
}
