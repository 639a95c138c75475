"""`/<user>/<server>/mcp`, for clients that insist on a URL ending in `/mcp`: the
official MCP Inspector's CLI (a TypeScript-SDK client) against a real proxy
process in front of the Python SDK's server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers.inspector import inspector_cli
from peers.mcp_client import Recorder, Upstream, result_text, run_upstream, sse_session
from support import ProxyProcess

API_KEY = "sk-inspector-0a1b2c3d4e5f6a7b8c9d"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, salt: str) -> Iterator[ProxyProcess]:
    up: Upstream
    with run_upstream("streamable-http") as up, run_upstream("sse") as legacy:
        servers = {
            "open": {"url": up.mcp_url, "auth": "none"},
            "keyed": {"url": up.mcp_url, "auth": "api_key", "api_key_env": "INSPECTOR_TEST_KEY"},
            "legacy": {"url": legacy.mcp_url, "auth": "none"},
        }
        workdir: Path = tmp_path_factory.mktemp("inspector")
        proc = ProxyProcess(
            {"servers": servers}, workdir, {"KEYBEARER_SALT": salt, "INSPECTOR_TEST_KEY": API_KEY}
        )
        yield proc
        proc.stop()
        assert API_KEY not in proc.log()


def inspect(url: str, *args: str) -> dict:
    result = inspector_cli(url, *args)
    assert result.returncode == 0, result.stderr
    answer: dict = json.loads(result.stdout)
    return answer


@pytest.mark.parametrize("server", ["open", "keyed"])
def test_the_inspector_lists_and_calls_tools_at_the_mcp_form(proxy: ProxyProcess, server: str) -> None:
    url = f"{proxy.url}/alice/{server}/mcp"
    tools = {tool["name"] for tool in inspect(url, "--method", "tools/list")["tools"]}
    assert {"echo", "headers", "notify"} <= tools
    called = inspect(
        url, "--method", "tools/call", "--tool-name", "echo", "--tool-arg", "text=through the proxy"
    )
    assert called["content"][0]["text"] == "through the proxy"


def test_the_upstream_sees_the_injected_key_at_the_mcp_form(proxy: ProxyProcess) -> None:
    seen = inspect(f"{proxy.url}/alice/keyed/mcp", "--method", "tools/call", "--tool-name", "headers")
    headers = json.loads(seen["content"][0]["text"])
    assert headers["authorization"] == f"Bearer {API_KEY}"


def test_the_inspector_cannot_use_the_short_form(proxy: ProxyProcess) -> None:
    # Why the /mcp form exists: the Inspector turns http://proxy/alice/open into http://proxy/mcp.
    result = inspector_cli(f"{proxy.url}/alice/open", "--method", "tools/list")
    assert result.returncode == 1 and "Failed to connect" in result.stderr


async def test_a_legacy_stream_opened_at_the_mcp_form_announces_the_canonical_endpoint(
    proxy: ProxyProcess,
) -> None:
    # The SDK's client posts to the endpoint the stream announced: under /alice/legacy, where
    # routing finds the upstream's message path (routing treats /alice/legacy/mcp as the stream).
    rec = Recorder()
    async with sse_session(f"{proxy.url}/alice/legacy/mcp", recorder=rec) as session:
        assert result_text(await session.call_tool("echo", {"text": "legacy"})) == "legacy"
    assert rec.session_id
