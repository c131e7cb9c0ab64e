//! `file:///dir`: the directory layout of Nix's file binary cache.
//!
//! ```text
//! dir/nix-cache-info                       StoreDir: /nix/store
//! dir/<storehash>.narinfo                  the narinfo
//! dir/nar/<filehash>.nar.zst               the compressed NAR
//! ```
//!
//! Every file is written under a temporary name, fsynced and renamed into place, NAR before narinfo, so a reader
//! (or a crash) never sees a narinfo without its complete NAR.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::narinfo::NarInfo;
use crate::store_path::StorePath;

use super::{Backend, DocumentBytes, Error, NarFile, NarUpload, NarinfoGate, TargetInfo};

/// Prefix of temporary files in the cache; stale ones are removed by [`FileBackend::prepare`].
const TMP_PREFIX: &str = ".nixpush-tmp-";
/// A temporary this old is a crash's leftover, not an upload in progress.
const STALE_AFTER: Duration = Duration::from_secs(3600);
/// How often the cache directories are swept for stale temporaries. Readying the target happens once per batch,
/// and a sweep reads directories that hold every narinfo and NAR of the cache: swept every time, a daemon's
/// work per batch grew with the size of its cache.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// A binary cache in a local directory.
#[derive(Debug, Clone)]
pub struct FileBackend {
    root: PathBuf,
    url: String,
    /// The `nix-cache-info` written when the target has none.
    cache_info: String,
    /// When the cache was last swept for stale temporaries (`None`: not yet), shared by clones.
    swept_at: Arc<Mutex<Option<Instant>>>,
}

impl FileBackend {
    /// Parses `file:///abs/dir`.
    pub fn new(url: &str, config: &Config) -> Result<FileBackend, Error> {
        let parsed = url::Url::parse(url).map_err(|e| Error::Config(format!("{url}: {e}")))?;
        let root = parsed
            .to_file_path()
            .map_err(|()| Error::Config(format!("{url} is not an absolute file:// URL")))?;
        Ok(FileBackend {
            root,
            url: url.to_owned(),
            cache_info: crate::cache_info::CacheInfo::from_config(config).render(),
            swept_at: Arc::default(),
        })
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn narinfo_path(&self, path: &StorePath) -> PathBuf {
        self.root.join(super::documents::narinfo_key(path))
    }

    fn prepare_blocking(&self) -> Result<TargetInfo, Error> {
        let nar_dir = self.root.join("nar");
        std::fs::create_dir_all(&nar_dir).map_err(|e| Error::io(&nar_dir, e))?;
        let info = self.root.join("nix-cache-info");
        if !info.exists() {
            write_atomically(&info, self.cache_info.as_bytes())?;
        }
        if self.sweep_due() {
            remove_stale_temporaries(&nar_dir);
            remove_stale_temporaries(&self.root);
        }
        Ok(TargetInfo {
            read_url: Some(self.url.clone()),
            ..TargetInfo::default()
        })
    }

    /// Whether the stale temporaries are due to be swept: the first time the target is readied, then every
    /// [`SWEEP_EVERY`].
    fn sweep_due(&self) -> bool {
        let mut swept_at = self.swept_at.lock().unwrap_or_else(|e| e.into_inner());
        let due = swept_at.is_none_or(|at| at.elapsed() >= SWEEP_EVERY);
        if due {
            *swept_at = Some(Instant::now());
        }
        due
    }

    /// Moves (or copies) the NAR into `nar/`, synced.
    fn store_nar_blocking(&self, narinfo: &NarInfo, nar: NarFile<'_>) -> Result<(), Error> {
        let nar_path = self.root.join(&narinfo.url);
        if !nar_path.starts_with(self.root.join("nar")) || narinfo.url.contains("..") {
            return Err(Error::Config(format!(
                "narinfo URL {:?} points outside the cache",
                narinfo.url
            )));
        }
        let same_size = std::fs::metadata(&nar_path)
            .map(|m| m.len() == nar.size)
            .unwrap_or(false);
        if !same_size {
            // The engine normally wrote `nar.path` inside our staging directory, so this is a rename; anything
            // else is copied to a temporary name first.
            // The engine fsynced the file it staged with us; anything else is copied and synced here.
            let staged = if nar.path.parent() == Some(self.root.join("nar").as_path()) {
                nar.path.to_owned()
            } else {
                let tmp = temp_name(&self.root.join("nar"));
                copy_synced(nar.path, &tmp)?;
                tmp
            };
            if let Err(e) = std::fs::rename(&staged, &nar_path) {
                // Another writer's rename of the same NAR may have won (#22): its file has the same name, so the
                // same bytes.
                let theirs = std::fs::metadata(&nar_path).is_ok_and(|m| m.len() == nar.size);
                if !theirs {
                    return Err(Error::io(&nar_path, e));
                }
                if staged != nar.path {
                    let _ = std::fs::remove_file(&staged);
                }
            }
            sync_dir(&self.root.join("nar"))?;
        }
        Ok(())
    }

    /// Runs blocking file work off the runtime's workers.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&FileBackend) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let backend = self.clone();
        tokio::task::spawn_blocking(move || work(&backend))
            .await
            .map_err(|e| Error::Config(format!("file task failed: {e}")))?
    }
}

