//! NAR listings (`<hash>.ls`), built from the NAR bytes as they stream past, never from a second read.
//!
//! Nix writes them with `write-nar-listing=true`; tools such as `nix store ls` and hydra's file browser read a
//! path's tree from them without fetching the NAR. The document for a directory holding an executable `file`
//! (9 bytes) and a symlink `link → file`:
//!
//! ```text
//! {"version":1,"root":{"type":"directory","entries":{"file":{"type":"regular","size":9,"executable":true,
//! "narOffset":264},"link":{"type":"symlink","target":"file"}}}}
//! ```
//!
//! `narOffset` is where the file's contents start in the uncompressed NAR. [`ListingWriter`] sits between the NAR
//! writer and the rest of the pipeline, passes every byte on, and tokenises the stream as it goes: small strings
//! (names, targets, keywords) are buffered, file contents are only counted. Entries come in the NAR's sorted order,
//! which is also the order Nix's JSON objects use, so the JSON is written as the tokens arrive, the same bytes Nix
//! writes, and the nesting depth needs no recursion.

use std::io::{self, Write};

/// Longest non-contents string accepted (names and symlink targets are far shorter).
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// Passes bytes through to `inner` while building the NAR listing of the stream.
pub struct ListingWriter<W> {
    inner: W,
    parser: Parser,
}

impl<W: Write> ListingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> ListingWriter<W> {
        ListingWriter {
            inner,
            parser: Parser::default(),
        }
    }

    /// The inner writer and the listing, or why the stream was not a complete NAR.
    pub fn finish(self) -> (W, Result<String, String>) {
        (self.inner, self.parser.finish())
    }
}

impl<W: Write> Write for ListingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.parser.feed(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Where the tokeniser is within the current string.
#[derive(Debug)]
enum Lex {
    /// Reading an 8-byte length.
    Length { buf: [u8; 8], have: usize },
    /// Reading a small string of `len` bytes.
    Token { len: usize, buf: Vec<u8> },
    /// Skipping file contents or padding.
    Skip { remaining: u64 },
}

/// What the grammar expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Magic,
    Open,
    TypeKeyword,
    Type,
    RegularField,
    ExecutableEmpty,
    Contents,
    CloseRegular,
    TargetKeyword,
    Target,
    CloseSymlink,
    DirectoryItem,
    EntryOpen,
    NameKeyword,
    Name,
    NodeKeyword,
    EntryClose,
    Done,
}

#[derive(Debug)]
struct Parser {
    offset: u64,
    lex: Lex,
    /// Padding still to skip after the current token.
    padding_after: u64,
    expect: Expect,
    executable: bool,
    /// One flag per open directory: whether an entry was written yet (for the comma).
    directories: Vec<bool>,
    json: String,
    error: Option<String>,
}

impl Default for Parser {
    fn default() -> Parser {
        Parser {
            offset: 0,
            lex: Lex::Length {
                buf: [0; 8],
                have: 0,
            },
            padding_after: 0,
            expect: Expect::Magic,
            executable: false,
            directories: Vec::new(),
            json: String::new(),
            error: None,
        }
    }
}

impl Parser {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.error.is_none() {
            let used = match &mut self.lex {
                Lex::Length { buf, have } => {
                    let n = (8 - *have).min(bytes.len());
                    buf[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    n
                }
                Lex::Token { len, buf } => {
                    let n = (*len - buf.len()).min(bytes.len());
                    buf.extend_from_slice(&bytes[..n]);
                    n
                }
                Lex::Skip { remaining } => {
                    let n = (*remaining).min(bytes.len() as u64);
                    *remaining -= n;
                    n as usize
                }
            };
            self.offset += used as u64;
            bytes = &bytes[used..];
            self.advance();
        }
    }

    /// Moves on when the current piece is complete.
    fn advance(&mut self) {
        match &mut self.lex {
            Lex::Length { buf, have: 8 } => {
                let len = u64::from_le_bytes(*buf);
                let padding = (8 - len % 8) % 8;
                if self.expect == Expect::Contents {
                    // The contents start here: this is `narOffset`.
                    self.regular(len);
                    self.expect = Expect::CloseRegular;
                    self.lex = Lex::Skip {
                        remaining: len + padding,
                    };
                } else if len > MAX_TOKEN_BYTES {
                    self.error = Some(format!("a {len}-byte string where a name was expected"));
                } else {
                    self.padding_after = padding;
                    self.lex = Lex::Token {
                        len: len as usize,
                        buf: Vec::with_capacity(len as usize),
                    };
                    // An empty string is complete at once.
                    self.advance();
                }
            }
            Lex::Token { len, buf } if buf.len() == *len => {
                let token = std::mem::take(buf);
                self.lex = Lex::Skip {
                    remaining: self.padding_after,
                };
                self.token(&token);
            }
            Lex::Skip { remaining: 0 } => {
                self.lex = Lex::Length {
                    buf: [0; 8],
                    have: 0,
                };
            }
            Lex::Length { .. } | Lex::Token { .. } | Lex::Skip { .. } => {}
        }
    }

