"""The shared token store: Redis (plain, TLS, Sentinel or Cluster).

Keys, under a configurable prefix (default "mcp"):

    {prefix}:{user}:{server}:tokens     hash: one user's connection to one server
    {prefix}:server:{server}:users      set: users with a connection to the server
    {prefix}:user:{user}:servers        set: servers the user is connected to
    {prefix}:pending:{key}              string with TTL: a pending authorization
    {prefix}:session:{key}              string with TTL: a browser session
    {prefix}:lock:{name}                string with TTL: a lock holder's token
    {prefix}:lock:refresh:{<tokens key>}    the lock guarding a connection's refresh
    {prefix}:cache:{key}                string with TTL
    {prefix}:events                     pub/sub channel (database 0)
    {prefix}:events:db{n}               pub/sub channel (database n > 0)

Pub/sub ignores the database number, so the channel names it: deployments
sharing one Redis on different databases hear only their own events. A prefix
never contains ':' (settings refuse it), so no deployment's keys can fall
under another's, e.g. "kbt:cache:*" under a prefix "kbt:cache".

Every operation has one deadline (`timeout`, the store_timeout setting)
around all of it, redis-py's retries and health checks included: a Redis that
hangs answers StoreUnavailable as soon as one that is down would, after at
most that long.

Every script touches one key, or a connection's hash and its refresh lock,
whose key names the hash in braces (a hash tag: both share a Cluster slot),
so everything works on Redis Cluster, where a script may not span slots. The two sets are an index for listing without
KEYS/SCAN; they are not updated atomically with the token hash (different
slots), and listings skip index entries whose hash is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import structlog
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.errors import InvalidInput
from proxy.names import RESYNC
from proxy.settings import ConfigError
from proxy.stores.base import Connection, StoreUnavailable, TokenStore
from proxy.stores.coalesce import MAX_BATCH, Coalesced

log = structlog.get_logger("keybearer.stores.redis")

RedisClient = Redis | RedisCluster


# Seconds for a whole operation, retries included: an unreachable or hung Redis
# must become a 503 quickly, not hold a request.
DEFAULT_TIMEOUT = 3.0
# Quick retries absorb pooled connections that died with a Redis restart;
# they run inside the operation's deadline.
RETRIES = 2
EVENTS_BACKOFF = (0.1, 5.0)

_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)

# KEYS[1] token hash, KEYS[2] its refresh lock; ARGV[1] expected version or "" for none;
# ARGV[2] the lock token the writer must hold or "" for none; ARGV[3..] field, value, …
_PUT_CONNECTION = """
if ARGV[1] ~= '' and (redis.call('HGET', KEYS[1], 'version') or '0') ~= ARGV[1] then
  return 0
end
if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
return 1
"""
_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS: token hashes, each from a different request (see _read_connections).
_HGETALL_MANY = """
local rows = {}
for i, key in ipairs(KEYS) do
  rows[i] = redis.call('HGETALL', key)
