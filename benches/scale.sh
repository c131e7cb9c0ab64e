#!/usr/bin/env bash
# Scale past one machine: three writers push overlapping closures of large paths to one bucket of a three-node
# Garage cluster (replication 3) on 127.0.0.1, at once, each a `nixpush daemon` with its own state_dir and socket
# (three "hosts" sharing this machine's store), fed by the post-build hook.
#
# Garage (crates.io, AGPL) is built once with `cargo install` into $NIXPUSH_BENCH_CACHE (default
# ~/.cache/nixpush-bench), which takes long (tens of minutes on 2 cores); later runs reuse it. `--store s3s-fs`
# runs the same writers against one s3s-fs node instead (no Garage build; a quick check of the script itself).
#
# All S3 requests pass a loopback proxy that logs method, key and status, which gives the duplicate PUTs per path:
# narinfos written (2xx) and refused (412, another writer was first), NAR multipart uploads started and completed.
# Reports paths/s and MiB/s of NAR from the first hook to the last daemon drained, and verifies the cache with
# real Nix: the bucket is copied to a local directory (boto3) and `nix copy --from file://…` substitutes the union
# with the bench's key.
#
#   benches/scale.sh [--store garage|s3s-fs] [MIB_A MIB_B MIB_C]     (defaults: garage, 48 32 24)
set -euo pipefail
cd "$(dirname "$0")/.."

store=garage
if [ "${1:-}" = "--store" ]; then store=$2; shift 2; fi
mib_a=${1:-48} mib_b=${2:-32} mib_c=${3:-24}
garage_version=2.5.0

scripts/install-test-deps >/dev/null
cargo build --quiet --release --bins --examples
nixpush=$PWD/target/release/nixpush
hook=$PWD/target/release/nixpush-hook

cache=${NIXPUSH_BENCH_CACHE:-$HOME/.cache/nixpush-bench}
garage=$cache/garage-$garage_version/bin/garage
if [ "$store" = garage ] && [ ! -x "$garage" ]; then
  echo "== building Garage $garage_version once into $cache (this takes a while; later runs reuse it)" >&2
  nice cargo install --quiet --locked garage --version "$garage_version" --root "$cache/garage-$garage_version" \
    --no-default-features --features bundled-libs,sqlite
fi

