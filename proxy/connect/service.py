"""One token per client_credentials server, shared by every user of it.

Here the proxy acts for a service, not a person (the MCP client credentials
extension): it asks the server's authorization server for a token as its own
static client, authenticated by a secret or a private key. The token is kept
sealed in the token store like a person's connection, under the pseudo-user
`names.SERVICE_USER`, and asked for again ahead of its expiry.

Renewal reuses TokenLifecycle's single flight as it is: one task per process,
one lock across replicas, a write conditional on the version read, waiting
replicas woken by the change event. What differs is overridden here: renewal
is a new grant (no refresh token), nothing stored means "obtain one" rather
than "ask a person to connect", and every failure is the operator's to fix.
A refusal is stored as a `refused` connection (its `obtained_at` is when),
answered with a 503 that names the server and what to check, and no replica
asks the authorization server again until `token_endpoint_cooldown` has passed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import structlog

from proxy import metrics
from proxy.connect.clients import ServiceClientUnusable, ServiceGrant
from proxy.connect.lifecycle import (
    Found,
    Opened,
    TemporarilyUnavailable,
    TokenLifecycle,
    TokenSet,
    new_connection,
    unseal,
)
from proxy.crypto import DecryptError, Keyring
from proxy.errors import Unavailable
from proxy.events import ChangeFeed
from proxy.names import SERVICE_USER
from proxy.oauth.client import AuthServerUnavailable, OAuthError, TokenResponse
from proxy.settings import ServerConfig
from proxy.stores import Connection, StoreUnavailable, TokenStore

log = structlog.get_logger("keybearer.oauth")

REFUSED = "refused"
NOT_OBTAINED = "not_obtained"  # what _load answers when nothing is stored

# The grant call for (server, user): clients.OAuthClients.client_credentials
# (one token per server), or assertion.IdentityAssertions (one per user), wired in app.py.
Obtain = Callable[[ServerConfig, str], Awaitable[ServiceGrant]]
# The id of the client the server's tokens are asked for as now (clients.OAuthClients.service_client_id).
ClientOf = Callable[[ServerConfig], Awaitable[str]]

# What the operator should check, by the authorization server's error.
_CHECK = {
    "invalid_client": "check the server's client_id and its client secret or private key "
    "(and the public key registered for the client)",
    "unauthorized_client": "allow the client_credentials grant for this client at the authorization server",
    "unsupported_grant_type": "the authorization server must offer the client_credentials grant",
    "invalid_scope": "check the scopes asked for (the server's scopes) against those the client may have",
    "invalid_target": "register the server as a resource at the authorization server, or set resource: false",
    "unsupported_auth_method": "use a client authentication method the authorization server accepts",
}


class ServiceTokenFailed(Unavailable):
    """No token for a client_credentials server; the message names the server and the fix."""

    code = "service_token_failed"
    title = "The server's credentials failed"


def refusal_message(server: ServerConfig, exc: OAuthError | ServiceClientUnusable) -> str:
    if isinstance(exc, ServiceClientUnusable):
        return exc.message
    if exc.error == "invalid_client":
        what = f"the client credentials of server {server.id!r} were refused by its authorization server"
    else:
        what = f"the authorization server of server {server.id!r} refused the proxy's token request"
    check = _CHECK.get(exc.error, "check the server's client at its authorization server")
    return f"{what} ({exc}); the operator must {check}"


async def _never_refreshed(
    server: ServerConfig, conn: Connection, refresh_token: str, before_call: Callable[[], Awaitable[None]]
) -> TokenResponse:
    """TokenLifecycle's refresher, which service tokens never call: they are
    renewed by a new grant (ServiceTokens._refresh_holding_lock)."""
    raise AssertionError("a service token is renewed by a new grant, not refreshed")


class ServiceTokens(TokenLifecycle):
    def __init__(
        self,
        keyring: Keyring,
        store: TokenStore,
        feed: ChangeFeed,
        obtain: Obtain,
        client_of: ClientOf,
        refresh_skew: float,
        lock_ttl: float = 30.0,
        cooldown: float = 15.0,
    ) -> None:
        super().__init__(keyring, store, feed, _never_refreshed, refresh_skew, lock_ttl, cooldown)
        self.obtain = obtain
        self.client_of = client_of
        self.cooldown = cooldown

    async def token(self, server: ServerConfig) -> str:
        return await self.access_token(server, SERVICE_USER)

    async def refused_upstream(self, server: ServerConfig, used: str) -> ServiceTokenFailed:
        """The server refused a token issued for it a moment ago: another one would
        fare no better, so this is recorded as a refusal."""
        self.forget(SERVICE_USER, server.id)
        conn = await self._load(server, SERVICE_USER)
        message = (
            f"server {server.id!r} refused a service token its authorization server had just issued "
            f"(HTTP 401); the operator must check that the server accepts that authorization server's "
            f"tokens for client {conn.client_id or server.client_id!r} (audience, scopes)"
        )
        tokens = self._usable(conn, server)
        if tokens is not None and tokens.access_token == used:
            return await self._refuse(server, conn, message)
        return ServiceTokenFailed(message, retry_after=1, server=server.id)

    # -- TokenLifecycle, as service tokens differ --------------------------------------

    async def _access_token(self, server: ServerConfig, user: str, opened: Opened | None) -> Found:
        # Every read is opened: what was opened before is not looked at (a refused or
        # replaced token is judged on what is stored; and these tokens are few).
        conn = await self._load(server, user)
        tokens = self._usable(conn, server)
        if tokens is None or self._due(conn):
            conn, tokens = await self.refresh(server, conn)
        return self._found(server, conn, tokens.access_token)

    def _read_at_once(
        self, key: tuple[str, str], server: ServerConfig, conn: Connection | None
    ) -> Found | None:
        return None  # read ahead the whole way, as above

    async def refresh_rejected(self, server: ServerConfig, user: str, rejected: str) -> str:
        """The server refused the token: a new one, unless another request got it already."""
        self.forget(user, server.id)
        conn = await self._load(server, user)
        tokens = self._usable(conn, server)
        if tokens is not None and tokens.access_token != rejected:
            return tokens.access_token
        conn, tokens = await self.refresh(server, conn)
        return tokens.access_token

    async def _refresh_holding_lock(
        self, server: ServerConfig, seen: Connection, lock: str, token: str
    ) -> tuple[Connection, TokenSet] | None:
        current = await self._load(server, seen.user)
        if current.version != seen.version:
            return current, self._open(current, server)  # another replica was first
        breaker = current.issuer or server.url
        try:
            self.breaker.check(breaker)
            grant = await self._obtain(server, current)
        except (OAuthError, ServiceClientUnusable) as exc:
            self.breaker.succeeded(breaker)
            metrics.refresh_result(server.id, "refused")
            raise await self._refuse(server, current, self.refusal_message(server, exc)) from None
        except AuthServerUnavailable as exc:
            self.breaker.failed(breaker)
            metrics.refresh_result(server.id, "unavailable")
            log.warning("token endpoint unavailable", server=server.id, reason=str(exc))
            stored = self._usable(current, server)
            if stored is not None and current.expires_at is not None and current.expires_at > time.time():
                return current, stored  # still valid: used while the provider recovers
            raise TemporarilyUnavailable(
                f"the authorization server of {server.id!r} is unavailable ({exc}); retry in a moment", 15
            ) from None
        self.breaker.succeeded(breaker)
        fresh = new_connection(
            self.keyring, current, current.user, current.server, grant.issued,
            issuer=grant.issuer, client_id=grant.client_id, requested_scopes=grant.scopes, resource=server.url,
        )  # fmt: skip
        if not await self.store.put_connection(fresh, expected_version=current.version, lock_token=token):
            newer = await self._load(server, seen.user)  # a reset or a new client under our lock
            return newer, self._open(newer, server)
        metrics.refresh_result(server.id, "obtained")
        log.info("service token obtained", server=server.id, expires_in=grant.issued.expires_in)
        await self.changed(current.user, current.server)
        return fresh, self._open(fresh, server)

    async def _obtain(self, server: ServerConfig, current: Connection) -> ServiceGrant:
        """The grant call, under the lock; AssertionTokens records what its refusals mean."""
        return await self.obtain(server, current.user)

    async def _load(self, server: ServerConfig, user: str) -> Connection:
        try:
            conn = await self.store.get_connection(user, server.id)
        except StoreUnavailable as exc:
            raise TemporarilyUnavailable(f"token storage is unavailable ({exc}); retry shortly", 5) from None
        if conn is None:
            # Version 0: the conditional write of the first token expects nothing stored.
            return Connection(user, server.id, state=NOT_OBTAINED)
        if conn.client_id and conn.client_id != await self.client_of(server):
            # Obtained as (or refused to) the client the server had before: a config
            # restart with a new client_id, or `oauth-client set`. Never used again; the
            # version stays, so the token obtained as the new client replaces it.
            return replace(conn, state=NOT_OBTAINED, sealed=None, expires_at=None, last_error=None)
        return conn

    def _open(self, conn: Connection, server: ServerConfig) -> TokenSet:
        """What another request or replica just wrote."""
        tokens = self._usable(conn, server)
        if tokens is None:
            raise TemporarilyUnavailable(f"the service token of {server.id!r} changed meanwhile; retry", 1)
        return tokens

    # -- helpers ------------------------------------------------------------------------

    def refusal_message(self, server: ServerConfig, exc: OAuthError | ServiceClientUnusable) -> str:
        return refusal_message(server, exc)

    def _usable(self, conn: Connection, server: ServerConfig) -> TokenSet | None:
        """The stored token, or None when there is none to use. A refusal still
        in its cooldown is raised again."""
        if conn.state == REFUSED:
            if conn.obtained_at + self.cooldown > time.time():
                raise self._failed(server, conn)
            return None
        if conn.sealed is None:
            return None
        try:
            tokens = unseal(self.keyring, conn)
        except (DecryptError, ValueError, KeyError) as exc:
            log.error("stored service token cannot be decrypted", server=server.id, reason=str(exc))
            return None
        # Issued for another url of the server: never sent to this one.
        return tokens if tokens.resource in (None, server.url) else None

    async def _refuse(self, server: ServerConfig, current: Connection, message: str) -> ServiceTokenFailed:
        log.warning("service token refused", server=server.id, reason=message)
        return self._failed(server, await self._record(server, current, REFUSED, message))

    async def _record(
        self, server: ServerConfig, current: Connection, state: str, message: str
    ) -> Connection:
        """A state without a token, for every replica and the listings; its `obtained_at` is when.
        Bound to the current client like a token: a new client starts afresh."""
        record = replace(
            current, state=state, sealed=None, expires_at=None, obtained_at=time.time(), last_error=message,
            client_id=await self.client_of(server), version=current.version + 1,
        )  # fmt: skip
        if await self.store.put_connection(record, expected_version=current.version):
            await self.changed(current.user, current.server)
        return record

    def _failed(self, server: ServerConfig, refused: Connection) -> ServiceTokenFailed:
        wait = refused.obtained_at + self.cooldown - time.time()
        message = refused.last_error or f"the service token of server {server.id!r} was refused"
        return ServiceTokenFailed(message, retry_after=max(1, math.ceil(wait)), server=server.id)
