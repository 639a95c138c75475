"""Several replicas sharing PostgreSQL and Redis: admin changes reach every
replica quickly (Redis pub/sub) or at worst within the PostgreSQL poll
(the backstop), a restart loses nothing, and a store going away degrades
what needs it while everything else keeps forwarding."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import RedisServer
from peers.mcp_client import INITIALIZE, Upstream, raw_post, result_text, run_upstream, streamable_session
from services import REDIS_URL
from support import ProxyProcess, start_all, stop_all
from test_store_faults import PostgresServer

from proxy.crypto import Keyring
from proxy.settings import parse_server
from proxy.stores.base import migrations
from proxy.stores.postgres import PostgresStore

ADMIN_TOKEN = "shared-admin-token-5b1d9e7a3c"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEY = "sk-shared-0011223344556677"
NEW_KEY = "sk-shared-rotated-8899aabbccdd"
# The design's bounds: pub/sub for speed, the 5 s PostgreSQL poll as the backstop.
PUBSUB_BOUND = 2.0
BACKSTOP_BOUND = 7.0

# Propagation times measured by the tests below, printed at the end of the module.
MEASURED: dict[str, float] = {}


async def schema_in(database_url: str) -> str:
    """A schema of our own in the run's database; the URL makes it the search path."""
    schema = f"shared_{secrets.token_hex(5)}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    return f"{database_url}?search_path={schema}"


def replica_config(database_url: str, redis_url: str, prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "database_url": database_url,
        "redis_url": redis_url,
        "redis_prefix": prefix,
        "migrate_on_start": True,
        "admin_token": ADMIN_TOKEN,
        # The upstreams servers are added for at run time listen on loopback.
        "api_servers_allowed_networks": ["127.0.0.0/8"],
        **extra,
    }


async def until(check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.02) -> float:
    """Seconds until `check` holds, polling every `interval`; fails after `timeout`."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not seen within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def probe(client: httpx.AsyncClient, replica: ProxyProcess, server: str) -> httpx.Response:
    return await client.post(f"{replica.url}/alice/{server}", json={"probe": True})


def unknown(answer: httpx.Response) -> bool:
    return answer.status_code == 404 and answer.json().get("error") == "unknown_server"


def forwards_with(key: str | None) -> Callable[[httpx.Response], bool]:
    def check(answer: httpx.Response) -> bool:
        if answer.status_code != 200:
            return False
        return answer.json()["headers"].get("authorization") == (f"Bearer {key}" if key else None)

    return check


def key_missing(answer: httpx.Response) -> bool:
    return answer.status_code == 503 and answer.json().get("error") == "api_key_missing"


async def seen_by(
    replicas: list[ProxyProcess], server: str, condition: Callable[[httpx.Response], bool], timeout: float
) -> float:
    """Seconds until every replica's forwarding shows `condition` for `server` (the slowest one)."""
    async with httpx.AsyncClient(timeout=5) as client:

        async def one(replica: ProxyProcess) -> float:
            async def check() -> bool:
                return condition(await probe(client, replica, server))

            return await until(check, timeout)

        return max(await asyncio.gather(*(one(r) for r in replicas)))


# -- three replicas on the machine's PostgreSQL and Redis ---------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with run_upstream("streamable-http") as up:
        yield up


@pytest.fixture(scope="module")
async def database_url(postgres_database: str) -> str:
    return await schema_in(postgres_database)


@pytest.fixture(scope="module")
def prefix(redis_prefix: str) -> str:
    return f"{redis_prefix}-shared-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def replicas(
    database_url: str, prefix: str, salt: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ProxyProcess]]:
    config = replica_config(database_url, REDIS_URL, prefix)
    procs = [
        ProxyProcess(config, tmp_path_factory.mktemp(f"replica{i}"), {"KEYBEARER_SALT": salt}, start=False)
        for i in range(3)
    ]
    try:
        yield start_all(procs)  # at the same moment: their migrations race
    finally:
        stop_all(procs)
        for proc in procs:
            for secret in (KEY, NEW_KEY, ADMIN_TOKEN, salt):
                assert secret not in proc.log()
        if MEASURED:
            print("\npropagation times (s):", json.dumps({k: round(v, 3) for k, v in MEASURED.items()}))


