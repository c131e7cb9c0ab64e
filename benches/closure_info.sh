#!/usr/bin/env bash
# Closure info for ~3,000 paths with references: nixpush's SQLite reader vs its `nix path-info` fallback vs
# `nix path-info --json --recursive` itself.
#
#   benches/closure_info.sh              # as root, from the repository root
#
# benches/closure3000.nix writes 3,000 small text files at evaluation time (each referencing two others) and
# one derivation referencing them all, so building it costs one trivial build. The SQLite and fallback outputs
# are checked to be identical and to match Nix's own answer before anything is timed.
set -euo pipefail

cd "$(dirname "$0")/.."
command -v hyperfine >/dev/null || { apt-get update -qq && apt-get install -y -qq hyperfine >/dev/null; }

cargo build --quiet --release --bins --examples
INFO="$PWD/target/release/examples/closure_info"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT

TOP="$(nix-build benches/closure3000.nix --no-out-link \
    --option build-users-group "" --option sandbox false --option substituters "")"
NIX=(nix --extra-experimental-features nix-command)

"$INFO" "$TOP" > "$SCRATCH/sqlite.json"
"$INFO" --nix-command "$TOP" > "$SCRATCH/command.json" 2>/dev/null
"${NIX[@]}" path-info --json --recursive "$TOP" > "$SCRATCH/nix.json"
python3 - "$SCRATCH" <<'PY'
import json, sys
d = sys.argv[1]
ours = json.load(open(f"{d}/sqlite.json"))
assert ours == json.load(open(f"{d}/command.json")), "SQLite and nix path-info fallback differ"
nix = {p["path"]: p for p in json.load(open(f"{d}/nix.json"))}
assert len(nix) == len(ours), (len(nix), len(ours))
for p in ours:
    n = nix[p["path"]]
    assert (n["narHash"], n["narSize"], sorted(n["references"])) == (p["narHash"], p["narSize"], p["references"]), p["path"]
placed = set()
for p in ours:
    assert all(r in placed or r == p["path"] for r in p["references"]), "not topologically sorted"
    placed.add(p["path"])
print(f"{len(ours)} paths, {sum(len(p['references']) for p in ours)} references: all three sources agree")
PY

echo "== closure() alone, in process (5 runs)"
for _ in 1 2 3 4 5; do "$INFO" "$TOP" 2>&1 >/dev/null; done
hyperfine --warmup 2 --runs 10 -N --export-markdown "$SCRATCH/closure.md" \
    -n "nixpush closure via SQLite" "$INFO $TOP" \
    -n "nixpush closure via nix path-info" "$INFO --nix-command $TOP" \
    -n "nix path-info --json --recursive" "${NIX[*]} path-info --json --recursive $TOP"
cat "$SCRATCH/closure.md"
