#!/usr/bin/env python3
"""Proves the Cachix test server against real Nix, with no nixpush code involved.

It builds store paths with real Nix, pushes them through the server's API the way Cachix's own client does
(NAR from `nix-store --dump`, zstd, Content-MD5, presign, PUT, complete), then substitutes them with
`nix copy --from http://127.0.0.1:PORT/NAME` into a fresh store root: with the right public key it succeeds, with
another key Nix refuses ("lacks a valid signature"). Covers a self-signed cache (signature made here with PyNaCl
from a key made by `nix-store --generate-binary-cache-key`), a Cachix-managed cache (the server signs), a private
cache read through netrc, and the server's validation rules and fault knobs.

Run: python3 tests/servers/cachix_selftest.py   (prints one line per check, then "N passed, M failed")
"""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import nacl.signing
import zstandard

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import nixfmt  # noqa: E402
from selftest import build_closure, check, finish, nix_copy, run  # noqa: E402


class Server:
    def __init__(self, workdir, config):
        self.dir = workdir
        config_path = os.path.join(workdir, "server.json")
        with open(config_path, "w") as f:
            json.dump(config, f)
        port_file = os.path.join(workdir, "port")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "cachix_server.py"), "--config", config_path, "--port-file",
             port_file, "--data-dir", os.path.join(workdir, "data")],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while not os.path.exists(port_file):
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit("cachix_server.py did not start")
            time.sleep(0.02)
        with open(port_file) as f:
            self.port = int(f.read())
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def request(self, method, path, body=None, headers=None, url=None):
        """-> (status, headers, body bytes)."""
        data = body
        hdrs = dict(headers or {})
        if body is not None and not isinstance(body, bytes):
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json;charset=utf-8")
        req = urllib.request.Request(url or self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def control(self, method, path, body=None):
        status, _, data = self.request(method, "/_control/" + path, body)
        assert status == 200, (path, status, data)
        return json.loads(data) if data else None


class PathInfo:
    def __init__(self, path):
        self.path = path
        self.base = os.path.basename(path)
        self.store_hash, self.suffix = self.base[:32], self.base[33:]
        self.nar_hash = run(["nix-store", "-q", "--hash", path])
        self.nar_size = int(run(["nix-store", "-q", "--size", path]))
        self.refs = sorted(os.path.basename(r) for r in run(["nix-store", "-q", "--references", path]).split())
        deriver = run(["nix-store", "-q", "--deriver", path])
        self.deriver = "unknown-deriver" if deriver == "unknown-deriver" else os.path.basename(deriver)
        self.nar = subprocess.run(["nix-store", "--dump", path], check=True, capture_output=True).stdout

    def fingerprint(self):
        return nixfmt.fingerprint("/nix/store", self.path, self.nar_hash, self.nar_size, self.refs)


def md5_b64(data):
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def push(server, cache, token, info, signing_key=None, part_size=64 * 1024, compressed=None, tweak=None):
    """Pushes one path like Cachix's client. Returns the complete call's (status, body)."""
    auth = {"Authorization": f"Bearer {token}"}
    api = f"/api/v1/cache/{cache}"
    file_bytes = compressed if compressed is not None else zstandard.ZstdCompressor(level=3).compress(info.nar)
    status, _, body = server.request("POST", f"{api}/multipart-nar?compression=zst", headers=auth)
    assert status == 200, (status, body)
    created = json.loads(body)
    nar_id, upload_id = created["narId"], created["uploadId"]
    q_upload = urllib.parse.quote(upload_id, safe="")
    parts = []
    chunks = [file_bytes[i : i + part_size] for i in range(0, len(file_bytes), part_size)] or [b""]
    if len(file_bytes) % part_size == 0 and file_bytes:
        chunks.append(b"")  # Cachix's chunker emits a final empty part in this case.
    for n, chunk in enumerate(chunks, start=1):
        md5 = md5_b64(chunk)
        status, _, body = server.request(
            "POST", f"{api}/multipart-nar/{nar_id}?uploadId={q_upload}&partNumber={n}", {"contentMD5": md5}, auth
        )
        assert status == 200, (status, body)
        url = json.loads(body)["uploadUrl"]
        status, headers, body = server.request(
            "PUT", None, chunk, {"Content-Type": "application/octet-stream", "Content-MD5": md5}, url=url
        )
        assert status == 200, (status, body)
        parts.append({"partNumber": n, "eTag": headers["ETag"]})
    sig = None
    if signing_key is not None:
        sig = base64.b64encode(signing_key.sign(info.fingerprint()).signature).decode()
    nic = {
        "cStoreHash": info.store_hash,
        "cStoreSuffix": info.suffix,
        "cNarHash": info.nar_hash,
        "cNarSize": info.nar_size,
        "cFileHash": hashlib.sha256(file_bytes).hexdigest(),
        "cFileSize": len(file_bytes),
        "cReferences": info.refs,
        "cDeriver": info.deriver,
        "cSig": sig,
    }
    request = {"parts": parts, "narInfoCreate": nic}
    if tweak is not None:
        tweak(request)
    status, _, body = server.request(
        "POST", f"{api}/multipart-nar/{nar_id}/complete?uploadId={q_upload}", request, auth
    )
    return status, body, nar_id, q_upload, request


def main():
    workdir = tempfile.mkdtemp(prefix="cachix-selftest-")
    keys = {}
    for name in ("self", "other", "managed"):
        sec, pub = os.path.join(workdir, f"{name}.sec"), os.path.join(workdir, f"{name}.pub")
        run(["nix-store", "--generate-binary-cache-key", f"{name}-test-1", sec, pub])
        keys[name] = (sec, open(pub).read().strip())
    _, self_raw = nixfmt.parse_key(open(keys["self"][0]).read(), 64)
    self_key = nacl.signing.SigningKey(self_raw[:32])
    _, other_raw = nixfmt.parse_key(open(keys["other"][0]).read(), 64)
    other_key = nacl.signing.SigningKey(other_raw[:32])

    # Store paths made by real Nix: a two-derivation closure (references + deriver) and an added file big
    # enough (incompressible) to need several parts.
    nonce = base64.b32encode(os.urandom(10)).decode().lower()
    _, closure, big = build_closure(workdir, "cst", nonce, 200_000)
    infos = [PathInfo(p) for p in closure] + [PathInfo(big)]
    check("closure built with references and a deriver", len(closure) == 2 and infos[1].refs and
          infos[1].deriver.endswith(".drv"), str([i.refs for i in infos]))

    config = {
        "caches": [
            {"name": "selfsigned", "signing": "self-signed", "public_keys": [keys["self"][1]],
             "tokens": {"wtok": "write", "rtok": "read"}, "upstream": ["0" * 32]},
            {"name": "managed", "signing": "managed", "secret_key_file": keys["managed"][0],
             "tokens": {"wtok": "write"}, "readonly_status": 403},
            {"name": "private", "public": False, "signing": "managed", "tokens": {"ptok": "write", "prtok": "read"}},
        ]
    }
    server = Server(workdir, config)
    try:
        exercise(server, workdir, keys, self_key, other_key, infos)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    finish()


def exercise(server, workdir, keys, self_key, other_key, infos):
    W = {"Authorization": "Bearer wtok"}
    hashes = [i.store_hash for i in infos]
    paths = [i.path for i in infos]

    # Cache info, auth.
    status, _, body = server.request("GET", "/api/v1/cache/selfsigned", headers=W)
    info = json.loads(body)
    check("GET cache: 7 fields, Write permission", status == 200 and set(info) == {
        "name", "uri", "isPublic", "publicSigningKeys", "githubUsername", "permission",
        "preferredCompressionMethod"} and info["permission"] == "Write" and
        info["uri"] == f"{server.base}/selfsigned", body)
    check("GET cache: unknown cache 404", server.request("GET", "/api/v1/cache/nope", headers=W)[0] == 404)
    check("GET cache: bad token 401",
          server.request("GET", "/api/v1/cache/selfsigned", headers={"Authorization": "Bearer bad"})[0] == 401)
    check("GET cache: private without token 401", server.request("GET", "/api/v1/cache/private")[0] == 401)
    check("create: read-only token 401", server.request(
        "POST", "/api/v1/cache/selfsigned/multipart-nar?compression=zst",
        headers={"Authorization": "Bearer rtok"})[0] == 401)
    check("create: no token 401",
          server.request("POST", "/api/v1/cache/selfsigned/multipart-nar?compression=zst")[0] == 401)
    check("create: compression=zstd 400", server.request(
        "POST", "/api/v1/cache/selfsigned/multipart-nar?compression=zstd", headers=W)[0] == 400)

    # Missing-paths query.
    status, _, body = server.request("POST", "/api/v1/cache/selfsigned/narinfo", hashes + ["0" * 32], W)
    check("missing: all missing, upstream hash filtered", status == 200 and
          sorted(json.loads(body)) == sorted(hashes), body)
    check("missing: 400 on a bad hash",
          server.request("POST", "/api/v1/cache/selfsigned/narinfo", ["e" * 32], W)[0] == 400)
    status, _, body = server.request("POST", "/api/v1/cache/selfsigned/narinfo", ["1" * 32] * 32768, W)
    check("missing: 32768 hashes accepted", status == 200 and len(json.loads(body)) == 32768)

    # Validation on complete: every mistake is a 400 and the upload stays open for a corrected retry.
    big = infos[-1]
    cases = [
        ("uppercase cFileHash", lambda r: r["narInfoCreate"].update(cFileHash=r["narInfoCreate"]["cFileHash"].upper())),
        ("sha256:-prefixed cFileHash", lambda r: r["narInfoCreate"].update(
            cFileHash="sha256:" + r["narInfoCreate"]["cFileHash"])),
        ("wrong cNarHash", lambda r: r["narInfoCreate"].update(cNarHash=infos[0].nar_hash)),
        ("wrong cNarSize", lambda r: r["narInfoCreate"].update(cNarSize=r["narInfoCreate"]["cNarSize"] + 8)),
        ("wrong cFileSize", lambda r: r["narInfoCreate"].update(cFileSize=1)),
        ("parts out of order", lambda r: r["parts"].reverse()),
        ("wrong eTag", lambda r: r["parts"][0].update(eTag='"00000000000000000000000000000000"')),
        ("missing cSig on self-signed", lambda r: r["narInfoCreate"].update(cSig=None)),
        ("full store path reference", lambda r: r["narInfoCreate"].update(cReferences=[infos[0].path])),
    ]
    for name, tweak in cases:
        status, body, *_ = push(server, "selfsigned", "wtok", big, self_key, tweak=tweak)
        check(f"complete rejects {name} with 400", status == 400, f"{status} {body!r}")
    status, body, *_ = push(server, "selfsigned", "wtok", big, other_key)
    check("complete rejects a signature by another key", status == 400, body)
    status, body, nar_id, q_upload, request = push(server, "selfsigned", "wtok", big, self_key,
                                                   tweak=lambda r: r["narInfoCreate"].update(cNarSize=1))
    fixed = json.loads(json.dumps(request))
    fixed["narInfoCreate"]["cNarSize"] = big.nar_size
    url = f"/api/v1/cache/selfsigned/multipart-nar/{nar_id}/complete?uploadId={q_upload}"
    check("a corrected complete succeeds on the same upload", server.request("POST", url, fixed, W)[0] == 200)
    check("a repeated complete answers 200 again", server.request("POST", url, fixed, W)[0] == 200)

    # Push the rest self-signed and read it all back with real Nix.
    for i in infos[:-1]:
        status, body, *_ = push(server, "selfsigned", "wtok", i, self_key, part_size=5 * 1024 * 1024)
        check(f"push {i.base} (self-signed)", status == 200, body)
    status, _, body = server.request("POST", "/api/v1/cache/selfsigned/narinfo", hashes, W)
    check("missing: nothing missing after the push", json.loads(body) == [], body)
    text = server.request("GET", f"/selfsigned/{infos[1].store_hash}.narinfo")[2].decode()
    keys_in_order = [line.split(":")[0] for line in text.splitlines()]
    check("narinfo field order", keys_in_order == ["StorePath", "URL", "Compression", "FileHash", "FileSize",
                                                   "NarHash", "NarSize", "References", "Deriver", "Sig"], text)
    check("narinfo HEAD 200 / 404", server.request("HEAD", f"/selfsigned/{infos[1].store_hash}.narinfo")[0] == 200
          and server.request("HEAD", f"/selfsigned/{'1' * 32}.narinfo")[0] == 404)
    ok, err = nix_copy(workdir, f"{server.base}/selfsigned", keys["self"][1], paths)
    check("nix copy --from self-signed cache with its key", ok, err)
    ok, err = nix_copy(workdir, f"{server.base}/selfsigned", keys["other"][1], paths)
    check("nix copy refuses another key", not ok and "lacks a valid signature" in err, err)

    # Managed cache: no cSig, the server signs; the cache's key comes from GET cache.
    for i in infos:
        status, body, *_ = push(server, "managed", "wtok", i)
        check(f"push {i.base} (managed)", status == 200, body)
    managed_pub = json.loads(server.request("GET", "/api/v1/cache/managed", headers=W)[2])["publicSigningKeys"][0]
    check("managed key is the configured one", managed_pub == keys["managed"][1])
    ok, err = nix_copy(workdir, f"{server.base}/managed", managed_pub, paths)
    check("nix copy --from managed cache with the server's key", ok, err)
    ok, err = nix_copy(workdir, f"{server.base}/managed", keys["self"][1], paths)
    check("nix copy from managed cache refuses another key", not ok and "lacks a valid signature" in err, err)
    status, body, *_ = push(server, "managed", "wtok", infos[0], self_key)
    check("managed cache rejects a cSig", status == 400, body)

    # Private cache: reads need HTTP Basic with the token as password (netrc).
    status, body, *_ = push(server, "private", "ptok", infos[0])
    check("push to private cache", status == 200, body)
    priv_pub = json.loads(server.request("GET", "/api/v1/cache/private",
                                         headers={"Authorization": "Bearer ptok"})[2])["publicSigningKeys"][0]
    check("private read without auth 401", server.request("GET", "/private/nix-cache-info")[0] == 401)
    netrc = os.path.join(workdir, "netrc")
    with open(netrc, "w") as f:
        f.write('machine 127.0.0.1 login "" password prtok\n')
    ok, err = nix_copy(workdir, f"{server.base}/private", priv_pub, [infos[0].path], netrc=netrc)
    check("nix copy from private cache through netrc", ok, err)

    exercise_faults(server, infos)


def exercise_faults(server, infos):
    W = {"Authorization": "Bearer wtok"}
    api = "/api/v1/cache/managed"
    server.control("POST", "reset")
    server.control("POST", "faults", [
        {"route": "cache_info", "action": "status", "status": 429, "retry_after": "7"},
        {"route": "cache_info", "action": "status", "status": 429, "retry_after_date": 30},
        {"route": "cache_info", "action": "status", "status": 502, "problem_retry_after": 60},
        {"route": "cache_info", "action": "status", "status": 503},
    ])
    s1, h1, _ = server.request("GET", api, headers=W)
    s2, h2, _ = server.request("GET", api, headers=W)
    s3, h3, b3 = server.request("GET", api, headers=W)
    s4, _, _ = server.request("GET", api, headers=W)
    s5, _, _ = server.request("GET", api, headers=W)
    check("fault: 429 Retry-After seconds", s1 == 429 and h1["Retry-After"] == "7")
    check("fault: 429 Retry-After HTTP-date", s2 == 429 and h2["Retry-After"].endswith("GMT"))
    check("fault: 502 problem+json retry_after", s3 == 502 and h3["Content-Type"] == "application/problem+json"
          and json.loads(b3)["retry_after"] == 60 and "Retry-After" not in h3)
    check("fault: 503 then normal", s4 == 503 and s5 == 200)

    # Expired presign -> 403 "Request has expired"; bad MD5 -> 400 BadDigest; wrong presigned MD5 -> 403.
    status, _, body = server.request("POST", f"{api}/multipart-nar?compression=zst", headers=W)
    created = json.loads(body)
    nar_id, q_upload = created["narId"], urllib.parse.quote(created["uploadId"], safe="")
    presign = f"{api}/multipart-nar/{nar_id}?uploadId={q_upload}&partNumber=1"
    data = b"x" * 1000
    server.control("POST", "faults", {"route": "presign", "action": "expired_presign"})
    url = json.loads(server.request("POST", presign, {"contentMD5": md5_b64(data)}, W)[2])["uploadUrl"]
    status, _, body = server.request("PUT", None, data, {"Content-MD5": md5_b64(data)}, url=url)
    check("fault: expired presign -> 403 Request has expired", status == 403 and b"Request has expired" in body)
    url = json.loads(server.request("POST", presign, {"contentMD5": md5_b64(data)}, W)[2])["uploadUrl"]
    status, _, body = server.request("PUT", None, b"y" * 1000, {"Content-MD5": md5_b64(data)}, url=url)
    check("PUT body not matching Content-MD5 -> 400 BadDigest", status == 400 and b"BadDigest" in body)
    status, _, _ = server.request("PUT", None, data, {"Content-MD5": md5_b64(b"z")}, url=url)
    check("PUT with a Content-MD5 other than presigned -> 403", status == 403)
    status, _, _ = server.request("PUT", None, data, {"Content-MD5": md5_b64(data)}, url=url.replace("X-Signature=", "X-Signature=0"))
    check("PUT with a bad signature -> 403", status == 403)
    server.control("POST", "faults", {"route": "put_part", "action": "no_etag"})
    status, headers, _ = server.request("PUT", None, data, {"Content-MD5": md5_b64(data)}, url=url)
    check("fault: PUT without ETag", status == 200 and "ETag" not in headers)
    status, headers, _ = server.request("PUT", None, data, {"Content-MD5": md5_b64(data)}, url=url)
    check("PUT answers a quoted ETag", headers["ETag"] == f'"{hashlib.md5(data).hexdigest()}"')
    server.control("POST", "faults", {"route": "put_part", "action": "reset_after_bytes", "bytes": 100})
    try:
        server.request("PUT", None, data, {"Content-MD5": md5_b64(data)}, url=url)
        reset = False
    except (ConnectionError, urllib.error.URLError, OSError):
        reset = True
    check("fault: connection reset mid-part", reset)
    status, _, _ = server.request("POST", f"{api}/multipart-nar/{nar_id}/abort?uploadId={q_upload}", headers=W)
    check("abort 200", status == 200)
    status, _, _ = server.request("PUT", None, data, {"Content-MD5": md5_b64(data)}, url=url)
    check("PUT after abort -> 404", status == 404)

    # Reset before complete's response: the path is stored although the client saw no answer.
    server.control("POST", "faults", {"route": "complete", "action": "reset_before_response"})
    try:
        status, body, *_ = push(server, "managed", "wtok", infos[0])
        lost = False
    except (ConnectionError, urllib.error.URLError, OSError):
        lost = True
    stored = server.control("GET", "paths/managed")
    check("fault: complete applied but response lost", lost and stored == [infos[0].path], str(stored))
    server.control("POST", "faults", [{"route": "presign", "action": "presign_ttl", "seconds": 1},
                                      {"route": "put_part", "action": "slow_body", "bytes_per_sec": 40000}])
    try:
        push(server, "managed", "wtok", infos[-1])
        expired = False
    except AssertionError as e:
        expired = "Request has expired" in str(e)
    check("fault: a PUT slowed past its presign expiry gets 403", expired)
    server.control("POST", "faults", [{"route": "read_cache_info", "action": "delay", "seconds": 0.3},
                                      {"route": "read_cache_info", "action": "trickle", "bytes_per_sec": 100}])
    start = time.time()
    delayed = server.request("GET", "/managed/nix-cache-info")[0] == 200 and time.time() - start >= 0.3
    start = time.time()
    body = server.request("GET", "/managed/nix-cache-info")[2]
    check("fault: delay and trickle", delayed and body.startswith(b"StoreDir") and time.time() - start >= 0.3)
    server.control("POST", "faults", {"route": "narinfo_bulk", "action": "extra_missing"})
    status, _, body = server.request("POST", f"{api}/narinfo", [infos[0].store_hash], W)
    check("fault: missing-paths lists a present hash", json.loads(body) == [infos[0].store_hash])
    state = server.control("GET", "state")
    check("state counts uploads", state["caches"]["managed"]["uploads"] == {"open": 1, "aborted": 1, "completed": 1},
          str(state["caches"]["managed"]["uploads"]))
    log = server.control("GET", "log")
    check("request log records routes and faults", any(e["route"] == "put_part" and e["fault"] == "no_etag"
                                                       and e["auth"] == "none" for e in log))


if __name__ == "__main__":
    main()