@pytest.fixture
async def admin(replicas: list[ProxyProcess]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=replicas[0].url, headers=ADMIN, timeout=10) as client:
        yield client


async def test_replicas_started_together_migrated_once(
    replicas: list[ProxyProcess], database_url: str
) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        for replica in replicas:
            ready = await client.get(replica.url + "/ready")
            assert ready.status_code == 200 and ready.json() == {"ready": True}
    schema = database_url.rpartition("search_path=")[2]
    conn = await asyncpg.connect(database_url.partition("?")[0])
    try:
        rows = await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations ORDER BY version')
    finally:
        await conn.close()
    assert [r["version"] for r in rows] == [version for version, _ in migrations("postgres")]


async def test_admin_changes_reach_the_other_replicas(
    replicas: list[ProxyProcess], admin: httpx.AsyncClient, upstream: Upstream
) -> None:
    others = replicas[1:]
    echo = upstream.base_url + "/_echo"
    async with httpx.AsyncClient(timeout=5) as client:
        for replica in others:
            assert unknown(await probe(client, replica, "live"))

    created = await admin.post("/admin/servers", json={"id": "live", "url": echo, "auth": "api_key"})
    assert created.status_code == 201, created.text
    MEASURED["create"] = await seen_by(others, "live", key_missing, PUBSUB_BOUND)

    assert (await admin.put("/admin/servers/live/api-key", json={"api_key": KEY})).status_code == 204
    MEASURED["set_api_key"] = await seen_by(others, "live", forwards_with(KEY), PUBSUB_BOUND)

    assert (await admin.put("/admin/servers/live/api-key", json={"api_key": NEW_KEY})).status_code == 204
    MEASURED["replace_api_key"] = await seen_by(others, "live", forwards_with(NEW_KEY), PUBSUB_BOUND)

    # a change made on another replica comes back to the first
    other = httpx.AsyncClient(base_url=replicas[2].url, headers=ADMIN, timeout=10)
    async with other:
        cleared = await other.delete("/admin/servers/live/api-key")
        assert cleared.status_code == 204
    MEASURED["clear_api_key"] = await seen_by(replicas[:2], "live", key_missing, PUBSUB_BOUND)

    assert (await admin.delete("/admin/servers/live")).status_code == 204
    MEASURED["delete"] = await seen_by(others, "live", unknown, PUBSUB_BOUND)
    for replica in replicas:
        async with httpx.AsyncClient(base_url=replica.url, headers=ADMIN) as client:
            assert (await client.get("/admin/servers/live")).status_code == 404


async def test_a_reload_never_undoes_a_write_just_made(
    replicas: list[ProxyProcess], admin: httpx.AsyncClient, upstream: Upstream
) -> None:
    """Each write is announced, and every replica (the writer too) reloads on the
    announcement: a reload that read the store just before the next write must
    not replace what that write put in memory."""
    echo = upstream.base_url + "/_echo"
    ids = [f"burst{i}" for i in range(30)]
    for sid in ids:
        created = await admin.post("/admin/servers", json={"id": sid, "url": echo, "auth": "api_key"})
        assert created.status_code == 201
        keyed = await admin.put(f"/admin/servers/{sid}/api-key", json={"api_key": KEY})
        assert keyed.status_code == 204, (sid, keyed.text)
        assert (await admin.get(f"/admin/servers/{sid}/api-key")).json()["set"] is True, sid
    for sid in ids:
        assert (await admin.delete(f"/admin/servers/{sid}")).status_code == 204
        assert (await admin.get(f"/admin/servers/{sid}")).status_code == 404, sid


