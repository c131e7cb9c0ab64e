"""Writes COUNT small files, each unique to NONCE, into DIR: `nix-store --add` of them gives registered store
paths nobody has queued. Used by hook_bench.sh and enqueue_profile.sh.

    python3 benches/fresh_files.py DIR COUNT NONCE
"""
import os
import sys

directory, count, nonce = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for i in range(count):
    with open(os.path.join(directory, f"nixpush-bench-{i}"), "w") as f:
        f.write(f"{nonce} {i}\n")
