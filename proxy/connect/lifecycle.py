"""Per-user tokens after the connect flow: reading, refreshing, marking for reconnect.

Refresh is single-flight twice over. In one process, concurrent requests for
the same (user, server) share one refresh task. Across replicas, a lock in
the token store lets one replica call the authorization server while the
others wait and then read what it wrote. The write itself is conditional on
the version read, so a late or stale writer can never put older tokens over
newer ones. This matters because providers rotate refresh tokens and treat a
second use of the old one as theft, revoking the whole grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import structlog

from proxy import metrics
from proxy.crypto import DecryptError, Keyring
from proxy.errors import KeybearerError, Unavailable
from proxy.events import ChangeFeed
from proxy.names import OAUTH_TOKEN, Event, connection_changed
from proxy.oauth.client import AuthServerUnavailable, OAuthError, TokenResponse
from proxy.settings import ServerConfig
from proxy.stores import Connection, StoreUnavailable, TokenStore

log = structlog.get_logger("keybearer.oauth")

CONNECTED = "connected"
MUST_RECONNECT = "must_reconnect"
# Seconds a process remembers a user's opened access token.
RECENT_TTL = 1.0
# The share of a token's lifetime left when its refresh is due, at most (see `ahead`).
LIFETIME_FRACTION = 0.25
# While another replica refreshes, look at the store this often even without an event.
WAIT_POLL = 0.25
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


@dataclass(frozen=True)
class TokenSet:
    access_token: str
    refresh_token: str | None
    token_type: str = "Bearer"
    # The server url they were issued for: sealed with them, so that tokens
    # never follow a server id to another address.
    resource: str | None = None


# The refresh call itself (clients.OAuthClients.refresh, wired in app.py): it
# knows the client and the authorization server; the lifecycle knows when.
Refresher = Callable[[ServerConfig, Connection, str], Awaitable[TokenResponse]]


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
        lock_ttl: float = 30.0,
        cooldown: float = 15.0,
    ) -> None:
        self.keyring = keyring
        self.store = store
        self.feed = feed
        self.skew = refresh_skew
        self.lock_ttl = lock_ttl
        self.refresher = refresher
        self.breaker = CircuitBreaker(cooldown=cooldown)
        # (user, server id) -> (until, access token, the server url it is for)
        self._recent: dict[tuple[str, str], tuple[float, str, str]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[tuple[Connection, TokenSet]]] = {}
        # One per (user, server) this process waits on while another replica refreshes.
        self._waiting: dict[tuple[str, str], asyncio.Event] = {}

    async def access_token(self, server: ServerConfig, user: str) -> str:
        """A usable access token, refreshed first when it is about to expire."""
        key = (user, server.id)
        cached = self._recent.get(key)
        if cached is not None and cached[0] > time.monotonic() and cached[2] == server.url:
            return cached[1]
        token, refresh_in = await self._access_token(server, user)
        if refresh_in > RECENT_TTL:
            self._remember(key, token, server.url)
        return token

    def _remember(self, key: tuple[str, str], token: str, url: str) -> None:
        # A second of in-process memory saves a Redis read and a decryption on
        # every request of a busy agent; a change made on another replica (a
        # reconnect, a delete) is seen at most this much later. Never past the
        # point where a refresh is due: the caller remembers only tokens with
        # more time than that left.
        self._recent[key] = (time.monotonic() + RECENT_TTL, token, url)
        if len(self._recent) > 10_000:
            self._recent.clear()

    def forget(self, user: str, server_id: str) -> None:
        self._recent.pop((user, server_id), None)

    async def changed(self, user: str, server_id: str) -> None:
        """Tell every replica (this one too) that these tokens changed."""
        # Stored already: when the announcement fails, the others see it within
        # RECENT_TTL or at their next store read.
        await self.feed.announce(connection_changed(server_id, user))

    def on_event(self, event: Event) -> None:
        """Forget remembered tokens the event names; wake whoever waits on them."""
        for key in [k for k in (*self._recent, *self._waiting) if event.touches(*k)]:
            self._recent.pop(key, None)
            if key in self._waiting:
                self._waiting[key].set()

    async def _access_token(self, server: ServerConfig, user: str) -> tuple[str, float]:
        """The token, and the seconds until its refresh is due."""
        conn = await self._load(server, user)
        tokens = self._open(conn, server)
        if conn.expires_at is not None and conn.expires_at - self.ahead(conn) <= time.time():
            # Without a refresh token nothing can be done early: used until it expires.
            if tokens.refresh_token or conn.expires_at <= time.time():
                conn, tokens = await self.refresh(server, conn)
        if conn.expires_at is None:
            return tokens.access_token, float("inf")
        remaining = conn.expires_at - time.time()
        metrics.TIME_TO_EXPIRY.labels(server.id).observe(max(0.0, remaining))
        return tokens.access_token, remaining - self.ahead(conn)

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
        key = (seen.user, seen.server)
        running = self._inflight.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[tuple[Connection, TokenSet]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._refresh_across_replicas(server, seen)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # waiters see it; no "never retrieved" warning
            raise
        finally:
            del self._inflight[key]

    async def _refresh_across_replicas(
        self, server: ServerConfig, seen: Connection
    ) -> tuple[Connection, TokenSet]:
        lock_name = f"refresh:{seen.user}:{seen.server}"
        deadline = time.monotonic() + self.lock_ttl + 5
        key = (seen.user, seen.server)
        try:
            while True:
                token = await self.store.acquire_lock(lock_name, self.lock_ttl)
                if token is not None:
                    try:
                        return await self._refresh_holding_lock(server, seen)
                    finally:
                        await self.store.release_lock(lock_name, token)
                # Another replica is refreshing: wait for its write (announced by an
                # event, or found by looking again), then use it.
                waiting = self._waiting[key] = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WAIT_POLL + secrets.randbelow(50) / 1000):
                        await waiting.wait()
                current = await self._load(server, seen.user)
                if current.version != seen.version:
                    return current, self._open(current, server)
                if time.monotonic() > deadline:
                    raise TemporarilyUnavailable(
                        f"another replica is refreshing the token for {server.id!r} and has not finished; "
                        "retry shortly",
                        5,
                    )
        finally:
            self._waiting.pop(key, None)

    async def _refresh_holding_lock(
        self, server: ServerConfig, seen: Connection
    ) -> tuple[Connection, TokenSet]:
        current = await self._load(server, seen.user)
        if current.version != seen.version:
            return current, self._open(current, server)  # someone refreshed between our read and the lock
        tokens = self._open(current, server)
        if not tokens.refresh_token:
            await self._mark_reconnect(
                current, "the provider gave no refresh token and the access token expired"
            )
            raise NeedsConsent("the access token expired and cannot be refreshed")
        issuer = current.issuer or ""
        try:
            self.breaker.check(issuer)
            issued = await self.refresher(server, current, tokens.refresh_token)
        except OAuthError as exc:
            self.breaker.succeeded(issuer)
            metrics.refresh_result(server.id, exc.error if exc.error in GRANT_LOST else "error")
            if exc.error in GRANT_LOST:
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
            if current.expires_at is not None and current.expires_at > time.time():
                return current, tokens  # still valid: use it while the provider recovers
            raise TemporarilyUnavailable(
                f"the authorization server of {server.id!r} is unavailable and the access token has expired; "
                "the stored connection is kept, retry in a moment",
                15,
            ) from None
        self.breaker.succeeded(issuer)
        fresh = new_connection(
            self.keyring, current, current.user, current.server, issued,
            issuer=issuer, client_id=current.client_id or "", requested_scopes=current.scopes,
            resource=server.url, keep_refresh_token=tokens.refresh_token,
        )  # fmt: skip
        if not await self.store.put_connection(fresh, expected_version=current.version):
            # Only a reconnect or a delete can have written under our lock: theirs wins.
            newer = await self._load(server, seen.user)
            return newer, self._open(newer, server)
        metrics.refresh_result(server.id, "refreshed")
        log.info("token refreshed", server=server.id, user=current.user)
        await self.changed(current.user, current.server)
        return fresh, self._open(fresh, server)

    async def _load(self, server: ServerConfig, user: str) -> Connection:
        try:
            conn = await self.store.get_connection(user, server.id)
        except StoreUnavailable as exc:
            raise TemporarilyUnavailable(f"token storage is unavailable ({exc}); retry shortly", 5) from None
        if conn is None:
            raise NeedsConsent(f"{server.id!r} is not connected for this user")
        if conn.state == MUST_RECONNECT or conn.sealed is None:
            raise NeedsConsent(conn.last_error or f"{server.id!r} must be reconnected")
        return conn

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