async def test_a_bad_stored_row_does_not_leave_replicas_deaf(
    replicas: list[ProxyProcess], admin: httpx.AsyncClient, upstream: Upstream, database_url: str
) -> None:
    """A stored definition this version cannot read (say, written by a newer one)
    makes reloads fail while it is there; once it is gone, changes flow again."""
    base, _, query = database_url.partition("?")
    conn = await asyncpg.connect(base, server_settings={"search_path": query.partition("=")[2]})
    try:
        await conn.execute(
            "INSERT INTO servers (id, definition) VALUES ('from-the-future', $1::jsonb)",
            json.dumps({"url": upstream.mcp_url, "auth": "none", "hologram": True}),
        )
        # announced: every replica reloads now, and fails
        answer = await admin.post("/admin/servers", json={"id": "while-broken", "url": upstream.mcp_url})
        assert answer.status_code == 201
        await asyncio.sleep(0.3)
        await conn.execute("DELETE FROM servers WHERE id = 'from-the-future'")
    finally:
        await conn.close()
    echo = upstream.base_url + "/_echo"
    assert (await admin.post("/admin/servers", json={"id": "after-fix", "url": echo})).status_code == 201
    MEASURED["after_bad_row"] = await seen_by(replicas[1:], "after-fix", forwards_with(None), PUBSUB_BOUND)
    for sid in ("while-broken", "after-fix"):
        assert (await admin.delete(f"/admin/servers/{sid}")).status_code == 204


async def test_cli_change_reaches_every_replica(
    replicas: list[ProxyProcess], upstream: Upstream, admin: httpx.AsyncClient
) -> None:
    """A fourth process (the CLI) writes to the same PostgreSQL and publishes on the same Redis."""
    echo = upstream.base_url + "/_echo"
    added = replicas[0].cli("servers", "add", "by-cli", "--url", echo, "--auth", "api_key", "--json")
    assert added.returncode == 0, added.stderr
    MEASURED["cli_servers_add"] = await seen_by(replicas, "by-cli", key_missing, PUBSUB_BOUND)
    keyed = replicas[0].cli("api-key", "set", "by-cli", "--json", input=KEY + "\n")
    assert keyed.returncode == 0, keyed.stderr
    MEASURED["cli_api_key_set"] = await seen_by(replicas, "by-cli", forwards_with(KEY), PUBSUB_BOUND)
    removed = replicas[0].cli("servers", "remove", "by-cli", "--json")
    assert removed.returncode == 0, removed.stderr
    MEASURED["cli_servers_remove"] = await seen_by(replicas, "by-cli", unknown, PUBSUB_BOUND)


async def test_unpublished_write_is_seen_through_the_poll(
    replicas: list[ProxyProcess], database_url: str, upstream: Upstream, salt: str
) -> None:
    """Nothing published: the replicas find the write by polling PostgreSQL's change counter."""
    store = PostgresStore(database_url, pool_size=1)
    await store.open()
    try:
        server = parse_server(
            "silent", {"url": upstream.base_url + "/_echo", "auth": "api_key"}, key="t", source="store"
        )
        await store.put_server(server)
        sealed = Keyring(salt).encrypt("api_key", KEY.encode(), "api_key:silent")
        await store.set_secret("api_key", "silent", sealed)
        written = time.monotonic()
        took = await seen_by(replicas, "silent", forwards_with(KEY), BACKSTOP_BOUND)
        MEASURED["backstop_poll"] = took
        assert time.monotonic() - written < BACKSTOP_BOUND
        await store.delete_server("silent")
    finally:
        await store.close()


async def test_restart_loses_nothing(
    replicas: list[ProxyProcess], admin: httpx.AsyncClient, upstream: Upstream
) -> None:
    created = await admin.post(
        "/admin/servers", json={"id": "kept", "url": upstream.mcp_url, "auth": "api_key"}
    )
    assert created.status_code == 201
    assert (await admin.put("/admin/servers/kept/api-key", json={"api_key": KEY})).status_code == 204
    token = (await admin.post("/admin/tokens", json={"users": ["alice"], "label": "kept"})).json()
    restarted = replicas[1]
    async with httpx.AsyncClient(base_url=restarted.url, headers=ADMIN, timeout=10) as client:

        async def listed() -> bool:
            return (await client.get("/admin/servers/kept/api-key")).json().get("set") is True

        await until(listed, PUBSUB_BOUND)
        before = (await client.get("/admin/servers")).json()
        tokens_before = (await client.get("/admin/tokens")).json()

        restarted.stop()
        restarted.start()
        assert (await client.get("/admin/servers")).json() == before
        assert (await client.get("/admin/tokens")).json() == tokens_before
        assert token["id"] in {t["id"] for t in tokens_before["tokens"]}
    async with streamable_session(f"{restarted.url}/alice/kept") as session:
        seen = json.loads(result_text(await session.call_tool("headers", {})))
    assert seen["authorization"] == f"Bearer {KEY}"
    assert (await admin.delete("/admin/servers/kept")).status_code == 204


