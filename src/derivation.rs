//! Derivations (`.drv` files): a complete parser for their ATerm text, used to find a derivation's outputs.
//!
//! A `.drv` is one line (shown wrapped; `vec-top.drv` from the test vectors):
//!
//! ```text
//! Derive([("doc","/nix/store/59sqgcsmssgl7absp1w5vhja26baj5z5-vec-top-doc","",""),
//!         ("out","/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","","")],
//!        [("/nix/store/5zj93d6iiaz2bj9hy068jfbcayc22v0p-vec-dep.drv",["out"])],
//!        [],"x86_64-linux","/bin/sh",["-c","/bin/mkdir $out $doc\n…"],
//!        [("builder","/bin/sh"),("doc","/nix/store/…-vec-top-doc"),…,("system","x86_64-linux")])
//! ```
//!
//! Strings escape `"` and `\` with `\`, and newline, carriage return and tab as `\n`, `\r`, `\t`; arguments and
//! environment values routinely contain `,`, `)` and `"`, so the text is parsed, never split.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use crate::store_path::{self, StorePath};

/// Largest `.drv` [`read`] accepts. Real ones are kilobytes; this only stops a runaway file from eating memory.
pub const MAX_DRV_BYTES: u64 = 64 * 1024 * 1024;

/// Why a derivation could not be read or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read derivation {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_DRV_BYTES`].
    #[error("derivation {path} is larger than {MAX_DRV_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The text is not a derivation.
    #[error("invalid derivation{}: at byte {offset}: expected {expected}, found {found}", in_file(.path))]
    Syntax {
        /// The file, when known.
        path: Option<PathBuf>,
        /// Byte offset of the problem.
        offset: usize,
        /// What the parser wanted.
        expected: String,
        /// What was there (a short excerpt, or "end of input").
        found: String,
    },
    /// An output's path is not a store path.
    #[error("output {output:?} of the derivation has an invalid path: {source}")]
    OutputPath {
        /// The output name.
        output: String,
        /// Why the path was rejected.
        source: store_path::Error,
    },
}

fn in_file(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

/// A parsed derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    /// Outputs by name.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input derivations (full `.drv` paths) and the outputs used from each.
    pub input_drvs: BTreeMap<String, Vec<String>>,
    /// Input sources (full store paths).
    pub input_srcs: Vec<String>,
    /// The system type, e.g. `x86_64-linux`.
    pub system: String,
    /// The builder executable.
    pub builder: String,
    /// The builder's arguments.
    pub args: Vec<String>,
    /// The builder's environment.
    pub env: BTreeMap<String, String>,
}

/// One output of a derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivationOutput {
    /// The output path; empty for (experimental) content-addressed derivations, whose paths are not known in
    /// advance.
    pub path: String,
    /// For fixed-output derivations, the hash algorithm (`sha256`, or `r:sha256` for recursive hashing); else empty.
    pub hash_algo: String,
    /// For fixed-output derivations, the expected hash in hex; else empty.
    pub hash: String,
}

/// Parses the ATerm text of a derivation.
pub fn parse(text: &str) -> Result<Derivation, Error> {
    Parser {
        text: text.as_bytes(),
        pos: 0,
    }
    .derivation()
}

