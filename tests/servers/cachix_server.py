#!/usr/bin/env python3
"""A local Cachix server for nixpush's tests: the push API, the object store behind presigned URLs, and each
cache's Nix-facing binary cache, all on one 127.0.0.1 port. It follows cachix-api.md section 10.

Start:
    python3 tests/servers/cachix_server.py --config caches.json --port-file PORTFILE [--data-dir DIR]
It binds 127.0.0.1 on an ephemeral port (or --port), writes the port number to PORTFILE atomically (temp file +
rename, so a reader sees the whole number or nothing) and prints `listening on 127.0.0.1:PORT`.

URL layout (PORT is the chosen port, NAME a cache):
    http://127.0.0.1:PORT                       API base (`cachix_api`); routes under /api/v1/
    http://127.0.0.1:PORT/NAME                  the cache's `uri`: nix-cache-info, <hash>.narinfo, nar/<file>
    http://127.0.0.1:PORT/_s3/<narId>?...       presigned part URLs (HMAC-signed, expiring)
    http://127.0.0.1:PORT/_control/...          test introspection and fault injection (no auth)

Config file (JSON):
    {"store_dir": "/nix/store",
     "caches": [{"name": "mycache",
                 "public": true,                      # reads without auth; API reads without a token
                 "tokens": {"TOKEN": "write", "RTOKEN": "read"},
                 "signing": "managed",                # or "self-signed"
                 "secret_key_file": "/path/key.sec",  # managed: Nix secret key file (generated if absent)
                 "secret_key": "name:base64",         # managed: the same, inline
                 "public_keys": ["name:base64"],      # self-signed: registered public keys
                 "preferred_compression": "ZSTD",     # or "XZ"
                 "upstream": ["<32-char store hash>"],# reported present, never served
                 "presign_ttl": 300,                  # seconds
                 "readonly_status": 401,              # status for a read-only token on a write route (401|403)
                 "keyless_push": false,               # self-signed public cache accepts `Bearer ` + a valid cSig
                 "managed_sig": "reject",             # managed cache given a non-null cSig: "reject" (400)|"ignore"
                 "reject_null_parts": false,          # complete with parts: null -> 400
                 "abort_unknown_status": 404,         # abort of an unknown upload (404|200)
                 "bulk_max_bytes": null,              # missing-paths body limit -> 413
                 "nar_redirect": false,               # GET nar/<file> answers 302 to /_blob/NAME/nar/<file>
                 "check_nar": true}]}                 # parse the decompressed NAR on complete

Control endpoints:
    GET  /_control/log              JSON request log: [{seq,time,duration,method,route,path,status,cache,
                                    narId,partNumber,fault,auth,bytes}]
    GET  /_control/state            {caches: {NAME: {paths, uploads: {open, aborted, completed}, publicSigningKeys}},
                                    faults: [...remaining]}
    GET  /_control/paths/NAME       the store paths NAME holds
    POST /_control/reset            forget stored paths, uploads, log and faults (cache config stays)
    POST /_control/faults           add one fault or a list of faults (below); GET lists them; DELETE clears
    POST /_control/cache/NAME       merge JSON into NAME's config (e.g. {"tokens": {}} to revoke every token)

Faults: {"route": R, "action": A, ...params, "count": N, "probability": P, "after": M,
         "match": {"cache": NAME, "narId": ID, "partNumber": N}}
    R: cache_info, narinfo_bulk, create, presign, put_part, complete, abort, add_key, api_narinfo,
       read_cache_info, read_narinfo, read_nar, or "*". The first matching fault with count left applies; `after`
       lets M matching requests through first; without `count` a fault applies once, or forever when it has a
       `probability`.
    A:  status            {"status": 429|500|502|503|401|403|404|400, "retry_after": "5" (header value, seconds),
                           "retry_after_date": 5 (header as an HTTP-date 5 s ahead), "problem_retry_after": 60
                           (502-style application/problem+json body {"retry_after": 60} without a header),
                           "body": "text"}
        reset_after_bytes {"bytes": K}: read K bytes of the request body, then reset the connection
        reset_before_response: handle the request fully (e.g. complete applies), then reset instead of answering
        delay             {"seconds": D} before the response headers, then answer normally
        trickle           {"bytes_per_sec": R}: send the response body at that rate
        slow_body         {"bytes_per_sec": R}: read the request body at that rate (pushes a PUT past its expiry)
        expired_presign   presign answers a URL that has already expired
        presign_ttl       {"seconds": T}: presign answers a URL that expires after T seconds
        presign_elsewhere {"base": "http://host:port"}: presign answers a URL on another host
        no_etag           put_part succeeds without an ETag header
        wrong_etag        put_part answers an ETag that is not the part's
        omit_missing      {"hashes": [...]} (default: all): missing-paths answer leaves out hashes that are missing
        extra_missing     {"hashes": [...]} (default: all requested): answer lists present hashes as missing
"""

import argparse
import base64
import binascii
import email.utils
import hashlib
import hmac
import io
import json
import lzma
import os
import random
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import nacl.exceptions
import nacl.signing
import zstandard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nixfmt  # noqa: E402
from serving import announce, write_atomic  # noqa: E402

CHUNK = 1 << 20
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
NAR_HASH_RE = re.compile(r"^sha256:[0-9a-df-np-sv-z]{52}$")
COMPRESSIONS = {"zst": ("zstd", ".nar.zst"), "xz": ("xz", ".nar.xz")}
PREFERRED_TO_QUERY = {"ZSTD": "zst", "XZ": "xz"}


class HttpError(Exception):
    def __init__(self, status, body, content_type="text/plain; charset=utf-8", headers=None):
        super().__init__(body)
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}


