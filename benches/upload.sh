#!/usr/bin/env bash
# Upload throughput and memory on a realistic closure (benches/make-closure.sh: ~300 paths, >= 1 GiB of /usr files
# chained by references), all in one run on this machine:
#   - nixpush push to a file:// cache and to nginx (WebDAV PUT on 127.0.0.1), zstd -3, signed;
#   - nix copy --to the same kinds of target, compression=zstd, signed;
#   - the daemon draining the same closure to file:// (from enqueue until the queue is empty), its peak RSS;
#   - the raw limit: exactly the work nixpush does per path, with the tools Nix users have, both cores busy (two
#     paths at a time): `nix-store --dump | tee >(sha256sum) | zstd -3 | tee FILE | sha256sum`, then an fsync of
#     FILE (NAR hash, compression, file hash, a durable file). nixpush is reported as a fraction of it;
#   - daemon peak RSS (VmHWM) with MEM_SIZES (default "50 3000 12000") fresh registered paths, each queued by
#     the hook as after a build and uploaded, to show whether memory grows with the work.
# Wall time, CPU time (user + system) and peak RSS for each; Markdown tables; the load average before and after.
# Verdicts are withheld when the 1-minute load average was above 1.0 before the run.
#
#   benches/upload.sh [N_PATHS] [MIN_MIB]      (as root; MEM_SIZES="50 3000 12000")
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps >/dev/null
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
cargo build --quiet --release --bins --examples
nixpush=$PWD/target/release/nixpush

