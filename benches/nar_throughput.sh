#!/usr/bin/env bash
# NAR serialization + SHA-256 throughput and peak memory, nixpush against Nix itself, in one run.
#
#   benches/nar_throughput.sh            # as root, from the repository root
#   NAR_BENCH_DIR=/usr/lib/gcc NAR_BENCH_BIG_MIB=256 benches/nar_throughput.sh    # smaller, quicker
#
# 1. A multi-hundred-MiB path with many files (NAR_BENCH_DIR, default /usr/lib/x86_64-linux-gnu, added to the store),
#    with hyperfine, against both of Nix's ways of hashing a path:
#    - `nix-hash --type sha256 --base32 PATH`: Nix serialises and hashes in one process, as `nixpush verify` does;
#      this is the fair comparison;
#    - `nix-store --dump PATH | sha256sum`: two processes and a pipe, where coreutils' sha256sum is often the
#      bottleneck, so it flatters whoever is compared with it;
#    and `nixpush dump-nar PATH | sha256sum` (the same pipe shape as Nix's). All must agree on the hash first.
#    Goal: nixpush at least as fast as `nix-hash` (>= 1.0x).
# 2. A 2 GiB (NAR_BENCH_BIG_MIB) single-file path: peak RSS of `nixpush verify PATH` with GNU time. Goal: < 32 MiB.
#
# The paths it adds are deleted again at the end. Prints the load average; ratios measured above a 1-minute load
# average of 1.0 are marked as such.
set -euo pipefail

cd "$(dirname "$0")/.."
need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need hyperfine hyperfine
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
need nix-store nix-bin

cargo build --quiet --release --bins --examples
NIXPUSH="$PWD/target/release/nixpush"
SRC_DIR="${NAR_BENCH_DIR:-/usr/lib/x86_64-linux-gnu}"
BIG_MIB="${NAR_BENCH_BIG_MIB:-2048}"
SCRATCH="$(mktemp -d)"
added=()
cleanup() {
    for p in "${added[@]}"; do nix-store --delete "$p" >/dev/null 2>&1 || true; done
    rm -rf "$SCRATCH"
}
trap cleanup EXIT

echo "== adding $SRC_DIR to the store"
TREE="$(nix-store --add "$SRC_DIR")"
added+=("$TREE")
echo "$TREE: $(nix-store -q --size "$TREE") bytes of NAR, $(find "$TREE" -type f | wc -l) files"
# Both tools must agree before their speed means anything.
ours="$("$NIXPUSH" dump-nar "$TREE" | sha256sum)"
theirs="$(nix-store --dump "$TREE" | sha256sum)"
[ "$ours" = "$theirs" ] || { echo "NAR mismatch: $ours vs $theirs" >&2; exit 1; }
"$NIXPUSH" verify "$TREE"
# nix-hash prints base32; compare it with Nix's recorded NarHash (sha256:<base32>) and with sha256sum's hex.
nix_hash="$(nix-hash --type sha256 --base32 "$TREE")"
[ "sha256:$nix_hash" = "$(nix-store -q --hash "$TREE")" ] || { echo "nix-hash disagrees with Nix's database" >&2; exit 1; }
[ "$(nix-hash --type sha256 "$TREE")" = "${theirs%% *}" ] || { echo "nix-hash disagrees with nix-store --dump | sha256sum" >&2; exit 1; }
echo "nixpush, nix-hash and nix-store --dump | sha256sum agree"

load_before="$(cut -d' ' -f1 /proc/loadavg)"
echo "== throughput (load average before: $(cut -d' ' -f1-3 /proc/loadavg))"
hyperfine --warmup 1 --runs 5 --export-markdown "$SCRATCH/tree.md" --export-json "$SCRATCH/tree.json" \
    -n "nixpush verify" "$NIXPUSH verify $TREE" \
    -n "nix-hash --type sha256 --base32" "nix-hash --type sha256 --base32 $TREE" \
    -n "nixpush dump-nar | sha256sum" "$NIXPUSH dump-nar $TREE | sha256sum" \
    -n "nix-store --dump | sha256sum" "nix-store --dump $TREE | sha256sum"
cat "$SCRATCH/tree.md"
python3 - "$SCRATCH/tree.json" "$load_before" "$(cut -d' ' -f1 /proc/loadavg)" <<'PY'
import json, sys
means = {r["command"]: r["median"] for r in json.load(open(sys.argv[1]))["results"]}
ours = means["nixpush verify"]
mark = "" if float(sys.argv[2]) <= 1.0 else f" (load average {sys.argv[2]} before the run, above 1.0: no verdict)"
print(f"nixpush verify vs nix-hash --type sha256: {means['nix-hash --type sha256 --base32'] / ours:.2f}x{mark}")
print(f"nixpush verify vs nix-store --dump | sha256sum: {means['nix-store --dump | sha256sum'] / ours:.2f}x{mark}")
print(f"load average after: {sys.argv[3]}")
PY

echo "== $BIG_MIB MiB single file"
mkdir "$SCRATCH/big"
# Random data, so nothing along the way can take a shortcut through zeros.
head -c $((BIG_MIB * 1024 * 1024)) /dev/urandom > "$SCRATCH/big/blob"
BIG="$(nix-store --add "$SCRATCH/big/blob")"
added+=("$BIG")
rm -f "$SCRATCH/big/blob"
/usr/bin/time -v "$NIXPUSH" verify "$BIG" 2> "$SCRATCH/time.txt"
grep -E "Maximum resident set size|Elapsed \(wall clock\)" "$SCRATCH/time.txt"
rss_kib="$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$SCRATCH/time.txt")"
echo "peak RSS of nixpush verify on $BIG_MIB MiB: $((rss_kib / 1024)) MiB (goal < 32 MiB)"
/usr/bin/time -v sh -c "nix-store --dump $BIG | sha256sum" 2> "$SCRATCH/time-nix.txt"
grep -E "Maximum resident set size|Elapsed \(wall clock\)" "$SCRATCH/time-nix.txt" | sed 's/^/nix-store --dump | sha256sum: /'
hyperfine --runs 3 --export-markdown "$SCRATCH/big.md" \
    -n "nixpush verify ($BIG_MIB MiB)" "$NIXPUSH verify $BIG" \
    -n "nix-store --dump | sha256sum ($BIG_MIB MiB)" "nix-store --dump $BIG | sha256sum"
cat "$SCRATCH/big.md"