impl Backend for FileBackend {
    async fn prepare(&self) -> Result<TargetInfo, Error> {
        self.prepare_blocking()
    }

    async fn missing(&self, paths: &[StorePath]) -> Result<Vec<StorePath>, Error> {
        Ok(paths
            .iter()
            .filter(|p| !self.narinfo_path(p).exists())
            .cloned()
            .collect())
    }

    async fn upload_when(&self, upload: NarUpload<'_>, mut gate: NarinfoGate) -> Result<(), Error> {
        let NarUpload { narinfo, nar } = upload;
        let info = narinfo.clone();
        let nar_path = nar.path.to_owned();
        let (size, sha256) = (nar.size, nar.sha256);
        self.blocking(move |backend| {
            let nar = NarFile {
                path: &nar_path,
                size,
                sha256,
            };
            backend.store_nar_blocking(&info, nar)
        })
        .await?;
        gate.nar_stored().await?;
        let (path, text) = (
            self.narinfo_path(&narinfo.store_path),
            narinfo.render().into_bytes(),
        );
        self.blocking(move |_| write_atomically(&path, &text)).await
    }

    fn staging_dir(&self) -> Option<PathBuf> {
        Some(self.root.join("nar"))
    }

    async fn put_document(&self, document: DocumentBytes) -> Result<(), Error> {
        let (path, bytes) = (self.root.join(&document.key), document.bytes);
        self.blocking(move |_| {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            write_atomically(&path, &bytes)
        })
        .await
    }

    async fn get_document(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let path = self.root.join(key);
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }
}

/// A fresh temporary file name in `dir`.
fn temp_name(dir: &Path) -> PathBuf {
    dir.join(format!("{TMP_PREFIX}{:016x}", rand::random::<u64>()))
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = temp_name(dir);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir(dir)
}

fn copy_synced(from: &Path, to: &Path) -> Result<(), Error> {
    std::fs::copy(from, to).map_err(|e| Error::io(to, e))?;
    sync_file(to)
}

fn sync_file(path: &Path) -> Result<(), Error> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Removes temporaries left by a crash. Only old ones: a young one may belong to an upload in progress.
/// Best effort: a leftover file wastes space but breaks nothing.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    // The name first: the directory holds every narinfo or NAR of the cache, and only temporaries need a stat.
    for entry in entries.flatten().filter(|e| {
        e.file_name()
            .as_encoded_bytes()
            .starts_with(TMP_PREFIX.as_bytes())
    }) {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_backend(dir: &Path) -> FileBackend {
        let url = format!("file://{}", dir.display());
        let config = Config::parse(
            &format!("[target]\nurl = \"{url}\"\n"),
            Path::new("test.toml"),
        )
        .unwrap();
        FileBackend::new(&url, &config).unwrap()
    }

    /// A temporary named as ours, last modified `age` ago.
    fn temporary(dir: &Path, name: &str, age: Duration) -> PathBuf {
        let path = dir.join(format!("{TMP_PREFIX}{name}"));
        let file = std::fs::File::create(&path).unwrap();
        file.set_modified(std::time::SystemTime::now() - age)
            .unwrap();
        path
    }

    #[test]
    fn readying_the_cache_removes_only_stale_temporaries_and_sweeps_once_in_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let backend = file_backend(dir.path());
        backend.prepare_blocking().unwrap();
        let nar_dir = dir.path().join("nar");
        let stale = temporary(&nar_dir, "stale", STALE_AFTER * 2);
        let young = temporary(&nar_dir, "young", Duration::from_secs(5));
        let foreign = nar_dir.join("old-but-not-ours");
        std::fs::File::create(&foreign)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - STALE_AFTER * 2)
            .unwrap();

        // Swept at the first readying already: the next one soon after leaves even a stale temporary alone.
        backend.prepare_blocking().unwrap();
        assert!(stale.exists() && young.exists() && foreign.exists());

        // A fresh backend (a restarted daemon) sweeps at once.
        let restarted = file_backend(dir.path());
        let in_root = temporary(dir.path(), "root", STALE_AFTER * 2);
        restarted.prepare_blocking().unwrap();
        assert!(
            !stale.exists() && !in_root.exists(),
            "stale temporaries left"
        );
        assert!(young.exists(), "an upload in progress lost its file");
        assert!(foreign.exists(), "a file that is not ours was removed");
    }

    #[test]
    fn a_sweep_is_due_again_after_its_interval() {
        let dir = tempfile::tempdir().unwrap();
        let backend = file_backend(dir.path());
        assert!(backend.sweep_due());
        assert!(!backend.clone().sweep_due(), "clones share the sweep time");
        *backend.swept_at.lock().unwrap() = Some(Instant::now() - SWEEP_EVERY);
        assert!(backend.sweep_due());
    }
}
