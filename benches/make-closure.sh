#!/usr/bin/env bash
# Builds a realistic closure with real Nix: N store paths (default 300) made of this machine's own /usr files
# (binaries, libraries, docs, so compression behaves like real packages), at least MIN_MIB MiB in all (default
# 1100), each path referencing the previous one. Prints the top of the chain; the chain is the closure.
#
#   benches/make-closure.sh [N] [MIN_MIB]
#
# The file lists live in /var/tmp/nixpush-bench-closure so the same store paths come back on the next run (Nix
# then builds nothing).
set -euo pipefail
count=${1:-300}
min_mib=${2:-1100}
work=/var/tmp/nixpush-bench-closure-$count-$min_mib
mkdir -p "$work"

if [ ! -f "$work/closure.nix" ]; then
  # Regular files from /usr in a fixed order, dealt into `count` lists of roughly equal size.
  find /usr/lib /usr/bin /usr/share /usr/libexec /usr/sbin -xdev -type f -size +4k -readable 2>/dev/null \
    | LC_ALL=C sort > "$work/files"
  python3 - "$work" "$count" "$min_mib" <<'EOF'
import os, sys
work, count, min_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
files = [l.rstrip("\n") for l in open(os.path.join(work, "files"))]
target = min_mib * 1024 * 1024
per = target // count + 1
lists, current, size, total = [], [], 0, 0
for f in files:
    try:
        s = os.path.getsize(f)
    except OSError:
        continue
    if s > 64 * 1024 * 1024:
        continue
    current.append(f); size += s; total += s
    if size >= per:
        lists.append(current); current, size = [], 0
        if len(lists) == count:
            break
if len(lists) < count:
    sys.exit(f"not enough files under /usr for {count} paths of {per} bytes")
for i, l in enumerate(lists):
    with open(os.path.join(work, f"list-{i}"), "w") as out:
        out.write("\n".join(l) + "\n")
print(f"{count} paths, {total / 2**20:.0f} MiB of /usr files", file=sys.stderr)
EOF
  cat > "$work/closure.nix" <<EOF
let
  mk = i: prev: builtins.derivation {
    name = "bench-usr-\${toString i}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    list = "$work/list-\${toString i}";
    inherit prev;
    args = [ "-c" ''
      set -e
      /bin/mkdir -p \$out/files
      n=0
      while read -r f; do n=\$((n+1)); /bin/cp "\$f" "\$out/files/\$n-''\${f##*/}"; done < "\$list"
      echo "\$prev" > \$out/prev
    '' ];
  };
  chain = i: if i == 0 then mk 0 "" else mk i (chain (i - 1));
in chain ($count - 1)
EOF
fi
nix-build "$work/closure.nix" --no-out-link --option build-users-group "" --option sandbox false \
  --option substituters "" --cores 2 -j 2 --quiet 2>&1 >/dev/null | grep -v '^these\|^  /nix' >&2 || true
nix-build "$work/closure.nix" --no-out-link --option build-users-group "" --option sandbox false \
  --option substituters "" 2>/dev/null
