"""Test peer: the official MCP Inspector's CLI, a real TypeScript-SDK MCP client.

Only the CLI is installed (npm `@modelcontextprotocol/inspector-cli`, pinned by
package.json + package-lock.json beside this file, installed on first use with
`npm ci`; the full `@modelcontextprotocol/inspector` adds a web UI the tests do
not need). Version 0.15.0 is the one whose `--transport http` replaces any URL
path that does not end in `/mcp` with `/mcp` (`new URL("/mcp", base)`), which is
why the proxy answers `/<user>/<server>/mcp`::

    result = inspector_cli(url, "--method", "tools/list")
    result.returncode, result.stdout (JSON on success), result.stderr
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from peers import npm

INSPECTOR_DIR = Path(__file__).resolve().parent


def inspector_cli(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`npx --no-install mcp-inspector-cli --cli URL --transport http ARGS...`, installing first."""
    npm.ensure_installed(INSPECTOR_DIR)
    npx = shutil.which("npx")
    if npx is None:
        raise RuntimeError("npx is needed for the MCP Inspector peer: run tests/system-deps.sh")
    return subprocess.run(
        [npx, "--no-install", "mcp-inspector-cli", "--cli", url, "--transport", "http", *args],
        cwd=INSPECTOR_DIR, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
