"""Token lifecycle under load, across three replicas sharing PostgreSQL and Redis,
against oidc-provider issuing 4-second access tokens and rotating refresh tokens
with reuse detection: any double refresh revokes the grant and fails the test."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from peers.browser import complete_login_and_consent, new_page
from peers.mcp_client import INITIALIZE, jsonrpc, raw_post, result_text, streamable_session
from peers.mcp_resource_server import ResourceServer, run_resource_server
from peers.oauth import AuthorizationServer, run_authorization_server
from playwright.async_api import Browser
from services import REDIS_URL
from support import ProxyProcess, free_port, replicas_running

from proxy import links
from proxy.crypto import Keyring
from proxy.stores import Connection
from proxy.stores.redis import RedisTokenStore

pytestmark = pytest.mark.slow
TTL = 4
# The first access token of a test that starts from an expired one: the refresh that
# follows is the same whatever it lived, and waiting out TTL instead cost each test 3 s.
FIRST_TTL = 1
SERVER = "lc"


@pytest.fixture(scope="module")
def auth() -> Iterator[AuthorizationServer]:
    with run_authorization_server(access_token_ttl=TTL) as server:
        yield server


@pytest.fixture(scope="module")
def resource(auth: AuthorizationServer) -> Iterator[ResourceServer]:
    with run_resource_server(auth.issuer) as server:
        yield server


@pytest.fixture(scope="module")
def prefix(redis_prefix: str) -> str:
    return f"{redis_prefix}-lc"


@pytest.fixture(scope="module")
def replicas(
    resource: ResourceServer,
    postgres_database: str,
    prefix: str,
    salt: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[ProxyProcess]]:
    ports = [free_port() for _ in range(3)]
    config = {
        "public_url": f"http://127.0.0.1:{ports[0]}",
        "database_url": postgres_database,
        "redis_url": REDIS_URL,
        "redis_prefix": prefix,
        "migrate_on_start": True,
        "admin_token": "lifecycle-admin-token-0123456789",
        "oauth_allow_http_loopback": True,
        "refresh_skew": 1,
        "refresh_lock_ttl": 3,
        "token_endpoint_cooldown": 1,
        "servers": {SERVER: {"url": resource.mcp_url, "auth": "oauth"}},
    }
    with replicas_running(config, ports, {"KEYBEARER_SALT": salt}, tmp_path_factory) as procs:
        yield procs


@pytest.fixture
async def tokens(prefix: str) -> AsyncIterator[RedisTokenStore]:
    store = RedisTokenStore.from_url(REDIS_URL, prefix=prefix)
    await store.open()
    yield store
    await store.close()


async def connect(replicas: list[ProxyProcess], browser: Browser, user: str, link: str | None = None) -> None:
    """The user connects through the browser, as the -32042 link asks."""
    if link is None:
        answer = await raw_post(f"{replicas[0].url}/{user}/{SERVER}", INITIALIZE)
        link = answer.json()["error"]["data"]["elicitations"][0]["url"]
    async with new_page(browser) as page:
        await page.goto(link)
        await page.click("button[type=submit]")
        await complete_login_and_consent(page, user)
        assert "Connected" in await page.inner_text("body")


async def wait_expired(tokens: RedisTokenStore, user: str) -> Connection:
    conn = await tokens.get_connection(user, SERVER)
    assert conn is not None and conn.expires_at is not None
    await asyncio.sleep(max(0.0, conn.expires_at - time.time()) + 0.2)
    return conn


async def connect_short(
    replicas: list[ProxyProcess],
    browser: Browser,
    auth: AuthorizationServer,
    user: str,
    ttl: int = TTL,
    first_ttl: int = FIRST_TTL,
) -> None:
    """`connect` with a first access token of `first_ttl` s; the authorization server
    issues `ttl`-second tokens again after (those the refreshes get)."""
    auth.settings(access_token_ttl=first_ttl)
    try:
        await connect(replicas, browser, user)
    finally:
        auth.settings(access_token_ttl=ttl)


async def connect_expired(
    replicas: list[ProxyProcess],
    browser: Browser,
    auth: AuthorizationServer,
    tokens: RedisTokenStore,
    user: str,
    ttl: int = TTL,
) -> Connection:
    """`connect_short`, then `wait_expired`."""
    await connect_short(replicas, browser, auth, user, ttl)
    conn = await wait_expired(tokens, user)
    assert conn.expires_at is not None and round(conn.expires_at - conn.obtained_at) == FIRST_TTL, conn
    return conn


async def call(replica: ProxyProcess, user: str, client: httpx.AsyncClient) -> httpx.Response:
    return await client.post(
        f"{replica.url}/{user}/{SERVER}",
        json=INITIALIZE,
        headers={"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"},
    )


async def test_refresh_storm_one_token_request(
    replicas: list[ProxyProcess], browser: Browser, auth: AuthorizationServer, tokens: RedisTokenStore
) -> None:
    before = await connect_expired(replicas, browser, auth, tokens, "alice")
    auth.reset_stats()
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        answers = await asyncio.gather(*(call(replicas[i % 3], "alice", client) for i in range(210)))
    failures = [a.text[:200] for a in answers if a.status_code != 200 or '"result"' not in a.text]
    assert failures == []
    stats = auth.stats()
    assert stats["token_requests"].get("refresh_token") == 1
    assert stats["refresh_reuse_detected"] == 0
    after = await tokens.get_connection("alice", SERVER)
    assert after is not None and after.version == before.version + 1 and after.state == "connected"


async def test_replica_dead_holding_the_lock(
    replicas: list[ProxyProcess],
    browser: Browser,
    auth: AuthorizationServer,
    tokens: RedisTokenStore,
    prefix: str,
) -> None:
    await connect_expired(replicas, browser, auth, tokens, "bob")
    # A process takes the refresh lock the way a replica does, then dies without releasing it.
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, REDIS_URL, prefix, "bob", SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    auth.reset_stats()
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as client:
        answers = await asyncio.gather(*(call(replicas[i % 3], "bob", client) for i in range(30)))
    waited = time.monotonic() - started
    assert [a.status_code for a in answers] == [200] * 30
    assert all('"result"' in a.text for a in answers)
    assert 1.5 < waited < 10  # blocked until the dead holder's lock expired (3 s), not longer
    assert auth.stats()["token_requests"].get("refresh_token") == 1


_LOCK_HOLDER = """
import asyncio, sys, time
from proxy.stores.redis import RedisTokenStore
async def main():
    store = RedisTokenStore.from_url(sys.argv[1], prefix=sys.argv[2])
    await store.open()
    assert await store.acquire_lock(store.connection_lock(sys.argv[3], sys.argv[4]), 3.0)
    print("held", flush=True)
    time.sleep(60)
