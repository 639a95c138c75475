"""The shared store: PostgreSQL through an asyncpg pool, for several replicas.

Same tables and behaviour as the SQLite store. What differs is what sharing
needs: `changes()` reads a counter that triggers bump inside every writing
transaction, and `migrate()` serializes replicas on an advisory lock.

Every operation has one deadline (`timeout`, the store_timeout setting)
around all of it: waiting for a pooled connection, connecting, the statement,
the retry after a lost connection. A server that hangs answers
StoreUnavailable as soon as one that is down would, after at most that long.
A connection cut off by the deadline is closed unanswered, and every write runs
in a transaction, so a write cut off before its COMMIT is never applied when
the server moves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

import asyncpg

from proxy.names import SERVER_SECRET_KINDS
from proxy.settings import ServerConfig, Settings
from proxy.stores.base import SchemaStatus, Store, StoreUnavailable, migrations, schema_status, stored_servers

T = TypeVar("T")

# Every replica takes this transaction-level advisory lock before migrating,
# so replicas starting together apply each migration once, one after another.
MIGRATION_LOCK = int.from_bytes(b"kb-migr8", "big")
# Waiting for another replica's migration, or running a long one, may take a while.
MIGRATION_TIMEOUT = 600.0
DEFAULT_TIMEOUT = 3.0

# Raised while connecting: the server is down, unreachable, refuses us, or the
# pool is closed. Any of these means "unavailable", not "bug".
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
# Raised by a query on a connection that went away underneath it.
_LOST_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.InterfaceError,
)
# Raised by a query when the server is there but cannot serve it: a timeout,
# a server starting or stopping, no connection slots left.
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


class _ConnectionLost(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class PostgresStore(Store):
    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        statement_cache: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.url = url
        self.pool_size = max(1, pool_size)
        self.statement_cache = statement_cache
        self.timeout = timeout
        self.where = describe_postgres_url(url)
        self._pool: asyncpg.Pool | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> PostgresStore:
        return cls(
            settings.database_url,
            pool_size=settings.postgres_pool_size,
            statement_cache=settings.postgres_statement_cache,
            timeout=settings.store_timeout,
        )

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.timeout,
                # PgBouncer in transaction mode cannot keep prepared statements.
                statement_cache_size=100 if self.statement_cache else 0,
            )
        except _CONNECT_ERRORS as exc:
            raise self._unavailable("cannot connect to", exc) from None

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                # A graceful close waits for the server; a hung one gets no longer than an operation.
                async with asyncio.timeout(self.timeout):
                    await pool.close()
            except _CONNECT_ERRORS:  # TimeoutError among them
                pool.terminate()

    async def _run(
        self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, deadline: float | None = None
    ) -> T:
        """Run `fn` on a pooled connection within `deadline` (default: the store's
        timeout); a dead or hung server surfaces as StoreUnavailable."""
        seconds = deadline or self.timeout
        limit = asyncio.timeout(seconds)
        try:
            async with limit:
                return await self._run_retrying(fn)
        except TimeoutError:
            if not limit.expired():
                raise
            raise StoreUnavailable(
                f"no answer from PostgreSQL at {self.where} within {seconds:g} s"
            ) from None

    async def _run_retrying(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `fn`, once more on a fresh connection when the first was found dead.

        A connection found dead means the server restarted or dropped us, and
        then the pool's other idle connections are dead too: they are expired
        and `fn` runs once more on a fresh one, so the first calls after a
        restart succeed instead of failing once per pooled connection. Every
        `fn` here is a single statement or a transaction, so running it again
        after a failure is safe; at worst a delete reports False for a row
        the lost attempt already deleted.
        """
        try:
            return await self._attempt(fn)
        except _ConnectionLost:
            if self._pool is not None:
                await self._pool.expire_connections()
        try:
            return await self._attempt(fn)
        except _ConnectionLost as lost:
            raise self._unavailable("lost the connection to", lost.error) from None

    async def _attempt(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        pool = self._pool
        if pool is None:
            raise StoreUnavailable(f"the PostgreSQL store ({self.where}) is not open")
        try:
            conn = await pool.acquire()
        except _CONNECT_ERRORS as exc:
            raise self._unavailable("cannot connect to", exc) from None
        try:
            return await fn(conn)
        except asyncio.CancelledError:
            # Cut off (by the deadline, or the request's end): what the server
            # still owes on this connection would confuse its next user, and
            # waiting for it could take forever. Closing it also rolls back an
            # open transaction.
            conn.terminate()
            raise
        except _LOST_ERRORS as exc:
            raise _ConnectionLost(exc) from None
        except _UNAVAILABLE_ERRORS as exc:
            raise self._unavailable("no answer from", exc) from None
        finally:
            with contextlib.suppress(*_CONNECT_ERRORS):
                await pool.release(conn)

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        reason = str(exc) or type(exc).__name__
        return StoreUnavailable(f"{what} PostgreSQL at {self.where}: {reason}")

    async def _write(
        self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, deadline: float | None = None
    ) -> T:
        """`fn` in a transaction: cut off before its COMMIT, nothing is applied.

        Cut off once a COMMIT was sent (this attempt or a lost one before it),
        the write may or may not be applied: the StoreUnavailable says so
        (`maybe_applied`).
        """
        committing = False

        async def transaction(conn: asyncpg.Connection) -> T:
            nonlocal committing
            tx = conn.transaction()
            await tx.start()
            try:
                result = await fn(conn)
            except asyncio.CancelledError:
                raise  # no ROLLBACK to a server that does not answer: closing the connection is one
            except BaseException:
                await tx.rollback()
                raise
            committing = True
            await tx.commit()
            return result

        try:
            return await self._run(transaction, deadline=deadline)
        except StoreUnavailable as exc:
            exc.maybe_applied = committing
            raise

    async def ping(self) -> None:
        await self._run(lambda c: c.fetchval("SELECT 1"))

    async def migrate(self) -> list[str]:
        async def apply(conn: asyncpg.Connection) -> list[str]:
            # Waits for a replica already migrating; the others then find everything applied.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            applied = []
            for version, sql in migrations("postgres"):
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied.append(version)
            return applied

        return await self._write(apply, deadline=MIGRATION_TIMEOUT)

    async def schema_status(self) -> SchemaStatus:
        async def applied(conn: asyncpg.Connection) -> list[str]:
            if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
                return []
            return [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]

        return schema_status("postgres", await self._run(applied))

    async def changes(self) -> int:
        value = await self._run(lambda c: c.fetchval("SELECT counter FROM store_changes"))
        return int(value)

    async def list_servers(self) -> list[ServerConfig]:
        rows = await self._run(
            lambda c: c.fetch("SELECT id, definition::text AS definition FROM servers ORDER BY id")
        )
        return stored_servers((r["id"], r["definition"]) for r in rows)

    async def put_server(self, server: ServerConfig) -> None:
        definition = json.dumps(server.to_dict())
        await self._write(
            lambda c: c.execute(
                "INSERT INTO servers (id, definition) VALUES ($1, $2::jsonb) ON CONFLICT (id) DO UPDATE "
                "SET definition = excluded.definition, updated_at = now()",
                server.id,
                definition,
            )
        )

    async def delete_server(self, server_id: str) -> bool:
        async def delete(conn: asyncpg.Connection) -> bool:
            status = await conn.execute("DELETE FROM servers WHERE id = $1", server_id)
            # starts_with, not LIKE: a server id may contain '_', a LIKE wildcard.
            await conn.execute(
                "DELETE FROM secrets WHERE kind = ANY($3::text[]) AND (name = $1 OR starts_with(name, $2))",
                server_id,
                server_id + "|",
                list(SERVER_SECRET_KINDS),
            )
            return _count(status) > 0

        return await self._write(delete)

    async def get_secret(self, kind: str, name: str) -> str | None:
        value: str | None = await self._run(
            lambda c: c.fetchval("SELECT ciphertext FROM secrets WHERE kind = $1 AND name = $2", kind, name)
        )
        return value

    async def set_secret(self, kind: str, name: str, ciphertext: str) -> None:
        await self._write(
            lambda c: c.execute(
                "INSERT INTO secrets (kind, name, ciphertext) VALUES ($1, $2, $3) "
                "ON CONFLICT (kind, name) DO UPDATE "
                "SET ciphertext = excluded.ciphertext, updated_at = now()",
                kind,
                name,
                ciphertext,
            )
        )

    async def delete_secret(self, kind: str, name: str) -> bool:
        status = await self._write(
            lambda c: c.execute("DELETE FROM secrets WHERE kind = $1 AND name = $2", kind, name)
        )
        return _count(status) > 0

    async def replace_secret(self, kind: str, name: str, expected: str, ciphertext: str) -> bool:
        status = await self._write(
            lambda c: c.execute(
                "UPDATE secrets SET ciphertext = $4, updated_at = now() "
                "WHERE kind = $1 AND name = $2 AND ciphertext = $3",
                kind,
                name,
                expected,
                ciphertext,
            )
        )
        return _count(status) > 0

    async def list_secrets(self) -> list[tuple[str, str, str]]:
        rows = await self._run(
            lambda c: c.fetch("SELECT kind, name, ciphertext FROM secrets ORDER BY kind, name")
        )
        return [(r["kind"], r["name"], r["ciphertext"]) for r in rows]


def describe_postgres_url(url: str) -> str:
    """host:port/database, for messages: never the password."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2] or "localhost"
        database = parts.path.lstrip("/") or "(default database)"
    except ValueError:
        return "(unparsable database_url)"
    return f"{netloc}/{database}"


def _count(status: str) -> int:
    # asyncpg answers a command with its tag, e.g. "DELETE 1".
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0
