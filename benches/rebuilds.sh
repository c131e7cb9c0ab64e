#!/usr/bin/env bash
# "Builds are never slowed": N small derivations (benches/rebuilds.nix, default 200) built with real Nix, fresh
# every time, five ways in each round:
#   none     no post-build-hook;
#   true     /bin/true as the hook: the floor, since Nix runs any hook synchronously, once per derivation;
#   nix-copy the Nix manual's recipe: a hook that runs `nix copy --to file://…` of the outputs, with
#            `secret-key-files` set so the paths are signed;
#   hold     nixpush-hook, with a `nixpush daemon --hold` that only queues: the cost of the hook alone;
#   nixpush  nixpush-hook, with `nixpush daemon` uploading to a signed file:// cache in the background: the hook
#            plus the uploads competing with the build (nixpush − hold is what the uploads cost);
#   peer     only when NIXPUSH_PEER_HOOK names newAM/nix-post-build-hook-queue's client (its `post-build-hook`
#            binary, built from its source): the leanest hook there is, one datagram to
#            /run/nix-post-build-hook-queue.sock (received and dropped here), no ack and nothing on disk; what any
#            hook costs beyond /bin/true's process start. This script never downloads or builds that project.
# Both daemons are started once and kept running for every round, as in production. The order rotates from round
# to round to spread the noise. After each nixpush build the script waits until the cache holds every output, so
# no upload spills into the next build. Reports the median build wall time of each way with the range, the ratios,
# and the time from build start until the cache holds every output. Both caches are checked with Nix itself
# (`nix store verify` with the public key); the bench fails otherwise. The load average is printed per round; the
# verdicts are withheld when the 1-minute load average was above 1.0 before the run.
#
#   benches/rebuilds.sh [N] [ROUNDS]     (as root, from anywhere; N defaults to 200, ROUNDS to 10, at least 8
#                                         for a verdict)
#   NIXPUSH_PEER_HOOK=/path/to/post-build-hook benches/rebuilds.sh
set -euo pipefail
n=${1:-200}
runs=${2:-10}
cd "$(dirname "$0")/.."
cargo build --quiet --release --bins --examples
bin=$PWD/target/release

work=$(mktemp -d /var/tmp/nixpush-bench.XXXXXX)
daemon_pids=()
peer_pid=
peer_socket=/run/nix-post-build-hook-queue.sock
cleanup() {
  for pid in "${daemon_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  if [ -n "$peer_pid" ]; then kill "$peer_pid" 2>/dev/null || true; wait "$peer_pid" 2>/dev/null || true; rm -f "$peer_socket"; fi
  # Outputs before the derivations that produced them, each list backwards: `nix-store --delete` stops at the
  # first path that a path not yet deleted still refers to, and derivation i is only referred to by later ones.
  for list in added-outputs added-drvs; do
    if [ -s "$work/$list" ]; then tac "$work/$list" | xargs nix-store --delete >/dev/null 2>&1 || true; fi
  done
  rm -rf "$work"
}
trap cleanup EXIT

nix-store --generate-binary-cache-key rebuilds-bench-1 "$work/key.sec" "$work/key.pub"
chmod 600 "$work/key.sec"
export XDG_CACHE_HOME=$work/xdg-cache # Nix's narinfo cache must not remember earlier runs
nix_options=(--no-out-link --option build-users-group "" --option sandbox false --option substituters ""
  -j 2 --cores 1)

# The manual's recipe (nix.dev / Nix manual, "Using the post-build-hook"), pointed at a local file:// cache with
# the same compression as nixpush. Nix 2.8.0 leaves OUT_PATHS empty (NixOS/nix#6446), so when it is empty the
# script asks Nix for the outputs of DRV_PATH, which are registered by the time the hook runs.
cat > "$work/nix-copy-hook.sh" <<'EOF'
#!/bin/sh
set -eu
set -f # disable globbing
out_paths=${OUT_PATHS:-$(nix-store --query --outputs "$DRV_PATH")}
exec nix --extra-experimental-features nix-command copy --to "file://$BENCH_CACHE?compression=zstd" $out_paths
EOF
chmod +x "$work/nix-copy-hook.sh"

start_daemon() { # name, cache directory, extra daemon arguments…
  local name=$1 cache=$2; shift 2
  cat > "$work/$name.toml" <<EOF
socket = "$work/$name/nixpush.sock"
state_dir = "$work/$name/state"
# Each daemon its own roots: a daemon prunes its roots directory to its own queue, so sharing the default one
# would take the real daemon's roots, and roots there would keep the benchmark's paths from being deleted.
gc_roots_dir = "$work/$name/gcroots"
upstream = []
[target]
url = "file://$cache"
signing_key_file = "$work/key.sec"
EOF
  "$bin/nixpush" --config "$work/$name.toml" daemon "$@" 2>>"$work/$name.log" &
  daemon_pids+=($!)
  eval "${name}_pid=$!"
  for _ in $(seq 200); do
    "$bin/nixpush" --config "$work/$name.toml" status >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "daemon $name did not start:" >&2; cat "$work/$name.log" >&2; exit 1
}

