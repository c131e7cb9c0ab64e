"""Stands in for newAM/nix-post-build-hook-queue's daemon: binds its datagram socket and drops what arrives, so
the peer's client does the same work as in production. Used by hook_bench.sh, rebuilds.sh and socket_ab.sh.

    python3 benches/peer_sink.py SOCKET
"""
import socket
import sys

sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sink.bind(sys.argv[1])
while True:
    sink.recv(65536)
