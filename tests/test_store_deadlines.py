"""A hung store answers like a dead one: within `store_timeout`, not after every retry.

The stores are private servers frozen with SIGSTOP: their sockets stay open
and accept, nothing answers. Before the deadline, redis-py's nested retries
(connect, HELLO, health-check PING, each with its own timeout) held a request
and /ready for 15-45 s. Every bound below is the deadline plus a generous
margin: they prove "did not hang", not speed.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import yaml
from peers.mcp_client import INITIALIZE, Upstream, run_upstream
from peers.private_stores import PostgresServer, RedisServer
from support import ROOT, ProxyProcess
from test_store_faults import pg_calls, redis_calls

from proxy.connect.lifecycle import TokenSet, seal
from proxy.crypto import Keyring
from proxy.settings import Settings
from proxy.stores import Connection, StoreUnavailable
from proxy.stores.postgres import PostgresStore
from proxy.stores.redis import RedisTokenStore

DEADLINE = 1.5
MARGIN = 1.5
ADMIN_TOKEN = "deadlines-admin-token-8c2e4a6b1d"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEY = "sk-deadlines-00112233445566"
PREFIX = "kbdl"


async def timed(call: Awaitable[Any]) -> tuple[float, Any]:
    """Seconds `call` took, and its result or the exception it raised."""
    started = time.monotonic()
    try:
        outcome = await call
    except Exception as exc:
        outcome = exc
    return time.monotonic() - started, outcome


# -- the stores themselves ---------------------------------------------------------------


WRITES = {"put_connection", "put_connection_cas", "delete_connection", "delete_server_connections",
          "put_pending", "take_pending", "acquire_lock", "release_lock", "cache_set",
          "cache_delete_prefix", "publish"}  # fmt: skip


async def test_every_redis_operation_gives_up_at_the_deadline(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    store = RedisTokenStore.from_url(server.url, prefix=PREFIX, timeout=DEADLINE)
    try:
        calls = redis_calls(store)
        for call in calls.values():
            await call()
        with server.frozen():
            results = await asyncio.gather(*(timed(call()) for call in calls.values()))
        for name, (took, outcome) in zip(calls, results, strict=True):
            assert isinstance(outcome, StoreUnavailable), (name, outcome)
            assert took < DEADLINE + MARGIN, (name, took)
            assert f"no answer within {DEADLINE:g} s" in str(outcome), str(outcome)
            # Redis carries out what it read once it moves again: a write may still happen.
            assert outcome.maybe_applied == (name in WRITES), name
        for call in calls.values():  # thawed: the same store object works again
            await call()
    finally:
        await store.close()


async def test_every_postgres_operation_gives_up_at_the_deadline(private_postgres: PostgresServer) -> None:
    url = private_postgres.create_database(f"deadline_{secrets.token_hex(4)}")
    store = PostgresStore(url, pool_size=3, timeout=DEADLINE)
    await store.open()
    try:
        await store.migrate()
        calls = {name: call for name, call in pg_calls(store).items() if name != "migrate"}
        for call in calls.values():
            await call()
        with private_postgres.frozen():
            results = await asyncio.gather(*(timed(call()) for call in calls.values()))
        for name, (took, outcome) in zip(calls, results, strict=True):
            assert isinstance(outcome, StoreUnavailable), (name, outcome)
            assert took < DEADLINE + MARGIN, (name, took)
            assert f"within {DEADLINE:g} s" in str(outcome) and f"127.0.0.1:{private_postgres.port}" in str(
                outcome
            )
            assert not outcome.maybe_applied, name  # cut off before any COMMIT was sent
        for call in calls.values():
            await call()
    finally:
        await store.close()


async def test_a_write_cut_off_by_the_deadline_is_not_applied_later(private_postgres: PostgresServer) -> None:
    url = private_postgres.create_database(f"late_{secrets.token_hex(4)}")
    # One connection, whose statements are prepared: a write is then sent in one go
    # and sits in the frozen server's socket, to be read when it moves again.
    store = PostgresStore(url, pool_size=1, timeout=DEADLINE)
    await store.open()
    try:
        await store.migrate()
        for name in ("warm-1", "warm-2"):
            await store.set_secret("api_key", name, "ct")
        with private_postgres.frozen():
            with pytest.raises(StoreUnavailable) as refused:
                await store.set_secret("api_key", "late", "ct")
            assert not refused.value.maybe_applied
        # The server has read the write by now; it must have been rolled back.
        conn = await asyncpg.connect(url)
        try:
            for _ in range(10):
                await asyncio.sleep(0.1)
                names = [r["name"] for r in await conn.fetch("SELECT name FROM secrets ORDER BY name")]
                assert names == ["warm-1", "warm-2"]
        finally:
            await conn.close()
    finally:
        await store.close()


# -- through a real proxy ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with run_upstream("streamable-http") as up:
        yield up


@pytest.fixture
async def shared(
    private_postgres: PostgresServer,
    redis_server_factory: Callable[..., RedisServer],
    proxy_factory: type[ProxyProcess],
    upstream: Upstream,
    salt: str,
) -> AsyncIterator[tuple[ProxyProcess, RedisServer]]:
    """A proxy on a private PostgreSQL database and a private Redis, alice connected to `oauthy`."""
    redis = redis_server_factory()
    config = {
        "database_url": private_postgres.create_database(f"proxy_{secrets.token_hex(4)}"),
        "redis_url": redis.url,
        "redis_prefix": PREFIX,
        "migrate_on_start": True,
        "admin_token": ADMIN_TOKEN,
        "api_servers_allowed_networks": ["127.0.0.0/8"],
        "servers": {
            "open": {"url": upstream.mcp_url, "auth": "none"},
            "keyed": {"url": upstream.mcp_url, "auth": "api_key", "api_key_env": "DEADLINES_KEY"},
            "oauthy": {"url": upstream.base_url + "/_echo", "auth": "oauth"},
        },
    }
    # In the environment, not the file: a version without the setting ignores it
    # (and shows how long it holds requests) instead of refusing the file.
    env = {"DEADLINES_KEY": KEY, "KEYBEARER_STORE_TIMEOUT": str(DEADLINE)}
    proxy = proxy_factory(config, env=env)
    for user in ("alice", "bob"):
        await seed_connection(redis.url, Keyring(salt), user, "oauthy")
    assert token_of(await oauth_request(proxy)) == "at-alice-oauthy"
    yield proxy, redis
    assert salt not in proxy.log() and KEY not in proxy.log()


async def seed_connection(redis_url: str, keyring: Keyring, user: str, server: str) -> None:
    """A connected user, written the way the connect flow writes one."""
    store = RedisTokenStore.from_url(redis_url, prefix=PREFIX)
    conn = Connection(
        user=user, server=server, sealed=seal(keyring, user, server, TokenSet(f"at-{user}-{server}", "rt")),
        issuer="https://as.example", client_id="client-1", expires_at=time.time() + 3600,
        obtained_at=time.time(), version=1,
    )  # fmt: skip
    try:
        assert await store.put_connection(conn, expected_version=0)
    finally:
        await store.close()


async def oauth_request(proxy: ProxyProcess, user: str = "alice") -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(f"{proxy.url}/{user}/oauthy", json=INITIALIZE)


def token_of(answer: httpx.Response) -> str | None:
    assert answer.status_code == 200, answer.text
    authorization: str | None = answer.json()["headers"].get("authorization")
    return authorization.removeprefix("Bearer ") if authorization else None


async def get(proxy: ProxyProcess, path: str) -> httpx.Response:
    return await admin(proxy, "GET", path)


async def admin(proxy: ProxyProcess, method: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60, headers=ADMIN) as client:
        return await client.request(method, proxy.url + path)


async def forwards(proxy: ProxyProcess, server: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await client.post(f"{proxy.url}/alice/{server}", json=INITIALIZE,
                                   headers={"accept": "application/json, text/event-stream"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    return dict(answer.headers)


async def test_hung_redis_refuses_oauth_requests_and_ready_at_the_deadline(
    shared: tuple[ProxyProcess, RedisServer],
) -> None:
    proxy, redis = shared
    with redis.frozen():
        # bob's token was never read, so it is not in memory (alice's is, and is served from there).
        oauth = [timed(oauth_request(proxy, "bob")) for _ in range(3)]
        ready = timed(get(proxy, "/ready"))
        others = [timed(forwards(proxy, "open")), timed(forwards(proxy, "keyed"))]
        delete = timed(admin(proxy, "DELETE", "/admin/servers/oauthy/connections/bob"))
        results = await asyncio.gather(*oauth, ready, *others, delete)

        for took, answer in results[:3]:
            assert took < DEADLINE + MARGIN, took
            assert answer.status_code == 503, answer.text
            assert int(answer.headers["retry-after"]) > 0
            error = answer.json()["error"]  # a JSON-RPC error, with the request's id
            assert answer.json()["id"] == INITIALIZE["id"]
            assert error["data"]["error"] == "temporarily_unavailable"
            assert f"no answer within {DEADLINE:g} s" in error["message"], error
        took, answer = results[3]
        assert took < DEADLINE + MARGIN, took
        assert answer.status_code == 503 and "no answer within" in answer.json()["tokens"], answer.text
        assert "database" not in answer.json()
        # API-key and open servers never wait on the token store.
        for took, outcome in results[4:6]:
            assert not isinstance(outcome, Exception), outcome
            assert took < DEADLINE, took
        # A write Redis may still carry out when it moves again is not called undone.
        took, answer = results[6]
        assert took < DEADLINE + MARGIN, took
        assert answer.status_code == 503 and answer.json()["error"] == "store_unavailable", answer.text
        assert "may still be made" in answer.json()["message"], answer.text

    async def served() -> bool:
        return (await oauth_request(proxy, "bob")).status_code == 200

    await until(served, 5)
    assert token_of(await oauth_request(proxy)) == "at-alice-oauthy"
    assert (await get(proxy, "/ready")).status_code == 200


async def test_hung_postgres_refuses_admin_writes_and_ready_at_the_deadline(
    shared: tuple[ProxyProcess, RedisServer], private_postgres: PostgresServer, upstream: Upstream
) -> None:
    proxy, _ = shared
    before = (await get(proxy, "/admin/servers")).json()
    new = {"id": "during-hang", "url": upstream.mcp_url, "auth": "none"}
    async with httpx.AsyncClient(timeout=60, headers=ADMIN) as client:
        with private_postgres.frozen():
            write, ready = await asyncio.gather(
                timed(client.post(proxy.url + "/admin/servers", json=new)),
                timed(client.get(proxy.url + "/ready")),
            )
            took, answer = write
            assert took < DEADLINE + MARGIN, took
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"] == "store_unavailable" and answer.headers["retry-after"]
            assert (
                "PostgreSQL" in answer.json()["message"] and "nothing was changed" in answer.json()["message"]
            )
            took, answer = ready
            assert took < DEADLINE + MARGIN, took
            assert answer.status_code == 503 and "PostgreSQL" in answer.json()["database"], answer.text
            # What is held in memory keeps forwarding; OAuth needs only Redis.
            await forwards(proxy, "open")
            await forwards(proxy, "keyed")
            assert token_of(await oauth_request(proxy)) == "at-alice-oauthy"

        async def back() -> bool:
            return (await client.get(proxy.url + "/ready")).status_code == 200

        await until(back, 5)
        await asyncio.sleep(0.5)  # a write the server read late would be committed by now
        assert (await client.get(proxy.url + "/admin/servers")).json() == before
        assert (await client.post(proxy.url + "/admin/servers", json=new)).status_code == 201
    await forwards(proxy, "during-hang")


async def until(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not back within {timeout} s"
        await asyncio.sleep(0.1)


def test_shipped_readiness_probes_wait_longer_than_the_deadline() -> None:
    """/ready may take up to store_timeout; a probe that gives up sooner would take a
    replica out of the Service because its store is slow, not because it is down."""
    probes = [
        (path, container["readinessProbe"])
        for path in sorted((ROOT / "deploy" / "kubernetes").rglob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        for container in _containers(doc)
        if container.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/ready"
    ]
    assert probes
    for path, probe in probes:
        assert probe.get("timeoutSeconds", 1) > Settings().store_timeout, (path, probe)


def _containers(doc: Any) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {}) if isinstance(doc, dict) else {}
    return [*spec.get("containers", []), *spec.get("initContainers", [])]


async def test_redis_replies_are_parsed_in_c(redis_server_factory: Callable[..., RedisServer]) -> None:
    # redis-py falls back to its own Python parser, silently, when hiredis is missing:
    # every token read from the store then costs about twice the CPU.
    server = redis_server_factory()
    store = RedisTokenStore.from_url(server.url, prefix=PREFIX, timeout=DEADLINE)
    try:
        assert await store.get_connection("alice", "srv") is None
        pool = store.client.connection_pool
        conn = await pool.get_connection()
        try:
            assert "Hiredis" in type(conn._parser).__name__
        finally:
            await pool.release(conn)
    finally:
        await store.close()