end
return rows
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisTokenStore(TokenStore):
    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "mcp",
        where: str = "Redis",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.where = where
        self.timeout = timeout
        database = _database(client)
        self.channel = f"{prefix}:events" if database == 0 else f"{prefix}:events:db{database}"
        self._closed = False
        self._put_script = client.register_script(_PUT_CONNECTION)
        self._release_script = client.register_script(_RELEASE_LOCK)
        self._renew_script = client.register_script(_RENEW_LOCK)
        self._read_script = client.register_script(_HGETALL_MANY)
        self._reads: Coalesced[str, dict[str, str]] = Coalesced(self._read_connections)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "mcp", timeout: float = DEFAULT_TIMEOUT) -> RedisTokenStore:
        client = redis_client_from_url(url, timeout)
        return cls(client, prefix=prefix, where=describe_redis_url(url), timeout=timeout)

    async def open(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        with contextlib.suppress(*_ERRORS):
            await self.client.aclose()

    @contextlib.asynccontextmanager
    async def _guard(self, doing: str, *, writes: bool = False) -> AsyncIterator[None]:
        """One deadline around the operation; any failure, a hang too, is StoreUnavailable.

        A write that timed out may still be carried out: Redis runs what it
        has read once it moves again.
        """
        deadline = asyncio.timeout(self.timeout)
        try:
            async with deadline:
                yield
        except _ERRORS as exc:
            hung = deadline.expired()
            reason = f"no answer within {self.timeout:g} s" if hung else _reason(exc)
            timed_out = hung or isinstance(exc, (TimeoutError, RedisTimeoutError))
            raise StoreUnavailable(
                f"Redis ({self.where}) unavailable while {doing}: {reason}",
                maybe_applied=writes and timed_out,
            ) from None

    async def ping(self) -> None:
        async with self._guard("pinging"):
            await self.client.ping()

    # -- keys ------------------------------------------------------------------------

    def _tokens(self, user: str, server: str) -> str:
        # ':' separates the key's parts; ids never contain one.
        if ":" in user or ":" in server:
            raise InvalidInput("user and server ids must not contain ':'")
        return f"{self.prefix}:{user}:{server}:tokens"

    def _server_users(self, server: str) -> str:
        return f"{self.prefix}:server:{server}:users"

    def _user_servers(self, user: str) -> str:
        return f"{self.prefix}:user:{user}:servers"

    # -- per-user connections ------------------------------------------------------

    async def get_connection(self, user: str, server: str) -> Connection | None:
        key = self._tokens(user, server)
        async with self._guard("reading a connection"):
            fields = await self._reads.read(key)
        return _decode(user, server, fields) if fields else None

    async def get_connections(self, pairs: Sequence[tuple[str, str]]) -> list[Connection | None]:
        rows: list[dict[str, str]] = []
        async with self._guard("reading connections"):
            for start in range(0, len(pairs), MAX_BATCH):
                rows += await self._read_connections(
                    [self._tokens(*pair) for pair in pairs[start : start + MAX_BATCH]]
                )
        return [
            _decode(user, server, fields) if fields else None
            for (user, server), fields in zip(pairs, rows, strict=True)
        ]

    async def _read_connections(self, keys: list[str]) -> list[dict[str, str]]:
        """The hashes of the connections read in one turn of the loop, in one round trip."""
        # Its own deadline, as the callers have theirs: the call must end even if all gave up.
        async with asyncio.timeout(self.timeout):
            if len(keys) == 1:
                return [_fields(await self.client.hgetall(keys[0]))]
            if isinstance(self.client, RedisCluster):
                # The keys lie in different slots, which one script may not span.
                return await self._hgetall_many(keys)
            rows = await self._read_script(keys=keys)
        return [_pairs(row) for row in rows]

    async def put_connection(
        self, connection: Connection, *, expected_version: int | None = None, lock_token: str | None = None
    ) -> bool:
        key = self._tokens(connection.user, connection.server)
        lock = self._lock(self.connection_lock(connection.user, connection.server))
        # A key that exists is always indexed: index before a write that may
        # create the key; a write expecting a version finds the key indexed.
        creates = expected_version in (None, 0)
        async with self._guard("writing a connection", writes=True):
            if creates:
                await self._index(connection.user, connection.server)
            expected = "" if expected_version is None else str(expected_version)
            written = await self._put_script(
                keys=[key, lock], args=[expected, lock_token or "", *_encode(connection)]
            )
            if written and not creates:
                await self._index(connection.user, connection.server)
        return bool(written)

    async def _index(self, user: str, server: str) -> None:
        await self.client.sadd(self._server_users(server), user)
        await self.client.sadd(self._user_servers(user), server)

    async def delete_connection(self, user: str, server: str) -> bool:
        key = self._tokens(user, server)
        async with self._guard("deleting a connection", writes=True):
            deleted = await self.client.delete(key)
            await self.client.srem(self._server_users(server), user)
            await self.client.srem(self._user_servers(user), server)
        return bool(deleted)

    async def list_connections(self, server: str) -> list[Connection]:
        async with self._guard("listing a server's connections"):
            users = _members(await self.client.smembers(self._server_users(server)))
            rows = await self._hgetall_many([self._tokens(u, server) for u in users])
        return [_decode(u, server, f) for u, f in zip(users, rows, strict=True) if f]

    async def list_user_connections(self, user: str) -> list[Connection]:
        async with self._guard("listing a user's connections"):
            servers = _members(await self.client.smembers(self._user_servers(user)))
            rows = await self._hgetall_many([self._tokens(user, s) for s in servers])
        return [_decode(user, s, f) for s, f in zip(servers, rows, strict=True) if f]

    async def _hgetall_many(self, keys: list[str]) -> list[dict[str, str]]:
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return [_fields(row) for row in await pipe.execute()]

    async def delete_server_connections(self, server: str) -> int:
        index = self._server_users(server)
        deleted = 0
        async with self._guard("deleting a server's connections", writes=True):
            for user in _members(await self.client.smembers(index)):
                deleted += await self.client.delete(self._tokens(user, server))
                await self.client.srem(self._user_servers(user), server)
                # Only the users read: one a concurrent put just added stays indexed.
                await self.client.srem(index, user)
        return deleted

    # -- pending authorizations, locks, cache --------------------------------------

    async def put_pending(self, key: str, sealed: str, ttl: float) -> None:
        async with self._guard("storing a pending authorization", writes=True):
            await self.client.set(f"{self.prefix}:pending:{key}", sealed, px=_ms(ttl))

    async def take_pending(self, key: str) -> str | None:
        async with self._guard("taking a pending authorization", writes=True):
            value = await self.client.getdel(f"{self.prefix}:pending:{key}")
        return _text(value)

    async def put_session(self, key: str, sealed: str, ttl: float) -> None:
        async with self._guard("storing a session", writes=True):
            await self.client.set(f"{self.prefix}:session:{key}", sealed, px=_ms(ttl))

    async def get_session(self, key: str) -> str | None:
        async with self._guard("reading a session"):
            value = await self.client.get(f"{self.prefix}:session:{key}")
        return _text(value)

    async def delete_session(self, key: str) -> bool:
        async with self._guard("ending a session", writes=True):
            deleted: int = await self.client.delete(f"{self.prefix}:session:{key}")
        return deleted > 0

    def _lock(self, name: str) -> str:
        return f"{self.prefix}:lock:{name}"

    def connection_lock(self, user: str, server: str) -> str:
        # The token hash's key as a hash tag: the lock lands in the hash's Cluster
        # slot, so that one script can check both.
        return f"refresh:{{{self._tokens(user, server)}}}"

    async def acquire_lock(self, name: str, ttl: float) -> str | None:
        token = secrets.token_urlsafe(16)
        async with self._guard("taking a lock", writes=True):
            taken = await self.client.set(self._lock(name), token, nx=True, px=_ms(ttl))
        return token if taken else None

    async def renew_lock(self, name: str, token: str, ttl: float) -> bool:
        async with self._guard("renewing a lock", writes=True):
            renewed = await self._renew_script(keys=[self._lock(name)], args=[token, _ms(ttl)])
        return bool(renewed)

    async def release_lock(self, name: str, token: str) -> None:
        async with self._guard("releasing a lock", writes=True):
            await self._release_script(keys=[self._lock(name)], args=[token])

    async def cache_get(self, key: str) -> str | None:
        async with self._guard("reading the cache"):
            value = await self.client.get(f"{self.prefix}:cache:{key}")
        return _text(value)

    async def cache_set(self, key: str, value: str, ttl: float) -> None:
        async with self._guard("writing the cache", writes=True):
            await self.client.set(f"{self.prefix}:cache:{key}", value, px=_ms(ttl))

    async def cache_delete_prefix(self, prefix: str) -> int:
        # SCAN walks the whole keyspace: fine for an admin action, never on the hot path.
        pattern = f"{_glob_escape(f'{self.prefix}:cache:{prefix}')}*"
        deleted = 0
        async with self._guard("clearing the cache", writes=True):
            async for key in self.client.scan_iter(match=pattern, count=500):
                deleted += await self.client.unlink(key)
        return deleted

    # -- events ----------------------------------------------------------------------

    async def publish(self, event: str) -> None:
        async with self._guard("publishing an event", writes=True):
            await self.client.publish(self.channel, event)

    async def events(self) -> AsyncIterator[str]:
        """Every event published on the channel; waits out outages, never raises.

        After re-subscribing following an outage it yields RESYNC, since what
        was published meanwhile is lost. Ends when the store is closed.
        """
        delay, outage = EVENTS_BACKOFF[0], False
        while not self._closed:
            pubsub = None
            try:
                if isinstance(self.client, RedisCluster):
                    # A cluster client learns its slots on its first command; a
                    # pub/sub subscription alone would find none.
                    await self.client.initialize()
                pubsub = self.client.pubsub()
                await pubsub.subscribe(self.channel)
                if outage:
                    log.info("events: subscribed again", redis=self.where)
                    outage, delay = False, EVENTS_BACKOFF[0]
                    yield RESYNC
                while not self._closed:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message and message.get("type") == "message":
                        yield _text(message["data"]) or ""
            except Exception as exc:
                # Not only Redis errors: a listener that dies quietly would
                # leave this replica deaf for good, so every failure is retried.
                if self._closed:
                    return
                if not outage:
                    log.warning(
                        "events: Redis unavailable, retrying",
                        redis=self.where,
                        error=type(exc).__name__,
                        reason=_reason(exc),
                    )
                outage = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, EVENTS_BACKOFF[1])
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()


