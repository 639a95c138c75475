"""People's OAuth tokens through store faults (issue 14, items 1, 2, 4 and 5).

Three replicas on a private PostgreSQL and a private Redis (AOF on), so that
both can be killed; oidc-provider issues 4-second access tokens and rotates
refresh tokens with reuse detection: a second use of a refresh token revokes
the whole grant. Each test asserts that no token is lost, that no refresh
token is used twice (and the grant still works), that no request takes longer
than the waiters' limit plus a margin, and what the agent got: 503 with
Retry-After (a JSON-RPC error) during the fault where no usable token is held,
200 after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from conftest import RedisServer
from peers.mcp_resource_server import ResourceServer, run_resource_server
from peers.oauth import AuthorizationServer, run_authorization_server
from playwright.async_api import Browser
from support import ProxyProcess, free_port, replicas_running
from test_store_faults import PostgresServer
from test_token_lifecycle import SERVER, call, connect_expired, wait_expired

from proxy.connect.clients import server_cache_prefix
from proxy.connect.lifecycle import REFRESH_WAIT, unseal
from proxy.crypto import Keyring
from proxy.names import connection_changed
from proxy.stores.redis import RedisTokenStore

pytestmark = pytest.mark.slow
TTL = 4
# Longer than REFRESH_WAIT: a waiter is answered before a dead holder's lock expires.
LOCK_TTL = 6
# No request may take longer than this (the waiters' limit plus a margin for a loaded machine).
LIMIT = REFRESH_WAIT + 3


@pytest.fixture(scope="module")
def auth() -> Iterator[AuthorizationServer]:
    with run_authorization_server(access_token_ttl=TTL) as server:
        yield server


@pytest.fixture(scope="module")
def resource(auth: AuthorizationServer) -> Iterator[ResourceServer]:
    with run_resource_server(auth.issuer) as server:
        yield server


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private Redis that keeps an AOF, so what it held survives a kill (locks included)."""
    server = RedisServer(
        tmp_path_factory.mktemp("redis-aof"), ["--appendonly", "yes", "--appendfsync", "always"]
    )
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
def replicas(
    resource: ResourceServer,
    postgres: PostgresServer,
    redis_server: RedisServer,
    salt: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[ProxyProcess]]:
    ports = [free_port() for _ in range(3)]
    config = {
        "public_url": f"http://127.0.0.1:{ports[0]}",
        "database_url": postgres.url,
        "redis_url": redis_server.url,
        "migrate_on_start": True,
        "oauth_allow_http_loopback": True,
        "refresh_lock_ttl": LOCK_TTL,
        "servers": {SERVER: {"url": resource.mcp_url, "auth": "oauth"}},
    }
    with replicas_running(config, ports, {"KEYBEARER_SALT": salt}, tmp_path_factory) as procs:
        yield procs


@pytest.fixture
async def tokens(redis_server: RedisServer) -> AsyncIterator[RedisTokenStore]:
    store = RedisTokenStore.from_url(redis_server.url)
    await store.open()
    yield store
    await store.close()


@pytest.fixture(autouse=True)
def no_faults(auth: AuthorizationServer, redis_server: RedisServer) -> Iterator[None]:
    """Whatever a test broke is back for the next one."""
    yield
    auth.settings(faults=[])
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()


async def timed(replica: ProxyProcess, user: str, client: httpx.AsyncClient) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    answer = await call(replica, user, client)
    return answer, time.monotonic() - started


def ok(answer: httpx.Response) -> bool:
    return answer.status_code == 200 and '"result"' in answer.text


def unavailable(answer: httpx.Response) -> bool:
    """503 with Retry-After, as a JSON-RPC error the agent can show."""
    if answer.status_code != 503 or int(answer.headers.get("retry-after", "0")) <= 0:
        return False
    body = answer.json()
    return body.get("jsonrpc") == "2.0" and bool(body["error"]["message"])


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def token_requests(auth: AuthorizationServer) -> int:
    return int(auth.stats()["token_requests"].get("refresh_token", 0))


async def refresh_token_of(tokens: RedisTokenStore, user: str, salt: str) -> tuple[int, str | None]:
    conn = await tokens.get_connection(user, SERVER)
    assert conn is not None and conn.state == "connected", conn
    return conn.version, unseal(Keyring(salt), conn).refresh_token


