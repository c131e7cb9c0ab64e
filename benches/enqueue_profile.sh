#!/usr/bin/env bash
# Where the daemon's time goes during durable enqueue (issue #16, goal 3): PATHS fresh registered paths, 32
# clients, one path per request, daemon --hold, its state directory and GC roots under BASE. Timing goals live
# here, never in tests.
#
#   benches/enqueue_profile.sh [PATHS=10000] [none|stat|perf]      (as root, with Nix and perf for stat/perf)
#   BASE=/mnt/journaled benches/enqueue_profile.sh                 (state and roots on another filesystem)
#   NIXPUSH_BENCH_BIN=/other/target/release benches/enqueue_profile.sh   (another build's daemon)
#   ROOTS=off benches/enqueue_profile.sh                           (gc_roots_dir = "": no GC-root symlink per path)
#
# `stat` prints the daemon's CPU time and context switches (divide by PATHS for the cost of one request), `perf`
# where its CPU goes. The GC roots go to BASE too (not /nix/var/nix/gcroots): what is measured is the cost of
# creating them, not Nix honouring them.
set -euo pipefail
n=${1:-10000}
mode=${2:-none}
cd "$(dirname "$0")/.."
cargo build --quiet --release --bins --examples
bin=$PWD/target/release
nbin=${NIXPUSH_BENCH_BIN:-$bin}
work=$(mktemp -d "${BASE:-/var/tmp}/nixpush-enqueue.XXXXXX")
daemon_pid=
cleanup() {
  if [ -n "$daemon_pid" ]; then kill -TERM "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; fi
  if [ -s "$work/paths.txt" ]; then xargs nix-store --delete < "$work/paths.txt" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/files"
python3 benches/fresh_files.py "$work/files" "$n" "$work-$(date +%s%N)"
find "$work/files" -type f | xargs -n 1000 nix-store --add > "$work/paths.txt" 2>/dev/null
printf 'socket = "%s"\nstate_dir = "%s"\ngc_roots_dir = "%s"\nupstream = []\n[target]\nurl = "file://%s/cache"\n' \
  "$work/run/nixpush.sock" "$work/state" "$( [ "${ROOTS:-on}" = off ] || echo "$work/gcroots")" "$work" \
  > "$work/config.toml"
"$nbin/nixpush" --config "$work/config.toml" daemon --hold 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 200); do "$nbin/nixpush" --config "$work/config.toml" status >/dev/null 2>&1 && break; sleep 0.05; done
journal=$(findmnt -no SOURCE -T "$work" | sed 's|/dev/||')
echo "== $(nproc) cores, $(uname -r), $work on $(findmnt -no FSTYPE,SOURCE -T "$work")" \
  "($( [ -e "/proc/fs/jbd2/$journal-8" ] && echo "with a journal" || echo "no journal")), GC roots ${ROOTS:-on}, load average $(cut -d' ' -f1-3 /proc/loadavg)"
recorder=
case $mode in
  stat) perf stat -e task-clock,context-switches,cpu-migrations -p "$daemon_pid" -o "$work/stat.txt" & recorder=$! ;;
  perf) perf record -g -F 2000 -o "$work/perf.data" -p "$daemon_pid" 2>/dev/null & recorder=$! ;;
  none) ;;
  *) echo "mode must be none, stat or perf" >&2; exit 2 ;;
esac
[ -n "$recorder" ] && sleep 0.5
"$bin/examples/enqueue_bench" "$work/run/nixpush.sock" "$work/paths.txt" 32 1
if [ -n "$recorder" ]; then kill -INT "$recorder"; wait "$recorder" || true; fi
case $mode in
  stat) grep -E "task-clock|context-switches|cpu-migrations" "$work/stat.txt" ;;
  perf) perf report -i "$work/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -5
        perf report -i "$work/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -25 ;;
esac
