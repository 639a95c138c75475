"""Deployments sharing one Redis: each hears only its own events and touches only its own keys.

Two ways to share are supported: distinct prefixes (which cannot nest, since a
prefix never contains ':'), or distinct database numbers. Pub/sub ignores the
database, so the channel names it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as redis
from peers.private_stores import RedisServer

from proxy.settings import ConfigError, load_settings
from proxy.stores import Connection
from proxy.stores.redis import RedisTokenStore


class Listener:
    """A store's events(), collected in the background."""

    def __init__(self, store: RedisTokenStore) -> None:
        self.store = store
        self.heard: list[str] = []
        self.task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        async for event in self.store.events():
            self.heard.append(event)

    async def knock(self, event: str) -> None:
        """Publish `event` until this store hears it itself: then it has gone out to every subscriber."""
        async with asyncio.timeout(10):
            while event not in self.heard:
                await self.store.publish(event)
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.store.close()
        async with asyncio.timeout(5):
            await self.task


@pytest.fixture
async def listeners(
    redis_server_factory: Callable[..., RedisServer],
) -> AsyncIterator[Callable[..., Listener]]:
    server = redis_server_factory()
    made: list[Listener] = []

    def listener(db: int, prefix: str) -> Listener:
        made.append(Listener(RedisTokenStore.from_url(server.url_for(db), prefix=prefix)))
        return made[-1]

    yield listener
    for one in made:
        await one.close()


async def test_same_prefix_on_other_databases_hears_only_its_own_events(
    listeners: Callable[..., Listener],
) -> None:
    a, b = listeners(1, "kbt"), listeners(2, "kbt")
    await a.knock("ready-a")
    await b.knock("ready-b")  # both subscribed now
    await a.knock("servers")
    await b.knock("connection:srv:bob")
    assert "servers" not in b.heard and "ready-a" not in b.heard, b.heard
    assert "connection:srv:bob" not in a.heard and "ready-b" not in a.heard, a.heard


async def test_database_zero_keeps_the_channel_running_replicas_use(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """A rolling update from a version without database channels: on database 0
    (nearly every deployment) old and new replicas still hear each other."""
    server = redis_server_factory()
    store = RedisTokenStore.from_url(server.url, prefix="kbt")
    old = redis.from_url(server.url, decode_responses=True)
    pubsub = old.pubsub()
    try:
        await pubsub.subscribe("kbt:events")
        await pubsub.get_message(timeout=5)  # the subscription's confirmation
        await store.publish("servers")
        message = await pubsub.get_message(timeout=5)
        assert message is not None and message["data"] == "servers", message
    finally:
        await pubsub.aclose()
        await old.aclose()
        await store.close()


@pytest.mark.parametrize("prefix", ["kbt:cache", "kbt:", ":kbt", "mcp:tenant-b"])
def test_a_prefix_with_the_key_separator_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(env={"KEYBEARER_REDIS_PREFIX": prefix})
    message = str(refused.value)
    assert message.startswith("KEYBEARER_REDIS_PREFIX:") and "must not contain ':'" in message, message
    assert "do not nest" in message


async def test_neighbouring_prefixes_do_not_touch_each_other(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """What a nested prefix broke: one tenant clearing its cache and a server's
    connections deleted another's tokens. Prefixes that differ only after what
    the other has in common with them now leave each other alone."""
    server = redis_server_factory()
    a = RedisTokenStore.from_url(server.url, prefix="kbt")
    others = [
        RedisTokenStore.from_url(server.url, prefix=p) for p in ("kbt-cache", "kbt.cache", "kbtcache", "kbt_")
    ]
    try:
        for store in others:
            assert await store.put_connection(Connection(user="alice", server="srv", sealed="s", version=1))
            await store.cache_set("oauth:srv:meta", "kept", 60)
            await store.put_pending("state", "sealed", 60)
        await a.put_connection(Connection(user="alice", server="srv", sealed="s", version=1))
        await a.cache_set("oauth:srv:meta", "gone", 60)

        assert await a.cache_delete_prefix("") == 1
        assert await a.delete_server_connections("srv") == 1
        assert await a.get_connection("alice", "srv") is None
        for store in others:
            assert (await store.get_connection("alice", "srv")) is not None, store.prefix
            assert await store.cache_get("oauth:srv:meta") == "kept", store.prefix
            assert await store.take_pending("state") == "sealed", store.prefix
    finally:
        for store in (a, *others):
            await store.close()