top=$(benches/make-closure.sh "${1:-300}" "${2:-1100}")
mapfile -t paths < <(nix-store -q --requisites "$top")
nar_bytes=0
for p in "${paths[@]}"; do nar_bytes=$((nar_bytes + $(nix-store -q --size "$p"))); done
mib() { echo "scale=1; $1 / 1048576" | bc; }
# Whether the daemon of config $1 has nothing queued, in flight or spooled. Asked every 0.1 s while the daemon
# works, so it costs one `nixpush status` and no interpreter: the uploads run at idle priority and yield to
# whatever else runs, a poller included (a Python one per poll took a quarter of the daemon's time).
drained() {
  local s
  s=$("$nixpush" --config "$1" status --json) || return 1
  [[ $s =~ ^\{\"version\":[0-9]+,\"queued\":0, && $s =~ ,\"in_flight\":0, && $s =~ ,\"spooled\":0, ]]
}

work=$(mktemp -d /var/tmp/nixpush-bench.XXXXXX)
nginx_pid=
daemon_pid=
cleanup() {
  [ -n "$nginx_pid" ] && kill -QUIT "$nginx_pid" 2>/dev/null || true
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null || true
  if [ -s "$work/added.txt" ]; then xargs nix-store --delete < "$work/added.txt" >/dev/null 2>&1 || true; fi
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

load_before=$(cut -d' ' -f1 /proc/loadavg)
echo "== load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
declare -A secs rss size cpu
measure() { # name, command…
  local name=$1 user sys; shift
  /usr/bin/time -f "%e %M %U %S" -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
  read -r secs[$name] rss[$name] user sys < "$work/time"
  cpu[$name]=$(echo "$user + $sys" | bc)
  echo "   $name: ${secs[$name]} s (load average $(cut -d' ' -f1 /proc/loadavg))" >&2
}

measure nixpush-file "$nixpush" push --target "file://$work/np-file" --signing-key-file "$work/key.sec" --no-upstream "$top"
size[nixpush-file]=$(du -sb "$work/np-file/nar" | cut -f1)
measure nix-copy-file nix --extra-experimental-features nix-command copy \
  --to "file://$work/nix-file?compression=zstd&secret-key=$work/key.sec" "$top"
size[nix-copy-file]=$(du -sb "$work/nix-file/nar" | cut -f1)
mkdir -p "$work/raw"
cat > "$work/raw-one.sh" <<'RAW'
#!/usr/bin/env bash
# One path, the work nixpush does for it: NAR, SHA-256 of the NAR, zstd -3, SHA-256 of the file, fsync.
set -euo pipefail
out="$2/$(basename "$1").nar.zst"
nix-store --dump "$1" | tee >(sha256sum > "$out.nar-sha256") | zstd -3 -q | tee "$out" | sha256sum > "$out.sha256"
sync "$out"
RAW
chmod +x "$work/raw-one.sh"
measure raw-limit sh -c 'printf "%s\n" "$@" | xargs -P2 -I{} "$0" {} "'"$work"'/raw"' "$work/raw-one.sh" "${paths[@]}"
size[raw-limit]=$(cat "$work"/raw/*.nar.zst | wc -c)
measure nixpush-nginx "$nixpush" push --target "http://127.0.0.1:$port/np" --signing-key-file "$work/key.sec" --no-upstream "$top"
size[nixpush-nginx]=$(du -sb "$work/www/np/nar" | cut -f1)
measure nix-copy-nginx nix --extra-experimental-features nix-command copy \
  --to "http://127.0.0.1:$port/nix?compression=zstd&secret-key=$work/key.sec" "$top"
size[nix-copy-nginx]=$(du -sb "$work/www/nix/nar" | cut -f1)

# The daemon draining the same closure: wall time from enqueue to an empty queue, and its peak RSS (VmHWM).
cat > "$work/daemon.toml" <<EOF
socket = "$work/daemon.sock"
state_dir = "$work/daemon-state"
# Its own roots: a daemon prunes the roots directory to its queue, so the default one belongs to the real daemon.
gc_roots_dir = "$work/daemon-gcroots"
upstream = []
[target]
url = "file://$work/daemon-cache"
signing_key_file = "$work/key.sec"
EOF
"$nixpush" --config "$work/daemon.toml" daemon 2>"$work/daemon.log" & daemon_pid=$!
for _ in $(seq 200); do "$nixpush" --config "$work/daemon.toml" status >/dev/null 2>&1 && break; sleep 0.05; done
start=$(date +%s.%N)
"$nixpush" --config "$work/daemon.toml" push --via-daemon "$top" 2>/dev/null
until drained "$work/daemon.toml"; do sleep 0.1; done
secs[daemon-file]=$(echo "$(date +%s.%N) - $start" | bc)
rss[daemon-file]=$(awk '/VmHWM/ {print $2}' "/proc/$daemon_pid/status")
# utime + stime of the whole daemon (fields 14 and 15 of stat, in clock ticks).
cpu[daemon-file]=$(awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$daemon_pid/stat")
size[daemon-file]=$(du -sb "$work/daemon-cache/nar" | cut -f1)
kill "$daemon_pid"; wait "$daemon_pid" 2>/dev/null || true; daemon_pid=
echo "   daemon-file: ${secs[daemon-file]} s (load average $(cut -d' ' -f1 /proc/loadavg))" >&2

# Memory against the amount of work: N fresh registered paths (nix-store --add of small files), each queued by
# the hook as after a build and uploaded by a fresh daemon; its VmHWM once the queue is empty.
declare -A mem_rss mem_secs
read -r -a mem_sizes <<< "${MEM_SIZES:-50 3000 12000}"
for n in "${mem_sizes[@]}"; do
  rm -rf "$work/mem-files" "$work/mem-state" "$work/mem-cache" "$work/mem.sock"
  mkdir -p "$work/mem-files"
  python3 - "$work/mem-files" "$n" "$work-$(date +%s%N)" <<'PY'
import os, sys
d, n, nonce = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for i in range(n):
    with open(os.path.join(d, f"nixpush-mem-{i}"), "w") as f:
        f.write(f"{nonce} {i}\n" * 64)
PY
  find "$work/mem-files" -type f | xargs -n 1000 nix-store --add > "$work/mem-paths.txt"
  cat "$work/mem-paths.txt" >> "$work/added.txt"
  sed -e "s|$work/daemon.sock|$work/mem.sock|" -e "s|$work/daemon-state|$work/mem-state|" \
    -e "s|$work/daemon-cache|$work/mem-cache|" "$work/daemon.toml" > "$work/mem.toml"
  "$nixpush" --config "$work/mem.toml" daemon 2>"$work/mem-daemon.log" & daemon_pid=$!
  for _ in $(seq 200); do "$nixpush" --config "$work/mem.toml" status >/dev/null 2>&1 && break; sleep 0.05; done
  start=$(date +%s.%N)
  # One hook run per path, as Nix runs it after each build; 8 at a time to keep this part short.
  xargs -P 8 -I{} env NIXPUSH_SOCKET="$work/mem.sock" NIXPUSH_SPOOL="$work/mem-state/spool" OUT_PATHS={} DRV_PATH= \
    "$PWD/target/release/nixpush-hook" < "$work/mem-paths.txt"
  deadline=$((SECONDS + 1800))
  until drained "$work/mem.toml"; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "memory run $n: queue not empty after 30 min" >&2; exit 1; }
    sleep 0.1
  done
  mem_secs[$n]=$(echo "$(date +%s.%N) - $start" | bc)
  mem_rss[$n]=$(awk '/VmHWM/ {print $2}' "/proc/$daemon_pid/status")
  uploaded=$(find "$work/mem-cache" -name '*.narinfo' | wc -l)
  [ "$uploaded" -eq "$n" ] || { echo "memory run $n: $uploaded narinfos in the cache, expected $n" >&2; exit 1; }
  kill "$daemon_pid"; wait "$daemon_pid" 2>/dev/null || true; daemon_pid=
  xargs nix-store --delete < "$work/mem-paths.txt" >/dev/null 2>&1 || true
  echo "   memory run, $n paths: ${mem_secs[$n]} s (load average $(cut -d' ' -f1 /proc/loadavg))" >&2
done

echo "Closure: ${#paths[@]} paths, $(mib "$nar_bytes") MiB of NAR; $(nproc) cores; zstd level 3; load average" \
  "$load_before before the run, $(cut -d' ' -f1 /proc/loadavg) after."
echo
echo "| run | wall time (s) | MiB/s (NAR) | CPU time (s) | compressed MiB | peak RSS (MiB) |"
echo "|---|---|---|---|---|---|"
for name in nixpush-file nix-copy-file raw-limit daemon-file nixpush-nginx nix-copy-nginx; do
  printf "| %s | %.2f | %.0f | %.1f | %s | %.1f |\n" "$name" "${secs[$name]}" \
    "$(echo "$nar_bytes / 1048576 / ${secs[$name]}" | bc -l)" "${cpu[$name]}" "$(mib "${size[$name]}")" \
    "$(echo "${rss[$name]} / 1024" | bc -l)"
done
echo
echo "raw-limit: \`nix-store --dump | tee >(sha256sum) | zstd -3 | tee FILE | sha256sum\` and an fsync, two paths at a time."
echo
echo "| daemon: fresh paths queued by the hook, uploaded | until the queue is empty (s) | daemon peak RSS (MiB) |"
echo "|---|---|---|"
for n in "${mem_sizes[@]}"; do
  printf "| %s paths | %.2f | %.1f |\n" "$n" "${mem_secs[$n]}" "$(echo "${mem_rss[$n]} / 1024" | bc -l)"
done
printf "| the closure above | %.2f | %.1f |\n" "${secs[daemon-file]}" "$(echo "${rss[daemon-file]} / 1024" | bc -l)"
printf "| \`nixpush push\` of the closure above | %.2f | %.1f |\n" "${secs[nixpush-file]}" "$(echo "${rss[nixpush-file]} / 1024" | bc -l)"
echo
python3 - "$load_before" \
  "${secs[nixpush-file]}" "${secs[nix-copy-file]}" "${secs[daemon-file]}" "${secs[raw-limit]}" \
  "${secs[nixpush-nginx]}" "${secs[nix-copy-nginx]}" "${rss[nixpush-file]}" "${rss[daemon-file]}" \
  "${size[nixpush-file]}" "${size[nix-copy-file]}" "${mem_rss[@]}" <<'PY'
import sys
load = float(sys.argv[1])
push, copy, daemon, raw, push_ng, copy_ng, push_rss, daemon_rss, size_np, size_nix = map(float, sys.argv[2:12])
mem = [float(x) for x in sys.argv[12:]]
def line(text, met):
    verdict = "met" if met else "missed"
    if load > 1.0:
        verdict = f"no verdict (load average {load} before the run, above 1.0)"
    print(f"- {text}: {verdict}")
line(f"push vs nix copy (file://): {copy / push:.2f}x (goal >= 2.0x)", copy / push >= 2.0)
line(f"push vs nix copy (nginx): {copy_ng / push_ng:.2f}x (goal >= 2.0x)", copy_ng / push_ng >= 2.0)
line(f"daemon vs nix copy (file://): {copy / daemon:.2f}x (goal >= 1.5x)", copy / daemon >= 1.5)
line(f"daemon at {push / daemon * 100:.0f} % of push's speed (goal >= 90 %)", push / daemon >= 0.9)
print(f"- push at {raw / push * 100:.0f} % of the raw limit, the daemon at {raw / daemon * 100:.0f} %")
peak = max([daemon_rss] + mem) / 1024
line(f"daemon peak RSS at most {peak:.1f} MiB over all daemon runs (goal < 48 MiB)", peak < 48)
line(f"push peak RSS {push_rss / 1024:.1f} MiB (goal < 48 MiB)", push_rss / 1024 < 48)
print(f"- compressed size vs nix copy: {(size_np - size_nix) * 100 / size_nix:+.1f} %")
PY
