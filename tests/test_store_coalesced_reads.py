"""Connection reads asked for in the same turn of the event loop share one Redis
round trip (stores/coalesce.py), on a private redis-server whose command counts
are this test's alone: fewer round trips, and nothing else changes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from peers.private_stores import RedisServer

from proxy.stores import Connection, StoreUnavailable
from proxy.stores.redis import RedisTokenStore

DEADLINE = 1.5
MARGIN = 1.5
USERS = [f"user{i}" for i in range(16)]


def written(i: int) -> Connection:
    return Connection(user=USERS[i], server="srv", sealed=f"sealed-{USERS[i]}", issuer="https://as.example",
                      client_id="c", scopes=("mcp", "read"), expires_at=1_760_000_000.25 + i,
                      obtained_at=1_759_990_000.5, version=i + 1)  # fmt: skip


WRITTEN = {user: written(i) for i, user in enumerate(USERS)}


@pytest.fixture
async def redis(
    redis_server_factory: Callable[..., RedisServer],
) -> AsyncIterator[tuple[RedisServer, RedisTokenStore]]:
    server = redis_server_factory()
    store = RedisTokenStore.from_url(server.url, prefix="kbco", timeout=DEADLINE)
    for written in WRITTEN.values():
        await store.put_connection(written)
    yield server, store
    await store.close()


def calls(server: RedisServer) -> dict[str, int]:
    stats = server.cli("info", "commandstats").splitlines()
    return {
        line.split(":")[0].removeprefix("cmdstat_"): int(line.split("calls=")[1].split(",")[0])
        for line in stats
        if line.startswith("cmdstat_") and not line.startswith(("cmdstat_info:", "cmdstat_config|resetstat:"))
    }


async def test_reads_asked_together_share_one_round_trip(redis: tuple[RedisServer, RedisTokenStore]) -> None:
    # A wave of remembered tokens running out: each read alone cost a round trip's
    # CPU (redis-py's layers, a task, two system calls), most of a token reread's.
    server, store = redis
    await asyncio.gather(*(store.get_connection(u, "srv") for u in USERS[:2]))  # the script loaded
    server.cli("config", "resetstat")
    found = await asyncio.gather(*(store.get_connection(user, "srv") for user in [*USERS, "nobody", "user3"]))
    assert found == [*WRITTEN.values(), None, WRITTEN["user3"]]
    counted = calls(server)
    # One command sent; Redis counts the HGETALLs it ran inside it too.
    assert counted == {"evalsha": 1, "hgetall": 18}, counted
    # Alone in its turn, a read is one HGETALL, as before.
    assert (await store.get_connection("user1", "srv")) is not None
    assert calls(server) == {"evalsha": 1, "hgetall": 19}


async def test_a_read_asked_after_a_write_sees_it(redis: tuple[RedisServer, RedisTokenStore]) -> None:
    # Never answered by a call sent before it was asked: that one may predate the write.
    server, store = redis
    await store.get_connection("user0", "srv")
    with server.frozen():
        sent = asyncio.create_task(store.get_connection("user0", "srv"))
        await asyncio.sleep(0.2)  # sent, and waiting in Redis
    server.cli(
        "hset", store._tokens("user0", "srv"), "sealed", "rewritten"
    )  # after the read, before its answer
    after = await store.get_connection("user0", "srv")
    assert after is not None and after.sealed == "rewritten"
    assert (await sent) is not None


async def test_a_reader_that_gives_up_does_not_end_the_others_read(
    redis: tuple[RedisServer, RedisTokenStore],
) -> None:
    server, store = redis
    await store.get_connection("user0", "srv")
    with server.frozen():
        readers = [asyncio.create_task(store.get_connection(user, "srv")) for user in USERS[:4]]
        await asyncio.sleep(0.2)
        readers[0].cancel()  # its agent went away
    found = await asyncio.gather(*readers[1:])
    assert [c.sealed if c else None for c in found] == [f"sealed-{u}" for u in USERS[1:4]]
    assert readers[0].cancelled()


async def test_reads_together_fail_at_the_deadline_and_recover(
    redis: tuple[RedisServer, RedisTokenStore],
) -> None:
    server, store = redis
    await store.get_connection("user0", "srv")
    with server.frozen():
        started = time.monotonic()
        results = await asyncio.gather(
            *(store.get_connection(u, "srv") for u in USERS), return_exceptions=True
        )
        took = time.monotonic() - started
    assert all(
        isinstance(r, StoreUnavailable) and f"no answer within {DEADLINE:g} s" in str(r) for r in results
    )
    assert took < DEADLINE + MARGIN
    server.kill()
    results = await asyncio.gather(*(store.get_connection(u, "srv") for u in USERS), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    server.start()
    found = await asyncio.gather(*(store.get_connection(u, "srv") for u in USERS))
    assert [c.sealed if c else None for c in found] == [None] * len(
        USERS
    )  # not persistent: gone with the restart
