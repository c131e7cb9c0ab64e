"""What every test server does once it is ready: write its port to `--port-file` atomically, so that a test waits
for the file (with a deadline) and never races on ports, and say where it listens. Standard library only."""

import os
import tempfile


def write_atomic(path, data: bytes):
    """Writes `data` to `path` through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def announce(port, port_file=None):
    """Writes `port` to `port_file` (when given) and prints `listening on 127.0.0.1:PORT`."""
    if port_file:
        write_atomic(os.path.abspath(port_file), f"{port}\n".encode())
    print(f"listening on 127.0.0.1:{port}", flush=True)
