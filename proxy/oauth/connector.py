"""Connecting a user to an OAuth-protected MCP server: the OAuth flow's logic.

    begin():  discovery (cached) -> the client (static, metadata document, or
              dynamic registration, stored and reused) -> PKCE + single-use
              state, bound to the browser -> the authorization URL
    finish(): take the state (once) -> same browser? -> RFC 9207 `iss` ->
              code exchange with `resource` -> tokens stored, sealed

The browser-facing handlers are in oauth/flow.py; refreshing is in
oauth/lifecycle.py. Protocol details (discovery order, URL safety, token
requests) are in discovery.py, fetch.py and client.py.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, replace

import structlog

from proxy.crypto import DecryptError, Keyring
from proxy.oauth import client as oauth_client
from proxy.oauth.client import AuthServerUnavailable, ClientRegistration, OAuthError, TokenResponse
from proxy.oauth.discovery import AuthServer, Discovery, DiscoveryError, discover, probe_challenge
from proxy.oauth.fetch import Fetcher, FetchError, UnsafeURL
from proxy.oauth.lifecycle import Lifecycle, new_connection, unseal
from proxy.registry import Registry
from proxy.settings import ServerConfig, Settings
from proxy.stores import Connection, StoreUnavailable, TokenStore

log = structlog.get_logger("keybearer.oauth")

STATE_TTL = 600.0  # the brief's 10 minutes
REGISTRATION = "client_registration"
STATIC_CLIENT = "client_secret"
CLIENT_METADATA_PATH = "/oauth/client-metadata.json"
CLIENT_NAME = "Keybearer MCP proxy"


class FlowError(Exception):
    """Something a person in the browser must be told: what happened, what to do."""

    def __init__(self, title: str, what: str, next_step: str, status: int = 400) -> None:
        super().__init__(what)
        self.title, self.what, self.next_step, self.status = title, what, next_step, status


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


def browser_hash(browser_id: str) -> str:
    return hashlib.sha256(browser_id.encode()).hexdigest()


class Connector:
    def __init__(self, settings: Settings, keyring: Keyring, registry: Registry, tokens: TokenStore) -> None:
        self.settings = settings
        self.keyring = keyring
        self.registry = registry
        self.tokens = tokens
        self.fetcher = Fetcher(settings.oauth_allow_http_loopback, settings.oauth_allow_private_addresses)
        self.redirect_uri = settings.public_url + settings.callback_path
        self.client_id_url = settings.public_url + CLIENT_METADATA_PATH
        self.lifecycle = Lifecycle(
            keyring, tokens, settings.refresh_skew, self._refresh, settings.refresh_lock_ttl,
            settings.token_endpoint_cooldown,
        )  # fmt: skip
        self._discoveries: dict[str, tuple[float, Discovery]] = {}

    async def start(self) -> None:
        await self.fetcher.start()

    async def close(self) -> None:
        await self.fetcher.close()

    # -- discovery -------------------------------------------------------------------

    async def discovery(self, server: ServerConfig, *, fresh: bool = False) -> Discovery:
        """The server's authorization metadata, cached in-process and in the token store."""
        now = time.time()
        cached = self._discoveries.get(server.id)
        if cached and cached[0] > now and not fresh:
            return cached[1]
        key = f"oauth:{server.id}:discovery"
        found: Discovery | None = None
        if not fresh:
            raw = await self.tokens.cache_get(key)
            found = _discovery_from_json(raw) if raw else None
        if found is None:
            challenge = await probe_challenge(self.fetcher, server.url)
            found = await discover(self.fetcher, server.url, challenge)
            await self.tokens.cache_set(key, _discovery_to_json(found), self.settings.metadata_cache_ttl)
        self._discoveries[server.id] = (now + min(60.0, self.settings.metadata_cache_ttl), found)
        return found

    def forget(self, server_id: str) -> None:
        self._discoveries.pop(server_id, None)

    # -- the client ------------------------------------------------------------------

    async def client_for(self, server: ServerConfig, auth_server: AuthServer) -> ClientRegistration:
        static = await self._static_client(server)
        if static is not None:
            client_id, secret, method = static
            registration = oauth_client.static_registration(auth_server, client_id, secret, self.redirect_uri)
            return registration if method is None else _with_method(registration, method)
        loopback_ok = self.settings.oauth_allow_http_loopback
        if auth_server.client_id_metadata_document_supported and oauth_client.cimd_usable(
            self.client_id_url, loopback_ok
        ):
            return oauth_client.cimd_registration(
                self.client_id_url, auth_server, self.redirect_uri, loopback_ok
            )
        name = self._registration_name(server, auth_server)
        stored = await self.registry.get_secret(REGISTRATION, name)
        if stored:
            return ClientRegistration(**{**json.loads(stored), "raw": {}})
        registration = await oauth_client.register_client(
            self.fetcher, auth_server, self.redirect_uri, CLIENT_NAME, server.scopes
        )
        record = {k: v for k, v in asdict(registration).items() if k != "raw"}
        await self.registry.set_secret(REGISTRATION, name, json.dumps(record))
        log.info("registered OAuth client", server=server.id, issuer=auth_server.issuer)
        return registration

    async def forget_registration(self, server: ServerConfig, auth_server: AuthServer) -> None:
        await self.registry.delete_secret(REGISTRATION, self._registration_name(server, auth_server))

    def _registration_name(self, server: ServerConfig, auth_server: AuthServer) -> str:
        return f"{server.id}|{auth_server.issuer}|{self.redirect_uri}"

    async def _static_client(self, server: ServerConfig) -> tuple[str, str | None, str | None] | None:
        stored = await self.registry.get_secret(STATIC_CLIENT, server.id)
        if stored:
            record = json.loads(stored)
            return record["client_id"], record.get("client_secret"), record.get("auth_method")
        if server.client_id:
            return server.client_id, self.registry.client_secret(server), None
        return None

    # -- the flow ----------------------------------------------------------------------

    async def begin(
        self, user: str, server: ServerConfig, browser_id: str, extra_scopes: tuple[str, ...]
    ) -> str:
        """Prepare an authorization; return the URL to send the browser to."""
        try:
            found = await self.discovery(server)
            registration = await self.client_for(server, found.auth_server)
        except (DiscoveryError, UnsafeURL, FetchError, OAuthError, AuthServerUnavailable) as exc:
            log.warning("cannot start authorization", server=server.id, reason=str(exc))
            raise FlowError(
                "Cannot connect right now",
                f"Keybearer could not prepare the sign-in for {server.id}: {exc}",
                "Try again in a minute. If it keeps failing, show this message to the proxy's operator.",
                502,
            ) from None
        scopes = _union(found.scopes or server.scopes, extra_scopes)
        verifier, challenge = oauth_client.pkce_pair()
        state = secrets.token_urlsafe(32)
        resource = found.resource if server.resource else None
        pending = Pending(
            user, server.id, found.auth_server.issuer, registration.client_id, verifier,
            browser_hash(browser_id), resource, scopes, self.redirect_uri,
        )  # fmt: skip
        sealed = self.keyring.encrypt("state", json.dumps(asdict(pending)).encode(), f"state:{state}")
        await self.tokens.put_pending(state, sealed, STATE_TTL)
        return oauth_client.authorization_url(
            found.auth_server, registration.client_id, self.redirect_uri, state, challenge, scopes, resource,
            server.authorization_params,
        )  # fmt: skip

    async def take_pending(self, state: str) -> Pending:
        """The pending authorization for `state`, consumed: a second use finds nothing."""
        if not state or len(state) > 128:
            raise _stale()
        sealed = await self.tokens.take_pending(state)
        if sealed is None:
            raise _stale()
        try:
            data = json.loads(self.keyring.decrypt("state", sealed, f"state:{state}"))
        except DecryptError:
            raise _stale() from None
        return Pending(**{**data, "scopes": tuple(data["scopes"])})

    async def finish(self, pending: Pending, code: str, iss: str | None) -> Connection:
        server = self.registry.get(pending.server)
        if server is None or server.auth != "oauth":
            raise FlowError(
                "Server gone", f"The server {pending.server} is no longer configured.", "Ask the operator."
            )
        registration: ClientRegistration | None = None
        try:
            found = await self.discovery(server)
            if found.auth_server.issuer != pending.issuer:
                raise OAuthError("invalid_response", "the authorization server changed during sign-in")
            oauth_client.check_callback_issuer(found.auth_server, iss)
            registration = await self.client_for(server, found.auth_server)
            if registration.client_id != pending.client_id:
                raise OAuthError("invalid_client", "the client changed during sign-in")
            answer = await oauth_client.exchange_code(
                self.fetcher, found.auth_server, registration, code, pending.redirect_uri, pending.verifier,
                pending.resource,
            )  # fmt: skip
        except OAuthError as exc:
            if exc.error == "invalid_client" and registration is not None and registration.source == "dcr":
                # The next attempt registers afresh.
                await self.forget_registration(server, found.auth_server)
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
        return await self.store_tokens(pending, found.auth_server.issuer, registration.client_id, answer)

    async def store_tokens(
        self, pending: Pending, issuer: str, client_id: str, answer: TokenResponse
    ) -> Connection:
        """Replace whatever was stored, atomically (a reconnect overwrites a refresh in flight)."""
        for _ in range(5):
            current = await self.tokens.get_connection(pending.user, pending.server)
            conn = new_connection(
                self.keyring, current, pending.user, pending.server, answer,
                issuer=issuer, client_id=client_id, requested_scopes=pending.scopes,
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
            found = await self.discovery(server)
            registration = await self.client_for(server, found.auth_server)
            token, hint = (
                (tokens.refresh_token, "refresh_token")
                if tokens.refresh_token
                else (tokens.access_token, "access_token")
            )
            await oauth_client.revoke(self.fetcher, found.auth_server, registration, token, hint)
        except (
            DecryptError,
            DiscoveryError,
            UnsafeURL,
            FetchError,
            OAuthError,
            AuthServerUnavailable,
        ) as exc:
            # Forgetting the tokens still protects the user; say that revocation failed.
            log.warning("revocation failed; tokens deleted anyway", server=server.id, reason=str(exc))

    async def _refresh(self, server: ServerConfig, conn: Connection, refresh_token: str) -> TokenResponse:
        try:
            found = await self.discovery(server)
            registration = await self.client_for(server, found.auth_server)
        except (DiscoveryError, UnsafeURL, FetchError) as exc:
            raise AuthServerUnavailable(str(exc)) from None
        if conn.issuer and found.auth_server.issuer != conn.issuer:
            raise OAuthError("invalid_grant", "the server's authorization server changed")
        try:
            return await oauth_client.refresh(
                self.fetcher, found.auth_server, registration, refresh_token,
                found.resource if server.resource else None,
            )  # fmt: skip
        except OAuthError as exc:
            if exc.error == "invalid_client" and registration.source == "dcr":
                await self.forget_registration(server, found.auth_server)
            raise


def _with_method(registration: ClientRegistration, method: str) -> ClientRegistration:
    return replace(registration, auth_method=method)


def _union(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*first, *second)))


def _stale() -> FlowError:
    return FlowError(
        "Link already used or expired",
        "This sign-in was already completed, has expired, or did not start here.",
        "Go back to your agent and retry; it will give you a fresh link.",
    )


def _discovery_to_json(found: Discovery) -> str:
    data = asdict(found)
    data["auth_server"]["raw"] = dict(found.auth_server.raw)
    return json.dumps(data)


def _discovery_from_json(raw: str) -> Discovery | None:
    try:
        data = json.loads(raw)
        server = data.pop("auth_server")
        for key in (
            "scopes_supported",
            "token_endpoint_auth_methods_supported",
            "code_challenge_methods_supported",
        ):
            if server.get(key) is not None:
                server[key] = tuple(server[key])
        return Discovery(**{**data, "scopes": tuple(data["scopes"]), "auth_server": AuthServer(**server)})
    except (ValueError, TypeError, KeyError):
        return None
