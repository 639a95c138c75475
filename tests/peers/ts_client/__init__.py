"""Test peer: the MCP TypeScript SDK (npm ``@modelcontextprotocol/sdk``), to run the README's
TypeScript snippet as a person would.

Its npm dependencies are pinned by ``package.json`` + ``package-lock.json`` beside this file and
installed on first use by ``ensure_installed()`` (``npm ci``, skipped while ``node_modules``
matches the lock file; Node and npm from ``tests/system-deps.sh``). A snippet written to another
folder finds the SDK through a ``node_modules`` link to ``NODE_MODULES``.
"""

from __future__ import annotations

from pathlib import Path

from peers import npm

CLIENT_DIR = Path(__file__).resolve().parent
NODE_MODULES = CLIENT_DIR / "node_modules"


def ensure_installed() -> None:
    """``npm ci`` here unless node_modules already matches the lock file (peers/npm.py)."""
    npm.ensure_installed(CLIENT_DIR)
