#!/usr/bin/env bash
# Upload throughput on a realistic closure (benches/make-closure.sh: ~300 paths, ≥ 1 GiB of /usr files chained by
# references), all in one run on this machine:
#   - nixpush push to a file:// cache and to nginx (WebDAV PUT on 127.0.0.1), zstd -3, signed;
#   - nix copy --to the same kinds of target, compression=zstd, signed;
#   - the raw pipeline `nix-store --dump PATH | zstd -3 > file`, two paths at a time (both cores busy);
#   - peak RSS of `nixpush push` and of the daemon draining the same closure.
# Prints a Markdown table. Usage: benches/upload.sh [N_PATHS] [MIN_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps >/dev/null
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
cargo build --release --quiet
nixpush=$PWD/target/release/nixpush

top=$(benches/make-closure.sh "${1:-300}" "${2:-1100}")
mapfile -t paths < <(nix-store -q --requisites "$top")
nar_bytes=0
for p in "${paths[@]}"; do nar_bytes=$((nar_bytes + $(nix-store -q --size "$p"))); done
mib() { echo "scale=1; $1 / 1048576" | bc; }

work=$(mktemp -d /var/tmp/nixpush-bench.XXXXXX)
nginx_pid=
daemon_pid=
cleanup() {
  [ -n "$nginx_pid" ] && kill -QUIT "$nginx_pid" 2>/dev/null || true
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
nix-store --generate-binary-cache-key bench-1 "$work/key.sec" "$work/key.pub"
chmod 600 "$work/key.sec"
export XDG_CACHE_HOME=$work/xdg-cache   # Nix's narinfo cache must not remember earlier runs

# Every run reads the same paths; read them once so all runs start from the same page cache.
for p in "${paths[@]}"; do nix-store --dump "$p" >/dev/null; done

# nginx with WebDAV PUT on a free loopback port.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/nginx/logs" "$work/nginx/tmp" "$work/www/np" "$work/www/nix"
cat > "$work/nginx/nginx.conf" <<EOF
user root root; worker_processes 2; daemon off; error_log $work/nginx/logs/error.log warn; pid $work/nginx/nginx.pid;
events { worker_connections 256; }
http {
  access_log off; client_body_temp_path $work/nginx/tmp/body; proxy_temp_path $work/nginx/tmp/proxy;
  fastcgi_temp_path $work/nginx/tmp/fcgi; uwsgi_temp_path $work/nginx/tmp/uwsgi; scgi_temp_path $work/nginx/tmp/scgi;
  server { listen 127.0.0.1:$port; client_max_body_size 0;
    location / { root $work/www; dav_methods PUT; create_full_put_path on; dav_access user:rw group:r all:r; } }
}
EOF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" & nginx_pid=$!
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done

declare -A secs rss size
measure() { # name, command…
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
  read -r secs[$name] rss[$name] < "$work/time"
}

measure nixpush-file "$nixpush" push --target "file://$work/np-file" --signing-key-file "$work/key.sec" --no-upstream "$top"
size[nixpush-file]=$(du -sb "$work/np-file/nar" | cut -f1)
measure nix-copy-file nix --extra-experimental-features nix-command copy \
  --to "file://$work/nix-file?compression=zstd&secret-key=$work/key.sec" "$top"
size[nix-copy-file]=$(du -sb "$work/nix-file/nar" | cut -f1)
mkdir -p "$work/raw"
measure raw-pipeline sh -c 'printf "%s\n" "$@" | xargs -P2 -I{} sh -c "nix-store --dump \"\$1\" | zstd -3 -q -T1 > \"\$2/\$(basename \"\$1\").nar.zst\"" _ {} "'"$work"'/raw"' _ "${paths[@]}"
size[raw-pipeline]=$(du -sb "$work/raw" | cut -f1)
measure nixpush-nginx "$nixpush" push --target "http://127.0.0.1:$port/np" --signing-key-file "$work/key.sec" --no-upstream "$top"
size[nixpush-nginx]=$(du -sb "$work/www/np/nar" | cut -f1)
measure nix-copy-nginx nix --extra-experimental-features nix-command copy \
  --to "http://127.0.0.1:$port/nix?compression=zstd&secret-key=$work/key.sec" "$top"
size[nix-copy-nginx]=$(du -sb "$work/www/nix/nar" | cut -f1)

# The daemon draining the same closure: wall time from enqueue to an empty queue, and its peak RSS (VmHWM).
cat > "$work/daemon.toml" <<EOF
socket = "$work/daemon.sock"
state_dir = "$work/daemon-state"
upstream = []
[target]
url = "file://$work/daemon-cache"
signing_key_file = "$work/key.sec"
EOF
"$nixpush" --config "$work/daemon.toml" daemon 2>"$work/daemon.log" & daemon_pid=$!
for _ in $(seq 200); do "$nixpush" --config "$work/daemon.toml" status >/dev/null 2>&1 && break; sleep 0.05; done
start=$(date +%s.%N)
"$nixpush" --config "$work/daemon.toml" push --via-daemon "$top" 2>/dev/null
until "$nixpush" --config "$work/daemon.toml" status --json | python3 -c '
import json, sys; s = json.load(sys.stdin); sys.exit(0 if s["queued"] == 0 and s["in_flight"] == 0 else 1)'; do sleep 0.1; done
secs[daemon-file]=$(echo "$(date +%s.%N) - $start" | bc)
rss[daemon-file]=$(awk '/VmHWM/ {print $2}' "/proc/$daemon_pid/status")
size[daemon-file]=$(du -sb "$work/daemon-cache/nar" | cut -f1)
kill "$daemon_pid"; wait "$daemon_pid" 2>/dev/null || true; daemon_pid=

echo "Closure: ${#paths[@]} paths, $(mib "$nar_bytes") MiB of NAR; $(nproc) cores; zstd level 3."
echo
echo "| run | wall time (s) | MiB/s (NAR) | compressed MiB | peak RSS (MiB) |"
echo "|---|---|---|---|---|"
for name in nixpush-file nix-copy-file raw-pipeline nixpush-nginx nix-copy-nginx daemon-file; do
  printf "| %s | %.2f | %.0f | %s | %.1f |\n" "$name" "${secs[$name]}" \
    "$(echo "$nar_bytes / 1048576 / ${secs[$name]}" | bc -l)" "$(mib "${size[$name]}")" \
    "$(echo "${rss[$name]} / 1024" | bc -l)"
done
echo
printf "nixpush vs nix copy (file://): %.2fx; (nginx): %.2fx; nixpush vs raw pipeline: %.2fx; size vs nix copy: %+.1f %%\n" \
  "$(echo "${secs[nix-copy-file]} / ${secs[nixpush-file]}" | bc -l)" \
  "$(echo "${secs[nix-copy-nginx]} / ${secs[nixpush-nginx]}" | bc -l)" \
  "$(echo "${secs[raw-pipeline]} / ${secs[nixpush-file]}" | bc -l)" \
  "$(echo "(${size[nixpush-file]} - ${size[nix-copy-file]}) * 100 / ${size[nix-copy-file]}" | bc -l)"
