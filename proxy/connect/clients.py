"""The proxy as an OAuth client at each server's authorization server.

For a server: its authorization metadata (discovered, cached in process and in
the token store), the client the proxy is there (a static client the operator
set, the proxy's Client ID Metadata Document, or a dynamic registration,
stored sealed and reused), and the token endpoint calls made as that client.
Both the connect flow (flow.py) and the token lifecycle (lifecycle.py) use it;
it uses neither.

Static clients and registrations are few and change rarely: every replica
holds them all in memory (loaded at start, reloaded on `servers` and `resync`
events, which a registration made here announces), so that refreshes go on
while the database is down.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace

import structlog

from proxy.crypto import DecryptError
from proxy.events import ChangeFeed
from proxy.names import ALL_USERS, RESYNC, SERVERS_CHANGED, Event, SecretKind, secret_owned_by
from proxy.oauth import client as oauth_client
from proxy.oauth.client import AuthServerUnavailable, ClientRegistration, OAuthError, TokenResponse
from proxy.oauth.discovery import AuthServer, Discovery, DiscoveryError, discover, probe_challenge
from proxy.oauth.fetch import Fetcher, FetchError, UnsafeURL
from proxy.registry import Registry
from proxy.sealed import SealedSecrets
from proxy.settings import ServerConfig, Settings
from proxy.stores import Connection, TokenStore

log = structlog.get_logger("keybearer.oauth")

CLIENT_METADATA_PATH = "/oauth/client-metadata.json"
CLIENT_NAME = "Keybearer MCP proxy"
# How long a replica waits for another one's dynamic registration.
REGISTRATION_WAIT = 15.0
# The secrets every replica keeps in memory: what a refresh needs from the database.
CLIENT_KINDS = (SecretKind.STATIC_CLIENT, SecretKind.CLIENT_REGISTRATION)


def discovery_cache_key(server: ServerConfig) -> str:
    """Bound to the server's url: what was found for one address is never used for another."""
    return f"oauth:{server.id}:discovery:{hashlib.sha256(server.url.encode()).hexdigest()[:16]}"


def server_cache_prefix(server_id: str) -> str:
    """Every token-store cache entry that belongs to a server."""
    return f"oauth:{server_id}:"


