//! A validating NAR parser: checks a stream against the grammar in [`super`], hashing it as it goes, and can
//! restore it to disk.
//!
//! Only canonical NARs (what `nix-store --dump` writes) are accepted: `executable` before `contents`, entries
//! sorted by raw bytes with no duplicates, names that are single path components (not empty, `.`, `..`, no `/`
//! or NUL, at most 255 bytes), non-empty symlink targets of at most 4096 bytes, zero padding, and nothing after
//! the final `)`. File contents are streamed through a fixed buffer and nesting is tracked with an explicit stack
//! (capped at [`MAX_DEPTH`]), so memory stays bounded and hostile input cannot overflow the call stack.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::{padding_len, Error, MAGIC, MAX_NAME_LEN, MAX_TARGET_LEN};
use crate::hash::{HashingReader, Sha256Hash};

/// Deepest directory nesting accepted. Far beyond anything a real store path holds (Linux cannot even name a path
/// that deep with `PATH_MAX` = 4096), low enough to bound memory.
pub const MAX_DEPTH: usize = 2048;

/// Longest framing token (`directory`, `executable`, …) plus slack for a readable error.
const MAX_TOKEN_LEN: usize = 16;
const COPY_BUFFER_BYTES: usize = 128 * 1024;

/// What a valid NAR contained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarStats {
    /// Total size in bytes (the narinfo `NarSize`).
    pub nar_size: u64,
    /// SHA-256 of the whole stream (the narinfo `NarHash`).
    pub nar_hash: Sha256Hash,
    /// Regular files, executable or not.
    pub regular_files: u64,
    /// Regular files with the executable marker.
    pub executables: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Directories, including the root if it is one.
    pub directories: u64,
    /// Sum of all file contents.
    pub contents_bytes: u64,
}

/// Parses and validates a whole NAR from `r`, reading to the end to make sure nothing follows it.
pub fn validate(r: &mut dyn Read) -> Result<NarStats, Error> {
    parse(r, &mut NoSink)
}

/// Unpacks the NAR from `r` at `dest`, which must not exist yet. Executable files get mode 0777 and others 0666,
/// both minus the umask, as `nix-store --restore` does. On error, whatever was created so far is left in place.
pub fn restore(r: &mut dyn Read, dest: &Path) -> Result<(), Error> {
    parse(
        r,
        &mut RestoreSink {
            dest: dest.to_owned(),
            file: None,
        },
    )
    .map(|_| ())
}

/// Receives the tree as it is parsed. `path` is the entry's components below the root (empty for the root).
trait Sink {
    fn directory(&mut self, path: &[Vec<u8>]) -> Result<(), Error>;
    fn begin_file(&mut self, path: &[Vec<u8>], executable: bool) -> Result<(), Error>;
    fn file_data(&mut self, data: &[u8]) -> Result<(), Error>;
    fn end_file(&mut self) -> Result<(), Error>;
    fn symlink(&mut self, path: &[Vec<u8>], target: &[u8]) -> Result<(), Error>;
}

struct NoSink;

impl Sink for NoSink {
    fn directory(&mut self, _: &[Vec<u8>]) -> Result<(), Error> {
        Ok(())
    }
    fn begin_file(&mut self, _: &[Vec<u8>], _: bool) -> Result<(), Error> {
        Ok(())
    }
    fn file_data(&mut self, _: &[u8]) -> Result<(), Error> {
        Ok(())
    }
    fn end_file(&mut self) -> Result<(), Error> {
        Ok(())
    }
    fn symlink(&mut self, _: &[Vec<u8>], _: &[u8]) -> Result<(), Error> {
        Ok(())
    }
}

struct RestoreSink {
    dest: PathBuf,
    file: Option<(PathBuf, File)>,
}

impl RestoreSink {
    fn full_path(&self, path: &[Vec<u8>]) -> PathBuf {
        let mut full = self.dest.clone();
        for component in path {
            full.push(OsStr::from_bytes(component));
        }
        full
    }
}

fn restore_error(path: PathBuf) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Restore { path, source }
}

impl Sink for RestoreSink {
    fn directory(&mut self, path: &[Vec<u8>]) -> Result<(), Error> {
        let full = self.full_path(path);
        std::fs::create_dir(&full).map_err(restore_error(full))
    }

