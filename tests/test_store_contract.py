"""One contract for every store: each test runs against every implementation.

Store: SQLite (a file in tmp_path) and PostgreSQL (a schema of its own in the
run's database). TokenStore: SQLite, Redis (the run's key prefix), and a
private Redis over TLS, a Redis Sentinel and a Redis Cluster. Each test gets a location nobody
else used, so no test depends on another or on an earlier run.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis
from redis.asyncio.sentinel import SentinelConnectionPool
from services import REDIS_URL

from proxy.errors import InvalidInput
from proxy.settings import ConfigError, ServerConfig, Settings, parse_server
from proxy.stores import Connection, Store, TokenStore
from proxy.stores.base import migrations, open_store, open_token_store
from proxy.stores.postgres import PostgresStore
from proxy.stores.redis import RedisTokenStore, describe_redis_url, redis_client_from_url
from proxy.stores.sqlite import SQLiteStore

StoreFactory = Callable[..., Awaitable[Store]]
TokenStoreFactory = Callable[[], Awaitable[TokenStore]]


def server(server_id: str, url: str = "https://mcp.example.com/mcp", **extra: object) -> ServerConfig:
    return parse_server(server_id, {"url": url, **extra}, key=server_id, source="store")


async def postgres_schema_url(database_url: str) -> str:
    """A new schema in the run's database; the URL makes it the search path."""
    schema = f"t_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await admin.close()
    return f"{database_url}?search_path={schema}"


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_database: str
) -> AsyncIterator[StoreFactory]:
    """Opens stores on one fresh location; several calls give several connections to it."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/keybearer.db"
    else:
        url = await postgres_schema_url(postgres_database)
    opened: list[Store] = []

    async def make(migrate: bool = True) -> Store:
        store = open_store(Settings(database_url=url, postgres_pool_size=4))
        await store.open()
        opened.append(store)
        if migrate:
            await store.migrate()
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(store_factory: StoreFactory) -> Store:
    return await store_factory()


@pytest.fixture(params=["sqlite", "redis", "redis-tls", "redis-sentinel", "redis-cluster"])
async def token_store_factory(
    request: pytest.FixtureRequest, tmp_path: Path, redis_prefix: str
) -> AsyncIterator[TokenStoreFactory]:
    """Opens token stores on one fresh location, as open_token_store picks them."""
    prefix = f"{redis_prefix}:{secrets.token_hex(4)}"
    if request.param == "sqlite":
        settings = Settings(database_url=f"sqlite:///{tmp_path}/keybearer.db")
        schema = open_store(settings)
        await schema.open()
        await schema.migrate()
        await schema.close()
    else:
        url = {
            "redis": REDIS_URL,
            "redis-tls": "redis_tls_url",
            "redis-sentinel": "redis_sentinel_url",
            "redis-cluster": "redis_cluster_url",
        }[request.param]
        if url != REDIS_URL:
            url = request.getfixturevalue(url)
        settings = Settings(database_url="postgresql://unused/db", redis_url=url, redis_prefix=prefix)
    opened: list[TokenStore] = []

    async def make() -> TokenStore:
        tokens = open_token_store(settings)
        await tokens.open()
        opened.append(tokens)
        return tokens

    yield make
    for tokens in opened:
        await tokens.close()


@pytest.fixture
async def tokens(token_store_factory: TokenStoreFactory) -> TokenStore:
    return await token_store_factory()


# -- Store: servers ----------------------------------------------------------------


async def test_servers_crud(store: Store) -> None:
    assert await store.list_servers() == []
    await store.put_server(server("beta", auth="api_key", api_key_header="X-Api-Key"))
    await store.put_server(server("alpha"))
    assert [s.id for s in await store.list_servers()] == ["alpha", "beta"]
    beta = (await store.list_servers())[1]
    assert (beta.auth, beta.api_key_header, beta.source) == ("api_key", "X-Api-Key", "store")

    await store.put_server(server("alpha", url="https://other.example.com/mcp"))
    assert (await store.list_servers())[0].url == "https://other.example.com/mcp"

    assert await store.delete_server("alpha") is True
    assert await store.delete_server("alpha") is False
    assert [s.id for s in await store.list_servers()] == ["beta"]


async def test_changes_moves_when_another_connection_writes(store_factory: StoreFactory) -> None:
    reader, writer = await store_factory(), await store_factory()
    seen = await reader.changes()
    assert await reader.changes() == seen, "reading alone must not move it"
    for write in (
        writer.put_server(server("gamma")),
        writer.set_secret("api_key", "gamma", "ct1"),
        writer.set_secret("api_key", "gamma", "ct2"),
        writer.delete_secret("api_key", "gamma"),
        writer.delete_server("gamma"),
    ):
        await write
        now = await reader.changes()
        assert now != seen
        seen = now


# -- Store: secrets ----------------------------------------------------------------


async def test_secrets_crud_and_list(store: Store) -> None:
    assert await store.get_secret("api_key", "tavily") is None
    await store.set_secret("api_key", "tavily", "kb1.a.one")
    await store.set_secret("client_secret", "linear|https://as.example", "kb1.b.two")
    await store.set_secret("api_key", "tavily", "kb1.a.three")
    assert await store.get_secret("api_key", "tavily") == "kb1.a.three"
    assert await store.get_secret("client_secret", "tavily") is None, "kind is part of the key"
    assert await store.list_secrets() == [
        ("api_key", "tavily", "kb1.a.three"),
        ("client_secret", "linear|https://as.example", "kb1.b.two"),
    ]
    assert await store.delete_secret("api_key", "tavily") is True
    assert await store.delete_secret("api_key", "tavily") is False
    assert await store.list_secrets() == [("client_secret", "linear|https://as.example", "kb1.b.two")]


async def test_replace_secret_is_compare_and_set(store: Store) -> None:
    await store.set_secret("api_key", "tavily", "old")
    assert await store.replace_secret("api_key", "tavily", "stale", "new") is False
    assert await store.get_secret("api_key", "tavily") == "old"
    assert await store.replace_secret("api_key", "tavily", "old", "new") is True
    assert await store.get_secret("api_key", "tavily") == "new"
    assert await store.replace_secret("api_key", "missing", "old", "new") is False
    assert await store.get_secret("api_key", "missing") is None


async def test_delete_server_cascades_to_its_secrets_only(store: Store) -> None:
    for sid in ("srv", "srvx", "srv_x"):
        await store.put_server(server(sid))
    for kind, name in [
        ("api_key", "srv"),
        ("client_secret", "srv|https://as.example"),
        ("client_registration", "srv|https://as.example|x"),
        ("proxy_token", "srv"),  # a caller token whose id happens to equal the server's
        ("api_key", "srvx"),
        ("api_key", "srv_x"),
        ("client_secret", "srvx|https://as.example"),
        ("client_secret", "other|srv"),
    ]:
        await store.set_secret(kind, name, "ct")
    assert await store.delete_server("srv") is True
    assert [s.id for s in await store.list_servers()] == ["srv_x", "srvx"]
    assert [(k, n) for k, n, _ in await store.list_secrets()] == [
        ("api_key", "srv_x"),
        ("api_key", "srvx"),
        ("client_secret", "other|srv"),
        ("client_secret", "srvx|https://as.example"),
        ("proxy_token", "srv"),
    ]


async def test_a_stored_server_this_version_cannot_read_is_skipped(store: Store) -> None:
    await store.put_server(server("good"))
    bad = '{"url": "ftp://nowhere", "auth": "api_key"}'
    if isinstance(store, PostgresStore):
        await store._run(
            lambda c: c.execute("INSERT INTO servers (id, definition) VALUES ('bad', $1::jsonb)", bad)
        )
    else:
        assert isinstance(store, SQLiteStore)
        await store._write(lambda db: db.execute("INSERT INTO servers VALUES ('bad', ?, 0, 0)", (bad,)))
    # One unreadable row must not stop every other server from loading.
    assert [s.id for s in await store.list_servers()] == ["good"]


# -- Store: migrations -------------------------------------------------------------


async def test_migrate_is_idempotent(store_factory: StoreFactory) -> None:
    store = await store_factory(migrate=False)
    backend = "sqlite" if isinstance(store, SQLiteStore) else "postgres"
    every = [version for version, _ in migrations(backend)]
    assert every[0] == "0001_init"
    assert await store.migrate() == every
    assert await store.migrate() == []
    await store.put_server(server("after"))
    assert [s.id for s in await store.list_servers()] == ["after"]


async def test_migrate_concurrently_applies_each_migration_once(store_factory: StoreFactory) -> None:
    stores = [await store_factory(migrate=False) for _ in range(3)]
    results = await asyncio.gather(*(s.migrate() for s in stores))
    applied = [version for result in results for version in result]
    backend = "sqlite" if isinstance(stores[0], SQLiteStore) else "postgres"
    assert sorted(applied) == [version for version, _ in migrations(backend)]
    assert await stores[0].migrate() == []


# -- TokenStore: connections -------------------------------------------------------


def conn(user: str, server: str, **fields: object) -> Connection:
    return replace(Connection(user=user, server=server), **fields)  # type: ignore[arg-type]


async def test_connection_round_trip(tokens: TokenStore) -> None:
    assert await tokens.get_connection("a.user@example.com", "linear") is None
    full = conn(
        "a.user@example.com", "linear", state="must_reconnect", sealed="kb1.x.sealed",
        issuer="https://as.example", client_id="client-1", scopes=("read", "write:all"),
        expires_at=1_760_000_000.25, obtained_at=1_759_990_000.5, last_error="invalid_grant", refreshable=False,
        version=7,
    )  # fmt: skip
    assert await tokens.put_connection(full) is True
    assert await tokens.get_connection("a.user@example.com", "linear") == full
    bare = conn("a.user@example.com", "linear", version=8)
    assert await tokens.put_connection(bare) is True
    assert await tokens.get_connection("a.user@example.com", "linear") == bare, "absent fields are cleared"


async def test_connections_read_together(tokens: TokenStore) -> None:
    # On Redis, reads asked for in one turn of the loop go in one call (a script; on a
    # Cluster, whose keys lie in many slots, a pipeline): each caller gets its own row.
    written = [
        conn(f"u{i}", "srv", sealed=f"t{i}", scopes=("a", "b"), expires_at=1_760_000_000.5 + i, version=i + 1)
        for i in range(12)
    ]
    for c in written:
        await tokens.put_connection(c)
    users = [*(c.user for c in written), "nobody", "u3"]
    found = await asyncio.gather(*(tokens.get_connection(user, "srv") for user in users))
    assert found == [*written, None, written[3]]
    # Or asked for in one call (the token memory's reads ahead).
    assert await tokens.get_connections([(user, "srv") for user in users]) == [*written, None, written[3]]
    assert await tokens.get_connections([]) == []


async def test_connections_list_and_delete(tokens: TokenStore) -> None:
    users = ["bob", "a.lice@example.com", "carol-1_x"]
    for user in users:
        await tokens.put_connection(conn(user, "srv", sealed=f"t-{user}", version=1))
    await tokens.put_connection(conn("bob", "srvx", version=1))
    await tokens.put_connection(conn("bob", "srv2", version=1))

    assert [c.user for c in await tokens.list_connections("srv")] == sorted(users)
    assert [c.sealed for c in await tokens.list_connections("srv")] == [f"t-{u}" for u in sorted(users)]
    assert [c.server for c in await tokens.list_user_connections("bob")] == ["srv", "srv2", "srvx"]
    assert await tokens.list_connections("nobody-uses-this") == []
    assert await tokens.list_user_connections("nobody") == []

    assert await tokens.delete_connection("bob", "srv2") is True
    assert await tokens.delete_connection("bob", "srv2") is False
    assert [c.server for c in await tokens.list_user_connections("bob")] == ["srv", "srvx"]

    assert await tokens.delete_server_connections("srv") == 3
    assert await tokens.list_connections("srv") == []
    assert await tokens.get_connection("a.lice@example.com", "srv") is None
    assert [c.server for c in await tokens.list_user_connections("bob")] == ["srvx"]
    assert await tokens.delete_server_connections("srv") == 0


async def test_stale_conditional_write_is_refused_and_changes_nothing(tokens: TokenStore) -> None:
    first = conn("u1", "srv", sealed="v1", version=1)
    assert await tokens.put_connection(first, expected_version=0) is True
    assert (
        await tokens.put_connection(conn("u1", "srv", sealed="other", version=1), expected_version=0) is False
    )
    assert await tokens.get_connection("u1", "srv") == first

    second = conn("u1", "srv", sealed="v2", version=2)
    assert await tokens.put_connection(second, expected_version=1) is True
    late = conn("u1", "srv", sealed="late", version=2)
    assert await tokens.put_connection(late, expected_version=1) is False
    assert await tokens.get_connection("u1", "srv") == second

    assert await tokens.put_connection(conn("u2", "srv", version=3), expected_version=2) is False
    assert await tokens.get_connection("u2", "srv") is None
    assert [c.user for c in await tokens.list_connections("srv")] == ["u1"]
    assert await tokens.delete_connection("u1", "srv") is True
    assert await tokens.put_connection(late, expected_version=2) is False, "deleted means version 0"


async def test_concurrent_writers_with_the_same_expected_version(
    token_store_factory: TokenStoreFactory,
) -> None:
    a, b = await token_store_factory(), await token_store_factory()
    await a.put_connection(conn("u", "srv", sealed="v1", version=1))
    writes = [
        (a if i % 2 else b).put_connection(conn("u", "srv", sealed=f"w{i}", version=2), expected_version=1)
        for i in range(8)
    ]
    results = await asyncio.gather(*writes)
    assert results.count(True) == 1
    stored = await a.get_connection("u", "srv")
    assert stored is not None and stored.version == 2
    assert stored.sealed == f"w{results.index(True)}"


# -- TokenStore: pending, locks, cache ---------------------------------------------


async def test_pending_is_single_use_and_expires(tokens: TokenStore) -> None:
    await tokens.put_pending("state-1", "kb1.sealed", ttl=30)
    assert await tokens.take_pending("state-1") == "kb1.sealed"
    assert await tokens.take_pending("state-1") is None
    assert await tokens.take_pending("never-put") is None

    await tokens.put_pending("state-2", "soon-gone", ttl=0.2)
    await asyncio.sleep(0.35)
    assert await tokens.take_pending("state-2") is None


async def test_pending_taken_once_under_concurrency(token_store_factory: TokenStoreFactory) -> None:
    a, b = await token_store_factory(), await token_store_factory()
    await a.put_pending("state", "value", ttl=30)
    taken = await asyncio.gather(*((a if i % 2 else b).take_pending("state") for i in range(6)))
    assert taken.count("value") == 1 and taken.count(None) == 5


async def test_sessions_are_shared_replaced_ended_and_expire(token_store_factory: TokenStoreFactory) -> None:
    a, b = await token_store_factory(), await token_store_factory()
    assert await a.get_session("s1") is None
    await a.put_session("s1", "kb1.first", ttl=30)
    assert await b.get_session("s1") == "kb1.first", "another replica reads the same session"
    await b.put_session("s1", "kb1.touched", ttl=30)
    assert await a.get_session("s1") == "kb1.touched"
    assert await a.get_session("s1") == "kb1.touched", "reading does not consume it"

    assert await b.delete_session("s1") is True
    assert await a.get_session("s1") is None
    assert await a.delete_session("s1") is False

    await a.put_session("idle", "kb1.idle", ttl=0.2)
    await asyncio.sleep(0.35)
    assert await b.get_session("idle") is None
    assert await b.delete_session("idle") is False
    await a.put_session("kept", "kb1.kept", ttl=0.4)
    await asyncio.sleep(0.25)
    await a.put_session("kept", "kb1.kept", ttl=0.4)  # put again: the idle time starts over
    await asyncio.sleep(0.25)
    assert await b.get_session("kept") == "kb1.kept"


async def test_locks(token_store_factory: TokenStoreFactory) -> None:
    a, b = await token_store_factory(), await token_store_factory()
    token = await a.acquire_lock("refresh:u:srv", ttl=30)
    assert token
    assert await b.acquire_lock("refresh:u:srv", ttl=30) is None
    assert await b.acquire_lock("refresh:u:srv2", ttl=30), "locks are per name"

    await b.release_lock("refresh:u:srv", "not-the-token")
    assert await b.acquire_lock("refresh:u:srv", ttl=30) is None, "a wrong token releases nothing"
    await a.release_lock("refresh:u:srv", token)
    again = await b.acquire_lock("refresh:u:srv", ttl=30)
    assert again and again != token

    short = await a.acquire_lock("short", ttl=0.2)
    assert short and await b.acquire_lock("short", ttl=30) is None
    await asyncio.sleep(0.35)
    taken_over = await b.acquire_lock("short", ttl=30)
    assert taken_over, "an expired lock can be taken"
    await a.release_lock("short", short)
    assert await a.acquire_lock("short", ttl=30) is None, "the old holder cannot release the new one's"


async def test_lock_renewal(token_store_factory: TokenStoreFactory) -> None:
    a, b = await token_store_factory(), await token_store_factory()
    token = await a.acquire_lock("renewed", ttl=0.3)
    assert token and await a.renew_lock("renewed", token, ttl=30)
    await asyncio.sleep(0.5)
    assert await b.acquire_lock("renewed", ttl=30) is None, "a renewed lock outlives its first ttl"
    assert await b.renew_lock("renewed", "not-the-token", ttl=30) is False
    await a.release_lock("renewed", token)
    assert await a.renew_lock("renewed", token, ttl=30) is False, "a released lock is not renewed"

    short = await a.acquire_lock("renewed", ttl=0.2)
    await asyncio.sleep(0.35)
    assert short and await a.renew_lock("renewed", short, ttl=30) is False, "nor an expired one"
    taken = await b.acquire_lock("renewed", ttl=30)
    assert taken and taken != short, "each acquisition has a token of its own"
    assert await a.renew_lock("renewed", short, ttl=30) is False, "nor one someone else took"
    assert await b.renew_lock("renewed", taken, ttl=30) is True


async def test_put_connection_fenced_by_the_connection_lock(token_store_factory: TokenStoreFactory) -> None:
    """The refresh write: the version read and the lock still held, checked in one step."""
    tokens, other = await token_store_factory(), await token_store_factory()
    lock = tokens.connection_lock("u", "srv")
    assert lock != tokens.connection_lock("u", "srv2") and lock != tokens.connection_lock("u2", "srv")
    assert await tokens.put_connection(Connection(user="u", server="srv", sealed="v1", version=1))
    holder = await tokens.acquire_lock(lock, ttl=30)
    assert holder and await other.acquire_lock(lock, ttl=30) is None, "one lock, whoever names it"
    v2 = Connection(user="u", server="srv", sealed="v2", version=2)
    assert not await tokens.put_connection(v2, expected_version=1, lock_token="not-the-token")
    assert not await tokens.put_connection(v2, expected_version=7, lock_token=holder), "the version too"
    assert not await tokens.put_connection(replace(v2, server="srv2"), expected_version=0, lock_token=holder)
    assert (await tokens.get_connection("u", "srv")) == Connection(
        user="u", server="srv", sealed="v1", version=1
    )
    assert await tokens.put_connection(v2, expected_version=1, lock_token=holder)

    await tokens.release_lock(lock, holder)
    v3 = replace(v2, sealed="v3", version=3)
    assert not await tokens.put_connection(v3, expected_version=2, lock_token=holder), "released"
    stale = await tokens.acquire_lock(lock, ttl=0.2)
    await asyncio.sleep(0.35)
    taken = await other.acquire_lock(lock, ttl=30)
    assert stale and taken
    assert not await tokens.put_connection(v3, expected_version=2, lock_token=stale), "expired, taken over"
    assert await other.put_connection(v3, expected_version=2, lock_token=taken)
    assert (await tokens.get_connection("u", "srv")) == v3
    assert [c.server for c in await tokens.list_user_connections("u")] == ["srv"]


async def test_lock_is_exclusive_under_concurrency(token_store_factory: TokenStoreFactory) -> None:
    a, b = await token_store_factory(), await token_store_factory()
    got = await asyncio.gather(*((a if i % 2 else b).acquire_lock("one", ttl=30) for i in range(8)))
    assert sum(1 for t in got if t) == 1


async def test_cache_ttl_and_delete_prefix(tokens: TokenStore) -> None:
    assert await tokens.cache_get("meta:a") is None
    for key in ("meta:a", "meta:b", "metadata", "other:meta:c", "star*1", "starX"):
        await tokens.cache_set(key, f"value of {key}", ttl=30)
    await tokens.cache_set("meta:a", "newer", ttl=30)
    assert await tokens.cache_get("meta:a") == "newer"

    assert await tokens.cache_delete_prefix("meta:") == 2
    assert await tokens.cache_get("meta:a") is None
    assert await tokens.cache_get("metadata") == "value of metadata"
    assert await tokens.cache_get("other:meta:c") == "value of other:meta:c"
    assert await tokens.cache_delete_prefix("star*") == 1, "the prefix is literal, not a pattern"
    assert await tokens.cache_get("starX") == "value of starX"

    await tokens.cache_set("brief", "x", ttl=0.2)
    await asyncio.sleep(0.35)
    assert await tokens.cache_get("brief") is None


# -- TokenStore: events ------------------------------------------------------------


async def test_publish_reaches_another_instance(token_store_factory: TokenStoreFactory) -> None:
    publisher, listener = await token_store_factory(), await token_store_factory()
    received: list[str] = []

    async def listen() -> None:
        async for event in listener.events():
            received.append(event)

    task = asyncio.create_task(listen())
    try:
        # Subscribing takes a moment and pub/sub keeps nothing: knock until heard.
        async with asyncio.timeout(10):
            while not received:
                await publisher.publish("hello")
                await asyncio.sleep(0.1)
            await publisher.publish("servers")
            while "servers" not in received:
                await asyncio.sleep(0.05)
        assert set(received) == {"hello", "servers"}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- Redis specifics: the key layout users see, URLs ----------------------------------


async def test_redis_key_layout(redis_prefix: str) -> None:
    prefix = f"{redis_prefix}:{secrets.token_hex(4)}"
    tokens = RedisTokenStore.from_url(REDIS_URL, prefix=prefix)
    raw = redis.from_url(REDIS_URL, decode_responses=True)
    try:
        c = conn("jo.e@x-y_z", "linear", sealed="s", scopes=("a", "b"), expires_at=5.5, version=3)
        await tokens.put_connection(c)
        fields = await raw.hgetall(f"{prefix}:jo.e@x-y_z:linear:tokens")
        assert fields == {
            "state": "connected", "sealed": "s", "scopes": "a b", "expires_at": "5.5",
            "obtained_at": "0.0", "version": "3",
        }  # fmt: skip
        assert await raw.smembers(f"{prefix}:server:linear:users") == {"jo.e@x-y_z"}
        assert await raw.smembers(f"{prefix}:user:jo.e@x-y_z:servers") == {"linear"}

        await tokens.put_pending("abc", "p", ttl=60)
        assert 0 < await raw.pttl(f"{prefix}:pending:abc") <= 60_000
        await tokens.put_session("h", "s", ttl=60)
        assert 0 < await raw.pttl(f"{prefix}:session:h") <= 60_000
        await tokens.acquire_lock("refresh", ttl=60)
        assert 0 < await raw.pttl(f"{prefix}:lock:refresh") <= 60_000
        await tokens.cache_set("k", "v", ttl=60)
        assert 0 < await raw.pttl(f"{prefix}:cache:k") <= 60_000

        with pytest.raises(InvalidInput, match="':'"):
            await tokens.get_connection("a:b", "linear")
    finally:
        await tokens.close()
        await raw.aclose()


def test_redis_urls_pick_the_right_client() -> None:
    plain = redis_client_from_url("redis://:pw@127.0.0.1:6379/2")
    assert isinstance(plain, redis.Redis)
    assert plain.connection_pool.connection_kwargs["db"] == 2
    assert plain.connection_pool.connection_kwargs["password"] == "pw"

    tls = redis_client_from_url("rediss://127.0.0.1:6380/0?ssl_cert_reqs=none")
    assert isinstance(tls, redis.Redis)
    assert tls.connection_pool.connection_class.__name__ == "SSLConnection"

    sentinel = redis_client_from_url("redis+sentinel://:pw@s1:26379,s2:26380,[::1]/mymaster/3")
    assert isinstance(sentinel.connection_pool, SentinelConnectionPool)
    assert sentinel.connection_pool.service_name == "mymaster"
    assert sentinel.connection_pool.connection_kwargs["db"] == 3
    assert sentinel.connection_pool.connection_kwargs["password"] == "pw"
    hosts = [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in sentinel.connection_pool.sentinel_manager.sentinels
    ]
    assert hosts == [("s1", 26379), ("s2", 26380), ("::1", 26379)]

    cluster = redis_client_from_url("redis+cluster://:pw@n1:7000,n2")
    assert isinstance(cluster, redis.RedisCluster)
    assert sorted(cluster.nodes_manager.startup_nodes) == ["n1:7000", "n2:6379"]

    for bad in ("http://x", "redis+sentinel://h:1", "redis+cluster://h:1/3", "redis+sentinel://h/m?x=1"):
        with pytest.raises(ConfigError):
            redis_client_from_url(bad)


def test_redis_descriptions_never_show_the_password() -> None:
    assert describe_redis_url("redis://:hunter2@h:6390/1") == "h:6390/1"
    assert describe_redis_url("redis+sentinel://:hunter2@a,b:1/m") == "sentinel master m via a:26379,b:1"
    assert describe_redis_url("rediss+cluster://u:hunter2@a:1") == "cluster a:1"


def test_open_picks_the_backend(tmp_path: Path) -> None:
    sqlite_url = f"sqlite:///{tmp_path}/k.db"
    store = open_store(Settings(database_url=sqlite_url))
    assert isinstance(store, SQLiteStore)
    assert isinstance(open_store(sqlite_url), SQLiteStore), "a bare URL still works"
    pg = open_store(Settings(database_url="postgres://u@h/db", postgres_pool_size=3))
    assert isinstance(pg, PostgresStore) and pg.pool_size == 3 and pg.statement_cache
    pg = open_store(Settings(database_url="postgresql://u@h/db", postgres_statement_cache=False))
    assert isinstance(pg, PostgresStore) and not pg.statement_cache
    with pytest.raises(ConfigError, match="database_url"):
        open_store(Settings(database_url="mysql://h/db"))

    assert open_token_store(Settings(database_url=sqlite_url), store) is store
    assert isinstance(open_token_store(Settings(database_url=sqlite_url)), SQLiteStore)
    with_redis = Settings(database_url="postgresql://h/db", redis_url=REDIS_URL, redis_prefix="p")
    redis_tokens = open_token_store(with_redis)
    assert isinstance(redis_tokens, RedisTokenStore) and redis_tokens.prefix == "p"
    with pytest.raises(ConfigError, match="KEYBEARER_REDIS_URL"):
        open_token_store(Settings(database_url="postgresql://h/db"))