asyncio.run(main())
"""


async def test_authorization_server_down(
    replicas: list[ProxyProcess], browser: Browser, auth: AuthorizationServer, tokens: RedisTokenStore
) -> None:
    # A 3 s first token: valid for the call right after connecting, then a second less to wait out.
    await connect_short(replicas, browser, auth, "carol", first_ttl=TTL - 1)
    auth.settings(faults=[{"route": "token", "grant_type": "refresh_token", "status": 503, "count": -1}])
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            # still valid: forwarded although the token endpoint is down
            valid = await call(replicas[1], "carol", client)
            assert valid.status_code == 200 and '"result"' in valid.text
            await wait_expired(tokens, "carol")
            for replica in replicas:
                down = await call(replica, "carol", client)
                assert down.status_code == 503, down.text
                assert int(down.headers["retry-after"]) > 0
                assert "unavailable" in down.json()["error"]["message"]
        conn = await tokens.get_connection("carol", SERVER)
        assert conn is not None and conn.state == "connected"  # the stored tokens are kept
    finally:
        auth.settings(faults=[])
    await asyncio.sleep(1.2)  # the cooldown (token_endpoint_cooldown) of the recorded failure
    async with httpx.AsyncClient(timeout=30) as client:
        for replica in replicas:
            back = await call(replica, "carol", client)
            assert back.status_code == 200 and '"result"' in back.text
    assert auth.stats()["refresh_reuse_detected"] == 0


async def test_revoked_grant_means_reconnect(
    replicas: list[ProxyProcess],
    browser: Browser,
    auth: AuthorizationServer,
    tokens: RedisTokenStore,
    salt: str,
) -> None:
    await connect_expired(replicas, browser, auth, tokens, "dave")
    assert auth.revoke("dave") >= 1
    answer = await raw_post(f"{replicas[2].url}/dave/{SERVER}", jsonrpc("tools/list", id=9))
    assert answer.status_code == 200
    error = answer.json()["error"]
    assert answer.json()["id"] == 9 and error["code"] == -32042
    assert "/connect/dave/lc?" in error["message"]
    conn = await tokens.get_connection("dave", SERVER)
    assert conn is not None and conn.state == "must_reconnect" and "invalid_grant" in (conn.last_error or "")

    page_url = links.connections_url(replicas[0].url, Keyring(salt), "dave", 600)
    async with httpx.AsyncClient() as client:
        page = await client.get(page_url)
        assert page.status_code == 200 and "must reconnect" in page.text and "invalid_grant" in page.text
        listing = await client.get(
            f"{replicas[1].url}/admin/servers/{SERVER}/connections",
            headers={"Authorization": "Bearer lifecycle-admin-token-0123456789"},
        )
    (row,) = [c for c in listing.json()["connections"] if c["user"] == "dave"]
    assert row["state"] == "must_reconnect" and "invalid_grant" in row["last_error"]

    # Reconnecting replaces the tokens and the agent works again.
    await connect(replicas, browser, "dave", error["data"]["elicitations"][0]["url"])
    ok = await raw_post(f"{replicas[2].url}/dave/{SERVER}", INITIALIZE)
    assert ok.status_code == 200 and '"result"' in ok.text


async def test_upstream_401_refresh_and_replay(
    replicas: list[ProxyProcess], browser: Browser, auth: AuthorizationServer, resource: ResourceServer
) -> None:
    await connect(replicas, browser, "erin")
    async with streamable_session(f"{replicas[0].url}/erin/{SERVER}") as session:
        assert json.loads(result_text(await session.call_tool("whoami", {})))["sub"] == "erin"
        auth.reset_stats()
        resource.deny_seen_tokens()  # the server now refuses the token it just accepted
        me = json.loads(result_text(await session.call_tool("whoami", {})))
        assert me["sub"] == "erin"
    stats = auth.stats()
    assert stats["token_requests"].get("refresh_token") == 1
    assert stats["refresh_reuse_detected"] == 0


async def test_step_up_on_insufficient_scope(replicas: list[ProxyProcess], browser: Browser) -> None:
    await connect(replicas, browser, "frank")
    url = f"{replicas[0].url}/frank/{SERVER}"
    first = await raw_post(url, INITIALIZE)
    session_id = first.headers["mcp-session-id"]
    await raw_post(url, jsonrpc("notifications/initialized", id=None), session_id=session_id)
    denied = await raw_post(
        url, jsonrpc("tools/call", {"name": "admin_action", "arguments": {}}, id=5), session_id=session_id
    )
    error = denied.json()["error"]
    assert error["code"] == -32042
    link = error["data"]["elicitations"][0]["url"]
    assert "scope=mcp%3Atools+admin" in link or "scope=mcp%3Atools%20admin" in link
    await connect(replicas, browser, "frank", link)
    async with streamable_session(url) as session:
        result = await session.call_tool("admin_action", {})
        assert not result.is_error, result_text(result)
