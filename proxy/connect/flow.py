"""Connecting a user to an OAuth-protected MCP server: the flow's logic.

    begin():  discovery (cached) -> the client (clients.py) -> PKCE + single-use
              state, bound to the browser -> the authorization URL
    finish(): take the state (once) -> same browser? -> RFC 9207 `iss` ->
              code exchange with `resource` -> tokens stored, sealed

The browser-facing handlers are in routes.py; refreshing is in lifecycle.py;
the protocol itself (discovery order, URL safety, token requests) is in
proxy/oauth/.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import asdict, dataclass

import structlog

from proxy import tracing
from proxy.connect.clients import OAuthClients
from proxy.connect.lifecycle import TokenLifecycle, new_connection, unseal
from proxy.crypto import DecryptError, Keyring
from proxy.errors import KeybearerError
from proxy.names import LINK, PENDING_STATE
from proxy.oauth import client as oauth_client
from proxy.oauth.client import AuthServerUnavailable, ClientRegistration, OAuthError, TokenResponse
from proxy.oauth.discovery import DiscoveryError
from proxy.oauth.fetch import FetchError, UnsafeURL
from proxy.registry import Registry
from proxy.settings import ServerConfig
from proxy.stores import Connection, StoreUnavailable, TokenStore

log = structlog.get_logger("keybearer.oauth")

STATE_TTL = 600.0  # the brief's 10 minutes


class FlowError(KeybearerError):
    """Something a person in the browser must be told: what happened, what to do."""

    def __init__(self, title: str, what: str, next_step: str, status: int = 400) -> None:
        super().__init__(what, next_step=next_step, status=status, code="connect_failed", title=title)


@dataclass(frozen=True)
class Pending:
    """An authorization in progress, stored sealed under its `state`."""

    user: str
    server: str
    issuer: str
    client_id: str
    verifier: str
    browser: str  # hash of the browser cookie that started it
    resource: str | None
    scopes: tuple[str, ...]
    redirect_uri: str
    # The server's url when the sign-in began: tokens are for that address only.
    server_url: str


def browser_hash(browser_id: str) -> str:
    return hashlib.sha256(browser_id.encode()).hexdigest()


class ConnectFlow:
    def __init__(
        self, keyring: Keyring, registry: Registry, tokens: TokenStore, clients: OAuthClients,
        lifecycle: TokenLifecycle,
    ) -> None:  # fmt: skip
        self.keyring = keyring
        self.registry = registry
        self.tokens = tokens
        self.clients = clients
        self.lifecycle = lifecycle

    # -- the flow ----------------------------------------------------------------------

    async def begin(
        self, user: str, server: ServerConfig, browser_id: str, extra_scopes: tuple[str, ...]
    ) -> str:
        """Prepare an authorization; return the URL to send the browser to."""
        try:
            with tracing.span("connect begin", {"keybearer.server": server.id}):
                found = await self.clients.discovery(server)
                registration = await self.clients.client_for(server, found.auth_server)
        except (DiscoveryError, UnsafeURL, FetchError, OAuthError, AuthServerUnavailable) as exc:
            log.warning("cannot start authorization", server=server.id, reason=str(exc))
            raise FlowError(
                "Cannot connect right now",
                f"Keybearer could not prepare the sign-in for {server.id}: {exc}",
                "Try again in a minute. If it keeps failing, show this message to the proxy's operator.",
                502,
            ) from None
        scopes = oauth_client.requested_scopes(
            found.auth_server, _union(found.scopes or server.scopes, extra_scopes)
        )
        verifier, challenge = oauth_client.pkce_pair()
        state = self._state_for(browser_id)
        resource = found.resource if server.resource else None
        pending = Pending(
            user, server.id, found.auth_server.issuer, registration.client_id, verifier,
            browser_hash(browser_id), resource, scopes, self.clients.redirect_uri, server.url,
        )  # fmt: skip
        sealed = self.keyring.encrypt(
            PENDING_STATE, json.dumps(asdict(pending)).encode(), f"{PENDING_STATE}:{state}"
        )
        await self.tokens.put_pending(state, sealed, STATE_TTL)
        return oauth_client.authorization_url(
            found.auth_server, registration.client_id, self.clients.redirect_uri, state, challenge, scopes, resource,
            server.authorization_params,
        )  # fmt: skip

    def _state_for(self, browser_id: str, nonce: str | None = None) -> str:
        """A fresh state that names the browser which began the sign-in (by a MAC of
        its cookie), so that another browser's callback is refused before the
        state is spent: whoever merely sees the URL cannot burn it."""
        nonce = nonce or secrets.token_urlsafe(32)
        tag = self.keyring.sign(LINK, f"state\n{nonce}\n{browser_hash(browser_id)}".encode())[:22]
        return f"{nonce}.{tag}"

    async def take_pending(self, state: str, browser_id: str) -> Pending:
        """The pending authorization for `state`, consumed: a second use finds nothing."""
        if not state or len(state) > 128 or not state.isascii():
            raise _stale()
        nonce = state.partition(".")[0]
        if not hmac.compare_digest(self._state_for(browser_id, nonce).encode(), state.encode()):
            log.warning("callback from another browser refused")
            raise other_browser()
        sealed = await self.tokens.take_pending(state)
        if sealed is None:
            raise _stale()
        try:
            data = json.loads(self.keyring.decrypt(PENDING_STATE, sealed, f"{PENDING_STATE}:{state}"))
        except DecryptError:
            raise _stale() from None
        try:
            return Pending(**{**data, "scopes": tuple(data["scopes"])})
        except (TypeError, KeyError):  # begun by an older version of the proxy
            raise _stale() from None

    async def finish(self, pending: Pending, code: str, iss: str | None) -> Connection:
        server = self.registry.get(pending.server)
        if server is None or server.credential_kind != "oauth":
            raise FlowError(
                "Server gone", f"The server {pending.server} is no longer configured.", "Ask the operator."
            )
        if server.url != pending.server_url:
            raise FlowError(
                "Server changed",
                f"The address of {pending.server} changed while you were signing in.",
                "Go back to your agent and retry; it will give you a fresh link.",
            )
        registration: ClientRegistration | None = None
        try:
            with tracing.span("connect finish", {"keybearer.server": server.id}):
                found = await self.clients.discovery(server)
                if found.auth_server.issuer != pending.issuer:
                    raise OAuthError("invalid_response", "the authorization server changed during sign-in")
                oauth_client.check_callback_issuer(found.auth_server, iss)
                registration = await self.clients.client_for(server, found.auth_server)
                if registration.client_id != pending.client_id:
                    raise OAuthError("invalid_client", "the client changed during sign-in")
                issued = await oauth_client.exchange_code(
                    self.clients.fetcher, found.auth_server, registration, code, pending.redirect_uri, pending.verifier,
                    pending.resource,
                )  # fmt: skip
        except OAuthError as exc:
            if exc.error == "invalid_client" and registration is not None and registration.source == "dcr":
                # The next attempt registers afresh.
                await self.clients.forget_registration(server, found.auth_server)
            log.warning("authorization failed", server=server.id, error=exc.error)
            raise FlowError(
                "Connection failed",
                f"{server.id} did not accept the sign-in: {exc}",
                "Go back to your agent and retry; it will give you a fresh link.",
            ) from None
        except (DiscoveryError, UnsafeURL, FetchError, AuthServerUnavailable) as exc:
            raise FlowError(
                "Connection failed",
                f"The authorization server of {server.id} could not be reached: {exc}",
                "Go back to your agent and retry in a minute.",
                502,
            ) from None
        return await self.store_tokens(pending, found.auth_server.issuer, registration.client_id, issued)

    async def store_tokens(
        self, pending: Pending, issuer: str, client_id: str, issued: TokenResponse
    ) -> Connection:
        """Replace whatever was stored, atomically (a reconnect overwrites a refresh in flight)."""
        for _ in range(5):
            current = await self.tokens.get_connection(pending.user, pending.server)
            conn = new_connection(
                self.keyring, current, pending.user, pending.server, issued,
                issuer=issuer, client_id=client_id, requested_scopes=pending.scopes, resource=pending.server_url,
            )  # fmt: skip
            if await self.tokens.put_connection(conn, expected_version=current.version if current else 0):
                await self.lifecycle.changed(pending.user, pending.server)
                log.info("connected", server=pending.server, user=pending.user)
                return conn
        raise StoreUnavailable("the connection kept changing while it was being saved; retry")

    async def disconnect(self, user: str, server: ServerConfig) -> bool:
        """Revoke at the provider where it can (RFC 7009), then forget the tokens."""
        conn = await self.tokens.get_connection(user, server.id)
        if conn is None:
            return False
        await self.revoke(server, conn)
        deleted = await self.tokens.delete_connection(user, server.id)
        await self.lifecycle.changed(user, server.id)
        return deleted

    async def revoke(self, server: ServerConfig, conn: Connection) -> None:
        try:
            tokens = unseal(self.keyring, conn)
        except DecryptError as exc:
            log.warning("revocation skipped: stored tokens unreadable", server=server.id, reason=str(exc))
            return
        if tokens.refresh_token:
            await self.clients.revoke(server, tokens.refresh_token, "refresh_token")
        else:
            await self.clients.revoke(server, tokens.access_token, "access_token")


def _union(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*first, *second)))


def other_browser() -> FlowError:
    return FlowError(
        "Started in another browser",
        "This sign-in was started in a different browser (or its cookies were cleared).",
        "Open the link from your agent in this browser and start again.",
        403,
    )


def _stale() -> FlowError:
    return FlowError(
        "Link already used or expired",
        "This sign-in was already completed, has expired, or did not start here.",
        "Go back to your agent and retry; it will give you a fresh link.",
    )
