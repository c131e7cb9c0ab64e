//! The reader against NARs written by the writer and by hand: round trips, and every malformed input refused.

use super::*;
use crate::nar::tests::fixture;
use proptest::prelude::*;

const VECTORS: &[&str] = &[
    "regular.nar",
    "executable.nar",
    "empty.nar",
    "symlink.nar",
    "emptydir.nar",
    "tree.nar",
    "padding.nar",
    "dep.nar",
    "top.nar",
    "top-doc.nar",
    "added.nar",
];

fn s(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(bytes);
    out.resize(out.len() + padding_len(bytes.len() as u64), 0);
    out
}

fn nar(tokens: &[&[u8]]) -> Vec<u8> {
    tokens.iter().flat_map(|t| s(t)).collect()
}

fn dir_with(names: &[&[u8]]) -> Vec<u8> {
    let mut tokens: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"directory"];
    for name in names {
        tokens.extend_from_slice(&[
            b"entry",
            b"(",
            b"name",
            name,
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"",
            b")",
            b")",
        ]);
    }
    tokens.push(b")");
    nar(&tokens)
}

fn error_of(bytes: &[u8]) -> String {
    validate(&mut &bytes[..]).unwrap_err().to_string()
}

#[test]
fn vectors_validate_with_correct_hash() {
    let json: serde_json::Value = serde_json::from_slice(&fixture("vectors.json")).unwrap();
    for path in json["paths"].as_array().unwrap() {
        let bytes = fixture(path["nar_file"].as_str().unwrap());
        let stats = validate(&mut &bytes[..]).unwrap();
        assert_eq!(stats.nar_size, path["nar_size"].as_u64().unwrap());
        assert_eq!(
            stats.nar_hash.to_string(),
            path["nar_hash"].as_str().unwrap()
        );
    }
    assert_eq!(VECTORS.len(), json["paths"].as_array().unwrap().len());
    let tree = validate(&mut &fixture("tree.nar")[..]).unwrap();
    assert_eq!(tree.symlinks, 3);
    assert_eq!(tree.executables, 1);
}

#[test]
fn restore_then_dump_round_trips() {
    for name in VECTORS {
        let bytes = fixture(name);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        restore(&mut &bytes[..], &dest).unwrap();
        let mut again = Vec::new();
        super::super::dump(&dest, &mut again).unwrap();
        assert_eq!(again, bytes, "{name}");
    }
}

#[test]
fn rejects_hostile_names() {
    for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
        let msg = error_of(&dir_with(&[bad]));
        assert!(msg.contains("invalid file name"), "{msg}");
    }
    let long = vec![b'x'; 256];
    assert!(error_of(&dir_with(&[&long])).contains("limit 255"));
    assert!(validate(&mut &dir_with(&[&vec![b'x'; 255]])[..]).is_ok());
}

#[test]
fn rejects_unsorted_and_duplicate_entries() {
    assert!(error_of(&dir_with(&[b"b", b"a"])).contains("not sorted"));
    assert!(error_of(&dir_with(&[b"a", b"a"])).contains("duplicate"));
    assert!(validate(&mut &dir_with(&[b"B", b"a", b"a-b", b"a.b", b"\xff"])[..]).is_ok());
}

#[test]
fn rejects_bad_framing() {
    let good = fixture("regular.nar");
    // Non-zero padding after "hello\n" (at 0x66).
    let mut bad = good.clone();
    bad[0x66] = 1;
    assert!(error_of(&bad).contains("non-zero padding"));
    // Truncation anywhere.
    for cut in [0, 1, 8, 20, 100, good.len() - 1] {
        let msg = error_of(&good[..cut]);
        assert!(msg.contains("truncated"), "{cut}: {msg}");
    }
    // Trailing garbage.
    let mut long = good.clone();
    long.extend_from_slice(&[0; 8]);
    assert!(error_of(&long).contains("trailing data"));
    // Wrong magic, unknown type, absurd lengths.
    assert!(error_of(&nar(&[b"nix-archive-2"])).contains("nix-archive-1"));
    assert!(
        error_of(&nar(&[b"nix-archive-1", b"(", b"type", b"fifo", b")"]))
            .contains("unknown node type")
    );
    let mut absurd = s(b"nix-archive-1");
    absurd.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(error_of(&absurd).contains("18446744073709551615-byte"));
    let target = vec![b'x'; 4097];
    assert!(error_of(&nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"symlink",
        b"target",
        &target,
        b")"
    ]))
    .contains("limit 4096"));
    // Non-canonical field order.
    assert!(error_of(&nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"",
        b"executable",
        b"",
        b")"
    ]))
    .contains("expected \")\""));
}

#[test]
fn deep_nesting_is_capped() {
    let mut bytes = s(b"nix-archive-1");
    for _ in 0..=MAX_DEPTH {
        for t in [
            &b"("[..],
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"d",
            b"node",
        ] {
            bytes.extend(s(t));
        }
    }
    assert!(error_of(&bytes).contains("nested deeper"));
}

#[test]
fn restore_refuses_existing_destination() {
    let dir = tempfile::tempdir().unwrap();
    let err = restore(&mut &fixture("regular.nar")[..], dir.path()).unwrap_err();
    assert!(matches!(err, Error::Restore { .. }), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Mutated vectors never panic; whatever still validates must hash consistently.
    #[test]
    fn mutated_nars_never_panic(
        which in 0..VECTORS.len(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = fixture(VECTORS[which]);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        if let Ok(stats) = validate(&mut &bytes[..]) {
            prop_assert_eq!(stats.nar_size, bytes.len() as u64);
            prop_assert_eq!(stats.nar_hash, Sha256Hash::of(&bytes));
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = validate(&mut &bytes[..]);
    }
}
