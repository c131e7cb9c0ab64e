//! Requests the hook saved because the daemon could not take them, one JSON file per request in the spool
//! directory (`state_dir/spool`, or `NIXPUSH_SPOOL` for the hook). The daemon imports them at startup and when a new
//! one appears, and deletes each file only after its paths are durably queued.
//!
//! `spool/1732600000123-4242-0000000000.json`:
//!
//! ```json
//! {"v":1,"drv_path":"/nix/store/hrnw32bvgf2gvs4zqkcrbqwbjhi40kq8-ht-a.drv","out_paths":[],"source":"hook",
//!  "created_at_ms":1732600000123,"reason":"cannot connect to /run/nixpush/nixpush.sock: Connection refused (os error 111)"}
//! ```
//!
//! Files are written atomically (a `.`-prefixed temporary name, fsync, rename, fsync of the directory), so the
//! daemon never sees half a request. A hook that may not open the directory (any user but its owner) makes the
//! rename durable with `syncfs` instead; the daemon also fsyncs the directory before it imports what it lists. The directory is mode 01733, like `/tmp` without listing: any user's hook can
//! drop a file, nobody can list or delete other users' files, and the daemon judges each file by its owner exactly
//! as it judges a socket peer. Files that cannot be read as a request are moved to `spool/bad/` with a `.reason`
//! file beside them, so a bad file is looked at once, not on every scan.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The spool file format version.
pub const SPOOL_VERSION: u32 = 1;
/// Largest spool file the daemon reads.
pub const MAX_SPOOL_FILE_BYTES: u64 = 1024 * 1024;
/// Mode of the spool directory: everyone may create files, only the owner may list.
pub const SPOOL_DIR_MODE: u32 = 0o1733;
/// Subdirectory for files that could not be imported.
pub const BAD_DIR: &str = "bad";

/// Why a spool file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing a new spool file failed.
    #[error("cannot write a spool file in {dir}: {source}")]
    Write {
        /// The spool directory.
        dir: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A directory could not be created, listed or changed.
    #[error("cannot prepare spool directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Reading or moving a spool file failed.
    #[error("cannot read spool file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Not a plain file with one link (a symlink, FIFO or hard link planted in the spool).
    #[error("spool file {path} is not a regular file with a single link")]
    NotRegular {
        /// The file.
        path: PathBuf,
    },
    /// Over [`MAX_SPOOL_FILE_BYTES`].
    #[error("spool file {path} is larger than {MAX_SPOOL_FILE_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not JSON of the expected shape.
    #[error("spool file {path} is not a valid request: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        message: String,
    },
    /// Written by a version of nixpush with another spool format.
    #[error("spool file {path} has unsupported version {version}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u32,
    },
}

/// One saved request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolRequest {
    /// [`SPOOL_VERSION`].
    pub v: u32,
    /// `DRV_PATH`, if set.
    #[serde(default)]
    pub drv_path: Option<String>,
    /// `OUT_PATHS`, split on whitespace.
    #[serde(default)]
    pub out_paths: Vec<String>,
    /// Who made the request, e.g. `hook`.
    #[serde(default = "default_source")]
    pub source: String,
    /// Unix time (ms) the file was written.
    #[serde(default)]
    pub created_at_ms: u64,
    /// Why the request was spooled instead of sent.
    #[serde(default)]
    pub reason: Option<String>,
}

fn default_source() -> String {
    "hook".to_owned()
}

