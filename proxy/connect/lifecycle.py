"""Per-user tokens after the connect flow: reading, refreshing, marking for reconnect.

Refresh is single-flight twice over. In one process, concurrent requests for
the same (user, server) share one refresh task. Across replicas, a lock in
the token store lets one replica call the authorization server while the
others wait and then read what it wrote. The lock is renewed while its holder
lives, and checked again right before the token call (a holder that stalled
past its lock's expiry does not call). The write is conditional on the
version read and the lock, so a late or stale writer can never put older
tokens over newer ones. This matters because providers rotate refresh tokens
and treat a second use of the old one as theft, revoking the whole grant.

Rotated tokens the store cannot take (it failed after the token call) are
held in this process, sealed, used meanwhile and written when the store is
back: the old refresh token is spent, and the new one exists nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import structlog

from proxy import metrics, tracing
from proxy.bounded import BoundedMap
from proxy.connect.single_flight import SingleFlight
from proxy.crypto import DecryptError, Keyring
from proxy.errors import KeybearerError, Unavailable
from proxy.events import ChangeFeed
from proxy.names import ALL_USERS, OAUTH_TOKEN, Event, connection_changed
from proxy.oauth.client import AuthServerUnavailable, OAuthError, TokenResponse
from proxy.settings import ServerConfig
from proxy.stores import Connection, StoreUnavailable, TokenStore

log = structlog.get_logger("keybearer.oauth")

CONNECTED = "connected"
MUST_RECONNECT = "must_reconnect"
# A process remembers a user's opened access token until its refresh is due or
# an event names it (every change is announced), and never longer than this, in
# case an announcement was lost (a lost subscription ends in RESYNC, which
# clears everything). Each token is kept a random share of it, at least half:
# tokens opened together (every user's first request after a start) would
# otherwise all be read again from the store in the same second.
RECENT_TTL = 60.0
# A remembered token used in the last quarter of its time is read again in the background
# (and refreshed, when due), so that a user with steady traffic never waits for the store:
# their requests keep taking the lane. It is the read the end of its time would have made:
# a token is still never used past `until` unread.
READ_AHEAD_SHARE = 0.25
# At most this many background reads at once per process; past it a token is read when
# its time ends, by the request that finds it ended.
READS_AHEAD_AT_ONCE = 256
# Reads ahead wait this long for each other, then go to the store in one call
# (stores/coalesce.py): a read alone costs the proxy several times its share of one.
READ_AHEAD_DELAY = 0.1
# At most this many remembered tokens (about 400 bytes each, with a short token).
RECENT_MAX = 50_000
# The share of a token's lifetime left when its refresh is due, at most (see `ahead`).
LIFETIME_FRACTION = 0.25
# While another replica refreshes, look at the store this often even without an event
# (which wakes the waiters at once): the fallback for a lost one. Shorter polls from
# thousands of waiters at once queued Redis commands past the store's deadline.
WAIT_POLL = 1.0
# A request waiting on another replica's refresh gets 503 after this long: a live
# holder renews its lock, so waiting out a dead one's would hang requests for its TTL.
REFRESH_WAIT = 4.0
# At most this many refreshes per process take a lock and call a token endpoint at once;
# the others wait their turn holding no lock. Unbounded, a storm of users whose tokens
# expired together took every lock at once and then queued for the fetcher's connections,
# the store's and the CPU while holding them, and other replicas' waiters gave up on
# holders that were merely queued (docs/performance.md, the 1,000-user storm).
REFRESHES_AT_ONCE = 32
# Rotated tokens the store could not take are written again this often.
HELD_RETRY = 0.25
# At most this many unwritten token sets per process (each a few kB, sealed).
MAX_HELD = 10_000
# Errors that mean the grant is gone: only the user can fix it, by reconnecting.
GRANT_LOST = ("invalid_grant", "invalid_client", "unauthorized_client")


class NeedsConsent(KeybearerError):
    """The user must (re)connect in the browser; `scopes` to ask for, if any."""

    status = 403
    code = "connection_required"

    def __init__(self, reason: str, scopes: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.scopes = scopes


class TemporarilyUnavailable(Unavailable):
    pass


class LockLost(Exception):
    """Right before the token call: the refresh lock is no longer ours, or the
    stored tokens changed. Calling now could send a refresh token another
    holder is sending (or has sent): the provider would revoke the grant."""


@dataclass(frozen=True)
class TokenSet:
    access_token: str
    refresh_token: str | None
    token_type: str = "Bearer"
    # The server url they were issued for: sealed with them, so that tokens
    # never follow a server id to another address.
    resource: str | None = None


# The refresh call itself (clients.OAuthClients.refresh, wired in app.py): it
# knows the client and the authorization server; the lifecycle knows when, and
# hands it a check to run right before the token request (it raises LockLost).
BeforeCall = Callable[[], Awaitable[None]]
Refresher = Callable[[ServerConfig, Connection, str, BeforeCall], Awaitable[TokenResponse]]


@dataclass
class Held:
    """Rotated tokens the store has not taken yet: the newest this user has."""

    conn: Connection  # sealed, as it will be stored
    replaces: int  # the stored version they follow
    lock: str
    lock_token: str | None  # the refresh lock, kept (renewed) until they are written


class Opened(NamedTuple):
    """An access token remembered after its tokens were read and opened."""

    until: float  # used without a store read until then (monotonic clock)
    read_ahead: float  # read again in the background when used after this (READ_AHEAD_SHARE)
    token: str
    url: str  # the server url it was opened for
    # After `until` the tokens are read again; when the stored ciphertext is the
    # same (its digest: the ciphertext itself is kilobytes, 50,000 times over),
    # they are not decrypted again.
    sealed: bytes


class Found(NamedTuple):
    """What a read of the store gives the token memory."""

    token: str
    refresh_in: float  # seconds until its refresh is due
    sealed: bytes  # the digest of the sealed tokens it was opened from


def _connected(server: ServerConfig, conn: Connection | None) -> Connection:
    """A connection whose tokens can be used, or why the user must connect."""
    if conn is None:
        raise NeedsConsent(f"{server.id!r} is not connected for this user")
    if conn.state == MUST_RECONNECT or conn.sealed is None:
        raise NeedsConsent(conn.last_error or f"{server.id!r} must be reconnected")
    return conn


def sealed_digest(conn: Connection) -> bytes:
    return hashlib.blake2b((conn.sealed or "").encode(), digest_size=16).digest()


def record(user: str, server: str) -> str:
    return f"{OAUTH_TOKEN}:{user}:{server}"


def seal(keyring: Keyring, user: str, server: str, tokens: TokenSet) -> str:
    payload = {
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "token_type": tokens.token_type,
        "resource": tokens.resource,
    }
    return keyring.encrypt(OAUTH_TOKEN, json.dumps(payload).encode(), record(user, server))


# Per-user tokens are not registered with logs.register_secret: there are too
# many of them, and the key and `Bearer` rules of the redaction already mask them.


def unseal(keyring: Keyring, conn: Connection) -> TokenSet:
    if conn.sealed is None:
        raise DecryptError("no tokens stored")
    data = json.loads(keyring.decrypt(OAUTH_TOKEN, conn.sealed, record(conn.user, conn.server)))
    return TokenSet(
        data["access_token"],
        data.get("refresh_token"),
        data.get("token_type") or "Bearer",
        data.get("resource"),
    )


def new_connection(
    keyring: Keyring,
    previous: Connection | None,
    user: str,
    server: str,
    issued: TokenResponse,
    *,
    issuer: str,
    client_id: str,
    requested_scopes: tuple[str, ...],
    resource: str,
    keep_refresh_token: str | None = None,
) -> Connection:
    """The Connection to store for a token response (from a code or a refresh)."""
    now = time.time()
    # RFC 6749 §6: a refresh response may omit the refresh token; the old one stays valid.
    refresh_token = issued.refresh_token or keep_refresh_token
    tokens = TokenSet(issued.access_token, refresh_token, issued.token_type or "Bearer", resource)
    return Connection(
        user=user,
        server=server,
        state=CONNECTED,
        sealed=seal(keyring, user, server, tokens),
        issuer=issuer,
        client_id=client_id,
        scopes=issued.scope if issued.scope is not None else requested_scopes,
        expires_at=now + issued.expires_in if issued.expires_in else None,
        obtained_at=now,
        last_error=None,
        refreshable=refresh_token is not None,
        version=(previous.version if previous else 0) + 1,
    )


class CircuitBreaker:
    """Per issuer: after repeated outages, stop calling for a while, so that an
    authorization server that hangs does not stall every request behind it."""

    def __init__(self, failures: int = 3, cooldown: float = 15.0) -> None:
        self.failures, self.cooldown = failures, cooldown
        self._count: dict[str, int] = {}
        self._open_until: dict[str, float] = {}

    def check(self, issuer: str) -> None:
        until = self._open_until.get(issuer, 0.0)
        if until > time.monotonic():
            raise AuthServerUnavailable(
                f"{issuer} failed repeatedly; not retrying for {until - time.monotonic():.0f} s"
            )

    def failed(self, issuer: str) -> None:
        self._count[issuer] = self._count.get(issuer, 0) + 1
        if self._count[issuer] >= self.failures:
            self._open_until[issuer] = time.monotonic() + self.cooldown

    def succeeded(self, issuer: str) -> None:
        self._count.pop(issuer, None)
        self._open_until.pop(issuer, None)


class TokenLifecycle:
    def __init__(
        self,
        keyring: Keyring,
        store: TokenStore,
        feed: ChangeFeed,
        refresher: Refresher,
        refresh_skew: float,
        lock_ttl: float = 10.0,
        cooldown: float = 15.0,
    ) -> None:
        self.keyring = keyring
        self.store = store
        self.feed = feed
        self.skew = refresh_skew
        self.lock_ttl = lock_ttl
        self.refresher = refresher
        self.breaker = CircuitBreaker(cooldown=cooldown)
        # (user, server id) -> (until, access token, the server url it is for, the digest of
        # the sealed tokens it was opened from); kept past `until` for that digest (see Opened)
        self._recent: BoundedMap[tuple[str, str], Opened] = BoundedMap(RECENT_MAX)
        # Moves whenever remembered tokens are forgotten (an event, a refusal): a read
        # that was under way meanwhile may predate the change, and is not remembered.
        self._forgetting = 0
        self._refreshes: SingleFlight[tuple[str, str], tuple[Connection, TokenSet]] = SingleFlight()
        self._turns = asyncio.Semaphore(REFRESHES_AT_ONCE)
        # One per (user, server) this process waits on while another replica refreshes.
        self._waiting: dict[tuple[str, str], asyncio.Event] = {}
        # Rotated tokens waiting for the store, and the task writing each.
        self._held: dict[tuple[str, str], Held] = {}
        self._writers: dict[tuple[str, str], asyncio.Task[None]] = {}
        # Background reads of remembered tokens near the end of their time (READ_AHEAD_SHARE):
        # those waiting for READ_AHEAD_DELAY, and those under way.
        self._ahead_due: dict[tuple[str, str], ServerConfig] = {}
        self._ahead_timer: asyncio.TimerHandle | None = None
        self._reads_ahead: set[tuple[str, str]] = set()
        self._ahead_tasks: set[asyncio.Task[None]] = set()

    async def access_token(self, server: ServerConfig, user: str) -> str:
        """A usable access token, refreshed first when it is about to expire."""
        token = self.remembered(server, user)
        if token is not None:
            return token
        return await self._read(server, user)

    def remembered(self, server: ServerConfig, user: str) -> str | None:
        """The access token this process opened lately, if it still holds: no store read."""
        key = (user, server.id)
        opened = self._recent.get(key)
        if opened is None or opened.url != server.url:
            return None
        now = time.monotonic()
        if opened.until <= now:
            return None
        if (
            opened.read_ahead <= now
            and key not in self._reads_ahead
            and len(self._reads_ahead) < READS_AHEAD_AT_ONCE
        ):
            self._reads_ahead.add(key)
            self._ahead_due[key] = server
            if self._ahead_timer is None:
                # In a context of its own: not the request's (its log fields, its trace).
                self._ahead_timer = asyncio.get_running_loop().call_later(
                    READ_AHEAD_DELAY, self._start_reads_ahead, context=contextvars.Context()
                )
        return opened.token

    def _start_reads_ahead(self) -> None:
        self._ahead_timer = None
        due, self._ahead_due = self._ahead_due, {}
        task = asyncio.get_running_loop().create_task(self._read_all_ahead(due))
        self._ahead_tasks.add(task)
        task.add_done_callback(self._ahead_tasks.discard)

    async def _read_all_ahead(self, due: dict[tuple[str, str], ServerConfig]) -> None:
        """Read tokens ahead in one store call: each read's own coroutine, task and
        deadline would cost the proxy several times its share of the call."""
        keys = list(due)
        forgetting = self._forgetting
        try:
            found = await self.store.get_connections(keys)
            slow = []
            for key, conn in zip(keys, found, strict=True):
                try:
                    ready = self._read_at_once(key, due[key], conn)
                except NeedsConsent:
                    # The store says the grant is gone: no use sending the token until its time ends.
                    self.forget(*key)
                    continue
                if ready is None:
                    slow.append(key)
                else:
                    self._remember(key, due[key], ready, forgetting)
            for key in slow:
                try:
                    await self._read(due[key], key[0])
                except NeedsConsent:
                    self.forget(*key)
        except KeybearerError as exc:
            # Kept until their time ends; the requests that read then answer for themselves.
            log.debug("tokens not read ahead", count=len(keys), error=exc.code, reason=str(exc))
        except Exception:
            log.exception("tokens not read ahead", count=len(keys))
        finally:
            self._reads_ahead.difference_update(keys)

    def _read_at_once(
        self, key: tuple[str, str], server: ServerConfig, conn: Connection | None
    ) -> Found | None:
        """What a read ahead found, when it needs nothing more; None when it needs the
        whole way (`_read`): a refresh is due, or the store has not taken the newest tokens."""
        if key in self._held or (conn is not None and self._due(conn)):
            return None
        return self._token(server, _connected(server, conn), self._opened(key, server))

    async def _read(self, server: ServerConfig, user: str) -> str:
        """The token from the store (refreshed when due), remembered for a while."""
        key = (user, server.id)
        forgetting = self._forgetting
        found = await self._access_token(server, user, self._opened(key, server))
        self._remember(key, server, found, forgetting)
        return found.token

    def _opened(self, key: tuple[str, str], server: ServerConfig) -> Opened | None:
        opened = self._recent.get(key)
        return opened if opened is not None and opened.url == server.url else None

    def _remember(self, key: tuple[str, str], server: ServerConfig, found: Found, forgetting: int) -> None:
        # Saves a store read and a decryption on every request but the first. A change
        # made on another replica (a reconnect, a delete) arrives as an event and is
        # forgotten then: never kept past the refresh, nor when an event came during the read.
        if found.refresh_in > 0 and forgetting == self._forgetting:
            kept = min(found.refresh_in, RECENT_TTL * random.uniform(0.5, 1.0))  # noqa: S311 (spread, not a secret)
            now = time.monotonic()
            self._recent[key] = Opened(
                now + kept, now + kept * (1 - READ_AHEAD_SHARE), found.token, server.url, found.sealed
            )

    def forget(self, user: str, server_id: str) -> None:
        self._forgetting += 1
        self._recent.pop((user, server_id), None)

    async def changed(self, user: str, server_id: str) -> None:
        """Tell every replica (this one too) that these tokens changed."""
        # Stored already: when the announcement fails, the others see it within
        # RECENT_TTL or at their next store read.
        await self.feed.announce(connection_changed(server_id, user))

    def on_event(self, event: Event) -> None:
        """Forget remembered tokens the event names; wake whoever waits on them."""
        # The read and the event come on different connections: Redis may have
        # answered a read before the change that this event announces.
        self._forgetting += 1
        if event.kind == "connection" and event.server and event.user not in (None, ALL_USERS):
            # The common case, one user's tokens: no walk over everything remembered.
            keys = [(event.user, event.server)]
        else:
            keys = [k for k in (*self._recent, *self._waiting) if event.touches(*k)]
        for key in keys:
            self._recent.pop(key, None)
            if key in self._waiting:
                self._waiting[key].set()

    async def _access_token(self, server: ServerConfig, user: str, opened: Opened | None) -> Found:
        conn = await self._load(server, user)
        if not self._due(conn):
            return self._token(server, conn, opened)
        assert conn.expires_at is not None
        tokens = self._open(conn, server)
        if (user, server.id) in self._held:
            # The newest tokens are not stored yet: never refresh past them.
            if conn.expires_at <= time.time():
                raise TemporarilyUnavailable(
                    "token storage is unavailable and the access token expired; retry shortly", 5
                )
        # Without a refresh token nothing can be done early: used until it expires.
        elif tokens.refresh_token or conn.expires_at <= time.time():
            conn, tokens = await self.refresh(server, conn)
        return self._found(server, conn, tokens.access_token)

    def _token(self, server: ServerConfig, conn: Connection, opened: Opened | None) -> Found:
        """The access token of a connection whose refresh is not due."""
        sealed = sealed_digest(conn)
        if opened is not None and opened.sealed == sealed:
            # The very ciphertext opened before, read again when its memory ended: it
            # opens to the same tokens. What else the read says (state, expiry) was
            # checked before, as for any read.
            return self._found(server, conn, opened.token, sealed)
        return self._found(server, conn, self._open(conn, server).access_token, sealed)

    def _found(
        self, server: ServerConfig, conn: Connection, access: str, sealed: bytes | None = None
    ) -> Found:
        sealed = sealed_digest(conn) if sealed is None else sealed
        if conn.expires_at is None:
            return Found(access, math.inf, sealed)
        remaining = conn.expires_at - time.time()
        metrics.time_to_expiry(server.id).observe(max(0.0, remaining))
        return Found(access, remaining - self.ahead(conn), sealed)

    def _due(self, conn: Connection) -> bool:
        return conn.expires_at is not None and conn.expires_at - self.ahead(conn) <= time.time()

    def ahead(self, conn: Connection) -> float:
        """How long before expiry a refresh is due: `refresh_skew`, but never more
        than a quarter of the token's own lifetime. A token that lives shorter than
        the skew would otherwise be due from the moment it arrives, and refreshed
        on every request."""
        if conn.expires_at is None:
            return 0.0
        lifetime = conn.expires_at - conn.obtained_at
        return min(self.skew, max(0.0, lifetime) * LIFETIME_FRACTION)

    async def refresh_rejected(self, server: ServerConfig, user: str, rejected: str) -> str:
        """The upstream refused the access token before its expiry (revoked,
        rotated elsewhere): refresh once, unless another request already did."""
        self.forget(user, server.id)
        conn = await self._load(server, user)
        tokens = self._open(conn, server)
        if tokens.access_token != rejected:
            return tokens.access_token
        conn, tokens = await self.refresh(server, conn)
        return tokens.access_token

    async def mark_rejected(self, server: ServerConfig, user: str) -> None:
        """Even a fresh token was refused: only a reconnect can help."""
        self.forget(user, server.id)
        conn = await self.store.get_connection(user, server.id)
        if conn is not None and conn.state != MUST_RECONNECT:
            await self._mark_reconnect(conn, "the server refused a freshly refreshed token")

    async def granted_scopes(self, server: ServerConfig, user: str) -> tuple[str, ...]:
        conn = await self.store.get_connection(user, server.id)
        return conn.scopes if conn else ()

    async def count_step_up(self, server: ServerConfig, user: str) -> int:
        """How many step-ups this connection asked for lately (bounded, so a
        server that is never satisfied does not loop the user forever)."""
        key = f"stepup:{server.id}:{user}"
        count = int(await self.store.cache_get(key) or 0) + 1
        await self.store.cache_set(key, str(count), 3600)
        return count

    async def refresh(self, server: ServerConfig, seen: Connection) -> tuple[Connection, TokenSet]:
        """Refresh `seen` once, however many callers and replicas ask at the same time."""
        return await self._refreshes.run((seen.user, seen.server), lambda: self._traced_refresh(server, seen))

    async def _traced_refresh(self, server: ServerConfig, seen: Connection) -> tuple[Connection, TokenSet]:
        with tracing.span("refresh", {"keybearer.server": server.id}):
            return await self._refresh_across_replicas(server, seen)

    async def _refresh_across_replicas(
        self, server: ServerConfig, seen: Connection
    ) -> tuple[Connection, TokenSet]:
        lock = self.store.connection_lock(seen.user, seen.server)
        key = (seen.user, seen.server)
        # Set by an event naming these tokens (on_event): another replica wrote them.
        news = self._waiting[key] = asyncio.Event()
        # Counted from the first wait for another replica's refresh: a wait for a turn
        # here is no reason to give up, as every turn ends with a token call's deadline.
        deadline: float | None = None
        try:
            while True:
                if await self._turn(news):
                    try:
                        token = await self._acquire(lock)
                        if token is not None:
                            done = await self._refresh_locked(server, seen, lock, token)
                            if done is not None:
                                return done
                    finally:
                        self._turns.release()
                    # Another replica is refreshing: wait for its write (announced by an
                    # event, or found by looking again), then use it.
                    deadline = deadline or time.monotonic() + REFRESH_WAIT
                    with tracing.span("refresh lock wait"), contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(WAIT_POLL + secrets.randbelow(50) / 1000):
                            await news.wait()
                news.clear()
                current = await self._load(server, seen.user)
                if current.version != seen.version:
                    return current, self._open(current, server)
                if deadline is not None and time.monotonic() > deadline:
                    # A live holder renews its lock and will write soon; a dead one's
                    # lock expires within lock_ttl. Either way, not worth a hung request.
                    raise TemporarilyUnavailable(
                        f"another replica is refreshing the token for {server.id!r} and has not finished; "
                        "retry shortly",
                        max(1, math.ceil(self.lock_ttl / 3)),
                    )
        finally:
            self._waiting.pop(key, None)

    async def _turn(self, news: asyncio.Event) -> bool:
        """One of this process's REFRESHES_AT_ONCE turns, waited for; False, holding
        none, when `news` came first: the tokens were written meanwhile, most likely
        refreshed by another replica, and what is stored may be all the caller needs."""
        if not self._turns.locked():
            return await self._turns.acquire()
        turn = asyncio.ensure_future(self._turns.acquire())
        heard = asyncio.ensure_future(news.wait())
        try:
            await asyncio.wait((turn, heard), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            if not turn.cancel():
                self._turns.release()  # granted as this caller was cancelled
            raise
        finally:
            heard.cancel()
        # A turn granted is kept (cancel() of a finished task is False); one still
        # queued is given up, and the semaphore passes it on if it was granted meanwhile.
        return not turn.cancel()

    async def _acquire(self, lock: str) -> str | None:
        try:
            return await self.store.acquire_lock(lock, self.lock_ttl)
        except StoreUnavailable as exc:
            raise TemporarilyUnavailable(f"token storage is unavailable ({exc}); retry shortly", 5) from None

    async def _refresh_locked(
        self, server: ServerConfig, seen: Connection, lock: str, token: str
    ) -> tuple[Connection, TokenSet] | None:
        """The refresh under our lock, renewed meanwhile; None when the lock was
        lost before the token call (then wait like any other replica)."""
        renewing = asyncio.create_task(self._renew(lock, token))
        try:
            return await self._refresh_holding_lock(server, seen, lock, token)
        finally:
            renewing.cancel()
            held = self._held.get((seen.user, seen.server))
            if held is None or held.lock_token != token:
                await self._release(lock, token)  # else its writer keeps it until they are stored

    async def _renew(self, lock: str, token: str) -> None:
        """Keep the lock while its holder lives: a replica that dies holding it
        blocks others only until its last renewal's TTL runs out."""
        while True:
            await asyncio.sleep(self.lock_ttl / 3)
            try:
                if not await self.store.renew_lock(lock, token, self.lock_ttl):
                    log.warning("refresh lock lost while refreshing", lock=lock)
                    return
            except StoreUnavailable as exc:
                log.warning("refresh lock not renewed; retrying", lock=lock, reason=str(exc))

    async def _release(self, lock: str, token: str) -> None:
        # Never raises: an error here would hide the one that ended the refresh,
        # and the lock expires by itself.
        try:
            await self.store.release_lock(lock, token)
        except StoreUnavailable as exc:
            log.warning("refresh lock not released; it expires by itself", lock=lock, reason=str(exc))

    async def _refresh_holding_lock(
        self, server: ServerConfig, seen: Connection, lock: str, token: str
    ) -> tuple[Connection, TokenSet] | None:
        current = await self._load(server, seen.user)
        if current.version != seen.version:
            return current, self._open(current, server)  # someone refreshed between our read and the lock
        if (seen.user, seen.server) in self._held:
            raise TemporarilyUnavailable("the newest tokens wait for token storage; retry shortly", 5)
        tokens = self._open(current, server)
        if not tokens.refresh_token:
            await self._mark_reconnect(
                current, "the provider gave no refresh token and the access token expired"
            )
            raise NeedsConsent("the access token expired and cannot be refreshed")

        async def before_call() -> None:
            # A holder that stalled (paused, partitioned) past its lock's expiry
            # must not send the refresh token the next holder may be sending.
            if not await self.store.renew_lock(lock, token, self.lock_ttl):
                raise LockLost(lock)
            now = await self.store.get_connection(current.user, current.server)
            if now is None or now.version != current.version:
                raise LockLost(lock)

        issuer = current.issuer or ""
        try:
            self.breaker.check(issuer)
            issued = await self.refresher(server, current, tokens.refresh_token, before_call)
        except LockLost:
            log.warning("refresh lock lost before the token call; not calling", server=server.id)
            latest = await self._load(server, seen.user)
            if latest.version != current.version:
                return latest, self._open(latest, server)
            return None
        except OAuthError as exc:
            self.breaker.succeeded(issuer)
            metrics.refresh_result(server.id, exc.error if exc.error in GRANT_LOST else "error")
            if exc.error in GRANT_LOST:
                # A holder that died or stalled may have used this refresh token and
                # written its result since: look once more before asking for a reconnect.
                latest = await self._load(server, seen.user)
                if latest.version != current.version:
                    return latest, self._open(latest, server)
                await self._mark_reconnect(current, f"the provider refused the refresh: {exc.error}")
                raise NeedsConsent(f"the provider refused to refresh the token ({exc.error})") from None
            raise TemporarilyUnavailable(
                f"the provider refused the refresh ({exc.error}); retry shortly"
            ) from None
        except AuthServerUnavailable as exc:
            self.breaker.failed(issuer)
            metrics.refresh_result(server.id, "unavailable")
            log.warning(
                "token endpoint unavailable; keeping stored tokens", server=server.id, reason=str(exc)
            )
            return self._still_valid(
                current, tokens, f"the authorization server of {server.id!r} is unavailable", 15
            )
        except StoreUnavailable as exc:
            # What the refresh needs from a store (a registration not yet known
            # here, the lock check) cannot be read: the token endpoint was not called.
            log.warning("refresh needs a store that is unavailable", server=server.id, reason=str(exc))
            return self._still_valid(current, tokens, "a store the refresh needs is unavailable", 5)
        self.breaker.succeeded(issuer)
        metrics.refresh_result(server.id, "refreshed")
        fresh = new_connection(
            self.keyring, current, current.user, current.server, issued,
            issuer=issuer, client_id=current.client_id or "", requested_scopes=current.scopes,
            resource=server.url, keep_refresh_token=tokens.refresh_token,
        )  # fmt: skip
        return await self._store_refreshed(server, current, fresh, lock, token)

    def _still_valid(
        self, current: Connection, tokens: TokenSet, why: str, retry_after: int
    ) -> tuple[Connection, TokenSet]:
        if current.expires_at is not None and current.expires_at > time.time():
            return current, tokens  # still valid: use it while the refresh cannot be made
        raise TemporarilyUnavailable(
            f"{why} and the access token has expired; the stored connection is kept, retry in a moment",
            retry_after,
        )

    async def _store_refreshed(
        self, server: ServerConfig, current: Connection, fresh: Connection, lock: str, token: str
    ) -> tuple[Connection, TokenSet]:
        """Write what the provider issued; whatever the store does, never lose it:
        the refresh token it replaces is spent."""
        try:
            written = await self.store.put_connection(
                fresh, expected_version=current.version, lock_token=token
            )
            if written:
                log.info("token refreshed", server=server.id, user=current.user)
                await self.changed(current.user, current.server)
                return fresh, self._open(fresh, server)
            latest = await self.store.get_connection(current.user, current.server)
        except StoreUnavailable as exc:
            log.warning("token storage failed after a refresh; the new tokens are kept here until it is back",
                        server=server.id, user=current.user, reason=str(exc))  # fmt: skip
            self._hold(Held(fresh, current.version, lock, token))
            return fresh, self._open(fresh, server)
        if latest is None or latest.version != current.version:
            # A reconnect or a delete wrote since: theirs wins.
            newer = await self._load(server, current.user)
            return newer, self._open(newer, server)
        # Nobody wrote, but the lock expired under us (we stalled past it). Ours are
        # the newest tokens, and the next holder checks the version right before its
        # token call: writing them now is what keeps it from reusing the old one.
        log.warning("refresh lock lost before the write; storing the new tokens by version", server=server.id)
        self._hold(Held(fresh, current.version, lock, None))
        conn = await self._load(server, current.user)
        return conn, self._open(conn, server)

    def _hold(self, held: Held) -> None:
        key = (held.conn.user, held.conn.server)
        if key not in self._held and len(self._held) >= MAX_HELD:
            log.error("too many refreshed tokens wait for token storage; these are dropped",
                      server=held.conn.server, user=held.conn.user)  # fmt: skip
            raise TemporarilyUnavailable("token storage is unavailable; retry shortly", 5)
        self._held[key] = held
        if key not in self._writers:
            self._writers[key] = asyncio.create_task(self._write_held(key))

    async def _write_held(self, key: tuple[str, str]) -> None:
        """Write held tokens as soon as the store takes them; requests try too (_load)."""
        try:
            while (held := self._held.get(key)) is not None:
                await asyncio.sleep(HELD_RETRY)
                with contextlib.suppress(StoreUnavailable):
                    if held.lock_token is not None and not await self.store.renew_lock(
                        held.lock, held.lock_token, self.lock_ttl
                    ):
                        held.lock_token = None
                    await self._settle(held, await self.store.get_connection(*key))
        finally:
            self._writers.pop(key, None)

    async def _settle(self, held: Held, stored: Connection | None) -> Connection | None:
        """Write `held` if the store still has the tokens it follows; else whoever
        wrote meanwhile (a reconnect, a delete) wins. Returns what is now current."""
        key = (held.conn.user, held.conn.server)
        if stored is not None and stored.version == held.replaces:
            # By version only: the lock guards the token call, and ours is done.
            if await self.store.put_connection(held.conn, expected_version=held.replaces):
                await self._drop(key, held)
                log.info("refreshed tokens stored", server=held.conn.server, user=held.conn.user)
                await self.changed(held.conn.user, held.conn.server)
                return held.conn
            stored = await self.store.get_connection(*key)
        await self._drop(key, held)
        return stored

    async def _drop(self, key: tuple[str, str], held: Held) -> None:
        if self._held.get(key) is held:
            del self._held[key]
            if held.lock_token is not None:
                await self._release(held.lock, held.lock_token)

    async def _load(self, server: ServerConfig, user: str) -> Connection:
        key = (user, server.id)
        try:
            conn = await self.store.get_connection(user, server.id)
            if key in self._held:
                conn = await self._settle(self._held[key], conn)
        except StoreUnavailable as exc:
            held = self._held.get(key)
            if held is None:
                raise TemporarilyUnavailable(
                    f"token storage is unavailable ({exc}); retry shortly", 5
                ) from None
            conn = held.conn  # the newest tokens, kept here until the store is back
        return _connected(server, conn)

    def _open(self, conn: Connection, server: ServerConfig) -> TokenSet:
        try:
            tokens = unseal(self.keyring, conn)
        except (DecryptError, ValueError, KeyError) as exc:
            log.error("stored tokens cannot be decrypted", server=conn.server, reason=str(exc))
            raise NeedsConsent("the stored tokens cannot be read; connect again") from None
        # Tokens sealed before they named their resource are taken as the server's.
        if tokens.resource is not None and tokens.resource != server.url:
            log.warning("stored tokens were issued for another url of the server", server=server.id)
            raise NeedsConsent(f"the address of {server.id!r} changed since you connected")
        return tokens

    async def _mark_reconnect(self, conn: Connection, reason: str) -> None:
        marked = replace(conn, state=MUST_RECONNECT, last_error=reason, version=conn.version + 1)
        await self.store.put_connection(marked, expected_version=conn.version)
        await self.changed(conn.user, conn.server)
