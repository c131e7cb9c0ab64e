//! One store path to one compressed NAR file, streamed: NAR → SHA-256 → compressor → SHA-256 → file.
//!
//! Nothing is held whole in memory: the NAR writer streams file contents through fixed buffers, and the
//! compressed bytes go straight to a temporary file (in the backend's staging directory when it has one, so a
//! `file://` cache renames instead of copying). The file name of a NAR in a cache depends on the hash of the
//! compressed bytes, known only at the end, which is why the bytes land in a file rather than going out directly.
//! The NAR listing, when wanted, is built from the same stream as it passes ([`crate::nar::listing`]).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::backend::rate::RateLimiter;
use crate::backend::wire::{Meter, MeteredWriter};
use crate::config::Compression;
use crate::hash::{HashingWriter, Sha256Hash};
use crate::nar;
use crate::nar::listing::ListingWriter;
use crate::store_path::StorePath;

/// Prefix of temporary NAR files; backends clean up stale ones with it.
pub const TEMP_PREFIX: &str = ".nixpush-tmp-";

/// Why a NAR could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Serialising the store path failed (unreadable entry, unsupported file type, vanished file).
    #[error("cannot serialise {path}: {source}")]
    Nar {
        /// The store path.
        path: StorePath,
        /// What went wrong.
        source: Box<nar::Error>,
    },
    /// The NAR listing could not be built from the stream (a bug: the stream comes from our own NAR writer).
    #[error("cannot build the NAR listing of {path}: {reason}")]
    Listing {
        /// The store path.
        path: StorePath,
        /// What was wrong with the stream.
        reason: String,
    },
    /// Writing the temporary file failed (disk full, read-only).
    #[error("cannot write temporary NAR file {file}: {source}")]
    Temp {
        /// The temporary file.
        file: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

/// A compressed NAR in a temporary file, removed on drop unless [`PreparedNar::keep`] is called.
#[derive(Debug)]
pub struct PreparedNar {
    /// The temporary file.
    pub file: PathBuf,
    /// SHA-256 of the uncompressed NAR (`NarHash`).
    pub nar_hash: Sha256Hash,
    /// Uncompressed NAR size (`NarSize`).
    pub nar_size: u64,
    /// SHA-256 of the file (`FileHash`).
    pub file_hash: Sha256Hash,
    /// Size of the file (`FileSize`).
    pub file_size: u64,
    /// The NAR listing (`<hash>.ls`), when asked for.
    pub listing: Option<String>,
    keep: bool,
}

impl PreparedNar {
    /// Forgets the file without deleting it (a backend renamed it into place).
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for PreparedNar {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.file);
        }
    }
}

/// What watches a preparation as it runs.
pub struct Stages<'a> {
    /// Counts uncompressed NAR bytes as they are produced.
    pub progress: &'a Arc<AtomicU64>,
    /// The target's limiter: once it is aborted, the preparation stops (and its file is removed).
    pub limiter: &'a Arc<RateLimiter>,
    /// Set when the file is written into the cache itself (`file://`): its bytes are then the bytes on the
    /// wire, counted and throttled.
    pub on_the_wire: Option<Meter>,
}

