"""Stores whose backend dies and comes back: a private redis-server and PostgreSQL.

While the backend is down every call raises StoreUnavailable (never a raw
redis or asyncpg error) naming the host; after it restarts the same store
object works again, without being re-created.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from peers.private_stores import PostgresServer, RedisServer
from support import free_port

from proxy.settings import parse_server
from proxy.stores import Connection, StoreUnavailable
from proxy.stores.postgres import PostgresStore
from proxy.stores.redis import RESYNC, RedisTokenStore

PASSWORD = "pw-never-in-messages-7f3a"


def assert_unavailable(exc: pytest.ExceptionInfo[StoreUnavailable], where: str) -> None:
    message = str(exc.value)
    assert where in message, message
    assert PASSWORD not in message
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


# -- Redis -------------------------------------------------------------------------


def redis_calls(store: RedisTokenStore) -> dict[str, Callable[[], Awaitable[Any]]]:
    c = Connection(user="u", server="srv", sealed="s", version=1)
    return {
        "ping": store.ping,
        "get_connection": lambda: store.get_connection("u", "srv"),
        "put_connection": lambda: store.put_connection(c),
        "put_connection_cas": lambda: store.put_connection(c, expected_version=1),
        "delete_connection": lambda: store.delete_connection("u", "srv"),
        "list_connections": lambda: store.list_connections("srv"),
        "list_user_connections": lambda: store.list_user_connections("u"),
        "delete_server_connections": lambda: store.delete_server_connections("srv"),
        "put_pending": lambda: store.put_pending("k", "v", 10),
        "take_pending": lambda: store.take_pending("k"),
        "acquire_lock": lambda: store.acquire_lock("l", 10),
        "release_lock": lambda: store.release_lock("l", "t"),
        "cache_get": lambda: store.cache_get("k"),
        "cache_set": lambda: store.cache_set("k", "v", 10),
        "cache_delete_prefix": lambda: store.cache_delete_prefix("k"),
        "publish": lambda: store.publish("servers"),
    }


async def test_redis_down_raises_store_unavailable_then_recovers(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory(args=["--requirepass", PASSWORD])
    store = RedisTokenStore.from_url(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0", prefix="kb")
    await store.open()
    try:
        for call in redis_calls(store).values():
            await call()  # all work while it is up

        server.kill()
        for name, call in redis_calls(store).items():
            with pytest.raises(StoreUnavailable) as exc:
                await call()
            assert_unavailable(exc, f"127.0.0.1:{server.port}")
            assert name and "unavailable" in str(exc.value)

        server.start()  # same port; the store object is not re-created
        for call in redis_calls(store).values():
            await call()
        assert await store.put_connection(Connection(user="u2", server="srv", version=1))
        assert [c.user for c in await store.list_connections("srv")] == ["u2"]
    finally:
        await store.close()


async def test_redis_wrong_password_is_store_unavailable(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory(args=["--requirepass", "the-right-one"])
    store = RedisTokenStore.from_url(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0")
    try:
        with pytest.raises(StoreUnavailable) as exc:
            await store.ping()
        assert_unavailable(exc, f"127.0.0.1:{server.port}")
    finally:
        await store.close()


async def test_rediss_without_the_ca_is_store_unavailable(redis_tls_url: str) -> None:
    store = RedisTokenStore.from_url(redis_tls_url.split("?")[0])
    try:
        with pytest.raises(StoreUnavailable, match="certificate"):
            await store.ping()
    finally:
        await store.close()


async def test_redis_events_wait_out_an_outage(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory()
    url = f"redis://127.0.0.1:{server.port}/0"
    publisher, listener = RedisTokenStore.from_url(url), RedisTokenStore.from_url(url)
    received: list[str] = []

    async def listen() -> None:
        async for event in listener.events():
            received.append(event)

    async def knock_until(heard: str, event: str) -> None:
        async with asyncio.timeout(10):
            while heard not in received:
                await publisher.publish(event)
                await asyncio.sleep(0.05)

    task = asyncio.create_task(listen())
    try:
        await knock_until("before", "before")
        server.kill()
        await asyncio.sleep(0.5)
        assert not task.done(), "events() must wait out the outage, not raise"
        server.start()
        await knock_until("after", "after")
        assert RESYNC in received
        assert received.index(RESYNC) < received.index("after")
    finally:
        await listener.close()
        async with asyncio.timeout(5):
            await task  # close() ends the iteration
        await publisher.close()


# -- PostgreSQL ----------------------------------------------------------------------


@pytest.fixture
async def pg_store(private_postgres: PostgresServer) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(private_postgres.url, pool_size=3, timeout=2)
    await store.open()
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()
        if not private_postgres.running:
            private_postgres.start()  # the next test finds it up


def pg_calls(store: PostgresStore) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "ping": store.ping,
        "changes": store.changes,
        "migrate": store.migrate,
        "list_servers": store.list_servers,
        "put_server": lambda: store.put_server(
            parse_server("srv", {"url": "https://x.example/mcp"}, key="t")
        ),
        "delete_server": lambda: store.delete_server("gone"),
        "get_secret": lambda: store.get_secret("api_key", "srv"),
        "set_secret": lambda: store.set_secret("api_key", "srv", "ct"),
        "replace_secret": lambda: store.replace_secret("api_key", "srv", "ct", "ct"),
        "delete_secret": lambda: store.delete_secret("api_key", "gone"),
        "list_secrets": store.list_secrets,
    }


async def test_postgres_down_raises_store_unavailable_then_recovers(
    private_postgres: PostgresServer, pg_store: PostgresStore
) -> None:
    for call in pg_calls(pg_store).values():
        await call()
    # Hold every pooled connection open across the crash: they all go stale.
    await asyncio.gather(*(pg_store.ping() for _ in range(3)))

    private_postgres.crash()
    for call in pg_calls(pg_store).values():
        with pytest.raises(StoreUnavailable) as exc:
            await call()
        assert_unavailable(exc, f"127.0.0.1:{private_postgres.port}")

    private_postgres.start()
    for call in pg_calls(pg_store).values():
        await call()
    assert [s.id for s in await pg_store.list_servers()] == ["srv"]


async def test_postgres_pool_recovers_from_a_restart_it_never_saw(
    private_postgres: PostgresServer, pg_store: PostgresStore
) -> None:
    # No call while it is down: the pool still holds connections to the old server.
    await asyncio.gather(*(pg_store.ping() for _ in range(3)))
    private_postgres.crash()
    private_postgres.start()
    for call in pg_calls(pg_store).values():
        await call()


async def test_postgres_unreachable_at_open(private_postgres: PostgresServer) -> None:
    port = free_port()
    store = PostgresStore(f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres", timeout=2)
    with pytest.raises(StoreUnavailable) as exc:
        await store.open()
    assert_unavailable(exc, f"127.0.0.1:{port}")


async def test_postgres_closed_store_is_unavailable(pg_store: PostgresStore) -> None:
    await pg_store.close()
    with pytest.raises(StoreUnavailable, match="not open"):
        await pg_store.list_servers()