# Exits non-zero unless every path in $2 has a narinfo in cache $1 whose NAR is there, signed with our key, and
# Nix itself verifies the NAR hashes and signatures from the cache.
verify_cache() { # cache dir, outputs file
  python3 - "$1" "$2" rebuilds-bench-1 <<'PY' || return 1
import os, sys
cache, outputs, key = sys.argv[1:]
missing = []
for p in open(outputs).read().split():
    info = os.path.join(cache, os.path.basename(p)[:32] + ".narinfo")
    if not os.path.exists(info):
        missing.append(p); continue
    fields = dict(l.split(": ", 1) for l in open(info).read().splitlines() if ": " in l)
    assert fields["StorePath"] == p, (info, fields["StorePath"])
    assert os.path.exists(os.path.join(cache, fields["URL"])), f"{info}: {fields['URL']} missing"
    assert fields.get("Sig", "").startswith(key + ":"), f"{info}: not signed by {key}"
if missing:
    sys.exit(f"{len(missing)} outputs missing from {cache}, e.g. {missing[0]}")
PY
  xargs nix --extra-experimental-features nix-command store verify --store "file://$1" --sigs-needed 1 \
    --option trusted-public-keys "$(cat "$work/key.pub")" < "$2" 2>"$work/verify.log" \
    || { echo "nix store verify failed on $1:" >&2; cat "$work/verify.log" >&2; return 1; }
}

now() { echo "$EPOCHREALTIME"; }

run_way() { # way, round number
  local way=$1 run=$2 seed="$stamp-$2-$1" extra=() cache="$work/cache-$1" daemon=uploading
  nix-instantiate benches/rebuilds.nix --arg n "$n" --argstr seed "$seed" 2>/dev/null > "$work/drvs"
  cat "$work/drvs" >> "$work/added-drvs"
  xargs nix-store --query --outputs < "$work/drvs" > "$work/outputs"
  cat "$work/outputs" >> "$work/added-outputs"
  case $way in
    none) ;;
    true) extra=(--option post-build-hook /bin/true) ;;
    nix-copy) extra=(--option post-build-hook "$work/nix-copy-hook.sh" --option secret-key-files "$work/key.sec") ;;
    hold)
      daemon=held
      extra=(--option post-build-hook "$bin/nixpush-hook") ;;
    nixpush)
      extra=(--option post-build-hook "$bin/nixpush-hook") ;;
    peer) extra=(--option post-build-hook "$peer") ;;
  esac
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  local start end
  start=$(now)
  BENCH_CACHE=$cache NIXPUSH_SOCKET=$work/$daemon/nixpush.sock NIXPUSH_SPOOL=$work/$daemon/state/spool \
    nix-build benches/rebuilds.nix --arg n "$n" --argstr seed "$seed" "${nix_options[@]}" "${extra[@]}" \
    >"$work/build.out" 2>"$work/build.log" || { echo "nix-build ($way) failed:" >&2; tail -20 "$work/build.log" >&2; exit 1; }
  end=$(now)
  local built
  built=$(grep -c '^building' "$work/build.log" || true)
  [ "$built" -eq "$n" ] || { echo "$way: expected $n builds, Nix built $built" >&2; exit 1; }
  local cache_secs="" rss=""
  if [ "$way" = nixpush ]; then
    # The cache is complete once nothing is queued, uploading or spooled and every output has its narinfo.
    python3 - "$bin/nixpush" "$work/uploading.toml" "$cache" "$work/outputs" <<'PY' || exit 1
import json, os, subprocess, sys, time
nixpush, config, cache, outputs = sys.argv[1:]
wanted = [os.path.join(cache, os.path.basename(p)[:32] + ".narinfo") for p in open(outputs).read().split()]
deadline = time.monotonic() + 600
while True:
    s = json.loads(subprocess.run([nixpush, "--config", config, "status", "--json"],
                                  check=True, capture_output=True).stdout)
    if s["failed"]:
        sys.exit(f"daemon reports {s['failed']} failed paths: {s['failed_paths'][:3]}")
    if s["queued"] + s["in_flight"] + s["spooled"] == 0 and all(map(os.path.exists, wanted)):
        break
    if time.monotonic() > deadline:
        sys.exit(f"cache still incomplete after 600 s: {s['queued']} queued, {s['in_flight']} in flight")
    time.sleep(0.02)
PY
    cache_secs=$(echo "$(now) - $start" | bc)
    rss=$(awk '/VmHWM/ {print $2}' "/proc/$uploading_pid/status")
  fi
  if [ "$way" = nix-copy ] || [ "$way" = nixpush ]; then
    verify_cache "$cache" "$work/outputs" || { echo "$way: cache $cache incomplete" >&2; exit 1; }
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$way" "$run" "$(echo "$end - $start" | bc)" "$cache_secs" "$rss" "$load" \
    >> "$work/results.tsv"
  printf '   round %s %-8s %6.2f s (load average %s before)%s\n' "$run" "$way" "$(echo "$end - $start" | bc)" "$load" \
    "${cache_secs:+, cache complete after $(printf %.2f "$cache_secs") s, daemon peak RSS $((rss / 1024)) MiB}" >&2
}

