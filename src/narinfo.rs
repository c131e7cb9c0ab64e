//! narinfo files: rendering byte-identical to Nix 2.8, strict parsing, fingerprints and their signatures.
//!
//! What `nix copy --to file://…?compression=zstd&secret-key=…` writes for a path with a deriver and references:
//!
//! ```text
//! StorePath: /nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top
//! URL: nar/1a1ks84g8dp32pddydxrxv837qgrqz9bxp9sbfqv249mdkz08k7w.nar.zst
//! Compression: zstd
//! FileHash: sha256:1a1ks84g8dp32pddydxrxv837qgrqz9bxp9sbfqv249mdkz08k7w
//! FileSize: 216
//! NarHash: sha256:1dinrxag5kdkvjic29507irlj9cdxjzbmb806jqcwq5k2wai6cfg
//! NarSize: 400
//! References: 8pjibnycdlc071yls0gkbsb7l2ffmlgg-vec-dep ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top
//! Deriver: n5yfvnmayipw3yksgvfs2vkkkq50fl4k-vec-top.drv
//! Sig: nixpush-test-1:W3ibWUFwjNoGdD4vBeY5uAlbEwDPQ/xtRBeBhE9g/N3ZlVVv9USHcxXi1vHfHDTVE5xlTXf+/2BpRNbR8wJ6Dw==
//! ```
//!
//! A content-addressed path (`nix-store --add`) has no `Deriver`, an empty `References: ` and a last line
//! `CA: fixed:r:sha256:…`. Only `StorePath`, `NarHash`, `NarSize` and the references are signed (the
//! [`fingerprint`]).
//!
//! Written here rather than taken from the `narinfo` crate, which renders fields in a different order, trims
//! values and has no `CA` field.

use crate::config::Compression;
use crate::excerpt::excerpt;
use crate::hash::Sha256Hash;
use crate::signing::{PublicKey, SecretKey};
use crate::store_path::StorePath;

/// Why a narinfo could not be parsed. Line numbers start at 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A line is not `Key: value\n`.
    #[error("narinfo line {line}: {reason}")]
    Syntax {
        /// The line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A known field has an unusable value or appears twice.
    #[error("narinfo line {line}: invalid {field}: {reason}")]
    Field {
        /// The line number.
        line: usize,
        /// The field name, e.g. `NarSize`.
        field: &'static str,
        /// What is wrong, quoting the value.
        reason: String,
    },
    /// A field Nix requires is absent.
    #[error("narinfo has no {field} line")]
    Missing {
        /// The field name.
        field: &'static str,
    },
}

/// The metadata of one store path in a binary cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// The store path described.
    pub store_path: StorePath,
    /// The NAR file, relative to the cache root (`nar/<FileHash>.nar.zst`).
    pub url: String,
    /// `zstd`, `xz`, `none`, … (Nix assumes `bzip2` when the line is absent, and so does [`NarInfo::parse`]).
    pub compression: String,
    /// SHA-256 of the (compressed) file at `url`.
    pub file_hash: Option<Sha256Hash>,
    /// Size of the file at `url`.
    pub file_size: Option<u64>,
    /// SHA-256 of the uncompressed NAR.
    pub nar_hash: Sha256Hash,
    /// Size of the uncompressed NAR.
    pub nar_size: u64,
    /// References, sorted, self-reference included.
    pub references: Vec<StorePath>,
    /// The `.drv` that built the path, when known.
    pub deriver: Option<StorePath>,
    /// `Sig` values, `name:base64`.
    pub sigs: Vec<String>,
    /// The content-address assertion (`fixed:r:sha256:…`, `text:sha256:…`) of a content-addressed path.
    pub ca: Option<String>,
}

/// The key of a NAR file in a cache: `nar/<base32 file hash><extension>`, as `nix copy` names it.
pub fn nar_url(file_hash: &Sha256Hash, compression: Compression) -> String {
    format!("nar/{}{}", file_hash.to_base32(), compression.extension())
}

/// The string Nix signs: `1;<path>;<sha256:base32 NAR hash>;<NAR size>;<comma-joined sorted full references>`.
pub fn fingerprint(
    path: &StorePath,
    nar_hash: &Sha256Hash,
    nar_size: u64,
    references: &[StorePath],
) -> String {
    let mut refs: Vec<&str> = references.iter().map(StorePath::as_str).collect();
    refs.sort_unstable();
    refs.dedup();
    format!(
        "1;{};{};{};{}",
        path.as_str(),
        nar_hash.to_typed_base32(),
        nar_size,
        refs.join(",")
    )
}

