"""The store interface every backend implements.

Stores hold ciphertext only: sealing and opening happen in the layer above
(proxy.registry), so a backend never sees a secret in the clear.
"""

from __future__ import annotations

import abc
import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources

import structlog

from proxy.errors import Unavailable
from proxy.settings import OPERATOR_ONLY_KEYS, ConfigError, ServerConfig, Settings, parse_server

log = structlog.get_logger("keybearer.store")


def stored_servers(rows: Iterable[tuple[str, str]]) -> list[ServerConfig]:
    """Server rows as definitions; a row this version cannot read is skipped and
    logged, so that one bad row does not stop every other server from loading."""
    servers = []
    for server_id, definition in rows:
        try:
            raw = without_operator_keys(server_id, json.loads(definition))
            servers.append(parse_server(server_id, raw, key=f"store:servers.{server_id}", source="store"))
        except (ConfigError, ValueError, TypeError) as exc:
            log.error(
                "stored server skipped",
                server=server_id,
                reason=str(exc),
                fix=f"replace it with `keybearer servers add {server_id} --url ... --auth ...` or "
                f"delete it with `keybearer servers remove {server_id}`",
            )
    return servers


def without_operator_keys(server_id: str, raw: object) -> object:
    """A stored row stripped of the environment and file names only the config
    file may give (rows stored before that rule): the server stays, and stays
    manageable, but nothing of this machine is read for it."""
    if not isinstance(raw, dict):
        return raw
    named = [k for k in OPERATOR_ONLY_KEYS if k in raw]
    if named:
        log.error(
            "stored server names environment variables or files; ignored",
            server=server_id,
            keys=named,
            fix="only the config file may name them: move the server there, or store the secret "
            f"with `keybearer api-key set {server_id}` / `keybearer oauth-client set {server_id}`",
        )
    return {k: v for k, v in raw.items() if k not in OPERATOR_ONLY_KEYS}


class StoreUnavailable(Unavailable):
    """The backing service cannot be reached or did not answer in time: 503, and
    the same request may work later.

    `maybe_applied`: a write was cut off by the deadline after the store may
    have received it, so it may still be carried out. Otherwise nothing was written.
    """

    code = "store_unavailable"

    def __init__(self, message: str, retry_after: int = 5, *, maybe_applied: bool = False) -> None:
        super().__init__(message, retry_after=retry_after)
        self.maybe_applied = maybe_applied


class Store(abc.ABC):
    """Servers added at run time and sealed secrets."""

    # An embedded store belongs to this process alone: it migrates its own schema.
    embedded: bool = False
    # How often to look at `changes()`, the backstop for a missed change event.
    poll_interval: float = 5.0

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable when the backend does not answer."""

    @abc.abstractmethod
    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the names applied."""

    @abc.abstractmethod
    async def schema_status(self) -> SchemaStatus:
        """How the stored schema compares with this version's migrations; changes nothing."""

    @abc.abstractmethod
    async def changes(self) -> int:
        """A number that changes whenever another process wrote to the store."""

    @abc.abstractmethod
    async def list_servers(self) -> list[ServerConfig]: ...

    @abc.abstractmethod
    async def put_server(self, server: ServerConfig) -> None: ...

    @abc.abstractmethod
    async def delete_server(self, server_id: str) -> bool:
        """Delete the server and its secrets (SERVER_SECRET_KINDS) recorded under its id."""

    @abc.abstractmethod
    async def get_secret(self, kind: str, name: str) -> str | None: ...

    @abc.abstractmethod
    async def set_secret(self, kind: str, name: str, ciphertext: str) -> None: ...

    @abc.abstractmethod
    async def delete_secret(self, kind: str, name: str) -> bool: ...

    @abc.abstractmethod
    async def replace_secret(self, kind: str, name: str, expected: str, ciphertext: str) -> bool:
        """Set `ciphertext` only if the stored value is still `expected` (compare-and-set).

        Returns False, changing nothing, when it is not (or the secret is gone):
        key rotation must never overwrite a value a replica wrote meanwhile.
        """

    @abc.abstractmethod
    async def list_secrets(self) -> list[tuple[str, str, str]]:
        """Every (kind, name, ciphertext): what key rotation walks."""


@dataclass(frozen=True)
class SchemaStatus:
    # This version's migrations not applied yet: `keybearer migrate` applies them.
    pending: tuple[str, ...]
    # Applied migrations this version does not know: a newer version migrated the schema.
    unknown: tuple[str, ...]


def schema_status(backend: str, applied: Iterable[str]) -> SchemaStatus:
    known = [version for version, _ in migrations(backend)]
    done = set(applied)
    return SchemaStatus(
        pending=tuple(v for v in known if v not in done),
        unknown=tuple(sorted(done - set(known))),
    )


def migrations(backend: str) -> list[tuple[str, str]]:
    """The versioned SQL files for a backend, in order."""
    folder = resources.files("proxy") / "migrations" / backend
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


def open_store(settings: Settings | str) -> Store:
    """The Store that `database_url` names; not yet opened.

    sqlite:///file.db -> SQLite; postgres:// or postgresql:// -> PostgreSQL.
    A bare URL is accepted too (then the PostgreSQL pool has its defaults).
    """
    if isinstance(settings, str):
        settings = Settings(database_url=settings)
    url = settings.database_url
    scheme = url.partition(":")[0].lower()
    if scheme == "sqlite":
        from proxy.stores.sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if scheme in ("postgres", "postgresql"):
        from proxy.stores.postgres import PostgresStore

        return PostgresStore.from_settings(settings)
    raise ConfigError(
        "database_url", f"must start with sqlite:///, postgres:// or postgresql:// (got scheme {scheme!r})"
    )


