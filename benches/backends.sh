#!/usr/bin/env bash
# Push throughput per backend on the realistic closure of benches/make-closure.sh (/usr files chained by
# references; 60 paths ≈ 220 MiB by default, `300` gives upload.sh's ≥ 1 GiB closure), all in one run on this
# machine, all servers on 127.0.0.1:
#   - `nixpush push` (release build, zstd -3, signed) to a file:// cache;
#   - the same to the Cachix test server (tests/servers/cachix_server.py, a self-signed cache);
#   - the same to moto's S3 server (tests/servers/s3_server.py), path-style with SigV4.
# For each: wall time, NAR MiB/s, the ratio to file://, and the CPU seconds nixpush and the server spent, which
# tells whether the server or nixpush is the bottleneck. Prints a Markdown table.
#
#   benches/backends.sh [N_PATHS] [MIN_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps >/dev/null
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
cargo build --release --quiet --bin nixpush
nixpush=$PWD/target/release/nixpush

count=${1:-60}
# Same MiB per path as upload.sh's 300 paths / 1100 MiB, so `300` reuses its closure.
top=$(benches/make-closure.sh "$count" "${2:-$((count * 11 / 3))}")
mapfile -t paths < <(nix-store -q --requisites "$top")
nar_bytes=0
for p in "${paths[@]}"; do nar_bytes=$((nar_bytes + $(nix-store -q --size "$p"))); done

work=$(mktemp -d /var/tmp/nixpush-bench-backends.XXXXXX)
cachix_pid=
s3_pid=
cleanup() {
  [ -n "$cachix_pid" ] && kill "$cachix_pid" 2>/dev/null && wait "$cachix_pid" 2>/dev/null || true
  [ -n "$s3_pid" ] && kill "$s3_pid" 2>/dev/null && wait "$s3_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
nix-store --generate-binary-cache-key bench.cachix.org-1 "$work/key.sec" "$work/key.pub"
chmod 600 "$work/key.sec"
token=bench-write-token
printf '%s\n' "$token" > "$work/token"
chmod 600 "$work/token"

# Every run reads the same paths; read them once so all runs start from the same page cache.
for p in "${paths[@]}"; do nix-store --dump "$p" >/dev/null; done

wait_port_file() { # file, pid
  for _ in $(seq 600); do
    [ -s "$1" ] && { cat "$1"; return; }
    kill -0 "$2" 2>/dev/null || { echo "server exited before listening" >&2; exit 1; }
    sleep 0.1
  done
  echo "server did not start" >&2; exit 1
}

cat > "$work/cachix.json" <<EOF
{"caches": [{"name": "bench", "signing": "self-signed", "public_keys": ["$(cat "$work/key.pub")"],
             "tokens": {"$token": "write"}}]}
EOF
python3 tests/servers/cachix_server.py --config "$work/cachix.json" --data-dir "$work/cachix-data" \
  --port-file "$work/cachix.port" >/dev/null 2>"$work/cachix.log" & cachix_pid=$!
cachix_port=$(wait_port_file "$work/cachix.port" "$cachix_pid")

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret
python3 tests/servers/s3_server.py --bucket bench --port-file "$work/s3.port" >/dev/null 2>"$work/s3.log" &
s3_pid=$!
s3_port=$(wait_port_file "$work/s3.port" "$s3_pid")

ticks=$(getconf CLK_TCK)
cpu_secs() { # pid: user + system CPU seconds of the process (all its threads) so far
  [ -z "$1" ] && { echo 0; return; }
  awk -v t="$ticks" '{ print ($14 + $15) / t }' "/proc/$1/stat"
}

declare -A secs cpu server_cpu
measure() { # name, server pid (or ""), target URL, extra push args…
  local name=$1 server=$2 target=$3; shift 3
  local before; before=$(cpu_secs "$server")
  /usr/bin/time -f "%e %U %S" -o "$work/time" \
    "$nixpush" push --target "$target" --signing-key-file "$work/key.sec" --no-upstream --json "$@" "$top" \
    >"$work/$name.json" 2>"$work/$name.err" || { cat "$work/$name.err" >&2; exit 1; }
  local uploaded
  uploaded=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["uploaded"])' "$work/$name.json")
  [ "$uploaded" = "${#paths[@]}" ] || { echo "$name: uploaded $uploaded of ${#paths[@]}" >&2; exit 1; }
  local user sys
  read -r secs[$name] user sys < "$work/time"
  cpu[$name]=$(echo "$user + $sys" | bc)
  server_cpu[$name]=$(echo "$(cpu_secs "$server") - $before" | bc)
}

measure file "" "file://$work/file-cache"
measure cachix "$cachix_pid" "cachix://bench?api=http://127.0.0.1:$cachix_port" --auth-token-file "$work/token"
measure s3 "$s3_pid" "s3://bench?endpoint=http://127.0.0.1:$s3_port&region=us-east-1"

# What was pushed is what Nix reads: the top path's narinfo from each server carries our signature.
for url in "http://127.0.0.1:$cachix_port/bench" "http://127.0.0.1:$s3_port/bench"; do
  narinfo=$(curl -fsS "$url/$(basename "$top" | cut -c1-32).narinfo")
  grep -q "^Sig: bench.cachix.org-1:" <<<"$narinfo" || { echo "no signed narinfo for $top at $url" >&2; exit 1; }
done

echo "Closure: ${#paths[@]} paths, $(echo "scale=1; $nar_bytes / 1048576" | bc) MiB of NAR; $(nproc) cores;" \
  "zstd level 3; nixpush push --no-upstream, signed."
echo
echo "| target | wall time (s) | MiB/s (NAR) | vs file:// | nixpush CPU (s) | server CPU (s) |"
echo "|---|---|---|---|---|---|"
for name in file cachix s3; do
  printf "| %s | %.2f | %.0f | %.2f× | %.1f | %s |\n" "$name" "${secs[$name]}" \
    "$(echo "$nar_bytes / 1048576 / ${secs[$name]}" | bc -l)" \
    "$(echo "${secs[file]} / ${secs[$name]}" | bc -l)" "${cpu[$name]}" \
    "$([ "$name" = file ] && echo "–" || printf "%.1f" "${server_cpu[$name]}")"
done