class OAuthClients:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        secrets: SealedSecrets,
        tokens: TokenStore,
        fetcher: Fetcher,
        feed: ChangeFeed,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.secrets = secrets
        self.tokens = tokens
        self.fetcher = fetcher
        self.feed = feed
        self.redirect_uri = settings.public_url + settings.callback_path
        self.client_id_url = settings.public_url + CLIENT_METADATA_PATH
        # server id -> (until, the url it was found for, what was found)
        self._discoveries: dict[str, tuple[float, str, Discovery]] = {}
        # kind -> name -> value: every static client and registration (see load)
        self._known: dict[SecretKind, dict[str, str]] | None = None

    async def load(self) -> None:
        """Read every static client and registration. On failure what was known stays."""
        self._known = {kind: await self.secrets.all(kind) for kind in CLIENT_KINDS}

    async def _clients(self, kind: SecretKind) -> dict[str, str]:
        if self._known is None:
            await self.load()
        assert self._known is not None
        return self._known[kind]

    # -- discovery -------------------------------------------------------------------

    async def discovery(self, server: ServerConfig, *, fresh: bool = False) -> Discovery:
        """The server's authorization metadata, cached in-process and in the token store."""
        now = time.time()
        cached = self._discoveries.get(server.id)
        if cached and cached[0] > now and cached[1] == server.url and not fresh:
            return cached[2]
        key = discovery_cache_key(server)
        found: Discovery | None = None
        if not fresh:
            raw = await self.tokens.cache_get(key)
            found = _discovery_from_json(raw) if raw else None
        if found is None:
            challenge = await probe_challenge(self.fetcher, server.url)
            found = await discover(self.fetcher, server.url, challenge)
            await self.tokens.cache_set(key, _discovery_to_json(found), self.settings.metadata_cache_ttl)
        self._discoveries[server.id] = (now + min(60.0, self.settings.metadata_cache_ttl), server.url, found)
        return found

    async def on_event(self, event: Event) -> None:
        """A reset or a changed definition ends what was discovered for the server;
        stored secrets that changed are read again."""
        if event.kind == RESYNC:
            self._discoveries.clear()
        elif event.kind == "connection" and event.user == ALL_USERS and event.server:
            self._discoveries.pop(event.server, None)
        if event.kind in (SERVERS_CHANGED, RESYNC):
            await self.load()

    # -- the client ------------------------------------------------------------------

    async def client_for(self, server: ServerConfig, auth_server: AuthServer) -> ClientRegistration:
        static = await self._static_client(server)
        if static is not None:
            client_id, secret, method = static
            registration = oauth_client.static_registration(auth_server, client_id, secret, self.redirect_uri)
            return registration if method is None else replace(registration, auth_method=method)
        loopback_ok = self.settings.oauth_allow_http_loopback
        if auth_server.client_id_metadata_document_supported and oauth_client.cimd_usable(
            self.client_id_url, loopback_ok
        ):
            return oauth_client.cimd_registration(
                self.client_id_url, auth_server, self.redirect_uri, loopback_ok
            )
        return await self._registered(server, auth_server)

    async def _registered(self, server: ServerConfig, auth_server: AuthServer) -> ClientRegistration:
        """The stored dynamic registration, made once: replicas that start at once wait
        for the one that registers instead of each registering a client of its own
        (the connections made with a client overwritten in the store could not refresh)."""
        name = self._registration_name(server, auth_server)
        known = await self._clients(SecretKind.CLIENT_REGISTRATION)
        if name in known:
            return _registration_from_json(known[name])
        deadline = time.monotonic() + REGISTRATION_WAIT
        while True:
            # Not known here yet: another replica may have registered moments ago.
            stored = await self.secrets.get(SecretKind.CLIENT_REGISTRATION, name)
            if stored:
                known[name] = stored
                return _registration_from_json(stored)
            lock = await self.tokens.acquire_lock(f"register:{name}", REGISTRATION_WAIT)
            if lock is not None:
                break
            if time.monotonic() > deadline:
                raise AuthServerUnavailable(
                    f"another replica is registering with {auth_server.issuer}; retry"
                )
            await asyncio.sleep(0.2)
        try:
            stored = await self.secrets.get(SecretKind.CLIENT_REGISTRATION, name)
            if stored:
                return _registration_from_json(stored)
            registration = await oauth_client.register_client(
                self.fetcher, auth_server, self.redirect_uri, CLIENT_NAME, server.scopes
            )
            record = json.dumps({k: v for k, v in asdict(registration).items() if k != "raw"})
            await self.secrets.put(SecretKind.CLIENT_REGISTRATION, name, record)
            known[name] = record
            await self.feed.announce(SERVERS_CHANGED)
            log.info("registered OAuth client", server=server.id, issuer=auth_server.issuer)
            return registration
        finally:
            await self.tokens.release_lock(f"register:{name}", lock)

    async def client_for_connection(
        self, server: ServerConfig, auth_server: AuthServer, conn: Connection
    ) -> ClientRegistration:
        """The client the connection's tokens were issued to. A refresh by any other
        client fails (`invalid_grant`): after a new public_url (a new redirect URI,
        so a new registration) or a re-registration, earlier connections refresh
        with the registration they were made with, while it is still stored."""
        current = await self.client_for(server, auth_server)
        if not conn.client_id or current.client_id == conn.client_id:
            return current
        for name, raw in (await self._clients(SecretKind.CLIENT_REGISTRATION)).items():
            if secret_owned_by(name, server.id):
                earlier = _registration_from_json(raw)
                if earlier.client_id == conn.client_id and earlier.issuer == auth_server.issuer:
                    return earlier
        return current  # the authorization server decides

    async def forget_registration(self, server: ServerConfig, auth_server: AuthServer) -> None:
        name = self._registration_name(server, auth_server)
        await self.secrets.delete(SecretKind.CLIENT_REGISTRATION, name)
        (await self._clients(SecretKind.CLIENT_REGISTRATION)).pop(name, None)
        await self.feed.announce(SERVERS_CHANGED)

    def _registration_name(self, server: ServerConfig, auth_server: AuthServer) -> str:
        return f"{server.id}|{auth_server.issuer}|{self.redirect_uri}"

    async def _static_client(self, server: ServerConfig) -> tuple[str, str | None, str | None] | None:
        stored = (await self._clients(SecretKind.STATIC_CLIENT)).get(server.id)
        if stored:
            record = json.loads(stored)
            return record["client_id"], record.get("client_secret"), record.get("auth_method")
        if server.client_id:
            return server.client_id, self.registry.client_secret(server), None
        return None

    # -- token endpoint calls as that client -------------------------------------------

    async def refresh(
        self,
        server: ServerConfig,
        conn: Connection,
        refresh_token: str,
        before_call: Callable[[], Awaitable[None]],
    ) -> TokenResponse:
        """The refresh call for a stored connection (the lifecycle's refresher).
        `before_call` runs right before the token request and may stop it by raising."""
        try:
            found = await self.discovery(server)
            registration = await self.client_for_connection(server, found.auth_server, conn)
        except (DiscoveryError, UnsafeURL, FetchError) as exc:
            raise AuthServerUnavailable(str(exc)) from None
        if conn.issuer and found.auth_server.issuer != conn.issuer:
            raise OAuthError("invalid_grant", "the server's authorization server changed")
        await before_call()
        try:
            return await oauth_client.refresh(
                self.fetcher, found.auth_server, registration, refresh_token,
                found.resource if server.resource else None,
            )  # fmt: skip
        except OAuthError as exc:
            if exc.error == "invalid_client" and registration.source == "dcr":
                await self.forget_registration(server, found.auth_server)
            raise

    async def revoke(self, server: ServerConfig, token: str, hint: str) -> None:
        """RFC 7009, where the authorization server offers it. A failure is logged:
        forgetting the tokens still protects the user."""
        try:
            found = await self.discovery(server)
            registration = await self.client_for(server, found.auth_server)
            await oauth_client.revoke(self.fetcher, found.auth_server, registration, token, hint)
        except (
            DecryptError,
            DiscoveryError,
            UnsafeURL,
            FetchError,
            OAuthError,
            AuthServerUnavailable,
        ) as exc:
            log.warning("revocation failed; tokens deleted anyway", server=server.id, reason=str(exc))


def _registration_from_json(raw: str) -> ClientRegistration:
    return ClientRegistration(**{**json.loads(raw), "raw": {}})


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