def s3_error(status, code, message):
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return HttpError(status, body, "application/xml")


class ResetConnection(Exception):
    """Raised to drop the connection with a TCP reset instead of answering."""


class Cache:
    def __init__(self, conf, data_dir):
        self.conf = {
            "public": True,
            "tokens": {},
            "signing": "managed",
            "public_keys": [],
            "preferred_compression": "ZSTD",
            "upstream": [],
            "presign_ttl": 300,
            "readonly_status": 401,
            "keyless_push": False,
            "managed_sig": "reject",
            "reject_null_parts": False,
            "abort_unknown_status": 404,
            "bulk_max_bytes": None,
            "nar_redirect": False,
            "check_nar": True,
        }
        self.conf.update(conf)
        self.name = conf["name"]
        if not re.match(r"^[a-z0-9][a-z0-9-]*$", self.name) or self.name == "api":
            raise SystemExit(f"invalid cache name {self.name!r}")
        if self.conf["signing"] not in ("managed", "self-signed"):
            raise SystemExit(f"cache {self.name}: signing must be managed or self-signed")
        self.dir = os.path.join(data_dir, "caches", self.name)
        os.makedirs(os.path.join(self.dir, "nar"), exist_ok=True)
        self.signing_key = None
        self.key_name = None
        if self.conf["signing"] == "managed":
            text = self.conf.get("secret_key")
            if text is None and self.conf.get("secret_key_file"):
                with open(self.conf["secret_key_file"]) as f:
                    text = f.read()
            if text is not None:
                self.key_name, raw = nixfmt.parse_key(text, 64)
                self.signing_key = nacl.signing.SigningKey(raw[:32])
            else:
                self.key_name = f"{self.name}.cachix.org-1"
                self.signing_key = nacl.signing.SigningKey.generate()

    def public_signing_keys(self):
        if self.conf["signing"] == "managed":
            pk = base64.b64encode(bytes(self.signing_key.verify_key)).decode()
            return [f"{self.key_name}:{pk}"]
        return list(self.conf["public_keys"])

    def stored_paths(self):
        out = []
        for entry in sorted(os.listdir(self.dir)):
            if entry.endswith(".narinfo"):
                with open(os.path.join(self.dir, entry)) as f:
                    for line in f:
                        if line.startswith("StorePath: "):
                            out.append(line[len("StorePath: ") :].strip())
        return out

    def has(self, store_hash):
        return os.path.exists(os.path.join(self.dir, store_hash + ".narinfo"))


class Upload:
    def __init__(self, cache, nar_id, upload_id, compression, directory):
        self.cache = cache
        self.nar_id = nar_id
        self.upload_id = upload_id
        self.compression = compression
        self.dir = directory
        self.created = time.time()
        self.state = "open"  # open | completed | aborted
        self.etags = {}  # part number -> ETag issued for the latest PUT (quoted hex md5)
        self.completed_with = None
        self.lock = threading.Lock()


class State:
    def __init__(self, config, data_dir):
        self.data_dir = data_dir
        self.store_dir = config.get("store_dir", "/nix/store")
        self.lock = threading.Lock()
        self.secret = os.urandom(32)
        self.caches = {}
        for conf in config["caches"]:
            cache = Cache(conf, data_dir)
            self.caches[cache.name] = cache
        self.reset()

    def reset(self):
        with self.lock:
            self.uploads = {}
            self.log = []
            self.faults = []
            self.seq = 0
            shutil.rmtree(os.path.join(self.data_dir, "uploads"), ignore_errors=True)
            os.makedirs(os.path.join(self.data_dir, "uploads"), exist_ok=True)
            for cache in self.caches.values():
                shutil.rmtree(cache.dir, ignore_errors=True)
                os.makedirs(os.path.join(cache.dir, "nar"), exist_ok=True)

    def add_faults(self, faults):
        for fault in faults:
            if "route" not in fault or "action" not in fault:
                raise HttpError(400, "a fault needs route and action")
            fault = dict(fault)
            if "count" not in fault:
                fault["count"] = None if "probability" in fault else 1
            fault.setdefault("after", 0)
            fault.setdefault("probability", 1.0)
            fault.setdefault("match", {})
            fault["applied"] = 0
            with self.lock:
                self.faults.append(fault)

    def take_fault(self, route, info):
        with self.lock:
            for fault in self.faults:
                if fault["route"] not in (route, "*"):
                    continue
                if any(info.get(k) != v for k, v in fault["match"].items()):
                    continue
                if fault["count"] is not None and fault["count"] <= 0:
                    continue
                if fault["after"] > 0:
                    fault["after"] -= 1
                    continue
                if random.random() >= fault["probability"]:
                    continue
                if fault["count"] is not None:
                    fault["count"] -= 1
                fault["applied"] += 1
                return fault
        return None

    def record(self, entry):
        with self.lock:
            self.seq += 1
            entry["seq"] = self.seq
            self.log.append(entry)

    def sign(self, nar_id, part, upload_id, md5, expires):
        msg = f"{nar_id}\n{part}\n{upload_id}\n{md5}\n{expires}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()


