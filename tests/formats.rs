//! The Nix formats against real Nix 2.8: the vectors it produced, `nix-store --dump`, `nix-store --add`,
//! `nix path-info` and `nix copy` reading a cache nixpush wrote.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use nixpush::config::Compression;
use nixpush::hash::{HashingWriter, Sha256Hash};
use nixpush::narinfo::{self, NarInfo};
use nixpush::pathinfo::{self, LocalStore, VerifyOutcome};
use nixpush::signing::{self, PublicKey, SecretKey};
use nixpush::store_path::StorePath;
use nixpush::{base32, derivation, nar};
use proptest::prelude::*;
use serde_json::Value;

use crate::harness::nix::NIX_OPTIONS;
use crate::harness::process::Run;

const STORE: &str = "/nix/store";
const NIX_DB: &str = "/nix/var/nix/db/db.sqlite";

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vectors")
}

fn vector(name: &str) -> Vec<u8> {
    let path = vectors_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn vectors_json() -> Value {
    serde_json::from_slice(&vector("vectors.json")).unwrap()
}

fn sp(path: &str) -> StorePath {
    StorePath::parse(path, STORE).unwrap()
}

/// Runs a command and returns its output, panicking with its stderr if it fails.
fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.run();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn nix() -> Command {
    let mut cmd = Command::new("nix");
    cmd.args(["--extra-experimental-features", "nix-command"]);
    cmd
}

fn nixpush() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nixpush"))
}