async def test_redis_dies_during_a_refresh(
    replicas: list[ProxyProcess],
    browser: Browser,
    auth: AuthorizationServer,
    redis_server: RedisServer,
    tokens: RedisTokenStore,
    salt: str,
) -> None:
    """Item 1: the rotated tokens outlive the store's outage in the replica that got them."""
    await connect_expired(replicas, browser, auth, tokens, "rita", TTL)
    version, old_refresh_token = await refresh_token_of(tokens, "rita", salt)
    auth.reset_stats()
    auth.settings(faults=[{"route": "token", "grant_type": "refresh_token", "delay": 2}])
    async with httpx.AsyncClient(timeout=LIMIT + 5) as client:
        first = asyncio.create_task(timed(replicas[1], "rita", client))
        await until(lambda: token_requests(auth) == 1)
        await asyncio.sleep(0.5)
        redis_server.kill()  # mid-way through the token call
        killed = time.monotonic()
        answer, took = await first
        assert ok(answer), answer.text[:300]  # the new tokens, held in memory, are used
        assert took < LIMIT
        during = [await timed(replica, "rita", client) for replica in replicas]
        assert ok(during[1][0]), during[1][0].text[:300]  # the replica holding them goes on
        for other, took in (during[0], during[2]):  # the others have no usable token
            assert unavailable(other), (other.status_code, other.headers, other.text[:300])
            assert took < LIMIT
        await asyncio.sleep(max(0.0, 3 - (time.monotonic() - killed)))
        redis_server.start()  # from its AOF: the refresh lock is still there
        pending = set(range(3))
        async with asyncio.timeout(LIMIT + 5):
            while pending:
                for i in sorted(pending):
                    after, took = await timed(replicas[i], "rita", client)
                    assert took < LIMIT and (ok(after) or unavailable(after)), after.text[:300]
                    if ok(after):
                        pending.discard(i)
                await asyncio.sleep(0.2)
    stats = auth.stats()
    assert stats["token_requests"]["refresh_token"] == 1 and stats["refresh_reuse_detected"] == 0
    # No token lost: the rotated set reached the store once Redis was back.
    new_version, new_refresh_token = await refresh_token_of(tokens, "rita", salt)
    assert new_version == version + 1 and new_refresh_token not in (None, old_refresh_token)

    # The grant still works: the next refresh uses the refresh token written late.
    await wait_expired(tokens, "rita")
    async with httpx.AsyncClient(timeout=LIMIT) as client:
        assert ok(await call(replicas[2], "rita", client))
    stats = auth.stats()
    assert stats["token_requests"]["refresh_token"] == 2 and stats["refresh_reuse_detected"] == 0
    assert stats["token_errors"] == {}


async def test_postgres_down_refreshes_go_on(
    replicas: list[ProxyProcess],
    browser: Browser,
    auth: AuthorizationServer,
    postgres: PostgresServer,
    tokens: RedisTokenStore,
    salt: str,
) -> None:
    """Item 2: a refresh needs the client the tokens were issued to, which every replica knows."""
    await connect_expired(replicas, browser, auth, tokens, "paula", TTL)
    version, _ = await refresh_token_of(tokens, "paula", salt)
    auth.reset_stats()
    answers: list[tuple[httpx.Response, float]] = []
    postgres.crash()
    try:
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=LIMIT + 5) as client:
            # Until a second refresh (the first one's tokens are due after 0.75 TTL), then a
            # round more: every replica uses the tokens that refresh got.
            while token_requests(auth) < 2:
                assert time.monotonic() - started < 2.5 * TTL, "no second refresh during the outage"
                answers += await asyncio.gather(*(timed(r, "paula", client) for r in replicas))
                await asyncio.sleep(0.3)
            answers += await asyncio.gather(*(timed(r, "paula", client) for r in replicas))
    finally:
        postgres.start()
    failed = [(a.status_code, a.text[:200]) for a, _ in answers if not ok(a)]
    assert failed == []
    assert max(took for _, took in answers) < LIMIT
    stats = auth.stats()
    refreshes = stats["token_requests"].get("refresh_token", 0)
    assert refreshes >= 2 and stats["refresh_reuse_detected"] == 0 and stats["token_errors"] == {}
    new_version, _ = await refresh_token_of(tokens, "paula", salt)
    assert new_version == version + refreshes