def open_token_store(settings: Settings, store: Store | None = None) -> TokenStore:
    """Redis when `redis_url` is set, else the embedded SQLite file; not yet opened.

    Pass the `store` already opened from the same settings: when it is the
    SQLite store of the same file, it is returned and serves both roles.
    """
    if settings.redis_url:
        from proxy.stores.redis import RedisTokenStore

        return RedisTokenStore.from_url(
            settings.redis_url, prefix=settings.redis_prefix, timeout=settings.store_timeout
        )
    scheme = settings.database_url.partition(":")[0].lower()
    if scheme != "sqlite":
        raise ConfigError(
            "redis_url",
            "database_url is PostgreSQL but redis_url is not set: a shared deployment keeps per-user "
            "tokens, pending authorizations and locks in Redis; set KEYBEARER_REDIS_URL",
        )
    from proxy.stores.sqlite import SQLiteStore, sqlite_path

    path = sqlite_path(settings.database_url)
    if isinstance(store, SQLiteStore) and os.path.abspath(store.path) == os.path.abspath(path):
        return store
    return SQLiteStore(path)


@dataclass(frozen=True)
class Connection:
    """One user's connection to one OAuth server.

    Only `sealed` is secret (the token set, encrypted by the layer above); the
    rest is plain so that listings and the connections page need no key.
    """

    user: str
    server: str
    state: str = "connected"  # "connected" | "must_reconnect"
    sealed: str | None = None
    issuer: str | None = None
    client_id: str | None = None
    scopes: tuple[str, ...] = ()
    expires_at: float | None = None  # the access token's; the refresh token has no expiry here
    obtained_at: float = 0.0
    last_error: str | None = None
    # Whether the sealed tokens include a refresh token (plain, for listings).
    refreshable: bool = True
    # Bumped by every write; put_connection(expected_version=…) compares it so
    # that a late or stale writer never overwrites newer tokens.
    version: int = 0


class TokenStore(abc.ABC):
    """Per-user tokens, pending authorizations, browser sessions, locks, caches and change events.

    Shared deployments use Redis; the embedded default keeps them in SQLite.
    """

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable when the backend does not answer."""

    @abc.abstractmethod
    async def get_connection(self, user: str, server: str) -> Connection | None: ...

    async def get_connections(self, pairs: Sequence[tuple[str, str]]) -> list[Connection | None]:
        """Several connections, each a (user, server): in one call, where the backend has one."""
        return list(await asyncio.gather(*(self.get_connection(user, server) for user, server in pairs)))

    @abc.abstractmethod
    async def put_connection(
        self, connection: Connection, *, expected_version: int | None = None, lock_token: str | None = None
    ) -> bool:
        """Store `connection` (its `version` is written as given).

        With `expected_version`, only when the stored version equals it (0 means
        "none stored"); with `lock_token`, only while the connection's lock
        (`connection_lock`) is held with that token: both checked in one atomic
        step. Returns False, changing nothing, when either does not hold.
        """

    @abc.abstractmethod
    async def delete_connection(self, user: str, server: str) -> bool: ...

    @abc.abstractmethod
    async def list_connections(self, server: str) -> list[Connection]: ...

    @abc.abstractmethod
    async def list_user_connections(self, user: str) -> list[Connection]: ...

    @abc.abstractmethod
    async def delete_server_connections(self, server: str) -> int: ...

    @abc.abstractmethod
    async def put_pending(self, key: str, sealed: str, ttl: float) -> None: ...

    @abc.abstractmethod
    async def take_pending(self, key: str) -> str | None:
        """Get and delete in one step: a pending authorization is single-use."""

    @abc.abstractmethod
    async def put_session(self, key: str, sealed: str, ttl: float) -> None:
        """Store or replace a browser session; it is gone after `ttl` seconds unless put again."""

    @abc.abstractmethod
    async def get_session(self, key: str) -> str | None: ...

    @abc.abstractmethod
    async def delete_session(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def acquire_lock(self, name: str, ttl: float) -> str | None:
        """A token proving ownership (a new random one per acquisition), or None
        when someone else holds it."""

    @abc.abstractmethod
    async def renew_lock(self, name: str, token: str, ttl: float) -> bool:
        """Hold the lock `ttl` seconds from now, if it is still held with this
        token; False when it is not (it expired, or someone else took it)."""

    @abc.abstractmethod
    async def release_lock(self, name: str, token: str) -> None:
        """Release only if still held with this token."""

    def connection_lock(self, user: str, server: str) -> str:
        """The name of the lock that guards refreshing one connection; the lock
        `put_connection(lock_token=…)` checks."""
        return f"refresh:{user}:{server}"

    @abc.abstractmethod
    async def cache_get(self, key: str) -> str | None: ...

    @abc.abstractmethod
    async def cache_set(self, key: str, value: str, ttl: float) -> None: ...

    @abc.abstractmethod
    async def cache_delete_prefix(self, prefix: str) -> int: ...

    @abc.abstractmethod
    async def publish(self, event: str) -> None:
        """Tell every replica something changed (e.g. "servers")."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[str]:
        """Change events from every replica, this one included."""
