"""Test peer: the MCP TypeScript SDK (npm ``@modelcontextprotocol/sdk``), to run the README's
TypeScript snippet as a person would.

Its npm dependencies are pinned by ``package.json`` + ``package-lock.json`` beside this file and
installed on first use by ``ensure_installed()`` (``npm ci``, skipped while ``node_modules``
matches the lock file; Node and npm from ``tests/system-deps.sh``). A snippet written to another
folder finds the SDK through a ``node_modules`` link to ``NODE_MODULES``.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parent
NODE_MODULES = CLIENT_DIR / "node_modules"
STAMP = NODE_MODULES / ".keybearer-installed"


def _lock_digest() -> str:
    data = (CLIENT_DIR / "package-lock.json").read_bytes() + (CLIENT_DIR / "package.json").read_bytes()
    return hashlib.sha256(data).hexdigest()


def ensure_installed() -> None:
    """``npm ci`` here unless node_modules already matches the lock file (idempotent, and safe
    against concurrent callers through a file lock)."""
    digest = _lock_digest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise RuntimeError("node and npm are needed for the TypeScript SDK peer: run tests/system-deps.sh")
    # In the temp dir: `npm ci` deletes node_modules, and a lock file must outlive it.
    lock_path = (
        Path(tempfile.gettempdir())
        / f"keybearer-npm-{hashlib.sha256(bytes(CLIENT_DIR)).hexdigest()[:12]}.lock"
    )
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if STAMP.exists() and STAMP.read_text() == digest:
            return  # installed by another process meanwhile
        result = subprocess.run(
            [npm, "ci", "--prefix", str(CLIENT_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"npm ci failed in {CLIENT_DIR}:\n{result.stdout}\n{result.stderr}")
        STAMP.write_text(digest)