work=$(mktemp -d /var/tmp/nixpush-bench-scale.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { # what, command…: polls for up to 120 s
  local what=$1; shift
  for _ in $(seq 1200); do "$@" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "timed out waiting for $what" >&2; exit 1
}

bucket=nixpush-scale
region=us-east-1
if [ "$store" = garage ]; then
  # Three nodes, each with its own RPC, S3 and admin port; one layout with replication 3.
  secret=$(openssl rand -hex 32 2>/dev/null || python3 -c 'import secrets; print(secrets.token_hex(32))')
  region=garage
  for n in 1 2 3; do
    mkdir -p "$work/garage$n"
    rpc=$(free_port); s3=$(free_port); admin=$(free_port)
    echo "$s3" > "$work/garage$n/s3port"
    echo "$rpc" > "$work/garage$n/rpcport"
    cat > "$work/garage$n/garage.toml" <<EOF
metadata_dir = "$work/garage$n/meta"
data_dir = "$work/garage$n/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
EOF
    RUST_LOG=garage=warn "$garage" -c "$work/garage$n/garage.toml" server >"$work/garage$n/log" 2>&1 &
    pids+=($!)
  done
  g() { "$garage" -c "$work/garage1/garage.toml" "$@"; }
  wait_for "Garage node 1" g status
  for n in 2 3; do
    id=$("$garage" -c "$work/garage$n/garage.toml" node id -q 2>/dev/null | cut -d@ -f1)
    wait_for "Garage node $n" g node connect "$id@127.0.0.1:$(cat "$work/garage$n/rpcport")"
  done
  for n in 1 2 3; do
    id=$("$garage" -c "$work/garage$n/garage.toml" node id -q 2>/dev/null | cut -d@ -f1)
    g layout assign -z "dc$n" -c 1G "${id:0:16}" >/dev/null
  done
  g layout apply --version 1 >/dev/null
  key_text=$(g key create nixpush-scale)
  access_key=$(awk '/Key ID:/ { print $3 }' <<<"$key_text")
  secret_key=$(awk '/Secret key:/ { print $3 }' <<<"$key_text")
  g bucket create "$bucket" >/dev/null
  g bucket allow --read --write --owner "$bucket" --key nixpush-scale >/dev/null
  s3_port=$(cat "$work/garage1/s3port")
  store_desc="a three-node Garage $garage_version cluster (replication 3)"
else
  access_key=AKSCALE secret_key=scale-s3cr3t
  mkdir -p "$work/s3s/$bucket"
  s3_port=$(free_port)
  "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" --host 127.0.0.1 --port "$s3_port" \
    --access-key "$access_key" --secret-key "$secret_key" "$work/s3s" >"$work/s3s.log" 2>&1 &
  pids+=($!)
  store_desc="one s3s-fs node"
fi
wait_for "the S3 endpoint" python3 -c "import socket; socket.create_connection(('127.0.0.1', $s3_port), 1)"

# The request log: a loopback proxy in front of the store, one line "METHOD /bucket/key?query STATUS" per request.
cat > "$work/logproxy.py" <<'EOF'
import http.client, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
upstream, port_file, log_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
lock, log = threading.Lock(), open(log_file, "a", buffering=1)
class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=300)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        answer = conn.getresponse()
        data = answer.read()
        self.send_response_only(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        # A HEAD answer's length is the object's, which nixpush compares with the NAR's.
        length = answer.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        with lock:
            log.write(f"{self.command} {self.path} {answer.status}\n")
    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward
server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
with open(port_file + ".tmp", "w") as f: f.write(str(server.server_address[1]))
import os; os.rename(port_file + ".tmp", port_file)
server.serve_forever()
EOF
python3 "$work/logproxy.py" "$s3_port" "$work/proxy.port" "$work/requests.log" 2>"$work/proxy.err" &
pids+=($!)
wait_for "the logging proxy" test -s "$work/proxy.port"
proxy_port=$(cat "$work/proxy.port")

# Three roots whose closures overlap in large paths: r1 → a, b; r2 → a, c; r3 → b, c.
nix-store --generate-binary-cache-key bench-scale-1 "$work/key.sec" "$work/key.pub"
nonce=$RANDOM$RANDOM
cat > "$work/overlap.nix" <<EOF
let
  sh = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" script]; };
  big = name: mib: sh "scale-\${name}" "/usr/bin/head -c \${toString mib}M /dev/urandom > \$out; echo $nonce >> \$out";
  a = big "a" $mib_a; b = big "b" $mib_b; c = big "c" $mib_c;
  root = name: deps: sh "scale-\${name}" "echo \${toString deps} > \$out";
in { r1 = root "r1" [a b]; r2 = root "r2" [a c]; r3 = root "r3" [b c]; }
EOF
mapfile -t roots < <(nix-build "$work/overlap.nix" -A r1 -A r2 -A r3 --no-out-link \
  --option build-users-group "" --option sandbox false --option substituters "" 2>/dev/null)
mapfile -t union < <(nix-store -q --requisites "${roots[@]}")
nar_bytes=0
for p in "${union[@]}"; do nar_bytes=$((nar_bytes + $(nix-store -q --size "$p"))); done

export AWS_ACCESS_KEY_ID=$access_key AWS_SECRET_ACCESS_KEY=$secret_key
for n in 1 2 3; do
  mkdir -p "$work/host$n"
  cat > "$work/host$n/config.toml" <<EOF
socket = "$work/host$n/nixpush.sock"
state_dir = "$work/host$n/state"
# Each host its own roots: a daemon prunes its roots directory to its own queue.
gc_roots_dir = "$work/host$n/gcroots"
upstream = []

[target]
url = "s3://$bucket?endpoint=http://127.0.0.1:$proxy_port&region=$region"
signing_key_file = "$work/key.sec"
part_size = 5242880
EOF
  "$nixpush" --config "$work/host$n/config.toml" daemon >"$work/host$n/daemon.log" 2>&1 &
  pids+=($!)
  wait_for "daemon $n" test -S "$work/host$n/nixpush.sock"
done

drained() { # host number: nothing queued, in flight or spooled
  "$nixpush" --config "$work/host$1/config.toml" status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
sys.exit(0 if s["queued"] == 0 and s["in_flight"] == 0 and s["spooled"] == 0 else 1)'
}
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
start=$(date +%s.%N)
hooks=()
for n in 1 2 3; do
  NIXPUSH_SOCKET=$work/host$n/nixpush.sock NIXPUSH_SPOOL=$work/host$n/state/spool OUT_PATHS=${roots[$((n - 1))]} \
    DRV_PATH="" "$hook" &
  hooks+=($!)
done
# The hook returns once its daemon acked (durably queued), so from here on drained() sees the work.
for pid in "${hooks[@]}"; do wait "$pid"; done
for n in 1 2 3; do
  for _ in $(seq 36000); do drained "$n" && break; sleep 0.1; done
done
secs=$(echo "$(date +%s.%N) - $start" | bc)
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
failed=0
for n in 1 2 3; do
  f=$("$nixpush" --config "$work/host$n/config.toml" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["failed"])')
  failed=$((failed + f))
done

# Real Nix substitutes the union from a copy of the bucket.
python3 - "$proxy_port" "$bucket" "$region" "$work/copy" <<'EOF'
import os, sys, boto3
port, bucket, region, out = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name=region)
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
    for obj in page.get("Contents", []):
        path = os.path.join(out, obj["Key"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        s3.download_file(bucket, obj["Key"], path)
EOF
verified=no
if nix --extra-experimental-features nix-command copy --from "file://$work/copy" --to "$work/nixroot" \
  --option trusted-public-keys "$(cat "$work/key.pub")" "${union[@]}" 2>"$work/nixcopy.err"; then
  verified=yes
fi

python3 - "$work/requests.log" "${#union[@]}" "$nar_bytes" "$secs" "$failed" "$verified" "$store_desc" \
  "$load_before" "$load_after" <<'EOF'
import collections, sys
log, paths, nar_bytes, secs, failed, verified, store, load_before, load_after = sys.argv[1:]
paths, nar_bytes, secs = int(paths), int(nar_bytes), float(secs)
written, refused = collections.Counter(), collections.Counter()
creates, completes, single = collections.Counter(), collections.Counter(), collections.Counter()
for line in open(log):
    method, target, status = line.split()
    key, _, query = target.partition("?")
    ok = status.startswith("2")
    if method == "PUT" and key.endswith(".narinfo"):
        (written if ok else refused)[key] += 1
    elif method == "POST" and "uploads" in query and "uploadId" not in query:
        creates[key] += 1
    elif method == "POST" and "uploadId" in query and ok:
        completes[key] += 1
    elif method == "PUT" and "/nar/" in key and "partNumber" not in query and ok:
        single[key] += 1
nars = set(creates) | set(single)
print(f"Three writers (daemons fed by the hook), {store}, overlapping closures: {paths} paths, "
      f"{nar_bytes / 2**20:.0f} MiB of NAR.")
print()
print("| figure | value |")
print("|---|---|")
print(f"| wall time, first hook to last daemon drained | {secs:.1f} s |")
print(f"| paths/s (union) | {paths / secs:.2f} |")
print(f"| MiB/s of NAR (union) | {nar_bytes / 2**20 / secs:.1f} |")
print(f"| narinfos written / paths | {sum(written.values())} / {paths} (max {max(written.values(), default=0)} per path) |")
print(f"| narinfo PUTs refused (412, another writer first) | {sum(refused.values())} |")
print(f"| NAR uploads started / NARs | {sum(creates.values()) + sum(single.values())} / {len(nars)} |")
print(f"| NAR multipart uploads completed / multipart NARs | {sum(completes.values())} / {len(creates)} |")
print(f"| failed paths | {failed} |")
print(f"| real Nix substitutes the union (nix copy, bench key) | {verified} |")
print(f"| load average (1, 5, 15 min) before / after | {load_before} / {load_after} |")
EOF
[ "$failed" = 0 ] && [ "$verified" = yes ] || { cat "$work/nixcopy.err" >&2; exit 1; }