# -- connection hashes ---------------------------------------------------------------


def _encode(c: Connection) -> list[str]:
    fields: dict[str, str | None] = {
        "state": c.state,
        "sealed": c.sealed,
        "issuer": c.issuer,
        "client_id": c.client_id,
        "scopes": " ".join(c.scopes),
        "expires_at": None if c.expires_at is None else repr(float(c.expires_at)),
        "obtained_at": repr(float(c.obtained_at)),
        "last_error": c.last_error,
        "refreshable": None if c.refreshable else "0",  # absent: refreshable, as before the field
        "version": str(int(c.version)),
    }
    # An absent field is None: HSET cannot store a null.
    return [part for name, value in fields.items() if value is not None for part in (name, value)]


def _decode(user: str, server: str, fields: Mapping[str, str]) -> Connection:
    expires_at = fields.get("expires_at")
    return Connection(
        user=user,
        server=server,
        state=fields.get("state", "connected"),
        sealed=fields.get("sealed"),
        issuer=fields.get("issuer"),
        client_id=fields.get("client_id"),
        scopes=tuple(fields.get("scopes", "").split()),
        expires_at=float(expires_at) if expires_at is not None else None,
        obtained_at=float(fields.get("obtained_at", 0.0)),
        last_error=fields.get("last_error"),
        refreshable=fields.get("refreshable", "1") != "0",
        version=int(fields.get("version", 0)),
    )


