#!/usr/bin/env bash
# Push throughput per backend on the realistic closure of benches/make-closure.sh (/usr files chained by
# references; 60 paths ≈ 220 MiB by default, `300` gives upload.sh's ≥ 1 GiB closure), all in one run on this
# machine, all servers on 127.0.0.1:
#   - `nixpush push` (release build, zstd -3, signed) to a file:// cache;
#   - the same to the Cachix test server (tests/servers/cachix_server.py, a self-signed cache);
#   - the same to moto's S3 server (tests/servers/s3_server.py), path-style with SigV4.
# For each: wall time, NAR MiB/s, the ratio to file://, and the CPU seconds nixpush and the server spent, which
# tells whether the server or nixpush is the bottleneck. The three run interleaved for ROUNDS rounds (default 3),
# each round into fresh caches, and the table shows medians, with the load average before each round; the verdict
# (Cachix ≥ 0.9× file://) is withheld when the machine was not idle (1-minute load above 1.0) before the run.
#
#   benches/backends.sh [N_PATHS] [MIN_MIB] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps >/dev/null
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
cargo build --quiet --release --bins --examples
nixpush=$PWD/target/release/nixpush
# The test servers' Python packages (moto, PyNaCl) live in the suite's virtual environment.
server_python="${XDG_CACHE_HOME:-$HOME/.cache}/nixpush/test-venv/bin/python3"

count=${1:-60}
rounds=${3:-3}
load_before=$(cut -d' ' -f1 /proc/loadavg)
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

# A cache and a bucket per round, so every round uploads the whole closure.
caches=
buckets=()
for r in $(seq "$rounds"); do
  caches+="${caches:+, }{\"name\": \"bench-$r\", \"signing\": \"self-signed\", \"public_keys\": [\"$(cat "$work/key.pub")\"], \"tokens\": {\"$token\": \"write\"}}"
  buckets+=(--bucket "bench-$r")
done
echo "{\"caches\": [$caches]}" > "$work/cachix.json"
"$server_python" tests/servers/cachix_server.py --config "$work/cachix.json" --data-dir "$work/cachix-data" \
  --port-file "$work/cachix.port" >/dev/null 2>"$work/cachix.log" & cachix_pid=$!
cachix_port=$(wait_port_file "$work/cachix.port" "$cachix_pid")

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret
"$server_python" tests/servers/s3_server.py "${buckets[@]}" --port-file "$work/s3.port" >/dev/null 2>"$work/s3.log" &
s3_pid=$!
s3_port=$(wait_port_file "$work/s3.port" "$s3_pid")

ticks=$(getconf CLK_TCK)
cpu_secs() { # pid: user + system CPU seconds of the process (all its threads) so far
  [ -z "$1" ] && { echo 0; return; }
  awk -v t="$ticks" '{ print ($14 + $15) / t }' "/proc/$1/stat"
}

declare -A secs cpu server_cpu
measure() { # name, round, server pid (or ""), target URL, extra push args…
  local name=$1 round=$2 server=$3 target=$4; shift 4
  local before; before=$(cpu_secs "$server")
  /usr/bin/time -f "%e %U %S" -o "$work/time" \
    "$nixpush" push --target "$target" --signing-key-file "$work/key.sec" --no-upstream --json "$@" "$top" \
    >"$work/$name.json" 2>"$work/$name.err" || { cat "$work/$name.err" >&2; exit 1; }
  local uploaded
  uploaded=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["uploaded"])' "$work/$name.json")
  [ "$uploaded" = "${#paths[@]}" ] || { echo "$name: uploaded $uploaded of ${#paths[@]}" >&2; exit 1; }
  local wall user sys
  read -r wall user sys < "$work/time"
  secs[$name]+=" $wall"
  cpu[$name]+=" $(echo "$user + $sys" | bc)"
  server_cpu[$name]+=" $(echo "$(cpu_secs "$server") - $before" | bc)"
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

loads=
for r in $(seq "$rounds"); do
  loads+="${loads:+, }$(cut -d' ' -f1 /proc/loadavg)"
  measure file "$r" "" "file://$work/file-cache-$r"
  measure cachix "$r" "$cachix_pid" "cachix://bench-$r?api=http://127.0.0.1:$cachix_port" --auth-token-file "$work/token"
  measure s3 "$r" "$s3_pid" "s3://bench-$r?endpoint=http://127.0.0.1:$s3_port&region=us-east-1"
  # What was pushed is what Nix reads: the top path's narinfo from each server carries our signature.
  for url in "http://127.0.0.1:$cachix_port/bench-$r" "http://127.0.0.1:$s3_port/bench-$r"; do
    narinfo=$(curl -fsS "$url/$(basename "$top" | cut -c1-32).narinfo")
    grep -q "^Sig: bench.cachix.org-1:" <<<"$narinfo" || { echo "no signed narinfo for $top at $url" >&2; exit 1; }
  done
done

echo "Closure: ${#paths[@]} paths, $(echo "scale=1; $nar_bytes / 1048576" | bc) MiB of NAR; $(nproc) cores;" \
  "zstd level 3; nixpush push --no-upstream, signed; medians of $rounds interleaved rounds (file, Cachix, S3),"\
  "each into fresh caches."
echo "Load average (1 min) before the run: $load_before; before each round: $loads."
echo
echo "| target | wall time (s), median | each round (s) | MiB/s (NAR) | vs file:// | nixpush CPU (s) | server CPU (s) |"
echo "|---|---|---|---|---|---|---|"
declare -A med
for name in file cachix s3; do med[$name]=$(median <<<"${secs[$name]}"); done
for name in file cachix s3; do
  printf "| %s | %.2f | %s | %.0f | %.2f× | %.1f | %s |\n" "$name" "${med[$name]}" "${secs[$name]# }" \
    "$(echo "$nar_bytes / 1048576 / ${med[$name]}" | bc -l)" \
    "$(echo "${med[file]} / ${med[$name]}" | bc -l)" "$(median <<<"${cpu[$name]}")" \
    "$([ "$name" = file ] && echo "–" || printf "%.1f" "$(median <<<"${server_cpu[$name]}")")"
done
echo
ratio=$(echo "${med[file]} / ${med[cachix]}" | bc -l)
verdict=$(awk -v r="$ratio" 'BEGIN { print (r >= 0.9) ? "met" : "missed" }')
if awk -v l="$load_before" 'BEGIN { exit !(l > 1.0) }'; then
  printf "Cachix vs file:// %.2f× (goal ≥ 0.9×): no verdict, the machine was not idle (load %s before the run).\n" \
    "$ratio" "$load_before"
else
  printf "Cachix vs file:// %.2f× (goal ≥ 0.9×): %s.\n" "$ratio" "$verdict"
fi
