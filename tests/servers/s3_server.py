#!/usr/bin/env python3
"""A real S3-compatible server (moto's server mode) on 127.0.0.1 for nixpush's tests.

Start:
    python3 tests/servers/s3_server.py --port-file PORTFILE [--bucket NAME]...
It binds 127.0.0.1 on an ephemeral port, creates each --bucket with the `public-read` ACL, then writes the port to
PORTFILE atomically (temp file + rename; the buckets exist once the file does) and prints
`listening on 127.0.0.1:PORT`. It runs until killed (SIGTERM/SIGINT).

Addressing: path-style, `http://127.0.0.1:PORT/BUCKET/KEY`. moto accepts any access key id and secret and any
region (tests use `AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test`, region `us-east-1`), but it does parse
SigV4 and multipart uploads for real.

Reading a bucket with Nix: Debian's Nix 2.8 has no S3 store, so Nix reads the bucket as an HTTP binary cache at
`http://127.0.0.1:PORT/BUCKET`. Nix sends anonymous GET and HEAD; moto answers anonymous HEAD only when the bucket's
ACL is `public-read` (a bucket policy allowing s3:GetObject is not enough), hence the ACL above. To make such a
bucket yourself, send `PUT /BUCKET` with header `x-amz-acl: public-read` (SigV4-signed, or with boto3:
`boto3.client("s3", endpoint_url=URL).create_bucket(Bucket=NAME, ACL="public-read")`).
"""

import argparse
import logging
import os
import signal
import sys
import threading

os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import boto3  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import announce  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = ephemeral)")
    parser.add_argument("--port-file", help="write the chosen port here (atomically), once the buckets exist")
    parser.add_argument("--bucket", action="append", default=[], help="create this public-read bucket")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args()
    if not args.verbose:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    for bucket in args.bucket:
        client.create_bucket(Bucket=bucket, ACL="public-read")
    announce(port, args.port_file)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