def _text(value: bytes | str | None) -> str | None:
    # The clients decode responses; bytes only if one was built without it.
    return value.decode() if isinstance(value, bytes) else value


def _members(values: Iterable[bytes | str]) -> list[str]:
    return sorted(v.decode() if isinstance(v, bytes) else v for v in values)


def _fields(values: Mapping[Any, Any]) -> dict[str, str]:
    if isinstance(values, dict) and all(type(v) is str for v in values.values()):
        return values  # decoded already, as the clients built here do: no copy on every read
    return {str(_text(k)): str(_text(v)) for k, v in values.items()}


def _pairs(values: list[Any]) -> dict[str, str]:
    """A hash as a script returns it: field, value, field, value, …"""
    return _fields(dict(zip(values[::2], values[1::2], strict=True)))


def _ms(ttl: float) -> int:
    return max(1, round(ttl * 1000))


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _database(client: RedisClient) -> int:
    """The database number the client uses (a cluster has only 0)."""
    if isinstance(client, RedisCluster):
        return 0
    return int(client.connection_pool.connection_kwargs.get("db") or 0)


# -- clients from URLs -------------------------------------------------------------------


@dataclass
class RedisTarget:
    """A redis+sentinel:// or redis+cluster:// URL, taken apart."""

    tls: bool
    hosts: list[tuple[str, int]]
    username: str | None = None
    password: str | None = None
    path: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)


_MULTI_HOST_OPTIONS = {"sentinel_username", "sentinel_password", "ssl_ca_certs", "ssl_cert_reqs"}


MAX_CONNECTIONS = 256


def redis_client_from_url(url: str, timeout: float = DEFAULT_TIMEOUT) -> RedisClient:
    """A client for redis://, rediss://, redis+sentinel:// or redis+cluster:// URLs.

    redis+sentinel://[:password@]host1:26379,host2:26379/<master name>[/db]
    (the password is the master's; `?sentinel_password=` for the sentinels),
    redis+cluster://[:password@]host:port[,host:port]; a `rediss+` scheme
    turns TLS on for either. `timeout` bounds each socket read, connect and
    wait for a pooled connection; RedisTokenStore puts one deadline around
    each whole operation on top.
    """
    scheme = url.partition("://")[0].lower()
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), RETRIES),
    }
    if scheme in ("redis", "rediss", "unix"):
        # Pings an idle connection before use, so one dropped by a restart is replaced.
        # A blocking pool: past its size a request waits for a connection instead
        # of failing (redis-py's default pool raises at 100 in flight, which a
        # refresh storm on one replica exceeds).
        pool = BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=timeout, health_check_interval=10, **common
        )
        return Redis.from_pool(pool)
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return _sentinel_client(parse_multi_host_url(url, 26379), common)
    if scheme in ("redis+cluster", "rediss+cluster"):
        return _cluster_client(parse_multi_host_url(url, 6379), common)
    raise ConfigError(
        "redis_url",
        f"must start with redis://, rediss://, redis+sentinel:// or redis+cluster:// (got scheme {scheme!r})",
    )


