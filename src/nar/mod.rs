//! NAR (Nix ARchive): a streaming writer byte-identical to `nix-store --dump`, and (in [`reader`]) a validating
//! parser that can also restore a tree.
//!
//! A NAR is a sequence of strings, each an 8-byte little-endian length, the bytes, and zero padding to a multiple
//! of 8. A file `hello\n` serializes as the strings
//!
//! ```text
//! "nix-archive-1" "(" "type" "regular" "contents" "hello\n" ")"
//! ```
//!
//! (120 bytes); an executable adds `"executable" ""` before `"contents"`, a symlink is
//! `"(" "type" "symlink" "target" <target> ")"`, and a directory is `"(" "type" "directory"` followed by
//! `"entry" "(" "name" <name> "node" <node> ")"` per entry, sorted by the raw bytes of the name, then `")"`.
//! Only the owner-execute bit is recorded; times, owners and other permission bits are not.
//!
//! The writer walks the tree with `lstat`, never follows symlinks, and streams file contents through one fixed
//! buffer, so memory stays constant whatever the file sizes; directory nesting is handled with an explicit
//! stack, not recursion. File names are raw bytes (`OsStr`), not UTF-8.
//!
//! Written here rather than taken from the `nix-nar` crate, which only handles UTF-8 file names.

pub mod listing;
pub mod reader;

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::hash::{HashingWriter, Sha256Hash};
use crate::store_path::StorePath;

pub use reader::{restore, validate, NarStats};

/// The magic string every NAR starts with.
pub const MAGIC: &str = "nix-archive-1";
/// Longest entry name the reader accepts (Linux's `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target the reader accepts (Linux's `PATH_MAX`).
pub const MAX_TARGET_LEN: usize = 4096;

