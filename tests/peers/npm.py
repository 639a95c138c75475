"""Installing a test peer's npm packages from its package.json + package-lock.json.

`ensure_installed(folder)` runs `npm ci` in `folder` unless its node_modules
already matches the lock file: a stamp in node_modules records the digest of the
files it was installed from, so a changed lock file installs again and an
unchanged one costs a file read. Concurrent callers (pytest-xdist, two test
runs) take a file lock. Node and npm come from tests/system-deps.sh.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

STAMP_NAME = ".keybearer-installed"


def _digest(folder: Path) -> str:
    data = (folder / "package-lock.json").read_bytes() + (folder / "package.json").read_bytes()
    return hashlib.sha256(data).hexdigest()


def ensure_installed(folder: Path, *, min_node: int = 20) -> None:
    """`npm ci` in `folder` unless node_modules matches its lock file; RuntimeError with a hint
    when node or npm is missing or too old, or when npm fails."""
    digest = _digest(folder)
    stamp = folder / "node_modules" / STAMP_NAME
    if stamp.exists() and stamp.read_text() == digest:
        return
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise RuntimeError(f"node and npm are needed for the test peer in {folder}: run tests/system-deps.sh")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < min_node:
        raise RuntimeError(f"the test peer in {folder} needs Node.js {min_node} or newer, found {version}")
    # In the temp dir: `npm ci` deletes node_modules, and a lock file must outlive it.
    lock_path = (
        Path(tempfile.gettempdir()) / f"keybearer-npm-{hashlib.sha256(bytes(folder)).hexdigest()[:12]}.lock"
    )
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == digest:
            return  # installed by another process meanwhile
        result = subprocess.run(
            [npm, "ci", "--prefix", str(folder), "--no-audit", "--no-fund", "--loglevel=error"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"npm ci failed in {folder}:\n{result.stdout}\n{result.stderr}")
        stamp.write_text(digest)