def _tls_options(target: RedisTarget) -> dict[str, Any]:
    if not target.tls:
        return {}
    options: dict[str, Any] = {"ssl": True}
    for name in ("ssl_ca_certs", "ssl_cert_reqs"):
        if name in target.options:
            options[name] = target.options[name]
    return options


def _sentinel_client(target: RedisTarget, common: dict[str, Any]) -> Redis:
    if not target.path or not target.path[0]:
        raise ConfigError(
            "redis_url", "a redis+sentinel:// URL needs the master name: redis+sentinel://host:26379/mymaster"
        )
    db = target.path[1] if len(target.path) > 1 and target.path[1] else "0"
    if not db.isdigit() or len(target.path) > 2:
        raise ConfigError("redis_url", "a redis+sentinel:// URL path must be /<master name>[/<db number>]")
    tls = _tls_options(target)
    sentinel_auth = {
        "username": target.options.get("sentinel_username"),
        "password": target.options.get("sentinel_password"),
    }
    sentinel = Sentinel(
        target.hosts,
        sentinel_kwargs={
            "socket_timeout": common["socket_timeout"],
            "socket_connect_timeout": common["socket_timeout"],
            **{k: v for k, v in sentinel_auth.items() if v},
            **tls,
        },
        **common,
    )
    client: Redis = sentinel.master_for(
        target.path[0], db=int(db), username=target.username, password=target.password, **tls
    )
    return client


def _cluster_client(target: RedisTarget, common: dict[str, Any]) -> RedisCluster:
    if any(target.path):
        raise ConfigError("redis_url", "a redis+cluster:// URL takes no path: a cluster has only database 0")
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
        username=target.username,
        password=target.password,
        **_tls_options(target),
        **common,
    )


def parse_multi_host_url(url: str, default_port: int) -> RedisTarget:
    scheme, _, rest = url.partition("://")
    netloc, _, path_and_query = rest.partition("/")
    path, _, query = path_and_query.partition("?")
    if "?" in netloc:
        netloc, _, query = netloc.partition("?")
    userinfo, _, hostlist = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    options = dict(parse_qsl(query))
    unknown = sorted(set(options) - _MULTI_HOST_OPTIONS)
    if unknown:
        raise ConfigError(
            "redis_url", f"unknown option {unknown[0]!r} (known: {', '.join(sorted(_MULTI_HOST_OPTIONS))})"
        )
    return RedisTarget(
        tls=scheme.lower().startswith("rediss"),
        hosts=[_host_port(item, default_port) for item in hostlist.split(",")],
        username=unquote(username) or None,
        password=unquote(password) or None,
        path=[unquote(p) for p in path.split("/")] if path else [],
        options=options,
    )


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(f"//{item}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError("redis_url", f"bad port in host {item!r}") from None
    if not parts.hostname:
        raise ConfigError("redis_url", f"empty host in {item!r}: write host:port[,host:port]")
    return parts.hostname, port or default_port


def describe_redis_url(url: str) -> str:
    """Where a redis_url points, for messages: never the password."""
    scheme = url.partition("://")[0].lower()
    try:
        if "+" in scheme:
            target = parse_multi_host_url(url, 26379 if "sentinel" in scheme else 6379)
            hosts = ",".join(f"{h}:{p}" for h, p in target.hosts)
            if "sentinel" in scheme:
                return f"sentinel master {target.path[0] if target.path else '?'} via {hosts}"
            return f"cluster {hosts}"
        parts = urlsplit(url)
        return f"{parts.hostname or parts.path}:{parts.port or 6379}{parts.path if parts.hostname else ''}"
    except ConfigError:
        return "(unparsable redis_url)"
