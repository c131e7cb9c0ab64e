#!/usr/bin/env bash
# Hook latency and durable enqueue throughput (issue #16). Timing goals live here, never in tests.
#
#   benches/hook_bench.sh [RUNS] [ENQUEUE_PATHS]     (as root, with Nix; RUNS defaults to 1000, ENQUEUE_PATHS to 20000)
#   NIXPUSH_PEER_HOOK=/path/to/post-build-hook benches/hook_bench.sh
#   NIXPUSH_BENCH_BIN=/other/target/release benches/hook_bench.sh   (the daemon and hook of another build, e.g. an
#                                                                   older commit; the timing tools stay this tree's)
#
# Every hook run hands the daemon a path it has never seen, registered in Nix's database, while the daemon is
# uploading to a file:// cache, so each ack waits for a real queue write and sync, as after a real build:
# 1. RUNS runs with a fresh OUT_PATHS (paths from `nix-store --add`), interleaved with /bin/true (the floor for
#    spawning any hook) and, if NIXPUSH_PEER_HOOK names newAM/nix-post-build-hook-queue's client binary, that
#    client (a datagram to /run/nix-post-build-hook-queue.sock, received and dropped here; no ack, nothing on
#    disk). This script never downloads or builds that project: without the variable the column is skipped.
# 2. The same with a fresh DRV_PATH and an empty OUT_PATHS, as Nix 2.8 sends them: RUNS real `nix-build` outputs
#    (benches/rebuilds.nix, a new seed each run), resolved by the daemon through Nix's database.
# 3. Durable enqueue throughput: 32 concurrent clients, one connection per request, ENQUEUE_PATHS fresh
#    registered paths, each acked only after the sync (daemon in --hold, so the uploads do not take the CPU).
# Goals: hook p50 <= peer p50 + 0.5 ms, p99 <= /bin/true p99 + 3 ms; >= 10,000 paths/s.
# A verdict is printed only when the 1-minute load average was at most 1.0 before the run.
set -euo pipefail
runs=${1:-1000}
enqueue_paths=${2:-20000}
cd "$(dirname "$0")/.."
cargo build --quiet --release --bins --examples
bin=$PWD/target/release
# The nixpush and nixpush-hook measured; the drivers (examples/) always come from this tree.
nbin=${NIXPUSH_BENCH_BIN:-$bin}
work=$(mktemp -d /var/tmp/nixpush-bench.XXXXXX)
daemon_pid=
peer_pid=
peer_socket=/run/nix-post-build-hook-queue.sock
cleanup() {
  if [ -n "$daemon_pid" ]; then kill -TERM "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; fi
  if [ -n "$peer_pid" ]; then kill "$peer_pid" 2>/dev/null || true; wait "$peer_pid" 2>/dev/null || true; rm -f "$peer_socket"; fi
  # Outputs before the derivations that produced them; every added path is ours alone.
  for list in outputs added drvs; do
    if [ -s "$work/$list.txt" ]; then tac "$work/$list.txt" | xargs nix-store --delete >/dev/null 2>&1 || true; fi
  done
  rm -rf "$work"
}
trap cleanup EXIT

load1() { cut -d' ' -f1 /proc/loadavg; }
load_before=$(load1)
quiet_machine() { python3 -c "import sys; sys.exit(0 if float('$load_before') <= 1.0 else 1)"; }
verdict() { # goal text, met (0/1)
  if ! quiet_machine; then
    echo "- $1: no verdict (load average $load_before before the run, above 1.0)"
  elif [ "$2" = 1 ]; then echo "- $1: met"; else echo "- $1: missed"; fi
}

start_daemon() { # $1: --hold or ""
  if [ -n "$daemon_pid" ]; then kill -TERM "$daemon_pid"; wait "$daemon_pid" || true; daemon_pid=; fi
  rm -rf "$work/state" "$work/run"
  # Its own roots directory: a daemon prunes its roots to its queue, so the default one belongs to the real daemon
  # (and roots there would keep this script's paths from being deleted).
  printf 'socket = "%s"\nstate_dir = "%s"\ngc_roots_dir = "%s"\nupstream = []\n[target]\nurl = "file://%s/cache"\n' \
    "$work/run/nixpush.sock" "$work/state" "$work/gcroots" "$work" > "$work/config.toml"
  "$nbin/nixpush" --config "$work/config.toml" daemon $1 2>>"$work/daemon.log" &
  daemon_pid=$!
  for _ in $(seq 200); do
    "$nbin/nixpush" --config "$work/config.toml" status >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "daemon did not start:" >&2; cat "$work/daemon.log" >&2; exit 1
}

# Registered store paths nobody has queued: nix-store --add of fresh small files. $1: count, $2: list file.
add_paths() {
  mkdir -p "$work/files-$2"
  python3 benches/fresh_files.py "$work/files-$2" "$1" "$work-$(date +%s%N)"
  find "$work/files-$2" -type f | xargs -n 1000 nix-store --add > "$work/$2.txt"
  cat "$work/$2.txt" >> "$work/added.txt"
  rm -rf "$work/files-$2"
}

