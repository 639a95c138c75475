"""The OAuth path's second of in-process token memory (oauth/lifecycle.py), on a real
SQLite token store: what it remembers, and what it must not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.crypto import Keyring
from proxy.oauth.lifecycle import RECENT_TTL, Lifecycle, TokenSet, seal
from proxy.settings import ServerConfig
from proxy.stores import Connection
from proxy.stores.sqlite import SQLiteStore

SKEW = 60.0
SERVER = ServerConfig(id="srv", url="http://127.0.0.1:9/mcp", auth="oauth")


@pytest.fixture
async def parts(tmp_path: Path, salt: str) -> AsyncIterator[tuple[Lifecycle, SQLiteStore, Keyring]]:
    store = SQLiteStore(str(tmp_path / "tokens.db"))
    await store.open()
    await store.migrate()
    keyring = Keyring(salt)

    async def refresher(*_: object) -> object:
        raise AssertionError("no refresh is due in these tests")

    yield Lifecycle(keyring, store, SKEW, refresher), store, keyring  # type: ignore[arg-type]
    await store.close()


async def store_token(
    store: SQLiteStore, keyring: Keyring, access: str, expires_at: float, version: int
) -> None:
    sealed = seal(keyring, "alice", SERVER.id, TokenSet(access, "refresh-1"))
    conn = Connection(user="alice", server=SERVER.id, sealed=sealed, issuer="https://as.test", client_id="c",
                      scopes=("mcp",), expires_at=expires_at, obtained_at=time.time(), version=version)  # fmt: skip
    await store.put_connection(conn)


async def test_a_token_far_from_its_refresh_is_remembered_for_a_second(
    parts: tuple[Lifecycle, SQLiteStore, Keyring],
) -> None:
    lifecycle, store, keyring = parts
    await store_token(store, keyring, "token-a", time.time() + 3600, 1)
    assert await lifecycle.access_token(SERVER, "alice") == "token-a"
    await store_token(store, keyring, "token-b", time.time() + 3600, 2)
    assert await lifecycle.access_token(SERVER, "alice") == "token-a"  # remembered
    lifecycle.forget("alice", SERVER.id)
    assert await lifecycle.access_token(SERVER, "alice") == "token-b"


async def test_a_token_whose_refresh_is_due_within_the_second_is_not_remembered(
    parts: tuple[Lifecycle, SQLiteStore, Keyring],
) -> None:
    lifecycle, store, keyring = parts
    # Refresh due in half the memory's lifetime: remembering it would use it past that point.
    await store_token(store, keyring, "token-a", time.time() + SKEW + RECENT_TTL / 2, 1)
    assert await lifecycle.access_token(SERVER, "alice") == "token-a"
    await store_token(store, keyring, "token-b", time.time() + 3600, 2)
    assert await lifecycle.access_token(SERVER, "alice") == "token-b"