/// Reads and parses a `.drv` file (at most [`MAX_DRV_BYTES`]).
pub fn read(path: &Path) -> Result<Derivation, Error> {
    let read_error = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut text = String::new();
    file.take(MAX_DRV_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    if text.len() as u64 > MAX_DRV_BYTES {
        return Err(Error::TooLarge {
            path: path.to_owned(),
        });
    }
    parse(&text).map_err(|e| match e {
        Error::Syntax {
            offset,
            expected,
            found,
            ..
        } => Error::Syntax {
            path: Some(path.to_owned()),
            offset,
            expected,
            found,
        },
        other => other,
    })
}

impl Derivation {
    /// The output paths, in output-name order. Outputs without a path (content-addressed derivations) are left
    /// out.
    pub fn output_paths(&self, store_dir: &str) -> Result<Vec<StorePath>, Error> {
        self.outputs
            .iter()
            .filter(|(_, out)| !out.path.is_empty())
            .map(|(name, out)| {
                StorePath::parse(&out.path, store_dir).map_err(|source| Error::OutputPath {
                    output: name.clone(),
                    source,
                })
            })
            .collect()
    }
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn derivation(mut self) -> Result<Derivation, Error> {
        self.expect("Derive(")?;
        let mut outputs = BTreeMap::new();
        let at = self.pos;
        for (name, out) in self.list(|p| {
            p.expect("(")?;
            let name = p.string()?;
            p.expect(",")?;
            let path = p.string()?;
            p.expect(",")?;
            let hash_algo = p.string()?;
            p.expect(",")?;
            let hash = p.string()?;
            p.expect(")")?;
            Ok((
                name,
                DerivationOutput {
                    path,
                    hash_algo,
                    hash,
                },
            ))
        })? {
            if outputs.insert(name.clone(), out).is_some() {
                return Err(self.error_at(at, "distinct output names", &format!("{name:?} twice")));
            }
        }
        self.expect(",")?;
        let input_drvs = self
            .list(|p| {
                p.expect("(")?;
                let path = p.string()?;
                p.expect(",")?;
                let outs = p.list(Parser::string)?;
                p.expect(")")?;
                Ok((path, outs))
            })?
            .into_iter()
            .collect();
        self.expect(",")?;
        let input_srcs = self.list(Parser::string)?;
        self.expect(",")?;
        let system = self.string()?;
        self.expect(",")?;
        let builder = self.string()?;
        self.expect(",")?;
        let args = self.list(Parser::string)?;
        self.expect(",")?;
        let env = self
            .list(|p| {
                p.expect("(")?;
                let k = p.string()?;
                p.expect(",")?;
                let v = p.string()?;
                p.expect(")")?;
                Ok((k, v))
            })?
            .into_iter()
            .collect();
        self.expect(")")?;
        // Nix writes no trailing newline, but a copy edited by hand may have one.
        while self.pos < self.text.len() && self.text[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
        if self.pos != self.text.len() {
            return Err(self.error("end of input"));
        }
        Ok(Derivation {
            outputs,
            input_drvs,
            input_srcs,
            system,
            builder,
            args,
            env,
        })
    }

    /// `[item,item,…]`.
    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
        self.expect("[")?;
        let mut items = Vec::new();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(items);
        }
        loop {
            items.push(item(self)?);
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(items);
                }
                _ => return Err(self.error("\",\" or \"]\"")),
            }
        }
    }

    /// A double-quoted string with Nix's escapes.
    fn string(&mut self) -> Result<String, Error> {
        let start = self.pos;
        self.expect("\"")?;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.error("a closing '\"'")),
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => {
                    let escaped = self
                        .text
                        .get(self.pos + 1)
                        .copied()
                        .ok_or_else(|| self.error("an escaped character"))?;
                    out.push(match escaped {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                    self.pos += 2;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        // The input is a &str, and escapes only ever replace ASCII with ASCII, so this cannot fail; keep the
        // check rather than trust it.
        String::from_utf8(out).map_err(|_| self.error_at(start, "a UTF-8 string", "invalid UTF-8"))
    }

    fn expect(&mut self, token: &str) -> Result<(), Error> {
        if self.text[self.pos..].starts_with(token.as_bytes()) {
            self.pos += token.len();
            Ok(())
        } else {
            Err(self.error(&format!("{token:?}")))
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn error(&self, expected: &str) -> Error {
        let rest = &self.text[self.pos..];
        let found = if rest.is_empty() {
            "end of input".to_owned()
        } else {
            let excerpt = String::from_utf8_lossy(&rest[..rest.len().min(24)]);
            format!("{excerpt:?}")
        };
        self.error_at(self.pos, expected, &found)
    }

    fn error_at(&self, offset: usize, expected: &str, found: &str) -> Error {
        Error::Syntax {
            path: None,
            offset,
            expected: expected.to_owned(),
            found: found.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TOP: &str = include_str!("../tests/fixtures/vectors/vec-top.drv");
    const FOD: &str = include_str!("../tests/fixtures/vectors/vec-fod.drv");

    #[test]
    fn parses_two_output_derivation() {
        let drv = parse(TOP).unwrap();
        assert_eq!(
            drv.outputs.keys().collect::<Vec<_>>(),
            [&"doc".to_owned(), &"out".to_owned()]
        );
        let paths = drv.output_paths("/nix/store").unwrap();
        assert_eq!(
            paths.iter().map(StorePath::as_str).collect::<Vec<_>>(),
            [
                "/nix/store/59sqgcsmssgl7absp1w5vhja26baj5z5-vec-top-doc",
                "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top"
            ]
        );
        assert_eq!(drv.system, "x86_64-linux");
        assert_eq!(drv.builder, "/bin/sh");
        assert_eq!(drv.env["outputs"], "out doc");
        assert_eq!(
            drv.input_drvs["/nix/store/5zj93d6iiaz2bj9hy068jfbcayc22v0p-vec-dep.drv"],
            ["out"]
        );
        // The script holds escaped quotes, a literal backslash-n and real newlines.
        assert!(drv.args[1].contains(
            "printf \"dep=/nix/store/8pjibnycdlc071yls0gkbsb7l2ffmlgg-vec-dep\\nself=$out\\n\""
        ));
        assert!(drv.args[1].contains("$doc\nprintf"));
    }

    #[test]
    fn parses_fixed_output() {
        let drv = parse(FOD).unwrap();
        let out = &drv.outputs["out"];
        assert_eq!(out.hash_algo, "sha256");
        assert_eq!(
            out.hash,
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
    }

    #[test]
    fn errors_give_offset_and_expectation() {
        let msg = parse(&TOP[..TOP.len() - 3]).unwrap_err().to_string();
        assert!(msg.contains("at byte"), "{msg}");
        let msg = parse("Derive([(\"out\",\"/nix/store/x\",\"\"]")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("at byte 32") && msg.contains("\",\""), "{msg}");
        assert!(parse(&format!("{TOP}x")).is_err());
        assert!(parse(&format!("{TOP}\n")).is_ok());
        let bad_path = TOP.replace(
            "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top\",\"\"",
            "/tmp/x\",\"\"",
        );
        let msg = parse(&bad_path)
            .unwrap()
            .output_paths("/nix/store")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("\"out\""), "{msg}");
    }

    #[test]
    fn read_names_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.drv");
        std::fs::write(&path, "Derive(").unwrap();
        let msg = read(&path).unwrap_err().to_string();
        assert!(
            msg.contains("x.drv") && msg.contains("end of input"),
            "{msg}"
        );
        std::fs::write(&path, TOP).unwrap();
        assert_eq!(read(&path).unwrap(), parse(TOP).unwrap());
    }

    proptest! {
        #[test]
        fn never_panics_on_mangled_input(cut in 0..TOP.len(), insert in "\\PC{0,3}") {
            let mut text = TOP.to_owned();
            if TOP.is_char_boundary(cut) {
                text.insert_str(cut, &insert);
            }
            let _ = parse(&text);
            let _ = parse(&TOP[..cut]);
        }
    }
}