def http_date(ts):
    return email.utils.formatdate(ts, usegmt=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cachix-test-server"
    state: State = None  # set by main()

    def log_message(self, fmt, *args):
        if os.environ.get("CACHIX_SERVER_VERBOSE"):
            sys.stderr.write("%s - %s\n" % (self.address_string(), fmt % args))

    # ---------- plumbing ----------

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self):
        self.dispatch()

    def do_HEAD(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def do_PUT(self):
        self.dispatch()

    def do_DELETE(self):
        self.dispatch()

    def content_length(self):
        value = self.headers.get("Content-Length")
        if value is None:
            if self.headers.get("Transfer-Encoding"):
                raise HttpError(411, "chunked request bodies are not supported; send Content-Length")
            return 0
        try:
            n = int(value)
        except ValueError:
            raise HttpError(400, f"bad Content-Length {value!r}")
        if n < 0:
            raise HttpError(400, f"bad Content-Length {value!r}")
        return n

    def read_body(self, limit=64 << 20):
        n = self.content_length()
        self.body_left = 0
        if n > limit:
            self.body_left = n
            raise HttpError(413, f"request body of {n} bytes is too large")
        data = self.read_exact(n)
        return data

    def read_exact(self, n):
        chunks = []
        while n > 0:
            chunk = self.rfile.read(min(n, CHUNK))
            if not chunk:
                raise ResetConnection()
            chunks.append(chunk)
            n -= len(chunk)
        self.body_left = 0
        return b"".join(chunks)

    def drain_body(self):
        """Discards an unread request body so the connection can serve the next request."""
        n = self.body_left
        if n is None:
            try:
                n = self.content_length()
            except HttpError:
                self.close_connection = True
                return
        while n > 0:
            chunk = self.rfile.read(min(n, CHUNK))
            if not chunk:
                self.close_connection = True
                return
            n -= len(chunk)
        self.body_left = 0

    def reset_connection(self):
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.connection.close()
        except OSError:
            pass

    def send(self, status, body=b"", content_type="text/plain; charset=utf-8", headers=None):
        if isinstance(body, str):
            body = body.encode()
        fault = self.fault
        self.before_response()
        self.record(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.status = status
        if self.command != "HEAD":
            if fault is not None and fault["action"] == "trickle":
                rate = max(1, int(fault.get("bytes_per_sec", 1024)))
                step = max(1, rate // 10)
                for i in range(0, len(body), step):
                    self.wfile.write(body[i : i + step])
                    self.wfile.flush()
                    time.sleep(step / rate)
            else:
                self.wfile.write(body)

    def send_json(self, status, value, headers=None):
        self.send(status, json.dumps(value), "application/json;charset=utf-8", headers)

    def before_response(self):
        if self.fault is not None and self.fault["action"] == "delay":
            time.sleep(float(self.fault.get("seconds", 1)))
        if self.body_left != 0:
            self.drain_body()

    def send_file(self, path, content_type):
        size = os.path.getsize(path)
        self.before_response()
        self.record(200)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.status = 200
        if self.command == "HEAD":
            return
        rate = None
        if self.fault is not None and self.fault["action"] == "trickle":
            rate = max(1, int(self.fault.get("bytes_per_sec", 1024)))
        with open(path, "rb") as f:
            while True:
                chunk = f.read(CHUNK if rate is None else max(1, rate // 10))
                if not chunk:
                    break
                self.wfile.write(chunk)
                if rate is not None:
                    self.wfile.flush()
                    time.sleep(len(chunk) / rate)

    def dispatch(self):
        st = self.state
        self.fault = None
        self.status = None
        self.body_left = None
        self.info = {"cache": None, "narId": None, "partNumber": None}
        parsed = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        segments = [urllib.parse.unquote(s) for s in parsed.path.split("/")[1:]]
        route, handler, args = self.route(segments)
        self.entry = entry = {
            "time": time.time(),
            "method": self.command,
            "route": route,
            "path": parsed.path,
            "auth": self.auth_kind(),
            "bytes": self.headers.get("Content-Length"),
        }
        try:
            try:
                if handler is None:
                    raise HttpError(404, "no such route")
                self.info["cache"] = args[0] if args and route not in ("control", "put_part") else None
                if route == "put_part":
                    self.info["narId"] = args[0]
                    self.info["partNumber"] = self.int_query("partNumber", required=False)
                elif route in ("presign", "complete", "abort"):
                    self.info["narId"] = args[1]
                    if route == "presign":
                        self.info["partNumber"] = self.int_query("partNumber", required=False)
                if route != "control":
                    self.fault = st.take_fault(route, self.info)
                if self.fault is not None:
                    self.apply_early_fault()
                handler(*args)
            except HttpError as e:
                self.send(e.status, e.body, e.content_type, e.headers)
        except (ResetConnection, ConnectionError, BrokenPipeError):
            self.record("reset")
            self.reset_connection()
            self.status = "reset"
        finally:
            self.record(self.status)

    def record(self, status):
        """Logs the request once, before its response goes out, so a client never sees an answer that the log
        does not show yet."""
        entry = self.entry
        if entry is None:
            return
        self.entry = None
        entry.update(self.info)
        entry["duration"] = round(time.time() - entry["time"], 6)
        entry["status"] = status
        entry["fault"] = self.fault["action"] if self.fault else None
        if entry["route"] != "control":
            self.state.record(entry)

    def apply_early_fault(self):
        fault = self.fault
        action = fault["action"]
        if action == "status":
            status = int(fault.get("status", 500))
            headers = {}
            body = fault.get("body", f"injected {status}")
            content_type = "text/plain; charset=utf-8"
            if "retry_after" in fault:
                headers["Retry-After"] = str(fault["retry_after"])
            if "retry_after_date" in fault:
                headers["Retry-After"] = http_date(time.time() + float(fault["retry_after_date"]))
            if "problem_retry_after" in fault:
                content_type = "application/problem+json"
                body = json.dumps(
                    {
                        "type": "https://developers.cloudflare.com/support/troubleshooting/cloudflare-errors/",
                        "title": "Error 502: Bad gateway",
                        "status": status,
                        "retry_after": int(fault["problem_retry_after"]),
                    }
                )
            raise HttpError(status, body, content_type, headers)
        if action == "reset_after_bytes":
            k = int(fault.get("bytes", 0))
            n = self.content_length()
            self.read_exact(min(k, n))
            raise ResetConnection()

    # ---------- routing ----------

    def route(self, s):
        m = self.command
        if s and s[0] == "api":
            if len(s) >= 4 and s[1] == "v1" and s[2] == "cache":
                name, rest = s[3], s[4:]
                if not rest and m == "GET":
                    return "cache_info", self.h_cache_info, [name]
                if rest == ["narinfo"] and m == "POST":
                    return "narinfo_bulk", self.h_narinfo_bulk, [name]
                if rest == ["multipart-nar"] and m == "POST":
                    return "create", self.h_create, [name]
                if len(rest) == 2 and rest[0] == "multipart-nar" and m == "POST":
                    return "presign", self.h_presign, [name, rest[1]]
                if len(rest) == 3 and rest[0] == "multipart-nar" and rest[2] == "complete" and m == "POST":
                    return "complete", self.h_complete, [name, rest[1]]
                if len(rest) == 3 and rest[0] == "multipart-nar" and rest[2] == "abort" and m == "POST":
                    return "abort", self.h_abort, [name, rest[1]]
                if rest == ["key"] and m == "POST":
                    return "add_key", self.h_add_key, [name]
                if rest == ["nix-cache-info"] and m == "GET":
                    return "api_cache_info_text", self.h_api_nix_cache_info, [name]
                if len(rest) == 1 and rest[0].endswith(".narinfo") and m in ("GET", "HEAD"):
                    return "api_narinfo", self.h_api_narinfo, [name, rest[0][: -len(".narinfo")]]
            return "unknown", None, []
        if s and s[0] == "_s3":
            if len(s) == 2 and m == "PUT":
                return "put_part", self.h_put_part, [s[1]]
            return "unknown", None, []
        if s and s[0] == "_blob":
            if len(s) == 4 and s[2] == "nar" and m in ("GET", "HEAD"):
                return "read_nar", self.h_read_nar_blob, [s[1], s[3]]
            return "unknown", None, []
        if s and s[0] == "_control":
            return "control", self.h_control, [s[1:]]
        if len(s) >= 2 and m in ("GET", "HEAD"):
            name, rest = s[0], s[1:]
            if rest == ["nix-cache-info"]:
                return "read_cache_info", self.h_read_cache_info, [name]
            if len(rest) == 1 and rest[0].endswith(".narinfo"):
                return "read_narinfo", self.h_read_narinfo, [name, rest[0][: -len(".narinfo")]]
            if len(rest) == 2 and rest[0] == "nar":
                return "read_nar", self.h_read_nar, [name, rest[1]]
        return "unknown", None, []

    # ---------- auth ----------

    def auth_kind(self):
        value = self.headers.get("Authorization")
        if value is None:
            return "none"
        if value == "Bearer ":
            return "bearer-empty"
        if value.startswith("Bearer "):
            return "bearer"
        if value.startswith("Basic "):
            return "basic"
        return "other"

    def cache_or_404(self, name):
        cache = self.state.caches.get(name)
        if cache is None:
            raise HttpError(404, f"Binary cache {name} does not exist.")
        return cache

    def api_auth(self, cache, write, keyless_ok=False):
        """Returns the caller's scope: None (anonymous), "read" or "write"."""
        value = self.headers.get("Authorization", "")
        token = value[len("Bearer ") :] if value.startswith("Bearer ") else ""
        scope = None
        if token:
            scope = cache.conf["tokens"].get(token)
            if scope is None:
                raise HttpError(401, f'Cachix Auth token for {cache.name} is invalid or has expired.')
        if write:
            if scope == "write":
                return scope
            if scope is None and keyless_ok and cache.conf["keyless_push"] and cache.conf["public"]:
                return None
            if scope == "read":
                raise HttpError(int(cache.conf["readonly_status"]), f"This token cannot write to {cache.name}.")
            raise HttpError(401, f"Binary cache {cache.name} doesn't exist or you don't have access.")
        if scope is None and not cache.conf["public"]:
            raise HttpError(401, f"Binary cache {cache.name} doesn't exist or you don't have access.")
        return scope

    def read_auth(self, cache):
        if cache.conf["public"]:
            return
        value = self.headers.get("Authorization", "")
        if value.startswith("Basic "):
            try:
                _, _, password = base64.b64decode(value[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                password = ""
            if cache.conf["tokens"].get(password) in ("read", "write"):
                return
        raise HttpError(401, "authentication required", headers={"WWW-Authenticate": f'Basic realm="{cache.name}"'})

    # ---------- API ----------

    def h_cache_info(self, name):
        cache = self.cache_or_404(name)
        scope = self.api_auth(cache, write=False)
        host = f"127.0.0.1:{self.server.server_address[1]}"
        self.send_json(
            200,
            {
                "name": cache.name,
                "uri": f"http://{host}/{cache.name}",
                "isPublic": bool(cache.conf["public"]),
                "publicSigningKeys": cache.public_signing_keys(),
                "githubUsername": "nixpush-test",
                "permission": "Write" if scope == "write" else "Read",
                "preferredCompressionMethod": cache.conf["preferred_compression"],
            },
        )

    def h_narinfo_bulk(self, name):
        cache = self.cache_or_404(name)
        self.api_auth(cache, write=False)
        limit = cache.conf["bulk_max_bytes"]
        body = self.read_body(limit if limit is not None else 64 << 20)
        try:
            hashes = json.loads(body)
        except ValueError:
            raise HttpError(400, "body is not JSON")
        if not isinstance(hashes, list):
            raise HttpError(400, "body is not a JSON array")
        for h in hashes:
            if not isinstance(h, str) or not nixfmt.STORE_HASH_RE.match(h):
                raise HttpError(400, f"not a store hash: {h!r}")
        upstream = set(cache.conf["upstream"])
        missing = [h for h in hashes if h not in upstream and not cache.has(h)]
        fault = self.fault
        if fault is not None and fault["action"] == "omit_missing":
            omit = set(fault.get("hashes", missing))
            missing = [h for h in missing if h not in omit]
        if fault is not None and fault["action"] == "extra_missing":
            extra = fault.get("hashes", hashes)
            missing = list(dict.fromkeys(missing + [h for h in extra if h in hashes]))
        self.send_json(200, missing)

    def h_create(self, name):
        cache = self.cache_or_404(name)
        self.api_auth(cache, write=True, keyless_ok=True)
        self.read_body()
        values = self.query.get("compression")
        compression = values[0] if values else PREFERRED_TO_QUERY[cache.conf["preferred_compression"]]
        if compression not in COMPRESSIONS:
            raise HttpError(400, f"Error parsing query parameter compression failed: Wrong compression method: {compression}")
        nar_id = str(uuid.uuid4())
        b64 = base64.b64encode(os.urandom(33)).decode()
        upload_id = f"{b64[:20]}/{b64[20:]}+x=="
        directory = os.path.join(self.state.data_dir, "uploads", nar_id)
        os.makedirs(directory)
        with self.state.lock:
            self.state.uploads[nar_id] = Upload(cache.name, nar_id, upload_id, compression, directory)
        self.info["narId"] = nar_id
        self.send_json(200, {"narId": nar_id, "uploadId": upload_id})

    def int_query(self, key, required=True):
        values = self.query.get(key)
        if not values:
            if required:
                raise HttpError(400, f"missing query parameter {key}")
            return None
        try:
            return int(values[0])
        except ValueError:
            if required:
                raise HttpError(400, f"query parameter {key} is not an integer: {values[0]!r}")
            return None

    def upload_or_error(self, cache, nar_id, require_open=True):
        if not UUID_RE.match(nar_id):
            raise HttpError(400, f"narId is not a UUID: {nar_id!r}")
        upload = self.state.uploads.get(nar_id)
        if upload is None or upload.cache != cache.name:
            raise HttpError(404, f"NoSuchUpload: {nar_id}")
        values = self.query.get("uploadId")
        if not values:
            raise HttpError(400, "missing query parameter uploadId")
        if values[0] != upload.upload_id:
            raise HttpError(400, "uploadId does not match this narId")
        if require_open and upload.state != "open":
            raise HttpError(404, f"NoSuchUpload: {nar_id} is {upload.state}")
        return upload

    def h_presign(self, name, nar_id):
        cache = self.cache_or_404(name)
        self.api_auth(cache, write=True, keyless_ok=True)
        body = self.read_body()
        upload = self.upload_or_error(cache, nar_id)
        part = self.int_query("partNumber")
        if not 1 <= part <= 10000:
            raise HttpError(400, f"partNumber {part} is not in 1..10000")
        try:
            md5 = json.loads(body)["contentMD5"]
            if not isinstance(md5, str) or len(md5) != 24 or len(base64.b64decode(md5, validate=True)) != 16:
                raise ValueError
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise HttpError(400, 'body must be {"contentMD5": "<24-char base64 of 16 bytes>"}')
        ttl = float(cache.conf["presign_ttl"])
        if self.fault is not None and self.fault["action"] == "expired_presign":
            ttl = -1
        if self.fault is not None and self.fault["action"] == "presign_ttl":
            ttl = float(self.fault.get("seconds", 1))
        expires = int(time.time() + ttl) if ttl >= 0 else int(time.time()) - 1
        sig = self.state.sign(nar_id, part, upload.upload_id, md5, expires)
        query = urllib.parse.urlencode(
            {
                "partNumber": part,
                "uploadId": upload.upload_id,
                "X-Content-MD5": md5,
                "X-Expires": expires,
                "X-Signature": sig,
            }
        )
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.fault is not None and self.fault["action"] == "presign_elsewhere":
            base = self.fault["base"]
        self.send_json(200, {"uploadUrl": f"{base}/_s3/{nar_id}?{query}"})

    def h_put_part(self, nar_id):
        st = self.state

        def q(key):
            v = self.query.get(key)
            return v[0] if v else ""

        part, upload_id, md5, expires, sig = (
            q("partNumber"),
            q("uploadId"),
            q("X-Content-MD5"),
            q("X-Expires"),
            q("X-Signature"),
        )
        try:
            part_n, expires_n = int(part), int(expires)
        except ValueError:
            raise s3_error(403, "AccessDenied", "Query-string authentication requires partNumber and X-Expires")
        expected = st.sign(nar_id, part_n, upload_id, md5, expires_n)
        if not hmac.compare_digest(expected, sig):
            raise s3_error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match")
        if time.time() > expires_n:
            raise s3_error(403, "AccessDenied", "Request has expired")
        if self.headers.get("Content-MD5") != md5:
            raise s3_error(403, "SignatureDoesNotMatch", "Content-MD5 differs from the presigned value")
        upload = st.uploads.get(nar_id)
        if upload is None or upload.upload_id != upload_id or upload.state != "open":
            raise s3_error(404, "NoSuchUpload", "The specified multipart upload does not exist")
        n = self.content_length()
        if self.headers.get("Content-Length") is None:
            raise s3_error(411, "MissingContentLength", "You must provide the Content-Length HTTP header")
        self.body_left = n
        rate = None
        if self.fault is not None and self.fault["action"] == "slow_body":
            rate = max(1, int(self.fault.get("bytes_per_sec", 65536)))
        digest = hashlib.md5()
        fd, tmp = tempfile.mkstemp(dir=upload.dir, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                left = n
                while left > 0:
                    step = min(left, CHUNK if rate is None else max(1, rate // 10))
                    chunk = self.rfile.read(step)
                    if not chunk:
                        raise ResetConnection()
                    digest.update(chunk)
                    f.write(chunk)
                    left -= len(chunk)
                    self.body_left = left
                    if rate is not None:
                        time.sleep(len(chunk) / rate)
            if time.time() > expires_n:
                raise s3_error(403, "AccessDenied", "Request has expired")
            if base64.b64encode(digest.digest()).decode() != md5:
                raise s3_error(400, "BadDigest", "The Content-MD5 you specified did not match what we received.")
            etag = f'"{digest.hexdigest()}"'
            with upload.lock:
                if upload.state != "open":
                    raise s3_error(404, "NoSuchUpload", "The specified multipart upload does not exist")
                os.rename(tmp, os.path.join(upload.dir, f"part-{part_n}"))
                upload.etags[part_n] = etag
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        headers = {"ETag": etag}
        if self.fault is not None and self.fault["action"] == "no_etag":
            headers = {}
        if self.fault is not None and self.fault["action"] == "wrong_etag":
            headers = {"ETag": '"' + hashlib.md5(b"wrong" + digest.digest()).hexdigest() + '"'}
        self.send(200, b"", "text/plain", headers)

    def h_complete(self, name, nar_id):
        cache = self.cache_or_404(name)
        self.api_auth(cache, write=True, keyless_ok=True)
        body = self.read_body()
        upload = self.upload_or_error(cache, nar_id, require_open=False)
        try:
            request = json.loads(body)
            parts = request["parts"]
            info = request["narInfoCreate"]
            if not isinstance(info, dict):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise HttpError(400, 'body must be {"parts": [...] | null, "narInfoCreate": {...}}')
        with upload.lock:
            if upload.state == "completed":
                if upload.completed_with == (parts, info):
                    self.finish_complete()
                    return
                raise HttpError(400, "this upload was already completed with different content")
            if upload.state == "aborted":
                raise HttpError(404, f"NoSuchUpload: {nar_id} was aborted")
            part_files = self.check_parts(cache, upload, parts)
            self.check_and_store(cache, upload, part_files, info)
            upload.state = "completed"
            upload.completed_with = (parts, info)
            shutil.rmtree(upload.dir, ignore_errors=True)
        self.finish_complete()

    def finish_complete(self):
        if self.fault is not None and self.fault["action"] == "reset_before_response":
            raise ResetConnection()
        self.send(200, b"", "application/json;charset=utf-8")

    def check_parts(self, cache, upload, parts):
        if parts is None:
            if cache.conf["reject_null_parts"]:
                raise HttpError(400, "parts must not be null")
            numbers = sorted(upload.etags)
            if numbers != list(range(1, len(numbers) + 1)) or not numbers:
                raise HttpError(400, f"InvalidPart: stored parts are not 1..N: {numbers}")
        else:
            if not isinstance(parts, list) or not parts:
                raise HttpError(400, "parts must be a non-empty array or null")
            numbers = []
            for i, p in enumerate(parts, start=1):
                if not isinstance(p, dict) or p.get("partNumber") != i:
                    raise HttpError(400, f"InvalidPartOrder: entry {i} is {p!r}; parts must be numbered 1..N")
                if upload.etags.get(i) is None:
                    raise HttpError(400, f"InvalidPart: part {i} was never uploaded")
                if p.get("eTag") != upload.etags[i]:
                    raise HttpError(400, f"InvalidPart: eTag of part {i} is {p.get('eTag')!r}, expected {upload.etags[i]!r}")
                numbers.append(i)
        return [os.path.join(upload.dir, f"part-{i}") for i in numbers]

    def check_and_store(self, cache, upload, part_files, info):
        def field(key, kind):
            value = info.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise HttpError(400, f"narInfoCreate.{key} is missing or has the wrong type: {value!r}")
            return value

        store_hash = field("cStoreHash", str)
        suffix = field("cStoreSuffix", str)
        nar_hash = field("cNarHash", str)
        nar_size = field("cNarSize", int)
        file_hash = field("cFileHash", str)
        file_size = field("cFileSize", int)
        refs = field("cReferences", list)
        deriver = field("cDeriver", str)
        sig = info.get("cSig")
        if not nixfmt.STORE_HASH_RE.match(store_hash):
            raise HttpError(400, f"cStoreHash is not 32 base32 characters: {store_hash!r}")
        if not nixfmt.NAME_RE.match(suffix):
            raise HttpError(400, f"cStoreSuffix is not a valid store path name: {suffix!r}")
        if not HEX64_RE.match(file_hash):
            raise HttpError(400, f"cFileHash must be 64 lowercase hex characters: {file_hash!r}")
        if not NAR_HASH_RE.match(nar_hash):
            raise HttpError(400, f"cNarHash must be sha256: + 52 base32 characters: {nar_hash!r}")
        if nar_size <= 0:
            raise HttpError(400, "NarSizeIsZero")
        for r in refs:
            if not isinstance(r, str) or not nixfmt.is_basename(r):
                raise HttpError(400, f"cReferences entry is not a store path basename: {r!r}")
        if refs != sorted(set(refs)):
            raise HttpError(400, "cReferences must be sorted and unique")
        if deriver != "unknown-deriver" and not (nixfmt.is_basename(deriver) and deriver.endswith(".drv")):
            raise HttpError(400, f"cDeriver must be unknown-deriver or a .drv basename: {deriver!r}")
        store_path = f"{self.state.store_dir}/{store_hash}-{suffix}"
        fp = nixfmt.fingerprint(self.state.store_dir, store_path, nar_hash, nar_size, refs)
        sigs = self.signatures(cache, sig, fp)

        compression_name, ext = COMPRESSIONS[upload.compression]
        nar_name = f"nar/{file_hash}{ext}"
        fd, tmp = tempfile.mkstemp(dir=os.path.join(cache.dir, "nar"), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                # One part is already the whole file: hash it in place and move it, rather than copy it.
                single = len(part_files) == 1
                uploaded = TeeParts(part_files, None if single else out)
                nar = HashingReader(decompressing(upload.compression, uploaded))
                buffered = io.BufferedReader(nar, buffer_size=CHUNK)
                if cache.conf["check_nar"]:
                    nixfmt.check_nar(buffered, CHUNK)
                while buffered.read(CHUNK):
                    pass
                # The decompressor may stop at the end of the last frame; the file hash covers every byte.
                while uploaded.read(CHUNK):
                    pass
            if uploaded.size != file_size:
                raise HttpError(400, f"cFileSize is {file_size} but {uploaded.size} bytes were uploaded")
            if uploaded.digest.hexdigest() != file_hash:
                raise HttpError(
                    400, f"cFileHash is {file_hash} but the uploaded bytes hash to {uploaded.digest.hexdigest()}"
                )
            if nar.size != nar_size:
                raise HttpError(400, f"cNarSize is {nar_size} but the NAR has {nar.size} bytes")
            actual = "sha256:" + nixfmt.b32encode(nar.digest.digest())
            if actual != nar_hash:
                raise HttpError(400, f"cNarHash is {nar_hash} but the NAR hashes to {actual}")
            if single:
                os.replace(part_files[0], tmp)
            os.rename(tmp, os.path.join(cache.dir, nar_name))
        except (nixfmt.NarError, zstandard.ZstdError, lzma.LZMAError, EOFError) as e:
            raise HttpError(400, f"the uploaded file is not a valid {compression_name} NAR: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        text = nixfmt.render_narinfo(
            store_path,
            nar_name,
            compression_name,
            nixfmt.b32encode(bytes.fromhex(file_hash)),
            file_size,
            nar_hash,
            nar_size,
            refs,
            deriver,
            sigs,
        )
        write_atomic(os.path.join(cache.dir, f"{store_hash}.narinfo"), text.encode())

    def signatures(self, cache, sig, fp):
        if cache.conf["signing"] == "managed":
            if sig is not None and cache.conf["managed_sig"] == "reject":
                raise HttpError(400, "cSig must be null: this cache is signed by the server")
            raw = cache.signing_key.sign(fp).signature
            return [f"{cache.key_name}:{base64.b64encode(raw).decode()}"]
        if not isinstance(sig, str):
            raise HttpError(400, "cSig is required: this cache is self-signed")
        try:
            raw = base64.b64decode(sig, validate=True)
        except binascii.Error:
            raise HttpError(400, f"cSig is not base64: {sig!r}")
        if len(raw) != 64:
            raise HttpError(400, f"cSig must be base64 of 64 bytes, got {len(raw)} bytes")
        for key in cache.conf["public_keys"]:
            key_name, pk = nixfmt.parse_key(key, 32)
            try:
                nacl.signing.VerifyKey(pk).verify(fp, raw)
            except nacl.exceptions.BadSignatureError:
                continue
            return [f"{key_name}:{sig}"]
        raise HttpError(400, "cSig does not verify against any of the cache's public keys")

    def h_abort(self, name, nar_id):
        cache = self.cache_or_404(name)
        self.api_auth(cache, write=True, keyless_ok=True)
        self.read_body()
        if not UUID_RE.match(nar_id):
            raise HttpError(400, f"narId is not a UUID: {nar_id!r}")
        upload = self.state.uploads.get(nar_id)
        if upload is None or upload.cache != cache.name:
            status = int(cache.conf["abort_unknown_status"])
            if status == 200:
                self.send(200, b"", "application/json;charset=utf-8")
                return
            raise HttpError(status, f"NoSuchUpload: {nar_id}")
        upload = self.upload_or_error(cache, nar_id, require_open=False)
        with upload.lock:
            if upload.state == "open":
                upload.state = "aborted"
                shutil.rmtree(upload.dir, ignore_errors=True)
        self.send(200, b"", "application/json;charset=utf-8")

    def h_add_key(self, name):
        cache = self.cache_or_404(name)
        self.api_auth(cache, write=True)
        try:
            pk = json.loads(self.read_body())["publicKey"]
            if len(base64.b64decode(pk, validate=True)) != 32:
                raise ValueError
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise HttpError(400, 'body must be {"publicKey": "<base64 of 32 bytes>"}')
        if cache.conf["signing"] != "self-signed":
            raise HttpError(400, "this cache is signed by the server")
        cache.conf["public_keys"].append(f"{cache.name}.cachix.org-1:{pk}")
        self.send(200, b"", "application/json;charset=utf-8")

    def h_api_nix_cache_info(self, name):
        cache = self.cache_or_404(name)
        self.api_auth(cache, write=False)
        self.send_json(200, {"storeDir": self.state.store_dir, "wantMassQuery": 1, "priority": 41})

    def h_api_narinfo(self, name, store_hash):
        cache = self.cache_or_404(name)
        self.api_auth(cache, write=False)
        self.serve_narinfo(cache, store_hash)

    # ---------- the Nix binary cache ----------

    def h_read_cache_info(self, name):
        cache = self.cache_or_404(name)
        self.read_auth(cache)
        self.send(200, f"StoreDir: {self.state.store_dir}\nWantMassQuery: 1\nPriority: 41\n", "text/x-nix-cache-info")

    def serve_narinfo(self, cache, store_hash):
        path = os.path.join(cache.dir, f"{store_hash}.narinfo")
        if not nixfmt.STORE_HASH_RE.match(store_hash) or not os.path.exists(path):
            raise HttpError(404, "404")
        with open(path, "rb") as f:
            self.send(200, f.read(), "text/x-nix-narinfo")

    def h_read_narinfo(self, name, store_hash):
        cache = self.cache_or_404(name)
        self.read_auth(cache)
        self.serve_narinfo(cache, store_hash)

    def nar_path(self, cache, file):
        if "/" in file or file.startswith(".") or not re.match(r"^[0-9a-z]+\.nar(\.[a-z0-9]+)?$", file):
            raise HttpError(404, "404")
        path = os.path.join(cache.dir, "nar", file)
        if not os.path.exists(path):
            raise HttpError(404, "404")
        return path

    def h_read_nar(self, name, file):
        cache = self.cache_or_404(name)
        self.read_auth(cache)
        path = self.nar_path(cache, file)
        if cache.conf["nar_redirect"]:
            host = f"127.0.0.1:{self.server.server_address[1]}"
            self.send(302, b"", "text/plain", {"Location": f"http://{host}/_blob/{cache.name}/nar/{file}"})
            return
        self.send_file(path, "application/octet-stream")

    def h_read_nar_blob(self, name, file):
        cache = self.cache_or_404(name)
        self.send_file(self.nar_path(cache, file), "application/octet-stream")

    # ---------- control ----------

    def h_control(self, rest):
        st = self.state
        m = self.command
        if rest == ["log"] and m == "GET":
            with st.lock:
                self.send_json(200, list(st.log))
        elif rest == ["state"] and m == "GET":
            self.send_json(200, self.control_state())
        elif len(rest) == 2 and rest[0] == "paths" and m == "GET":
            self.send_json(200, self.cache_or_404(rest[1]).stored_paths())
        elif rest == ["reset"] and m == "POST":
            self.read_body()
            st.reset()
            self.send_json(200, {})
        elif rest == ["faults"] and m == "POST":
            value = json.loads(self.read_body() or b"[]")
            st.add_faults(value if isinstance(value, list) else [value])
            self.send_json(200, {})
        elif rest == ["faults"] and m == "GET":
            with st.lock:
                self.send_json(200, list(st.faults))
        elif rest == ["faults"] and m == "DELETE":
            with st.lock:
                st.faults = []
            self.send_json(200, {})
        elif len(rest) == 2 and rest[0] == "cache" and m == "POST":
            cache = self.cache_or_404(rest[1])
            cache.conf.update(json.loads(self.read_body()))
            self.send_json(200, {})
        else:
            raise HttpError(404, "no such control route")

    def control_state(self):
        st = self.state
        out = {}
        with st.lock:
            uploads = list(st.uploads.values())
            faults = list(st.faults)
        for cache in st.caches.values():
            counts = {"open": 0, "aborted": 0, "completed": 0}
            for u in uploads:
                if u.cache == cache.name:
                    counts[u.state] += 1
            out[cache.name] = {
                "paths": cache.stored_paths(),
                "uploads": counts,
                "publicSigningKeys": cache.public_signing_keys(),
            }
        return {"caches": out, "faults": faults}


class TeeParts(io.RawIOBase):
    """The uploaded file: the part files in order, hashed, counted and copied to `out` as they are read."""

    def __init__(self, paths, out):
        self.paths = list(paths)
        self.current = None
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        while True:
            if self.current is None:
                if not self.paths:
                    return 0
                self.current = open(self.paths.pop(0), "rb")
            n = self.current.readinto(buffer)
            if n:
                view = memoryview(buffer)[:n]
                self.digest.update(view)
                if self.out is not None:
                    self.out.write(view)
                self.size += n
                return n
            self.current.close()
            self.current = None


class HashingReader(io.RawIOBase):
    """Hashes and counts what is read through it (the decompressed NAR)."""

    def __init__(self, inner):
        self.inner = inner
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self.inner.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
            self.size += n
        return n


def decompressing(compression, raw):
    """A reader of the decompressed bytes; accepts concatenated zstd frames / xz streams."""
    if compression == "zst":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK, read_across_frames=True)
    return lzma.LZMAFile(raw)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, BrokenPipeError, ValueError, OSError)):
            return
        super().handle_error(request, client_address)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="JSON cache configuration")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = ephemeral)")
    parser.add_argument("--port-file", help="write the chosen port here (atomically)")
    parser.add_argument("--data-dir", help="where stored caches and parts live (default: a fresh temp dir)")
    args = parser.parse_args()
    with open(args.config) as f:
        config = json.load(f)
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="cachix-server-")
    os.makedirs(data_dir, exist_ok=True)
    Handler.state = State(config, data_dir)
    server = Server(("127.0.0.1", args.port), Handler)
    port = server.server_address[1]
    announce(port, args.port_file)
    # The harness stops servers with SIGTERM; exiting through `finally` removes the temp dir made above.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