impl NarInfo {
    /// The narinfo text, byte for byte as Nix 2.8 writes it: fixed field order, `References: ` even when empty,
    /// one `Sig` line per signature (sorted and de-duplicated, as Nix keeps them in a set), `CA` last.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(512);
        // Writing to a String cannot fail.
        let _ = writeln!(out, "StorePath: {}", self.store_path);
        let _ = writeln!(out, "URL: {}", self.url);
        let _ = writeln!(out, "Compression: {}", self.compression);
        if let Some(h) = &self.file_hash {
            let _ = writeln!(out, "FileHash: {h}");
        }
        if let Some(size) = self.file_size {
            let _ = writeln!(out, "FileSize: {size}");
        }
        let _ = writeln!(out, "NarHash: {}", self.nar_hash);
        let _ = writeln!(out, "NarSize: {}", self.nar_size);
        let mut refs: Vec<&str> = self.references.iter().map(StorePath::base_name).collect();
        refs.sort_unstable();
        refs.dedup();
        let _ = writeln!(out, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(out, "Deriver: {}", d.base_name());
        }
        let mut sigs: Vec<&str> = self.sigs.iter().map(String::as_str).collect();
        sigs.sort_unstable();
        sigs.dedup();
        for sig in sigs {
            let _ = writeln!(out, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(out, "CA: {ca}");
        }
        out
    }

    /// Parses narinfo text. Strict where Nix is strict (required fields, numbers, hashes, store paths, every line
    /// ending in `\n`) and stricter where Nix silently misreads (a known field given twice, a line without `: `).
    /// Unknown fields are skipped as Nix does. `Deriver: unknown-deriver` means no deriver.
    pub fn parse(text: &str, store_dir: &str) -> Result<NarInfo, Error> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut sigs = Vec::new();
        let mut ca = None;

        let mut rest = text;
        let mut line_no = 0;
        while !rest.is_empty() {
            line_no += 1;
            let (line, after) = rest.split_once('\n').ok_or_else(|| Error::Syntax {
                line: line_no,
                reason: "last line does not end in a newline".to_owned(),
            })?;
            rest = after;
            let (key, value) = line.split_once(": ").ok_or_else(|| Error::Syntax {
                line: line_no,
                reason: format!("expected \"Key: value\", got {:?}", excerpt(line)),
            })?;
            let field = |field: &'static str, reason: String| Error::Field {
                line: line_no,
                field,
                reason,
            };
            let path_field = |name: &'static str, value: &str, base: bool| {
                let parsed = if base {
                    StorePath::from_base_name(value, store_dir)
                } else {
                    StorePath::parse(value, store_dir)
                };
                parsed.map_err(|e| field(name, e.to_string()))
            };
            let hash_field = |name: &'static str, value: &str| {
                Sha256Hash::parse(value).map_err(|e| field(name, e.to_string()))
            };
            let number_field = |name: &'static str, value: &str| {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(field(name, format!("{:?} is not a number", excerpt(value))));
                }
                value
                    .parse::<u64>()
                    .map_err(|e| field(name, format!("{:?}: {e}", excerpt(value))))
            };
            macro_rules! once {
                ($slot:ident, $name:literal, $value:expr) => {{
                    if $slot.is_some() {
                        return Err(field($name, "given more than once".to_owned()));
                    }
                    $slot = Some($value);
                }};
            }
            match key {
                "StorePath" => once!(
                    store_path,
                    "StorePath",
                    path_field("StorePath", value, false)?
                ),
                "URL" => {
                    if value.is_empty() {
                        return Err(field("URL", "empty".to_owned()));
                    }
                    once!(url, "URL", value.to_owned())
                }
                "Compression" => {
                    if value.is_empty() {
                        return Err(field("Compression", "empty".to_owned()));
                    }
                    once!(compression, "Compression", value.to_owned())
                }
                "FileHash" => once!(file_hash, "FileHash", hash_field("FileHash", value)?),
                "FileSize" => once!(file_size, "FileSize", number_field("FileSize", value)?),
                "NarHash" => once!(nar_hash, "NarHash", hash_field("NarHash", value)?),
                "NarSize" => {
                    let size = number_field("NarSize", value)?;
                    if size == 0 {
                        return Err(field("NarSize", "must be greater than 0".to_owned()));
                    }
                    once!(nar_size, "NarSize", size)
                }
                "References" => {
                    let mut refs = value
                        .split(' ')
                        .filter(|r| !r.is_empty())
                        .map(|r| path_field("References", r, true))
                        .collect::<Result<Vec<_>, _>>()?;
                    refs.sort();
                    refs.dedup();
                    once!(references, "References", refs)
                }
                "Deriver" => {
                    let d = if value == "unknown-deriver" {
                        None
                    } else {
                        Some(path_field("Deriver", value, true)?)
                    };
                    once!(deriver, "Deriver", d)
                }
                "Sig" => {
                    match value.split_once(':') {
                        Some((name, sig)) if !name.is_empty() && !sig.is_empty() => {}
                        _ => {
                            return Err(field(
                                "Sig",
                                format!("{:?} is not NAME:BASE64", excerpt(value)),
                            ))
                        }
                    }
                    sigs.push(value.to_owned());
                }
                "CA" => {
                    if !(value.starts_with("fixed:") || value.starts_with("text:")) {
                        return Err(field(
                            "CA",
                            format!("{:?} is not fixed:… or text:…", excerpt(value)),
                        ));
                    }
                    once!(ca, "CA", value.to_owned())
                }
                _ => {}
            }
        }

        Ok(NarInfo {
            store_path: store_path.ok_or(Error::Missing { field: "StorePath" })?,
            url: url.ok_or(Error::Missing { field: "URL" })?,
            compression: compression.unwrap_or_else(|| "bzip2".to_owned()),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(Error::Missing { field: "NarHash" })?,
            nar_size: nar_size.ok_or(Error::Missing { field: "NarSize" })?,
            references: references.unwrap_or_default(),
            deriver: deriver.flatten(),
            sigs,
            ca,
        })
    }

    /// This narinfo's [`fingerprint`].
    pub fn fingerprint(&self) -> String {
        fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Signs the fingerprint with `key`, replacing any signature already made under the same key name.
    pub fn sign(&mut self, key: &SecretKey) {
        let sig = key.sign(self.fingerprint().as_bytes());
        self.sigs.retain(|s| sig_key_name(s) != Some(key.name()));
        self.sigs.push(sig);
    }

    /// Signs with every key in `keys` (ours first, so a target that takes one signature gets ours), then keeps
    /// each of `kept` (signatures Nix already holds, or the target's narinfo had) not made under one of our key
    /// names. The result has no duplicates.
    pub fn add_signatures<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a SecretKey>,
        kept: &[String],
    ) {
        let mut ours: Vec<&str> = Vec::new();
        for key in keys {
            self.sign(key);
            ours.push(key.name());
        }
        for sig in kept {
            let by_us = sig_key_name(sig).is_some_and(|name| ours.contains(&name));
            if !by_us && !self.sigs.contains(sig) {
                self.sigs.push(sig.clone());
            }
        }
    }

    /// Whether some `Sig` made under `key`'s name verifies against the fingerprint.
    pub fn verify(&self, key: &PublicKey) -> bool {
        let fp = self.fingerprint();
        self.sigs.iter().any(|s| key.verify(fp.as_bytes(), s))
    }
}