/// A spool file read by the daemon.
#[derive(Debug, Clone)]
pub struct SpoolFile {
    /// Where it is.
    pub path: PathBuf,
    /// What it asks for.
    pub request: SpoolRequest,
    /// Its owner, who is treated like a socket peer.
    pub owner_uid: u32,
    /// Its group.
    pub owner_gid: u32,
}

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// Writes `request` as a new file in `dir` (created if missing) and returns its path.
pub fn write(dir: &Path, request: &SpoolRequest) -> Result<PathBuf, Error> {
    let write_error = |source| Error::Write {
        dir: dir.to_owned(),
        source,
    };
    // Serializing strings and integers cannot fail.
    let bytes = serde_json::to_vec(request).unwrap_or_default();
    let mut created_dir = false;
    loop {
        let name = format!(
            "{:013}-{}-{:010}.json",
            request.created_at_ms,
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let temporary = dir.join(format!(".{name}.tmp"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temporary);
        let mut file = match file {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !created_dir => {
                created_dir = true;
                create_spool_dir(dir).map_err(write_error)?;
                continue;
            }
            Err(e) => return Err(write_error(e)),
        };
        let written = file
            .write_all(&bytes)
            .and_then(|()| file.sync_all())
            .and_then(|()| fs::rename(&temporary, dir.join(&name)));
        if let Err(e) = written {
            let _ = fs::remove_file(&temporary);
            return Err(write_error(e));
        }
        sync_entry(dir, &file).map_err(write_error)?;
        return Ok(dir.join(name));
    }
}

/// Makes the name of `file` in `dir` durable: an fsync of the directory where we may open it; otherwise (a
/// non-root hook cannot read the 01733 spool directory) a `syncfs` of the filesystem holding `file`, which
/// commits every metadata change on it, the rename included.
fn sync_entry(dir: &Path, file: &File) -> io::Result<()> {
    match File::open(dir) {
        Ok(handle) => handle.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            use std::os::fd::AsRawFd;
            nix::unistd::syncfs(file.as_raw_fd()).map_err(io::Error::from)
        }
        Err(e) => Err(e),
    }
}

/// Creates the spool directory (and its parents) as the daemon would, mode 01733, and makes its name durable.
fn create_spool_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(SPOOL_DIR_MODE).create(dir) {
        Ok(()) => {
            // The umask clears bits from the mode given at creation.
            fs::set_permissions(dir, fs::Permissions::from_mode(SPOOL_DIR_MODE))?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    match File::open(parent) {
        Ok(handle) => handle.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            use std::os::fd::AsRawFd;
            let handle = File::open(dir)?;
            nix::unistd::syncfs(handle.as_raw_fd()).map_err(io::Error::from)
        }
        Err(e) => Err(e),
    }
}

/// `fsync`s the spool directory, so the renames of hooks that could not sync it themselves are durable.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| Error::Dir {
            dir: dir.to_owned(),
            source,
        })
}