async def test_replica_killed_mid_refresh(
    replicas: list[ProxyProcess],
    browser: Browser,
    auth: AuthorizationServer,
    tokens: RedisTokenStore,
    salt: str,
) -> None:
    """Item 4: the others answer 503 while the dead holder's lock stands, then one refreshes."""
    await connect_expired(replicas, browser, auth, tokens, "kim", TTL)
    version, _ = await refresh_token_of(tokens, "kim", salt)
    auth.reset_stats()
    # The killed replica's token call never reaches the provider: its refresh token stays unused.
    auth.settings(faults=[{"route": "token", "grant_type": "refresh_token", "status": 503, "delay": 3}])
    async with httpx.AsyncClient(timeout=LIMIT + 5) as client:
        dying = asyncio.create_task(call(replicas[1], "kim", client))
        try:
            await until(lambda: token_requests(auth) == 1)
            assert replicas[1].proc is not None
            replicas[1].proc.kill()
            killed = time.monotonic()
            answers: list[tuple[httpx.Response, float]] = []
            async with asyncio.timeout(LOCK_TTL + LIMIT):
                while not any(ok(a) for a, _ in answers):
                    answers += await asyncio.gather(*(timed(replicas[i], "kim", client) for i in (0, 2)))
                    await asyncio.sleep(0.2)
            recovered = time.monotonic() - killed
        finally:
            with contextlib.suppress(httpx.HTTPError):
                await dying
            replicas[1].start()
    assert all(ok(a) or unavailable(a) for a, _ in answers), [a.text[:200] for a, _ in answers]
    assert any(unavailable(a) for a, _ in answers), "waiters must be answered before the lock expires"
    assert max(took for _, took in answers) < LIMIT
    assert recovered < LOCK_TTL + LIMIT
    stats = auth.stats()
    assert stats["token_requests"]["refresh_token"] == 2 and stats["refresh_reuse_detected"] == 0
    new_version, _ = await refresh_token_of(tokens, "kim", salt)
    assert new_version == version + 1


async def test_stalled_holder_does_not_reuse_the_refresh_token(
    replicas: list[ProxyProcess],
    browser: Browser,
    auth: AuthorizationServer,
    tokens: RedisTokenStore,
    salt: str,
) -> None:
    """Item 5: a holder frozen past its lock's expiry, between taking the lock and calling the
    token endpoint, finds the lock gone and uses what the next holder wrote."""
    await connect_expired(replicas, browser, auth, tokens, "sam", TTL)
    version, _ = await refresh_token_of(tokens, "sam", salt)
    # Every replica forgets the discovery, so that the holder's refresh fetches it: that fetch,
    # made slow, is where the test freezes the holder.
    await tokens.cache_delete_prefix(server_cache_prefix(SERVER))
    await tokens.publish(connection_changed(SERVER))
    auth.reset_stats()
    auth.settings(faults=[{"route": "discovery", "delay": 1.5}])
    holder = replicas[1].proc
    assert holder is not None
    async with httpx.AsyncClient(timeout=3 * LIMIT) as client:
        stalled = asyncio.create_task(timed(replicas[1], "sam", client))
        await until(lambda: any(e.get("route") == "discovery" for e in auth.events("fault")))
        os.kill(holder.pid, signal.SIGSTOP)
        try:
            answers: list[tuple[httpx.Response, float]] = []
            async with asyncio.timeout(LOCK_TTL + LIMIT):
                while not any(ok(a) for a, _ in answers):
                    answers.append(await timed(replicas[2], "sam", client))
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        answer, _ = await stalled
    assert ok(answer), answer.text[:300]
    assert all(ok(a) or unavailable(a) for a, _ in answers), [a.text[:200] for a, _ in answers]
    assert max(took for _, took in answers) < LIMIT
    stats = auth.stats()
    assert stats["token_requests"]["refresh_token"] == 1 and stats["refresh_reuse_detected"] == 0
    new_version, _ = await refresh_token_of(tokens, "sam", salt)
    assert new_version == version + 1