fn sig_key_name(sig: &str) -> Option<&str> {
    sig.split_once(':').map(|(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STORE: &str = "/nix/store";
    const TOP: &str = include_str!(
        "../tests/fixtures/vectors/cache-zstd/ripzxnb3whas7h2iw572d3b0sby1nxxw.narinfo"
    );
    const ADDED: &str = include_str!(
        "../tests/fixtures/vectors/cache-zstd/3104630xpvc1j0fnzpa60lzv3x9a7k10.narinfo"
    );

    #[test]
    fn parse_render_identity() {
        for text in [TOP, ADDED] {
            let info = NarInfo::parse(text, STORE).unwrap();
            assert_eq!(info.render(), text);
        }
        let added = NarInfo::parse(ADDED, STORE).unwrap();
        assert!(added.references.is_empty() && added.deriver.is_none());
        assert!(added.ca.as_deref().unwrap().starts_with("fixed:r:sha256:"));
    }

    #[test]
    fn fingerprint_and_signature_vector() {
        let info = NarInfo::parse(TOP, STORE).unwrap();
        assert_eq!(
            info.fingerprint(),
            "1;/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top;\
             sha256:1dinrxag5kdkvjic29507irlj9cdxjzbmb806jqcwq5k2wai6cfg;400;\
             /nix/store/8pjibnycdlc071yls0gkbsb7l2ffmlgg-vec-dep,\
             /nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top"
        );
        let key = SecretKey::parse(include_str!("../tests/fixtures/vectors/test-key.sec")).unwrap();
        assert!(info.verify(&key.public_key()));
        let mut resigned = info.clone();
        resigned.sign(&key);
        assert_eq!(resigned.sigs, info.sigs);
        assert_eq!(resigned.render(), TOP);

        let other = crate::signing::generate("other-1");
        resigned.sign(&other);
        assert_eq!(resigned.sigs.len(), 2);
        assert!(resigned.verify(&other.public_key()) && resigned.verify(&key.public_key()));
        let mut tampered = info.clone();
        tampered.nar_size += 1;
        assert!(!tampered.verify(&key.public_key()));
    }

    #[test]
    fn errors_name_field_and_line() {
        // (text in TOP, its replacement, the line, what the message names)
        let edits = [
            ("NarSize: 400", "NarSize: 4x0", "line 7", "NarSize"),
            ("NarSize: 400", "NarSize: 0", "line 7", "NarSize"),
            (
                "NarHash: sha256:1",
                "NarHash: sha256:2",
                "line 6",
                "NarHash",
            ),
            ("References: 8", "References: X", "line 8", "References"),
            ("Deriver: n5", "Deriver: /n5", "line 9", "Deriver"),
            ("URL: ", "URL ", "line 2", "Key: value"),
            ("Sig: nixpush-test-1:", "Sig: ", "line 10", "Sig"),
        ];
        let edited = edits
            .into_iter()
            .map(|(from, to, line, what)| (TOP.replace(from, to), line, what));
        let others = [
            (format!("{TOP}NarSize: 400\n"), "line 11", "more than once"),
            (TOP.trim_end().to_owned(), "line 10", "newline"),
        ];
        for (text, line, what) in edited.chain(others) {
            let msg = NarInfo::parse(&text, STORE).unwrap_err().to_string();
            assert!(msg.contains(line) && msg.contains(what), "{msg}");
        }
        for field in ["StorePath", "URL", "NarHash", "NarSize"] {
            let text: String = TOP
                .lines()
                .filter(|l| !l.starts_with(&format!("{field}: ")))
                .map(|l| format!("{l}\n"))
                .collect();
            let msg = NarInfo::parse(&text, STORE).unwrap_err().to_string();
            assert!(msg.contains(field), "{msg}");
        }
    }

    #[test]
    fn lenient_where_nix_is() {
        let text = TOP
            .replace(
                "Deriver: n5yfvnmayipw3yksgvfs2vkkkq50fl4k-vec-top.drv",
                "Deriver: unknown-deriver",
            )
            .replace("Compression: zstd\n", "System: x86_64-linux\n");
        let info = NarInfo::parse(&text, STORE).unwrap();
        assert_eq!(info.deriver, None);
        assert_eq!(info.compression, "bzip2");
    }

    fn arb_store_path() -> impl Strategy<Value = StorePath> {
        ("[0-9a-df-np-sv-z]{32}", "[a-zA-Z0-9+._?=-]{0,20}")
            .prop_map(|(h, n)| StorePath::parse(&format!("/nix/store/{h}-x{n}"), STORE).unwrap())
    }

    fn arb_narinfo() -> impl Strategy<Value = NarInfo> {
        (
            (
                arb_store_path(),
                "nar/[a-z0-9.]{1,20}",
                "zstd|xz|none|bzip2",
            ),
            (
                any::<Option<[u8; 32]>>(),
                any::<Option<u64>>(),
                any::<[u8; 32]>(),
                1..u64::MAX,
            ),
            (
                proptest::collection::vec(arb_store_path(), 0..4),
                proptest::option::of(arb_store_path()),
                proptest::collection::vec("[a-z0-9.-]{1,10}:[A-Za-z0-9+/=]{4,20}", 0..3),
                proptest::option::of("(fixed:r:sha256|text:sha256):[0-9a-z]{52}"),
            ),
        )
            .prop_map(
                |(
                    (store_path, url, compression),
                    (fh, fs, nh, ns),
                    (mut references, deriver, mut sigs, ca),
                )| {
                    references.sort();
                    references.dedup();
                    sigs.sort();
                    sigs.dedup();
                    NarInfo {
                        store_path,
                        url,
                        compression,
                        file_hash: fh.map(Sha256Hash),
                        file_size: fs,
                        nar_hash: Sha256Hash(nh),
                        nar_size: ns,
                        references,
                        deriver,
                        sigs,
                        ca,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn render_parse_round_trips(info in arb_narinfo()) {
            let text = info.render();
            prop_assert_eq!(NarInfo::parse(&text, STORE).unwrap(), info);
        }

        #[test]
        fn parse_never_panics(text in "(StorePath|URL|NarHash|NarSize|References|Sig|CA|x)(: |:)?\\PC{0,40}\n?") {
            let _ = NarInfo::parse(&text, STORE);
        }
    }

    #[test]
    fn nar_url_matches_nix_naming() {
        let h = Sha256Hash::parse("sha256:1a1ks84g8dp32pddydxrxv837qgrqz9bxp9sbfqv249mdkz08k7w")
            .unwrap();
        assert_eq!(
            nar_url(&h, Compression::Zstd),
            "nar/1a1ks84g8dp32pddydxrxv837qgrqz9bxp9sbfqv249mdkz08k7w.nar.zst"
        );
    }
}