/// Streams `path` as a compressed NAR into a new temporary file in `dir`, building its listing on the way when
/// `listing` is set. Blocking: run it on a blocking thread.
pub fn prepare(
    path: &StorePath,
    compression: Compression,
    level: i32,
    dir: &Path,
    stages: Stages<'_>,
    listing: bool,
) -> Result<PreparedNar, Error> {
    let file_path = dir.join(format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>()));
    let temp_error = |source| Error::Temp {
        file: file_path.clone(),
        source,
    };
    let file = File::create(&file_path).map_err(temp_error)?;
    // From here on, dropping `guard` removes the file on any error.
    let mut guard = PreparedNar {
        file: file_path.clone(),
        nar_hash: Sha256Hash([0; 32]),
        nar_size: 0,
        file_hash: Sha256Hash([0; 32]),
        file_size: 0,
        listing: None,
        keep: false,
    };
    let file_hasher = HashingWriter::new(BufWriter::with_capacity(
        256 * 1024,
        match stages.on_the_wire {
            Some(meter) => Destination::Wire(MeteredWriter::new(file, meter)),
            None => Destination::Local(file),
        },
    ));
    let compressor = Compressor::new(compression, level, file_hasher).map_err(temp_error)?;
    let mut nar_hasher = HashingWriter::new(Counting {
        inner: compressor,
        count: Arc::clone(stages.progress),
        limiter: Arc::clone(stages.limiter),
    });
    let nar_error = |source| match source {
        // The NAR writes into our temporary file: a full disk there is the file's problem, not the path's.
        nar::Error::Write(io) => temp_error(io),
        other => Error::Nar {
            path: path.clone(),
            source: Box::new(other),
        },
    };
    if listing {
        let mut lister = ListingWriter::new(nar_hasher);
        nar::dump(path.as_path(), &mut lister).map_err(nar_error)?;
        let (inner, built) = lister.finish();
        nar_hasher = inner;
        guard.listing = Some(built.map_err(|reason| Error::Listing {
            path: path.clone(),
            reason,
        })?);
    } else {
        nar::dump(path.as_path(), &mut nar_hasher).map_err(nar_error)?;
    }
    let (counting, nar_hash, nar_size) = nar_hasher.finish();
    let file_hasher = counting.inner.finish().map_err(temp_error)?;
    let (buffered, file_hash, file_size) = file_hasher.finish();
    let destination = buffered
        .into_inner()
        .map_err(|e| temp_error(e.into_error()))?;
    destination.file().sync_data().map_err(temp_error)?;
    guard.nar_hash = nar_hash;
    guard.nar_size = nar_size;
    guard.file_hash = file_hash;
    guard.file_size = file_size;
    Ok(guard)
}

/// Counts bytes written through it into a shared counter, for progress reports, and stops once the limiter
/// was aborted.
struct Counting<W> {
    inner: W,
    count: Arc<AtomicU64>,
    limiter: Arc<RateLimiter>,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.limiter.is_aborted() {
            // Not `ErrorKind::Interrupted`: `write_all` would retry that for ever.
            return Err(io::Error::other("upload interrupted"));
        }
        let n = self.inner.write(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The temporary file, written through the wire meter when it lies in the cache.
enum Destination {
    Local(File),
    Wire(MeteredWriter<File>),
}

impl Destination {
    fn file(&self) -> &File {
        match self {
            Destination::Local(file) => file,
            Destination::Wire(writer) => writer.get_ref(),
        }
    }
}

impl Write for Destination {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Destination::Local(file) => file.write(buf),
            Destination::Wire(writer) => writer.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Destination::Local(file) => file.flush(),
            Destination::Wire(writer) => writer.flush(),
        }
    }
}

/// The configured compressor as one `Write`.
enum Compressor<W: Write> {
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Xz(xz2::write::XzEncoder<W>),
    None(W),
}

impl<W: Write> Compressor<W> {
    fn new(compression: Compression, level: i32, inner: W) -> io::Result<Compressor<W>> {
        Ok(match compression {
            Compression::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(inner, level)?;
                // One compression thread per NAR: this thread walks, reads and hashes while zstd compresses,
                // the way `nix-store --dump | zstd` splits the work between two processes.
                encoder.multithread(1)?;
                // Small jobs keep the compression thread's buffers to a few MiB (the default, four windows,
                // tripled the daemon's peak memory for no measurable gain at level 3).
                encoder.set_parameter(zstd::stream::raw::CParameter::JobSize(1 << 20))?;
                Compressor::Zstd(encoder)
            }
            Compression::Xz => {
                Compressor::Xz(xz2::write::XzEncoder::new(inner, level.clamp(0, 9) as u32))
            }
            Compression::None => Compressor::None(inner),
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Zstd(encoder) => encoder.finish(),
            Compressor::Xz(encoder) => encoder.finish(),
            Compressor::None(mut inner) => {
                inner.flush()?;
                Ok(inner)
            }
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Zstd(e) => e.write(buf),
            Compressor::Xz(e) => e.write(buf),
            Compressor::None(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Zstd(e) => e.flush(),
            Compressor::Xz(e) => e.flush(),
            Compressor::None(w) => w.flush(),
        }
    }
}
