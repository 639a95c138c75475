"""Many refreshes at once for one server (a storm of users whose tokens expired
together) share one discovery: the server is probed and its metadata fetched once,
not once per user."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from proxy.connect.clients import OAuthClients
from proxy.oauth.fetch import Fetcher
from proxy.settings import ServerConfig, Settings
from proxy.stores.sqlite import SQLiteStore


@pytest.fixture
async def resource_server() -> AsyncIterator[tuple[str, Counter[str]]]:
    """An MCP server that wants OAuth, and its authorization server, on loopback; slow to answer."""
    hits: Counter[str] = Counter()
    origin = ""

    async def mcp(_: web.Request) -> web.Response:
        hits["probe"] += 1
        await asyncio.sleep(0.1)
        challenge = f'Bearer resource_metadata="{origin}/.well-known/oauth-protected-resource/mcp"'
        return web.json_response({}, status=401, headers={"WWW-Authenticate": challenge})

    async def protected_resource(_: web.Request) -> web.Response:
        hits["resource metadata"] += 1
        return web.json_response({"resource": f"{origin}/mcp", "authorization_servers": [origin]})

    async def as_metadata(_: web.Request) -> web.Response:
        hits["server metadata"] += 1
        return web.json_response({
            "issuer": origin, "authorization_endpoint": f"{origin}/authorize", "token_endpoint": f"{origin}/token",
            "response_types_supported": ["code"], "code_challenge_methods_supported": ["S256"],
        })  # fmt: skip

    app = web.Application()
    app.router.add_post("/mcp", mcp)
    app.router.add_get("/.well-known/oauth-protected-resource/mcp", protected_resource)
    app.router.add_get("/.well-known/oauth-authorization-server", as_metadata)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield origin, hits
    await runner.cleanup()


async def test_concurrent_discoveries_of_one_server_make_one(
    resource_server: tuple[str, Counter[str]], tmp_path: Path
) -> None:
    origin, hits = resource_server
    store = SQLiteStore(str(tmp_path / "tokens.db"))
    await store.open()
    await store.migrate()
    server = ServerConfig(id="notes", url=f"{origin}/mcp", auth="oauth")
    try:
        async with Fetcher(allow_http_loopback=True, allow_private=False, timeout=5) as fetcher:
            clients = OAuthClients(Settings(), None, None, store, fetcher, None)  # type: ignore[arg-type]
            found = await asyncio.gather(*(clients.discovery(server) for _ in range(50)))
        assert {f.auth_server.token_endpoint for f in found} == {f"{origin}/token"}
        assert hits == {"probe": 1, "resource metadata": 1, "server metadata": 1}
    finally:
        await store.close()
