"""The embedded store: one SQLite file, for a single process.

sqlite3 is synchronous; every call runs in a worker thread behind one lock.
Nothing here is on the forwarding path: the registry caches what it reads.

`SQLiteStore` is both the `Store` and the `TokenStore` of the embedded
deployment, on one connection: token writes then do not move the
`PRAGMA data_version` that `changes()` reports (it moves only for other
connections' commits), so refreshing a token does not reload the registry.
`open()`/`close()` are counted, so the same object can be opened as both.

Expiring rows (pending, sessions, locks, cache) are ignored once expired and purged on
later writes. `events()` polls an `events` table, so a `publish` from the CLI
reaches a running server on the same file within `event_poll_interval`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from proxy.names import SERVER_SECRET_KINDS
from proxy.settings import ConfigError, ServerConfig
from proxy.stores.base import (
    Connection,
    SchemaStatus,
    Store,
    StoreUnavailable,
    TokenStore,
    migrations,
    schema_status,
    stored_servers,
)

T = TypeVar("T")

# Events are a wake-up signal, not a log: keep them long enough for a slow poller.
EVENT_RETENTION = 600.0
_SELECT_CONNECTION = (
    "SELECT user, server, state, sealed, issuer, client_id, scopes, expires_at, obtained_at, last_error, "
    "refreshable, version FROM connections WHERE user = ? AND server = ?"
)
_SELECT_SERVER_CONNECTIONS = (
    "SELECT user, server, state, sealed, issuer, client_id, scopes, expires_at, obtained_at, last_error, "
    "refreshable, version FROM connections WHERE server = ? ORDER BY user"
)
_SELECT_USER_CONNECTIONS = (
    "SELECT user, server, state, sealed, issuer, client_id, scopes, expires_at, obtained_at, last_error, "
    "refreshable, version FROM connections WHERE user = ? ORDER BY server"
)
_PUT_CONNECTION = (
    "INSERT OR REPLACE INTO connections (user, server, state, sealed, issuer, client_id, scopes, "
    "expires_at, obtained_at, last_error, refreshable, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class SQLiteStore(Store, TokenStore):
    embedded = True
    # Reading PRAGMA data_version costs nothing: look often.
    poll_interval = 1.0

    def __init__(self, path: str, *, event_poll_interval: float = 0.5) -> None:
        self.path = path
        self.event_poll_interval = event_poll_interval
        self._db: sqlite3.Connection | None = None
        self._opened = 0
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        return cls(sqlite_path(url))

    async def open(self) -> None:
        self._opened += 1
        if self._db is not None:
            return

        def connect() -> sqlite3.Connection:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            return db

        try:
            self._db = await asyncio.to_thread(connect)
        except sqlite3.Error as exc:
            self._opened -= 1
            raise StoreUnavailable(f"cannot open SQLite file {self.path}: {exc}") from None
        # The file holds sealed secrets: keep it to its owner.
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        self._opened = max(0, self._opened - 1)
        if self._opened == 0 and self._db is not None:
            db, self._db = self._db, None
            async with self._lock:
                await asyncio.to_thread(db.close)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise StoreUnavailable(f"the SQLite store ({self.path}) is not open")
        db = self._db
        async with self._lock:
            try:
                return await asyncio.to_thread(fn, db)
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"SQLite file {self.path}: {exc}") from None

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(lambda db: _transaction(db, lambda: fn(db)))

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def migrate(self) -> list[str]:
        return await self._run(_migrate)

    async def schema_status(self) -> SchemaStatus:
        return schema_status("sqlite", await self._run(_applied_migrations))

    async def changes(self) -> int:
        # data_version moves when another connection commits; our own writes
        # are applied to the caller's cache directly.
        return await self._run(lambda db: db.execute("PRAGMA data_version").fetchone()[0])

    # -- servers and secrets -------------------------------------------------------

    async def list_servers(self) -> list[ServerConfig]:
        rows = await self._run(
            lambda db: db.execute("SELECT id, definition FROM servers ORDER BY id").fetchall()
        )
        return stored_servers(rows)

    async def put_server(self, server: ServerConfig) -> None:
        definition = json.dumps(server.to_dict())
        now = time.time()
        await self._run(
            lambda db: db.execute(
                "INSERT INTO servers VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE "
                "SET definition = excluded.definition, updated_at = excluded.updated_at",
                (server.id, definition, now, now),
            )
        )

    async def delete_server(self, server_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            deleted = db.execute("DELETE FROM servers WHERE id = ?", (server_id,)).rowcount
            kinds = ", ".join("?" * len(SERVER_SECRET_KINDS))
            db.execute(
                f"DELETE FROM secrets WHERE kind IN ({kinds}) AND (name = ? OR substr(name, 1, ?) = ?)",  # noqa: S608 (placeholders only)
                (*SERVER_SECRET_KINDS, server_id, len(server_id) + 1, server_id + "|"),
            )
            return bool(deleted > 0)

        return await self._write(delete)

    async def get_secret(self, kind: str, name: str) -> str | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT ciphertext FROM secrets WHERE kind = ? AND name = ?", (kind, name)
            ).fetchone()
        )
        return row[0] if row else None

    async def set_secret(self, kind: str, name: str, ciphertext: str) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO secrets VALUES (?, ?, ?, ?) ON CONFLICT(kind, name) DO UPDATE "
                "SET ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
                (kind, name, ciphertext, time.time()),
            )
        )

    async def delete_secret(self, kind: str, name: str) -> bool:
        count = await self._run(
            lambda db: db.execute("DELETE FROM secrets WHERE kind = ? AND name = ?", (kind, name)).rowcount
        )
        return bool(count > 0)

    async def replace_secret(self, kind: str, name: str, expected: str, ciphertext: str) -> bool:
        count = await self._run(
            lambda db: (
                db.execute(
                    "UPDATE secrets SET ciphertext = ?, updated_at = ? "
                    "WHERE kind = ? AND name = ? AND ciphertext = ?",
                    (ciphertext, time.time(), kind, name, expected),
                ).rowcount
            )
        )
        return bool(count > 0)

    async def list_secrets(self) -> list[tuple[str, str, str]]:
        rows: list[Any] = await self._run(
            lambda db: db.execute("SELECT kind, name, ciphertext FROM secrets ORDER BY kind, name").fetchall()
        )
        return [tuple(r) for r in rows]

    # -- per-user connections ------------------------------------------------------

    async def get_connection(self, user: str, server: str) -> Connection | None:
        row = await self._run(
            lambda db: db.execute(
                _SELECT_CONNECTION,
                (user, server),
            ).fetchone()
        )
        return _connection(row) if row else None

    async def put_connection(
        self, connection: Connection, *, expected_version: int | None = None, lock_token: str | None = None
    ) -> bool:
        c = connection
        lock = self.connection_lock(c.user, c.server)
        values = (
            c.user, c.server, c.state, c.sealed, c.issuer, c.client_id, " ".join(c.scopes),
            c.expires_at, c.obtained_at, c.last_error, int(c.refreshable), c.version,
        )  # fmt: skip

        def put(db: sqlite3.Connection) -> bool:
            if expected_version is not None:
                row = db.execute(
                    "SELECT version FROM connections WHERE user = ? AND server = ?", (c.user, c.server)
                ).fetchone()
                if (row[0] if row else 0) != expected_version:
                    return False
            if lock_token is not None and not _holds(db, lock, lock_token):
                return False
            db.execute(_PUT_CONNECTION, values)
            return True

        return await self._write(put)

    async def delete_connection(self, user: str, server: str) -> bool:
        count = await self._run(
            lambda db: (
                db.execute("DELETE FROM connections WHERE user = ? AND server = ?", (user, server)).rowcount
            )
        )
        return bool(count > 0)

    async def list_connections(self, server: str) -> list[Connection]:
        rows = await self._run(lambda db: db.execute(_SELECT_SERVER_CONNECTIONS, (server,)).fetchall())
        return [_connection(r) for r in rows]

    async def list_user_connections(self, user: str) -> list[Connection]:
        rows = await self._run(lambda db: db.execute(_SELECT_USER_CONNECTIONS, (user,)).fetchall())
        return [_connection(r) for r in rows]

    async def delete_server_connections(self, server: str) -> int:
        count: int = await self._run(
            lambda db: db.execute("DELETE FROM connections WHERE server = ?", (server,)).rowcount
        )
        return count

    # -- pending authorizations, locks, cache --------------------------------------

    async def put_pending(self, key: str, sealed: str, ttl: float) -> None:
        def put(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute("DELETE FROM pending WHERE expires_at <= ?", (now,))
            db.execute("INSERT OR REPLACE INTO pending VALUES (?, ?, ?)", (key, sealed, now + ttl))

        await self._write(put)

    async def take_pending(self, key: str) -> str | None:
        row = await self._run(
            lambda db: db.execute(
                "DELETE FROM pending WHERE key = ? RETURNING sealed, expires_at", (key,)
            ).fetchone()
        )
        if row is None or row[1] <= time.time():
            return None
        return str(row[0])

    async def put_session(self, key: str, sealed: str, ttl: float) -> None:
        def put(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)", (key, sealed, now + ttl))

        await self._write(put)

    async def get_session(self, key: str) -> str | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT sealed FROM sessions WHERE key = ? AND expires_at > ?", (key, time.time())
            ).fetchone()
        )
        return str(row[0]) if row else None

    async def delete_session(self, key: str) -> bool:
        count: int = await self._run(
            lambda db: (
                db.execute(
                    "DELETE FROM sessions WHERE key = ? AND expires_at > ?", (key, time.time())
                ).rowcount
            )
        )
        return count > 0

    async def acquire_lock(self, name: str, ttl: float) -> str | None:
        token = secrets.token_urlsafe(16)
        now = time.time()
        # One statement: insert, or take over a lock whose holder let it expire.
        count = await self._run(
            lambda db: (
                db.execute(
                    "INSERT INTO locks VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE "
                    "SET token = excluded.token, expires_at = excluded.expires_at WHERE locks.expires_at <= ?",
                    (name, token, now + ttl, now),
                ).rowcount
            )
        )
        return token if count > 0 else None

    async def renew_lock(self, name: str, token: str, ttl: float) -> bool:
        now = time.time()
        count = await self._run(
            lambda db: (
                db.execute(
                    "UPDATE locks SET expires_at = ? WHERE name = ? AND token = ? AND expires_at > ?",
                    (now + ttl, name, token, now),
                ).rowcount
            )
        )
        return bool(count > 0)

    async def release_lock(self, name: str, token: str) -> None:
        await self._run(
            lambda db: db.execute("DELETE FROM locks WHERE name = ? AND token = ?", (name, token))
        )

    async def cache_get(self, key: str) -> str | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT value FROM cache WHERE key = ? AND expires_at > ?", (key, time.time())
            ).fetchone()
        )
        return str(row[0]) if row else None

    async def cache_set(self, key: str, value: str, ttl: float) -> None:
        def put(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute("DELETE FROM cache WHERE expires_at <= ?", (now,))
            db.execute("INSERT OR REPLACE INTO cache VALUES (?, ?, ?)", (key, value, now + ttl))

        await self._write(put)

    async def cache_delete_prefix(self, prefix: str) -> int:
        count: int = await self._run(
            lambda db: (
                db.execute("DELETE FROM cache WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)).rowcount
            )
        )
        return count

    # -- events ----------------------------------------------------------------------

    async def publish(self, event: str) -> None:
        def put(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute("DELETE FROM events WHERE created_at < ?", (now - EVENT_RETENTION,))
            db.execute("INSERT INTO events (event, created_at) VALUES (?, ?)", (event, now))

        await self._write(put)

    async def events(self) -> AsyncIterator[str]:
        """Polls the events table; ends when the store is closed.

        A busy file (StoreUnavailable) is waited out, never raised.
        """
        last: int | None = None
        while self._db is not None:
            try:
                if last is None:
                    last = await self._run(_last_event_id)
                rows = await self._run(functools.partial(_events_after, last))
            except StoreUnavailable:
                rows = []
            for event_id, event in rows:
                last = event_id
                yield event
            await asyncio.sleep(self.event_poll_interval)


def _holds(db: sqlite3.Connection, name: str, token: str) -> bool:
    row = db.execute(
        "SELECT 1 FROM locks WHERE name = ? AND token = ? AND expires_at > ?", (name, token, time.time())
    ).fetchone()
    return row is not None


def _last_event_id(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])


def _events_after(last: int, db: sqlite3.Connection) -> list[tuple[int, str]]:
    return db.execute("SELECT id, event FROM events WHERE id > ? ORDER BY id", (last,)).fetchall()


def sqlite_path(url: str) -> str:
    # sqlite:///relative/file.db and sqlite:////absolute/file.db, as SQLAlchemy spells them.
    parts = urlsplit(url)
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not path or parts.netloc:
        raise ConfigError("database_url", f"{url!r}: write sqlite:///relative.db or sqlite:////absolute.db")
    return path


def _transaction(db: sqlite3.Connection, fn: Callable[[], T]) -> T:
    # BEGIN IMMEDIATE takes the write lock up front, so a read-compare-write
    # (a conditional put, a migration) cannot interleave with another process.
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result


def _migrate(db: sqlite3.Connection) -> list[str]:
    db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, applied_at REAL)")

    def apply() -> list[str]:
        done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
        applied = []
        for version, sql in migrations("sqlite"):
            if version in done:
                continue
            for statement in _statements(sql):
                db.execute(statement)
            db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))
            applied.append(version)
        return applied

    # Two processes starting at once apply each migration exactly once.
    return _transaction(db, apply)


def _applied_migrations(db: sqlite3.Connection) -> list[str]:
    if not db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone():
        return []
    return [row[0] for row in db.execute("SELECT version FROM schema_migrations")]


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [s for s in "\n".join(lines).split(";") if s.strip()]


def _connection(row: Any) -> Connection:
    (
        user,
        server,
        state,
        sealed,
        issuer,
        client_id,
        scopes,
        expires_at,
        obtained_at,
        last_error,
        refreshable,
        version,
    ) = row
    return Connection(
        user=user,
        server=server,
        state=state,
        sealed=sealed,
        issuer=issuer,
        client_id=client_id,
        scopes=tuple(scopes.split()),
        expires_at=expires_at,
        obtained_at=obtained_at,
        last_error=last_error,
        refreshable=bool(refreshable),
        version=version,
    )
