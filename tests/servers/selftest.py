"""What the servers' self-tests share: checks counted and reported as `N passed, M failed`, commands run, a
closure built by real Nix, and `nix copy --from` into a fresh store root."""

import os
import subprocess
import sys
import tempfile

BUILD_OPTS = ["--option", "build-users-group", "", "--option", "sandbox", "false", "--option", "substituters", ""]
NIX = ["nix", "--extra-experimental-features", "nix-command"]
RESULTS = {"passed": 0, "failed": 0}


def check(name, condition, detail=""):
    RESULTS["passed" if condition else "failed"] += 1
    print(f"ok: {name}" if condition else f"FAILED: {name} {detail}")


def finish():
    """Prints the tally and exits non-zero if a check failed."""
    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed")
    sys.exit(1 if RESULTS["failed"] else 0)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout.strip()


def build_closure(workdir, prefix, nonce, big_bytes):
    """Builds `PREFIX-top` → `PREFIX-dep` (a fresh build for each `nonce`) and adds a file of `big_bytes` random
    (incompressible) bytes; returns the top, its closure and the added path."""
    expr = os.path.join(workdir, "closure.nix")
    with open(expr, "w") as f:
        f.write(
            f'let dep = derivation {{ name = "{prefix}-dep"; system = builtins.currentSystem; builder = "/bin/sh";\n'
            f'  args = ["-c" "echo {nonce} > $out"]; }};\n'
            f'in derivation {{ name = "{prefix}-top"; system = builtins.currentSystem; builder = "/bin/sh";\n'
            '  args = ["-c" "echo ${dep} > $out"]; }\n'
        )
    top = run(["nix-build", expr, "--no-out-link"] + BUILD_OPTS).splitlines()[-1]
    big_file = os.path.join(workdir, f"{prefix}-big-{nonce}")
    with open(big_file, "wb") as f:
        f.write(os.urandom(big_bytes))
    big = run(["nix-store", "--add", big_file])
    return top, run(["nix-store", "-q", "--requisites", top]).split(), big


def nix_copy(workdir, url, pubkey, paths, netrc=None):
    """`nix copy --from URL` of `paths` into a fresh store root trusting `pubkey`: (every path arrived, stderr)."""
    root = tempfile.mkdtemp(prefix="root-", dir=workdir)
    cmd = NIX + ["copy", "--from", url, "--to", root, "--option", "trusted-public-keys", pubkey,
                 "--option", "narinfo-cache-negative-ttl", "0"]
    if netrc:
        cmd += ["--option", "netrc-file", netrc]
    env = dict(os.environ, XDG_CACHE_HOME=tempfile.mkdtemp(prefix="xdg-", dir=workdir))
    p = subprocess.run(cmd + paths, capture_output=True, text=True, env=env)
    ok = p.returncode == 0 and all(os.path.exists(root + path) for path in paths)
    return ok, p.stderr