# The peer's client sends one datagram per path to a fixed socket; a receiver that drops them stands in for its
# daemon, so the client does the same work as in production.
peer=${NIXPUSH_PEER_HOOK:-}
if [ -n "$peer" ]; then
  if [ ! -x "$peer" ]; then
    echo "NIXPUSH_PEER_HOOK=$peer is not executable" >&2; exit 1
  elif [ -e "$peer_socket" ]; then
    echo "== peer column skipped: $peer_socket exists (a real nix-post-build-hook-queue?); not touching it"
    peer=
  else
    python3 benches/peer_sink.py "$peer_socket" &
    peer_pid=$!
    for _ in $(seq 100); do [ -S "$peer_socket" ] && break; sleep 0.05; done
  fi
else
  echo "== peer column skipped: set NIXPUSH_PEER_HOOK to the client binary of newAM/nix-post-build-hook-queue" \
    "(post-build-hook) to add it"
fi

export NIXPUSH_SOCKET=$work/run/nixpush.sock NIXPUSH_SPOOL=$work/state/spool
echo "== $(nproc) cores, $(uname -r), $(nix --version), nixpush $(git describe --always --dirty 2>/dev/null || echo "?")${NIXPUSH_BENCH_BIN:+ (measured: $NIXPUSH_BENCH_BIN)}," \
  "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
start_daemon ""

check_nothing_spooled() {
  local spooled
  spooled=$(find "$work/state/spool" -maxdepth 1 -name '*.json' 2>/dev/null | wc -l)
  [ "$spooled" -eq 0 ] || { echo "$spooled requests were spooled: the daemon did not answer in time" >&2; exit 1; }
}

echo
echo "== 1. $runs hook runs, each a fresh registered path in OUT_PATHS; daemon uploading to file://, ack after" \
  "the queue's sync (load average $(cut -d' ' -f1-3 /proc/loadavg))"
add_paths "$runs" fresh
"$bin/examples/hook_latency" "$nbin/nixpush-hook" "$work/fresh.txt" /bin/true ${peer:+"$peer"} | tee "$work/part1.txt"
check_nothing_spooled

echo
echo "== 2. $runs hook runs, each a fresh DRV_PATH (empty OUT_PATHS, as Nix 2.8 sends): real nix-build outputs," \
  "resolved through Nix's database; daemon uploading (load average $(cut -d' ' -f1-3 /proc/loadavg))"
nix-instantiate benches/rebuilds.nix --arg n "$runs" --argstr seed "hook-bench-$(date +%s%N)" 2>/dev/null > "$work/drvs.txt"
xargs nix-store --query --outputs < "$work/drvs.txt" > "$work/outputs.txt"
xargs nix-store --realise --option build-users-group "" --option sandbox false --option substituters "" -j 2 \
  < "$work/drvs.txt" > /dev/null 2>"$work/build.log" || { tail "$work/build.log" >&2; exit 1; }
paste -d' ' "$work/drvs.txt" "$work/outputs.txt" > "$work/drv-out.txt"
"$bin/examples/hook_latency" --drv "$nbin/nixpush-hook" "$work/drv-out.txt" /bin/true ${peer:+"$peer"} | tee "$work/part2.txt"
check_nothing_spooled
queued=$("$nbin/nixpush" --config "$work/config.toml" status --json \
  | python3 -c 'import json,sys; s = json.load(sys.stdin); print(s["queued"] + s["in_flight"])')
echo "   the daemon was uploading throughout; still queued or in flight at the end: $queued"

echo
echo "== 3. durable enqueue throughput: $enqueue_paths fresh registered paths, 32 clients, one connection per" \
  "request, ack after the sync; daemon --hold (load average $(cut -d' ' -f1-3 /proc/loadavg))"
add_paths "$enqueue_paths" enqueue1
start_daemon --hold
"$bin/examples/enqueue_bench" "$work/run/nixpush.sock" "$work/enqueue1.txt" 32 1 | tee "$work/part3.txt"
add_paths "$enqueue_paths" enqueue3
"$bin/examples/enqueue_bench" "$work/run/nixpush.sock" "$work/enqueue3.txt" 32 3

echo
echo "== verdicts (load average before the run: $load_before)"
python3 - "$work/part1.txt" "$work/part3.txt" "$peer" > "$work/verdicts" <<'PY'
import re, sys
rows = {}
for line in open(sys.argv[1]):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 7 and cells[1][:1].isdigit():
        rows[cells[0]] = (float(cells[1]), float(cells[3]))
true, hook = rows["true"], rows["nixpush-hook"]
peer = sys.argv[3].rsplit("/", 1)[-1]
if peer in rows:
    print("p50 <= peer p50 + 0.5 ms", int(hook[0] <= rows[peer][0] + 0.5))
print("p99 <= /bin/true p99 + 3 ms", int(hook[1] <= true[1] + 3))
rate = float(re.search(r"([0-9]+) paths/s", open(sys.argv[2]).read()).group(1))
print(">= 10,000 paths/s durable enqueue", int(rate >= 10000))
PY
while read -r line; do verdict "${line% *}" "${line##* }"; done < "$work/verdicts"
