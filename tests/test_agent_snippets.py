"""README's "Use it from your agent": each code snippet, taken from README.md by its
marker comment, run as written (only the URL and the caller token substituted)
against a real proxy with `inbound_auth: tokens` in front of the MCP SDK's server.

Each runs twice: against a server with no auth, where it lists the tools (the
caller token got it past inbound authentication), and against an OAuth server
the user has not connected, where it prints the proxy's -32042 message and
connect link. The Python SDK is the test venv's; the TypeScript SDK is
installed by npm from tests/peers/ts_client; the OpenAI Agents SDK gets a venv
of its own (it would pin the project's websockets lower), in which only the
-32042 path runs: the other asks an OpenAI model.

The snippets name `/<user>/<server>/mcp`; these tests use `/<user>/<server>`,
the same endpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import ts_client
from peers.mcp_client import Upstream, run_upstream
from support import ROOT, ProxyProcess

README_URL = "http://127.0.0.1:8080/alice/deepwiki/mcp"
README_TOKEN = "kbp_…"
USER = "alice"
AGENTS_SDK = "openai-agents==0.24.0"


def snippet(name: str) -> str:
    """The fenced code block right after `<!-- snippet: NAME -->` in README.md."""
    readme = (ROOT / "README.md").read_text()
    found = re.findall(rf"<!-- snippet: {re.escape(name)} -->\n```\w+\n(.*?)\n```\n", readme, re.S)
    assert len(found) == 1, f"README.md must hold exactly one snippet marked {name!r}"
    return found[0]


def as_written(name: str, url: str, token: str) -> str:
    code = snippet(name)
    for placeholder in (README_URL, README_TOKEN):
        assert code.count(placeholder) == 1, f"snippet {name!r} must name {placeholder!r} once"
    return code.replace(README_URL, url).replace(README_TOKEN, token)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with run_upstream("streamable-http") as up:
        yield up


@pytest.fixture(scope="module")
def proxy(
    upstream: Upstream, salt: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, str]]:
    proc = ProxyProcess(
        {
            "inbound_auth": "tokens",
            "servers": {
                "deepwiki": {"url": upstream.mcp_url, "auth": "none"},
                "linear": {"url": upstream.mcp_url, "auth": "oauth"},
            },
        },
        tmp_path_factory.mktemp("snippets"),
        {"KEYBEARER_SALT": salt},
        start=False,
    )
    created = proc.cli("tokens", "create", "--user", USER, "--json")
    assert created.returncode == 0, created.stderr
    proc.start()
    try:
        yield proc, json.loads(created.stdout)["token"]
    finally:
        proc.stop()


def run(command: list[str], cwd: Path) -> str:
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert out.returncode == 0, f"{command} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def check_consent_answer(output: str, proxy: ProxyProcess) -> None:
    assert "linear needs you to connect your account" in output, output
    assert f"{proxy.url}/connect/{USER}/linear?" in output, output


# --- MCP Python SDK ----------------------------------------------------------------


def run_python(code: str, tmp_path: Path, python: str = sys.executable) -> str:
    script = tmp_path / "agent.py"
    script.write_text(code)
    return run([python, str(script)], tmp_path)


def test_python_sdk_snippet_lists_tools(proxy: tuple[ProxyProcess, str], tmp_path: Path) -> None:
    proc, token = proxy
    output = run_python(as_written("python-sdk", f"{proc.url}/{USER}/deepwiki", token), tmp_path)
    assert "'echo'" in output, output


def test_python_sdk_snippet_shows_the_connect_link(proxy: tuple[ProxyProcess, str], tmp_path: Path) -> None:
    proc, token = proxy
    output = run_python(as_written("python-sdk", f"{proc.url}/{USER}/linear", token), tmp_path)
    assert output.startswith("MCP error -32042: "), output
    check_consent_answer(output, proc)


def test_python_sdk_snippet_needs_the_caller_token(proxy: tuple[ProxyProcess, str], tmp_path: Path) -> None:
    """Without a valid token the proxy refuses the caller: the substitution is what makes the runs above pass."""
    proc, _ = proxy
    script = tmp_path / "agent.py"
    script.write_text(as_written("python-sdk", f"{proc.url}/{USER}/deepwiki", "kbp_unknown.token"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "'echo'" not in out.stdout
    assert "caller" in out.stdout + out.stderr


# --- MCP TypeScript SDK ----------------------------------------------------------


def run_node(code: str, tmp_path: Path) -> str:
    ts_client.ensure_installed()
    (tmp_path / "node_modules").symlink_to(ts_client.NODE_MODULES)
    (tmp_path / "agent.mjs").write_text(code)
    return run(["node", "agent.mjs"], tmp_path)


def test_typescript_sdk_snippet_lists_tools(proxy: tuple[ProxyProcess, str], tmp_path: Path) -> None:
    proc, token = proxy
    output = run_node(as_written("typescript-sdk", f"{proc.url}/{USER}/deepwiki", token), tmp_path)
    assert "'echo'" in output, output


def test_typescript_sdk_snippet_shows_the_connect_link(
    proxy: tuple[ProxyProcess, str], tmp_path: Path
) -> None:
    proc, token = proxy
    output = run_node(as_written("typescript-sdk", f"{proc.url}/{USER}/linear", token), tmp_path)
    assert "MCP error -32042" in output, output
    check_consent_answer(output, proc)


# --- OpenAI Agents SDK -------------------------------------------------------------


def agents_python() -> str:
    """A venv holding the Agents SDK, made once per version (pip's cache keeps it cheap)."""
    venv = (
        Path(tempfile.gettempdir())
        / f"keybearer-agents-{hashlib.sha256(AGENTS_SDK.encode()).hexdigest()[:12]}"
    )
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    with (Path(tempfile.gettempdir()) / f"{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
            install = subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", AGENTS_SDK],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert install.returncode == 0, f"pip install {AGENTS_SDK} failed:\n{install.stderr}"
            stamp.touch()
    return str(python)


@pytest.mark.slow
def test_openai_agents_snippet_shows_the_connect_link(
    proxy: tuple[ProxyProcess, str], tmp_path: Path
) -> None:
    proc, token = proxy
    output = run_python(
        as_written("openai-agents", f"{proc.url}/{USER}/linear", token), tmp_path, python=agents_python()
    )
    assert output.startswith("MCP error -32042: "), output
    check_consent_answer(output, proc)
