#!/usr/bin/env bash
# Every benchmark behind a performance figure in README.md and benches/README.md, one after another, then each
# one's result table again in one summary. Small sizes by default, so the whole set finishes in well under an hour
# on 2 cores; --full uses the sizes the READMEs quote. A benchmark that fails is reported and the others still run;
# the exit status is non-zero if any failed.
#
#   benches/all.sh [--full]             (as root, from anywhere)
#
#                     default                          --full
#   hook_bench.sh     200 hook runs, 5,000 enqueued    1,000 hook runs, 20,000 enqueued
#   nar_throughput.sh /usr/lib/gcc, 256 MiB file       /usr/lib/x86_64-linux-gnu, 2 GiB file
#   closure_info.sh   3,000 paths                      3,000 paths
#   upload.sh         60 paths, >= 200 MiB;            300 paths, >= 1,100 MiB;
#                     memory at 50 and 500 paths       memory at 50, 3,000 and 12,000 paths
#   rebuilds.sh       100 derivations, 8 rounds        200 derivations, 10 rounds
#   backends.sh       60 paths, 3 rounds               300 paths, >= 1,100 MiB, 3 rounds
#   root_links.py     1,000 roots, 4 rounds            3,000 roots, 8 rounds
#   fsync_gap.py      100 commits, 2 rounds            200 commits, 3 rounds
#
# Run it on an otherwise idle machine: each script prints the load average, and withholds its verdicts when the
# 1-minute load average was above 1.0 before it started. Set NIXPUSH_PEER_HOOK for hook_bench.sh's peer column.
set -euo pipefail
cd "$(dirname "$0")/.."
full=false
case ${1:-} in
  --full) full=true ;;
  "") ;;
  *) echo "usage: benches/all.sh [--full]" >&2; exit 2 ;;
esac
if $full; then
  hook_args=(1000 20000) nar_dir=/usr/lib/x86_64-linux-gnu nar_big_mib=2048 upload_args=(300 1100)
  mem_sizes="50 3000 12000" rebuild_args=(200 10) backend_args=(300 1100 3)
  root_args=(3000 8) fsync_args=(200 3)
else
  hook_args=(200 5000) nar_dir=/usr/lib/gcc nar_big_mib=256 upload_args=(60 200) mem_sizes="50 500"
  rebuild_args=(100 8) backend_args=(60 220 3) root_args=(1000 4) fsync_args=(100 2)
fi

logs=$(mktemp -d /var/tmp/nixpush-bench-all.XXXXXX)
trap 'rm -rf "$logs"' EXIT
names=()
declare -A outcome

bench() { # name, command…
  local name=$1; shift
  names+=("$name")
  echo
  echo "######## $name: $*"
  local start=$SECONDS
  if "$@" 2>&1 | tee "$logs/$name.log"; then
    outcome[$name]="ok, $((SECONDS - start)) s"
  else
    outcome[$name]="FAILED (exit ${PIPESTATUS[0]}), $((SECONDS - start)) s"
  fi
}

echo "== $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $(nix --version)," \
  "nixpush $(git describe --always --dirty 2>/dev/null || echo '?'), $(date -u '+%Y-%m-%d %H:%M UTC')"
bench hook_bench benches/hook_bench.sh "${hook_args[@]}"
bench nar_throughput env NAR_BENCH_DIR="$nar_dir" NAR_BENCH_BIG_MIB="$nar_big_mib" benches/nar_throughput.sh
bench closure_info benches/closure_info.sh
bench upload env MEM_SIZES="$mem_sizes" benches/upload.sh "${upload_args[@]}"
bench rebuilds benches/rebuilds.sh "${rebuild_args[@]}"
bench root_links python3 benches/root_links.py /var/tmp "${root_args[@]}"
bench fsync_gap python3 benches/fsync_gap.py /var/tmp "${fsync_args[@]}"
if [ -x benches/backends.sh ]; then
  bench backends benches/backends.sh "${backend_args[@]}"
else
  names+=(backends)
  outcome[backends]="skipped: benches/backends.sh is not in this checkout"
fi

echo
echo "######## summary"
failed=0
for name in "${names[@]}"; do
  echo
  echo "### $name (${outcome[$name]})"
  [ -f "$logs/$name.log" ] || continue
  case ${outcome[$name]} in FAILED*) failed=1 ;; esac
  # The result lines of each script: Markdown tables, hook latency and enqueue lines, peak RSS and ratio lines
  # (not rebuilds.sh's per-run progress).
  # Progress bars are carriage-return lines; keep only what follows the last \r.
  sed 's/.*\r//' "$logs/$name.log" | grep -E \
    '^\||^- |^== |^runs:|overhead:|paths/s|peak RSS|Maximum resident|^Closure:|^nixpush|agree$|^[0-9]+ derivations|^daemon per|load average|^load |per form|per gap' \
    | grep -v '^   round ' || echo "(no result lines; see the output above)"
done
exit "$failed"