/// Size of the buffer file contents are streamed through.
const COPY_BUFFER_BYTES: usize = 128 * 1024;
/// Output buffer for the many small framing strings.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// What went wrong while writing, reading or checking a NAR.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An entry of the tree being serialized could not be read.
    #[error("cannot read {path}: {source}")]
    ReadEntry {
        /// The entry.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A socket, FIFO or device node: NARs cannot hold them.
    #[error("file '{path}' has an unsupported type ({kind})")]
    UnsupportedType {
        /// The entry.
        path: PathBuf,
        /// `socket`, `fifo`, `block device` or `character device`.
        kind: &'static str,
    },
    /// A file grew or shrank between `lstat` and reading it, so its length prefix would be wrong.
    #[error("file '{path}' changed size while being serialized ({expected} bytes when listed, {read} read)")]
    SizeChanged {
        /// The file.
        path: PathBuf,
        /// The size `lstat` reported and the NAR announced.
        expected: u64,
        /// How many bytes were actually there (at least this many, if it grew).
        read: u64,
    },
    /// The NAR could not be written to the output.
    #[error("cannot write NAR: {0}")]
    Write(#[source] io::Error),
    /// Reading the NAR stream failed.
    #[error("cannot read NAR at byte {offset}: {source}")]
    Read {
        /// Bytes of NAR consumed before the failure.
        offset: u64,
        /// What the reader said.
        source: io::Error,
    },
    /// The NAR ended early.
    #[error("NAR is truncated: unexpected end of input at byte {offset}")]
    Truncated {
        /// Bytes of NAR consumed before the end.
        offset: u64,
    },
    /// The NAR is not well-formed or not canonical.
    #[error("invalid NAR at byte {offset}: {reason}")]
    Malformed {
        /// Byte offset of the offending string.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Restoring an entry failed.
    #[error("cannot restore {path}: {source}")]
    Restore {
        /// The entry being created.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The NAR nixpush computed for a store path does not match what Nix recorded: the path was modified after
    /// it was registered. It must not be uploaded.
    #[error(
        "store path {path} is corrupt: Nix recorded NarHash {recorded} ({recorded_size} bytes), \
         its contents hash to {computed} ({computed_size} bytes)"
    )]
    Corrupt {
        /// The store path.
        path: StorePath,
        /// The hash in Nix's database.
        recorded: Sha256Hash,
        /// The hash of the NAR just computed.
        computed: Sha256Hash,
        /// The NAR size in Nix's database.
        recorded_size: u64,
        /// The size of the NAR just computed.
        computed_size: u64,
    },
}

/// Compares a NAR hash and size computed from the bytes with the ones Nix recorded for `path`.
pub fn check_recorded(
    path: &StorePath,
    recorded: (Sha256Hash, u64),
    computed: (Sha256Hash, u64),
) -> Result<(), Error> {
    if recorded == computed {
        return Ok(());
    }
    Err(Error::Corrupt {
        path: path.clone(),
        recorded: recorded.0,
        computed: computed.0,
        recorded_size: recorded.1,
        computed_size: computed.1,
    })
}

/// Writes the NAR of `path` (any file, symlink or directory; the top level is not followed if it is a symlink)
/// to `out`, exactly as `nix-store --dump` would, and returns the number of bytes written.
pub fn dump(path: &Path, out: &mut dyn Write) -> Result<u64, Error> {
    let mut writer = NarWriter {
        out: BufWriter::with_capacity(
            WRITE_BUFFER_BYTES,
            CountingWriter {
                inner: out,
                count: 0,
            },
        ),
        buf: vec![0u8; COPY_BUFFER_BYTES],
    };
    writer.write_tree(path)?;
    writer.out.flush().map_err(Error::Write)?;
    Ok(writer.out.get_ref().count)
}

/// The NAR hash and size of `path`, computed without writing the NAR anywhere.
pub fn dump_hash(path: &Path) -> Result<(Sha256Hash, u64), Error> {
    let mut hasher = HashingWriter::new(io::sink());
    dump(path, &mut hasher)?;
    let (_, hash, size) = hasher.finish();
    Ok((hash, size))
}

struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    count: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What `lstat` says an entry is, for the cases a NAR can hold.
enum Node {
    Regular { executable: bool, size: u64 },
    Symlink,
    Directory,
}

fn classify(path: &Path) -> Result<Node, Error> {
    let meta = fs::symlink_metadata(path).map_err(|source| Error::ReadEntry {
        path: path.to_owned(),
        source,
    })?;
    let ft = meta.file_type();
    if ft.is_file() {
        Ok(Node::Regular {
            executable: meta.permissions().mode() & 0o100 != 0,
            size: meta.len(),
        })
    } else if ft.is_symlink() {
        Ok(Node::Symlink)
    } else if ft.is_dir() {
        Ok(Node::Directory)
    } else {
        let kind = if ft.is_socket() {
            "socket"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_block_device() {
            "block device"
        } else if ft.is_char_device() {
            "character device"
        } else {
            "unknown"
        };
        Err(Error::UnsupportedType {
            path: path.to_owned(),
            kind,
        })
    }
}

/// A directory whose entries are being written.
struct OpenDirectory {
    path: PathBuf,
    remaining: std::vec::IntoIter<OsString>,
}

struct NarWriter<'a> {
    out: BufWriter<CountingWriter<'a>>,
    buf: Vec<u8>,
}

impl NarWriter<'_> {
    fn write_tree(&mut self, root: &Path) -> Result<(), Error> {
        self.str(MAGIC.as_bytes())?;
        let mut stack: Vec<OpenDirectory> = Vec::new();
        if let Some(dir) = self.node(root)? {
            stack.push(dir);
        }
        while let Some(top) = stack.last_mut() {
            match top.remaining.next() {
                Some(name) => {
                    let child = top.path.join(&name);
                    self.strs(&[b"entry", b"(", b"name", name.as_bytes(), b"node"])?;
                    match self.node(&child)? {
                        Some(dir) => stack.push(dir),
                        None => self.str(b")")?,
                    }
                }
                None => {
                    stack.pop();
                    // Close the directory node, then (unless it was the root) the entry holding it.
                    self.str(b")")?;
                    if !stack.is_empty() {
                        self.str(b")")?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes a file or symlink node completely. For a directory, writes its opening and returns its sorted
    /// entries for the caller to walk.
    fn node(&mut self, path: &Path) -> Result<Option<OpenDirectory>, Error> {
        match classify(path)? {
            Node::Regular { executable, size } => {
                self.strs(&[b"(", b"type", b"regular"])?;
                if executable {
                    self.strs(&[b"executable", b""])?;
                }
                self.str(b"contents")?;
                self.contents(path, size)?;
                self.str(b")")?;
                Ok(None)
            }
            Node::Symlink => {
                let target = fs::read_link(path).map_err(|source| Error::ReadEntry {
                    path: path.to_owned(),
                    source,
                })?;
                self.strs(&[
                    b"(",
                    b"type",
                    b"symlink",
                    b"target",
                    target.as_os_str().as_bytes(),
                    b")",
                ])?;
                Ok(None)
            }
            Node::Directory => {
                let read_error = |source| Error::ReadEntry {
                    path: path.to_owned(),
                    source,
                };
                let mut names = fs::read_dir(path)
                    .map_err(read_error)?
                    .map(|entry| entry.map(|e| e.file_name()))
                    .collect::<Result<Vec<OsString>, io::Error>>()
                    .map_err(read_error)?;
                names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
                self.strs(&[b"(", b"type", b"directory"])?;
                Ok(Some(OpenDirectory {
                    path: path.to_owned(),
                    remaining: names.into_iter(),
                }))
            }
        }
    }

    /// Streams a file's `size` bytes (as announced by `lstat`) as one NAR string.
    fn contents(&mut self, path: &Path, size: u64) -> Result<(), Error> {
        let read_error = |source| Error::ReadEntry {
            path: path.to_owned(),
            source,
        };
        // O_NOFOLLOW: if the file was swapped for a symlink since lstat, fail instead of following it.
        let mut file = File::options()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(path)
            .map_err(read_error)?;
        self.out
            .write_all(&size.to_le_bytes())
            .map_err(Error::Write)?;
        let mut done: u64 = 0;
        while done < size {
            let want =
                usize::try_from(size - done).map_or(self.buf.len(), |r| r.min(self.buf.len()));
            let n = read_retrying(&mut file, &mut self.buf[..want]).map_err(read_error)?;
            if n == 0 {
                return Err(Error::SizeChanged {
                    path: path.to_owned(),
                    expected: size,
                    read: done,
                });
            }
            self.out.write_all(&self.buf[..n]).map_err(Error::Write)?;
            done += n as u64;
        }
        let extra = read_retrying(&mut file, &mut self.buf[..1]).map_err(read_error)?;
        if extra != 0 {
            return Err(Error::SizeChanged {
                path: path.to_owned(),
                expected: size,
                read: size + extra as u64,
            });
        }
        self.padding(size)
    }

    fn str(&mut self, s: &[u8]) -> Result<(), Error> {
        self.out
            .write_all(&(s.len() as u64).to_le_bytes())
            .and_then(|()| self.out.write_all(s))
            .map_err(Error::Write)?;
        self.padding(s.len() as u64)
    }

    fn strs(&mut self, strings: &[&[u8]]) -> Result<(), Error> {
        strings.iter().try_for_each(|s| self.str(s))
    }

    fn padding(&mut self, len: u64) -> Result<(), Error> {
        let pad = padding_len(len);
        self.out.write_all(&[0u8; 8][..pad]).map_err(Error::Write)
    }
}

/// Zero bytes that follow a string of `len` bytes.
pub(crate) fn padding_len(len: u64) -> usize {
    // Always < 8.
    ((8 - len % 8) % 8) as usize
}

fn read_retrying(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A file of `tests/fixtures/vectors`, for the writer's tests and the reader's.
    pub(super) fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/vectors")
                .join(name),
        )
        .unwrap()
    }

    fn nar_of(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        let n = dump(path, &mut out).unwrap();
        assert_eq!(n, out.len() as u64);
        out
    }

    fn write_file(path: &Path, contents: &[u8], mode: u32) {
        std::fs::write(path, contents).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn single_files_match_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let regular = dir.path().join("regular");
        write_file(&regular, b"hello\n", 0o444);
        assert_eq!(nar_of(&regular), fixture("regular.nar"));
        let exe = dir.path().join("exe");
        write_file(&exe, b"#!/bin/sh\necho hi\n", 0o555);
        assert_eq!(nar_of(&exe), fixture("executable.nar"));
        let empty = dir.path().join("empty");
        write_file(&empty, b"", 0o444);
        assert_eq!(nar_of(&empty), fixture("empty.nar"));
        let link = dir.path().join("link");
        symlink("/some/where", &link).unwrap();
        assert_eq!(nar_of(&link), fixture("symlink.nar"));
        let emptydir = dir.path().join("emptydir");
        std::fs::create_dir(&emptydir).unwrap();
        assert_eq!(nar_of(&emptydir), fixture("emptydir.nar"));
    }

    #[test]
    fn tree_matches_vector_with_byte_order() {
        let restored = tempfile::tempdir().unwrap();
        let dest = restored.path().join("t");
        restore(&mut &fixture("tree.nar")[..], &dest).unwrap();
        assert_eq!(nar_of(&dest), fixture("tree.nar"));
        // Modes other than owner-exec and mtimes are not recorded.
        std::fs::set_permissions(dest.join("a"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(nar_of(&dest), fixture("tree.nar"));
    }

    #[test]
    fn owner_exec_bit_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        for (mode, exec) in [
            (0o744, true),
            (0o100, true),
            (0o644, false),
            (0o654, false),
            (0o645, false),
            (0o010, false),
            (0o001, false),
            (0o400, false),
        ] {
            write_file(&f, b"x", 0o644);
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let nar = nar_of(&f);
            assert_eq!(
                nar.windows(10).any(|w| w == b"executable"),
                exec,
                "mode {mode:o}"
            );
        }
    }

    #[test]
    fn special_files_and_unreadable_entries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("sub/my-fifo");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let err = dump(&dir.path().join("sub"), &mut io::sink()).unwrap_err();
        assert!(matches!(err, Error::UnsupportedType { kind: "fifo", .. }));
        assert!(err.to_string().contains("my-fifo"), "{err}");
        let err = dump(&dir.path().join("missing"), &mut io::sink()).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn non_utf8_names_sort_as_bytes() {
        use std::ffi::OsStr;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        std::fs::create_dir(&root).unwrap();
        for name in [&b"\xff"[..], b"a", b"\xc3\xa9", b"B"] {
            write_file(&root.join(OsStr::from_bytes(name)), name, 0o644);
        }
        let nar = nar_of(&root);
        let pos = |needle: &[u8]| {
            let mut framed = (needle.len() as u64).to_le_bytes().to_vec();
            framed.extend_from_slice(needle);
            nar.windows(framed.len()).position(|w| w == framed).unwrap()
        };
        assert!(pos(b"B") < pos(b"a"));
        assert!(pos(b"a") < pos(b"\xc3\xa9"));
        assert!(pos(b"\xc3\xa9") < pos(b"\xff"));
        let stats = validate(&mut &nar[..]).unwrap();
        assert_eq!(stats.regular_files, 4);
    }

    #[test]
    fn output_errors_are_write_errors() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "closed"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        write_file(&f, &vec![7u8; 300_000], 0o644);
        assert!(matches!(dump(&f, &mut Broken), Err(Error::Write(_))));
    }

    #[test]
    fn hash_and_corruption_check() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        write_file(&f, b"hello\n", 0o444);
        let (hash, size) = dump_hash(&f).unwrap();
        assert_eq!(size, 120);
        assert_eq!(
            hash.to_base32(),
            "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
        );
        let p = StorePath::parse(
            "/nix/store/5gnj0y388labni6sfyda6isvycfvxmmg-vec-regular",
            "/nix/store",
        )
        .unwrap();
        assert!(check_recorded(&p, (hash, size), (hash, size)).is_ok());
        let other = Sha256Hash::of(b"x");
        let msg = check_recorded(&p, (hash, size), (other, size))
            .unwrap_err()
            .to_string();
        assert!(msg.contains(&hash.to_string()) && msg.contains(&other.to_string()));
        assert!(msg.contains("vec-regular"));
    }
}
