#!/usr/bin/env bash
# Does `max_upload_rate` hold? A 20 MiB path of random bytes pushed at a cap of 1 MiB/s must take 20 s ± 20 %,
# through `nixpush push` to a file:// cache and to nginx (WebDAV PUT on 127.0.0.1), and through the daemon (the
# path queued by the hook, timed until `status` has it uploaded). Rounds are interleaved; each line says the load
# average, and the verdict is withheld when the 1-minute load average was above 1.0 before the run.
#
#   benches/rate.sh [ROUNDS] [MIB] [RATE_MIB_PER_S]     # defaults 3, 20, 1; as root, from the repository root
#
# `--compression none`, so the bytes on the wire are the NAR's (plus its framing): the expected time is
# NAR size / rate. The store path it adds is deleted again at the end.
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
MIB="${2:-20}"
RATE="${3:-1}"
need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need nix-store nix-bin
need nginx nginx-light
need python3 python3

cargo build --quiet --release --bins --examples
BIN="$PWD/target/release"
SCRATCH="$(mktemp -d)"
PATH_ADDED=""
NGINX_PID=""
DAEMON_PID=""
cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
    [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null
    [ -n "$PATH_ADDED" ] && nix-store --delete "$PATH_ADDED" >/dev/null 2>&1
    rm -rf "$SCRATCH"
}
trap cleanup EXIT

load_before="$(cut -d' ' -f1 /proc/loadavg)"
head -c $((MIB * 1024 * 1024)) /dev/urandom > "$SCRATCH/blob"
PATH_ADDED="$(nix-store --add "$SCRATCH/blob")"
rm -f "$SCRATCH/blob"
NAR_BYTES="$(nix-store -q --size "$PATH_ADDED")"
echo "== $PATH_ADDED: $NAR_BYTES bytes of NAR, cap ${RATE} MiB/s, $ROUNDS round(s)"

# nginx with WebDAV PUT on a free loopback port.
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
mkdir -p "$SCRATCH/www/cache" "$SCRATCH/nginx"
cat > "$SCRATCH/nginx/nginx.conf" <<EOF
daemon off;
user root root;
pid $SCRATCH/nginx/nginx.pid;
error_log $SCRATCH/nginx/error.log;
events {}
http {
  access_log off;
  client_body_temp_path $SCRATCH/nginx/body;
  client_max_body_size 0;
  server {
    listen 127.0.0.1:$port;
    root $SCRATCH/www;
    location / { dav_methods PUT; create_full_put_path on; dav_access user:rw group:r all:r; }
  }
}
EOF
nginx -c "$SCRATCH/nginx/nginx.conf" &
NGINX_PID=$!
for _ in $(seq 50); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$port))" 2>/dev/null && break; sleep 0.1; done

config() { # $1: config file, $2: target URL, $3: state dir
    cat > "$1" <<EOF
socket = "$3/nixpush.sock"
state_dir = "$3"
upstream = []
gc_roots_dir = ""
[target]
url = "$2"
compression = "none"
max_upload_rate = "${RATE}MiB/s"
EOF
}

push_once() { # $1: target URL; prints seconds
    local dir
    dir="$(mktemp -d -p "$SCRATCH")"
    config "$dir/config.toml" "$1" "$dir/state"
    local start end
    start="$(date +%s.%N)"
    "$BIN/nixpush" --config "$dir/config.toml" push --no-closure "$PATH_ADDED" >/dev/null 2>"$dir/push.log" \
        || { cat "$dir/push.log" >&2; exit 1; }
    end="$(date +%s.%N)"
    python3 -c "print(f'{$end - $start:.2f}')"
}

daemon_once() { # prints seconds from the hook's ack to `status` showing the upload done
    local dir
    dir="$(mktemp -d -p "$SCRATCH")"
    mkdir -p "$dir/cache"
    config "$dir/config.toml" "file://$dir/cache" "$dir/state"
    "$BIN/nixpush" --config "$dir/config.toml" daemon >"$dir/daemon.log" 2>&1 &
    DAEMON_PID=$!
    for _ in $(seq 100); do [ -S "$dir/state/nixpush.sock" ] && break; sleep 0.05; done
    local start end
    start="$(date +%s.%N)"
    OUT_PATHS="$PATH_ADDED" DRV_PATH="" NIXPUSH_SOCKET="$dir/state/nixpush.sock" NIXPUSH_SPOOL="$dir/state/spool" \
        "$BIN/nixpush-hook"
    until "$BIN/nixpush" --config "$dir/config.toml" status --json 2>/dev/null \
        | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["done"] >= 1 else 1)'; do
        sleep 0.1
    done
    end="$(date +%s.%N)"
    kill "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true; DAEMON_PID=""
    python3 -c "print(f'{$end - $start:.2f}')"
}

results="$SCRATCH/results.txt"
for round in $(seq "$ROUNDS"); do
    for way in file http daemon; do
        case "$way" in
            file) d="$(mktemp -d -p "$SCRATCH")"; secs="$(push_once "file://$d")" ;;
            http) secs="$(push_once "http://127.0.0.1:$port/cache$round")" ;;
            daemon) secs="$(daemon_once)" ;;
        esac
        echo "$way $secs $(cut -d' ' -f1 /proc/loadavg)" | tee -a "$results"
    done
done

python3 - "$results" "$NAR_BYTES" "$RATE" "$load_before" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
nar, rate, load = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
expected = nar / (rate * 1024 * 1024)
print(f"\nexpected {expected:.1f} s ({nar} bytes at {rate:g} MiB/s); load average before the run: {load}")
print("| way | median s | range s | median / expected | load during |")
print("|---|---|---|---|---|")
verdicts = []
for way in ("file", "http", "daemon"):
    secs = [float(r[1]) for r in rows if r[0] == way]
    loads = [r[2] for r in rows if r[0] == way]
    median = statistics.median(secs)
    ratio = median / expected
    verdicts.append(0.8 <= ratio <= 1.2)
    print(f"| {way} | {median:.2f} | {min(secs):.2f}–{max(secs):.2f} | {ratio:.2f} | {', '.join(loads)} |")
if load > 1.0:
    print("no verdict: the 1-minute load average was above 1.0 before the run")
else:
    print("goal (20 s ± 20 %, every way):", "met" if all(verdicts) else "MISSED")
PY
