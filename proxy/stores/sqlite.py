"""The embedded store: one SQLite file, for a single process.

sqlite3 is synchronous; every call runs in a worker thread behind one lock.
Nothing here is on the forwarding path: the registry caches what it reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from proxy.settings import ServerConfig, parse_server
from proxy.stores.base import Store, StoreUnavailable, migrations

T = TypeVar("T")


class SQLiteStore(Store):
    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        # sqlite:///relative/file.db and sqlite:////absolute/file.db, as SQLAlchemy spells them.
        parts = urlsplit(url)
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path or parts.netloc:
            raise ValueError(f"database_url {url!r}: write sqlite:///relative.db or sqlite:////absolute.db")
        return cls(path)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            return db

        try:
            self._db = await asyncio.to_thread(connect)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite file {self.path}: {exc}") from None
        # The file holds sealed secrets: keep it to its owner.
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise StoreUnavailable("the SQLite store is not open")
        db = self._db
        async with self._lock:
            try:
                return await asyncio.to_thread(fn, db)
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"SQLite file {self.path}: {exc}") from None

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def migrate(self) -> list[str]:
        def apply(db: sqlite3.Connection) -> list[str]:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, applied_at REAL)"
            )
            # BEGIN IMMEDIATE takes the write lock, so two processes starting
            # at once apply each migration exactly once.
            db.execute("BEGIN IMMEDIATE")
            try:
                done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
                applied = []
                for version, sql in migrations("sqlite"):
                    if version in done:
                        continue
                    for statement in _statements(sql):
                        db.execute(statement)
                    db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))
                    applied.append(version)
                db.execute("COMMIT")
                return applied
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(apply)

    async def changes(self) -> int:
        # data_version moves when another connection commits; our own writes
        # are applied to the caller's cache directly.
        return await self._run(lambda db: db.execute("PRAGMA data_version").fetchone()[0])

    async def list_servers(self) -> list[ServerConfig]:
        rows = await self._run(
            lambda db: db.execute("SELECT id, definition FROM servers ORDER BY id").fetchall()
        )
        return [_server(sid, definition) for sid, definition in rows]

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
            db.execute("BEGIN")
            deleted = db.execute("DELETE FROM servers WHERE id = ?", (server_id,)).rowcount
            db.execute(
                "DELETE FROM secrets WHERE name = ? OR substr(name, 1, ?) = ?",
                (server_id, len(server_id) + 1, server_id + "|"),
            )
            db.execute("COMMIT")
            return deleted > 0

        return await self._run(delete)

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
        return count > 0

    async def list_secrets(self) -> list[tuple[str, str, str]]:
        rows: list[Any] = await self._run(
            lambda db: db.execute("SELECT kind, name, ciphertext FROM secrets ORDER BY kind, name").fetchall()
        )
        return [tuple(r) for r in rows]


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [s for s in "\n".join(lines).split(";") if s.strip()]


def _server(server_id: str, definition: str) -> ServerConfig:
    return parse_server(server_id, json.loads(definition), key=f"store:servers.{server_id}", source="store")