/// Builds `vectors.nix` and adds `added.txt` once per test run; returns every vector store path.
fn realised_vectors() -> &'static Vec<StorePath> {
    static PATHS: OnceLock<Vec<StorePath>> = OnceLock::new();
    PATHS.get_or_init(|| {
        let out = run_ok(
            Command::new("nix-build")
                .arg(vectors_dir().join("vectors.nix"))
                .args(NIX_OPTIONS)
                .args(["--option", "substituters", ""])
                .arg("--no-out-link"),
        );
        let mut paths: Vec<StorePath> = stdout_lines(&out).iter().map(|p| sp(p)).collect();
        let added = run_ok(
            Command::new("nix-store")
                .arg("--add")
                .arg(vectors_dir().join("added.txt")),
        );
        paths.extend(stdout_lines(&added).iter().map(|p| sp(p)));
        // vec-top-doc is the second output of vec-top's derivation, which nix-build lists only as `out`.
        let json = vectors_json();
        for p in json["paths"].as_array().unwrap() {
            let path = sp(p["store_path"].as_str().unwrap());
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
        paths.sort();
        paths
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Vectors

#[test]
fn every_vector_path_round_trips_nar_and_hashes() {
    let json = vectors_json();
    let paths = json["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 11);
    for p in paths {
        let nar_bytes = vector(p["nar_file"].as_str().unwrap());
        let stats = nar::validate(&mut &nar_bytes[..]).unwrap();
        let expected = Sha256Hash::parse(p["nar_hash"].as_str().unwrap()).unwrap();
        assert_eq!(stats.nar_hash, expected);
        assert_eq!(stats.nar_hash, Sha256Hash::of(&nar_bytes));
        assert_eq!(stats.nar_size, p["nar_size"].as_u64().unwrap());
        for (field, form) in [
            ("nar_hash", expected.to_typed_base32()),
            ("nar_hash_base32", expected.to_base32()),
            ("nar_hash_hex", expected.to_hex()),
            ("nar_hash_sri", expected.to_sri()),
        ] {
            assert_eq!(p[field].as_str().unwrap(), form, "{field}");
            assert_eq!(
                Sha256Hash::parse(p[field].as_str().unwrap()).unwrap(),
                expected
            );
        }
        // Restore, then serialize again: the same bytes.
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("restored");
        nar::restore(&mut &nar_bytes[..], &dest).unwrap();
        let mut again = Vec::new();
        nar::dump(&dest, &mut again).unwrap();
        assert_eq!(again, nar_bytes, "{}", p["name"]);
    }
}

#[test]
fn base32_table_matches_nix_hash() {
    let json = vectors_json();
    let table = json["base32"].as_array().unwrap();
    assert!(table.len() >= 15);
    for row in table {
        let bytes = hex::decode(row["hex"].as_str().unwrap()).unwrap();
        assert_eq!(bytes.len() as u64, row["bytes"].as_u64().unwrap());
        let text = row["base32"].as_str().unwrap();
        assert_eq!(base32::encode(&bytes), text);
        assert_eq!(base32::decode(text, bytes.len()).unwrap(), bytes);
    }
}

fn narinfo_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for cache in ["cache-zstd", "cache-none", "cache-xz"] {
        for entry in std::fs::read_dir(vectors_dir().join(cache)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension() == Some(OsStr::new("narinfo")) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn all_narinfos_render_identically_and_verify() {
    let key = SecretKey::parse(&String::from_utf8(vector("test-key.sec")).unwrap()).unwrap();
    let public = PublicKey::parse(&String::from_utf8(vector("test-key.pub")).unwrap()).unwrap();
    let json = vectors_json();
    let nar_of: BTreeMap<String, Vec<u8>> = json["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["store_path"].as_str().unwrap().to_owned(),
                vector(p["nar_file"].as_str().unwrap()),
            )
        })
        .collect();
    let files = narinfo_files();
    assert_eq!(files.len(), 33);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let info = NarInfo::parse(&text, STORE).unwrap();
        assert_eq!(info.render(), text, "{}", file.display());
        assert!(info.verify(&public), "{}", file.display());
        let mut resigned = info.clone();
        resigned.sigs.clear();
        resigned.sign(&key);
        assert_eq!(resigned.render(), text, "{}", file.display());

        // The file at URL has FileHash/FileSize and decompresses to the path's NAR.
        let cache = file.parent().unwrap();
        let compressed = std::fs::read(cache.join(&info.url)).unwrap();
        assert_eq!(Some(Sha256Hash::of(&compressed)), info.file_hash);
        assert_eq!(Some(compressed.len() as u64), info.file_size);
        let plain = match info.compression.as_str() {
            "zstd" => zstd::stream::decode_all(&compressed[..]).unwrap(),
            "xz" => {
                let mut out = Vec::new();
                std::io::Read::read_to_end(
                    &mut xz2::read::XzDecoder::new(&compressed[..]),
                    &mut out,
                )
                .unwrap();
                out
            }
            "none" => compressed.clone(),
            other => panic!("unexpected compression {other}"),
        };
        assert_eq!(&plain, &nar_of[info.store_path.as_str()]);
        assert_eq!(Sha256Hash::of(&plain), info.nar_hash);
        let compression = match info.compression.as_str() {
            "zstd" => Compression::Zstd,
            "xz" => Compression::Xz,
            _ => Compression::None,
        };
        assert_eq!(
            narinfo::nar_url(&info.file_hash.unwrap(), compression),
            info.url
        );
    }
}

#[test]
fn signature_vectors() {
    let json = vectors_json();
    for name in ["signature", "signature_no_refs"] {
        let v = &json[name];
        let key_text = String::from_utf8(vector(v["secret_key_file"].as_str().unwrap())).unwrap();
        let key = SecretKey::parse(&key_text).unwrap();
        assert_eq!(key.name(), v["key_name"].as_str().unwrap());
        let fingerprint = v["fingerprint"].as_str().unwrap();
        assert_eq!(
            key.sign(fingerprint.as_bytes()),
            v["expected_sig"].as_str().unwrap()
        );
        let public = PublicKey::parse(
            &String::from_utf8(vector(v["public_key_file"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        assert!(public.verify(fingerprint.as_bytes(), v["expected_sig"].as_str().unwrap()));
        let info = NarInfo::parse(
            &String::from_utf8(vector(v["narinfo"].as_str().unwrap())).unwrap(),
            STORE,
        )
        .unwrap();
        assert_eq!(info.fingerprint(), fingerprint);
        assert_eq!(
            narinfo::fingerprint(
                &info.store_path,
                &info.nar_hash,
                info.nar_size,
                &info.references
            ),
            fingerprint
        );
    }
}

#[test]
fn derivation_vectors() {
    let json = vectors_json();
    for d in json["derivations"].as_array().unwrap() {
        let drv = derivation::read(&vectors_dir().join(d["drv_file"].as_str().unwrap())).unwrap();
        let expected: Vec<&str> = d["outputs"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap())
            .collect();
        let got = drv.output_paths(STORE).unwrap();
        assert_eq!(
            got.iter().map(StorePath::as_str).collect::<Vec<_>>(),
            expected
        );
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The local store

#[test]
fn dump_nar_is_nix_store_dump_for_every_store_path() {
    let vectors = realised_vectors();
    let store = LocalStore::open_sqlite(STORE, Path::new(NIX_DB)).unwrap();
    // Byte for byte against nix-store --dump: the closures of the vectors and of their derivations.
    let mut roots = vectors.clone();
    for d in vectors_json()["derivations"].as_array().unwrap() {
        let drv = sp(d["drv_path"].as_str().unwrap());
        if store.is_valid(&drv).unwrap() {
            roots.push(drv);
        }
    }
    let closure = store.closure(&roots).unwrap();
    assert!(vectors.iter().all(|v| closure.iter().any(|i| i.path == *v)));
    assert!(closure.iter().any(|i| i.path.is_derivation()));
    for info in &closure {
        let ours = run_ok(nixpush().arg("dump-nar").arg(info.path.as_str())).stdout;
        let theirs = run_ok(
            Command::new("nix-store")
                .arg("--dump")
                .arg(info.path.as_str()),
        )
        .stdout;
        assert!(
            ours == theirs,
            "dump-nar differs from nix-store --dump for {}",
            info.path
        );
        assert_eq!(Sha256Hash::of(&ours), info.nar_hash);
    }

    // Every other valid path: `nixpush verify` recomputes NarHash and NarSize (which Nix computed from its own
    // dump), hundreds of paths per process. A path it does not report as ok (deleted meanwhile, or deliberately
    // corrupted by another test) is compared byte for byte instead. Paths over 1 MiB of NAR are left to
    // benches/nar_throughput.sh, which compares a ~1 GB one: a developer's store can hold many GB of benchmark
    // paths, too much to hash in a debug build, where SHA-256 runs at a few MB/s.
    let listed: Value =
        serde_json::from_slice(&run_ok(nix().args(["path-info", "--json", "--all"])).stdout)
            .unwrap();
    let all: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["narSize"].as_u64().is_some_and(|n| n <= 1 << 20))
        .map(|p| p["path"].as_str().unwrap().to_owned())
        .collect();
    assert!(all.len() >= closure.len());
    for chunk in all.chunks(500) {
        let out = nixpush().arg("verify").args(chunk).run();
        for line in stdout_lines(&out) {
            if line.starts_with("ok ") {
                continue;
            }
            let path = line
                .split_whitespace()
                .nth(1)
                .unwrap()
                .trim_end_matches(':');
            let ours = nixpush().arg("dump-nar").arg(path).run();
            let theirs = Command::new("nix-store").arg("--dump").arg(path).run();
            if !theirs.status.success() && !Path::new(path).exists() {
                continue;
            }
            assert!(
                ours.status.success(),
                "dump-nar {path}: {}",
                String::from_utf8_lossy(&ours.stderr)
            );
            assert!(
                ours.stdout == theirs.stdout,
                "dump-nar differs from nix-store --dump for {path} ({line})"
            );
        }
    }
}

/// A file tree for the property test. Names are raw bytes.
#[derive(Debug, Clone)]
enum Tree {
    File { contents: Vec<u8>, executable: bool },
    Symlink(Vec<u8>),
    Dir(BTreeMap<Vec<u8>, Tree>),
}

fn name_strategy() -> impl Strategy<Value = Vec<u8>> {
    // Bytes a file name may hold, including non-UTF-8 ones (ext4 and friends store any byte but '/' and NUL).
    let byte = prop_oneof![
        Just(b'a'),
        Just(b'B'),
        Just(b'0'),
        Just(b'-'),
        Just(b'.'),
        Just(b'_'),
        Just(b' '),
        Just(0xc3u8),
        Just(0xa9u8),
        Just(0xffu8),
    ];
    proptest::collection::vec(byte, 1..6).prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn contents_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(vec![0usize, 1, 7, 8, 9, 15, 16, 17, 4095, 4096, 4097])
            .prop_map(|n| vec![b'x'; n]),
        proptest::collection::vec(any::<u8>(), 0..200),
    ]
}

fn tree_strategy() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        4 => (contents_strategy(), any::<bool>())
            .prop_map(|(contents, executable)| Tree::File { contents, executable }),
        1 => proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'/'), Just(b'.'), Just(0xffu8)], 1..12)
            .prop_map(Tree::Symlink),
        1 => Just(Tree::Dir(BTreeMap::new())),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        proptest::collection::btree_map(name_strategy(), inner, 0..5).prop_map(Tree::Dir)
    })
}

fn write_tree(path: &Path, tree: &Tree) {
    match tree {
        Tree::File {
            contents,
            executable,
        } => {
            std::fs::write(path, contents).unwrap();
            let mode = if *executable { 0o755 } else { 0o644 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        Tree::Symlink(target) => {
            std::os::unix::fs::symlink(OsStr::from_bytes(target), path).unwrap();
        }
        Tree::Dir(entries) => {
            std::fs::create_dir(path).unwrap();
            for (name, child) in entries {
                write_tree(&path.join(OsStr::from_bytes(name)), child);
            }
        }
    }
}

proptest! {
    // Each case adds a path to the real store; a few cases keep the test at a few seconds.
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_added_by_nix_dump_identically(tree in tree_strategy(), top_dir in any::<bool>()) {
        let tree = if top_dir { Tree::Dir(BTreeMap::from([(b"t".to_vec(), tree)])) } else { tree };
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("nixpush-prop");
        write_tree(&src, &tree);
        let added = run_ok(Command::new("nix-store").arg("--add").arg(&src));
        let path = stdout_lines(&added).pop().unwrap();

        let theirs = run_ok(Command::new("nix-store").arg("--dump").arg(&path)).stdout;
        let mut ours = Vec::new();
        let size = nar::dump(Path::new(&path), &mut ours).unwrap();
        prop_assert!(ours == theirs, "NAR of {} differs from nix-store --dump", path);
        prop_assert_eq!(size, theirs.len() as u64);
        // The source tree has other modes and times than the store copy but the same NAR.
        let mut from_source = Vec::new();
        nar::dump(&src, &mut from_source).unwrap();
        prop_assert!(from_source == theirs);

        let (hash, _) = nar::dump_hash(Path::new(&path)).unwrap();
        let recorded = run_ok(Command::new("nix-store").args(["--query", "--hash", &path]));
        prop_assert_eq!(stdout_lines(&recorded), vec![hash.to_typed_base32()]);
        prop_assert!(nar::validate(&mut &ours[..]).is_ok());
    }
}

#[test]
fn sqlite_and_nix_command_agree_with_the_vectors() {
    let vectors = realised_vectors();
    let sqlite = LocalStore::open_sqlite(STORE, Path::new(NIX_DB)).unwrap();
    assert!(sqlite.uses_database());
    let command = LocalStore::open_nix_command(STORE);
    let json = vectors_json();
    for p in json["paths"].as_array().unwrap() {
        let path = sp(p["store_path"].as_str().unwrap());
        let info = sqlite.query(&path).unwrap().unwrap();
        assert_eq!(command.query(&path).unwrap().as_ref(), Some(&info));
        assert_eq!(info.nar_hash.to_string(), p["nar_hash"].as_str().unwrap());
        assert_eq!(info.nar_size, p["nar_size"].as_u64().unwrap());
        let refs: Vec<&str> = info.references.iter().map(StorePath::as_str).collect();
        let expected: Vec<&str> = p["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        assert_eq!(refs, expected);
        assert_eq!(
            info.deriver.as_ref().map(StorePath::as_str),
            p["deriver"].as_str()
        );
        assert_eq!(info.ca.as_deref(), p["ca"].as_str());
        assert!(info.registration_time > 0);
    }
    let missing = sp("/nix/store/00000000000000000000000000000000-nixpush-missing");
    assert_eq!(sqlite.query(&missing).unwrap(), None);
    assert_eq!(command.query(&missing).unwrap(), None);
    assert!(!sqlite.is_valid(&missing).unwrap());
    assert!(!command.is_valid(&missing).unwrap());
    assert!(sqlite.is_valid(&vectors[0]).unwrap());

    // Closures: same set and order from both sources, references before referrers.
    let top = sp("/nix/store/59sqgcsmssgl7absp1w5vhja26baj5z5-vec-top-doc");
    let a = sqlite.closure(std::slice::from_ref(&top)).unwrap();
    let b = command.closure(std::slice::from_ref(&top)).unwrap();
    assert_eq!(a, b);
    let order: Vec<&str> = a.iter().map(|i| i.path.name()).collect();
    assert_eq!(order, ["vec-dep", "vec-top", "vec-top-doc"]);
    for err in [
        sqlite.closure(&[top.clone(), missing.clone()]).unwrap_err(),
        command
            .closure(&[top.clone(), missing.clone()])
            .unwrap_err(),
    ] {
        assert!(
            matches!(&err, pathinfo::Error::NotValid(p) if *p == missing),
            "{err}"
        );
    }

    // Derivation outputs from the DerivationOutputs table and from the .drv itself.
    let drv = sp("/nix/store/n5yfvnmayipw3yksgvfs2vkkkq50fl4k-vec-top.drv");
    let expected = [
        sp("/nix/store/59sqgcsmssgl7absp1w5vhja26baj5z5-vec-top-doc"),
        sp("/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top"),
    ];
    assert_eq!(sqlite.derivation_outputs(&drv).unwrap(), expected);
    assert_eq!(command.derivation_outputs(&drv).unwrap(), expected);
}

#[test]
fn verify_reports_corruption_with_both_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("nixpush-verify-victim");
    // A unique path, so no other test or process uses it.
    let nonce = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
    std::fs::write(&src, format!("victim {nonce}\n")).unwrap();
    let added = run_ok(Command::new("nix-store").arg("--add").arg(&src));
    let path = stdout_lines(&added).pop().unwrap();
    let store_path = sp(&path);
    let store = LocalStore::open(STORE, Path::new(NIX_DB)).unwrap();
    let recorded = store.query(&store_path).unwrap().unwrap();

    let ok = run_ok(nixpush().arg("verify").arg(&path));
    assert_eq!(
        stdout_lines(&ok),
        [format!(
            "ok {path} {} {}",
            recorded.nar_hash, recorded.nar_size
        )]
    );

    // Corrupt the store copy behind Nix's back, check, and delete it again.
    let perms = std::fs::metadata(&path).unwrap().permissions();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&path, format!("tampered {nonce}\n")).unwrap();
    std::fs::set_permissions(&path, perms).unwrap();
    let outcome = pathinfo::verify_path(&store, &store_path).unwrap();
    let out = nixpush()
        .arg("verify")
        .arg(&path)
        .arg("/nix/store/00000000000000000000000000000000-nixpush-missing")
        .run();
    let _ = Command::new("nix-store").args(["--delete", &path]).output();

    let VerifyOutcome::Corrupt {
        recorded: r,
        computed,
        ..
    } = outcome
    else {
        panic!("expected corruption, got {outcome:?}");
    };
    assert_eq!(r, recorded.nar_hash);
    assert_ne!(computed, recorded.nar_hash);
    assert_eq!(out.status.code(), Some(1));
    let lines = stdout_lines(&out);
    assert!(
        lines[0].starts_with(&format!("corrupt {path}:")),
        "{lines:?}"
    );
    assert!(
        lines[0].contains(&recorded.nar_hash.to_string())
            && lines[0].contains(&computed.to_string()),
        "{lines:?}"
    );
    assert_eq!(
        lines[1],
        "not-valid /nix/store/00000000000000000000000000000000-nixpush-missing"
    );
    let err = recorded.check_nar(computed, recorded.nar_size).unwrap_err();
    assert!(matches!(err, nar::Error::Corrupt { .. }));
}

// ---------------------------------------------------------------------------------------------------------------
// A cache written by nixpush, read by Nix

/// Writes `info.path` into a `file://` cache the way the upload engine does: NAR streamed through SHA-256 and zstd
/// into a temporary file, named after the compressed hash, then a signed narinfo.
fn push_to_file_cache(cache: &Path, info: &pathinfo::PathInfo, key: &SecretKey) {
    std::fs::create_dir_all(cache.join("nar")).unwrap();
    let tmp = cache.join("nar/upload.tmp");
    let file = std::fs::File::create(&tmp).unwrap();
    let compressed = HashingWriter::new(file);
    let encoder = zstd::stream::write::Encoder::new(compressed, 3).unwrap();
    let mut nar_hasher = HashingWriter::new(encoder);
    nar::dump(info.path.as_path(), &mut nar_hasher).unwrap();
    let (encoder, nar_hash, nar_size) = nar_hasher.finish();
    let compressed = encoder.finish().unwrap();
    let (mut file, file_hash, file_size) = compressed.finish();
    file.flush().unwrap();
    info.check_nar(nar_hash, nar_size).unwrap();
    let url = narinfo::nar_url(&file_hash, Compression::Zstd);
    std::fs::rename(&tmp, cache.join(&url)).unwrap();
    let mut narinfo = NarInfo {
        store_path: info.path.clone(),
        url,
        compression: "zstd".to_owned(),
        file_hash: Some(file_hash),
        file_size: Some(file_size),
        nar_hash,
        nar_size,
        references: info.references.clone(),
        deriver: info.deriver.clone(),
        sigs: Vec::new(),
        ca: info.ca.clone(),
    };
    narinfo.sign(key);
    std::fs::write(
        cache.join(format!("{}.narinfo", info.path.hash_part())),
        narinfo.render(),
    )
    .unwrap();
}

#[test]
fn nix_copy_accepts_our_signed_cache_and_rejects_other_keys() {
    realised_vectors();
    let store = LocalStore::open(STORE, Path::new(NIX_DB)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A fresh directory per run is a fresh cache URL, so Nix's client-side narinfo cache cannot answer.
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::write(cache.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let key = signing::generate("nixpush-formats-test-1");
    let top = sp("/nix/store/59sqgcsmssgl7absp1w5vhja26baj5z5-vec-top-doc");
    let added = sp("/nix/store/3104630xpvc1j0fnzpa60lzv3x9a7k10-added.txt");
    let closure = store.closure(&[top.clone(), added.clone()]).unwrap();
    for info in &closure {
        push_to_file_cache(&cache, info, &key);
    }
    // Our narinfo for vec-top, signed with the test key, is byte-identical to the one `nix copy` wrote.
    let test_key = SecretKey::parse(&String::from_utf8(vector("test-key.sec")).unwrap()).unwrap();
    let vec_top = closure.iter().find(|i| i.path.name() == "vec-top").unwrap();
    let ours_dir = dir.path().join("with-test-key");
    push_to_file_cache(&ours_dir, vec_top, &test_key);
    let name = format!("{}.narinfo", vec_top.path.hash_part());
    let ours = std::fs::read_to_string(ours_dir.join(&name)).unwrap();
    let nix_made = String::from_utf8(vector(&format!("cache-zstd/{name}"))).unwrap();
    // zstd's output can differ between library versions, so only the URL and file hash and size may differ.
    let strip_file_fields = |t: &str| -> String {
        t.lines()
            .filter(|l| {
                !l.starts_with("URL:") && !l.starts_with("FileHash:") && !l.starts_with("FileSize:")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip_file_fields(&ours), strip_file_fields(&nix_made));

    let url = format!("file://{}", cache.display());
    let copy = |root: &Path, trusted: &str, path: &StorePath| {
        nix()
            .args(["copy", "--from", &url, "--to"])
            .arg(root)
            .args(["--option", "trusted-public-keys", trusted])
            .args(["--option", "narinfo-cache-negative-ttl", "0"])
            .args(NIX_OPTIONS)
            .args(["--option", "substituters", ""])
            .arg(path.as_str())
            .run()
    };
    let public = key.public_key().to_string();
    let root = dir.path().join("root");
    let out = copy(&root, &public, &top);
    assert!(
        out.status.success(),
        "nix copy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for info in closure.iter().filter(|i| i.path != added) {
        let copied = root.join(info.path.as_str().trim_start_matches('/'));
        let mut nar_bytes = Vec::new();
        nar::dump(&copied, &mut nar_bytes).unwrap();
        assert_eq!(Sha256Hash::of(&nar_bytes), info.nar_hash, "{}", info.path);
    }

    // Same key name, different key: Nix refuses.
    let other = signing::generate("nixpush-formats-test-1")
        .public_key()
        .to_string();
    let out = copy(&dir.path().join("root2"), &other, &top);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lacks a valid signature"), "{stderr}");

    // `nix store verify` checks every signature and NAR in the cache.
    let out = nix()
        .args([
            "store",
            "verify",
            "--store",
            &url,
            "--trusted-public-keys",
            &public,
            "--all",
        ])
        .run();
    assert!(
        out.status.success(),
        "nix store verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
