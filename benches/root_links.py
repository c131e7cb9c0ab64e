#!/usr/bin/env python3
"""What one GC root costs to create, in the two forms Nix takes as a root.

    benches/root_links.py [DIR] [COUNT] [ROUNDS]

- symlink: `DIR/<hash>-<name>` -> `/nix/store/<hash>-<name>`, what nixpush made before; the target is too long
  to live in the inode, so each root takes a new inode and a data block;
- hard link: `DIR/<hash>-<name>` as a hard link of one empty file, what the daemon makes now (a directory entry
  only).

COUNT roots of each form (default 3,000) are created in a fresh directory under DIR (default /var/tmp, which should
be on the filesystem of `gc_roots_dir`), then removed; the forms alternate round by round (default 8 rounds). Prints
the microseconds per create, median and range, and the load average before and after.
"""

import os
import sys
import tempfile
import time

TARGET_NAME = "some-package-name-1.2.3"


def one_round(base, kind, count):
    work = tempfile.mkdtemp(prefix=f"nixpush-roots-{kind}-", dir=base)
    try:
        anchor = os.path.join(work, ".anchor")
        open(anchor, "w").close()
        names = [os.path.join(work, f"{i:032d}-{TARGET_NAME}") for i in range(count)]
        started = time.perf_counter()
        if kind == "symlink":
            for name in names:
                os.symlink("/nix/store/" + os.path.basename(name), name)
        else:
            for name in names:
                os.link(anchor, name)
        elapsed = time.perf_counter() - started
        for name in names:
            os.unlink(name)
        return elapsed / count * 1e6
    finally:
        for entry in os.listdir(work):
            os.unlink(os.path.join(work, entry))
        os.rmdir(work)


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    print(f"load before: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    results = {"symlink": [], "hard link": []}
    for r in range(rounds):
        kinds = list(results) if r % 2 == 0 else list(reversed(list(results)))
        for kind in kinds:
            results[kind].append(one_round(base, kind, count))
    print(f"{count} roots per form and round, {rounds} rounds, in {base}")
    print("| form | µs per root, median | range |")
    print("|---|---|---|")
    for kind, times in results.items():
        times.sort()
        print(f"| {kind} | {times[len(times) // 2]:.1f} | {times[0]:.1f}–{times[-1]:.1f} |")
    print(f"load after: {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
    main()
