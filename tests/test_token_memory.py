"""The OAuth path's in-process token memory (connect/lifecycle.py), on real
token stores (SQLite, Redis): what it remembers, and what it must not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from peers.private_stores import RedisServer
from services import REDIS_URL

from proxy.connect import lifecycle as lifecycle_module
from proxy.connect.lifecycle import MUST_RECONNECT, NeedsConsent, TokenLifecycle, TokenSet, seal
from proxy.crypto import Keyring
from proxy.events import ChangeFeed
from proxy.names import connection_changed, parse_event
from proxy.settings import ServerConfig
from proxy.stores import Connection
from proxy.stores.redis import RedisTokenStore
from proxy.stores.sqlite import SQLiteStore

SKEW = 60.0
SERVER = ServerConfig(id="srv", url="http://127.0.0.1:9/mcp", auth="oauth")


@pytest.fixture
async def parts(tmp_path: Path, salt: str) -> AsyncIterator[tuple[TokenLifecycle, SQLiteStore, Keyring]]:
    store = SQLiteStore(str(tmp_path / "tokens.db"))
    await store.open()
    await store.migrate()
    keyring = Keyring(salt)

    async def refresher(*_: object) -> object:
        raise AssertionError("no refresh is due in these tests")

    yield TokenLifecycle(keyring, store, ChangeFeed(store, store), refresher, SKEW), store, keyring  # type: ignore[arg-type]
    await store.close()


async def store_token(
    store: SQLiteStore, keyring: Keyring, access: str, expires_at: float, version: int
) -> None:
    sealed = seal(keyring, "alice", SERVER.id, TokenSet(access, "refresh-1"))
    # Obtained an hour ago: a long-lived token, whose refresh is due refresh_skew before expiry.
    conn = Connection(user="alice", server=SERVER.id, sealed=sealed, issuer="https://as.test", client_id="c",
                      scopes=("mcp",), expires_at=expires_at, obtained_at=time.time() - 3600,
                      version=version)  # fmt: skip
    await store.put_connection(conn)


async def test_a_token_far_from_its_refresh_is_remembered_until_an_event_names_it(
    parts: tuple[TokenLifecycle, SQLiteStore, Keyring],
) -> None:
    lifecycle, store, keyring = parts
    await store_token(store, keyring, "token-a", time.time() + 3600, 1)
    assert await lifecycle.access_token(SERVER, "alice") == "token-a"
    await store_token(store, keyring, "token-b", time.time() + 3600, 2)
    assert await lifecycle.access_token(SERVER, "alice") == "token-a"  # remembered
    lifecycle.forget("alice", SERVER.id)
    assert await lifecycle.access_token(SERVER, "alice") == "token-b"


async def test_a_token_is_remembered_only_until_its_refresh_is_due(
    parts: tuple[TokenLifecycle, SQLiteStore, Keyring],
) -> None:
    lifecycle, store, keyring = parts
    # Refresh due in half a second: remembering it longer would use it past that point.
    await store_token(store, keyring, "token-a", time.time() + SKEW + 0.5, 1)
    assert await lifecycle.access_token(SERVER, "alice") == "token-a"
    await store_token(store, keyring, "token-b", time.time() + 3600, 2)
    assert await lifecycle.access_token(SERVER, "alice") == "token-a"
    await asyncio.sleep(0.6)
    assert await lifecycle.access_token(SERVER, "alice") == "token-b"


async def test_memory_ends_at_its_maximum_age_even_without_an_event(
    parts: tuple[TokenLifecycle, SQLiteStore, Keyring], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An announcement can be lost; 60 s in production, shortened here.
    monkeypatch.setattr(lifecycle_module, "RECENT_TTL", 0.3)
    lifecycle, store, keyring = parts
    await store_token(store, keyring, "token-a", time.time() + 3600, 1)
    assert await lifecycle.access_token(SERVER, "alice") == "token-a"
    await store_token(store, keyring, "token-b", time.time() + 3600, 2)
    assert await lifecycle.access_token(SERVER, "alice") == "token-a"
    await asyncio.sleep(0.4)
    assert await lifecycle.access_token(SERVER, "alice") == "token-b"


@pytest.fixture
async def on_redis(
    redis_prefix: str, salt: str
) -> AsyncIterator[tuple[TokenLifecycle, RedisTokenStore, Keyring]]:
    store = RedisTokenStore.from_url(REDIS_URL, prefix=f"{redis_prefix}-opened")
    keyring = Keyring(salt)

    async def refresher(*_: object) -> object:
        raise AssertionError("a refresh was asked for")

    yield TokenLifecycle(keyring, store, ChangeFeed(store, store), refresher, SKEW), store, keyring  # type: ignore[arg-type]
    await store.delete_connection("alice", SERVER.id)
    await store.close()


async def test_tokens_read_again_unchanged_are_not_decrypted_again(
    on_redis: tuple[TokenLifecycle, RedisTokenStore, Keyring], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every remembered token is read again within RECENT_TTL: with 10,000 users,
    # hundreds of reads a second, nearly all of the very ciphertext opened before.
    monkeypatch.setattr(lifecycle_module, "RECENT_TTL", 0.2)
    lifecycle, store, keyring = on_redis
    opened: list[str] = []
    decrypt = keyring.decrypt
    monkeypatch.setattr(
        keyring,
        "decrypt",
        lambda purpose, token, record: opened.append(token) or decrypt(purpose, token, record),
    )
    await store_token(store, keyring, "token-a", time.time() + 3600, 1)  # type: ignore[arg-type]
    assert await lifecycle.access_token(SERVER, "alice") == "token-a"
    await asyncio.sleep(0.25)  # remembered no longer: read again
    assert await lifecycle.access_token(SERVER, "alice") == "token-a"
    assert len(opened) == 1
    # Sealed anew (a refresh, a reconnect, `keys rotate`), even under the same version: opened.
    await store_token(store, keyring, "token-b", time.time() + 3600, 1)  # type: ignore[arg-type]
    await asyncio.sleep(0.25)
    assert await lifecycle.access_token(SERVER, "alice") == "token-b"
    assert len(opened) == 2


async def opened_token_a(on_redis: tuple[TokenLifecycle, RedisTokenStore, Keyring]) -> Connection:
    """token-a stored and opened (remembered); what the store holds."""
    lifecycle, store, keyring = on_redis
    await store_token(store, keyring, "token-a", time.time() + 3600, 1)  # type: ignore[arg-type]
    assert await lifecycle.access_token(SERVER, "alice") == "token-a"
    stored = await store.get_connection("alice", SERVER.id)
    assert stored is not None
    return stored


async def test_what_a_read_says_besides_the_ciphertext_still_counts(
    on_redis: tuple[TokenLifecycle, RedisTokenStore, Keyring], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle_module, "RECENT_TTL", 0.2)
    lifecycle, store, _ = on_redis
    stored = await opened_token_a(on_redis)
    # The same ciphertext, now due for refresh: the refresh is asked for, as before.
    await store.put_connection(replace(stored, expires_at=time.time() + SKEW / 2, version=2))
    await asyncio.sleep(0.25)
    with pytest.raises(AssertionError, match="refresh was asked for"):
        await lifecycle.access_token(SERVER, "alice")
    # The same ciphertext, marked for reconnect (the provider revoked the grant).
    await store.put_connection(replace(stored, state=MUST_RECONNECT, last_error="revoked", version=3))
    with pytest.raises(NeedsConsent, match="revoked"):
        await lifecycle.access_token(SERVER, "alice")


async def store_users(store: RedisTokenStore, keyring: Keyring, users: list[str]) -> None:
    for user in users:
        sealed = seal(keyring, user, SERVER.id, TokenSet(f"token-{user}", "refresh-1"))
        await store.put_connection(
            Connection(user=user, server=SERVER.id, sealed=sealed, issuer="https://as.test", client_id="c",
                       scopes=("mcp",), expires_at=time.time() + 3600, obtained_at=time.time(), version=1)
        )  # fmt: skip


async def soon(check: Callable[[], bool], within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_a_token_used_near_the_end_of_its_time_is_read_again_in_the_background(
    on_redis: tuple[TokenLifecycle, RedisTokenStore, Keyring], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every use falls in the read-ahead share here: in production, the last quarter.
    monkeypatch.setattr(lifecycle_module, "READ_AHEAD_SHARE", 1.0)
    lifecycle, store, keyring = on_redis
    await store_token(store, keyring, "token-a", time.time() + 3600, 1)  # type: ignore[arg-type]
    assert await lifecycle.access_token(SERVER, "alice") == "token-a"
    # Changed without an announcement (lost, or a replica that died before sending it).
    await store_token(store, keyring, "token-b", time.time() + 3600, 2)  # type: ignore[arg-type]
    # The request is not held up: it gets what is remembered, and the read goes on without it.
    assert lifecycle.remembered(SERVER, "alice") == "token-a"
    assert await soon(lambda: lifecycle.remembered(SERVER, "alice") == "token-b")


async def test_a_read_ahead_that_finds_the_grant_gone_forgets_the_token(
    on_redis: tuple[TokenLifecycle, RedisTokenStore, Keyring], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle_module, "READ_AHEAD_SHARE", 1.0)
    lifecycle, store, _ = on_redis
    stored = await opened_token_a(on_redis)
    await store.put_connection(replace(stored, state=MUST_RECONNECT, last_error="revoked", version=2))
    assert lifecycle.remembered(SERVER, "alice") == "token-a"
    assert await soon(lambda: lifecycle.remembered(SERVER, "alice") is None)
    with pytest.raises(NeedsConsent, match="revoked"):
        await lifecycle.access_token(SERVER, "alice")


async def test_a_read_ahead_the_store_cannot_answer_leaves_the_token_in_use(
    redis_server_factory: Callable[..., RedisServer], salt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle_module, "READ_AHEAD_SHARE", 1.0)
    redis = redis_server_factory()
    store = RedisTokenStore.from_url(redis.url_for(0), prefix="kbahead", timeout=0.3)
    keyring = Keyring(salt)
    lifecycle = TokenLifecycle(keyring, store, None, None, SKEW)  # type: ignore[arg-type]
    try:
        await store_token(store, keyring, "token-a", time.time() + 3600, 1)  # type: ignore[arg-type]
        assert await lifecycle.access_token(SERVER, "alice") == "token-a"
        redis.stop()
        assert lifecycle.remembered(SERVER, "alice") == "token-a"
        assert await soon(lambda: not lifecycle._reads_ahead)  # the read failed
        # An outage within the token's time costs its user nothing.
        assert lifecycle.remembered(SERVER, "alice") == "token-a"
    finally:
        await store.close()


async def test_reads_ahead_asked_for_at_different_moments_share_one_store_call(
    redis_server_factory: Callable[..., RedisServer], salt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nobody waits for a read ahead: they are held for a moment and sent together, and the
    # store's commands counted (on a Redis of the test's own) show one call for all.
    monkeypatch.setattr(lifecycle_module, "READ_AHEAD_SHARE", 1.0)
    redis = redis_server_factory()
    store = RedisTokenStore.from_url(redis.url_for(0), prefix="kbahead")
    keyring = Keyring(salt)
    lifecycle = TokenLifecycle(keyring, store, None, None, SKEW)  # type: ignore[arg-type]
    users = [f"user{i}" for i in range(12)]
    try:
        await store_users(store, keyring, users)
        await asyncio.gather(*(lifecycle.access_token(SERVER, user) for user in users))
        redis.cli("config", "resetstat")
        for user in users:  # one request at a time, each in a turn of the loop of its own
            assert lifecycle.remembered(SERVER, user) == f"token-{user}"
            await asyncio.sleep(0.002)
        assert await soon(lambda: not lifecycle._reads_ahead)
        stats = redis.cli("info", "commandstats")
        assert "cmdstat_evalsha:calls=1," in stats and "cmdstat_hgetall:calls=12," in stats, stats
    finally:
        await store.close()


async def test_reads_ahead_at_once_are_bounded(
    on_redis: tuple[TokenLifecycle, RedisTokenStore, Keyring], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle_module, "READ_AHEAD_SHARE", 1.0)
    monkeypatch.setattr(lifecycle_module, "READS_AHEAD_AT_ONCE", 2)
    lifecycle, store, keyring = on_redis
    users = [f"user{i}" for i in range(5)]
    await store_users(store, keyring, users)
    for user in users:
        assert await lifecycle.access_token(SERVER, user) == f"token-{user}"
    gate, reads = asyncio.Event(), []
    get_connections = store.get_connections

    async def held_read(pairs: list[tuple[str, str]]) -> list[Connection | None]:
        reads.extend(user for user, _ in pairs)
        await gate.wait()
        return await get_connections(pairs)

    monkeypatch.setattr(store, "get_connections", held_read)
    try:
        assert [lifecycle.remembered(SERVER, user) for user in users] == [f"token-{u}" for u in users]
        assert await soon(lambda: len(reads) == 2)
        await asyncio.sleep(0.05)
        assert reads == users[:2]
    finally:
        gate.set()
    assert await soon(lambda: not lifecycle._reads_ahead)
    for user in users:
        await store.delete_connection(user, SERVER.id)


async def test_a_change_on_one_replica_reaches_the_others_memory_at_once(
    redis_prefix: str, salt: str
) -> None:
    keyring = Keyring(salt)
    stores = [RedisTokenStore.from_url(REDIS_URL, prefix=f"{redis_prefix}-memory") for _ in range(2)]
    seen: list[list[str]] = [[], []]

    async def follow(i: int, lifecycle: TokenLifecycle) -> None:
        async for event in stores[i].events():
            seen[i].append(event)
            parsed = parse_event(event)
            if parsed is not None:
                lifecycle.on_event(parsed)

    async def refresher(*_: object) -> object:
        raise AssertionError("no refresh is due")

    for store in stores:
        await store.open()
    a, b = (
        TokenLifecycle(keyring, store, ChangeFeed(store, store), refresher, SKEW)  # type: ignore[arg-type]
        for store in stores
    )
    followers = [asyncio.create_task(follow(0, a)), asyncio.create_task(follow(1, b))]
    try:
        while not (seen[0] and seen[1]):  # both subscribed
            await stores[0].publish("hello")
            await asyncio.sleep(0.05)
        await store_token(stores[0], keyring, "token-a", time.time() + 3600, 1)
        assert await b.access_token(SERVER, "alice") == "token-a"  # b remembers it now
        # Replica a disconnects the user: b must stop at once, not at its memory's maximum age.
        await stores[0].delete_connection("alice", SERVER.id)
        await a.changed("alice", SERVER.id)
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            try:
                await b.access_token(SERVER, "alice")
            except NeedsConsent:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("replica b kept using a deleted connection's token")
        assert connection_changed(SERVER.id, "alice") in seen[1]
    finally:
        for task in followers:
            task.cancel()
        for store in stores:
            await store.close()


async def test_a_read_answered_before_a_change_but_heard_after_its_event_is_not_remembered(
    redis_server_factory: Callable[..., RedisServer], salt: str
) -> None:
    # The read and the event travel on different connections: Redis can answer the
    # read, the other replica delete and announce, and this one hear the event
    # first. The read is still used by the request that made it, but remembered,
    # it would keep a deleted connection in use for up to RECENT_TTL.
    redis = redis_server_factory()
    store = RedisTokenStore.from_url(redis.url_for(0), prefix="kbmem")
    keyring = Keyring(salt)
    lifecycle = TokenLifecycle(keyring, store, None, None, SKEW)  # type: ignore[arg-type]
    try:
        await store_token(store, keyring, "token-a", time.time() + 3600, 1)  # type: ignore[arg-type]
        assert await store.get_connection("alice", SERVER.id) is not None  # a pooled connection, open
        with redis.frozen():
            reading = asyncio.create_task(lifecycle.access_token(SERVER, "alice"))
            await asyncio.sleep(0.2)  # the read is sent, and waits in Redis
        # From here nothing yields to the loop until the event is handled: Redis answers the
        # read with token-a, then the other replica deletes and its event arrives first.
        time.sleep(0.3)
        redis.cli("del", store._tokens("alice", SERVER.id))
        event = parse_event(connection_changed(SERVER.id, "alice"))
        assert event is not None and not reading.done()
        lifecycle.on_event(event)
        assert await reading == "token-a"  # read before the delete: that request uses it
        with pytest.raises(NeedsConsent):
            await lifecycle.access_token(SERVER, "alice")
    finally:
        await store.close()


def test_events_for_every_user_of_a_server_and_resync_clear_the_memory(salt: str) -> None:
    lifecycle = TokenLifecycle(Keyring(salt), None, None, None, SKEW)  # type: ignore[arg-type]
    lifecycle._recent = {
        ("alice", "srv"): (1e12, "t1"),
        ("bob", "srv"): (1e12, "t2"),
        ("alice", "other"): (1e12, "t3"),
    }
    for event, left in (
        (connection_changed("srv", "alice"), {("bob", "srv"), ("alice", "other")}),
        (connection_changed("srv"), {("alice", "other")}),
        ("servers", {("alice", "other")}),
        ("resync", set()),
    ):
        parsed = parse_event(event)
        assert parsed is not None
        lifecycle.on_event(parsed)
        assert set(lifecycle._recent) == left, event
    assert lifecycle._recent == {}