/// Spool files waiting in `dir`, oldest first. A missing directory holds none.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Dir {
                dir: dir.to_owned(),
                source,
            })
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::Dir {
            dir: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if !is_dir && !name.starts_with('.') && name.ends_with(".json") {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Reads and checks one spool file without following symlinks or blocking on FIFOs.
pub fn read(path: &Path) -> Result<SpoolFile, Error> {
    let read_error = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)
        .map_err(|e| {
            // O_NOFOLLOW reports a symlink as ELOOP.
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                Error::NotRegular {
                    path: path.to_owned(),
                }
            } else {
                read_error(e)
            }
        })?;
    let meta = file.metadata().map_err(read_error)?;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(Error::NotRegular {
            path: path.to_owned(),
        });
    }
    if meta.len() > MAX_SPOOL_FILE_BYTES {
        return Err(Error::TooLarge {
            path: path.to_owned(),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_SPOOL_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    let request: SpoolRequest = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if request.v != SPOOL_VERSION {
        return Err(Error::Version {
            path: path.to_owned(),
            version: request.v,
        });
    }
    Ok(SpoolFile {
        path: path.to_owned(),
        request,
        owner_uid: meta.uid(),
        owner_gid: meta.gid(),
    })
}

/// Creates the spool directory with mode 01733 and its private `bad/` subdirectory.
pub fn prepare_dir(dir: &Path) -> Result<(), Error> {
    let dir_error = |dir: &Path| {
        let dir = dir.to_owned();
        move |source| Error::Dir { dir, source }
    };
    fs::create_dir_all(dir).map_err(dir_error(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(SPOOL_DIR_MODE)).map_err(dir_error(dir))?;
    let bad = dir.join(BAD_DIR);
    fs::create_dir_all(&bad).map_err(dir_error(&bad))?;
    fs::set_permissions(&bad, fs::Permissions::from_mode(0o700)).map_err(dir_error(&bad))?;
    Ok(())
}

/// Moves a file that cannot be imported to `dir/bad/`, with `reason` in a `.reason` file beside it.
pub fn move_aside(dir: &Path, file: &Path, reason: &str) -> Result<PathBuf, Error> {
    let name = file
        .file_name()
        .map(|n| n.to_owned())
        .unwrap_or_else(|| "unnamed".into());
    let bad = dir.join(BAD_DIR);
    fs::create_dir_all(&bad).map_err(|source| Error::Dir {
        dir: bad.clone(),
        source,
    })?;
    let target = bad.join(&name);
    fs::rename(file, &target).map_err(|source| Error::Read {
        path: file.to_owned(),
        source,
    })?;
    let mut reason_name = name;
    reason_name.push(".reason");
    let _ = File::create(bad.join(reason_name)).and_then(|mut f| {
        f.write_all(format!("{reason}\n").as_bytes())?;
        f.sync_all()
    });
    // Both directories changed; without these a power cut could bring the file back to be judged again, or
    // lose it and its reason.
    sync_dir(&bad)?;
    sync_dir(dir)?;
    Ok(target)
}

/// Removes temporary files older than `age`, left behind by hooks that died mid-write.
pub fn remove_stale_temporaries(dir: &Path, age: Duration) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('.') && name.ends_with(".tmp")) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| now.duration_since(modified).ok())
            .is_some_and(|elapsed| elapsed > age);
        if old && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(out_paths: Vec<String>) -> SpoolRequest {
        SpoolRequest {
            v: SPOOL_VERSION,
            drv_path: Some("/nix/store/hrnw32bvgf2gvs4zqkcrbqwbjhi40kq8-ht-a.drv".into()),
            out_paths,
            source: "hook".into(),
            created_at_ms: 1_732_600_000_123,
            reason: Some("connection refused".into()),
        }
    }

    #[test]
    fn write_creates_dir_and_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state/spool");
        let req = request(vec!["/nix/store/x".into()]);
        let a = write(&dir, &req).unwrap();
        // See: #15 (a hook that creates the spool gives it the daemon's mode, not 0777)
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, SPOOL_DIR_MODE);
        let b = write(&dir, &req).unwrap();
        assert_ne!(a, b);
        assert_eq!(list(&dir).unwrap(), vec![a.clone(), b]);
        let file = read(&a).unwrap();
        assert_eq!(file.request, req);
        assert_eq!(file.owner_uid, nix::unistd::geteuid().as_raw());
        assert!(fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
    }

    #[test]
    fn hostile_files_are_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("garbage.json"), b"{not json").unwrap();
        assert!(matches!(
            read(&dir.join("garbage.json")),
            Err(Error::Corrupt { .. })
        ));
        std::os::unix::fs::symlink("/etc/passwd", dir.join("link.json")).unwrap();
        assert!(matches!(
            read(&dir.join("link.json")),
            Err(Error::NotRegular { .. })
        ));
        nix::unistd::mkfifo(&dir.join("fifo.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(
            read(&dir.join("fifo.json")),
            Err(Error::NotRegular { .. })
        ));
        fs::write(dir.join("future.json"), br#"{"v":7}"#).unwrap();
        assert!(matches!(
            read(&dir.join("future.json")),
            Err(Error::Version { version: 7, .. })
        ));
    }

    #[test]
    fn prepare_and_move_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        prepare_dir(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, SPOOL_DIR_MODE);
        fs::write(dir.join("bad.json"), b"x").unwrap();
        let moved = move_aside(&dir, &dir.join("bad.json"), "not JSON").unwrap();
        assert!(moved.exists());
        assert!(list(&dir).unwrap().is_empty());
        assert_eq!(
            fs::read_to_string(dir.join("bad/bad.json.reason")).unwrap(),
            "not JSON\n"
        );
    }

    proptest! {
        #[test]
        fn spool_files_round_trip(paths in proptest::collection::vec(".{0,60}", 0..4)) {
            let tmp = tempfile::tempdir().unwrap();
            let req = request(paths);
            let path = write(tmp.path(), &req).unwrap();
            prop_assert_eq!(read(&path).unwrap().request, req);
        }
    }
}