# -- faults, with private Redis and PostgreSQL servers this test may kill ------------------------


async def oauth_answer(proxy: ProxyProcess) -> httpx.Response:
    return await raw_post(f"{proxy.url}/alice/oauthy", INITIALIZE)


def asks_to_connect(answer: httpx.Response) -> bool:
    if answer.status_code != 200:
        return False
    error = answer.json().get("error") or {}
    return error.get("code") == -32042 and "/connect/alice/oauthy" in error["data"]["elicitations"][0]["url"]


async def echo_through(proxy: ProxyProcess, server: str) -> dict[str, Any]:
    async with streamable_session(f"{proxy.url}/alice/{server}") as session:
        assert result_text(await session.call_tool("echo", {"text": "still here"})) == "still here"
        seen: dict[str, Any] = json.loads(result_text(await session.call_tool("headers", {})))
    return seen


FAULT_SERVERS = {
    "open": {"auth": "none"},
    "keyed": {"auth": "api_key", "api_key_env": "SHARED_TEST_KEY"},
}


def fault_servers(upstream: Upstream) -> dict[str, Any]:
    return {
        **{sid: {"url": upstream.mcp_url, **body} for sid, body in FAULT_SERVERS.items()},
        "oauthy": {"url": "https://oauth.example/mcp", "auth": "oauth"},
    }


async def test_redis_down_degrades_only_oauth(
    redis_server_factory: Callable[..., RedisServer],
    proxy_factory: type[ProxyProcess],
    postgres_database: str,
    upstream: Upstream,
    prefix: str,
) -> None:
    redis = redis_server_factory()
    config = replica_config(await schema_in(postgres_database), redis.url, prefix + "-redisfault",
                            servers=fault_servers(upstream))  # fmt: skip
    proxy = proxy_factory(config, env={"SHARED_TEST_KEY": KEY})
    assert asks_to_connect(await oauth_answer(proxy))

    redis.kill()
    await echo_through(proxy, "open")
    assert (await echo_through(proxy, "keyed"))["authorization"] == f"Bearer {KEY}"
    refused = await oauth_answer(proxy)
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) > 0
    error = refused.json()["error"]
    assert error["data"]["error"] == "temporarily_unavailable"
    assert "token storage is unavailable" in error["message"] and "Redis" in error["message"]
    assert f"127.0.0.1:{redis.port}" in error["message"]
    async with httpx.AsyncClient(base_url=proxy.url, headers=ADMIN, timeout=10) as client:
        ready = await client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False and "Redis" in ready.json()["tokens"]
        assert "database" not in ready.json()

        # what lives in PostgreSQL can still be changed; the change is not announced
        # (no Redis), which the other replicas' poll makes up for
        created = await client.post(
            "/admin/servers", json={"id": "during-outage", "url": upstream.mcp_url, "auth": "none"}
        )
        assert created.status_code == 201, created.text
        await echo_through(proxy, "during-outage")
        # what would leave tokens behind in Redis is refused, and changes nothing
        before = (await client.get("/admin/servers")).json()
        for method, path, body in (
            ("DELETE", "/admin/servers/during-outage", None),
            ("PUT", "/admin/servers/during-outage", {"url": upstream.base_url + "/_echo", "auth": "none"}),
            ("POST", "/admin/servers/oauthy/reset", None),
        ):
            answer = await client.request(method, path, json=body)
            assert answer.status_code == 503, (method, path, answer.text)
            assert answer.json()["error"] == "store_unavailable" and "Redis" in answer.json()["message"]
            assert answer.headers["retry-after"]
            assert (await client.get("/admin/servers")).json() == before
        await echo_through(proxy, "during-outage")

        redis.start()  # same port; the proxy is not restarted
        await until(lambda: _holds(oauth_answer(proxy), asks_to_connect), 10, interval=0.1)
        assert (await client.get("/ready")).status_code == 200
        assert (await client.post("/admin/servers/oauthy/reset")).status_code == 200
        assert (await client.delete("/admin/servers/during-outage")).status_code == 204
        created = await client.post(
            "/admin/servers", json={"id": "after-outage", "url": upstream.mcp_url, "auth": "none"}
        )
        assert created.status_code == 201, created.text
    await echo_through(proxy, "after-outage")