    fn token(&mut self, token: &[u8]) {
        let expect = self.expect;
        let next = match (expect, token) {
            (Expect::Magic, b"nix-archive-1") => {
                self.json.push_str("{\"version\":1,\"root\":");
                Expect::Open
            }
            (Expect::Open, b"(") => Expect::TypeKeyword,
            (Expect::TypeKeyword, b"type") => Expect::Type,
            (Expect::Type, b"regular") => {
                self.executable = false;
                Expect::RegularField
            }
            (Expect::Type, b"symlink") => Expect::TargetKeyword,
            (Expect::Type, b"directory") => {
                self.json.push_str("{\"type\":\"directory\",\"entries\":{");
                self.directories.push(false);
                Expect::DirectoryItem
            }
            (Expect::RegularField, b"executable") => Expect::ExecutableEmpty,
            (Expect::RegularField, b"contents") => Expect::Contents,
            (Expect::ExecutableEmpty, b"") => {
                self.executable = true;
                Expect::RegularField
            }
            (Expect::CloseRegular | Expect::CloseSymlink, b")") => self.node_done(),
            (Expect::TargetKeyword, b"target") => Expect::Target,
            (Expect::Target, target) => {
                self.json.push_str("{\"type\":\"symlink\",\"target\":");
                self.json.push_str(&json_string(target));
                self.json.push('}');
                Expect::CloseSymlink
            }
            (Expect::DirectoryItem, b"entry") => Expect::EntryOpen,
            (Expect::DirectoryItem, b")") => {
                self.directories.pop();
                self.json.push_str("}}");
                self.node_done()
            }
            (Expect::EntryOpen, b"(") => Expect::NameKeyword,
            (Expect::NameKeyword, b"name") => Expect::Name,
            (Expect::Name, name) => {
                if let Some(written) = self.directories.last_mut() {
                    if *written {
                        self.json.push(',');
                    }
                    *written = true;
                }
                self.json.push_str(&json_string(name));
                self.json.push(':');
                Expect::NodeKeyword
            }
            (Expect::NodeKeyword, b"node") => Expect::Open,
            (Expect::EntryClose, b")") => Expect::DirectoryItem,
            (_, token) => {
                self.error = Some(format!(
                    "unexpected {:?} at NAR offset {} (expected {expect:?})",
                    String::from_utf8_lossy(token),
                    self.offset
                ));
                expect
            }
        };
        self.expect = next;
    }

    fn regular(&mut self, size: u64) {
        self.json
            .push_str(&format!("{{\"type\":\"regular\",\"size\":{size}"));
        if self.executable {
            self.json.push_str(",\"executable\":true");
        }
        self.json
            .push_str(&format!(",\"narOffset\":{}}}", self.offset));
    }

    /// A node closed: either an entry of the enclosing directory ends next, or the NAR does.
    fn node_done(&mut self) -> Expect {
        if self.directories.is_empty() {
            self.json.push('}');
            Expect::Done
        } else {
            Expect::EntryClose
        }
    }

    fn finish(self) -> Result<String, String> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if self.expect != Expect::Done {
            return Err(format!(
                "the NAR ended early, at offset {} (expected {:?})",
                self.offset, self.expect
            ));
        }
        Ok(self.json)
    }
}

/// A JSON string literal; names that are not UTF-8 are shown with replacement characters, as Nix's JSON has no
/// way to carry raw bytes either.
fn json_string(bytes: &[u8]) -> String {
    serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn listing_of(path: &std::path::Path, chunk: usize) -> String {
        let mut nar = Vec::new();
        crate::nar::dump(path, &mut nar).unwrap();
        let mut writer = ListingWriter::new(Vec::new());
        for piece in nar.chunks(chunk) {
            writer.write_all(piece).unwrap();
        }
        let (copy, listing) = writer.finish();
        assert_eq!(copy, nar, "bytes pass through unchanged");
        listing.unwrap()
    }

    #[test]
    fn matches_what_nix_wrote_for_the_same_tree() {
        // `nix copy --to 'file://…?write-nar-listing=true'` of this tree wrote exactly this document.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("file"), "exp12345\n").unwrap();
        std::fs::set_permissions(root.join("file"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::os::unix::fs::symlink("file", root.join("link")).unwrap();
        std::fs::write(root.join("sub/empty"), "").unwrap();
        let expected = "{\"version\":1,\"root\":{\"type\":\"directory\",\"entries\":{\"file\":{\"type\":\"regular\",\
                        \"size\":9,\"executable\":true,\"narOffset\":264},\"link\":{\"type\":\"symlink\",\"target\":\
                        \"file\"},\"sub\":{\"type\":\"directory\",\"entries\":{\"empty\":{\"type\":\"regular\",\
                        \"size\":0,\"narOffset\":792}}}}}}";
        for chunk in [1, 3, 8, 100, 1 << 20] {
            assert_eq!(listing_of(&root, chunk), expected, "chunk {chunk}");
        }
    }

    #[test]
    fn single_file_and_truncated_stream() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, vec![7u8; 51]).unwrap();
        assert_eq!(
            listing_of(&file, 7),
            "{\"version\":1,\"root\":{\"type\":\"regular\",\"size\":51,\"narOffset\":96}}"
        );
        let mut nar = Vec::new();
        crate::nar::dump(&file, &mut nar).unwrap();
        let mut writer = ListingWriter::new(Vec::new());
        writer.write_all(&nar[..nar.len() - 8]).unwrap();
        assert!(writer.finish().1.unwrap_err().contains("ended early"));
    }
}
