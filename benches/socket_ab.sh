#!/usr/bin/env bash
# The socket path alone, this build against another (issue #16, goal 2): what the daemon costs a hook between its
# request and the ack, without the disk. Timing goals live here, never in tests.
#
#   benches/socket_ab.sh OTHER_RELEASE_DIR [RUNS=300] [ROUNDS=4]    (as root, with Nix)
#   NIXPUSH_PEER_HOOK=/path/to/post-build-hook benches/socket_ab.sh …  (adds newAM/nix-post-build-hook-queue's client)
#
# Each round starts a `--hold` daemon of each build in turn, its queue on tmpfs (/dev/shm), so the fdatasync before
# the ack costs next to nothing and what is left is the daemon's own work and hand-offs. RUNS hook runs per build
# and round, each with a fresh registered path in OUT_PATHS, interleaved with /bin/true (and the peer's client when
# given); the builds alternate, this one first. The GC roots go to tmpfs as well.
set -euo pipefail
other=${1:?usage: benches/socket_ab.sh OTHER_RELEASE_DIR [RUNS] [ROUNDS]}
runs=${2:-300}
rounds=${3:-4}
cd "$(dirname "$0")/.."
cargo build --quiet --release --bins --examples
this=$PWD/target/release
for bin in "$this" "$other"; do
  [ -x "$bin/nixpush" ] && [ -x "$bin/nixpush-hook" ] || { echo "no nixpush and nixpush-hook in $bin" >&2; exit 2; }
done
work=$(mktemp -d /dev/shm/nixpush-socket-ab.XXXXXX)
daemon_pid=
peer_pid=
peer_socket=/run/nix-post-build-hook-queue.sock
cleanup() {
  if [ -n "$daemon_pid" ]; then kill -TERM "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; fi
  if [ -n "$peer_pid" ]; then kill "$peer_pid" 2>/dev/null || true; wait "$peer_pid" 2>/dev/null || true; rm -f "$peer_socket"; fi
  if [ -s "$work/added.txt" ]; then xargs nix-store --delete < "$work/added.txt" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

peer=${NIXPUSH_PEER_HOOK:-}
if [ -n "$peer" ] && [ ! -e "$peer_socket" ]; then
  python3 benches/peer_sink.py "$peer_socket" &
  peer_pid=$!
  for _ in $(seq 100); do [ -S "$peer_socket" ] && break; sleep 0.05; done
elif [ -n "$peer" ]; then
  echo "== peer column skipped: $peer_socket exists (a real nix-post-build-hook-queue?); not touching it"
  peer=
fi

mkdir -p "$work/files"
python3 benches/fresh_files.py "$work/files" $((runs * rounds * 2)) "$work-$(date +%s%N)"
find "$work/files" -type f | xargs -n 1000 nix-store --add > "$work/added.txt" 2>/dev/null
rm -rf "$work/files"
split -l "$runs" -a 3 -d "$work/added.txt" "$work/part."

export NIXPUSH_SOCKET=$work/run/nixpush.sock NIXPUSH_SPOOL=$work/state/spool
echo "== $(nproc) cores, $(uname -r), nixpush $(git describe --always --dirty 2>/dev/null || echo "?") against $other;" \
  "queue on tmpfs; load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
part=0
for round in $(seq "$rounds"); do
  for way in this other; do
    bin=$this; [ "$way" = other ] && bin=$other
    rm -rf "$work/state" "$work/run" "$work/gcroots"
    printf 'socket = "%s"\nstate_dir = "%s"\ngc_roots_dir = "%s"\nupstream = []\n[target]\nurl = "file://%s/cache"\n' \
      "$work/run/nixpush.sock" "$work/state" "$work/gcroots" "$work" > "$work/config.toml"
    "$bin/nixpush" --config "$work/config.toml" daemon --hold 2>>"$work/daemon.log" &
    daemon_pid=$!
    for _ in $(seq 200); do "$bin/nixpush" --config "$work/config.toml" status >/dev/null 2>&1 && break; sleep 0.05; done
    echo "-- round $round, $way build (load average $(cut -d' ' -f1 /proc/loadavg))"
    "$this/examples/hook_latency" "$bin/nixpush-hook" "$work/part.$(printf %03d $part)" /bin/true ${peer:+"$peer"} \
      | grep -E '^\| (true|nixpush-hook|post-build-hook) |^overhead|vs post-build-hook'
    part=$((part + 1))
    kill -TERM "$daemon_pid"; wait "$daemon_pid" || true; daemon_pid=
  done
done
