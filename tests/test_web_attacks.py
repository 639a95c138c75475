"""What a web page, or a server's changed definition, must never get: a person's
credential sent where they did not mean it to go. Real proxy processes, real MCP
SDK upstreams, over loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from peers.mcp_client import INITIALIZE, Upstream, run_upstream
from support import ProxyProcess

from proxy.connect.lifecycle import TokenSet, seal
from proxy.crypto import Keyring
from proxy.stores import Connection
from proxy.stores.sqlite import SQLiteStore

API_KEY = "sk-web-attack-5e4d3c2b1a09"
ADMIN = "admin-token-web-attacks-7d1e"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[Upstream, Upstream]]:
    with run_upstream("streamable-http") as a, run_upstream("streamable-http") as b:
        yield a, b


async def requests_seen(up: Upstream) -> int:
    """MCP requests the upstream received."""
    return int((await up.astats())["requests"])


@pytest.fixture
def proxy(upstreams: tuple[Upstream, Upstream], tmp_path: Path, salt: str) -> Iterator[ProxyProcess]:
    a, _ = upstreams
    proc = ProxyProcess(
        {"servers": {"keyed": {"url": a.mcp_url, "auth": "api_key", "api_key_env": "WEB_ATTACK_KEY"}},
         "allowed_origins": ["http://inspector.localhost:6274"], "allowed_hosts": ["mcp.internal"]},
        tmp_path, {"KEYBEARER_SALT": salt, "WEB_ATTACK_KEY": API_KEY},
    )  # fmt: skip
    yield proc
    proc.stop()


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        # A cross-site "simple" request: no preflight, the page's Origin.
        ({"Origin": "http://evil.example.com", "Content-Type": "text/plain"}, "foreign_origin"),
        ({"Origin": "null", "Content-Type": "text/plain"}, "foreign_origin"),
        # DNS rebinding: the page's own domain, resolved to the proxy.
        ({"Host": "evil.example.com:8080", "Content-Type": "text/plain"}, "foreign_host"),
        ({"Host": "rebind.127.0.0.1.nip.io", "Content-Type": "application/json"}, "foreign_host"),
    ],
)
async def test_a_web_page_never_reaches_the_upstream(
    proxy: ProxyProcess, upstreams: tuple[Upstream, Upstream], headers: dict[str, str], code: str
) -> None:
    a, _ = upstreams
    before = await requests_seen(a)
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"{proxy.url}/alice/keyed", content=json.dumps(INITIALIZE), headers=headers
        )
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"] == code
    assert "www-authenticate" not in answer.headers
    assert await requests_seen(a) == before


@pytest.mark.parametrize(
    "headers",
    [
        {},  # an agent: no Origin
        {"Origin": "http://inspector.localhost:6274"},  # an allowed browser-based client
        {"Host": "mcp.internal:8080"},  # an allowed name (a Service, an ingress)
        {"Host": "localhost"},
    ],
)
async def test_agents_and_allowed_clients_are_forwarded(
    proxy: ProxyProcess, upstreams: tuple[Upstream, Upstream], headers: dict[str, str]
) -> None:
    a, _ = upstreams
    before = await requests_seen(a)
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"{proxy.url}/alice/keyed",
            json=INITIALIZE,
            headers={"Accept": "application/json, text/event-stream", **headers},
        )
    assert answer.status_code == 200, answer.text
    assert await requests_seen(a) == before + 1


async def test_the_people_pages_refuse_a_foreign_host(proxy: ProxyProcess) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"{proxy.url}/connections/alice", headers={"Host": "evil.example.com"})
    assert answer.status_code == 403
    assert "text/html" in answer.headers["content-type"]


# -- a server whose definition changes ---------------------------------------------------


async def seed(path: str, salt: str, access: str, resource: str | None) -> None:
    store = SQLiteStore(path)
    await store.open()
    try:
        await store.migrate()
        keyring = Keyring(salt)
        sealed = seal(keyring, "alice", "notes", TokenSet(access, "refresh-x", "Bearer", resource))
        conn = Connection(user="alice", server="notes", sealed=sealed, issuer="https://as.example",
                          client_id="c", scopes=("mcp",), expires_at=time.time() + 3600,
                          obtained_at=time.time(), version=1)  # fmt: skip
        assert await store.put_connection(conn, expected_version=0)
    finally:
        await store.close()


async def call(proxy: ProxyProcess) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"{proxy.url}/alice/notes",
            json=INITIALIZE,
            headers={"Accept": "application/json, text/event-stream"},
        )


async def test_tokens_never_follow_a_server_to_a_new_url_through_the_admin_api(
    upstreams: tuple[Upstream, Upstream], tmp_path: Path, salt: str
) -> None:
    a, b = upstreams
    proxy = ProxyProcess(
        {"api_servers_allowed_networks": ["127.0.0.0/8"]},
        tmp_path,
        {"KEYBEARER_SALT": salt, "KEYBEARER_ADMIN_TOKEN": ADMIN},
    )
    try:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        async with httpx.AsyncClient(base_url=proxy.url, headers=admin) as client:
            answer = await client.post(
                "/admin/servers", json={"id": "notes", "url": a.mcp_url, "auth": "oauth"}
            )
            assert answer.status_code == 201, answer.text
        await seed(proxy.config["database_url"].removeprefix("sqlite:///"), salt, "token-for-a", a.mcp_url)
        assert (await call(proxy)).status_code == 200  # the token is now remembered
        before = await requests_seen(b)
        async with httpx.AsyncClient(base_url=proxy.url, headers=admin) as client:
            answer = await client.put("/admin/servers/notes", json={"url": b.mcp_url, "auth": "oauth"})
            assert answer.status_code == 200, answer.text
        answer = await call(proxy)
        assert answer.json()["error"]["code"] == -32042, answer.text
        assert await requests_seen(b) == before
    finally:
        proxy.stop()


async def test_tokens_never_follow_a_server_to_a_new_url_in_the_config_file(
    upstreams: tuple[Upstream, Upstream], tmp_path: Path, salt: str
) -> None:
    a, b = upstreams
    config: dict[str, Any] = {"servers": {"notes": {"url": a.mcp_url, "auth": "oauth"}}}
    proxy = ProxyProcess(config, tmp_path, {"KEYBEARER_SALT": salt})
    try:
        await seed(proxy.config["database_url"].removeprefix("sqlite:///"), salt, "token-for-a", a.mcp_url)
        assert (await call(proxy)).status_code == 200
    finally:
        proxy.stop()
    # The operator points the same id elsewhere and restarts.
    config["servers"]["notes"]["url"] = b.mcp_url
    proxy = ProxyProcess(config, tmp_path, {"KEYBEARER_SALT": salt})
    try:
        before = await requests_seen(b)
        answer = await call(proxy)
        assert answer.json()["error"]["code"] == -32042, answer.text
        assert "changed" in answer.json()["error"]["message"]
        assert await requests_seen(b) == before
    finally:
        proxy.stop()
