#!/usr/bin/env bash
# NAR serialization + SHA-256 throughput and peak memory, nixpush against Nix itself, in one run.
#
#   benches/nar_throughput.sh            # as root, from the repository root
#   NAR_BENCH_DIR=/usr/lib/gcc NAR_BENCH_BIG_MIB=256 benches/nar_throughput.sh    # smaller, quicker
#
# 1. A multi-hundred-MiB path with many files (NAR_BENCH_DIR, default /usr/lib/x86_64-linux-gnu, added to the store):
#    `nixpush verify PATH` (NAR + SHA-256 in process) vs `nix-store --dump PATH | sha256sum`, with hyperfine;
#    also `nixpush dump-nar PATH | sha256sum` (the same pipe shape as Nix's).
#    Goal: nixpush at least as fast (>= 1.0x).
# 2. A 2 GiB (NAR_BENCH_BIG_MIB) single-file path: peak RSS of `nixpush verify PATH` with GNU time. Goal: < 32 MiB.
#
# The paths it adds are deleted again at the end.
set -euo pipefail

cd "$(dirname "$0")/.."
need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need hyperfine hyperfine
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
need nix-store nix-bin

cargo build --release --quiet --bin nixpush
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

echo "== throughput"
hyperfine --warmup 1 --runs 5 --export-markdown "$SCRATCH/tree.md" \
    -n "nixpush verify" "$NIXPUSH verify $TREE" \
    -n "nixpush dump-nar | sha256sum" "$NIXPUSH dump-nar $TREE | sha256sum" \
    -n "nix-store --dump | sha256sum" "nix-store --dump $TREE | sha256sum"
cat "$SCRATCH/tree.md"

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