    fn begin_file(&mut self, path: &[Vec<u8>], executable: bool) -> Result<(), Error> {
        let full = self.full_path(path);
        // create_new: never write through an existing file or symlink.
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(if executable { 0o777 } else { 0o666 })
            .open(&full)
            .map_err(restore_error(full.clone()))?;
        self.file = Some((full, file));
        Ok(())
    }

    fn file_data(&mut self, data: &[u8]) -> Result<(), Error> {
        if let Some((path, file)) = &mut self.file {
            file.write_all(data).map_err(restore_error(path.clone()))?;
        }
        Ok(())
    }

    fn end_file(&mut self) -> Result<(), Error> {
        self.file = None;
        Ok(())
    }

    fn symlink(&mut self, path: &[Vec<u8>], target: &[u8]) -> Result<(), Error> {
        let full = self.full_path(path);
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &full).map_err(restore_error(full))
    }
}

struct Parser<'r> {
    input: HashingReader<BufReader<&'r mut dyn Read>>,
    buf: Vec<u8>,
    stats: NarStats,
}

fn parse(r: &mut dyn Read, sink: &mut dyn Sink) -> Result<NarStats, Error> {
    let mut p = Parser {
        input: HashingReader::new(BufReader::with_capacity(COPY_BUFFER_BYTES, r)),
        buf: vec![0u8; COPY_BUFFER_BYTES],
        stats: NarStats {
            nar_size: 0,
            nar_hash: Sha256Hash([0; 32]),
            regular_files: 0,
            executables: 0,
            symlinks: 0,
            directories: 0,
            contents_bytes: 0,
        },
    };
    p.expect(MAGIC.as_bytes())?;
    // The last entry name seen in each open directory; the names on the stack form the current path.
    let mut dirs: Vec<Vec<u8>> = Vec::new();
    p.node(&mut dirs, sink)?;
    while !dirs.is_empty() {
        let at = p.offset();
        match p
            .read_string(MAX_TOKEN_LEN, "\"entry\" or \")\"")?
            .as_slice()
        {
            b")" => {
                dirs.pop();
                if !dirs.is_empty() {
                    p.expect(b")")?;
                }
            }
            b"entry" => {
                p.expect(b"(")?;
                p.expect(b"name")?;
                let at_name = p.offset();
                let name = p.read_string(MAX_NAME_LEN, "an entry name")?;
                check_name(&name).map_err(|reason| malformed(at_name, reason))?;
                let previous = dirs
                    .last_mut()
                    .ok_or_else(|| malformed(at, "entry outside a directory"))?;
                if !previous.is_empty() && name.as_slice() <= previous.as_slice() {
                    let reason = if name == *previous {
                        format!("duplicate entry name {:?}", String::from_utf8_lossy(&name))
                    } else {
                        format!(
                            "entry {:?} is not sorted after {:?}",
                            String::from_utf8_lossy(&name),
                            String::from_utf8_lossy(previous)
                        )
                    };
                    return Err(malformed(at_name, reason));
                }
                *previous = name;
                p.expect(b"node")?;
                if !p.node(&mut dirs, sink)? {
                    p.expect(b")")?;
                }
            }
            other => {
                return Err(malformed(
                    at,
                    format!(
                        "expected \"entry\" or \")\" in a directory, found {:?}",
                        String::from_utf8_lossy(other)
                    ),
                ))
            }
        }
    }
    let at_end = p.offset();
    if p.read_some(&mut [0u8; 1])? != 0 {
        return Err(malformed(at_end, "trailing data after the end of the NAR"));
    }
    let Parser {
        input, mut stats, ..
    } = p;
    let (_, hash, size) = input.finish();
    stats.nar_hash = hash;
    stats.nar_size = size;
    Ok(stats)
}

fn malformed(offset: u64, reason: impl Into<String>) -> Error {
    Error::Malformed {
        offset,
        reason: reason.into(),
    }
}

fn check_name(name: &[u8]) -> Result<(), String> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(format!(
            "invalid file name {:?}",
            String::from_utf8_lossy(name)
        ));
    }
    Ok(())
}

