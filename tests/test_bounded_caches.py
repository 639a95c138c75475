"""Every in-process cache keyed by what callers choose holds at most its limit:
memory stays flat however many users, hosts, servers or files pass through."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from proxy import legacy_sse, registry, web_origin
from proxy.bounded import BoundedMap
from proxy.connect import clients, lifecycle
from proxy.connect.clients import OAuthClients, _discovery_to_json, discovery_cache_key
from proxy.connect.lifecycle import TokenLifecycle, TokenSet, seal
from proxy.credentials import Credential, api_key
from proxy.crypto import Keyring
from proxy.oauth.discovery import AuthServer, Discovery
from proxy.registry import Registry
from proxy.settings import ServerConfig, Settings
from proxy.stores import Connection
from proxy.stores.sqlite import SQLiteStore


def test_the_least_recently_used_entry_goes_first() -> None:
    cache: BoundedMap[str, int] = BoundedMap(3)
    for i, key in enumerate("abc"):
        cache[key] = i
    assert cache.get("a") == 0  # used: now the most recent
    cache["d"] = 3
    assert list(cache) == ["c", "a", "d"]
    cache["c"] = 9  # rewritten: most recent too
    cache["e"] = 4
    assert list(cache) == ["d", "c", "e"] and len(cache) == 3
    assert cache.pop("d") == 3 and "d" not in cache and cache.get("zz") is None


def test_judged_host_names_are_bounded() -> None:
    guard = web_origin.WebOriginGuard("https://proxy.example", [], [])
    for i in range(web_origin.MAX_JUDGED * 3):
        guard.refusal([(b"host", f"h{i}.example".encode())])
    assert len(guard._judged) == web_origin.MAX_JUDGED
    assert guard.refusal([(b"host", b"proxy.example")]) is None


def test_announced_paths_are_bounded() -> None:
    announced = legacy_sse.AnnouncedPaths()
    servers = [
        ServerConfig(id=f"s{i}", url=f"http://127.0.0.1:9/{i}/sse", auth="none")
        for i in range(legacy_sse.MAX_ANNOUNCING_SERVERS + 50)
    ]
    for server in servers:
        announced.note(server, "/messages")
    assert len(announced._paths) == legacy_sse.MAX_ANNOUNCING_SERVERS
    assert announced.get(servers[-1]) == {"/messages"}
    assert announced.get(servers[0]) == frozenset()  # dropped: announced again on its next stream


def test_key_files_read_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Smaller than the real limit: every key read is registered for log redaction, which
    # grows with the keys; the mechanism is the same.
    monkeypatch.setattr(registry, "MAX_KEY_FILES", 50)
    keys = Registry({}, None, None)  # type: ignore[arg-type]
    for i in range(70):
        path = tmp_path / f"key{i}"
        path.write_text(f"key-file-secret-{i}\n")
        server = ServerConfig(
            id=f"s{i}", url="http://127.0.0.1:9/mcp", auth="api_key", api_key_file=str(path)
        )
        assert keys.api_key(server) == f"key-file-secret-{i}"
    assert len(keys._file_keys) == 50


async def test_api_key_credentials_made_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_key, "MAX_SERVERS", 50)
    monkeypatch.setenv("BOUNDED_TEST_KEY", "bounded-test-key-0123")
    source = api_key.ApiKeys(Registry({}, None, None))  # type: ignore[arg-type]
    for i in range(70):
        server = ServerConfig(
            id=f"s{i}", url="http://127.0.0.1:9/mcp", auth="api_key", api_key_env="BOUNDED_TEST_KEY"
        )
        made = await source.credential(server, "alice", None)
        assert made == Credential(b"authorization", b"Bearer bounded-test-key-0123")
    assert len(source._made) == 50


@pytest.fixture
async def sqlite(tmp_path: Path) -> SQLiteStore:
    store = SQLiteStore(str(tmp_path / "tokens.db"))
    await store.open()
    await store.migrate()
    return store


async def test_discoveries_kept_in_memory_are_bounded(
    sqlite: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clients, "MAX_DISCOVERIES", 50)  # 4,096 takes seconds of SQLite writes
    found = Discovery(
        "http://127.0.0.1:9/mcp",
        None,
        AuthServer("https://as.example", "https://as.example/a", "https://as.example/t"),
    )
    oauth = OAuthClients(Settings(), None, None, sqlite, None, None)  # type: ignore[arg-type]
    try:
        for i in range(70):
            server = ServerConfig(id=f"s{i}", url="http://127.0.0.1:9/mcp", auth="oauth")
            # Found by another replica: read from the token store, kept in memory.
            await sqlite.cache_set(discovery_cache_key(server), _discovery_to_json(found), 3600)
            assert await oauth.discovery(server) == found
        assert len(oauth._discoveries) == 50
    finally:
        await sqlite.close()


async def connect_users(sqlite: SQLiteStore, keyring: Keyring, server: ServerConfig, count: int) -> list[str]:
    """user0… connected to `server`, each with the access token token-<i>."""
    users = [f"user{i}" for i in range(count)]
    for i, user in enumerate(users):
        sealed = seal(keyring, user, server.id, TokenSet(f"token-{i}", "refresh"))
        await sqlite.put_connection(Connection(
            user=user, server=server.id, sealed=sealed, issuer="https://as.example", client_id="c",
            expires_at=time.time() + 3600, obtained_at=time.time(), version=1,
        ))  # fmt: skip
    return users


async def test_remembered_tokens_are_bounded(
    sqlite: SQLiteStore, salt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real limit (50,000) takes a minute of SQLite writes; the mechanism is the same.
    monkeypatch.setattr(lifecycle, "RECENT_MAX", 100)
    keyring = Keyring(salt)
    server = ServerConfig(id="srv", url="http://127.0.0.1:9/mcp", auth="oauth")
    tokens = TokenLifecycle(keyring, sqlite, None, None, 60.0)  # type: ignore[arg-type]
    try:
        for i, user in enumerate(await connect_users(sqlite, keyring, server, 250)):
            assert await tokens.access_token(server, user) == f"token-{i}"
        assert len(tokens._recent) == 100
        assert ("user249", "srv") in tokens._recent and ("user0", "srv") not in tokens._recent
    finally:
        await sqlite.close()


async def test_tokens_opened_together_are_not_all_read_again_together(sqlite: SQLiteStore, salt: str) -> None:
    # 10,000 users back after a restart open their tokens within seconds: kept for
    # the same RECENT_TTL, every one of them went back to the store in the same
    # second a minute later (a third of the requests read Redis, in make bench).
    keyring = Keyring(salt)
    server = ServerConfig(id="srv", url="http://127.0.0.1:9/mcp", auth="oauth")
    tokens = TokenLifecycle(keyring, sqlite, None, None, 60.0)  # type: ignore[arg-type]
    try:
        for user in await connect_users(sqlite, keyring, server, 200):
            await tokens.access_token(server, user)
        until = sorted(tokens._recent[key][0] for key in list(tokens._recent))
        now = time.monotonic()
        assert until[0] - now >= lifecycle.RECENT_TTL / 2 - 5  # kept at least half of it
        assert until[-1] - now <= lifecycle.RECENT_TTL
        assert until[-1] - until[0] >= lifecycle.RECENT_TTL / 4  # spread over 15 s and more
    finally:
        await sqlite.close()
