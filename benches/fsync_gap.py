#!/usr/bin/env python3
"""What the durable ack's fdatasync costs on this disk, by how long the disk sat idle before it.

    benches/fsync_gap.py [DIR] [COMMITS] [ROUNDS]

Writes the queue's pattern (a SQLite database in WAL mode, `synchronous=NORMAL`, one small INSERT per commit) in a
fresh directory under DIR (default /var/tmp, which should be on the filesystem of `state_dir`), and after each
commit times one `fdatasync` of the write-ahead log through a separate descriptor, as the daemon does. Commits come
back to back, 2 ms apart (about the spacing of hooks in `hook_bench.sh`) and 20 ms apart (builds of a few
milliseconds each); the gaps alternate round by round (default 3 rounds of 200 commits each). Prints the median and
p90 per gap and the load average before and after.

Why it matters: the hook's ack waits for this sync and newAM/nix-post-build-hook-queue's one-way datagram does not,
so the sync at the spacing hooks arrive with is the floor of what the hook costs over that client.
"""

import os
import sqlite3
import sys
import tempfile
import time

GAPS_MS = (0, 2, 20)


def one_round(connection, wal, gap_ms, commits, tag):
    taken = []
    for i in range(commits):
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(
            "INSERT INTO entries VALUES (?, 'queued', 0, 'hook', ?)",
            (f"/nix/store/{tag}-{gap_ms}-{i}-{'a' * 32}", i),
        )
        connection.execute("COMMIT")
        started = time.perf_counter()
        os.fdatasync(wal)
        taken.append((time.perf_counter() - started) * 1e6)
        if gap_ms:
            time.sleep(gap_ms / 1000)
    taken.sort()
    return taken


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
    commits = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    print("load before:", " ".join(open("/proc/loadavg").read().split()[:3]))
    with tempfile.TemporaryDirectory(prefix="nixpush-fsync-", dir=base) as work:
        database = os.path.join(work, "queue.sqlite3")
        connection = sqlite3.connect(database, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(
            "CREATE TABLE entries (path TEXT PRIMARY KEY, state TEXT, attempts INTEGER, source TEXT, at INTEGER)"
        )
        wal = os.open(database + "-wal", os.O_RDONLY)
        results = {gap: [] for gap in GAPS_MS}
        for round_number in range(rounds):
            for gap in GAPS_MS:
                results[gap] += one_round(connection, wal, gap, commits, f"r{round_number}")
        os.close(wal)
        connection.close()
    print(f"{commits} commits per gap and round, {rounds} rounds, in {base}")
    print("| gap between commits | fdatasync median (µs) | p90 (µs) |")
    print("|---|---|---|")
    for gap, taken in results.items():
        taken.sort()
        print(f"| {gap} ms | {taken[len(taken) // 2]:.0f} | {taken[len(taken) * 9 // 10]:.0f} |")
    print("load after:", " ".join(open("/proc/loadavg").read().split()[:3]))


if __name__ == "__main__":
    main()
