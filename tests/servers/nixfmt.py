"""Nix formats shared by the test servers and their self-tests: Nix base32, narinfo text, fingerprints,
signing keys in Nix's `name:base64` form, and a NAR checker.

Nix base32 (not RFC 4648): alphabet `0123456789abcdfghijklmnpqrsvwxyz`, the bytes read as one little-endian
integer and written most significant digit first, `ceil(n*8/5)` digits. sha256 of empty input ->
`0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73`.
"""

import base64
import re

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}

STORE_HASH_RE = re.compile(r"^[0-9a-df-np-sv-z]{32}$")
# Characters Nix allows in a store path name.
NAME_RE = re.compile(r"^[A-Za-z0-9+\-._?=]{1,211}$")


def b32encode(data: bytes) -> str:
    n = len(data)
    length = (n * 8 + 4) // 5
    out = []
    for i in range(length - 1, -1, -1):
        b = i * 5
        j, k = divmod(b, 8)
        v = data[j] >> k
        if j + 1 < n:
            v |= data[j + 1] << (8 - k)
        out.append(ALPHABET[v & 0x1F])
    return "".join(out)


def b32decode(text: str, nbytes: int) -> bytes:
    """Decodes `text` into `nbytes` bytes; raises ValueError like Nix does for bad characters or overflow."""
    if len(text) != (nbytes * 8 + 4) // 5:
        raise ValueError(f"base32 string {text!r} has the wrong length for {nbytes} bytes")
    out = bytearray(nbytes)
    for p, c in enumerate(text):
        if c not in _VALUE:
            raise ValueError(f"invalid base32 character {c!r} in {text!r}")
        digit = _VALUE[c]
        i = len(text) - 1 - p
        b = i * 5
        j, k = divmod(b, 8)
        out[j] |= (digit << k) & 0xFF
        carry = digit >> (8 - k)
        if carry:
            if j + 1 >= nbytes:
                raise ValueError(f"invalid base32 string {text!r}: bits beyond the last byte")
            out[j + 1] |= carry
    return bytes(out)


def is_basename(name: str) -> bool:
    """`<32 base32 chars>-<valid name>`."""
    return (
        len(name) > 33
        and name[32] == "-"
        and STORE_HASH_RE.match(name[:32]) is not None
        and NAME_RE.match(name[33:]) is not None
    )


def fingerprint(store_dir: str, store_path: str, nar_hash: str, nar_size: int, references) -> bytes:
    refs = ",".join(f"{store_dir}/{r}" for r in sorted(references))
    return f"1;{store_path};{nar_hash};{nar_size};{refs}".encode()


def render_narinfo(
    store_path, url, compression, file_hash_b32, file_size, nar_hash, nar_size, references, deriver, sigs
) -> str:
    """The narinfo text exactly as Nix 2.8 writes it (field order of nix-formats.md section 5)."""
    lines = [
        f"StorePath: {store_path}",
        f"URL: {url}",
        f"Compression: {compression}",
        f"FileHash: sha256:{file_hash_b32}",
        f"FileSize: {file_size}",
        f"NarHash: {nar_hash}",
        f"NarSize: {nar_size}",
        "References: " + " ".join(references),
    ]
    if deriver and deriver != "unknown-deriver":
        lines.append(f"Deriver: {deriver}")
    for s in sigs:
        lines.append(f"Sig: {s}")
    return "\n".join(lines) + "\n"


def parse_key(text: str, size: int):
    """`name:base64` (Nix key file) -> (name, bytes). Tolerates surrounding whitespace."""
    text = text.strip()
    name, sep, b64 = text.partition(":")
    if not sep or not name:
        raise ValueError("key is not in `name:base64` form")
    raw = base64.b64decode(b64, validate=True)
    if len(raw) != size:
        raise ValueError(f"key {name!r} has {len(raw)} bytes, expected {size}")
    return name, raw


class NarError(ValueError):
    pass


def check_nar(reader, chunk=1 << 20):
    """Checks that `reader` (anything with read(n), ideally buffered) yields exactly one well-formed NAR
    (nix-formats.md section 3): grammar, zero padding, entry names valid and strictly sorted. File contents are
    read in chunks and dropped, so memory stays small for any NAR size."""

    def read_exact(n):
        data = reader.read(n)
        if len(data) != n:
            raise NarError("NAR ends early")
        return data

    def padding(n):
        pad = (-n) % 8
        if pad and any(read_exact(pad)):
            raise NarError("non-zero padding")

    def string(limit=4096):
        n = int.from_bytes(read_exact(8), "little")
        if n > limit:
            raise NarError(f"string of {n} bytes where at most {limit} were expected")
        data = read_exact(n) if n else b""
        padding(n)
        return data

    def expect(token):
        got = string(len(token))
        if got != token:
            raise NarError(f"expected {token!r}, got {got!r}")

    def contents():
        n = int.from_bytes(read_exact(8), "little")
        left = n
        while left:
            data = reader.read(min(left, chunk))
            if not data:
                raise NarError("NAR ends early")
            left -= len(data)
        padding(n)

    def node(depth):
        if depth > 256:
            raise NarError("directories nested too deeply")
        expect(b"(")
        expect(b"type")
        kind = string(16)
        if kind == b"regular":
            tag = string(16)
            if tag == b"executable":
                expect(b"")
                tag = string(16)
            if tag != b"contents":
                raise NarError(f"expected 'contents', got {tag!r}")
            contents()
            expect(b")")
        elif kind == b"symlink":
            expect(b"target")
            string(4096)
            expect(b")")
        elif kind == b"directory":
            prev = None
            while True:
                tag = string(16)
                if tag == b")":
                    break
                if tag != b"entry":
                    raise NarError(f"expected 'entry' or ')', got {tag!r}")
                expect(b"(")
                expect(b"name")
                name = string(255)
                if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
                    raise NarError(f"invalid file name {name!r}")
                if prev is not None and name <= prev:
                    raise NarError(f"entry {name!r} is not after {prev!r}")
                prev = name
                expect(b"node")
                node(depth + 1)
                expect(b")")
        else:
            raise NarError(f"unknown node type {kind!r}")

    expect(b"nix-archive-1")
    node(0)
    if reader.read(1):
        raise NarError("trailing bytes after the end of the NAR")