async def _holds(answer: Awaitable[httpx.Response], condition: Callable[[httpx.Response], bool]) -> bool:
    return condition(await answer)


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()


async def test_postgres_down_keeps_forwarding_and_refuses_admin_writes(
    private_postgres: PostgresServer,
    proxy_factory: type[ProxyProcess],
    upstream: Upstream,
    prefix: str,
) -> None:
    config = replica_config(
        private_postgres.url, REDIS_URL, prefix + "-pgfault", servers=fault_servers(upstream)
    )
    proxy = proxy_factory(config, env={"SHARED_TEST_KEY": KEY})
    async with httpx.AsyncClient(base_url=proxy.url, headers=ADMIN, timeout=20) as client:
        for sid, auth in (("stored-open", "none"), ("stored-key", "api_key")):
            answer = await client.post(
                "/admin/servers", json={"id": sid, "url": upstream.mcp_url, "auth": auth}
            )
            assert answer.status_code == 201
        assert (
            await client.put("/admin/servers/stored-key/api-key", json={"api_key": KEY})
        ).status_code == 204
        before = (await client.get("/admin/servers")).json()

        private_postgres.crash()
        # forwarding goes on from what the replica holds in memory
        for sid in ("open", "stored-open"):
            await echo_through(proxy, sid)
        for sid in ("keyed", "stored-key"):
            assert (await echo_through(proxy, sid))["authorization"] == f"Bearer {KEY}"
        ready = await client.get("/ready")
        assert ready.status_code == 503 and "PostgreSQL" in ready.json()["database"]

        writes = [
            ("POST", "/admin/servers", {"id": "during-outage", "url": upstream.mcp_url, "auth": "none"}),
            ("PUT", "/admin/servers/stored-key/api-key", {"api_key": NEW_KEY}),
            ("DELETE", "/admin/servers/stored-key/api-key", None),
            ("PUT", "/admin/servers/stored-open", {"url": upstream.base_url + "/_echo", "auth": "none"}),
            ("DELETE", "/admin/servers/stored-open", None),
            ("POST", "/admin/tokens", {"users": ["alice"]}),
        ]
        for method, path, body in writes:
            answer = await client.request(method, path, json=body)
            assert answer.status_code == 503, (method, path, answer.text)
            assert answer.json()["error"] == "store_unavailable"
            message = answer.json()["message"]
            assert "PostgreSQL" in message and "nothing was changed" in message
            assert answer.headers["retry-after"]
            assert (await client.get("/admin/servers")).json() == before
        assert (await echo_through(proxy, "stored-key"))["authorization"] == f"Bearer {KEY}"

        private_postgres.start()
        assert (await client.get("/admin/servers")).json() == before
        stored = PostgresStore(private_postgres.url)
        await stored.open()
        try:
            assert sorted(s.id for s in await stored.list_servers()) == ["stored-key", "stored-open"]
            assert [(k, n) for k, n, _ in await stored.list_secrets()] == [("api_key", "stored-key")]
        finally:
            await stored.close()
        created = await client.post(
            "/admin/servers", json={"id": "after-outage", "url": upstream.mcp_url, "auth": "none"}
        )
        assert created.status_code == 201, created.text
        assert (
            await client.put("/admin/servers/stored-key/api-key", json={"api_key": NEW_KEY})
        ).status_code == 204
        assert (await client.get("/ready")).status_code == 200
    await echo_through(proxy, "after-outage")
    assert (await echo_through(proxy, "stored-key"))["authorization"] == f"Bearer {NEW_KEY}"