stamp=$(date +%s%N)
ways=(none true nix-copy hold nixpush)
# The peer's client sends one datagram per output to a fixed socket; a receiver that drops them stands in for its
# daemon, so the client does the same work as in production.
peer=${NIXPUSH_PEER_HOOK:-}
if [ -n "$peer" ]; then
  if [ ! -x "$peer" ]; then
    echo "NIXPUSH_PEER_HOOK=$peer is not executable" >&2; exit 1
  elif [ -e "$peer_socket" ]; then
    echo "== peer way skipped: $peer_socket exists (a real nix-post-build-hook-queue?); not touching it" >&2
  else
    python3 benches/peer_sink.py "$peer_socket" &
    peer_pid=$!
    for _ in $(seq 100); do [ -S "$peer_socket" ] && break; sleep 0.05; done
    ways+=(peer)
  fi
else
  echo "== peer way skipped: set NIXPUSH_PEER_HOOK to the client binary of newAM/nix-post-build-hook-queue" \
    "(post-build-hook) to add it" >&2
fi
load_before=$(cut -d' ' -f1 /proc/loadavg)
echo "== $n derivations, $runs rounds of ${#ways[@]} ways; $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)," \
  "$(nix --version), nixpush $(git describe --always --dirty 2>/dev/null || echo '?')" >&2
start_daemon uploading "$work/cache-nixpush"
start_daemon held "$work/cache-hold" --hold
for run in $(seq "$runs"); do
  for k in $(seq 0 $((${#ways[@]} - 1))); do run_way "${ways[$(((k + run - 1) % ${#ways[@]}))]}" "$run"; done
done

python3 - "$work/results.tsv" "$n" "$runs" "$load_before" "${ways[@]}" <<'PY'
import statistics, sys
path, n, runs, load_before = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rows = [l.rstrip("\n").split("\t") for l in open(path)]
ways = sys.argv[5:]
wall = {w: [float(r[2]) for r in rows if r[0] == w] for w in ways}
loads = [float(r[5]) for r in rows]
med = {w: statistics.median(t) for w, t in wall.items()}
cache = [float(r[3]) for r in rows if r[0] == "nixpush"]
rss = [int(r[4]) for r in rows if r[0] == "nixpush"]
names = {"none": "no hook", "true": "`/bin/true` hook", "nix-copy": "`nix copy` hook (the manual's recipe)",
         "hold": "`nixpush-hook`, daemon `--hold` (queueing only)", "nixpush": "`nixpush-hook`, daemon uploading",
         "peer": "newAM/nix-post-build-hook-queue's client (one datagram, no ack)"}
print(f"{n} derivations built with `nix-build -j 2`, median of {runs} rounds (order rotated between rounds), one")
print(f"daemon per nixpush way kept running; load average {load_before} before the run, "
      f"{min(loads):.2f}–{max(loads):.2f} before the rounds.")
print()
print("| hook | build wall time, median (s) | range (s) | vs `/bin/true` hook | rounds slower than `/bin/true` |")
print("|---|---|---|---|---|")
true_by_round = {r[1]: float(r[2]) for r in rows if r[0] == "true"}
for w in ways:
    slower = sum(1 for r in rows if r[0] == w and float(r[2]) > true_by_round[r[1]])
    print(f"| {names[w]} | {med[w]:.2f} | {min(wall[w]):.2f}–{max(wall[w]):.2f} | {med[w] / med['true']:.3f}× "
          f"| {slower if w != 'true' else '–'} of {runs} |")
print()
def verdict(met):
    if load_before > 1.0:
        return f"no verdict: load average {load_before} before the run, above 1.0"
    if runs < 8:
        return f"no verdict: {runs} rounds, fewer than 8"
    return "met" if met else "missed"
r1 = med["nixpush"] / med["true"]
r_hold = med["hold"] / med["true"]
r2 = med["nix-copy"] / med["nixpush"]
print(f"- nixpush (daemon uploading) vs `/bin/true` hook: {r1:.3f}× (goal ≤ 1.05×: {verdict(r1 <= 1.05)})")
print(f"- the hook alone (daemon `--hold`) vs `/bin/true` hook: {r_hold:.3f}×; the uploads add "
      f"{(med['nixpush'] - med['hold']) / n * 1000:+.1f} ms per derivation")
if "peer" in med:
    print(f"- the peer's client vs `/bin/true` hook: {med['peer'] / med['true']:.3f}×; nixpush-hook (`--hold`) "
          f"adds {(med['hold'] - med['peer']) / n * 1000:+.1f} ms per derivation over it")
print(f"- `nix copy` hook vs nixpush: {r2:.2f}× slower (goal ≥ 5×: {verdict(r2 >= 5)})")
print(f"- nixpush: cache holds all {n} outputs {statistics.median(cache):.2f} s after the build started (median; "
      f"runs {', '.join(f'{t:.2f}' for t in cache)}); daemon peak RSS {max(rss) / 1024:.1f} MiB")
PY
