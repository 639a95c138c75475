"""The forwarding core, end to end: the official MCP SDK's client and server
talking through a real `keybearer serve` process over loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from peers.mcp_client import (
    INITIALIZE,
    Recorder,
    Upstream,
    delete_session,
    jsonrpc,
    raw_post,
    result_text,
    run_upstream,
    sse_session,
    streamable_session,
)
from support import ProxyProcess, free_port

API_KEY = "sk-test-9f8e7d6c5b4a39281706"
X_API_KEY = "xk-test-1122334455667788"
STORED_KEY = "st-test-aabbccddeeff00112233"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Upstream]]:
    with (
        run_upstream("streamable-http") as sse_answers,
        run_upstream("streamable-http", json_response=True) as json_answers,
        run_upstream("sse") as legacy,
    ):
        yield {"sse": sse_answers, "json": json_answers, "legacy": legacy}


@pytest.fixture(scope="module")
def proxy(
    upstreams: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory, salt: str
) -> Iterator[ProxyProcess]:
    up = upstreams["sse"]
    key_file = tmp_path_factory.mktemp("keys") / "x-key"
    key_file.write_text(X_API_KEY + "\n")
    servers: dict[str, Any] = {
        "plain": {"url": up.mcp_url, "auth": "none"},
        "jsonmode": {"url": upstreams["json"].mcp_url, "auth": "none"},
        "keyed": {"url": up.mcp_url, "auth": "api_key", "api_key_env": "TEST_UPSTREAM_KEY"},
        "xkey": {"url": up.mcp_url, "auth": "api_key", "api_key_file": str(key_file),
                 "api_key_header": "X-API-Key", "api_key_scheme": ""},
        "stored": {"url": up.mcp_url, "auth": "api_key"},
        "nokey": {"url": up.mcp_url, "auth": "api_key", "api_key_env": "TEST_UNSET_KEY"},
        "legacy": {"url": upstreams["legacy"].mcp_url, "auth": "none"},
        "echo": {"url": up.base_url + "/_echo", "auth": "api_key", "api_key_env": "TEST_UPSTREAM_KEY"},
        "ticks": {"url": up.base_url + "/_sse_ticks?n=-1&interval=0.2", "auth": "none"},
        "quiet": {"url": up.base_url + "/_sse_ticks?n=-1&interval=120", "auth": "none"},
        "slashed": {"url": up.mcp_url + "/", "auth": "none"},  # the SDK redirects /mcp/ to /mcp
        "slow": {"url": up.base_url + "/_slow?seconds=5", "auth": "none"},
        "dead": {"url": f"http://127.0.0.1:{free_port()}/mcp", "auth": "none"},
    }  # fmt: skip
    proc = ProxyProcess(
        {"servers": servers, "upstream_timeout": 2, "max_body_bytes": 64 * 1024},
        tmp_path_factory.mktemp("proxy"),
        {"KEYBEARER_SALT": salt, "TEST_UPSTREAM_KEY": API_KEY},
    )
    yield proc
    proc.stop()
    # No credential ever reaches a log line.
    log = proc.log()
    for secret in (API_KEY, X_API_KEY, STORED_KEY, "agent-own-token", salt):
        assert secret not in log


@pytest.mark.parametrize("server", ["plain", "jsonmode"])
async def test_streamable_http_session(
    proxy: ProxyProcess, upstreams: dict[str, Upstream], server: str
) -> None:
    url = f"{proxy.url}/alice/{server}"
    rec = Recorder()
    async with streamable_session(url, recorder=rec) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
        assert {"echo", "headers", "notify"} <= tools
        assert result_text(await session.call_tool("echo", {"text": "héllo"})) == "héllo"
        # a server-to-client notification on the standalone GET stream
        result = await session.call_tool("notify", {"message": "from-upstream"})
        assert "standalone" in result_text(result)
        await rec.wait_log("from-upstream")
        session_id = rec.session_id
    assert session_id
    # the session was DELETEd through the proxy on close: it is now unknown upstream,
    # and the upstream's 404 reaches the agent unchanged
    answer = await raw_post(url, jsonrpc("tools/list"), session_id=session_id)
    assert answer.status_code == 404
    assert answer.json()["error"]["message"] == "Session not found"
    assert await delete_session(url, session_id) == 404


async def test_explicit_delete_ends_session(proxy: ProxyProcess) -> None:
    url = f"{proxy.url}/alice/plain"
    first = await raw_post(url, INITIALIZE)
    session_id = first.headers["mcp-session-id"]
    assert await delete_session(url, session_id) == 200
    assert (await raw_post(url, jsonrpc("tools/list"), session_id=session_id)).status_code == 404


async def test_legacy_sse_session(proxy: ProxyProcess) -> None:
    rec = Recorder()
    async with sse_session(f"{proxy.url}/alice/legacy", recorder=rec) as session:
        assert "echo" in {t.name for t in (await session.list_tools()).tools}
        assert result_text(await session.call_tool("echo", {"text": "legacy"})) == "legacy"
        await session.call_tool("notify", {"message": "legacy-note"})
        await rec.wait_log("legacy-note")
        session_id = rec.session_id
    async with httpx.AsyncClient() as client:
        # the announced endpoint is reachable, an unknown session there is the upstream's 404
        gone = await client.post(
            f"{proxy.url}/alice/legacy/messages/?session_id={'0' * 32}", json=jsonrpc("tools/list")
        )
        assert gone.status_code == 404
        # paths the upstream never announced are not
        other = await client.get(f"{proxy.url}/alice/legacy/_echo")
        assert other.status_code == 404 and other.json()["error"] == "path_not_allowed"
    assert session_id


async def test_endpoint_event_points_back_at_proxy(proxy: ProxyProcess) -> None:
    async with httpx.AsyncClient() as client, client.stream("GET", f"{proxy.url}/bob/legacy") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["x-accel-buffering"] == "no"
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                assert line.startswith("data: /bob/legacy/messages/?session_id=")
                break


async def test_api_key_injected_and_agent_credentials_dropped(
    proxy: ProxyProcess, upstreams: dict[str, Upstream]
) -> None:
    agent_headers = {"Authorization": "Bearer agent-own-token", "Cookie": "session=agent-cookie"}
    async with streamable_session(f"{proxy.url}/alice/keyed", headers=agent_headers) as session:
        seen = json.loads(result_text(await session.call_tool("headers", {})))
    assert seen["authorization"] == f"Bearer {API_KEY}"
    assert "cookie" not in seen
    assert seen["host"] == upstreams["sse"].base_url.removeprefix("http://")
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{proxy.port}"

    async with streamable_session(f"{proxy.url}/alice/xkey") as session:
        seen = json.loads(result_text(await session.call_tool("headers", {})))
    assert seen["x-api-key"] == X_API_KEY
    assert "authorization" not in seen


async def test_headers_both_ways(proxy: ProxyProcess) -> None:
    sent = {
        "Authorization": "Bearer agent-own-token",
        "Cookie": "a=b",
        "Mcp-Session-Id": "abc",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "echo",
        "Last-Event-ID": "42",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "must-not-pass",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "X-Custom": "kept",
    }
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{proxy.url}/alice/echo?x=1", headers=sent, content=b'{"a":1}')
    assert answer.status_code == 200
    echoed = answer.json()
    got = echoed["headers"]
    assert got["authorization"] == f"Bearer {API_KEY}"
    for name in (
        "mcp-session-id",
        "mcp-protocol-version",
        "mcp-method",
        "mcp-name",
        "last-event-id",
        "x-custom",
    ):
        assert got[name] == sent[next(k for k in sent if k.lower() == name)]
    for name in ("cookie", "x-hop", "proxy-authorization"):
        assert name not in got
    assert echoed["query"] == "x=1" and echoed["body"] == '{"a":1}'
    assert API_KEY not in json.dumps(dict(answer.headers))


async def test_every_connection_header_names_hop_headers(proxy: ProxyProcess) -> None:
    """RFC 9110 §7.6.1: every Connection header's tokens are hop-by-hop, not only the last's."""
    sent = [
        ("Connection", "X-First-Hop"),
        ("Connection", "keep-alive"),
        ("X-First-Hop", "must-not-pass"),
        ("X-Custom", "kept"),
    ]
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{proxy.url}/alice/echo", headers=sent, content=b"{}")
    assert answer.status_code == 200
    got = answer.json()["headers"]
    assert "x-first-hop" not in got and got["x-custom"] == "kept"


async def test_stored_key_set_by_cli_while_serving(proxy: ProxyProcess) -> None:
    url = f"{proxy.url}/alice/stored"
    missing = await raw_post(url, INITIALIZE)
    assert missing.status_code == 503
    assert "keybearer api-key set stored" in missing.json()["error"]["message"]

    # never from argv: the key is read from standard input
    result = proxy.cli("api-key", "set", "stored", input=STORED_KEY + "\n")
    assert result.returncode == 0, result.stderr
    assert STORED_KEY not in result.stdout + result.stderr
    shown = proxy.cli("api-key", "show", "stored", "--json")
    info = json.loads(shown.stdout)
    assert info == {
        "server": "stored",
        "set": True,
        "source": "stored",
        "last4": "2233",
        "length": len(STORED_KEY),
    }

    for _ in range(50):  # the serving process reloads within its 1 s poll
        answer = await raw_post(url, INITIALIZE)
        if answer.status_code == 200:
            break
        await asyncio.sleep(0.1)
    assert answer.status_code == 200
    async with streamable_session(url) as session:
        seen = json.loads(result_text(await session.call_tool("headers", {})))
    assert seen["authorization"] == f"Bearer {STORED_KEY}"
    # the SQLite file holds ciphertext only
    db = Path(proxy.config["database_url"].removeprefix("sqlite:///")).read_bytes()
    assert STORED_KEY.encode() not in db

    # A rotated key replaces the one in use (the source keeps the credential it made).
    rotated = STORED_KEY[::-1]
    assert proxy.cli("api-key", "set", "stored", input=rotated + "\n").returncode == 0
    for _ in range(50):
        async with streamable_session(url) as session:
            seen = json.loads(result_text(await session.call_tool("headers", {})))
        if seen["authorization"] == f"Bearer {rotated}":
            break
        await asyncio.sleep(0.1)
    assert seen["authorization"] == f"Bearer {rotated}"


async def test_api_key_cli_bad_input_changes_nothing(proxy: ProxyProcess) -> None:
    empty = proxy.cli("api-key", "set", "stored", input="\n")
    assert empty.returncode == 2 and "one line of 1-4096 characters" in empty.stderr
    unknown = proxy.cli("api-key", "set", "nosuch", input="k" * 20 + "\n")
    assert unknown.returncode == 2 and "no server 'nosuch'" in unknown.stderr
    wrong_auth = proxy.cli("api-key", "set", "plain", input="k" * 20 + "\n")
    assert wrong_auth.returncode == 2 and "auth: none" in wrong_auth.stderr
    assert json.loads(proxy.cli("api-key", "show", "plain", "--json").stdout)["set"] is False


async def test_missing_key_tells_operator(proxy: ProxyProcess) -> None:
    answer = await raw_post(f"{proxy.url}/alice/nokey", INITIALIZE)
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert answer.json()["id"] == 1
    assert "nokey" in error["message"] and "TEST_UNSET_KEY" in error["message"]


async def test_upstream_unreachable_and_timeout(proxy: ProxyProcess) -> None:
    refused = await raw_post(f"{proxy.url}/alice/dead", jsonrpc("tools/list", id=7))
    assert refused.status_code == 502
    body = refused.json()
    assert body["id"] == 7 and body["error"]["data"] == {"error": "upstream_unreachable", "server": "dead"}
    assert "'dead' could not be reached" in body["error"]["message"]
    async with httpx.AsyncClient() as client:
        plain = await client.get(f"{proxy.url}/alice/dead")
        assert plain.status_code == 502 and plain.json()["error"] == "upstream_unreachable"
        slow = await client.get(f"{proxy.url}/alice/slow", timeout=10)
        assert slow.status_code == 504
        assert slow.json() == {
            "error": "upstream_timeout",
            "message": "server 'slow' did not answer within 2 s; try again later, or ask the operator to raise upstream_timeout",
            "server": "slow",
        }


async def test_oversized_body_refused(proxy: ProxyProcess, upstreams: dict[str, Upstream]) -> None:
    before = (await upstreams["sse"].astats())["requests"]
    big = b"x" * (64 * 1024 + 1)
    async with httpx.AsyncClient() as client:
        announced = await client.post(f"{proxy.url}/alice/echo", content=big)
        assert announced.status_code == 413
        assert "max_body_bytes" in announced.json()["message"]

        async def chunks() -> Any:
            for _ in range(80):
                yield b"y" * 1024

        streamed = await client.post(f"{proxy.url}/alice/echo", content=chunks())
        assert streamed.status_code == 413
    after = (await upstreams["sse"].astats())["requests"]
    assert after - before <= 1  # the streamed one may have begun upstream; the announced one never did


@pytest.mark.parametrize("server", ["ticks", "quiet"])
async def test_abandoned_stream_frees_upstream(
    proxy: ProxyProcess, upstreams: dict[str, Upstream], server: str
) -> None:
    # "quiet" sends one event and then nothing for a minute: only watching for the
    # agent's disconnect, not a failed write, can free its upstream connection in time.
    up = upstreams["sse"]
    async with httpx.AsyncClient() as client, client.stream("GET", f"{proxy.url}/alice/{server}") as stream:
        lines = stream.aiter_lines()
        async for line in lines:
            if line.startswith("data:"):
                break
        assert (await up.astats())["open_by_path"].get("/_sse_ticks") == 1
    # the client is gone: the proxy must drop its upstream request at once
    for _ in range(40):
        if not (await up.astats())["open_by_path"].get("/_sse_ticks"):
            break
        await asyncio.sleep(0.05)
    assert not (await up.astats())["open_by_path"].get("/_sse_ticks")


async def test_keepalive_comments_relayed(proxy: ProxyProcess) -> None:
    seen: list[str] = []
    async with httpx.AsyncClient() as client, client.stream("GET", f"{proxy.url}/alice/ticks") as stream:
        async for line in stream.aiter_lines():
            seen.append(line)
            if sum(1 for s in seen if s.startswith("data:")) == 2:
                break
    assert ": ping" in seen


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/alice/nosuch", 404, "unknown_server"),
        ("/al%2Fice/plain", 400, "invalid_path"),
        ("/alice/plain/%2e%2e/admin", 400, "invalid_path"),
        ("/admin/plain", 404, "admin_disabled"),
        ("/alice/plain/_echo", 404, "path_not_allowed"),
        ("/.well-known/oauth-protected-resource", 404, "not_found"),
    ],
)
async def test_bad_paths(proxy: ProxyProcess, path: str, status: int, code: str) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.get(proxy.url + path)
    assert answer.status_code == status
    assert answer.json()["error"] == code
    assert "www-authenticate" not in answer.headers


async def test_an_upstream_redirect_is_explained_not_passed_on(proxy: ProxyProcess) -> None:
    answer = await raw_post(f"{proxy.url}/alice/slashed", INITIALIZE)
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert error["data"]["error"] == "upstream_redirected" and "HTTP 307" in error["message"]
    assert "location" not in answer.headers and "127.0.0.1:" not in answer.text
    for _ in range(20):
        warned = [line for line in proxy.log().splitlines() if "upstream redirected" in line]
        if warned:
            break
        await asyncio.sleep(0.05)
    assert json.loads(warned[0])["location"].endswith("/mcp")


async def test_unknown_server_lists_nothing(proxy: ProxyProcess) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"{proxy.url}/alice/nosuch")
    assert answer.json() == {
        "error": "unknown_server",
        "message": "no MCP server 'nosuch' is configured on this proxy",
    }


def test_request_log_line(proxy: ProxyProcess) -> None:
    httpx.post(
        f"{proxy.url}/carol/plain",
        json=INITIALIZE,
        headers={"Accept": "application/json, text/event-stream", "X-Request-Id": "req-123"},
    )
    for _ in range(20):
        lines = [json.loads(line) for line in proxy.log().splitlines() if '"req-123"' in line]
        if lines:
            break
        import time

        time.sleep(0.05)
    (line,) = lines
    assert line["user"] == "carol" and line["server"] == "plain" and line["method"] == "POST"
    assert line["mcp_method"] == "initialize" and line["status"] == 200
    assert line["bytes_in"] > 0 and line["bytes_out"] > 0 and line["duration_ms"] >= 0
