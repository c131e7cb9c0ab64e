#!/usr/bin/env python3
"""Proves the local S3 server (s3_server.py, moto) works as a Nix binary cache, with no nixpush code involved.

Builds a small closure with real Nix, writes a signed binary cache with `nix copy --to file://DIR`, uploads every
file of it to a public-read bucket with boto3 (the NAR of the largest path as a multipart upload), then substitutes
the closure with `nix copy --from http://127.0.0.1:PORT/BUCKET` into a fresh store root: it succeeds with the
cache's key and fails with another ("lacks a valid signature").

Run: python3 tests/servers/s3_selftest.py   (prints one line per check, then "N passed, M failed")
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")

import boto3  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from selftest import NIX, build_closure, check, finish, nix_copy, run  # noqa: E402

CONTENT_TYPES = {"nix-cache-info": "text/x-nix-cache-info", ".narinfo": "text/x-nix-narinfo"}


def start_server(workdir, bucket):
    port_file = os.path.join(workdir, "port")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "s3_server.py"), "--port-file", port_file, "--bucket", bucket],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit("s3_server.py did not start")
        time.sleep(0.05)
    with open(port_file) as f:
        return proc, int(f.read())


def main():
    workdir = tempfile.mkdtemp(prefix="s3-selftest-")
    bucket = "nixpush-selftest"
    proc, port = start_server(workdir, bucket)
    try:
        exercise(workdir, port, bucket)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
    finish()


def exercise(workdir, port, bucket):
    for name in ("good", "other"):
        run(["nix-store", "--generate-binary-cache-key", f"{name}-test-1", f"{workdir}/{name}.sec",
             f"{workdir}/{name}.pub"])
    good_pub = open(f"{workdir}/good.pub").read()
    other_pub = open(f"{workdir}/other.pub").read()
    nonce = os.urandom(8).hex()
    top, closure, big = build_closure(workdir, "s3st", nonce, 12 << 20)
    paths = closure + [big]

    cache = os.path.join(workdir, "cache")
    run(NIX + ["copy", "--to", f"file://{cache}?compression=zstd&secret-key={workdir}/good.sec"] + paths)

    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    multipart = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    keys = []
    for dirpath, _, files in os.walk(cache):
        for name in files:
            full = os.path.join(dirpath, name)
            key = os.path.relpath(full, cache)
            content_type = CONTENT_TYPES.get(name) or CONTENT_TYPES.get(os.path.splitext(name)[1]) \
                or "application/x-nix-nar"
            s3.upload_file(full, bucket, key, ExtraArgs={"ContentType": content_type}, Config=multipart)
            keys.append(key)
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    check("every cache file is in the bucket", listed == sorted(keys), str(listed))
    big_nar = max((k for k in keys if k.startswith("nar/")), key=lambda k: os.path.getsize(os.path.join(cache, k)))
    etag = s3.head_object(Bucket=bucket, Key=big_nar)["ETag"]
    check("the big NAR went up as a multipart upload", etag.strip('"').endswith("-3"), etag)

    # Anonymous reads as Nix does them.
    with urllib.request.urlopen(f"{endpoint}/{bucket}/nix-cache-info") as r:
        check("anonymous GET nix-cache-info", r.read().startswith(b"StoreDir: /nix/store"))
    req = urllib.request.Request(f"{endpoint}/{bucket}/{os.path.basename(top)[:32]}.narinfo", method="HEAD")
    with urllib.request.urlopen(req) as r:
        check("anonymous HEAD narinfo", r.status == 200)
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}/{'1' * 32}.narinfo", method="HEAD"))
        absent = False
    except urllib.error.HTTPError as e:
        absent = e.code == 404
    check("anonymous HEAD of an absent narinfo is 404", absent)

    ok, err = nix_copy(workdir, f"{endpoint}/{bucket}", good_pub, paths)
    check("nix copy --from the bucket (HTTP cache) with the key", ok, err)
    ok, err = nix_copy(workdir, f"{endpoint}/{bucket}", other_pub, paths)
    check("nix copy from the bucket refuses another key", not ok and "lacks a valid signature" in err, err)


if __name__ == "__main__":
    main()
