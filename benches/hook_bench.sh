#!/usr/bin/env bash
# Hook latency and enqueue throughput of the spine (issue #3). Timing goals live here, never in tests.
#
#   benches/hook_bench.sh [RUNS]        (as root, with Nix and hyperfine installed; RUNS defaults to 1000)
#
# 1. RUNS sequential nixpush-hook runs, each queueing a fresh real store path (so each pays a real fsync),
#    interleaved with RUNS runs of /bin/true, the floor for spawning any hook.
#    Goal: median overhead <= 2 ms, p99 <= 10 ms.
# 2. The same with hyperfine, for a hook that sends only DRV_PATH (as Nix 2.8 does) of an already queued build:
#    the daemon resolves the outputs from Nix's database and finds them queued.
# 3. Enqueue throughput: 32 concurrent clients, one connection per request, each acknowledged only after its
#    paths are flushed. Goal: >= 5,000 paths/s.
set -euo pipefail
runs=${1:-1000}
cd "$(dirname "$0")/.."
cargo build --quiet --release --bins --examples
bin=$PWD/target/release
work=$(mktemp -d /tmp/nixpush-bench.XXXXXX)
daemon_pid=
cleanup() {
    if [ -n "$daemon_pid" ]; then kill -TERM "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

start_daemon() { # $1: extra config lines
    if [ -n "$daemon_pid" ]; then kill -TERM "$daemon_pid"; wait "$daemon_pid" || true; daemon_pid=; fi
    printf 'socket = "%s"\nstate_dir = "%s"\n%s\n[target]\nurl = "file://%s/cache"\n' \
        "$work/run/nixpush.sock" "$work/state" "$1" "$work" > "$work/config.toml"
    "$bin/nixpush" --config "$work/config.toml" daemon --hold 2>>"$work/daemon.log" &
    daemon_pid=$!
    for _ in $(seq 100); do
        "$bin/nixpush" --config "$work/config.toml" status >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "daemon did not start:" >&2; cat "$work/daemon.log" >&2; exit 1
}

export NIXPUSH_SOCKET=$work/run/nixpush.sock NIXPUSH_SPOOL=$work/state/spool
nix_options=(--option build-users-group "" --option sandbox false --option substituters "")

echo "== machine: $(nproc) cores, $(uname -r), nixpush $(git describe --always --dirty 2>/dev/null || echo '?')"
start_daemon ""

echo "== 1. hook latency, $runs fresh store paths (OUT_PATHS set), interleaved with /bin/true"
mkdir "$work/files"
for i in $(seq "$runs"); do echo "nixpush bench $work $i" > "$work/files/nixpush-bench-$i"; done
nix-store --add "$work"/files/* > "$work/paths.txt"
"$bin/examples/hook_latency" "$bin/nixpush-hook" "$work/paths.txt" /bin/true
queued=$("$bin/nixpush" --config "$work/config.toml" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["queued"])')
spooled=$(find "$work/state/spool" -maxdepth 1 -name '*.json' | wc -l)
echo "   queued after the run: $queued, spooled: $spooled"

echo "== 2. hyperfine: $runs runs, DRV_PATH only (resolved through Nix's database), path already queued"
drv=$(nix-instantiate tests/fixtures/hooktest.nix --argstr nonce "bench-$(date +%s%N)" 2>/dev/null)
nix-store --realise "$drv" "${nix_options[@]}" --option post-build-hook "$bin/nixpush-hook" >/dev/null 2>&1
export DRV_PATH=$drv OUT_PATHS=
hyperfine --shell=none --warmup 20 --runs "$runs" --export-json "$work/hyperfine.json" \
    /bin/true "$bin/nixpush-hook" >/dev/null 2>&1 || { echo "hyperfine failed" >&2; exit 1; }
python3 - "$work/hyperfine.json" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
def stat(times, p):
    times = sorted(times)
    return times[round((len(times) - 1) * p)] * 1000
rows = {r["command"].rsplit("/", 1)[-1]: r["times"] for r in results}
for name, times in rows.items():
    print(f"   {name:<14} median {stat(times, .5):.3f} ms  p99 {stat(times, .99):.3f} ms  max {max(times)*1000:.3f} ms")
base, hook = rows["true"], rows["nixpush-hook"]
print(f"   overhead: median {stat(hook, .5) - stat(base, .5):.3f} ms, p99 {stat(hook, .99) - stat(base, .99):.3f} ms")
PY
unset DRV_PATH OUT_PATHS

echo "== 3. enqueue throughput (store_dir = a scratch directory of valid store path names)"
mkdir -p "$work/store"
start_daemon "store_dir = \"$work/store\""
"$bin/examples/enqueue_bench" "$work/run/nixpush.sock" "$work/store" 20000 32 1
"$bin/examples/enqueue_bench" "$work/run/nixpush.sock" "$work/store" 30000 32 3