impl Parser<'_> {
    fn offset(&self) -> u64 {
        self.input.count()
    }

    /// Parses one node. A file or symlink is consumed completely and `false` returned; for a directory only the
    /// header is consumed, a frame is pushed on `dirs` and `true` returned.
    fn node(&mut self, dirs: &mut Vec<Vec<u8>>, sink: &mut dyn Sink) -> Result<bool, Error> {
        self.expect(b"(")?;
        self.expect(b"type")?;
        let at = self.offset();
        match self.read_string(MAX_TOKEN_LEN, "a node type")?.as_slice() {
            b"regular" => {
                let at_field = self.offset();
                let mut field =
                    self.read_string(MAX_TOKEN_LEN, "\"executable\" or \"contents\"")?;
                let executable = field == b"executable";
                if executable {
                    self.expect(b"")?;
                    field = self.read_string(MAX_TOKEN_LEN, "\"contents\"")?;
                }
                if field != b"contents" {
                    return Err(malformed(
                        at_field,
                        format!(
                            "expected \"executable\" or \"contents\", found {:?}",
                            String::from_utf8_lossy(&field)
                        ),
                    ));
                }
                sink.begin_file(dirs, executable)?;
                let size = self.read_u64()?;
                let mut remaining = size;
                while remaining > 0 {
                    let want = usize::try_from(remaining)
                        .map_or(self.buf.len(), |r| r.min(self.buf.len()));
                    let mut chunk = std::mem::take(&mut self.buf);
                    let filled = self.read_exact(&mut chunk[..want]);
                    let result = filled.and_then(|()| sink.file_data(&chunk[..want]));
                    self.buf = chunk;
                    result?;
                    remaining -= want as u64;
                }
                self.padding(size)?;
                sink.end_file()?;
                self.expect(b")")?;
                self.stats.regular_files += 1;
                self.stats.executables += u64::from(executable);
                self.stats.contents_bytes += size;
                Ok(false)
            }
            b"symlink" => {
                self.expect(b"target")?;
                let at_target = self.offset();
                let target = self.read_string(MAX_TARGET_LEN, "a symlink target")?;
                if target.is_empty() || target.contains(&0) {
                    return Err(malformed(
                        at_target,
                        "symlink target is empty or contains NUL",
                    ));
                }
                sink.symlink(dirs, &target)?;
                self.expect(b")")?;
                self.stats.symlinks += 1;
                Ok(false)
            }
            b"directory" => {
                if dirs.len() >= MAX_DEPTH {
                    return Err(malformed(
                        at,
                        format!("directories nested deeper than {MAX_DEPTH} levels"),
                    ));
                }
                sink.directory(dirs)?;
                dirs.push(Vec::new());
                self.stats.directories += 1;
                Ok(true)
            }
            other => Err(malformed(
                at,
                format!("unknown node type {:?}", String::from_utf8_lossy(other)),
            )),
        }
    }

    /// Reads one string and checks it equals `token`.
    fn expect(&mut self, token: &[u8]) -> Result<(), Error> {
        let at = self.offset();
        let what = format!("{:?}", String::from_utf8_lossy(token));
        let found = self.read_string(MAX_TOKEN_LEN.max(token.len()), &what)?;
        if found != token {
            return Err(malformed(
                at,
                format!(
                    "expected {what}, found {:?}",
                    String::from_utf8_lossy(&found)
                ),
            ));
        }
        Ok(())
    }

    /// Reads a length-prefixed string of at most `max` bytes, with its padding.
    fn read_string(&mut self, max: usize, what: &str) -> Result<Vec<u8>, Error> {
        let at = self.offset();
        let len = self.read_u64()?;
        if len > max as u64 {
            return Err(malformed(
                at,
                format!("expected {what}, found a {len}-byte string (limit {max})"),
            ));
        }
        // len <= max, which is a usize.
        let mut s = vec![0u8; len as usize];
        self.read_exact(&mut s)?;
        self.padding(len)?;
        Ok(s)
    }

    fn read_u64(&mut self) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn padding(&mut self, len: u64) -> Result<(), Error> {
        let at = self.offset();
        let mut pad = [0u8; 8];
        let pad = &mut pad[..padding_len(len)];
        self.read_exact(pad)?;
        if pad.iter().any(|&b| b != 0) {
            return Err(malformed(at, "non-zero padding"));
        }
        Ok(())
    }

    fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<(), Error> {
        while !buf.is_empty() {
            let n = self.read_some(buf)?;
            if n == 0 {
                return Err(Error::Truncated {
                    offset: self.offset(),
                });
            }
            buf = &mut buf[n..];
        }
        Ok(())
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        loop {
            match self.input.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Read {
                        offset: self.offset(),
                        source,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
